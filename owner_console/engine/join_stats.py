"""Per-group statistics of a group_by over a whole table joined with a small side whose join key is unique.

Each row of the small side (``R``, unique join key) meets exactly the rows of
the table (``L``) that hold its key, so a group of the aggregation is the
union, over the group's rows of ``R``, of ``L``'s key groups.  From ``L``'s
per-key statistics (:meth:`DatasetCache.key_stats`, measured once per file
version) and ``R``'s few rows, the accounting's aggregates of a group follow
without a pass over the joined rows:

- counts add up (rows, non-null and non-zero values); the rows of ``R``
  with at least one such value count the small side's contributors;
- the max and min are the extremes of the parts' extremes;
- the variance combines from each part's count, mean and variance.

A term is what an aggregate reads: a column of ``L``, a column of ``R``
(constant over each part), or the product of the two (``L``'s statistics
scaled by ``R``'s value).  Counts and extremes are exact; the combined
variance differs from the one computed over the rows by rounding only, and
is lowered by :data:`VARIANCE_MARGIN` so the dominance bound it feeds can
only clear fewer groups (a group it does not clear is measured exactly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import polars as pl

from .facts import KEY_LEN, nonzero_mask, stat_name

# The small side is read while compiling: at most this many rows.
MAX_SMALL_ROWS = 10_000
# A combined variance is taken this much smaller (relatively) than computed: far above its rounding error.
VARIANCE_MARGIN = 1e-9
# The statistic that counts a group's rows of the small side.
SMALL_ROWS = "rows"


@dataclass(frozen=True)
class Term:
    """One aggregated input the statistics cover.

    Attributes
    ----------
    name : str
        Its statistics' base name (``stat_name(name, stat)``).
    left : str or None
        The table column it reads (its per-key statistics).
    right : str or None
        The small side's column it reads.  With ``left`` too: their product.
    kind : str
        ``"number"`` or ``"boolean"`` (counted non-zero, with variance and
        extremes), or ``"other"`` (counted non-null only).
    """

    name: str
    left: str | None
    right: str | None
    kind: str

    @property
    def numeric(self) -> bool:
        return self.kind != "other"


def small_side_columns(left_names: Iterable[str], right_names: Iterable[str], left_keys: Sequence[str],
                       right_keys: Sequence[str], suffix: str, group_columns: Sequence[str | None],
                       exact: Callable[[str], bool]) -> tuple[dict[str, str], list[str]] | None:
    """Which columns of an inner join hold the small side's values, and the small side's column of each group key.

    The joined frame has the left side's columns as they are and the right
    side's but its keys (merged into the left ones), suffixed where the left
    has the name.  A group column must be a join key or one of the small
    side's columns, of a type ``exact`` accepts (the statistics are joined to
    the aggregation by equality); else None.

    Returns
    -------
    (dict, list) or None
        ``{joined column: small side's column}``, and per group column the small side's column holding it.
    """
    left_names = set(left_names)
    small_of: dict[str, str] = {}
    for column in right_names:
        output = column + suffix if column in left_names else column
        if column not in right_keys and output not in left_names:
            small_of[output] = column
    sources = []
    for column in group_columns:
        if column in left_keys:
            source = right_keys[left_keys.index(column)]
        elif column in small_of:
            source = small_of[column]
        else:
            return None  # a column of the table's other columns: its groups split the key groups
        if not exact(source):
            return None
        sources.append(source)
    return small_of, sources


def group_stats(small: pl.DataFrame, small_keys: Sequence[str], key_stats: pl.DataFrame,
                table_keys: Sequence[str], groups: Sequence[tuple[str, str]],
                terms: Sequence[Term]) -> pl.DataFrame:
    """The accounting's aggregates of each term per group, keyed by the groups' output names.

    Parameters
    ----------
    small : polars.DataFrame
        The small side's rows, as the join reads them.
    small_keys, table_keys : sequence of str
        The join keys on each side (same order, same dtypes).
    key_stats : polars.DataFrame
        The table's per-key statistics by ``table_keys``.
    groups : sequence of (str, str)
        Per group key: the small side's column holding it, and its output name.
    terms : sequence of Term

    Returns
    -------
    polars.DataFrame
        One row per group: the keys, ``KEY_LEN`` (the group's rows), the small
        side's rows (``stat_name("", SMALL_ROWS)``), and per term ``count``,
        ``count_rows`` and, for numbers, ``nonzero``, ``nonzero_rows``,
        ``var``, ``max`` and ``min``.
    """
    # A null key meets nothing in an inner join: nor does it here.
    rows = small.join(key_stats, left_on=list(small_keys), right_on=list(table_keys), how="inner")
    by = [column for column, _ in groups]
    parts: list[pl.Expr] = []
    for term in terms:
        parts += [expr.alias(f"{term.name}\0{label}") for label, expr in _part_of(term).items()]
    rows = rows.with_columns(parts)
    centres = []
    for term in terms:
        if term.numeric:
            n, mean = pl.col(f"{term.name}\0n"), pl.col(f"{term.name}\0mean")
            weighted = pl.when(n > 0).then(n * mean)
            centres.append((weighted.sum().over(by) / n.sum().over(by)).alias(f"{term.name}\0centre"))
    if centres:
        rows = rows.with_columns(centres)
    aggs = [pl.col(KEY_LEN).cast(pl.Int64).sum().alias(KEY_LEN),
            pl.len().cast(pl.Int64).alias(stat_name("", SMALL_ROWS))]
    for term in terms:
        aggs += _combined(term)
    combined = rows.group_by(by).agg(aggs)
    return combined.select([pl.col(column).alias(output) for column, output in groups]
                           + [c for c in combined.columns if c not in by])


def _part_of(term: Term) -> dict[str, pl.Expr]:
    """Per row of the small side: the term's count, non-zero count, mean, variance, max and min over its part."""
    def left(stat: str) -> pl.Expr:
        return pl.col(stat_name(term.left, stat))

    length = pl.col(KEY_LEN).cast(pl.Int64)
    zero = pl.lit(0, dtype=pl.Int64)
    if term.right is None:
        part = {"n": left("count").cast(pl.Int64)}
        if term.numeric:
            part.update(nz=left("nonzero").cast(pl.Int64), mean=left("mean"), var=left("var"), max=left("max"),
                        min=left("min"))
        return part
    value = pl.col(term.right)
    if term.left is None:
        part = {"n": pl.when(value.is_not_null()).then(length).otherwise(zero)}
        if term.numeric:
            number = value.cast(pl.Float64)
            mask = nonzero_mask(value, pl.Boolean if term.kind == "boolean" else pl.Float64)
            part.update(nz=pl.when(mask.fill_null(False)).then(length).otherwise(zero), mean=number,
                        # n equal values vary by nothing; a NaN or an infinite one by NaN, as over the rows.
                        var=pl.when(number.is_finite()).then(0.0).otherwise(float("nan")),
                        max=number, min=number)
        return part
    # The product of the table's value by the small side's: the table's statistics scaled.
    scale = value
    up = scale >= 0
    return {"n": pl.when(scale.is_not_null()).then(left("count").cast(pl.Int64)).otherwise(zero),
            "nz": pl.when((scale != 0).fill_null(False)).then(left("nonzero").cast(pl.Int64)).otherwise(zero),
            "mean": scale * left("mean"), "var": scale * scale * left("var"),
            "max": pl.when(up).then(scale * left("max")).otherwise(scale * left("min")),
            "min": pl.when(up).then(scale * left("min")).otherwise(scale * left("max"))}


def _combined(term: Term) -> list[pl.Expr]:
    """A term's statistics over a group, from its parts (the small side's rows of the group)."""
    def part(label: str) -> pl.Expr:
        return pl.col(f"{term.name}\0{label}")

    n = part("n")
    out = [n.sum().alias(stat_name(term.name, "count")), (n > 0).sum().cast(pl.Int64)
           .alias(stat_name(term.name, "count_rows"))]
    if not term.numeric:
        return out
    nz, fed = part("nz"), n > 0
    count = n.sum()
    spread = pl.when(fed).then(n * (part("var") + (part("mean") - part("centre")) ** 2)).sum()
    out += [nz.sum().alias(stat_name(term.name, "nonzero")),
            (nz > 0).sum().cast(pl.Int64).alias(stat_name(term.name, "nonzero_rows")),
            pl.when(count > 0).then(spread / count * (1 - VARIANCE_MARGIN)).alias(stat_name(term.name, "var")),
            pl.when(fed).then(part("max")).max().alias(stat_name(term.name, "max")),
            pl.when(fed).then(part("min")).min().alias(stat_name(term.name, "min"))]
    return out
