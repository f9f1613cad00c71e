"""Checked plan -> polars: the only module that builds and runs polars queries.

Every frame operation and every expression function is compiled from an
explicit dispatch table keyed by the plan's names; a plan-supplied name is
never used to look up an attribute, and no polars plan is ever deserialized.

The accounting layer (:mod:`owner_console.policy`) adds a few internal frame
operations and expression kinds (``acct_*``) to a plan before it gets here.
They live in tables of their own and are only reachable from a plan the policy
built: the validator refuses any name outside the public tables.

Datasets are read once by :class:`DatasetCache`, shared by every session and
thread, except large files (:func:`is_streamed`), which are scanned
lazily and run on polars' streaming engine.  Given a cache directory, the
cache keeps each dataset as an uncompressed Arrow IPC file there and memory-maps
it, so that the executor's query worker processes (:mod:`owner_console.workers`)
share one copy through the operating system's page cache.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import logging
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import polars as pl

from bastion_kernel.contract import local, plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from .model import Dataset

log = logging.getLogger("bastion.executor")

RESERVED_PREFIX = "__bastion"
# Row ids given to at most this many source rows are also written as bit words (id i: bit i % 64 of word
# i // 64), so that distinct ids per group are counted by OR-ing words instead of hashing ids (n_unique):
# see _Compiler._acct_row_id and _Compiler._distinct_ids.
BITSET_MAX_ROWS = 256
_BITS = pl.Series("bits", [1 << i for i in range(64)], dtype=pl.UInt64)
# Frame operations that never add rows (the row-count bound of _Compiler._row_bound passes through them).
_ROW_KEEPING_OPS = frozenset({"filter", "sort", "head", "slice", "drop_nulls", "unique", "drop", "rename",
                              "with_columns", "fill_null", "acct_unique"})
MAX_REPEAT = 1_000  # largest count repeat_by honours (explode sizes are not pre-checked like joins)
ACCOUNT_DTYPE = pl.Int64  # every accounting column has this dtype, so frames line up in concat


# ---------------------------------------------------------------- datasets
class DatasetCache:
    """Registered datasets, each read once and shared (thread-safe).

    A dataset is keyed by its resolved path, modification time and size, so a
    file the owner replaces is read again on next use.

    Parameters
    ----------
    shared_dir : Path, optional
        Where to keep each dataset version as an uncompressed Arrow IPC file,
        memory-mapped by every process that reads it: the table's pages are
        then held once by the operating system, however many worker
        processes query it.  Without it, each cache reads datasets into its
        own process's memory.
    """

    def __init__(self, shared_dir: Path | None = None) -> None:
        self._shared_dir = None if shared_dir is None else Path(shared_dir)
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}
        self._frames: dict[str, tuple[tuple[int, int], pl.DataFrame]] = {}
        # path -> (file version checked, {key columns: unique?}): see unique_keys
        self._unique: dict[str, tuple[tuple[int, int], dict[tuple[str, ...], bool]]] = {}

    def frame(self, dataset: Dataset) -> pl.DataFrame:
        """The dataset's table (read on first use, then from memory).

        Raises
        ------
        BastionError
            ``ExecutionError`` when the file cannot be read (no path or data in the message).
        """
        path = str(Path(dataset.path).resolve())
        try:
            stat = Path(path).stat()
        except OSError as exc:
            raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                                 f"({type(exc).__name__})") from None
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._frames.get(path)
            if cached is not None and cached[0] == version:
                return cached[1]
            path_lock = self._path_locks.setdefault(path, threading.Lock())
        with path_lock:  # one reader per file; other files load in parallel
            with self._lock:
                cached = self._frames.get(path)
                if cached is not None and cached[0] == version:
                    return cached[1]
            table = _read(dataset, path) if self._shared_dir is None else self._read_shared(dataset, path, version)
            with self._lock:
                self._frames[path] = (version, table)
            return table

    def _read_shared(self, dataset: Dataset, path: str, version: tuple[int, int]) -> pl.DataFrame:
        """The dataset memory-mapped from its Arrow IPC copy in the shared directory (written on first use).

        Each file version has its own name, written by one process at a time
        (a lock file) to a temporary file and renamed into place, so a process
        never maps a half-written copy.  Copies of older
        versions are removed; a process still mapping one keeps its pages
        until it lets go (POSIX unlink semantics).
        """
        assert self._shared_dir is not None
        source_key = hashlib.sha256(path.encode()).hexdigest()[:24]
        target = self._shared_dir / f"{source_key}-{version[0]}-{version[1]}.arrow"
        if not target.exists():
            self._shared_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # One process writes the copy while the others wait for it: several workers reading a large
            # file at once would each hold it whole in their own memory for a while.
            with open(self._shared_dir / f".{source_key}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not target.exists():
                    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
                    failure = _write_shared_copy(dataset, path, partial)
                    if failure is not None:
                        # An unreadable source gets its typed error from _read; a copy that could not be
                        # written (no room, no rights) leaves this process serving from its own memory.
                        partial.unlink(missing_ok=True)
                        log.warning("no shared copy of dataset %r (%s)", dataset.name, failure)
                        return _read(dataset, path)
                    os.replace(partial, target)
                    for stale in self._shared_dir.glob(f"{source_key}-*.arrow"):
                        if stale != target:
                            stale.unlink(missing_ok=True)
        try:
            # rechunk=False: joining the written batches into one would copy the table out of the mapping.
            return pl.read_ipc(target, memory_map=True, rechunk=False)
        except Exception as exc:  # noqa: BLE001 - a damaged copy: drop it, the next use writes it again
            target.unlink(missing_ok=True)
            raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                                 f"({type(exc).__name__})") from None

    def unique_keys(self, dataset: Dataset, columns: tuple[str, ...], table: pl.DataFrame | None = None) -> bool:
        """True when no two rows of the dataset share a value of ``columns`` (cached per file version).

        With ``table``, the answer is about that table, and False unless it is
        the dataset's current version (a file replaced meanwhile).  A streamed
        dataset answers False (the check would read it whole).  The answer is
        never released: it only chooses how the policy counts.
        """
        if is_streamed(dataset):
            return False
        current = self.frame(dataset)
        if table is not None and table is not current:
            return False
        path = str(Path(dataset.path).resolve())
        columns = tuple(columns)
        with self._lock:
            cached = self._frames.get(path)
            if cached is None or cached[1] is not current:
                return False  # replaced while we looked
            version = cached[0]
            checked = self._unique.get(path)
            if checked is not None and checked[0] == version and columns in checked[1]:
                return checked[1][columns]
        try:
            unique = not current.select(pl.struct(list(columns)).is_duplicated().any()).item()
        except Exception:  # noqa: BLE001 - a key that cannot be checked is treated as not unique
            unique = False
        with self._lock:
            checked = self._unique.get(path)
            if checked is None or checked[0] != version:
                checked = self._unique[path] = (version, {})
            checked[1][columns] = unique
        return unique

    def lazy(self, dataset: Dataset) -> pl.LazyFrame:
        """A query's input: a lazy scan of a large file (see :func:`is_streamed`), else the cached table."""
        if is_streamed(dataset):
            return _source(dataset, str(dataset.path))
        return self.frame(dataset).lazy()

    def columns(self, dataset: Dataset) -> tuple[str, ...]:
        """Column names of a dataset."""
        return tuple(self._schema(dataset).names())

    def schema(self, dataset: Dataset) -> list[tuple[str, str]]:
        """``[(column, dtype name), ...]`` of a dataset."""
        return [(name, dtype_name(dtype)) for name, dtype in self._schema(dataset).items()]

    def _schema(self, dataset: Dataset) -> pl.Schema:
        if not is_streamed(dataset):
            return self.frame(dataset).schema
        try:  # the file's footer only: a streamed dataset is never read whole
            return _source(dataset, str(dataset.path)).collect_schema()
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes one typed, value-free error
            raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                                 f"({type(exc).__name__})") from None


