"""The engines that run checked, accounted plans, and the choice of one for a plan.

:func:`engine_for` gives the :class:`~owner_console.engine.interface.Engine`
that reads a plan's datasets (each dataset names its engine,
``Dataset.engine``): polars (:mod:`.polars_engine`) or Spark (:mod:`.spark`,
imported on first use).  The polars engine's public names are re-exported
here for callers that hold a dataset cache rather than an engine.

Modules: :mod:`.interface` (the abstract engine), :mod:`.cache` (reading
datasets, shared copies, the streaming threshold), :mod:`.compile` (plan ->
polars), :mod:`.accounting` (the ``acct_*`` nodes), :mod:`.running`
(cancellable collect), :mod:`.polars_engine`.

The settings tests and benchmarks change (``cache.STREAMING_MIN_BYTES``,
``cache.COPY_IN_PROCESS_MAX_BYTES``, ``accounting.BITSET_MAX_ROWS``,
``polars_engine.STREAM_EVERY_QUERY``, ``polars_engine.IN_MEMORY_MAX_ROWS``) are not re-exported: a copy here would
take a patch without effect.  Patch them on the module that reads them.
"""
from __future__ import annotations

from typing import Callable, Iterable

from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .accounting import ACCOUNT_DTYPE, RESERVED_PREFIX
from .cache import DEFAULT_CACHE, DatasetCache, dtype_name, is_streamed, source_schema, streaming_threshold
from .compile import MAX_REPEAT, compile_plan
from .interface import Engine
from .polars_engine import PolarsEngine, join_sizes, output_schema, run
from .running import MAX_ABANDONED_QUERIES, abandoned_queries, is_polars_panic, wait_or_stop

__all__ = ["engine_for", "Engine", "PolarsEngine", "DatasetCache", "DEFAULT_CACHE", "run", "output_schema",
           "join_sizes", "compile_plan", "is_streamed", "streaming_threshold", "source_schema", "dtype_name",
           "is_polars_panic", "wait_or_stop", "abandoned_queries", "MAX_ABANDONED_QUERIES", "MAX_REPEAT",
           "ACCOUNT_DTYPE", "RESERVED_PREFIX", "ENGINES"]


def _spark_engine(cache: DatasetCache | None) -> Engine:
    # Imported on first use: PySpark is an extra, and an executor without Spark datasets never loads it.
    from .spark.engine import SparkEngine
    return SparkEngine(cache)


# Each engine by the name datasets give it: a factory given the polars engine's dataset cache (None: the
# shared one), which other engines ignore.
ENGINES: dict[str, Callable[[DatasetCache | None], Engine]] = {
    "polars": PolarsEngine,
    "spark": _spark_engine,
}


def engine_for(datasets: Iterable[Dataset], cache: DatasetCache | None = None) -> Engine:
    """The engine that runs a plan over ``datasets`` (the datasets its ``scan`` nodes read).

    Saved results are left out by the caller: they are polars tables on the
    owner's side, read by whichever engine runs the plan.  No dataset (a
    plan of saved results only) means the polars engine.

    Parameters
    ----------
    datasets : iterable of Dataset
        The datasets the plan reads.
    cache : DatasetCache, optional
        The polars engine's dataset cache (a query worker's own); the shared
        :data:`DEFAULT_CACHE` when omitted.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` when the datasets are on different engines,
        or on an engine this executor does not have; the message names the
        engines and datasets (the plan's and the owner's names, no data).
    """
    by_engine: dict[str, list[str]] = {}
    for dataset in datasets:
        by_engine.setdefault(dataset.engine, []).append(dataset.name)
    if len(by_engine) > 1:
        shown = "; ".join(f"{name}: {', '.join(sorted(names))}" for name, names in sorted(by_engine.items()))
        raise BastionError("UnsupportedOperation", "a query may read datasets of one engine only; this one reads "
                                                   f"datasets on several ({shown})", engines=sorted(by_engine))
    name = next(iter(by_engine), "polars")
    factory = ENGINES.get(name)
    if factory is None:
        raise BastionError("UnsupportedOperation", f"the engine {name!r} of dataset(s) "
                                                   f"{', '.join(sorted(by_engine[name]))} is not one this executor "
                                                   f"has ({', '.join(sorted(ENGINES))})", engine=name)
    return factory(cache)
