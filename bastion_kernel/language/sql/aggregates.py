"""SQL aggregate functions -> plan aggregates: the :data:`AGGREGATES` whitelist.

A handler reads the aggregate's argument with ``ctx`` (row-level
expressions) and hands each plan aggregate to ``register``, which computes
it once as a hidden column of the ``group_by`` and returns a reference to it.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from sqlglot import exp

from bastion_kernel.contract import plan as P

from .refusals import check_args, unsupported

Register = Callable[[dict], dict]


class ArgumentContext(Protocol):
    """What an aggregate handler needs: its argument translated at row level."""

    def expr(self, node: exp.Expression) -> dict:
        """The plan expression of ``node``."""


def _count(ctx: ArgumentContext, node: exp.Count, register: Register) -> dict:
    check_args(node, ("this", "big_int"))
    argument = node.this
    if argument is None or isinstance(argument, exp.Star):
        return register(P.length())
    if isinstance(argument, exp.Distinct):
        check_args(argument, ("expressions",))
        if len(argument.expressions) != 1:
            raise unsupported("COUNT(DISTINCT of several columns)", node)
        subject = ctx.expr(argument.expressions[0])
        # SQL does not count NULL as a distinct value; polars' n_unique does.
        has_null = P.fn("cast", P.binary("gt", register(P.fn("null_count", subject)), P.lit(0)), dtype="UInt32")
        return P.binary("sub", register(P.fn("n_unique", subject)), has_null)
    return register(P.fn("count", ctx.expr(argument)))


def _aggregate(name: str, **params: Any) -> Callable[[ArgumentContext, exp.Expression, Register], dict]:
    def handler(ctx: ArgumentContext, node: exp.Expression, register: Register) -> dict:
        check_args(node, ("this",))
        if isinstance(node.this, exp.Distinct):
            raise unsupported(f"{node.sql_name()}(DISTINCT ...)", node, "only COUNT(DISTINCT x) is supported")
        return register(P.fn(name, ctx.expr(node.this), **params))
    return handler


AGGREGATES: dict[type, Callable[[ArgumentContext, Any, Register], dict]] = {
    exp.Count: _count,
    exp.Sum: _aggregate("sum"),
    exp.Avg: _aggregate("mean"),
    exp.Min: _aggregate("min"),
    exp.Max: _aggregate("max"),
    exp.Median: _aggregate("median"),
    exp.Stddev: _aggregate("std", ddof=1),
    exp.StddevSamp: _aggregate("std", ddof=1),
    exp.StddevPop: _aggregate("std", ddof=0),
    exp.Variance: _aggregate("var", ddof=1),
    exp.VariancePop: _aggregate("var", ddof=0),
}


def has_aggregate(node: exp.Expression) -> bool:
    """Whether ``node`` contains an aggregate function."""
    return any(type(sub) in AGGREGATES for sub in node.walk())
