"""Namespaces: ``expr.str``, ``expr.dt`` and the ``pl`` module stand-in.

``expr.str.<fn>`` and ``expr.dt.<fn>`` are the ``str.*`` and ``dt.*``
functions of :data:`bastion_kernel.contract.plan.EXPR_FUNCTIONS`.  ``pl`` is not
polars: it is a fixed table of the language's builtin functions and data
types, so that code copied from polars (``pl.col``, ``pl.len``, ``pl.Int64``)
works and nothing else does.
"""
from __future__ import annotations

from typing import Any

from bastion_kernel.contract import plan as P

from .errors import UnsupportedOperation, suggest
from .expr import DTYPE_VALUES, Expr, ExprNamespace, make_function_handler, render_expr
from .registry import FUNCTIONS, Context, method, prop


class StrNamespace(ExprNamespace):
    """String functions of an expression (``col("name").str``)."""

    type_name = "Expr.str"

    def __repr__(self) -> str:
        return f"<string functions of {', '.join(render_expr(n) for n in self.expr.nodes)}>"


class DtNamespace(ExprNamespace):
    """Date and time functions of an expression (``col("admission_date").dt``)."""

    type_name = "Expr.dt"

    def __repr__(self) -> str:
        return f"<date functions of {', '.join(render_expr(n) for n in self.expr.nodes)}>"


for _name in P.EXPR_FUNCTIONS:
    _space, _, _short = _name.partition(".")
    if _space == "str":
        method(StrNamespace, _short)(make_function_handler(_name))
    elif _space == "dt":
        method(DtNamespace, _short)(make_function_handler(_name))


@prop(Expr, "str")
def expr_str(ctx: Context, expr: Expr) -> StrNamespace:
    """String functions of the expression.

    Returns
    -------
    StrNamespace
        Its methods (``contains``, ``to_lowercase``, ``slice``...) make expressions.

    Examples
    --------
    >>> patients.filter(col("diagnosis").str.contains("itis"))
    """
    return StrNamespace(expr)


@prop(Expr, "dt")
def expr_dt(ctx: Context, expr: Expr) -> DtNamespace:
    """Date and time functions of the expression.

    Returns
    -------
    DtNamespace
        Its methods (``year``, ``month``, ``truncate``...) make expressions.

    Examples
    --------
    >>> patients.group_by(col("admission_date").dt.year()).agg(len())
    """
    return DtNamespace(expr)


class PolarsModule:
    """What ``pl`` means in a cell: the language's functions and data types under polars' names."""

    type_name = "pl"

    def __repr__(self) -> str:
        return "<pl: the Bastion language's polars-compatible functions and data types>"


POLARS_MODULE = PolarsModule()


def polars_attribute(name: str) -> Any:
    """``pl.<name>``: a builtin function or a data type, from fixed tables only."""
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    if name in DTYPE_VALUES:
        return DTYPE_VALUES[name]
    raise UnsupportedOperation(f"pl.{name} is not part of the Bastion language"
                               f"{suggest(name, polars_attribute_names())}")


def polars_attribute_names() -> list[str]:
    """Every name ``pl.`` offers."""
    return sorted(set(FUNCTIONS) | set(DTYPE_VALUES))


__all__ = ["StrNamespace", "DtNamespace", "PolarsModule", "POLARS_MODULE", "polars_attribute",
           "polars_attribute_names"]
