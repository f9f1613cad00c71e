"""How the SQL front end refuses: typed errors that name the construct and point at it.

Every refusal is a :class:`~bastion_kernel.contract.protocol.BastionError`:
``UnsupportedOperation`` for SQL outside the subset (``construct`` names it),
``SchemaError`` for an unknown or ambiguous name.  Both carry the ``line``
and ``col`` of the offending text when sqlglot located it.
"""
from __future__ import annotations

from typing import Any, Collection

from sqlglot import exp

from bastion_kernel.contract.protocol import BastionError

# How a refused node class is named when its class name would not say it.
CONSTRUCT_NAMES: dict[type, str] = {
    exp.Window: "window function (OVER)",
    exp.Star: "*",
    exp.Values: "VALUES",
    exp.Unnest: "UNNEST",
    exp.Lateral: "LATERAL",
    exp.Intersect: "INTERSECT",
    exp.Except: "EXCEPT",
    exp.Filter: "aggregate FILTER (WHERE ...)",
    exp.Distinct: "DISTINCT inside a function",
    exp.Placeholder: "query parameter",
}


def position(node: exp.Expression | None) -> dict:
    """``{"line", "col"}`` of the first token of ``node`` that sqlglot located."""
    if node is None:
        return {}
    for sub in node.walk():
        meta = getattr(sub, "meta", None) or {}
        if isinstance(meta.get("line"), int) and isinstance(meta.get("col"), int):
            width = meta.get("end", 0) - meta.get("start", 0) if isinstance(meta.get("end"), int) else 0
            return {"line": meta["line"], "col": max(1, meta["col"] - width)}
    return {}


def describe(node: exp.Expression) -> str:
    """How a refused node is named in messages."""
    named = CONSTRUCT_NAMES.get(type(node))
    if named:
        return named
    if isinstance(node, exp.Anonymous):
        return f"Anonymous function {node.name}"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name()}"
    return type(node).__name__


def unsupported(what: str, node: exp.Expression | None = None, hint: str = "") -> BastionError:
    """An ``UnsupportedOperation`` naming the construct ``what``."""
    message = f"SQL construct '{what}' is not supported"
    if hint:
        message += f": {hint}"
    return BastionError("UnsupportedOperation", message, construct=what, **position(node))


def refuse(node: exp.Expression, hint: str = "") -> BastionError:
    """An ``UnsupportedOperation`` naming ``node``'s construct."""
    return unsupported(describe(node), node, hint)


def schema_error(message: str, node: exp.Expression | None = None, **details: Any) -> BastionError:
    """A ``SchemaError`` (unknown or ambiguous name) at ``node``."""
    return BastionError("SchemaError", message, **details, **position(node))


def check_args(node: exp.Expression, allowed: Collection[str]) -> None:
    """Refuse any clause or flag of ``node`` that the handler does not read."""
    for key, value in node.args.items():
        if key in allowed or value is None or value is False or value == [] or value == "":
            continue
        label = key.rstrip("_").replace("_", " ").upper()
        raise unsupported(f"{label} in {describe(node)}", value if isinstance(value, exp.Expression) else node)


def arg(node: exp.Expression, *names: str) -> Any:
    """An argument under its current or older sqlglot key (``from_``/``from``)."""
    for name in names:
        value = node.args.get(name)
        if value is not None:
            return value
    return None


def subquery_refusal(node: exp.Expression, what: str) -> BastionError:
    """Refuse a subquery inside an expression, saying whether it is correlated."""
    inner = {t.alias_or_name for t in node.find_all(exp.Table)} | \
            {s.alias for s in node.find_all(exp.Subquery) if s.alias}
    for column in node.find_all(exp.Column):
        if column.table and column.table not in inner:
            return unsupported("correlated subquery", node,
                               f"it refers to the outer query's {column.table}.{column.name}; subqueries are "
                               "allowed only in FROM and WITH (join a grouped subquery instead)")
    return unsupported(what, node, "subqueries are allowed only in FROM and WITH "
                                   "(join a grouped subquery instead)")
