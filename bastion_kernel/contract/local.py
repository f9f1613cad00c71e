"""Plans run in the kernel on tables the executor already released.

A fetched result is the scientist's: sorting, filtering or joining it needs
no policy and never goes back to the executor.  The language builds the same
plan nodes as for a remote frame (:mod:`bastion_kernel.contract.plan`) over local
tables and this module compiles them to polars, through explicit tables keyed
by the plan's own operation, expression and function names.  Nothing here is
looked up by a name the scientist chose.

This module imports polars; the language imports it only when a local
operation runs.  It never imports ``owner_console``: the executor's compiler
carries the owner's accounting and oracle defences, which released data does
not need (a cast here is as strict as the scientist asks).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import polars as pl

from . import plan as P
from .protocol import BastionError

DTYPES: dict[str, Any] = {
    "Int8": pl.Int8, "Int16": pl.Int16, "Int32": pl.Int32, "Int64": pl.Int64,
    "UInt8": pl.UInt8, "UInt16": pl.UInt16, "UInt32": pl.UInt32, "UInt64": pl.UInt64,
    "Float32": pl.Float32, "Float64": pl.Float64, "String": pl.String, "Boolean": pl.Boolean,
    "Date": pl.Date, "Datetime": pl.Datetime,
}

BINARY: dict[str, Callable[[pl.Expr, pl.Expr], pl.Expr]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor,
}

UNARY: dict[str, Callable[[pl.Expr], pl.Expr]] = {"not": operator.invert, "neg": operator.neg}

# name -> handler(expr, args, sub), where sub compiles an expression argument.
Fn = Callable[[pl.Expr, dict, Callable[[Any], pl.Expr]], pl.Expr]
FUNCTIONS: dict[str, Fn] = {
    "sum": lambda e, a, s: e.sum(),
    "mean": lambda e, a, s: e.mean(),
    "median": lambda e, a, s: e.median(),
    "min": lambda e, a, s: e.min(),
    "max": lambda e, a, s: e.max(),
    "std": lambda e, a, s: e.std(ddof=a["ddof"]),
    "var": lambda e, a, s: e.var(ddof=a["ddof"]),
    "quantile": lambda e, a, s: e.quantile(a["quantile"], interpolation=a["interpolation"]),
    "count": lambda e, a, s: e.count(),
    "len": lambda e, a, s: e.len(),
    "n_unique": lambda e, a, s: e.n_unique(),
    "null_count": lambda e, a, s: e.null_count(),
    "first": lambda e, a, s: e.first(),
    "last": lambda e, a, s: e.last(),
    "mode": lambda e, a, s: e.mode(),
    "implode": lambda e, a, s: e.implode(),
    "head": lambda e, a, s: e.head(a["n"]),
    "tail": lambda e, a, s: e.tail(a["n"]),
    "unique": lambda e, a, s: e.unique(),
    "sort_by": lambda e, a, s: e.sort_by(s(a["by"]), descending=a["descending"]),
    "filter": lambda e, a, s: e.filter(s(a["predicate"])),
    "repeat_by": lambda e, a, s: e.repeat_by(s(a["by"])),
    "over": lambda e, a, s: e.over([s(p) for p in a["partition_by"]]),
    "is_null": lambda e, a, s: e.is_null(),
    "is_not_null": lambda e, a, s: e.is_not_null(),
    "is_in": lambda e, a, s: e.is_in(a["values"]),
    "is_between": lambda e, a, s: e.is_between(s(a["lower"]), s(a["upper"]), closed=a["closed"]),
    "fill_null": lambda e, a, s: e.fill_null(s(a["value"])),
    "cast": lambda e, a, s: e.cast(DTYPES[a["dtype"]], strict=a["strict"]),
    "round": lambda e, a, s: e.round(a["decimals"]),
    "abs": lambda e, a, s: e.abs(),
    "clip": lambda e, a, s: e.clip(a["lower"], a["upper"]),
    "log": lambda e, a, s: e.log(a["base"]),
    "exp": lambda e, a, s: e.exp(),
    "sqrt": lambda e, a, s: e.sqrt(),
    "pow": lambda e, a, s: e.pow(s(a["exponent"])),
    "str.len_chars": lambda e, a, s: e.str.len_chars(),
    "str.to_lowercase": lambda e, a, s: e.str.to_lowercase(),
    "str.to_uppercase": lambda e, a, s: e.str.to_uppercase(),
    "str.contains": lambda e, a, s: e.str.contains(a["pattern"], literal=a["literal"]),
    "str.starts_with": lambda e, a, s: e.str.starts_with(a["prefix"]),
    "str.ends_with": lambda e, a, s: e.str.ends_with(a["suffix"]),
    "str.slice": lambda e, a, s: e.str.slice(a["offset"], a["length"]),
    "str.replace": lambda e, a, s: e.str.replace(a["pattern"], a["value"], literal=a["literal"]),
    "str.strip_chars": lambda e, a, s: e.str.strip_chars(a["characters"]),
    "str.to_date": lambda e, a, s: e.str.to_date(a["format"], strict=a["strict"]),
    "str.to_datetime": lambda e, a, s: e.str.to_datetime(a["format"], strict=a["strict"]),
    "dt.year": lambda e, a, s: e.dt.year(),
    "dt.month": lambda e, a, s: e.dt.month(),
    "dt.day": lambda e, a, s: e.dt.day(),
    "dt.weekday": lambda e, a, s: e.dt.weekday(),
    "dt.hour": lambda e, a, s: e.dt.hour(),
    "dt.truncate": lambda e, a, s: e.dt.truncate(a["every"]),
    "dt.strftime": lambda e, a, s: e.dt.strftime(a["format"]),
}

# Expression functions that exist only on the owner's side: a differentially private
# aggregate spends the owner's privacy budget on the owner's rows.
REMOTE_ONLY_FUNCTIONS = frozenset(name for name, spec in P.EXPR_FUNCTIONS.items() if spec.kind == "dp_aggregate")


def compile_expr(node: dict) -> pl.Expr:
    """A polars expression for one expression node of a plan.

    Parameters
    ----------
    node : dict
        An expression node (``{"expr": ...}``) as the language builds it.

    Returns
    -------
    polars.Expr

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` for a function that runs only on the owner's
        side (the differentially private aggregates).
    """
    return _EXPRS[node["expr"]](node)


def _fn(node: dict) -> pl.Expr:
    name = node["name"]
    handler = FUNCTIONS.get(name)
    if handler is None:
        if name in REMOTE_ONLY_FUNCTIONS:
            raise BastionError("UnsupportedOperation",
                               f"{name} is computed by the owner's executor on a differentially private dataset; "
                               f"on a fetched result use the plain aggregate (col(...).{name.split('.')[-1]}())",
                               function=name)
        raise BastionError("UnsupportedOperation", f"{name} is not available on a fetched result", function=name)
    return handler(compile_expr(node["input"]), node["args"], _argument)


def _argument(value: Any) -> pl.Expr:
    return compile_expr(value)


def _when(node: dict) -> pl.Expr:
    first, *rest = node["branches"]
    chain: Any = pl.when(compile_expr(first["when"])).then(compile_expr(first["then"]))
    for branch in rest:
        chain = chain.when(compile_expr(branch["when"])).then(compile_expr(branch["then"]))
    if node["otherwise"] is not None:
        return chain.otherwise(compile_expr(node["otherwise"]))
    return chain


_EXPRS: dict[str, Callable[[dict], pl.Expr]] = {
    "col": lambda n: pl.col(n["name"]),
    "lit": lambda n: pl.lit(n["value"]),
    "len": lambda n: pl.len(),
    "binary": lambda n: BINARY[n["op"]](compile_expr(n["left"]), compile_expr(n["right"])),
    "unary": lambda n: UNARY[n["op"]](compile_expr(n["operand"])),
    "alias": lambda n: compile_expr(n["input"]).alias(n["name"]),
    "fn": _fn,
    "when": _when,
}


def _exprs(nodes: list[dict]) -> list[pl.Expr]:
    return [compile_expr(n) for n in nodes]


class _Compiler:
    """Frame nodes -> a polars LazyFrame over the named local tables."""

    def __init__(self, tables: Mapping[str, pl.DataFrame]) -> None:
        self.tables = tables
        self.ops: dict[str, Callable[[dict], pl.LazyFrame]] = {
            "scan": self._scan, "saved": self._saved, "filter": self._filter, "select": self._select,
            "with_columns": self._with_columns, "group_by": self._group_by, "sort": self._sort,
            "head": self._head, "slice": self._slice, "explode": self._explode, "drop": self._drop,
            "rename": self._rename, "drop_nulls": self._drop_nulls, "fill_null": self._fill_null,
            "unique": self._unique, "join": self._join, "concat": self._concat,
            "with_row_index": self._with_row_index,
        }

    def frame(self, node: dict) -> pl.LazyFrame:
        handler = self.ops.get(node["op"])
        if handler is None:
            raise BastionError("UnsupportedOperation", f"the operation {node['op']!r} is not available on a "
                                                       "fetched result", op=node["op"])
        return handler(node)

    def _scan(self, node: dict) -> pl.LazyFrame:
        if node["dataset"] not in self.tables:
            raise BastionError("SchemaError", f"no local table named {node['dataset']!r}")
        return self.tables[node["dataset"]].lazy()

    def _saved(self, node: dict) -> pl.LazyFrame:
        raise BastionError("UnsupportedOperation", f"the saved result {node['name']!r} is on the owner's side; "
                                                   "fetch it first", op="saved")

    def _filter(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).filter(compile_expr(node["predicate"]))

    def _select(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).select(_exprs(node["exprs"]))

    def _with_columns(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).with_columns(_exprs(node["exprs"]))

    def _group_by(self, node: dict) -> pl.LazyFrame:
        # Groups in the order they first appear: the same cell gives the same table every time.
        return self.frame(node["input"]).group_by(_exprs(node["keys"]), maintain_order=True).agg(_exprs(node["aggs"]))

    def _sort(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).sort(_exprs(node["by"]), descending=node["descending"],
                                              nulls_last=node["nulls_last"], maintain_order=True)

    def _head(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).head(node["n"])

    def _slice(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).slice(node["offset"], node["length"])

    def _explode(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).explode(node["columns"])

    def _drop(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).drop(node["columns"])

    def _rename(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).rename(node["mapping"])

    def _drop_nulls(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).drop_nulls(node["subset"])

    def _fill_null(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        value = node["value"]
        if value["expr"] == "lit":
            return frame.fill_null(value["value"])  # polars' rule: the columns the literal fits
        return frame.with_columns(pl.all().fill_null(compile_expr(value)))

    def _unique(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).unique(node["subset"], keep="first", maintain_order=True)

    def _join(self, node: dict) -> pl.LazyFrame:
        left, right = self.frame(node["left"]), self.frame(node["right"])
        if node["how"] == "cross":
            return left.join(right, how="cross", suffix=node["suffix"])
        return left.join(right, left_on=_exprs(node["left_on"]), right_on=_exprs(node["right_on"]),
                         how=node["how"], suffix=node["suffix"], maintain_order="left_right")

    def _concat(self, node: dict) -> pl.LazyFrame:
        return pl.concat([self.frame(f) for f in node["inputs"]], how="vertical")

    def _with_row_index(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).with_row_index(node["name"])


def run(plan: dict, tables: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Run a plan on local tables: ``{"op": "scan", "dataset": NAME}`` reads ``tables[NAME]``.

    Parameters
    ----------
    plan : dict
        A frame node of :mod:`bastion_kernel.contract.plan`.
    tables : mapping of str to polars.DataFrame
        The released tables the plan's scans read.

    Returns
    -------
    polars.DataFrame

    Raises
    ------
    BastionError
        ``SchemaError`` for an unknown column or a type that does not fit,
        ``ExecutionError`` for any other failure, with polars' message (the
        table is the scientist's own, so its details may be shown),
        ``UnsupportedOperation`` for what runs only on the owner's side.
    """
    try:
        return _Compiler(tables).frame(plan).collect()
    except BastionError:
        raise
    except (pl.exceptions.ColumnNotFoundError, pl.exceptions.SchemaError, pl.exceptions.SchemaFieldNotFoundError,
            pl.exceptions.InvalidOperationError, pl.exceptions.DuplicateError) as exc:
        raise BastionError("SchemaError", _first_line(exc)) from None
    except (pl.exceptions.PolarsError, ValueError, TypeError, OverflowError) as exc:
        raise BastionError("ExecutionError", _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


__all__ = ["run", "compile_expr", "FUNCTIONS", "REMOTE_ONLY_FUNCTIONS"]
