"""The polars compilers of the accounting nodes (``acct_*``) that :mod:`owner_console.policy` adds to a plan.

The policy rewrites a checked plan so that, next to the scientist's columns,
the query computes per-source counts (row ids, contribution counts, the
dominance and finiteness flags :mod:`owner_console.decide` reads).  Those
nodes are only reachable from a plan the policy built: the validator
refuses any name outside the public tables.  :class:`AccountingCompiler` is
the part of the polars compiler (:class:`owner_console.engine.compile.Compiler`)
that compiles them; the compiler dispatches to it through
:meth:`AccountingCompiler.accounting_ops` and
:meth:`AccountingCompiler.accounting_exprs`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import polars as pl

from bastion_kernel.contract import plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .cache import DatasetCache
from .facts import FLOAT_MAX, KEY_LEN, UNKNOWN, ColumnFacts, key_dtype_fits, nonzero_mask, share_parts, stat_name
from .join_stats import MAX_SMALL_ROWS, SMALL_ROWS, Term, group_stats, small_side_columns

# Accounting columns' names start with this; frame-wide operations never touch them.
RESERVED_PREFIX = "__bastion"
# Row ids given to at most this many source rows are also written as bit words (id i: bit i % 64 of word
# i // 64), so that distinct ids per group are counted by OR-ing words instead of hashing ids (n_unique):
# see AccountingCompiler._acct_row_id and AccountingCompiler._distinct_ids.
BITSET_MAX_ROWS = 256
_BITS = pl.Series("bits", [1 << i for i in range(64)], dtype=pl.UInt64)
# Frame operations that never add rows (the row-count bound of AccountingCompiler._row_bound passes through them).
_ROW_KEEPING_OPS = frozenset({"filter", "sort", "head", "slice", "drop_nulls", "unique", "drop", "rename",
                              "with_columns", "fill_null", "acct_unique"})
ACCOUNT_DTYPE = pl.Int64  # every accounting column has this dtype, so frames line up in concat
# The value of an acct_share column for a group the cheap bound could not clear (policy.DOMINANCE_UNSURE).
UNSURE = 2


def _account_distinct(node: dict) -> pl.Expr:
    """Distinct source rows in a group, from a row-id column (null: not fed, 0: unmatched join side)."""
    c = pl.col(node["column"])
    count = c.filter(c > 0).n_unique() if node["taintable"] or node["nullable"] else c.n_unique()
    return _guarded(node, c, count)


def _account_sum(node: dict) -> pl.Expr:
    """Source rows in a group, from per-row counts; ``exact`` is False when rows may share source rows."""
    c = pl.col(node["column"])
    total = c.sum() if node["exact"] else pl.lit(1, dtype=ACCOUNT_DTYPE)
    return _guarded(node, c, total)


def _guarded(node: dict, c: pl.Expr, count: pl.Expr) -> pl.Expr:
    # Order matters: an empty group is fed by 0 rows; a group with an unmatched
    # join row is marked 0 (fails the rule); a group with no row from this
    # source is null (not fed by it).
    if not (node["taintable"] or node["nullable"] or node["global"]):
        return count.alias(node["name"])
    expr = pl.when(pl.len() == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    if node["nullable"]:
        expr = expr.when(c.is_null().all()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
    if node["taintable"]:
        expr = expr.when((c == 0).any()).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    return expr.otherwise(count).alias(node["name"])


def _account_one_row(node: dict) -> pl.Expr:
    """Each row now holds individual values: it counts as fed by one source row."""
    c = pl.col(node["column"])
    return (pl.when(c.is_null()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
            .when(c == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.lit(1, dtype=ACCOUNT_DTYPE)).alias(node["name"]))


def _account_unmatched(node: dict) -> pl.Expr:
    """After an outer join: 0 where the row had no partner on this source's side."""
    side = [pl.col(c).is_null() for c in node["side"]]
    return (pl.when(pl.all_horizontal(side)).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.col(node["column"])).alias(node["column"]))


# Accounting expressions that yield polars' own count dtype (UInt32, or Float64
# for a share): the compiler casts their columns to ACCOUNT_DTYPE in a
# with_columns after the operation, because a cast inside ``agg`` takes
# polars off its fast group-by path (3.4x slower, benchmarks/RESULTS.md).
_UNCAST_ACCOUNTING = frozenset({"acct_len", "acct_distinct", "acct_sum", "acct_contrib", "acct_share",
                                "acct_held"})


def cast_accounting(frame: pl.LazyFrame, exprs: list[dict]) -> pl.LazyFrame:
    """``frame`` with the columns of the accounting expressions among ``exprs`` cast to :data:`ACCOUNT_DTYPE`."""
    names = [e["name"] for e in exprs if e["expr"] in _UNCAST_ACCOUNTING]
    return frame.with_columns(pl.col(names).cast(ACCOUNT_DTYPE)) if names else frame


_ACCOUNT_EXPRS: dict[str, Callable[[dict], pl.Expr]] = {
    "acct_col": lambda n: pl.col(n["name"]),
    "acct_const": lambda n: pl.lit(n["value"], dtype=ACCOUNT_DTYPE).alias(n["name"]),
    "acct_len": lambda n: pl.len().alias(n["name"]),
    "acct_distinct": _account_distinct,
    "acct_sum": _account_sum,
    "acct_one_row": _account_one_row,
    "acct_unmatched": _account_unmatched,
}


# Frame operations whose output rows are input rows, each value unchanged (some rows dropped or reordered).
_ROW_SUBSET_OPS = frozenset({"filter", "sort", "head", "slice", "drop_nulls", "unique", "acct_unique"})
# Frame operations that keep every row and add, replace, drop or rename columns.
_COLUMN_OPS = frozenset({"drop", "rename", "with_columns", "acct_columns", "with_row_index", "acct_row_id",
                         "acct_person_id"})
# Functions that count values: every non-null value contributes to them.
_COUNTING = ("count", "n_unique", "null_count")


def _carried(node: dict, columns: Mapping[str, object]) -> dict[str, object]:
    """``columns`` (frame column -> anything known of its values) after ``node``, a row-subset or column op.

    A column an expression assigns is dropped (its values may have
    changed); when an assigned name cannot be told, every column is.
    """
    kind = node["op"]
    if kind == "drop":
        return {c: v for c, v in columns.items() if c not in node["columns"]}
    if kind == "rename":
        return {node["mapping"].get(c, c): v for c, v in columns.items()}
    if kind in ("with_columns", "acct_columns"):
        assigned = set()
        for expr in node["exprs"]:
            name = (expr["column"] if expr["expr"] == "acct_unmatched" else expr.get("name")) \
                if expr["expr"].startswith("acct_") else P.output_name(expr)
            if name is None:
                return {}
            assigned.add(name)
        return {c: v for c, v in columns.items() if c not in assigned}
    if kind in ("with_row_index", "acct_row_id", "acct_person_id"):
        return {c: v for c, v in columns.items() if c != node["name"]}
    return dict(columns)


def _plain_column(expr: dict) -> str | None:
    """The column an expression reads unchanged (``col``, possibly aliased), else None."""
    while expr["expr"] == "alias":
        expr = expr["input"]
    return expr["name"] if expr["expr"] == "col" else None


# Expression kinds evaluated row by row from their row's values alone (no aggregate, no window, no function).
_ELEMENTWISE_KINDS = frozenset({"col", "lit", "alias", "binary", "unary", "when"})


