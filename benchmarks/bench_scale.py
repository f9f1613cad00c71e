"""Scale: a dataset (Parquet or CSV) larger than the executor's memory limit, answering aggregates.

A generated table (``--rows``; its in-memory size is printed, estimated from
a 1M-row sample) is written as one Parquet file and registered.  The executor
is a real ``bastion-owner serve`` on 127.0.0.1, then put under a memory limit
(``--limit-mb``, below the table's in-memory size): a cgroup memory limit
(``memory.limit_in_bytes``, cgroup v1, as a container or systemd's
``MemoryMax`` would set; the default when it can be written, as root), or with
``--limit-kind as`` an address-space limit (``prlimit --pid PID --as=LIMIT``,
which also counts file mappings: polars maps a Parquet file whole to read it).  Two aggregates are sent to the executor as it is:
a Parquet file larger than
``engine.streaming_threshold()`` (one eighth of the memory the executor may
use, address-space limit included) is scanned lazily and run on polars'
streaming engine, so it never has to fit in memory whole.

Since queries run in worker processes (:mod:`owner_console.workers`), which
inherit the limit, the memory figures are the peak PSS of the executor's whole
process tree (sampled every 20 ms) and the largest ``VmHWM`` of any of its
processes.  ``--format csv`` writes the table as CSV instead (large CSV files
are streamed too).

Prints each run's outcome (result, typed error, or a dead process), its time,
the memory figures, and checks each result against plain polars (streaming
engine, same file, no limit) in this process.

Run: ``python benchmarks/bench_scale.py [--rows 80000000] [--limit-mb 3072] [--format parquet|csv]``
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import polars as pl

from bastion_kernel.contract import plan as P
from harness import PeakSampler, RawClient, machine, make_table, proc_status_bytes, process_tree, served

MB = 1_000_000
AGGREGATES = {
    "group-by mean/sum/len over 50 groups": (
        P.frame_op("group_by", input=P.scan("huge"), keys=[P.col("group")], aggs=[
            P.alias(P.fn("mean", P.col("a")), "mean_a"), P.alias(P.fn("sum", P.col("c")), "sum_c"),
            P.alias(P.length(), "n")]),
        lambda lf: lf.group_by("group").agg(pl.col("a").mean().alias("mean_a"), pl.col("c").sum().alias("sum_c"),
                                            pl.len().alias("n"))),
    "filter then global mean/len": (
        P.frame_op("select", input=P.frame_op("filter", input=P.scan("huge"),
                                              predicate=P.binary("gt", P.col("d"), P.lit(0.5))),
                   exprs=[P.alias(P.fn("mean", P.col("b")), "mean_b"), P.alias(P.length(), "n")]),
        lambda lf: lf.filter(pl.col("d") > 0.5).select(pl.col("b").mean().alias("mean_b"), pl.len().alias("n"))),
}


def same(left: pl.DataFrame, right: pl.DataFrame) -> bool:
    key = left.columns[0]
    left, right = left.sort(key), right.sort(key)
    if left.columns != right.columns or left.height != right.height:
        return False
    for column in left.columns:
        a, b = left[column], right[column]
        if a.dtype.is_float():
            if ((a - b).abs() > 1e-9 * (1 + b.abs())).any():
                return False
        elif a.cast(pl.Int64).to_list() != b.cast(pl.Int64).to_list():
            return False
    return True


def wait_reply(client: RawClient, msg_id: str, process, timeout: float = 900) -> tuple[str, dict, list[bytes]]:
    """The reply to ``msg_id``, or ``("no reply", {}, [])`` once the executor died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return client.reply(msg_id, timeout=2)
        except TimeoutError:
            continue
    return "no reply", {}, []


def scan(path: Path) -> pl.LazyFrame:
    return pl.scan_csv(path, try_parse_dates=True) if path.suffix == ".csv" else pl.scan_parquet(path)


def largest_hwm(pid: int) -> int:
    peaks = []
    for member in process_tree(pid):
        try:
            peaks.append(proc_status_bytes(member, "VmHWM"))
        except (OSError, KeyError):
            pass
    return max(peaks, default=0)


def cgroup_v1_memory_root() -> Path | None:
    """Where this machine's cgroup v1 memory controller can be written (as root), else None."""
    root = Path("/sys/fs/cgroup/memory")
    return root if (root / "cgroup.procs").exists() and os.access(root, os.W_OK) else None


