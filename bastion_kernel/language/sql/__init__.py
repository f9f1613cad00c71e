"""``%%sql`` cells: SQL text -> the same JSON plan the DataFrame language builds.

The text is parsed by sqlglot (DuckDB dialect, used only as a parser) and the
resulting syntax tree is walked through explicit dispatch tables keyed by
sqlglot node class: :data:`.statements.QUERIES` (query shapes),
:data:`.statements.SOURCES` (what may follow ``FROM``/``JOIN``),
:data:`.expressions.EXPRESSIONS` (scalar expressions) and
:data:`.aggregates.AGGREGATES` (aggregate functions).  A node class that is
in none of them is refused by name, and so is any clause of a known node that
the handler does not read (``QUALIFY``, ``TABLESAMPLE``, ``FILTER (WHERE
...)``...): a clause is never silently ignored.  Names and types inside each
``SELECT`` are resolved by sqlglot's optimizer (``qualify``,
``annotate_types``; see :mod:`.resolve`).  Plans are built only with the
builders of :mod:`bastion_kernel.contract.plan`; nothing here executes SQL.

Modules
-------
- :mod:`.parse`: text -> one statement; the whitelist of statement types.
- :mod:`.resolve`: the sources of a ``SELECT``, sqlglot's name resolution and
  types, column lookup and its errors, SQL types <-> plan dtypes.
- :mod:`.statements`: ``SELECT``, ``WITH``, joins, ``GROUP BY``, ``ORDER
  BY``, ``LIMIT``, ``UNION`` -> frame nodes.
- :mod:`.using`: which copy of a ``USING`` key a join compares and a query shows.
- :mod:`.expressions`, :mod:`.aggregates`: SQL expressions -> plan expressions.
- :mod:`.naming`: output column names.
- :mod:`.refusals`: typed errors naming the refused construct.

Supported subset
----------------
One ``SELECT`` (optionally with ``WITH`` common table expressions, ``UNION
[ALL]`` of such selects and subqueries in ``FROM``) over datasets named in
``tables``: ``WHERE``, ``GROUP BY`` (columns, expressions, select aliases or
positions), ``HAVING``, ``ORDER BY`` (``ASC``/``DESC``, ``NULLS FIRST/LAST``,
by name, alias, position or expression), ``LIMIT``, ``OFFSET``, ``DISTINCT``,
``SELECT * EXCLUDE (...)``, ``[INNER] / LEFT / RIGHT / FULL / CROSS / SEMI /
ANTI JOIN`` with ``ON`` equalities combined with ``AND`` (extra conditions
only for inner joins) or ``USING``, and the expressions and aggregates of
:data:`.expressions.EXPRESSIONS` and :data:`.aggregates.AGGREGATES`.  As in
DuckDB, names ignore case and a ``SELECT`` alias may be used in ``WHERE``,
``GROUP BY``, ``HAVING``, ``ORDER BY`` and later ``SELECT`` items.

Output column names
-------------------
- ``expr AS name`` is called ``name``; a bare column keeps its name.
- Columns of a join keep their names; a right-hand column whose name is
  already taken gets the suffix ``_right`` (as polars' ``join`` does), and is
  still reachable by its qualified name (``r.zip``).  When two selected
  columns share a name (``SELECT p.zip, r.zip``) they take these unique names.
  A ``USING`` key appears once: the left side's column, the right side's
  after a ``RIGHT JOIN`` (``FULL JOIN ... USING`` is refused: write ``ON``).
  A qualified ``t.*`` shows ``t``'s own copy.
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
literal character is escaped.  A string literal compared with a value that
sqlglot types ``DATE`` or ``TIMESTAMP`` (a column, ``MAX(d)``, ``CAST(x AS
DATE)``...) is cast to ``Date`` or ``Datetime``.  Where polars and SQL differ
(``SUM`` over no rows is 0, ``ROUND`` rounds halves to even, ``%`` follows the
divisor's sign) the plan runs with polars' behaviour.
"""
from __future__ import annotations

from typing import Collection, Mapping

from bastion_kernel.contract.protocol import BastionError

from .parse import parse_query
from .statements import QUERIES, Translator

__all__ = ["sql_to_plan"]


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
    statement = parse_query(query, QUERIES)
    try:
        return Translator(tables, saved).query(statement, {}).plan
    except RecursionError:
        raise BastionError("LimitExceeded", "the query is nested too deeply to translate") from None
