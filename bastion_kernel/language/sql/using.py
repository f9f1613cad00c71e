"""``USING`` joins: which copy of a merged key each join compares, and which one a query shows.

sqlglot's ``qualify`` rewrites ``USING (k)`` to ``ON left.k = right.k`` and
shows the merged key as ``COALESCE`` of the copies.  Two things are settled
here, as the translator binds the sources of a SELECT and once sqlglot has
resolved it:

- the left copy a join compares is the one the key has at that join: after a
  ``RIGHT JOIN ... USING``, the right side's (sqlglot compares the first
  source's, which is null on the rows the right side added);
- the ``COALESCE`` is the copy every row has (the left one, or the right one
  after a RIGHT join): outside FULL joins (refused with USING) the copies are
  equal wherever they are not null, and as a plain column a key the owner
  hides may still pass through, as it may in any join.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

from .expressions import conjuncts
from .refusals import unsupported
from .resolve import Column, Source, find_column, sql_key


@dataclass
class _MergedKey:
    tables: list[str]  # the sources whose copies USING joins merged, in join order
    kept: str          # the source whose copy every row has


class UsingKeys:
    """The keys the USING joins of one SELECT merge, recorded join by join."""

    def __init__(self) -> None:
        self._merged: dict[str, _MergedKey] = {}
        self._compared: list[dict[str, str]] = []  # per join: key -> source of the left copy it compares

    def add_join(self, left: list[Source], right: Source, node: exp.Join, how: str) -> None:
        """Record a join's USING keys; each must be once on the left (its merged copy counts once) and on the right.

        Raises
        ------
        BastionError
            ``SchemaError`` for a USING column missing or ambiguous on a side.
        """
        merged_copies = {(table, key) for key, merge in self._merged.items() for table in merge.tables
                         if table != merge.kept}
        left_columns = [c for s in left for c in s.frame.columns if (c.table, c.key) not in merged_copies]
        compared: dict[str, str] = {}
        for ident in node.args.get("using") or []:
            kept: Column = find_column(left_columns, None, ident.name, ident)
            find_column(right.frame.columns, None, ident.name, ident)
            compared[kept.key] = kept.table
            merge = self._merged.setdefault(kept.key, _MergedKey([kept.table], kept.table))
            merge.tables.append(right.alias)
            if how == "right":  # every row of a right join has the right side's key
                merge.kept = right.alias
        self._compared.append(compared)

    def settle(self, select: exp.Select) -> None:
        """Rewrite the qualified ``select``: each USING join compares its key's current copy; merged keys are plain."""
        for join, keys in zip(select.args.get("joins") or [], self._compared):
            for condition in conjuncts(join.args["on"]) if keys else []:
                left = condition.this if isinstance(condition, exp.EQ) else None
                column = left.this if isinstance(left, exp.Coalesce) else left
                if not isinstance(column, exp.Column) or sql_key(column.name) not in keys:
                    raise unsupported("USING", join, "write the join condition with ON")
                left.replace(exp.column(column.name, table=keys[sql_key(column.name)]))
        for coalesce in list(select.find_all(exp.Coalesce)):
            copies = [coalesce.this, *coalesce.expressions]
            if not all(isinstance(c, exp.Column) and not c.args.get("db") for c in copies):
                continue
            names = {sql_key(c.name) for c in copies}
            merge = self._merged.get(names.pop()) if len(names) == 1 else None
            tables = [sql_key(c.table) for c in copies]
            if merge is None or sorted(tables) != sorted(merge.tables):
                continue
            kept = copies[tables.index(merge.kept)].copy()
            kept.type = coalesce.type
            coalesce.replace(kept)
