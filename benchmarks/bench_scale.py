"""Scale: a Parquet dataset larger than the executor's memory limit, answering aggregates.

A generated table (``--rows``; its in-memory size is printed, estimated from
a 1M-row sample) is written as one Parquet file and registered.  The executor
is a real ``bastion-owner serve`` on 127.0.0.1 whose address space is then
capped with ``prlimit --pid PID --as=LIMIT`` (``--limit-mb``, below the
table's in-memory size).  Two aggregates are sent to the executor as it is:
since issue 7's engine change, a Parquet file larger than
``engine.streaming_threshold()`` (one eighth of the memory the executor may
use, address-space limit included) is scanned lazily and run on polars'
streaming engine.  (Before that change the executor read the file whole and
the process aborted.)

Prints each run's outcome (result, typed error, or a dead process), its time,
the executor's peak RSS (``VmHWM``), and checks each result against plain
polars (streaming engine, same file, no limit) in this process.

Run: ``python benchmarks/bench_scale.py [--rows 80000000] [--limit-mb 3072]``
"""
from __future__ import annotations

import argparse
import io
import subprocess
import tempfile
import time
from pathlib import Path

import polars as pl

from bastion_kernel import plan as P
from harness import RawClient, machine, make_table, proc_status_bytes, served

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


def run(mode: str, path: Path, limit: int, tmp: Path) -> None:
    with served({"huge": (path, {"min_group_size": 10})}, ["alice"], tmp / mode) as running:
        pid = running.process.pid
        subprocess.run(["prlimit", "--pid", str(pid), f"--as={limit}:{limit}"], check=True)
        keys = running.keys["alice"]
        with RawClient(running.endpoint, running.server_public_key, keys.public, keys.secret) as client:
            for name, (plan, plain) in AGGREGATES.items():
                start = time.perf_counter()
                kind, body, frames = wait_reply(client, client.send("fetch", {"plan": plan, "text": name}),
                                                running.process)
                elapsed = time.perf_counter() - start
                alive = running.process.poll() is None
                peak = proc_status_bytes(pid, "VmHWM") if alive else 0
                if kind == "result":
                    started = time.perf_counter()
                    expected = plain(pl.scan_parquet(path)).collect(engine="streaming")
                    plain_seconds = time.perf_counter() - started
                    correct = same(pl.read_ipc(io.BytesIO(frames[0])), expected)
                    outcome = (f"result in {elapsed:.1f} s (plain polars streaming {plain_seconds:.1f} s, "
                               f"ratio {elapsed / plain_seconds:.2f}), {'equal to' if correct else 'DIFFERENT from'} "
                               f"plain polars")
                elif kind == "error":
                    outcome = f"error {body['ename']} after {elapsed:.1f} s: {body['evalue'][:160]}"
                else:
                    outcome = f"{kind} after {elapsed:.1f} s"
                state = f"peak RSS {peak / MB:.0f} MB" if alive else "the executor process DIED"
                print(f"  [{mode}] {name}: {outcome}; {state}", flush=True)
                if not alive:
                    print(f"  [{mode}] exit status {running.process.returncode}; executor log tail: "
                          f"{running.log()[-400:]!r}")
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=80_000_000)
    parser.add_argument("--limit-mb", type=int, default=3072)
    parser.add_argument("--data", type=Path, help="reuse this Parquet file (made with harness.make_table)")
    args = parser.parse_args()
    print(machine())
    limit = args.limit_mb * 2**20
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        tmp = Path(tmp)
        path = args.data or tmp / "huge.parquet"
        if args.data is None:
            make_table(args.rows).write_parquet(path)
        rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        in_memory = make_table(1_000_000).estimated_size() * rows / 1_000_000
        print(f"dataset: {rows:,} rows, Parquet file {path.stat().st_size / MB:.0f} MB, in memory about "
              f"{in_memory / MB:.0f} MB; executor address-space limit {limit / MB:.0f} MB "
              f"({'below' if limit < in_memory else 'NOT below'} the in-memory size)")
        run("engine", path, limit, tmp)


if __name__ == "__main__":
    main()
