"""Memory: one copy of a dataset, however many sessions use it.

A real executor on 127.0.0.1 serves one generated table (``--rows``,
Parquet).  Eight scientists, each with its own connection, send aggregates
over it at the same time (``--rounds`` each, different group keys and
filters).  The executor's memory is the sum over its process tree (the
executor and its query worker processes) of PSS, sampled every 20 ms: PSS
charges a page shared by several processes (the memory-mapped dataset) in
equal parts, so the sum counts it once.  The peak is compared with the
table's in-memory size (polars' ``estimated_size``) and with the executor
before any dataset was read; the sum of RSS (which counts shared pages once
per process) and the main process's own ``VmHWM`` are printed beside it.
One query runs first, alone: it writes the dataset's shared copy (once per
file version) and its peak is printed apart.  Target: peak <= 1.2 x
in-memory size + 200 MB.

Run: ``python benchmarks/bench_memory.py [--rows 10000000] [--rounds 5] [--sessions 8]``
"""
from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import polars as pl

from bastion_kernel.contract import plan as P
from harness import (PeakSampler, RawClient, machine, make_table, proc_status_bytes, process_tree, served,
                     tree_breakdown, tree_memory_bytes)

SESSIONS = 8
MB = 1_000_000


def session_plan(index: int, round_: int) -> dict:
    keys = ["group", "key", "c", "group"][(index + round_) % 4]
    filtered = P.frame_op("filter", input=P.scan("big"),
                          predicate=P.binary("gt", P.col("d"), P.lit(round(0.1 * (index % 5), 1))))
    return P.frame_op("group_by", input=filtered, keys=[P.col(keys)], aggs=[
        P.alias(P.fn("mean", P.col("a")), "mean_a"), P.alias(P.fn("sum", P.col("b")), "sum_b"),
        P.alias(P.length(), "n")])


def session(running, name: str, index: int, rounds: int, errors: list[str]) -> None:
    keys = running.keys[name]
    with RawClient(running.endpoint, running.server_public_key, keys.public, keys.secret) as client:
        for round_ in range(rounds):
            kind, body, _ = client.request("fetch", {"plan": session_plan(index, round_), "text": "memory"},
                                           timeout=600)
            if kind != "result":
                errors.append(f"{name}: {kind} {body}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        path = tmp / "big.parquet"
        table = make_table(args.rows)
        table.write_parquet(path)
        size = pl.read_parquet(path).estimated_size()
        del table
        scientists = [f"s{i}" for i in range(args.sessions)]
        with served({"big": (path, {"min_group_size": 10})}, scientists, tmp) as running:
            pid = running.process.pid
            before, _, _ = tree_memory_bytes(pid)
            errors: list[str] = []
            # First use: one query, which also writes the dataset's shared copy (once per file version).
            with PeakSampler(pid) as first_use:
                session(running, scientists[0], 0, 1, errors)
            threads = [threading.Thread(target=session, args=(running, name, i, args.rounds, errors))
                       for i, name in enumerate(scientists)]
            with PeakSampler(pid) as sampler:
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            peak, peak_rss = sampler.peak_pss, sampler.peak_rss
            now, _, _ = tree_memory_bytes(pid)
            main_peak = proc_status_bytes(pid, "VmHWM")
            workers = len(process_tree(pid)) - 1
            breakdown = tree_breakdown(pid)
            if errors:
                raise SystemExit("\n".join(errors[:5]))
    target = 1.2 * size + 200 * MB
    print(f"dataset: {args.rows:,} rows, in memory {size / MB:.0f} MB (polars estimated_size)")
    print(f"executor before any dataset was read: PSS {before / MB:.0f} MB")
    print(f"first query (writes the shared copy of the dataset): peak PSS of the process tree "
          f"{first_use.peak_pss / MB:.0f} MB")
    print(f"executor after {args.sessions} sessions x {args.rounds} concurrent aggregates: peak PSS of the process tree "
          f"{peak / MB:.0f} MB (peak sum of RSS {peak_rss / MB:.0f} MB; main process VmHWM {main_peak / MB:.0f} MB); "
          f"PSS now {now / MB:.0f} MB with {workers} idle worker process(es)")
    print(f"  per process now (executor first): {breakdown}")
    print(f"peak / dataset = {peak / size:.2f}; target <= 1.2 x {size / MB:.0f} + 200 = {target / MB:.0f} MB: "
          f"{'met' if peak <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
