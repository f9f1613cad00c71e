"""Functions that change how many values a column has, or their order, and where they may stand.

``filter``, ``sort_by``, ``head``, ``tail`` and ``unique`` belong inside an
aggregation (``col("x").filter(c).sum()``), where the values are reduced; in
a row context they would no longer line up with the rows (and their
accounting), so they are refused there.  Inside an aggregation, a
``filter`` is accounted in its masked form (:func:`as_masked`): one value
per row, null where the filter drops the row.
"""
from __future__ import annotations

from typing import Iterable

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from bastion_kernel.contract.walk import expr_children

_RESHAPING_FUNCTIONS = ("filter", "sort_by", "head", "tail", "unique")
_AGGREGATIONS = ("aggregate", "row_aggregate")


def reshaping_outside_aggregation(expr: dict, inside: bool = False) -> str | None:
    """The first length- or order-changing function (filter, sort_by, head...) not under an aggregation."""
    if expr["expr"] == "fn":
        name = expr["name"]
        if name in _RESHAPING_FUNCTIONS and not inside:
            return name
        if P.EXPR_FUNCTIONS[name].kind in _AGGREGATIONS and name not in _RESHAPING_FUNCTIONS:
            inside = True
    for child in expr_children(expr):
        found = reshaping_outside_aggregation(child, inside)
        if found is not None:
            return found
    return None


def refuse_reshaping(exprs: Iterable[dict], where: str) -> None:
    """Refuse a length- or order-changing function outside an aggregation in ``exprs`` (``where``: their place)."""
    for expr in exprs:
        name = reshaping_outside_aggregation(expr)
        if name is not None:
            raise BastionError("UnsupportedOperation",
                               f"{name}() changes how many values a column has (or their order), so in {where} its "
                               f"values would no longer line up with their rows; use it inside an aggregation, "
                               f"for example col(\"x\").{name}(...).sum() in group_by().agg() or select()",
                               function=name)


def as_masked(expr: dict) -> dict:
    """An aggregation input with every ``filter(pred)`` written as ``when(pred).then(x)``.

    Same values for the aggregate (the rows the filter drops become nulls,
    which aggregations skip), but one value per row, so the contribution
    accounting can line them up with the rows' ids: only rows that pass the
    filter (and are not zero) count as contributors.
    """
    kind = expr["expr"]
    if kind == "fn":
        if expr["name"] == "filter":
            return {"expr": "when", "branches": [{"when": as_masked(expr["args"]["predicate"]),
                                                  "then": as_masked(expr["input"])}], "otherwise": None}
        args = {}
        for param, ptype in P.EXPR_FUNCTIONS[expr["name"]].params:
            value = expr["args"][param]
            args[param] = (as_masked(value) if ptype == "expr" else
                           [as_masked(v) for v in value] if ptype == "exprs" else value)
        return {**expr, "input": as_masked(expr["input"]), "args": args}
    if kind == "alias":
        return {**expr, "input": as_masked(expr["input"])}
    if kind == "unary":
        return {**expr, "operand": as_masked(expr["operand"])}
    if kind == "binary":
        return {**expr, "left": as_masked(expr["left"]), "right": as_masked(expr["right"])}
    if kind == "when":
        otherwise = expr["otherwise"]
        return {**expr, "branches": [{"when": as_masked(b["when"]), "then": as_masked(b["then"])}
                                     for b in expr["branches"]],
                "otherwise": None if otherwise is None else as_masked(otherwise)}
    return expr


def kept_rows(expr: dict) -> dict | None:
    """The rows an aggregation's input keeps: the conjunction of its ``filter`` predicates (None: every row).

    Filters inside an inner aggregation choose that aggregation's rows, not these.
    """
    predicates: list[dict] = []
    stack = [expr]
    while stack:
        node = stack.pop()
        if node["expr"] == "fn":
            if node["name"] == "filter":
                predicates.append(as_masked(node["args"]["predicate"]))
            elif P.EXPR_FUNCTIONS[node["name"]].kind in _AGGREGATIONS:
                continue
        stack.extend(reversed(expr_children(node)))
    kept = predicates[0] if predicates else None
    for predicate in predicates[1:]:
        kept = {"expr": "binary", "op": "and", "left": kept, "right": predicate}
    return kept
