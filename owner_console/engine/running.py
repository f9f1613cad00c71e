"""Running a polars query so that it can be cancelled or timed out: helper threads, abandoned queries.

polars 1.36 honours ``InProcessQuery.cancel()`` only between some of its
operators, and a streaming query not at all, so a query the scientist
cancels may compute on: the caller stops waiting at once, and the query is
counted as abandoned until polars lets it go.  :func:`wait_or_stop` is the
one waiting loop, also used by the query worker processes
(:mod:`owner_console.workers`), which kill a worker instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

import polars as pl

from bastion_kernel.contract.protocol import BastionError

log = logging.getLogger("bastion.executor")


def is_polars_panic(exc: BaseException) -> bool:
    """True for a Rust panic inside polars, which pyo3 raises as ``PanicException`` (a ``BaseException``)."""
    return type(exc).__name__ == "PanicException"


def collect(query: pl.LazyFrame, streaming: bool, exact_slices: bool = False) -> pl.DataFrame:
    """Collect ``query`` in this thread, on polars' streaming engine when ``streaming``.

    A panic of the streaming engine is answered by the in-memory engine.
    ``exact_slices``: no slice is pushed down the query (see :func:`optimizations`).
    """
    if not streaming:
        return query.collect(optimizations=optimizations(exact_slices))
    try:
        return query.collect(engine="streaming")
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        if not is_polars_panic(exc):
            raise
        # A panic inside polars' streaming engine is a polars bug, not the query's fault: the in-memory engine
        # is the reference, so the query is answered there (a streamed dataset's query may then need more memory,
        # which costs at most the worker process that runs it).
        log.warning("polars' streaming engine failed on a query (%s); ran it on the in-memory engine", exc)
        return query.collect(optimizations=optimizations(exact_slices))


def optimizations(exact_slices: bool) -> pl.QueryOptFlags:
    """polars' optimizations for the in-memory engine.

    ``exact_slices``: without slice pushdown.  polars 1.36's in-memory
    engine pushes a ``head`` or ``slice`` into a join kept in
    ``left_right`` order and then returns other rows than the first ones of
    that order (pola-rs/polars#28419); the query is exact without it.
    """
    flags = pl.QueryOptFlags()
    if exact_slices:
        flags.slice_pushdown = False
    return flags


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

    def __init__(self, query: pl.LazyFrame, streaming: bool, exact_slices: bool = False):
        self._done = threading.Event()
        self._abandoned = False
        self._result: pl.DataFrame | None = None
        self._error: BaseException | None = None
        self._handle = None if streaming else query.collect(background=True,
                                                            optimizations=optimizations(exact_slices))
        _QUERY_THREADS.submit(self._collect, query)

    def _collect(self, query: pl.LazyFrame) -> None:
        global _abandoned
        try:
            if self._handle is not None:
                self._result = self._handle.fetch_blocking()
            else:
                self._result = collect(query, streaming=True)
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


def collect_cancellable(query: pl.LazyFrame, cancel: threading.Event | None,
                        timeout: float | None, streaming: bool = False, exact_slices: bool = False) -> pl.DataFrame:
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
    running = _Running(query, streaming, exact_slices)
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

