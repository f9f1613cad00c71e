"""Plans as text for people: equivalent polars code, and an indented tree.

Used wherever a plan is shown to a person (the owner's review console, the
audit log, the scientist's pending-request display).  Pure: no polars import;
the output is for reading, never for running.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from . import plan as P

_BINARY_SYMBOLS = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
    "and": "&", "or": "|", "xor": "^",
}
# Python's operator precedence (higher binds tighter), so the text parses back the same way.
_PRECEDENCE = {
    "pow": 7,
    "mul": 5, "truediv": 5, "floordiv": 5, "mod": 5,
    "add": 4, "sub": 4,
    "and": 3, "xor": 2, "or": 1,
    "eq": 0, "ne": 0, "lt": 0, "le": 0, "gt": 0, "ge": 0,
}
_UNARY_PRECEDENCE = 6
_ATOM = 10

# polars' keyword names where the plan's parameter names are shorter.
_KEYWORDS = {("clip", "lower"): "lower_bound", ("clip", "upper"): "upper_bound",
             ("is_between", "lower"): "lower_bound", ("is_between", "upper"): "upper_bound",
             ("is_in", "values"): "other"}


def _literal(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False, default=str)


def _expr(expr: Any, bare_literal: bool = False, bare_strings: bool = False) -> tuple[str, int]:
    """(text, precedence) of an expression.

    ``bare_literal`` prints a literal without ``pl.lit`` where polars takes a
    plain value; a string stays wrapped unless ``bare_strings`` (most polars
    methods read a bare string as a column name).
    """
    if not isinstance(expr, dict):
        return _literal(expr), _ATOM
    kind = expr.get("expr")
    if kind == "col":
        return f"pl.col({_literal(expr.get('name'))})", _ATOM
    if kind == "lit":
        value = expr.get("value")
        if bare_literal and (bare_strings or not isinstance(value, str)):
            text = _literal(value)
            return text, (_UNARY_PRECEDENCE if text.startswith("-") else _ATOM)
        return f"pl.lit({_literal(value)})", _ATOM
    if kind == "len":
        return "pl.len()", _ATOM
    if kind == "alias":
        return f"{_postfix(expr.get('input'))}.alias({_literal(expr.get('name'))})", _ATOM
    if kind == "unary":
        operand, prec = _expr(expr.get("operand"))
        symbol = "~" if expr.get("op") == "not" else "-"
        return symbol + (operand if prec >= _UNARY_PRECEDENCE else f"({operand})"), _UNARY_PRECEDENCE
    if kind == "binary":
        return _binary(expr)
    if kind == "fn":
        return _function(expr), _ATOM
    if kind == "when":
        parts = []
        for i, branch in enumerate(expr.get("branches") or []):
            head = "pl.when" if i == 0 else ".when"
            parts.append(f"{head}({text_of(branch.get('when'))}).then({text_of(branch.get('then'), True)})")
        if expr.get("otherwise") is not None:
            parts.append(f".otherwise({text_of(expr['otherwise'], True)})")
        return "".join(parts), _ATOM
    return f"<{kind}>", _ATOM


def _binary(expr: dict) -> tuple[str, int]:
    op = expr.get("op")
    prec = _PRECEDENCE.get(op, 0)
    left, right = expr.get("left"), expr.get("right")
    # One side must stay an expression for Python to build a polars expression.
    left_bare = isinstance(right, dict) and right.get("expr") != "lit"
    right_bare = isinstance(left, dict) and left.get("expr") != "lit"
    left_text, left_prec = _expr(left, left_bare, bare_strings=True)
    right_text, right_prec = _expr(right, right_bare, bare_strings=True)
    comparison = prec == 0
    if left_prec < prec or (comparison and left_prec == 0) or (op == "pow" and left_prec <= prec):
        left_text = f"({left_text})"
    if right_prec < prec or (right_prec == prec and op != "pow"):
        right_text = f"({right_text})"
    return f"{left_text} {_BINARY_SYMBOLS.get(op, op)} {right_text}", prec


def _postfix(expr: Any) -> str:
    """An expression as the receiver of a method call (parenthesized unless atomic)."""
    text, prec = _expr(expr)
    return text if prec >= _ATOM else f"({text})"


def _function(expr: dict) -> str:
    name = expr.get("name")
    args = expr.get("args") or {}
    spec = P.EXPR_FUNCTIONS.get(name)
    rendered = []
    if spec is not None:
        for param, ptype in spec.params:
            if param not in args:
                continue
            value = args[param]
            if param in spec.defaults and value == spec.defaults[param] and \
                    type(value) is type(spec.defaults[param]):
                continue  # polars' own default: leave it out, as a person would
            if ptype == "expr":
                shown = text_of(value, True)
            elif ptype == "exprs":
                shown = "[" + ", ".join(_name_or_expr(v) for v in value or []) + "]"
            elif ptype == "dtype":
                shown = f"pl.{value}"
            else:
                shown = _literal(value)
            if param in spec.defaults or ptype == "bool":
                rendered.append(f"{_KEYWORDS.get((name, param), param)}={shown}")
            else:
                rendered.append(shown)
    else:
        rendered = [f"{k}={_literal(v)}" for k, v in args.items()]
    return f"{_postfix(expr.get('input'))}.{name}({', '.join(rendered)})"


def text_of(expr: Any, bare_literal: bool = False) -> str:
    """An expression as polars code, e.g. ``pl.col("age") >= 18``."""
    return _expr(expr, bare_literal)[0]


def _fill_value(expr: Any) -> str:
    # fill_null reads a bare string as a value, not a column name.
    return _expr(expr, True, bare_strings=True)[0]


def _name_or_expr(expr: Any) -> str:
    # group_by("sex") reads better than group_by(pl.col("sex")), and means the same.
    if isinstance(expr, dict) and expr.get("expr") == "col":
        return _literal(expr.get("name"))
    return text_of(expr)


def _names(names: Any) -> str:
    return "[" + ", ".join(_literal(n) for n in names or []) + "]"


def _frame_text(node: Any) -> str:
    if not isinstance(node, dict):
        return f"<{type(node).__name__}>"
    op = node.get("op")
    arguments = _ARGUMENTS.get(op) if isinstance(op, str) else None
    if arguments is not None:
        return f"{_frame_text(node.get('input'))}.{op}({arguments(node) or ''})"
    handler = _FRAME_TEXT.get(op)
    if handler is None:
        return f"<{op}>"
    return handler(node)


def _sort_args(node: dict) -> str:
    parts = [_name_or_expr(e) for e in node.get("by") or []]
    descending = node.get("descending") or []
    if any(descending):
        parts.append("descending=" + ("True" if len(descending) == 1 else _literal(descending)))
    if node.get("nulls_last"):
        parts.append("nulls_last=True")
    return ", ".join(parts)


def _join_text(node: dict) -> str:
    left, right = _frame_text(node.get("left")), _frame_text(node.get("right"))
    how = node.get("how")
    parts = [right]
    left_on, right_on = node.get("left_on") or [], node.get("right_on") or []
    if how != "cross":
        if left_on == right_on:
            keys = [_name_or_expr(e) for e in left_on]
            parts.append("on=" + (keys[0] if len(keys) == 1 else "[" + ", ".join(keys) + "]"))
        else:
            for label, keys in (("left_on", left_on), ("right_on", right_on)):
                shown = [_name_or_expr(e) for e in keys]
                parts.append(f"{label}=" + (shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"))
    parts.append(f"how={_literal(how)}")
    if node.get("suffix", "_right") != "_right":
        parts.append(f"suffix={_literal(node.get('suffix'))}")
    return f"{left}.join({', '.join(parts)})"


def _subset_args(node: dict) -> str | None:
    subset = node.get("subset")
    return None if subset is None else _names(subset)


def _exprs(node: dict, key: str) -> str:
    return ", ".join(text_of(e) for e in node.get(key) or [])


def _group_keys(node: dict) -> str:
    return ", ".join(_name_or_expr(k) for k in node.get("keys") or [])


# The arguments of the one-input operations whose text is ``<input>.<op>(<arguments>)`` and whose tree label
# is ``<op> <arguments>`` (None: no arguments).
_ARGUMENTS: dict[str, Callable[[dict], str | None]] = {
    "filter": lambda n: text_of(n.get("predicate")),
    "select": lambda n: _exprs(n, "exprs"),
    "with_columns": lambda n: _exprs(n, "exprs"),
    "sort": _sort_args,
    "head": lambda n: _literal(n.get("n")),
    "slice": lambda n: f"{_literal(n.get('offset'))}, {_literal(n.get('length'))}",
    "explode": lambda n: _names(n.get("columns") or []),
    "drop": lambda n: ", ".join(_literal(c) for c in n.get("columns") or []),
    "rename": lambda n: _literal_map(n.get("mapping")),
    "drop_nulls": _subset_args,
    "unique": _subset_args,
    "fill_null": lambda n: _fill_value(n.get("value")),
    "with_row_index": lambda n: _literal(n.get("name")),
}

# The text of the other operations.
_FRAME_TEXT: dict[str, Callable[[dict], str]] = {
    "scan": lambda n: f"dataset({_literal(n.get('dataset'))}{', mock=True' if n.get('mock') is True else ''})",
    "saved": lambda n: f"saved({_literal(n.get('name'))})",
    "group_by": lambda n: f"{_frame_text(n.get('input'))}.group_by({_group_keys(n)}).agg({_exprs(n, 'aggs')})",
    "join": _join_text,
    "concat": lambda n: "pl.concat([" + ", ".join(_frame_text(f) for f in n.get("inputs") or []) + "])",
}


def _literal_map(mapping: Any) -> str:
    if not isinstance(mapping, dict):
        return _literal(mapping)
    return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in mapping.items()) + "}"


def plan_to_polars_text(plan: dict) -> str:
    """Equivalent polars code for a plan, for people to read.

    Parameters
    ----------
    plan : dict
        A frame node.

    Returns
    -------
    str
        For example ``dataset("patients").filter(pl.col("age") >= 18).group_by("sex").agg(pl.col("cost").mean())``.
    """
    return _frame_text(plan)


# ---------------------------------------------------------------- tree
def _tree_label(node: dict) -> str:
    op = node.get("op")
    arguments = _ARGUMENTS.get(op) if isinstance(op, str) else None
    if arguments is not None:
        text = arguments(node)
        return op if text is None else f"{op} {text}"
    if op == "scan":
        return f"scan {_literal(node.get('dataset'))}{' (mock)' if node.get('mock') is True else ''}"
    if op == "saved":
        return f"saved {_literal(node.get('name'))}"
    if op == "group_by":
        return f"group_by {_group_keys(node)} agg {_exprs(node, 'aggs')}"
    if op == "join":
        how = node.get("how")
        if how == "cross":
            return "join how='cross'"
        left = ", ".join(_name_or_expr(e) for e in node.get("left_on") or [])
        right = ", ".join(_name_or_expr(e) for e in node.get("right_on") or [])
        return f"join how={_literal(how)} left_on {left} right_on {right}"
    if op == "concat":
        return "concat"
    return f"<{op}>"


def _children(node: dict) -> list[Any]:
    if node.get("op") == "join":
        return [node.get("left"), node.get("right")]
    if node.get("op") == "concat":
        return list(node.get("inputs") or [])
    return [node["input"]] if "input" in node else []


def plan_tree(plan: dict) -> str:
    """A plan as an indented tree, one node per line, the result at the top.

    Parameters
    ----------
    plan : dict
        A frame node: the top line; its inputs follow, each indented two more spaces.

    Returns
    -------
    str
        For example::

            group_by "sex" agg pl.col("cost").mean()
              filter pl.col("age") >= 18
                scan "patients"
    """
    lines: list[str] = []

    def walk(node: Any, depth: int) -> None:
        if not isinstance(node, dict):
            lines.append("  " * depth + f"<{type(node).__name__}>")
            return
        lines.append("  " * depth + _tree_label(node))
        for child in _children(node):
            walk(child, depth + 1)

    walk(plan, 0)
    return "\n".join(lines)
