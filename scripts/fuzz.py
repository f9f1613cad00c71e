"""The longer fuzz: the suite's fuzz strategies, run for as long as you like.

The test suite runs a bounded fuzz (``tests/test_fuzz_language.py``,
``tests/test_fuzz_wire.py``, a few seconds each).  This script runs the same
strategies and the same checks in batches until the time is up:

- ``language``: random cells and syntax trees through the Interpreter (with
  the in-memory session), each a value or a typed error, canaries untouched;
- ``wire``: random and mutated messages, and random plans, from a registered
  scientist to a real executor process on 127.0.0.1, each answered with one
  valid reply or the canonical error, the executor alive and answering
  ``hello`` afterwards, and no traceback in its log at the end.

A failure stops the run and prints hypothesis' minimal failing example.

Run: ``.venv/bin/python scripts/fuzz.py [--minutes 10] [--target language|wire|both] [--batch 500]``
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_strategies as S  # noqa: E402
from conftest import make_keys, make_workspace, start_executor  # noqa: E402
from owner_console.sample_data import write_patients  # noqa: E402
from test_fuzz_language import fresh_interpreter, run_untrusted_cell  # noqa: E402
from test_fuzz_wire import check_reply, still_serves  # noqa: E402
from wire import RawClient  # noqa: E402


def batch_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def fuzz_language(seconds: float, batch: int, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)  # the canary's directory exists: an executed cell could write it
    canary = workdir / "canary"

    @batch_settings(batch)
    @given(cells=st.lists(S.cell_sources, min_size=1, max_size=4))
    def cells(cells):
        interpreter = fresh_interpreter()
        for cell in cells:
            run_untrusted_cell(interpreter, cell, canary)

    @batch_settings(batch)
    @given(cell=S.ast_cells)
    def trees(cell):
        run_untrusted_cell(fresh_interpreter(), cell, canary)

    return run_batches("language", [cells, trees], seconds, batch)


def fuzz_wire(seconds: float, batch: int, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    owner = make_workspace(workdir / "workspace", write_patients(workdir / "patients.csv"))
    keys = {"alice": make_keys(workdir / "keys", "alice")}
    owner.workspace.add_scientist("alice", keys["alice"].public_file)
    running = start_executor(owner.path, keys)
    client = RawClient(running.endpoint, running.server_public_key, keys["alice"].public, keys["alice"].secret)
    try:
        @batch_settings(batch)
        @given(message=S.wire_messages())
        def messages(message):
            client.send_frames(message)
            check_reply(client.recv(20))
            still_serves(client, running.process)

        @batch_settings(batch)
        @given(kind=st.sampled_from(["fetch", "schema"]), plan=S.plans)
        def plans(kind, plan):
            client.send(kind, {"plan": plan, "text": "fuzz"} if kind == "fetch" else {"plan": plan})
            check_reply(client.recv(20))
            still_serves(client, running.process)

        examples = run_batches("wire", [messages, plans], seconds, batch)
        still_serves(client, running.process)
        if "Traceback" in running.log():
            raise AssertionError("the executor logged an unexpected error:\n" + running.log()[-3000:])
        return examples
    finally:
        client.close()
        running.stop()


def run_batches(name: str, tests, seconds: float, batch: int) -> int:
    deadline = time.monotonic() + seconds
    examples = 0
    while time.monotonic() < deadline:
        for test in tests:
            test()
            examples += batch
        print(f"{name}: {examples} examples, {max(0, deadline - time.monotonic()):.0f} s left", flush=True)
    return examples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--target", choices=["language", "wire", "both"], default="both")
    parser.add_argument("--batch", type=int, default=500, help="examples per strategy per batch")
    args = parser.parse_args()
    targets = ["language", "wire"] if args.target == "both" else [args.target]
    seconds = args.minutes * 60 / len(targets)
    runners = {"language": fuzz_language, "wire": fuzz_wire}
    with tempfile.TemporaryDirectory(prefix="bastion-fuzz-") as tmp:
        for target in targets:
            examples = runners[target](seconds, args.batch, Path(tmp) / target)
            print(f"{target}: {examples} examples, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
