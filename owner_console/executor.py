"""The executor's one-way path: validate -> account -> run -> decide.

Each arrow is one function call, so a reader can follow a plan from the wire
to the table that leaves the owner's side::

    checked   = validate.validate(plan, catalog)      # whitelist, schema
    accounted = policy.account(checked)               # per-source counts, lineage
    table     = runner.run(accounted.plan, catalog)   # the datasets' engine (engine.engine_for)
    outcome   = decide.decide(accounted, table)       # Released | Held | PolicyViolation

Only the third step depends on the engine, and only through
:class:`owner_console.engine.Engine`'s methods: validation reads a dataset's
columns, accounting its keys' uniqueness, from the same engine.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import polars as pl

from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from . import decide, dp, engine, policy, validate
from .model import Dataset, Held, Policy, Released
from .validate import RESERVED_PREFIX

log = logging.getLogger("bastion.executor")


def evaluate(plan: Any, catalog: Mapping[str, Dataset], scientist: str,
             cache: engine.DatasetCache | None = None, *, cancel: threading.Event | None = None,
             timeout: float | None = None) -> Released | Held:
    """Run an untrusted plan through the owner's policy.

    Parameters
    ----------
    plan : Any
        The decoded JSON plan from the wire.
    catalog : Mapping[str, Dataset]
        The datasets (and saved results) this scientist may read.
    scientist : str
        The authenticated identity, recorded in the decision's details.
    cache : DatasetCache, optional
        Where the polars engine reads datasets from; the shared default cache when omitted.
    cancel : threading.Event, optional
        Set by another thread to cancel the running query.
    timeout : float, optional
        The workspace's query time limit in seconds; a dataset's own
        ``query_timeout_seconds`` policy value, when smaller, wins.

    Returns
    -------
    Released or Held
        ``Released`` for ``allow`` and ``log`` decisions, ``Held`` for ``review``.
        The table holds only the scientist's columns, hidden values as ``*``.

    Raises
    ------
    BastionError
        ``UnsupportedOperation``, ``SchemaError``, ``LimitExceeded``,
        ``ExecutionError`` or ``PolicyViolation``.
    """
    catalog = for_scientist(read_by(plan, catalog), scientist)
    if dp.touches_dp(plan, catalog):
        # A plan that reads a differentially private dataset releases DP aggregates or nothing.
        return dp.evaluate(plan, catalog, scientist, cache, cancel=cancel,
                           timeout=query_timeout([catalog[n] for n in dp.dp_datasets(plan, catalog)], timeout))
    runner = engine_of(plan, catalog, cache)
    checked, accounted = _PREPARED.checked_and_accounted(plan, catalog, runner)

    _check_join_rows(checked, catalog, runner)
    limit = query_timeout(checked.datasets.values(), timeout)
    try:
        table = runner.run(accounted.plan, catalog, cancel=cancel, timeout=limit)
        if decide.needs_exact_dominance(accounted, table):
            # A group the cheap bound could not clear: measure every group's dominance exactly.
            accounted = _account(checked, catalog, runner, exact_dominance=True)
            table = runner.run(accounted.plan, catalog, cancel=cancel, timeout=limit)
    except BastionError as error:
        if error.ename != "ExecutionError" or error.details.get("cancelled"):
            raise
        # A data-dependent failure must look like the refusal it would have been.
        return decide.decide_failed(accounted, error, scientist)
    _check_columns(table.columns, accounted.columns)
    return decide.decide(accounted, table, scientist)


# Plans kept by _PreparedPlans, and the largest kept (its JSON): a cell's plan is a few kilobytes, and a
# scientist sending many large plans must not fill the executor's memory with their checks.
PREPARED_KEPT = 64
PREPARED_MAX_PLAN_BYTES = 16 * 1024


class _PreparedPlans:
    """Checked and accounted plans, kept per plan, the datasets it reads and their data versions.

    Validation and accounting are functions of the plan, of the datasets it
    reads as they apply to the scientist (policy included) and of their data
    (columns, key uniqueness): the same plan over the same datasets and
    versions is checked and accounted once.  They cost a sixth of a small
    query's time on the executor.  A plan that fails either is never kept.
    """

    def __init__(self, kept: int = PREPARED_KEPT) -> None:
        self._kept = kept
        self._plans: OrderedDict[str, tuple[tuple, tuple, validate.CheckedPlan, policy.AccountedPlan]] = OrderedDict()
        self._lock = threading.Lock()

    def checked_and_accounted(self, plan: Any, catalog: Mapping[str, Dataset],
                              runner: engine.Engine) -> tuple[validate.CheckedPlan, policy.AccountedPlan]:
        """``validate`` then ``account`` (without exact dominance) of ``plan``, or what they gave before."""
        def compute() -> tuple[validate.CheckedPlan, policy.AccountedPlan]:
            checked = validate.validate(plan, catalog, dataset_columns=runner.columns)
            return checked, _account(checked, catalog, runner, exact_dominance=False)

        try:
            # Not the canonical form: two plans kept apart by key order only are checked each on their own.
            key = json.dumps(plan, separators=(",", ":"))
            names = sorted(walk.source_names(plan))
        except (TypeError, ValueError, RecursionError):
            return compute()  # not JSON (an in-process caller): the validator says what is wrong
        if len(key) > PREPARED_MAX_PLAN_BYTES or not names or any(name not in catalog for name in names):
            return compute()
        datasets = tuple(catalog[name] for name in names)
        versions = tuple(runner.data_version(dataset) for dataset in datasets)
        with self._lock:
            kept = self._plans.get(key)
            if kept is not None and kept[0] == datasets and kept[1] == versions and "" not in versions:
                self._plans.move_to_end(key)
                return kept[2], kept[3]
        checked, accounted = compute()
        # Versions read before: a file replaced meanwhile is kept under its old version, and never matched again.
        with self._lock:
            self._plans[key] = (datasets, versions, checked, accounted)
            self._plans.move_to_end(key)
            while len(self._plans) > self._kept:
                self._plans.popitem(last=False)
        return checked, accounted


_PREPARED = _PreparedPlans()


def _account(checked: validate.CheckedPlan, catalog: Mapping[str, Dataset], runner: engine.Engine, *,
             exact_dominance: bool) -> policy.AccountedPlan:
    """:func:`policy.account` with the key uniqueness ``runner`` measures."""
    return policy.account(checked, unique_keys=lambda name, keys: runner.unique_keys(catalog[name], keys),
                          exact_dominance=exact_dominance)


def engine_of(plan: Any, catalog: Mapping[str, Dataset], cache: engine.DatasetCache | None) -> engine.Engine:
    """The engine of the datasets a plan's ``scan`` nodes name (:func:`owner_console.engine.engine_for`).

    Read from the unvalidated plan, before the validator, which needs the
    engine for the datasets' columns; a name outside ``catalog`` is left to
    the validator to refuse.  Saved results are read by whichever engine
    runs the plan and do not choose it.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` when the datasets are on different engines.
    """
    names = {walk.source_name(node) for node in walk.json_objects(plan) if node.get("op") == "scan"}
    return engine.engine_for([catalog[name] for name in sorted(names - {None}) if name in catalog], cache)


def _check_join_rows(checked: validate.CheckedPlan, catalog: Mapping[str, Dataset], runner: engine.Engine) -> None:
    """Refuse a plan whose joins would produce more rows than a source's ``max_join_rows``."""
    limits = [d.policy.max_join_rows for d in checked.datasets.values() if d.policy.max_join_rows is not None]
    if not limits:
        return
    limit = min(limits)
    if any(size > limit for size in runner.join_sizes(checked.root, catalog)):
        # The size itself is not told: it is a count over rows that are not released.
        raise BastionError("LimitExceeded", f"a join in this query would produce more than {limit} rows, the "
                                            "most the owner allows; filter or aggregate the sides before joining",
                           limit="max_join_rows", max_rows=limit)


def read_by(plan: Any, catalog: Mapping[str, Dataset], names: set[str] | None = None) -> Mapping[str, Dataset]:
    """The part of ``catalog`` a plan (unchecked JSON) reads: the names of its ``scan`` and ``saved`` nodes.

    A query's cost must not grow with the number of datasets in the
    workspace: the catalog is copied per scientist for each query, and sent
    to a query worker.  A plan that names no source, or one the catalog
    lacks, gets the whole catalog: the validator's refusal lists the names
    there are.  ``names``: the plan's source names, when the caller has them.
    The catalog's order is kept (a set's order changes from process to process).
    """
    names = walk.source_names(plan) if names is None else names
    if not names or not names <= catalog.keys():
        return catalog
    return {name: dataset for name, dataset in catalog.items() if name in names}


def for_scientist(catalog: Mapping[str, Dataset], scientist: str | None) -> dict[str, Dataset]:
    """The catalog with each dataset's policy as it applies to ``scientist`` (their overrides applied)."""
    return {name: dataclasses.replace(d, policy=d.policy.for_scientist(scientist)) for name, d in catalog.items()}


def schema_of(plan: Any, catalog: Mapping[str, Dataset],
              cache: engine.DatasetCache | None = None, *, scientist: str | None = None) -> list[tuple[str, str]]:
    """The ``[(column, dtype), ...]`` a plan's released table would have, without running it.

    Columns that carry hidden columns are reported as ``String``: they are
    released as ``*``.  ``scientist``, when given, applies that scientist's
    policy overrides first (their own hidden columns), as :func:`evaluate` does.

    Raises
    ------
    BastionError
        ``UnsupportedOperation``, ``SchemaError``, ``LimitExceeded`` or
        ``PolicyViolation`` (a hidden column used other than as a join key).
    """
    catalog = for_scientist(read_by(plan, catalog), scientist)
    if dp.touches_dp(plan, catalog) and dp.is_dp_aggregation(plan):
        return dp.schema_of(plan, catalog, cache)
    runner = engine_of(plan, catalog, cache)
    checked = validate.validate(plan, catalog, dataset_columns=runner.columns)
    accounted = policy.account(checked)
    schema = runner.output_schema(checked.root, catalog)
    _check_columns([name for name, _ in schema], accounted.columns)
    return [(name, "String" if name in accounted.hidden else dtype) for name, dtype in schema]


def prepare_save(plan: Any, catalog: Mapping[str, Dataset],
                 cache: engine.DatasetCache | None = None, *, cancel: threading.Event | None = None,
                 timeout: float | None = None, scientist: str | None = None) -> tuple[pl.DataFrame, Policy]:
    """Run a plan for ``save``: the table stays on the owner's side, under the policy it inherits.

    The table holds the real values (hidden-derived columns are hidden again by
    the inherited policy, by name); register it as a dataset (for example as
    Parquet) so that later ``{"op": "saved", "name": ...}`` nodes find it in
    the catalog.

    Returns
    -------
    (polars.DataFrame, Policy)
        The scientist's columns only, and the inherited policy.

    Raises
    ------
    BastionError
        As :func:`evaluate`; ``PolicyViolation`` when saving is not allowed
        (see :func:`owner_console.policy.inherited_policy`).

    ``scientist``, when given, applies that scientist's policy overrides
    before the policy is inherited.
    """
    catalog = for_scientist(read_by(plan, catalog), scientist)
    if dp.touches_dp(plan, catalog):
        raise BastionError("PolicyViolation", "a result computed from a differentially private dataset cannot "
                                              "be saved: such a dataset only releases DP aggregates with .fetch()")
    runner = engine_of(plan, catalog, cache)
    checked = validate.validate(plan, catalog, dataset_columns=runner.columns)
    accounted = policy.account(checked)
    inherited = policy.inherited_policy(accounted)  # refuse before running anything
    try:
        table = runner.run(accounted.plan, catalog, cancel=cancel,
                           timeout=query_timeout(checked.datasets.values(), timeout))
    except BastionError as error:
        if error.ename != "ExecutionError" or error.details.get("cancelled") or inherited.min_group_size <= 1:
            raise
        # Whether a query fails can depend on rows that are never released: a
        # save answers the same either way.  What is kept is an empty table
        # of the plan's columns (any later query of it is refused as empty);
        # the failure is the owner's to read, in the save's audit entry.
        log.warning("a save failed while running and keeps an empty table: %s %s", error.evalue,
                    error.owner_details())
        return runner.empty_result(checked.root, catalog).select(accounted.columns), inherited
    _check_columns(table.columns, accounted.columns)
    return table.select(accounted.columns), inherited


def query_timeout(datasets: Iterable[Dataset], workspace_limit: float | None) -> float | None:
    """The time limit of a query: the smallest of the workspace's and the datasets' own.

    A dataset policy may carry ``query_timeout_seconds`` (read when the
    policy type has it); ``None`` everywhere means no limit.
    """
    limits = [workspace_limit] + [getattr(d.policy, "query_timeout_seconds", None) for d in datasets]
    limits = [float(t) for t in limits if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0]
    return min(limits) if limits else None


def table_to_ipc(table: pl.DataFrame) -> bytes:
    """Arrow IPC (file format) bytes of a released table.

    Sunk on polars' in-memory engine: ``DataFrame.write_ipc`` in polars 1.36
    runs the streaming engine and costs about 0.24 ms even for a two-row table
    (0.02 ms this way), on the path of every ``fetch``.
    """
    buffer = io.BytesIO()
    table.lazy().sink_ipc(buffer, engine="in-memory")
    return buffer.getvalue()


def _check_columns(produced: list[str], expected: tuple[str, ...]) -> None:
    # Lineage (hidden columns) is tracked by name: if polars ever named a
    # column differently from the validator's model, fail closed.
    user = [c for c in produced if not c.startswith(RESERVED_PREFIX)]
    if user != list(expected):
        raise BastionError("ExecutionError", "the executor could not account for this query's output columns; "
                                             "the query was not run through the policy", )
