"""Query worker processes: every ``fetch`` and ``save`` runs in a process of its own.

The executor's main process speaks ZeroMQ, keeps the audit log and the
approvals, and answers quick requests; the query itself (validate -> account
-> run -> decide, :func:`owner_console.executor.evaluate`) runs in one of a
pool of worker processes, started with ``python -m owner_console.workers``.
Why processes and not threads:

- **A cancel or a timeout really stops the query.**  polars 1.36 honours
  ``cancel()`` only between some operators (a streaming query not at all);
  a worker process is killed, and its memory and CPU come back at once.
- **One query cannot starve the others.**  polars has one thread pool per
  process: in one process a long query's tasks make every small query wait
  for a free pool thread.  Separate processes are scheduled by the operating
  system, and a query that runs longer than :data:`BACKGROUND_AFTER_SECONDS`
  is moved to a lower CPU priority, so short queries keep their pace.
- **A query that exhausts memory kills its worker, not the executor.**  Rust
  aborts the process on a failed allocation; the scientist gets a typed
  error and every other session carries on.

Datasets are still held once: each worker's :class:`engine.DatasetCache`
memory-maps the same uncompressed Arrow IPC copy of a dataset, so its pages
are shared through the operating system's page cache.

The pipe between the processes carries JSON headers and Arrow IPC tables
only (nothing is pickled), framed as ``[8-byte length][JSON][8-byte
length][bytes]``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from . import dp, engine, executor
from .model import Dataset, Decision, Held, Policy, Released

log = logging.getLogger("bastion.executor")

# A query still running after this long is moved to a lower CPU priority
# (nice value BACKGROUND_NICE, under SCHED_IDLE), so that the short queries of
# other sessions are scheduled ahead of it.
BACKGROUND_AFTER_SECONDS = 0.2
BACKGROUND_NICE = 15
# polars' allocator (jemalloc) keeps freed memory for reuse; in a worker it is
# told to give back what stayed unused for 3 s, from a background thread, so an
# idle worker returns to its baseline (about 25 MB private) soon after a large
# query.  Measured on a 10M-row join: a decay of 3 s costs nothing for back to
# back queries (362 ms against 379 ms); 1 s or less re-faults the memory at every
# query (530 ms).
WORKER_ALLOCATOR_CONF = "background_thread:true,dirty_decay_ms:3000,muzzy_decay_ms:0"
# A worker whose private (anonymous) memory is above this just after a query is
# replaced rather than kept (a backstop: the allocator returns memory by itself).
RECYCLE_PRIVATE_BYTES = 2 * 2**30
_LENGTH = struct.Struct(">Q")


class WorkerDied(Exception):
    """The worker process ended (killed, crashed or out of memory) before it replied."""


# ---------------------------------------------------------------- framing
def _send(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    data = json.dumps(header, separators=(",", ":"), allow_nan=False, default=str).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data + _LENGTH.pack(len(payload)))
    if payload:
        sock.sendall(payload)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        try:
            n = sock.recv_into(view[received:])
        except ConnectionResetError:  # the other end died with bytes it had not read yet
            n = 0
        if n == 0:
            raise WorkerDied("the other end closed the connection")
        received += n
    return bytes(buffer)


def _receive(sock: socket.socket) -> tuple[dict, bytes]:
    (size,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    header = json.loads(_receive_exactly(sock, size))
    (size,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    return header, _receive_exactly(sock, size) if size else b""


def _catalog_to_json(catalog: Mapping[str, Dataset]) -> dict:
    data = {}
    for name, d in catalog.items():
        entry = {"path": str(d.path), "format": d.format, "policy": d.policy.to_dict(), "engine": d.engine}
        if d.dp is not None:
            entry["dp"] = d.dp.to_dict()
            entry["ledger"] = None if d.dp.ledger is None else str(d.dp.ledger)
        data[name] = entry
    return data


def _catalog_from_json(data: dict) -> dict[str, Dataset]:
    catalog = {}
    for name, d in data.items():
        dp_policy = None
        if "dp" in d:
            dp_policy = dp.DPPolicy.from_dict(d["dp"], ledger=None if d["ledger"] is None else Path(d["ledger"]))
        catalog[name] = Dataset(name=name, path=Path(d["path"]), format=d["format"],
                                policy=Policy.from_dict(d["policy"]), dp=dp_policy, engine=d["engine"])
    return catalog


def _decision_to_json(decision: Decision) -> dict:
    return {"action": decision.action, "reason": decision.reason, "sources": list(decision.sources),
            "details": decision.details, "detail": decision.detail}


def _decision_from_json(data: dict) -> Decision:
    return Decision(action=data["action"], reason=data["reason"], sources=tuple(data["sources"]),
                    details=data["details"], detail=data.get("detail", ""))


# ---------------------------------------------------------------- the worker process
def _evaluate(request: dict, cache: engine.DatasetCache) -> tuple[dict, bytes]:
    outcome = executor.evaluate(request["plan"], _catalog_from_json(request["catalog"]), request["scientist"],
                                cache)
    kind = "released" if isinstance(outcome, Released) else "held"
    table = outcome.table
    return ({"outcome": kind, "decision": _decision_to_json(outcome.decision), "notes": list(outcome.notes),
             "rows": table.height, "schema": [[name, str(dtype)] for name, dtype in zip(table.columns, table.dtypes)]},
            executor.table_to_ipc(table))


def _prepare_save(request: dict, cache: engine.DatasetCache) -> tuple[dict, bytes]:
    table, inherited = executor.prepare_save(request["plan"], _catalog_from_json(request["catalog"]), cache,
                                             scientist=request["scientist"])
    return {"policy": inherited.to_dict()}, executor.table_to_ipc(table)


_OPERATIONS = {"evaluate": _evaluate, "prepare_save": _prepare_save}


def serve_worker(sock: socket.socket, shared_dir: Path) -> None:
    """The worker process's loop: one request at a time until the executor closes the pipe."""
    cache = engine.DatasetCache(shared_dir)
    while True:
        try:
            request, _ = _receive(sock)
        except WorkerDied:
            return
        try:
            header, payload = _OPERATIONS[request["op"]](request, cache)
        except BastionError as exc:
            header, payload = {"error": exc.internal_body()}, b""
        except MemoryError:
            header, payload = {"error": BastionError(
                "LimitExceeded", "the query needs more memory than the executor has").body()}, b""
        except BaseException as exc:  # noqa: BLE001 - reported to the main process, which logs it for the owner
            if not isinstance(exc, Exception) and not engine.is_polars_panic(exc):
                raise  # KeyboardInterrupt, SystemExit: the worker ends
            header, payload = {"internal": traceback.format_exc()}, b""
        _send(sock, header, payload)


