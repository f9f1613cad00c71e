"""Checked, accounted plans -> PySpark DataFrame calls, with the polars engine's semantics.

:func:`compile_plan` is the Spark engine's compiler: every frame operation of
the plan language and every ``acct_*`` node the policy adds
(:mod:`.accounting`) becomes DataFrame API calls, dispatched from explicit
tables keyed by the plan's own names; expressions are compiled by
:mod:`.expressions`.  No SQL text is ever built.

Types.  The result has the polars engine's columns and dtypes: the polars
compiler is run on the same plan over *empty* tables with the sources'
columns (:class:`.types.PolarsTypes`), which gives the output schema and each
expression's dtype without reading data, and refuses, with the polars
engine's own ``SchemaError``, a plan whose types do not fit.  Spark has no
unsigned integers (polars counts are ``UInt32``): :func:`to_polars` casts
the Arrow result to that schema.

Row order.  Polars keeps a frame's rows in order; Spark does not.  Each
compiled frame carries hidden *order columns* (:class:`Frame`): a scan's are
the source's file, split and row index (:mod:`.sources` reads them), a
``sort`` puts its keys before them, a join orders by the left side's then the
right side's, a concat by input then each input's, a ``group_by`` by its keys.
``head``, ``slice``, ``with_row_index``, ``first``/``last``, lists and the
final result follow them, so two runs give the same rows in the same order.
A row's identity for the accounting (``acct_row_id``) is built from the same
columns, never from ``monotonically_increasing_id`` alone.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import polars as pl
from pyspark.sql import Column, Window
from pyspark.sql import functions as F

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from ...model import Dataset
from ..accounting import RESERVED_PREFIX
from ..compile import _FILL_NULL_FITS
from . import accounting
from .key_stats import cover as key_cover
from .expressions import Scope, column, shape_of, unsupported
from .sources import ORDER_COLUMNS, ROW_BLOCK, ROW_FILE, ROW_INDEX
from .types import PolarsTypes, _user_exprs, polars_schema, spark_type

__all__ = ["compile_plan", "compile_result", "CompiledPlan", "to_polars", "is_changed_error", "HIDDEN_PREFIX"]

# Hidden columns of the compiled frames (order columns, windows computed first...): never in a result.
HIDDEN_PREFIX = f"{RESERVED_PREFIX}_spark"
# The order columns of a result fetched unsorted (CompiledPlan.fetch).
SORT_PREFIX = f"{HIDDEN_PREFIX}_sort"
# The session settings the compiled plans assume: polars' arithmetic and casts (no error on overflow, a bad
# cast or a division by zero), and timestamps read as UTC.
SESSION_CONF = {"spark.sql.ansi.enabled": "false"}


@dataclass
class Order:
    """One column of a frame's row order."""

    name: str
    descending: bool = False
    nulls_last: bool = False

    def column(self) -> Column:
        c = column(self.name)
        if self.descending:
            return c.desc_nulls_last() if self.nulls_last else c.desc_nulls_first()
        return c.asc_nulls_last() if self.nulls_last else c.asc_nulls_first()


@dataclass
class RowSource:
    """Where a frame's rows come from when each is a distinct row of one scan: the scan's frame and the hidden
    columns naming the row (file, split, index), for row ids (:func:`.accounting.row_ids`)."""

    df: Any
    file: str
    block: str
    row: str


@dataclass
class Frame:
    """A compiled frame: the DataFrame, its visible columns in order, its row order and row source."""

    df: Any
    columns: list[str]
    order: list[Order] = field(default_factory=list)
    rows: RowSource | None = None
    # Columns no two rows share a value of (a group_by's keys): a join on them repeats no row of the other side.
    unique: tuple[str, ...] | None = None
    # Row-id column -> hidden bit words of its ids (a small source's rows as bits: :func:`.accounting.row_words`).
    words: dict[str, list[str]] = field(default_factory=dict)

    def sort_columns(self) -> list[Column]:
        return [o.column() for o in self.order]

    def hidden(self) -> list[str]:
        names = [o.name for o in self.order]
        if self.rows is not None:
            names += [self.rows.file, self.rows.block, self.rows.row]
        names += [word for words in self.words.values() for word in words]
        return list(dict.fromkeys(names))

    def project(self, values: list[Column]) -> Any:
        """A select of ``values`` that keeps the hidden columns the frame's order and row source need."""
        return self.df.select(*values, *[column(h) for h in self.hidden()])


