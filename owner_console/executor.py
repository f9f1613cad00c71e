"""The executor's one-way path: validate -> account -> run -> decide.

Each arrow is one function call, so a reader can follow a plan from the wire
to the table that leaves the owner's side::

    checked   = validate.validate(plan, catalog)      # whitelist, schema
    accounted = policy.account(checked)               # per-source counts, lineage
    table     = engine.run(accounted.plan, catalog)   # polars
    outcome   = policy.decide(accounted, table)       # Released | Held | PolicyViolation
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import polars as pl

from bastion_kernel.protocol import BastionError

from . import engine, policy, validate
from .model import Dataset, Held, Policy, Released
from .validate import RESERVED_PREFIX


def evaluate(plan: Any, catalog: Mapping[str, Dataset], scientist: str,
             cache: engine.DatasetCache | None = None) -> Released | Held:
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
        Where datasets are read from; the shared default cache when omitted.

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
    cache = cache or engine.DEFAULT_CACHE
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    accounted = policy.account(checked)
    table = engine.run(accounted.plan, catalog, cache)
    _check_columns(table.columns, accounted.columns)
    return policy.decide(accounted, table, scientist)


def schema_of(plan: Any, catalog: Mapping[str, Dataset],
              cache: engine.DatasetCache | None = None) -> list[tuple[str, str]]:
    """The ``[(column, dtype), ...]`` a plan's released table would have, without running it.

    Columns derived from hidden columns are reported as ``String``: they are
    released as ``*``.

    Raises
    ------
    BastionError
        ``UnsupportedOperation``, ``SchemaError`` or ``LimitExceeded``.
    """
    cache = cache or engine.DEFAULT_CACHE
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    accounted = policy.account(checked)
    schema = engine.output_schema(checked.root, catalog, cache)
    _check_columns([name for name, _ in schema], accounted.columns)
    return [(name, "String" if name in accounted.hidden else dtype) for name, dtype in schema]


def prepare_save(plan: Any, catalog: Mapping[str, Dataset],
                 cache: engine.DatasetCache | None = None) -> tuple[pl.DataFrame, Policy]:
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
    """
    cache = cache or engine.DEFAULT_CACHE
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    accounted = policy.account(checked)
    inherited = policy.inherited_policy(accounted)  # refuse before running anything
    table = engine.run(accounted.plan, catalog, cache)
    _check_columns(table.columns, accounted.columns)
    return table.select(accounted.columns), inherited


def table_to_ipc(table: pl.DataFrame) -> bytes:
    """Arrow IPC (file format) bytes of a released table."""
    buffer = io.BytesIO()
    table.write_ipc(buffer)
    return buffer.getvalue()


def _check_columns(produced: list[str], expected: tuple[str, ...]) -> None:
    # Lineage (hidden columns) is tracked by name: if polars ever named a
    # column differently from the validator's model, fail closed.
    user = [c for c in produced if not c.startswith(RESERVED_PREFIX)]
    if user != list(expected):
        raise BastionError("ExecutionError", "the executor could not account for this query's output columns; "
                                             "the query was not run through the policy", )