def _die_with_parent() -> None:
    # If the executor dies (even by SIGKILL), its workers must not run on with the data.
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker still ends when the executor closes its end of the pipe


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    sock = socket.socket(fileno=int(args[0]))
    serve_worker(sock, Path(args[1]))
    return 0


# ---------------------------------------------------------------- the executor's side
class _Worker:
    """One worker process and the executor's end of its pipe; ``kind`` is ``"small"`` or ``"regular"``."""

    def __init__(self, shared_dir: Path, kind: str = "regular"):
        ours, theirs = socket.socketpair()
        # polars appends this to its own defaults at import, so these settings win.
        environment = {**os.environ, "_RJEM_MALLOC_CONF": WORKER_ALLOCATOR_CONF}
        if kind == "small":
            environment["POLARS_MAX_THREADS"] = "1"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "owner_console.workers", str(theirs.fileno()), str(shared_dir)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=environment)
        finally:
            theirs.close()
        self.sock = ours
        self.kind = kind
        self.background = False
        # Kept for the worker's life: one thread at a time calls a worker, and a new selector per query is
        # three system calls on its path.
        self._readable = selectors.DefaultSelector()
        self._readable.register(self.sock, selectors.EVENT_READ)

    def call(self, header: dict, cancel: threading.Event | None, deadline: float | None,
             timeout: float | None, while_running: Callable[[], None]) -> tuple[dict, bytes]:
        """Send one request, call ``while_running``, and wait for the reply, killing the process on cancel or at
        the deadline."""
        try:
            _send(self.sock, header)
        except OSError as exc:  # the worker ended before it took the request
            raise WorkerDied(str(exc)) from None
        while_running()
        engine.wait_or_stop(lambda seconds: bool(self._readable.select(seconds)), self.kill, cancel, deadline,
                            timeout, on_tick=self._to_background_when_long)
        return _receive(self.sock)

    def _to_background_when_long(self, seconds_running: float) -> None:
        if not self.background and seconds_running >= BACKGROUND_AFTER_SECONDS:
            self._renice(BACKGROUND_NICE)
            self.background = True

    def _renice(self, nice: int) -> bool:
        """Set every thread of the worker (polars' pool included) and of its children (a dataset copy being
        written) to ``nice``; False where not allowed.

        Background threads are also put under ``SCHED_IDLE`` where the system has it: they then run only
        when no normal thread wants the CPU, which a nice value alone does not ensure (a nice 15 thread still
        gets a slice whenever the scheduler balances).
        """
        policy = getattr(os, "SCHED_IDLE", None) if nice > 0 else getattr(os, "SCHED_OTHER", None)
        ok = True
        for tid in _threads_of_tree(self.process.pid):
            try:
                if policy is not None:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:
                ok = False
        return ok

    def reusable(self) -> bool:
        """True when the worker can take another query: alive, back at normal priority, memory given back."""
        if self.process.poll() is not None:
            return False
        if self.background:
            if not self._renice(0):  # lowering the nice value needs privileges the executor may not have
                return False
            self.background = False
        anonymous, virtual = _memory_bytes(self.process.pid)
        if anonymous > RECYCLE_PRIVATE_BYTES:
            return False
        # Under an address-space limit (inherited from the executor), polars' streaming engine keeps large
        # virtual reservations after a query; a worker past half the limit would fail its next query's
        # allocations (ENOMEM), so a fresh worker takes it instead.
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        return soft == resource.RLIM_INFINITY or virtual <= soft // 2

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._readable.close()
        self.sock.close()


