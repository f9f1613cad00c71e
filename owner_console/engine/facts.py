"""Owner-side facts about a dataset's table, computed once per file version, that let the engine skip work.

The accounting the policy asks for (``acct_*`` nodes) is exact: the engine
may compute a check more cheaply only when a fact about the very table the
query reads *proves* the cheaper form gives the same value.  Two kinds:

- :class:`TableFacts`: per column, how many nulls, zeros and non-finite
  values it holds and its range.  A column with no null and no zero has a
  non-zero count equal to its group's length; a float column without NaN or
  inf whose values and row count are small enough has finite sums and
  means; an integer sum cannot overflow when max |x| * rows < 2**63.
- :class:`KeyStats`: per group of a low-cardinality key, the accounting's
  own aggregates of a column (its rows, non-null and non-zero counts, the
  dominance bound's count, variance, max and min, how many rows hold the
  min and the max), computed with the same expressions the query would
  use (:func:`nonzero_mask`, :func:`share_parts`).  A group-by of a whole
  table by such a key then joins them instead of computing them.

Facts are the owner's: they only choose how a value is computed, never
which value, and never reach a reply (the decision is the same with and
without them, ``tests/test_engine_facts.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import polars as pl

# A key whose distinct values (combinations) exceed this gets no per-key statistics: a table of them would
# cost about as much memory as the data and save little.
MAX_KEY_GROUPS = 10_000
# Key dtypes per-key statistics are joined on: equality on these is exact (no NaN, no -0.0).
_KEY_DTYPES = (pl.String, pl.Boolean, pl.Date, pl.Datetime, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8,
               pl.UInt16, pl.UInt32, pl.UInt64)
# The largest finite double, and 2**63 (Int64's bound).
FLOAT_MAX = 1.7976931348623157e308


@dataclass(frozen=True)
class ColumnFacts:
    """What is known about every value of one column.

    Attributes
    ----------
    nulls : bool
        Some value may be null.
    zeros : bool
        Some value may be zero (False for a boolean: false is zero).
    finite : bool
        Every non-null value is a finite number (integers always; floats without NaN, inf, -inf).
    low, high : float or None
        Bounds of the non-null values (None: unknown, or not a number).
    smallest : float or None
        A lower bound of the magnitude of the finite non-zero values (None: unknown).
    """

    nulls: bool
    zeros: bool
    finite: bool
    low: float | None = None
    high: float | None = None
    smallest: float | None = None

    @property
    def magnitude(self) -> float | None:
        """The largest absolute value, when the column is finite and bounded."""
        if not self.finite or self.low is None or self.high is None:
            return None
        return max(abs(self.low), abs(self.high))


UNKNOWN = ColumnFacts(nulls=True, zeros=True, finite=False)


@dataclass(frozen=True)
class TableFacts:
    """Facts about one table: its row count and each column's :class:`ColumnFacts`."""

    rows: int
    columns: Mapping[str, ColumnFacts]


def table_facts(table: pl.DataFrame) -> TableFacts:
    """Measure :class:`TableFacts` of ``table`` in one pass (a ``select`` of simple aggregates)."""
    exprs: list[pl.Expr] = []
    kinds: dict[str, str] = {}
    for name, dtype in table.schema.items():
        x = pl.col(name)
        exprs.append(x.null_count().alias(f"{name}\0nulls"))
        if dtype == pl.Boolean:
            kinds[name] = "bool"
            exprs.append((~x).sum().alias(f"{name}\0zeros"))
        elif dtype.is_integer() or dtype.is_float():
            kinds[name] = "float" if dtype.is_float() else "int"
            exprs += [(x == 0).sum().alias(f"{name}\0zeros"), x.min().cast(pl.Float64).alias(f"{name}\0low"),
                      x.max().cast(pl.Float64).alias(f"{name}\0high")]
            if dtype.is_float():
                exprs += [(~x.is_finite()).sum().alias(f"{name}\0nonfinite"),
                          x.abs().filter((x != 0) & x.is_finite()).min().cast(pl.Float64).alias(f"{name}\0smallest")]
        else:
            kinds[name] = "other"
    row = table.lazy().select(exprs).collect(engine="streaming").row(0, named=True) if exprs else {}
    columns = {}
    for name, kind in kinds.items():
        nulls = bool(row[f"{name}\0nulls"])
        if kind == "other":
            columns[name] = ColumnFacts(nulls=nulls, zeros=True, finite=False)
            continue
        zeros = bool(row[f"{name}\0zeros"])
        if kind == "bool":
            columns[name] = ColumnFacts(nulls=nulls, zeros=zeros, finite=True, low=0.0, high=1.0, smallest=1.0)
            continue
        finite = kind == "int" or not row[f"{name}\0nonfinite"]
        low, high = row[f"{name}\0low"], row[f"{name}\0high"]
        if kind == "int" and low is not None:
            # A 64-bit integer's double can round towards zero: widen by one unit in the last place.
            low, high = math.nextafter(low, -math.inf), math.nextafter(high, math.inf)
        # A non-zero integer is at least 1 in magnitude; a float's smallest is measured (None: no such value,
        # which proves nothing either way).
        smallest = 1.0 if kind == "int" else row[f"{name}\0smallest"]
        columns[name] = ColumnFacts(nulls=nulls, zeros=zeros, finite=finite,
                                    low=low if finite else None, high=high if finite else None,
                                    smallest=smallest)
    return TableFacts(rows=table.height, columns=columns)