def _elementwise(expr: dict) -> bool:
    """True when ``expr`` is built of columns, literals, operators and ``when`` only."""
    kind = expr["expr"]
    if kind not in _ELEMENTWISE_KINDS:
        return False
    if kind == "alias":
        return _elementwise(expr["input"])
    if kind == "binary":
        return _elementwise(expr["left"]) and _elementwise(expr["right"])
    if kind == "unary":
        return _elementwise(expr["operand"])
    if kind == "when":
        parts = [p for b in expr["branches"] for p in (b["when"], b["then"])]
        parts += [expr["otherwise"]] if expr["otherwise"] is not None else []
        return all(_elementwise(p) for p in parts)
    return True


def _columns_read(expr: dict) -> set[str]:
    """The columns an elementwise expression reads."""
    kind = expr["expr"]
    if kind == "col":
        return {expr["name"]}
    if kind == "alias":
        return _columns_read(expr["input"])
    if kind == "binary":
        return _columns_read(expr["left"]) | _columns_read(expr["right"])
    if kind == "unary":
        return _columns_read(expr["operand"])
    if kind == "when":
        parts = [p for b in expr["branches"] for p in (b["when"], b["then"])]
        parts += [expr["otherwise"]] if expr["otherwise"] is not None else []
        return set().union(*(_columns_read(p) for p in parts))
    return set()


def _widened(low: float, high: float) -> tuple[float, float]:
    # Bounds of a float computation: its rounding can move a result by a few units in the last place.
    spread = max(abs(low), abs(high)) * 1e-12 + 1e-300
    return low - spread, high + spread


@dataclass
class KeySource:
    """A group_by of a whole cached table by plain key columns, and that table's per-key statistics.

    Every group of the aggregation is a group of the statistics, over the
    same rows of the same table version, so a check of a plain column reads
    its value from them (joined by the keys after the aggregation) instead
    of computing it.  Each read is guarded: a group whose row count in the
    statistics differs from the aggregation's own (which cannot happen for
    the same rows) gets a failing value.

    Attributes
    ----------
    keys : tuple[str, ...]
        The key columns, as the table names them.
    outputs : tuple[str, ...]
        The same keys, as the aggregation's output names them.
    columns : Mapping[str, str]
        Aggregation input column -> the table column whose values it holds unchanged.
    stats : polars.DataFrame
        :meth:`DatasetCache.key_stats` of the keys.
    used : set[str]
        The statistics the aggregation reads (joined after it).
    """

    keys: tuple[str, ...]
    outputs: tuple[str, ...]
    columns: Mapping[str, str]
    stats: pl.DataFrame
    used: set[str] = field(default_factory=set)
    # Over a join (join_stats.group_stats): computed inputs' statistics by the input (its JSON), and the small
    # side's row-id column, whose distinct ids per group are counted from its rows there.
    derived: Mapping[str, str] = field(default_factory=dict)
    row_id: str | None = None

    def stat_column(self, expr: dict, stat: str) -> str | None:
        """The column of statistic ``stat`` of what ``expr`` computes, or None when there is none."""
        column = _plain_column(expr)
        base = self.columns.get(column) if column is not None else self.derived.get(_expr_key(expr))
        name = None if base is None else stat_name(base, stat)
        return name if name in self.stats.columns else None

    def joined(self, result: pl.LazyFrame) -> pl.LazyFrame:
        """``result`` (the aggregation) with the statistics it reads, joined by its group keys."""
        stats = self.stats.lazy().select([pl.col(k).alias(o) for k, o in zip(self.keys, self.outputs)]
                                         + [pl.col(KEY_LEN)] + [pl.col(c) for c in sorted(self.used)])
        return result.join(stats, on=list(self.outputs), how="left", nulls_equal=True, maintain_order="left")


def _expr_key(expr: dict) -> str:
    return json.dumps(expr, sort_keys=True)


def _term_kind(dtype: pl.DataType) -> str:
    return "boolean" if dtype == pl.Boolean else "number" if dtype.is_numeric() else "other"


def _product_exact(term: Term, small: pl.DataFrame, facts: ColumnFacts | None) -> bool:
    """True unless ``term`` is a product whose statistics from the parts' might differ from the rows'.

    The table's column must be finite with a known range and smallest
    non-zero magnitude; each small-side value finite, and its product with
    them neither rounding to zero nor large enough for a square to overflow.
    """
    if term.left is None or term.right is None:
        return True
    if facts is None or facts.magnitude is None or facts.smallest is None:
        return False
    values = small[term.right].drop_nulls()
    if not values.is_finite().all():
        return False
    scales = values.filter(values != 0).abs()
    return scales.is_empty() or (scales.min() * facts.smallest > 1e-300 and scales.max() * facts.magnitude < 1e150)


def _fewest_holders(values: pl.Expr) -> pl.Expr:
    """The fewest times one distinct value (null included) occurs in ``values`` (null when empty)."""
    return values.value_counts(name="count").struct.field("count").min()