def _threads_of_tree(pid: int) -> list[int]:
    """The thread ids of a process and of its descendants (Linux ``/proc``; empty elsewhere)."""
    found: list[int] = []
    processes = [pid]
    while processes:
        current = processes.pop()
        try:
            tids = [int(tid) for tid in os.listdir(f"/proc/{current}/task")]
        except (OSError, ValueError):
            continue
        found.extend(tids)
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    processes.extend(int(child) for child in children.read().split())
            except (OSError, ValueError):
                pass
    return found


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _memory_bytes(pid: int) -> tuple[int, int]:
    """``(anonymous resident, virtual size)`` of a process in bytes, from ``/proc/PID/statm`` ((0, 0) where unknown).

    Checked after every query: one short read, where ``/proc/PID/status`` is some fifty lines to parse.
    ``statm`` counts resident and shared (file and shmem) pages; their difference is ``RssAnon``.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            size, resident, shared = statm.read().split()[:3]
        return (int(resident) - int(shared)) * _PAGE_BYTES, int(size) * _PAGE_BYTES
    except (OSError, ValueError):
        return 0, 0


class QueryWorkers:
    """The executor's query processes, with the interface of :mod:`owner_console.executor`.

    Parameters
    ----------
    shared_dir : Path
        The workspace's directory of memory-mapped dataset copies (see
        :class:`owner_console.engine.DatasetCache`).
    size : int
        Idle regular workers kept for reuse; a query that finds none idle
        starts one (the executor's query threads bound how many run at once).

    Queries over small datasets only (:func:`is_small_query`) go to workers
    whose polars runs one thread (up to ``size`` kept idle too): for a query
    that takes a millisecond, waking a thread pool costs more than it gives
    (measured on the whole-path benchmark's aggregate: 1.91 ms in a
    one-thread worker, 2.22 ms in a two-thread one).

    Quick requests (``schema``, ``datasets``) run in the calling process, on
    :attr:`cache` (they read schemas, not rows).  Differentially private plans
    run in workers too: the privacy budget ledger is SQLite, charged in one
    ``BEGIN IMMEDIATE`` transaction, safe across processes.
    """

    def __init__(self, shared_dir: Path, size: int = 4):
        self.shared_dir = Path(shared_dir)
        self.cache = engine.DatasetCache(self.shared_dir)
        # As many of each kind as query threads: all the queries running at once may be small ones.
        self._sizes = {"regular": size, "small": size}
        self._idle: dict[str, list[_Worker]] = {"regular": [], "small": []}
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- the executor module's interface --------------------------------
    for_scientist = staticmethod(executor.for_scientist)
    table_to_ipc = staticmethod(executor.table_to_ipc)

    def schema_of(self, plan: Any, catalog: Mapping[str, Dataset], *,
                  scientist: str | None = None) -> list[tuple[str, str]]:
        return executor.schema_of(plan, catalog, self.cache, scientist=scientist)

    def evaluate(self, plan: Any, catalog: Mapping[str, Dataset], scientist: str, *,
                 cancel: threading.Event | None = None, timeout: float | None = None,
                 on_started: Callable[[], None] | None = None) -> Released | Held:
        """:func:`owner_console.executor.evaluate` in a worker process.

        ``on_started`` is called exactly once, before this returns or raises: as soon as the worker has the
        request, so that the caller's own work (the executor's fsynced ``query`` audit entry) overlaps the
        query's; a query cannot bring the executor down, so nothing is lost by not writing it first.

        A plan over Spark datasets runs in this process instead (:func:`runs_in_executor`).
        """
        names = walk.source_names(plan)
        if _other_engine(names, catalog):
            if on_started is not None:
                on_started()
            return executor.evaluate(plan, catalog, scientist, self.cache, cancel=cancel, timeout=timeout)
        header, payload = self._call("evaluate", plan, catalog, scientist, cancel, timeout, on_started, names)
        kind = Released if header["outcome"] == "released" else Held
        return kind(table=WorkerTable(payload, header["rows"], header["schema"]),
                    decision=_decision_from_json(header["decision"]), notes=list(header["notes"]), ipc=payload)

    def prepare_save(self, plan: Any, catalog: Mapping[str, Dataset], *, cancel: threading.Event | None = None,
                     timeout: float | None = None, scientist: str | None = None,
                     on_started: Callable[[], None] | None = None) -> tuple[Any, Policy]:
        """:func:`owner_console.executor.prepare_save` in a worker process (``on_started``: see :meth:`evaluate`)."""
        names = walk.source_names(plan)
        if _other_engine(names, catalog):
            if on_started is not None:
                on_started()
            return executor.prepare_save(plan, catalog, self.cache, cancel=cancel, timeout=timeout, scientist=scientist)
        header, payload = self._call("prepare_save", plan, catalog, scientist, cancel, timeout, on_started, names)
        return _read_ipc(payload), Policy.from_dict(header["policy"])

    def warm(self) -> None:
        """Start a small-query worker in the background, so that a first small query does not wait for one."""
        def start() -> None:
            self._keep(_Worker(self.shared_dir, "small"))
        threading.Thread(target=start, name="bastion-warm-worker", daemon=True).start()

    def close(self) -> None:
        """Stop every worker (running queries included)."""
        with self._lock:
            self._closed = True
            workers = [w for idle in self._idle.values() for w in idle] + list(self._busy)
            self._idle = {kind: [] for kind in self._idle}
        for worker in workers:
            worker.kill()

    # -- dispatch -------------------------------------------------------
    def _call(self, op: str, plan: Any, catalog: Mapping[str, Dataset], scientist: str | None,
              cancel: threading.Event | None, timeout: float | None,
              on_started: Callable[[], None] | None, names: set[str]) -> tuple[dict, bytes]:
        announced = False

        def announce() -> None:
            nonlocal announced
            if not announced:
                announced = True
                if on_started is not None:
                    on_started()

        try:
            if cancel is not None and cancel.is_set():
                raise BastionError("ExecutionError", "the query was cancelled at your request", cancelled=True)
            timeout = _query_timeout(names, catalog, scientist, timeout)
            deadline = None if timeout is None else time.monotonic() + timeout
            worker = self._acquire("small" if is_small_query(plan, catalog) else "regular")
            reusable = False
            try:
                request = {"op": op, "plan": plan, "catalog": _catalog_to_json(executor.read_by(plan, catalog, names)),
                           "scientist": scientist}
                header, payload = worker.call(request, cancel, deadline, timeout, announce)
                reusable = True
            except WorkerDied:
                worker.kill()  # (it is gone already, or it closed its end: either way it serves no more)
                log.warning("a query worker ended before it answered (exit status %s; -9 is SIGKILL, as the "
                            "out-of-memory killer sends); %s from %s refused", worker.process.returncode, op,
                            scientist)
                raise BastionError("LimitExceeded", "the query stopped the worker process that ran it, most "
                                                    "likely by needing more memory than the executor may use; "
                                                    "other sessions were not affected. Filter or aggregate "
                                                    "earlier, or ask the owner.", limit="worker_memory") from None
            finally:
                self._release(worker, reusable)
        finally:
            announce()
        if "error" in header:
            raise BastionError.from_body(header["error"])
        if "internal" in header:
            raise RuntimeError(f"the query worker failed:\n{header['internal']}")
        return header, payload

    def _acquire(self, kind: str) -> _Worker:
        with self._lock:
            if self._closed:
                raise BastionError("ExecutionError", "the executor is shutting down")
            idle = self._idle[kind]
            worker = idle.pop() if idle else None
        if worker is None:
            worker = _Worker(self.shared_dir, kind)
        with self._lock:
            self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker, reusable: bool) -> None:
        with self._lock:
            self._busy.discard(worker)
        if not (reusable and worker.reusable() and self._keep(worker)):
            worker.kill()

    def _keep(self, worker: _Worker) -> bool:
        """Keep an idle worker for reuse, if its kind has room (else stop it); True when kept."""
        with self._lock:
            idle = self._idle[worker.kind]
            if not self._closed and len(idle) < self._sizes[worker.kind]:
                idle.append(worker)
                return True
        worker.kill()
        return False


# A query over datasets whose files are all at most this large, through operations that never multiply rows,
# runs in a one-thread "small" worker (QueryWorkers).
SMALL_QUERY_MAX_BYTES = 16 * 2**20
_SMALL_QUERY_OPS = frozenset({"scan", "saved", "filter", "select", "with_columns", "group_by", "sort", "head",
                              "slice", "drop", "rename", "drop_nulls", "fill_null", "unique", "with_row_index"})


def runs_in_executor(plan: Any, catalog: Mapping[str, Dataset]) -> bool:
    """True when a plan (unchecked JSON) reads a dataset of an engine other than polars: it runs in the executor's
    own process, not in a query worker.

    A worker is a polars process.  The Spark engine's driver is the executor's one SparkSession (a JVM per
    process would cost seconds and 400 MB per worker); Spark runs the query on its own executors, and a cancel
    or the time limit stops its jobs by their tag (:mod:`owner_console.engine.spark.engine`).
    """
    return _other_engine(walk.source_names(plan), catalog)


def _other_engine(names: set[str], catalog: Mapping[str, Dataset]) -> bool:
    return any(getattr(catalog.get(name), "engine", "polars") != "polars" for name in names)


def is_small_query(plan: Any, catalog: Mapping[str, Dataset]) -> bool:
    """True when a plan (unchecked JSON: the worker validates it) reads only small files and never joins,
    concatenates or explodes.  Only chooses the kind of worker, never what the plan may do."""
    for node in walk.json_objects(plan):
        if "expr" in node:
            continue
        op = node.get("op")
        if not isinstance(op, str) or op not in _SMALL_QUERY_OPS:
            return False
        if op in ("scan", "saved"):
            name = walk.source_name(node)
            dataset = catalog.get(name) if name is not None else None
            try:
                if dataset is None or Path(dataset.path).stat().st_size > SMALL_QUERY_MAX_BYTES:
                    return False
            except OSError:
                return False
    return True


def _query_timeout(names: set[str], catalog: Mapping[str, Dataset], scientist: str | None,
                   workspace_limit: float | None) -> float | None:
    """As :func:`executor.query_timeout`, over the datasets a plan names (``names``; the worker validates the plan)."""
    read = {name: catalog[name] for name in names if name in catalog}
    if any(scientist in d.policy.scientists for d in read.values()):  # (else their policies apply as they are)
        read = executor.for_scientist(read, scientist)
    return executor.query_timeout(read.values(), workspace_limit)


class WorkerTable:
    """A result table as a query worker sent it: Arrow IPC bytes, with the height and column types it read off it.

    The executor only counts, describes and forwards a result, so it is
    decoded (:meth:`frame`) only where a frame is needed: right after a long
    query, decoding even a 50-row table costs a fifth of a millisecond.
    ``height`` and ``schema`` (``{column: dtype as polars prints it}``) read
    as a polars DataFrame's do.
    """

    def __init__(self, ipc: bytes, height: int, schema: list[list[str]]) -> None:
        self.ipc = ipc
        self.height = int(height)
        self.schema = {str(name): str(dtype) for name, dtype in schema}

    def frame(self) -> Any:
        """The table as a polars DataFrame."""
        return _read_ipc(self.ipc)


def _read_ipc(payload: bytes) -> Any:
    import polars as pl
    return pl.read_ipc(io.BytesIO(payload))


if __name__ == "__main__":
    sys.exit(main())
