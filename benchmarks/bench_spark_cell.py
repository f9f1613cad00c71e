"""Whole cells on Spark datasets, kernel to displayed table, against plain PySpark (issue 19's Spark figures).

A real ``bastion`` kernel (through ``jupyter_client``) talks to a real
executor process whose datasets are registered with ``engine="spark"``
(``[spark]``: ``local[2]``, 2 shuffle partitions, UI off), over the Parquet
files of ``bench_executor.make_tables``.  Plain PySpark runs the
DataFrame-API equivalent of each query in this process, on its own
``local[2]`` session over the same files, its result fetched with
``.toArrow()``.  Three cells, as in ``bench_whole_path.py``: the group-by and
the join of ``--rows`` rows, and the small aggregate over ``--small-rows``
rows; both sides timed in the same two states (back to back, and after a
pause: ``harness.rounds_in_states``), the order rotated each round, medians
after two warm-up rounds, and the small cell's p99 (target: every ratio <= 1.25).

The two JVMs (the executor's Spark and this one) share the machine's cores;
each is idle while the other works.

Run: ``python benchmarks/bench_spark_cell.py [--rows 10000000] [--repeat 7] [--small-repeat 50]``
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from bench_executor import load, make_tables
from bench_whole_path import GROUP_CELL, JOIN_CELL, time_cell
from harness import STATES, machine, percentile, rounds_in_states, served, timed
from owner_console.engine.spark import session as spark_session
from owner_console.workspace import Workspace, atomic_write
from test_kernel import bastion_kernel, connect_scientist

SMALL_CELL = 'cell.select(col("a").mean().alias("mean_a"), pl.len().alias("n")).fetch()'
SPARK = {"master": "local[2]", "conf": {"spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"}}


def on_spark(workspace: Workspace) -> None:
    path = workspace.path / "config.toml"
    data = tomllib.loads(path.read_text())
    data["spark"] = SPARK
    atomic_write(path, tomli_w.dumps(data).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--small-rows", type=int, default=5_000)
    parser.add_argument("--small-repeat", type=int, default=50)
    args = parser.parse_args()
    from pyspark.sql import functions as F

    spark_session.configure(spark_session.SparkSettings(master="local[2]", conf={
        "spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false"}))
    spark = spark_session.session()
    print(f"{machine()}; Spark cells, rows {args.rows:,}; load {load()}")
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        big_path, small_path = make_tables(args.rows, tmp)
        (tmp / "cell").mkdir()
        cell_path, _ = make_tables(args.small_rows, tmp / "cell")
        options = {"min_group_size": 10, "unsafe": "review", "engine": "spark"}
        datasets = {"big": (big_path, options), "small": (small_path, options), "cell": (cell_path, options)}
        big, small = spark.read.parquet(str(big_path)), spark.read.parquet(str(small_path))
        cell = spark.read.parquet(str(cell_path))
        plain = {
            "group-by": lambda: big.groupBy("group").agg(F.mean("a").alias("mean_a"), F.sum("c").alias("sum_c"),
                                                         F.count(F.lit(1)).alias("n")).toArrow(),
            "join": lambda: big.join(small, on="key", how="inner").groupBy("region").agg(
                F.mean(F.col("a") * F.col("w1")).alias("mean_aw"), F.sum("w2").alias("sum_w2"),
                F.count(F.lit(1)).alias("n")).toArrow(),
            "small aggregate": lambda: cell.agg(F.mean("a").alias("mean_a"), F.count(F.lit(1)).alias("n")).toArrow(),
        }
        cells = {"group-by": GROUP_CELL, "join": JOIN_CELL, "small aggregate": SMALL_CELL}
        with served(datasets, ["bench"], tmp, configure=on_spark) as running:
            config, jupyter_path = connect_scientist(running, tmp / "carol", "carol")
            with bastion_kernel(config, jupyter_path) as (km, kc):
                for name in ("big", "small", "cell"):
                    time_cell(kc, f'{name} = dataset("{name}")', timeout=300, expect_result=False)
                rounds = {"group-by": args.repeat, "join": args.repeat, "small aggregate": args.small_repeat}
                times = {name: rounds_in_states({"cell": lambda code=code: time_cell(kc, code, timeout=300),
                                                 "plain": timed(plain[name])}, rounds[name], warmup=2)
                         for name, code in cells.items()}
        for name, by_state in times.items():
            for state in STATES:
                measured = by_state[state]
                cell_median, plain_median = statistics.median(measured["cell"]), statistics.median(measured["plain"])
                line = (f"{name}, {state}: whole cell median {cell_median * 1000:.1f} ms, plain PySpark "
                        f"{plain_median * 1000:.1f} ms, ratio {cell_median / plain_median:.3f}")
                if name == "small aggregate":
                    cell_p99, plain_p99 = percentile(measured["cell"], 99), percentile(measured["plain"], 99)
                    line += (f"; p99 {cell_p99 * 1000:.1f} vs {plain_p99 * 1000:.1f} ms, ratio "
                             f"{cell_p99 / plain_p99:.3f}; overhead median {(cell_median - plain_median) * 1000:.1f} ms")
                print(f"{line} (target <= 1.25) (n={len(measured['cell'])})")
    print(f"load at the end: {load()}")


if __name__ == "__main__":
    main()
