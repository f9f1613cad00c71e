"""The proposed engine change for large Parquet datasets, applied at run time for benchmarks only.

Proposal (for ``owner_console/engine.py``; see ``benchmarks/RESULTS.md``): a
Parquet dataset whose file is at least :data:`STREAMING_MIN_BYTES` is never
read into memory.  Its scan is ``pl.scan_parquet`` (lazy: only the columns
and row groups a query needs are read), its column names and schema come from
the file's footer, and a query that reads it is collected with polars'
streaming engine (``collect(engine="streaming")``, also in background mode),
which works in bounded memory and leaves polars' thread pool to the small
in-memory queries of other scientists.

This module applies that change to a running executor by patching
:mod:`owner_console.engine` (``bastion-owner serve`` imports it through
``benchmarks/streaming_site/sitecustomize.py`` when
``BASTION_BENCH_STREAMING=1``), so the benchmarks can measure it without
editing the engine, which belongs to another engineer.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import polars as pl

STREAMING_MIN_BYTES = int(os.environ.get("BASTION_BENCH_STREAMING_MIN_BYTES", 64 * 2**20))


def is_large(dataset) -> bool:
    """A Parquet dataset big enough to be scanned lazily and streamed."""
    try:
        return dataset.format == "parquet" and Path(dataset.path).stat().st_size >= STREAMING_MIN_BYTES
    except OSError:
        return False


class StreamingInProcess:
    """``collect(engine="streaming")`` on a helper thread, with ``InProcessQuery``'s interface.

    polars 1.36's ``collect(background=True)`` ignores ``engine="streaming"``
    (it runs the in-memory engine: measured 1013 MB peak instead of 454 MB for
    the same query), so the engine's cancellable collect cannot use it for
    large scans.  ``fetch()`` returns None until the result is ready (and
    re-raises the query's exception); ``cancel()`` drops the result (the
    streaming query runs to its end, as background queries mostly do in 1.36).
    """

    def __init__(self, query: pl.LazyFrame):
        self._done = threading.Event()
        self._result: pl.DataFrame | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._collect, args=(query,), name="bastion-streaming", daemon=True)
        self._thread.start()

    def _collect(self, query: pl.LazyFrame) -> None:
        try:
            self._result = pl.LazyFrame.collect(query, engine="streaming")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by fetch()
            self._error = exc
        finally:
            self._done.set()

    def fetch(self) -> pl.DataFrame | None:
        if not self._done.is_set():
            return None
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        self._result = None


class _StreamingQuery(pl.LazyFrame):
    """A LazyFrame whose ``collect`` (plain or background) uses the streaming engine."""

    def collect(self, *args, background: bool = False, **kwargs):  # type: ignore[override]
        if background:
            return StreamingInProcess(self)
        kwargs.setdefault("engine", "streaming")
        return super().collect(*args, **kwargs)


def apply() -> None:
    """Patch :mod:`owner_console.engine` with the proposal."""
    from owner_console import engine

    frame, compiler_scan, compile_plan = engine.DatasetCache.frame, engine._Compiler._scan, engine.compile_plan

    def columns(self, dataset):
        if is_large(dataset):
            return tuple(pl.scan_parquet(dataset.path).collect_schema().names())
        return tuple(frame(self, dataset).columns)

    def schema(self, dataset):
        if is_large(dataset):
            source = pl.scan_parquet(dataset.path).collect_schema()
        else:
            source = frame(self, dataset).schema
        return [(name, engine.dtype_name(dtype)) for name, dtype in source.items()]

    def scan(self, node):
        dataset = self.catalog[node["dataset"]]
        if is_large(dataset):
            return pl.scan_parquet(dataset.path)
        return compiler_scan(self, node)

    def streaming_compile_plan(plan, catalog, cache=None):
        query = compile_plan(plan, catalog, cache)
        if any(is_large(catalog[name]) for name in _scanned(plan) if name in catalog):
            return _StreamingQuery._from_pyldf(query._ldf)
        return query

    engine.DatasetCache.columns = columns
    engine.DatasetCache.schema = schema
    engine._Compiler._scan = scan
    engine.compile_plan = streaming_compile_plan


def _scanned(node) -> set[str]:
    """Dataset names scanned anywhere in a plan."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("op") == "scan" and isinstance(item.get("dataset"), str):
                found.add(item["dataset"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found
