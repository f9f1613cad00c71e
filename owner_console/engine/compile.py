"""The polars compiler: a checked (and accounted) plan -> a polars ``LazyFrame``.

Every frame operation and every expression function is compiled from an
explicit dispatch table keyed by the plan's names; a plan-supplied name is
never used to look up an attribute, and no polars plan is ever deserialized.
The accounting nodes (``acct_*``) are compiled by
:class:`owner_console.engine.accounting.AccountingCompiler`, whose tables
the compiler merges into its own.
"""
from __future__ import annotations

import datetime
from typing import Any, Callable, Mapping

import polars as pl

from bastion_kernel.contract import local, plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .accounting import RESERVED_PREFIX, AccountingCompiler, KeySource, cast_accounting
from .cache import DEFAULT_CACHE, DatasetCache, is_streamed

MAX_REPEAT = 1_000  # largest count repeat_by honours (explode sizes are not pre-checked like joins)


def compile_plan(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None) -> pl.LazyFrame:
    """Build the polars query of a checked (and possibly accounted) plan.

    Schema problems (a type that does not fit, a join on mismatched key types)
    surface here, node by node, as ``SchemaError``; no data is read except the
    cached datasets themselves (and, with facts on, their facts).  The
    dominance bound uses the facts' ranges where they exist: see
    :meth:`PolarsEngine.run` for when that query is run again without them.
    """
    return Compiler(catalog, cache or DEFAULT_CACHE).frame(plan)


def resolve_schema(frame: pl.LazyFrame, op: str) -> pl.Schema:
    """The schema of a lazy query, without running it.

    Raises
    ------
    BastionError
        ``SchemaError`` naming ``op`` when the query's types do not fit.
    """
    try:
        return frame.collect_schema()
    except Exception as exc:  # noqa: BLE001
        # Resolving a schema reads no data, so polars' first line names only columns and types.
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BastionError("SchemaError", f"{op} does not fit the columns' types: {first_line}",
                           op=op, error_class=type(exc).__name__) from None


# ---------------------------------------------------------------- expression tables
# The expression tables are the language's own (bastion_kernel.contract.local also
# runs them on the scientist's fetched results); the executor overrides the
# functions whose failure or size could depend on rows that are never released.
_DTYPES = local.DTYPES
_BINARY = local.BINARY
_UNARY = local.UNARY
_Fn = local.Fn
_FUNCTIONS: dict[str, _Fn] = {
    **local.FUNCTIONS,
    # A negative count would fail only for some rows (an oracle), a huge one
    # would exhaust memory: counts are kept within 0..MAX_REPEAT.
    "repeat_by": lambda e, a, s: e.repeat_by(s(a["by"]).cast(pl.Int64, strict=False).clip(0, MAX_REPEAT)),
    # Conversions always run non-strict (a value that does not convert becomes
    # null): a strict failure would tell the scientist that some row with such
    # a value exists, even in a filtered, never-released result.
    "cast": lambda e, a, s: e.cast(_DTYPES[a["dtype"]], strict=False),
    "str.to_date": lambda e, a, s: e.str.to_date(a["format"], strict=False),
    "str.to_datetime": lambda e, a, s: e.str.to_datetime(a["format"], strict=False),
}


