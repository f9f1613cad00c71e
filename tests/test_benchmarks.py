"""The performance benchmarks run, and time every side of a ratio in the same states.

The figures themselves are not asserted (speed targets live in the
benchmarks' printed output and ``benchmarks/RESULTS.md``, never in timed
tests); what is asserted is that the scripts still run end to end on a
small table and print each ratio in each state, and that the shared
measurement gives every side the same treatment.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from harness import AFTER_A_PAUSE, BACK_TO_BACK, STATES, rounds_in_states, timed  # noqa: E402


def test_every_side_is_timed_in_both_states_in_every_round():
    calls: list[str] = []

    def side(name: str, seconds: float):
        def call() -> float:
            calls.append(name)
            return seconds
        return call

    times = rounds_in_states({"ours": side("ours", 2.0), "plain": side("plain", 1.0)}, repeat=3, warmup=1, pause=0)
    # Per round and side: one untimed run, the timed back-to-back run, the timed run after the pause.
    assert len(calls) == (1 + 3) * 2 * 3
    assert set(times) == set(STATES)
    for state in STATES:
        assert times[state] == {"ours": [2.0] * 3, "plain": [1.0] * 3}
    # The order rotates: each side goes first in some round.
    firsts = {calls[index] for index in range(0, len(calls), 6)}
    assert firsts == {"ours", "plain"}


def test_a_side_may_report_several_spans_and_timed_measures_the_call():
    times = rounds_in_states({"cell": lambda: {"cell": 3.0, "in the kernel": 2.5}, "plain": timed(lambda: None)},
                             repeat=2, warmup=0, pause=0)
    assert times[BACK_TO_BACK]["in the kernel"] == [2.5, 2.5]
    assert times[AFTER_A_PAUSE]["cell"] == [3.0, 3.0]
    assert all(0 <= seconds < 1 for seconds in times[AFTER_A_PAUSE]["plain"])


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=BENCHMARKS.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ratios(output: str, pattern: str) -> list[float]:
    return [float(value) for value in re.findall(pattern, output)]


@pytest.mark.slow
def test_executor_benchmark_prints_each_ratio_in_each_state():
    output = _run("bench_executor.py", "--rows", "20000", "--repeat", "1")
    for workload in ("group-by over 20,000 rows", "20,000 x 7 join 100 x 5, then aggregate"):
        for state in STATES:
            block = output.split(f"{workload}, {state}:\n", 1)[1].split("\n\n", 1)[0]
            for side in ("bastion in process", "bastion worker process"):
                assert len(_ratios(block.split(f"  {side}:", 1)[1].split("\n", 1)[0], r"ratio (\d+\.\d+)")) == 1


@pytest.mark.slow
def test_whole_path_benchmark_prints_each_ratio_in_each_state():
    output = _run("bench_whole_path.py", "--repeat", "5", "--rows", "20000", "--large-repeat", "1")
    for workload in ("group-by", "join then group-by"):
        for state in STATES:
            line = re.search(rf"^{workload}, {state}, whole cell .*$", output, re.MULTILINE)
            assert line is not None, output
            assert len(_ratios(line.group(0), r"ratio (\d+\.\d+) to plain")) == 1
    assert re.search(r"overhead \(paired, per iteration\): median \d+\.\d+ ms", output), output
