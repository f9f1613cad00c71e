"""Policy-checked execution on the executor vs plain polars, same data, same run (issue 19 targets).

Two workloads:

1. a group-by aggregate (mean, sum, len per key) over a 10M-row table;
2. BastionLab's published polars workload: a 10M x 7 table inner-joined with
   a 100 x 5 table, then aggregated.

Bastion's side, with the default rules (minimum group size, contributions,
dominance, order statistics, finiteness), is measured:

- in process: ``owner_console.executor.evaluate`` (validate -> account -> run
  -> decide) on a dataset already in the cache, whose owner-side facts
  (``engine.facts``) were measured by the warm-up;
- the same with facts off (``DatasetCache(facts=False)``): every check computed;
- as the executor runs it: ``owner_console.workers.QueryWorkers.evaluate``,
  the same call in a worker process over the memory-mapped shared copy of
  the dataset, the result coming back as Arrow IPC.

Plain polars runs the same query on the same in-memory frame with its
in-memory engine and with its streaming engine; each ratio is against the
faster of the two (target <= 1.10).  Every side is timed in the same two
states (``harness.rounds_in_states``): back to back (the second of two runs
in a row) and after a pause (0.1 s idle), in rounds whose order rotates, so
that a change in the machine's load hits every side alike and no side
gains from the one before it; the figures are medians over the rounds after
one warm-up round.  The first query on a fresh cache (facts measured on the
way) is timed once.

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

from harness import STATES, rounds_in_states, timed


# The two workloads (every benchmark of them runs these plans): a group-by of the big table, and the big table
# joined with the small one, then aggregated by the small one's region.
GROUP_PLAN = P.frame_op("group_by", input=P.scan("big"), keys=[P.col("group")], aggs=[
    P.alias(P.fn("mean", P.col("a")), "mean_a"), P.alias(P.fn("sum", P.col("c")), "sum_c"), P.alias(P.length(), "n")])
JOIN_PLAN = P.frame_op("group_by", input=P.frame_op("join", left=P.scan("big"), right=P.scan("small"), how="inner",
                                                    left_on=[P.col("key")], right_on=[P.col("key")], suffix="_right"),
                       keys=[P.col("region")],
                       aggs=[P.alias(P.fn("mean", P.binary("mul", P.col("a"), P.col("w1"))), "mean_aw"),
                             P.alias(P.fn("sum", P.col("w2")), "sum_w2"), P.alias(P.length(), "n")])


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


def interleaved(functions: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up round, then ``repeat`` rounds, each calling every function."""
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes), as ``uptime`` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(name: str, times: dict[str, list[float]], plain: tuple[str, ...], target: float = 1.10) -> None:
    """Every median, and each Bastion side's ratio to the faster plain-polars engine."""
    medians = {label: statistics.median(values) for label, values in times.items()}
    baseline = min(plain, key=medians.__getitem__)
    print(f"{name}:")
    for label, median in medians.items():
        line = f"  {label}: median {median * 1000:.1f} ms (min {min(times[label]) * 1000:.1f})"
        if label not in plain:
            ratio = median / medians[baseline]
            line += f", ratio {ratio:.3f} to {baseline} (target <= {target:.2f}: {'met' if ratio <= target else 'NOT met'})"
        print(line)


def stages(name: str, plan: dict, catalog: dict, cache: engine.DatasetCache, repeat: int) -> None:
    # Where Bastion's time goes: the plan checks, the engine (the accounted
    # query: the scientist's columns plus the policy's counts), the decision.
    def checks():
        # As executor.evaluate does: the owner-side unique-key check picks the cheaper exact join accounting.
        return policy.account(validate.validate(plan, catalog, dataset_columns=cache.columns),
                              unique_keys=lambda name, keys: cache.unique_keys(catalog[name], keys))

    accounted = checks()
    table = engine.run(accounted.plan, catalog, cache)
    times = interleaved({"validate+account": checks,
                         "engine.run (accounted query)": lambda: engine.run(accounted.plan, catalog, cache),
                         "decide": lambda: decide.decide(accounted, table, "bench")}, repeat)
    print_stages(name, times, table.columns, accounted.columns)


