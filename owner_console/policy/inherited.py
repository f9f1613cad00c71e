"""The policy a saved result inherits from the sources that fed it.

A saved result becomes a source of its own; :func:`inherited_policy` refuses
results that cannot safely be one and combines their sources' policies into
the strictest.
"""
from __future__ import annotations

from typing import Any, Iterable

from bastion_kernel.contract.protocol import BastionError

from ..model import Policy, strictest_unsafe
from .accounted import AccountedPlan


def inherited_policy(accounted: AccountedPlan) -> Policy:
    """The policy a saved result inherits from the sources that fed it: the strictest combination.

    A saved result becomes a source of its own: later queries count its rows
    as if each were one row of a dataset.  That is only safe when no two of
    its rows were fed by the same source row, so results whose rows may repeat
    source rows (after a join, or a concat of one dataset with itself) are
    refused.  A source that counts people (``person_id``) must keep its
    person column in the result, which becomes the result's ``person_id``.
    Columns derived from hidden columns stay hidden under their new names; K
    is the largest of the sources', the unsafe handling the strictest, the
    dominance rule on if any source has it, the share the smallest, the limits
    the smallest; suppression applies only if every source allows it,
    ``aggregates_only`` if any source asks.

    Raises
    ------
    BastionError
        ``PolicyViolation`` when a source's owner does not allow saving, or the
        rows may repeat source rows, or a person column is missing.
    """
    fed_by = [accounted.sources[s] for s in sorted(accounted.reps)]
    refusing = sorted({s.dataset for s in fed_by if not s.policy.allow_save})
    if refusing:
        names = ", ".join(repr(d) for d in refusing)
        raise BastionError("PolicyViolation", f"the owner does not allow saving results derived from {names}; "
                                              "fetch an aggregate instead", sources=refusing)
    datasets = [s.dataset for s in fed_by]
    shared = sorted({accounted.sources[s].dataset for s, rep in accounted.reps.items()
                     if rep.repeated or (not rep.disjoint and accounted.sources[s].policy.person_id is None)})
    repeated = sorted({d for d in datasets if datasets.count(d) > 1})
    if shared or repeated:
        names = ", ".join(repr(d) for d in shared or repeated)
        raise BastionError("PolicyViolation", f"this result cannot be saved: its rows may repeat rows of {names} "
                                              "(after a join or a concat of a dataset with itself), so counting its "
                                              "rows later would overstate how many people fed a result; save the "
                                              "parts before the join instead", sources=shared or repeated)
    person_id = None
    for source in fed_by:
        if source.policy.person_id is None:
            continue
        carriers = [c for c in accounted.columns
                    if accounted.lineage[c] == frozenset({(source.index, source.policy.person_id)})]
        if accounted.aggregated or not carriers or person_id is not None:
            raise BastionError("PolicyViolation", f"{source.dataset!r} counts people by "
                                                  f"{source.policy.person_id!r}: keep that column, unchanged and "
                                                  "row by row, in a result you save", sources=[source.dataset])
        person_id = carriers[0]

    def smallest(values: Iterable[Any]) -> Any:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    policies = [s.policy for s in fed_by]
    return Policy(min_group_size=max((p.min_group_size for p in policies), default=1),
                  unsafe=strictest_unsafe([p.unsafe for p in policies]),
                  hidden=frozenset(accounted.hidden), allow_save=True, person_id=person_id,
                  max_share=smallest(p.max_share for p in policies),
                  dominance=not policies or any(p.dominance for p in policies),
                  suppress_small_groups=bool(policies) and all(p.suppress_small_groups for p in policies),
                  aggregates_only=any(p.aggregates_only for p in policies),
                  max_rows_released=smallest(p.max_rows_released for p in policies),
                  max_join_rows=smallest(p.max_join_rows for p in policies),
                  query_timeout_seconds=smallest(p.query_timeout_seconds for p in policies))
