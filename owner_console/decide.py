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

from bastion_kernel.contract.protocol import BastionError

from .model import Decision, Held, Released, strictest_unsafe
from .policy import DOMINANCE_UNSURE, AccountedPlan, Counting, Source


# ---------------------------------------------------------------------------
# What the scientist may be told.  Every sentence of a decision's public reason
# comes from this table.  Its placeholders hold only facts of the plan and the
# owner's policy: ``sources`` (the names of the datasets the plan reads),
# ``k`` (the owner's minimum group sizes) and ``limit`` (the owner's row
# limit).  Which check failed, counts, sizes and "empty" are the owner's
# (``Decision.detail`` and ``Decision.details``).
PUBLIC_TEXTS: Mapping[str, str] = {
    "row_level": "the result is row-level: each of its rows comes from one row of {sources}",
    "individual": "the result holds individual values of {sources} (a list of values, first, last, mode, "
                  "sort_by, a window value from over, or a value computed with the row order), each from one row",
    "group_size": "every row of an aggregate must come from at least {k} rows (people) of {sources}",
    "contributions": "every aggregate needs at least {k} contributors from {sources}, none of whom dominates "
                     "it, and an order statistic (min, max, median, quantile, n_unique) needs at least {k} of "
                     "them holding the value it releases",
    "empty": "an empty result is not released (that nobody matched is information about {sources})",
    "aggregates_only": "the owner releases only aggregates of {sources} to you",
    "rows_limit": "at most {limit} rows are released per request",
    "allowed": "what is released at once: non-empty aggregates over groups of at least {k} rows (people) of "
               "{sources}",
    "reject": "this result is not released",
    "review": "this result waits for the owner's review",
    "log": "this result is released and logged",
    "allow": "the result meets the owner's release rule for {sources}",
    "no_rule": "no source of this result sets a minimum group size",
    "suppressed": "groups that do not meet the owner's release rule are left out (small-group suppression)",
}
PUBLIC_PLACEHOLDERS = frozenset({"sources", "k", "limit"})


def _text(key: str, accounted: AccountedPlan, sources: Iterable[Source] | None = None) -> str:
    """A public sentence, filled in from the plan and the policy only (never from a result)."""
    chosen = list(sources) if sources is not None else _fed(accounted)
    names = list(dict.fromkeys(s.dataset for s in chosen)) or list(dict.fromkeys(s.dataset for s in _fed(accounted)))
    ks = sorted({s.policy.min_group_size for s in chosen})
    k = (str(ks[0]) if len(ks) == 1 else
         " / ".join(f"{s.policy.min_group_size} of {s.dataset!r}" for s in chosen)) if ks else "1"
    limits = [s.policy.max_rows_released for s in _fed(accounted) if s.policy.max_rows_released is not None]
    return PUBLIC_TEXTS[key].format(sources=", ".join(repr(n) for n in names), k=k,
                                    limit=min(limits) if limits else "")


def _fed(accounted: AccountedPlan) -> list[Source]:
    """The sources that fed the result, in plan order."""
    return [accounted.sources[s] for s in sorted(accounted.reps)]


def _protected(accounted: AccountedPlan) -> list[tuple[Source, Counting]]:
    """The sources with a minimum group size (K > 1) and how the result counts them."""
    return [(accounted.sources[s], rep) for s, rep in sorted(accounted.reps.items())
            if accounted.sources[s].policy.min_group_size > 1]


@dataclass(frozen=True)
class Finding:
    """One failed step of the decision order.

    ``step`` names the step (a key of :data:`PUBLIC_TEXTS`); ``detail`` is
    for the owner only and may hold counts; ``failing`` marks the result rows
    that fail (None: the whole result fails, whatever rows it has).
    """

    step: str
    detail: str
    failing: pl.Series | None = None


# ---------------------------------------------------------------------------
# The decision order (docs/policy.md), one function a step.  Each step has a
# ``*_rule`` function that gives, from the plan and the policy alone, the
# public sentences of the rule it enforces (none when it cannot fail this
# plan), and a ``check_*`` function that reads the result and returns a
# Finding when the step fails.  decide() calls the checks in order.

def group_size_rule(accounted: AccountedPlan) -> list[str]:
    """Rule 1: each released row comes from at least K rows (people) of each protected source."""
    row_level = [s for s, rep in _protected(accounted) if rep.kind in ("implicit", "rid")]
    individual = [s for s, rep in _protected(accounted) if rep.kind == "count" and rep.individual]
    grouped = [s for s, rep in _protected(accounted) if rep.kind == "count" and not rep.individual]
    sentences = []
    if row_level:
        sentences.append(_text("row_level", accounted, row_level))
    if individual:
        sentences.append(_text("individual", accounted, individual))
    if grouped:
        sentences.append(_text("group_size", accounted, grouped))
    return sentences


