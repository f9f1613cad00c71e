"""What the process-level benchmarks share: data, a real executor, scientists, statistics.

The executor, workspaces and keys are made with the test suite's own helpers
(``tests/conftest.py``: :func:`make_keys`, :func:`start_executor`), so a
benchmark measures exactly the processes the end-to-end tests check.
Everything runs on 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import polars as pl

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import ExecutorProcess, KeyPair, make_keys, start_executor  # noqa: E402
from owner_console.workspace import Workspace  # noqa: E402
from wire import RawClient  # noqa: E402

__all__ = ["ExecutorProcess", "KeyPair", "RawClient", "machine", "make_table", "served", "percentile",
           "summary", "proc_status_bytes", "cpu_seconds", "process_tree", "STATES", "rounds_in_states", "timed"]


def machine() -> str:
    """One line naming the machine: CPU model, cores, memory, python and polars versions."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    memory = proc_meminfo_bytes("MemTotal") / 2**30
    return (f"machine: {model}, {os.cpu_count()} cores, {memory:.1f} GiB, {platform.machine()}, "
            f"python {platform.python_version()}, polars {pl.__version__}")


def proc_meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def proc_status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM`` peak RSS, ``VmRSS``) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of processes (all their threads), from ``/proc/PID/stat``; gone ones count 0.

    CPU time is what a benchmark can compare when other work shares the
    machine: a wall time then also measures waiting for a core.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / tick


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the executor and its query worker processes)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stack.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass
    return found


def tree_memory_bytes(pid: int) -> tuple[int, int, int]:
    """``(sum of PSS, sum of RSS, sum of anonymous memory)`` over a process tree.

    PSS (proportional set size) charges each shared page to the processes that
    map it in equal parts, so a dataset memory-mapped by several worker
    processes counts once in the sum; the sum of RSS counts it once per process.
    Anonymous memory leaves out file pages (a mapped file's pages are page
    cache, which the kernel can drop under a memory limit).
    """
    totals = {"Pss:": 0, "Rss:": 0, "Anonymous:": 0}
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                field = line.split(None, 1)[0] if line else ""
                if field in totals:
                    totals[field] += int(line.split()[1]) * 1024
        except OSError:
            continue  # a worker that just ended
    return totals["Pss:"], totals["Rss:"], totals["Anonymous:"]


def tree_breakdown(pid: int) -> str:
    """One ``pid: PSS / private`` entry per process of the tree, in MB."""
    parts = []
    for member in process_tree(pid):
        try:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in
                      Path(f"/proc/{member}/smaps_rollup").read_text().splitlines()[1:]}
        except (OSError, ValueError, IndexError):
            continue
        private = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        parts.append(f"{member}: PSS {fields.get('Pss', 0) // 1000} MB, private {private // 1000} MB")
    return "; ".join(parts)