@dataclass(frozen=True)
class CompiledPlan:
    """A compiled plan: the DataFrame to run, the polars schema of its result, and the datasets whose join
    keys the run checks are still unique (a run that finds one repeated fails: :func:`is_changed_error`)."""

    frame: Any
    schema: pl.Schema
    changed_datasets: tuple[str, ...] = ()
    # For the engine's run: the result unsorted, with its order columns (SORT_PREFIX0, 1, ...) after the
    # result's, and each one's (descending, nulls_last); sorted on the executor's side by :func:`fetched_to_polars`,
    # which spares Spark a stage.  None when the result has no order or an order column polars may sort otherwise.
    fetch: Any = None
    fetch_order: tuple[tuple[bool, bool], ...] = ()


def compile_plan(plan: dict, catalog: Mapping[str, Dataset], session: Any,
                 read: Callable[[Dataset], Any]) -> Any:
    """The DataFrame computing a checked, accounted plan on Spark.

    Parameters
    ----------
    plan : dict
        ``policy.account(checked).plan``: the scientist's operations and the
        policy's ``acct_*`` nodes.
    catalog : Mapping[str, Dataset]
        The datasets (and saved results) the plan reads, by name.
    session : SparkSession
        Classic or Spark Connect; ANSI mode is turned off on it if it is on
        (:data:`SESSION_CONF`).
    read : callable
        ``read(dataset)`` -> the dataset's DataFrame: its columns, then the
        three row-order columns of :mod:`.sources` (file, split offset, row
        index).  Called once per ``scan`` and ``saved`` node.

    Returns
    -------
    pyspark.sql.DataFrame
        Exactly the polars engine's output columns, in its order, rows in a
        defined order; types as close as Spark has (see :func:`compile_result`).

    Raises
    ------
    BastionError
        ``SchemaError`` (the polars engine's) when the plan's types do not
        fit; ``UnsupportedOperation`` naming a function or operation the Spark
        engine does not run faithfully.
    """
    return compile_result(plan, catalog, session, read).frame


