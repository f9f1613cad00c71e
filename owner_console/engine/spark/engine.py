"""The Spark engine: checked, accounted plans run as PySpark DataFrame calls on the owner's Spark.

:class:`SparkEngine` implements :class:`~owner_console.engine.interface.Engine`
for datasets whose ``engine`` is ``"spark"``.  The plan compiler
(:func:`owner_console.engine.spark.compile.compile_result`) builds the
DataFrame and gives the polars engine's schema of its result; this module
reads the sources for it (:mod:`.sources`), runs it on this process's session
(:mod:`.session`) and brings only the result back, as Arrow (``toArrow``,
then cast to that schema by :func:`.compile.to_polars`).  Spark plans run in
the executor's own process, not in the polars query workers
(:func:`owner_console.workers.runs_in_executor`).

Cancel and time limits.  Every run carries a job tag of its own.  A classic
session (``master``) tags the jobs from the thread that runs the action
(``SparkContext.addJobTag`` is thread-local); on cancel or at the deadline a
watchdog thread calls ``cancelJobsWithTag`` every :data:`CANCEL_EVERY_SECONDS`
until the action returns, because adaptive execution submits further jobs
after the first is cancelled.  A Spark Connect session tags the operation
(``addTag``) and the watchdog calls ``interruptTag``.  The action then fails
and the scientist gets ``ExecutionError`` with ``cancelled`` (cancel) or
``LimitExceeded`` (time limit).

Errors.  Spark's own messages never reach the scientist: they can quote
values of rows that are not released.  A failed or lost job is the same
fixed ``ExecutionError`` the polars engine gives for every data failure; the
owner's details (the audit log) keep the exception's class and Spark's error
condition, the executor's log the first line of Spark's message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Mapping

import polars as pl

from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from ...model import Dataset
from ...workspace import WorkspaceError
from ..cache import dtype_name
from ..interface import Engine
from ..polars_engine import DATA_FAILURE
from . import session as spark_session
from . import sources

log = logging.getLogger("bastion.executor")

CANCELLED = "the query was cancelled at your request"
# How often the watchdog looks at the cancel flag and the deadline, and how often it cancels the run's jobs
# again once it has (until the action returns).
WATCH_EVERY_SECONDS = 0.02
CANCEL_EVERY_SECONDS = 0.1


class SparkEngine(Engine):
    """Runs plans on this process's SparkSession (see the module docstring).

    Parameters
    ----------
    cache : DatasetCache, optional
        The polars engine's dataset cache; not used (Spark reads the
        sources itself).  Accepted so that every engine is made alike by
        :func:`owner_console.engine.engine_for`.
    """

    name = "spark"

    def __init__(self, cache: Any = None) -> None:
        del cache

    # ------------------------------------------------------------ datasets
    def columns(self, dataset: Dataset) -> tuple[str, ...]:
        return tuple(name for name, _ in self.schema(dataset))

    def schema(self, dataset: Dataset) -> list[tuple[str, str]]:
        """The dataset's columns with the polars types their values arrive with (kept per data version)."""
        from .types import polars_schema

        version = self._path_version(dataset)
        key = (_identity(dataset), version)
        if version:
            with _cache_lock:
                cached = _schemas.get(key)
            if cached is not None:
                return list(cached)
        try:
            struct = sources.read(self.spark(), dataset, version, ordered=False).schema
        except Exception as exc:  # noqa: BLE001 - Spark's message can name paths or values: keep the class
            if _spark_failure(exc) is None:
                raise
            raise _unreadable(dataset, exc) from None
        names = [(name, dtype_name(dtype))
                 for name, dtype in polars_schema(struct, skip=sources.ORDER_COLUMNS).items()]
        if version:
            with _cache_lock:
                for stale in [k for k in _schemas if k[0] == key[0]]:
                    del _schemas[stale]
                _schemas[key] = tuple(names)
        return names

    def unique_keys(self, dataset: Dataset, columns: tuple[str, ...]) -> bool:
        """See :meth:`Engine.unique_keys`: one Spark job (a count per key), kept per data version."""
        from pyspark.sql import functions as F

        columns = tuple(columns)
        version = self.data_version(dataset)
        key = (_identity(dataset), version, columns)
        if version:
            with _cache_lock:
                if key in _unique:
                    return _unique[key]
        timeout = _time_limit([dataset])
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            spark = self.spark()
            frame = sources.read(spark, dataset, version, ordered=False)
            repeated = frame.groupBy(*[F.col(_quoted(c)) for c in columns]) \
                .agg(F.count(F.lit(1)).alias("__bastion_rows")).where(F.col("__bastion_rows") > 1).limit(1)
            # Under a job tag and the dataset's time limit, as a query is.
            unique = len(_tagged(spark, lambda: repeated.take(1), None, deadline, timeout)) == 0
        except BastionError as error:
            if error.ename == "LimitExceeded":
                raise
            return False  # a key that cannot be checked is treated as not unique
        except Exception:  # noqa: BLE001 - a key that cannot be checked is treated as not unique
            return False
        if version:
            with _cache_lock:
                for stale in [k for k in _unique if k[0] == key[0] and k[1] != version]:
                    del _unique[stale]
                _unique[key] = unique
        return unique

    def data_version(self, dataset: Dataset) -> str:
        """See :func:`.sources.data_version`; "" when the source cannot be listed."""
        try:
            return sources.data_version(self.spark, dataset)
        except Exception as exc:  # noqa: BLE001 - an unreadable source has no version (as on polars)
            log.warning("no data version for dataset %r (%s)", dataset.name, type(exc).__name__)
            return ""

    # ------------------------------------------------------------ planning checks
    def output_schema(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[tuple[str, str]]:
        """The polars engine's output schema of the plan (the compiler's, over empty tables: no data read)."""
        return [(name, dtype_name(dtype)) for name, dtype in self._compiled(plan, catalog).schema.items()]

    def empty_result(self, plan: dict, catalog: Mapping[str, Dataset]) -> pl.DataFrame:
        return pl.DataFrame(schema=self._compiled(plan, catalog).schema)

    def join_sizes(self, plan: dict, catalog: Mapping[str, Dataset]) -> list[int]:
        """See :meth:`Engine.join_sizes`: from per-key counts of each side, Spark jobs per join (``plan`` checked)."""
        from pyspark.sql import functions as F

        sizes = []
        timeout = _time_limit([catalog[name] for name in walk.source_names(plan) if name in catalog])
        deadline = None if timeout is None else time.monotonic() + timeout
        spark = self.spark()
        for node in walk.walk_frames(plan):
            if node["op"] != "join" or node["how"] in ("semi", "anti"):
                continue
            left = self._compiled(node["left"], catalog).frame
            right = self._compiled(node["right"], catalog).frame
            try:
                if node["how"] == "cross":
                    counts = _tagged(spark, lambda: (left.count(), right.count()), None, deadline, timeout)
                    sizes.append(int(counts[0]) * int(counts[1]))
                    continue
                keys = [f"k{i}" for i in range(len(node["left_on"]))]
                left_counts = left.groupBy(*[F.col(_quoted(k["name"])).alias(n)
                                             for k, n in zip(node["left_on"], keys)]) \
                    .agg(F.count(F.lit(1)).alias("l"))
                right_counts = right.groupBy(*[F.col(_quoted(k["name"])).alias(n)
                                               for k, n in zip(node["right_on"], keys)]) \
                    .agg(F.count(F.lit(1)).alias("r"))
                matched = left_counts.join(right_counts, on=keys, how="left")
                if node["how"] == "inner":
                    total = matched.select(F.sum(F.col("l") * F.col("r")))
                else:  # left and full: unmatched left rows appear once
                    total = matched.select(F.sum(F.col("l") * F.coalesce(F.col("r"), F.lit(1))))
                size = int(_tagged(spark, total.first, None, deadline, timeout)[0] or 0)
                if node["how"] == "full":
                    unmatched = right_counts.join(left_counts, on=keys, how="left_anti").select(F.sum("r"))
                    size += int(_tagged(spark, unmatched.first, None, deadline, timeout)[0] or 0)
            except BastionError:
                raise  # stopped at the time limit, or a failure already told as the fixed error
            except Exception as exc:  # noqa: BLE001 - a failed count is a failed query, told alike
                raise _execution_error(exc, self.spark()) from None
            sizes.append(size)
        return sizes

    # ------------------------------------------------------------ running
    def run(self, plan: dict, catalog: Mapping[str, Dataset], *,
            cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
        from .compile import fetched_to_polars, to_polars

        if cancel is not None and cancel.is_set():
            raise BastionError("ExecutionError", CANCELLED, cancelled=True)
        # The time limit counts from here: building and analysing the DataFrame is part of the query.
        deadline = None if timeout is None else time.monotonic() + timeout
        spark = self.spark()
        compiled = self._compiled(plan, catalog, spark)
        # Fetched unsorted with its order columns when polars sorts them as Spark would (a Spark stage less).
        fetch = compiled.fetch if compiled.fetch is not None else compiled.frame
        try:
            frame = _fresh(spark, fetch)
        except Exception as exc:  # noqa: BLE001 - the session is gone
            if _spark_failure(exc) is None:
                raise
            raise _execution_error(exc, spark) from None
        table = _collect(spark, frame, cancel, deadline, timeout, tuple(compiled.changed_datasets))
        try:
            if compiled.fetch is not None:
                return fetched_to_polars(table, compiled)
            return to_polars(table, compiled.schema)
        except Exception as exc:  # noqa: BLE001 - whether a value fits its column's type depends on the data
            raise _execution_error(exc) from None

    def dp_exact(self, query: Any, catalog: Mapping[str, Dataset], *,
                 cancel: threading.Event | None = None, timeout: float | None = None) -> pl.DataFrame:
        """See :meth:`Engine.dp_exact` and :mod:`.dp` (truncation, filters, clamped sums per public key)."""
        from .dp import exact_aggregates
        return exact_aggregates(self, query, catalog, cancel=cancel, timeout=timeout)

    # ------------------------------------------------------------ helpers
    def spark(self) -> Any:
        """This process's SparkSession (:func:`.session.session`).

        Raises
        ------
        BastionError
            ``ExecutionError`` when Spark cannot start; why is in the executor's log.
        """
        try:
            return spark_session.session()
        except WorkspaceError as exc:
            log.error("the Spark engine is unavailable: %s", exc)
            raise BastionError("ExecutionError", "the executor could not reach its Spark engine; the owner's log "
                                                 "says why", engine="spark") from None

    def _path_version(self, dataset: Dataset) -> str:
        """The data version of a path source (listed by the executor, no Spark call); "" for a catalog table."""
        if sources.source_kind(dataset) == "table" or getattr(dataset, "engine", "spark") != "spark":
            return ""
        return self.data_version(dataset)

    def _compiled(self, plan: dict, catalog: Mapping[str, Dataset], spark: Any = None) -> Any:
        """The plan compiled (:func:`.compile.compile_result`: its DataFrame, its polars schema and the datasets
        whose key uniqueness the job checks), its sources read by :func:`.sources.read`.

        Kept per (plan, the sources and their data versions, session) in a small LRU (:data:`COMPILED_KEPT`):
        classic PySpark analyses every DataFrame call over Py4J, a few tenths of a second per accounted plan.
        A plan reading a source without a data version (a catalog table, a saved result) is compiled each time.
        """
        from .compile import compile_result

        spark = spark if spark is not None else self.spark()
        versions: dict[str, str] = {}
        key = self._compiled_key(plan, catalog, versions)
        if key is not None:
            with _cache_lock:
                found = _compiled_plans.get(key)
                if found is not None and found[0] is spark:
                    _compiled_plans.move_to_end(key)
                    return found[1]

        def read(dataset: Dataset, ordered: bool = True) -> Any:
            if dataset.name not in versions:
                versions[dataset.name] = self._path_version(dataset)
            try:
                frame = sources.read(spark, dataset, versions[dataset.name], ordered=ordered)
                frame.schema  # noqa: B018 - a Spark Connect frame is analysed only when asked: read fails here
            except Exception as exc:  # noqa: BLE001 - Spark's message can name paths or values: keep the class
                if _spark_failure(exc) is None:
                    raise
                raise _unreadable(dataset, exc) from None
            return frame

        def row_count(dataset: Dataset) -> int | None:
            if dataset.name not in versions:
                versions[dataset.name] = self._path_version(dataset)
            return sources.row_count(dataset, versions[dataset.name])

        def stats(dataset: Dataset, keys: tuple[str, ...], columns: Mapping[str, pl.DataType],
                  held: Mapping[str, pl.DataType]) -> pl.DataFrame | None:
            if dataset.name not in versions:
                versions[dataset.name] = self._path_version(dataset)
            return self._key_stats(spark, dataset, versions[dataset.name], keys, columns, held)

        try:
            compiled = compile_result(plan, catalog, spark, read, row_count, stats)
        except Exception as exc:  # noqa: BLE001 - classic Spark analyses each call as it is made
            kind = _spark_failure(exc)
            if kind is None:
                raise  # a BastionError, or a fault of Bastion's own: the executor logs it with a reference
            if kind == "analysis":
                raise _schema_error(exc, plan) from None
            raise _execution_error(exc, spark) from None
        if key is not None:
            with _cache_lock:
                _compiled_plans[key] = (spark, compiled)
                _compiled_plans.move_to_end(key)
                while len(_compiled_plans) > COMPILED_KEPT:
                    _compiled_plans.popitem(last=False)
        return compiled

    def _key_stats(self, spark: Any, dataset: Dataset, version: str, keys: tuple[str, ...],
                   columns: Mapping[str, pl.DataType], held: Mapping[str, pl.DataType]) -> pl.DataFrame | None:
        """Per-key statistics of ``columns`` (and holders of ``held``'s extremes) by ``keys`` for ``dataset``'s
        data ``version``
        (:mod:`.key_stats`): one Spark job per version and key for the columns not kept yet, under a job tag
        and the dataset's time limit.  None without a version, with too many groups, or when the job fails
        (the query then computes its checks itself)."""
        from .key_stats import kept_stats, measure

        if not version:
            return None
        timeout = _time_limit([dataset])
        deadline = None if timeout is None else time.monotonic() + timeout

        def measured(missing: Mapping[str, pl.DataType],
                     missing_held: Mapping[str, pl.DataType]) -> pl.DataFrame | None:
            frame = sources.read(spark, dataset, version, ordered=False)
            return measure(frame, keys, missing, missing_held,
                           lambda df: _tagged(spark, df.toArrow, None, deadline, timeout))

        try:
            return kept_stats(_identity(dataset), version, keys, columns, held, measured)
        except BastionError as error:
            if error.ename == "LimitExceeded":
                raise
            return None
        except Exception as exc:  # noqa: BLE001 - statistics only save work: the query computes its checks
            if _spark_failure(exc) is None:
                raise
            return None

    def _compiled_key(self, plan: dict, catalog: Mapping[str, Dataset], versions: dict[str, str]) -> tuple | None:
        """The compile cache's key of ``plan`` (``versions`` gets each source's data version), or None when a
        source has no data version to key it by."""
        names = sorted({walk.source_name(node) for node in walk.json_objects(plan)
                        if node.get("op") in ("scan", "saved")} - {None})
        sources_read = []
        for name in names:
            dataset = catalog.get(name)
            if dataset is None:
                return None
            version = versions[name] = self._path_version(dataset)
            if not version:
                return None
            sources_read.append((name, _identity(dataset), dataset.format, getattr(dataset, "engine", "spark"),
                                 version))
        try:
            text = json.dumps(plan, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError):  # a value JSON cannot hold: not worth keeping
            return None
        return hashlib.sha256(text.encode()).hexdigest(), tuple(sources_read)


# ---------------------------------------------------------------- shared state
# Per process, as the session is: schemas of path sources and key checks, by data version.
_cache_lock = threading.Lock()
_schemas: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
_unique: dict[tuple[str, str, tuple[str, ...]], bool] = {}
# Compiled plans (see SparkEngine._compiled): key -> (the session they were built on, CompiledPlan).
COMPILED_KEPT = 64
_compiled_plans: "OrderedDict[tuple, tuple[Any, Any]]" = OrderedDict()


def _time_limit(datasets: list[Dataset]) -> float | None:
    """The smallest ``query_timeout_seconds`` of the datasets' policies (the executor's rule), or None."""
    limits = [getattr(d.policy, "query_timeout_seconds", None) for d in datasets]
    limits = [float(t) for t in limits if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0]
    return min(limits) if limits else None


def _identity(dataset: Dataset) -> str:
    return f"{sources.source_kind(dataset)}:{dataset.format}:{dataset.path}:{getattr(dataset, 'table', None)}"


def _quoted(name: str) -> str:
    """A column name as Spark's column parser reads it literally (dots and backquotes included)."""
    return "`" + name.replace("`", "``") + "`"


def _fresh(spark: Any, frame: Any) -> Any:
    """A new classic DataFrame over ``frame``'s analysed plan (a few ms): each run plans and executes anew, as a
    freshly compiled frame would, rather than re-running the kept frame's physical plan (whose shuffle output,
    or the state a cancelled run left, it would reuse).  A Spark Connect frame is a plan sent anew at each run."""
    if spark_session.is_connect(spark):
        return frame
    from pyspark.sql import DataFrame

    jdf = spark._jvm.org.apache.spark.sql.classic.Dataset.ofRows(spark._jsparkSession,
                                                                 frame._jdf.queryExecution().analyzed())
    return DataFrame(jdf, spark)


def _collect(spark: Any, frame: Any, cancel: threading.Event | None, deadline: float | None,
             timeout: float | None, changed_datasets: tuple[str, ...] = ()) -> Any:
    """``frame.toArrow()`` under a job tag of its own, stopped on ``cancel`` or at ``deadline`` (``time.monotonic``;
    ``timeout`` is the limit it stands for, for the message).

    ``changed_datasets``: the datasets whose join keys the job checks are still unique (``acct_unique``); a
    failed check is told as the polars engine tells it.
    """
    return _tagged(spark, frame.toArrow, cancel, deadline, timeout, changed_datasets)


def _tagged(spark: Any, action: Any, cancel: threading.Event | None, deadline: float | None,
            timeout: float | None, changed_datasets: tuple[str, ...] = ()) -> Any:
    """``action()`` (one or more Spark actions, run in this thread) under a job tag of its own, stopped on
    ``cancel`` or at ``deadline``: see :func:`_collect`."""
    # Stopped before it started (a cancel or the deadline while the plan was compiled): no job at all.
    if cancel is not None and cancel.is_set():
        raise _stop_error("cancelled", timeout)
    if deadline is not None and time.monotonic() >= deadline:
        raise _stop_error("timeout", timeout)
    tag = f"bastion-{uuid.uuid4().hex}"
    connect = spark_session.is_connect(spark)
    done = threading.Event()
    stopped: list[str] = []
    watchdog = None
    if cancel is not None or deadline is not None:
        watchdog = threading.Thread(target=_watch, args=(spark, tag, connect, cancel, deadline, done, stopped),
                                    name="bastion-spark-watchdog", daemon=True)
    try:
        if connect:
            spark.addTag(tag)
        else:
            context = spark.sparkContext
            context.addJobTag(tag)
            context.setInterruptOnCancel(True)  # a task blocked reading a file is interrupted too
    except Exception as exc:  # noqa: BLE001 - the session is gone before the query started
        raise _execution_error(exc, spark) from None
    try:
        if watchdog is not None:
            watchdog.start()
        table = action()
    except Exception as exc:  # noqa: BLE001 - Spark's message may quote data values
        if stopped:
            raise _stop_error(stopped[0], timeout) from None
        from .compile import is_changed_error

        if is_changed_error(exc):
            names = ", ".join(repr(name) for name in changed_datasets) or "of this query"
            raise BastionError("ExecutionError", f"dataset {names} changed while this query was being prepared; "
                               "run it again", changed=True) from None
        raise _execution_error(exc, spark) from None
    finally:
        done.set()
        try:
            if connect:
                spark.removeTag(tag)
            else:
                spark.sparkContext.removeJobTag(tag)
        except Exception:  # noqa: BLE001 - a lost session has no tags left to remove
            pass
    return table


def _watch(spark: Any, tag: str, connect: bool, cancel: threading.Event | None, deadline: float | None,
           done: threading.Event, stopped: list[str]) -> None:
    """Wait for the action; on cancel or at the deadline, stop the tag's jobs until the action returns."""
    while not done.wait(WATCH_EVERY_SECONDS):
        if cancel is not None and cancel.is_set():
            stopped.append("cancelled")
            break
        if deadline is not None and time.monotonic() >= deadline:
            stopped.append("timeout")
            break
    else:
        return
    while not done.is_set():
        try:
            if connect:
                spark.interruptTag(tag)
            else:
                spark.sparkContext.cancelJobsWithTag(tag)
        except Exception as exc:  # noqa: BLE001 - keep trying until the action returns
            log.warning("could not cancel Spark jobs tagged %s (%s)", tag, type(exc).__name__)
        done.wait(CANCEL_EVERY_SECONDS)


def _stop_error(reason: str, timeout: float | None) -> BastionError:
    if reason == "cancelled":
        return BastionError("ExecutionError", CANCELLED, cancelled=True)
    return BastionError("LimitExceeded", f"the query ran longer than {timeout:g} s and was cancelled",
                        limit="query_timeout_seconds", seconds=timeout)


def _spark_details(exc: BaseException) -> dict[str, str]:
    """The owner's details of a Spark failure: the exception's class and Spark's error condition (no message)."""
    details = {"error_class": type(exc).__name__}
    condition = _condition(exc)
    # py4j's Py4JJavaError holds the JVM's exception, often a wrapper ("awaitResult") of the SparkThrowable.
    cause = getattr(exc, "java_exception", None)
    for _ in range(8):
        if condition or cause is None:
            break
        condition = _condition(cause)
        try:
            cause = cause.getCause()
        except Exception:  # noqa: BLE001 - no JVM any more
            cause = None
    if condition:
        details["spark_condition"] = str(condition)[:120]
    return details


def _condition(exc: Any) -> str | None:
    """Spark's error condition of an exception (a PySpark one, or a JVM SparkThrowable through py4j), if any."""
    for name in ("getCondition", "getErrorClass"):
        method = getattr(exc, name, None)
        if callable(method):
            try:
                condition = method()
            except Exception:  # noqa: BLE001 - a JVM exception without the method, or no JVM any more
                condition = None
            if condition:
                return str(condition)
    return None


def _execution_error(exc: BaseException, spark: Any = None) -> BastionError:
    """The fixed failure of a run; the owner's log gets Spark's first line, and a dead session is dropped."""
    details = _spark_details(exc)
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    log.warning("a Spark query failed: %s %s: %s", details.get("spark_condition", ""), details["error_class"],
                first_line)
    if spark is not None and spark_session.is_stopped(spark):
        log.error("the Spark session has stopped; the next query starts a new one")
        spark_session.forget(spark)
    return BastionError("ExecutionError", DATA_FAILURE, engine="spark", **details)


def _schema_error(exc: BaseException, plan: dict) -> BastionError:
    """A plan Spark could not analyse: a fixed text naming the operation (Spark's message goes to the log)."""
    op = plan.get("op", "plan") if isinstance(plan, dict) else "plan"
    details = _spark_details(exc)
    log.info("Spark could not analyse a plan: %s %s: %s", details.get("spark_condition", ""),
             details["error_class"], (str(exc).strip().splitlines() or [""])[0][:300])
    return BastionError("SchemaError", f"{op} does not fit the columns' types", op=op, engine="spark", **details)


def _unreadable(dataset: Dataset, exc: BaseException) -> BastionError:
    return BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read ({type(exc).__name__})",
                        **_spark_details(exc))


def _spark_failure(exc: BaseException) -> str | None:
    """``"analysis"`` for a plan Spark refused to analyse, ``"failure"`` for a failed or lost job or connection,
    None for anything else (a BastionError, or a fault in Bastion's own code, which must not pass for Spark's)."""
    from pyspark import errors

    if isinstance(exc, BastionError):
        return None
    if isinstance(exc, errors.AnalysisException):
        return "analysis"
    # PySpark's own checks of its arguments: a call Bastion got wrong.
    misuse = (errors.PySparkTypeError, errors.PySparkValueError, errors.PySparkAttributeError,
              errors.PySparkKeyError, errors.PySparkIndexError, errors.PySparkNotImplementedError,
              errors.PySparkAssertionError)
    if isinstance(exc, misuse):
        return None
    if isinstance(exc, (errors.PySparkException, OSError)):
        return "failure"
    try:
        from py4j.protocol import Py4JError
    except ImportError:
        Py4JError = ()  # noqa: N806 - a Spark Connect-only install
    if Py4JError and isinstance(exc, Py4JError):
        return "failure"
    try:
        import grpc
    except ImportError:
        return None
    return "failure" if isinstance(exc, grpc.RpcError) else None