class AccountingCompiler:
    """The compilers of the ``acct_*`` frame operations and expressions (a mixin of the polars compiler).

    They read and extend the compiler's state: ``catalog``, ``cache``,
    ``scope`` (the input of the expressions being compiled), ``tables`` (the
    table each dataset's scan read), ``row_words`` and, while an aggregation
    is compiled, ``extra_aggs``, ``post_aggs`` and ``helper_columns``; and
    they compile their inputs with its ``frame``, ``expr``, ``_exprs``,
    ``_on`` and ``_dtype``.
    """

    catalog: Mapping[str, Dataset]
    cache: DatasetCache
    scope: pl.LazyFrame | None
    tables: dict[str, pl.DataFrame]
    scan_tables: dict[int, pl.DataFrame | None]
    schemas: dict[int, pl.Schema]
    compiled: dict[int, pl.LazyFrame]
    frame_facts_memo: dict[int, dict[str, ColumnFacts]]
    row_words: dict[str, list[str]]
    row_frames: dict[str, pl.LazyFrame]
    origins_memo: dict[int, dict[str, str]]
    extra_aggs: list[pl.Expr] | None
    post_aggs: list[pl.Expr]
    helper_columns: list[str]
    agg_node: dict | None
    key_source: KeySource | None
    len_column: str | None
    fact_ranges: bool
    ranged_shares: list[tuple[str, tuple]]

    def accounting_ops(self) -> dict[str, Callable[[dict], pl.LazyFrame]]:
        """The internal frame operations, by name, as the compiler dispatches them."""
        return {"acct_row_id": self._acct_row_id, "acct_columns": self._acct_columns,
                "acct_person_id": self._acct_person_id, "acct_unique": self._acct_unique}

    def accounting_exprs(self) -> dict[str, Callable[[dict], pl.Expr]]:
        """The internal expression kinds, by name, as the compiler dispatches them."""
        return {
            **_ACCOUNT_EXPRS,
            "acct_len": self._acct_len,
            "acct_distinct": self._acct_distinct,
            "acct_contrib": self._acct_contrib, "acct_share": self._acct_share,
            "acct_held": self._acct_held, "acct_finite": self._acct_finite,
            "acct_min": lambda n: pl.col(n["column"]).min().alias(n["name"]),
            "acct_max": lambda n: pl.col(n["column"]).max().alias(n["name"]),
        }

    # ------------------------------------------------------------ what is known before running
    def _frame_facts(self, node: dict) -> dict[str, ColumnFacts]:
        """What the owner's facts (:meth:`DatasetCache.facts`) prove about a frame's columns, by column.

        A column is known while it holds a dataset column's values unchanged
        on a subset of its rows (possibly repeated, as by an inner join):
        every property that holds for all of the table's values holds for
        them.  A column an operation assigns, a side of a join that may be
        padded with nulls, or anything after an aggregation is not known.
        """
        key = id(node)
        if key not in self.frame_facts_memo:
            self.frame_facts_memo[key] = self._measure_frame_facts(node)
        return self.frame_facts_memo[key]

    def _measure_frame_facts(self, node: dict) -> dict[str, ColumnFacts]:
        kind = node["op"]
        if kind == "scan":
            table = self.scan_tables.get(id(node))
            facts = None if table is None else self.cache.facts(self.catalog[node["dataset"]], table)
            return {} if facts is None else dict(facts.columns)
        if kind in _ROW_SUBSET_OPS or kind in _COLUMN_OPS:
            return _carried(node, self._frame_facts(node["input"]))
        if kind == "select":
            plain = [(P.output_name(e), _plain_column(e)) for e in node["exprs"]]
            if any(column is None for _, column in plain):
                return {}  # an aggregate or a computed column: not the input's values
            inner = self._frame_facts(node["input"])
            return {name: inner[column] for name, column in plain if column in inner}
        if kind == "join" and node["how"] in ("inner", "left", "semi", "anti", "cross"):
            known = dict(self._frame_facts(node["left"]))
            if node["how"] in ("inner", "cross"):
                # Right columns keep their names unless the left side has one of them (then suffixed: left out);
                # the right keys are merged into the left ones.
                left_names = set(self.schemas[id(node["left"])].names())
                right_keys = {_plain_column(k) for k in node.get("right_on", [])}
                for column, facts in self._frame_facts(node["right"]).items():
                    if column not in left_names and column not in right_keys:
                        known[column] = facts
            return known
        return {}

    def _rows_at_most(self, node: dict) -> int | None:
        """An upper bound of a frame's row count known without running it, or None."""
        kind = node["op"]
        if kind == "scan":
            table = self.scan_tables.get(id(node))
            return None if table is None else table.height
        if kind == "join":
            left, right = self._rows_at_most(node["left"]), self._rows_at_most(node["right"])
            if left is None or right is None:
                return None
            return left if node["how"] in ("semi", "anti") else left * right + left + right
        if kind == "concat":
            bounds = [self._rows_at_most(f) for f in node["inputs"]]
            return None if any(b is None for b in bounds) else sum(bounds)
        if kind in _ROW_SUBSET_OPS or kind in _COLUMN_OPS or kind in ("group_by", "select", "fill_null"):
            bound = self._rows_at_most(node["input"])
            # None of these adds rows, except that a global select (or aggregation) of no rows gives one.
            return None if bound is None else max(bound, 1)
        return None

    def _expr_facts(self, expr: dict) -> ColumnFacts:
        """What the facts prove about an expression's values over the aggregation's input rows."""
        if self.agg_node is None:
            return UNKNOWN
        kind = expr["expr"]
        if kind == "alias":
            return self._expr_facts(expr["input"])
        if kind == "col":
            return self._frame_facts(self.agg_node).get(expr["name"], UNKNOWN)
        if kind == "lit":
            value = expr["value"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return UNKNOWN
            return ColumnFacts(nulls=False, zeros=value == 0, finite=True, low=float(value), high=float(value),
                               smallest=abs(float(value)) or None)
        if kind == "when":
            branches = [b["then"] for b in expr["branches"]]
            parts = [self._expr_facts(b) for b in branches]
            if expr["otherwise"] is not None:
                parts.append(self._expr_facts(expr["otherwise"]))
            if any(p.magnitude is None for p in parts):
                return UNKNOWN
            smallest = [p.smallest for p in parts]
            return ColumnFacts(nulls=expr["otherwise"] is None or any(p.nulls for p in parts),
                               zeros=any(p.zeros for p in parts), finite=True,
                               low=min(p.low for p in parts), high=max(p.high for p in parts),
                               smallest=None if None in smallest else min(smallest))
        if kind == "binary" and expr["op"] in ("add", "sub", "mul"):
            left, right = self._expr_facts(expr["left"]), self._expr_facts(expr["right"])
            if left.magnitude is None or right.magnitude is None:
                return UNKNOWN
            # Bounds hold for Float64 results only: integer arithmetic wraps around.
            if self._result_dtype(expr) != pl.Float64:
                return UNKNOWN
            if expr["op"] == "add":
                low, high = left.low + right.low, left.high + right.high
            elif expr["op"] == "sub":
                low, high = left.low - right.high, left.high - right.low
            else:
                corners = [a * b for a in (left.low, left.high) for b in (right.low, right.high)]
                low, high = min(corners), max(corners)
            if not (math.isfinite(low) and math.isfinite(high)):
                return UNKNOWN
            low, high = _widened(low, high)
            return ColumnFacts(nulls=left.nulls or right.nulls, zeros=True, finite=True, low=low, high=high)
        return UNKNOWN

    def _result_dtype(self, expr: dict) -> pl.DataType | None:
        """The dtype of an expression over the current scope; None when its types do not fit (reported by the
        operation's own schema, naming the operation)."""
        try:
            return self._dtype(self.expr(expr), "aggregation")
        except BastionError:
            return None

    def _finite_proved(self, call: dict, dtype: pl.DataType) -> bool:
        """True when the facts prove aggregate ``call`` (of type ``dtype``) finite, and an integer sum unwrapped.

        With every input value finite and |x| <= M over at most N rows: a
        min or max is an input value; a median or quantile lies between two
        (their mean stays below 2M); a sum or mean is at most N * M, a
        variance at most N * (2M)**2 (whatever its ddof), each computed with
        a rounding error far below the margin of two taken here.
        """
        if self.agg_node is None:
            return False
        magnitude = self._expr_facts(call["input"]).magnitude
        rows = self._rows_at_most(self.agg_node)
        if magnitude is None or rows is None:
            return False
        rows = max(rows, 1)
        name = call["name"]
        if dtype.is_integer():
            return name == "sum" and magnitude * rows <= _INTEGER_RANGE[str(dtype)][1] / 2
        if dtype != pl.Float64:
            return False
        limit = FLOAT_MAX / 4
        if name in ("min", "max"):
            return True
        if name in ("median", "quantile"):
            return magnitude < limit
        if name in ("sum", "mean"):
            return magnitude * rows < limit
        if name in ("std", "var"):
            return (2 * magnitude) * (2 * magnitude) * rows < limit  # (a float ** overflows with an error)
        return False

    # ------------------------------------------------------------ per-key statistics
    def _key_source(self, node: dict) -> KeySource | None:
        """Per-key statistics for a group_by of a whole cached table by plain, exactly comparable key columns.

        The aggregation's input must hold every row of the table once
        (sorted, columns added, dropped or renamed: no filter, no join);
        statistics are fetched for the plain columns the accounting checks.
        """
        if any(n["expr"] == "acct_share" and n["exact"] for n in node["aggs"]):
            return None  # the exact measure reshapes the input (AccountingCompiler._with_distances)
        found = self._whole_table(node["input"])
        if found is None:
            return self._join_key_source(node)
        dataset, table, columns = found
        keys, outputs = [], []
        for key in node["keys"]:
            column = _plain_column(key)
            if column not in columns or not key_dtype_fits(table.schema[columns[column]]):
                return None
            keys.append(columns[column])
            outputs.append(P.output_name(key))
        if not keys or len(set(keys)) != len(keys) or len(set(outputs)) != len(outputs):
            return None
        wanted: dict[str, list[str]] = {"basic": [], "held": []}
        for agg in node["aggs"]:
            kind = agg["expr"]
            if kind == "acct_contrib" and agg["kind"] == "implicit" and not agg["padded"] or \
                    kind == "acct_share" and not agg["exact"]:
                column, group = _plain_column(agg["input"]), "basic"
            elif kind == "acct_held" and agg["kind"] == "implicit" and agg["call"]["name"] in ("min", "max"):
                column, group = _plain_column(agg["call"]["input"]), "held"
            else:
                continue
            if column in columns:
                wanted[group].append(columns[column])
        if not wanted["basic"] and not wanted["held"]:
            return None
        stats = self.cache.key_stats(dataset, table, tuple(keys), tuple(dict.fromkeys(wanted["basic"])),
                                     tuple(dict.fromkeys(wanted["held"])))
        if stats is None:
            return None
        return KeySource(keys=tuple(keys), outputs=tuple(outputs), columns=columns, stats=stats)

    def _whole_table(self, node: dict) -> tuple[Dataset, pl.DataFrame, dict[str, str]] | None:
        """``(dataset, table, {frame column: table column})`` when a frame is a whole cached table, each row once."""
        chain = []
        while node["op"] in ("sort", "drop", "rename", "with_columns", "with_row_index"):
            chain.append(node)
            node = node["input"]
        table = self.scan_tables.get(id(node)) if node["op"] == "scan" else None
        if table is None:
            return None
        columns: dict = {c: c for c in table.columns}
        for step in reversed(chain):
            columns = _carried(step, columns)
        return self.catalog[node["dataset"]], table, columns

    def _key_stat(self, expr: dict | None, stat: str) -> pl.Expr | None:
        """The per-key statistic ``stat`` of what ``expr`` computes, for use after the aggregation.

        ``expr`` None: a statistic of the source itself (the small side's rows over a join).
        """
        source = self.key_source
        if source is None or self.extra_aggs is None:
            return None
        name = stat_name("", stat) if expr is None else source.stat_column(expr, stat)
        if name is None or name not in source.stats.columns:
            return None
        return pl.col(name)

    def _join_key_source(self, node: dict) -> KeySource | None:
        """Per-group statistics for a group_by of a whole cached table inner-joined with a small side whose join
        key is unique, grouped by the small side's columns (:func:`join_stats.group_stats`).

        The aggregates the accounting checks are covered when they read a
        plain column of either side, or the product of a double of the
        table by a double of the small side that the facts prove exact: the
        table's column finite, and each small-side value finite, its product
        with the column's smallest non-zero magnitude not rounding to zero
        and with its largest far from overflowing.
        """
        join = node["input"]
        if join["op"] != "join" or join["how"] != "inner" or join["right"]["op"] != "acct_unique":
            return None
        found = self._whole_table(join["left"])
        small_input = join["right"]["input"]
        row_id = small_input["name"] if small_input["op"] == "acct_row_id" else None
        small_bound = self._row_bound(small_input["input"] if row_id is not None else small_input)
        if found is None or small_bound is None or small_bound > MAX_SMALL_ROWS:
            return None
        dataset, table, carried = found
        left_keys = [_plain_column(k) for k in join["left_on"]]
        right_keys = [_plain_column(k) for k in join["right_on"]]
        left_schema, right_schema = self.schemas[id(join["left"])], self.schemas[id(join["right"])]
        if None in left_keys or None in right_keys or set(join["right"]["columns"]) != set(right_keys) or \
                any(k not in carried or not key_dtype_fits(table.schema[carried[k]]) or
                    right_schema.get(r) != table.schema[carried[k]] for k, r in zip(left_keys, right_keys)):
            return None
        found_columns = small_side_columns(left_schema.names(), right_schema.names(), left_keys, right_keys,
                                           join["suffix"], [_plain_column(key) for key in node["keys"]],
                                           lambda column: key_dtype_fits(right_schema[column]))
        if found_columns is None:
            return None
        small_of, sources = found_columns
        groups = [(source, P.output_name(key)) for source, key in zip(sources, node["keys"])]
        if not groups or len({o for _, o in groups}) != len(groups):
            return None
        covered: dict[str, tuple[dict, Term]] = {}
        for agg in node["aggs"]:
            kind = agg["expr"]
            if kind == "acct_share" and not agg["exact"] or kind == "acct_contrib" and not agg["padded"] and (
                    agg["kind"] == "implicit" or agg["kind"] == "rid" and agg["column"] == row_id):
                term = self._join_term(agg["input"], carried, small_of, left_schema, right_schema)
                if term is not None:
                    covered[_expr_key(agg["input"])] = (agg["input"], term)
        if not covered:
            return None
        table_keys = tuple(carried[k] for k in left_keys)

        def measure() -> tuple[pl.DataFrame | None, tuple[str, ...]]:
            left_columns = tuple(dict.fromkeys(t.left for _, t in covered.values() if t.left is not None))
            stats = self.cache.key_stats(dataset, table, table_keys, left_columns)
            wanted = {stat_name(t.left, s) for _, t in covered.values() if t.left is not None
                      for s in (("count", "nonzero", "mean", "var", "max", "min") if t.numeric else ("count",))}
            if stats is None or not wanted <= set(stats.columns):
                return None, ()  # no statistics, or kept from before they had every part
            small_columns = list(dict.fromkeys(right_keys + [c for c, _ in groups]
                                               + [t.right for _, t in covered.values() if t.right is not None]))
            try:
                small = self.compiled[id(join["right"])].select(small_columns).collect()
            except Exception:  # noqa: BLE001 - read ahead only to save work: the query computes it all otherwise
                return None, ()
            facts = self.cache.facts(dataset, table)
            exact = tuple(key for key, (_, term) in covered.items()
                          if _product_exact(term, small, None if facts is None else facts.columns.get(term.left)))
            if not exact:
                return None, ()
            return group_stats(small, right_keys, stats, table_keys, groups, [covered[k][1] for k in exact]), exact

        # The same small side, groups and terms over the same table versions give the same statistics.
        sources = [(dataset, table)] + [
            (self.catalog[n["dataset"]], self.scan_tables.get(id(n))) if n["op"] == "scan" else
            (self.catalog[n["name"]], None) for n in walk.json_objects(join["right"])
            if "expr" not in n and n.get("op") in ("scan", "saved")]
        per_group, exact = self.cache.remembered(
            ("join_stats", _expr_key(join["right"]), tuple(groups), tuple(right_keys), table_keys,
             tuple((key, term) for key, (_, term) in covered.items())), sources, measure)
        if per_group is None:
            return None
        covered = {key: covered[key] for key in exact}
        plain = {_plain_column(expr): term.name for expr, term in covered.values() if _plain_column(expr)}
        derived = {key: term.name for key, (expr, term) in covered.items() if not _plain_column(expr)}
        outputs = tuple(o for _, o in groups)
        return KeySource(keys=outputs, outputs=outputs, columns=plain, stats=per_group, derived=derived,
                         row_id=row_id)

    @staticmethod
    def _join_term(expr: dict, carried: Mapping[str, str], small_of: Mapping[str, str], left_schema: pl.Schema,
                   right_schema: pl.Schema) -> Term | None:
        """What an aggregate over a join reads, as a :class:`join_stats.Term`, or None when not covered."""
        column = _plain_column(expr)
        if column in small_of:
            return Term(f"right:{column}", None, small_of[column], _term_kind(right_schema[small_of[column]]))
        if column is not None:
            return Term(f"left:{column}", carried[column], None, _term_kind(left_schema[column])) \
                if column in carried and column in left_schema else None
        while expr["expr"] == "alias":
            expr = expr["input"]
        if expr["expr"] != "binary" or expr["op"] != "mul":
            return None
        factors = (_plain_column(expr["left"]), _plain_column(expr["right"]))
        for big, small in (factors, factors[::-1]):
            if big in carried and big in left_schema and big not in small_of and small in small_of and \
                    left_schema[big] == pl.Float64 and right_schema[small_of[small]] == pl.Float64:
                return Term(f"product:{big}*{small}", carried[big], small_of[small], "number")
        return None

    def _key_guarded(self, value: pl.Expr, failing: int) -> pl.Expr:
        """``value`` (read from per-key statistics) where the group's row counts agree, else ``failing``."""
        same = pl.col(KEY_LEN).cast(pl.Int64) == self._group_len().cast(pl.Int64)
        return pl.when(same).then(value).otherwise(pl.lit(failing, dtype=ACCOUNT_DTYPE))

    def _from_key_stats(self, node: dict, value: pl.Expr, failing: int) -> pl.Expr | None:
        """Give ``node``'s column ``value`` after the aggregation (guarded); its placeholder in the aggregation.

        ``value`` reads only the statistics (:meth:`_key_stat`), one row per
        key: it is computed here, once per compiled query, and joined as one
        column, so the query itself only guards it (a compound expression
        after a 10M-row aggregation cost its plan about a millisecond).
        """
        source = self.key_source
        column = stat_name(node["name"], "value")
        source.stats = source.stats.with_columns(value.alias(column))
        source.used.add(column)
        self.post_aggs.append(self._key_guarded(pl.col(column), failing).alias(node["name"]))
        return self._placeholder(node)

    # ------------------------------------------------------------ exact dominance
    def _with_distances(self, frame: pl.LazyFrame, keys: list[pl.Expr] | None,
                        nodes: list[dict]) -> tuple[pl.LazyFrame, list[pl.Expr] | None]:
        """Give ``frame`` the columns the dominance checks of an aggregation read (:meth:`_acct_share`).

        ``keys``: the group_by's keys (None: one group, a global select).  Per
        check, a first aggregation finds each group's median, max and min of
        the aggregated values; joined back (row order kept), they give each
        row its distance from the median and mark the values that are not the
        max (min), whose max (min) is the second largest (smallest).  The
        aggregation itself then only sums, takes maxima and first values of
        plain columns, which keeps polars on its fast path.  Returns the frame
        and the keys to group it by (the key columns it now carries, under
        their output names).
        """
        shares = [n for n in nodes if n["expr"] == "acct_share" and n["exact"]]
        if not shares:
            return frame, keys
        self._on(frame)
        values = {n["name"]: self.expr(n["input"]).cast(pl.Float64, strict=False) for n in shares}
        centres = [agg for name, value in values.items()
                   for agg in (value.median().alias(f"{name}__median"), value.max().alias(f"{name}__max"),
                               value.min().alias(f"{name}__min"))]
        if keys is None:
            frame = frame.with_columns(centres)
        else:
            key_columns = [f"{RESERVED_PREFIX}_key{i}" for i in range(len(keys))]
            frame = frame.with_columns([k.alias(c) for k, c in zip(keys, key_columns)])
            found = frame.group_by(key_columns).agg(centres)
            frame = frame.join(found, on=key_columns, how="left", nulls_equal=True, maintain_order="left")
            keys = [pl.col(c).alias(k.meta.output_name()) for k, c in zip(keys, key_columns)]
        columns = []
        for name, value in values.items():
            largest, smallest = pl.col(f"{name}__max"), pl.col(f"{name}__min")
            columns += [(value - pl.col(f"{name}__median")).abs().alias(f"{name}__distance"),
                        pl.when(value < largest).then(value).alias(f"{name}__below_max"),
                        pl.when(value > smallest).then(value).alias(f"{name}__above_min"),
                        (value == largest).alias(f"{name}__at_max"), (value == smallest).alias(f"{name}__at_min")]
        frame = frame.with_columns(columns)
        self._on(frame)
        return frame, keys

    def _acct_row_id(self, node: dict) -> pl.LazyFrame:
        # Row ids start at 1: 0 marks "no partner in an outer join", null "not from this source".
        frame = self.frame(node["input"])
        name = node["name"]
        frame = frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=ACCOUNT_DTYPE).alias(name))
        bound = self._row_bound(node["input"])
        if bound is None or bound > BITSET_MAX_ROWS or name in self.row_words:
            self.row_words[name] = []  # unknown, too many, or a second branch: ids are counted by hashing
            self.row_frames.pop(name, None)
            return frame
        # At most BITSET_MAX_ROWS rows here: the words cost nothing to make, and then travel with the ids.
        ids = pl.col(name)
        words = [f"{name}__bits{w}" for w in range(bound // 64 + 1)]
        self.row_words[name] = words
        frame = frame.with_columns(
            pl.when(ids // 64 == w).then(pl.lit(_BITS).gather(ids % 64)).otherwise(pl.lit(0, dtype=pl.UInt64))
            .alias(word) for w, word in enumerate(words))
        self.row_frames[name] = frame  # the rows the ids number, for masks of their values (_row_masks)
        return frame

    def _row_bound(self, node: dict) -> int | None:
        """An upper bound of a frame's row count known without running it, or None.

        Only a dataset's table as the scan read it and operations that never
        add rows are followed; anything else (a join, explode, concat, select,
        group_by, a streamed or saved source) is unknown.
        """
        bound: int | None = None
        while node["op"] in _ROW_KEEPING_OPS:  # each has one input, its "input" (acct_unique too)
            limit = node["n"] if node["op"] == "head" else node["length"] if node["op"] == "slice" else None
            if limit is not None:
                bound = max(limit, 0) if bound is None else min(bound, max(limit, 0))
            node = node["input"]
        table = self.tables.get(node["dataset"]) if node["op"] == "scan" else None
        if table is None:
            return None
        return table.height if bound is None else min(bound, table.height)

    def _distinct_ids(self, node: dict, mask: pl.Expr | None,
                      masked_by: tuple[dict, str] | None = None) -> pl.Expr | None:
        """The number of distinct row ids of ``node["column"]`` in a group (where ``mask``), from bit words.

        Registers one ``bitwise_or`` aggregation per word and returns the
        expression that counts their bits after the aggregation; None (hash
        the ids) outside an aggregation or when the words are not in its
        input (a select, concat or saved result in between dropped them).
        Exact: distinct ids >= 1 set distinct bits, rows of other sources
        (null ids) have null words, and 0 ids (no partner) are never set.
        ``masked_by``: ``(value node, mode)`` the mask was built from, which
        may let it be applied to the ids' bits instead (:meth:`_row_masks`).
        """
        words = self.row_words.get(node["column"], [])
        if self.extra_aggs is None or not words or \
                not set(words) <= set(self.scope.collect_schema().names()):
            return None
        zero = pl.lit(0, dtype=pl.UInt64)
        row_masks = None if mask is None or masked_by is None else self._row_masks(node["column"], *masked_by)
        parts = []
        for index, word in enumerate(words):
            if mask is None or row_masks is not None:
                # The plain OR of a word: one aggregation, whichever counts read it.
                part = self._shared_agg(f"{word}__or", pl.col(word).bitwise_or())
            else:
                part = self._helper_agg(node, f"or{index}", pl.when(mask).then(pl.col(word)).otherwise(zero)
                                        .bitwise_or())
            present = part if row_masks is None else part & pl.lit(row_masks[index], dtype=pl.UInt64)
            parts.append(present.bitwise_count_ones().fill_null(0).cast(ACCOUNT_DTYPE))
        return pl.sum_horizontal(parts)

    def _row_masks(self, rid: str, value_node: dict, mode: str) -> list[int] | None:
        """Per word of row ids ``rid``, the bits of the rows where a mask of ``value_node`` holds, or None.

        When the mask reads only columns that hold the values of the rows
        the ids number (the small side of a join, joined unchanged), it is
        a property of each id: the ids in a group where it holds are the
        group's ids AND these bits, so the aggregation ORs the plain words
        (shared with the source's own count) instead of masked ones.  The
        bits are measured on that small frame (at most BITSET_MAX_ROWS
        rows) while compiling.  ``mode``: ``"nonzero"`` or ``"present"``
        (:meth:`_mask_of`).
        """
        frame = self.row_frames.get(rid)
        if frame is None or self.agg_node is None or not _elementwise(value_node):
            return None
        origins = self._frame_origins(self.agg_node)
        if any(origins.get(column) != rid for column in _columns_read(value_node)):
            return None
        scope = self.scope
        try:
            value = self._on(frame).expr(value_node)
            mask = self._mask_of(value, self._dtype(value, "aggregation"), mode)
            words = self.row_words[rid]
            zero = pl.lit(0, dtype=pl.UInt64)
            row = frame.select([pl.when(mask).then(pl.col(w)).otherwise(zero).bitwise_or().alias(w) for w in words]) \
                .collect().row(0)
        except Exception:  # noqa: BLE001 - measured ahead only to save work: the masked words are exact too
            return None
        finally:
            self.scope = scope
        return [int(bits or 0) for bits in row]

    @staticmethod
    def _mask_of(value: pl.Expr, dtype: pl.DataType, mode: str) -> pl.Expr:
        """The contribution mask of ``value``: ``"present"`` (not null) or ``"nonzero"`` (:func:`nonzero_mask`)."""
        return value.is_not_null() if mode == "present" else nonzero_mask(value, dtype)

    def _frame_origins(self, node: dict) -> dict[str, str]:
        """Frame column -> the row-id column (with bit words) whose row holds its value, for columns known so.

        A column of a frame that gets row ids (:meth:`_acct_row_id`) holds a
        value of the row its id numbers; it keeps that origin through
        operations that keep or subset rows and through inner, left and
        cross joins (unless renamed by a suffix or merged as a key).
        """
        key = id(node)
        if key not in self.origins_memo:
            self.origins_memo[key] = self._measure_origins(node)
        return self.origins_memo[key]

    def _measure_origins(self, node: dict) -> dict[str, str]:
        kind = node["op"]
        if kind == "acct_row_id" and self.row_words.get(node["name"]) and node["name"] in self.row_frames:
            return {c: node["name"] for c in self.schemas[id(node["input"])].names()
                    if not c.startswith(RESERVED_PREFIX)}
        if kind in _ROW_SUBSET_OPS or kind in _COLUMN_OPS:
            return _carried(node, self._frame_origins(node["input"]))
        if kind == "join" and node["how"] in ("inner", "left", "cross"):
            known = dict(self._frame_origins(node["left"]))
            left_names = set(self.schemas[id(node["left"])].names())
            right_keys = {_plain_column(k) for k in node.get("right_on", [])}
            for column, origin in self._frame_origins(node["right"]).items():
                if column not in left_names and column not in right_keys:
                    known[column] = origin
            return known
        return {}

    def _group_len(self) -> pl.Expr:
        """Inside an aggregation, each group's row count for use after it: computed once (each ``len()`` in
        ``agg`` costs about as much as a sum), the scientist's own ``len()`` when the aggregation has one."""
        if self.len_column is None:
            self.len_column = f"{RESERVED_PREFIX}_len"
            self._shared_agg(self.len_column, pl.len())
        return pl.col(self.len_column)

    def _acct_len(self, node: dict) -> pl.Expr | None:
        if self.extra_aggs is None:
            return pl.len().alias(node["name"])
        self.post_aggs.append(self._group_len().alias(node["name"]))
        return self._placeholder(node)

    def _shared_agg(self, name: str, expr: pl.Expr) -> pl.Expr:
        """Compute ``expr`` in the aggregation once as helper column ``name`` (reserved), whoever asks for it."""
        if name not in self.helper_columns:
            self.extra_aggs.append(expr.alias(name))
            self.helper_columns.append(name)
        return pl.col(name)

    def _helper_agg(self, node: dict, label: str, expr: pl.Expr) -> pl.Expr:
        """Compute ``expr`` in the aggregation as a helper column; the column, for an expression after it."""
        name = f"{node['name']}__{label}"
        self.extra_aggs.append(expr.alias(name))
        self.helper_columns.append(name)
        return pl.col(name)

    def _acct_distinct(self, node: dict) -> pl.Expr | None:
        source = self.key_source
        if source is not None and node["column"] == source.row_id and \
                not (node["taintable"] or node["nullable"] or node["global"]):
            rows = self._key_stat(None, SMALL_ROWS)
            if rows is not None:
                return self._from_key_stats(node, rows, 0)
        count = self._distinct_ids(node, None)
        if count is None:
            return _account_distinct(node)
        c = pl.col(node["column"])
        if node["taintable"] or node["nullable"] or node["global"]:
            # _guarded's conditions, aggregated apart and combined after the aggregation.
            expr = pl.when(self._helper_agg(node, "len", pl.len()) == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            if node["nullable"]:
                expr = expr.when(self._helper_agg(node, "unfed", c.is_null().all())).then(
                    pl.lit(None, dtype=ACCOUNT_DTYPE))
            if node["taintable"]:
                expr = expr.when(self._helper_agg(node, "tainted", (c == 0).any())).then(
                    pl.lit(0, dtype=ACCOUNT_DTYPE))
            count = expr.otherwise(count)
        self.post_aggs.append(count.alias(node["name"]))
        return self._placeholder(node)

    @staticmethod
    def _placeholder(node: dict) -> None:
        # What a node computed after the aggregation (by an entry of post_aggs named after it) compiles to
        # inside it: nothing (Compiler._aggregate puts its column in the node's place).
        return None

    def _acct_columns(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return cast_accounting(frame.with_columns(self._on(frame)._exprs(node["exprs"])), node["exprs"])

    def _acct_unique(self, node: dict) -> pl.LazyFrame:
        # The policy counted the join's left side as not repeated because this
        # side's key is unique: hold that against the very table the query
        # reads, so a file replaced since the policy asked fails closed.
        frame = self.frame(node["input"])
        dataset = self.catalog[node["dataset"]]
        table = self.tables.get(node["dataset"])
        if table is None or not self.cache.unique_keys(dataset, tuple(node["columns"]), table):
            raise BastionError("ExecutionError", f"dataset {node['dataset']!r} changed while this query was "
                                                 "being prepared; run it again", changed=True)
        return frame

    def _acct_person_id(self, node: dict) -> pl.LazyFrame:
        # One id per person (1, 2, ...), so counting distinct ids counts people;
        # rows without a person id count as one more person together.
        frame = self.frame(node["input"])
        rank = pl.col(node["column"]).rank("dense").cast(ACCOUNT_DTYPE)
        return frame.with_columns(rank.fill_null(rank.max().fill_null(0) + 1).alias(node["name"]))

    def _acct_contrib(self, node: dict) -> pl.Expr | None:
        """How many source rows (or people) made a real contribution to an aggregate.

        A row contributes when its input value is not null, not zero (a
        false boolean is zero), and, when the policy marks the input as
        possibly ``padded``, not the value most rows of the group share (an
        indicator padded with a constant other than zero).  Counting
        functions (``count``, ``n_unique``, ``null_count``) count every non-null value.
        """
        value = self.expr(node["input"])
        dtype = self._dtype(value, "aggregation")
        numeric = dtype == pl.Boolean or dtype.is_numeric()
        counting = node["function"] in _COUNTING
        source = self.key_source
        if not node["padded"] and (node["kind"] == "implicit" or node["kind"] == "rid" and source is not None
                                   and node["column"] == source.row_id):
            stat = "nonzero" if numeric and not counting else "count"
            counted = self._key_stat(node["input"], stat if node["kind"] == "implicit" else f"{stat}_rows")
            if counted is not None:
                return self._from_key_stats(node, counted, 0)
        if node["padded"]:
            # Ties for most common are broken by the smallest value: the same rows count on every run and engine.
            common = value.drop_nulls().mode().min()
            padding = (value != common).fill_null(True) | ((value == common).sum() <= 1)
            mask = value.is_not_null() if counting or not numeric else nonzero_mask(value, dtype)
            return self._contributors(node, mask & padding)
        # The owner's facts may prove the mask the same as a simpler one's (of a product's other factor), or
        # every value present (and not zero): then the mask is every row.
        mode = "present" if counting or not numeric else "nonzero"
        masked = self._mask_input(node["input"], mode)
        if masked is not node["input"]:
            value = self.expr(masked)
            dtype = self._dtype(value, "aggregation")
        facts = self._expr_facts(masked)
        if mode == "nonzero" and not facts.zeros:
            mode = "present"
        if mode == "present" and not facts.nulls:
            mode = None
        mask = None if mode is None else self._mask_of(value, dtype, mode)
        return self._contributors(node, mask, None if mode is None else (masked, mode))

    def _mask_input(self, expr: dict, mode: str) -> dict:
        """An expression whose contribution mask (``mode``) equals ``expr``'s on every row, by the facts.

        For a product ``x * y`` where ``x`` is never null (and, for
        ``"nonzero"``, never zero, finite, and the product a double that
        cannot round to zero: the smallest non-zero magnitudes of both
        factors multiply to more than 1e-300): the product is null exactly
        where ``y`` is, and zero exactly where ``y`` is (an inf or NaN ``y``
        gives an inf or NaN product, non-zero like ``y``).  Else ``expr``.
        """
        inner = expr
        while inner["expr"] == "alias":
            inner = inner["input"]
        if inner["expr"] != "binary" or inner["op"] != "mul" or self.agg_node is None:
            return expr
        for other, keep in ((inner["left"], inner["right"]), (inner["right"], inner["left"])):
            known = self._expr_facts(other)
            if known.nulls:
                continue
            if mode == "present":
                return self._mask_input(keep, mode)
            kept = self._expr_facts(keep)
            if known.zeros or not known.finite or known.smallest is None or kept.smallest is None \
                    or known.smallest * kept.smallest <= 1e-300:
                continue
            if self._result_dtype(inner) == pl.Float64:
                return self._mask_input(keep, mode)
        return expr

    def _contributors(self, node: dict, mask: pl.Expr | None,
                      masked_by: tuple[dict, str] | None = None) -> pl.Expr | None:
        """The source rows (people) of ``node["column"]`` among the rows where ``mask`` holds, per group.

        ``implicit``: the rows; ``rid``: distinct row (person) ids; ``count``:
        the summed counts of aggregated rows when they are fed by disjoint
        source rows, else the rows.  Null when no row of the group comes from
        the source (after a concat).  ``mask`` None: every row; a null in
        ``mask`` counts as false.  ``masked_by``: see :meth:`_distinct_ids`.
        """
        column = node["column"]
        if node["kind"] == "implicit":
            if mask is None and self.extra_aggs is not None:
                self.post_aggs.append(self._group_len().alias(node["name"]))
                return self._placeholder(node)
            return (pl.len() if mask is None else mask.sum()).alias(node["name"])
        if node["kind"] == "rid":
            counted = self._distinct_ids(node, mask, masked_by)
            if counted is not None:
                # No "fed" guard: ids are null only after a concat, and no words reach an aggregation through one
                # (Compiler._concat drops them), so every group is fed by this source.
                self.post_aggs.append(counted.alias(node["name"]))
                return self._placeholder(node)
            rid = pl.col(column)
            count = rid.filter((rid > 0) if mask is None else mask & (rid > 0)).n_unique()
        else:
            counts = pl.col(column)
            fed = (counts > 0) if mask is None else mask & (counts > 0)
            count = counts.filter(fed).sum() if node["exact"] else fed.sum()
        # A group with no row of this source (after a concat) was not fed by it.
        return pl.when(pl.col(column).is_not_null().any()).then(count).alias(node["name"])

    def _acct_held(self, node: dict) -> pl.Expr | None:
        """How many source rows (people) hold the value an order statistic releases, per group.

        For ``min``, ``max``, ``median`` and ``quantile``: the contributors
        whose input equals the aggregate (a median between two values is held
        by nobody).  For ``n_unique``: the fewest rows (people) holding one of
        the distinct values it counts (null is a value for ``n_unique``), among
        the rows the aggregation keeps (``kept``: its inner filters); values
        no row of this source holds are not this source's.  On aggregated
        rows (``count``), each row's count of source rows is a lower bound of
        the people behind its value.
        """
        call = node["call"]
        if node["kind"] == "implicit" and call["name"] in ("min", "max"):
            held = self._key_stat(call["input"], f"held_{call['name']}")
            if held is not None:
                return self._from_key_stats(node, held, 0)
        value = self.expr(call["input"])
        column = node["column"]
        if call["name"] != "n_unique":
            held = (value == self.expr(call)).fill_null(False)
            return self._contributors(node, held)
        kept = pl.lit(True) if node["kept"] is None else self.expr(node["kept"]).fill_null(False)
        # value_counts, not unique_counts: polars' streaming engine fails on a
        # filtered unique_counts in a select.
        if node["kind"] == "implicit":
            return _fewest_holders(value.alias("value").filter(kept)).alias(node["name"])
        if node["kind"] == "rid":
            rid = pl.col(column)
            pairs = pl.struct(value.alias("value"), rid.alias("id")).filter(kept & (rid > 0)).unique()
            fewest = _fewest_holders(pairs.struct.field("value"))
        else:
            counts = pl.col(column)
            fewest = counts.filter(kept & (counts > 0)).min()
        return pl.when(pl.col(column).is_not_null().any()).then(fewest).alias(node["name"])

    def _acct_share(self, node: dict) -> pl.Expr | None:
        """Whether a contribution dominates an aggregate: 0 no, 1 yes, 2 unsure (measure exactly).

        Each contribution's distance is taken from its group's median, so
        adding a constant to every row changes nothing and amplified
        contributions cannot move the centre.  With ``top_two`` (millionths),
        the N-K rule: the two largest distances make up more than that share
        of the total; with ``p_ratio``, the p-ratio rule: the total minus the
        two largest is less than that share of the largest; with ``largest``,
        the largest alone makes up more than that share.

        Without ``exact``, a bound from plain aggregates (count, variance,
        max, min) clears a group whatever its median: every distance is at
        most the range R = max - min, and their total is at least n * var / R
        (the squared distances from the median add up to at least n * var,
        and each is at most R times the distance), so no rule can fire when
        n * var >= F * R**2 (:func:`_clearing_factor`).  Large groups of
        ordinary values are cleared this way; a group that is not is 2, and
        the executor measures the plan again with ``exact``.  A variance or
        range that is not a finite number is 1 (fail closed).

        When the owner's facts bound the values (finite, within [low, high]
        over the whole table), the range of the facts stands for each
        group's: it is at least as large, so a group it clears the group's
        own range clears too, and the flag is otherwise the same (1 exactly
        when n * var is not finite), or 2 where the group's own range might
        still clear it.  That saves two aggregations; the engine runs the
        query again with groups' own ranges when a group is left at 2
        (``ranged_shares``, :meth:`PolarsEngine.run`).
        """
        name = node["name"]
        inside = self.extra_aggs is not None
        if not node["exact"]:
            stats = {label: self._key_stat(node["input"], stat)
                     for label, stat in (("n", "count"), ("var", "var"), ("max", "max"), ("min", "min"))}
            if all(part is not None for part in stats.values()):
                return self._from_key_stats(node, _bound_flag(node, stats), 1)
            raw = self.expr(node["input"])
            try:
                dtype = self._dtype(raw, "aggregation")
            except BastionError:
                dtype = pl.Null  # a type error: the aggregation's own schema reports it, naming the operation
            parts, cast_after = share_parts(raw, dtype)
            facts = self._expr_facts(node["input"])
            counted = not facts.nulls  # no null to leave out of the count: the group's length
            ranged = inside and self.fact_ranges and facts.magnitude is not None
            if ranged:
                miss = self._range_key(node)
                ranged = miss not in self.cache.range_misses
            if ranged:
                del parts["max"], parts["min"]
                self.ranged_shares.append((name, miss))
            if counted:
                del parts["n"]
            if inside:
                parts = {label: self._helper_agg(node, label, expr) for label, expr in parts.items()}
            if counted:
                parts["n"] = self._group_len() if inside else pl.len()
            if ranged:
                parts["max"], parts["min"] = pl.lit(facts.high, dtype=pl.Float64), pl.lit(facts.low, dtype=pl.Float64)
            elif cast_after:
                parts["max"], parts["min"] = parts["max"].cast(pl.Float64), parts["min"].cast(pl.Float64)
            return self._finish_share(node, _bound_flag(node, parts), inside)
        value = self.expr(node["input"]).cast(pl.Float64, strict=False)
        if inside and f"{name}__distance" in self.scope.collect_schema().names():
            def part(label: str, expr: pl.Expr) -> pl.Expr:
                return self._helper_agg(node, label, expr)
            median = part("median", pl.col(f"{name}__median").first())
            largest_value = part("max", pl.col(f"{name}__max").first())
            smallest_value = part("min", pl.col(f"{name}__min").first())
            second_largest = pl.when(part("maxes", pl.col(f"{name}__at_max").sum()) > 1).then(largest_value) \
                .otherwise(part("below", pl.col(f"{name}__below_max").max()))
            second_smallest = pl.when(part("mins", pl.col(f"{name}__at_min").sum()) > 1).then(smallest_value) \
                .otherwise(part("above", pl.col(f"{name}__above_min").min()))
            total = part("total", pl.col(f"{name}__distance").sum())
            # The two largest distances on each side of the median (a side may have one value, or none: 0).
            high1 = (largest_value - median).clip(0)
            high2 = (second_largest - median).fill_null(median).clip(0)
            low1 = (median - smallest_value).clip(0)
            low2 = (median - second_smallest).fill_null(median).clip(0)
            top_one = pl.max_horizontal(high1, low1)
            top_two = pl.max_horizontal(high1 + high2, high1 + low1, low1 + low2)
        else:
            inside = False
            distance = (value - value.median()).abs()
            total, top_one, top_two = distance.sum(), distance.max(), distance.top_k(2).sum()
        dominated = ~total.is_finite()
        if node.get("top_two") is not None:
            dominated = dominated | ((total > 0) & (top_two > total * node["top_two"] / 1_000_000))
        if node.get("p_ratio") is not None:
            dominated = dominated | ((top_one > 0) & (total - top_two < top_one * node["p_ratio"] / 1_000_000))
        if node.get("largest") is not None:
            dominated = dominated | ((total > 0) & (top_one > total * node["largest"] / 1_000_000))
        return self._finish_share(node, dominated.fill_null(False).cast(ACCOUNT_DTYPE), inside)

    def _range_key(self, node: dict) -> tuple:
        """What identifies a share measure whose facts' range once left a group unsure (``range_misses``)."""
        tables = tuple(sorted(id(t) for t in self.scan_tables.values() if t is not None))
        return json.dumps(node["input"], sort_keys=True), json.dumps(self.agg_node, sort_keys=True,
                                                                     default=str)[:10_000], tables

    def _finish_share(self, node: dict, flag: pl.Expr, inside: bool) -> pl.Expr | None:
        # Inside an aggregation the flag combines helper aggregations: it is computed after it.
        if not inside:
            return flag.alias(node["name"])
        self.post_aggs.append(flag.alias(node["name"]))
        return self._placeholder(node)

    def _acct_finite(self, node: dict) -> pl.Expr | None:
        """1 when an aggregate is finite and did not overflow, else 0 (inf, -inf, NaN, a wrapped integer sum)."""
        call = node["call"]
        aggregate = self.expr(call)
        dtype = self._dtype(aggregate, "aggregation")
        checked = dtype.is_float() or (dtype.is_integer() and call["name"] == "sum")
        inside = self.extra_aggs is not None
        if not checked or self._finite_proved(call, dtype):
            finite = pl.lit(1, dtype=ACCOUNT_DTYPE).alias(node["name"])
            if not inside:
                return finite
            self.post_aggs.append(finite)
            return self._placeholder(node)
        if dtype.is_float():
            # Inside an aggregation, the aggregate is the scientist's own (polars computes it once) and is
            # tested after it: an elementwise test of an aggregate inside ``agg`` is off polars' fast path.
            value = self._helper_agg(node, "value", aggregate) if inside else aggregate
            finite = value.is_finite().fill_null(True)
        else:
            # polars wraps an integer sum around on overflow: the same sum in
            # floating point says whether it left the type's range (with a
            # margin for the float's rounding).
            low, high = _INTEGER_RANGE[str(dtype)]
            approximate = self.expr(call["input"]).cast(pl.Float64, strict=False).sum()
            if inside:
                approximate = self._helper_agg(node, "approximate", approximate)
            finite = approximate.is_between(low * _RANGE_MARGIN, high * _RANGE_MARGIN).fill_null(True)
        finite = finite.cast(ACCOUNT_DTYPE).alias(node["name"])
        if not inside:
            return finite
        self.post_aggs.append(finite)
        return self._placeholder(node)



def _bound_flag(node: dict, parts: Mapping[str, pl.Expr]) -> pl.Expr:
    """The dominance bound's flag from a group's count, variance, max and min (see ``_acct_share``)."""
    spread = parts["max"] - parts["min"]
    spread_total = parts["n"].cast(pl.Float64) * parts["var"]
    return (pl.when(~spread_total.is_finite() | ~spread.is_finite()).then(1)
            .when((spread == 0) | (spread_total >= _clearing_factor(node) * spread ** 2)).then(0)
            .otherwise(UNSURE))


def _clearing_factor(node: dict) -> float:
    """F such that n * var >= F * range**2 proves no dominance rule of ``node`` can fire.

    With T >= n * var / R the total distance and every distance <= R: the
    N-K rule needs 2R > k T, cleared when T >= (2 / k) R; the p-ratio rule
    needs T - 2R < p R, cleared when T >= (2 + p) R; the largest-share rule
    needs R > s T, cleared when T >= R / s.
    """
    factors = [1.0]
    if node.get("top_two") is not None:
        factors.append(2 / (node["top_two"] / 1_000_000))
    if node.get("p_ratio") is not None:
        factors.append(2 + node["p_ratio"] / 1_000_000)
    if node.get("largest") is not None:
        factors.append(1 / (node["largest"] / 1_000_000))
    return max(factors)


# The range of each integer type an integer sum can have, and the share of it
# within which a sum computed in floating point is surely not wrapped around.
_INTEGER_RANGE = {f"{sign}Int{bits}": (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if sign == "" else
                  (0.0, 2.0 ** bits - 1) for sign in ("", "U") for bits in (8, 16, 32, 64, 128)}
_RANGE_MARGIN = 0.999_999
