"""Differential privacy in the language: ``expr.dp``, ``frame.dp_preview()``, ``budget()``.

On a dataset whose owner chose differential privacy, the executor releases
only noisy aggregates computed by OpenDP: ``pl.len()`` (noised there),
``col(x).dp.sum(bounds=(lo, hi))``, ``col(x).dp.mean(...)`` and
``col(x).dp.quantile(q)``, grouped by the owner's public keys or not at all.
Each released query spends part of the scientist's privacy budget;
``dp_preview()`` shows what a query would cost and how accurate it would be
before anything is spent, and ``budget()`` what is left.  The functions here
only build plans (``dp.*`` functions of :data:`bastion_kernel.contract.plan.EXPR_FUNCTIONS`)
and ask the session; the executor decides everything.
"""
from __future__ import annotations

from typing import Any

from bastion_kernel.contract import plan as P

from .errors import SchemaError
from .expr import Expr, ExprNamespace, check_param, describe_value, render_expr
from .frame import RemoteFrame
from .registry import Context, documented_like, function, method, prop
from .values import FetchedTable


class DpNamespace(ExprNamespace):
    """Differentially private aggregates of an expression (``col("age").dp``)."""

    type_name = "Expr.dp"

    def __repr__(self) -> str:
        return f"<differentially private aggregates of {', '.join(render_expr(n) for n in self.expr.nodes)}>"


def _bounds(fn_name: str, bounds: Any) -> dict:
    """``bounds=(lo, hi)`` as the plan's ``lower``/``upper`` (None: the owner's bounds)."""
    if bounds is None:
        return {"lower": None, "upper": None}
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise SchemaError(f"{fn_name}() argument 'bounds' must be a pair (lower, upper), "
                          f"not {describe_value(bounds)}")
    lower = check_param(fn_name, "bounds", "number", bounds[0])
    upper = check_param(fn_name, "bounds", "number", bounds[1])
    if not lower < upper:
        raise SchemaError(f"{fn_name}() argument 'bounds' needs lower < upper")
    return {"lower": lower, "upper": upper}


def _apply(namespace: DpNamespace, fn_name: str, args: dict) -> Expr:
    return namespace.expr.map(lambda node: P.fn(fn_name, node, **args))


@prop(Expr, "dp")
def expr_dp(ctx: Context, expr: Expr) -> DpNamespace:
    """Differentially private aggregates of the expression (for datasets under differential privacy).

    Returns
    -------
    DpNamespace
        Its methods (``sum``, ``mean``, ``quantile``) make noisy aggregates.

    Examples
    --------
    >>> patients.select(col("age").dp.mean(bounds=(0, 100)))
    """
    return DpNamespace(expr)


@method(DpNamespace, "sum")
def dp_sum(ctx: Context, namespace: DpNamespace, bounds: Any = None) -> Expr:
    """A differentially private sum: values are clipped to the bounds, then noise is added.

    Parameters
    ----------
    bounds : tuple of two numbers, optional
        ``(lower, upper)`` clipping bounds; the wider they are, the more noise.
        Default: the owner's bounds for the column (they must lie within them).

    Returns
    -------
    Expr
        An aggregate that only a dataset under differential privacy computes.

    Examples
    --------
    >>> patients.group_by("sex").agg(pl.len(), col("cost").dp.sum(bounds=(0, 50000)))
    """
    return _apply(namespace, "dp.sum", _bounds("sum", bounds))


@method(DpNamespace, "mean")
@documented_like(dp_sum, "Returns")
def dp_mean(ctx: Context, namespace: DpNamespace, bounds: Any = None) -> Expr:
    """A differentially private mean: a noisy clipped sum over a noisy count.

    Parameters
    ----------
    bounds : tuple of two numbers, optional
        ``(lower, upper)`` clipping bounds. Default: the owner's bounds for the column.

    Examples
    --------
    >>> patients.select(col("age").dp.mean(bounds=(0, 100)).alias("mean_age"))
    """
    return _apply(namespace, "dp.mean", _bounds("mean", bounds))


@method(DpNamespace, "quantile")
@documented_like(dp_sum, "Returns")
def dp_quantile(ctx: Context, namespace: DpNamespace, quantile: Any = 0.5, candidates: Any = None,
                bounds: Any = None) -> Expr:
    """A differentially private quantile: one of the candidates, chosen with noise.

    Parameters
    ----------
    quantile : float, default 0.5
        Between 0 and 1 (0.5 is the median).
    candidates : list of numbers, optional
        The values the answer is picked from, in increasing order. Default:
        101 evenly spaced values over the bounds.
    bounds : tuple of two numbers, optional
        ``(lower, upper)`` for the default candidates. Default: the owner's bounds.

    Examples
    --------
    >>> patients.select(col("age").dp.quantile(0.5, candidates=[20, 30, 40, 50, 60, 70]))
    """
    q = check_param("quantile", "quantile", "number", quantile)
    if not 0 <= q <= 1:
        raise SchemaError("quantile() argument 'quantile' must be between 0 and 1")
    listed = [] if candidates is None else check_param("quantile", "candidates", "literal_list", candidates)
    return _apply(namespace, "dp.quantile", {"quantile": q, "candidates": listed, **_bounds("quantile", bounds)})


@method(RemoteFrame, "dp_preview")
def frame_dp_preview(ctx: Context, frame: RemoteFrame) -> FetchedTable:
    """Show what a differentially private query would cost and how accurate it would be, spending nothing.

    Returns
    -------
    FetchedTable
        One row per noisy statistic: its noise distribution, scale and the
        accuracy at 95% confidence; the notes give the query's epsilon and
        the budget left.

    Examples
    --------
    >>> patients.group_by("sex").agg(pl.len(), col("age").dp.mean(bounds=(0, 100))).dp_preview()
    """
    ctx.require_effects("dp_preview()")
    return ctx.session.dp_preview(frame.plan)


@function("budget")
def budget(ctx: Context) -> FetchedTable:
    """Show your privacy budget on each differentially private dataset: total, spent and left.

    Returns
    -------
    FetchedTable
        One row per dataset under differential privacy.

    Examples
    --------
    >>> budget()
    """
    ctx.require_effects("budget()")
    return ctx.session.budget()


__all__ = ["DpNamespace", "expr_dp", "dp_sum", "dp_mean", "dp_quantile", "frame_dp_preview", "budget"]