def check_group_size(accounted: AccountedPlan, table: pl.DataFrame,
                     checks: list["_SourceCheck"]) -> Finding | None:
    """Step 3: rows fed by fewer than K rows (people) of a protected source (``checks``: :func:`source_checks`)."""
    messages = [m for c in checks for m in c.messages]
    if not messages:
        return None
    return Finding("group_size", "; ".join(messages), _failing_rows(accounted, table, checks))


def source_checks(accounted: AccountedPlan, table: pl.DataFrame) -> list["_SourceCheck"]:
    """How each source fed the result's rows (counts for the owner), read once per decision."""
    return [_check_source(accounted.sources[s], rep, table, accounted.aggregated)
            for s, rep in sorted(accounted.reps.items())]


def contributions_rule(accounted: AccountedPlan) -> list[str]:
    """Rules 2-3: contributors, dominance and order statistics of every aggregate."""
    protected = [s for s, _ in _protected(accounted)]
    return [_text("contributions", accounted, protected)] if accounted.contribs and protected else []


def check_contributions(accounted: AccountedPlan, table: pl.DataFrame,
                        contributions: "_ContributionCheck") -> Finding | None:
    """Step 4: aggregates with too few contributors, a dominant contribution or an unshared order statistic.

    ``contributions`` is :func:`_check_contributions` of the same result.
    """
    if not contributions.messages and not contributions.failing:
        return None
    failing = pl.Series("failing", [False] * table.height, dtype=pl.Boolean)
    for bad in contributions.failing.values():
        failing = failing | bad
    return Finding("contributions", "; ".join(contributions.messages) or "an aggregate failed the contribution "
                                                                        "rule", failing)


def empty_rule(accounted: AccountedPlan) -> list[str]:
    """Rule: an empty result is information about every protected source."""
    protected = [s for s, _ in _protected(accounted)]
    return [_text("empty", accounted, protected)] if protected and accounted.aggregated else []


def check_empty(accounted: AccountedPlan, table: pl.DataFrame) -> Finding | None:
    """Step 6: the result is empty while a source sets K > 1."""
    if table.height == 0 and _protected(accounted):
        return Finding("empty", "the result is empty")
    return None


def aggregates_only_rule(accounted: AccountedPlan) -> list[str]:
    """Rule: a source whose policy says ``aggregates_only`` releases no row-level result."""
    limited = [s for s in _fed(accounted) if s.policy.aggregates_only]
    return [_text("aggregates_only", accounted, limited)] if limited and not accounted.aggregated else []


def check_aggregates_only(accounted: AccountedPlan, table: pl.DataFrame) -> Finding | None:
    """Step 7: a row-level result for a scientist limited to aggregates."""
    if aggregates_only_rule(accounted):
        return Finding("aggregates_only", "the result is row-level and the owner releases only aggregates")
    return None


def rows_limit_rule(accounted: AccountedPlan) -> list[str]:
    """Rule: no result longer than the smallest ``max_rows_released`` of its sources."""
    return [_text("rows_limit", accounted)] if _rows_limit(accounted) is not None else []


def check_rows_limit(accounted: AccountedPlan, table: pl.DataFrame) -> Finding | None:
    """Step 8: a result longer than the owner's row limit."""
    limit = _rows_limit(accounted)
    if limit is not None and table.height > limit:
        return Finding("rows_limit", f"the result has {table.height} rows, more than the {limit} the owner "
                                     "releases per request")
    return None


def _rows_limit(accounted: AccountedPlan) -> int | None:
    limits = [s.policy.max_rows_released for s in _fed(accounted) if s.policy.max_rows_released is not None]
    return min(limits) if limits else None


def action_of(accounted: AccountedPlan) -> str:
    """Step 10: what happens to a result that fails: the strictest unsafe handling of its sources.

    ``aggregates_only`` turns any failure into ``reject``.
    """
    fed = _fed(accounted)
    if any(s.policy.aggregates_only for s in fed):
        return "reject"
    return strictest_unsafe([s.policy.unsafe for s in fed])


def suppression_applies(accounted: AccountedPlan) -> bool:
    """Step 5's precondition: an aggregate whose every source asks for small-cell suppression."""
    fed = _fed(accounted)
    return (bool(fed) and all(s.policy.suppress_small_groups for s in fed) and accounted.aggregated
            and not any(rep.individual for rep in accounted.reps.values()))