class PeakSampler:
    """Samples :func:`tree_memory_bytes` every ``interval`` seconds on a thread; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.02):
        import threading
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = self.peak_anonymous = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss, anonymous = tree_memory_bytes(self.pid)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_anonymous = max(self.peak_anonymous, anonymous)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_table(rows: int) -> pl.DataFrame:
    """A deterministic table of ``rows`` rows (seeded hashes; polars only, no numpy).

    Columns: ``id``, ``key`` (100 values), ``group`` (50 values), ``a`` in
    [-1, 1), ``b`` in [0, 10), ``c`` (1000 values), ``d`` in [0, 1), and ``label``
    (a short string).
    """
    def uniform(seed: int) -> pl.Expr:
        return (pl.col("id").hash(seed) % 1_000_003).cast(pl.Float64) / 1_000_003

    return pl.select(pl.int_range(0, rows, dtype=pl.Int64).alias("id")).with_columns(
        (pl.col("id").hash(1) % 100).cast(pl.Int64).alias("key"),
        (pl.col("id").hash(2) % 50).cast(pl.Int64).alias("group"),
        (uniform(3) * 2 - 1).alias("a"),
        (uniform(4) * 10).alias("b"),
        (pl.col("id").hash(5) % 1000).cast(pl.Int64).alias("c"),
        uniform(6).alias("d"),
        pl.format("p{}", pl.col("id").hash(7) % 100_000).alias("label"),
    )


@contextlib.contextmanager
def served(datasets: dict[str, tuple[Path, dict]], scientists: Sequence[str],
           directory: Path | None = None,
           configure: Callable[[Workspace], None] | None = None) -> Iterator[ExecutorProcess]:
    """A workspace with ``datasets`` (name -> (file, add_dataset options)), ``scientists``
    registered, and a real ``bastion-owner serve`` on 127.0.0.1 (stopped on exit).
    ``configure(workspace)`` runs before the executor starts (its ``config.toml``).
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bastion-bench-")))
        workspace = Workspace(directory / "workspace")
        workspace.init()
        for name, (path, options) in datasets.items():
            workspace.add_dataset(name, path, **options)
        keys: dict[str, KeyPair] = {}
        for name in scientists:
            keys[name] = make_keys(directory / "keys" / name, name)
            workspace.add_scientist(name, keys[name].public_file)
        if configure is not None:
            configure(workspace)
        running = start_executor(workspace.path, keys, ready_as=scientists[0])
        try:
            yield running
        finally:
            running.stop()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank (no interpolation: p99 is an observed value)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def summary(values_seconds: Sequence[float]) -> str:
    """``median X ms, p99 Y ms (n=N)``."""
    return (f"median {statistics.median(values_seconds) * 1000:.2f} ms, "
            f"p99 {percentile(values_seconds, 99) * 1000:.2f} ms (n={len(values_seconds)})")


# The two states every side of a ratio is timed in (see rounds_in_states).
BACK_TO_BACK, AFTER_A_PAUSE = "back to back", "after a pause"
STATES = (BACK_TO_BACK, AFTER_A_PAUSE)
# Idle time before a call timed "after a pause": a scientist's cells are at least this far apart, and it is
# long enough for every process's threads to be asleep when the call comes.
PAUSE_SECONDS = 0.1

Sample = float | Mapping[str, float]


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a function that returns the seconds it took (for :func:`rounds_in_states`)."""
    def call() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return call


def rounds_in_states(functions: Mapping[str, Callable[[], Sample]], repeat: int, warmup: int = 1,
                     pause: float = PAUSE_SECONDS) -> dict[str, dict[str, list[float]]]:
    """Time every function in the same two states, in rounds whose order rotates.

    On a two-core machine a query timed right after an identical one (the
    same query, on the same data, in the same process) runs several per cent
    faster than after anything else or after a pause: measured on the
    10M-row group-by, plain polars 49.6 ms after itself against 52.4 ms after
    50 ms idle and 52.6 ms after the executor's query.  So a fixed order in
    which plain polars' streaming engine follows its in-memory engine, while
    Bastion's call follows other work, favours plain polars.  Here every side
    is timed in both states:

    - **back to back**: the function runs twice in a row and the second run
      is timed (every side warm from its own identical run: each at its best);
    - **after a pause**: the function is timed after ``pause`` seconds idle,
      as a cell comes after the scientist's own time.

    Parameters
    ----------
    functions : Mapping[str, Callable]
        Each returns the seconds it measured (:func:`timed` makes one), or
        several labelled spans ``{label: seconds}`` (its own name among them).
    repeat : int
        Timed rounds, after ``warmup`` untimed ones.

    Returns
    -------
    dict
        ``{state: {label: [seconds, one per round]}}``.
    """
    times: dict[str, dict[str, list[float]]] = {state: {name: [] for name in functions} for state in STATES}
    order = list(functions.items())
    for round_index in range(warmup + repeat):
        shift = round_index % len(order)
        for name, fn in order[shift:] + order[:shift]:
            fn()
            samples = [(BACK_TO_BACK, fn())]
            time.sleep(pause)
            samples.append((AFTER_A_PAUSE, fn()))
            if round_index < warmup:
                continue
            for state, sample in samples:
                spans = sample if isinstance(sample, Mapping) else {name: sample}
                for label, seconds in spans.items():
                    times[state].setdefault(label, []).append(seconds)
    return times
