"""The entry points of the DP path: release a query, preview its cost and accuracy, report the budgets.

Every plan that reads a dataset with a ``[dp]`` policy comes here instead of
the K-anonymity path (``executor.evaluate`` routes it)::

    query     = translate(plan, catalog)             # the DP subset, or a typed refusal
    mechanism = mechanism.build(query)               # calibrated to the policy's loss per query
    ledger.charge(scientist, data, policy)           # refused *before* anything runs
    table     = mechanism.release()                  # OpenDP's lazyframe, end to end (the polars engine)
    table     = mechanism.release_exact(engine.dp_exact(query, ...))   # or the engine's exact values + OpenDP's noise

The route is the engine's capability (``Engine.opendp_lazyframe``), never its
name; the policy, the calibration, the ledger and the replies are the same on
both.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

from bastion_kernel.contract import plan as P

from ..model import Dataset, Decision, Released
from . import mechanism
from .ledger import TOLERANCE, Spent, account_of, adopt_legacy_spends, data_version, ledger_of
from .policy import DPPolicy
from .translate import DPQuery, translate

ALPHA = 0.05                      # accuracy is reported at 95% confidence


def preview(plan: Any, catalog: Mapping[str, Dataset], scientist: str, cache: Any = None) -> dict:
    """What a DP query would cost and how accurate it would be, without spending anything.

    Returns
    -------
    dict
        ``{"dataset", "epsilon", "delta", "alpha", "columns": [{"name", "aggregate",
        "distribution", "scale", "accuracy"}], "budget": {...}}``; ``accuracy``
        is the half-width of the (1 - alpha) interval (null for quantiles).
    """
    query = translate(plan, catalog, cache)
    columns = _accuracy_per_column(mechanism.build(query, cache).summary(ALPHA), query)
    policy = query.dataset.dp
    ledger, version = account_of(query.dataset, catalog)
    left = _budget_row(query.dataset.name, policy, ledger.spent(scientist, version))
    return {"dataset": query.dataset.name, "epsilon": policy.epsilon_per_query, "delta": policy.delta_per_query,
            "alpha": ALPHA, "columns": columns, "budget": left}


def _accuracy_per_column(rows: list[dict], query: DPQuery) -> list[dict]:
    """One entry per released column: OpenDP's rows, a mean's two noisy parts made one.

    OpenDP releases a mean as a noisy sum over a noisy count and summarizes
    the two apart; what the scientist asked for is the mean.  Its error
    depends on the group's size n, which the preview does not reveal: with
    |mean| <= B (the larger bound in absolute value), the error is at most
    (a_sum + B * a_count) / n when each part is within its own accuracy
    a_sum, a_count (both at once hold with at least 1 - 2 * alpha), given as
    ``accuracy_for_rows`` for n of 100, 1,000 and 10,000.
    """
    means = {a.name: a for a in query.aggregates if a.function == "dp.mean"}
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(row["column"], []).append(row)
    columns = []
    for name, parts in found.items():
        by_kind = {str(part["aggregate"]).lower(): part for part in parts}
        mean = means.get(name)
        if mean is None or "sum" not in by_kind or "length" not in by_kind:
            columns += [{"name": name, "aggregate": part["aggregate"], "distribution": part["distribution"],
                         "scale": part["scale"], "accuracy": part.get("accuracy")} for part in parts]
            continue
        total, count = by_kind["sum"], by_kind["length"]
        bound = max(abs(float(mean.args["lower"])), abs(float(mean.args["upper"])))
        if total.get("accuracy") is None or count.get("accuracy") is None:
            per_rows = None
        else:
            spread = float(total["accuracy"]) + bound * float(count["accuracy"])
            per_rows = {str(n): spread / n for n in (100, 1_000, 10_000)}
        columns.append({"name": name, "aggregate": "Mean", "distribution": total["distribution"],
                        "scale": None, "accuracy": None, "accuracy_for_rows": per_rows})
    return columns


def evaluate(plan: Any, catalog: Mapping[str, Dataset], scientist: str, cache: Any = None, *,
             cancel: threading.Event | None = None, timeout: float | None = None) -> Released:
    """Release a DP query: translate, charge the odometer, run OpenDP.

    On the polars engine OpenDP runs the calibrated measurement over the
    dataset's LazyFrame; on an engine without that capability (Spark) the
    engine computes the exact values per public key
    (:meth:`~owner_console.engine.interface.Engine.dp_exact`, stopped by
    ``cancel`` or after ``timeout`` seconds) and OpenDP's public noise
    measurements add the noise at the same scales.

    The budget is charged before the query runs (a refused charge runs
    nothing); a query that fails after the charge keeps it spent, as DP
    accounting requires.  In the executor a DP query runs in a worker process
    (:mod:`owner_console.workers`) like any other: a cancel or the time limit
    kills it, and a charge already made stays spent.  A Spark dataset's query
    runs in the executor's process, as every Spark plan does; a cancel or the
    time limit stops its Spark job, and the charge stays spent likewise.

    Raises
    ------
    BastionError
        As :func:`translate`; ``PolicyViolation`` when the budget is exhausted;
        ``UnsupportedOperation`` when OpenDP cannot analyse the query.
    """
    query = translate(plan, catalog, cache)
    calibrated = mechanism.build(query, cache)  # refused here costs nothing
    policy: DPPolicy = query.dataset.dp
    name = query.dataset.name
    ledger, version = account_of(query.dataset, catalog)
    spent = ledger.charge(scientist, version, name, policy, P.plan_hash(plan))
    if query.engine is None or query.engine.opendp_lazyframe:
        table = calibrated.release()
    else:
        exact = query.engine.dp_exact(query, catalog, cancel=cancel, timeout=timeout)
        table = calibrated.release_exact(exact, query)
    table = table.select(query.keys + [a.name for a in query.aggregates])
    if query.keys:
        table = table.sort(query.keys)  # post-processing: a stable order for the public keys
    left = _budget_row(name, policy, spent)
    remaining, shared = left["epsilon_remaining"], left["shared_epsilon_remaining"]
    shared_text = "" if shared is None else \
        f"; {shared:g} of the total {policy.epsilon_total:g} of all scientists left"
    reason = (f"differentially private release of {name!r}: epsilon {policy.epsilon_per_query:g} spent "
              f"({spent.epsilon:g} of {policy.epsilon:g} used, {remaining:g} left{shared_text})")
    # Owner-only: which data account was charged, and what all scientists together spent on it.
    decision = Decision("allow", reason, (name,), {"dp": {"dataset": name, "epsilon": policy.epsilon_per_query,
                                                         "delta": policy.delta_per_query,
                                                         "epsilon_spent": spent.epsilon,
                                                         "delta_spent": spent.delta,
                                                         "epsilon_remaining": remaining,
                                                         "data": version.account,
                                                         "epsilon_spent_all": spent.epsilon_all}})
    notes = [f"differentially private: epsilon {policy.epsilon_per_query:g} spent on {name!r}, "
             f"{remaining:g} of {policy.epsilon:g} left{shared_text}"]
    return Released(table, decision, notes)


def schema_of(plan: Any, catalog: Mapping[str, Dataset], cache: Any = None) -> list[tuple[str, str]]:
    """The schema a DP aggregation would release (computed without running it)."""
    query = translate(plan, catalog, cache)
    out = [(k, query.key_dtypes[k]) for k in query.keys]
    for a in query.aggregates:
        if a.function == "len":
            dtype = "UInt32"
        elif a.function == "dp.mean":
            dtype = "Float64"
        elif a.function == "dp.quantile":
            dtype = query.column_dtypes[a.column] if all(isinstance(c, int) for c in a.args["candidates"]) \
                else "Float64"
        else:
            dtype = query.column_dtypes[a.column]
        out.append((a.name, dtype))
    return out


def _budget_row(name: str, policy: DPPolicy, spent: Spent) -> dict:
    """One dataset's line of :func:`budget`, from what was spent on its data."""
    remaining = max(policy.epsilon - spent.epsilon, 0.0)
    shared = None if policy.epsilon_total is None else max(policy.epsilon_total - spent.epsilon_all, 0.0)
    usable = remaining if shared is None else min(remaining, shared)
    return {"name": name, "epsilon_total": policy.epsilon, "epsilon_spent": spent.epsilon,
            "epsilon_remaining": remaining, "epsilon_per_query": policy.epsilon_per_query,
            "delta_total": policy.delta, "delta_spent": spent.delta,
            "shared_epsilon_total": policy.epsilon_total, "shared_epsilon_remaining": shared,
            "queries_left": int((usable + TOLERANCE) // policy.epsilon_per_query)}


def budget(catalog: Mapping[str, Dataset], scientist: str) -> list[dict]:
    """What ``scientist`` has spent and has left on every DP dataset of ``catalog``.

    Spending is counted on the dataset's data, under every name it has.
    ``epsilon_total`` is the per-scientist bound; ``shared_epsilon_total``
    the owner's bound on all scientists together (null when none is set), and
    ``shared_epsilon_remaining`` what all scientists together have left of it.

    Returns
    -------
    list of dict
        ``{"name", "epsilon_total", "epsilon_spent", "epsilon_remaining",
        "epsilon_per_query", "delta_total", "delta_spent",
        "shared_epsilon_total", "shared_epsilon_remaining", "queries_left"}``.
    """
    rows = []
    adopted: set[Path] = set()
    for name in sorted(catalog):
        dataset = catalog[name]
        policy = getattr(dataset, "dp", None)
        if policy is None:
            continue
        ledger = ledger_of(dataset)
        if ledger.path not in adopted:
            adopt_legacy_spends(ledger, catalog)
            adopted.add(ledger.path)
        rows.append(_budget_row(name, policy, ledger.spent(scientist, data_version(ledger, dataset))))
    return rows