# The public sentences of the rules a plan can fail, in the decision order.
RULES = (group_size_rule, contributions_rule, empty_rule, aggregates_only_rule, rows_limit_rule)


def public_reason(accounted: AccountedPlan, action: str) -> str:
    """What the scientist is told about a decision: a function of the plan and the policy only.

    A refusal, a hold and a logged release of a plan say every rule the plan
    could fail and the action, whichever rule failed and whatever the rows:
    twin queries that differ by one person read the same.
    """
    if action == "allow":
        return _text("allow", accounted) if _protected(accounted) else PUBLIC_TEXTS["no_rule"]
    sentences = [sentence for rule in RULES for sentence in rule(accounted)]
    protected = [s for s, _ in _protected(accounted)]
    if protected:
        sentences.append(_text("allowed", accounted, protected))
    return "; ".join(dict.fromkeys(sentences + [PUBLIC_TEXTS[action]]))


def public_notes(accounted: AccountedPlan) -> list[str]:
    """Notes for the scientist: hidden columns and suppression, from the plan and the policy only."""
    notes = _hidden_notes(accounted.hidden)
    if suppression_applies(accounted):
        notes.append(PUBLIC_TEXTS["suppressed"])
    return notes


def decide(accounted: AccountedPlan, table: pl.DataFrame, scientist: str | None = None) -> Released | Held:
    """Apply the release rule to an engine result, in the decision order of ``docs/policy.md``.

    Per row, every protected source must have fed it with at least its K
    rows (people), and every aggregate in it must have at least K real
    contributors per source, no dominant contribution and, for an order
    statistic, K contributors holding the released value; small groups are
    then dropped if every source asks for suppression; the result must not be
    empty, must be an aggregate for a scientist limited to aggregates, and
    must not exceed the rows limit.  Anything that fails goes to the
    strictest unsafe handling among the sources.

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
        With the accounting columns removed and hidden values replaced by
        ``*``.  ``Decision.reason`` is :func:`public_reason`; what failed and
        the counts are in ``Decision.detail`` and ``Decision.details``, for
        the owner.

    Raises
    ------
    BastionError
        ``PolicyViolation`` when the result fails the rule and a source's
        policy says ``reject`` (or ``aggregates_only`` applies); its public
        text and fields are those of :func:`public_reason`.

    Examples
    --------
    >>> outcome = decide(accounted, table, "alice")          # doctest: +SKIP
    >>> outcome.decision.reason                              # doctest: +SKIP
    "the result meets the owner's release rule for 'patients'"
    """
    datasets = tuple(dict.fromkeys(s.dataset for s in _fed(accounted)))
    details: dict[str, Any] = {"rows": table.height, "sources": list(datasets),
                               "min_group_size": {s.dataset: s.policy.min_group_size for s in _fed(accounted)},
                               "aggregated": accounted.aggregated}
    if scientist is not None:
        details["scientist"] = scientist
    checks = source_checks(accounted, table)
    counted = [c.smallest for c in checks if c.smallest is not None]
    if counted:
        details["smallest_count"] = min(counted)
    contributions = _check_contributions(accounted, table)
    findings = [f for f in (check_group_size(accounted, table, checks),
                            check_contributions(accounted, table, contributions)) if f is not None]
    mask = pl.Series("failing", [False] * table.height, dtype=pl.Boolean)
    for finding in findings:
        mask = mask | finding.failing
    details["failing_rows"] = int(mask.sum()) if findings else 0
    if findings and suppression_applies(accounted):
        table = table.filter(~mask)
        details["suppressed_groups"] = int(mask.sum())
        details["suppressed"] = "; ".join(f.detail for f in findings)
        findings = []
    findings += [f for f in (check_empty(accounted, table), check_aggregates_only(accounted, table),
                             check_rows_limit(accounted, table)) if f is not None]
    # Indexing by names is native; DataFrame.select runs a lazy query (about 0.08 ms on every fetch).
    released = _wipe(table[list(accounted.columns)], accounted.hidden)
    notes = public_notes(accounted)
    if not findings:
        detail = "; ".join(dict.fromkeys(_pass_message(c, accounted.aggregated) for c in checks))
        for dataset, smallest in contributions.smallest.items():
            detail += (f"; every aggregate had at least {details['min_group_size'][dataset]} contributing rows "
                       f"of {dataset!r} (smallest: {smallest})")
        if "suppressed_groups" in details:
            detail += f"; {details['suppressed_groups']} group(s) suppressed ({details['suppressed']})"
        return Released(released, Decision("allow", public_reason(accounted, "allow"), datasets, details,
                                           detail or "no protected source fed this result"), notes)
    action = action_of(accounted)
    decision = Decision(action, public_reason(accounted, action), datasets, details,
                        "; ".join(dict.fromkeys(f.detail for f in findings)))
    if action == "reject":
        raise _refusal(decision)
    if action == "review":
        return Held(released, decision, notes)
    return Released(released, decision, notes)