def compile_result(plan: dict, catalog: Mapping[str, Dataset], session: Any,
                   read: Callable[[Dataset], Any],
                   row_count: Callable[[Dataset], int | None] | None = None,
                   key_stats: Callable[[Dataset, tuple[str, ...], Mapping[str, pl.DataType],
                                        Mapping[str, pl.DataType]], pl.DataFrame | None] | None = None
                   ) -> CompiledPlan:
    """:func:`compile_plan`, with the result's polars schema (for :func:`to_polars` and ``output_schema``).

    ``row_count(dataset)``, when given, is the number of rows the dataset's
    source holds as the caller knows it without a Spark job (a Parquet
    footer), or None: the rows of a source with at most
    :data:`..accounting.BITSET_MAX_ROWS` rows are counted per group as bits
    (:func:`.accounting.row_words`), as the polars engine counts them.  A
    run that finds more rows than that fails as "changed".

    ``key_stats(dataset, keys, {column: dtype}, {held column: dtype})``, when
    given, is the dataset's per-key statistics of those columns for its current data
    version (:func:`.key_stats.measure`), or None: a group-by of a whole
    source then reads its checks from them (:func:`.key_stats.cover`).
    """
    _apply_session_conf(session)
    # Every source the plan reads (json_objects: the walker's tables do not name the accounting nodes).
    names = sorted({walk.source_name(node) for node in walk.json_objects(plan)
                    if node.get("op") in ("scan", "saved")} - {None})
    ordered = ordered_sources(plan)
    reader = _reader(read)
    first_reads = {name: reader(catalog[name], any(ordered.get(id(n), True) for n in walk.json_objects(plan)
                                                   if n.get("op") in ("scan", "saved") and walk.source_name(n) == name))
                   for name in names}
    schemas = {name: polars_schema(frame.schema, skip=ORDER_COLUMNS) for name, frame in first_reads.items()}
    types = PolarsTypes(catalog, schemas)
    schema = types.schema(plan)
    compiler = SparkCompiler(catalog, reader, types, first_reads, ordered)
    compiler.row_count = row_count
    compiler.key_stats = key_stats
    compiler.session = session
    compiler.row_id_uses = Counter(node.get("name") for node in walk.json_objects(plan)
                                   if node.get("op") == "acct_row_id")
    frame = compiler.frame(plan)
    # The polars engine's result may carry helper columns of its own (bit words of row ids): not results.
    schema = pl.Schema([(name, dtype) for name, dtype in schema.items()
                        if name in frame.columns or not name.startswith(RESERVED_PREFIX)])
    if list(frame.columns) != list(schema.names()):
        raise BastionError("ExecutionError", "the Spark engine compiled columns other than the polars engine's "
                                             "for this plan (an internal error; the owner's log has the plan)",
                           engine="spark")
    # The result is fetched whole into the executor: sorted in one partition, which spares the job that a
    # global sort runs first to sample its range bounds.
    df = frame.df.repartition(1).sortWithinPartitions(*frame.sort_columns()) if frame.order else frame.df
    values = [column(name).cast(spark_type(dtype, f"column {name!r}")).alias(name) for name, dtype in schema.items()]
    result = df.select(*values)
    fetch, fetch_order = None, ()
    if frame.order and _sorts_alike(frame):
        fetch = frame.df.select(*values, *[column(o.name).alias(f"{SORT_PREFIX}{i}") for i, o in enumerate(frame.order)])
        fetch_order = tuple((o.descending, o.nulls_last) for o in frame.order)
    return CompiledPlan(result, schema, tuple(sorted(compiler.checked_datasets)), fetch, fetch_order)


def fetched_to_polars(table: Any, compiled: CompiledPlan) -> pl.DataFrame:
    """The Arrow table of ``compiled.fetch`` as :func:`to_polars` gives ``compiled.frame``'s: sorted by its order
    columns, which are then dropped."""
    frame = pl.from_arrow(table, rechunk=False)
    keys = [f"{SORT_PREFIX}{i}" for i in range(len(compiled.fetch_order))]
    if keys:
        frame = frame.sort(keys, descending=[d for d, _ in compiled.fetch_order],
                           nulls_last=[n for _, n in compiled.fetch_order], maintain_order=True).drop(keys)
    return _cast_to(frame, compiled.schema)


def _sorts_alike(frame: Frame) -> bool:
    """True when polars orders every order column's values as Spark does: whole numbers, strings (both by
    their bytes), booleans, dates and timestamps.  Floats are left to Spark (NaN and -0.0 ties)."""
    from pyspark.sql import types as T

    fields = {f.name: f.dataType for f in frame.df.schema.fields}
    alike = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.StringType, T.BooleanType, T.DateType,
             T.TimestampType, T.TimestampNTZType)
    return all(isinstance(fields.get(o.name), alike)
               and getattr(fields[o.name], "collation", "UTF8_BINARY") == "UTF8_BINARY" for o in frame.order)


def to_polars(table: Any, schema: pl.Schema) -> pl.DataFrame:
    """A result's Arrow table (``toArrow``) as the polars DataFrame the polars engine would give.

    Columns whose Arrow type is not the polars dtype (Spark has no unsigned
    integers or durations) are cast; the others are taken as they are (no copy).
    """
    frame = pl.from_arrow(table, rechunk=False)
    if not isinstance(frame, pl.DataFrame):  # pragma: no cover - from_arrow of a table is a frame
        frame = frame.to_frame()
    return _cast_to(frame, schema)


