"""SQL text -> one sqlglot statement, and the whitelist of statement types.

sqlglot reads the text in the DuckDB dialect, used only as a parser: nothing
here executes SQL.  A statement whose class is not one of the query classes
the caller translates (``SELECT``, ``UNION``, a parenthesised query) is
refused by name (``INSERT statement``, ``COPY command``...).
"""
from __future__ import annotations

from typing import Collection, NoReturn

import sqlglot
from sqlglot import exp

from bastion_kernel.contract.protocol import BastionError

from .refusals import unsupported

DIALECT = "duckdb"


def parse_query(query: str, statements: Collection[type]) -> exp.Expression:
    """The one query of a ``%%sql`` cell, as a sqlglot tree.

    Parameters
    ----------
    query : str
        The cell's SQL text.
    statements : Collection[type]
        The sqlglot classes a statement may have (the translator's query types).

    Returns
    -------
    sqlglot.exp.Expression
        The single statement, of one of the ``statements`` classes.

    Raises
    ------
    BastionError
        ``ParseError`` for text that is not SQL or holds no statement,
        ``UnsupportedOperation`` for several statements or a statement of
        another class, ``LimitExceeded`` for text nested too deeply to parse.
    """
    if not isinstance(query, str):
        raise BastionError("ParseError", f"a SQL query must be text, got {type(query).__name__}")
    parsed = _parse(query)
    if not parsed:
        raise BastionError("ParseError", "the SQL cell is empty: write one SELECT query")
    if len(parsed) > 1:
        raise BastionError("UnsupportedOperation",
                           f"SQL construct 'multiple statements' is not supported: a %%sql cell runs one "
                           f"SELECT query, got {len(parsed)} statements", construct="multiple statements")
    statement = parsed[0]
    if type(statement) not in statements:
        _refuse_statement(statement)
    return statement


def _parse(query: str) -> list[exp.Expression]:
    try:
        parsed = sqlglot.parse(query, read=DIALECT)
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


def _refuse_statement(node: exp.Expression) -> NoReturn:
    if isinstance(node, exp.Command):
        what = f"{str(node.this).upper()} command"
    else:
        what = f"{node.key.upper()} statement"
        kind = node.args.get("kind")
        if isinstance(kind, str) and kind:
            what = f"{node.key.upper()} {kind.upper()} statement"
    raise unsupported(what, node, "a %%sql cell runs one read-only SELECT query over the datasets by name")
