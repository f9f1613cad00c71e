"""Names and types inside one SELECT: its sources, sqlglot's ``qualify`` and ``annotate_types``.

The translator owns the scopes between queries: it turns each ``FROM`` or
``JOIN`` source (a dataset, a ``WITH`` name, a subquery) into a
:class:`Source`, a frame whose columns it knows.  Inside one ``SELECT``,
sqlglot's optimizer does the name resolution: :func:`qualify_select` hands
it the ``SELECT`` with each source replaced by a table of that source's
schema, and ``qualify`` then ties every column to its source, expands ``*``
(with ``EXCLUDE``, ``t.*`` and ``USING`` keys shown once), rewrites
``USING`` to ``ON``, resolves ``SELECT`` aliases and positions in ``WHERE``,
``GROUP BY``, ``HAVING`` and ``ORDER BY``; ``annotate_types`` gives every
node its SQL type (which says, for example, that a string literal compared
with a value is compared with a date).  Identifiers are case-insensitive, as
in DuckDB: every name is compared by its :func:`sql_key`.

A column that sqlglot could not tie to a source (unknown, or in several) is
explained by :func:`find_column`, which lists the known names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.annotate_types import annotate_types
from sqlglot.optimizer.qualify import qualify
from sqlglot.schema import MappingSchema

from bastion_kernel.contract.protocol import BastionError

from .naming import HIDDEN
from .parse import DIALECT
from .refusals import arg, schema_error, subquery_refusal, unsupported

# SQL type names (sqlglot's) -> plan.DTYPES; the first name of a dtype is the
# type its columns have for sqlglot.
CAST_TYPES = {
    "TINYINT": "Int8", "SMALLINT": "Int16", "INT": "Int32", "BIGINT": "Int64",
    "UTINYINT": "UInt8", "USMALLINT": "UInt16", "UINT": "UInt32", "UBIGINT": "UInt64",
    "FLOAT": "Float32", "DOUBLE": "Float64", "TEXT": "String", "VARCHAR": "String", "CHAR": "String",
    "BOOLEAN": "Boolean", "DATE": "Date", "TIMESTAMP": "Datetime", "TIMESTAMPNTZ": "Datetime",
    "DATETIME": "Datetime",
}
_SQL_TYPES: dict[str, str] = {}
for _sql_name, _dtype in CAST_TYPES.items():
    _SQL_TYPES.setdefault(_dtype, _sql_name)

_T = exp.DataType.Type
_DATE_TYPES = (_T.DATE, _T.DATE32)
_DATETIME_TYPES = (_T.DATETIME, _T.TIMESTAMP, _T.TIMESTAMPNTZ, _T.TIMESTAMPTZ, _T.TIMESTAMPLTZ,
                   _T.TIMESTAMP_S, _T.TIMESTAMP_MS, _T.TIMESTAMP_NS)
_DIALECT = Dialect.get_or_raise(DIALECT)


def sql_type(dtype: Any) -> exp.DataType:
    """The SQL type of a column of polars dtype ``dtype`` (``"Int64"``, ``"Datetime(time_unit='us', ...)"``)."""
    name = dtype.split("(")[0].strip() if isinstance(dtype, str) else ""
    return exp.DataType.build(_SQL_TYPES.get(name, "UNKNOWN"))


def temporal_dtype(node: exp.Expression) -> str | None:
    """``"Date"`` or ``"Datetime"`` when sqlglot typed ``node`` so, else None (also when not annotated)."""
    dtype = node.type
    if dtype is None:
        return None
    if dtype.is_type(*_DATE_TYPES):
        return "Date"
    if dtype.is_type(*_DATETIME_TYPES):
        return "Datetime"
    return None


def sql_key(name: str) -> str:
    """How SQL compares the identifier ``name``: normalized as the dialect does (DuckDB: lower case)."""
    return _DIALECT.normalize_identifier(exp.to_identifier(name)).name


# --------------------------------------------------------------- frame model
@dataclass(frozen=True)
class Column:
    """A column visible to a query: how SQL names it and where it is in the frame."""

    key: str                  # the name SQL compares (sql_key of label)
    phys: str                 # the name in the plan's frame
    label: str                # the name shown in messages and given to outputs
    sqltype: exp.DataType     # its SQL type, for sqlglot
    table: str | None = None  # the key of the source (table alias) it comes from


@dataclass
class Frame:
    """A plan and the columns it produces."""

    plan: dict
    columns: list[Column]


@dataclass
class Source:
    """A ``FROM`` or ``JOIN`` source of one SELECT: its frame and the alias SQL reaches it by."""

    name: str     # the table name sqlglot sees for it (internal, unique in the query)
    alias: str    # the key of its alias (the table name when it has no alias)
    frame: Frame  # its columns carry ``table=alias``


def find_column(columns: list[Column], table: str | None, name: str, node: exp.Expression | None) -> Column:
    """The column ``table.name`` (or unqualified ``name``) among ``columns``.

    Raises
    ------
    BastionError
        ``SchemaError`` when there is not exactly one: the message lists the
        known tables or columns, or the candidates of an ambiguous name.
    """
    key = sql_key(name)
    if table is not None:
        pool = [c for c in columns if c.table == sql_key(table)]
        if not pool:
            known = sorted({c.table for c in columns if c.table and not c.table.startswith(HIDDEN)})
            raise schema_error(f"unknown table or alias {table!r} in {table}.{name}; "
                               f"known: {', '.join(known) or 'none'}", node, table=table)
    else:
        pool = columns
    matches = [c for c in pool if c.key == key]
    if len(matches) == 1:
        return matches[0]
    shown = f"{table}.{name}" if table else name
    if len(matches) > 1:
        candidates = ", ".join(_qualified(c) for c in matches)
        raise schema_error(f"column {shown!r} is ambiguous: it could be {candidates}; "
                           "qualify it with a table alias", node, column=shown)
    known = [_qualified(c) if table is None and sum(1 for o in columns if o.key == c.key) > 1 else c.label
             for c in pool]
    raise schema_error(f"unknown column {shown!r}; known columns: {', '.join(known)}", node,
                       column=shown, available=known)


def _qualified(column: Column) -> str:
    if column.table and not column.table.startswith(HIDDEN):
        return f"{column.table}.{column.label}"
    return column.label


def check_distinct_keys(frame: Frame, what: str, node: exp.Expression) -> None:
    """Refuse a source with two columns SQL cannot tell apart (``Age`` and ``age``)."""
    seen: dict[str, Column] = {}
    for column in frame.columns:
        other = seen.setdefault(column.key, column)
        if other is not column:
            raise schema_error(f"{what} has columns {other.label!r} and {column.label!r}, which SQL cannot tell "
                               "apart (SQL names ignore case); read it with the DataFrame language", node,
                               column=column.label)


# ------------------------------------------------------------ qualification
def qualify_select(select: exp.Select, sources: Sequence[Source], at: exp.Expression) -> None:
    """Resolve the names and types of one SELECT in place, with sqlglot's optimizer.

    Parameters
    ----------
    select : sqlglot.exp.Select
        A copy of the query's SELECT (``qualify`` rewrites it); its ``WITH``
        clause is dropped (the sources already hold what it defined).
    sources : Sequence[Source]
        The frames of its ``FROM`` source and of each ``JOIN``, in order.
    at : sqlglot.exp.Expression
        Where errors point.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` for a subquery inside an expression,
        ``SchemaError`` when sqlglot refuses a name (a position past the last
        SELECT item...), ``LimitExceeded`` for a query nested too deeply.
    """
    for key in ("with_", "with"):
        if select.args.get(key) is not None:
            select.set(key, None)
    slots = [arg(select, "from_", "from"), *(select.args.get("joins") or [])]
    for slot, source in zip(slots, sources):
        slot.set("this", exp.Table(this=exp.to_identifier(source.name),
                                   alias=exp.TableAlias(this=exp.to_identifier(source.alias))))
    _refuse_nested_queries(select)
    schema = MappingSchema({s.name: {c.key: c.sqltype for c in s.frame.columns} for s in sources},
                           dialect=DIALECT, normalize=False)
    try:
        qualify(select, dialect=DIALECT, schema=schema, validate_qualify_columns=False, quote_identifiers=False)
        annotate_types(select, schema=schema, dialect=DIALECT)
    except RecursionError:
        raise BastionError("LimitExceeded", "the query is nested too deeply to translate") from None
    except SqlglotError as exc:
        _explain_unknown_columns(at, sources)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise schema_error(f"the names of this SELECT cannot be resolved: {reason}", at) from None
    except Exception as exc:  # noqa: BLE001 - sqlglot reads untrusted SQL; any other failure is a refusal
        raise unsupported(f"a query sqlglot cannot resolve ({type(exc).__name__})", at) from None


def _explain_unknown_columns(select: exp.Select, sources: Sequence[Source]) -> None:
    """Say which qualified column of ``select`` (as written) is unknown, listing the known ones."""
    columns = [c for s in sources for c in s.frame.columns]
    for node in select.walk(prune=lambda n: n is not select and isinstance(n, exp.Query)):
        if isinstance(node, exp.Column) and node.table and not isinstance(node.this, exp.Star):
            find_column(columns, node.table, node.name, node)


def _refuse_nested_queries(select: exp.Select) -> None:
    """Subqueries are read only in FROM and WITH, which the translator has replaced by their frames."""
    for node in select.walk():
        if node is select:
            continue
        if isinstance(node, exp.Exists):
            raise subquery_refusal(node, "EXISTS (subquery)")
        if isinstance(node, exp.Query):
            parent = node.parent
            inside_in = isinstance(parent, exp.In) and parent.args.get("query") is node
            raise subquery_refusal(node, "IN (subquery)" if inside_in else "scalar subquery")
