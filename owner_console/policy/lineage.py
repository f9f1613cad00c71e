"""What an expression's values are computed from (lineage) and at what level (row, aggregate, individual).

A column's *lineage* is the set of ``(source index, source column)`` pairs
its values are computed from; a row index is a value of its own
(:data:`ROW_ORDER`), so that an aggregate weighting data by the row order is
seen.  An expression's *level* says whether it yields one value per row, an
aggregate, one individual row's value or a constant.  Both are read off the
validated expression through the contract's walker.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.walk import expr_children, walk_exprs

_EMPTY: frozenset = frozenset()

# The "source index" of lineage pairs that stand for a row's position, not a
# source column: ``(ROW_ORDER, index column)``.  A row index numbers each row,
# so it is one person's value; weights built from it (``x * 2.0 ** index``)
# pack many people's values into one aggregate.
ROW_ORDER = -1


def expr_lineage(expr: dict, lineage: Mapping[str, frozenset]) -> frozenset:
    """The source columns an expression's values are computed from.

    Aggregations marked ``counts_only`` (count, len, n_unique, null_count) do
    not carry their input's values, so they drop its lineage.  Pairs whose
    source index is :data:`ROW_ORDER` stand for a row index.
    """
    kind = expr["expr"]
    if kind == "col":
        return lineage[expr["name"]]
    if kind == "fn" and P.EXPR_FUNCTIONS[expr["name"]].counts_only:
        return _EMPTY
    return _EMPTY.union(*(expr_lineage(child, lineage) for child in expr_children(expr)))


# Functions whose values cannot be tied to the rows they came from:
# ``over`` broadcasts an aggregate of the row's partition (a small partition's
# mean lands on its rows) and ``sort_by`` reorders values against their rows.
# Their results are counted as individual values (row-level), never guessed.
_UNACCOUNTED_FUNCTIONS = ("over", "sort_by")

# "row": one value per input row; "agg": a reduction over all rows of the
# group; "individual": one individual row's value (first/last/mode);
# "lit": a constant.
_LEVEL_ORDER = ("lit", "agg", "individual", "row")


def _combine(*levels: str) -> str:
    return max(levels, key=_LEVEL_ORDER.index, default="lit")


def expr_level(expr: dict) -> str:
    """Whether an expression yields per-row values, an aggregate, an individual value or a constant."""
    kind = expr["expr"]
    if kind == "col":
        return "row"
    if kind == "lit":
        return "lit"
    if kind == "len":
        return "agg"
    inner = [expr_level(child) for child in expr_children(expr)]
    if kind == "fn":
        spec = P.EXPR_FUNCTIONS[expr["name"]]
        if expr["name"] in _UNACCOUNTED_FUNCTIONS:
            return "individual"
        if spec.kind == "row_aggregate":
            return "individual"
        if spec.kind == "aggregate":
            return "individual" if "individual" in inner else "agg"
    return _combine(*inner)


def tainting(exprs: Iterable[dict], lineage: Mapping[str, frozenset] | None = None) -> bool:
    """True when an expression has a part that carries individual values (over, first, sort_by, implode...).

    Such a part may sit inside a row-level expression (``cost == cost.max().over("zip")``),
    whose level alone does not show it.  Given the lineage of the expressions'
    input, an aggregation of values computed from both a row index and data
    (``(survived * 2.0 ** index).sum()``, :func:`_packs_row_order`) counts too:
    each row's weight is its own, so the aggregate may hold each row's value.
    """
    exprs = list(exprs)
    if any(expr_level(part) == "individual" for expr in exprs for part in walk_exprs(expr)):
        return True
    return lineage is not None and any(_packs_row_order(e, lineage) for e in exprs)


def _packs_row_order(expr: dict, lineage: Mapping[str, frozenset]) -> bool:
    """True when an aggregation in ``expr`` reduces values computed from both a row index and data.

    An aggregation of the index alone (``index.mean()``), or of data alone, is
    accounted as any other; a filter or group key on the index is a frame
    operation, not a value inside the aggregation.
    """
    for part in walk_exprs(expr):
        if part["expr"] == "fn" and P.EXPR_FUNCTIONS[part["name"]].kind == "aggregate":
            reduced = _EMPTY.union(*(expr_lineage(child, lineage) for child in expr_children(part)))
            if any(s == ROW_ORDER for s, _ in reduced) and any(s != ROW_ORDER for s, _ in reduced):
                return True
    return False


_PLAIN_FUNCTIONS = ("abs", "round", "sqrt", "log", "exp", "cast")
_PLAIN_OPS = ("add", "sub", "mul", "truediv")


def is_plain(expr: dict) -> bool:
    """True for arithmetic on columns that cannot single out rows (no condition, clip, fill, comparison...).

    An aggregate of anything else may be "padded": every row but a few gets
    the same chosen value (``when(name == X).then(cost).otherwise(1)``,
    ``cost.clip(lower=L)``), so the contribution rule also requires K rows
    whose value differs from the one most rows share.
    """
    kind = expr["expr"]
    if kind in ("col", "lit"):
        return True
    if kind == "alias":
        return is_plain(expr["input"])
    if kind == "unary":
        return expr["op"] == "neg" and is_plain(expr["operand"])
    if kind == "binary":
        return expr["op"] in _PLAIN_OPS and is_plain(expr["left"]) and is_plain(expr["right"])
    if kind == "fn":
        if expr["name"] == "cast" and expr["args"]["dtype"] == "Boolean":
            return False
        return expr["name"] in _PLAIN_FUNCTIONS and is_plain(expr["input"])
    return False
