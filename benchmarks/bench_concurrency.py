"""Concurrency: 8 scientists' small queries while a ninth runs a long query.

One real executor on 127.0.0.1 serves two datasets: the synthetic patients
table (5000 rows) and a large generated table (``--big-rows``, Parquet).
Eight scientists, each with its own DEALER, send small aggregates over
patients back to back, first on an idle executor (``--seconds``), then while a
ninth scientist runs a long aggregate over the large table again and again
for the same time (each run takes about 10 s at the default size; the script
prints how long).  Prints the small queries' median and p99 in both phases and
the ratio of the p99s (target: loaded p99 <= 2 x idle p99).

Run: ``python benchmarks/bench_concurrency.py [--big-rows 40000000] [--seconds 20]``
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bastion_kernel.contract import plan as P
from harness import RawClient, machine, make_table, percentile, served, summary
from owner_console.sample_data import write_patients

SMALL_SCIENTISTS = [f"small{i}" for i in range(8)]
HEAVY = "heavy"

SMALL_PLAN = P.frame_op("group_by", input=P.scan("patients"), keys=[P.col("sex")],
                        aggs=[P.alias(P.fn("mean", P.col("age")), "mean_age"), P.alias(P.length(), "n")])
HEAVY_PLAN = P.frame_op("group_by", input=P.scan("big"), keys=[P.col("label")], aggs=[
    P.alias(P.fn("median", P.col("a")), "median_a"), P.alias(P.fn("std", P.col("b"), ddof=1), "std_b"),
    P.alias(P.fn("n_unique", P.col("c")), "distinct_c"), P.alias(P.length(), "n")])


def client_for(running, name: str) -> RawClient:
    keys = running.keys[name]
    return RawClient(running.endpoint, running.server_public_key, keys.public, keys.secret)


def small_queries(running, name: str, stop: threading.Event, latencies: list[float]) -> None:
    with client_for(running, name) as client:
        while not stop.is_set():
            start = time.perf_counter()
            kind, body, _ = client.request("fetch", {"plan": SMALL_PLAN, "text": "small"}, timeout=600)
            latencies.append(time.perf_counter() - start)
            if kind != "result":
                raise RuntimeError(f"{name}: {kind} {body}")


def heavy_queries(running, stop: threading.Event, durations: list[float]) -> None:
    with client_for(running, HEAVY) as client:
        while not stop.is_set():
            start = time.perf_counter()
            kind, body, _ = client.request("fetch", {"plan": HEAVY_PLAN, "text": "heavy"}, timeout=600)
            durations.append(time.perf_counter() - start)
            if kind not in ("result", "pending"):
                raise RuntimeError(f"heavy: {kind} {body}")


def phase(running, seconds: float, with_heavy: bool) -> tuple[list[float], list[float]]:
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in SMALL_SCIENTISTS]
    durations: list[float] = []
    threads = [threading.Thread(target=small_queries, args=(running, name, stop, out))
               for name, out in zip(SMALL_SCIENTISTS, latencies)]
    if with_heavy:
        threads.append(threading.Thread(target=heavy_queries, args=(running, stop, durations)))
        threads[-1].start()
        time.sleep(0.5)  # let the long query get going first
    for thread in threads[:len(SMALL_SCIENTISTS)]:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return [x for out in latencies for x in out], durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-rows", type=int, default=40_000_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        patients = write_patients(tmp / "patients.csv")
        big = tmp / "big.parquet"
        make_table(args.big_rows).write_parquet(big)
        datasets = {"patients": (patients, {"min_group_size": 10, "hidden": ["name"]}),
                    "big": (big, {"min_group_size": 10})}
        with served(datasets, SMALL_SCIENTISTS + [HEAVY], tmp) as running:
            with client_for(running, HEAVY) as warm:  # load both datasets into the executor's cache
                for plan in (SMALL_PLAN, HEAVY_PLAN):
                    kind, body, _ = warm.request("fetch", {"plan": plan, "text": "warm-up"}, timeout=600)
                    assert kind in ("result", "pending"), body  # a small --big-rows gives small groups
            idle, _ = phase(running, args.seconds, with_heavy=False)
            loaded, durations = phase(running, args.seconds, with_heavy=True)
    ratio = percentile(loaded, 99) / percentile(idle, 99)
    print(f"long query over {args.big_rows:,} rows: {len(durations)} run(s), "
          f"each {', '.join(f'{d:.1f}' for d in durations)} s")
    print(f"small queries, idle executor (8 scientists): {summary(idle)}")
    print(f"small queries, during the long query: {summary(loaded)}")
    print(f"p99 loaded / p99 idle = {ratio:.2f} (target <= 2: {'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
