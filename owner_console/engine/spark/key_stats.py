"""Per-key statistics on the Spark engine: the accounting's aggregates of a group-by of a whole source, measured once
per data version and joined to the aggregated result by its keys.

The polars engine's per-key statistics (:func:`owner_console.engine.facts.key_stats`,
``DatasetCache.key_stats``), for Spark datasets.  A ``group_by`` of a whole
source (each row once: no filter, no join; sorts, drops, renames and added
columns carried as the polars engine carries them) by plain key columns of
exact types, with at most :data:`~owner_console.engine.facts.MAX_KEY_GROUPS`
groups, reads the checks of its plain columns (contributor counts, the
dominance bound) from a table measured once per (source, data version, keys):
one Spark aggregation of simple aggregates, grouped by the keys, collected to
the executor as a polars DataFrame (:func:`measure`), and sent back to Spark
as a small local relation joined after the aggregation (:class:`KeyCover`).
The query's own aggregation then holds the scientist's aggregates and one row
count per group, the guard: a group whose count differs from the statistics'
gets a failing value (0 contributors, dominance 1), as on polars.

A ``group_by`` over an inner join of a whole source with a small side whose
join key is unique reads its checks from :func:`join_stats.group_stats`
instead (:class:`JoinCover`): the source's statistics by the join key and
the small side's rows, collected while compiling, as the polars engine's
``AccountingCompiler._join_key_source`` does.

The statistics are the expressions :mod:`.accounting` computes over the rows
(:func:`stat_columns`), so a covered check has the value the job would have
given it.  Statistics are the owner's: they choose how a value is computed,
never which (``tests/test_spark_key_stats.py``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import polars as pl
from pyspark.sql import Column
from pyspark.sql import functions as F

from bastion_kernel.contract import plan as P

from ..accounting import _INTEGER_RANGE, _RANGE_MARGIN, AccountingCompiler, _carried, _plain_column, \
    _product_exact
from ..cache import KEY_STATS_MIN_ROWS
from ..facts import KEY_LEN, MAX_KEY_GROUPS, ColumnFacts, key_dtype_fits, stat_name
from ..join_stats import MAX_SMALL_ROWS, SMALL_ROWS, Term, group_stats, small_side_columns
from .expressions import column

if TYPE_CHECKING:
    from .compile import SparkCompiler

# Counting functions: their contributors are the non-null values (spark/accounting._acct_contrib).
_COUNTING = frozenset({"count", "n_unique", "null_count"})
# Frame operations between a scan and a group_by that keep every row once, in the polars engine's _whole_table.
_WHOLE_TABLE_OPS = ("sort", "drop", "rename", "with_columns", "with_row_index")

__all__ = ["KeyCover", "JoinCover", "cover", "measure", "stat_columns", "kept_stats", "forget"]


def _numeric(dtype: pl.DataType) -> bool:
    return dtype == pl.Boolean or dtype.is_numeric()


def stat_columns(name: str, dtype: pl.DataType) -> dict[str, Column]:
    """The statistics of column ``name`` (polars ``dtype``) as Spark aggregates, named by :func:`facts.stat_name`.

    The same expressions :mod:`.accounting` builds over a group's rows: the
    non-null count; for numbers and booleans the contributors' count (a
    true boolean, a non-zero number), and the dominance bound's variance
    (population), max (a float's NaN skipped unless there is nothing else)
    and min of the values as doubles, and their mean.
    """
    x = column(name)
    stats = {"count": F.count(x)}
    if not _numeric(dtype):
        return stats
    stats["nonzero"] = F.count(F.when(x if dtype == pl.Boolean else x != 0, F.lit(1)))
    value = x.cast("double")
    stats["var"] = F.var_pop(value)
    if dtype.is_float():
        stats["max"] = F.coalesce(F.max(F.when(~value.isNaN(), value)), F.max(value))
    else:
        stats["max"] = F.max(value)
    stats["min"] = F.min(value)
    stats["mean"] = F.avg(value)
    if dtype.is_float():
        # The column's facts (a product's exactness over a join, join_stats): its values that are not finite,
        # and the smallest non-zero magnitude.
        stats["nonfinite"] = F.count(F.when(value.isNaN() | (F.abs(value) == F.lit(float("inf"))), F.lit(1)))
        stats["smallest"] = F.min(F.when(value != 0, F.abs(value)))
    if not dtype.is_float():
        # An integer sum's finiteness check (accounting._acct_finite): the sum of the values as doubles.
        stats["dsum"] = F.sum((x.cast("long") if dtype == pl.Boolean else x).cast("double"))
    return {stat_name(name, label): agg for label, agg in stats.items()}


def extreme(value: Column, dtype: pl.DataType, largest: bool) -> Column:
    """A group's min or max of ``value`` as the Spark engine's ``min``/``max`` computes it (a float's max skips
    NaN unless there is nothing else, as polars')."""
    if largest and dtype.is_float():
        return F.coalesce(F.max(F.when(~value.isNaN(), value)), F.max(value))
    return F.max(value) if largest else F.min(value)


def measure(frame: Any, keys: tuple[str, ...], columns: Mapping[str, pl.DataType],
            held: Mapping[str, pl.DataType], collect: Callable[[Any], Any]) -> pl.DataFrame | None:
    """Per group of ``keys`` in ``frame`` (a whole source), :data:`facts.KEY_LEN`, :func:`stat_columns` of
    ``columns`` and, for each column of ``held``, how many rows hold the group's min and max (``held_min``,
    ``held_max``: ``x == min(x)``, the group's extremes joined back by key); None when there are more than
    :data:`facts.MAX_KEY_GROUPS` groups.

    ``collect(df)`` runs a Spark action (``df.toArrow()`` under the caller's job tag and time limit).
    """
    key_columns = [column(k) for k in keys]
    aggs = [F.count(F.lit(1)).alias(KEY_LEN)]
    for name, dtype in columns.items():
        aggs += [agg.alias(label) for label, agg in stat_columns(name, dtype).items()]
    grouped = frame.groupBy(*key_columns).agg(*aggs).limit(MAX_KEY_GROUPS + 1)
    stats = pl.from_arrow(collect(grouped))
    if stats.height > MAX_KEY_GROUPS:
        return None
    if held:
        hidden = {k: f"__bastion_stat_key{i}" for i, k in enumerate(keys)}
        extremes = frame.groupBy(*key_columns).agg(
            *[extreme(column(c), d, largest).alias(stat_name(c, f"raw_{label}"))
              for c, d in held.items() for label, largest in (("min", False), ("max", True))])
        extremes = extremes.select(*[column(k).alias(hidden[k]) for k in keys],
                                   *[column(n) for n in extremes.columns if n not in keys])
        condition = None
        for k in keys:
            pair = column(k).eqNullSafe(column(hidden[k]))
            condition = pair if condition is None else condition & pair
        counted = frame.join(F.broadcast(extremes), condition, "left").groupBy(*key_columns).agg(
            *[F.count(F.when(F.coalesce(column(c) == column(stat_name(c, f"raw_{label}")), F.lit(False)),
                             F.lit(1))).alias(stat_name(c, f"held_{label}"))
              for c in held for label in ("min", "max")])
        stats = stats.join(pl.from_arrow(collect(counted)), on=list(keys), how="left", nulls_equal=True,
                           maintain_order="left")
    return stats


# ---------------------------------------------------------------- kept per (source, data version, keys)
_lock = threading.Lock()
# (source identity, data version, keys) -> statistics, or None when the key has too many groups.
_kept: dict[tuple[str, str, tuple[str, ...]], pl.DataFrame | None] = {}


def kept_stats(identity: str, version: str, keys: tuple[str, ...], columns: Mapping[str, pl.DataType],
               held: Mapping[str, pl.DataType],
               measure_columns: Callable[[Mapping[str, pl.DataType], Mapping[str, pl.DataType]],
                                         pl.DataFrame | None]) -> pl.DataFrame | None:
    """The statistics of ``columns`` (and the holders of ``held``'s extremes) by ``keys`` for one source
    version, measured (``measure_columns(columns, held)``) for those not kept yet and kept with the others; an
    older version's are dropped."""
    key = (identity, version, keys)
    with _lock:
        stats = _kept.get(key, False)
    if stats is None:
        return None
    have = set() if stats is False else set(stats.columns)
    missing = {c: d for c, d in columns.items() if stat_name(c, "count") not in have}
    missing_held = {c: d for c, d in held.items() if stat_name(c, "held_min") not in have}
    if not missing and not missing_held:
        return stats
    measured = measure_columns(missing, missing_held)
    if measured is None:
        stats = None
    elif stats is False:
        stats = measured
    else:
        stats = stats.join(measured.drop(KEY_LEN), on=list(keys), how="left", nulls_equal=True,
                           maintain_order="left")
    with _lock:
        for stale in [k for k in _kept if k[0] == identity and k[1] != version]:
            del _kept[stale]
        _kept[key] = stats
    return stats


def forget() -> None:
    """Drop every kept statistic (tests, a stopped session)."""
    with _lock:
        _kept.clear()


# ---------------------------------------------------------------- the compiler's side
@dataclass
class KeyCover:
    """The checks of one ``group_by`` read from per-key statistics (see the module docstring).

    Attributes
    ----------
    keys : tuple[str, ...]
        The key columns as the group_by's input names them (the aggregation groups by these).
    table_keys : tuple[str, ...]
        The same keys as the statistics (the source) name them.
    stats : polars.DataFrame
        The kept statistics.
    values : dict[int, tuple[str, str]]
        Index of a covered aggregate in ``node["aggs"]`` -> (its kind, the source column it reads).
    dtypes : dict[int, polars.DataType]
        The polars dtype of each covered aggregate's input.
    count : str
        The hidden column of the aggregation's own row count per group (the guard).
    """

    keys: tuple[str, ...]
    table_keys: tuple[str, ...]
    stats: pl.DataFrame
    values: dict[int, tuple[str, str]]
    dtypes: dict[int, pl.DataType]
    count: str = ""
    names: dict[str, str] = field(default_factory=dict)
    # Index of a covered integer sum's finiteness check -> the sum's type's range.
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)

    def joined(self, compiler: "SparkCompiler", grouped: Any, node: dict, slots: list[str]) -> Any:
        """``grouped`` (the aggregation, with :attr:`count`) with the covered aggregates' columns ``slots[i]``
        computed from the statistics joined by the keys (null-safe; broadcast: one row per group)."""
        from .accounting import bound_flag

        used = {stat_name(self.values[i][1], s) for i in self.values for s in self._reads(node["aggs"][i], i)}
        wanted = [KEY_LEN] + sorted(used)
        self.names = {name: compiler.hidden("stat") for name in [*self.table_keys, *wanted]}
        arrow = self.stats.select([pl.col(c).alias(self.names[c]) for c in [*self.table_keys, *wanted]]) \
            .to_arrow(compat_level=pl.CompatLevel.oldest())
        small = compiler.session.createDataFrame(arrow)
        types = {f.name: f.dataType for f in grouped.schema.fields}
        small = small.select(*[column(self.names[t]).cast(types[k]).alias(self.names[t])
                               for k, t in zip(self.keys, self.table_keys)],
                             *[column(self.names[c]) for c in wanted])
        condition = None
        for key, table_key in zip(self.keys, self.table_keys):
            pair = column(key).eqNullSafe(column(self.names[table_key]))
            condition = pair if condition is None else condition & pair
        joined = grouped.join(F.broadcast(small), condition, "left")
        same = column(self.names[KEY_LEN]) == column(self.count)
        values = {}
        for index, (kind, source) in self.values.items():
            agg = node["aggs"][index]
            stat = {s: column(self.names[stat_name(source, s)]) for s in self._reads(agg, index)}
            if kind == "acct_contrib":
                value, failing = stat[self._contrib_stat(agg, index)], 0
            elif kind == "acct_held":
                value, failing = stat[f"held_{agg['call']['name']}"], 0
            elif kind == "acct_finite":
                low, high = self.ranges[index]
                value = F.coalesce(stat["dsum"].between(F.lit(low * _RANGE_MARGIN), F.lit(high * _RANGE_MARGIN)),
                                   F.lit(True)).cast("long")
                failing = 0
            else:
                value, failing = bound_flag(agg, stat["count"].cast("double"), stat["var"], stat["max"],
                                            stat["min"]), 1
            values[slots[index]] = F.when(same, value).otherwise(F.lit(failing)).cast("long")
        return joined.withColumns(values)

    def _contrib_stat(self, agg: dict, index: int) -> str:
        dtype = self.dtypes[index]
        return "count" if agg["function"] in _COUNTING or not _numeric(dtype) else "nonzero"

    def _reads(self, agg: dict, index: int) -> tuple[str, ...]:
        if agg["expr"] == "acct_contrib":
            return (self._contrib_stat(agg, index),)
        if agg["expr"] == "acct_held":
            return (f"held_{agg['call']['name']}",)
        if agg["expr"] == "acct_finite":
            return ("dsum",)
        return ("count", "var", "max", "min")


def cover(compiler: "SparkCompiler", node: dict) -> KeyCover | None:
    """A :class:`KeyCover` for a ``group_by`` node when per-key statistics apply to it, else None.

    Applies when the aggregation's input is a whole source (:func:`_whole_source`) with a data version, its
    keys are plain columns of exact types (:func:`facts.key_dtype_fits`), some check reads a plain numeric
    column or counts a plain column's values, and the statistics are available (measured by the compiler's
    ``key_stats``).
    """
    measure_stats = getattr(compiler, "key_stats", None)
    if measure_stats is None or any(a["expr"] == "acct_share" and a["exact"] for a in node["aggs"]):
        return None
    found = _whole_source(compiler, node["input"])
    if found is None:
        return _join_cover(compiler, node)
    dataset, scan_node, carried = found
    schema = compiler.types.schema(scan_node)
    keys, table_keys, outputs = [], [], []
    for key in node["keys"]:
        name = _plain_column(key)
        if name not in carried or not key_dtype_fits(schema[carried[name]]):
            return None
        keys.append(name)
        table_keys.append(carried[name])
        outputs.append(P.output_name(key))
    if not keys or len(set(table_keys)) != len(table_keys) or len(set(outputs)) != len(outputs):
        return None
    values: dict[int, tuple[str, str]] = {}
    dtypes: dict[int, pl.DataType] = {}
    ranges: dict[int, tuple[int, int]] = {}
    for index, agg in enumerate(node["aggs"]):
        kind = agg["expr"]
        if kind == "acct_contrib" and agg["kind"] == "implicit" and not agg["padded"] or \
                kind == "acct_share" and not agg["exact"]:
            name = _plain_column(agg["input"])
        elif kind == "acct_held" and agg["kind"] == "implicit" and agg["call"]["name"] in ("min", "max") or \
                kind == "acct_finite" and agg["call"]["name"] == "sum":
            name = _plain_column(agg["call"]["input"])
        else:
            continue
        if name not in carried:
            continue
        dtype = schema[carried[name]]
        if kind == "acct_share" and not _numeric(dtype):
            continue
        if kind == "acct_finite":
            result = compiler.types.dtype(agg["call"])
            if result is None or not result.is_integer() or not (dtype == pl.Boolean or dtype.is_integer()):
                continue
            ranges[index] = _INTEGER_RANGE[str(result)]
        values[index] = (kind, carried[name])
        dtypes[index] = dtype
    if not values:
        return None
    columns = {source: schema[source] for i, (kind, source) in values.items() if kind != "acct_held"}
    held = {source: schema[source] for i, (kind, source) in values.items() if kind == "acct_held"}
    stats = measure_stats(dataset, tuple(table_keys), columns, held)
    if stats is None:
        return None
    return KeyCover(tuple(keys), tuple(table_keys), stats, values, dtypes, ranges=ranges)


def _whole_source(compiler: "SparkCompiler", node: dict) -> tuple[Any, dict, dict[str, str]] | None:
    """``(dataset, scan node, {frame column: source column})`` when a frame is a whole Spark source with a data
    version (each row once), else None; and not when its Parquet footers count fewer than
    :data:`..cache.KEY_STATS_MIN_ROWS` rows (computing the checks costs less than joining statistics)."""
    chain = []
    while node["op"] in _WHOLE_TABLE_OPS:
        chain.append(node)
        node = node["input"]
    if node["op"] != "scan":
        return None
    dataset = compiler.catalog.get(node["dataset"])
    if dataset is None or getattr(dataset, "engine", "spark") != "spark":
        return None
    rows = compiler.row_count(dataset) if compiler.row_count is not None else None
    if rows is not None and rows < KEY_STATS_MIN_ROWS:
        return None
    columns: dict = {c: c for c in compiler.types.schema(node).names()}
    for step in reversed(chain):
        columns = _carried(step, columns)
    return dataset, node, columns


# ---------------------------------------------------------------- a group_by over a join with a small side
@dataclass
class JoinCover:
    """The checks of a ``group_by`` over a whole source inner-joined with a small side whose join key is unique,
    read from :func:`join_stats.group_stats` (the source's per-key statistics and the small side's rows).

    Attributes
    ----------
    keys : tuple[str, ...]
        The group key columns as the group_by's input names them (also the statistics' names of them).
    stats : polars.DataFrame
        One row per group: :func:`join_stats.group_stats`.
    values : dict[int, tuple[str, str]]
        Index of a covered aggregate in ``node["aggs"]`` -> (its kind, the statistic it reads: for a dominance
        check the base name of the term's statistics).
    count : str
        The hidden column of the aggregation's own row count per group (the guard).
    """

    keys: tuple[str, ...]
    stats: pl.DataFrame
    values: dict[int, tuple[str, str]]
    count: str = ""

    def joined(self, compiler: "SparkCompiler", grouped: Any, node: dict, slots: list[str]) -> Any:
        """``grouped`` (the aggregation, with :attr:`count`) with the covered aggregates' columns ``slots[i]``
        from the statistics joined by the group keys (null-safe; broadcast: one row per group)."""
        from .accounting import bound_flag

        used = {KEY_LEN}
        for kind, stat in self.values.values():
            used |= {stat_name(stat, s) for s in ("count", "var", "max", "min")} if kind == "acct_share" else {stat}
        wanted = sorted(used)
        names = {name: compiler.hidden("stat") for name in [*self.keys, *wanted]}
        arrow = self.stats.select([pl.col(c).alias(names[c]) for c in [*self.keys, *wanted]]) \
            .to_arrow(compat_level=pl.CompatLevel.oldest())
        small = compiler.session.createDataFrame(arrow)
        types = {f.name: f.dataType for f in grouped.schema.fields}
        small = small.select(*[column(names[k]).cast(types[k]).alias(names[k]) for k in self.keys],
                             *[column(names[c]) for c in wanted])
        condition = None
        for key in self.keys:
            pair = column(key).eqNullSafe(column(names[key]))
            condition = pair if condition is None else condition & pair
        joined = grouped.join(F.broadcast(small), condition, "left")
        same = column(names[KEY_LEN]) == column(self.count)
        values = {}
        for index, (kind, stat) in self.values.items():
            if kind == "acct_share":
                part = {s: column(names[stat_name(stat, s)]) for s in ("count", "var", "max", "min")}
                value, failing = bound_flag(node["aggs"][index], part["count"].cast("double"), part["var"],
                                            part["max"], part["min"]), 1
            else:
                value, failing = column(names[stat]), 0
            values[slots[index]] = F.when(same, value).otherwise(F.lit(failing)).cast("long")
        return joined.withColumns(values)


def _join_cover(compiler: "SparkCompiler", node: dict) -> JoinCover | None:
    """A :class:`JoinCover` for a ``group_by`` directly over an inner join of a whole Spark source (as
    :func:`_whole_source`) with ``acct_unique`` over ``acct_row_id`` over a scan of at most
    :data:`join_stats.MAX_SMALL_ROWS` rows, grouped by the small side's columns or the join key (exact types),
    else None.  The conditions and terms are the polars engine's (``AccountingCompiler._join_key_source``):
    a plain column of either side, or a product of doubles whose facts prove it exact (:func:`_product_exact`,
    the facts from the source's per-key statistics)."""
    join = node["input"]
    if join["op"] != "join" or join["how"] != "inner" or join["right"]["op"] != "acct_unique":
        return None
    row_node = join["right"]["input"]
    if row_node["op"] != "acct_row_id" or row_node["input"]["op"] != "scan":
        return None
    small_scan, row_id = row_node["input"], row_node["name"]
    small_dataset = compiler.catalog.get(small_scan["dataset"])
    found = _whole_source(compiler, join["left"])
    if found is None or small_dataset is None or getattr(small_dataset, "engine", "spark") != "spark":
        return None
    dataset, scan_node, carried = found
    table_schema, small_schema = compiler.types.schema(scan_node), compiler.types.schema(small_scan)
    left_schema, right_schema = compiler.types.schema(join["left"]), compiler.types.schema(join["right"])
    left_keys = [_plain_column(k) for k in join["left_on"]]
    right_keys = [_plain_column(k) for k in join["right_on"]]
    if None in left_keys or None in right_keys or set(join["right"]["columns"]) != set(right_keys) or \
            any(k not in carried or not key_dtype_fits(table_schema[carried[k]]) or r not in small_schema or
                small_schema.get(r) != table_schema[carried[k]] for k, r in zip(left_keys, right_keys)):
        return None
    found_columns = small_side_columns(
        left_schema.names(), [n for n in right_schema.names() if n in small_schema], left_keys, right_keys,
        join["suffix"], [_plain_column(key) for key in node["keys"]],
        lambda name: key_dtype_fits(small_schema[name]))
    if found_columns is None:
        return None
    small_of, sources = found_columns
    keys = [_plain_column(key) for key in node["keys"]]
    groups = list(zip(sources, keys))
    if not groups or len(set(keys)) != len(keys) or len({s for s, _ in groups}) != len(groups):
        return None
    chosen: dict[int, tuple[str, Term, str]] = {}
    for index, agg in enumerate(node["aggs"]):
        kind = agg["expr"]
        if kind == "acct_distinct" and agg["column"] == row_id and \
                not (agg["taintable"] or agg["nullable"] or agg["global"]):
            chosen[index] = (kind, None, stat_name("", SMALL_ROWS))
            continue
        if not (kind == "acct_share" and not agg["exact"] or kind == "acct_contrib" and not agg["padded"] and (
                agg["kind"] == "implicit" or agg["kind"] == "rid" and agg["column"] == row_id)):
            continue
        term = AccountingCompiler._join_term(agg["input"], carried, small_of, left_schema, right_schema)
        if term is None:
            continue
        if kind == "acct_share":
            if not term.numeric:
                continue
            chosen[index] = (kind, term, term.name)
        else:
            stat = "nonzero" if term.numeric and agg["function"] not in _COUNTING else "count"
            chosen[index] = (kind, term, stat_name(term.name, stat if agg["kind"] == "implicit" else f"{stat}_rows"))
    terms = {t.name: t for _, t, _ in chosen.values() if t is not None}
    if not terms:
        return None
    table_keys = [carried[k] for k in left_keys]
    # Terms of the small side only read the source's rows per key: its first key's statistics hold them.
    left_columns = {t.left: table_schema[t.left] for t in terms.values() if t.left is not None} or \
        {table_keys[0]: table_schema[table_keys[0]]}
    stats = compiler.key_stats(dataset, tuple(table_keys), left_columns, {})
    if stats is None:
        return None
    small_columns = list(dict.fromkeys(right_keys + [s for s, _ in groups]
                                       + [t.right for t in terms.values() if t.right is not None]))
    try:
        rows = compiler.read(small_dataset, False).select(*[column(c) for c in small_columns]) \
            .limit(MAX_SMALL_ROWS + 1).toArrow()
    except Exception:  # noqa: BLE001 - read ahead only to save work: the query computes it all otherwise
        return None
    small = pl.from_arrow(rows)
    if not isinstance(small, pl.DataFrame) or small.height > MAX_SMALL_ROWS:
        return None
    exact = {name: t for name, t in terms.items()
             if _product_exact(t, small, None if t.left is None or t.right is None else _facts(stats, t.left))}
    if not exact:
        return None
    per_group = group_stats(small, right_keys, stats, table_keys, groups, list(exact.values()))
    values = {i: (kind, stat) for i, (kind, t, stat) in chosen.items() if t is None or t.name in exact}
    return JoinCover(tuple(keys), per_group, values)


def _facts(stats: pl.DataFrame, name: str) -> ColumnFacts | None:
    """The facts :func:`_product_exact` reads of a float column, from its per-key statistics (every row of the
    source is in one key group): finite, its range and smallest non-zero magnitude."""
    needed = [stat_name(name, s) for s in ("nonfinite", "smallest", "max", "min")]
    if not set(needed) <= set(stats.columns):
        return None
    nonfinite, smallest, high, low = (stats.get_column(c) for c in needed)
    return ColumnFacts(nulls=True, zeros=True, finite=nonfinite.sum() == 0, low=low.min(), high=high.max(),
                       smallest=smallest.min())