@contextlib.contextmanager
def memory_limited(pid: int, limit: int, kind: str) -> Iterator[str]:
    """Limit the executor ``pid`` (and the workers it starts from now on) to ``limit`` bytes."""
    if kind == "as":
        subprocess.run(["prlimit", "--pid", str(pid), f"--as={limit}:{limit}"], check=True)
        yield f"address-space limit (prlimit --as) {limit / MB:.0f} MB"
        return
    group = cgroup_v1_memory_root() / f"bastion-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "cgroup.procs").write_text(str(pid))
        yield f"cgroup memory limit (memory.limit_in_bytes) {limit / MB:.0f} MB"
    finally:
        parent = group.parent / "cgroup.procs"
        for member in (group / "cgroup.procs").read_text().split():
            try:
                parent.write_text(member)
            except OSError:
                pass  # ended meanwhile
        group.rmdir()


def run(mode: str, path: Path, limit: int, tmp: Path, kind: str) -> None:
    with served({"huge": (path, {"min_group_size": 10})}, ["alice"], tmp / mode) as running, \
            memory_limited(running.process.pid, limit, kind) as described:
        print(f"  [{mode}] executor under a {described}", flush=True)
        pid = running.process.pid
        keys = running.keys["alice"]
        with RawClient(running.endpoint, running.server_public_key, keys.public, keys.secret) as client:
            for name, (plan, plain) in AGGREGATES.items():
                start = time.perf_counter()
                with PeakSampler(pid) as sampler:
                    kind, body, frames = wait_reply(client, client.send("fetch", {"plan": plan, "text": name}),
                                                    running.process)
                    elapsed = time.perf_counter() - start
                    alive = running.process.poll() is None
                    hwm = largest_hwm(pid) if alive else 0
                if kind == "result":
                    started = time.perf_counter()
                    expected = plain(scan(path)).collect(engine="streaming")
                    plain_seconds = time.perf_counter() - started
                    correct = same(pl.read_ipc(io.BytesIO(frames[0])), expected)
                    outcome = (f"result in {elapsed:.1f} s (plain polars streaming {plain_seconds:.1f} s, "
                               f"ratio {elapsed / plain_seconds:.2f}), {'equal to' if correct else 'DIFFERENT from'} "
                               f"plain polars")
                elif kind == "error":
                    outcome = f"error {body['ename']} after {elapsed:.1f} s: {body['evalue'][:160]}"
                    print(f"  [{mode}] executor log tail: {running.log()[-1500:]}")
                else:
                    outcome = f"{kind} after {elapsed:.1f} s"
                state = (f"executor's processes: peak anonymous memory {sampler.peak_anonymous / MB:.0f} MB, "
                         f"peak PSS {sampler.peak_pss / MB:.0f} MB (with mapped file pages), largest VmHWM of one "
                         f"process {hwm / MB:.0f} MB" if alive else "the executor process DIED")
                print(f"  [{mode}] {name}: {outcome}; {state}", flush=True)
                if not alive:
                    print(f"  [{mode}] exit status {running.process.returncode}; executor log tail: "
                          f"{running.log()[-400:]!r}")
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=80_000_000)
    parser.add_argument("--limit-mb", type=int, default=3072)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--limit-kind", choices=("cgroup", "as"), default=None,
                        help="a cgroup memory limit (default when writable, as root) or an address-space limit")
    parser.add_argument("--data", type=Path, help="reuse this Parquet or CSV file (made with harness.make_table)")
    args = parser.parse_args()
    print(machine())
    limit = args.limit_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        path = args.data or tmp / f"huge.{args.format}"
        if args.data is None:
            table = make_table(args.rows)
            table.write_parquet(path) if args.format == "parquet" else table.write_csv(path)
            del table
        rows = scan(path).select(pl.len()).collect(engine="streaming").item()
        in_memory = make_table(1_000_000).estimated_size() * rows / 1_000_000
        print(f"dataset: {rows:,} rows, {path.suffix[1:]} file {path.stat().st_size / MB:.0f} MB, in memory about "
              f"{in_memory / MB:.0f} MB; executor memory limit {limit / MB:.0f} MB "
              f"({'below' if limit < in_memory else 'NOT below'} the in-memory size)")
        kind = args.limit_kind or ("cgroup" if cgroup_v1_memory_root() else "as")
        run("engine", path, limit, tmp, kind)


if __name__ == "__main__":
    main()