# A Parquet file at least this large is never read into memory: queries scan it
# lazily and run on polars' streaming engine, in bounded memory (a dataset
# larger than the executor's memory would otherwise abort the process: Rust
# aborts on a failed allocation).  Smaller files are read once and shared,
# which is much faster for repeated queries.  None: one eighth of the memory
# the executor may use (see streaming_threshold); a Parquet file is typically
# 2-4x smaller than its table in memory.
STREAMING_MIN_BYTES: int | None = None
_STREAMING_FLOOR_BYTES = 64 * 2**20


def streaming_threshold() -> int:
    """The Parquet file size from which a dataset is streamed (see :data:`STREAMING_MIN_BYTES`).

    Derived from the smallest of physical memory, the process's address-space
    limit and its cgroup's memory limit, read at each call so a limit set
    while the executor runs (``prlimit``) applies to the next query.
    """
    if STREAMING_MIN_BYTES is not None:
        return STREAMING_MIN_BYTES
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    cgroup = _current_cgroup_memory_limit()
    if cgroup is not None:
        limits.append(cgroup)
    return max(_STREAMING_FLOOR_BYTES, min(limits) // 8)


_CGROUP_LIMIT_TTL_SECONDS = 1.0
_cgroup_limit_read: tuple[float, int | None] = (float("-inf"), None)


def _current_cgroup_memory_limit() -> int | None:
    """:func:`_cgroup_memory_limit`, read at most once a second (a query asks several times; each read is
    about 33 us of file reads)."""
    global _cgroup_limit_read
    at, limit = _cgroup_limit_read
    now = time.monotonic()
    if now - at > _CGROUP_LIMIT_TTL_SECONDS:
        limit = _cgroup_memory_limit()
        _cgroup_limit_read = (now, limit)
    return limit


def _cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The memory limit of this process's own cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``).

    Read again (at most once a second, :func:`_current_cgroup_memory_limit`): the
    owner may move the executor into a cgroup while it runs.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2: one unified hierarchy
            candidates.append(Path(root, relative, "memory.max"))
        elif "memory" in controllers.split(","):
            candidates.append(Path(root, "memory", relative, "memory.limit_in_bytes"))
    limits = []
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge page-rounded number (v1) means no limit.
        if text.isdigit() and int(text) < 2**62:
            limits.append(int(text))
    return min(limits) if limits else None


def is_streamed(dataset: Dataset) -> bool:
    """True for a dataset whose file is at least :func:`streaming_threshold` bytes (Parquet or CSV).

    A CSV file is typically larger than its table in memory, so the same
    threshold is conservative for it; it is scanned with the same options as
    a CSV read whole (:data:`_SOURCES`), so its columns and types are the same.
    """
    try:
        return dataset.format in _SOURCES and Path(dataset.path).stat().st_size >= streaming_threshold()
    except OSError:
        return False  # the in-memory path reports the unreadable file


# A source file smaller than this is copied inside the process that needs it (a new process would cost more
# than the copy); a larger one by a short-lived process of its own (see _write_shared_copy).
COPY_IN_PROCESS_MAX_BYTES = 64 * 2**20


def _write_shared_copy(dataset: Dataset, path: str, destination: Path) -> str | None:
    """Write a dataset's uncompressed Arrow IPC copy; the failure's class name, or None.

    The copy is streamed from the source file (never whole in memory).  A
    large file is copied by a short-lived process of its own, so that the
    memory the conversion used (polars' allocator keeps what it freed: about
    450 MB for a 10M-row Parquet file) is returned as soon as it ends.
    """
    if dataset.format not in _SOURCES:
        return "unsupported format"
    try:
        small = Path(path).stat().st_size < COPY_IN_PROCESS_MAX_BYTES
    except OSError as exc:
        return type(exc).__name__
    if small:
        return _sink_copy(dataset.format, path, str(destination))
    done = subprocess.run([sys.executable, "-m", "owner_console.engine", dataset.format, path, str(destination)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return done.stdout.strip()[:64] or f"the copy ended with status {done.returncode}"


def _sink_copy(file_format: str, source: str, destination: str) -> str | None:
    try:
        _SOURCES[file_format](source).sink_ipc(destination, compression="uncompressed")
    except Exception as exc:  # noqa: BLE001 - the class only: polars' message can quote the file's values
        return type(exc).__name__
    return None


def _copy_main(argv: list[str]) -> int:
    """``python -m owner_console.engine FORMAT SOURCE DESTINATION``: see :func:`_write_shared_copy`."""
    failure = _sink_copy(*argv)
    if failure is not None:
        print(failure)
        return 1
    return 0


_SOURCES: dict[str, Callable[[str], pl.LazyFrame]] = {
    "csv": lambda p: pl.scan_csv(p, try_parse_dates=True),
    "parquet": pl.scan_parquet,
}


def _source(dataset: Dataset, path: str) -> pl.LazyFrame:
    """A lazy scan of a dataset's file (both :func:`_read` and the shared copies read through it)."""
    scan_file = _SOURCES.get(dataset.format)
    if scan_file is None:
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} has an unsupported format")
    try:
        return scan_file(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one typed, value-free error
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                             f"({type(exc).__name__})") from None


def source_schema(dataset: Dataset) -> pl.Schema:
    """A dataset's column names and polars types as the executor reads them (the file's header or footer only)."""
    try:
        return _source(dataset, str(dataset.path)).collect_schema()
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one typed, value-free error
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                             f"({type(exc).__name__})") from None


def _read(dataset: Dataset, path: str) -> pl.DataFrame:
    source = _source(dataset, path)
    try:
        return source.collect()
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one typed, value-free error
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                             f"({type(exc).__name__})") from None


DEFAULT_CACHE = DatasetCache()


def dtype_name(dtype: Any) -> str:
    """A polars dtype as the text a scientist sees (``Int64``, ``String``, ``Date``...)."""
    return str(dtype)


# ---------------------------------------------------------------- entry points
def compile_plan(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None) -> pl.LazyFrame:
    """Build the polars query of a checked (and possibly accounted) plan.

    Schema problems (a type that does not fit, a join on mismatched key types)
    surface here, node by node, as ``SchemaError``; no data is read except the
    cached datasets themselves.
    """
    return _Compiler(catalog, cache or DEFAULT_CACHE).frame(plan)


