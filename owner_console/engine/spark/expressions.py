"""Plan expressions -> PySpark ``Column`` objects with the polars engine's semantics.

Every function the plan language names is built from an explicit table
(:data:`ELEMENTWISE`, :data:`AGGREGATES`, :data:`SEQUENCE`), keyed by the plan's
own function names; a name not in them is refused with
``UnsupportedOperation`` naming it (:data:`UNSUPPORTED` says why for the
ones that are known).  Columns are only ever built with DataFrame API calls
(``pyspark.sql.functions``), never from SQL text.

Where polars and Spark differ, the Spark form follows polars: division by
zero gives inf or NaN (Spark gives null), ``%`` and ``//`` round toward minus
infinity, integer results wrap at the width polars computes them in (the
polars dtype of each node, :class:`~.types.PolarsTypes`), ``max`` skips NaN,
an empty ``sum`` is 0, ``n_unique`` counts null as a value, casts that do not
fit give null (Spark would wrap or saturate), string patterns are Rust
regular expressions (translated to Java's: Unicode classes, ``$`` at the very
end only, first-match ``replace``).

Shapes.  In an aggregation (``group_by().agg()``, a global ``select``) an
expression is one value per group (an aggregate, a literal) or a sequence of
the group's rows, possibly filtered (``filter``), reordered (``sort_by``) or
cut (``head``, ``tail``): :class:`Seq` carries that sequence as per-row values
plus a mask and a position.  A sequence left unreduced at the top is the
group's list, in row order.  An aggregate used row by row (``x - x.mean()``,
``over``) becomes a window over the group (or the whole frame, or ``over``'s
partition), computed as a column of its own before the aggregation: Spark
allows no window inside an aggregate function, nor a filter on a window.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import polars as pl
from pyspark.sql import Column, Window
from pyspark.sql import functions as F

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from ..compile import MAX_REPEAT
from .types import spark_type

if TYPE_CHECKING:
    from .compile import Frame, SparkCompiler

_MAX_EXPONENT = (1 << 32) - 1
_INF = float("inf")
_NAN = float("nan")


def column(name: str) -> Column:
    """A column by its exact name (dots, spaces and backquotes are part of the name, not syntax)."""
    return F.col("`" + name.replace("`", "``") + "`")


def unsupported(function: str, why: str) -> BastionError:
    """The refusal of a function the Spark engine does not run faithfully."""
    return BastionError("UnsupportedOperation", f"{function} is not supported on the Spark engine: {why}",
                        function=function, engine="spark")


@dataclass(frozen=True)
class Seq:
    """A sequence of values in a group, one per row of the frame.

    ``mask``: the rows in the sequence (None: every row); ``pos``: the column
    that orders it (None: the frame's row order); ``distinct``: only its
    distinct values count (``unique``); ``scalar``: one value for the whole
    group (a literal, or an aggregate broadcast to the rows); ``shape``: what
    was done to the rows (two sequences line up only with the same shape).
    """

    value: Column
    mask: Column | None = None
    pos: Column | None = None
    distinct: bool = False
    scalar: bool = False
    shape: tuple = ()

    def masked(self) -> Column:
        """The values, null outside the mask (aggregations skip nulls)."""
        return self.value if self.mask is None else F.when(self.mask, self.value)

    def plain(self) -> bool:
        return self.mask is None and self.pos is None and not self.distinct


# ---------------------------------------------------------------- shapes
_LEVEL = {"lit": 0, "agg": 1, "row": 2}
_SEQUENCE_FUNCTIONS = ("filter", "sort_by", "head", "tail", "unique")
# Aggregations whose value in a group is a list of its values.
_LIST_RESULTS = ("implode", "mode", "head", "tail", "unique")


def shape_of(node: dict) -> str:
    """``lit`` (a constant), ``agg`` (one value per group) or ``row`` (one value per row, or a sequence)."""
    kind = node["expr"]
    if kind == "col":
        return "row"
    if kind == "lit":
        return "lit"
    if kind == "len":
        return "agg"
    if kind == "alias":
        return shape_of(node["input"])
    if kind == "unary":
        return shape_of(node["operand"])
    if kind == "binary":
        return _widest(shape_of(node["left"]), shape_of(node["right"]))
    if kind == "when":
        parts = [p for b in node["branches"] for p in (b["when"], b["then"])]
        parts += [node["otherwise"]] if node["otherwise"] is not None else []
        return _widest(*[shape_of(p) for p in parts])
    if kind == "fn":
        name = node["name"]
        inner = shape_of(node["input"])
        if name == "over":
            return "row"
        if name in _SEQUENCE_FUNCTIONS:
            return inner
        spec = P.EXPR_FUNCTIONS[name]
        if spec.kind in ("aggregate", "row_aggregate"):
            return "agg"
        return _widest(inner, *[shape_of(a) for a in _expr_args(node)])
    raise AssertionError(f"not a plan expression: {kind!r}")


def _widest(*shapes: str) -> str:
    return max(shapes, key=_LEVEL.__getitem__, default="lit")


def _expr_args(node: dict) -> list[dict]:
    found = []
    for param, ptype in P.EXPR_FUNCTIONS[node["name"]].params:
        if ptype == "expr":
            found.append(node["args"][param])
        elif ptype == "exprs":
            found.extend(node["args"][param])
    return found


def _fn_nodes(node: dict) -> list[dict]:
    """The function calls in an expression, outermost first."""
    found = []
    stack = [node]
    while stack:
        item = stack.pop(0)
        if item.get("expr") == "fn":
            found.append(item)
        stack.extend(walk.expr_children(item))
    return found


def _key(node: dict) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------- scope
class Scope:
    """Compiles expressions over one frame, in one context.

    Parameters
    ----------
    compiler : SparkCompiler
        Names hidden columns, knows the polars dtypes.
    frame : Frame
        The input; columns the expressions need first (windows, positions)
        are added to ``frame.df`` as hidden columns (:meth:`pre`).
    partition : list of Column
        What a window over "the group" partitions by: the group keys in a
        ``group_by``, nothing (the whole frame) elsewhere.
    """

    def __init__(self, compiler: "SparkCompiler", frame: "Frame", frame_node: dict, exprs: list[dict],
                 partition: list[Column] | None = None):
        self.compiler = compiler
        self.frame = frame
        self.partition = list(partition or [])
        # True in a select or group_by (the polars engine measures dominance there from per-group extremes).
        self.aggregation = False
        self.added: list[str] = []
        self._positions: dict[str, Column] = {}
        self._ranks: dict[str, tuple[Column, Column]] = {}
        compiler.types.prepare(frame_node, exprs)

    # -- helpers ---------------------------------------------------------------
    @property
    def df(self) -> Any:
        return self.frame.df

    def dtype(self, node: dict) -> pl.DataType | None:
        return self.compiler.types.dtype(node)

    def window(self, partition: list[Column] | None = None) -> Any:
        return Window.partitionBy(*(self.partition if partition is None else partition))

    def pre(self, value: Column, label: str = "w") -> Column:
        """``value`` computed as a hidden column of the frame first (a window, a position): a reference to it."""
        name = self.compiler.hidden(label)
        self.frame.df = self.frame.df.withColumn(name, value)
        self.added.append(name)
        return column(name)

    def drop_added(self) -> None:
        """Remove the hidden columns this scope added (once what used them is computed)."""
        if self.added:
            self.frame.df = self.frame.df.drop(*self.added)
            self.added = []

    def order(self) -> list[Column]:
        return self.frame.sort_columns() or [F.lit(0)]

    def position(self, seq: Seq | None = None, partition: list[Column] | None = None) -> Column:
        """The column ordering ``seq`` in its group: its own, else the row's place in the frame's order."""
        if seq is not None and seq.pos is not None:
            return seq.pos
        key = repr([str(c) for c in (self.partition if partition is None else partition)])
        found = self._positions.get(key)
        if found is None:
            found = self._positions[key] = self.pre(
                F.row_number().over(self.window(partition).orderBy(*self.order())), "pos")
        return found

    def ranks(self, value: Column) -> tuple[Column, Column]:
        """Each row's rank by ``value`` in its group (from 0, nulls last) and the group's count of values.

        One sort per value and group, whichever quantiles of it are asked for.
        """
        key = repr([str(value)] + [str(c) for c in self.partition])
        found = self._ranks.get(key)
        if found is None:
            rank = self.pre(F.row_number().over(self.window().orderBy(value.asc_nulls_last())) - 1, "rank")
            found = self._ranks[key] = (rank, self.pre(F.count(value).over(self.window()), "count"))
        return found

    def fit(self, value: Column, node: dict, wrap: bool = False) -> Column:
        """``value`` in the Spark type of ``node``'s polars dtype; ``wrap``: an unsigned result wraps around."""
        dtype = self.dtype(node)
        if dtype is None or isinstance(dtype, (pl.List, pl.Null, pl.Struct)):
            return value
        if wrap and dtype in (pl.UInt8, pl.UInt16, pl.UInt32):
            value = F.pmod(value.cast("long"), F.lit(1 << {pl.UInt8: 8, pl.UInt16: 16, pl.UInt32: 32}[dtype]))
        return value.cast(spark_type(dtype))

    # -- the contexts ------------------------------------------------------------
    def row_value(self, node: dict) -> Column:
        """``node`` as one value per row (with_columns, filter, a row-level select, sort and group keys)."""
        shape = shape_of(node)
        if shape == "lit":
            return self.agg(node, None)
        if shape == "agg":
            return self.agg(node, self.window())
        seq = self.row(node)
        if not seq.plain():
            name = next((n["name"] for n in _fn_nodes(node) if n["name"] in _SEQUENCE_FUNCTIONS), "filter")
            raise unsupported(name, f"{name}() changes how many values a column has, or their order, so outside "
                                    "an aggregation its values no longer line up with the rows; use it inside one")
        return seq.value

    def agg_value(self, node: dict) -> Column:
        """``node`` as one value per group, for ``groupBy().agg()`` (a row-level expression: the group's list)."""
        if shape_of(node) == "row":
            return self.list_of(self.row(node), None, node)
        return self.agg(node, None)

    # -- row level ---------------------------------------------------------------
    def row(self, node: dict) -> Seq:
        """``node`` row by row: a :class:`Seq` (aggregates inside are windows over the group)."""
        kind = node["expr"]
        if kind == "col":
            return Seq(column(node["name"]))
        if kind == "alias":
            return self.row(node["input"])
        shape = shape_of(node)
        if shape == "lit":
            return Seq(self.agg(node, None), scalar=True)
        if shape == "agg":
            return Seq(self.pre(self.agg(node, self.window())), scalar=True)
        if kind == "unary":
            operand = self.row(node["operand"])
            return replace(operand, value=self._unary(node, operand.value), scalar=False)
        if kind == "binary":
            left, right = self.row(node["left"]), self.row(node["right"])
            base = self._aligned(node, left, right)
            return replace(base, value=self._binary(node, left.value, right.value), scalar=False)
        if kind == "when":
            parts = [(self.row(b["when"]), self.row(b["then"])) for b in node["branches"]]
            otherwise = None if node["otherwise"] is None else self.row(node["otherwise"])
            flat = [s for pair in parts for s in pair] + ([otherwise] if otherwise is not None else [])
            base = self._aligned(node, *flat)
            value = self._when(node, [(c.value, t.value) for c, t in parts],
                               None if otherwise is None else otherwise.value)
            return replace(base, value=value, scalar=False)
        if kind == "fn":
            return self._row_fn(node)
        raise BastionError("UnsupportedOperation", f"the expression {kind!r} is not supported on the Spark engine",
                           engine="spark")

    def _aligned(self, node: dict, *parts: Seq) -> Seq:
        """The sequence that ``parts`` share (scalars line up with anything)."""
        rows = [p for p in parts if not p.scalar]
        if not rows:
            return parts[0]
        first = rows[0]
        if any(p.shape != first.shape for p in rows[1:]):
            raise BastionError("UnsupportedOperation", "an expression combines sequences of different lengths "
                                                       "or orders (a filtered or sorted column with another); "
                                                       "reduce each one first", engine="spark")
        return first

    def _row_fn(self, node: dict) -> Seq:
        name = node["name"]
        if name == "over":
            return Seq(self._over(node))
        if name in SEQUENCE:
            return SEQUENCE[name](self, node)
        builder = ELEMENTWISE.get(name)
        if builder is None:
            raise _refused(name)
        seq = self.row(node["input"])
        args = {}
        parts = [seq]
        for param, ptype in P.EXPR_FUNCTIONS[name].params:
            if ptype == "expr":
                arg = self.row(node["args"][param])
                parts.append(arg)
                args[param] = arg.value
            elif ptype == "exprs":
                raise _refused(name)
            else:
                args[param] = node["args"][param]
        base = self._aligned(node, *parts)
        return replace(base, value=builder(self, node, seq.value, args), scalar=False)

    def _over(self, node: dict) -> Column:
        inner = node["input"]
        keys = [self.row_value(k) for k in node["args"]["partition_by"]]
        keys = [self.pre(k, "key") for k in keys]
        saved = self.partition
        self.partition = keys
        try:
            shape = shape_of(inner)
            if shape == "agg":
                return self.pre(self.agg(inner, self.window()))
            if shape == "lit":
                return self.agg(inner, None)
            seq = self.row(inner)
            if not seq.plain():
                raise unsupported("over", "the expression in over() must be an aggregate or row by row")
            return seq.value
        finally:
            self.partition = saved

    # -- group level -------------------------------------------------------------
    def agg(self, node: dict, window: Any) -> Column:
        """``node`` (an aggregate or constant shape) as one value per group; ``window``: as a window column."""
        kind = node["expr"]
        if kind == "lit":
            return _literal(node["value"])
        if kind == "len":
            return _over(F.count(F.lit(1)), window)
        if kind == "alias":
            return self.agg(node["input"], window)
        if kind == "unary":
            return self._unary(node, self.agg(node["operand"], window))
        if kind == "binary":
            return self._binary(node, self.agg(node["left"], window), self.agg(node["right"], window))
        if kind == "when":
            branches = [(self.agg(b["when"], window), self.agg(b["then"], window)) for b in node["branches"]]
            otherwise = None if node["otherwise"] is None else self.agg(node["otherwise"], window)
            return self._when(node, branches, otherwise)
        if kind == "fn":
            name = node["name"]
            spec = P.EXPR_FUNCTIONS[name]
            if spec.kind in ("aggregate", "row_aggregate"):
                return self.reduce(node, window)
            builder = ELEMENTWISE.get(name)
            if builder is None or name == "over":
                raise _refused(name)
            args = {}
            for param, ptype in spec.params:
                if ptype == "expr":
                    args[param] = self.agg(node["args"][param], window)
                elif ptype == "exprs":
                    raise _refused(name)
                else:
                    args[param] = node["args"][param]
            return builder(self, node, self.agg(node["input"], window), args)
        raise BastionError("UnsupportedOperation", f"the expression {kind!r} is not supported on the Spark engine",
                           engine="spark")

    def reduce(self, node: dict, window: Any) -> Column:
        """An aggregation call (``sum``, ``first``, ``implode``...) over its input's sequence."""
        name = node["name"]
        builder = AGGREGATES.get(name)
        if builder is None:
            raise _refused(name)
        inner = node["input"]
        if shape_of(inner) != "row":
            # One value (a literal, len(), an aggregate): polars aggregates that one value.
            one = ONE_VALUE.get(name)
            if one is None:
                raise _refused(name)
            return self.fit(one(self, node, self.agg(inner, window), window), node)
        seq = self.row(inner)
        result = builder(self, node, seq, window)
        if name in _LIST_RESULTS:
            return result  # polars types these by their items outside an aggregation: nothing to fit
        return self.fit(result, node, wrap=name == "sum")

    def list_of(self, seq: Seq, window: Any, node: dict | None = None) -> Column:
        """The sequence's values as the group's list, in its order (distinct values once, first seen first)."""
        pos = self.position(seq)
        entry = F.struct(pos.alias("p"), seq.value.alias("v"))
        if seq.mask is not None:
            entry = F.when(seq.mask, entry)
        values = F.transform(F.sort_array(_over(F.collect_list(entry), window)), lambda item: item.getField("v"))
        return F.array_distinct(values) if seq.distinct else values

    # -- operators -----------------------------------------------------------------
    def _unary(self, node: dict, value: Column) -> Column:
        op = node["op"]
        dtype = self.dtype(node)
        if op == "not":
            return ~value if dtype in (None, pl.Boolean) else F.bitwise_not(value)
        if op == "neg":
            return self.fit(-value, node, wrap=True)
        raise _refused(op)

    def _binary(self, node: dict, left: Column, right: Column) -> Column:
        op = node["op"]
        builder = BINARY.get(op)
        if builder is None:
            raise _refused(op)
        left_type, right_type = self.dtype(node["left"]), self.dtype(node["right"])
        result = builder(self, node, left, right, left_type, right_type)
        return self.fit(result, node, wrap=op in ("add", "sub", "mul", "pow"))

    def _when(self, node: dict, branches: list[tuple[Column, Column]], otherwise: Column | None) -> Column:
        target = self.dtype(node)
        spark = spark_type(target) if target is not None and not isinstance(target, (pl.Null, pl.List)) else None

        def fitted(value: Column) -> Column:
            return value if spark is None else value.cast(spark)

        chain = None
        for condition, then in branches:
            chain = F.when(condition, fitted(then)) if chain is None else chain.when(condition, fitted(then))
        return chain if otherwise is None else chain.otherwise(fitted(otherwise))


def _over(value: Column, window: Any) -> Column:
    return value if window is None else value.over(window)


def _literal(value: Any) -> Column:
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return F.lit(value)
    # polars types a whole-number literal Int32 when it fits, else Int64.
    return F.lit(value).cast("int" if -(1 << 31) <= value < (1 << 31) else "long")


def _refused(name: str) -> BastionError:
    why = UNSUPPORTED.get(name)
    if why is not None:
        return unsupported(name, why)
    return BastionError("UnsupportedOperation", f"{name} is not available on the Spark engine", function=name,
                        engine="spark")


def _is_float(dtype: pl.DataType | None) -> bool:
    return dtype is not None and dtype.is_float()


def _is_integer(dtype: pl.DataType | None) -> bool:
    return dtype is not None and dtype.is_integer()


def _is_temporal(dtype: pl.DataType | None) -> bool:
    return dtype is not None and (dtype == pl.Date or isinstance(dtype, (pl.Datetime, pl.Duration)))


# ---------------------------------------------------------------- binary operators
def _ieee_divide(left: Column, right: Column) -> Column:
    """``left / right`` in doubles as IEEE 754 does it: x / 0 is inf, -inf or NaN (Spark gives null)."""
    left, right = left.cast("double"), right.cast("double")
    by_zero = (F.when(left.isNull(), F.lit(None).cast("double"))
               .when(left.isNaN() | (left == 0), F.lit(_NAN))
               .when(left > 0, F.lit(_INF)).otherwise(F.lit(-_INF)))
    return F.when(right == 0, by_zero).otherwise(left / right)


def _floor_double(value: Column) -> Column:
    """floor() of a double as a double (Spark's floor returns a long): integral and non-finite values unchanged."""
    return F.when(value.isNaN() | (F.abs(value) >= F.lit(2.0 ** 52)), value).otherwise(F.floor(value).cast("double"))


def _add(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    if lt == pl.String or rt == pl.String:
        return F.concat(left.cast("string"), right.cast("string"))
    if _is_temporal(lt) or _is_temporal(rt):
        raise unsupported("add", "arithmetic on dates and times")
    return left + right


def _sub(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    if _is_temporal(lt) or _is_temporal(rt):
        if lt in (pl.Date,) and rt == pl.Date or isinstance(lt, pl.Datetime) and isinstance(rt, pl.Datetime):
            # polars: a Duration in microseconds; held as microseconds here (the result's cast makes it one).
            return _micros(left, lt) - _micros(right, rt)
        raise unsupported("sub", "arithmetic on dates and times other than the difference of two of a kind")
    return left - right


def _micros(value: Column, dtype: Any) -> Column:
    if dtype == pl.Date:
        return F.unix_date(value).cast("long") * F.lit(86_400_000_000)
    return F.unix_micros(value.cast("timestamp"))


def _mul(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    _no_temporal("mul", lt, rt)
    return left * right


def _truediv(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    _no_temporal("truediv", lt, rt)
    return _ieee_divide(left, right)


def _floordiv(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    _no_temporal("floordiv", lt, rt)
    if _is_integer(lt) and _is_integer(rt):
        quotient = F.call_function("div", left.cast("long"), right.cast("long"))
        inexact = (left % right != 0) & ((left < 0) != (right < 0))
        return F.when(right == 0, F.lit(None).cast("long")) \
            .when(inexact, quotient - 1).otherwise(quotient)
    return _floor_double(_ieee_divide(left, right))


def _mod(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    _no_temporal("mod", lt, rt)
    remainder = left % right  # Java's: the sign of the dividend; null when dividing by zero
    adjusted = F.when((remainder != 0) & ((remainder < 0) != (right < 0)), remainder + right).otherwise(remainder)
    if _is_integer(lt) and _is_integer(rt):
        return adjusted
    # Floats: x % 0 is NaN, and the sign rule only for finite remainders.
    return F.when(right.cast("double") == 0, F.when(left.isNull(), F.lit(None).cast("double")).otherwise(_NAN)) \
        .otherwise(adjusted)


def _pow(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
    _no_temporal("pow", lt, rt)
    if _is_integer(rt):
        right = F.when((right >= 0) & (right <= _MAX_EXPONENT), right)
    return F.pow(left, right)


def _no_temporal(op: str, *dtypes: Any) -> None:
    if any(_is_temporal(d) for d in dtypes):
        raise unsupported(op, "arithmetic on dates and times")


def _comparison(compare: Callable[[Column, Column], Column]) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
        return compare(left, right)
    return build


def _logical(op: str) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, left: Column, right: Column, lt: Any, rt: Any) -> Column:
        if lt in (None, pl.Boolean) and rt in (None, pl.Boolean):
            if op == "and":
                return left & right
            if op == "or":
                return left | right
            return left != right  # xor; null when either side is
        if not (_is_integer(lt) and _is_integer(rt)):
            raise unsupported(op, f"{op} of {lt} and {rt} values")
        return {"and": left.bitwiseAND, "or": left.bitwiseOR, "xor": left.bitwiseXOR}[op](right)
    return build


BINARY: dict[str, Callable[..., Column]] = {
    "add": _add, "sub": _sub, "mul": _mul, "truediv": _truediv, "floordiv": _floordiv, "mod": _mod, "pow": _pow,
    "eq": _comparison(lambda a, b: a == b), "ne": _comparison(lambda a, b: a != b),
    "lt": _comparison(lambda a, b: a < b), "le": _comparison(lambda a, b: a <= b),
    "gt": _comparison(lambda a, b: a > b), "ge": _comparison(lambda a, b: a >= b),
    "and": _logical("and"), "or": _logical("or"), "xor": _logical("xor"),
}


# ---------------------------------------------------------------- casts
_INT_RANGES = {pl.Int8: (-(1 << 7), (1 << 7) - 1), pl.Int16: (-(1 << 15), (1 << 15) - 1),
               pl.Int32: (-(1 << 31), (1 << 31) - 1), pl.Int64: (-(1 << 63), (1 << 63) - 1),
               pl.UInt8: (0, (1 << 8) - 1), pl.UInt16: (0, (1 << 16) - 1), pl.UInt32: (0, (1 << 32) - 1)}
# The strings polars' non-strict casts accept (anything else becomes null).
_INTEGER_TEXT = r"^[+-]?[0-9]+$"
_FLOAT_TEXT = r"^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|(?i:inf|infinity|nan))$"
_DATE_TEXT = r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}$"


def cast_value(value: Column, source: pl.DataType | None, target_name: str) -> Column:
    """polars' non-strict cast of ``value`` (of polars dtype ``source``) to the plan dtype ``target_name``."""
    target = {"Datetime": pl.Datetime("us")}.get(target_name) or getattr(pl, target_name)
    if target == pl.UInt64:
        raise unsupported("cast", "Spark has no unsigned 64-bit integer type")
    if source is None:
        raise unsupported("cast", "the type of the value to convert is not known")
    if source == target or (isinstance(source, pl.Datetime) and isinstance(target, pl.Datetime)
                            and source.time_zone is None):
        return value.cast(spark_type(target))
    if source == pl.Null:
        return value.cast(spark_type(target))
    spark = spark_type(target)
    if target in _INT_RANGES:
        low, high = _INT_RANGES[target]
        if source.is_integer():
            return F.when(value.between(F.lit(low), F.lit(high)), value.cast(spark))
        if source.is_float():
            return F.when(~value.isNaN() & (value > F.lit(float(low) - 1)) & (value < F.lit(float(high) + 1)),
                          value.cast(spark))
        if source == pl.Boolean:
            return value.cast(spark)
        if source == pl.String:
            whole = F.when(value.rlike(_INTEGER_TEXT), value.cast("decimal(38,0)"))
            return F.when(whole.between(F.lit(low), F.lit(high)), whole.cast(spark))
        if source == pl.Date:
            days = F.unix_date(value).cast("long")
            return F.when(days.between(F.lit(low), F.lit(high)), days.cast(spark))
        if isinstance(source, pl.Datetime) and source.time_zone is None:
            micros = _to_micros(value, source)
            return F.when(micros.between(F.lit(low), F.lit(high)), micros.cast(spark))
    elif target.is_float():
        if source.is_numeric() or source == pl.Boolean:
            return value.cast(spark)
        if source == pl.String:
            return F.when(value.rlike(_FLOAT_TEXT), value.cast(spark))
        if source == pl.Date:
            return F.unix_date(value).cast(spark)
        if isinstance(source, pl.Datetime) and source.time_zone is None:
            return _to_micros(value, source).cast(spark)
    elif target == pl.Boolean:
        if source.is_numeric():
            return value != 0
    elif target == pl.String:
        if source.is_integer() or source in (pl.Boolean, pl.Date):
            return value.cast("string")
        if isinstance(source, pl.Datetime) and source.time_zone is None:
            digits = {"ms": "SSS", "us": "SSSSSS", "ns": "SSSSSSSSS"}[source.time_unit]
            return F.date_format(value, f"yyyy-MM-dd HH:mm:ss.{digits}")
        if source.is_float():
            raise unsupported("cast", "polars and Spark write floating-point numbers as text differently "
                                      "(1e20 or 1.0E20); round() them, or cast to an integer first")
    elif target == pl.Date:
        if source == pl.String:
            return F.when(value.rlike(_DATE_TEXT), value.cast("date"))
        if isinstance(source, pl.Datetime) and source.time_zone is None:
            return value.cast("date")
        if source.is_integer():
            return F.when(value.between(F.lit(-(1 << 31)), F.lit((1 << 31) - 1)),
                          F.date_from_unix_date(value.cast("int")))
    elif isinstance(target, pl.Datetime):
        if source == pl.Date:
            return value.cast("timestamp_ntz")
        if source.is_integer():
            return F.timestamp_micros(value.cast("long")).cast("timestamp_ntz")
    raise unsupported("cast", f"a cast from {source} to {target_name}")


def _to_micros(value: Column, source: pl.Datetime) -> Column:
    micros = F.unix_micros(value.cast("timestamp"))
    if source.time_unit == "ms":
        return F.floor(micros / 1000).cast("long")
    return micros


# ---------------------------------------------------------------- patterns and formats
_RUST_META = set("\\.+*?()|[]{}^$#&-~")


def _is_literal_pattern(pattern: str) -> bool:
    """polars takes a pattern without any regex meta character as plain text."""
    return not any(ch in _RUST_META for ch in pattern)


def java_regex(pattern: str) -> str:
    """A Rust regex (polars) as the Java regex that matches the same strings.

    Unicode classes and case folding (``(?U)``), ``.`` stops at ``\\n`` only
    (``(?d)``), and ``$`` outside a class is the very end of the text (Java's
    also matches before a final line break) unless the pattern turns
    multi-line mode on.
    """
    if "[[:" in pattern:
        raise unsupported("str.contains", "POSIX character classes ([[:alpha:]]) in a pattern")
    text = pattern.replace("(?P<", "(?<")
    multiline = re.search(r"\(\?[a-zA-Z]*m", text) is not None
    out = []
    in_class = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i:i + 2])
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            if text[i + 1:i + 2] == "]":  # a literal ] first in a class
                out.append("[]")
                i += 2
                continue
        elif ch == "$" and not multiline:
            out.append(r"\z")
            i += 1
            continue
        out.append(ch)
        i += 1
    return "(?U)(?d)" + "".join(out)


def java_replacement(value: str, shift: int = 0) -> str:
    """A polars (Rust) replacement string as Java's: ``$n`` / ``${name}`` groups, everything else literal."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "$":
            out.append("\\\\" if ch == "\\" else ch)
            i += 1
            continue
        if value[i + 1:i + 2] == "$":
            out.append("\\$")
            i += 2
            continue
        braced = re.match(r"\{([A-Za-z0-9_]+)\}", value[i + 1:])
        plain = re.match(r"[A-Za-z0-9_]+", value[i + 1:])
        found = braced or plain
        if found is None:
            out.append("\\$")
            i += 1
            continue
        name = found.group(1) if braced else found.group(0)
        out.append(f"${int(name) + shift}" if name.isdigit() else "${" + name + "}")
        i += 1 + found.end()
    return "".join(out)


# chrono's strftime specifiers -> Java DateTimeFormatter patterns, for formatting and for parsing (parsing
# takes numbers with fewer digits, as chrono does).
_FORMAT = {"Y": "yyyy", "m": "MM", "d": "dd", "H": "HH", "M": "mm", "S": "ss", "y": "yy", "b": "MMM",
           "h": "MMM", "B": "MMMM", "a": "EEE", "A": "EEEE", "j": "DDD", "I": "hh", "p": "a", "e": "d",
           "F": "yyyy-MM-dd", "T": "HH:mm:ss", "R": "HH:mm", "D": "MM/dd/yy", "f": "SSSSSSSSS",
           ".f": ".SSSSSS", ".3f": ".SSS", ".6f": ".SSSSSS", ".9f": ".SSSSSSSSS", "3f": "SSS", "6f": "SSSSSS",
           "9f": "SSSSSSSSS"}
_PARSE = {**_FORMAT, "m": "M", "d": "d", "H": "H", "M": "m", "S": "s", "I": "h", "j": "D",
          "F": "yyyy-M-d", "T": "H:m:s", "R": "H:m", ".f": "[.SSSSSS]"}
_SPECIFIER = re.compile(r"%(\.?[369]?f|[A-Za-z%])")


def java_datetime_format(fmt: str, function: str, parse: bool) -> str:
    """A chrono format string (``%Y-%m-%d``) as a Java DateTimeFormatter pattern."""
    table = _PARSE if parse else _FORMAT
    out = []
    literal = []

    def flush() -> None:
        if literal:
            text = "".join(literal).replace("'", "''")
            out.append(f"'{text}'")
            literal.clear()

    i = 0
    while i < len(fmt):
        match = _SPECIFIER.match(fmt, i)
        if fmt[i] == "%" and match is None:
            raise unsupported(function, f"the format {fmt!r} has a specifier the Spark engine does not know")
        if match is None:
            literal.append(fmt[i])
            i += 1
            continue
        spec = match.group(1)
        if spec == "%":
            literal.append("%")
        else:
            pattern = table.get(spec)
            if pattern is None:
                raise unsupported(function, f"the format specifier %{spec} has no Spark equivalent")
            if parse and spec in ("m", "d", "H", "M", "S") and _SPECIFIER.match(fmt, match.end()):
                pattern = _FORMAT[spec]  # two numbers with nothing between: fixed widths
            flush()
            out.append(pattern)
        i = match.end()
    flush()
    return "".join(out)


# ---------------------------------------------------------------- elementwise functions
def _is_in(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    values = [v for v in args["values"] if v is not None]
    dtype = scope.dtype(node["input"])
    if not values:
        return F.when(value.isNotNull(), F.lit(False))
    spark = spark_type(dtype) if dtype is not None and dtype != pl.Null else None
    items = [F.lit(v) if spark is None else F.lit(v).cast(spark) for v in values]
    return F.when(value.isNotNull(), value.isin(*items))


def _is_between(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    closed = args["closed"]
    low = value >= args["lower"] if closed in ("both", "left") else value > args["lower"]
    high = value <= args["upper"] if closed in ("both", "right") else value < args["upper"]
    return low & high


def _fill_null(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    dtype = scope.dtype(node)
    if dtype is None or isinstance(dtype, (pl.List, pl.Null)):
        return F.coalesce(value, args["value"])
    spark = spark_type(dtype)
    return F.coalesce(value.cast(spark), args["value"].cast(spark))


def _cast(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    return cast_value(value, scope.dtype(node["input"]), args["dtype"])


def _round(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    if not _is_float(scope.dtype(node["input"])):
        return value
    # polars rounds half to even, as bround does; NaN and infinities stay.
    return F.when(value.isNaN() | (F.abs(value) == _INF), value).otherwise(F.bround(value, args["decimals"]))


def _clip(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    dtype = scope.dtype(node)
    spark = spark_type(dtype) if dtype is not None else None
    result = value
    for bound, pick in ((args["lower"], F.greatest), (args["upper"], F.least)):
        if bound is not None:
            limit = F.lit(bound) if spark is None else F.lit(bound).cast(spark)
            result = pick(result, limit)
    keep = value.isNull()
    if _is_float(scope.dtype(node["input"])):
        keep = keep | value.isNaN()
    return F.when(keep, value).otherwise(result)


def _log(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    value = value.cast("double")
    natural = (F.when(value > 0, F.log(value)).when(value == 0, F.lit(-_INF))
               .when(value.isNull(), F.lit(None).cast("double")).otherwise(F.lit(_NAN)))
    base = args["base"]
    if base <= 0:
        return F.when(value.isNotNull(), F.lit(_NAN))
    return _ieee_divide(natural, F.lit(math.log(base)))


def _pow_fn(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    exponent_type = scope.dtype(node["args"]["exponent"])
    return scope.fit(_pow(scope, node, value, args["exponent"], scope.dtype(node["input"]), exponent_type),
                     node, wrap=True)


def _str_slice(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    offset, length = args["offset"], args["length"]
    size = F.char_length(value)
    start = F.lit(offset) if offset >= 0 else size + F.lit(offset)  # 0-based, may be before the start
    end = size if length is None else start + F.lit(int(length))
    first = F.greatest(start, F.lit(0))
    last = F.least(end, size)
    return F.when(value.isNull(), value).when(last <= first, F.lit("")) \
        .otherwise(F.substring(value, first + 1, last - first))


def _str_contains(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    pattern = args["pattern"]
    if args["literal"] or _is_literal_pattern(pattern):
        return value.contains(F.lit(pattern))
    return value.rlike(java_regex(pattern))


def _str_replace(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    pattern, new = args["pattern"], args["value"]
    if args["literal"] or _is_literal_pattern(pattern):
        at = F.locate(pattern, value) if pattern else F.lit(1)
        after = at + F.lit(len(pattern))
        replaced = F.concat(F.substring(value, 1, at - 1) if pattern else F.lit(""), F.lit(new),
                            F.substring(value, after, 1 << 30))
        return F.when(value.isNull(), value).when(at == 0, value).otherwise(replaced)
    # The first match only (polars' replace): the lazy prefix stops at the leftmost match; the pattern's
    # groups move up by one behind it.
    regex = java_regex(pattern)
    flags, body = regex[:8], regex[8:]
    return F.regexp_replace(value, flags + r"\A((?s:.*?))(?:" + body + ")", "$1" + java_replacement(new, 1))


def _strip_chars(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    characters = args["characters"]
    if characters is None:
        return F.regexp_replace(value, r"(?U)\A\s+|\s+\z", "")
    if characters == "":
        return value
    return F.btrim(value, F.lit(characters))


def _to_date(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    return F.to_date(value, java_datetime_format(args["format"], "str.to_date", parse=True))


def _to_datetime(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    if "%z" in args["format"] or "%Z" in args["format"]:
        raise unsupported("str.to_datetime", "time zones in the format")
    return F.to_timestamp_ntz(value, F.lit(java_datetime_format(args["format"], "str.to_datetime", parse=True)))


def _strftime(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    is_date = scope.dtype(node["input"]) == pl.Date
    parts: list[Column] = []
    for chunk, special in _split_format(args["format"]):
        if special is None:
            parts.append(F.date_format(value, java_datetime_format(chunk, "dt.strftime", parse=False)))
        else:
            parts.append(_special_field(special, value, is_date))
    if len(parts) == 1:
        return parts[0]
    return F.when(value.isNotNull(), F.concat(*parts))


# chrono specifiers Java's patterns cannot write: space-padded numbers, and %.f, the fraction of a second
# with as many digits as it needs (none, 3, 6 or 9).
_SPECIAL = ("e", "k", "l", ".f")


def _split_format(fmt: str) -> list[tuple[str, str | None]]:
    """``fmt`` cut into runs of ordinary text and specifiers, and the special specifiers alone."""
    pieces: list[tuple[str, str | None]] = []
    run = []
    i = 0
    while i < len(fmt):
        match = _SPECIFIER.match(fmt, i)
        if match is not None and match.group(1) in _SPECIAL:
            if run:
                pieces.append(("".join(run), None))
                run = []
            pieces.append(("", match.group(1)))
            i = match.end()
            continue
        end = match.end() if match is not None else i + 1
        run.append(fmt[i:end])
        i = end
    if run or not pieces:
        pieces.append(("".join(run), None))
    return pieces


def _special_field(spec: str, value: Column, is_date: bool) -> Column:
    if spec == "e":
        return F.lpad(F.dayofmonth(value).cast("string"), 2, " ")
    if spec in ("k", "l"):
        hour = F.hour(value) if spec == "k" else F.pmod(F.hour(value) + 11, F.lit(12)) + 1
        return F.lpad((F.lit(0) if is_date else hour).cast("string"), 2, " ")
    micros = F.lit(0) if is_date else F.unix_micros(value.cast("timestamp"))
    fraction = F.pmod(micros, F.lit(1_000_000))
    millis = F.lpad((fraction / 1000).cast("long").cast("string"), 3, "0")
    return (F.when(fraction == 0, F.lit(""))
            .when(fraction % 1000 == 0, F.concat(F.lit("."), millis))
            .otherwise(F.concat(F.lit("."), F.lpad(fraction.cast("string"), 6, "0"))))


_INTERVAL_PART = re.compile(r"([0-9]+)(ns|us|ms|mo|s|m|h|d|w|q|y)")
_MICROS = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000,
           "w": 7 * 86_400_000_000}
# polars aligns weeks to the first Monday after the epoch (1970-01-05), other fixed lengths to the epoch.
_WEEK_ORIGIN_MICROS = 4 * 86_400_000_000


def _truncate(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    parts = _INTERVAL_PART.findall(args["every"])
    if len(parts) != 1:
        raise unsupported("dt.truncate", "an interval of several parts (such as 1mo6h)")
    count, unit = int(parts[0][0]), parts[0][1]
    dtype = scope.dtype(node["input"])
    is_date = dtype == pl.Date
    if unit == "ns":
        raise unsupported("dt.truncate", "nanosecond intervals")
    if unit in ("mo", "q", "y"):
        months_per = {"mo": 1, "q": 3, "y": 12}[unit] * count
        months = (F.year(value) - 1970) * 12 + F.month(value) - 1
        floored = F.floor(months / months_per).cast("long") * months_per
        first = F.make_date(F.floor(floored / 12).cast("int") + 1970, F.pmod(floored, F.lit(12)).cast("int") + 1,
                            F.lit(1))
        return first if is_date else first.cast("timestamp_ntz")
    if not is_date and not (isinstance(dtype, pl.Datetime) and dtype.time_zone is None):
        raise unsupported("dt.truncate", f"values of type {dtype}")
    step = _MICROS[unit] * count
    origin = _WEEK_ORIGIN_MICROS if unit == "w" else 0
    micros = _micros(value, pl.Date if is_date else dtype)
    if is_date and unit not in ("d", "w"):
        # polars truncates a date by a time of day toward zero (so a date before 1970 stays as it is).
        floored = micros - micros % F.lit(step)
    else:
        floored = micros - F.pmod(micros - F.lit(origin), F.lit(step))
    moment = F.timestamp_micros(floored).cast("timestamp_ntz")
    return moment.cast("date") if is_date else moment


def _repeat_by(scope: Scope, node: dict, value: Column, args: dict) -> Column:
    by = args["by"].cast("long")
    # Spark's greatest and least skip nulls: a null count must stay null (polars gives no list).
    count = F.least(F.greatest(by, F.lit(0)), F.lit(MAX_REPEAT))
    return F.when(by.isNotNull(), F.array_repeat(value, count.cast("int")))


ELEMENTWISE: dict[str, Callable[[Scope, dict, Column, dict], Column]] = {
    "is_null": lambda s, n, v, a: v.isNull(),
    "is_not_null": lambda s, n, v, a: v.isNotNull(),
    "is_in": _is_in,
    "is_between": _is_between,
    "fill_null": _fill_null,
    "cast": _cast,
    "round": _round,
    "abs": lambda s, n, v, a: s.fit(F.abs(v), n),
    "clip": _clip,
    "log": _log,
    "exp": lambda s, n, v, a: F.exp(v),
    "sqrt": lambda s, n, v, a: F.sqrt(v),
    "pow": _pow_fn,
    "repeat_by": _repeat_by,
    "str.len_chars": lambda s, n, v, a: F.char_length(v).cast("long"),
    "str.to_lowercase": lambda s, n, v, a: F.lower(v),
    "str.to_uppercase": lambda s, n, v, a: F.upper(v),
    "str.contains": _str_contains,
    "str.starts_with": lambda s, n, v, a: v.startswith(F.lit(a["prefix"])),
    "str.ends_with": lambda s, n, v, a: v.endswith(F.lit(a["suffix"])),
    "str.slice": _str_slice,
    "str.replace": _str_replace,
    "str.strip_chars": _strip_chars,
    "str.to_date": _to_date,
    "str.to_datetime": _to_datetime,
    "dt.year": lambda s, n, v, a: F.year(v),
    "dt.month": lambda s, n, v, a: F.month(v).cast("byte"),
    "dt.day": lambda s, n, v, a: F.dayofmonth(v).cast("byte"),
    "dt.weekday": lambda s, n, v, a: (F.weekday(v) + 1).cast("byte"),
    "dt.hour": lambda s, n, v, a: F.hour(v).cast("byte"),
    "dt.truncate": _truncate,
    "dt.strftime": _strftime,
}


def _is_text(dtype: pl.DataType) -> bool:
    return dtype == pl.String


def _is_date_or_datetime(dtype: pl.DataType) -> bool:
    return dtype == pl.Date or isinstance(dtype, pl.Datetime)


def _is_datetime(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime)


# The input types polars runs these functions on.  polars' schema accepts any input, and its query fails
# while running (for every input, even no rows); Spark would cast the input and answer.  Here the function
# fails the job for any other input, on the first row it meets (Spark has no failure without a row).
_INPUT_TYPES: dict[str, Callable[[pl.DataType], bool]] = {
    **{name: _is_text for name in ("str.len_chars", "str.to_lowercase", "str.to_uppercase", "str.slice",
                                   "str.replace", "str.strip_chars", "str.to_date", "str.to_datetime")},
    **{name: _is_date_or_datetime for name in ("dt.year", "dt.month", "dt.day", "dt.weekday", "dt.truncate")},
    "dt.hour": _is_datetime,
}


def _failing_on_other_types(name: str, accepts: Callable[[pl.DataType], bool]
                            ) -> Callable[[Scope, dict, Column, dict], Column]:
    builder = ELEMENTWISE[name]

    def build(scope: Scope, node: dict, value: Column, args: dict) -> Column:
        dtype = scope.dtype(node["input"])
        if dtype is None or accepts(dtype):
            return builder(scope, node, value, args)
        failure = F.raise_error(F.lit(f"{name} of {dtype} values fails on the polars engine"))
        result = scope.dtype(node)
        return failure if result is None or isinstance(result, pl.Null) else failure.cast(spark_type(result))
    return build


ELEMENTWISE.update({name: _failing_on_other_types(name, accepts) for name, accepts in _INPUT_TYPES.items()})


# ---------------------------------------------------------------- sequences (inside an aggregation)
def _sequence_input(scope: Scope, node: dict, allow_mask: bool = True) -> Seq:
    seq = scope.row(node["input"])
    if seq.scalar:
        raise _refused(node["name"])
    if seq.pos is not None or seq.distinct or (seq.mask is not None and not allow_mask):
        raise BastionError("UnsupportedOperation", f"{node['name']}() after sort_by(), head(), tail() or unique() "
                                                   "is not supported on the Spark engine", function=node["name"],
                           engine="spark")
    return seq


def _seq_filter(scope: Scope, node: dict) -> Seq:
    seq = _sequence_input(scope, node)
    predicate = scope.row(node["args"]["predicate"])
    if not predicate.plain():
        raise _refused("filter")
    keep = F.coalesce(predicate.value, F.lit(False))
    mask = keep if seq.mask is None else seq.mask & keep
    return replace(seq, mask=mask, shape=seq.shape + (("filter", _key(node["args"]["predicate"])),))


def _seq_sort_by(scope: Scope, node: dict) -> Seq:
    seq = _sequence_input(scope, node, allow_mask=False)
    by = scope.row(node["args"]["by"])
    if not by.plain():
        raise _refused("sort_by")
    # polars' sort_by: nulls first whichever the direction, ties in row order.
    key = by.value.desc_nulls_first() if node["args"]["descending"] else by.value.asc_nulls_first()
    pos = scope.pre(F.row_number().over(scope.window().orderBy(key, *scope.order())), "pos")
    return replace(seq, pos=pos, shape=seq.shape + (("sort_by", _key(node["args"]), node["args"]["descending"]),))


def _seq_cut(last: bool) -> Callable[[Scope, dict], Seq]:
    def build(scope: Scope, node: dict) -> Seq:
        seq = scope.row(node["input"])
        if seq.scalar or seq.distinct:
            raise _refused(node["name"])
        n = node["args"]["n"]
        order = scope.position(seq)
        kept = F.lit(True) if seq.mask is None else seq.mask
        # The rank among the sequence's rows (the rows outside its mask rank apart).
        rank = scope.pre(F.row_number().over(scope.window(scope.partition + [kept]).orderBy(
            order.desc() if last else order.asc())), "rank")
        mask = kept & (rank <= F.lit(n))
        return replace(seq, mask=mask, shape=seq.shape + ((node["name"], n),))
    return build


def _seq_unique(scope: Scope, node: dict) -> Seq:
    seq = scope.row(node["input"])
    if seq.scalar:
        raise _refused("unique")
    return replace(seq, distinct=True, shape=seq.shape + (("unique",),))


SEQUENCE: dict[str, Callable[[Scope, dict], Seq]] = {
    "filter": _seq_filter, "sort_by": _seq_sort_by, "head": _seq_cut(False), "tail": _seq_cut(True),
    "unique": _seq_unique,
}


# ---------------------------------------------------------------- aggregations
def _numeric_input(scope: Scope, node: dict, seq: Seq, temporal: bool = False) -> Column:
    """The values an arithmetic aggregate reads; ``temporal``: dates and times as polars counts them.

    polars averages a Date as its number of days, a Datetime as its count of
    microseconds and a Duration as its count of its unit (:func:`_temporal_result`
    makes the answer a Datetime or a Duration again).
    """
    dtype = scope.dtype(node["input"])
    value = seq.masked()
    if temporal and (dtype == pl.Date or isinstance(dtype, pl.Datetime)):
        return F.unix_date(value) if dtype == pl.Date else F.unix_micros(value.cast("timestamp"))
    if temporal and isinstance(dtype, pl.Duration):
        return value
    if dtype is None or not (dtype.is_numeric() or dtype == pl.Boolean):
        raise unsupported(node["name"], f"{node['name']} of {dtype} values")
    return value.cast("double") if dtype == pl.Boolean else value


def _temporal_result(scope: Scope, node: dict, result: Column) -> Column:
    """A mean, median or quantile of dates or times (a count, :func:`_numeric_input`) as polars types it.

    polars: of a Date a Datetime in microseconds (the days times a day's
    microseconds, cut toward zero), of a Datetime a Datetime, of a Duration a
    Duration (the cast to the node's type cuts its count toward zero).
    """
    dtype = scope.dtype(node["input"])
    if dtype == pl.Date:
        result = result * F.lit(float(86_400_000_000))
    elif not isinstance(dtype, pl.Datetime):
        return result
    return F.timestamp_micros(result.cast("long"))


def _distinct_only(node: dict, seq: Seq, allowed: bool) -> None:
    if seq.distinct and not allowed:
        raise unsupported(node["name"], f"{node['name']}() of unique() values (polars leaves their order open)")


def _agg_sum(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    dtype = scope.dtype(node["input"])
    if dtype is None or not (dtype.is_numeric() or dtype == pl.Boolean):
        raise unsupported("sum", f"sum of {dtype} values")
    value = seq.masked()
    if dtype == pl.Boolean:
        value = value.cast("long")
    if seq.distinct:
        if window is not None:
            raise unsupported("sum", "the sum of unique() values as a window")
        total = F.sum_distinct(value)
    else:
        total = _over(F.sum(value), window)
    return F.coalesce(total, F.lit(0))


def _agg_mean(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    _distinct_only(node, seq, window is None)
    value = _numeric_input(scope, node, seq, temporal=True)
    if seq.distinct:
        return _temporal_result(scope, node, F.sum_distinct(value) / F.count_distinct(value))
    return _temporal_result(scope, node, _over(F.avg(value), window))


def _agg_median(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    _distinct_only(node, seq, False)
    median = _over(F.median(_numeric_input(scope, node, seq, temporal=True).cast("double")), window)
    return _temporal_result(scope, node, median)


def _agg_extreme(largest: bool) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
        value = seq.masked()
        dtype = scope.dtype(node["input"])
        if largest and _is_float(dtype):
            # polars' max skips NaN (Spark orders NaN above every number); NaN when there is nothing else.
            return F.coalesce(_over(F.max(F.when(~value.isNaN(), value)), window), _over(F.max(value), window))
        return _over(F.max(value) if largest else F.min(value), window)
    return build


def _agg_var(root: bool) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
        _distinct_only(node, seq, False)
        value = _numeric_input(scope, node, seq).cast("double")
        ddof = node["args"]["ddof"]
        n = _over(F.count(value), window)
        variance = _over(F.var_pop(value), window) * n / (n - F.lit(ddof))
        result = F.when(n - F.lit(ddof) > 0, variance)
        return F.sqrt(result) if root else result
    return build


def _agg_quantile(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    _distinct_only(node, seq, False)
    value = _numeric_input(scope, node, seq, temporal=True).cast("double")
    q, method = node["args"]["quantile"], node["args"]["interpolation"]
    if method == "linear":
        return _temporal_result(scope, node, _over(F.percentile(value, F.lit(float(q))), window))
    if window is None:
        ordered = F.sort_array(F.collect_list(value))
        count = F.size(ordered)

        def ranked(index: Column) -> Column:
            return F.get(ordered, index)
    else:
        # As a window, a sorted list of the group's values would be sorted again on every row (n² work):
        # the rows are ranked once instead (nulls after every value), and the value of a rank picked.
        rank, count = scope.ranks(value)

        def ranked(index: Column) -> Column:
            return F.max(F.when(rank == index, value)).over(window)
    at = (count - 1).cast("double") * F.lit(float(q))
    lower, higher = ranked(F.floor(at).cast("int")), ranked(F.ceil(at).cast("int"))
    if method == "lower":
        return _temporal_result(scope, node, lower)
    if method == "higher":
        return _temporal_result(scope, node, higher)
    if method == "midpoint":
        return _temporal_result(scope, node, (lower + higher) / 2)
    return _temporal_result(scope, node, ranked(F.round(at).cast("int")))  # nearest: half away from zero


def _agg_count(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    if seq.distinct:
        return _count_distinct(seq.masked(), window)
    return _over(F.count(seq.masked()), window)


def _agg_len(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    if seq.distinct:
        return _n_unique(scope, node, replace(seq, distinct=False), window)
    if seq.mask is None:
        return _over(F.count(F.lit(1)), window)
    return _over(F.count(F.when(seq.mask, F.lit(1))), window)


def _count_distinct(value: Column, window: Any) -> Column:
    if window is None:
        return F.count_distinct(value)
    return F.size(F.collect_set(value).over(window)).cast("long")


def _n_unique(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    missing = seq.value.isNull() if seq.mask is None else seq.mask & seq.value.isNull()
    has_null = F.coalesce(_over(F.max(F.when(missing, F.lit(1))), window), F.lit(0))
    return _count_distinct(seq.masked(), window) + has_null


def _agg_null_count(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    if seq.distinct:
        missing = seq.value.isNull() if seq.mask is None else seq.mask & seq.value.isNull()
        return F.coalesce(_over(F.max(F.when(missing, F.lit(1))), window), F.lit(0))
    missing = seq.value.isNull() if seq.mask is None else seq.mask & seq.value.isNull()
    return _over(F.count(F.when(missing, F.lit(1))), window)


def _agg_end(last: bool) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
        _distinct_only(node, seq, False)
        order = scope.position(seq)
        if seq.mask is not None:
            order = F.when(seq.mask, order)
        return _over(F.max_by(seq.value, order) if last else F.min_by(seq.value, order), window)
    return build


def _agg_implode(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    return scope.list_of(seq, window, node)


def _agg_list(name: str) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
        inner = {"expr": "fn", "name": name, "input": node["input"], "args": node["args"]}
        return scope.list_of(SEQUENCE[name](scope, inner), window, node)
    return build


def _agg_mode(scope: Scope, node: dict, seq: Seq, window: Any) -> Column:
    _distinct_only(node, seq, False)
    kept = F.lit(True) if seq.mask is None else seq.mask
    count = scope.pre(F.count(F.lit(1)).over(scope.window(scope.partition + [kept, seq.value])), "count")
    most = scope.pre(F.max(F.when(kept, count)).over(scope.window()), "count")
    entry = F.when(kept & (count == most), F.struct(seq.value.alias("v")))
    # polars leaves the order of tied values open: here they are sorted (nulls first).
    return F.transform(F.sort_array(F.array_distinct(_over(F.collect_list(entry), window))),
                       lambda item: item.getField("v"))


AGGREGATES: dict[str, Callable[[Scope, dict, Seq, Any], Column]] = {
    "sum": _agg_sum, "mean": _agg_mean, "median": _agg_median,
    "min": _agg_extreme(False), "max": _agg_extreme(True),
    "std": _agg_var(True), "var": _agg_var(False), "quantile": _agg_quantile,
    "count": _agg_count, "len": _agg_len, "n_unique": lambda s, n, q, w: _n_unique(s, n, replace(q, distinct=False), w),
    "null_count": _agg_null_count,
    "first": _agg_end(False), "last": _agg_end(True), "mode": _agg_mode,
    "implode": _agg_implode, "head": _agg_list("head"), "tail": _agg_list("tail"), "unique": _agg_list("unique"),
}


def _one_std(root: bool) -> Callable[..., Column]:
    def build(scope: Scope, node: dict, value: Column, window: Any) -> Column:
        if node["args"]["ddof"] != 0:
            return F.lit(None).cast("double")
        return F.when(value.isNotNull(), F.lit(0.0))
    return build


# An aggregation of one value (a literal, len(), another aggregate), as polars computes it.
ONE_VALUE: dict[str, Callable[[Scope, dict, Column, Any], Column]] = {
    "sum": lambda s, n, v, w: F.coalesce(v, F.lit(0)),
    "mean": lambda s, n, v, w: v.cast("double"),
    "median": lambda s, n, v, w: v.cast("double"),
    "quantile": lambda s, n, v, w: v.cast("double"),
    "min": lambda s, n, v, w: v, "max": lambda s, n, v, w: v,
    "first": lambda s, n, v, w: v, "last": lambda s, n, v, w: v,
    "std": _one_std(True), "var": _one_std(False),
    "count": lambda s, n, v, w: F.when(v.isNull(), F.lit(0)).otherwise(F.lit(1)),
    "len": lambda s, n, v, w: F.lit(1), "n_unique": lambda s, n, v, w: F.lit(1),
    "null_count": lambda s, n, v, w: F.when(v.isNull(), F.lit(1)).otherwise(F.lit(0)),
    "implode": lambda s, n, v, w: F.array(v),
}

# Why the functions of the plan language that are not in the tables above are refused.
UNSUPPORTED: dict[str, str] = {
    "dp.sum": "differentially private aggregates run on the executor's OpenDP path",
    "dp.mean": "differentially private aggregates run on the executor's OpenDP path",
    "dp.quantile": "differentially private aggregates run on the executor's OpenDP path",
}
