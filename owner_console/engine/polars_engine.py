"""The polars engine: the dataset cache, the compiler and cancellable running, behind :class:`Engine`.

:class:`PolarsEngine` wraps one :class:`~owner_console.engine.cache.DatasetCache`
(the executor's shared cache, or a query worker's own).  The module-level
:func:`run`, :func:`output_schema` and :func:`join_sizes` take that cache as
an argument, for callers that hold a cache rather than an engine.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import polars as pl

from bastion_kernel.contract import plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .cache import DEFAULT_CACHE, DatasetCache, dtype_name, is_streamed
from .accounting import UNSURE
from .compile import Compiler, compile_plan, resolve_schema
from .interface import Engine
from .running import collect, collect_cancellable, is_polars_panic

# Run queries on polars' streaming engine, not only those over streamed datasets.  Measured on a filtered group-by
# over a memory-mapped 10M-row table (the memory benchmark's query): 44 ms instead of 70 ms, and 15 MB of working
# memory instead of 265 MB, which is what lets several queries run at once within the memory target.  Operations
# the streaming engine does not implement fall back to the in-memory engine inside polars; joins keep their order
# explicitly (Compiler._join), as the in-memory engine does.  Cross joins stay on the in-memory engine: polars
# 1.36's streaming cross join panics on some inputs.
STREAM_EVERY_QUERY = True
# What the scientist is told of any failure while running, on every engine: whether and how a query fails can
# depend on rows that are never released, and the engines' own messages can quote values.
DATA_FAILURE = ("the query failed while running, for example on an operation whose types do not fit; the message is "
                "the same for every failure because what failed can depend on rows that are not released")
# Queries whose inputs (the cached tables they scan) hold at most this many rows together run on the in-memory
# engine, which starts faster: measured on accounted group-bys, filtered group-bys and joins (benchmarks/RESULTS.md,
# section 19), 0.1-0.5 ms faster up to about 20,000 rows, the same near 50,000, slower beyond.
IN_MEMORY_MAX_ROWS = 20_000
# How many dominance measures a cache remembers as not cleared by the facts' ranges (see PolarsEngine.run).
RANGE_MISSES_KEPT = 1_000


class PolarsEngine(Engine):
    """Runs plans with polars over the datasets of ``cache``.

    Parameters
    ----------
    cache : DatasetCache, optional
        Where datasets are read from; the executor's shared
        :data:`~owner_console.engine.cache.DEFAULT_CACHE` when omitted.
    """

    name = "polars"
    opendp_lazyframe = True

    def __init__(self, cache: DatasetCache | None = None) -> None:
        self.cache = cache or DEFAULT_CACHE

    def columns(self, dataset: Dataset) -> tuple[str, ...]:
        return self.cache.columns(dataset)

    def schema(self, dataset: Dataset) -> list[tuple[str, str]]:
        return self.cache.schema(dataset)

    def unique_keys(self, dataset: Dataset, columns: tuple[str, ...]) -> bool:
        return self.cache.unique_keys(dataset, columns)

    def data_version(self, dataset: Dataset) -> str:
        """The file's resolved path, size and modification time (what the cache keys a table by); "" if unreadable."""
        try:
            path = Path(dataset.path).resolve()
            stat = path.stat()
        except OSError:
            return ""
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"

    def output_schema(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[tuple[str, str]]:
        schema = resolve_schema(compile_plan(plan, catalog, self.cache), plan.get("op", "plan"))
        return [(name, dtype_name(dtype)) for name, dtype in schema.items()]

    def empty_result(self, plan: dict, catalog: Mapping[str, Dataset]) -> pl.DataFrame:
        schema = resolve_schema(compile_plan(plan, catalog, self.cache), plan.get("op", "plan"))
        return pl.DataFrame(schema=schema)

    def join_sizes(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[int]:
        """See :meth:`Engine.join_sizes`: from per-key counts of each side (``plan``: checked, not accounted)."""
        sizes = []
        for node in walk.walk_frames(plan):
            if node["op"] != "join" or node["how"] in ("semi", "anti"):
                continue
            left = compile_plan(node["left"], catalog, self.cache)
            right = compile_plan(node["right"], catalog, self.cache)
            streaming = _streams(node, catalog, self.cache)
            if node["how"] == "cross":
                sizes.append(int(collect(left.select(pl.len()), streaming).item()) *
                             int(collect(right.select(pl.len()), streaming).item()))
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
            size = int(collect(total, streaming).item() or 0)
            if node["how"] == "full":
                size += int(collect(right_counts.join(left_counts, on=keys, how="anti").select(pl.col("r").sum()),
                                    streaming).item() or 0)
            sizes.append(size)
        return sizes

    def run(self, plan: dict, catalog: Mapping[str, Dataset], *,
            cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
        """See :meth:`Engine.run`.

        A dominance bound computed with the facts' ranges
        (``AccountingCompiler._acct_share``) that leaves a group unsure is
        measured again with the groups' own ranges: the query runs a second
        time without the facts' ranges (within the same time limit), and the
        measure is remembered so that later queries skip the first try.
        """
        started = time.monotonic()
        compiled = self._compiled(plan, catalog)
        streaming = compiled.streaming
        table = self._collect(compiled.query, streaming, cancel, timeout, compiled.sliced_join)
        unsure = [miss for name, miss in compiled.ranged_shares
                  if name in table.columns and bool((table.get_column(name) == UNSURE).any())]
        if not unsure:
            return table
        if len(self.cache.range_misses) >= RANGE_MISSES_KEPT:
            self.cache.range_misses.clear()
        self.cache.range_misses.update(unsure)
        remaining = None if timeout is None else timeout - (time.monotonic() - started)
        try:
            if remaining is not None and remaining <= 0:
                raise BastionError("LimitExceeded", "", limit="query_timeout_seconds")
            return self._collect(Compiler(catalog, self.cache, fact_ranges=False).frame(plan), streaming, cancel,
                                 remaining, compiled.sliced_join)
        except BastionError as error:
            if error.ename != "LimitExceeded" or error.details.get("limit") != "query_timeout_seconds":
                raise
            # Told as the one query's limit it is (the time left is not the scientist's to learn).
            raise BastionError("LimitExceeded", f"the query ran longer than {timeout:g} s and was cancelled",
                               limit="query_timeout_seconds", seconds=timeout) from None

    def _compiled(self, plan: dict, catalog: Mapping[str, Dataset]) -> CompiledQuery:
        """The plan's polars query, compiled once per plan and versions of the tables it reads.

        Compiling reads only the cached tables (and their facts), so the same
        accounted plan over the same file versions compiles to the same
        query: kept by :meth:`DatasetCache.remembered` (with the dominance
        measures the facts' ranges left unsure, which change it), it saves
        the compile's milliseconds on a repeated query.  A plan reading a
        streamed file is compiled every time.
        """
        digest, names = _hash_and_sources(plan)
        sources = []
        for name in names:
            dataset = catalog.get(name)
            if dataset is None or is_streamed(dataset):
                return self._compile(plan, catalog)
            sources.append((dataset, self.cache.frame(dataset)))
        key = ("compiled", digest, frozenset(self.cache.range_misses))
        return self.cache.remembered(key, sources, lambda: self._compile(plan, catalog))

    def _compile(self, plan: dict, catalog: Mapping[str, Dataset]) -> CompiledQuery:
        compiler = Compiler(catalog, self.cache)
        query = compiler.frame(plan)
        return CompiledQuery(query, _streams_compiled(compiler), tuple(compiler.ranged_shares), compiler.sliced_join)

    def _collect(self, query: pl.LazyFrame, streaming: bool, cancel: threading.Event | None,
                 timeout: float | None, exact_slices: bool) -> pl.DataFrame:
        try:
            if cancel is None and timeout is None:
                return collect(query, streaming, exact_slices)
            return collect_cancellable(query, cancel, timeout, streaming, exact_slices)
        except BastionError:
            raise
        except MemoryError:
            raise BastionError("LimitExceeded", "the query needs more memory than the executor has") from None
        except BaseException as exc:  # noqa: BLE001 - polars messages can quote data values: keep only the class
            if not isinstance(exc, Exception) and not is_polars_panic(exc):
                raise  # KeyboardInterrupt, SystemExit
            raise BastionError("ExecutionError", DATA_FAILURE, error_class=type(exc).__name__) from None


@dataclass(frozen=True)
class CompiledQuery:
    """A compiled plan and what running it needs to know: the engine, the shares measured with the facts'
    ranges (``(column, measure)``), and whether a slice follows a join (``running.optimizations``)."""

    query: pl.LazyFrame
    streaming: bool
    ranged_shares: tuple[tuple[str, tuple], ...]
    sliced_join: bool


# Accounted plans' hashes and source names by the plan object (see _hash_and_sources), and the largest plan
# (canonical JSON) kept: an entry holds its plan.
PLAN_KEYS_KEPT = 64
PLAN_KEYS_MAX_BYTES = 64 * 1024
_plan_keys: OrderedDict[int, tuple[dict, str, tuple[str, ...]]] = OrderedDict()
_plan_keys_lock = threading.Lock()


def _hash_and_sources(plan: dict) -> tuple[str, tuple[str, ...]]:
    """An accounted plan's hash and the names of the datasets it reads, kept for the same plan object.

    The executor keeps each accounted plan (``executor._PreparedPlans``) and
    never changes it, so a repeated query hands the same object: it is
    hashed and walked once.  The plan is held with its entry, so its ``id``
    is not reused while the entry lives.
    """
    with _plan_keys_lock:
        kept = _plan_keys.get(id(plan))
        if kept is not None and kept[0] is plan:
            return kept[1], kept[2]
    names = tuple(node["dataset"] if node["op"] == "scan" else node["name"]
                  for node in walk.json_objects(plan)  # accounted: its acct_* nodes are not in the public tables
                  if "expr" not in node and node.get("op") in ("scan", "saved"))
    text = P.canonical_json(plan)
    digest = hashlib.sha256(text).hexdigest()  # P.plan_hash, from the bytes measured here
    if len(text) <= PLAN_KEYS_MAX_BYTES:
        with _plan_keys_lock:
            _plan_keys[id(plan)] = (plan, digest, names)
            while len(_plan_keys) > PLAN_KEYS_KEPT:
                _plan_keys.popitem(last=False)
    return digest, names


def _streams(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache) -> bool:
    """True when the plan runs on the streaming engine (see :data:`STREAM_EVERY_QUERY`, :func:`is_streamed`,
    :data:`IN_MEMORY_MAX_ROWS`)."""
    names = walk.source_names(plan)
    if any(name in catalog and is_streamed(catalog[name]) for name in names):
        return True
    if not STREAM_EVERY_QUERY or _has_cross_join(plan):
        return False
    rows = 0
    for name in names:
        if name not in catalog:
            return True
        try:
            rows += cache.frame(catalog[name]).height  # read already: the plan was compiled
        except BastionError:
            return True
        if rows > IN_MEMORY_MAX_ROWS:
            return True
    return False


def _streams_compiled(compiler: Compiler) -> bool:
    """:func:`_streams` for a plan ``compiler`` has compiled, from what it saw (no second walk of the plan)."""
    if compiler.streamed_input:
        return True
    if not STREAM_EVERY_QUERY or compiler.cross_join:
        return False
    return sum(table.height for table in compiler.inputs.values()) > IN_MEMORY_MAX_ROWS


def _has_cross_join(plan: Any) -> bool:
    # json_objects, not walk_frames: an accounted plan's acct_* nodes are not in the public tables.
    return any(node.get("op") == "join" and node.get("how") == "cross" for node in walk.json_objects(plan))


def run(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None, *,
        cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
    """:meth:`PolarsEngine.run` on ``cache`` (the shared cache when omitted)."""
    return PolarsEngine(cache).run(plan, catalog, cancel=cancel, timeout=timeout)


def output_schema(plan: dict, catalog: Mapping[str, Dataset],
                  cache: DatasetCache | None = None) -> list[tuple[str, str]]:
    """:meth:`PolarsEngine.output_schema` on ``cache`` (the shared cache when omitted)."""
    return PolarsEngine(cache).output_schema(plan, catalog)


def join_sizes(plan: dict, catalog: Mapping[str, Dataset], cache: DatasetCache | None = None) -> list[int]:
    """:meth:`PolarsEngine.join_sizes` on ``cache`` (the shared cache when omitted)."""
    return PolarsEngine(cache).join_sizes(plan, catalog)