def _refusal(decision: Decision) -> BastionError:
    """The ``PolicyViolation`` of a rejected decision: public fields from the plan and policy, the rest the owner's."""
    return BastionError("PolicyViolation", decision.reason, action="reject", detail=decision.detail,
                        **decision.details)


def decide_failed(accounted: AccountedPlan, error: BastionError, scientist: str | None = None) -> Held:
    """The decision for a query that failed while running (a runtime error is an oracle).

    Whether a query fails can depend on rows that would never be released
    (a value that does not convert, an operation on an empty selection), so
    a failure is answered exactly as a result of this plan that fails the
    rule: the same :func:`public_reason`, the same action.  Only when nothing
    would be withheld (no source sets K > 1 nor limits the scientist to
    aggregates) or the action is ``log`` is the value-free error raised again.

    Returns
    -------
    Held
        Under ``review``: an empty table of the result's columns, for the owner.

    Raises
    ------
    BastionError
        ``PolicyViolation`` under ``reject``, the original error under ``log``.
    """
    fed = _fed(accounted)
    action = action_of(accounted)
    if action == "log" or (not _protected(accounted) and not any(s.policy.aggregates_only for s in fed)):
        raise error  # nothing is withheld from this scientist: the error tells nothing new
    datasets = tuple(dict.fromkeys(s.dataset for s in fed))
    details: dict[str, Any] = {"rows": 0, "sources": list(datasets),
                               "min_group_size": {s.dataset: s.policy.min_group_size for s in fed},
                               "aggregated": accounted.aggregated, "failed": True,
                               "error": error.evalue, **error.owner_details()}
    if scientist is not None:
        details["scientist"] = scientist
    decision = Decision(action, public_reason(accounted, action), datasets, details,
                        f"the query failed while running: {error.evalue}")
    if action == "reject":
        raise _refusal(decision)
    empty = pl.DataFrame({c: [] for c in accounted.columns}, schema={c: pl.String for c in accounted.columns})
    return Held(empty, decision, ["the query failed while running; approving it releases an empty table"])


def needs_exact_dominance(accounted: AccountedPlan, table: pl.DataFrame) -> bool:
    """True when the cheap dominance bound could not clear some row: the plan must be measured exactly.

    See :func:`owner_console.policy.account` (``exact_dominance``).
    """
    return any(column in table.columns and bool((table.get_column(column) == DOMINANCE_UNSURE).any())
               for column, (kind, _) in accounted.contribs.items() if kind == "dominated")


@dataclass
class _ContributionCheck:
    """The per-aggregate rules' outcome; ``messages`` and ``smallest`` are for the owner (they hold counts)."""

    checked: bool = False
    smallest: dict[str, int] = field(default_factory=dict)  # dataset -> fewest contributors to an aggregate
    failing: dict[str, pl.Series] = field(default_factory=dict)  # accounting column -> its failing rows
    messages: list[str] = field(default_factory=list)


# How each kind of accounting column (policy.AccountedPlan.contribs) fails, given
# the column's values and the kind's bound: fewer than K contributors
# ("contrib") or holders of the released value ("held"), a dominated aggregate
# ("dominated" is 1), or a non-finite aggregate ("finite" is 0).
_FAILS: Mapping[str, Any] = {
    "contrib": lambda values, k: values < k,
    "held": lambda values, k: values < k,
    "dominated": lambda values, allowed: values > allowed,
    "finite": lambda values, smallest: values < smallest,
}