# ---------------------------------------------------------------- compiler
class Compiler(AccountingCompiler):
    """Compiles one plan's frame nodes and expressions to polars, reading datasets through ``cache``."""

    def __init__(self, catalog: Mapping[str, Dataset], cache: DatasetCache, fact_ranges: bool = True):
        self.catalog = catalog
        self.cache = cache
        # The dominance bound may use the facts' ranges (AccountingCompiler._acct_share); the share columns
        # that did, with what identifies them in cache.range_misses.
        self.fact_ranges = fact_ranges
        self.ranged_shares: list[tuple[str, tuple]] = []
        self.scope: pl.LazyFrame | None = None  # the input of the expressions being compiled
        self.tables: dict[str, pl.DataFrame] = {}  # dataset -> the table its latest scan reads
        # id(scan node) -> the table that scan reads (None: two tables for one node), for facts about it.
        self.scan_tables: dict[int, pl.DataFrame | None] = {}
        self.frame_facts_memo: dict[int, dict] = {}  # id(frame node) -> what is known of its columns
        self.schemas: dict[int, pl.Schema] = {}  # id(frame node) -> its compiled schema
        self.compiled: dict[int, pl.LazyFrame] = {}  # id(frame node) -> its query (a join's small side is read)
        # What chooses polars' engine for the query (polars_engine.streams): a large file scanned lazily, a cross
        # join, and the tables read whole (by identity).
        self.streamed_input = False
        self.cross_join = False
        # A head or slice compiled after a join: run without slice pushdown (running.optimizations).
        self.joined = False
        self.sliced_join = False
        self.inputs: dict[int, pl.DataFrame] = {}
        self.agg_node: dict | None = None  # while an aggregation is compiled: the plan node of its input
        self.key_source: KeySource | None = None  # while a group_by is compiled: its per-key statistics
        self.len_column: str | None = None  # while an aggregation is compiled: its groups' length, once asked for
        # Row-id column -> its bit-word columns (see accounting.BITSET_MAX_ROWS).
        self.row_words: dict[str, list[str]] = {}
        self.row_frames: dict[str, pl.LazyFrame] = {}  # row-id column -> the frame its ids number (with its words)
        self.origins_memo: dict[int, dict[str, str]] = {}  # id(frame node) -> column -> row-id column of its value
        # While an aggregation is compiled: extra aggregations, and expressions evaluated on its output.
        self.extra_aggs: list[pl.Expr] | None = None
        self.post_aggs: list[pl.Expr] = []
        self.helper_columns: list[str] = []
        # Functions whose arguments are checked against the input's type while compiling.
        self.probed: dict[str, _Fn] = {"dt.strftime": self._strftime}
        self.ops: dict[str, Callable[[dict], pl.LazyFrame]] = {
            "scan": self._scan, "saved": self._saved, "filter": self._filter, "select": self._select,
            "with_columns": self._with_columns, "group_by": self._group_by, "sort": self._sort,
            "head": self._head, "drop": self._drop, "rename": self._rename, "drop_nulls": self._drop_nulls,
            "fill_null": self._fill_null, "unique": self._unique, "join": self._join,
            "concat": self._concat, "with_row_index": self._with_row_index,
            "slice": self._slice, "explode": self._explode,
            # internal operations, built only by owner_console.policy
            **self.accounting_ops(),
        }
        self.exprs: dict[str, Callable[[dict], pl.Expr]] = {
            "col": lambda n: pl.col(n["name"]),
            "lit": lambda n: pl.lit(n["value"]),
            "len": lambda n: pl.len(),
            "binary": lambda n: _BINARY[n["op"]](self.expr(n["left"]),
                                                 self._exponent(n["right"]) if n["op"] == "pow" else
                                                 self.expr(n["right"])),
            "unary": lambda n: _UNARY[n["op"]](self.expr(n["operand"])),
            "alias": lambda n: self.expr(n["input"]).alias(n["name"]),
            "fn": self._fn,
            "when": self._when,
            **self.accounting_exprs(),
        }

    def frame(self, node: dict) -> pl.LazyFrame:
        result = self.ops[node["op"]](node)
        # Surface type errors at the node that causes them; kept for what the accounting knows of a frame.
        self.schemas[id(node)] = resolve_schema(result, node["op"])
        self.compiled[id(node)] = result
        return result

    def expr(self, node: dict) -> pl.Expr:
        return self.exprs[node["expr"]](node)

    def _exprs(self, nodes: list[dict]) -> list[pl.Expr]:
        return [self.expr(n) for n in nodes]

    def _on(self, frame: pl.LazyFrame) -> "Compiler":
        """Compile the next expressions against ``frame`` (their input), for type-aware choices."""
        self.scope = frame
        return self

    def _dtype(self, expr: pl.Expr, op: str) -> pl.DataType:
        """The dtype ``expr`` has over the current scope (``SchemaError`` naming ``op`` when it does not fit)."""
        return resolve_schema(self.scope.select(expr.alias("value")), op)["value"]

    def _strftime(self, e: pl.Expr, args: dict, sub: Callable[[dict], pl.Expr]) -> pl.Expr:
        # polars checks a format only against a non-null value, so a bad one
        # fails or not depending on which rows exist: try it on a sample
        # value of the column's type instead, before any data is read.
        dtype = self._dtype(e, "dt.strftime")
        try:
            pl.select(pl.lit(_SAMPLE_MOMENT).cast(dtype).dt.strftime(args["format"])).item()
        except Exception as exc:  # noqa: BLE001 - any failure of the probe is the format's
            raise BastionError("SchemaError", f"dt.strftime: the format cannot be applied to {dtype} values "
                                              "(for example %H on a Date)", op="dt.strftime",
                               error_class=type(exc).__name__) from None
        return e.dt.strftime(args["format"])

    def _fn(self, node: dict) -> pl.Expr:
        operand = self.expr(node["input"])
        if node["name"] in _AGGREGATIONS and _is_scalar(node["input"]):
            # polars 1.36 crashes the process (a segfault) aggregating a one-value input (a literal, len(), an
            # aggregate) inside group_by; head(1) keeps that one value and takes polars off the crashing path.
            operand = operand.head(1)
        handler = self.probed.get(node["name"], _FUNCTIONS[node["name"]])
        return handler(operand, node["args"], self._exponent if node["name"] == "pow" else self.expr)

    def _exponent(self, node: dict) -> pl.Expr:
        # polars turns an integer exponent into UInt32 and fails on a negative
        # or huge value, so whether a query fails would depend on the data (an
        # oracle on rows that are never released). Such exponents give null.
        exponent = self.expr(node)
        dtype = self._dtype(exponent, "pow")
        if dtype.is_integer():
            return pl.when((exponent >= 0) & (exponent <= _MAX_EXPONENT)).then(exponent)
        return exponent

    def _when(self, node: dict) -> pl.Expr:
        first, *rest = node["branches"]
        chain: Any = pl.when(self.expr(first["when"])).then(self.expr(first["then"]))
        for branch in rest:
            chain = chain.when(self.expr(branch["when"])).then(self.expr(branch["then"]))
        if node["otherwise"] is not None:
            return chain.otherwise(self.expr(node["otherwise"]))
        return chain

    @staticmethod
    def _user_columns(frame: pl.LazyFrame) -> list[str]:
        # Frame-wide operations (fill_null, drop_nulls and unique without a
        # subset) must never see the accounting columns.
        return [c for c in frame.collect_schema().names() if not c.startswith(RESERVED_PREFIX)]

    # frame operations --------------------------------------------------------
    def _scan(self, node: dict) -> pl.LazyFrame:
        dataset = self.catalog[node["dataset"]]
        if is_streamed(dataset):
            self.streamed_input = True
            return self.cache.lazy(dataset)
        table = self.tables[node["dataset"]] = self.cache.frame(dataset)  # for acct_unique
        self.inputs[id(table)] = table
        seen = self.scan_tables.setdefault(id(node), table)
        if seen is not table:
            self.scan_tables[id(node)] = None
        return table.lazy()

    def _saved(self, node: dict) -> pl.LazyFrame:
        dataset = self.catalog[node["name"]]
        if is_streamed(dataset):
            self.streamed_input = True
            return self.cache.lazy(dataset)
        table = self.cache.frame(dataset)
        self.inputs[id(table)] = table
        return table.lazy()

    def _filter(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.filter(self._on(frame).expr(node["predicate"]))

    def _select(self, node: dict) -> pl.LazyFrame:
        frame, _ = self._with_distances(self.frame(node["input"]), None, node["exprs"])
        self.agg_node = node["input"]
        return self._aggregate(frame, lambda exprs: frame.select(exprs), node["exprs"], "select")

    def _with_columns(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return cast_accounting(frame.with_columns(self._on(frame)._exprs(node["exprs"])), node["exprs"])

    def _group_by(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        self._on(frame)
        frame, keys = self._with_distances(frame, self._exprs(node["keys"]), node["aggs"])
        self.agg_node = node["input"]
        self.key_source = self._key_source(node)
        grouped = self._aggregate(frame, lambda aggs: frame.group_by(keys).agg(aggs), node["aggs"], "group_by")
        # polars leaves the groups' order open: sorted by their keys (nulls first, as the Spark engine does),
        # a row index, head or first over groups gives the same answer on every run and engine.
        return grouped.sort([P.output_name(key) for key in node["keys"]], nulls_last=False, maintain_order=False)

    def _aggregate(self, frame: pl.LazyFrame, apply: Callable[[list[pl.Expr]], pl.LazyFrame],
                   nodes: list[dict], op: str) -> pl.LazyFrame:
        """``apply`` the compiled expressions (a select or a group_by's agg), then finish the accounting.

        Distinct row ids counted in bit words (:meth:`_distinct_ids`) add
        aggregations of their own and are combined after the aggregation:
        elementwise work inside ``agg`` takes polars off its fast path.
        Checks read from per-key statistics (:meth:`_key_source`) are
        joined after the aggregation too, by the group keys.
        """
        self._on(frame)
        self.extra_aggs, self.post_aggs, self.helper_columns = [], [], []
        # The scientist's own len() gives the groups' length to the accounting (AccountingCompiler._group_len).
        self.len_column = next((P.output_name(n) for n in nodes
                                if n["expr"] == "len" or n["expr"] == "alias" and n["input"]["expr"] == "len"), None)
        try:
            # A node computed after the aggregation compiles to None (AccountingCompiler._placeholder): nothing
            # stands for it inside (a literal there takes polars' in-memory engine off its fast path).
            compiled = self._exprs(nodes)
            kept = [expr for expr in compiled if expr is not None]
            result = apply(kept + self.extra_aggs)
            if self.post_aggs:
                # The group keys come first, then one column per node, in the order of the plan.
                names = [c for c in resolve_schema(result, op).names() if c not in self.helper_columns]
                keys = len(names) - len(kept)
                produced = iter(names[keys:])
                order = names[:keys] + [next(produced) if expr is not None else node["name"]
                                        for node, expr in zip(nodes, compiled)]
                if self.key_source is not None and self.key_source.used:
                    result = self.key_source.joined(result)
                result = result.with_columns(self.post_aggs).select(order)
        finally:
            self.extra_aggs, self.key_source, self.agg_node = None, None, None
        return cast_accounting(result, nodes)

    def _sort(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        # Stable: rows that tie keep their order (polars' default leaves ties in any order, run to run).
        return frame.sort(self._on(frame)._exprs(node["by"]), descending=node["descending"],
                          nulls_last=node["nulls_last"], maintain_order=True)

    def _head(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        self.sliced_join = self.sliced_join or self.joined
        return frame.head(node["n"])

    def _slice(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        self.sliced_join = self.sliced_join or self.joined
        return frame.slice(node["offset"], node["length"])

    def _explode(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).explode(node["columns"])

    def _drop(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).drop(node["columns"])

    def _rename(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).rename(node["mapping"])

    def _drop_nulls(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.drop_nulls(node["subset"] if node["subset"] is not None else self._user_columns(frame))

    def _unique(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        # The first row of each set of duplicates, in row order (as the Spark engine): polars' default keeps any
        # one of them, in any order, and the other columns' values would change from run to run.
        return frame.unique(node["subset"] if node["subset"] is not None else self._user_columns(frame),
                            keep="first", maintain_order=True)

    def _fill_null(self, node: dict) -> pl.LazyFrame:
        # Same column choice as polars' LazyFrame.fill_null, limited to the scientist's columns.
        frame = self.frame(node["input"])
        schema = frame.collect_schema()
        user = [c for c in schema.names() if not c.startswith(RESERVED_PREFIX)]
        value_node = node["value"]
        if value_node["expr"] == "lit" and value_node["value"] is not None:
            value = value_node["value"]
            fits = _FILL_NULL_FITS[type(value)]
            columns = [c for c in user if fits(schema[c])]
            if not columns:
                return frame
            return frame.with_columns(pl.col(columns).fill_null(value))
        return frame.with_columns(pl.col(user).fill_null(self._on(frame).expr(value_node)))

    def _join(self, node: dict) -> pl.LazyFrame:
        left, right = self.frame(node["left"]), self.frame(node["right"])
        self.joined = True
        if node["how"] == "cross":
            self.cross_join = True
            return left.join(right, how="cross", suffix=node["suffix"])
        left_on = self._on(left)._exprs(node["left_on"])
        right_on = self._on(right)._exprs(node["right_on"])
        # Rows keep the order of the left side, then the right (what the in-memory engine does by default;
        # the streaming engine needs it said).
        return left.join(right, left_on=left_on, right_on=right_on, how=node["how"], suffix=node["suffix"],
                         maintain_order="left_right")

    def _concat(self, node: dict) -> pl.LazyFrame:
        frames = [self.frame(f) for f in node["inputs"]]
        # Bit words may exist in one input and not another: below a concat, ids are counted by hashing.
        words = {w for names in self.row_words.values() for w in names}
        order = [c for c in frames[0].collect_schema().names() if c not in words]
        return pl.concat([f.select(order) for f in frames], how="vertical")

    def _with_row_index(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).with_row_index(node["name"])



_MAX_EXPONENT = (1 << 32) - 1
# Expression functions that reduce their input to one value per group, and those that keep a one-value input
# one value (so an expression built of them over literals, len() and these aggregates is one value).
_AGGREGATIONS = frozenset(name for name, spec in P.EXPR_FUNCTIONS.items()
                          if spec.kind in ("aggregate", "row_aggregate"))
_ONE_VALUE_AGGREGATIONS = frozenset({"sum", "mean", "median", "min", "max", "std", "var", "quantile", "count",
                                     "len", "n_unique", "null_count", "first", "last"})


def _is_scalar(node: dict) -> bool:
    """True when an expression is one value whatever its input rows: built of literals, ``len()`` and
    one-value aggregations only (so ``head(1)`` of it is itself)."""
    kind = node["expr"]
    if kind in ("lit", "len"):
        return True
    if kind == "fn":
        if node["name"] in _ONE_VALUE_AGGREGATIONS:
            return True  # whatever its input
        spec = P.EXPR_FUNCTIONS.get(node["name"])
        if spec is None or spec.kind != "elementwise" or node["name"] == "over":
            return False
    elif kind not in ("alias", "unary", "binary", "when"):
        return False  # a column, or an accounting expression
    return all(_is_scalar(child) for child in walk.expr_children(node))


_SAMPLE_MOMENT = datetime.datetime(2000, 1, 2, 3, 4, 5)

_INTEGER_DTYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64,
                   pl.Float32, pl.Float64)
# Which columns polars' frame-wide fill_null(value) touches, by the literal's Python type.
_FILL_NULL_FITS: dict[type, Callable[[Any], bool]] = {
    bool: lambda dt: dt == pl.Boolean,
    int: lambda dt: dt in _INTEGER_DTYPES or isinstance(dt, pl.Decimal),
    float: lambda dt: dt in _INTEGER_DTYPES or isinstance(dt, pl.Decimal),
    str: lambda dt: dt == pl.String or isinstance(dt, pl.Categorical),
}