def _cast_to(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    casts = {name: dtype for name, dtype in schema.items() if frame.schema.get(name) != dtype}
    return frame.cast(casts, strict=False) if casts else frame


def is_changed_error(exc: BaseException) -> bool:
    """True when a run failed because a dataset changed under it (a join key the policy relied on is repeated,
    :func:`.accounting.unique_rows`): the caller raises the polars engine's "changed" error, naming
    :attr:`CompiledPlan.changed_datasets`."""
    return accounting.is_changed_error(exc)


def _apply_session_conf(session: Any) -> None:
    for key, value in SESSION_CONF.items():
        try:
            current = session.conf.get(key)
        except Exception:  # noqa: BLE001 - a setting the session has no value for
            current = None
        if str(current).lower() != value:
            session.conf.set(key, value)


# ---------------------------------------------------------------- the compiler
class SparkCompiler(accounting.AccountingOps):
    """Compiles one plan's frame nodes to :class:`Frame` objects (expressions through :class:`.expressions.Scope`)."""

    def __init__(self, catalog: Mapping[str, Dataset], read: Callable[[Dataset, bool], Any], types: PolarsTypes,
                 first_reads: Mapping[str, Any] | None = None, ordered: Mapping[int, bool] | None = None):
        self.catalog = catalog
        self.read = read
        self.ordered = ordered or {}  # id(scan node) -> whether anything reads its rows' order
        self.types = types
        self.unread = dict(first_reads or {})  # a first read of each source, used by its first scan
        self.serial = 0
        self.checked_datasets: set[str] = set()
        self.row_count: Callable[[Dataset], int | None] | None = None
        self.key_stats: Callable[..., pl.DataFrame | None] | None = None
        self.session: Any = None
        self.row_id_uses: Counter = Counter()  # acct_row_id name -> nodes making it
        self.ops: dict[str, Callable[[dict], Frame]] = {
            "scan": self._scan, "saved": self._scan, "filter": self._filter, "select": self._select,
            "with_columns": self._with_columns, "group_by": self._group_by, "sort": self._sort,
            "head": self._head, "slice": self._slice, "explode": self._explode, "drop": self._drop,
            "rename": self._rename, "drop_nulls": self._drop_nulls, "fill_null": self._fill_null,
            "unique": self._unique, "join": self._join, "concat": self._concat,
            "with_row_index": self._with_row_index,
            **self.accounting_ops(),
        }

    def hidden(self, label: str) -> str:
        """A fresh hidden column name (reserved prefix: no plan column can have it)."""
        self.serial += 1
        return f"{HIDDEN_PREFIX}{self.serial}_{label}"

    def frame(self, node: dict) -> Frame:
        handler = self.ops.get(node["op"])
        if handler is None:
            raise BastionError("UnsupportedOperation", f"the operation {node['op']!r} is not supported on the "
                                                       "Spark engine", op=node["op"], engine="spark")
        return handler(node)

    def scope(self, frame: Frame, node: dict, exprs: list[dict], partition: list[Column] | None = None,
              aggregation: bool = False) -> Scope:
        """A scope compiling ``exprs`` over ``frame`` (the output of ``node``)."""
        found = Scope(self, frame, node, exprs, partition)
        found.aggregation = aggregation
        return found

    def row_value(self, scope: Scope, node: dict) -> Column:
        """A plan or accounting expression as one value per row (aggregates as windows)."""
        if node["expr"].startswith("acct_"):
            return accounting.account_expr(scope, node, scope.window())
        return scope.row_value(node)

    def agg_value(self, scope: Scope, node: dict) -> Column:
        """A plan or accounting expression as one value per group."""
        if node["expr"].startswith("acct_"):
            return accounting.account_expr(scope, node, None)
        return scope.agg_value(node)

    # -- sources -------------------------------------------------------------
    def _scan(self, node: dict) -> Frame:
        name = walk.source_name(node)
        ordered = self.ordered.get(id(node), True)
        df = self.unread.pop(name, None)
        if df is None:
            df = self.read(self.catalog[name], ordered)
        visible = [c for c in df.columns if c not in ORDER_COLUMNS]
        missing = [c for c in ORDER_COLUMNS if c not in df.columns]
        if missing and not ordered:
            # Nothing reads this scan's row order: its rows are only counted and aggregated.
            return Frame(df.select(*[column(c) for c in visible]), visible)
        if missing:
            raise BastionError("ExecutionError", f"dataset {name!r} was read without its row order "
                                                 f"({', '.join(missing)})", engine="spark")
        file, block, row = self.hidden("file"), self.hidden("block"), self.hidden("row")
        df = df.select(*[column(c) for c in visible], column(ROW_FILE).alias(file),
                       column(ROW_BLOCK).alias(block), column(ROW_INDEX).alias(row))
        return Frame(df, visible, [Order(file), Order(block), Order(row)], RowSource(df, file, block, row))

    # -- row-keeping operations ------------------------------------------------------
    def _filter(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        scope = self.scope(frame, node["input"], [node["predicate"]])
        keep = self.hidden("keep")
        predicate = scope.row_value(node["predicate"])  # first: it may add columns to frame.df
        frame.df = frame.df.withColumn(keep, predicate)
        frame.df = frame.df.filter(column(keep)).drop(keep)
        scope.drop_added()
        return frame

    def _with_columns(self, node: dict) -> Frame:
        return self._add_columns(self.frame(node["input"]), node["input"], node["exprs"])

    def _add_columns(self, frame: Frame, input_node: dict, exprs: list[dict]) -> Frame:
        scope = self.scope(frame, input_node, exprs)
        values = {expr_name(e): self.row_value(scope, e) for e in exprs}
        frame.df = frame.df.withColumns(values)
        scope.drop_added()
        frame.columns = frame.columns + [n for n in values if n not in frame.columns]
        if frame.unique is not None and set(frame.unique) & set(values):
            frame.unique = None
        return frame

    def _select(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        exprs = node["exprs"]
        row_level = any(not e["expr"].startswith("acct_") and shape_of(e) == "row" for e in exprs) or \
            any(e["expr"] == "acct_col" for e in exprs)
        scope = self.scope(frame, node["input"], exprs, aggregation=True)
        names = [expr_name(e) for e in exprs]
        if row_level:
            values = [self.row_value(scope, e).alias(n) for e, n in zip(exprs, names)]
            kept = {rid: words for rid, words in frame.words.items() if rid in names}
            return Frame(frame.project(values), names, frame.order, frame.rows, words=kept)
        for expr in exprs:
            if not expr["expr"].startswith("acct_") and _bare_mode(expr):
                raise unsupported("mode", "outside group_by().agg() polars answers mode() with one row per most "
                                          "frequent value; use it in an aggregation by group")
        values = [self.agg_value(scope, e).alias(n) for e, n in zip(exprs, names)]
        return Frame(frame.df.agg(*values), names)

    def _group_by(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        scope = self.scope(frame, node["input"], node["keys"] + node["aggs"], aggregation=True)
        key_names = [P.output_name(k) for k in node["keys"]]
        keys = []
        computed = {}
        for key in node["keys"]:
            if key["expr"] == "col":  # a plain column: grouped by as it is
                keys.append(key["name"])
                continue
            name = self.hidden("key")
            computed[name] = scope.row_value(key)  # first: it may add columns to frame.df
            keys.append(name)
        if computed:
            frame.df = frame.df.withColumns(computed)
        scope.partition = [column(k) for k in keys]
        agg_names = [expr_name(a) for a in node["aggs"]]
        slots = [self.hidden("agg") for _ in node["aggs"]]
        # Checks of a whole source's plain columns read from its per-key statistics, after the aggregation.
        cover = key_cover(self, node) if not computed else None
        values = [self.agg_value(scope, a).alias(s) for i, (a, s) in enumerate(zip(node["aggs"], slots))
                  if cover is None or i not in cover.values]
        if cover is not None:
            cover.count = self.hidden("rows")
            values.append(F.count(F.lit(1)).alias(cover.count))
        if not values:
            values = [F.count(F.lit(1)).alias(self.hidden("rows"))]
        grouped = frame.df.groupBy(*[column(k) for k in keys]).agg(*values)
        if cover is not None:
            grouped = cover.joined(self, grouped, node, slots)
        order = [self.hidden("order") for _ in keys]
        df = grouped.select(*[column(k).alias(n) for k, n in zip(keys, key_names)],
                            *[column(s).alias(n) for s, n in zip(slots, agg_names)],
                            *[column(k).alias(o) for k, o in zip(keys, order)])
        # polars leaves the groups' order open; here they come sorted by their keys.
        return Frame(df, key_names + agg_names, [Order(o) for o in order], unique=tuple(key_names))

    def _sort(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        scope = self.scope(frame, node["input"], node["by"])
        keys = []
        for expr, descending in zip(node["by"], node["descending"]):
            name = self.hidden("sort")
            value = scope.row_value(expr)  # first: it may add columns to frame.df
            frame.df = frame.df.withColumn(name, value)
            keys.append(Order(name, descending, node["nulls_last"]))
        frame.order = keys + frame.order
        return frame

    def _head(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        ordered = frame.df.orderBy(*frame.sort_columns()) if frame.order else frame.df
        frame.df = ordered.limit(node["n"])
        return frame

    def _slice(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        offset, length = node["offset"], node["length"]
        place, total = self.hidden("place"), self.hidden("total")
        ordered = Window.orderBy(*(frame.sort_columns() or [F.lit(0)]))
        df = frame.df.withColumn(place, F.row_number().over(ordered) - 1)
        df = df.withColumn(total, F.count(F.lit(1)).over(Window.partitionBy()))
        # polars: a negative offset counts from the end; the window is then clipped to the frame.
        start = F.lit(offset) if offset >= 0 else column(total) + F.lit(offset)
        keep = column(place) >= start
        if length is not None:
            keep = keep & (column(place) < start + F.lit(length))
        frame.df = df.filter(keep).drop(place, total)
        return frame

    def _explode(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        target = node["columns"][0]
        position = self.hidden("item")
        others = [column(c) for c in frame.columns if c != target] + [column(h) for h in frame.hidden()]
        exploded = frame.df.select(*others, F.posexplode_outer(column(target)).alias(position, target))
        frame.df = exploded.select(*[column(c) for c in frame.columns], *[column(h) for h in frame.hidden()],
                                   column(position))
        frame.order = frame.order + [Order(position)]
        frame.rows = frame.unique = None  # a row may now be several rows
        return frame

    def _drop(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        frame.df = frame.df.drop(*node["columns"])
        frame.columns = [c for c in frame.columns if c not in node["columns"]]
        frame.unique = None
        return frame

    def _rename(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        mapping = node["mapping"]
        names = [mapping.get(c, c) for c in frame.columns]
        frame.df = frame.project([column(c).alias(n) for c, n in zip(frame.columns, names)])
        frame.columns = names
        frame.unique = None
        return frame

    def _drop_nulls(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        subset = node["subset"] if node["subset"] is not None else _user_columns(frame.columns)
        if subset:
            keep = column(subset[0]).isNotNull()
            for name in subset[1:]:
                keep = keep & column(name).isNotNull()
            frame.df = frame.df.filter(keep)
        return frame

    def _fill_null(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        before = self.types.schema(node["input"])
        after = self.types.schema(node)
        user = _user_columns(frame.columns)
        value_node = node["value"]
        if value_node["expr"] == "lit":
            if value_node["value"] is None:
                return frame
            fits = _FILL_NULL_FITS[type(value_node["value"])]
            user = [c for c in user if fits(before[c])]
            if not user:
                return frame
            fill = F.lit(value_node["value"])
            scope = None
        else:
            scope = self.scope(frame, node["input"], [value_node])
            fill = scope.row_value(value_node)
        values = {c: F.coalesce(column(c).cast(spark_type(after[c])), fill.cast(spark_type(after[c])))
                  for c in user}
        frame.df = frame.df.withColumns(values)
        if scope is not None:
            scope.drop_added()
        frame.unique = None  # filled values may repeat a key
        return frame

    def _unique(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        subset = node["subset"] if node["subset"] is not None else _user_columns(frame.columns)
        first = self.hidden("first")
        # polars keeps any one row of each set of duplicates; here the first in row order.
        window = Window.partitionBy(*[column(c) for c in subset]).orderBy(*(frame.sort_columns() or [F.lit(0)]))
        frame.df = frame.df.withColumn(first, F.row_number().over(window)).filter(column(first) == 1).drop(first)
        return frame

    def _with_row_index(self, node: dict) -> Frame:
        frame = self.frame(node["input"])
        index = F.row_number().over(Window.orderBy(*(frame.sort_columns() or [F.lit(0)]))) - 1
        frame.df = frame.project([index.alias(node["name"]), *[column(c) for c in frame.columns]])
        frame.columns = [node["name"], *frame.columns]
        return frame

    # -- combining frames ------------------------------------------------------
    def _join(self, node: dict) -> Frame:
        left, right = self.frame(node["left"]), self.frame(node["right"])
        how = node["how"]
        renamed = {c: self.hidden("right") for c in right.columns}
        right_df = right.df.select(*[column(c).alias(renamed[c]) for c in right.columns],
                                   *[column(h) for h in right.hidden()])
        left_df = left.df
        marker = None
        if how == "full":
            marker = self.hidden("left")
            left_df = left_df.withColumn(marker, F.lit(1))
        if how == "cross":
            joined = left_df.crossJoin(right_df)
        else:
            condition = None
            for lk, rk in zip(node["left_on"], node["right_on"]):
                pair = column(lk["name"]) == column(renamed[rk["name"]])
                condition = pair if condition is None else condition & pair
            joined = left_df.join(right_df, condition, _JOIN_HOWS[how])
        if how in ("semi", "anti"):
            return Frame(joined, list(left.columns), left.order, left.rows, words=dict(left.words))
        merged = {k["name"] for k in node["right_on"]} if how in ("inner", "left") else set()
        values = [column(c) for c in left.columns]
        names = list(left.columns)
        for c in right.columns:
            if c in merged:
                continue
            name = c + node["suffix"] if c in left.columns else c
            values.append(column(renamed[c]).alias(name))
            names.append(name)
        order = ([Order(marker, nulls_last=True)] if marker else []) + left.order + right.order
        # Each left row meets at most one right row when the right side is unique on its keys: the left rows
        # are still distinct rows of their source (the policy's semi join is such a join).
        keys = {k["name"] for k in node["right_on"]}
        rows = left.rows if how in ("inner", "left") and right.unique is not None and set(right.unique) <= keys \
            else None
        # A row-id column on both sides (its right one renamed by the suffix) has no words it alone owns.
        words = {rid: w for rid, w in {**left.words, **right.words}.items()
                 if rid in names and not (rid in left.columns and rid in right.columns)}
        frame = Frame(joined, names, order, rows, words=words)
        frame.df = frame.project(values)
        return frame

    def _concat(self, node: dict) -> Frame:
        frames = [self.frame(f) for f in node["inputs"]]
        if len(frames) == 1:
            return frames[0]
        names = frames[0].columns
        part = self.hidden("part")
        order = [Order(part)]
        pieces = []
        for index, frame in enumerate(frames):
            moved = []
            for o in frame.order:
                moved_name = self.hidden("order")
                moved.append((o.name, moved_name))
                order.append(Order(moved_name, o.descending, o.nulls_last))
            pieces.append(frame.df.select(*[column(c) for c in names], F.lit(index).alias(part),
                                          *[column(old).alias(new) for old, new in moved]))
        united = pieces[0]
        for piece in pieces[1:]:
            united = united.unionByName(piece, allowMissingColumns=True)
        return Frame(united, list(names), order)


_JOIN_HOWS = {"inner": "inner", "left": "left", "full": "full", "semi": "left_semi", "anti": "left_anti"}


def _reader(read: Callable[..., Any]) -> Callable[[Dataset, bool], Any]:
    """``read`` as ``(dataset, ordered)``: a reader that takes ``ordered`` is told when a scan's row order is not
    needed (it may then leave out the row-order columns, whose file metadata costs about a fifth of a scan)."""
    try:
        takes_ordered = "ordered" in inspect.signature(read).parameters
    except (TypeError, ValueError):  # a callable without a signature
        takes_ordered = False
    if takes_ordered:
        return lambda dataset, ordered: read(dataset, ordered=ordered)
    return lambda dataset, ordered: read(dataset)


# Functions whose value depends on the order of a group's rows (lists keep it, first/last pick by it, sort_by
# breaks ties by it).
_ORDERED_FUNCTIONS = frozenset({"first", "last", "implode", "head", "tail", "sort_by", "unique"})
# Frame operations whose result depends on their input's row order.
_ORDER_READERS = frozenset({"head", "slice", "with_row_index", "acct_row_id", "unique"})
# Frame operations whose output row order is their input's (or their inputs').
_ORDER_KEEPERS = frozenset({"explode", "drop", "rename", "drop_nulls", "acct_person_id", "acct_unique", "join",
                            "concat", "sort"})


def ordered_sources(plan: dict) -> dict[int, bool]:
    """For each ``scan`` and ``saved`` node (by id), whether anything reads the order of its rows.

    The result's own row order always counts, except where a ``group_by`` or
    an aggregating ``select`` replaces it (their groups come in key order);
    below those, only functions that read a group's row order
    (:data:`_ORDERED_FUNCTIONS`, lists) and order-reading operations
    (:data:`_ORDER_READERS`) do.  A source nothing reads the order of is read
    without its row-order columns.
    """
    found: dict[int, bool] = {}
    stack: list[tuple[dict, bool]] = [(plan, True)]
    while stack:
        node, needed = stack.pop()
        op = node["op"]
        if op in ("scan", "saved"):
            found[id(node)] = found.get(id(node), False) or needed
            continue
        if op == "group_by":
            inner = _reads_order(node["keys"], False) or _reads_order(node["aggs"], True)
        elif op == "select":
            row_level = any(not e["expr"].startswith("acct_") and shape_of(e) == "row" or e["expr"] == "acct_col"
                            for e in node["exprs"])
            inner = (needed and row_level) or _reads_order(node["exprs"], not row_level)
        elif op in _ORDER_READERS:
            inner = True
        elif op in _ORDER_KEEPERS:
            inner = needed
        else:  # filter, with_columns, fill_null, acct_columns: rows keep their order
            exprs = [node[f] for f in ("predicate", "value") if isinstance(node.get(f), dict)] + node.get("exprs", [])
            inner = needed or _reads_order(exprs, False)
        children = [node[f] for f in ("input", "left", "right") if isinstance(node.get(f), dict)]
        children += node.get("inputs", [])
        stack.extend((child, inner) for child in children)
    return found


def _reads_order(exprs: list[dict], aggregation: bool) -> bool:
    """True when an expression's value depends on its input rows' order (``aggregation``: an unreduced
    expression is the group's list, in row order)."""
    for expr in exprs:
        if aggregation and not expr["expr"].startswith("acct_") and shape_of(expr) == "row":
            return True
        for node in _user_exprs([expr]):
            if node["expr"] == "fn" and node["name"] in _ORDERED_FUNCTIONS:
                return True
    return False


def expr_name(expr: dict) -> str:
    """The column an expression of a frame node makes (accounting expressions name theirs)."""
    kind = expr["expr"]
    if kind == "acct_unmatched":
        return expr["column"]
    if kind.startswith("acct_"):
        return expr["name"]
    return P.output_name(expr)


def _bare_mode(expr: dict) -> bool:
    """True when ``mode()`` gives an expression's values unreduced (not inside another aggregation)."""
    kind = expr["expr"]
    if kind == "fn":
        if expr["name"] == "mode":
            return True
        if P.EXPR_FUNCTIONS[expr["name"]].kind in ("aggregate", "row_aggregate"):
            return False
    return any(_bare_mode(child) for child in walk.expr_children(expr))


def _user_columns(columns: list[str]) -> list[str]:
    """The scientist's columns (frame-wide operations never see the accounting columns)."""
    return [c for c in columns if not c.startswith(RESERVED_PREFIX)]
