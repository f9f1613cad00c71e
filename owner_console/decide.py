"""The release decision: an engine result and its accounting -> released, held or refused.

The decision order of ``docs/policy.md`` is applied here, after
:func:`owner_console.policy.account` added the accounting and the engine ran
the plan.  What the scientist is told is computed from the plan and the
policy only; counts and which check failed are the owner's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import polars as pl

from bastion_kernel.protocol import BastionError

from .model import Decision, Held, Released, strictest_unsafe
from .policy import AccountedPlan, Source, _Rep


@dataclass
class _SourceCheck:
    source: Source
    rep: _Rep
    fed_rows: int = 0
    failing: int = 0
    unmatched: int = 0
    smallest: int | None = None
    messages: list[str] = field(default_factory=list)


def decide(accounted: AccountedPlan, table: pl.DataFrame, scientist: str | None = None) -> Released | Held:
    """Apply the release rule to an engine result.

    The decision order (``docs/policy.md``): per row, every source that fed
    it must have fed it with at least its K rows (people); every aggregate in
    it must have at least K real contributors per source and no dominant row;
    small groups are then dropped if every source asks for suppression; the
    result must not be empty, must be an aggregate for a scientist limited to
    aggregates, and must not exceed the rows limit.  Anything that fails goes
    to the strictest unsafe handling among the sources.

    Parameters
    ----------
    accounted : AccountedPlan
        The plan that produced ``table``.
    table : polars.DataFrame
        The engine's result: the scientist's columns plus accounting columns.
    scientist : str, optional
        Who asked; recorded in ``Decision.details``.

    Returns
    -------
    Released or Held
        With the accounting columns removed and hidden values replaced by ``*``.

    Raises
    ------
    BastionError
        ``PolicyViolation`` when the result fails the rule and a source's
        policy says ``reject`` (or ``aggregates_only`` applies).
    """
    rows = table.height
    checks = [_check_source(accounted.sources[s], rep, table, accounted.aggregated)
              for s, rep in sorted(accounted.reps.items())]
    contributions = _check_contributions(accounted, table)
    failing_mask = _failing_rows(accounted, table, checks, contributions)
    datasets = tuple(dict.fromkeys(c.source.dataset for c in checks))
    fed_by = [c.source.policy for c in checks]
    details: dict[str, Any] = {
        "rows": rows,
        "sources": list(datasets),
        "min_group_size": {c.source.dataset: c.source.policy.min_group_size for c in checks},
        "aggregated": accounted.aggregated,
    }
    if scientist is not None:
        details["scientist"] = scientist
    counted = [c.smallest for c in checks if c.smallest is not None]
    if counted:
        details["smallest_count"] = min(counted)
    details["failing_rows"] = int(failing_mask.sum())

    notes = _hidden_notes(accounted.hidden)
    problems = [m for c in checks for m in c.messages] + contributions.messages
    # Small-cell suppression: only when every source asks for it, and only for aggregates.
    suppress = (bool(fed_by) and all(p.suppress_small_groups for p in fed_by) and accounted.aggregated
                and not any(c.rep.individual for c in checks) and bool(problems))
    if suppress:
        dropped = int(failing_mask.sum())
        table = table.filter(~failing_mask)
        rows = table.height
        details["suppressed_groups"] = dropped
        notes.append(f"{dropped} group(s) computed from too few rows (or with too few contributors) were "
                     f"left out by the owner's small-group suppression")
        problems = []
    released = _wipe(table.select(accounted.columns), accounted.hidden)

    # An empty result says "nobody matched": information about every source,
    # unless no source asks for a minimum group size (K = 1 releases rows anyway).
    if rows == 0 and any(c.source.policy.min_group_size > 1 for c in checks):
        names = ", ".join(repr(d) for d in datasets)
        problems.insert(0, f"the result is empty: that no row matched is itself information about {names}")
    only_aggregates = sorted({c.source.dataset for c in checks if c.source.policy.aggregates_only})
    if only_aggregates and not accounted.aggregated:
        problems.append(f"the owner releases only aggregates of {', '.join(repr(d) for d in only_aggregates)} "
                        "to you, and this result is row-level")
    limits = [p.max_rows_released for p in fed_by if p.max_rows_released is not None]
    if limits and rows > min(limits):
        problems.append(f"the result has {rows} rows, more than the {min(limits)} the owner releases per request")

    if not problems:
        reason = "; ".join(dict.fromkeys(_pass_message(c, accounted.aggregated) for c in checks))
        for dataset, smallest in contributions.smallest.items():
            reason += (f"; every aggregate had at least {details['min_group_size'][dataset]} contributing rows "
                       f"of {dataset!r} (smallest: {smallest})")
        if suppress:
            reason += f"; {details['suppressed_groups']} small group(s) suppressed"
        return Released(released, Decision("allow", reason or "no protected source fed this result",
                                           datasets, details), notes)

    action = "reject" if only_aggregates else strictest_unsafe([p.unsafe for p in fed_by])
    smallest_k = min((p.min_group_size for p in fed_by), default=1)
    largest_k = max((p.min_group_size for p in fed_by), default=1)
    allowed = (f"only non-empty aggregates over groups of at least {largest_k} rows of each source"
               if smallest_k != largest_k else
               f"only non-empty aggregates over groups of at least {largest_k} rows")
    tail = {"reject": f"{allowed} are released",
            "review": f"{allowed} are released without review",
            "log": f"{allowed} are released without review; this result is released and logged"}[action]
    reason = "; ".join(dict.fromkeys(problems)) + "; " + tail
    decision = Decision(action, reason, datasets, details)
    if action == "reject":
        raise BastionError("PolicyViolation", reason, **details)
    if action == "review":
        return Held(released, decision, notes)
    return Released(released, decision, notes)


def decide_failed(accounted: AccountedPlan, error: BastionError, scientist: str | None = None) -> Held:
    """The decision for a query that failed while running (a runtime error is an oracle).

    Whether a query fails can depend on rows that would never be released
    (a format that fails only for some values, an operation on an empty
    selection), so a failure is answered like a result that fails the rule:
    with the reason the plan alone gives (a row-level result is refused
    whatever its rows), else a reason that names no value, and the sources'
    unsafe handling.  Under ``log`` the value-free ``ExecutionError`` itself
    is raised again: such a result would have been released anyway.

    Returns
    -------
    Held
        Under ``review``: an empty table of the result's columns, for the owner.

    Raises
    ------
    BastionError
        ``PolicyViolation`` under ``reject`` (or ``aggregates_only``), the
        original error under ``log``.
    """
    fed = [accounted.sources[s] for s in sorted(accounted.reps)]
    datasets = tuple(dict.fromkeys(s.dataset for s in fed))
    problems = []
    for s, rep in sorted(accounted.reps.items()):
        source = accounted.sources[s]
        if source.policy.min_group_size <= 1:
            continue
        if rep.kind in ("implicit", "rid"):
            problems.append(f"the result is row-level (each row comes from one row of {source.dataset!r})")
        elif rep.individual:
            problems.append(f"the result holds individual values of {source.dataset!r} (a list of values, first, "
                            f"last, mode, sort_by or a window value from over), each from one row")
    only_aggregates = any(s.policy.aggregates_only for s in fed)
    if all(s.policy.min_group_size <= 1 for s in fed) and not only_aggregates:
        raise error  # nothing is withheld from this scientist: the error tells nothing new
    if not problems:
        problems.append("the query failed while running, so its result could not be checked against the policy "
                        "(what made it fail may depend on rows that are not released)")
    action = "reject" if only_aggregates else strictest_unsafe([s.policy.unsafe for s in fed])
    if action == "log" and not only_aggregates:
        raise error
    ks = [s.policy.min_group_size for s in fed] or [1]
    allowed = (f"only non-empty aggregates over groups of at least {max(ks)} rows of each source"
               if min(ks) != max(ks) else f"only non-empty aggregates over groups of at least {max(ks)} rows")
    tail = {"reject": f"{allowed} are released", "review": f"{allowed} are released without review"}[action]
    reason = "; ".join(dict.fromkeys(problems)) + "; " + tail
    details: dict[str, Any] = {"rows": 0, "sources": list(datasets),
                               "min_group_size": {s.dataset: s.policy.min_group_size for s in fed},
                               "aggregated": accounted.aggregated, "failed": True}
    if scientist is not None:
        details["scientist"] = scientist
    if action == "reject":
        raise BastionError("PolicyViolation", reason, **{k: v for k, v in details.items() if k != "failed"})
    empty = pl.DataFrame({c: [] for c in accounted.columns}, schema={c: pl.String for c in accounted.columns})
    return Held(empty, Decision("review", reason, datasets, details),
                ["the query failed while running; approving it releases an empty table"])


@dataclass
class _ContributionCheck:
    checked: bool = False
    smallest: dict[str, int] = field(default_factory=dict)  # dataset -> fewest contributors to an aggregate
    failing: dict[str, pl.Series] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def _check_contributions(accounted: AccountedPlan, table: pl.DataFrame) -> _ContributionCheck:
    """The contribution rule (at least K real contributors) and the dominance rule, per aggregate."""
    result = _ContributionCheck()
    rows = table.height
    few: dict[str, int] = {}
    dominated, share = 0, 1.0
    for column, (kind, value) in accounted.contribs.items():
        if column not in table.columns:
            continue
        values = table.get_column(column)
        if kind == "contrib":
            source = accounted.sources[value]
            k = source.policy.min_group_size
            result.checked = True
            present = _present(values)
            if k <= 1 or present.len() == 0:
                continue
            smallest = int(present.min())
            result.smallest[source.dataset] = min(result.smallest.get(source.dataset, smallest), smallest)
            bad = _where_present(values, values < k)
            if bad.any():
                result.failing[column] = bad
                few[source.dataset] = min(few.get(source.dataset, smallest), smallest)
        else:
            bad = _where_present(values, values > value)
            if bad.any():
                result.failing[column] = bad
                dominated = max(dominated, int(bad.sum()))
                share = value / 1_000_000
    for dataset, smallest in few.items():
        k = next(s.policy.min_group_size for s in accounted.sources if s.dataset == dataset)
        result.messages.append(
            f"an aggregate had fewer than {k} rows of {dataset!r} (smallest: {smallest}) contributing a value "
            f"other than null or zero (or, for a conditional expression, other than the value most rows share); "
            f"one person's value could ride out inside it (for example through an indicator such as "
            f"when(...).then(x).otherwise(0))")
    if dominated:
        result.messages.append(f"in {dominated} of {rows} rows a single row makes up more than {share:.0%} of a "
                               f"sum or mean (the owner's dominance rule)")
    return result


def _failing_rows(accounted: AccountedPlan, table: pl.DataFrame, checks: list["_SourceCheck"],
                  contributions: _ContributionCheck) -> pl.Series:
    """Which rows of the result fail the group size, contribution or dominance rule."""
    failing = pl.Series("failing", [False] * table.height, dtype=pl.Boolean)
    for check in checks:
        k = check.source.policy.min_group_size
        if k <= 1:
            continue
        if check.rep.kind == "implicit":
            return pl.Series("failing", [True] * table.height, dtype=pl.Boolean)
        values = table.get_column(check.rep.column)
        if check.rep.kind == "rid":
            values = _one_per_row_id(values)
        failing = failing | _where_present(values, values < k)
    for bad in contributions.failing.values():
        failing = failing | bad
    return failing


def _check_source(source: Source, rep: _Rep, table: pl.DataFrame, aggregated: bool) -> _SourceCheck:
    check = _SourceCheck(source, rep)
    k = source.policy.min_group_size
    name = source.dataset
    rows = table.height
    if rep.kind == "implicit":
        check.fed_rows = rows
        check.smallest = 1 if rows else None
        check.failing = rows if k > 1 else 0
    else:
        values = table.get_column(rep.column)
        if rep.kind == "rid":
            values = _one_per_row_id(values)  # a row id stands for one source row
        fed = _present(values)
        check.fed_rows = fed.len()
        counted = fed
        if rep.taintable:  # 0 marks a row with no partner in an outer or anti join
            check.unmatched = int((fed == 0).sum())
            counted = fed.filter(fed > 0)
        check.smallest = int(counted.min()) if counted.len() else None
        check.failing = int((fed < k).sum()) if k > 1 else 0
    if check.failing == 0:
        return check
    if check.unmatched:
        check.messages.append(
            f"{check.unmatched} of {rows} rows depend on rows of {name!r} that had no match in a join "
            f"(what is missing from {name!r} is information too)")
    if rep.kind in ("implicit", "rid"):
        check.messages.append(f"the result is row-level (each row comes from one row of {name!r})")
    elif rep.individual:
        check.messages.append(f"the result holds individual values of {name!r} (a list of values, first, last, "
                              f"mode, sort_by or a window value from over), each from one row")
    else:
        below = check.failing - check.unmatched
        if below:
            unit = "groups" if aggregated else "rows"
            check.messages.append(f"{below} of {rows} {unit} were computed from fewer than {k} rows of {name!r} "
                                  f"(smallest: {check.smallest})")
    return check


def _pass_message(check: _SourceCheck, aggregated: bool) -> str:
    k = check.source.policy.min_group_size
    name = check.source.dataset
    if k <= 1:
        return f"{name!r} has no minimum group size"
    if check.fed_rows == 0:
        return f"no row of {name!r} fed the result"
    unit = "group" if aggregated else "row"
    return f"every {unit} was computed from at least {k} rows of {name!r} (smallest: {check.smallest})"


# The helpers below avoid polars' Series methods that run a lazy query (drop_nulls, clip, fill_null: about
# 0.02-0.1 ms each) when a cheaper native operation gives the same answer: the decision is on the path of
# every fetch.
def _present(values: pl.Series) -> pl.Series:
    """The non-null values."""
    return values if values.null_count() == 0 else values.filter(values.is_not_null())


def _where_present(values: pl.Series, condition: pl.Series) -> pl.Series:
    """``condition`` where ``values`` is not null, else False (never null)."""
    if values.null_count() == 0:
        return condition
    # Kleene logic: False & null is False, so the mask has no nulls.
    return values.is_not_null() & condition


def _one_per_row_id(values: pl.Series) -> pl.Series:
    """Row ids (>= 1, 0 for no partner, null) as counts: 1, 0 or null."""
    return (values > 0).cast(values.dtype)


def _wipe(table: pl.DataFrame, hidden: Mapping[str, Iterable]) -> pl.DataFrame:
    if not hidden:
        return table
    return table.with_columns([pl.repeat("*", table.height, dtype=pl.String).alias(c) for c in hidden])


def _hidden_notes(hidden: Mapping[str, tuple[tuple[str, str], ...]]) -> list[str]:
    notes = []
    for column, pairs in hidden.items():
        if len(pairs) == 1 and pairs[0][1] == column:
            notes.append(f"column {column!r} is hidden by the owner's policy; its values are shown as *")
        else:
            sources = ", ".join(f"{c!r} of {d!r}" for d, c in pairs)
            notes.append(f"column {column!r} is derived from hidden column(s) {sources}; its values are shown as *")
    return notes
