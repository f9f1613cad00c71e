"""The per-aggregate accounting: contributors, holders of an order statistic, finiteness and dominance.

Every aggregation of row-level values gets, per protected source, the
number of rows (people) that made a real contribution to it; an order
statistic, how many hold the value it releases; every aggregation, whether
it is finite; sums, means, std and var, the dominance measures.  These
columns travel with the rows to the result, where
:func:`owner_console.decide.check_contributions` applies the rules of
``docs/policy.md``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from bastion_kernel.contract.walk import walk_exprs

from ..validate import RESERVED_PREFIX
from .accounted import Counting, Source
from .dominance import DOMINANCE_FUNCTIONS, share_measure
from .lineage import expr_level, is_plain
from .reshaping import as_masked, kept_rows

# Aggregations whose value is computed from their input's values: the
# contribution rule applies to them (``len`` carries nothing but the group size).
_CONTRIBUTION_FUNCTIONS = ("sum", "mean", "median", "min", "max", "std", "var", "quantile", "count", "n_unique",
                           "null_count")
# Aggregations that release one row's value: at least K contributors must hold it.
_ORDER_STATISTICS = ("min", "max", "median", "quantile")
# Aggregations of values that can be inf or NaN, or overflow: such a value is not released.
_FINITE_FUNCTIONS = ("sum", "mean", "median", "min", "max", "std", "var", "quantile")
# Accounting kinds that fail when too large (the others fail when too small):
# carried through a later aggregation as their largest value.
_LARGEST_FAILS = ("dominated",)


def row_aggregations(expr: dict) -> list[dict]:
    """The aggregation calls of an expression that reduce row-level values (outermost first).

    Aggregates nested inside another aggregation's input (``sum(x.fill_null(x.max()))``)
    are found too: their value flows into the outer one.
    """
    return [node for node in walk_exprs(expr)
            if node["expr"] == "fn" and node["name"] in _CONTRIBUTION_FUNCTIONS and expr_level(node["input"]) == "row"]


def carried(contribs: Mapping[str, tuple[str, int]]) -> list[dict]:
    """Aggregating rows keeps the weakest measure among them (fewest contributors, largest share)."""
    return [{"expr": "acct_max", "column": c, "name": c} if kind in _LARGEST_FAILS else
            {"expr": "acct_min", "column": c, "name": c} for c, (kind, _) in contribs.items()]


class Contributions:
    """Builds the per-aggregate accounting expressions of one plan.

    ``sources`` is the plan's list of sources as the accountant finds them
    (shared, so later scans are seen); accounting columns are numbered
    across the whole plan.
    """

    def __init__(self, sources: Sequence[Source], exact_dominance: bool = False):
        self.sources = sources
        self.exact_dominance = exact_dominance
        self.serial = 0  # numbers contribution columns, unique in the whole plan

    def of(self, exprs: list[dict], reps: Mapping[int, Counting],
           lineage: Mapping[str, frozenset] | None = None) -> tuple[list[dict], dict]:
        """Accounting expressions for the contribution, order-statistic, dominance and finiteness rules.

        For every aggregation of row-level values and every protected source
        (K > 1) feeding it: how many of that source's rows (people) made a
        real contribution; for an order statistic (min, max, median,
        quantile), how many hold the released value, and for ``n_unique``,
        the fewest holding one of the values it counts.  Per aggregation:
        whether it is finite, and for sums, means, std and var over rows of
        the sources, the dominance measures the sources' policies ask for.
        ``lineage`` (the input frame's) lets ``n_unique`` of a source's own
        person column count people without the holders' check.

        Returns
        -------
        tuple[list[dict], dict]
            The expressions, and their columns -> ``(kind, source index or bound)``
            (:attr:`owner_console.policy.AccountedPlan.contribs`).
        """
        accounting: list[dict] = []
        contribs: dict[str, tuple[str, int]] = {}
        protected = [s for s in reps if self.sources[s].policy.min_group_size > 1]
        shares = [self.sources[s].policy.max_share for s in reps if self.sources[s].policy.max_share is not None]
        # Dominance is about single people: over rows that are already aggregates
        # it would weigh groups, whose own contributions were checked when made.
        over_rows = any(rep.kind != "count" for rep in reps.values())
        dominance = over_rows and any(self.sources[s].policy.dominance for s in protected)
        for expr in exprs:
            for call in row_aggregations(expr):
                self.serial += 1
                j = self.serial
                masked = {**call, "input": as_masked(call["input"])}
                name = call["name"]
                for s in protected:  # decide() applies these rules only under K > 1: no column to compute
                    rep = reps[s]
                    counted = {"kind": rep.kind, "column": rep.column, "exact": rep.disjoint}
                    column = f"{RESERVED_PREFIX}_k{j}_{s}"
                    accounting.append({"expr": "acct_contrib", "input": masked["input"], "function": name,
                                       **counted, "padded": not is_plain(call["input"]), "name": column})
                    contribs[column] = ("contrib", s)
                    if name in _ORDER_STATISTICS or (name == "n_unique"
                                                     and not self._counts_people(call["input"], s, lineage)):
                        column = f"{RESERVED_PREFIX}_h{j}_{s}"
                        kept = kept_rows(call["input"]) if name == "n_unique" else None
                        accounting.append({"expr": "acct_held", "call": masked, "kept": kept, **counted,
                                           "name": column})
                        contribs[column] = ("held", s)
                if not protected and not shares:
                    continue
                if protected and name in _FINITE_FUNCTIONS:
                    column = f"{RESERVED_PREFIX}_f{j}"
                    accounting.append({"expr": "acct_finite", "call": masked, "name": column})
                    contribs[column] = ("finite", 1)
                if name not in DOMINANCE_FUNCTIONS or not over_rows:
                    continue
                if dominance or shares:
                    column = f"{RESERVED_PREFIX}_d{j}"
                    accounting.append(share_measure(masked["input"], column, self.exact_dominance, dominance, shares))
                    contribs[column] = ("dominated", 0)
        return accounting, contribs

    def _counts_people(self, expr: dict, s: int, lineage: Mapping[str, frozenset] | None) -> bool:
        """True when ``expr`` is source ``s``'s own person column, unchanged: each of its values is one person."""
        person = self.sources[s].policy.person_id
        while expr["expr"] == "alias":
            expr = expr["input"]
        return (person is not None and lineage is not None and expr["expr"] == "col"
                and lineage[expr["name"]] == frozenset({(s, person)}))
