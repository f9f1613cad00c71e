"""The hidden-column rule: a hidden column is an equality join key or passes through unchanged, nothing else.

A column is hidden when the owner's policy of its source says so; a column
computed from one *carries* it (its lineage holds the hidden pair).  Any
other use (a filter, a group key, an aggregation, a sort key, a unique
subset...) is refused with a ``PolicyViolation`` that names the column, its
dataset and the use, from the plan only; released hidden values are
replaced with ``*`` by :mod:`owner_console.decide`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from bastion_kernel.contract.protocol import BastionError
from bastion_kernel.contract.walk import expr_children

from .accounted import Source
from .lineage import ROW_ORDER

_HIDDEN_RULE = ("hidden columns can only be equality join keys (a plain column in a join's keys) or be passed "
                "through unchanged, and are released as *")


def hidden_sources(pairs: Iterable[tuple[int, str]], sources: Sequence[Source]) -> tuple[tuple[str, str], ...]:
    """The ``(dataset, column)`` hidden columns among lineage ``pairs``, sorted."""
    return tuple(sorted({(sources[s].dataset, c) for s, c in pairs
                         if s != ROW_ORDER and c in sources[s].policy.hidden}))


def refuse_hidden(sources: Sequence[Source], lineage: Mapping[str, frozenset], exprs: Iterable[dict],
                  where: str, op: str, passthrough: bool = False) -> None:
    """Refuse expressions over a frame (of ``lineage``) that read a hidden column.

    ``where`` and ``op`` name the use in the refusal; with ``passthrough``, a
    plain column (under any aliases) may be hidden: it passes through unchanged.
    """
    if not any(source.policy.hidden for source in sources):
        return
    is_hidden = _carries_hidden(sources, lineage)
    for expr in exprs:
        if passthrough and _plain_column(expr) is not None:
            continue
        found = _hidden_use(expr, is_hidden)
        if found is not None:
            column, around = found
            raise _hidden_violation(column, hidden_sources(lineage[column], sources),
                                    _operation_label(around) + where, op)


def refuse_hidden_names(sources: Sequence[Source], lineage: Mapping[str, frozenset], names: Iterable[str],
                        where: str, op: str) -> None:
    """Refuse a frame operation whose column list (a subset, explode's columns) names a hidden column."""
    if not any(source.policy.hidden for source in sources):
        return
    is_hidden = _carries_hidden(sources, lineage)
    for name in names:
        if is_hidden(name):
            raise _hidden_violation(name, hidden_sources(lineage[name], sources), where, op)


def _carries_hidden(sources: Sequence[Source], lineage: Mapping[str, frozenset]) -> Callable[[str], bool]:
    """``column -> True`` when the frame's column carries a hidden column of a source."""
    return lambda column: any(s != ROW_ORDER and c in sources[s].policy.hidden for s, c in lineage[column])


def _plain_column(expr: dict) -> str | None:
    """The column an expression passes through unchanged (a ``col`` under any aliases), else None."""
    while expr["expr"] == "alias":
        expr = expr["input"]
    return expr["name"] if expr["expr"] == "col" else None


def _hidden_use(expr: dict, is_hidden: Callable[[str], bool],
                around: dict | None = None) -> tuple[str, dict | None] | None:
    """The first hidden column ``expr`` reads, and the smallest expression (not an alias) that reads it.

    Every reference counts, counting ones included (``name.count()``,
    ``name.is_null()``): how many values a hidden column has, or which are
    null, is something learned from it.
    """
    if expr["expr"] == "col":
        return (expr["name"], around) if is_hidden(expr["name"]) else None
    inner = around if expr["expr"] == "alias" else expr
    for child in expr_children(expr):
        found = _hidden_use(child, is_hidden, inner)
        if found is not None:
            return found
    return None


def _operation_label(expr: dict | None) -> str:
    """A short name for the expression that uses a hidden column, from the plan only (never a literal)."""
    if expr is None:
        return ""
    kind = expr["expr"]
    if kind == "fn":
        return f"{expr['name']}() in "
    if kind in ("binary", "unary"):
        return f"{expr['op']}() in "
    return "when/then in " if kind == "when" else ""


def _hidden_violation(column: str, origins: tuple[tuple[str, str], ...], where: str, op: str) -> BastionError:
    """The refusal of a use of a hidden column: names the column, its dataset and the use (plan facts only)."""
    dataset, source_column = origins[0]
    if column == source_column and len(origins) == 1:
        what = f"column {column!r} of {dataset!r} is hidden by the owner's policy"
    else:
        what = (f"column {column!r} carries the hidden column {source_column!r} of {dataset!r} "
                f"(hidden by the owner's policy)")
    return BastionError("PolicyViolation", f"{what}, so it cannot be used in {where}; {_HIDDEN_RULE}",
                        column=column, dataset=dataset, op=op, sources=sorted({d for d, _ in origins}))
