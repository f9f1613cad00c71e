"""The dominance rule's constants, and the accounting node that measures it.

A sum, mean, std or var is dominated when one or two contributions make up
most of it.  Contributions are measured by their distance from their
group's median, so that a constant added to every row changes nothing and
amplified contributions cannot move the centre.  By default the engine
clears most groups with a cheap bound from plain aggregates; a group it
cannot clear gets :data:`DOMINANCE_UNSURE`, and the executor runs the plan
again with exact measures (:func:`owner_console.decide.needs_exact_dominance`).
"""
from __future__ import annotations

from typing import Sequence

# Aggregations one amplified contribution can carry a value out of: the dominance rule applies to them.
DOMINANCE_FUNCTIONS = ("sum", "mean", "std", "var")
# The default dominance rules (ACRO's defaults), on each contribution's
# distance from its group's median: the two largest distances make up at
# most DOMINANCE_TOP_TWO of the total (the N-K rule with n=2), and the total
# minus the two largest is at least DOMINANCE_P_RATIO of the largest (the
# p-ratio rule).
DOMINANCE_TOP_TWO = 0.9
DOMINANCE_P_RATIO = 0.1
# The value of a dominance column for a group that the cheap bound could not
# clear (0: not dominated, 1: dominated): measured again exactly.
DOMINANCE_UNSURE = 2


def _millionths(share: float) -> int:
    return int(round(share * 1_000_000))


def share_measure(values: dict, name: str, exact: bool, rules: bool, shares: Sequence[float]) -> dict:
    """The ``acct_share`` expression: 1 where an aggregate of ``values`` is dominated, else 0 (or unsure).

    Parameters
    ----------
    values : dict
        The aggregation's input, one value per row (filters masked).
    name : str
        The accounting column it computes.
    exact : bool
        Measure exactly (each group's median and largest distances) instead of the cheap bound.
    rules : bool
        Apply the N-K and p-ratio rules (a source's policy asks for dominance).
    shares : sequence of float
        The sources' ``max_share`` limits; the smallest applies (none: no share limit).
    """
    return {"expr": "acct_share", "input": values, "name": name, "exact": exact,
            "top_two": _millionths(DOMINANCE_TOP_TWO) if rules else None,
            "p_ratio": _millionths(DOMINANCE_P_RATIO) if rules else None,
            "largest": _millionths(min(shares)) if shares else None}