def run(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None, *,
        cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
    """Compile and collect a checked plan.

    Parameters
    ----------
    cancel : threading.Event, optional
        Set by another thread to stop waiting for the query (a scientist's ``cancel``).
    timeout : float, optional
        Seconds the query may run before it is cancelled.

    Raises
    ------
    BastionError
        ``SchemaError`` while compiling, ``ExecutionError`` while running: the
        message names the kind of failure only, never a data value.
        ``LimitExceeded`` after ``timeout``; ``ExecutionError`` with
        ``details["cancelled"]`` when ``cancel`` was set.
    """
    query = compile_plan(plan, catalog, cache)
    streaming = _streams(plan, catalog)
    try:
        if cancel is None and timeout is None:
            return _collect(query, streaming)
        return _collect_cancellable(query, cancel, timeout, streaming)
    except BastionError:
        raise
    except MemoryError:
        raise BastionError("LimitExceeded", "the query needs more memory than the executor has") from None
    except BaseException as exc:  # noqa: BLE001 - polars messages can quote data values: keep only the class
        if not isinstance(exc, Exception) and not is_polars_panic(exc):
            raise  # KeyboardInterrupt, SystemExit
        raise BastionError("ExecutionError",
                           "the query failed while running, for example on an operation whose types do not fit; "
                           "the message is the same for every failure because what failed can depend on rows "
                           "that are not released",
                           error_class=type(exc).__name__) from None


# Run queries on polars' streaming engine, not only those over streamed datasets.  Measured on a filtered group-by
# over a memory-mapped 10M-row table (the memory benchmark's query): 44 ms instead of 70 ms, and 15 MB of working
# memory instead of 265 MB, which is what lets several queries run at once within the memory target.  Operations
# the streaming engine does not implement fall back to the in-memory engine inside polars; joins keep their order
# explicitly (_Compiler._join), as the in-memory engine does.  Cross joins stay on the in-memory engine: polars
# 1.36's streaming cross join panics on some inputs.
STREAM_EVERY_QUERY = True


def _streams(plan: dict, catalog: Mapping[str, Dataset]) -> bool:
    """True when the plan runs on the streaming engine (see :data:`STREAM_EVERY_QUERY`, :func:`is_streamed`)."""
    names = walk.source_names(plan)
    if any(name in catalog and is_streamed(catalog[name]) for name in names):
        return True
    return STREAM_EVERY_QUERY and not _has_cross_join(plan)


def _has_cross_join(plan: Any) -> bool:
    return any(node.get("op") == "join" and node.get("how") == "cross" for node in walk.json_objects(plan))


def is_polars_panic(exc: BaseException) -> bool:
    """True for a Rust panic inside polars, which pyo3 raises as ``PanicException`` (a ``BaseException``)."""
    return type(exc).__name__ == "PanicException"


def _collect(query: pl.LazyFrame, streaming: bool) -> pl.DataFrame:
    if not streaming:
        return query.collect()
    try:
        return query.collect(engine="streaming")
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        if not is_polars_panic(exc):
            raise
        # A panic inside polars' streaming engine is a polars bug, not the query's fault: the in-memory engine
        # is the reference, so the query is answered there (a streamed dataset's query may then need more memory,
        # which costs at most the worker process that runs it).
        log.warning("polars' streaming engine failed on a query (%s); ran it on the in-memory engine", exc)
        return query.collect()


# While a query runs, the worker waits on its completion event and wakes at
# these intervals only to look at the cancel flag and the deadline.
_FIRST_POLL_SECONDS = 0.005
_MAX_POLL_SECONDS = 0.05
# Cancelled queries that polars is still computing (see _Running.abandon);
# past this many, new cancellable queries are refused until some finish.
MAX_ABANDONED_QUERIES = 8
_abandoned = 0
_abandoned_lock = threading.Lock()


def abandoned_queries() -> int:
    """How many cancelled or timed-out queries polars is still computing."""
    return _abandoned


class _HelperThreads:
    """Daemon threads that wait for (or run) queries, reused: starting a thread costs about a millisecond on a
    busy machine.  A thread is added whenever none is idle, so a task never waits for another to end; daemon
    threads, so a query polars is still computing never holds up the executor's exit."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, task: Callable[..., None], *args: Any) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that idle thread, blocked in get(), takes a task
        self._tasks.put((task, args))
        if spawn:
            threading.Thread(target=self._work, name="bastion-query", daemon=True).start()

    def _work(self) -> None:
        while True:
            task, args = self._tasks.get()
            try:
                task(*args)
            except BaseException:  # noqa: BLE001 - tasks report their own errors; the thread serves on
                pass
            with self._lock:
                self._idle += 1


_QUERY_THREADS = _HelperThreads()


class _Running:
    """A query collected on a helper thread, which signals an event when it ends.

    In-memory queries run in polars' background mode (``InProcessQuery``,
    whose ``cancel()`` polars honours between some operators); the helper
    thread holds the handle until polars is done, because polars 1.36 aborts
    the whole process (a Rust panic in a rayon thread) when a background
    query's handle is dropped before it finishes.  Streamed queries run
    ``collect(engine="streaming")`` on the helper thread: polars 1.36's
    ``collect(background=True)`` ignores the streaming engine.
    """

    def __init__(self, query: pl.LazyFrame, streaming: bool):
        self._done = threading.Event()
        self._abandoned = False
        self._result: pl.DataFrame | None = None
        self._error: BaseException | None = None
        self._handle = None if streaming else query.collect(background=True)
        _QUERY_THREADS.submit(self._collect, query)

    def _collect(self, query: pl.LazyFrame) -> None:
        global _abandoned
        try:
            if self._handle is not None:
                self._result = self._handle.fetch_blocking()
            else:
                self._result = _collect(query, streaming=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting worker by outcome()
            self._error = exc
        finally:
            self._done.set()
            with _abandoned_lock:
                if self._abandoned:  # nobody wants this result or its error
                    self._result = self._error = None
                    _abandoned -= 1

    def wait(self, seconds: float) -> bool:
        """True once the query has ended (at once when it ends within ``seconds``)."""
        return self._done.wait(seconds)

    def outcome(self) -> pl.DataFrame:
        """The result of an ended query; raises the query's own exception."""
        if self._error is not None:
            raise self._error
        return self._result

    def abandon(self) -> None:
        """Stop waiting: ask polars to cancel, and count the query until polars lets it go."""
        global _abandoned
        if self._handle is not None:
            self._handle.cancel()
        with _abandoned_lock:
            if not self._done.is_set():
                self._abandoned = True
                _abandoned += 1


def _collect_cancellable(query: pl.LazyFrame, cancel: threading.Event | None,
                         timeout: float | None, streaming: bool = False) -> pl.DataFrame:
    """Collect on a helper thread, giving up at ``timeout`` or when ``cancel`` is set.

    Giving up frees the calling worker thread at once.  polars 1.36 only
    honours ``InProcessQuery.cancel()`` between some of its operators (and a
    streaming query not at all), so the computation itself may run on until
    it ends; its result is then dropped.
    """
    if _abandoned >= MAX_ABANDONED_QUERIES:
        raise BastionError("LimitExceeded", "the executor is still winding down earlier cancelled queries; "
                                            "try again in a little while", limit="abandoned_queries")
    if cancel is not None and cancel.is_set():
        raise BastionError("ExecutionError", "the query was cancelled at your request", cancelled=True)
    running = _Running(query, streaming)
    deadline = None if timeout is None else time.monotonic() + timeout
    wait_or_stop(running.wait, running.abandon, cancel, deadline, timeout)
    return running.outcome()


def wait_or_stop(wait: Callable[[float], bool], stop: Callable[[], None], cancel: threading.Event | None,
                 deadline: float | None, timeout: float | None,
                 on_tick: Callable[[float], None] | None = None) -> None:
    """Wait for a running query until ``wait(seconds)`` says it ended; ``stop()`` it on cancel or at the deadline.

    ``wait`` returns at once when the query ends; between waits (5 ms at
    first, then up to 50 ms) the cancel flag and the deadline are looked at,
    and ``on_tick(seconds running)`` is called.

    Raises
    ------
    BastionError
        ``ExecutionError`` with ``details["cancelled"]`` after ``cancel`` was
        set; ``LimitExceeded`` at ``deadline`` (``timeout`` seconds after the start).
    """
    started = time.monotonic()
    pause = _FIRST_POLL_SECONDS
    while True:
        step = pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic()))
        if wait(step):
            return
        if cancel is not None and cancel.is_set():
            stop()
            raise BastionError("ExecutionError", "the query was cancelled at your request", cancelled=True)
        if deadline is not None and time.monotonic() >= deadline:
            stop()
            raise BastionError("LimitExceeded", f"the query ran longer than {timeout:g} s and was cancelled",
                               limit="query_timeout_seconds", seconds=timeout)
        if on_tick is not None:
            on_tick(time.monotonic() - started)
        pause = min(pause * 2, _MAX_POLL_SECONDS)


