"""The owner's policy: the accounting a plan needs, and counts + policies -> a decision.

Two steps of the executor's one-way path live here:

:func:`account` rewrites a checked plan so that the engine computes, next to
the scientist's columns, how many rows of every *source* fed each output row
(a source is one ``scan`` occurrence, so a self-join has two).  It also
follows each output column back to the source columns it was computed from
(its *lineage*), for hidden columns, and refuses any use of a hidden column
other than an equality join key or an unchanged pass-through (the rule of
``docs/policy.md``).  A row index is a value of its own in the lineage
(``ROW_ORDER``): an aggregate that mixes it with data is row-level.

:func:`decide` reads those counts from the engine's result and applies the
rule of the design: a released row must be computed from at least ``K`` rows
of every protected source that fed it.  It then removes the accounting
columns, replaces hidden values with ``*``, and returns ``Released`` /
``Held`` or raises ``PolicyViolation``.

How each source is counted, per frame (``_Rep.kind``):

``implicit``
    Every row is one distinct source row and no two rows share one (scan,
    filter, sort, head...).  A group's count is ``len``: exact and cheap.
``rid``
    A row-id column (1, 2, ...; null: the row is not from this source, e.g.
    after ``concat``; 0: an outer join found no partner on this side).  Used
    once rows may be duplicated (joins) or mixed (concat); a group's count is
    the number of distinct ids.
``count``
    A count column on aggregated rows (null: not fed by this source; 0: fed
    by fewer than K, e.g. an unmatched outer-join row).  A second-level
    group_by sums counts only when the first-level rows are fed by disjoint
    sets of source rows; otherwise each row counts as one (row-level).

With ``person_id`` a scan is counted as ``rid`` over a person number, so
groups count people, not rows.

Next to the counts, every aggregation of row-level values gets, per source,
the number of rows (people) that made a real contribution to it, for an
order statistic how many hold the value it releases, whether it is finite,
and for sums, means, std and var the dominance measures
(``_Frame.contribs``); these columns travel with the rows to the result and
are checked by :func:`decide` (the contribution, order-statistic, dominance
and finiteness rules of ``docs/policy.md``).

Nothing here depends on polars' internals: the accounting is expressed as
plan nodes that :mod:`owner_console.engine` compiles.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping


from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError

from .model import Policy, strictest_unsafe
from .validate import RESERVED_PREFIX, CheckedPlan

_EMPTY: frozenset = frozenset()


@dataclass(frozen=True)
class Source:
    """One scan occurrence of a dataset (or saved result) in a plan."""

    index: int
    dataset: str
    policy: Policy


@dataclass(frozen=True)
class _Rep:
    kind: str                 # "implicit" | "rid" | "count"
    column: str | None        # the accounting column (None for implicit)
    disjoint: bool = True     # distinct rows are fed by disjoint sets of source rows
    nullable: bool = False    # some rows may not come from this source (concat)
    taintable: bool = False   # some rows may have no partner on this side (outer/anti join)
    individual: bool = False  # rows hold individual values (first/last/mode, implicit lists)
    repeated: bool = False    # a source row may appear in several rows (after a join)
    tainted: bool = False     # rows carry a value from other rows (over, first...): aggregates of them are row-level


@dataclass
class _Frame:
    node: dict
    columns: tuple[str, ...]
    lineage: dict[str, frozenset]
    reps: dict[int, _Rep]
    aggregated: bool
    # accounting column -> ("contrib" | "held", source index), ("dominated", 0) or
    # ("finite", 1): the checks of aggregates computed so far (see
    # decide._check_contributions).
    contribs: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class AccountedPlan:
    """A checked plan with the accounting the policy needs.

    Attributes
    ----------
    plan : dict
        The plan to run: the scientist's operations plus internal ``acct_*``
        nodes that compute per-source counts next to each output row.
    columns : tuple[str, ...]
        The scientist's output columns, in order (all other columns are accounting).
    sources : tuple[Source, ...]
        Every scan occurrence, by index.
    reps : Mapping[int, _Rep]
        How each source that feeds the result is counted in the result.
    lineage : Mapping[str, frozenset]
        Output column -> ``{(source index, source column)}``.
    hidden : Mapping[str, tuple[tuple[str, str], ...]]
        Output columns derived from hidden columns -> the ``(dataset, column)`` pairs.
    aggregated : bool
        True when the result rows are aggregates (group_by/agg or a global aggregate).
    """

    plan: dict
    columns: tuple[str, ...]
    sources: tuple[Source, ...]
    reps: Mapping[int, _Rep]
    lineage: Mapping[str, frozenset]
    hidden: Mapping[str, tuple[tuple[str, str], ...]]
    aggregated: bool
    contribs: Mapping[str, tuple[str, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Expression analysis: lineage and aggregation level.

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
    if kind in ("lit", "len"):
        return _EMPTY
    if kind == "alias":
        return expr_lineage(expr["input"], lineage)
    if kind == "unary":
        return expr_lineage(expr["operand"], lineage)
    if kind == "binary":
        return expr_lineage(expr["left"], lineage) | expr_lineage(expr["right"], lineage)
    if kind == "fn":
        spec = P.EXPR_FUNCTIONS[expr["name"]]
        if spec.counts_only:
            return _EMPTY
        result = expr_lineage(expr["input"], lineage)
        for param, ptype in spec.params:
            if ptype == "expr":
                result = result | expr_lineage(expr["args"][param], lineage)
            elif ptype == "exprs":
                for item in expr["args"][param]:
                    result = result | expr_lineage(item, lineage)
        return result
    if kind == "when":
        result = _EMPTY
        for branch in expr["branches"]:
            result = result | expr_lineage(branch["when"], lineage) | expr_lineage(branch["then"], lineage)
        if expr["otherwise"] is not None:
            result = result | expr_lineage(expr["otherwise"], lineage)
        return result
    raise AssertionError(f"unchecked expression kind {kind!r}")  # the validator admits no other


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
    if kind == "alias":
        return expr_level(expr["input"])
    if kind == "unary":
        return expr_level(expr["operand"])
    if kind == "binary":
        return _combine(expr_level(expr["left"]), expr_level(expr["right"]))
    if kind == "fn":
        spec = P.EXPR_FUNCTIONS[expr["name"]]
        inner = [expr_level(expr["input"])] + [expr_level(a) for a in _expr_args(expr)]
        if expr["name"] in _UNACCOUNTED_FUNCTIONS:
            return "individual"
        if spec.kind == "row_aggregate":
            return "individual"
        if spec.kind == "aggregate":
            return "individual" if "individual" in inner else "agg"
        return _combine(*inner)
    if kind == "when":
        parts = [expr_level(b["when"]) for b in expr["branches"]] + [expr_level(b["then"]) for b in expr["branches"]]
        if expr["otherwise"] is not None:
            parts.append(expr_level(expr["otherwise"]))
        return _combine(*parts)
    raise AssertionError(f"unchecked expression kind {kind!r}")


# ---------------------------------------------------------------------------
# account()

def account(checked: CheckedPlan,
            unique_keys: Callable[[str, tuple[str, ...]], bool] | None = None,
            exact_dominance: bool = False) -> AccountedPlan:
    """Add the accounting the policy needs to a checked plan.

    Parameters
    ----------
    checked : CheckedPlan
        The validator's output.
    unique_keys : callable, optional
        ``unique_keys(dataset, columns)``: True when no two rows of the
        dataset share a value of ``columns`` (checked on the owner's side,
        never released).  When the right side of an inner or left join is
        such a dataset (a scan, possibly filtered, sorted, cut or without
        nulls) joined on those columns, each left row meets at most one right
        row, so the left sources keep their cheap counts instead of row ids.
        The answer only chooses how the exact counts are computed; the engine
        checks it again on the very table the query reads
        (``acct_unique``).  Without it every join counts row ids.
    exact_dominance : bool, default False
        Measure dominance exactly (each group's median, and the largest
        distances from it).  By default a bound from plain aggregates clears
        most groups at the cost of a sum; a group it cannot clear is marked
        ``DOMINANCE_UNSURE`` and the executor runs the plan again with
        ``exact_dominance`` (:func:`owner_console.executor.evaluate`).

    Returns
    -------
    AccountedPlan
        The plan to run, with per-source counts, plus each output column's lineage.
    """
    accountant = _Accountant(checked, unique_keys, exact_dominance)
    top = accountant.frame(checked.root)
    sources = tuple(accountant.sources)
    hidden: dict[str, tuple[tuple[str, str], ...]] = {}
    for column in top.columns:
        touched = hidden_sources(top.lineage[column], sources)
        if touched:
            hidden[column] = tuple(touched)
    return AccountedPlan(plan=top.node, columns=top.columns, sources=sources, reps=dict(top.reps),
                         lineage=dict(top.lineage), hidden=hidden, aggregated=top.aggregated,
                         contribs=dict(top.contribs))


def hidden_sources(pairs: Iterable[tuple[int, str]], sources: list[Source] | tuple[Source, ...]
                   ) -> tuple[tuple[str, str], ...]:
    """The ``(dataset, column)`` hidden columns among lineage ``pairs``, sorted."""
    return tuple(sorted({(sources[s].dataset, c) for s, c in pairs
                         if s != ROW_ORDER and c in sources[s].policy.hidden}))


def _rid(s: int) -> str:
    return f"{RESERVED_PREFIX}_r{s}"


def _count(s: int) -> str:
    return f"{RESERVED_PREFIX}_n{s}"


# Aggregations whose value is computed from their input's values: the
# contribution rule applies to them (``len`` carries nothing but the group size).
_CONTRIBUTION_FUNCTIONS = ("sum", "mean", "median", "min", "max", "std", "var", "quantile", "count", "n_unique",
                           "null_count")
# Aggregations that release one row's value: at least K contributors must hold it.
_ORDER_STATISTICS = ("min", "max", "median", "quantile")
# Aggregations of values that can be inf or NaN, or overflow: such a value is not released.
_FINITE_FUNCTIONS = ("sum", "mean", "median", "min", "max", "std", "var", "quantile")
# Aggregations one amplified contribution can carry a value out of: the dominance rule applies to them.
_DOMINANCE_FUNCTIONS = ("sum", "mean", "std", "var")
# The default dominance rules (ACRO's defaults), on each contribution's
# distance from its group's median, so that a constant added to every row
# changes nothing and amplified contributions cannot move the centre: the
# two largest distances make up at most DOMINANCE_TOP_TWO of the total (the
# N-K rule with n=2), and the total minus the two largest is at least
# DOMINANCE_P_RATIO of the largest (the p-ratio rule).
DOMINANCE_TOP_TWO = 0.9
DOMINANCE_P_RATIO = 0.1
# The value of a dominance column for a group that the cheap bound could not
# clear (0: not dominated, 1: dominated): measured again exactly.
DOMINANCE_UNSURE = 2
# Accounting kinds that fail when too large (the others fail when too small):
# carried through a later aggregation as their largest value.
_LARGEST_FAILS = ("dominated",)


def _millionths(share: float) -> int:
    return int(round(share * 1_000_000))


def _kept(expr: dict) -> dict | None:
    """The rows an aggregation's input keeps: the conjunction of its ``filter`` predicates (None: every row).

    Filters inside an inner aggregation choose that aggregation's rows, not these.
    """
    predicates: list[dict] = []

    def walk(node: dict) -> None:
        if node["expr"] == "fn":
            if node["name"] == "filter":
                predicates.append(_as_masked(node["args"]["predicate"]))
            elif P.EXPR_FUNCTIONS[node["name"]].kind in ("aggregate", "row_aggregate"):
                return
        for child in _children(node):
            walk(child)

    walk(expr)
    kept = predicates[0] if predicates else None
    for predicate in predicates[1:]:
        kept = {"expr": "binary", "op": "and", "left": kept, "right": predicate}
    return kept


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


# Functions whose values cannot be tied to the rows they came from:
# ``over`` broadcasts an aggregate of the row's partition (a small partition's
# mean lands on its rows) and ``sort_by`` reorders values against their rows.
# Their results are counted as individual values (row-level), never guessed.
_UNACCOUNTED_FUNCTIONS = ("over", "sort_by")
# Functions that change how many values a column has, or their order: they
# belong inside an aggregation (``col("x").filter(c).sum()``), where the
# values are reduced; in a row context they would no longer line up with
# the rows (and their accounting).
_RESHAPING_FUNCTIONS = ("filter", "sort_by", "head", "tail", "unique")


def _expr_args(expr: dict) -> list[dict]:
    """The expression arguments of a function call (``expr`` and ``exprs`` parameters)."""
    found: list[dict] = []
    for param, ptype in P.EXPR_FUNCTIONS[expr["name"]].params:
        if ptype == "expr":
            found.append(expr["args"][param])
        elif ptype == "exprs":
            found.extend(expr["args"][param])
    return found


def _children(expr: dict) -> list[dict]:
    kind = expr["expr"]
    if kind == "fn":
        return [expr["input"], *_expr_args(expr)]
    if kind == "alias":
        return [expr["input"]]
    if kind == "unary":
        return [expr["operand"]]
    if kind == "binary":
        return [expr["left"], expr["right"]]
    if kind == "when":
        parts = [p for b in expr["branches"] for p in (b["when"], b["then"])]
        return parts + ([expr["otherwise"]] if expr["otherwise"] is not None else [])
    return []


def reshaping_outside_aggregation(expr: dict, inside: bool = False) -> str | None:
    """The first length- or order-changing function (filter, sort_by, head...) not under an aggregation."""
    if expr["expr"] == "fn":
        name = expr["name"]
        if name in _RESHAPING_FUNCTIONS and not inside:
            return name
        if P.EXPR_FUNCTIONS[name].kind in ("aggregate", "row_aggregate") and name not in _RESHAPING_FUNCTIONS:
            inside = True
    for child in _children(expr):
        found = reshaping_outside_aggregation(child, inside)
        if found is not None:
            return found
    return None


def _refuse_reshaping(exprs: Iterable[dict], where: str) -> None:
    for expr in exprs:
        name = reshaping_outside_aggregation(expr)
        if name is not None:
            raise BastionError("UnsupportedOperation",
                               f"{name}() changes how many values a column has (or their order), so in {where} its "
                               f"values would no longer line up with their rows; use it inside an aggregation, "
                               f"for example col(\"x\").{name}(...).sum() in group_by().agg() or select()",
                               function=name)


def _as_masked(expr: dict) -> dict:
    """An aggregation input with every ``filter(pred)`` written as ``when(pred).then(x)``.

    Same values for the aggregate (the rows the filter drops become nulls,
    which aggregations skip), but one value per row, so the contribution
    accounting can line them up with the rows' ids: only rows that pass the
    filter (and are not zero) count as contributors.
    """
    kind = expr["expr"]
    if kind == "fn":
        if expr["name"] == "filter":
            return {"expr": "when", "branches": [{"when": _as_masked(expr["args"]["predicate"]),
                                                  "then": _as_masked(expr["input"])}], "otherwise": None}
        args = {}
        for param, ptype in P.EXPR_FUNCTIONS[expr["name"]].params:
            value = expr["args"][param]
            args[param] = (_as_masked(value) if ptype == "expr" else
                           [_as_masked(v) for v in value] if ptype == "exprs" else value)
        return {**expr, "input": _as_masked(expr["input"]), "args": args}
    if kind == "alias":
        return {**expr, "input": _as_masked(expr["input"])}
    if kind == "unary":
        return {**expr, "operand": _as_masked(expr["operand"])}
    if kind == "binary":
        return {**expr, "left": _as_masked(expr["left"]), "right": _as_masked(expr["right"])}
    if kind == "when":
        otherwise = expr["otherwise"]
        return {**expr, "branches": [{"when": _as_masked(b["when"]), "then": _as_masked(b["then"])}
                                     for b in expr["branches"]],
                "otherwise": None if otherwise is None else _as_masked(otherwise)}
    return expr


def _tainting(exprs: Iterable[dict], lineage: Mapping[str, frozenset] | None = None) -> bool:
    """True when an expression has a part that carries individual values (over, first, sort_by, implode...).

    Such a part may sit inside a row-level expression (``cost == cost.max().over("zip")``),
    whose level alone does not show it.  Given the lineage of the expressions'
    input, an aggregation of values computed from both a row index and data
    (``(survived * 2.0 ** index).sum()``, :func:`_packs_row_order`) counts too:
    each row's weight is its own, so the aggregate may hold each row's value.
    """
    exprs = list(exprs)
    if any(expr_level(e) == "individual" or _tainting(_children(e)) for e in exprs):
        return True
    return lineage is not None and any(_packs_row_order(e, lineage) for e in exprs)


def _packs_row_order(expr: dict, lineage: Mapping[str, frozenset]) -> bool:
    """True when an aggregation in ``expr`` reduces values computed from both a row index and data.

    An aggregation of the index alone (``index.mean()``), or of data alone, is
    accounted as any other; a filter or group key on the index is a frame
    operation, not a value inside the aggregation.
    """
    if expr["expr"] == "fn" and P.EXPR_FUNCTIONS[expr["name"]].kind == "aggregate":
        reduced = frozenset().union(*(expr_lineage(child, lineage) for child in _children(expr)))
        if any(s == ROW_ORDER for s, _ in reduced) and any(s != ROW_ORDER for s, _ in reduced):
            return True
    return any(_packs_row_order(child, lineage) for child in _children(expr))


def _tainted(reps: Mapping[int, _Rep], exprs: Iterable[dict],
             lineage: Mapping[str, frozenset] | None = None) -> dict[int, _Rep]:
    if not _tainting(exprs, lineage):
        return dict(reps)
    return {s: replace(rep, tainted=True) for s, rep in reps.items()}


def _row_aggregations(expr: dict) -> list[dict]:
    """The aggregation calls of an expression that reduce row-level values (outermost first).

    Aggregates nested inside another aggregation's input (``sum(x.fill_null(x.max()))``)
    are found too: their value flows into the outer one.
    """
    found: list[dict] = []

    def walk(node: dict) -> None:
        kind = node["expr"]
        if kind == "fn":
            if node["name"] in _CONTRIBUTION_FUNCTIONS and expr_level(node["input"]) == "row":
                found.append(node)
            walk(node["input"])
            for arg in _expr_args(node):
                walk(arg)
        elif kind == "alias":
            walk(node["input"])
        elif kind == "unary":
            walk(node["operand"])
        elif kind == "binary":
            walk(node["left"])
            walk(node["right"])
        elif kind == "when":
            for branch in node["branches"]:
                walk(branch["when"])
                walk(branch["then"])
            if node["otherwise"] is not None:
                walk(node["otherwise"])

    walk(expr)
    return found


# ---------------------------------------------------------------------------
# Hidden columns: equality join keys and unchanged pass-through only.

_HIDDEN_RULE = ("hidden columns can only be equality join keys (a plain column in a join's keys) or be passed "
                "through unchanged, and are released as *")


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
    for child in _children(expr):
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


class _Accountant:
    def __init__(self, checked: CheckedPlan, unique_keys: Callable[[str, tuple[str, ...]], bool] | None = None,
                 exact_dominance: bool = False):
        self.checked = checked
        self.unique_keys = unique_keys
        self.exact_dominance = exact_dominance
        self.sources: list[Source] = []
        self.serial = 0  # numbers contribution columns, unique in the whole plan
        self.row_indexed = False  # a with_row_index was seen: lineages may hold ROW_ORDER pairs
        self.rules = {
            "scan": self._scan, "saved": self._scan, "filter": self._keep_rows, "sort": self._keep_rows,
            "head": self._keep_rows, "slice": self._keep_rows, "explode": self._explode,
            "drop_nulls": self._keep_rows, "unique": self._keep_rows,
            "fill_null": self._keep_rows, "drop": self._drop, "rename": self._rename,
            "with_row_index": self._with_row_index, "with_columns": self._with_columns,
            "select": self._select, "group_by": self._group_by, "join": self._join, "concat": self._concat,
        }

    def frame(self, node: dict) -> _Frame:
        return self.rules[node["op"]](node)

    # helpers -----------------------------------------------------------------
    def _materialize(self, frame: _Frame) -> _Frame:
        """Give implicitly counted sources a row-id column, before rows get duplicated or mixed."""
        reps = dict(frame.reps)
        node = frame.node
        for s, rep in frame.reps.items():
            if rep.kind == "implicit":
                node = {"op": "acct_row_id", "input": node, "name": _rid(s)}
                reps[s] = _Rep("rid", _rid(s))
        return replace(frame, node=node, reps=reps)

    @staticmethod
    def _group_counts(reps: Mapping[int, _Rep], global_: bool) -> list[dict]:
        """Aggregations that count, per group, the rows of each source that fed it."""
        aggs = []
        for s, rep in reps.items():
            flags = {"name": _count(s), "nullable": rep.nullable, "taintable": rep.taintable, "global": global_}
            if rep.kind == "implicit":
                aggs.append({"expr": "acct_len", "name": _count(s)})
            elif rep.kind == "rid":
                aggs.append({"expr": "acct_distinct", "column": rep.column, **flags})
            else:
                aggs.append({"expr": "acct_sum", "column": rep.column, "exact": rep.disjoint, **flags})
        return aggs

    @staticmethod
    def _grouped_reps(reps: Mapping[int, _Rep], individual: bool) -> dict[int, _Rep]:
        return {s: _Rep("count", _count(s), disjoint=rep.disjoint, nullable=rep.nullable,
                        taintable=rep.taintable, individual=individual, repeated=rep.repeated)
                for s, rep in reps.items()}

    @staticmethod
    def _one_row_each(node: dict, reps: Mapping[int, _Rep]) -> dict:
        exprs = [{"expr": "acct_one_row", "column": rep.column, "name": rep.column} for rep in reps.values()]
        return {"op": "acct_columns", "input": node, "exprs": exprs}

    @staticmethod
    def _passthrough(reps: Mapping[int, _Rep], contribs: Iterable[str] = ()) -> list[dict]:
        columns = [rep.column for rep in reps.values() if rep.column is not None] + list(contribs)
        return [{"expr": "acct_col", "name": c} for c in columns]

    def _contributions(self, exprs: list[dict], reps: Mapping[int, _Rep],
                       lineage: Mapping[str, frozenset] | None = None) -> tuple[list[dict], dict]:
        """Accounting expressions for the contribution, order-statistic, dominance and finiteness rules.

        For every aggregation of row-level values and every protected source
        (K > 1) feeding it: how many of that source's rows (people) made a
        real contribution; for an order statistic (min, max, median,
        quantile), how many hold the released value, and for ``n_unique``,
        the fewest holding one of the values it counts.  Per aggregation:
        whether it is finite, and for sums, means, std and var over rows of
        the sources, the dominance measures the sources' policies ask for.
        ``lineage`` (the input frame's) lets ``n_unique`` of a source's own
        person column count people without the holders' check.
        """
        accounting: list[dict] = []
        contribs: dict[str, tuple[str, int]] = {}
        protected = [s for s in reps if self.sources[s].policy.min_group_size > 1]
        shares = [self.sources[s].policy.max_share for s in reps if self.sources[s].policy.max_share is not None]
        # Dominance is about single people: over rows that are already aggregates
        # it would weigh groups, whose own contributions were checked when made.
        over_rows = any(rep.kind != "count" for rep in reps.values())
        dominance = over_rows and any(self.sources[s].policy.dominance for s in protected)
        for expr in exprs:
            for call in _row_aggregations(expr):
                self.serial += 1
                j = self.serial
                masked = {**call, "input": _as_masked(call["input"])}
                name = call["name"]
                for s in protected:  # decide() applies these rules only under K > 1: no column to compute
                    rep = reps[s]
                    counted = {"kind": rep.kind, "column": rep.column, "exact": rep.disjoint}
                    column = f"{RESERVED_PREFIX}_k{j}_{s}"
                    accounting.append({"expr": "acct_contrib", "input": masked["input"], "function": name,
                                       **counted, "padded": not is_plain(call["input"]), "name": column})
                    contribs[column] = ("contrib", s)
                    if name in _ORDER_STATISTICS or (name == "n_unique"
                                                     and not self._counts_people(call["input"], s, lineage)):
                        column = f"{RESERVED_PREFIX}_h{j}_{s}"
                        kept = _kept(call["input"]) if name == "n_unique" else None
                        accounting.append({"expr": "acct_held", "call": masked, "kept": kept, **counted,
                                           "name": column})
                        contribs[column] = ("held", s)
                if not protected and not shares:
                    continue
                if protected and name in _FINITE_FUNCTIONS:
                    column = f"{RESERVED_PREFIX}_f{j}"
                    accounting.append({"expr": "acct_finite", "call": masked, "name": column})
                    contribs[column] = ("finite", 1)
                if name not in _DOMINANCE_FUNCTIONS or not over_rows:
                    continue
                if dominance or shares:
                    column = f"{RESERVED_PREFIX}_d{j}"
                    accounting.append({"expr": "acct_share", "input": masked["input"], "name": column,
                                       "exact": self.exact_dominance,
                                       "top_two": _millionths(DOMINANCE_TOP_TWO) if dominance else None,
                                       "p_ratio": _millionths(DOMINANCE_P_RATIO) if dominance else None,
                                       "largest": _millionths(min(shares)) if shares else None})
                    contribs[column] = ("dominated", 0)
        return accounting, contribs

    def _counts_people(self, expr: dict, s: int, lineage: Mapping[str, frozenset] | None) -> bool:
        """True when ``expr`` is source ``s``'s own person column, unchanged: each of its values is one person."""
        person = self.sources[s].policy.person_id
        while expr["expr"] == "alias":
            expr = expr["input"]
        return (person is not None and lineage is not None and expr["expr"] == "col"
                and lineage.get(expr["name"]) == frozenset({(s, person)}))

    @staticmethod
    def _carried(contribs: Mapping[str, tuple[str, int]]) -> list[dict]:
        """Aggregating rows keeps the weakest measure among them (fewest contributors, largest share)."""
        return [{"expr": "acct_max", "column": c, "name": c} if kind in _LARGEST_FAILS else
                {"expr": "acct_min", "column": c, "name": c} for c, (kind, _) in contribs.items()]

    # operations --------------------------------------------------------------
    def _carries_hidden(self, frame: _Frame) -> Callable[[str], bool]:
        """``column -> True`` when the frame's column carries a hidden column of a source."""
        sources = self.sources
        return lambda column: any(s != ROW_ORDER and c in sources[s].policy.hidden for s, c in frame.lineage[column])

    def _refuse_hidden(self, frame: _Frame, exprs: Iterable[dict], where: str, op: str,
                       passthrough: bool = False) -> None:
        """Refuse expressions over ``frame`` that read a hidden column (``passthrough``: a plain column may)."""
        if not any(source.policy.hidden for source in self.sources):
            return
        is_hidden = self._carries_hidden(frame)
        for expr in exprs:
            if passthrough and _plain_column(expr) is not None:
                continue
            found = _hidden_use(expr, is_hidden)
            if found is not None:
                column, around = found
                raise _hidden_violation(column, hidden_sources(frame.lineage[column], self.sources),
                                        _operation_label(around) + where, op)

    def _refuse_hidden_names(self, frame: _Frame, names: Iterable[str], where: str, op: str) -> None:
        """Refuse a frame operation whose column list (a subset, explode's columns) names a hidden column."""
        if not any(source.policy.hidden for source in self.sources):
            return
        is_hidden = self._carries_hidden(frame)
        for name in names:
            if is_hidden(name):
                raise _hidden_violation(name, hidden_sources(frame.lineage[name], self.sources), where, op)

    def _row_order(self, frame: _Frame) -> Mapping[str, frozenset] | None:
        """The lineage to look for packing through the row index in (None: no index in the plan so far)."""
        return frame.lineage if self.row_indexed else None

    def _scan(self, node: dict) -> _Frame:
        name = node["dataset"] if node["op"] == "scan" else node["name"]
        s = len(self.sources)
        policy = self.checked.datasets[name].policy
        self.sources.append(Source(s, name, policy))
        columns = self.checked.columns_of(node)
        lineage = {c: frozenset({(s, c)}) for c in columns}
        if policy.person_id is None:
            return _Frame(dict(node), columns, lineage, {s: _Rep("implicit", None)}, aggregated=False)
        if policy.person_id not in columns:
            # Fail closed: without the column, people cannot be told apart from rows.
            raise BastionError("PolicyViolation", f"the owner's policy for {name!r} counts people by the column "
                                                  f"{policy.person_id!r}, which the data does not have; "
                                                  "ask the owner to fix the policy", sources=[name])
        # Rows of one person are not disjoint: counting rows would overstate how many people fed a result.
        out = {"op": "acct_person_id", "input": dict(node), "column": policy.person_id, "name": _rid(s)}
        return _Frame(out, columns, lineage, {s: _Rep("rid", _rid(s), disjoint=False)}, aggregated=False)

    def _keep_rows(self, node: dict) -> _Frame:
        # filter, sort, head, slice, drop_nulls, unique, fill_null: each output row is an input row.
        inner = self.frame(node["input"])
        row_exprs = {"filter": [node.get("predicate")], "fill_null": [node.get("value")],
                     "sort": node.get("by")}.get(node["op"]) or []
        if row_exprs:
            where = {"filter": "a filter predicate", "fill_null": "a fill_null value", "sort": "a sort key"}
            self._refuse_hidden(inner, row_exprs, where[node["op"]], node["op"])
        if node["op"] in ("unique", "drop_nulls"):
            # Without a subset every column is compared (unique) or tested for nulls (drop_nulls).
            subset = node["subset"]
            self._refuse_hidden_names(inner, inner.columns if subset is None else subset,
                                      f"{node['op']}() without a subset, which reads every column (drop the "
                                      "column first, or name a subset)" if subset is None
                                      else f"the subset of {node['op']}()", node["op"])
        _refuse_reshaping(row_exprs, node["op"])
        inner = replace(inner, reps=_tainted(inner.reps, row_exprs, self._row_order(inner)))
        if node["op"] in ("filter", "fill_null"):
            # A predicate that compares with an aggregate (keep the rows if the
            # sum of an indicator is large...), or a fill value computed by one,
            # says something about that aggregate.
            accounting, contribs = self._contributions([node["predicate" if node["op"] == "filter" else "value"]],
                                                       inner.reps)
            if accounting:
                inner = replace(inner, node={"op": "acct_columns", "input": inner.node, "exprs": accounting},
                                contribs={**inner.contribs, **contribs})
        out = {**node, "input": inner.node}
        lineage = dict(inner.lineage)
        if node["op"] == "fill_null":
            value = expr_lineage(node["value"], inner.lineage)
            lineage = {c: l | value for c, l in lineage.items()}
        return replace(inner, node=out, lineage=lineage)

    def _drop(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        columns = self.checked.columns_of(node)
        return replace(inner, node={**node, "input": inner.node}, columns=columns,
                       lineage={c: inner.lineage[c] for c in columns})

    def _rename(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        mapping = node["mapping"]
        return replace(inner, node={**node, "input": inner.node}, columns=self.checked.columns_of(node),
                       lineage={mapping.get(c, c): l for c, l in inner.lineage.items()})

    def _with_row_index(self, node: dict) -> _Frame:
        # The index is the row's position: a value of its own (ROW_ORDER), so
        # that an aggregate weighting data by it is seen (_packs_row_order).
        # The order it numbers never comes from a hidden column: sort keys,
        # group keys and unique subsets refuse them.
        inner = self.frame(node["input"])
        self.row_indexed = True
        return replace(inner, node={**node, "input": inner.node}, columns=self.checked.columns_of(node),
                       lineage={node["name"]: frozenset({(ROW_ORDER, node["name"])}), **inner.lineage})

    def _explode(self, node: dict) -> _Frame:
        # Each exploded row is still fed by the source rows of the row it came
        # from: ids are repeated, never multiplied, so counts do not grow.
        inner = self.frame(node["input"])
        self._refuse_hidden_names(inner, node["columns"], "explode()", "explode")
        inner = self._materialize(inner)
        reps = {s: replace(rep, disjoint=False, repeated=True) for s, rep in inner.reps.items()}
        return replace(inner, node={**node, "input": inner.node}, reps=reps)

    def _with_columns(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        self._refuse_hidden(inner, node["exprs"], "a with_columns() expression", "with_columns", passthrough=True)
        _refuse_reshaping(node["exprs"], "with_columns")
        inner = replace(inner, reps=_tainted(inner.reps, node["exprs"], self._row_order(inner)))
        lineage = dict(inner.lineage)
        for expr in node["exprs"]:
            lineage[P.output_name(expr)] = expr_lineage(expr, inner.lineage)
        # Aggregates broadcast to every row (a total next to each row) are checked like released ones.
        accounting, contribs = self._contributions(node["exprs"], inner.reps, inner.lineage)
        return replace(inner, node={**node, "input": inner.node, "exprs": node["exprs"] + accounting},
                       columns=self.checked.columns_of(node), lineage=lineage,
                       contribs={**inner.contribs, **contribs})

    def _select(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        self._refuse_hidden(inner, node["exprs"], "a select() expression", "select", passthrough=True)
        columns = self.checked.columns_of(node)
        lineage = {P.output_name(e): expr_lineage(e, inner.lineage) for e in node["exprs"]}
        levels = {expr_level(e) for e in node["exprs"]}
        accounting, contribs = self._contributions(node["exprs"], inner.reps, inner.lineage)
        if "row" in levels:
            # One output row per input row (aggregates, if any, are broadcast).
            _refuse_reshaping(node["exprs"], "a row-level select")
            out = {**node, "input": inner.node,
                   "exprs": node["exprs"] + self._passthrough(inner.reps, inner.contribs) + accounting}
            return _Frame(out, columns, lineage, _tainted(inner.reps, node["exprs"], self._row_order(inner)),
                          inner.aggregated, {**inner.contribs, **contribs})
        # A global aggregate: one row computed from all input rows.
        individual = ("individual" in levels or _tainting(node["exprs"], self._row_order(inner))
                      or any(rep.tainted for rep in inner.reps.values()))
        out = {**node, "input": inner.node, "exprs": node["exprs"] + self._group_counts(inner.reps, True)
               + accounting + self._carried(inner.contribs)}
        reps = self._grouped_reps(inner.reps, individual)
        if individual:
            out = self._one_row_each(out, reps)
        return _Frame(out, columns, lineage, reps, not individual, {**inner.contribs, **contribs})

    def _group_by(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        self._refuse_hidden(inner, node["keys"], "a group_by key", "group_by")
        self._refuse_hidden(inner, node["aggs"], "an aggregation", "group_by")
        columns = self.checked.columns_of(node)
        lineage = {P.output_name(e): expr_lineage(e, inner.lineage) for e in node["keys"] + node["aggs"]}
        # An aggregation that is not a reduction (an implicit list of values,
        # first/last/mode) puts individual values in the result.
        individual = (any(expr_level(e) in ("row", "individual") for e in node["aggs"])
                      or _tainting(node["keys"] + node["aggs"], self._row_order(inner))
                      or any(rep.tainted for rep in inner.reps.values()))
        _refuse_reshaping(node["keys"], "group_by keys")
        accounting, contribs = self._contributions(node["aggs"], inner.reps, inner.lineage)
        out = {**node, "input": inner.node, "aggs": node["aggs"] + self._group_counts(inner.reps, False)
               + accounting + self._carried(inner.contribs)}
        reps = self._grouped_reps(inner.reps, individual)
        if individual:
            out = self._one_row_each(out, reps)
        return _Frame(out, columns, lineage, reps, not individual, {**inner.contribs, **contribs})

    def _join(self, node: dict) -> _Frame:
        how = node["how"]
        left, right = self.frame(node["left"]), self.frame(node["right"])
        columns = self.checked.columns_of(node)
        if how == "semi":
            return self._semi_join(node, left, right, columns)
        if how == "anti":
            out = {**node, "left": left.node, "right": right.node}
            # Every row says "no row of the right side matched": fed by fewer than K of it.
            reps = dict(left.reps)
            consts = []
            for s in right.reps:
                reps[s] = _Rep("count", _count(s), taintable=True)
                consts.append({"expr": "acct_const", "value": 0, "name": _count(s)})
            out = {"op": "acct_columns", "input": out, "exprs": consts}
            return _Frame(out, columns, dict(left.lineage), reps, left.aggregated, dict(left.contribs))

        unique = self._unique_right(node)
        if unique is None:
            left, right = self._materialize(left), self._materialize(right)
            out: dict = {**node, "left": left.node, "right": right.node}
        else:
            # Each left row meets at most one right row: left rows are not
            # repeated, so the left sources keep their counts as they are.
            right = self._materialize(right)
            dataset, keys = unique
            out = {**node, "left": left.node,
                   "right": {"op": "acct_unique", "input": right.node, "dataset": dataset, "columns": list(keys)}}
        lineage = dict(left.lineage)
        merged = {k["name"]: r["name"] for k, r in zip(node["left_on"], node["right_on"])} \
            if how in ("inner", "left") else {}
        dropped = set(merged.values())
        for column in right.columns:
            if column in dropped:
                continue
            lineage[column + node["suffix"] if column in left.columns else column] = right.lineage[column]
        for left_key, right_key in merged.items():
            lineage[left_key] = lineage[left_key] | right.lineage[right_key]
        # Rows of either side may now appear several times (of the right side only, under a unique right key).
        repeated = right.reps if unique is not None else {**left.reps, **right.reps}
        reps = {**left.reps, **{s: replace(rep, disjoint=False, repeated=True) for s, rep in repeated.items()}}
        unmatched_sides = {"left": [right], "full": [left, right]}.get(how, [])
        fixes = []
        for side in unmatched_sides:
            side_columns = [rep.column for rep in side.reps.values()]
            for s, rep in side.reps.items():
                fixes.append({"expr": "acct_unmatched", "column": rep.column, "side": side_columns})
                reps[s] = replace(reps[s], taintable=True)
        if fixes:
            out = {"op": "acct_columns", "input": out, "exprs": fixes}
        return _Frame(out, columns, lineage, reps, left.aggregated and right.aggregated,
                      {**left.contribs, **right.contribs})

    _ROW_SUBSETS = ("filter", "sort", "head", "drop_nulls")

    def _unique_right(self, node: dict) -> tuple[str, tuple[str, ...]] | None:
        """``(dataset, key columns)`` when a join's right key is unique in the dataset it scans, else None."""
        if self.unique_keys is None or node["how"] not in ("inner", "left"):
            return None
        if any(k["expr"] != "col" for k in node["right_on"]):
            return None
        right = node["right"]
        while right["op"] in self._ROW_SUBSETS:  # a subset of rows keeps a key unique
            right = right["input"]
        if right["op"] != "scan":
            return None
        keys = tuple(k["name"] for k in node["right_on"])
        if not set(keys) <= set(self.checked.columns_of(right)):
            return None
        return (right["dataset"], keys) if self.unique_keys(right["dataset"], keys) else None

    def _semi_join(self, node: dict, left: _Frame, right: _Frame, columns: tuple[str, ...]) -> _Frame:
        # A semi join is an inner join with the right side reduced to one row
        # per key, carrying how many right rows have that key: left rows are
        # not duplicated, and each learns how many right rows fed it.
        keys = [{"expr": "col", "name": k["name"]} for k in node["right_on"]]
        reduced = {"op": "group_by", "input": right.node, "keys": keys,
                   "aggs": self._group_counts(right.reps, False) + self._carried(right.contribs)}
        out = {**node, "how": "inner", "left": left.node, "right": reduced}
        reps = dict(left.reps)
        for s, rep in right.reps.items():
            # Left rows with the same key share the same right rows.
            reps[s] = _Rep("count", _count(s), disjoint=False, repeated=True, nullable=rep.nullable,
                           taintable=rep.taintable, individual=rep.individual)
        return _Frame(out, columns, dict(left.lineage), reps, left.aggregated,
                      {**left.contribs, **right.contribs})

    def _concat(self, node: dict) -> _Frame:
        inputs = [self.frame(f) for f in node["inputs"]]
        columns = self.checked.columns_of(node)
        if len(inputs) == 1:
            only = inputs[0]
            return replace(only, node={**node, "inputs": [only.node]})
        inputs = [self._materialize(f) for f in inputs]
        every = {s: rep for f in inputs for s, rep in f.reps.items()}
        contribs = {c: v for f in inputs for c, v in f.contribs.items()}
        nodes = []
        for frame in inputs:
            missing = [{"expr": "acct_const", "value": None, "name": rep.column}
                       for s, rep in every.items() if s not in frame.reps]
            missing += [{"expr": "acct_const", "value": None, "name": c} for c in contribs if c not in frame.contribs]
            nodes.append({"op": "acct_columns", "input": frame.node, "exprs": missing} if missing else frame.node)
        lineage = {c: frozenset().union(*(f.lineage[c] for f in inputs)) for c in columns}
        reps = {s: replace(rep, nullable=True) for s, rep in every.items()}
        return _Frame({**node, "inputs": nodes}, columns, lineage, reps, all(f.aggregated for f in inputs),
                      contribs)


# ---------------------------------------------------------------------------
# save: the policy a kept result inherits

def inherited_policy(accounted: AccountedPlan) -> Policy:
    """The policy a saved result inherits from the sources that fed it: the strictest combination.

    A saved result becomes a source of its own: later queries count its rows
    as if each were one row of a dataset.  That is only safe when no two of
    its rows were fed by the same source row, so results whose rows may repeat
    source rows (after a join, or a concat of one dataset with itself) are
    refused.  A source that counts people (``person_id``) must keep its
    person column in the result, which becomes the result's ``person_id``.
    Columns derived from hidden columns stay hidden under their new names; K
    is the largest of the sources', the unsafe handling the strictest, the
    dominance rule on if any source has it, the share the smallest, the limits
    the smallest; suppression applies only if every source allows it,
    ``aggregates_only`` if any source asks.

    Raises
    ------
    BastionError
        ``PolicyViolation`` when a source's owner does not allow saving, or the
        rows may repeat source rows, or a person column is missing.
    """
    fed_by = [accounted.sources[s] for s in sorted(accounted.reps)]
    refusing = sorted({s.dataset for s in fed_by if not s.policy.allow_save})
    if refusing:
        names = ", ".join(repr(d) for d in refusing)
        raise BastionError("PolicyViolation", f"the owner does not allow saving results derived from {names}; "
                                              "fetch an aggregate instead", sources=refusing)
    datasets = [s.dataset for s in fed_by]
    shared = sorted({accounted.sources[s].dataset for s, rep in accounted.reps.items()
                     if rep.repeated or (not rep.disjoint and accounted.sources[s].policy.person_id is None)})
    repeated = sorted({d for d in datasets if datasets.count(d) > 1})
    if shared or repeated:
        names = ", ".join(repr(d) for d in shared or repeated)
        raise BastionError("PolicyViolation", f"this result cannot be saved: its rows may repeat rows of {names} "
                                              "(after a join or a concat of a dataset with itself), so counting its "
                                              "rows later would overstate how many people fed a result; save the "
                                              "parts before the join instead", sources=shared or repeated)
    person_id = None
    for source in fed_by:
        if source.policy.person_id is None:
            continue
        carriers = [c for c in accounted.columns
                    if accounted.lineage[c] == frozenset({(source.index, source.policy.person_id)})]
        if accounted.aggregated or not carriers or person_id is not None:
            raise BastionError("PolicyViolation", f"{source.dataset!r} counts people by "
                                                  f"{source.policy.person_id!r}: keep that column, unchanged and "
                                                  "row by row, in a result you save", sources=[source.dataset])
        person_id = carriers[0]

    def smallest(values: Iterable[Any]) -> Any:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    policies = [s.policy for s in fed_by]
    return Policy(min_group_size=max((p.min_group_size for p in policies), default=1),
                  unsafe=strictest_unsafe([p.unsafe for p in policies]),
                  hidden=frozenset(accounted.hidden), allow_save=True, person_id=person_id,
                  max_share=smallest(p.max_share for p in policies),
                  dominance=not policies or any(p.dominance for p in policies),
                  suppress_small_groups=bool(policies) and all(p.suppress_small_groups for p in policies),
                  aggregates_only=any(p.aggregates_only for p in policies),
                  max_rows_released=smallest(p.max_rows_released for p in policies),
                  max_join_rows=smallest(p.max_join_rows for p in policies),
                  query_timeout_seconds=smallest(p.query_timeout_seconds for p in policies))
