"""Output column names: what the text names each SELECT item, and settling clashes.

The rules are those of the package docstring ("Output column names").  The
names the text gives are read before sqlglot's ``qualify`` rewrites the items
(it aliases every item, ``_col_0`` for an unnamed expression), and kept in
the items' ``meta``.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from bastion_kernel.contract import plan as P

from .refusals import schema_error

# Internal column names (join keys, hidden aggregates, sort keys, the SELECT's
# sources) start with this; the executor reserves "__bastion", so it must differ.
HIDDEN = "__sql_"
_AS_NAME = "bastion_as_name"            # meta of an item written ``expr AS name``: the name as written
_DERIVED_NAME = "bastion_derived_name"  # meta of an unnamed item: its derived name


def mark_outputs(select: exp.Select) -> None:
    """Record on ``select``'s items the names the text gives them (before ``qualify``)."""
    for item in select.expressions:
        if isinstance(item, exp.Alias):
            item.meta[_AS_NAME] = item.alias
        elif not isinstance(item, exp.Star) and not (isinstance(item, exp.Column) and isinstance(item.this, exp.Star)):
            item.meta[_DERIVED_NAME] = derived_name(item)


def written_name(item: exp.Expression) -> tuple[str | None, bool]:
    """``(name, explicit)`` of a qualified SELECT item: its AS name, its derived name, or None (from a ``*``)."""
    if _AS_NAME in item.meta:
        return item.meta[_AS_NAME], True
    inner = item.this if isinstance(item, exp.Alias) else item
    return inner.meta.get(_DERIVED_NAME), False


def derived_name(node: exp.Expression) -> str:
    """The name of an unaliased SELECT item (see the package docstring)."""
    if isinstance(node, exp.Paren):
        return derived_name(node.this)
    if isinstance(node, exp.Column):
        return node.name
    if isinstance(node, (exp.Cast, exp.TryCast)):
        return derived_name(node.this)
    if isinstance(node, exp.Count) and (node.this is None or isinstance(node.this, exp.Star)):
        return "count"
    columns = [c.name for c in node.find_all(exp.Column, bfs=False)]
    if isinstance(node, exp.Func) and len(set(columns)) == 1:
        return f"{_function_label(node)}_{columns[0]}".lower()
    return columns[0] if columns else "literal"


def _function_label(node: exp.Func) -> str:
    if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct):
        return "count_distinct"
    if isinstance(node, exp.Extract):
        return node.this.name
    if isinstance(node, exp.Anonymous):
        return node.name
    return node.sql_name()


@dataclass
class Output:
    """One output column of a SELECT."""

    expr: dict              # the value, before naming
    name: str               # the final output name
    fallback: str | None    # a unique alternative for a plain column reference
    explicit: bool          # named with AS


def name_outputs(outputs: list[Output], node: exp.Expression) -> None:
    """Settle output names: AS names and column names first, derived names then take a free one.

    Plain column references that share a name take their unique frame name
    (``zip``, ``zip_right``); a derived name that is taken gets ``_1``,
    ``_2``...; two AS names (or columns) that still clash are an error.
    """
    counts: dict[str, int] = {}
    for out in outputs:
        if out.explicit or out.fallback:
            counts[out.name] = counts.get(out.name, 0) + 1
    for out in outputs:
        if counts.get(out.name, 0) > 1 and out.fallback and not out.explicit:
            out.name = out.fallback
    claimed: set[str] = set()
    for out in outputs:
        if not (out.explicit or out.fallback):
            continue
        if out.name in claimed:
            raise schema_error(f"the query would produce two columns named {out.name!r}; "
                               "name one of them with AS", node, column=out.name)
        claimed.add(out.name)
    for out in outputs:
        if out.explicit or out.fallback:
            continue
        base, n = out.name, 0
        while out.name in claimed:
            n += 1
            out.name = f"{base}_{n}"
        claimed.add(out.name)
    for out in outputs:
        if out.name.startswith(HIDDEN) or out.name.startswith("__bastion"):
            raise schema_error(f"output column names may not start with {HIDDEN!r} or '__bastion': "
                               f"{out.name!r}", node, column=out.name)


def projection(outputs: list[Output]) -> list[dict]:
    """The select expressions producing ``outputs`` under their names."""
    return [o.expr if o.expr == P.col(o.name) else P.alias(o.expr, o.name) for o in outputs]