def join_sizes(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None) -> list[int]:
    """How many rows each join of a checked plan produces, computed from per-key counts, without the join.

    Semi and anti joins never produce more rows than their left side and are
    left out.  Used to enforce a policy's ``max_join_rows`` before a join
    can exhaust the executor's memory.
    """
    sizes = []
    stack = [plan]
    while stack:
        node = stack.pop()
        for key in ("input", "left", "right"):
            if isinstance(node.get(key), dict):
                stack.append(node[key])
        stack.extend(node.get("inputs", []))
        if node.get("op") != "join" or node["how"] in ("semi", "anti"):
            continue
        left, right = compile_plan(node["left"], catalog, cache), compile_plan(node["right"], catalog, cache)
        streaming = _streams(node, catalog)
        if node["how"] == "cross":
            sizes.append(int(_collect(left.select(pl.len()), streaming).item()) *
                         int(_collect(right.select(pl.len()), streaming).item()))
            continue
        keys = [f"k{i}" for i in range(len(node["left_on"]))]
        left_counts = left.group_by([pl.col(k["name"]).alias(n) for k, n in zip(node["left_on"], keys)]) \
            .agg(pl.len().cast(pl.Int64).alias("l"))
        right_counts = right.group_by([pl.col(k["name"]).alias(n) for k, n in zip(node["right_on"], keys)]) \
            .agg(pl.len().cast(pl.Int64).alias("r"))
        matched = left_counts.join(right_counts, on=keys, how="left")
        if node["how"] == "inner":
            total = matched.select((pl.col("l") * pl.col("r")).sum())
        else:  # left and full: unmatched left rows appear once
            total = matched.select((pl.col("l") * pl.col("r").fill_null(1)).sum())
        size = int(_collect(total, streaming).item() or 0)
        if node["how"] == "full":
            size += int(_collect(right_counts.join(left_counts, on=keys, how="anti").select(pl.col("r").sum()),
                                 streaming).item() or 0)
        sizes.append(size)
    return sizes


def output_schema(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None) -> list[tuple[str, str]]:
    """``[(column, dtype name), ...]`` a checked plan would produce, without running it."""
    schema = _resolve(compile_plan(plan, catalog, cache), plan.get("op", "plan"))
    return [(name, dtype_name(dtype)) for name, dtype in schema.items()]


def _resolve(frame: pl.LazyFrame, op: str) -> Any:
    try:
        return frame.collect_schema()
    except Exception as exc:  # noqa: BLE001
        # Resolving a schema reads no data, so polars' first line names only columns and types.
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BastionError("SchemaError", f"{op} does not fit the columns' types: {first_line}",
                           op=op, error_class=type(exc).__name__) from None


# ---------------------------------------------------------------- expression tables
# The expression tables are the language's own (bastion_kernel.contract.local also
# runs them on the scientist's fetched results); the executor overrides the
# functions whose failure or size could depend on rows that are never released.
_DTYPES = local.DTYPES
_BINARY = local.BINARY
_UNARY = local.UNARY
_Fn = local.Fn
_FUNCTIONS: dict[str, _Fn] = {
    **local.FUNCTIONS,
    # A negative count would fail only for some rows (an oracle), a huge one
    # would exhaust memory: counts are kept within 0..MAX_REPEAT.
    "repeat_by": lambda e, a, s: e.repeat_by(s(a["by"]).cast(pl.Int64, strict=False).clip(0, MAX_REPEAT)),
    # Conversions always run non-strict (a value that does not convert becomes
    # null): a strict failure would tell the scientist that some row with such
    # a value exists, even in a filtered, never-released result.
    "cast": lambda e, a, s: e.cast(_DTYPES[a["dtype"]], strict=False),
    "str.to_date": lambda e, a, s: e.str.to_date(a["format"], strict=False),
    "str.to_datetime": lambda e, a, s: e.str.to_datetime(a["format"], strict=False),
}


def _account_distinct(node: dict) -> pl.Expr:
    """Distinct source rows in a group, from a row-id column (null: not fed, 0: unmatched join side)."""
    c = pl.col(node["column"])
    count = c.filter(c > 0).n_unique() if node["taintable"] or node["nullable"] else c.n_unique()
    return _guarded(node, c, count)


def _account_sum(node: dict) -> pl.Expr:
    """Source rows in a group, from per-row counts; ``exact`` is False when rows may share source rows."""
    c = pl.col(node["column"])
    total = c.sum() if node["exact"] else pl.lit(1, dtype=ACCOUNT_DTYPE)
    return _guarded(node, c, total)


