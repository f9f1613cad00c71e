"""Per-group statistics over a join, from the table's per-key statistics and the small side's rows.

``join_stats.group_stats`` must give, per group, what the accounting would
compute over the joined rows: counts and extremes exactly, the variance to
rounding (and never above it, so the dominance bound it feeds clears no
group the rows would not).  Checked against the same aggregates computed
over the joined rows by polars, for columns of the table, columns of the
small side, and their products, with nulls, zeros, -0.0, NaN, infinities,
negative scales and a null group key.
"""
from __future__ import annotations

import polars as pl
import pytest

from owner_console.engine.facts import KEY_LEN, key_stats, nonzero_mask, stat_name
from owner_console.engine.join_stats import SMALL_ROWS, VARIANCE_MARGIN, Term, group_stats

ROWS = 5_000


@pytest.fixture(scope="module")
def table() -> pl.DataFrame:
    def uniform(seed: int) -> pl.Expr:
        return (pl.col("id").hash(seed) % 1_000_003).cast(pl.Float64) / 1_000_003

    return pl.select(pl.int_range(0, ROWS, dtype=pl.Int64).alias("id")).with_columns(
        pl.when(pl.col("id") % 53 == 0).then(None).otherwise(pl.col("id").hash(1) % 6).cast(pl.Int64).alias("k"),
        (uniform(2) * 4 - 2).alias("a"),
        pl.when(pl.col("id") % 3 == 0).then(0.0).when(pl.col("id") % 7 == 0).then(None)
        .otherwise(uniform(3) + 0.25).alias("z"),
        pl.when(pl.col("id") == 5).then(float("nan")).when(pl.col("id") == 8).then(float("inf"))
        .otherwise(uniform(4)).alias("nan"),
        (pl.col("id").hash(5) % 9).cast(pl.Int64).alias("i"),
        pl.when(pl.col("id") % 11 == 0).then(None).otherwise(pl.col("id") % 2 == 0).alias("b"),
        pl.format("s{}", pl.col("id") % 4).alias("s"),
    ).drop("id")


SMALL = pl.DataFrame({
    "k": [0, 1, 2, 3, 4, 5, 9],
    "w": [1.5, -2.0, 0.0, -0.0, None, 3.0, 7.0],
    "odd": [float("nan"), 1.0, float("inf"), None, 2.0, -1.0, 0.5],
    "flag": [True, False, None, True, True, False, True],
    "region": ["n", "n", "s", None, "s", "e", "e"],
})


def _terms() -> list[tuple[Term, pl.Expr]]:
    """Each term, and the expression it stands for over the joined rows."""
    return [
        (Term("left:a", "a", None, "number"), pl.col("a")),
        (Term("left:z", "z", None, "number"), pl.col("z")),
        (Term("left:nan", "nan", None, "number"), pl.col("nan")),
        (Term("left:i", "i", None, "number"), pl.col("i")),
        (Term("left:b", "b", None, "boolean"), pl.col("b")),
        (Term("left:s", "s", None, "other"), pl.col("s")),
        (Term("right:w", None, "w", "number"), pl.col("w")),
        (Term("right:odd", None, "odd", "number"), pl.col("odd")),
        (Term("right:flag", None, "flag", "boolean"), pl.col("flag")),
        (Term("right:region", None, "region", "other"), pl.col("region")),
        (Term("product:a*w", "a", "w", "number"), pl.col("a") * pl.col("w")),
        (Term("product:z*w", "z", "w", "number"), pl.col("z") * pl.col("w")),
    ]


def _over_rows(joined: pl.DataFrame, by: list[str], terms) -> pl.DataFrame:
    aggs = [pl.len().cast(pl.Int64).alias(KEY_LEN),
            pl.col("k").n_unique().cast(pl.Int64).alias(stat_name("", SMALL_ROWS))]
    for term, expr in terms:
        aggs.append(expr.count().cast(pl.Int64).alias(stat_name(term.name, "count")))
        aggs.append(pl.col("k").filter(expr.is_not_null()).n_unique().cast(pl.Int64)
                    .alias(stat_name(term.name, "count_rows")))
        if term.kind == "other":
            continue
        dtype = pl.Boolean if term.kind == "boolean" else pl.Float64
        mask = nonzero_mask(expr, dtype).fill_null(False)
        number = expr.cast(pl.Float64)
        aggs += [mask.sum().cast(pl.Int64).alias(stat_name(term.name, "nonzero")),
                 pl.col("k").filter(mask).n_unique().cast(pl.Int64).alias(stat_name(term.name, "nonzero_rows")),
                 number.var(ddof=0).alias(stat_name(term.name, "var")),
                 number.max().alias(stat_name(term.name, "max")), number.min().alias(stat_name(term.name, "min"))]
    return joined.group_by(by).agg(aggs)


@pytest.mark.parametrize("by", [["region"], ["k"], ["region", "flag"]])
def test_group_statistics_equal_the_joined_rows(table, by):
    terms = _terms()
    left_columns = tuple(dict.fromkeys(t.left for t, _ in terms if t.left))
    stats = key_stats(table, ("k",), left_columns)
    got = group_stats(SMALL, ["k"], stats, ["k"], [(c, c) for c in by], [t for t, _ in terms])
    joined = table.join(SMALL, on="k", how="inner")
    expected = _over_rows(joined, by, terms)
    got, expected = got.sort(by, nulls_last=True), expected.sort(by, nulls_last=True)
    assert got.select(by).equals(expected.select(by))
    for column in expected.columns:
        if column in by:
            continue
        for mine, theirs in zip(got[column].to_list(), expected[column].to_list()):
            if not column.startswith("__bastion_stat_var:") or theirs is None or theirs != theirs or \
                    abs(theirs) == float("inf"):
                assert _same(mine, theirs), (column, mine, theirs)  # exact, or null / NaN as over the rows
            else:
                assert mine <= theirs * (1 - VARIANCE_MARGIN / 2) or mine == theirs == 0, column  # never above
                assert mine == pytest.approx(theirs, rel=1e-8), column


def _same(a, b) -> bool:
    return a == b or (a is None and b is None) or (a != a and b != b)


def test_the_extremes_of_a_product_by_a_negative_scale_are_the_scaled_opposite_extremes(table):
    # k = 1 has w = -2: the product's max is -2 times the table's min over that key.
    term = Term("product:a*w", "a", "w", "number")
    stats = key_stats(table, ("k",), ("a",))
    got = group_stats(SMALL.filter(pl.col("k") == 1), ["k"], stats, ["k"], [("k", "k")], [term])
    part = table.filter(pl.col("k") == 1)["a"]
    assert got[stat_name(term.name, "max")].item() == -2.0 * part.min()
    assert got[stat_name(term.name, "min")].item() == -2.0 * part.max()