def _check_contributions(accounted: AccountedPlan, table: pl.DataFrame) -> _ContributionCheck:
    """The per-aggregate rules: contributors, holders of an order statistic, dominance and finiteness.

    Each accounting column of ``accounted.contribs`` marks the result rows
    whose aggregates fail its rule; a null (an aggregate a row does not
    carry, or a source that did not feed it) never fails.
    """
    result = _ContributionCheck()
    rows = table.height
    fewest: dict[tuple[str, str], int] = {}  # (kind, dataset) -> fewest contributors or holders in a failing row
    failing_rows: dict[tuple[str, int], int] = {}  # (kind, bound) -> most rows one column fails
    for column, (kind, bound) in accounted.contribs.items():
        if column not in table.columns:
            continue
        values = table.get_column(column)
        present = _present(values)
        if kind in ("contrib", "held"):
            source = accounted.sources[bound]
            bound = source.policy.min_group_size
            result.checked = True
            if bound <= 1 or present.len() == 0:
                continue
            smallest = int(present.min())
            if kind == "contrib":
                result.smallest[source.dataset] = min(result.smallest.get(source.dataset, smallest), smallest)
        if _none_fail(kind, present, bound):
            continue
        bad = _where_present(values, _FAILS[kind](values, bound))
        if not bad.any():
            continue
        result.failing[column] = bad
        if kind in ("contrib", "held"):
            fewest[(kind, source.dataset)] = min(fewest.get((kind, source.dataset), smallest), smallest)
        else:
            failing_rows[(kind, bound)] = max(failing_rows.get((kind, bound), 0), int(bad.sum()))
    for (kind, dataset), smallest in fewest.items():
        k = next(s.policy.min_group_size for s in accounted.sources if s.dataset == dataset)
        if kind == "contrib":
            result.messages.append(
                f"an aggregate had fewer than {k} rows of {dataset!r} (smallest: {smallest}) contributing a value "
                f"other than null or zero (or, for a conditional expression, other than the value most rows "
                f"share); one person's value could ride out inside it (for example through an indicator such as "
                f"when(...).then(x).otherwise(0))")
        else:
            result.messages.append(
                f"an order statistic (min, max, median, quantile) released a value, or n_unique counted a value, "
                f"held by fewer than {k} rows of {dataset!r} (smallest: {smallest}): it would be one person's value")
    for (kind, _), count in failing_rows.items():
        result.messages.append({
            "dominated": f"in {count} of {rows} rows a sum, mean, std or var is dominated by one or two "
                         f"contributions: measured by their distance from the group's median, the two largest make "
                         f"up more than 90% of the total, the rest less than 10% of the largest (ACRO's N-K and "
                         f"p-ratio rules), or the largest more than the owner's max_share (dominance)",
            "finite": f"in {count} of {rows} rows an aggregate is not a finite number (inf, -inf or NaN) or its "
                      f"integer sum overflowed",
        }[kind])
    return result


def _failing_rows(accounted: AccountedPlan, table: pl.DataFrame, checks: list["_SourceCheck"]) -> pl.Series:
    """Which rows of the result fail the group size rule."""
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
    return failing


@dataclass
class _SourceCheck:
    source: Source
    rep: Counting
    fed_rows: int = 0
    failing: int = 0
    unmatched: int = 0
    smallest: int | None = None
    messages: list[str] = field(default_factory=list)


def _check_source(source: Source, rep: Counting, table: pl.DataFrame, aggregated: bool) -> _SourceCheck:
    """The group size rule for one source; ``messages`` are for the owner (they hold counts)."""
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
        check.failing = int((fed < k).sum()) if k > 1 and not _none_fail("contrib", fed, k) else 0
    if check.failing == 0:
        return check
    if check.unmatched:
        check.messages.append(
            f"{check.unmatched} of {rows} rows depend on rows of {name!r} that had no match in a join "
            f"(what is missing from {name!r} is information too)")
    if rep.kind in ("implicit", "rid"):
        check.messages.append(f"the result is row-level ({rows} rows, each from one row of {name!r})")
    elif rep.individual:
        check.messages.append(f"the result holds individual values of {name!r} ({rows} rows)")
    else:
        below = check.failing - check.unmatched
        if below:
            unit = "groups" if aggregated else "rows"
            check.messages.append(f"{below} of {rows} {unit} were computed from fewer than {k} rows of {name!r} "
                                  f"(smallest: {check.smallest})")
    return check


def _pass_message(check: _SourceCheck, aggregated: bool) -> str:
    """The owner's account of a source that passed the group size rule (with its smallest count)."""
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


def _none_fail(kind: str, present: pl.Series, bound: int) -> bool:
    """True when no value of ``present`` (no nulls) can fail ``_FAILS[kind]``: read off its extreme alone.

    Only for integer columns (every accounting column is Int64), whose
    order has no NaN; otherwise False, and the caller compares every value.
    """
    if present.len() == 0:
        return True
    if not present.dtype.is_integer():
        return False
    if kind == "dominated":
        return present.max() <= bound
    return present.min() >= bound  # contrib, held and finite fail below their bound


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
