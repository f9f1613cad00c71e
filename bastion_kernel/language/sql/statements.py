"""Queries -> frame plans: ``SELECT``, ``WITH``, ``FROM``/``JOIN``, ``GROUP BY``, ``ORDER BY``, ``UNION``.

:data:`QUERIES` (query shapes) and :data:`SOURCES` (what may follow
``FROM``/``JOIN``) are the whitelists of this level; a node of another class
is refused by name, and so is any clause a handler does not read.

The translator owns the scopes between queries: each ``WITH`` query and
``FROM`` subquery becomes a frame first; then one ``SELECT`` is resolved by
sqlglot against the frames of its sources (:func:`.resolve.qualify_select`)
and built clause by clause.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Mapping

from sqlglot import exp

from bastion_kernel.contract import plan as P

from .aggregates import has_aggregate
from .expressions import GroupedExprs, RowExprs, conjuncts, int_literal
from .naming import HIDDEN, Output, mark_outputs, name_outputs, projection, written_name
from .parse import DIALECT
from .refusals import arg, check_args, refuse, schema_error, unsupported
from .resolve import Column, Frame, Source, check_distinct_keys, find_column, qualify_select, sql_key, sql_type
from .using import UsingKeys

_SELECT_ARGS = ("with_", "with", "expressions", "distinct", "from_", "from", "joins", "where", "group", "having",
                "order", "limit", "offset", "kind")


@dataclass
class _SortKey:
    expr: dict
    descending: bool
    nulls_first: bool


class Translator:
    """Builds the plan of one query; nested queries (CTEs, subqueries) reuse it."""

    def __init__(self, tables: Mapping[str, list[list[str]]], saved: Collection[str]):
        self.tables = {name: [(str(column), dtype) for column, dtype in schema] for name, schema in tables.items()}
        self.saved = frozenset(saved)
        self.joins = 0
        self.sources = 0
        self.unions = 0

    def query(self, node: exp.Expression, ctes: Mapping[str, Frame]) -> Frame:
        """The frame of a query node (``SELECT``, ``UNION``, a parenthesised query)."""
        handler = QUERIES.get(type(node))
        if handler is None:
            raise refuse(node)
        return handler(self, node, ctes)

    # WITH ----------------------------------------------------------------------
    def _with(self, node: exp.Expression, ctes: Mapping[str, Frame]) -> Mapping[str, Frame]:
        clause = arg(node, "with_", "with")
        if clause is None:
            return ctes
        if clause.args.get("recursive"):
            raise unsupported("WITH RECURSIVE", clause)
        check_args(clause, ("expressions",))
        scope = dict(ctes)
        for cte in clause.expressions:
            check_args(cte, ("this", "alias", "materialized"))
            alias = cte.args.get("alias")
            if alias is None or not alias.name:
                raise unsupported("WITH without a name", cte)
            check_args(alias, ("this",))
            scope[sql_key(alias.name)] = self.query(cte.this, scope)
        return scope

    # SELECT --------------------------------------------------------------------
    def select(self, node: exp.Select, ctes: Mapping[str, Frame]) -> Frame:
        """A SELECT: its sources become frames, sqlglot resolves it against them, then each clause is built."""
        check_args(node, _SELECT_ARGS)
        if node.args.get("kind"):
            raise unsupported(f"SELECT {str(node.args['kind']).upper()}", node)
        ctes = self._with(node, ctes)
        source = arg(node, "from_", "from")
        if source is None:
            raise unsupported("SELECT without FROM", node, "a query reads one or more datasets by name")
        check_args(source, ("this",))
        sources = [self._source(source.this, ctes)]
        hows: list[str] = []
        using = UsingKeys()
        for join in node.args.get("joins") or []:
            hows.append(self._join_how(join))
            right = self._source(join.this, ctes)
            if right.alias in {s.alias for s in sources}:
                raise schema_error(f"the name {right.alias!r} is used twice in FROM; give each table its own "
                                   "alias", join, table=right.alias)
            using.add_join(sources, right, join, hows[-1])
            sources.append(right)
        group, having = node.args.get("group"), node.args.get("having")
        grouped = group is not None or having is not None or any(has_aggregate(i) for i in node.expressions)
        _check_stars(node.expressions, sources, grouped)

        select = node.copy()
        mark_outputs(select)
        qualify_select(select, sources, node)
        using.settle(select)
        frame = sources[0].frame
        for join, right, how in zip(select.args.get("joins") or [], sources[1:], hows):
            frame = self._join(frame, right.frame, join, how)

        where = select.args.get("where")
        if where is not None:
            predicate = RowExprs(frame.columns, "WHERE").expr(where.this)
            frame = Frame(P.frame_op("filter", input=frame.plan, predicate=predicate), frame.columns)

        items = select.expressions
        group, having = select.args.get("group"), select.args.get("having")
        row = RowExprs(frame.columns, "SELECT")
        if grouped:
            keys = self._group_keys(group, row)
            ctx: RowExprs = GroupedExprs(row, keys, "SELECT")
        else:
            keys, ctx = [], row

        outputs = self._outputs(items, ctx, frame.columns, select)
        predicate = ctx.expr(having.this) if having is not None else None
        # ORDER BY may name an output by its sqlglot alias (positions became those) or its final name.
        by_key = {sql_key(o.name): o for o in outputs}
        by_key.update((sql_key(item.alias_or_name), o) for item, o in zip(items, outputs))
        ctx.aliases = {key: o.expr for key, o in by_key.items()}
        sort_keys, hidden = self._order(select.args.get("order"), ctx, outputs, by_key)

        base = frame.plan
        if grouped:
            assert isinstance(ctx, GroupedExprs)
            if keys:
                key_exprs = [e if e == P.col(name) else P.alias(e, name) for e, name in keys]
                base = P.frame_op("group_by", input=base, keys=key_exprs, aggs=ctx.aggs)
            elif ctx.aggs:
                base = P.frame_op("select", input=base, exprs=ctx.aggs)
            else:
                raise unsupported("HAVING without GROUP BY or an aggregate", having)
            if predicate is not None:
                base = P.frame_op("filter", input=base, predicate=predicate)

        plan = P.frame_op("select", input=base, exprs=projection(outputs) + hidden)
        distinct = select.args.get("distinct")
        if distinct is not None:
            check_args(distinct, ())
            if hidden:
                raise unsupported("ORDER BY an expression that is not in the SELECT DISTINCT list", node,
                                  "with DISTINCT, sort by selected columns")
            plan = P.frame_op("unique", input=plan, subset=None)
        plan = self._finish(plan, sort_keys, select)
        if hidden:
            plan = P.frame_op("drop", input=plan, columns=[h["name"] for h in hidden])
        return Frame(plan, [Column(sql_key(o.name), o.name, o.name, item.type or sql_type(None))
                            for o, item in zip(outputs, items)])

    @staticmethod
    def _group_keys(group: exp.Group | None, row: RowExprs) -> list[tuple[dict, str]]:
        # sqlglot has replaced positions and SELECT aliases by the expressions they name.
        if group is None:
            return []
        check_args(group, ("expressions",))
        keys: list[tuple[dict, str]] = []
        seen: set[bytes] = set()
        for item in group.expressions:
            if has_aggregate(item) or isinstance(item, exp.Star):
                raise unsupported(f"GROUP BY {item.sql()}", item, "group keys cannot be aggregates")
            expr = row.expr(item)
            if P.canonical_json(expr) in seen:
                continue
            seen.add(P.canonical_json(expr))
            name = expr["name"] if expr["expr"] == "col" else f"{HIDDEN}key{len(keys)}"
            keys.append((expr, name))
        return keys

    @staticmethod
    def _outputs(items: list[exp.Expression], ctx: RowExprs, columns: list[Column],
                 node: exp.Select) -> list[Output]:
        """One output per SELECT item (sqlglot has expanded ``*``), named as the text names it."""
        outputs: list[Output] = []
        for item in items:
            if isinstance(item, exp.Alias):
                check_args(item, ("this", "alias"))
            value = item.this if isinstance(item, exp.Alias) else item
            expr = ctx.expr(value)
            name, explicit = written_name(item)
            if explicit:
                outputs.append(Output(expr, name, None, True))
                continue
            if name is None:  # an item sqlglot wrote (a column of a *, a USING key): named after its column
                first = value if isinstance(value, exp.Column) else value.find(exp.Column)
                name = find_column(columns, first.table or None, first.name, first).label if first else \
                    item.alias_or_name
            # A plain column whose name is taken takes its unique name in the frame.
            fallback = expr["name"] if isinstance(value, exp.Column) and expr["expr"] == "col" else None
            outputs.append(Output(expr, name, fallback, False))
        name_outputs(outputs, node)
        return outputs

    @staticmethod
    def _order(order: exp.Order | None, ctx: RowExprs, outputs: list[Output],
               by_key: Mapping[str, Output]) -> tuple[list[_SortKey], list[dict]]:
        """Sort keys over the projected frame, and the hidden columns they need.

        sqlglot has replaced positions by the output names they refer to.
        """
        if order is None:
            return [], []
        check_args(order, ("expressions",))
        by_value = {P.canonical_json(o.expr): o for o in outputs}
        keys: list[_SortKey] = []
        hidden: list[dict] = []
        for ordered in order.expressions:
            check_args(ordered, ("this", "desc", "nulls_first"))
            target = ordered.this
            if isinstance(target, exp.Column) and not target.table and sql_key(target.name) in by_key:
                expr = P.col(by_key[sql_key(target.name)].name)
            else:
                value = ctx.expr(target)
                match = by_value.get(P.canonical_json(value))
                if match is not None:
                    expr = P.col(match.name)
                else:
                    name = f"{HIDDEN}sort{len(hidden)}"
                    hidden.append(P.alias(value, name))
                    expr = P.col(name)
            keys.append(_SortKey(expr, bool(ordered.args.get("desc")), bool(ordered.args.get("nulls_first"))))
        return keys, hidden

    @staticmethod
    def _finish(plan: dict, sort_keys: list[_SortKey], node: exp.Expression) -> dict:
        """ORDER BY, OFFSET and LIMIT on a projected frame."""
        if sort_keys:
            plan = _sort(plan, sort_keys)
        offset = node.args.get("offset")
        skip = None
        if offset is not None:
            check_args(offset, ("expression",))
            skip = int_literal(offset.expression, "OFFSET")
        limit = node.args.get("limit")
        count = None
        if limit is not None:
            if not isinstance(limit, exp.Limit):
                raise refuse(limit)
            check_args(limit, ("expression",))
            count = int_literal(limit.expression, "LIMIT")
        if skip is not None:
            plan = P.frame_op("slice", input=plan, offset=skip, length=count)
        elif count is not None:
            plan = P.frame_op("head", input=plan, n=count)
        return plan

    # UNION ---------------------------------------------------------------------
    def union(self, node: exp.Union, ctes: Mapping[str, Frame]) -> Frame:
        """``UNION [ALL]``: the two frames concatenated by position, under the first one's names."""
        check_args(node, ("with_", "with", "this", "expression", "distinct", "order", "limit", "offset"))
        ctes = self._with(node, ctes)
        left = self.query(node.this, ctes)
        right = self.query(node.expression, ctes)
        if len(left.columns) != len(right.columns):
            raise schema_error(f"UNION needs the same number of columns on both sides, got "
                               f"{len(left.columns)} and {len(right.columns)}", node)
        # Columns line up by position, named after the first query (as in SQL).
        renamed = [P.col(r.phys) if r.phys == l.phys else P.alias(P.col(r.phys), l.phys)
                   for l, r in zip(left.columns, right.columns)]
        plan = P.frame_op("concat", inputs=[left.plan, P.frame_op("select", input=right.plan, exprs=renamed)])
        if node.args.get("distinct"):
            plan = P.frame_op("unique", input=plan, subset=None)
        frame = Frame(plan, [replace(c, table=None) for c in left.columns])
        if not any(node.args.get(clause) for clause in ("order", "limit", "offset")):
            return frame
        # ORDER BY, LIMIT and OFFSET apply to the union's result: read them as a SELECT * over it,
        # so that sqlglot resolves their names, positions and types as in any SELECT.
        self.unions += 1
        name = f"{HIDDEN}union{self.unions}"
        outer = exp.select("*").from_(name)
        for clause in ("order", "limit", "offset"):
            if node.args.get(clause) is not None:
                outer.set(clause, node.args[clause].copy())
        return self.select(outer, {**ctes, sql_key(name): frame})

    def subquery_query(self, node: exp.Subquery, ctes: Mapping[str, Frame]) -> Frame:
        """A parenthesised query."""
        check_args(node, ("this",))
        return self.query(node.this, ctes)

    # FROM ----------------------------------------------------------------------
    def _source(self, node: exp.Expression, ctes: Mapping[str, Frame]) -> Source:
        """A FROM or JOIN source: its frame, under the alias SQL reaches it by."""
        handler = SOURCES.get(type(node))
        if handler is None:
            raise refuse(node, "FROM takes dataset names, WITH names and (SELECT ...) subqueries")
        frame, alias, what = handler(self, node, ctes)
        check_distinct_keys(frame, what, node)
        self.sources += 1
        name = f"{HIDDEN}src{self.sources}"
        key = sql_key(alias) if alias else name
        return Source(name, key, Frame(frame.plan, [replace(c, table=key) for c in frame.columns]))

    def table(self, node: exp.Table, ctes: Mapping[str, Frame]) -> tuple[Frame, str, str]:
        """A name in FROM: a WITH query, else a dataset or saved result (never a file or table function)."""
        if not isinstance(node.this, exp.Identifier):
            function = node.this
            name = function.name if isinstance(function, exp.Anonymous) else \
                function.sql_name().lower() if isinstance(function, exp.Func) else type(function).__name__
            raise unsupported(f"table function {name}", node,
                              "FROM takes dataset names only; files and table functions are not readable")
        name = node.this.name
        if node.args.get("db") or node.args.get("catalog"):
            raise unsupported(f"schema-qualified table name {node.sql(dialect=DIALECT)}", node,
                              f"write the dataset name alone, for example {name}")
        check_args(node, ("this", "alias"))
        alias = self._alias(node) or name
        if sql_key(name) in ctes:
            return ctes[sql_key(name)], alias, f"the WITH query {name!r}"
        dataset = name if name in self.tables else \
            next((t for t in self.tables if t.lower() == name.lower()), None)
        if dataset is None:
            if any(ch in name for ch in "/\\.:*?") or name.startswith("~"):
                raise unsupported(f"file path {name!r} in FROM", node,
                                  "FROM takes dataset names only; files are not readable")
            known = sorted(self.tables) + sorted(ctes)
            raise schema_error(f"unknown table {name!r}; known datasets: {', '.join(known) or 'none'}",
                               node, table=name, available=known)
        plan = P.frame_op("saved", name=dataset) if dataset in self.saved else P.scan(dataset)
        columns = [Column(sql_key(c), c, c, sql_type(d)) for c, d in self.tables[dataset]]
        return Frame(plan, columns), alias, f"the dataset {dataset!r}"

    def subquery(self, node: exp.Subquery, ctes: Mapping[str, Frame]) -> tuple[Frame, str | None, str]:
        """``(SELECT ...) [AS alias]`` in FROM."""
        check_args(node, ("this", "alias"))
        return self.query(node.this, ctes), self._alias(node), "the subquery"

    @staticmethod
    def _alias(node: exp.Expression) -> str | None:
        alias = node.args.get("alias")
        if alias is None:
            return None
        if alias.args.get("columns"):
            raise unsupported("column names in a FROM alias", alias, "rename columns with AS in a subquery")
        check_args(alias, ("this",))
        return alias.name or None

    # JOIN ----------------------------------------------------------------------
    @staticmethod
    def _join_how(node: exp.Join) -> str:
        """The join's kind, read before sqlglot rewrites USING (and NATURAL) to ON."""
        check_args(node, ("this", "on", "using", "side", "kind", "method"))
        method = str(node.args.get("method") or "").upper()
        if method:
            raise unsupported(f"{method} JOIN", node, "write the join condition with ON or USING")
        side = str(node.args.get("side") or "").upper()
        kind = str(node.args.get("kind") or "").upper()
        on, using = node.args.get("on"), node.args.get("using")
        if kind == "CROSS":
            if on is not None or using:
                raise unsupported("CROSS JOIN with ON or USING", node)
            return "cross"
        if kind in ("SEMI", "ANTI"):
            if side not in ("", "LEFT"):
                raise unsupported(f"{side} {kind} JOIN", node)
            how = kind.lower()
        elif kind in ("", "INNER", "OUTER"):
            how = {"": "inner", "LEFT": "left", "RIGHT": "right", "FULL": "full"}.get(side, "")
            if not how or (kind == "OUTER" and how == "inner"):
                raise unsupported(f"{side} {kind} JOIN".strip(), node)
        else:
            raise unsupported(f"{side} {kind} JOIN".strip(), node)
        if on is None and not using:
            if how == "inner" and not kind:
                return "cross"  # FROM a, b
            raise unsupported(f"{how.upper()} JOIN without ON or USING", node)
        if using and how == "full":
            # Its key is the COALESCE of both sides; sqlglot would join later USING joins on one side's copy.
            raise unsupported("FULL JOIN ... USING", node, "write the condition with ON instead")
        return how

    def _join(self, left: Frame, right: Frame, node: exp.Join, how: str) -> Frame:
        """``left`` joined with ``right`` as the qualified join ``node`` says (sqlglot turned USING into ON)."""
        # Right-hand names already taken get "_right", as polars' join names them.
        taken = {c.phys for c in left.columns}
        mapping: dict[str, str] = {}
        right_columns = []
        for column in right.columns:
            phys = column.phys
            while phys in taken:
                phys += "_right"
            taken.add(phys)
            if phys != column.phys:
                mapping[column.phys] = phys
            right_columns.append(replace(column, phys=phys))
        right_plan = P.frame_op("rename", input=right.plan, mapping=mapping) if mapping else right.plan

        on = node.args.get("on")
        pairs, residual = self._on(on, left.columns, right_columns) if on is not None else ([], [])
        if residual and how != "inner":
            raise unsupported(f"join condition {residual[0].sql(dialect=DIALECT)} in a {how.upper()} JOIN",
                              residual[0], "only equalities between the two sides, combined with AND, are "
                                           "supported here (other conditions only in an inner join)")
        if how == "inner" and not pairs:
            how = "cross"

        self.joins += 1
        left_keys = [f"{HIDDEN}lk{self.joins}_{i}" for i in range(len(pairs))]
        right_keys = [f"{HIDDEN}rk{self.joins}_{i}" for i in range(len(pairs))]
        left_plan = left.plan
        if pairs:
            # Join on fresh copies of the keys: every real column then comes out
            # unchanged whatever the join does with its key columns.
            left_plan = P.frame_op("with_columns", input=left_plan,
                                   exprs=[P.alias(l, n) for (l, _), n in zip(pairs, left_keys)])
            right_plan = P.frame_op("with_columns", input=right_plan,
                                    exprs=[P.alias(r, n) for (_, r), n in zip(pairs, right_keys)])
        if how == "right":  # a RIGHT join is the LEFT join of the swapped sides
            joined = P.frame_op("join", left=right_plan, right=left_plan, how="left",
                                left_on=[P.col(k) for k in right_keys], right_on=[P.col(k) for k in left_keys],
                                suffix="_right")
        else:
            joined = P.frame_op("join", left=left_plan, right=right_plan, how=how,
                                left_on=[P.col(k) for k in left_keys], right_on=[P.col(k) for k in right_keys],
                                suffix="_right")
        columns = left.columns if how in ("semi", "anti") else left.columns + right_columns
        plan = P.frame_op("select", input=joined, exprs=[P.col(c.phys) for c in columns])
        if residual:
            predicate = _and_all([RowExprs(columns, "JOIN ... ON").expr(r) for r in residual])
            plan = P.frame_op("filter", input=plan, predicate=predicate)
        return Frame(plan, columns)

    @staticmethod
    def _on(on: exp.Expression, left: list[Column],
            right: list[Column]) -> tuple[list[tuple[dict, dict]], list[exp.Expression]]:
        """Split ON into key pairs (left expr, right expr) and other conditions."""
        both = left + right
        left_ids = {id(c) for c in left}

        def side(node: exp.Expression) -> str:
            refs = [node] if isinstance(node, exp.Column) else list(node.find_all(exp.Column))
            sides = {"left" if id(find_column(both, c.table or None, c.name, c)) in left_ids else "right"
                     for c in refs}
            return sides.pop() if len(sides) == 1 else "none"  # constants and mixed sides are not keys

        pairs, residual = [], []
        for condition in conjuncts(on):
            if isinstance(condition, exp.EQ):
                a, b = condition.this, condition.expression
                sides = (side(a), side(b))
                if sides == ("right", "left"):
                    a, b = b, a
                if sides in (("left", "right"), ("right", "left")):
                    pairs.append((RowExprs(left, "JOIN ... ON").expr(a), RowExprs(right, "JOIN ... ON").expr(b)))
                    continue
            residual.append(condition)
        return pairs, residual


