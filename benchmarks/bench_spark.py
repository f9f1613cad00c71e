"""Policy-checked execution on Spark vs plain PySpark, same session, same Parquet files (issue 18 target).

Two workloads, as in ``bench_executor.py`` (its ``make_tables``):

1. a group-by aggregate (mean, sum, len per group) over a 10M-row table;
2. a 10M x 7 table inner-joined with a 100 x 5 table, then aggregated.

Bastion's side is ``owner_console.executor.evaluate`` on datasets registered
with ``engine="spark"`` over the Parquet files, with the default policy
(minimum group size 10, dominance on): validate -> account -> compile to
DataFrame calls -> one Spark job with the policy's counts -> decide.  Plain
PySpark is the DataFrame-API equivalent of each query on the very same
SparkSession (``owner_console.engine.spark.session.session()``, the object the
engine runs on), reading the same files, its result fetched with
``.toArrow()`` as the engine's is.  Every function runs once per round,
rounds interleaved, medians over the rounds after one warm-up round
(target: ratio <= 1.25).  Bastion's time is then split into its stages: the
plan checks, compiling the plan to a DataFrame (Spark analyses it), the Spark
job (``toArrow`` of the compiled frame) and the decision.

Also issue 19's small-aggregate cell: a mean and a count over a table of
``--small-rows`` rows (5,000), Bastion against plain PySpark, median and p99
over ``--small-repeat`` interleaved rounds.

Run: ``python benchmarks/bench_spark.py [--rows 10000000] [--repeat 7] [--small-repeat 100]``
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench_executor import GROUP_PLAN, JOIN_PLAN, interleaved, load, make_tables, print_stages

from bastion_kernel.contract import plan as P
from owner_console import decide, policy, validate
from owner_console.engine.spark import session as spark_session
from owner_console.engine.spark.compile import to_polars
from owner_console.engine.spark import engine as spark_engine
from owner_console.engine.spark.engine import SparkEngine
from owner_console.executor import evaluate
from owner_console.model import Dataset, Policy

TARGET = 1.25


def report(name: str, times: dict[str, list[float]], baseline: str) -> None:
    """Every median, and each Bastion side's ratio to plain PySpark."""
    medians = {label: statistics.median(values) for label, values in times.items()}
    print(f"{name}:")
    for label, median in medians.items():
        line = f"  {label}: median {median * 1000:.1f} ms (min {min(times[label]) * 1000:.1f})"
        if label != baseline:
            ratio = median / medians[baseline]
            line += f", ratio {ratio:.3f} (target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'NOT met'})"
        print(line)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def planned(frame) -> None:
    """Spark's optimizer and physical planning of a classic frame, without running it."""
    frame._jdf.queryExecution().executedPlan()


def aggregate_functions(frame) -> list[str]:
    """The aggregate functions of a classic frame's physical plan (its final HashAggregates, deduplicated by
    Spark), each as Spark prints it."""
    text = frame._jdf.queryExecution().executedPlan().toString()
    found = []
    for line in text.splitlines():
        if "HashAggregate(" not in line or "functions=[" not in line:
            continue
        listed = line.split("functions=[", 1)[1]
        depth, start, items = 0, 0, []
        for i, ch in enumerate(listed):
            if ch in "([":
                depth += 1
            elif ch in ")]":
                if depth == 0:
                    items.append(listed[start:i].strip())
                    break
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(listed[start:i].strip())
                start = i + 1
        items = [item for item in items if item]
        if items and not any(item.startswith("partial_") for item in items):
            found += items
    return found


def accounting_cost(name: str, plan: dict, catalog: dict, runner: SparkEngine) -> None:
    """CPU-independent evidence: the Spark job's aggregate functions with the per-key statistics and without
    (the accounting computed in the job)."""
    accounted = policy.account(validate.validate(plan, catalog, dataset_columns=runner.columns),
                               unique_keys=lambda source, keys: runner.unique_keys(catalog[source], keys))
    spark = runner.spark()
    counts = {}
    for label in ("key statistics", "in the job"):
        spark_engine._compiled_plans.clear()
        if label == "in the job":
            measured, SparkEngine._key_stats = SparkEngine._key_stats, lambda *args, **kwargs: None
        try:
            compiled = runner._compiled(accounted.plan, catalog)
        finally:
            if label == "in the job":
                SparkEngine._key_stats = measured
        fetched = compiled.fetch if compiled.fetch is not None else compiled.frame
        counts[label] = aggregate_functions(spark_engine._fresh(spark, fetched))
    spark_engine._compiled_plans.clear()
    print(f"  {name} aggregate functions in the Spark job: " + ", ".join(
        f"{label} {len(found)}" for label, found in counts.items()) + f" (with statistics: {counts['key statistics']})")


