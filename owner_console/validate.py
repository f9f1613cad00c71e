"""Plan JSON -> :class:`CheckedPlan`, or a typed :class:`BastionError`.

The first step of the executor's one-way path.  Everything arriving here is
untrusted JSON: the validator walks it once against the tables of
:mod:`bastion_kernel.contract.plan` (``FRAME_OPS``, ``EXPR_KINDS``, ``EXPR_FUNCTIONS``,
``DTYPES``, ...), refuses whatever those tables do not name, and builds a
fresh copy of the plan that holds only what it checked.  Later layers read
only that copy.

Column names are tracked symbolically through every frame operation (with
polars' naming rules), so an unknown column is refused here with the list of
available ones, and the policy layer can follow each output column back to the
source columns it was computed from.

Error names used: ``UnsupportedOperation`` (outside the whitelist: unknown
op, kind, function, field), ``SchemaError`` (unknown dataset or column, a
JSON value of the wrong type), ``LimitExceeded`` (depth, node count, name or
literal length, integer range), ``PolicyViolation`` (an exponent computed
from data or row order, a DP aggregate outside a DP dataset).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from bastion_kernel.contract.walk import frame_inputs, walk_exprs

from .model import Dataset

# Column names the executor keeps for its own accounting; a plan may not use them.
RESERVED_PREFIX = "__bastion"

MAX_LITERAL_LENGTH = 10_000     # characters in a string literal or pattern
MAX_LIST_LENGTH = 10_000        # values in an ``is_in`` list
MAX_HEAD = 1_000_000_000
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

QUANTILE_INTERPOLATIONS = ("nearest", "higher", "lower", "midpoint", "linear")
# polars duration strings such as "1d", "2w", "1mo", "3h30m".

# Per-function limits on parameter values, beyond their JSON type: (low, high).
_PARAM_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("std", "ddof"): (0, 255),
    ("var", "ddof"): (0, 255),
    ("quantile", "quantile"): (0.0, 1.0),
    ("round", "decimals"): (0, 38),
    ("str.slice", "length"): (0, INT64_MAX),
    ("head", "n"): (0, MAX_HEAD),
    ("tail", "n"): (0, MAX_HEAD),
}
_PARAM_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("quantile", "interpolation"): QUANTILE_INTERPOLATIONS,
}
# Parameters typed "optional_number" that polars needs as whole numbers.
_WHOLE_NUMBER_PARAMS = {("str.slice", "length")}


@dataclass(frozen=True)
class CheckedPlan:
    """A plan that passed validation.

    Attributes
    ----------
    root : dict
        A fresh copy of the plan built by the validator from checked values only.
    columns : Mapping[int, tuple[str, ...]]
        Output column names of every frame node, keyed by ``id()`` of the node
        inside ``root`` (the copy is owned by this object, so ids are stable).
    datasets : Mapping[str, Dataset]
        The datasets (and saved results) the plan reads, by name.
    """

    root: dict
    columns: Mapping[int, tuple[str, ...]]
    datasets: Mapping[str, Dataset]

    def columns_of(self, node: dict) -> tuple[str, ...]:
        """Output column names of a frame node of ``root``."""
        return self.columns[id(node)]


def validate(plan: Any, catalog: Mapping[str, Dataset],
             dataset_columns: Callable[[Dataset], Sequence[str]] | None = None) -> CheckedPlan:
    """Check an untrusted plan against the whitelist and the catalog.

    Parameters
    ----------
    plan : Any
        The decoded JSON plan (a frame node).
    catalog : Mapping[str, Dataset]
        The datasets this scientist may read, by name.
    dataset_columns : callable, optional
        ``Dataset -> column names``; defaults to asking each dataset's engine
        (:func:`owner_console.engine.engine_for`).

    Returns
    -------
    CheckedPlan

    Raises
    ------
    BastionError
        ``UnsupportedOperation``, ``SchemaError`` or ``LimitExceeded``, with a
        message naming what was refused and where (``details["at"]``).
    """
    if dataset_columns is None:
        from . import engine  # the engines own reading files; imported late to keep this layer light

        def dataset_columns(dataset: Dataset) -> Sequence[str]:
            return engine.engine_for([dataset]).columns(dataset)
    return _Validator(catalog, dataset_columns).check(plan)


def _refuse(ename: str, message: str, at: str, **details: Any) -> BastionError:
    return BastionError(ename, f"{message} (at {at})", at=at, **details)


# JSON's types as error messages name them; bool before int, which it subclasses.
_JSON_TYPE_NAMES = ((type(None), "null"), (bool, "a boolean"), (int, "an integer"), (float, "a number"),
                    (str, "a string"), (list, "a list"), (dict, "an object"))


def _describe(value: Any) -> str:
    """A short type description for error messages (never a long value)."""
    return next((name for kind, name in _JSON_TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def _known(value: Any, allowed: Collection[str], what: str, at: str, detail: str | None = None) -> str:
    """``value`` if it is one of ``allowed``, else refused, naming it (cut to 64 characters) and what is allowed.

    ``detail`` names the refusal's details entry that repeats it (none without).
    """
    if not isinstance(value, str) or value not in allowed:
        shown = value[:64] if isinstance(value, str) else _describe(value)
        raise _refuse("UnsupportedOperation", f"unknown {what} {shown!r}; supported: {', '.join(allowed)}", at,
                      **({detail: shown} if detail else {}))
    return value


def _sized(value: Any, kind: type, expected: str, limit: int, too_long: str, at: str) -> Any:
    """``value``, refused unless it is a ``kind`` of at most ``limit`` items (``too_long`` names the limit)."""
    if not isinstance(value, kind):
        raise _refuse("SchemaError", f"expected {expected}, got {_describe(value)}", at)
    if len(value) > limit:
        raise _refuse("LimitExceeded", too_long.format(limit), at)
    return value


class _Validator:
    def __init__(self, catalog: Mapping[str, Dataset],
                 dataset_columns: Callable[[Dataset], Sequence[str]]):
        self.catalog = catalog
        self.dataset_columns = dataset_columns
        self.nodes = 0
        self.columns: dict[int, tuple[str, ...]] = {}
        self.datasets: dict[str, Dataset] = {}
        self.frame_fields = {
            "name": self._name_field, "frame": self._frame_field, "frames": self._frames_field,
            "expr": self._expr_field, "exprs": self._exprs_field, "bools": self._bools_field,
            "bool": self._bool_field, "count": self._count_field, "names": self._names_field,
            "optional_names": self._optional_names_field, "name_map": self._name_map_field,
            "join_how": self._join_how_field, "offset": self._offset_field,
            "optional_count": self._optional_count_field,
        }
        self.column_rules = {
            "scan": self._cols_scan, "saved": self._cols_scan, "filter": self._cols_same,
            "select": self._cols_select, "with_columns": self._cols_with_columns,
            "group_by": self._cols_group_by, "sort": self._cols_sort, "head": self._cols_same,
            "drop": self._cols_drop, "rename": self._cols_rename, "drop_nulls": self._cols_subset,
            "fill_null": self._cols_same, "unique": self._cols_subset, "join": self._cols_join,
            "concat": self._cols_concat, "with_row_index": self._cols_with_row_index,
            "slice": self._cols_same, "explode": self._cols_explode,
        }
        self.param_checks = {
            "expr": None,  # handled with the frame's columns, see _fn_args
            "int": self._param_int, "number": self._param_number, "str": self._param_str,
            "bool": self._param_bool, "dtype": self._param_dtype,
            "literal_list": self._param_literal_list, "optional_str": self._param_optional_str,
            "optional_number": self._param_optional_number, "interval": self._param_interval,
            "closed": self._param_closed, "exprs": None,  # like "expr"
        }

    def check(self, plan: Any) -> CheckedPlan:
        if not isinstance(plan, dict):
            raise _refuse("UnsupportedOperation",
                          f"a plan must be a frame node (a JSON object with an 'op' field), got {_describe(plan)}",
                          "plan")
        root = self._frame(plan, "plan", 1)
        return CheckedPlan(root, self.columns, self.datasets)

    # ------------------------------------------------------------------ helpers
    def _count_node(self, at: str, depth: int) -> None:
        self.nodes += 1
        if self.nodes > P.MAX_PLAN_NODES:
            raise _refuse("LimitExceeded", f"the plan has more than {P.MAX_PLAN_NODES} nodes", at)
        if depth > P.MAX_PLAN_DEPTH:
            raise _refuse("LimitExceeded", f"the plan is nested deeper than {P.MAX_PLAN_DEPTH} levels", at)

    def _kind(self, node: Any, at: str, depth: int, head: str, kinds: Mapping[str, Mapping[str, str]], shape: str,
              unknown: str, what: str, detail: str | None = None) -> str:
        """The kind a frame or expression node names in its ``head`` field (``op``, ``expr``).

        Refused unless the node is an object whose kind is one of ``kinds`` and
        whose fields are exactly that kind's; it counts towards the plan's size.
        """
        if not isinstance(node, dict):
            raise _refuse("UnsupportedOperation", f"expected {shape} (a JSON object), got {_describe(node)}", at)
        self._count_node(at, depth)
        kind = _known(node.get(head), kinds, unknown, at, detail)
        self._exact_fields(node, kinds[kind], head, f"{what} {kind!r}", at)
        return kind

    def _exact_fields(self, node: dict, expected: Mapping[str, str], head: str, what: str, at: str) -> None:
        for key in node:
            if key != head and key not in expected:
                shown = key if isinstance(key, str) else repr(key)
                raise _refuse("UnsupportedOperation",
                              f"{what} has no field {shown[:64]!r}; it takes {', '.join(sorted(expected)) or 'no fields'}",
                              at)
        for key in expected:
            if key not in node:
                raise _refuse("UnsupportedOperation", f"{what} needs the field {key!r}", at)

    def _check_name(self, value: Any, at: str, what: str = "a name") -> str:
        if not isinstance(value, str):
            raise _refuse("SchemaError", f"{what} must be a string, got {_describe(value)}", at)
        if not value:
            raise _refuse("SchemaError", f"{what} must not be empty", at)
        if len(value) > P.MAX_NAME_LENGTH:
            raise _refuse("LimitExceeded", f"{what} is longer than {P.MAX_NAME_LENGTH} characters", at)
        return value

    def _check_column_name(self, value: Any, at: str) -> str:
        name = self._check_name(value, at, "a column name")
        if name.startswith(RESERVED_PREFIX):
            raise _refuse("SchemaError", f"column names starting with {RESERVED_PREFIX!r} are reserved "
                                         f"for the executor: {name[:64]!r}", at)
        return name

    def _known_column(self, name: str, columns: Sequence[str], at: str) -> None:
        if name not in columns:
            shown = ", ".join(repr(c) for c in columns[:50]) + (", ..." if len(columns) > 50 else "")
            raise _refuse("SchemaError", f"unknown column {name!r}; available columns: {shown}", at,
                          column=name, available=list(columns))

    def _no_duplicates(self, names: Sequence[str], at: str, what: str) -> tuple[str, ...]:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise _refuse("SchemaError", f"{what} would produce the column {name!r} twice; "
                                             "give one of them another name with .alias()", at, column=name)
            if name.startswith(RESERVED_PREFIX):
                raise _refuse("SchemaError", f"{what} would produce a column named {name[:64]!r}, "
                                             f"but names starting with {RESERVED_PREFIX!r} are reserved", at)
            seen.add(name)
        return tuple(names)

    # ------------------------------------------------------------------ frames
    def _frame(self, node: Any, at: str, depth: int) -> dict:
        op = self._kind(node, at, depth, "op", P.FRAME_OPS, "a frame node", "frame operation", "operation",
                        detail="op")
        expected = P.FRAME_OPS[op]
        # Nested frames first: expressions are checked against their columns.
        checked: dict[str, Any] = {"op": op}
        for key, kind in expected.items():
            if kind in ("frame", "frames"):
                checked[key] = self.frame_fields[kind](node[key], f"{at}.{key}", depth + 1)
        inputs = self._input_columns(op, checked)
        for key, kind in expected.items():
            if kind not in ("frame", "frames"):
                checked[key] = self.frame_fields[kind](node[key], f"{at}.{key}", depth + 1,
                                                       columns=self._columns_for_field(op, key, checked, inputs))
        self.columns[id(checked)] = self.column_rules[op](checked, inputs, at)
        return checked

    def _input_columns(self, op: str, checked: dict) -> Any:
        """The columns of the node's checked input frames: both sides of a join, each frame of a concat."""
        inputs = [self.columns[id(f)] for f in frame_inputs(checked)]
        if op == "join":
            return tuple(inputs)
        if op == "concat":
            return inputs
        return inputs[0] if inputs else ()

    @staticmethod
    def _columns_for_field(op: str, key: str, checked: dict, inputs: Any) -> Sequence[str]:
        if op == "join":
            return inputs[0] if key == "left_on" else inputs[1] if key == "right_on" else ()
        if op == "concat":
            return ()
        return inputs

    # frame field types --------------------------------------------------------
    def _name_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> str:
        return self._check_name(value, at)

    def _frame_field(self, value: Any, at: str, depth: int) -> dict:
        return self._frame(value, at, depth)

    def _frames_field(self, value: Any, at: str, depth: int) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise _refuse("SchemaError", f"expected a non-empty list of frames, got {_describe(value)}", at)
        return [self._frame(f, f"{at}[{i}]", depth) for i, f in enumerate(value)]

    def _expr_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> dict:
        return self._expr(value, columns, at, depth)

    def _exprs_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> list[dict]:
        if not isinstance(value, list):
            raise _refuse("SchemaError", f"expected a list of expressions, got {_describe(value)}", at)
        return [self._expr(e, columns, f"{at}[{i}]", depth) for i, e in enumerate(value)]

    def _bools_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> list[bool]:
        if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
            raise _refuse("SchemaError", "expected a list of booleans", at)
        return list(value)

    def _bool_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> bool:
        if not isinstance(value, bool):
            raise _refuse("SchemaError", f"expected a boolean, got {_describe(value)}", at)
        return value

    def _count_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _refuse("SchemaError", f"expected a whole number, got {_describe(value)}", at)
        if not 0 <= value <= MAX_HEAD:
            raise _refuse("LimitExceeded", f"expected a whole number from 0 to {MAX_HEAD}", at)
        return value

    def _offset_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> int:
        # A slice offset may count from the end (negative), as in polars.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _refuse("SchemaError", f"expected a whole number, got {_describe(value)}", at)
        if not -MAX_HEAD <= value <= MAX_HEAD:
            raise _refuse("LimitExceeded", f"expected a whole number from {-MAX_HEAD} to {MAX_HEAD}", at)
        return value

    def _optional_count_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> int | None:
        return None if value is None else self._count_field(value, at, depth)

    def _names_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> list[str]:
        if not isinstance(value, list):
            raise _refuse("SchemaError", f"expected a list of column names, got {_describe(value)}", at)
        names = [self._check_column_name(v, f"{at}[{i}]") for i, v in enumerate(value)]
        for i, name in enumerate(names):
            self._known_column(name, columns, f"{at}[{i}]")
        return names

    def _optional_names_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> list[str] | None:
        if value is None:
            return None
        names = self._names_field(value, at, depth, columns)
        if not names:
            raise _refuse("SchemaError", "expected null or a non-empty list of column names", at)
        return names

    def _name_map_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> dict[str, str]:
        if not isinstance(value, dict):
            raise _refuse("SchemaError", f"expected an object {{old: new}}, got {_describe(value)}", at)
        mapping = {}
        for old, new in value.items():
            self._check_column_name(old, f"{at}.{old!s:.64}")
            self._known_column(old, columns, f"{at}.{old!s:.64}")
            mapping[old] = self._check_column_name(new, f"{at}.{old!s:.64}")
        return mapping

    def _join_how_field(self, value: Any, at: str, depth: int, columns: Sequence[str] = ()) -> str:
        return _known(value, P.JOIN_HOWS, "join kind", at)

    # output columns of each op -------------------------------------------------
    def _cols_scan(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        name = node["dataset"] if node["op"] == "scan" else node["name"]
        dataset = self.catalog.get(name)
        if dataset is None:
            known = ", ".join(repr(n) for n in sorted(self.catalog)) or "none"
            what = "dataset" if node["op"] == "scan" else "saved result"
            raise _refuse("SchemaError", f"unknown {what} {name[:64]!r}; available: {known}", at)
        self.datasets[name] = dataset
        columns = tuple(self.dataset_columns(dataset))
        for column in columns:
            if column.startswith(RESERVED_PREFIX):
                raise _refuse("SchemaError", f"dataset {name!r} has a column named {column[:64]!r}, which the "
                                             "executor reserves; the owner must rename it", at)
        return columns

    def _cols_same(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        return tuple(inputs)

    def _cols_select(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        if not node["exprs"]:
            raise _refuse("SchemaError", "select needs at least one expression", at)
        return self._no_duplicates([P.output_name(e) for e in node["exprs"]], at, "select")

    def _cols_with_columns(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        new = self._no_duplicates([P.output_name(e) for e in node["exprs"]], at, "with_columns")
        columns = list(inputs)
        for name in new:
            if name not in columns:
                columns.append(name)
        return tuple(columns)

    def _cols_group_by(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        if not node["keys"]:
            raise _refuse("SchemaError", "group_by needs at least one key", at)
        names = [P.output_name(e) for e in node["keys"]] + [P.output_name(e) for e in node["aggs"]]
        return self._no_duplicates(names, at, "group_by")

    def _cols_sort(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        if not node["by"]:
            raise _refuse("SchemaError", "sort needs at least one expression to sort by", at)
        if len(node["descending"]) != len(node["by"]):
            raise _refuse("SchemaError", f"sort has {len(node['by'])} sort keys but "
                                         f"{len(node['descending'])} 'descending' flags", at)
        return tuple(inputs)

    def _cols_drop(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        return tuple(c for c in inputs if c not in node["columns"])

    def _cols_rename(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        return self._no_duplicates([node["mapping"].get(c, c) for c in inputs], at, "rename")

    def _cols_subset(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        return tuple(inputs)

    def _cols_join(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        left, right = inputs
        how, suffix = node["how"], node["suffix"]
        left_on, right_on = node["left_on"], node["right_on"]
        if how == "cross":
            if left_on or right_on:
                raise _refuse("SchemaError", "a cross join takes no join keys", at)
        else:
            if not left_on or len(left_on) != len(right_on):
                raise _refuse("SchemaError", f"a join needs the same number (at least one) of left and right keys, "
                                             f"got {len(left_on)} and {len(right_on)}", at)
            for side, keys in (("left_on", left_on), ("right_on", right_on)):
                for i, key in enumerate(keys):
                    if key["expr"] != "col":
                        raise _refuse("UnsupportedOperation",
                                      "join keys must be plain column names; compute other keys with "
                                      "with_columns() before the join", f"{at}.{side}[{i}]")
        if how in ("semi", "anti"):
            return tuple(left)
        # inner and left joins merge the right key columns into the left ones (polars' default).
        dropped = {k["name"] for k in right_on} if how in ("inner", "left") else set()
        names = list(left)
        for column in right:
            if column in dropped:
                continue
            names.append(column + suffix if column in left else column)
        return self._no_duplicates(names, at, "join")

    def _cols_concat(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        first = inputs[0]
        for i, columns in enumerate(inputs[1:], start=1):
            if tuple(columns) != tuple(first):
                raise _refuse("SchemaError", f"concat needs frames with the same columns in the same order; "
                                             f"frame 0 has {list(first)[:20]}, frame {i} has {list(columns)[:20]}", at)
        return tuple(first)

    def _cols_explode(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        if not node["columns"]:
            raise _refuse("SchemaError", "explode needs at least one column", at)
        if len(node["columns"]) > 1:
            # polars fails when the lists of one row differ in length: whether the query
            # fails would depend on rows that are never released.
            raise _refuse("UnsupportedOperation", "explode takes one column at a time (exploding several at once "
                                                  "fails on rows whose lists differ in length)", at)
        self._no_duplicates(node["columns"], at, "explode")
        return tuple(inputs)

    def _cols_with_row_index(self, node: dict, inputs: Any, at: str) -> tuple[str, ...]:
        name = self._check_column_name(node["name"], f"{at}.name")
        return self._no_duplicates([name, *inputs], at, "with_row_index")

    # ------------------------------------------------------------- expressions
    def _expr(self, node: Any, columns: Sequence[str], at: str, depth: int) -> dict:
        kind = self._kind(node, at, depth, "expr", P.EXPR_KINDS, "an expression", "expression kind", "expression")
        return self.expr_rules[kind](self, node, columns, at, depth)

    def _e_col(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        name = self._check_column_name(node["name"], f"{at}.name")
        self._known_column(name, columns, at)
        return {"expr": "col", "name": name}

    def _e_lit(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        return {"expr": "lit", "value": self._scalar(node["value"], f"{at}.value")}

    def _e_len(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        return {"expr": "len"}

    def _e_binary(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        op = _known(node["op"], P.BINARY_OPS, "binary operator", at)
        checked = {"expr": "binary", "op": op,
                   "left": self._expr(node["left"], columns, f"{at}.left", depth + 1),
                   "right": self._expr(node["right"], columns, f"{at}.right", depth + 1)}
        if op == "pow":
            _check_exponent(checked["right"], f"{at}.right")
        return checked

    def _e_unary(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        op = _known(node["op"], P.UNARY_OPS, "unary operator", at)
        return {"expr": "unary", "op": op, "operand": self._expr(node["operand"], columns, f"{at}.operand", depth + 1)}

    def _e_alias(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        inner = self._expr(node["input"], columns, f"{at}.input", depth + 1)
        return {"expr": "alias", "input": inner, "name": self._check_column_name(node["name"], f"{at}.name")}

    def _e_fn(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        name = _known(node["name"], P.EXPR_FUNCTIONS, "function", at, detail="function")
        if P.EXPR_FUNCTIONS[name].kind == "dp_aggregate":
            # DP aggregates exist only on the DP path (owner_console.dp), which never comes here.
            raise _refuse("PolicyViolation", f"{name} is a differentially private aggregate: it applies only "
                                             "to a dataset with a differential privacy policy", at, function=name)
        inner = self._expr(node["input"], columns, f"{at}.input", depth + 1)
        args = self._fn_args(name, node["args"], columns, f"{at}.args", depth + 1)
        if name == "pow":
            _check_exponent(args["exponent"], f"{at}.args.exponent")
        return {"expr": "fn", "name": name, "input": inner, "args": args}

    def _e_when(self, node: dict, columns: Sequence[str], at: str, depth: int) -> dict:
        branches = node["branches"]
        if not isinstance(branches, list) or not branches:
            raise _refuse("SchemaError", "when needs a non-empty list of branches", f"{at}.branches")
        checked = []
        for i, branch in enumerate(branches):
            where = f"{at}.branches[{i}]"
            if not isinstance(branch, dict):
                raise _refuse("SchemaError", f"a when branch must be an object, got {_describe(branch)}", where)
            self._exact_fields(branch, {"when": "expr", "then": "expr"}, "", "a when branch", where)
            checked.append({"when": self._expr(branch["when"], columns, f"{where}.when", depth + 1),
                            "then": self._expr(branch["then"], columns, f"{where}.then", depth + 1)})
        otherwise = node["otherwise"]
        if otherwise is not None:
            otherwise = self._expr(otherwise, columns, f"{at}.otherwise", depth + 1)
        return {"expr": "when", "branches": checked, "otherwise": otherwise}

    expr_rules = {"col": _e_col, "lit": _e_lit, "len": _e_len, "binary": _e_binary, "unary": _e_unary,
                  "alias": _e_alias, "fn": _e_fn, "when": _e_when}

    # --------------------------------------------------------- function params
    def _fn_args(self, name: str, args: Any, columns: Sequence[str], at: str, depth: int) -> dict:
        spec = P.EXPR_FUNCTIONS[name]
        if not isinstance(args, dict):
            raise _refuse("SchemaError", f"the arguments of {name!r} must be an object, got {_describe(args)}", at)
        params = dict(spec.params)
        for key in args:
            if key not in params:
                shown = key if isinstance(key, str) else repr(key)
                takes = ", ".join(params) or "no arguments"
                raise _refuse("UnsupportedOperation", f"function {name!r} has no parameter {shown[:64]!r}; "
                                                      f"it takes {takes}", at)
        checked = {}
        for param, ptype in spec.params:
            where = f"{at}.{param}"
            if param not in args:
                raise _refuse("UnsupportedOperation", f"function {name!r} needs the argument {param!r}", where)
            value = args[param]
            if ptype == "expr":
                checked[param] = self._expr(value, columns, where, depth + 1)
                continue
            if ptype == "exprs":
                if not isinstance(value, list) or not value:
                    raise _refuse("SchemaError", f"argument {param!r} of {name!r} must be a non-empty list of "
                                                 f"expressions, got {_describe(value)}", where)
                checked[param] = [self._expr(v, columns, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
                continue
            value = self.param_checks[ptype](value, where)
            low_high = _PARAM_RANGES.get((name, param))
            if low_high is not None and value is not None and not low_high[0] <= value <= low_high[1]:
                raise _refuse("LimitExceeded", f"argument {param!r} of {name!r} must be between "
                                               f"{low_high[0]} and {low_high[1]}", where)
            choices = _PARAM_CHOICES.get((name, param))
            if choices is not None and value not in choices:
                raise _refuse("SchemaError", f"argument {param!r} of {name!r} must be one of "
                                             f"{', '.join(choices)}", where)
            if (name, param) in _WHOLE_NUMBER_PARAMS and value is not None and not isinstance(value, int):
                raise _refuse("SchemaError", f"argument {param!r} of {name!r} must be a whole number", where)
            checked[param] = value
        return checked

    def _param_int(self, value: Any, at: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _refuse("SchemaError", f"expected a whole number, got {_describe(value)}", at)
        if not INT64_MIN <= value <= INT64_MAX:
            raise _refuse("LimitExceeded", "whole numbers must fit in 64 bits", at)
        return value

    def _param_number(self, value: Any, at: str) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse("SchemaError", f"expected a number, got {_describe(value)}", at)
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse("SchemaError", "expected a finite number (NaN and infinity are not allowed)", at)
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise _refuse("LimitExceeded", "whole numbers must fit in 64 bits", at)
        return value

    def _param_str(self, value: Any, at: str) -> str:
        return _sized(value, str, "a string", MAX_LITERAL_LENGTH, "strings are limited to {} characters", at)

    def _param_bool(self, value: Any, at: str) -> bool:
        if not isinstance(value, bool):
            raise _refuse("SchemaError", f"expected a boolean, got {_describe(value)}", at)
        return value

    def _param_dtype(self, value: Any, at: str) -> str:
        return _known(value, P.DTYPES, "dtype", at)

    def _param_literal_list(self, value: Any, at: str) -> list:
        _sized(value, list, "a list of values", MAX_LIST_LENGTH, "value lists are limited to {} items", at)
        items = [self._scalar(v, f"{at}[{i}]") for i, v in enumerate(value)]
        kinds = {_scalar_family(v) for v in items if v is not None}
        if len(kinds) > 1:
            raise _refuse("SchemaError", "the values of a list must all be numbers, all strings or all booleans", at)
        return items

    def _param_optional_str(self, value: Any, at: str) -> str | None:
        return None if value is None else self._param_str(value, at)

    def _param_optional_number(self, value: Any, at: str) -> int | float | None:
        return None if value is None else self._param_number(value, at)

    def _param_interval(self, value: Any, at: str) -> str:
        if not isinstance(value, str) or not P.INTERVAL.match(value):
            raise _refuse("SchemaError", "expected a duration such as '1d', '2w', '1mo', '1y' or '6h'", at)
        return value

    def _param_closed(self, value: Any, at: str) -> str:
        if not isinstance(value, str) or value not in P.CLOSED_VALUES:
            raise _refuse("SchemaError", f"expected one of {', '.join(P.CLOSED_VALUES)}", at)
        return value

    def _scalar(self, value: Any, at: str) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise _refuse("LimitExceeded", "whole numbers must fit in 64 bits", at)
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _refuse("SchemaError", "expected a finite number (NaN and infinity are not allowed)", at)
            return value
        if isinstance(value, str):
            if len(value) > MAX_LITERAL_LENGTH:
                raise _refuse("LimitExceeded", f"string literals are limited to {MAX_LITERAL_LENGTH} characters", at)
            return value
        raise _refuse("SchemaError", f"a literal must be null, a boolean, a number or a string, got {_describe(value)}", at)


def _is_constant(expr: dict) -> bool:
    """True for a checked expression built from literals only (no column, no ``len``)."""
    return not any(part["expr"] in ("col", "len") for part in walk_exprs(expr))


def _check_exponent(exponent: dict, at: str) -> None:
    """Refuse an exponent computed from data or from row order.

    ``2.0 ** col("x")`` gives each row a weight of its own, so one sum can
    pack many people's values (one per binary digit); a literal exponent
    (``col("x") ** 2``) cannot.
    """
    if not _is_constant(exponent):
        raise _refuse("PolicyViolation", "pow: the exponent must be a literal number, as in col(\"x\") ** 2; an "
                                         "exponent computed from a column or from row order (2 ** col(\"x\")) "
                                         "can pack many people's values into one number, so it is refused", at,
                      function="pow")


def _scalar_family(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "str"
