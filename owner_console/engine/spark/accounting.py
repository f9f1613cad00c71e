"""The Spark compilers of the accounting nodes (``acct_*``) that :mod:`owner_console.policy` adds to a plan.

Each node computes what the polars engine's
(:mod:`owner_console.engine.accounting`) computes, in the same Spark job as
the answer: rows and people per group, contributions, the holders of an
order statistic's value, dominance and finiteness flags.  The values differ
in one respect only: a row id (``acct_row_id``, ``acct_person_id``) is a
number that stands for one source row (one person), not polars' 1, 2, 3...;
every use of it (distinct counts, ``> 0``, ``== 0``, null) gives the same
counts.

Row ids are made from the source's stable row-order columns (file, split,
row index: :mod:`.sources`): the splits of the source are numbered in a small
aggregation joined back by broadcast, so ids need no global sort of the rows.
People are numbered within hash buckets of the person column (a dense rank
per bucket), exact and spread over the cluster.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import polars as pl
from pyspark.sql import Column, Window
from pyspark.sql import functions as F

from bastion_kernel.contract.protocol import BastionError

from ..accounting import _INTEGER_RANGE, _RANGE_MARGIN, _ROW_KEEPING_OPS, BITSET_MAX_ROWS, _clearing_factor
from . import sources
from .expressions import Scope, _over, column, shape_of

if TYPE_CHECKING:
    from .compile import Frame

# Row ids: a split's number times this, plus the row's place in its split, plus one (0 and null mean
# "no partner" and "not from this source").
_SPLIT_STRIDE = 1 << 33
_WORD_BITS = 63
_PERSON_BUCKETS = 1024
_PERSON_STRIDE = 1 << 40
# The failure a job raises when a join key the policy relied on is repeated (see unique_rows).
CHANGED_MARKER = "BASTION-DATASET-CHANGED:"
_INF = float("inf")


def is_changed_error(exc: BaseException) -> bool:
    """True when a job failed because a join key the policy relied on was repeated (:func:`unique_rows`)."""
    return CHANGED_MARKER in str(exc)


class AccountingOps:
    """The ``acct_*`` frame operations (a mixin of :class:`.compile.SparkCompiler`)."""

    def accounting_ops(self) -> dict[str, Callable[[dict], "Frame"]]:
        return {"acct_row_id": self._acct_row_id, "acct_person_id": self._acct_person_id,
                "acct_columns": self._acct_columns, "acct_unique": self._acct_unique}

    def _acct_columns(self, node: dict) -> "Frame":
        return self._add_columns(self.frame(node["input"]), node["input"], node["exprs"])

    def _acct_row_id(self, node: dict) -> "Frame":
        frame = self.frame(node["input"])
        name = node["name"]
        source = frame.rows
        bound = self._row_bound(node["input"]) if self.row_id_uses.get(name, 0) == 1 else None
        if bound is not None and source is not None:
            rows, index = bound
            # At most BITSET_MAX_ROWS rows: one partition (no shuffle), which the row numbering and the key
            # uniqueness check above (a window by key) then need no exchange for.
            frame.df = frame.df.coalesce(1)
            # One Parquet file: its row index + 1 is an id within 1..rows already, no numbering needed.
            frame.df, frame.words[name] = row_words(self, frame.df, frame.sort_columns(), name, rows,
                                                    column(source.row) + F.lit(1) if index else None)
            frame.columns = [*frame.columns, name]
            return frame
        if source is None:
            # Not a subset of one scan's rows (cannot happen in a plan the policy built): number the rows in
            # their order, exact, on one partition.
            ids = F.row_number().over(Window.orderBy(*(frame.sort_columns() or [F.lit(0)]))).cast("long")
            frame.df = frame.df.withColumn(name, ids)
        else:
            frame.df = row_ids(self, frame.df, source, name)
        frame.columns = [*frame.columns, name]
        return frame

    def _row_bound(self, node: dict) -> tuple[int, bool] | None:
        """At most how many rows a frame holds, when it is a small source's rows (at most
        :data:`BITSET_MAX_ROWS`, known without a job: ``row_count``), else None (as the polars engine's); and
        whether the source is one Parquet file whose every row index is below that bound."""
        limit = None
        while node["op"] in _ROW_KEEPING_OPS:
            step = node["n"] if node["op"] == "head" else node["length"] if node["op"] == "slice" else None
            if step is not None:
                limit = max(step, 0) if limit is None else min(limit, max(step, 0))
            node = node["input"]
        if node["op"] != "scan" or self.row_count is None:
            return None
        dataset = self.catalog.get(node["dataset"])
        rows = None if dataset is None else self.row_count(dataset)
        if rows is None:
            return None
        if rows <= BITSET_MAX_ROWS and sources.source_kind(dataset) == "file" and dataset.format == "parquet" \
                and getattr(dataset, "engine", "spark") == "spark":
            return rows, True
        bound = rows if limit is None else min(rows, limit)
        return (bound, False) if bound <= BITSET_MAX_ROWS else None

    def _acct_person_id(self, node: dict) -> "Frame":
        frame = self.frame(node["input"])
        person = column(node["column"])
        # One id per distinct person value (null is one person too), dense within its hash bucket: exact,
        # and a window partitioned by bucket, not one sort of every row.
        bucket = F.pmod(F.xxhash64(person), F.lit(_PERSON_BUCKETS))
        rank = F.dense_rank().over(Window.partitionBy(bucket).orderBy(person.asc_nulls_first()))
        frame.df = frame.df.withColumn(node["name"], (bucket * F.lit(_PERSON_STRIDE) + rank).cast("long"))
        frame.columns = [*frame.columns, node["name"]]
        return frame

    def _acct_unique(self, node: dict) -> "Frame":
        frame = self.frame(node["input"])
        frame.df = unique_rows(frame.df, node["columns"])
        frame.unique = tuple(node["columns"])
        self.checked_datasets.add(node["dataset"])
        return frame


def row_ids(compiler: Any, df: Any, source: Any, name: str) -> Any:
    """``df`` (rows of one scan) with ``name``: a distinct id >= 1 per source row, from its row-order columns."""
    split_file, split_block = compiler.hidden("split_file"), compiler.hidden("split_block")
    first_row, split = compiler.hidden("split_first"), compiler.hidden("split")
    splits = (source.df.groupBy(column(source.file).alias(split_file), column(source.block).alias(split_block))
              .agg(F.min(column(source.row)).alias(first_row)))
    splits = splits.withColumn(split, F.row_number().over(
        Window.orderBy(column(split_file), column(split_block))) - 1)
    joined = df.join(F.broadcast(splits), (column(source.file) == column(split_file))
                     & (column(source.block) == column(split_block)), "left")
    ids = column(split).cast("long") * F.lit(_SPLIT_STRIDE) + (column(source.row) - column(first_row)) + 1
    return joined.withColumn(name, ids).drop(split_file, split_block, first_row, split)


def row_words(compiler: Any, df: Any, order: list[Column], name: str, bound: int,
              ids: Column | None = None) -> tuple[Any, list[str]]:
    """``df`` (at most ``bound`` rows, one small source's) with ``name``: ids 1, 2, 3... in row order (or
    ``ids``, distinct ids of the rows within 1..bound), and the
    ids as bits of ``bound / 63`` hidden words, so that a group's distinct ids are counted by OR-ing words
    (:func:`_distinct_rows`) rather than by a distinct count (an Expand and a second aggregation in Spark).

    Numbered on one partition: the frame is small.  A frame with more rows than ``bound`` (the source grew
    after it was counted) fails the job as "changed" (:data:`CHANGED_MARKER`): no id may go without its bit.
    """
    if ids is None:
        ids = F.row_number().over(Window.orderBy(*(order or [F.lit(0)]))).cast("long")
    df = df.withColumn(name, F.when(ids > F.lit(bound), F.raise_error(F.lit(CHANGED_MARKER))).otherwise(ids))
    place = column(name) - F.lit(1)
    words = [compiler.hidden(f"bits{w}") for w in range((bound + _WORD_BITS - 1) // _WORD_BITS or 1)]
    # 63 bits a word, the sign bit unused: a power of two below 2^63 is exact as a double, then as a long.
    bit = F.pow(F.lit(2.0), place % F.lit(_WORD_BITS)).cast("long")
    df = df.select("*", *[F.when(F.floor(place / F.lit(_WORD_BITS)) == F.lit(w), bit)
                          .otherwise(F.lit(0).cast("long")).alias(word) for w, word in enumerate(words)])
    return df, words


def unique_rows(df: Any, keys: list[str]) -> Any:
    """``df`` whose first key fails the job when two rows share a key (the uniqueness the policy relied on)."""
    repeated = F.count(F.lit(1)).over(Window.partitionBy(*[column(k) for k in keys])) > 1
    guarded = F.when(repeated, F.raise_error(F.lit(CHANGED_MARKER))).otherwise(column(keys[0]))
    return df.withColumn(keys[0], guarded)


# ---------------------------------------------------------------- expressions
def account_expr(scope: Scope, node: dict, window: Any) -> Column:
    """An accounting expression: a group's value (``window`` None, in an aggregation) or a window over it."""
    builder = _EXPRS.get(node["expr"])
    if builder is None:
        raise BastionError("UnsupportedOperation", f"the accounting expression {node['expr']!r} is not supported "
                                                   "on the Spark engine", engine="spark")
    return builder(scope, node, window).cast("long")


def _bool_or(value: Column, window: Any) -> Column:
    return _over(F.bool_or(value), window)


def _distinct(value: Column, window: Any) -> Column:
    if window is None:
        return F.count_distinct(value)
    return F.size(F.collect_set(value).over(window))


def _distinct_rows(scope: Scope, rid: str, mask: Column | None, window: Any) -> Column:
    """The distinct ids >= 1 of row-id column ``rid`` in a group (where ``mask`` holds): OR-ed bit words when
    the frame carries them (:func:`row_words`), else a distinct count."""
    c = column(rid)
    words = scope.frame.words.get(rid)
    if window is not None or not words or not set(words) <= set(scope.df.columns):
        return _distinct(F.when(c > 0, c) if mask is None else F.when(mask & (c > 0), c), window)
    zero = F.lit(0).cast("long")
    # A word is 0 for an id <= 0 (no partner) and for a null id (a row of another source).
    counts = [F.coalesce(F.bit_count(F.bit_or(column(w) if mask is None else F.when(mask, column(w)).otherwise(zero))),
                         F.lit(0)).cast("long") for w in words]
    total = counts[0]
    for count in counts[1:]:
        total = total + count
    return total


def _guarded(node: dict, c: Column, count: Column, window: Any) -> Column:
    # The polars engine's order: an empty group is fed by 0 rows; a group with no row of this source is null;
    # a group with an unmatched join row is 0.
    if not (node["taintable"] or node["nullable"] or node["global"]):
        return count
    expr = F.when(_over(F.count(F.lit(1)), window) == 0, F.lit(0))
    if node["nullable"]:
        expr = expr.when(_over(F.count(c), window) == 0, F.lit(None).cast("long"))
    if node["taintable"]:
        expr = expr.when(_bool_or(c == 0, window), F.lit(0))
    return expr.otherwise(count)


def _acct_distinct(scope: Scope, node: dict, window: Any) -> Column:
    c = column(node["column"])
    if window is None and scope.frame.words.get(node["column"]):
        # Ids are >= 1 here unless taintable or nullable, where those alone are counted: the same count.
        return _guarded(node, c, _distinct_rows(scope, node["column"], None, window), window)
    counted = F.when(c > 0, c) if node["taintable"] or node["nullable"] else c
    return _guarded(node, c, _distinct(counted, window), window)


def _acct_sum(scope: Scope, node: dict, window: Any) -> Column:
    c = column(node["column"])
    total = F.coalesce(_over(F.sum(c), window), F.lit(0)) if node["exact"] else F.lit(1)
    return _guarded(node, c, total, window)


def _acct_one_row(scope: Scope, node: dict, window: Any) -> Column:
    c = column(node["column"])
    return F.when(c.isNull(), F.lit(None).cast("long")).when(c == 0, F.lit(0)).otherwise(F.lit(1))


def _acct_unmatched(scope: Scope, node: dict, window: Any) -> Column:
    missing = None
    for name in node["side"]:
        part = column(name).isNull()
        missing = part if missing is None else missing & part
    return F.when(missing, F.lit(0)).otherwise(column(node["column"]))


def _value(scope: Scope, expr: dict) -> Column:
    """The per-row values of an aggregation's input (its filters already written as when/then)."""
    if shape_of(expr) != "row":
        return scope.row(expr).value
    seq = scope.row(expr)
    if not seq.plain():
        raise BastionError("UnsupportedOperation", "an accounted aggregation over a reordered or cut sequence is "
                                                   "not supported on the Spark engine", engine="spark")
    return seq.value


def _acct_contrib(scope: Scope, node: dict, window: Any) -> Column:
    value = _value(scope, node["input"])
    dtype = scope.dtype(node["input"])
    present = value.isNotNull()
    if node["function"] in ("count", "n_unique", "null_count") or dtype is None:
        mask = present
    elif dtype == pl.Boolean:
        mask = present & value
    elif dtype.is_numeric():
        mask = present & (value != 0)
    else:
        mask = present
    if node["padded"]:
        # The value most rows share (any one of them when tied: the count below is the same for each).
        mode = scope.pre(F.mode(value).over(scope.window()), "mode")
        at_mode = scope.pre(F.sum(F.when(value == mode, F.lit(1)).otherwise(F.lit(0))).over(scope.window()), "mode")
        mask = mask & (F.coalesce(value != mode, F.lit(True)) | (at_mode <= 1))
    return _contributors(scope, node, mask, window)


def _contributors(scope: Scope, node: dict, mask: Column, window: Any) -> Column:
    """The source rows (people) of ``node["column"]`` among the rows where ``mask`` holds, per group."""
    kind = node["kind"]
    if kind == "implicit":
        return _over(F.count(F.when(mask, F.lit(1))), window)
    c = column(node["column"])
    if kind == "rid":
        count = _distinct_rows(scope, node["column"], mask, window)
    else:
        fed = mask & (c > 0)
        count = F.coalesce(_over(F.sum(F.when(fed, c)), window), F.lit(0)) if node["exact"] else \
            _over(F.count(F.when(fed, F.lit(1))), window)
    # A group with no row of this source (after a concat) was not fed by it.
    return F.when(_bool_or(c.isNotNull(), window), count)


def _acct_held(scope: Scope, node: dict, window: Any) -> Column:
    call = node["call"]
    value = _value(scope, call["input"])
    c = column(node["column"]) if node["kind"] != "implicit" else None
    if call["name"] != "n_unique":
        aggregate = scope.row(call).value  # the group's aggregate, on each of its rows
        return _contributors(scope, node, F.coalesce(value == aggregate, F.lit(False)), window)
    kept = F.lit(True) if node["kept"] is None else F.coalesce(scope.row(node["kept"]).value, F.lit(False))
    if node["kind"] == "implicit":
        holders = scope.pre(F.count(F.lit(1)).over(scope.window(scope.partition + [kept, value])), "holders")
        return _over(F.min(F.when(kept, holders)), window)
    if node["kind"] == "rid":
        counted = kept & (c > 0)
        part = scope.window(scope.partition + [counted, value])
        rank = scope.pre(F.dense_rank().over(part.orderBy(c)), "rank")
        holders = scope.pre(F.max(rank).over(part), "holders")
        fewest = _over(F.min(F.when(counted, holders)), window)
    else:
        fewest = _over(F.min(F.when(kept & (c > 0), c)), window)
    return F.when(_bool_or(c.isNotNull(), window), fewest)


def _is_finite(value: Column) -> Column:
    return ~value.isNaN() & (F.abs(value) != F.lit(_INF))


def _largest(scope: Scope, value: Column, window: Any) -> Column:
    """polars' max of a float column: NaN skipped unless there is nothing else."""
    return F.coalesce(_over(F.max(F.when(~value.isNaN(), value)), window), _over(F.max(value), window))


def _acct_share(scope: Scope, node: dict, window: Any) -> Column:
    value = _value(scope, node["input"]).cast("double")
    if not node["exact"]:
        n = _over(F.count(value), window).cast("double")
        variance = _over(F.var_pop(value), window)
        dtype = scope.dtype(node["input"])
        # A value that is not a float is never NaN: its plain max is polars' (one aggregate less).
        largest = _largest(scope, value, window) if dtype is None or dtype.is_float() else _over(F.max(value), window)
        return bound_flag(node, n, variance, largest, _over(F.min(value), window))
    group = scope.window()
    median = scope.pre(F.median(value).over(group), "median")
    distance = F.abs(value - median)
    total = _over(F.sum(distance), window)
    if getattr(scope, "aggregation", False):
        # The polars engine's aggregation path: the two largest distances from the extremes on each side.
        largest = scope.pre(_largest(scope, value, group), "max")
        smallest = scope.pre(F.min(value).over(group), "min")
        median_value = _over(F.first(median), window)
        largest_value = _over(F.first(largest), window)
        smallest_value = _over(F.first(smallest), window)
        maxes = _over(F.sum(F.when(value == largest, F.lit(1)).otherwise(F.lit(0))), window)
        mins = _over(F.sum(F.when(value == smallest, F.lit(1)).otherwise(F.lit(0))), window)
        second_largest = F.when(maxes > 1, largest_value).otherwise(
            _largest(scope, F.when(value < largest, value), window))
        second_smallest = F.when(mins > 1, smallest_value).otherwise(
            _over(F.min(F.when(value > smallest, value)), window))
        high1 = _clip_zero(largest_value - median_value)
        high2 = _clip_zero(F.coalesce(second_largest - median_value, median_value))
        low1 = _clip_zero(median_value - smallest_value)
        low2 = _clip_zero(F.coalesce(median_value - second_smallest, median_value))
        top_one = F.greatest(high1, low1)
        top_two = F.greatest(high1 + high2, high1 + low1, low1 + low2)
    else:
        rank = scope.pre(F.row_number().over(group.orderBy(F.abs(value - median).desc_nulls_last())), "rank")
        top_one = _largest(scope, distance, window)
        top_two = _over(F.sum(F.when(rank <= 2, distance)), window)
    dominated = ~_is_finite(total)
    if node.get("top_two") is not None:
        dominated = dominated | ((total > 0) & (top_two > total * F.lit(node["top_two"] / 1_000_000)))
    if node.get("p_ratio") is not None:
        dominated = dominated | ((top_one > 0) & (total - top_two < top_one * F.lit(node["p_ratio"] / 1_000_000)))
    if node.get("largest") is not None:
        dominated = dominated | ((total > 0) & (top_one > total * F.lit(node["largest"] / 1_000_000)))
    return F.coalesce(dominated, F.lit(False))


def bound_flag(node: dict, n: Column, variance: Column, largest: Column, smallest: Column) -> Column:
    """The dominance bound's flag of a group from its values' count (a double), population variance, max and min:
    0 cleared, 1 not finite, 2 unsure (see the polars engine's ``_acct_share``)."""
    spread = largest - smallest
    spread_total = n * variance
    factor = _clearing_factor(node)
    return (F.when(~_is_finite(spread_total) | ~_is_finite(spread), F.lit(1))
            .when((spread == 0) | (spread_total >= F.lit(factor) * spread * spread), F.lit(0))
            .otherwise(F.lit(2)))


def _clip_zero(value: Column) -> Column:
    # polars' clip(0): null stays null, NaN stays NaN.
    return F.when(value.isNull() | value.isNaN(), value).otherwise(F.greatest(value, F.lit(0.0)))


def _acct_finite(scope: Scope, node: dict, window: Any) -> Column:
    call = node["call"]
    dtype = scope.dtype(call)
    if dtype is not None and dtype.is_float():
        return F.coalesce(_is_finite(scope.agg(call, window)), F.lit(True))
    if dtype is not None and dtype.is_integer() and call["name"] == "sum":
        low, high = _INTEGER_RANGE[str(dtype)]
        inner = _value(scope, call["input"])
        if scope.dtype(call["input"]) == pl.Boolean:
            inner = inner.cast("long")
        approximate = _over(F.sum(inner.cast("double")), window)
        within = approximate.between(F.lit(low * _RANGE_MARGIN), F.lit(high * _RANGE_MARGIN))
        return F.coalesce(within, F.lit(True))
    return F.lit(True)


def _acct_extreme(largest: bool) -> Callable[[Scope, dict, Any], Column]:
    def build(scope: Scope, node: dict, window: Any) -> Column:
        c = column(node["column"])
        return _over(F.max(c) if largest else F.min(c), window)
    return build


_EXPRS: dict[str, Callable[[Scope, dict, Any], Column]] = {
    "acct_col": lambda s, n, w: column(n["name"]),
    "acct_const": lambda s, n, w: F.lit(n["value"]).cast("long"),
    "acct_len": lambda s, n, w: _over(F.count(F.lit(1)), w),
    "acct_distinct": _acct_distinct,
    "acct_sum": _acct_sum,
    "acct_one_row": _acct_one_row,
    "acct_unmatched": _acct_unmatched,
    "acct_contrib": _acct_contrib,
    "acct_held": _acct_held,
    "acct_share": _acct_share,
    "acct_finite": _acct_finite,
    "acct_min": _acct_extreme(False),
    "acct_max": _acct_extreme(True),
}

__all__ = ["AccountingOps", "account_expr", "row_ids", "unique_rows", "is_changed_error", "CHANGED_MARKER"]
