"""Bytes of audit log per request when a scientist repeats a large plan.

A real ``bastion-owner serve`` on 127.0.0.1; one scientist sends the same
large plan (an ``is_in`` over many long strings, on a dataset whose policy
rejects row-level results, so each request is refused) ``--repeat`` times,
one after the other.  Prints the growth of the workspace's audit log
(``audit.jsonl``, everything the audit keeps) in total and per request, the
size of the plan as it travels (canonical JSON), and whether ``bastion-owner
audit verify`` passes afterwards.

The refusal rate limit (``max_refusals_per_minute``) is raised for the run,
so that every request is served and counted; with the default limit a key
cannot send more than that many refused requests a minute at all.

Run: ``python benchmarks/bench_audit_growth.py [--repeat 20] [--values 9000]``
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from harness import machine, make_keys, start_executor  # noqa: F401 - harness puts tests/ on sys.path

from bastion_kernel.contract.plan import canonical_json, col, fn, frame_op, scan  # noqa: E402
from conftest import make_workspace  # noqa: E402
from owner_console.sample_data import write_patients  # noqa: E402


def large_plan(values: int) -> dict:
    """A row-level plan (refused on ``patients_strict``) carrying ``values`` 16-character strings."""
    wanted = [f"name-{i:011d}" for i in range(values)]
    return frame_op("filter", input=scan("patients_strict"),
                    predicate=fn("is_in", col("name"), values=wanted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="requests sent with the same plan")
    parser.add_argument("--values", type=int, default=9000, help="strings in the plan's is_in list")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        root = Path(tmp)
        owned = make_workspace(root / "ws", write_patients(root / "patients.csv"))
        config = tomllib.loads(owned.workspace.config_path.read_text())
        config["max_refusals_per_minute"] = 100_000
        owned.workspace.config_path.write_text(tomli_w.dumps(config))
        keys = {"alice": make_keys(root / "keys", "alice")}
        owned.workspace.add_scientist("alice", keys["alice"].public_file)
        running = start_executor(owned.path, keys)
        try:
            alice = running.client("alice")
            plan = large_plan(args.values)
            audit = owned.workspace.audit_path
            before = audit.stat().st_size
            sizes = []
            for i in range(args.repeat):
                kind, body, _ = alice.request("fetch", {"plan": plan, "text": "the same large plan"}, timeout=120)
                assert kind == "error", (kind, body)
                sizes.append(audit.stat().st_size)
            ename = body["ename"]
        finally:
            running.stop()
        grown = sizes[-1] - before
        steady = (sizes[-1] - sizes[0]) / max(1, len(sizes) - 1)
        verified = subprocess.run([sys.executable, "-m", "owner_console.cli", "audit", "verify",
                                   "--workspace", str(owned.path)], capture_output=True, text=True)
    print(f"plan: {len(canonical_json(plan)):,} bytes of canonical JSON; each request answered {ename}")
    print(f"requests: {args.repeat}; audit log grew {grown:,} bytes: {grown / args.repeat:,.0f} bytes per request "
          f"on average")
    print(f"first request: {sizes[0] - before:,} bytes; each later request: {steady:,.0f} bytes")
    print(f"audit verify: {'ok' if verified.returncode == 0 else 'FAILED'} ({(verified.stdout or verified.stderr).strip()})")


if __name__ == "__main__":
    main()
