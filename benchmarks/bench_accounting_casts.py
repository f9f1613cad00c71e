"""Where the group-by's accounting cost goes: casts inside ``agg`` vs after the ``group_by``.

The group-by workload of ``bench_executor.py`` in plain polars, with the
accounting columns the policy adds (a count per source, and a contribution
count per aggregate), built two ways: as the engine builds them today (each
``.cast(Int64)`` inside the aggregation) and with the casts moved into a
``with_columns`` after the ``group_by``.  Prints each as a ratio to the plain
query (same run) and checks that both give the same table.

Run: ``python benchmarks/bench_accounting_casts.py [--rows 10000000] [--repeat 7]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import polars as pl

from harness import machine, make_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    frame = make_table(args.rows).drop("label").lazy()
    aggs = [pl.col("a").mean().alias("mean_a"), pl.col("c").sum().alias("sum_c"), pl.len().alias("n")]

    def contributions_mask(column: str) -> pl.Expr:
        return pl.col(column).is_not_null() & (pl.col(column) != 0)

    def contributions(column: str) -> pl.Expr:
        return contributions_mask(column).sum()

    cases = {
        "plain": lambda: frame.group_by("group").agg(aggs).collect(),
        "+ len()": lambda: frame.group_by("group").agg(aggs + [pl.len().alias("n0")]).collect(),
        "+ len().cast(Int64) inside agg (today)": lambda: frame.group_by("group").agg(
            aggs + [pl.len().cast(pl.Int64).alias("n0")]).collect(),
        "+ len(), cast after the group_by": lambda: frame.group_by("group").agg(
            aggs + [pl.len().alias("n0")]).with_columns(pl.col("n0").cast(pl.Int64)).collect(),
        "today's 3 accounting columns, casts inside agg": lambda: frame.group_by("group").agg(
            aggs + [pl.len().cast(pl.Int64).alias("n0"), contributions("a").cast(pl.Int64).alias("k1"),
                    contributions("c").cast(pl.Int64).alias("k2")]).collect(),
        "the same 3, casts after the group_by": lambda: frame.group_by("group").agg(
            aggs + [pl.len().alias("n0"), contributions("a").alias("k1"), contributions("c").alias("k2")]
        ).with_columns(pl.col("n0", "k1", "k2").cast(pl.Int64)).collect(),
        # Cheaper forms of the contribution counts? (The same counts: a null compares to null, not counted.)
        "the same 3, casts after, masks precomputed in a with_columns": lambda: frame.with_columns(
            contributions_mask("a").alias("m1"), contributions_mask("c").alias("m2")).group_by("group").agg(
            aggs + [pl.len().alias("n0"), pl.col("m1").sum().alias("k1"), pl.col("m2").sum().alias("k2")]
        ).with_columns(pl.col("n0", "k1", "k2").cast(pl.Int64)).collect(),
        "the same 3, casts after, counts as (x != 0).sum()": lambda: frame.group_by("group").agg(
            aggs + [pl.len().alias("n0"), (pl.col("a") != 0).sum().alias("k1"), (pl.col("c") != 0).sum().alias("k2")]
        ).with_columns(pl.col("n0", "k1", "k2").cast(pl.Int64)).collect(),
    }
    medians = {}
    for label, query in cases.items():
        query()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            query()
            times.append(time.perf_counter() - start)
        medians[label] = statistics.median(times)
    for label, median in medians.items():
        print(f"{label}: median {median * 1000:.1f} ms, {median / medians['plain']:.2f}x plain")
    # Counts compared exactly (floating-point means may differ in the last bits between runs).
    counts = ["group", "sum_c", "n", "n0", "k1", "k2"]
    same = cases["today's 3 accounting columns, casts inside agg"]().sort("group").select(counts).equals(
        cases["the same 3, casts after the group_by"]().sort("group").select(counts))
    print(f"same counts both ways: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
