"""``%%sql`` cells: SQL text -> the same JSON plan the DataFrame language builds.

The text is parsed by sqlglot (DuckDB dialect, used only as a parser) and the
resulting syntax tree is walked through explicit dispatch tables keyed by
sqlglot node class: :data:`_QUERIES` (query shapes), :data:`_SOURCES` (what may
follow ``FROM``/``JOIN``), :data:`_EXPRS` (scalar expressions) and
:data:`_AGGREGATES` (aggregate functions).  A node class that is in none of
them is refused by name, and so is any clause of a known node that this module
does not read (``QUALIFY``, ``TABLESAMPLE``, ``FILTER (WHERE ...)``...): a
clause is never silently ignored.  Plans are built only with the builders of
:mod:`bastion_kernel.contract.plan`; nothing here executes SQL.

Supported subset
----------------
One ``SELECT`` (optionally with ``WITH`` common table expressions, ``UNION
[ALL]`` of such selects and subqueries in ``FROM``) over datasets named in
``tables``: ``WHERE``, ``GROUP BY`` (columns, expressions, select aliases or
positions), ``HAVING``, ``ORDER BY`` (``ASC``/``DESC``, ``NULLS FIRST/LAST``,
by name, alias, position or expression), ``LIMIT``, ``OFFSET``, ``DISTINCT``, ``SELECT * EXCLUDE (...)``,
``[INNER] / LEFT / RIGHT / FULL / CROSS / SEMI / ANTI JOIN`` with ``ON``
equalities combined with ``AND`` (extra conditions only for inner joins) or
``USING``, and the expressions and aggregates in the tables below.

Output column names
-------------------
- ``expr AS name`` is called ``name``; a bare column keeps its name.
- Columns of a join keep their names; a right-hand column whose name is
  already taken gets the suffix ``_right`` (as polars' ``join`` does), and is
  still reachable by its qualified name (``r.zip``).  When two selected
  columns share a name (``SELECT p.zip, r.zip``) they take these unique names.
- An unaliased function or aggregate of a single column is called
  ``{function}_{column}`` in lower case: ``sum_cost``, ``avg_age``,
  ``upper_name``, ``count_distinct_zip``, ``year_admission_date``;
  ``COUNT(*)`` is ``count``; a ``CAST`` keeps its column's name.  Any other
  unaliased expression takes the name of its leftmost column, as polars does
  (``literal`` when there is none).  A derived name already taken gets
  ``_1``, ``_2``...; two ``AS`` names (or columns) that clash are a
  ``SchemaError`` asking for ``AS``.

Semantics worth knowing
-----------------------
``COUNT(DISTINCT x)`` ignores nulls as SQL does (``n_unique`` minus one when
``x`` has a null).  ``LOG(x)`` is base 10 as in DuckDB and PostgreSQL,
``LN(x)`` base e, ``LOG(b, x)`` base ``b``.  ``/`` is true division.
``LIKE``/``ILIKE`` become ``starts_with``/``ends_with``/literal ``contains``
when the pattern allows it, else an anchored regular expression in which every
literal character is escaped.  A string literal compared with a ``Date`` or
``Datetime`` column is cast to that type.  Where polars and SQL differ
(``SUM`` over no rows is 0, ``ROUND`` rounds halves to even, ``%`` follows the
divisor's sign) the plan runs with polars' behaviour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Collection, Mapping

import sqlglot
from sqlglot import exp

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError

_DIALECT = "duckdb"
# Internal column names (join keys, hidden aggregates, sort keys) start with
# this; the executor reserves "__bastion", so it must differ from that.
_HIDDEN = "__sql_"
_TEMPORAL = ("Date", "Datetime")


# --------------------------------------------------------------------- entry
def sql_to_plan(query: str, tables: Mapping[str, list[list[str]]], *,
                saved: Collection[str] = ()) -> dict:
    """Translate one SQL query into a Bastion frame plan.

    Parameters
    ----------
    query : str
        The text of a ``%%sql`` cell: a single ``SELECT`` query.
    tables : Mapping[str, list[list[str]]]
        The datasets (and saved results) the query may read, by name, each
        with its schema ``[[column, dtype], ...]``.
    saved : Collection[str], optional
        Which names of ``tables`` are saved results; they are read with a
        ``saved`` node instead of ``scan``.

    Returns
    -------
    dict
        A frame plan made with :mod:`bastion_kernel.contract.plan`'s builders.

    Raises
    ------
    BastionError
        ``ParseError`` for text that is not SQL (``details`` has ``line`` and
        ``col`` when known), ``UnsupportedOperation`` for SQL outside the
        subset (the message names the construct), ``SchemaError`` for an
        unknown table or column (the message lists the known ones),
        ``LimitExceeded`` for a query nested too deeply to translate.
    """
    if not isinstance(query, str):
        raise BastionError("ParseError", f"a SQL query must be text, got {type(query).__name__}")
    statements = _parse(query)
    if not statements:
        raise BastionError("ParseError", "the SQL cell is empty: write one SELECT query")
    if len(statements) > 1:
        raise BastionError("UnsupportedOperation",
                           f"SQL construct 'multiple statements' is not supported: a %%sql cell runs one "
                           f"SELECT query, got {len(statements)} statements", construct="multiple statements")
    statement = statements[0]
    if type(statement) not in _QUERIES:
        _refuse_statement(statement)
    try:
        return _Translator(tables, saved).query(statement, {}).plan
    except RecursionError:
        raise BastionError("LimitExceeded", "the query is nested too deeply to translate") from None


def _parse(query: str) -> list[exp.Expression]:
    try:
        parsed = sqlglot.parse(query, read=_DIALECT)
    except sqlglot.errors.ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        where = {k: first[k] for k in ("line", "col") if isinstance(first.get(k), int)}
        near = f" near {first['highlight']!r}" if first.get("highlight") else ""
        at = f" at line {where['line']}, column {where['col']}" if len(where) == 2 else ""
        description = str(first.get("description") or exc).split(". Line")[0]
        if "<Token" in description:  # sqlglot quotes its token objects; keep the human part
            description = description.split(" but got")[0].split("<Token")[0].strip()
        raise BastionError("ParseError", f"invalid SQL{at}{near}: {description}", **where) from None
    except sqlglot.errors.TokenError as exc:
        raise BastionError("ParseError", f"invalid SQL: {exc}") from None
    except RecursionError:
        raise BastionError("LimitExceeded", "the query is nested too deeply to parse") from None
    except Exception as exc:  # noqa: BLE001 - the parser runs on untrusted text; any failure means "not SQL we read"
        raise BastionError("ParseError", f"invalid SQL ({type(exc).__name__}: {str(exc)[:200]})") from None
    return [s for s in parsed if s is not None]


# ------------------------------------------------------------------ refusals
def _position(node: exp.Expression | None) -> dict:
    """``{"line", "col"}`` of the first token of ``node`` that sqlglot located."""
    if node is None:
        return {}
    for sub in node.walk():
        meta = getattr(sub, "meta", None) or {}
        if isinstance(meta.get("line"), int) and isinstance(meta.get("col"), int):
            width = meta.get("end", 0) - meta.get("start", 0) if isinstance(meta.get("end"), int) else 0
            return {"line": meta["line"], "col": max(1, meta["col"] - width)}
    return {}


def _describe(node: exp.Expression) -> str:
    """How a refused node is named in messages."""
    named = _CONSTRUCT_NAMES.get(type(node))
    if named:
        return named
    if isinstance(node, exp.Anonymous):
        return f"Anonymous function {node.name}"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name()}"
    return type(node).__name__


def _unsupported(what: str, node: exp.Expression | None = None, hint: str = "") -> BastionError:
    message = f"SQL construct '{what}' is not supported"
    if hint:
        message += f": {hint}"
    return BastionError("UnsupportedOperation", message, construct=what, **_position(node))


def _refuse(node: exp.Expression, hint: str = "") -> BastionError:
    return _unsupported(_describe(node), node, hint)


def _schema_error(message: str, node: exp.Expression | None = None, **details: Any) -> BastionError:
    return BastionError("SchemaError", message, **details, **_position(node))


def _refuse_statement(node: exp.Expression) -> None:
    if isinstance(node, exp.Command):
        what = f"{str(node.this).upper()} command"
    else:
        what = f"{node.key.upper()} statement"
        kind = node.args.get("kind")
        if isinstance(kind, str) and kind:
            what = f"{node.key.upper()} {kind.upper()} statement"
    raise _unsupported(what, node, "a %%sql cell runs one read-only SELECT query over the datasets by name")


def _check_args(node: exp.Expression, allowed: Collection[str]) -> None:
    """Refuse any clause or flag of ``node`` that the handler does not read."""
    for key, value in node.args.items():
        if key in allowed or value is None or value is False or value == [] or value == "":
            continue
        label = key.rstrip("_").replace("_", " ").upper()
        raise _unsupported(f"{label} in {_describe(node)}", value if isinstance(value, exp.Expression) else node)


def _arg(node: exp.Expression, *names: str) -> Any:
    """An argument under its current or older sqlglot key (``from_``/``from``)."""
    for name in names:
        value = node.args.get(name)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------- frame model
@dataclass(frozen=True)
class _Column:
    """A column visible to a query: how SQL names it and where it is in the frame."""

    name: str                 # the name SQL text uses
    phys: str                 # the name in the plan's frame
    dtype: str | None         # polars dtype name when known ("Date", "Int64", ...)
    table: str | None = None  # the qualifier (table alias) that reaches it
    in_star: bool = True      # False for the right-hand copy of a USING column
    unqualified: bool = True  # False when USING merged it into the other side's column


@dataclass
class _Frame:
    plan: dict
    columns: list[_Column]


def _dtype_name(dtype: Any) -> str | None:
    if not isinstance(dtype, str):
        return None
    return dtype.split("(")[0].strip() or None


def _dtype_of(expr: dict, dtypes: Mapping[str, str | None]) -> str | None:
    """The dtype of a plan expression where it matters here (temporal coercion)."""
    kind = expr.get("expr")
    if kind == "col":
        return dtypes.get(expr["name"])
    if kind == "alias":
        return _dtype_of(expr["input"], dtypes)
    if kind == "lit":
        value = expr["value"]
        return "String" if isinstance(value, str) else "Boolean" if isinstance(value, bool) else None
    if kind == "when":
        return _dtype_of(expr["branches"][0]["then"], dtypes) if expr["branches"] else None
    if kind == "fn":
        name = expr["name"]
        if name == "cast":
            return expr["args"]["dtype"]
        if name in ("fill_null", "min", "max", "first", "last"):
            return _dtype_of(expr["input"], dtypes)
        if name == "str.to_date":
            return "Date"
    return None


def _resolve(columns: list[_Column], table: str | None, name: str, node: exp.Expression | None) -> _Column:
    """Find the column ``table.name`` (or unqualified ``name``) among ``columns``."""
    if table is not None:
        pool = [c for c in columns if c.table == table] or \
               [c for c in columns if c.table is not None and c.table.lower() == table.lower()]
        if not pool:
            known = sorted({c.table for c in columns if c.table})
            raise _schema_error(f"unknown table or alias {table!r} in {table}.{name}; "
                                f"known: {', '.join(known) or 'none'}", node, table=table)
    else:
        pool = [c for c in columns if c.unqualified]
    matches = [c for c in pool if c.name == name] or [c for c in pool if c.name.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    shown = f"{table}.{name}" if table else name
    if len(matches) > 1:
        candidates = ", ".join(f"{c.table}.{c.name}" if c.table else c.name for c in matches)
        raise _schema_error(f"column {shown!r} is ambiguous: it could be {candidates}; "
                            "qualify it with a table alias", node, column=shown)
    known = [f"{c.table}.{c.name}" if c.table and table is None and _needs_qualifier(columns, c) else c.name
             for c in pool if c.in_star]
    raise _schema_error(f"unknown column {shown!r}; known columns: {', '.join(known)}", node,
                        column=shown, available=known)


def _needs_qualifier(columns: list[_Column], column: _Column) -> bool:
    return sum(1 for c in columns if c.name == column.name and c.unqualified) > 1


# -------------------------------------------------------- expression contexts
class _RowExprs:
    """Translates expressions evaluated row by row over a set of columns."""

    def __init__(self, columns: list[_Column], clause: str,
                 aliases: Mapping[str, exp.Expression] | None = None):
        self.columns = columns
        self.clause = clause
        self.aliases = dict(aliases or {})
        self.dtypes: dict[str, str | None] = {c.phys: c.dtype for c in columns}
        self._expanding: set[str] = set()

    def expr(self, node: exp.Expression) -> dict:
        return _translate(self, node)

    def dtype(self, expr: dict) -> str | None:
        return _dtype_of(expr, self.dtypes)

    def column(self, node: exp.Column) -> dict:
        if isinstance(node.this, exp.Star):
            raise _unsupported(f"{node.table}.* inside an expression", node)
        table = node.table or None
        try:
            return P.col(_resolve(self.columns, table, node.name, node).phys)
        except BastionError:
            alias = self._alias(node, table)
            if alias is None:
                raise
            return alias

    def _alias(self, node: exp.Column, table: str | None) -> dict | None:
        """A reference to a SELECT alias (allowed in HAVING and ORDER BY)."""
        if table is not None or node.name not in self.aliases or node.name in self._expanding:
            return None
        self._expanding.add(node.name)
        try:
            return self.expr(self.aliases[node.name])
        finally:
            self._expanding.discard(node.name)

    def aggregate(self, node: exp.Expression) -> dict:
        raise _unsupported(f"aggregate function {node.sql_name()} in {self.clause}", node,
                           "aggregates belong in SELECT, HAVING or ORDER BY of a grouped query")


class _GroupedExprs(_RowExprs):
    """Translates expressions over the result of a GROUP BY (or a global aggregate).

    A subtree equal to a group key becomes that key's column; each aggregate
    becomes a hidden aggregate column, registered here so that the group_by
    node can be built after every clause has been read.
    """

    def __init__(self, row: _RowExprs, keys: list[tuple[dict, str]], clause: str):
        super().__init__([], clause, row.aliases)
        self.row = row
        self.keys = {P.canonical_json(e): name for e, name in keys}
        self.dtypes = {name: row.dtype(e) for e, name in keys}
        self.aggs: list[dict] = []
        self._agg_names: dict[bytes, str] = {}

    def expr(self, node: exp.Expression) -> dict:
        if type(node) not in _AGGREGATES and not _has_aggregate(node):
            try:
                at_row_level = self.row.expr(node)
            except BastionError:
                if isinstance(node, exp.Column):
                    alias = self._alias(node, node.table or None)
                    if alias is not None:
                        return alias
                    raise
                at_row_level = None
            if at_row_level is not None:
                key = self.keys.get(P.canonical_json(at_row_level))
                if key is not None:
                    return P.col(key)
                if isinstance(node, exp.Column):
                    raise _schema_error(f"column {node.sql()!r} must appear in GROUP BY or be used in an "
                                        "aggregate function", node, column=node.sql())
        return _translate(self, node)

    def column(self, node: exp.Column) -> dict:
        raise _schema_error(f"column {node.sql()!r} must appear in GROUP BY or be used in an aggregate "
                            "function", node, column=node.sql())

    def aggregate(self, node: exp.Expression) -> dict:
        argument = _RowExprs(self.row.columns, f"the argument of {node.sql_name()}")
        return _AGGREGATES[type(node)](argument, node, self.register)

    def register(self, agg: dict) -> dict:
        """A hidden aggregate column computing ``agg``; the same aggregate is computed once."""
        key = P.canonical_json(agg)
        name = self._agg_names.get(key)
        if name is None:
            name = f"{_HIDDEN}agg{len(self.aggs)}"
            self._agg_names[key] = name
            self.aggs.append(P.alias(agg, name))
            self.dtypes[name] = self.row.dtype(agg)
        return P.col(name)


def _has_aggregate(node: exp.Expression) -> bool:
    return any(type(sub) in _AGGREGATES for sub in node.walk())


def _translate(ctx: _RowExprs, node: exp.Expression) -> dict:
    if type(node) in _AGGREGATES:
        return ctx.aggregate(node)
    entry = _EXPRS.get(type(node))
    if entry is None:
        raise _refuse(node)
    handler, allowed = entry
    _check_args(node, allowed)
    return handler(ctx, node)


# ------------------------------------------------------------------ literals
def _literal_value(node: exp.Expression, what: str) -> Any:
    """The JSON value of a literal node (numbers, strings, booleans, NULL, -number)."""
    if isinstance(node, exp.Paren):
        return _literal_value(node.this, what)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            raise _unsupported(f"numeric literal {text}", node) from None
        if not math.isfinite(value):
            raise _unsupported(f"numeric literal {text}", node)
        return value
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Neg):
        value = _literal_value(node.this, what)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise _unsupported(f"{_describe(node)} as {what}", node, f"{what} must be a literal value")


def _int_literal(node: exp.Expression | None, what: str, minimum: int = 0) -> int:
    value = _literal_value(node, what) if node is not None else None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _unsupported(f"{what} {node.sql() if node is not None else ''}".strip(), node,
                           f"{what} must be a whole number of at least {minimum}")
    return value


def _str_literal(node: exp.Expression | None, what: str) -> str:
    if not isinstance(node, exp.Literal) or not node.is_string:
        raise _unsupported(f"{what} {node.sql() if node is not None else ''}".strip(), node,
                           f"{what} must be a string literal")
    return node.this


# --------------------------------------------------------------- expressions
_Handler = Callable[[_RowExprs, Any], dict]
_EXPRS: dict[type, tuple[_Handler, frozenset[str]]] = {}


def _handles(*classes: type, args: tuple[str, ...] = ("this",)) -> Callable[[_Handler], _Handler]:
    """Register a handler in :data:`_EXPRS` with the node arguments it reads."""
    def register(handler: _Handler) -> _Handler:
        for cls in classes:
            _EXPRS[cls] = (handler, frozenset(args))
        return handler
    return register


@_handles(exp.Paren)
def _paren(ctx: _RowExprs, node: exp.Paren) -> dict:
    return ctx.expr(node.this)


@_handles(exp.Column, args=("this", "table", "db", "catalog"))
def _column(ctx: _RowExprs, node: exp.Column) -> dict:
    if node.args.get("db") or node.args.get("catalog"):
        raise _unsupported(f"schema-qualified column {node.sql(dialect=_DIALECT)}", node,
                           "qualify a column with its table name or alias only")
    return ctx.column(node)


@_handles(exp.Literal, args=("this", "is_string"))
@_handles(exp.Boolean)
@_handles(exp.Null, args=())
def _literal(ctx: _RowExprs, node: exp.Expression) -> dict:
    return P.lit(_literal_value(node, "a literal"))


_ARITHMETIC = {exp.Add: "add", exp.Sub: "sub", exp.Mul: "mul", exp.Div: "truediv", exp.IntDiv: "floordiv",
               exp.Mod: "mod", exp.Pow: "pow", exp.And: "and", exp.Or: "or", exp.DPipe: "add"}
_COMPARISONS = {exp.EQ: "eq", exp.NEQ: "ne", exp.LT: "lt", exp.LTE: "le", exp.GT: "gt", exp.GTE: "ge"}


@_handles(*_ARITHMETIC, args=("this", "expression", "typed", "safe"))
def _arithmetic(ctx: _RowExprs, node: exp.Binary) -> dict:
    # DPipe (||) concatenates strings; polars' "+" does that for two strings.
    return P.binary(_ARITHMETIC[type(node)], ctx.expr(node.this), ctx.expr(node.expression))


def _operands(ctx: _RowExprs, *nodes: exp.Expression) -> list[dict]:
    """Translate comparison operands, casting string literals compared with a temporal value."""
    translated: list[dict | None] = [None if _is_string_literal(n) else ctx.expr(n) for n in nodes]
    temporal = next((d for d in (ctx.dtype(t) for t in translated if t is not None) if d in _TEMPORAL), None)
    return [t if t is not None else
            (P.fn("cast", P.lit(n.this), dtype=temporal) if temporal else P.lit(n.this))
            for t, n in zip(translated, nodes)]


def _is_string_literal(node: exp.Expression) -> bool:
    return isinstance(node, exp.Literal) and node.is_string


@_handles(*_COMPARISONS, args=("this", "expression"))
def _comparison(ctx: _RowExprs, node: exp.Binary) -> dict:
    left, right = _operands(ctx, node.this, node.expression)
    return P.binary(_COMPARISONS[type(node)], left, right)


@_handles(exp.Not)
def _not(ctx: _RowExprs, node: exp.Not) -> dict:
    inner = node.this
    if isinstance(inner, exp.Is) and isinstance(inner.expression, exp.Null) and not inner.args.get("negate"):
        return P.fn("is_not_null", ctx.expr(inner.this))
    return P.unary("not", ctx.expr(inner))


@_handles(exp.Neg)
def _neg(ctx: _RowExprs, node: exp.Neg) -> dict:
    if isinstance(node.this, exp.Literal) and not node.this.is_string:
        return P.lit(_literal_value(node, "a literal"))
    return P.unary("neg", ctx.expr(node.this))


@_handles(exp.Is, args=("this", "expression", "negate"))
def _is(ctx: _RowExprs, node: exp.Is) -> dict:
    if not isinstance(node.expression, exp.Null):
        raise _unsupported(f"IS {node.expression.sql()}", node, "only IS NULL and IS NOT NULL are supported")
    name = "is_not_null" if node.args.get("negate") else "is_null"
    return P.fn(name, ctx.expr(node.this))


@_handles(exp.In, args=("this", "expressions", "query"))
def _in(ctx: _RowExprs, node: exp.In) -> dict:
    query = node.args.get("query")
    if query is not None:
        raise _subquery_refusal(query, "IN (subquery)")
    subject = ctx.expr(node.this)
    temporal = ctx.dtype(subject)
    if temporal in _TEMPORAL:
        # is_in cannot compare dates with strings: spell it out as equalities.
        tests = [P.binary("eq", subject, P.fn("cast", P.lit(_str_literal(v, "an IN item")), dtype=temporal)
                          if _is_string_literal(v) else ctx.expr(v)) for v in node.expressions]
        result = tests[0]
        for test in tests[1:]:
            result = P.binary("or", result, test)
        return result
    values = [_literal_value(v, "an IN list item") for v in node.expressions]
    return P.fn("is_in", subject, values=values)


@_handles(exp.Between, args=("this", "low", "high"))
def _between(ctx: _RowExprs, node: exp.Between) -> dict:
    subject, low, high = _operands(ctx, node.this, node.args["low"], node.args["high"])
    return P.fn("is_between", subject, lower=low, upper=high, closed="both")


@_handles(exp.Like, exp.ILike, args=("this", "expression", "negate"))
def _like(ctx: _RowExprs, node: exp.Like | exp.ILike, escape: str | None = None) -> dict:
    pattern = _str_literal(node.expression, f"the pattern of {node.key.upper()}")
    test = _like_test(ctx.expr(node.this), pattern, escape, isinstance(node, exp.ILike))
    return P.unary("not", test) if node.args.get("negate") else test


@_handles(exp.Escape, args=("this", "expression"))
def _escape(ctx: _RowExprs, node: exp.Escape) -> dict:
    like = node.this
    if not isinstance(like, (exp.Like, exp.ILike)):
        raise _refuse(node)
    _check_args(like, ("this", "expression", "negate"))
    escape = _str_literal(node.expression, "the ESCAPE character")
    if len(escape) != 1:
        raise _unsupported(f"ESCAPE {escape!r}", node, "the escape must be a single character")
    return _like(ctx, like, escape)


# Characters with a meaning in polars' (Rust) regular expressions.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def _like_test(subject: dict, pattern: str, escape: str | None, ignore_case: bool) -> dict:
    """A LIKE pattern as the simplest string test that matches exactly the same strings."""
    parts: list[str | None] = []  # literal text, or None for "%" and "" for "_"
    literal = ""
    chars = iter(pattern)
    for ch in chars:
        if escape is not None and ch == escape:
            literal += next(chars, "")
        elif ch in "%_":
            if literal:
                parts.append(literal)
                literal = ""
            parts.append(None if ch == "%" else "")
        else:
            literal += ch
    if literal:
        parts.append(literal)
    if not ignore_case and "" not in parts:
        texts = [p for p in parts if p]
        shape = tuple("%" if p is None else "x" for p in parts)
        if shape == ("x",):
            return P.binary("eq", subject, P.lit(texts[0]))
        if shape == ("x", "%"):
            return P.fn("str.starts_with", subject, prefix=texts[0])
        if shape == ("%", "x"):
            return P.fn("str.ends_with", subject, suffix=texts[0])
        if shape == ("%", "x", "%"):
            return P.fn("str.contains", subject, pattern=texts[0], literal=True)
    body = "".join(".*" if p is None else "." if p == "" else "".join("\\" + c if c in _REGEX_META else c
                                                                            for c in p) for p in parts)
    flags = "(?si)" if ignore_case else "(?s)"
    return P.fn("str.contains", subject, pattern=f"{flags}^{body}$", literal=False)


@_handles(exp.Case, args=("this", "ifs", "default"))
def _case(ctx: _RowExprs, node: exp.Case) -> dict:
    operand = node.args.get("this")
    branches = []
    for branch in node.args.get("ifs") or []:
        _check_args(branch, ("this", "true"))
        if operand is not None:
            left, right = _operands(ctx, operand, branch.this)
            condition = P.binary("eq", left, right)
        else:
            condition = ctx.expr(branch.this)
        branches.append((condition, ctx.expr(branch.args["true"])))
    default = node.args.get("default")
    return P.when(branches, ctx.expr(default) if default is not None else None)


@_handles(exp.If, args=("this", "true", "false"))
def _if(ctx: _RowExprs, node: exp.If) -> dict:
    otherwise = node.args.get("false")
    return P.when([(ctx.expr(node.this), ctx.expr(node.args["true"]))],
                  ctx.expr(otherwise) if otherwise is not None else None)


# SQL type names (sqlglot's) -> plan.DTYPES.
_CAST_TYPES = {
    "TINYINT": "Int8", "SMALLINT": "Int16", "INT": "Int32", "BIGINT": "Int64",
    "UTINYINT": "UInt8", "USMALLINT": "UInt16", "UINT": "UInt32", "UBIGINT": "UInt64",
    "FLOAT": "Float32", "DOUBLE": "Float64", "TEXT": "String", "VARCHAR": "String", "CHAR": "String",
    "BOOLEAN": "Boolean", "DATE": "Date", "TIMESTAMP": "Datetime", "TIMESTAMPNTZ": "Datetime",
    "DATETIME": "Datetime",
}


@_handles(exp.Cast, exp.TryCast, args=("this", "to", "safe"))
def _cast(ctx: _RowExprs, node: exp.Cast) -> dict:
    to = node.args["to"]
    type_name = getattr(to.this, "name", None)
    dtype = _CAST_TYPES.get(type_name) if isinstance(to, exp.DataType) else None
    if dtype is None or (to.expressions and dtype != "String"):
        raise _unsupported(f"CAST to {to.sql(dialect=_DIALECT)}", node,
                           f"casts go to {', '.join(sorted(set(_CAST_TYPES)))}")
    return P.fn("cast", ctx.expr(node.this), dtype=dtype, strict=not isinstance(node, exp.TryCast))


@_handles(exp.Round, args=("this", "decimals"))
def _round(ctx: _RowExprs, node: exp.Round) -> dict:
    decimals = node.args.get("decimals")
    places = _int_literal(decimals, "ROUND's number of decimals") if decimals is not None else 0
    return P.fn("round", ctx.expr(node.this), decimals=places)


_ELEMENTWISE = {exp.Abs: "abs", exp.Sqrt: "sqrt", exp.Exp: "exp", exp.Lower: "str.to_lowercase",
                exp.Upper: "str.to_uppercase", exp.Year: "dt.year", exp.Month: "dt.month",
                exp.Day: "dt.day", exp.DayOfMonth: "dt.day", exp.Hour: "dt.hour",
                exp.DayOfWeekIso: "dt.weekday"}


@_handles(*_ELEMENTWISE)
def _elementwise(ctx: _RowExprs, node: exp.Func) -> dict:
    return P.fn(_ELEMENTWISE[type(node)], ctx.expr(node.this))


@_handles(exp.Length)
def _length(ctx: _RowExprs, node: exp.Length) -> dict:
    return P.fn("str.len_chars", ctx.expr(node.this))


@_handles(exp.Ln)
def _ln(ctx: _RowExprs, node: exp.Ln) -> dict:
    return P.fn("log", ctx.expr(node.this), base=math.e)


@_handles(exp.Log, args=("this", "expression"))
def _log(ctx: _RowExprs, node: exp.Log) -> dict:
    if node.expression is None:  # LOG(x): base 10, as in DuckDB and PostgreSQL
        return P.fn("log", ctx.expr(node.this), base=10)
    base = _literal_value(node.this, "the base of LOG")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0 or base == 1:
        raise _unsupported(f"LOG base {node.this.sql()}", node, "the base must be a positive number other than 1")
    return P.fn("log", ctx.expr(node.expression), base=base)


@_handles(exp.Pow, args=("this", "expression"))
def _pow(ctx: _RowExprs, node: exp.Pow) -> dict:
    return P.fn("pow", ctx.expr(node.this), exponent=ctx.expr(node.expression))


@_handles(exp.Trim, args=("this", "expression", "position"))
def _trim(ctx: _RowExprs, node: exp.Trim) -> dict:
    position = str(node.args.get("position") or "BOTH").upper()
    if position != "BOTH":
        raise _unsupported(f"TRIM {position} (LTRIM/RTRIM)", node, "only TRIM of both ends is supported")
    chars = node.expression
    return P.fn("str.strip_chars", ctx.expr(node.this),
                characters=_str_literal(chars, "TRIM's characters") if chars is not None else None)


@_handles(exp.Substring, args=("this", "start", "length"))
def _substring(ctx: _RowExprs, node: exp.Substring) -> dict:
    start = _int_literal(node.args.get("start"), "SUBSTRING's start", minimum=1)
    length = node.args.get("length")
    return P.fn("str.slice", ctx.expr(node.this), offset=start - 1,
                length=_int_literal(length, "SUBSTRING's length") if length is not None else None)


@_handles(exp.Replace, args=("this", "expression", "replacement"))
def _replace(ctx: _RowExprs, node: exp.Replace) -> dict:
    pattern = _str_literal(node.expression, "REPLACE's search text")
    value = _str_literal(node.args.get("replacement"), "REPLACE's replacement")
    # SQL REPLACE replaces every occurrence; the plan's str.replace only the first.
    if "str.replace_all" not in P.EXPR_FUNCTIONS:
        raise _unsupported("REPLACE", node, "the plan format has no replace-all string function yet")
    return P.fn("str.replace_all", ctx.expr(node.this), pattern=pattern, value=value, literal=True)


@_handles(exp.Coalesce, args=("this", "expressions", "is_nvl", "is_null"))
def _coalesce(ctx: _RowExprs, node: exp.Coalesce) -> dict:
    items = [node.this, *node.expressions]
    result = ctx.expr(items[-1])
    for item in reversed(items[:-1]):
        result = P.fn("fill_null", ctx.expr(item), value=result)
    return result


_EXTRACT_PARTS = {"YEAR": "dt.year", "MONTH": "dt.month", "DAY": "dt.day", "HOUR": "dt.hour",
                  "ISODOW": "dt.weekday"}


@_handles(exp.Extract, args=("this", "expression"))
def _extract(ctx: _RowExprs, node: exp.Extract) -> dict:
    part = node.this.name.upper() if isinstance(node.this, (exp.Var, exp.Identifier, exp.Literal)) else ""
    function = _EXTRACT_PARTS.get(part)
    if function is None:
        raise _unsupported(f"EXTRACT({part or node.this.sql()} FROM ...)", node,
                           f"supported parts: {', '.join(_EXTRACT_PARTS)}")
    return P.fn(function, ctx.expr(node.expression))


def _subquery_refusal(node: exp.Expression, what: str) -> BastionError:
    """Refuse a subquery inside an expression, saying whether it is correlated."""
    inner = {t.alias_or_name for t in node.find_all(exp.Table)} | \
            {s.alias for s in node.find_all(exp.Subquery) if s.alias}
    for column in node.find_all(exp.Column):
        if column.table and column.table not in inner:
            return _unsupported("correlated subquery", node,
                                f"it refers to the outer query's {column.table}.{column.name}; subqueries are "
                                "allowed only in FROM and WITH (join a grouped subquery instead)")
    return _unsupported(what, node, "subqueries are allowed only in FROM and WITH "
                                    "(join a grouped subquery instead)")


@_handles(exp.Subquery, args=tuple(exp.Subquery.arg_types))
def _scalar_subquery(ctx: _RowExprs, node: exp.Subquery) -> dict:
    raise _subquery_refusal(node, "scalar subquery")


@_handles(exp.Exists, args=tuple(exp.Exists.arg_types))
def _exists(ctx: _RowExprs, node: exp.Exists) -> dict:
    raise _subquery_refusal(node, "EXISTS (subquery)")


_CONSTRUCT_NAMES: dict[type, str] = {
    exp.Window: "window function (OVER)",
    exp.Star: "*",
    exp.Values: "VALUES",
    exp.Unnest: "UNNEST",
    exp.Lateral: "LATERAL",
    exp.Intersect: "INTERSECT",
    exp.Except: "EXCEPT",
    exp.Filter: "aggregate FILTER (WHERE ...)",
    exp.Distinct: "DISTINCT inside a function",
    exp.Placeholder: "query parameter",
}


# ---------------------------------------------------------------- aggregates
_Register = Callable[[dict], dict]


def _count(ctx: _RowExprs, node: exp.Count, register: _Register) -> dict:
    _check_args(node, ("this", "big_int"))
    arg = node.this
    if arg is None or isinstance(arg, exp.Star):
        return register(P.length())
    if isinstance(arg, exp.Distinct):
        _check_args(arg, ("expressions",))
        if len(arg.expressions) != 1:
            raise _unsupported("COUNT(DISTINCT of several columns)", node)
        subject = ctx.expr(arg.expressions[0])
        # SQL does not count NULL as a distinct value; polars' n_unique does.
        has_null = P.fn("cast", P.binary("gt", register(P.fn("null_count", subject)), P.lit(0)), dtype="UInt32")
        return P.binary("sub", register(P.fn("n_unique", subject)), has_null)
    return register(P.fn("count", ctx.expr(arg)))


def _aggregate(name: str, **params: Any) -> Callable[[_RowExprs, exp.Expression, _Register], dict]:
    def handler(ctx: _RowExprs, node: exp.Expression, register: _Register) -> dict:
        _check_args(node, ("this",))
        if isinstance(node.this, exp.Distinct):
            raise _unsupported(f"{node.sql_name()}(DISTINCT ...)", node, "only COUNT(DISTINCT x) is supported")
        return register(P.fn(name, ctx.expr(node.this), **params))
    return handler


_AGGREGATES: dict[type, Callable[[_RowExprs, Any, _Register], dict]] = {
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


# ------------------------------------------------------------- output names
def _derived_name(node: exp.Expression) -> str:
    """The name of an unaliased SELECT item (see the module docstring)."""
    if isinstance(node, exp.Paren):
        return _derived_name(node.this)
    if isinstance(node, exp.Column):
        return node.name
    if isinstance(node, (exp.Cast, exp.TryCast)):
        return _derived_name(node.this)
    if isinstance(node, exp.Count) and (node.this is None or isinstance(node.this, exp.Star)):
        return "count"
    columns = [c.name for c in node.find_all(exp.Column, bfs=False)]
    if isinstance(node, exp.Func) and len(set(columns)) == 1:
        return f"{_function_label(node)}_{columns[0]}".lower()
    return columns[0] if columns else "literal"


def _function_label(node: exp.Func) -> str:
    if isinstance(node, exp.Count) and isinstance(node.this, exp.Distinct):
        return "count_distinct"
    if isinstance(node, exp.Extract):
        return node.this.name
    if isinstance(node, exp.Anonymous):
        return node.name
    return node.sql_name()


@dataclass
class _Output:
    expr: dict              # the value, before naming
    name: str               # the final output name
    fallback: str | None    # a unique alternative for a plain column reference
    explicit: bool          # named with AS


def _name_outputs(outputs: list[_Output], node: exp.Expression) -> None:
    """Settle output names: AS names and column names first, derived names then take a free one.

    Plain column references that share a name take their unique frame name
    (``zip``, ``zip_right``); a derived name that is taken gets ``_1``,
    ``_2``...; two AS names (or columns) that still clash are an error.
    """
    counts: dict[str, int] = {}
    for out in outputs:
        if out.explicit or out.fallback:
            counts[out.name] = counts.get(out.name, 0) + 1
    for out in outputs:
        if counts.get(out.name, 0) > 1 and out.fallback and not out.explicit:
            out.name = out.fallback
    claimed: set[str] = set()
    for out in outputs:
        if not (out.explicit or out.fallback):
            continue
        if out.name in claimed:
            raise _schema_error(f"the query would produce two columns named {out.name!r}; "
                                "name one of them with AS", node, column=out.name)
        claimed.add(out.name)
    for out in outputs:
        if out.explicit or out.fallback:
            continue
        base, n = out.name, 0
        while out.name in claimed:
            n += 1
            out.name = f"{base}_{n}"
        claimed.add(out.name)
    for out in outputs:
        if out.name.startswith(_HIDDEN) or out.name.startswith("__bastion"):
            raise _schema_error(f"output column names may not start with {_HIDDEN!r} or '__bastion': "
                                f"{out.name!r}", node, column=out.name)


def _projection(outputs: list[_Output]) -> list[dict]:
    return [o.expr if o.expr == P.col(o.name) else P.alias(o.expr, o.name) for o in outputs]


# --------------------------------------------------------------- translator
@dataclass
class _SortKey:
    expr: dict
    descending: bool
    nulls_first: bool


class _Translator:
    """Builds the plan of one query; nested queries (CTEs, subqueries) reuse it."""

    def __init__(self, tables: Mapping[str, list[list[str]]], saved: Collection[str]):
        self.tables: dict[str, list[tuple[str, str | None]]] = {}
        for name, schema in tables.items():
            self.tables[name] = [(str(column), _dtype_name(dtype)) for column, dtype in schema]
        self.saved = frozenset(saved)
        self.joins = 0

    def query(self, node: exp.Expression, ctes: Mapping[str, _Frame]) -> _Frame:
        handler = _QUERIES.get(type(node))
        if handler is None:
            raise _refuse(node)
        return handler(self, node, ctes)

    # WITH ----------------------------------------------------------------------
    def _with(self, node: exp.Expression, ctes: Mapping[str, _Frame]) -> Mapping[str, _Frame]:
        clause = _arg(node, "with_", "with")
        if clause is None:
            return ctes
        if clause.args.get("recursive"):
            raise _unsupported("WITH RECURSIVE", clause)
        _check_args(clause, ("expressions",))
        scope = dict(ctes)
        for cte in clause.expressions:
            _check_args(cte, ("this", "alias", "materialized"))
            alias = cte.args.get("alias")
            if alias is None or not alias.name:
                raise _unsupported("WITH without a name", cte)
            _check_args(alias, ("this",))
            scope[alias.name] = self.query(cte.this, scope)
        return scope

    # SELECT --------------------------------------------------------------------
    def select(self, node: exp.Select, ctes: Mapping[str, _Frame]) -> _Frame:
        _check_args(node, ("with_", "with", "expressions", "distinct", "from_", "from", "joins", "where",
                           "group", "having", "order", "limit", "offset", "kind"))
        if node.args.get("kind"):
            raise _unsupported(f"SELECT {str(node.args['kind']).upper()}", node)
        ctes = self._with(node, ctes)
        source = _arg(node, "from_", "from")
        if source is None:
            raise _unsupported("SELECT without FROM", node, "a query reads one or more datasets by name")
        _check_args(source, ("this",))
        frame = self._source(source.this, ctes)
        for join in node.args.get("joins") or []:
            frame = self._join(frame, join, ctes)

        where = node.args.get("where")
        if where is not None:
            predicate = _RowExprs(frame.columns, "WHERE").expr(where.this)
            frame = _Frame(P.frame_op("filter", input=frame.plan, predicate=predicate), frame.columns)

        items = node.expressions
        aliases = {i.alias: i.this for i in items if isinstance(i, exp.Alias) and i.alias}
        group, having = node.args.get("group"), node.args.get("having")
        grouped = group is not None or having is not None or any(_has_aggregate(i) for i in items)
        row = _RowExprs(frame.columns, "SELECT", aliases)
        if grouped:
            keys = self._group_keys(group, items, row)
            ctx: _RowExprs = _GroupedExprs(row, keys, "SELECT")
        else:
            keys, ctx = [], row

        outputs = self._outputs(items, ctx, frame.columns, grouped, node)
        predicate = ctx.expr(having.this) if having is not None else None
        sort_keys, hidden = self._order(node.args.get("order"), ctx, outputs)

        base = frame.plan
        if grouped:
            assert isinstance(ctx, _GroupedExprs)
            if keys:
                key_exprs = [e if e == P.col(name) else P.alias(e, name) for e, name in keys]
                base = P.frame_op("group_by", input=base, keys=key_exprs, aggs=ctx.aggs)
            elif ctx.aggs:
                base = P.frame_op("select", input=base, exprs=ctx.aggs)
            else:
                raise _unsupported("HAVING without GROUP BY or an aggregate", having)
            if predicate is not None:
                base = P.frame_op("filter", input=base, predicate=predicate)

        plan = P.frame_op("select", input=base, exprs=_projection(outputs) + hidden)
        distinct = node.args.get("distinct")
        if distinct is not None:
            _check_args(distinct, ())
            if hidden:
                raise _unsupported("ORDER BY an expression that is not in the SELECT DISTINCT list", node,
                                   "with DISTINCT, sort by selected columns")
            plan = P.frame_op("unique", input=plan, subset=None)
        plan = self._finish(plan, sort_keys, node)
        if hidden:
            plan = P.frame_op("drop", input=plan, columns=[h["name"] for h in hidden])
        dtypes = ctx.dtypes
        return _Frame(plan, [_Column(o.name, o.name, _dtype_of(o.expr, dtypes)) for o in outputs])

    def _group_keys(self, group: exp.Group | None, items: list[exp.Expression],
                    row: _RowExprs) -> list[tuple[dict, str]]:
        if group is None:
            return []
        _check_args(group, ("expressions",))
        keys: list[tuple[dict, str]] = []
        seen: set[bytes] = set()
        for item in group.expressions:
            node = item
            if isinstance(item, exp.Literal) and not item.is_string:
                position = _int_literal(item, "a GROUP BY position", minimum=1)
                if position > len(items):
                    raise _schema_error(f"GROUP BY {position} refers past the {len(items)} SELECT items", item)
                node = items[position - 1]
                node = node.this if isinstance(node, exp.Alias) else node
            elif isinstance(item, exp.Column) and not item.table and item.name in row.aliases:
                try:  # a real column wins over a SELECT alias of the same name
                    _resolve(row.columns, None, item.name, item)
                except BastionError:
                    node = row.aliases[item.name]
            if _has_aggregate(node) or isinstance(node, exp.Star):
                raise _unsupported(f"GROUP BY {node.sql()}", item, "group keys cannot be aggregates")
            expr = row.expr(node)
            if P.canonical_json(expr) in seen:
                continue
            seen.add(P.canonical_json(expr))
            name = expr["name"] if expr["expr"] == "col" else f"{_HIDDEN}key{len(keys)}"
            keys.append((expr, name))
        return keys

    def _outputs(self, items: list[exp.Expression], ctx: _RowExprs, columns: list[_Column],
                 grouped: bool, node: exp.Select) -> list[_Output]:
        outputs: list[_Output] = []
        for item in items:
            star, star_table = None, None
            if isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
                star, star_table = item.this, item.table
            elif isinstance(item, exp.Star):
                star = item
            if star is not None:
                _check_args(star, ("except_", "except"))
                if grouped:
                    raise _unsupported("SELECT * in a grouped query", item, "list the group keys and aggregates")
                if star_table and not any(c.table == star_table for c in columns):
                    known = sorted({c.table for c in columns if c.table})
                    raise _schema_error(f"unknown table or alias {star_table!r} in {star_table}.*; "
                                        f"known: {', '.join(known) or 'none'}", item, table=star_table)
                chosen = [c for c in columns if c.in_star and (star_table is None or c.table == star_table)]
                for excluded in _arg(star, "except_", "except") or []:  # SELECT * EXCLUDE (a, b)
                    if not isinstance(excluded, exp.Column) or isinstance(excluded.this, exp.Star):
                        raise _refuse(excluded, "EXCLUDE takes column names")
                    gone = _resolve(chosen, excluded.table or None, excluded.name, excluded)
                    chosen = [c for c in chosen if c is not gone]
                outputs += [_Output(P.col(c.phys), c.name, c.phys, False) for c in chosen]
            elif isinstance(item, exp.Alias):
                _check_args(item, ("this", "alias"))
                outputs.append(_Output(ctx.expr(item.this), item.alias, None, True))
            else:
                expr = ctx.expr(item)
                fallback = expr["name"] if isinstance(item, exp.Column) and expr["expr"] == "col" else None
                outputs.append(_Output(expr, _derived_name(item), fallback, False))
        _name_outputs(outputs, node)
        return outputs

    def _order(self, order: exp.Order | None, ctx: _RowExprs, outputs: list[_Output],
               direct: bool = False) -> tuple[list[_SortKey], list[dict]]:
        """Sort keys over the projected frame, and the hidden columns they need.

        ``direct``: ``ctx`` reads the projected frame itself, so an expression
        can be a sort key as it is (no hidden column).
        """
        if order is None:
            return [], []
        _check_args(order, ("expressions",))
        by_name = {o.name: o for o in outputs}
        by_value = {P.canonical_json(o.expr): o for o in outputs}
        keys: list[_SortKey] = []
        hidden: list[dict] = []
        for ordered in order.expressions:
            _check_args(ordered, ("this", "desc", "nulls_first"))
            target = ordered.this
            if isinstance(target, exp.Literal) and not target.is_string:
                position = _int_literal(target, "an ORDER BY position", minimum=1)
                if position > len(outputs):
                    raise _schema_error(f"ORDER BY {position} refers past the {len(outputs)} output columns",
                                        target)
                expr = P.col(outputs[position - 1].name)
            elif isinstance(target, exp.Column) and not target.table and target.name in by_name:
                expr = P.col(target.name)
            else:
                value = ctx.expr(target)
                match = by_value.get(P.canonical_json(value))
                if match is not None:
                    expr = P.col(match.name)
                elif direct:
                    expr = value
                else:
                    name = f"{_HIDDEN}sort{len(hidden)}"
                    hidden.append(P.alias(value, name))
                    expr = P.col(name)
            keys.append(_SortKey(expr, bool(ordered.args.get("desc")), bool(ordered.args.get("nulls_first"))))
        return keys, hidden

    def _finish(self, plan: dict, sort_keys: list[_SortKey], node: exp.Expression) -> dict:
        """ORDER BY, OFFSET and LIMIT on a projected frame."""
        if sort_keys:
            plan = _sort(plan, sort_keys)
        offset = node.args.get("offset")
        skip = None
        if offset is not None:
            _check_args(offset, ("expression",))
            skip = _int_literal(offset.expression, "OFFSET")
        limit = node.args.get("limit")
        count = None
        if limit is not None:
            if not isinstance(limit, exp.Limit):
                raise _refuse(limit)
            _check_args(limit, ("expression",))
            count = _int_literal(limit.expression, "LIMIT")
        if skip is not None:
            plan = P.frame_op("slice", input=plan, offset=skip, length=count)
        elif count is not None:
            plan = P.frame_op("head", input=plan, n=count)
        return plan

    # UNION ---------------------------------------------------------------------
    def union(self, node: exp.Union, ctes: Mapping[str, _Frame]) -> _Frame:
        _check_args(node, ("with_", "with", "this", "expression", "distinct", "order", "limit", "offset"))
        ctes = self._with(node, ctes)
        left = self.query(node.this, ctes)
        right = self.query(node.expression, ctes)
        if len(left.columns) != len(right.columns):
            raise _schema_error(f"UNION needs the same number of columns on both sides, got "
                                f"{len(left.columns)} and {len(right.columns)}", node)
        # Columns line up by position, named after the first query (as in SQL).
        renamed = [P.col(r.phys) if r.phys == l.phys else P.alias(P.col(r.phys), l.phys)
                   for l, r in zip(left.columns, right.columns)]
        plan = P.frame_op("concat", inputs=[left.plan, P.frame_op("select", input=right.plan, exprs=renamed)])
        if node.args.get("distinct"):
            plan = P.frame_op("unique", input=plan, subset=None)
        columns = [_Column(c.name, c.phys, c.dtype) for c in left.columns]
        outputs = [_Output(P.col(c.phys), c.name, None, True) for c in columns]
        # ORDER BY of a union sorts its result; expressions over its columns sort directly.
        keys, _ = self._order(node.args.get("order"), _RowExprs(columns, "ORDER BY"), outputs, direct=True)
        return _Frame(self._finish(plan, keys, node), columns)

    def subquery_query(self, node: exp.Subquery, ctes: Mapping[str, _Frame]) -> _Frame:
        _check_args(node, ("this",))
        return self.query(node.this, ctes)

    # FROM ----------------------------------------------------------------------
    def _source(self, node: exp.Expression, ctes: Mapping[str, _Frame]) -> _Frame:
        handler = _SOURCES.get(type(node))
        if handler is None:
            raise _refuse(node, "FROM takes dataset names, WITH names and (SELECT ...) subqueries")
        return handler(self, node, ctes)

    def table(self, node: exp.Table, ctes: Mapping[str, _Frame]) -> _Frame:
        if not isinstance(node.this, exp.Identifier):
            function = node.this
            name = function.name if isinstance(function, exp.Anonymous) else \
                function.sql_name().lower() if isinstance(function, exp.Func) else type(function).__name__
            raise _unsupported(f"table function {name}", node,
                               "FROM takes dataset names only; files and table functions are not readable")
        name = node.this.name
        if node.args.get("db") or node.args.get("catalog"):
            raise _unsupported(f"schema-qualified table name {node.sql(dialect=_DIALECT)}", node,
                               f"write the dataset name alone, for example {name}")
        _check_args(node, ("this", "alias"))
        alias = self._alias(node)
        if name in ctes:
            frame = ctes[name]
            return _Frame(frame.plan, [replace(c, table=alias or name) for c in frame.columns])
        dataset = name if name in self.tables else \
            next((t for t in self.tables if t.lower() == name.lower()), None)
        if dataset is None:
            if any(ch in name for ch in "/\\.:*?") or name.startswith("~"):
                raise _unsupported(f"file path {name!r} in FROM", node,
                                   "FROM takes dataset names only; files are not readable")
            known = sorted(self.tables) + sorted(ctes)
            raise _schema_error(f"unknown table {name!r}; known datasets: {', '.join(known) or 'none'}",
                                node, table=name, available=known)
        plan = P.frame_op("saved", name=dataset) if dataset in self.saved else P.scan(dataset)
        qualifier = alias or name
        return _Frame(plan, [_Column(c, c, d, qualifier) for c, d in self.tables[dataset]])

    def subquery(self, node: exp.Subquery, ctes: Mapping[str, _Frame]) -> _Frame:
        _check_args(node, ("this", "alias"))
        frame = self.query(node.this, ctes)
        alias = self._alias(node)
        return _Frame(frame.plan, [replace(c, table=alias) for c in frame.columns])

    @staticmethod
    def _alias(node: exp.Expression) -> str | None:
        alias = node.args.get("alias")
        if alias is None:
            return None
        if alias.args.get("columns"):
            raise _unsupported("column names in a FROM alias", alias, "rename columns with AS in a subquery")
        _check_args(alias, ("this",))
        return alias.name or None

    # JOIN ----------------------------------------------------------------------
    def _join(self, left: _Frame, node: exp.Join, ctes: Mapping[str, _Frame]) -> _Frame:
        _check_args(node, ("this", "on", "using", "side", "kind", "method"))
        method = str(node.args.get("method") or "").upper()
        if method:
            raise _unsupported(f"{method} JOIN", node, "write the join condition with ON or USING")
        side = str(node.args.get("side") or "").upper()
        kind = str(node.args.get("kind") or "").upper()
        on, using = node.args.get("on"), node.args.get("using")
        how = self._join_how(side, kind, on, using, node)

        right = self._source(node.this, ctes)
        left_tables = {c.table for c in left.columns if c.table}
        for table in {c.table for c in right.columns if c.table}:
            if table in left_tables:
                raise _schema_error(f"the name {table!r} is used twice in FROM; give each table its own alias",
                                    node, table=table)
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

        pairs: list[tuple[dict, dict]] = []
        residual: list[exp.Expression] = []
        if using:
            pairs, left_columns, right_columns = self._using(using, left.columns, right_columns, how, node)
        else:
            left_columns = left.columns
            if on is not None:
                pairs, residual = self._on(on, left_columns, right_columns)
        if residual and how != "inner":
            raise _unsupported(f"join condition {residual[0].sql(dialect=_DIALECT)} in a {how.upper()} JOIN",
                               residual[0], "only equalities between the two sides, combined with AND, are "
                                            "supported here (other conditions only in an inner join)")
        if how == "inner" and not pairs:
            how = "cross"

        self.joins += 1
        left_keys = [f"{_HIDDEN}lk{self.joins}_{i}" for i in range(len(pairs))]
        right_keys = [f"{_HIDDEN}rk{self.joins}_{i}" for i in range(len(pairs))]
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
        columns = left_columns if how in ("semi", "anti") else left_columns + right_columns
        plan = P.frame_op("select", input=joined, exprs=[P.col(c.phys) for c in columns])
        if residual:
            predicate = _and_all([_RowExprs(columns, "JOIN ... ON").expr(r) for r in residual])
            plan = P.frame_op("filter", input=plan, predicate=predicate)
        return _Frame(plan, columns)

    @staticmethod
    def _join_how(side: str, kind: str, on: Any, using: Any, node: exp.Join) -> str:
        if kind == "CROSS":
            if on is not None or using:
                raise _unsupported("CROSS JOIN with ON or USING", node)
            return "cross"
        if kind in ("SEMI", "ANTI"):
            if side not in ("", "LEFT"):
                raise _unsupported(f"{side} {kind} JOIN", node)
            how = kind.lower()
        elif kind in ("", "INNER", "OUTER"):
            how = {"": "inner", "LEFT": "left", "RIGHT": "right", "FULL": "full"}.get(side, "")
            if not how or (kind == "OUTER" and how == "inner"):
                raise _unsupported(f"{side} {kind} JOIN".strip(), node)
        else:
            raise _unsupported(f"{side} {kind} JOIN".strip(), node)
        if on is None and not using:
            if how == "inner" and not kind:
                return "cross"  # FROM a, b
            raise _unsupported(f"{how.upper()} JOIN without ON or USING", node)
        return how

    @staticmethod
    def _on(on: exp.Expression, left: list[_Column],
            right: list[_Column]) -> tuple[list[tuple[dict, dict]], list[exp.Expression]]:
        """Split ON into key pairs (left expr, right expr) and other conditions."""
        both = left + right
        left_ids = {id(c) for c in left}

        def side(node: exp.Expression) -> str:
            refs = [node] if isinstance(node, exp.Column) else list(node.find_all(exp.Column))
            sides = {"left" if id(_resolve(both, c.table or None, c.name, c)) in left_ids else "right"
                     for c in refs}
            return sides.pop() if len(sides) == 1 else "none"  # constants and mixed sides are not keys

        pairs, residual = [], []
        for condition in _conjuncts(on):
            if isinstance(condition, exp.EQ):
                a, b = condition.this, condition.expression
                sides = (side(a), side(b))
                if sides == ("right", "left"):
                    a, b = b, a
                if sides in (("left", "right"), ("right", "left")):
                    pairs.append((_RowExprs(left, "JOIN ... ON").expr(a), _RowExprs(right, "JOIN ... ON").expr(b)))
                    continue
            residual.append(condition)
        return pairs, residual

    @staticmethod
    def _using(using: list[exp.Expression], left: list[_Column], right: list[_Column], how: str,
               node: exp.Join) -> tuple[list[tuple[dict, dict]], list[_Column], list[_Column]]:
        if how == "full":
            raise _unsupported("FULL JOIN ... USING", node, "write the condition with ON instead")
        pairs = []
        left, right = list(left), list(right)
        for ident in using:
            name = ident.name
            lc = _resolve(left, None, name, ident)
            rc = _resolve(right, None, name, ident)
            pairs.append((P.col(lc.phys), P.col(rc.phys)))
            # USING shows the key once: the left copy, or the right one for a RIGHT join.
            if how == "right":
                left[left.index(lc)] = replace(lc, in_star=False, unqualified=False)
            else:
                right[right.index(rc)] = replace(rc, in_star=False, unqualified=False)
        return pairs, left, right


def _conjuncts(node: exp.Expression) -> list[exp.Expression]:
    if isinstance(node, exp.Paren):
        return _conjuncts(node.this)
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


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


_QUERIES: dict[type, Callable[[_Translator, Any, Mapping[str, _Frame]], _Frame]] = {
    exp.Select: _Translator.select,
    exp.Union: _Translator.union,
    exp.Subquery: _Translator.subquery_query,
}

_SOURCES: dict[type, Callable[[_Translator, Any, Mapping[str, _Frame]], _Frame]] = {
    exp.Table: _Translator.table,
    exp.Subquery: _Translator.subquery,
}
