"""What the accounting produces: the sources of a plan, how each is counted, and the accounted plan.

:class:`AccountedPlan` is what :func:`owner_console.policy.account` returns
and what the engine runs and :mod:`owner_console.decide` reads: the plan with
its ``acct_*`` nodes, the scientist's columns, every :class:`Source` and the
:class:`Counting` of each source that feeds the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..model import Policy


@dataclass(frozen=True)
class Source:
    """One scan occurrence of a dataset (or saved result) in a plan."""

    index: int
    dataset: str
    policy: Policy


@dataclass(frozen=True)
class Counting:
    """How one source is counted in a frame's rows.

    ``kind`` is one of:

    ``implicit``
        Every row is one distinct source row and no two rows share one (scan,
        filter, sort, head...).  A group's count is ``len``: exact and cheap.
    ``rid``
        A row-id column (1, 2, ...; null: the row is not from this source,
        e.g. after ``concat``; 0: an outer join found no partner on this
        side).  Used once rows may be duplicated (joins) or mixed (concat); a
        group's count is the number of distinct ids.
    ``count``
        A count column on aggregated rows (null: not fed by this source; 0:
        fed by fewer than K, e.g. an unmatched outer-join row).  A
        second-level group_by sums counts only when the first-level rows are
        fed by disjoint sets of source rows; otherwise each row counts as one
        (row-level).

    With ``person_id`` a scan is counted as ``rid`` over a person number, so
    groups count people, not rows.
    """

    kind: str                 # "implicit" | "rid" | "count"
    column: str | None        # the accounting column (None for implicit)
    disjoint: bool = True     # distinct rows are fed by disjoint sets of source rows
    nullable: bool = False    # some rows may not come from this source (concat)
    taintable: bool = False   # some rows may have no partner on this side (outer/anti join)
    individual: bool = False  # rows hold individual values (first/last/mode, implicit lists)
    repeated: bool = False    # a source row may appear in several rows (after a join)
    tainted: bool = False     # rows carry a value from other rows (over, first...): aggregates of them are row-level


@dataclass(frozen=True)
class AccountedPlan:
    """A checked plan with the accounting the policy needs.

    Attributes
    ----------
    plan : dict
        The plan to run: the scientist's operations plus internal ``acct_*``
        nodes that compute per-source counts next to each output row.
    columns : tuple[str, ...]
        The scientist's output columns, in order (all other columns are accounting).
    sources : tuple[Source, ...]
        Every scan occurrence, by index.
    reps : Mapping[int, Counting]
        How each source that feeds the result is counted in the result.
    lineage : Mapping[str, frozenset]
        Output column -> ``{(source index, source column)}``.
    hidden : Mapping[str, tuple[tuple[str, str], ...]]
        Output columns derived from hidden columns -> the ``(dataset, column)`` pairs.
    aggregated : bool
        True when the result rows are aggregates (group_by/agg or a global aggregate).
    contribs : Mapping[str, tuple[str, int]]
        Accounting column -> the per-aggregate check it carries (see
        :func:`owner_console.decide.check_contributions`).
    """

    plan: dict
    columns: tuple[str, ...]
    sources: tuple[Source, ...]
    reps: Mapping[int, Counting]
    lineage: Mapping[str, frozenset]
    hidden: Mapping[str, tuple[tuple[str, str], ...]]
    aggregated: bool
    contribs: Mapping[str, tuple[str, int]] = field(default_factory=dict)
