"""Policy-checked execution on the executor vs plain polars, same data, same run.

Two workloads (issue: "Fast under load"):

1. a group-by aggregate over a 10M-row table;
2. BastionLab's published polars workload: a 10M x 7 table inner-joined with
   a 100 x 5 table, then aggregated.

Bastion's side is measured twice:

- in process: ``owner_console.executor.evaluate`` (validate -> account -> run
  -> decide, hidden-column wiping included) on a dataset already in the cache;
- as the executor runs it: ``owner_console.workers.QueryWorkers.evaluate``,
  the same call in a worker process over the memory-mapped shared copy of
  the dataset, the result coming back as Arrow IPC.

Plain polars runs the same query on the same in-memory frame, with its
default (in-memory) engine and with its streaming engine (Bastion runs
queries on the streaming engine, see ``engine.polars_engine.STREAM_EVERY_QUERY``).  Prints
the medians and the ratios (target <= 1.10).

Run: ``python benchmarks/bench_executor.py [--rows 10000000] [--repeat 7]``
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import polars as pl

from bastion_kernel.contract import plan as P
from owner_console import decide, engine, policy, validate
from owner_console.executor import evaluate
from owner_console.model import Dataset, Policy
from owner_console.workers import QueryWorkers


def make_tables(rows: int, directory: Path) -> tuple[Path, Path]:
    # Pseudo-random columns from seeded hashes: deterministic, and fast to
    # make in polars itself (no numpy needed).
    def uniform(seed: int) -> pl.Expr:
        return (pl.col("id").hash(seed) % 1_000_003).cast(pl.Float64) / 1_000_003

    big = pl.select(pl.int_range(0, rows, dtype=pl.Int64).alias("id")).with_columns(
        (pl.col("id").hash(1) % 100).cast(pl.Int64).alias("key"),
        (pl.col("id").hash(2) % 50).cast(pl.Int64).alias("group"),
        (uniform(3) * 2 - 1).alias("a"),
        (uniform(4) * 10).alias("b"),
        (pl.col("id").hash(5) % 1000).cast(pl.Int64).alias("c"),
        uniform(6).alias("d"),
    )
    small = pl.DataFrame({
        "key": list(range(100)),
        "region": [f"r{i % 7}" for i in range(100)],
        "w1": [((i * 37) % 17) / 17 for i in range(100)],
        "w2": [i % 10 for i in range(100)],
        "w3": [((i * 11) % 13) / 13 for i in range(100)],
    })
    big_path, small_path = directory / "big.parquet", directory / "small.parquet"
    big.write_parquet(big_path)
    small.write_parquet(small_path)
    return big_path, small_path


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up: caches, thread pools
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, bastion: list[float], plain: list[float], label: str = "bastion",
           baseline: str = "plain polars") -> float:
    b, p = statistics.median(bastion), statistics.median(plain)
    ratio = b / p
    print(f"{name}: {label} median {b * 1000:.1f} ms, {baseline} median {p * 1000:.1f} ms, "
          f"ratio {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    return ratio


def compare(name: str, runs: dict[str, list[float]], plain: dict[str, list[float]]) -> None:
    """Every Bastion measurement against every plain-polars baseline."""
    for label, times in runs.items():
        for baseline, plain_times in plain.items():
            report(name, times, plain_times, label, baseline)


def stages(name: str, plan: dict, catalog: dict, cache: engine.DatasetCache, repeat: int) -> None:
    # Where Bastion's time goes: the plan checks, the engine (the accounted
    # query: the scientist's columns plus the policy's counts), the decision.
    def checks():
        # As executor.evaluate does: the owner-side unique-key check picks the cheaper exact join accounting.
        return policy.account(validate.validate(plan, catalog, dataset_columns=cache.columns),
                              unique_keys=lambda name, keys: cache.unique_keys(catalog[name], keys))

    accounted = checks()
    table = engine.run(accounted.plan, catalog, cache)
    medians = {label: statistics.median(timed(fn, repeat)) * 1000 for label, fn in (
        ("validate+account", checks),
        ("engine.run (accounted query)", lambda: engine.run(accounted.plan, catalog, cache)),
        ("decide", lambda: decide.decide(accounted, table, "bench")))}
    print(f"  {name} stages: " + ", ".join(f"{label} {ms:.1f} ms" for label, ms in medians.items()))
    print(f"  {name} accounting columns: {[c for c in table.columns if c not in accounted.columns]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
          f"polars {pl.__version__}, threads {pl.thread_pool_size()}, rows {args.rows:,}")
    with tempfile.TemporaryDirectory() as tmp:
        big_path, small_path = make_tables(args.rows, Path(tmp))
        policy = Policy(min_group_size=10, unsafe="review")
        catalog = {"big": Dataset("big", big_path, "parquet", policy),
                   "small": Dataset("small", small_path, "parquet", policy)}
        cache = engine.DatasetCache()
        big = cache.frame(catalog["big"]).lazy()  # the same in-memory frames the executor uses
        small = cache.frame(catalog["small"]).lazy()
        pool = QueryWorkers(Path(tmp) / "shared", size=1)

        group_plan = P.frame_op("group_by", input=P.scan("big"), keys=[P.col("group")], aggs=[
            P.alias(P.fn("mean", P.col("a")), "mean_a"), P.alias(P.fn("sum", P.col("c")), "sum_c"),
            P.alias(P.length(), "n")])

        def plain_group(engine_name: str = "in-memory"):
            return big.group_by("group").agg(pl.col("a").mean().alias("mean_a"), pl.col("c").sum().alias("sum_c"),
                                             pl.len().alias("n")).collect(engine=engine_name)

        def measure(name: str, short: str, plan: dict, plain: Callable[[str], pl.DataFrame]) -> None:
            for outcome in (evaluate(plan, catalog, "bench", cache=cache), pool.evaluate(plan, catalog, "bench")):
                assert outcome.decision.action == "allow", outcome.decision
            compare(name,
                    {"bastion in process": timed(lambda: evaluate(plan, catalog, "bench", cache=cache), args.repeat),
                     "bastion worker process": timed(lambda: pool.evaluate(plan, catalog, "bench"), args.repeat)},
                    {f"plain polars ({engine_name} engine)": timed(lambda: plain(engine_name), args.repeat)
                     for engine_name in ("in-memory", "streaming")})
            stages(short, plan, catalog, cache, args.repeat)

        measure(f"group-by over {args.rows:,} rows", "group-by", group_plan, plain_group)

        join_plan = P.frame_op(
            "group_by",
            input=P.frame_op("join", left=P.scan("big"), right=P.scan("small"), how="inner",
                             left_on=[P.col("key")], right_on=[P.col("key")], suffix="_right"),
            keys=[P.col("region")],
            aggs=[P.alias(P.fn("mean", P.binary("mul", P.col("a"), P.col("w1"))), "mean_aw"),
                  P.alias(P.fn("sum", P.col("w2")), "sum_w2"), P.alias(P.length(), "n")])

        def plain_join(engine_name: str = "in-memory"):
            return (big.join(small, on="key", how="inner")
                    .group_by("region").agg((pl.col("a") * pl.col("w1")).mean().alias("mean_aw"),
                                            pl.col("w2").sum().alias("sum_w2"), pl.len().alias("n"))
                    .collect(engine=engine_name))

        measure(f"{args.rows:,} x 7 join 100 x 5, then aggregate", "join", join_plan, plain_join)
        pool.close()


if __name__ == "__main__":
    main()
