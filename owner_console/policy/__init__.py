"""The owner's policy: the accounting a plan needs before it runs.

:func:`account` rewrites a checked plan so that the engine computes, next to
the scientist's columns, how many rows of every *source* fed each output row
(a source is one ``scan`` occurrence, so a self-join has two).  It also
follows each output column back to the source columns it was computed from
(its *lineage*), for hidden columns, and refuses any use of a hidden column
other than an equality join key or an unchanged pass-through (the rule of
``docs/policy.md``).  A row index is a value of its own in the lineage
(``ROW_ORDER``): an aggregate that mixes it with data is row-level.

:func:`owner_console.decide.decide` then reads those counts from the
engine's result and applies the rule of the design: a released row must be
computed from at least ``K`` rows of every protected source that fed it.

Next to the counts, every aggregation of row-level values gets, per source,
the number of rows (people) that made a real contribution to it, for an
order statistic how many hold the value it releases, whether it is finite,
and for sums, means, std and var the dominance measures; these columns
travel with the rows to the result and are checked by the decision (the
contribution, order-statistic, dominance and finiteness rules of
``docs/policy.md``).

Nothing here depends on polars' internals: the accounting is expressed as
plan nodes that :mod:`owner_console.engine` compiles.

Modules, one job each:

- :mod:`.accounted`: :class:`Source`, :class:`Counting` (how a source is
  counted in a frame's rows) and :class:`AccountedPlan`, what accounting returns.
- :mod:`.accountant`: :func:`account`, the rule of each frame operation.
- :mod:`.lineage`: what an expression is computed from, and its level.
- :mod:`.hidden`: the hidden-column rule and its refusals.
- :mod:`.reshaping`: length- and order-changing functions, inside and outside aggregations.
- :mod:`.contributions`: the per-aggregate accounting columns.
- :mod:`.dominance`: the dominance rule's constants and its measure.
- :mod:`.inherited`: the policy a saved result inherits.
"""
from __future__ import annotations

from .accountant import account
from .accounted import AccountedPlan, Counting, Source
from .dominance import DOMINANCE_P_RATIO, DOMINANCE_TOP_TWO, DOMINANCE_UNSURE
from .hidden import hidden_sources
from .inherited import inherited_policy
from .lineage import ROW_ORDER, expr_level, expr_lineage, is_plain
from .reshaping import reshaping_outside_aggregation

__all__ = ["account", "AccountedPlan", "Counting", "Source", "DOMINANCE_P_RATIO", "DOMINANCE_TOP_TWO",
           "DOMINANCE_UNSURE", "hidden_sources", "inherited_policy", "ROW_ORDER", "expr_level", "expr_lineage",
           "is_plain", "reshaping_outside_aggregation"]