def _guarded(node: dict, c: pl.Expr, count: pl.Expr) -> pl.Expr:
    # Order matters: an empty group is fed by 0 rows; a group with an unmatched
    # join row is marked 0 (fails the rule); a group with no row from this
    # source is null (not fed by it).
    if not (node["taintable"] or node["nullable"] or node["global"]):
        return count.alias(node["name"])
    expr = pl.when(pl.len() == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    if node["nullable"]:
        expr = expr.when(c.is_null().all()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
    if node["taintable"]:
        expr = expr.when((c == 0).any()).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
    return expr.otherwise(count).alias(node["name"])


def _account_one_row(node: dict) -> pl.Expr:
    """Each row now holds individual values: it counts as fed by one source row."""
    c = pl.col(node["column"])
    return (pl.when(c.is_null()).then(pl.lit(None, dtype=ACCOUNT_DTYPE))
            .when(c == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.lit(1, dtype=ACCOUNT_DTYPE)).alias(node["name"]))


def _account_unmatched(node: dict) -> pl.Expr:
    """After an outer join: 0 where the row had no partner on this source's side."""
    side = [pl.col(c).is_null() for c in node["side"]]
    return (pl.when(pl.all_horizontal(side)).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            .otherwise(pl.col(node["column"])).alias(node["column"]))


# Accounting expressions that yield polars' own count dtype (UInt32, or Float64
# for a share): the compiler casts their columns to ACCOUNT_DTYPE in a
# with_columns after the operation, because a cast inside ``agg`` takes
# polars off its fast group-by path (3.4x slower, benchmarks/RESULTS.md).
_UNCAST_ACCOUNTING = frozenset({"acct_len", "acct_distinct", "acct_sum", "acct_contrib", "acct_share",
                                "acct_held"})


def _cast_accounting(frame: pl.LazyFrame, exprs: list[dict]) -> pl.LazyFrame:
    names = [e["name"] for e in exprs if e["expr"] in _UNCAST_ACCOUNTING]
    return frame.with_columns(pl.col(names).cast(ACCOUNT_DTYPE)) if names else frame


_ACCOUNT_EXPRS: dict[str, Callable[[dict], pl.Expr]] = {
    "acct_col": lambda n: pl.col(n["name"]),
    "acct_const": lambda n: pl.lit(n["value"], dtype=ACCOUNT_DTYPE).alias(n["name"]),
    "acct_len": lambda n: pl.len().alias(n["name"]),
    "acct_distinct": _account_distinct,
    "acct_sum": _account_sum,
    "acct_one_row": _account_one_row,
    "acct_unmatched": _account_unmatched,
}


def _fewest_holders(values: pl.Expr) -> pl.Expr:
    """The fewest times one distinct value (null included) occurs in ``values`` (null when empty)."""
    return values.value_counts(name="count").struct.field("count").min()


# ---------------------------------------------------------------- compiler
class _Compiler:
    def __init__(self, catalog: Mapping[str, Dataset], cache: DatasetCache):
        self.catalog = catalog
        self.cache = cache
        self.scope: pl.LazyFrame | None = None  # the input of the expressions being compiled
        self.tables: dict[str, pl.DataFrame] = {}  # dataset -> the table its latest scan reads
        # Row-id column -> its bit-word columns (see BITSET_MAX_ROWS).
        self.row_words: dict[str, list[str]] = {}
        # While an aggregation is compiled: extra aggregations, and expressions evaluated on its output.
        self.extra_aggs: list[pl.Expr] | None = None
        self.post_aggs: list[pl.Expr] = []
        self.helper_columns: list[str] = []
        # Functions whose arguments are checked against the input's type while compiling.
        self.probed: dict[str, _Fn] = {"dt.strftime": self._strftime}
        self.ops: dict[str, Callable[[dict], pl.LazyFrame]] = {
            "scan": self._scan, "saved": self._saved, "filter": self._filter, "select": self._select,
            "with_columns": self._with_columns, "group_by": self._group_by, "sort": self._sort,
            "head": self._head, "drop": self._drop, "rename": self._rename, "drop_nulls": self._drop_nulls,
            "fill_null": self._fill_null, "unique": self._unique, "join": self._join,
            "concat": self._concat, "with_row_index": self._with_row_index,
            "slice": self._slice, "explode": self._explode,
            # internal operations, built only by owner_console.policy
            "acct_row_id": self._acct_row_id, "acct_columns": self._acct_columns,
            "acct_person_id": self._acct_person_id, "acct_unique": self._acct_unique,
        }
        self.exprs: dict[str, Callable[[dict], pl.Expr]] = {
            "col": lambda n: pl.col(n["name"]),
            "lit": lambda n: pl.lit(n["value"]),
            "len": lambda n: pl.len(),
            "binary": lambda n: _BINARY[n["op"]](self.expr(n["left"]),
                                                 self._exponent(n["right"]) if n["op"] == "pow" else
                                                 self.expr(n["right"])),
            "unary": lambda n: _UNARY[n["op"]](self.expr(n["operand"])),
            "alias": lambda n: self.expr(n["input"]).alias(n["name"]),
            "fn": self._fn,
            "when": self._when,
            **_ACCOUNT_EXPRS,
            "acct_distinct": self._acct_distinct,
            "acct_contrib": self._acct_contrib, "acct_share": self._acct_share,
            "acct_held": self._acct_held, "acct_finite": self._acct_finite,
            "acct_min": lambda n: pl.col(n["column"]).min().alias(n["name"]),
            "acct_max": lambda n: pl.col(n["column"]).max().alias(n["name"]),
        }

    def frame(self, node: dict) -> pl.LazyFrame:
        result = self.ops[node["op"]](node)
        _resolve(result, node["op"])  # surface type errors at the node that causes them
        return result

    def expr(self, node: dict) -> pl.Expr:
        return self.exprs[node["expr"]](node)

    def _exprs(self, nodes: list[dict]) -> list[pl.Expr]:
        return [self.expr(n) for n in nodes]

    def _on(self, frame: pl.LazyFrame) -> "_Compiler":
        """Compile the next expressions against ``frame`` (their input), for type-aware choices."""
        self.scope = frame
        return self

    def _strftime(self, e: pl.Expr, args: dict, sub: Callable[[dict], pl.Expr]) -> pl.Expr:
        # polars checks a format only against a non-null value, so a bad one
        # fails or not depending on which rows exist: try it on a sample
        # value of the column's type instead, before any data is read.
        dtype = _resolve(self.scope.select(e.alias("value")), "dt.strftime")["value"]
        try:
            pl.select(pl.lit(_SAMPLE_MOMENT).cast(dtype).dt.strftime(args["format"])).item()
        except Exception as exc:  # noqa: BLE001 - any failure of the probe is the format's
            raise BastionError("SchemaError", f"dt.strftime: the format cannot be applied to {dtype} values "
                                              "(for example %H on a Date)", op="dt.strftime",
                               error_class=type(exc).__name__) from None
        return e.dt.strftime(args["format"])

    def _fn(self, node: dict) -> pl.Expr:
        operand = self.expr(node["input"])
        if node["name"] in _AGGREGATIONS and _is_scalar(node["input"]):
            # polars 1.36 crashes the process (a segfault) aggregating a one-value input (a literal, len(), an
            # aggregate) inside group_by; head(1) keeps that one value and takes polars off the crashing path.
            operand = operand.head(1)
        handler = self.probed.get(node["name"], _FUNCTIONS[node["name"]])
        return handler(operand, node["args"], self._exponent if node["name"] == "pow" else self.expr)

    def _exponent(self, node: dict) -> pl.Expr:
        # polars turns an integer exponent into UInt32 and fails on a negative
        # or huge value, so whether a query fails would depend on the data (an
        # oracle on rows that are never released). Such exponents give null.
        exponent = self.expr(node)
        dtype = _resolve(self.scope.select(exponent.alias("exponent")), "pow")["exponent"]
        if dtype.is_integer():
            return pl.when((exponent >= 0) & (exponent <= _MAX_EXPONENT)).then(exponent)
        return exponent

    def _when(self, node: dict) -> pl.Expr:
        first, *rest = node["branches"]
        chain: Any = pl.when(self.expr(first["when"])).then(self.expr(first["then"]))
        for branch in rest:
            chain = chain.when(self.expr(branch["when"])).then(self.expr(branch["then"]))
        if node["otherwise"] is not None:
            return chain.otherwise(self.expr(node["otherwise"]))
        return chain

    @staticmethod
    def _user_columns(frame: pl.LazyFrame) -> list[str]:
        # Frame-wide operations (fill_null, drop_nulls and unique without a
        # subset) must never see the accounting columns.
        return [c for c in frame.collect_schema().names() if not c.startswith(RESERVED_PREFIX)]

    # frame operations --------------------------------------------------------
    def _scan(self, node: dict) -> pl.LazyFrame:
        dataset = self.catalog[node["dataset"]]
        if is_streamed(dataset):
            return self.cache.lazy(dataset)
        table = self.tables[node["dataset"]] = self.cache.frame(dataset)  # for acct_unique
        return table.lazy()

    def _saved(self, node: dict) -> pl.LazyFrame:
        return self.cache.lazy(self.catalog[node["name"]])

    def _filter(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.filter(self._on(frame).expr(node["predicate"]))

    def _select(self, node: dict) -> pl.LazyFrame:
        frame, _ = self._with_distances(self.frame(node["input"]), None, node["exprs"])
        return self._aggregate(frame, lambda exprs: frame.select(exprs), node["exprs"])

    def _with_columns(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return _cast_accounting(frame.with_columns(self._on(frame)._exprs(node["exprs"])), node["exprs"])

    def _group_by(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        self._on(frame)
        frame, keys = self._with_distances(frame, self._exprs(node["keys"]), node["aggs"])
        return self._aggregate(frame, lambda aggs: frame.group_by(keys).agg(aggs), node["aggs"])

    def _with_distances(self, frame: pl.LazyFrame, keys: list[pl.Expr] | None,
                        nodes: list[dict]) -> tuple[pl.LazyFrame, list[pl.Expr] | None]:
        """Give ``frame`` the columns the dominance checks of an aggregation read (:meth:`_acct_share`).

        ``keys``: the group_by's keys (None: one group, a global select).  Per
        check, a first aggregation finds each group's median, max and min of
        the aggregated values; joined back (row order kept), they give each
        row its distance from the median and mark the values that are not the
        max (min), whose max (min) is the second largest (smallest).  The
        aggregation itself then only sums, takes maxima and first values of
        plain columns, which keeps polars on its fast path.  Returns the frame
        and the keys to group it by (the key columns it now carries, under
        their output names).
        """
        shares = [n for n in nodes if n["expr"] == "acct_share" and n["exact"]]
        if not shares:
            return frame, keys
        self._on(frame)
        values = {n["name"]: self.expr(n["input"]).cast(pl.Float64, strict=False) for n in shares}
        centres = [agg for name, value in values.items()
                   for agg in (value.median().alias(f"{name}__median"), value.max().alias(f"{name}__max"),
                               value.min().alias(f"{name}__min"))]
        if keys is None:
            frame = frame.with_columns(centres)
        else:
            key_columns = [f"{RESERVED_PREFIX}_key{i}" for i in range(len(keys))]
            frame = frame.with_columns([k.alias(c) for k, c in zip(keys, key_columns)])
            found = frame.group_by(key_columns).agg(centres)
            frame = frame.join(found, on=key_columns, how="left", nulls_equal=True, maintain_order="left")
            keys = [pl.col(c).alias(k.meta.output_name()) for k, c in zip(keys, key_columns)]
        columns = []
        for name, value in values.items():
            largest, smallest = pl.col(f"{name}__max"), pl.col(f"{name}__min")
            columns += [(value - pl.col(f"{name}__median")).abs().alias(f"{name}__distance"),
                        pl.when(value < largest).then(value).alias(f"{name}__below_max"),
                        pl.when(value > smallest).then(value).alias(f"{name}__above_min"),
                        (value == largest).alias(f"{name}__at_max"), (value == smallest).alias(f"{name}__at_min")]
        frame = frame.with_columns(columns)
        self._on(frame)
        return frame, keys

    def _aggregate(self, frame: pl.LazyFrame, apply: Callable[[list[pl.Expr]], pl.LazyFrame],
                   nodes: list[dict]) -> pl.LazyFrame:
        """``apply`` the compiled expressions (a select or a group_by's agg), then finish the accounting.

        Distinct row ids counted in bit words (:meth:`_distinct_ids`) add
        aggregations of their own and are combined after the aggregation:
        elementwise work inside ``agg`` takes polars off its fast path.
        """
        self._on(frame)
        self.extra_aggs, self.post_aggs, self.helper_columns = [], [], []
        try:
            result = apply(self._exprs(nodes) + self.extra_aggs)
            if self.post_aggs:
                # Each count takes its placeholder's place, so the columns keep the order of the plan.
                order = [c.removesuffix("__placeholder") if c.endswith("__placeholder") else c
                         for c in result.collect_schema().names()
                         if c.endswith("__placeholder") or c not in self.helper_columns]
                result = result.with_columns(self.post_aggs).select(order)
        finally:
            self.extra_aggs = None
        return _cast_accounting(result, nodes)

    def _sort(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.sort(self._on(frame)._exprs(node["by"]), descending=node["descending"],
                          nulls_last=node["nulls_last"])

    def _head(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).head(node["n"])

    def _slice(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).slice(node["offset"], node["length"])

    def _explode(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).explode(node["columns"])

    def _drop(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).drop(node["columns"])

    def _rename(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).rename(node["mapping"])

    def _drop_nulls(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.drop_nulls(node["subset"] if node["subset"] is not None else self._user_columns(frame))

    def _unique(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return frame.unique(node["subset"] if node["subset"] is not None else self._user_columns(frame))

    def _fill_null(self, node: dict) -> pl.LazyFrame:
        # Same column choice as polars' LazyFrame.fill_null, limited to the scientist's columns.
        frame = self.frame(node["input"])
        schema = frame.collect_schema()
        user = [c for c in schema.names() if not c.startswith(RESERVED_PREFIX)]
        value_node = node["value"]
        if value_node["expr"] == "lit" and value_node["value"] is not None:
            value = value_node["value"]
            fits = _FILL_NULL_FITS[type(value)]
            columns = [c for c in user if fits(schema[c])]
            if not columns:
                return frame
            return frame.with_columns(pl.col(columns).fill_null(value))
        return frame.with_columns(pl.col(user).fill_null(self._on(frame).expr(value_node)))

    def _join(self, node: dict) -> pl.LazyFrame:
        left, right = self.frame(node["left"]), self.frame(node["right"])
        if node["how"] == "cross":
            return left.join(right, how="cross", suffix=node["suffix"])
        left_on = self._on(left)._exprs(node["left_on"])
        right_on = self._on(right)._exprs(node["right_on"])
        # Rows keep the order of the left side, then the right (what the in-memory engine does by default;
        # the streaming engine needs it said).
        return left.join(right, left_on=left_on, right_on=right_on, how=node["how"], suffix=node["suffix"],
                         maintain_order="left_right")

    def _concat(self, node: dict) -> pl.LazyFrame:
        frames = [self.frame(f) for f in node["inputs"]]
        # Bit words may exist in one input and not another: below a concat, ids are counted by hashing.
        words = {w for names in self.row_words.values() for w in names}
        order = [c for c in frames[0].collect_schema().names() if c not in words]
        return pl.concat([f.select(order) for f in frames], how="vertical")

    def _with_row_index(self, node: dict) -> pl.LazyFrame:
        return self.frame(node["input"]).with_row_index(node["name"])

    # internal accounting operations -------------------------------------------
    def _acct_row_id(self, node: dict) -> pl.LazyFrame:
        # Row ids start at 1: 0 marks "no partner in an outer join", null "not from this source".
        frame = self.frame(node["input"])
        name = node["name"]
        frame = frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=ACCOUNT_DTYPE).alias(name))
        bound = self._row_bound(node["input"])
        if bound is None or bound > BITSET_MAX_ROWS or name in self.row_words:
            self.row_words[name] = []  # unknown, too many, or a second branch: ids are counted by hashing
            return frame
        # At most BITSET_MAX_ROWS rows here: the words cost nothing to make, and then travel with the ids.
        ids = pl.col(name)
        words = [f"{name}__bits{w}" for w in range(bound // 64 + 1)]
        self.row_words[name] = words
        return frame.with_columns(
            pl.when(ids // 64 == w).then(pl.lit(_BITS).gather(ids % 64)).otherwise(pl.lit(0, dtype=pl.UInt64))
            .alias(word) for w, word in enumerate(words))

    def _row_bound(self, node: dict) -> int | None:
        """An upper bound of a frame's row count known without running it, or None.

        Only a dataset's table as the scan read it and operations that never
        add rows are followed; anything else (a join, explode, concat, select,
        group_by, a streamed or saved source) is unknown.
        """
        op = node["op"]
        if op == "scan":
            table = self.tables.get(node["dataset"])
            return None if table is None else table.height
        if op not in _ROW_KEEPING_OPS:
            return None
        bound = self._row_bound(node["input"])
        if bound is not None and op == "head":
            bound = min(bound, max(node["n"], 0))
        elif bound is not None and op == "slice" and node["length"] is not None:
            bound = min(bound, max(node["length"], 0))
        return bound

    def _distinct_ids(self, node: dict, mask: pl.Expr | None) -> pl.Expr | None:
        """The number of distinct row ids of ``node["column"]`` in a group (where ``mask``), from bit words.

        Registers one ``bitwise_or`` aggregation per word and returns the
        expression that counts their bits after the aggregation; None (hash
        the ids) outside an aggregation or when the words are not in its
        input (a select, concat or saved result in between dropped them).
        Exact: distinct ids >= 1 set distinct bits, rows of other sources
        (null ids) have null words, and 0 ids (no partner) are never set.
        """
        words = self.row_words.get(node["column"], [])
        if self.extra_aggs is None or not words or \
                not set(words) <= set(self.scope.collect_schema().names()):
            return None
        zero = pl.lit(0, dtype=pl.UInt64)
        parts = []
        for index, word in enumerate(words):
            part = f"{node['name']}__or{index}"
            value = pl.col(word) if mask is None else pl.when(mask).then(pl.col(word)).otherwise(zero)
            self.extra_aggs.append(value.bitwise_or().alias(part))
            self.helper_columns.append(part)
            parts.append(pl.col(part).bitwise_count_ones().fill_null(0).cast(ACCOUNT_DTYPE))
        return pl.sum_horizontal(parts)

    def _helper_agg(self, node: dict, label: str, expr: pl.Expr) -> pl.Expr:
        """Compute ``expr`` in the aggregation as a helper column; the column, for an expression after it."""
        name = f"{node['name']}__{label}"
        self.extra_aggs.append(expr.alias(name))
        self.helper_columns.append(name)
        return pl.col(name)

    def _acct_distinct(self, node: dict) -> pl.Expr:
        count = self._distinct_ids(node, None)
        if count is None:
            return _account_distinct(node)
        c = pl.col(node["column"])
        if node["taintable"] or node["nullable"] or node["global"]:
            # _guarded's conditions, aggregated apart and combined after the aggregation.
            expr = pl.when(self._helper_agg(node, "len", pl.len()) == 0).then(pl.lit(0, dtype=ACCOUNT_DTYPE))
            if node["nullable"]:
                expr = expr.when(self._helper_agg(node, "unfed", c.is_null().all())).then(
                    pl.lit(None, dtype=ACCOUNT_DTYPE))
            if node["taintable"]:
                expr = expr.when(self._helper_agg(node, "tainted", (c == 0).any())).then(
                    pl.lit(0, dtype=ACCOUNT_DTYPE))
            count = expr.otherwise(count)
        self.post_aggs.append(count.alias(node["name"]))
        return self._placeholder(node)

    def _placeholder(self, node: dict) -> pl.Expr:
        # Stands in the aggregation for a count computed after it (dropped then).
        name = f"{node['name']}__placeholder"
        self.helper_columns.append(name)
        return pl.lit(0, dtype=pl.UInt32).alias(name)

    def _acct_columns(self, node: dict) -> pl.LazyFrame:
        frame = self.frame(node["input"])
        return _cast_accounting(frame.with_columns(self._on(frame)._exprs(node["exprs"])), node["exprs"])

    def _acct_unique(self, node: dict) -> pl.LazyFrame:
        # The policy counted the join's left side as not repeated because this
        # side's key is unique: hold that against the very table the query
        # reads, so a file replaced since the policy asked fails closed.
        frame = self.frame(node["input"])
        dataset = self.catalog[node["dataset"]]
        table = self.tables.get(node["dataset"])
        if table is None or not self.cache.unique_keys(dataset, tuple(node["columns"]), table):
            raise BastionError("ExecutionError", f"dataset {node['dataset']!r} changed while this query was "
                                                 "being prepared; run it again", changed=True)
        return frame

    def _acct_person_id(self, node: dict) -> pl.LazyFrame:
        # One id per person (1, 2, ...), so counting distinct ids counts people;
        # rows without a person id count as one more person together.
        frame = self.frame(node["input"])
        rank = pl.col(node["column"]).rank("dense").cast(ACCOUNT_DTYPE)
        return frame.with_columns(rank.fill_null(rank.max().fill_null(0) + 1).alias(node["name"]))

    def _acct_contrib(self, node: dict) -> pl.Expr:
        """How many source rows (or people) made a real contribution to an aggregate.

        A row contributes when its input value is not null, not zero (a
        false boolean is zero), and, when the policy marks the input as
        possibly ``padded``, not the value most rows of the group share (an
        indicator padded with a constant other than zero).  Counting
        functions (``count``, ``n_unique``, ``null_count``) count every non-null value.
        """
        value = self.expr(node["input"])
        dtype = _resolve(self.scope.select(value.alias("value")), "aggregation")["value"]
        present = value.is_not_null()
        if node["function"] in ("count", "n_unique", "null_count"):
            mask = present
        else:
            if dtype == pl.Boolean:
                mask = present & value
            elif dtype.is_numeric():
                mask = present & (value != 0)
            else:
                mask = present
        if node["padded"]:
            mode = value.drop_nulls().mode().first()
            mask = mask & ((value != mode).fill_null(True) | ((value == mode).sum() <= 1))
        return self._contributors(node, mask)

    def _contributors(self, node: dict, mask: pl.Expr) -> pl.Expr:
        """The source rows (people) of ``node["column"]`` among the rows where ``mask`` holds, per group.

        ``implicit``: the rows; ``rid``: distinct row (person) ids; ``count``:
        the summed counts of aggregated rows when they are fed by disjoint
        source rows, else the rows.  Null when no row of the group comes from
        the source (after a concat).
        """
        column = node["column"]
        if node["kind"] == "implicit":
            return mask.sum().alias(node["name"])
        if node["kind"] == "rid":
            counted = self._distinct_ids(node, mask)
            if counted is not None:
                fed = self._helper_agg(node, "fed", pl.col(column).is_not_null().any())
                self.post_aggs.append(pl.when(fed).then(counted).alias(node["name"]))
                return self._placeholder(node)
            rid = pl.col(column)
            count = rid.filter(mask & (rid > 0)).n_unique()
        else:
            counts = pl.col(column)
            fed = mask & (counts > 0)
            count = counts.filter(fed).sum() if node["exact"] else fed.sum()
        # A group with no row of this source (after a concat) was not fed by it.
        return pl.when(pl.col(column).is_not_null().any()).then(count).alias(node["name"])

    def _acct_held(self, node: dict) -> pl.Expr:
        """How many source rows (people) hold the value an order statistic releases, per group.

        For ``min``, ``max``, ``median`` and ``quantile``: the contributors
        whose input equals the aggregate (a median between two values is held
        by nobody).  For ``n_unique``: the fewest rows (people) holding one of
        the distinct values it counts (null is a value for ``n_unique``), among
        the rows the aggregation keeps (``kept``: its inner filters); values
        no row of this source holds are not this source's.  On aggregated
        rows (``count``), each row's count of source rows is a lower bound of
        the people behind its value.
        """
        call = node["call"]
        value = self.expr(call["input"])
        column = node["column"]
        if call["name"] != "n_unique":
            held = (value == self.expr(call)).fill_null(False)
            return self._contributors(node, held)
        kept = pl.lit(True) if node["kept"] is None else self.expr(node["kept"]).fill_null(False)
        # value_counts, not unique_counts: polars' streaming engine fails on a
        # filtered unique_counts in a select.
        if node["kind"] == "implicit":
            return _fewest_holders(value.alias("value").filter(kept)).alias(node["name"])
        if node["kind"] == "rid":
            rid = pl.col(column)
            pairs = pl.struct(value.alias("value"), rid.alias("id")).filter(kept & (rid > 0)).unique()
            fewest = _fewest_holders(pairs.struct.field("value"))
        else:
            counts = pl.col(column)
            fewest = counts.filter(kept & (counts > 0)).min()
        return pl.when(pl.col(column).is_not_null().any()).then(fewest).alias(node["name"])

    def _acct_share(self, node: dict) -> pl.Expr:
        """Whether a contribution dominates an aggregate: 0 no, 1 yes, 2 unsure (measure exactly).

        Each contribution's distance is taken from its group's median, so
        adding a constant to every row changes nothing and amplified
        contributions cannot move the centre.  With ``top_two`` (millionths),
        the N-K rule: the two largest distances make up more than that share
        of the total; with ``p_ratio``, the p-ratio rule: the total minus the
        two largest is less than that share of the largest; with ``largest``,
        the largest alone makes up more than that share.

        Without ``exact``, a bound from plain aggregates (count, variance,
        max, min) clears a group whatever its median: every distance is at
        most the range R = max - min, and their total is at least n * var / R
        (the squared distances from the median add up to at least n * var,
        and each is at most R times the distance), so no rule can fire when
        n * var >= F * R**2 (:func:`_clearing_factor`).  Large groups of
        ordinary values are cleared this way; a group that is not is 2, and
        the executor measures the plan again with ``exact``.  A variance or
        range that is not a finite number is 1 (fail closed).
        """
        name = node["name"]
        value = self.expr(node["input"]).cast(pl.Float64, strict=False)
        inside = self.extra_aggs is not None
        if not node["exact"]:
            parts = {"n": value.count(), "var": value.var(ddof=0), "max": value.max(), "min": value.min()}
            if inside:
                parts = {label: self._helper_agg(node, label, expr) for label, expr in parts.items()}
            spread = parts["max"] - parts["min"]
            spread_total = parts["n"].cast(pl.Float64) * parts["var"]
            flag = (pl.when(~spread_total.is_finite() | ~spread.is_finite()).then(1)
                    .when((spread == 0) | (spread_total >= _clearing_factor(node) * spread ** 2)).then(0)
                    .otherwise(2))
            return self._finish_share(node, flag, inside)
        if inside and f"{name}__distance" in self.scope.collect_schema().names():
            def part(label: str, expr: pl.Expr) -> pl.Expr:
                return self._helper_agg(node, label, expr)
            median = part("median", pl.col(f"{name}__median").first())
            largest_value = part("max", pl.col(f"{name}__max").first())
            smallest_value = part("min", pl.col(f"{name}__min").first())
            second_largest = pl.when(part("maxes", pl.col(f"{name}__at_max").sum()) > 1).then(largest_value) \
                .otherwise(part("below", pl.col(f"{name}__below_max").max()))
            second_smallest = pl.when(part("mins", pl.col(f"{name}__at_min").sum()) > 1).then(smallest_value) \
                .otherwise(part("above", pl.col(f"{name}__above_min").min()))
            total = part("total", pl.col(f"{name}__distance").sum())
            # The two largest distances on each side of the median (a side may have one value, or none: 0).
            high1 = (largest_value - median).clip(0)
            high2 = (second_largest - median).fill_null(median).clip(0)
            low1 = (median - smallest_value).clip(0)
            low2 = (median - second_smallest).fill_null(median).clip(0)
            top_one = pl.max_horizontal(high1, low1)
            top_two = pl.max_horizontal(high1 + high2, high1 + low1, low1 + low2)
        else:
            inside = False
            distance = (value - value.median()).abs()
            total, top_one, top_two = distance.sum(), distance.max(), distance.top_k(2).sum()
        dominated = ~total.is_finite()
        if node.get("top_two") is not None:
            dominated = dominated | ((total > 0) & (top_two > total * node["top_two"] / 1_000_000))
        if node.get("p_ratio") is not None:
            dominated = dominated | ((top_one > 0) & (total - top_two < top_one * node["p_ratio"] / 1_000_000))
        if node.get("largest") is not None:
            dominated = dominated | ((total > 0) & (top_one > total * node["largest"] / 1_000_000))
        return self._finish_share(node, dominated.fill_null(False).cast(ACCOUNT_DTYPE), inside)

    def _finish_share(self, node: dict, flag: pl.Expr, inside: bool) -> pl.Expr:
        # Inside an aggregation the flag combines helper aggregations: it is computed after it.
        if not inside:
            return flag.alias(node["name"])
        self.post_aggs.append(flag.alias(node["name"]))
        return self._placeholder(node)

    def _acct_finite(self, node: dict) -> pl.Expr:
        """1 when an aggregate is finite and did not overflow, else 0 (inf, -inf, NaN, a wrapped integer sum)."""
        call = node["call"]
        aggregate = self.expr(call)
        dtype = _resolve(self.scope.select(aggregate.alias("value")), "aggregation")["value"]
        if dtype.is_float():
            finite = aggregate.is_finite().fill_null(True)
        elif dtype.is_integer() and call["name"] == "sum":
            # polars wraps an integer sum around on overflow: the same sum in
            # floating point says whether it left the type's range (with a
            # margin for the float's rounding).
            low, high = _INTEGER_RANGE[str(dtype)]
            approximate = self.expr(call["input"]).cast(pl.Float64, strict=False).sum()
            finite = approximate.is_between(low * _RANGE_MARGIN, high * _RANGE_MARGIN).fill_null(True)
        else:
            finite = pl.lit(True)
        return finite.cast(ACCOUNT_DTYPE).alias(node["name"])


def _clearing_factor(node: dict) -> float:
    """F such that n * var >= F * range**2 proves no dominance rule of ``node`` can fire.

    With T >= n * var / R the total distance and every distance <= R: the
    N-K rule needs 2R > k T, cleared when T >= (2 / k) R; the p-ratio rule
    needs T - 2R < p R, cleared when T >= (2 + p) R; the largest-share rule
    needs R > s T, cleared when T >= R / s.
    """
    factors = [1.0]
    if node.get("top_two") is not None:
        factors.append(2 / (node["top_two"] / 1_000_000))
    if node.get("p_ratio") is not None:
        factors.append(2 + node["p_ratio"] / 1_000_000)
    if node.get("largest") is not None:
        factors.append(1 / (node["largest"] / 1_000_000))
    return max(factors)


_MAX_EXPONENT = (1 << 32) - 1
# Expression functions that reduce their input to one value per group, and those that keep a one-value input
# one value (so an expression built of them over literals, len() and these aggregates is one value).
_AGGREGATIONS = frozenset(name for name, spec in P.EXPR_FUNCTIONS.items()
                          if spec.kind in ("aggregate", "row_aggregate"))
_ONE_VALUE_AGGREGATIONS = frozenset({"sum", "mean", "median", "min", "max", "std", "var", "quantile", "count",
                                     "len", "n_unique", "null_count", "first", "last"})


def _is_scalar(node: dict) -> bool:
    """True when an expression is one value whatever its input rows: built of literals, ``len()`` and
    one-value aggregations only (so ``head(1)`` of it is itself)."""
    kind = node.get("expr")
    if kind in ("lit", "len"):
        return True
    if kind == "alias":
        return _is_scalar(node["input"])
    if kind == "unary":
        return _is_scalar(node["operand"])
    if kind == "binary":
        return _is_scalar(node["left"]) and _is_scalar(node["right"])
    if kind == "fn":
        if node["name"] in _ONE_VALUE_AGGREGATIONS:
            return True
        spec = P.EXPR_FUNCTIONS.get(node["name"])
        if spec is None or spec.kind != "elementwise" or node["name"] == "over":
            return False
        arguments = [node["args"].get(param) for param, ptype in spec.params if ptype == "expr"]
        return _is_scalar(node["input"]) and all(isinstance(a, dict) and _is_scalar(a) for a in arguments)
    if kind == "when":
        parts = [b[part] for b in node["branches"] for part in ("when", "then")]
        parts += [node["otherwise"]] if node["otherwise"] is not None else []
        return all(_is_scalar(part) for part in parts)
    return False
# The range of each integer type an integer sum can have, and the share of it
# within which a sum computed in floating point is surely not wrapped around.
_INTEGER_RANGE = {f"{sign}Int{bits}": (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if sign == "" else
                  (0.0, 2.0 ** bits - 1) for sign in ("", "U") for bits in (8, 16, 32, 64, 128)}
_RANGE_MARGIN = 0.999_999
_SAMPLE_MOMENT = datetime.datetime(2000, 1, 2, 3, 4, 5)

_INTEGER_DTYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64,
                   pl.Float32, pl.Float64)
# Which columns polars' frame-wide fill_null(value) touches, by the literal's Python type.
_FILL_NULL_FITS: dict[type, Callable[[Any], bool]] = {
    bool: lambda dt: dt == pl.Boolean,
    int: lambda dt: dt in _INTEGER_DTYPES or isinstance(dt, pl.Decimal),
    float: lambda dt: dt in _INTEGER_DTYPES or isinstance(dt, pl.Decimal),
    str: lambda dt: dt == pl.String or isinstance(dt, pl.Categorical),
}


if __name__ == "__main__":
    sys.exit(_copy_main(sys.argv[1:]))