def _check_stars(items: list[exp.Expression], sources: list[Source], grouped: bool) -> None:
    """What sqlglot's ``*`` expansion does not check: ``*`` in a grouped query, unknown tables and EXCLUDE names."""
    columns = [c for s in sources for c in s.frame.columns]
    for item in items:
        if isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
            star, star_table = item.this, item.table
        elif isinstance(item, exp.Star):
            star, star_table = item, None
        else:
            continue
        check_args(star, ("except_", "except"))
        if grouped:
            raise unsupported("SELECT * in a grouped query", item, "list the group keys and aggregates")
        chosen = [c for c in columns if star_table is None or c.table == sql_key(star_table)]
        if star_table and not chosen:
            known = sorted(s.alias for s in sources if not s.alias.startswith(HIDDEN))
            raise schema_error(f"unknown table or alias {star_table!r} in {star_table}.*; "
                               f"known: {', '.join(known) or 'none'}", item, table=star_table)
        for excluded in arg(star, "except_", "except") or []:  # SELECT * EXCLUDE (a, b)
            if not isinstance(excluded, exp.Column) or isinstance(excluded.this, exp.Star):
                raise refuse(excluded, "EXCLUDE takes column names")
            key = sql_key(excluded.name)
            if not any(c.key == key for c in chosen):
                find_column(chosen, excluded.table or None, excluded.name, excluded)


def _and_all(predicates: list[dict]) -> dict:
    result = predicates[0]
    for p in predicates[1:]:
        result = P.binary("and", result, p)
    return result


def _sort(plan: dict, keys: list[_SortKey]) -> dict:
    """A sort node; keys whose NULLS placement differs from the first key's get a null-flag key first."""
    nulls_last = not keys[0].nulls_first
    by, descending = [], []
    for key in keys:
        if key.nulls_first == nulls_last:  # this key wants the other placement
            flag = "is_not_null" if key.nulls_first else "is_null"
            by.append(P.fn(flag, key.expr))
            descending.append(False)
        by.append(key.expr)
        descending.append(key.descending)
    return P.frame_op("sort", input=plan, by=by, descending=descending, nulls_last=nulls_last)


QUERIES: dict[type, Callable[[Translator, Any, Mapping[str, Frame]], Frame]] = {
    exp.Select: Translator.select,
    exp.Union: Translator.union,
    exp.Subquery: Translator.subquery_query,
}

SOURCES: dict[type, Callable[[Translator, Any, Mapping[str, Frame]], tuple[Frame, str | None, str]]] = {
    exp.Table: Translator.table,
    exp.Subquery: Translator.subquery,
}
