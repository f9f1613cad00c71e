"""Transfer: an approved 1M-row result reaching the kernel's client as Arrow IPC.

A real executor on 127.0.0.1 serves a generated table.  The scientist asks
for 1M rows (row-level, so the policy holds it for review); the owner
approves it with ``bastion-owner approve``; then the clock runs while the
kernel's :class:`bastion_kernel.client.ExecutorClient` asks for the request,
receives the Arrow IPC frame over CURVE and decodes it into a polars frame.
Prints MB/s (bytes of the Arrow IPC frame / seconds), median over
``--repeat`` requests (target >= 100 MB/s).

Run: ``python benchmarks/bench_transfer.py [--rows 1000000] [--repeat 5]``
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bastion_kernel.contract import plan as P
from bastion_kernel.language.values import FetchedTable
from harness import machine, make_table, served
from owner_console.workspace import Workspace

MB = 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        path = tmp / "table.parquet"
        make_table(args.rows).write_parquet(path)
        plan = P.frame_op("head", n=args.rows, input=P.frame_op(
            "select", input=P.scan("table"), exprs=[P.col(c) for c in ("id", "group", "a", "b", "d", "label")]))
        rates, sizes, seconds = [], [], []
        with served({"table": (path, {"min_group_size": 10, "unsafe": "review"})}, ["alice"], tmp) as running:
            client = running.kernel_client("alice", timeout=600)
            for _ in range(args.repeat + 1):  # the first one warms up
                kind, body, _ = client.request_raw("fetch", {"plan": plan, "text": "transfer"})
                assert kind == "pending", (kind, body)
                request_id = body["request_id"]
                approved = running.owner("approve", str(request_id))
                assert approved.returncode == 0, approved.stderr
                size = Workspace(running.workspace).result_path(request_id).stat().st_size
                start = time.perf_counter()
                fetched = client.request(request_id)
                elapsed = time.perf_counter() - start
                assert isinstance(fetched, FetchedTable) and fetched.frame.height == args.rows, fetched
                rates.append(size / elapsed)
                sizes.append(size)
                seconds.append(elapsed)
    rates, seconds = rates[1:], seconds[1:]
    median = statistics.median(rates)
    print(f"{args.rows:,} rows x 6 columns, Arrow IPC {sizes[-1] / MB:.1f} MB: "
          f"request -> decoded frame median {statistics.median(seconds) * 1000:.0f} ms")
    print(f"transfer rate median {median / MB:.0f} MB/s (min {min(rates) / MB:.0f}, max {max(rates) / MB:.0f}); "
          f"target >= 100 MB/s: {'met' if median >= 100 * MB else 'NOT met'}")


if __name__ == "__main__":
    main()
