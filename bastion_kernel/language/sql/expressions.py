"""SQL expressions -> plan expressions: the :data:`EXPRESSIONS` whitelist and its contexts.

:data:`EXPRESSIONS` maps each sqlglot node class read here to its handler and
the node arguments the handler reads; any other class is refused by name,
and so is any argument the handler does not read (a clause is never silently
ignored).  Aggregates are in :data:`.aggregates.AGGREGATES`.

An expression is read in a context: :class:`RowExprs` row by row over the
columns of a frame (``WHERE``, ``ON``, an ungrouped ``SELECT``), or
:class:`GroupedExprs` over the result of a ``GROUP BY``, where a group key
becomes its column and each aggregate a hidden aggregate column.  The nodes
have been through sqlglot's ``qualify`` (every column names its source) and
``annotate_types`` (every node has its SQL type).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from sqlglot import exp

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError

from .aggregates import AGGREGATES, has_aggregate
from .naming import HIDDEN
from .parse import DIALECT
from .refusals import check_args, describe, refuse, schema_error, subquery_refusal, unsupported
from .resolve import CAST_TYPES, Column, find_column, sql_key, temporal_dtype


# -------------------------------------------------------- expression contexts
class RowExprs:
    """Translates expressions evaluated row by row over a set of columns.

    ``aliases`` (set for ``ORDER BY``) maps the keys of the SELECT's output
    names to their expressions: an unqualified name sqlglot left unresolved
    may be one of them.
    """

    def __init__(self, columns: list[Column], clause: str):
        self.columns = columns
        self.clause = clause
        self.aliases: dict[str, dict] = {}

    def expr(self, node: exp.Expression) -> dict:
        return translate(self, node)

    def column(self, node: exp.Column) -> dict:
        if isinstance(node.this, exp.Star):
            raise unsupported(f"{node.table}.* inside an expression", node)
        alias = self.alias(node)
        if alias is not None:
            return alias
        return P.col(find_column(self.columns, node.table or None, node.name, node).phys)

    def alias(self, node: exp.Column) -> dict | None:
        """The output an unqualified name refers to (``ORDER BY``), or None."""
        if node.table or not self.aliases:
            return None
        return self.aliases.get(sql_key(node.name))

    def aggregate(self, node: exp.Expression) -> dict:
        raise unsupported(f"aggregate function {node.sql_name()} in {self.clause}", node,
                          "aggregates belong in SELECT, HAVING or ORDER BY of a grouped query")


class GroupedExprs(RowExprs):
    """Translates expressions over the result of a GROUP BY (or a global aggregate).

    A subtree equal to a group key becomes that key's column; each aggregate
    becomes a hidden aggregate column, registered here so that the group_by
    node can be built after every clause has been read.
    """

    def __init__(self, row: RowExprs, keys: list[tuple[dict, str]], clause: str):
        super().__init__([], clause)
        self.row = row
        self.keys = {P.canonical_json(e): name for e, name in keys}
        self.aggs: list[dict] = []
        self._agg_names: dict[bytes, str] = {}

    def expr(self, node: exp.Expression) -> dict:
        if type(node) not in AGGREGATES and not has_aggregate(node):
            alias = self.alias(node) if isinstance(node, exp.Column) else None
            if alias is not None:
                return alias
            try:
                at_row_level = self.row.expr(node)
            except BastionError:
                if isinstance(node, (exp.Column, exp.TableColumn)):
                    raise
                at_row_level = None
            if at_row_level is not None:
                key = self.keys.get(P.canonical_json(at_row_level))
                if key is not None:
                    return P.col(key)
                if isinstance(node, exp.Column):
                    raise _not_grouped(node)
        return translate(self, node)

    def column(self, node: exp.Column) -> dict:
        alias = self.alias(node)
        if alias is not None:
            return alias
        raise _not_grouped(node)

    def aggregate(self, node: exp.Expression) -> dict:
        argument = RowExprs(self.row.columns, f"the argument of {node.sql_name()}")
        return AGGREGATES[type(node)](argument, node, self.register)

    def register(self, agg: dict) -> dict:
        """A hidden aggregate column computing ``agg``; the same aggregate is computed once."""
        key = P.canonical_json(agg)
        name = self._agg_names.get(key)
        if name is None:
            name = f"{HIDDEN}agg{len(self.aggs)}"
            self._agg_names[key] = name
            self.aggs.append(P.alias(agg, name))
        return P.col(name)


def _not_grouped(node: exp.Column) -> BastionError:
    return schema_error(f"column {node.sql()!r} must appear in GROUP BY or be used in an aggregate function",
                        node, column=node.sql())


def translate(ctx: RowExprs, node: exp.Expression) -> dict:
    """The plan expression of ``node`` in ``ctx``, through the whitelists."""
    if type(node) in AGGREGATES:
        return ctx.aggregate(node)
    entry = EXPRESSIONS.get(type(node))
    if entry is None:
        raise refuse(node)
    handler, allowed = entry
    check_args(node, allowed)
    return handler(ctx, node)


def conjuncts(node: exp.Expression) -> list[exp.Expression]:
    """The conditions a predicate combines with AND (through parentheses)."""
    if isinstance(node, exp.Paren):
        return conjuncts(node.this)
    if isinstance(node, exp.And):
        return conjuncts(node.this) + conjuncts(node.expression)
    return [node]


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
            raise unsupported(f"numeric literal {text}", node) from None
        if not math.isfinite(value):
            raise unsupported(f"numeric literal {text}", node)
        return value
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Neg):
        value = _literal_value(node.this, what)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    raise unsupported(f"{describe(node)} as {what}", node, f"{what} must be a literal value")


def int_literal(node: exp.Expression | None, what: str, minimum: int = 0) -> int:
    """The value of a whole-number literal of at least ``minimum`` (``LIMIT``, ``OFFSET``, positions...)."""
    value = _literal_value(node, what) if node is not None else None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise unsupported(f"{what} {node.sql() if node is not None else ''}".strip(), node,
                          f"{what} must be a whole number of at least {minimum}")
    return value


def _str_literal(node: exp.Expression | None, what: str) -> str:
    if not isinstance(node, exp.Literal) or not node.is_string:
        raise unsupported(f"{what} {node.sql() if node is not None else ''}".strip(), node,
                          f"{what} must be a string literal")
    return node.this


# --------------------------------------------------------------- expressions
_Handler = Callable[[RowExprs, Any], dict]
EXPRESSIONS: dict[type, tuple[_Handler, frozenset[str]]] = {}


def _handles(*classes: type, args: tuple[str, ...] = ("this",)) -> Callable[[_Handler], _Handler]:
    """Register a handler in :data:`EXPRESSIONS` with the node arguments it reads."""
    def register(handler: _Handler) -> _Handler:
        for cls in classes:
            EXPRESSIONS[cls] = (handler, frozenset(args))
        return handler
    return register


@_handles(exp.Paren)
def _paren(ctx: RowExprs, node: exp.Paren) -> dict:
    return ctx.expr(node.this)


@_handles(exp.Column, args=("this", "table", "db", "catalog"))
def _column(ctx: RowExprs, node: exp.Column) -> dict:
    if node.args.get("db") or node.args.get("catalog"):
        raise unsupported(f"schema-qualified column {node.sql(dialect=DIALECT)}", node,
                          "qualify a column with its table name or alias only")
    return ctx.column(node)


@_handles(exp.TableColumn)
def _table_column(ctx: RowExprs, node: exp.TableColumn) -> dict:
    # sqlglot reads a name that is no column but a table's alias as that table's whole row; there
    # are no row values here, so it is an unknown column (the error lists the known ones).
    return ctx.column(exp.Column(this=node.this.copy()))


@_handles(exp.Literal, args=("this", "is_string"))
@_handles(exp.Boolean)
@_handles(exp.Null, args=())
def _literal(ctx: RowExprs, node: exp.Expression) -> dict:
    return P.lit(_literal_value(node, "a literal"))


_ARITHMETIC = {exp.Add: "add", exp.Sub: "sub", exp.Mul: "mul", exp.Div: "truediv", exp.IntDiv: "floordiv",
               exp.Mod: "mod", exp.Pow: "pow", exp.And: "and", exp.Or: "or", exp.DPipe: "add"}
_COMPARISONS = {exp.EQ: "eq", exp.NEQ: "ne", exp.LT: "lt", exp.LTE: "le", exp.GT: "gt", exp.GTE: "ge"}


@_handles(*_ARITHMETIC, args=("this", "expression", "typed", "safe"))
def _arithmetic(ctx: RowExprs, node: exp.Binary) -> dict:
    # DPipe (||) concatenates strings; polars' "+" does that for two strings.
    return P.binary(_ARITHMETIC[type(node)], ctx.expr(node.this), ctx.expr(node.expression))


def _operands(ctx: RowExprs, *nodes: exp.Expression) -> list[dict]:
    """Translate comparison operands, casting string literals compared with a temporal value."""
    translated: list[dict | None] = [None if _is_string_literal(n) else ctx.expr(n) for n in nodes]
    temporal = next((d for n, t in zip(nodes, translated) if t is not None and (d := temporal_dtype(n))), None)
    return [t if t is not None else
            (P.fn("cast", P.lit(n.this), dtype=temporal) if temporal else P.lit(n.this))
            for t, n in zip(translated, nodes)]


def _is_string_literal(node: exp.Expression) -> bool:
    return isinstance(node, exp.Literal) and node.is_string


@_handles(*_COMPARISONS, args=("this", "expression"))
def _comparison(ctx: RowExprs, node: exp.Binary) -> dict:
    left, right = _operands(ctx, node.this, node.expression)
    return P.binary(_COMPARISONS[type(node)], left, right)


@_handles(exp.Not)
def _not(ctx: RowExprs, node: exp.Not) -> dict:
    inner = node.this
    if isinstance(inner, exp.Is) and isinstance(inner.expression, exp.Null) and not inner.args.get("negate"):
        return P.fn("is_not_null", ctx.expr(inner.this))
    return P.unary("not", ctx.expr(inner))


@_handles(exp.Neg)
def _neg(ctx: RowExprs, node: exp.Neg) -> dict:
    if isinstance(node.this, exp.Literal) and not node.this.is_string:
        return P.lit(_literal_value(node, "a literal"))
    return P.unary("neg", ctx.expr(node.this))


@_handles(exp.Is, args=("this", "expression", "negate"))
def _is(ctx: RowExprs, node: exp.Is) -> dict:
    if not isinstance(node.expression, exp.Null):
        raise unsupported(f"IS {node.expression.sql()}", node, "only IS NULL and IS NOT NULL are supported")
    name = "is_not_null" if node.args.get("negate") else "is_null"
    return P.fn(name, ctx.expr(node.this))


@_handles(exp.In, args=("this", "expressions", "query"))
def _in(ctx: RowExprs, node: exp.In) -> dict:
    query = node.args.get("query")
    if query is not None:
        raise subquery_refusal(query, "IN (subquery)")
    subject = ctx.expr(node.this)
    temporal = temporal_dtype(node.this)
    if temporal:
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
def _between(ctx: RowExprs, node: exp.Between) -> dict:
    subject, low, high = _operands(ctx, node.this, node.args["low"], node.args["high"])
    return P.fn("is_between", subject, lower=low, upper=high, closed="both")


@_handles(exp.Like, exp.ILike, args=("this", "expression", "negate"))
def _like(ctx: RowExprs, node: exp.Like | exp.ILike, escape: str | None = None) -> dict:
    pattern = _str_literal(node.expression, f"the pattern of {node.key.upper()}")
    test = _like_test(ctx.expr(node.this), pattern, escape, isinstance(node, exp.ILike))
    return P.unary("not", test) if node.args.get("negate") else test


@_handles(exp.Escape, args=("this", "expression"))
def _escape(ctx: RowExprs, node: exp.Escape) -> dict:
    like = node.this
    if not isinstance(like, (exp.Like, exp.ILike)):
        raise refuse(node)
    check_args(like, ("this", "expression", "negate"))
    escape = _str_literal(node.expression, "the ESCAPE character")
    if len(escape) != 1:
        raise unsupported(f"ESCAPE {escape!r}", node, "the escape must be a single character")
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
def _case(ctx: RowExprs, node: exp.Case) -> dict:
    operand = node.args.get("this")
    branches = []
    for branch in node.args.get("ifs") or []:
        check_args(branch, ("this", "true"))
        if operand is not None:
            left, right = _operands(ctx, operand, branch.this)
            condition = P.binary("eq", left, right)
        else:
            condition = ctx.expr(branch.this)
        branches.append((condition, ctx.expr(branch.args["true"])))
    default = node.args.get("default")
    return P.when(branches, ctx.expr(default) if default is not None else None)


@_handles(exp.If, args=("this", "true", "false"))
def _if(ctx: RowExprs, node: exp.If) -> dict:
    otherwise = node.args.get("false")
    return P.when([(ctx.expr(node.this), ctx.expr(node.args["true"]))],
                  ctx.expr(otherwise) if otherwise is not None else None)


@_handles(exp.Cast, exp.TryCast, args=("this", "to", "safe"))
def _cast(ctx: RowExprs, node: exp.Cast) -> dict:
    to = node.args["to"]
    type_name = getattr(to.this, "name", None)
    dtype = CAST_TYPES.get(type_name) if isinstance(to, exp.DataType) else None
    if dtype is None or (to.expressions and dtype != "String"):
        raise unsupported(f"CAST to {to.sql(dialect=DIALECT)}", node,
                          f"casts go to {', '.join(sorted(set(CAST_TYPES)))}")
    return P.fn("cast", ctx.expr(node.this), dtype=dtype, strict=not isinstance(node, exp.TryCast))


@_handles(exp.Round, args=("this", "decimals"))
def _round(ctx: RowExprs, node: exp.Round) -> dict:
    decimals = node.args.get("decimals")
    places = int_literal(decimals, "ROUND's number of decimals") if decimals is not None else 0
    return P.fn("round", ctx.expr(node.this), decimals=places)


_ELEMENTWISE = {exp.Abs: "abs", exp.Sqrt: "sqrt", exp.Exp: "exp", exp.Lower: "str.to_lowercase",
                exp.Upper: "str.to_uppercase", exp.Year: "dt.year", exp.Month: "dt.month",
                exp.Day: "dt.day", exp.DayOfMonth: "dt.day", exp.Hour: "dt.hour",
                exp.DayOfWeekIso: "dt.weekday"}


@_handles(*_ELEMENTWISE)
def _elementwise(ctx: RowExprs, node: exp.Func) -> dict:
    return P.fn(_ELEMENTWISE[type(node)], ctx.expr(node.this))


@_handles(exp.Length)
def _length(ctx: RowExprs, node: exp.Length) -> dict:
    return P.fn("str.len_chars", ctx.expr(node.this))


@_handles(exp.Ln)
def _ln(ctx: RowExprs, node: exp.Ln) -> dict:
    return P.fn("log", ctx.expr(node.this), base=math.e)


@_handles(exp.Log, args=("this", "expression"))
def _log(ctx: RowExprs, node: exp.Log) -> dict:
    if node.expression is None:  # LOG(x): base 10, as in DuckDB and PostgreSQL
        return P.fn("log", ctx.expr(node.this), base=10)
    base = _literal_value(node.this, "the base of LOG")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0 or base == 1:
        raise unsupported(f"LOG base {node.this.sql()}", node, "the base must be a positive number other than 1")
    return P.fn("log", ctx.expr(node.expression), base=base)


@_handles(exp.Pow, args=("this", "expression"))
def _pow(ctx: RowExprs, node: exp.Pow) -> dict:
    return P.fn("pow", ctx.expr(node.this), exponent=ctx.expr(node.expression))


@_handles(exp.Trim, args=("this", "expression", "position"))
def _trim(ctx: RowExprs, node: exp.Trim) -> dict:
    position = str(node.args.get("position") or "BOTH").upper()
    if position != "BOTH":
        raise unsupported(f"TRIM {position} (LTRIM/RTRIM)", node, "only TRIM of both ends is supported")
    chars = node.expression
    return P.fn("str.strip_chars", ctx.expr(node.this),
                characters=_str_literal(chars, "TRIM's characters") if chars is not None else None)


@_handles(exp.Substring, args=("this", "start", "length"))
def _substring(ctx: RowExprs, node: exp.Substring) -> dict:
    start = int_literal(node.args.get("start"), "SUBSTRING's start", minimum=1)
    length = node.args.get("length")
    return P.fn("str.slice", ctx.expr(node.this), offset=start - 1,
                length=int_literal(length, "SUBSTRING's length") if length is not None else None)


@_handles(exp.Replace, args=("this", "expression", "replacement"))
def _replace(ctx: RowExprs, node: exp.Replace) -> dict:
    pattern = _str_literal(node.expression, "REPLACE's search text")
    value = _str_literal(node.args.get("replacement"), "REPLACE's replacement")
    # SQL REPLACE replaces every occurrence; the plan's str.replace only the first.
    if "str.replace_all" not in P.EXPR_FUNCTIONS:
        raise unsupported("REPLACE", node, "the plan format has no replace-all string function yet")
    return P.fn("str.replace_all", ctx.expr(node.this), pattern=pattern, value=value, literal=True)


@_handles(exp.Coalesce, args=("this", "expressions", "is_nvl", "is_null"))
def _coalesce(ctx: RowExprs, node: exp.Coalesce) -> dict:
    items = [node.this, *node.expressions]
    result = ctx.expr(items[-1])
    for item in reversed(items[:-1]):
        result = P.fn("fill_null", ctx.expr(item), value=result)
    return result


_EXTRACT_PARTS = {"YEAR": "dt.year", "MONTH": "dt.month", "DAY": "dt.day", "HOUR": "dt.hour",
                  "ISODOW": "dt.weekday"}


@_handles(exp.Extract, args=("this", "expression"))
def _extract(ctx: RowExprs, node: exp.Extract) -> dict:
    part = node.this.name.upper() if isinstance(node.this, (exp.Var, exp.Identifier, exp.Literal)) else ""
    function = _EXTRACT_PARTS.get(part)
    if function is None:
        raise unsupported(f"EXTRACT({part or node.this.sql()} FROM ...)", node,
                          f"supported parts: {', '.join(_EXTRACT_PARTS)}")
    return P.fn(function, ctx.expr(node.expression))


@_handles(exp.Subquery, args=tuple(exp.Subquery.arg_types))
def _scalar_subquery(ctx: RowExprs, node: exp.Subquery) -> dict:
    raise subquery_refusal(node, "scalar subquery")


@_handles(exp.Exists, args=tuple(exp.Exists.arg_types))
def _exists(ctx: RowExprs, node: exp.Exists) -> dict:
    raise subquery_refusal(node, "EXISTS (subquery)")