# ---------------------------------------------------------------- the accounting's simple aggregates
def nonzero_mask(value: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """True where ``value`` makes a real contribution: not null and not zero (a false boolean is zero).

    A null compares to null, which every use of the mask treats as false
    (``sum`` skips it, ``filter`` and ``when`` do not take it), so the
    comparison alone says it: no ``is_not_null()`` to evaluate per row.
    Values of other types contribute when not null.
    """
    if dtype == pl.Boolean:
        return value
    if dtype.is_numeric():
        return value != 0
    return value.is_not_null()


def share_parts(value: pl.Expr, dtype: pl.DataType) -> tuple[dict[str, pl.Expr], bool]:
    """The dominance bound's aggregates of ``value``: count, variance (ddof 0), max and min.

    Integers and doubles are aggregated as they are (a cast inside an
    aggregation takes polars off its fast path, even a double's to Float64):
    the variance of integers is a double.  Returns the aggregates and
    whether their max and min are still to be cast to Float64 (after the
    aggregation: the cast is monotonic, so the max of the cast values is
    the cast of the max).
    """
    cast_after = dtype.is_integer()
    if dtype != pl.Float64 and not cast_after:
        value = value.cast(pl.Float64, strict=False)
    return {"n": value.count(), "var": value.var(ddof=0), "max": value.max(), "min": value.min()}, cast_after


def key_dtype_fits(dtype: pl.DataType) -> bool:
    """True for a key type per-key statistics can be joined on exactly."""
    return any(dtype == allowed for allowed in _KEY_DTYPES)


def stat_name(column: str, stat: str) -> str:
    """The column of per-key statistic ``stat`` of ``column`` in a :func:`key_stats` table."""
    return f"__bastion_stat_{stat}:{column}"


KEY_LEN = "__bastion_stat_len"
# The statistics key_stats gives per column: for every type "count" (non-null values); for numbers and
# booleans also the rest.
STATS_ALL = ("count",)
STATS_NUMERIC = ("count", "nonzero", "var", "max", "min", "mean", "held_min", "held_max")


def stats_of(column: str, dtype: pl.DataType) -> tuple[str, ...]:
    """The statistics :func:`key_stats` computes for a column of ``dtype``."""
    return STATS_NUMERIC if dtype == pl.Boolean or dtype.is_numeric() else STATS_ALL


def key_stats(table: pl.DataFrame, keys: tuple[str, ...], columns: tuple[str, ...],
              held: tuple[str, ...] = ()) -> pl.DataFrame:
    """Per group of ``keys``, the accounting's aggregates of ``columns`` and ``held`` (see :func:`stats_of`).

    The expressions are the ones the accounting compiles for a plain column
    (:func:`nonzero_mask`, :func:`share_parts`), so a statistic equals the
    value the query would have computed for the same rows.  For each
    column of ``held``, how many rows hold the group's min and max
    (``x == x.min()``), counted against each group's min and max joined
    back by key (the same comparison; inside one aggregation it would be
    off polars' fast path).
    """
    frame = table.lazy()
    aggs = [pl.len().alias(KEY_LEN)]
    for column in columns:
        x = pl.col(column)
        dtype = table.schema[column]
        aggs.append(x.count().alias(stat_name(column, "count")))
        if stats_of(column, dtype) == STATS_ALL:
            continue
        aggs.append(nonzero_mask(x, dtype).sum().alias(stat_name(column, "nonzero")))
        # The bound's count is the column's non-null count (a number's cast to Float64 is never null).
        parts, cast_after = share_parts(x, dtype)
        for label in ("var", "max", "min"):
            part = parts[label].cast(pl.Float64) if cast_after and label != "var" else parts[label]
            aggs.append(part.alias(stat_name(column, label)))
        # The mean combines key groups' variances into a union's (join_stats.group_stats).
        aggs.append(x.cast(pl.Float64).mean().alias(stat_name(column, "mean")))
    stats = frame.group_by(list(keys)).agg(aggs).collect(engine="streaming")
    if held:
        extremes = frame.group_by(list(keys)).agg(
            [pl.col(c).min().alias(stat_name(c, "raw_min")) for c in held]
            + [pl.col(c).max().alias(stat_name(c, "raw_max")) for c in held])
        counted = frame.join(extremes, on=list(keys), how="left", nulls_equal=True).group_by(list(keys)).agg(
            [(pl.col(c) == pl.col(stat_name(c, f"raw_{extreme}"))).fill_null(False).sum()
             .alias(stat_name(c, f"held_{extreme}")) for c in held for extreme in ("min", "max")])
        stats = stats.join(counted.collect(engine="streaming"), on=list(keys), how="left", nulls_equal=True,
                           maintain_order="left")
    return stats
