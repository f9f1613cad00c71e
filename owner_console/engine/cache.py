"""Reading datasets for the polars engine: the shared cache, memory-mapped copies and the streaming threshold.

Datasets are read once by :class:`DatasetCache`, shared by every session and
thread, except large files (:func:`is_streamed`), which are scanned lazily
and run on polars' streaming engine.  Given a cache directory, the cache
keeps each dataset as an uncompressed Arrow IPC file there and memory-maps
it, so that the executor's query worker processes
(:mod:`owner_console.workers`) share one copy through the operating system's
page cache.  A large file's copy is written by a short-lived process,
``python -m owner_console.engine FORMAT SOURCE DESTINATION``
(:func:`copy_main`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import polars as pl

from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .facts import KEY_LEN, MAX_KEY_GROUPS, ColumnFacts, TableFacts, stat_name, stats_of, table_facts
from .facts import key_stats as measure_key_stats

log = logging.getLogger("bastion.executor")


def _write_shared(target: Path | None, write: Callable[[Any], object]) -> None:
    """Write a file of the shared directory whole or not at all (a temporary file renamed into place)."""
    if target is None:
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(partial, "wb") as handle:
            write(handle)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning("could not keep %s in the shared directory (%s)", target.name, type(exc).__name__)


def _facts_json(facts: TableFacts) -> dict:
    return {"rows": facts.rows, "columns": {name: dataclasses.asdict(c) for name, c in facts.columns.items()}}


def _read_facts(source: Path | None) -> TableFacts | None:
    """Facts another process of the shared directory measured, or None (none yet, or unreadable)."""
    if source is None:
        return None
    try:
        kept = json.loads(source.read_bytes())
        return TableFacts(rows=kept["rows"], columns={name: ColumnFacts(**c) for name, c in kept["columns"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


# A table with fewer rows gets no per-key statistics (DatasetCache.key_stats): joining them costs more than computing
# the checks (an accounted group-by, in process: 0.2 ms slower at 5,000 rows, 0.3 ms faster at 20,000; benchmarks/
# RESULTS.md, section 19).
KEY_STATS_MIN_ROWS = 20_000
# Derived values (DatasetCache.remembered) kept, the least recently used dropped first.
DERIVED_KEPT = 64


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
    facts : bool, default True
        Measure owner-side facts of each table version (:meth:`facts`,
        :meth:`key_stats`), which let the engine prove some accounting
        checks cannot fail and compute them more cheaply.  Off, every check
        is computed in full (the same values, more slowly).
    """

    def __init__(self, shared_dir: Path | None = None, facts: bool = True) -> None:
        self._shared_dir = None if shared_dir is None else Path(shared_dir)
        self.use_facts = facts
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.Lock] = {}
        self._frames: dict[str, tuple[tuple[int, int], pl.DataFrame]] = {}
        self._paths: dict[int, str] = {}  # id(cached table) -> its path, for facts about a table a query read
        # path -> (file version checked, {key columns: unique?}): see unique_keys
        self._unique: dict[str, tuple[tuple[int, int], dict[tuple[str, ...], bool]]] = {}
        # path -> (file version measured, its facts): see facts
        self._facts: dict[str, tuple[tuple[int, int], TableFacts]] = {}
        # path -> (file version measured, {key columns: per-key statistics, None when too many groups})
        self._key_stats: dict[str, tuple[tuple[int, int], dict[tuple[str, ...], pl.DataFrame | None]]] = {}
        # Dominance measures whose facts' range left a group unsure once: measured with groups' own ranges
        # from then on (see AccountingCompiler._acct_share); forgotten when it grows past RANGE_MISSES_KEPT.
        self.range_misses: set[tuple] = set()
        # What the compiler derives from tables (join_stats), by what it was asked and the tables' versions.
        self._derived: OrderedDict[tuple, Any] = OrderedDict()

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
                replaced = self._frames.get(path)
                if replaced is not None:
                    self._paths.pop(id(replaced[1]), None)
                self._frames[path] = (version, table)
                self._paths[id(table)] = path
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
                    # Older versions' copies, facts and per-key statistics.
                    current = f"{source_key}-{version[0]}-{version[1]}."
                    for stale in self._shared_dir.glob(f"{source_key}-*"):
                        if not stale.name.startswith(current):
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

    def _version_of(self, dataset: Dataset, table: pl.DataFrame) -> tuple[str, tuple[int, int]] | None:
        """``(path, file version)`` when ``table`` is the current cached table of its file, else None.

        Found from the table itself (no file system call: this is on the
        path of every query); ``dataset`` names it in messages only.
        """
        with self._lock:
            path = self._paths.get(id(table))
            cached = None if path is None else self._frames.get(path)
        if cached is None or cached[1] is not table:
            return None  # replaced meanwhile, or not this cache's table
        return path, cached[0]

    def remembered(self, key: Hashable, sources: Sequence[tuple[Dataset, pl.DataFrame | None]],
                   compute: Callable[[], Any]) -> Any:
        """``compute()``, kept for ``key`` while each of ``sources`` (dataset, the table read) is current.

        A value derived from cached tables only, so the same key over the
        same file versions gives the same value: computed once, then reused
        until a file changes (values of an older version are dropped when
        the next value is kept).  Not kept when facts are off or a table is
        not the dataset's current one.
        """
        versions = []
        for dataset, table in sources:
            found = None if table is None or not self.use_facts else self._version_of(dataset, table)
            if found is None:
                return compute()
            versions.append(found)
        full_key = (key, tuple(versions))
        with self._lock:
            if full_key in self._derived:
                self._derived.move_to_end(full_key)
                return self._derived[full_key]
        value = compute()
        with self._lock:
            # Values of replaced tables are dropped: a compiled query holds its tables, which would stay in memory.
            for stale in [k for k in self._derived
                          if any(self._frames.get(path, (None,))[0] != version for path, version in k[1])]:
                del self._derived[stale]
            self._derived[full_key] = value
            while len(self._derived) > DERIVED_KEPT:
                self._derived.popitem(last=False)
        return value

    def facts(self, dataset: Dataset, table: pl.DataFrame) -> TableFacts | None:
        """:class:`~owner_console.engine.facts.TableFacts` of ``table``, the dataset's current table.

        Measured once per file version (one pass of simple aggregates).
        None when facts are off, or ``table`` is not the current version
        (a file replaced meanwhile): the caller then computes every check.
        The facts are the owner's and only choose how a check is computed.
        """
        if not self.use_facts:
            return None
        found = self._version_of(dataset, table)
        if found is None:
            return None
        path, version = found
        with self._lock:
            known = self._facts.get(path)
            if known is not None and known[0] == version:
                return known[1]
        shared = self._shared_file(path, version, "facts.json")
        measured = _read_facts(shared)
        if measured is None:
            measured = table_facts(table)
            _write_shared(shared, lambda f: f.write(json.dumps(_facts_json(measured)).encode()))
        with self._lock:
            self._facts[path] = (version, measured)
        return measured

    def _shared_file(self, path: str, version: tuple[int, int], suffix: str) -> Path | None:
        """Where the processes sharing this cache's directory keep something about one file version (None: no
        shared directory).  Each worker process then measures facts once per version between them."""
        if self._shared_dir is None:
            return None
        source_key = hashlib.sha256(path.encode()).hexdigest()[:24]
        return self._shared_dir / f"{source_key}-{version[0]}-{version[1]}.{suffix}"

    def key_stats(self, dataset: Dataset, table: pl.DataFrame, keys: tuple[str, ...],
                  columns: tuple[str, ...], held: tuple[str, ...] = ()) -> pl.DataFrame | None:
        """Per group of ``keys`` in ``table``, the accounting's aggregates of ``columns`` and ``held`` (see
        :func:`~owner_console.engine.facts.key_stats`), kept per file version and key.

        None when facts are off, ``table`` is not the dataset's current
        version, or the key has more than ``MAX_KEY_GROUPS`` groups.  The
        first request for a key counts its groups; each column is measured
        once per key, in one pass for the columns asked together.
        """
        if not self.use_facts or not keys or table.height < KEY_STATS_MIN_ROWS:
            return None
        found = self._version_of(dataset, table)
        if found is None:
            return None
        path, version = found
        shared = self._shared_file(path, version,
                                   f"stats-{hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]}.arrow")
        with self._lock:
            known = self._key_stats.get(path)
            if known is None or known[0] != version:
                known = self._key_stats[path] = (version, {})
            stats = known[1].get(keys, False)
        if stats is None:
            return None
        if stats is False and shared is not None and shared.exists():
            try:
                stats = pl.read_ipc(shared, memory_map=False)
            except Exception:  # noqa: BLE001 - a damaged file: measured again below, and rewritten
                stats = False
        if stats is False:
            counts = table.lazy().group_by(list(keys)).agg(pl.len().alias(KEY_LEN)).collect(engine="streaming")
            stats = counts if counts.height <= MAX_KEY_GROUPS else None
            with self._lock:
                known[1][keys] = stats
            if stats is None:
                return None
        # A column is measured again when a statistic is missing (kept by an older version of the engine).
        missing = tuple(c for c in dict.fromkeys(columns)
                        if any(stat_name(c, s) not in stats.columns for s in stats_of(c, table.schema[c])
                               if not s.startswith("held_")))
        missing_held = tuple(c for c in dict.fromkeys(held) if stat_name(c, "held_min") not in stats.columns)
        if missing or missing_held:
            measured = measure_key_stats(table, keys, missing, missing_held).drop(KEY_LEN)
            stats = stats.drop([c for c in measured.columns if c in stats.columns and c not in keys])
            stats = stats.join(measured, on=list(keys), how="left", nulls_equal=True, maintain_order="left")
            _write_shared(shared, stats.write_ipc)
        with self._lock:
            known[1][keys] = stats
        return stats

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


def copy_main(argv: list[str]) -> int:
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

