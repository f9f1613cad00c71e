"""The accountant: a checked plan -> the plan to run, with the per-source counts the policy needs.

:func:`account` rewrites a checked plan so that the engine computes, next to
the scientist's columns, how many rows of every *source* fed each output row
(a source is one ``scan`` occurrence, so a self-join has two), as internal
``acct_*`` plan nodes that the engine compiles.  Each frame operation has a
rule that says how the counts of its input travel through it
(:class:`~.accounted.Counting`), follows each output column back to the
source columns it was computed from (:mod:`.lineage`), refuses uses of
hidden columns (:mod:`.hidden`) and of length-changing functions outside an
aggregation (:mod:`.reshaping`), and adds the per-aggregate accounting
(:mod:`.contributions`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from bastion_kernel.contract.walk import frame_exprs

from ..validate import RESERVED_PREFIX, CheckedPlan
from .accounted import AccountedPlan, Counting, Source
from .contributions import Contributions, carried
from .hidden import hidden_sources, refuse_hidden, refuse_hidden_names
from .lineage import ROW_ORDER, expr_level, expr_lineage, tainting
from .reshaping import refuse_reshaping


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


@dataclass
class _Frame:
    node: dict
    columns: tuple[str, ...]
    lineage: dict[str, frozenset]
    reps: dict[int, Counting]
    aggregated: bool
    # accounting column -> ("contrib" | "held", source index), ("dominated", 0) or
    # ("finite", 1): the checks of aggregates computed so far (see
    # decide._check_contributions).
    contribs: dict[str, tuple[str, int]] = field(default_factory=dict)


def _rid(s: int) -> str:
    return f"{RESERVED_PREFIX}_r{s}"


def _count(s: int) -> str:
    return f"{RESERVED_PREFIX}_n{s}"


def _tainted(reps: Mapping[int, Counting], exprs: Iterable[dict],
             lineage: Mapping[str, frozenset] | None = None) -> dict[int, Counting]:
    if not tainting(exprs, lineage):
        return dict(reps)
    return {s: replace(rep, tainted=True) for s, rep in reps.items()}


class _Accountant:
    """Rewrites a checked plan frame by frame, bottom-up: each rule returns the frame's :class:`_Frame`."""

    def __init__(self, checked: CheckedPlan, unique_keys: Callable[[str, tuple[str, ...]], bool] | None = None,
                 exact_dominance: bool = False):
        self.checked = checked
        self.unique_keys = unique_keys
        self.sources: list[Source] = []
        self.contributions = Contributions(self.sources, exact_dominance)
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
                reps[s] = Counting("rid", _rid(s))
        return replace(frame, node=node, reps=reps)

    @staticmethod
    def _group_counts(reps: Mapping[int, Counting], global_: bool) -> list[dict]:
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
    def _grouped_reps(reps: Mapping[int, Counting], individual: bool) -> dict[int, Counting]:
        return {s: Counting("count", _count(s), disjoint=rep.disjoint, nullable=rep.nullable,
                            taintable=rep.taintable, individual=individual, repeated=rep.repeated)
                for s, rep in reps.items()}

    @staticmethod
    def _one_row_each(node: dict, reps: Mapping[int, Counting]) -> dict:
        exprs = [{"expr": "acct_one_row", "column": rep.column, "name": rep.column} for rep in reps.values()]
        return {"op": "acct_columns", "input": node, "exprs": exprs}

    @staticmethod
    def _passthrough(reps: Mapping[int, Counting], contribs: Iterable[str] = ()) -> list[dict]:
        columns = [rep.column for rep in reps.values() if rep.column is not None] + list(contribs)
        return [{"expr": "acct_col", "name": c} for c in columns]

    def _refuse_hidden(self, frame: _Frame, exprs: Iterable[dict], where: str, op: str,
                       passthrough: bool = False) -> None:
        refuse_hidden(self.sources, frame.lineage, exprs, where, op, passthrough)

    def _refuse_hidden_names(self, frame: _Frame, names: Iterable[str], where: str, op: str) -> None:
        refuse_hidden_names(self.sources, frame.lineage, names, where, op)

    def _row_order(self, frame: _Frame) -> Mapping[str, frozenset] | None:
        """The lineage to look for packing through the row index in (None: no index in the plan so far)."""
        return frame.lineage if self.row_indexed else None

    # operations --------------------------------------------------------------
    def _scan(self, node: dict) -> _Frame:
        name = node["dataset"] if node["op"] == "scan" else node["name"]
        s = len(self.sources)
        policy = self.checked.datasets[name].policy
        self.sources.append(Source(s, name, policy))
        columns = self.checked.columns_of(node)
        lineage = {c: frozenset({(s, c)}) for c in columns}
        if policy.person_id is None:
            return _Frame(dict(node), columns, lineage, {s: Counting("implicit", None)}, aggregated=False)
        if policy.person_id not in columns:
            # Fail closed: without the column, people cannot be told apart from rows.
            raise BastionError("PolicyViolation", f"the owner's policy for {name!r} counts people by the column "
                                                  f"{policy.person_id!r}, which the data does not have; "
                                                  "ask the owner to fix the policy", sources=[name])
        # Rows of one person are not disjoint: counting rows would overstate how many people fed a result.
        out = {"op": "acct_person_id", "input": dict(node), "column": policy.person_id, "name": _rid(s)}
        return _Frame(out, columns, lineage, {s: Counting("rid", _rid(s), disjoint=False)}, aggregated=False)

    def _keep_rows(self, node: dict) -> _Frame:
        # filter, sort, head, slice, drop_nulls, unique, fill_null: each output row is an input row.
        inner = self.frame(node["input"])
        row_exprs = frame_exprs(node)  # filter's predicate, fill_null's value, sort's keys
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
        refuse_reshaping(row_exprs, node["op"])
        inner = replace(inner, reps=_tainted(inner.reps, row_exprs, self._row_order(inner)))
        if node["op"] in ("filter", "fill_null"):
            # A predicate that compares with an aggregate (keep the rows if the
            # sum of an indicator is large...), or a fill value computed by one,
            # says something about that aggregate.
            accounting, contribs = self.contributions.of(row_exprs, inner.reps)
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
        # that an aggregate weighting data by it is seen (lineage.tainting).
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
        refuse_reshaping(node["exprs"], "with_columns")
        inner = replace(inner, reps=_tainted(inner.reps, node["exprs"], self._row_order(inner)))
        lineage = dict(inner.lineage)
        for expr in node["exprs"]:
            lineage[P.output_name(expr)] = expr_lineage(expr, inner.lineage)
        # Aggregates broadcast to every row (a total next to each row) are checked like released ones.
        accounting, contribs = self.contributions.of(node["exprs"], inner.reps, inner.lineage)
        return replace(inner, node={**node, "input": inner.node, "exprs": node["exprs"] + accounting},
                       columns=self.checked.columns_of(node), lineage=lineage,
                       contribs={**inner.contribs, **contribs})

    def _select(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        self._refuse_hidden(inner, node["exprs"], "a select() expression", "select", passthrough=True)
        columns = self.checked.columns_of(node)
        lineage = {P.output_name(e): expr_lineage(e, inner.lineage) for e in node["exprs"]}
        levels = {expr_level(e) for e in node["exprs"]}
        accounting, contribs = self.contributions.of(node["exprs"], inner.reps, inner.lineage)
        if "row" in levels:
            # One output row per input row (aggregates, if any, are broadcast).
            refuse_reshaping(node["exprs"], "a row-level select")
            out = {**node, "input": inner.node,
                   "exprs": node["exprs"] + self._passthrough(inner.reps, inner.contribs) + accounting}
            return _Frame(out, columns, lineage, _tainted(inner.reps, node["exprs"], self._row_order(inner)),
                          inner.aggregated, {**inner.contribs, **contribs})
        # A global aggregate: one row computed from all input rows.
        individual = "individual" in levels or tainting(node["exprs"], self._row_order(inner))
        return self._aggregated(node, "exprs", inner, columns, lineage, individual, accounting, contribs)

    def _group_by(self, node: dict) -> _Frame:
        inner = self.frame(node["input"])
        self._refuse_hidden(inner, node["keys"], "a group_by key", "group_by")
        self._refuse_hidden(inner, node["aggs"], "an aggregation", "group_by")
        columns = self.checked.columns_of(node)
        lineage = {P.output_name(e): expr_lineage(e, inner.lineage) for e in node["keys"] + node["aggs"]}
        # An aggregation that is not a reduction (an implicit list of values,
        # first/last/mode) puts individual values in the result.
        individual = (any(expr_level(e) in ("row", "individual") for e in node["aggs"])
                      or tainting(node["keys"] + node["aggs"], self._row_order(inner)))
        refuse_reshaping(node["keys"], "group_by keys")
        accounting, contribs = self.contributions.of(node["aggs"], inner.reps, inner.lineage)
        return self._aggregated(node, "aggs", inner, columns, lineage, individual, accounting, contribs)

    def _aggregated(self, node: dict, exprs_key: str, inner: _Frame, columns: tuple[str, ...], lineage: dict,
                    individual: bool, accounting: list[dict], contribs: dict) -> _Frame:
        """The frame of a global aggregate (a select; ``exprs_key`` "exprs") or a group_by (``exprs_key`` "aggs").

        Each group counts its rows per source, beside the accounting; a result
        with individual values in it (``individual``, or a tainted input)
        becomes one row per person for the release rules.
        """
        individual = individual or any(rep.tainted for rep in inner.reps.values())
        counts = self._group_counts(inner.reps, exprs_key == "exprs")
        out = {**node, "input": inner.node, exprs_key: node[exprs_key] + counts + accounting + carried(inner.contribs)}
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
                reps[s] = Counting("count", _count(s), taintable=True)
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
                   "aggs": self._group_counts(right.reps, False) + carried(right.contribs)}
        out = {**node, "how": "inner", "left": left.node, "right": reduced}
        reps = dict(left.reps)
        for s, rep in right.reps.items():
            # Left rows with the same key share the same right rows.
            reps[s] = Counting("count", _count(s), disjoint=False, repeated=True, nullable=rep.nullable,
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