def stages(name: str, plan: dict, catalog: dict, runner: SparkEngine, repeat: int) -> None:
    # Where Bastion's time goes: the plan checks (the unique-key check is cached per data
    # version after the warm-up), compiling the accounted plan (Spark analyses each call;
    # kept per plan and data version after the first), the Spark job on a fresh DataFrame
    # over the kept plan, as `run` makes it (Spark's optimizer and physical planning, then
    # the job), the decision.  (Running one DataFrame object again is no measure of
    # execution: Spark skips the shuffle stages it already ran for that physical plan.)
    def checks():
        return policy.account(validate.validate(plan, catalog, dataset_columns=runner.columns),
                              unique_keys=lambda source, keys: runner.unique_keys(catalog[source], keys))

    accounted = checks()
    compiled = runner._compiled(accounted.plan, catalog)
    arrow = compiled.frame.toArrow()
    table = to_polars(arrow, compiled.schema)
    def uncached():
        spark_engine._compiled_plans.clear()
        return runner._compiled(accounted.plan, catalog)

    spark = runner.spark()
    fetched = compiled.fetch if compiled.fetch is not None else compiled.frame  # what `run` runs
    times = interleaved({
        "validate+account": checks,
        "compile, not kept (DataFrame built, analysed)": uncached,
        "compile, kept": lambda: runner._compiled(accounted.plan, catalog),
        "kept + Catalyst planning": lambda: planned(spark_engine._fresh(spark, fetched)),
        "kept + Spark job (toArrow)": lambda: spark_engine._fresh(spark, fetched).toArrow(),
        "to_polars+decide": lambda: decide.decide(accounted, to_polars(arrow, compiled.schema), "bench"),
    }, repeat)
    print_stages(name, times, table.columns, accounted.columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--small-rows", type=int, default=5_000, help="rows of the small-aggregate cell's table")
    parser.add_argument("--small-repeat", type=int, default=100, help="rounds of the small-aggregate cell")
    args = parser.parse_args()
    import pyspark
    from pyspark.sql import functions as F

    start = time.perf_counter()
    spark = spark_session.session()  # the engine's session: plain PySpark runs on this very object
    started = time.perf_counter() - start
    print(f"machine: {platform.machine()}, python {platform.python_version()}, pyspark {pyspark.__version__}, "
          f"master {spark.sparkContext.master}, shuffle partitions {spark.conf.get('spark.sql.shuffle.partitions')}, "
          f"rows {args.rows:,}; session start {started:.1f} s; load {load()}")
    runner = SparkEngine()
    assert runner.spark() is spark
    with tempfile.TemporaryDirectory() as tmp:
        big_path, small_path = make_tables(args.rows, Path(tmp))
        rules = Policy(min_group_size=10, unsafe="review")  # the defaults: dominance on
        catalog = {"big": Dataset("big", big_path, "parquet", rules, engine="spark"),
                   "small": Dataset("small", small_path, "parquet", rules, engine="spark")}
        big = spark.read.parquet(str(big_path))
        small = spark.read.parquet(str(small_path))

        def measure(name: str, short: str, plan: dict, plain: Callable[[], object]) -> None:
            start = time.perf_counter()
            first = evaluate(plan, catalog, "bench")
            cold = time.perf_counter() - start
            assert first.decision.action == "allow", first.decision
            expected = plain()
            assert first.table.height == expected.num_rows, (first.table.height, expected.num_rows)
            times = interleaved({
                "plain PySpark (same session, toArrow)": plain,
                "bastion evaluate on Spark": lambda: evaluate(plan, catalog, "bench"),
            }, args.repeat)
            report(name, times, "plain PySpark (same session, toArrow)")
            print("  first Bastion query (schemas, data versions, key checks, per-key statistics measured on the way): "
                  f"{cold * 1000:.0f} ms")
            stages(short, plan, catalog, runner, args.repeat)
            accounting_cost(short, plan, catalog, runner)


        def plain_group():
            return big.groupBy("group").agg(F.mean("a").alias("mean_a"), F.sum("c").alias("sum_c"),
                                            F.count(F.lit(1)).alias("n")).toArrow()

        measure(f"group-by over {args.rows:,} rows", "group-by", GROUP_PLAN, plain_group)

        def plain_join():
            return (big.join(small, on="key", how="inner")
                    .groupBy("region").agg(F.mean(F.col("a") * F.col("w1")).alias("mean_aw"),
                                           F.sum("w2").alias("sum_w2"), F.count(F.lit(1)).alias("n"))
                    .toArrow())

        measure(f"{args.rows:,} x 7 join 100 x 5, then aggregate", "join", JOIN_PLAN, plain_join)

        # Issue 19's small-aggregate cell: a query's fixed overhead, on a table of a few thousand rows.
        (Path(tmp) / "cell").mkdir()
        cell_path, _ = make_tables(args.small_rows, Path(tmp) / "cell")
        cell = {"cell": Dataset("cell", cell_path, "parquet", rules, engine="spark")}
        cell_frame = spark.read.parquet(str(cell_path))
        cell_plan = P.frame_op("select", input=P.scan("cell"), exprs=[P.alias(P.fn("mean", P.col("a")), "mean_a"),
                                                                      P.alias(P.length(), "n")])
        assert evaluate(cell_plan, cell, "bench").decision.action == "allow"
        times = interleaved({
            "plain PySpark": lambda: cell_frame.agg(F.mean("a").alias("mean_a"),
                                                    F.count(F.lit(1)).alias("n")).toArrow(),
            "bastion evaluate on Spark": lambda: evaluate(cell_plan, cell, "bench"),
        }, args.small_repeat)
        print(f"small aggregate over {args.small_rows:,} rows (mean, len), {args.small_repeat} rounds:")
        summary = {label: (statistics.median(values), quantile(values, 0.99)) for label, values in times.items()}
        for label, (median, p99) in summary.items():
            print(f"  {label}: median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        (plain_median, plain_p99), (ours_median, ours_p99) = summary["plain PySpark"], \
            summary["bastion evaluate on Spark"]
        print(f"  overhead: median {(ours_median - plain_median) * 1000:.1f} ms, p99 {(ours_p99 - plain_p99) * 1000:.1f} ms;"
              f" ratio of medians {ours_median / plain_median:.3f}, of p99s {ours_p99 / plain_p99:.3f} "
              f"(target <= {TARGET:.2f})")
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
