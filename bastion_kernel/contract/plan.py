"""Bastion's plan format: plain JSON data shared by the kernel and the executor.

A plan is a tree of *frame nodes* (dicts with an ``"op"`` key) whose
arguments are *expressions* (dicts with an ``"expr"`` key).  Nothing in a plan
names a file, a module or a Python function: every operation and every
expression function is a key of one of the tables below, and the executor
refuses anything that is not.

This module is pure data (no polars, no zmq) so that both sides can import it.
The kernel uses the builders to produce plans; the executor uses the tables
to validate them (``owner_console.validate``) and never trusts the builders.

Frame nodes
-----------
======================  =====================================================
``scan``                ``{"op": "scan", "dataset": NAME}``; ``"mock": true`` added: the owner's mock of NAME
``saved``               ``{"op": "saved", "name": NAME}`` (a result kept by ``save``)
``filter``              ``{"op": "filter", "input": F, "predicate": E}``
``select``              ``{"op": "select", "input": F, "exprs": [E, ...]}``
``with_columns``        ``{"op": "with_columns", "input": F, "exprs": [E, ...]}``
``group_by``            ``{"op": "group_by", "input": F, "keys": [E, ...], "aggs": [E, ...]}``
``sort``                ``{"op": "sort", "input": F, "by": [E, ...], "descending": [bool, ...], "nulls_last": bool}``
``head``                ``{"op": "head", "input": F, "n": int}``
``slice``               ``{"op": "slice", "input": F, "offset": int, "length": int | null}``
``explode``             ``{"op": "explode", "input": F, "columns": [NAME, ...]}`` (list columns -> rows)
``drop``                ``{"op": "drop", "input": F, "columns": [NAME, ...]}``
``rename``              ``{"op": "rename", "input": F, "mapping": {OLD: NEW}}``
``drop_nulls``          ``{"op": "drop_nulls", "input": F, "subset": [NAME, ...] | null}``
``fill_null``           ``{"op": "fill_null", "input": F, "value": E}``
``unique``              ``{"op": "unique", "input": F, "subset": [NAME, ...] | null}``
``join``                ``{"op": "join", "left": F, "right": F, "how": HOW, "left_on": [E], "right_on": [E], "suffix": str}``
``concat``              ``{"op": "concat", "inputs": [F, ...]}``
``with_row_index``      ``{"op": "with_row_index", "input": F, "name": NAME}``
======================  =====================================================

Expressions
-----------
=============  ===============================================================
``col``        ``{"expr": "col", "name": NAME}``
``lit``        ``{"expr": "lit", "value": JSON scalar}``
``len``        ``{"expr": "len"}`` (number of rows; an aggregation)
``binary``     ``{"expr": "binary", "op": BINARY_OP, "left": E, "right": E}``
``unary``      ``{"expr": "unary", "op": "not" | "neg", "operand": E}``
``alias``      ``{"expr": "alias", "input": E, "name": NAME}``
``fn``         ``{"expr": "fn", "name": FUNCTION, "input": E, "args": {PARAM: value}}``
``when``       ``{"expr": "when", "branches": [{"when": E, "then": E}, ...], "otherwise": E | null}``
=============  ===============================================================

``fn`` arguments are named; each parameter of :data:`EXPR_FUNCTIONS` has a
type from :data:`PARAM_TYPES`, and every parameter is present in a plan
(builders fill in defaults) so that the executor never guesses.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 1

# Limits that both sides agree on; the executor enforces them.
MAX_PLAN_DEPTH = 64
MAX_PLAN_NODES = 2000
MAX_NAME_LENGTH = 256
# The largest plan the executor takes, in bytes of its canonical JSON (:func:`canonical_json`): the
# audit log keeps every distinct plan once, whole, so this bounds its largest entry.
MAX_PLAN_BYTES = 256 * 1024

JOIN_HOWS = ("inner", "left", "full", "semi", "anti", "cross")

BINARY_OPS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
    "eq", "ne", "lt", "le", "gt", "ge",
    "and", "or", "xor",
)
COMPARISON_OPS = ("eq", "ne", "lt", "le", "gt", "ge")
UNARY_OPS = ("not", "neg")

# The dtypes a scientist may cast to, by their polars names.
DTYPES = (
    "Int8", "Int16", "Int32", "Int64",
    "UInt8", "UInt16", "UInt32", "UInt64",
    "Float32", "Float64", "String", "Boolean", "Date", "Datetime",
)

# The values of an "interval" parameter (dt.truncate's every): one or more
# counts of 1 to 999,999 with a unit, as polars reads them ("1d", "2w", "1mo6h").
# The kernel and the executor both check against this one rule.
INTERVAL = re.compile(r"^(?:[1-9][0-9]{0,5}(?:ns|us|ms|s|m|h|d|w|mo|q|y))+$")
# The values of a "closed" parameter (is_between).
CLOSED_VALUES = ("both", "left", "right", "none")

# Parameter types of expression functions. "expr" is an expression dict; the
# others are JSON literals checked by the executor.
PARAM_TYPES = ("expr", "int", "number", "str", "bool", "dtype", "literal_list",
               "optional_str", "optional_number", "interval", "closed", "exprs")


@dataclass(frozen=True)
class FunctionSpec:
    """How an expression function behaves, for the validator and the policy.

    ``kind`` is one of:

    - ``"elementwise"``: one output value per input row.
    - ``"aggregate"``: reduces a group to one value computed from all its rows
      (sum, mean, count...).  Released when the group is large enough.
    - ``"row_aggregate"``: reduces a group to one *individual* value or a list
      of them (first, last, mode...).  Always row-level for the policy.
    - ``"dp_aggregate"``: a differentially private aggregate (``dp.sum``,
      ``dp.mean``, ``dp.quantile``), computed by OpenDP on a dataset with a DP
      policy only (``owner_console.dp``); the K-anonymity path refuses it.

    ``counts_only`` marks aggregations whose value does not carry the values
    of their input column (``count``, ``null_count``, ``n_unique``): their
    result has no lineage.  They still read the column, so a hidden column
    may not feed them (it is usable only as a join key).
    """

    kind: str
    params: tuple[tuple[str, str], ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    counts_only: bool = False


def _f(kind: str, *params: tuple[str, str], counts_only: bool = False, **defaults: Any) -> FunctionSpec:
    return FunctionSpec(kind, tuple(params), dict(defaults), counts_only)


EXPR_FUNCTIONS: dict[str, FunctionSpec] = {
    # aggregations
    "sum": _f("aggregate"),
    "mean": _f("aggregate"),
    "median": _f("aggregate"),
    "min": _f("aggregate"),
    "max": _f("aggregate"),
    "std": _f("aggregate", ("ddof", "int"), ddof=1),
    "var": _f("aggregate", ("ddof", "int"), ddof=1),
    "quantile": _f("aggregate", ("quantile", "number"), ("interpolation", "str"), interpolation="nearest"),
    "count": _f("aggregate", counts_only=True),
    "len": _f("aggregate", counts_only=True),
    "n_unique": _f("aggregate", counts_only=True),
    "null_count": _f("aggregate", counts_only=True),
    "first": _f("row_aggregate"),
    "last": _f("row_aggregate"),
    "mode": _f("row_aggregate"),
    # aggregations that return individual values as a list (row-level, like first/last)
    "implode": _f("row_aggregate"),
    "head": _f("row_aggregate", ("n", "int"), n=10),
    "tail": _f("row_aggregate", ("n", "int"), n=10),
    "unique": _f("row_aggregate"),
    # reorder / subset / widen the values of a column; meaningful inside an aggregation
    "sort_by": _f("elementwise", ("by", "expr"), ("descending", "bool"), descending=False),
    "filter": _f("elementwise", ("predicate", "expr")),
    "repeat_by": _f("elementwise", ("by", "expr")),
    # window function: an aggregate over each row's partition, broadcast to the row
    "over": _f("elementwise", ("partition_by", "exprs")),
    # differentially private aggregations (DP datasets only); bounds default to the owner's,
    # and an empty candidates list means evenly spaced candidates over the bounds
    "dp.sum": _f("dp_aggregate", ("lower", "optional_number"), ("upper", "optional_number"),
                 lower=None, upper=None),
    "dp.mean": _f("dp_aggregate", ("lower", "optional_number"), ("upper", "optional_number"),
                  lower=None, upper=None),
    "dp.quantile": _f("dp_aggregate", ("quantile", "number"), ("candidates", "literal_list"),
                      ("lower", "optional_number"), ("upper", "optional_number"),
                      quantile=0.5, candidates=[], lower=None, upper=None),
    # elementwise
    "is_null": _f("elementwise"),
    "is_not_null": _f("elementwise"),
    "is_in": _f("elementwise", ("values", "literal_list")),
    "is_between": _f("elementwise", ("lower", "expr"), ("upper", "expr"), ("closed", "closed"), closed="both"),
    "fill_null": _f("elementwise", ("value", "expr")),
    "cast": _f("elementwise", ("dtype", "dtype"), ("strict", "bool"), strict=True),
    "round": _f("elementwise", ("decimals", "int"), decimals=0),
    "abs": _f("elementwise"),
    "clip": _f("elementwise", ("lower", "optional_number"), ("upper", "optional_number"), lower=None, upper=None),
    "log": _f("elementwise", ("base", "number"), base=2.718281828459045),
    "exp": _f("elementwise"),
    "sqrt": _f("elementwise"),
    "pow": _f("elementwise", ("exponent", "expr")),
    # str namespace
    "str.len_chars": _f("elementwise"),
    "str.to_lowercase": _f("elementwise"),
    "str.to_uppercase": _f("elementwise"),
    "str.contains": _f("elementwise", ("pattern", "str"), ("literal", "bool"), literal=False),
    "str.starts_with": _f("elementwise", ("prefix", "str")),
    "str.ends_with": _f("elementwise", ("suffix", "str")),
    "str.slice": _f("elementwise", ("offset", "int"), ("length", "optional_number"), length=None),
    "str.replace": _f("elementwise", ("pattern", "str"), ("value", "str"), ("literal", "bool"), literal=False),
    "str.strip_chars": _f("elementwise", ("characters", "optional_str"), characters=None),
    "str.to_date": _f("elementwise", ("format", "str"), ("strict", "bool"), strict=True),
    "str.to_datetime": _f("elementwise", ("format", "str"), ("strict", "bool"), strict=True),
    # dt namespace
    "dt.year": _f("elementwise"),
    "dt.month": _f("elementwise"),
    "dt.day": _f("elementwise"),
    "dt.weekday": _f("elementwise"),
    "dt.hour": _f("elementwise"),
    "dt.truncate": _f("elementwise", ("every", "interval")),
    "dt.strftime": _f("elementwise", ("format", "str")),
}


# --------------------------------------------------------------------------
# Frame operations: the fields each node must carry and their JSON types.
# "frame" is a nested frame node, "frames" a list of them, "expr" an
# expression, "exprs" a list of them, "names" a list of column names.
FRAME_OPS: dict[str, dict[str, str]] = {
    "scan": {"dataset": "name"},
    "saved": {"name": "name"},
    "filter": {"input": "frame", "predicate": "expr"},
    "select": {"input": "frame", "exprs": "exprs"},
    "with_columns": {"input": "frame", "exprs": "exprs"},
    "group_by": {"input": "frame", "keys": "exprs", "aggs": "exprs"},
    "sort": {"input": "frame", "by": "exprs", "descending": "bools", "nulls_last": "bool"},
    "head": {"input": "frame", "n": "count"},
    "slice": {"input": "frame", "offset": "offset", "length": "optional_count"},
    "explode": {"input": "frame", "columns": "names"},
    "drop": {"input": "frame", "columns": "names"},
    "rename": {"input": "frame", "mapping": "name_map"},
    "drop_nulls": {"input": "frame", "subset": "optional_names"},
    "fill_null": {"input": "frame", "value": "expr"},
    "unique": {"input": "frame", "subset": "optional_names"},
    "join": {"left": "frame", "right": "frame", "how": "join_how", "left_on": "exprs",
             "right_on": "exprs", "suffix": "name"},
    "concat": {"inputs": "frames"},
    "with_row_index": {"input": "frame", "name": "name"},
}

EXPR_KINDS: dict[str, dict[str, str]] = {
    "col": {"name": "name"},
    "lit": {"value": "scalar"},
    "len": {},
    "binary": {"op": "binary_op", "left": "expr", "right": "expr"},
    "unary": {"op": "unary_op", "operand": "expr"},
    "alias": {"input": "expr", "name": "name"},
    "fn": {"name": "function", "input": "expr", "args": "args"},
    "when": {"branches": "branches", "otherwise": "optional_expr"},
}


# --------------------------------------------------------------------------
# Builders: the kernel's way to make well-formed nodes.

def scan(dataset: str, mock: bool = False) -> dict:
    """A scan of a dataset; ``mock=True`` reads the owner's mock of it (an optional field of ``scan``
    that the executor resolves to the mock's file, and never to the dataset's)."""
    return {"op": "scan", "dataset": dataset, "mock": True} if mock else {"op": "scan", "dataset": dataset}


def frame_op(op: str, **fields: Any) -> dict:
    """A frame node; ``fields`` must be exactly those :data:`FRAME_OPS` lists."""
    expected = FRAME_OPS[op]
    if set(fields) != set(expected):
        raise ValueError(f"{op} takes fields {sorted(expected)}, got {sorted(fields)}")
    return {"op": op, **fields}


def col(name: str) -> dict:
    return {"expr": "col", "name": name}


def lit(value: Any) -> dict:
    return {"expr": "lit", "value": value}


def length() -> dict:
    return {"expr": "len"}


def binary(op: str, left: dict, right: dict) -> dict:
    return {"expr": "binary", "op": op, "left": left, "right": right}


def unary(op: str, operand: dict) -> dict:
    return {"expr": "unary", "op": op, "operand": operand}


def alias(expr: dict, name: str) -> dict:
    return {"expr": "alias", "input": expr, "name": name}


def fn(name: str, expr: dict, **args: Any) -> dict:
    """An expression function call with every parameter filled in."""
    spec = EXPR_FUNCTIONS[name]
    known = {p for p, _ in spec.params}
    unknown = set(args) - known
    if unknown:
        raise ValueError(f"{name} has no parameter {sorted(unknown)[0]!r}")
    full = dict(spec.defaults)
    full.update(args)
    missing = known - set(full)
    if missing:
        raise ValueError(f"{name} needs {sorted(missing)[0]!r}")
    return {"expr": "fn", "name": name, "input": expr, "args": full}


def when(branches: list[tuple[dict, dict]], otherwise: dict | None) -> dict:
    return {"expr": "when",
            "branches": [{"when": c, "then": t} for c, t in branches],
            "otherwise": otherwise}


# --------------------------------------------------------------------------

def canonical_json(plan: Any) -> bytes:
    """The one byte form of a plan: what is hashed, stored and approved."""
    return json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def plan_hash(plan: Any) -> str:
    """SHA-256 of the canonical JSON: an approval is bound to this."""
    return hashlib.sha256(canonical_json(plan)).hexdigest()


def output_name(expr: dict) -> str | None:
    """The column name polars would give an expression (None for a literal-only one).

    Same rule as polars: an alias names it, otherwise the leftmost column in
    the tree; ``len`` is ``"len"``.
    """
    kind = expr.get("expr")
    if kind == "alias":
        return expr["name"]
    if kind == "col":
        return expr["name"]
    if kind == "len":
        return "len"
    if kind == "lit":
        return "literal"
    if kind == "fn":
        return output_name(expr["input"])
    if kind == "binary":
        return output_name(expr["left"])
    if kind == "unary":
        return output_name(expr["operand"])
    if kind == "when":
        first = expr["branches"][0]["then"] if expr["branches"] else None
        return output_name(first) if first else None
    return None
