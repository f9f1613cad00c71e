"""The join's accounting, current vs proposed, modelled in plain polars (same run).

``bench_executor.py``'s join workload (a table of ``--rows`` x 7 inner-joined
with a 100 x 5 table on a key that is unique on the right, then aggregated)
as three polars queries:

- ``plain``: the scientist's query;
- ``current``: what the accountant builds today: a row-id column on each side
  (``int_range``), carried through the join, and per group the number of
  distinct ids of each side (``n_unique``);
- ``proposed``: when the right side's join key is unique, no left row is
  repeated by the join, so the left source keeps ``len`` and only the right
  side carries row ids.

Prints medians and ratios, the cost of the uniqueness check itself, and
checks that the proposed counts equal the current ones.

Run: ``python benchmarks/bench_join_accounting.py [--rows 1000000] [--repeat 7]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import polars as pl

from harness import machine, make_table


def rid(frame: pl.LazyFrame, name: str) -> pl.LazyFrame:
    return frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(name))


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    big = make_table(args.rows).drop("label").lazy()
    small_table = pl.DataFrame({
        "key": list(range(100)), "region": [f"r{i % 7}" for i in range(100)],
        "w1": [((i * 37) % 17) / 17 for i in range(100)], "w2": [i % 10 for i in range(100)],
        "w3": [((i * 11) % 13) / 13 for i in range(100)]})
    small = small_table.lazy()
    aggs = [(pl.col("a") * pl.col("w1")).mean().alias("mean_aw"), pl.col("w2").sum().alias("sum_w2"),
            pl.len().alias("n")]

    def plain():
        return big.join(small, on="key").group_by("region").agg(aggs).collect()

    def current():
        return rid(big, "r0").join(rid(small, "r1"), on="key").group_by("region").agg(
            aggs + [pl.col("r0").n_unique().cast(pl.Int64).alias("n0"),
                    pl.col("r1").n_unique().cast(pl.Int64).alias("n1")]).collect()

    def proposed():
        return big.join(rid(small, "r1"), on="key").group_by("region").agg(
            aggs + [pl.len().cast(pl.Int64).alias("n0"), pl.col("r1").n_unique().cast(pl.Int64).alias("n1")]).collect()

    def cast_after(frame: pl.LazyFrame) -> pl.DataFrame:
        # The accounting columns aggregated as polars' own types, cast to Int64 after the group_by:
        # a cast inside the aggregation takes polars off its fast group-by path.
        return frame.with_columns(pl.col("n0", "n1").cast(pl.Int64)).collect()

    def current_cast_after():
        return cast_after(rid(big, "r0").join(rid(small, "r1"), on="key").group_by("region").agg(
            aggs + [pl.col("r0").n_unique().alias("n0"), pl.col("r1").n_unique().alias("n1")]))

    def proposed_cast_after():
        return cast_after(big.join(rid(small, "r1"), on="key").group_by("region").agg(
            aggs + [pl.len().alias("n0"), pl.col("r1").n_unique().alias("n1")]))

    def unique_check():
        return not small_table.select(pl.struct("key").is_duplicated().any()).item()

    assert unique_check()
    p, c, q, ca, qa, k = (timed(fn, args.repeat) for fn in (plain, current, proposed, current_cast_after,
                                                             proposed_cast_after, unique_check))
    print(f"{args.rows:,} x 7 join 100 x 5: plain {p * 1000:.1f} ms, current accounting {c * 1000:.1f} ms "
          f"({c / p:.2f}x), proposed {q * 1000:.1f} ms ({q / p:.2f}x), uniqueness check {k * 1000:.2f} ms")
    print(f"  with the casts after the group_by: current {ca * 1000:.1f} ms ({ca / p:.2f}x), "
          f"proposed {qa * 1000:.1f} ms ({qa / p:.2f}x)")
    results = [f().sort("region") for f in (current, proposed, current_cast_after, proposed_cast_after)]
    same = all(r.equals(results[0]) for r in results)
    print(f"proposed counts equal current counts: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