def print_stages(name: str, times: dict[str, list[float]], result_columns: list[str], columns: list[str]) -> None:
    """Each stage's median, and the accounting columns the accounted query added to the scientist's."""
    medians = {label: statistics.median(values) * 1000 for label, values in times.items()}
    print(f"  {name} stages: " + ", ".join(f"{label} {ms:.1f} ms" for label, ms in medians.items()))
    print(f"  {name} accounting columns: {[c for c in result_columns if c not in columns]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}, "
          f"polars {pl.__version__}, threads {pl.thread_pool_size()}, rows {args.rows:,}; load {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        big_path, small_path = make_tables(args.rows, Path(tmp))
        policy = Policy(min_group_size=10, unsafe="review")
        catalog = {"big": Dataset("big", big_path, "parquet", policy),
                   "small": Dataset("small", small_path, "parquet", policy)}
        cache = engine.DatasetCache()
        try:
            without_facts = engine.DatasetCache(facts=False)
        except TypeError:  # an executor from before facts (PYTHONPATH=an older tree)
            without_facts = None
        big = cache.frame(catalog["big"]).lazy()  # the same in-memory frames the executor uses
        small = cache.frame(catalog["small"]).lazy()
        pool = QueryWorkers(Path(tmp) / "shared", size=1)


        def plain_group(engine_name: str = "in-memory"):
            return big.group_by("group").agg(pl.col("a").mean().alias("mean_a"), pl.col("c").sum().alias("sum_c"),
                                             pl.len().alias("n")).collect(engine=engine_name)

        def measure(name: str, short: str, plan: dict, plain: Callable[[str], pl.DataFrame]) -> None:
            fresh = engine.DatasetCache()
            fresh.frame(catalog["big"]), fresh.frame(catalog["small"])  # read, but no facts measured yet
            start = time.perf_counter()
            first = evaluate(plan, catalog, "bench", cache=fresh)
            cold = time.perf_counter() - start
            for outcome in (first, evaluate(plan, catalog, "bench", cache=cache),
                            pool.evaluate(plan, catalog, "bench")):
                assert outcome.decision.action == "allow", outcome.decision
            functions = {
                "plain polars, in-memory engine": lambda: plain("in-memory"),
                "plain polars, streaming engine": lambda: plain("streaming"),
                "bastion in process": lambda: evaluate(plan, catalog, "bench", cache=cache),
                "bastion worker process": lambda: pool.evaluate(plan, catalog, "bench"),
            }
            if without_facts is not None:
                functions["bastion in process, facts off"] = lambda: evaluate(plan, catalog, "bench",
                                                                              cache=without_facts)
            times = rounds_in_states({label: timed(fn) for label, fn in functions.items()}, args.repeat)
            for state in STATES:
                report(f"{name}, {state}", times[state],
                       ("plain polars, in-memory engine", "plain polars, streaming engine"))
            print(f"  first query on a fresh cache (facts and per-key statistics measured on the way): "
                  f"{cold * 1000:.0f} ms")
            stages(short, plan, catalog, cache, args.repeat)

        measure(f"group-by over {args.rows:,} rows", "group-by", GROUP_PLAN, plain_group)

        def plain_join(engine_name: str = "in-memory"):
            return (big.join(small, on="key", how="inner")
                    .group_by("region").agg((pl.col("a") * pl.col("w1")).mean().alias("mean_aw"),
                                            pl.col("w2").sum().alias("sum_w2"), pl.len().alias("n"))
                    .collect(engine=engine_name))

        measure(f"{args.rows:,} x 7 join 100 x 5, then aggregate", "join", JOIN_PLAN, plain_join)
        pool.close()
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
