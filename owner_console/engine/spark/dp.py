"""The exact values of a differentially private query, computed by Spark (``SparkEngine.dp_exact``).

OpenDP's polars measurement cannot run over a Spark DataFrame, so the DP path
(:mod:`owner_console.dp.release`) asks Spark for the exact values the
measurement would add noise to and adds OpenDP's noise itself.  This module
computes them with the DataFrame API (no SQL text), the way OpenDP 0.16's
polars plan computes them before its noise:

1. the dataset's rows; with a privacy unit column, each unit's rows truncated
   to ``max_contributions``.  OpenDP's ``truncate_per_group(k)`` keeps the rows
   whose position in a random shuffle of their unit's rows is below ``k``
   (``int_range(len).shuffle().over(id) < k``): a uniformly random choice of
   ``k`` rows per unit, rows with a null identifier forming one unit.  Here:
   ``row_number()`` over the unit ordered by ``rand()``, kept when ``<= k`` —
   the same distribution of kept rows, drawn afresh at every query;
2. the query's filters, compiled by the Spark engine's compiler (polars'
   semantics), after the truncation as in OpenDP's plan;
3. per combination of the keys' public values: the rows, and each clamped sum
   (:meth:`owner_console.dp.translate.DPQuery.exact_parts`: bounds in the
   column's type, a null or NaN counted as the bounds' midpoint).  Rows whose
   key is null or not public are left out, groups without rows are zeros, as
   OpenDP's ``with_keys`` gives them.

The margin (``max_rows``) is a public bound OpenDP's calibration uses; it does
not change these values.  Only the aggregates per public key come back, as
Arrow.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import polars as pl

from bastion_kernel.contract.protocol import BastionError

from ...model import Dataset

DRAW = "__bastion_dp_draw"
RANK = "__bastion_dp_rank"


def exact_aggregates(engine: Any, query: Any, catalog: Mapping[str, Dataset], *,
                     cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
    """See :meth:`owner_console.engine.interface.Engine.dp_exact`; ``engine`` is the :class:`SparkEngine`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from . import sources
    from .compile import compile_result
    from .engine import (CANCELLED, _collect, _execution_error, _quoted, _schema_error, _spark_failure,
                         _unreadable)

    if cancel is not None and cancel.is_set():
        raise BastionError("ExecutionError", CANCELLED, cancelled=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    dataset = query.dataset
    policy = dataset.dp
    spark = engine.spark()
    version = engine._path_version(dataset)
    unit = policy.privacy_unit_column

    def read(source: Dataset, ordered: bool = True) -> Any:
        try:
            frame = sources.read(spark, source, version, ordered=ordered)
            frame.schema  # noqa: B018 - a Spark Connect frame is analysed only when asked: read fails here
        except Exception as exc:  # noqa: BLE001 - Spark's message can name paths or values: keep the class
            if _spark_failure(exc) is None:
                raise
            raise _unreadable(source, exc) from None
        if unit is None or source.name != dataset.name:
            return frame
        within_unit = Window.partitionBy(F.col(_quoted(unit))).orderBy(F.col(DRAW))
        return frame.withColumn(DRAW, F.rand()).withColumn(RANK, F.row_number().over(within_unit)) \
            .where(F.col(RANK) <= policy.max_contributions).drop(DRAW, RANK)

    rows_plan: dict = {"op": "scan", "dataset": dataset.name}
    for predicate in query.predicates:
        rows_plan = {"op": "filter", "input": rows_plan, "predicate": predicate}
    keys = query.key_frame() if query.keys else None
    parts = query.exact_parts()
    try:
        frame = compile_result(rows_plan, {dataset.name: dataset}, spark, read).frame
        for key in query.keys:
            frame = frame.where(F.col(_quoted(key)).isin(list(policy.public_keys[key])))
        aggregates = [_exact_part(part, F) for part in parts]
        grouped = frame.groupBy(*[F.col(_quoted(k)).alias(k) for k in query.keys]).agg(*aggregates) if query.keys \
            else frame.agg(*aggregates)
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 - classic Spark analyses each call as it is made
        kind = _spark_failure(exc)
        if kind is None:
            raise
        if kind == "analysis":
            raise _schema_error(exc, rows_plan) from None
        raise _execution_error(exc, spark) from None
    table = _collect(spark, grouped, cancel, deadline, timeout)
    try:
        exact = pl.from_arrow(table, rechunk=False)
        if keys is not None:
            exact = keys.join(exact.cast(dict(keys.schema)), on=query.keys, how="left")
    except Exception as exc:  # noqa: BLE001 - whether a value fits its column's type depends on the data
        raise _execution_error(exc) from None
    types = {part.name: pl.Float64 if isinstance(part.fill, float) else pl.Int64 for part in parts}
    return exact.with_columns(pl.col(name).cast(dtype).fill_null(0) for name, dtype in types.items())


def _exact_part(part: Any, F: Any) -> Any:
    """One part's Spark aggregate: the rows, or the sum of the clamped column with nulls (and NaN) at the midpoint."""
    from .engine import _quoted

    if part.kind == "len":
        return F.count(F.lit(1)).alias(part.name)
    value = F.col(_quoted(part.column))
    if isinstance(part.fill, float):
        value = value.cast("double")
        missing = value.isNull() | F.isnan(value)
    else:
        value = value.cast("long")
        missing = value.isNull()
    clamped = F.when(missing, F.lit(part.fill)).otherwise(F.least(F.greatest(value, F.lit(part.lower)),
                                                                  F.lit(part.upper)))
    return F.sum(clamped).alias(part.name)
