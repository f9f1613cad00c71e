"""The Spark engine against a real Spark: registration, an executor serving Spark datasets, cancel, limits,
failures, data versions, and Spark Connect.

Everything is real: PySpark 4.0 on ``local[2]`` (the session-wide ``spark``
fixture in this process, and each executor process's own), executors started
with ``bastion-owner serve`` on 127.0.0.1, and a Spark Connect server started
with ``spark-submit`` from the PySpark wheel.  The tests that need Spark are
skipped, with the reason, without PySpark or a Java 17 or 21.

The slow query is the cancel tests' one (``test_cancel_and_limits.py``): a
cross join of the 5,000-row patients table with itself, 25 million rows,
aggregated by sex.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest
import tomli_w
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import alias, binary, col, fn, frame_op, length, lit, scan
from bastion_kernel.contract.protocol import BastionError
from owner_console import executor as core
from owner_console.engine import engine_for
from owner_console.engine.polars_engine import PolarsEngine
from owner_console.engine.spark import session as spark_session
from owner_console.engine.spark import sources
from owner_console.engine.spark.compile import compile_result, to_polars
from owner_console.engine.spark.engine import SparkEngine, _collect
from owner_console.model import Dataset, Policy
from owner_console.policy import account
from owner_console.validate import validate
from owner_console.server.versions import data_version as request_data_version
from owner_console.workspace import Workspace, WorkspaceError, atomic_write

from conftest import register_scientists, run_owner, running_executor, spark_unavailable

pytestmark = [pytest.mark.spark, pytest.mark.slow]

# The polars engine's text for every failure while running (owner_console.engine.polars_engine).
DATA_FAILURE_TEXT = ("the query failed while running, for example on an operation whose types do not fit; the message "
                     "is the same for every failure because what failed can depend on rows that are not released")
GROUPED = frame_op("group_by", input=scan("patients_spark"), keys=[col("sex")],
                   aggs=[alias(length(), "n"), alias(fn("mean", col("age")), "mean_age"),
                         alias(fn("sum", col("cost")), "cost")])


def grouped(name: str) -> dict:
    """The group-by of the parity tests over dataset ``name``."""
    return {**GROUPED, "input": scan(name)}


def slow(name: str) -> dict:
    """A query that runs for seconds: the patients table joined with itself (25 million rows), then aggregated."""
    return frame_op("group_by",
                    input=frame_op("join", left=scan(name),
                                   right=frame_op("select", input=scan(name), exprs=[alias(col("age"), "age2")]),
                                   how="cross", left_on=[], right_on=[], suffix="_r"),
                    keys=[col("sex")],
                    aggs=[alias(fn("mean", binary("sub", col("age"), col("age2"))), "d"),
                          alias(fn("n_unique", binary("add", binary("mul", col("age"), lit(1000)), col("age2"))),
                                "pairs")])


@pytest.fixture(scope="module")
def files(tmp_path_factory, patients_csv) -> dict[str, Path]:
    """The patients table as CSV, as one Parquet file and as a directory of two Parquet parts."""
    directory = tmp_path_factory.mktemp("spark-data")
    table = pl.read_csv(patients_csv, try_parse_dates=True)
    parquet = directory / "patients.parquet"
    table.write_parquet(parquet)
    parts = directory / "parts"
    parts.mkdir()
    table.head(2500).write_parquet(parts / "part-0.parquet")
    table.tail(2500).write_parquet(parts / "part-1.parquet")
    (parts / "_SUCCESS").write_bytes(b"")
    return {"csv": patients_csv, "parquet": parquet, "parts": parts}


def _write_config(workspace: Path, spark: dict) -> None:
    path = workspace / "config.toml"
    data = tomllib.loads(path.read_text())
    data["spark"] = spark
    atomic_write(path, tomli_w.dumps(data).encode())


def _policy_of(workspace: Path, name: str) -> dict:
    return tomllib.loads((workspace / "datasets" / f"{name}.toml").read_text())


# ---------------------------------------------------------------- registration (no Spark starts)
POLICY_OPTIONS = ("--min-group-size", "12", "--hide", "name", "--unsafe", "reject", "--person-id", "patient_id",
                  "--bounds", "age=0:120", "--max-share", "0.5", "--suppress-small-groups", "--no-dominance",
                  "--no-save")


def test_dataset_add_engine_spark_registers_files_and_directories_with_every_policy_option(tmp_path, files):
    workspace = tmp_path / "ws"
    assert run_owner(workspace, "init").returncode == 0
    polars_added = run_owner(workspace, "dataset", "add", "on_polars", files["csv"], *POLICY_OPTIONS)
    assert polars_added.returncode == 0, polars_added.stderr
    for name, source, kind, fmt in (("one_file", files["parquet"], "file", "parquet"),
                                    ("csv_file", files["csv"], "file", "csv"),
                                    ("parts", files["parts"], "directory", "parquet")):
        added = run_owner(workspace, "dataset", "add", name, source, "--engine", "spark", *POLICY_OPTIONS)
        assert added.returncode == 0, added.stderr
        assert "its queries run on Spark (Spark master local[2]" in added.stdout
        record = _policy_of(workspace, name)
        assert (record["engine"], record["source_kind"], record["format"], record["path"]) == \
            ("spark", kind, fmt, str(source))
        # The same options make the same policy as on polars.
        assert record["policy"] == _policy_of(workspace, "on_polars")["policy"]
    catalog = Workspace(workspace).catalog()
    assert catalog["parts"].engine == "spark" and catalog["parts"].source_kind == "directory"
    assert catalog["on_polars"].engine == "polars" and catalog["on_polars"].source_kind == "file"
    listed = run_owner(workspace, "dataset", "list").stdout
    assert f"parts\tparquet\t{files['parts']}\t" in listed


@pytest.mark.parametrize("source, options, message", [
    ("parquet", ("--hide", "nope"), "hidden column 'nope' is not in"),
    ("parquet", ("--person-id", "nope"), "person id column 'nope' is not in"),
    ("table:sales.orders;drop", (), "a catalog table is table:NAME"),
    ("table:a.b.c.d", (), "a catalog table is table:NAME"),
    ("mixed", (), "must hold files of one format"),
    ("empty", (), "holds no .csv or .parquet file"),
    ("other", (), "notes.txt is not a .csv or .parquet file"),
    ("other", ("--privacy", "dp", "--epsilon", "1"), "--privacy dp with --engine spark needs one CSV or Parquet file"),
])
def test_dataset_add_engine_spark_refuses_with_a_clear_error(tmp_path, files, source, options, message):
    workspace = tmp_path / "ws"
    assert run_owner(workspace, "init").returncode == 0
    (tmp_path / "mixed").mkdir()
    pl.DataFrame({"a": [1]}).write_csv(tmp_path / "mixed" / "a.csv")
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "mixed" / "b.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("no data")
    path = {"parquet": files["parquet"], "mixed": tmp_path / "mixed", "empty": tmp_path / "empty",
            "other": tmp_path / "other"}.get(source, source)
    added = run_owner(workspace, "dataset", "add", "d", path, "--engine", "spark", *options)
    assert added.returncode == 2 and message in added.stderr, added.stderr
    assert not (workspace / "datasets" / "d.toml").exists()


@pytest.mark.slow
def test_a_delta_table_needs_delta_lake_on_the_spark_side(tmp_path, files):
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    workspace = tmp_path / "ws"
    assert run_owner(workspace, "init").returncode == 0
    delta = tmp_path / "claims"
    (delta / "_delta_log").mkdir(parents=True)
    (delta / "part-0.parquet").write_bytes(files["parquet"].read_bytes())
    added = run_owner(workspace, "dataset", "add", "claims", delta, "--engine", "spark")
    # The wheel's Spark has no Delta Lake: registration says so (it reads the columns through Spark).
    assert added.returncode == 2 and "this Spark cannot read Delta tables" in added.stderr, added.stderr


@pytest.mark.parametrize("table, message", [
    ({"master": "local[2]", "remote": "sc://127.0.0.1:1"}, "set master or remote, not both"),
    ({"masters": "local[2]"}, "unknown setting 'masters' in [spark]"),
    ({"remote": "http://127.0.0.1:15002"}, "spark.remote must be a Spark Connect URL"),
    ({"conf": {"spark.sql.shuffle.partitions": 4}}, "[spark.conf] 'spark.sql.shuffle.partitions' must be a string"),
    ({"conf": {"spark.sql.ansi.enabled": "true"}}, "must stay 'false'"),
    ({"conf": {"spark.master": "yarn"}}, "[spark.conf] may not set 'spark.master'"),
])
def test_a_bad_spark_table_stops_serve_naming_the_key(tmp_path, table, message):
    workspace = tmp_path / "ws"
    assert run_owner(workspace, "init").returncode == 0
    _write_config(workspace, table)
    served = run_owner(workspace, "serve", "--bind", "tcp://127.0.0.1:*", timeout=60)
    assert served.returncode == 2 and message in served.stderr, served.stderr


def test_spark_settings_read_dotted_keys_and_keep_the_defaults_under_the_owners_conf():
    # An unquoted dotted key is TOML's nested table: read back as the Spark setting of that name.
    table = tomllib.loads('[spark]\nmaster = "local[3]"\n[spark.conf]\nspark.executor.memory = "2g"\n'
                          '"spark.sql.shuffle.partitions" = "8"\n')["spark"]
    settings = spark_session.SparkSettings.from_config(table)
    conf = settings.spark_conf()
    assert conf["spark.executor.memory"] == "2g" and conf["spark.sql.shuffle.partitions"] == "8"
    assert conf["spark.ui.enabled"] == "false" and conf["spark.sql.ansi.enabled"] == "false"
    assert conf["spark.driver.bindAddress"] == "127.0.0.1" and settings.effective_master == "local[3]"
    remote = spark_session.SparkSettings.from_config({"remote": "sc://h:15002"})
    assert remote.is_remote and "spark.ui.enabled" not in remote.spark_conf()
    assert spark_session.SparkSettings.from_config(None).effective_master == "local[2]"
    with pytest.raises(WorkspaceError, match="unknown setting"):
        spark_session.SparkSettings.from_config({"app": "x"})


# ---------------------------------------------------------------- data versions (listed by the executor)
def test_the_data_version_changes_when_the_data_changes_and_only_then(tmp_path, files):
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("part-0.parquet", "part-1.parquet"):
        (parts / name).write_bytes((files["parts"] / name).read_bytes())
    dataset = Dataset("parts", parts, "parquet", Policy(), engine="spark", source_kind="directory")
    single = Dataset("one", tmp_path / "one.parquet", "parquet", Policy(), engine="spark")
    (tmp_path / "one.parquet").write_bytes(files["parquet"].read_bytes())
    engine = engine_for([dataset])
    assert isinstance(engine, SparkEngine)
    first, first_single = engine.data_version(dataset), engine.data_version(single)
    assert first and first == engine.data_version(dataset)
    # What Spark does not read is not data: markers, hidden files.
    (parts / "_SUCCESS").write_bytes(b"")
    (parts / ".part-0.parquet.crc").write_bytes(b"crc")
    assert engine.data_version(dataset) == first
    # A part rewritten (same name), added or removed is a new version.
    rewritten = parts / "part-1.parquet"
    pl.read_parquet(rewritten).head(100).write_parquet(rewritten)
    second = engine.data_version(dataset)
    assert second != first
    pl.read_parquet(files["parquet"]).head(5).write_parquet(parts / "nested-part.parquet")
    third = engine.data_version(dataset)
    assert third not in (first, second)
    (parts / "nested-part.parquet").unlink()
    assert engine.data_version(dataset) == second
    os.utime(tmp_path / "one.parquet", ns=(1, 1))
    assert engine.data_version(single) != first_single
    # An approval is bound to the version: the executor's request version follows it.
    plan = scan("parts")
    before = request_data_version(plan, {"parts": dataset}, "alice")
    (parts / "part-0.parquet").unlink()
    assert request_data_version(plan, {"parts": dataset}, "alice") not in ("", before)


# ---------------------------------------------------------------- the engine in this process
@pytest.fixture(scope="module")
def spark_catalog(tmp_path_factory, files, spark) -> dict[str, Dataset]:
    """Spark datasets over the patients table (registered through the workspace), and its polars twin."""
    workspace = Workspace(tmp_path_factory.mktemp("spark-owner") / "ws")
    workspace.init()
    parts = tmp_path_factory.mktemp("broken") / "parts"
    parts.mkdir()
    for name in ("part-0.parquet", "part-1.parquet"):
        pl.read_parquet(files["parts"] / name).write_parquet(parts / name, compression="uncompressed")
    for name, source, unsafe in (("patients_spark", files["parquet"], "log"), ("patients_csv", files["csv"], "log"),
                                 ("patients_parts", files["parts"], "log"), ("broken", parts, "log")):
        workspace.add_dataset(name, source, hidden=["name"], unsafe=unsafe, engine="spark")
    workspace.add_dataset("patients", files["csv"], hidden=["name"], unsafe="log")
    return workspace.catalog()


@pytest.mark.slow
def test_the_engine_answers_a_group_by_as_polars_does(spark_catalog):
    expected = core.evaluate(grouped("patients"), spark_catalog, "alice").table.sort("sex")
    for name in ("patients_spark", "patients_csv", "patients_parts"):
        table = core.evaluate(grouped(name), spark_catalog, "alice").table.sort("sex")
        assert_frame_equal(table, expected, check_exact=False)
    engine = engine_for([spark_catalog["patients_csv"]])
    assert engine.schema(spark_catalog["patients_csv"]) == PolarsEngine().schema(spark_catalog["patients"])


def _damage(part: Path) -> None:
    """Overwrite the first half of a Parquet file's pages (its footer stays intact: plans compile, jobs fail)."""
    data = bytearray(part.read_bytes())
    data[64:len(data) // 2] = b"\xff" * (len(data) // 2 - 64)
    part.write_bytes(bytes(data))


def _wait_for_a_job(spark, seconds: float = 120) -> None:
    tracker = spark.sparkContext.statusTracker()
    deadline = time.monotonic() + seconds
    while not tracker.getActiveJobsIds():
        assert time.monotonic() < deadline, "the query never started a Spark job"
        time.sleep(0.05)


def _no_jobs_after(spark, seconds: float = 10) -> float:
    """Seconds until Spark runs no job (fails the test after ``seconds``)."""
    tracker = spark.sparkContext.statusTracker()
    started = time.monotonic()
    while tracker.getActiveJobsIds():
        assert time.monotonic() - started < seconds, "Spark still runs the cancelled query's jobs"
        time.sleep(0.02)
    return time.monotonic() - started


def _cancelled_while_running(spark, catalog: dict, after: float) -> tuple[dict, float]:
    """Evaluate the slow query in a thread and cancel it ``after`` seconds into its first Spark job.

    Returns ``({"result" or "error", "ended"}, when the cancel was set)``.
    """
    cancel = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = core.evaluate(slow("patients_spark"), catalog, "alice", cancel=cancel)
        except BastionError as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_a_job(spark)
    time.sleep(after)
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(60)
    return outcome, cancelled_at


@pytest.mark.slow
def test_cancel_stops_the_spark_job(spark_catalog, spark):
    # Compiled once first, so that the cancel lands on the running job rather than on a first compile.
    engine_for([spark_catalog["patients_spark"]]).output_schema(slow("patients_spark"), spark_catalog)
    outcome, cancelled_at = _cancelled_while_running(spark, spark_catalog, after=1.0)
    idle = _no_jobs_after(spark)
    latency = outcome["ended"] - cancelled_at
    print(f"\nSpark cancel (classic local[2]): the query returned {latency:.3f} s after cancel; "
          f"no Spark job ran {latency + idle:.3f} s after it")
    error = outcome["error"]
    assert error.ename == "ExecutionError" and error.details == {"cancelled": True}
    assert latency < 3.0


@pytest.mark.slow
def test_the_time_limit_stops_the_spark_job_as_limit_exceeded(spark_catalog, spark):
    started = time.monotonic()
    with pytest.raises(BastionError) as raised:
        core.evaluate(slow("patients_spark"), spark_catalog, "alice", timeout=2.0)
    elapsed = time.monotonic() - started
    _no_jobs_after(spark)
    assert raised.value.ename == "LimitExceeded" and raised.value.details["limit"] == "query_timeout_seconds"
    assert elapsed < 2.0 + 5.0, elapsed


def _accounted(plan: dict, catalog: dict, engine) -> dict:
    """The plan as the executor runs it: validated, then accounted by the policy."""
    checked = validate(plan, catalog, dataset_columns=engine.columns)
    return account(checked, unique_keys=lambda name, keys: engine.unique_keys(catalog[name], keys)).plan


def _physical(frame) -> str:
    return frame._jdf.queryExecution().executedPlan().toString()


@pytest.mark.slow
def test_a_kept_compiled_plan_answers_alike_and_stays_cancellable(spark_catalog, spark):
    engine = engine_for([spark_catalog["patients_spark"]])
    plan = _accounted(grouped("patients_spark"), spark_catalog, engine)
    kept = engine._compiled(plan, spark_catalog)
    assert engine._compiled(plan, spark_catalog) is kept  # no second compile of the same plan and data
    first, second = engine.run(plan, spark_catalog), engine.run(plan, spark_catalog)
    assert_frame_equal(first, second)
    assert_frame_equal(core.evaluate(grouped("patients_spark"), spark_catalog, "alice").table.sort("sex"),
                       core.evaluate(grouped("patients"), spark_catalog, "alice").table.sort("sex"), check_exact=False)
    # The slow query is compiled and kept by a first run stopped at its time limit; the kept plan's run is then
    # cancelled as a fresh one is: its jobs carry the run's own tag.
    with pytest.raises(BastionError) as limited:
        core.evaluate(slow("patients_spark"), spark_catalog, "alice", timeout=1.0)
    assert limited.value.ename == "LimitExceeded"
    _no_jobs_after(spark)
    outcome, cancelled_at = _cancelled_while_running(spark, spark_catalog, after=0.5)
    _no_jobs_after(spark)
    assert outcome["error"].details == {"cancelled": True}
    assert outcome["ended"] - cancelled_at < 3.0


@pytest.mark.slow
def test_a_scan_whose_row_order_nothing_reads_skips_the_file_metadata(spark_catalog):
    engine = engine_for([spark_catalog["patients_spark"]])
    aggregated = engine._compiled(_accounted(grouped("patients_spark"), spark_catalog, engine), spark_catalog)
    assert "row_index" not in _physical(aggregated.frame) and "file_path" not in _physical(aggregated.frame)
    rows = frame_op("head", input=frame_op("select", input=scan("patients_spark"), exprs=[col("age")]), n=3)
    ordered = engine._compiled(_accounted(rows, spark_catalog, engine), spark_catalog)
    assert "row_index" in _physical(ordered.frame)


@pytest.mark.slow
def test_a_result_sorted_on_the_executors_side_comes_in_sparks_order(spark_catalog):
    # run() fetches the rows unsorted with their order columns and sorts them with polars: the same order as
    # the compiled frame's own sort in Spark.
    engine = engine_for([spark_catalog["patients_spark"]])
    rows = frame_op("head", input=frame_op("sort", input=scan("patients_spark"), by=[col("diagnosis"), col("age")],
                                           descending=[True, False], nulls_last=True), n=40)
    plans = [frame_op("select", input=rows, exprs=[col("diagnosis"), col("age"), col("cost")]),
             frame_op("group_by", input=scan("patients_spark"), keys=[col("zip"), col("sex")],
                      aggs=[alias(length(), "n")])]
    for plan in plans:
        accounted = _accounted(plan, spark_catalog, engine)
        compiled = engine._compiled(accounted, spark_catalog)
        assert compiled.fetch is not None
        assert_frame_equal(engine.run(accounted, spark_catalog), to_polars(compiled.frame.toArrow(), compiled.schema))


@pytest.fixture(scope="module")
def regions(tmp_path_factory, files) -> dict[str, dict[str, Dataset]]:
    """``{engine: catalog}``: the patients table and a 20-row table of regions by zip code, unique on zip."""
    directory = tmp_path_factory.mktemp("regions")
    zips = sorted(pl.read_parquet(files["parquet"])["zip"].unique().to_list())
    path = directory / "regions.parquet"
    pl.DataFrame({"zip": zips, "region": [f"r{i % 3}" for i in range(len(zips))],
                  "weight": [float(i % 4) for i in range(len(zips))]}).write_parquet(path)
    rules = Policy(min_group_size=10, hidden={"name"}, unsafe="review")
    return {engine: {"patients": Dataset("patients", files["parquet"], "parquet", rules, engine=engine),
                     "regions": Dataset("regions", path, "parquet", Policy(min_group_size=2), engine=engine)}
            for engine in ("polars", "spark")}


REGION_JOIN = frame_op("group_by", input=frame_op("join", left=scan("patients"), right=scan("regions"), how="inner",
                                                  left_on=[col("zip")], right_on=[col("zip")], suffix="_r"),
                       keys=[col("region")], aggs=[alias(fn("mean", binary("mul", col("cost"), col("weight"))), "m"),
                                                   alias(fn("sum", col("weight")), "w"), alias(length(), "n")])


@pytest.mark.slow
def test_a_join_on_a_small_unique_side_counts_its_rows_as_bits_with_the_polars_counts(regions):
    replies = {engine: core.evaluate(REGION_JOIN, catalog, "alice") for engine, catalog in regions.items()}
    assert replies["spark"].decision.detail == replies["polars"].decision.detail
    assert_frame_equal(replies["spark"].table.sort("region"), replies["polars"].table.sort("region"),
                       check_exact=False)
    engine = engine_for([regions["spark"]["patients"]])
    plan = _accounted(REGION_JOIN, regions["spark"], engine)
    compiled = engine._compiled(plan, regions["spark"])
    physical = _physical(compiled.frame)
    # Distinct small-side rows per group from OR-ed bit words: no distinct count (Expand + second aggregation).
    assert "bit_or" in physical and "Expand" not in physical
    # The big side is read without its row-order metadata; the accounting columns equal the polars engine's.
    assert_frame_equal(engine.run(plan, regions["spark"]).sort("region"),
                       engine_for([regions["polars"]["patients"]]).run(plan, regions["polars"]).sort("region"),
                       check_exact=False)


@pytest.mark.slow
def test_a_small_side_with_more_rows_than_counted_fails_as_changed(regions, spark):
    # The row count is read from the Parquet footer before the job; a file that grew in between must not leave
    # rows without their bit (an undercount): the job fails and the query is told to run again.
    engine = engine_for([regions["spark"]["patients"]])
    plan = _accounted(REGION_JOIN, regions["spark"], engine)
    compiled = compile_result(plan, regions["spark"], spark,
                              lambda dataset, ordered=True: sources.read(spark, dataset, ordered=ordered),
                              row_count=lambda dataset: 5 if dataset.name == "regions" else None)
    with pytest.raises(BastionError) as raised:
        _collect(spark, compiled.frame, None, None, None, compiled.changed_datasets)
    assert raised.value.details.get("changed") is True


@pytest.mark.slow
def test_the_unique_key_check_runs_under_the_time_limit(spark_catalog):
    limited = dataclasses.replace(spark_catalog["patients_parts"],
                                  policy=dataclasses.replace(spark_catalog["patients_parts"].policy,
                                                             query_timeout_seconds=1e-9))
    with pytest.raises(BastionError) as raised:
        SparkEngine().unique_keys(limited, ("patient_id", "zip"))
    assert raised.value.ename == "LimitExceeded"


@pytest.mark.slow
def test_a_failed_job_is_the_fixed_execution_error(spark_catalog, spark):
    # The polars engine's text for any failure while running (a pattern polars cannot compile).
    broken_pattern = frame_op("select", input=scan("patients"),
                              exprs=[fn("str.replace", col("diagnosis"), pattern="(flu", value="x")])
    with pytest.raises(BastionError) as on_polars:
        core.evaluate(broken_pattern, spark_catalog, "alice")
    _damage(Path(spark_catalog["broken"].path) / "part-1.parquet")
    with pytest.raises(BastionError) as on_spark:
        core.evaluate(grouped("broken"), spark_catalog, "alice")
    error = on_spark.value
    assert error.ename == "ExecutionError" and error.evalue == on_polars.value.evalue == DATA_FAILURE_TEXT
    # Spark's message (it names the file and what it found) stays on the owner's side.
    assert error.body()["details"] == {} and "part-1" not in error.evalue
    assert error.owner_details()["error_class"] == "Py4JJavaError"
    assert error.owner_details()["spark_condition"].startswith("FAILED_READ_FILE")
    # The session survives a failed job.
    assert core.evaluate(grouped("patients_spark"), spark_catalog, "alice").table.height == 2


def test_a_plan_over_both_engines_is_refused_naming_them(files):
    catalog = {"patients": Dataset("patients", files["csv"], "csv", Policy(unsafe="log")),
               "patients_spark": Dataset("patients_spark", files["parquet"], "parquet", Policy(unsafe="log"),
                                         engine="spark")}
    plan = frame_op("join", left=scan("patients"), right=scan("patients_spark"), how="inner",
                    left_on=[col("patient_id")], right_on=[col("patient_id")], suffix="_r")
    with pytest.raises(BastionError) as raised:
        core.evaluate(plan, catalog, "alice")
    assert raised.value.ename == "UnsupportedOperation" and "polars" in raised.value.evalue \
        and "spark" in raised.value.evalue


# ---------------------------------------------------------------- an executor process serving Spark datasets
def _spark_owner(directory: Path, files: dict[str, Path], spark_table: dict, *extra: tuple[str, str]) -> Path:
    """A workspace with ``[spark]`` = ``spark_table``: ``patients`` on polars, ``patients_spark`` (and ``extra``
    name/source pairs) on Spark, all registered through ``bastion-owner``."""
    workspace = directory / "ws"
    assert run_owner(workspace, "init").returncode == 0
    _write_config(workspace, spark_table)
    options = ("--min-group-size", "10", "--hide", "name", "--unsafe", "log")
    added = run_owner(workspace, "dataset", "add", "patients", files["csv"], *options)
    assert added.returncode == 0, added.stderr
    for name, source in (("patients_spark", str(files["parquet"])), *extra):
        added = run_owner(workspace, "dataset", "add", name, source, "--engine", "spark", *options)
        assert added.returncode == 0, added.stderr
    return workspace


def _fetch_table(client, plan: dict, timeout: float = 180) -> pl.DataFrame:
    kind, body, frames = client.request("fetch", {"plan": plan, "text": "cell"}, timeout=timeout)
    assert kind == "result", body
    import io
    return pl.read_ipc(io.BytesIO(frames[0]))


def _cancel_through(client, plan: dict, after: float) -> tuple[dict, float]:
    """Send ``plan``, cancel it ``after`` seconds later; the error reply and the seconds from cancel to reply."""
    target = client.send("fetch", {"plan": plan, "text": "slow"})
    time.sleep(after)
    cancelled_at = time.monotonic()
    client.send("cancel", {"target": target})
    while True:
        kind, body, _ = client.reply(timeout=120)
        if body.get("details", {}).get("cancelled") or kind == "result":
            return {"kind": kind, **body}, time.monotonic() - cancelled_at


@pytest.fixture(scope="module")
def spark_executor(tmp_path_factory, files):
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("spark-executor")
    broken = directory / "broken"
    broken.mkdir()
    for name in ("part-0.parquet", "part-1.parquet"):
        pl.read_parquet(files["parts"] / name).write_parquet(broken / name, compression="uncompressed")
    workspace = _spark_owner(directory, files, {"master": "local[2]"}, ("patients_parts", str(files["parts"])),
                             ("broken", str(broken)))
    keys = register_scientists(Workspace(workspace), directory / "keys", ("alice", "bob"))
    with running_executor(workspace, keys) as running:
        yield running


@pytest.mark.slow
def test_serve_starts_spark_and_reads_the_spark_datasets_ahead_of_the_first_query(spark_executor):
    # In the background: the executor answered "ready" before; the first question does not wait for a JVM.
    deadline = time.monotonic() + 120
    while "Spark started and 3 Spark dataset(s) read ahead" not in spark_executor.log_file.read_text():
        assert time.monotonic() < deadline, spark_executor.log_file.read_text()[-2000:]
        time.sleep(0.5)
    assert "not read ahead" not in spark_executor.log_file.read_text()


@pytest.mark.slow
def test_an_executor_serves_a_spark_dataset_with_the_polars_answer(spark_executor):
    alice = spark_executor.client("alice")
    started = time.monotonic()
    on_spark = _fetch_table(alice, grouped("patients_spark")).sort("sex")
    first = time.monotonic() - started
    on_polars = _fetch_table(alice, grouped("patients")).sort("sex")
    assert_frame_equal(on_spark, on_polars, check_exact=False)
    assert_frame_equal(_fetch_table(alice, grouped("patients_parts")).sort("sex"), on_polars, check_exact=False)
    kind, body, _ = alice.request("schema", {"plan": grouped("patients_spark")}, timeout=120)
    assert kind == "ok" and body["schema"] == [[name, str(dtype)] for name, dtype in on_polars.schema.items()]
    kind, body, _ = alice.request("datasets", {}, timeout=120)
    described = {entry["name"]: entry for entry in body["datasets"]}
    assert described["patients_spark"]["schema"] == described["patients"]["schema"]
    print(f"\nfirst Spark query through the executor (Spark starting included): {first:.1f} s")


@pytest.mark.slow
def test_an_executor_cancels_a_spark_query(spark_executor):
    alice = spark_executor.client("alice")
    _fetch_table(alice, grouped("patients_spark"))  # Spark is up
    reply, latency = _cancel_through(alice, slow("patients_spark"), after=3.0)
    print(f"\nSpark cancel through the executor (classic local[2]): error reply {latency:.3f} s after the cancel")
    assert reply["kind"] == "error" and reply["ename"] == "ExecutionError" and reply["details"] == {"cancelled": True}
    assert latency < 5.0
    # The executor and its Spark serve on.
    assert _fetch_table(spark_executor.client("bob"), grouped("patients_spark")).height == 2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the Spark compiler types a saved result from Spark's reading of its Parquet "
                                       "file, where UInt32 becomes Int64; polars keeps UInt32")
def test_a_spark_query_reads_a_saved_result_with_the_polars_answer(spark_executor):
    # A saved result is a polars table on the owner's side; a plan that joins it with a Spark dataset runs on
    # Spark, which reads the saved table too.
    alice = spark_executor.client("alice")
    kind, body, _ = alice.request("save", {"plan": grouped("patients_spark"), "name": "by_sex", "text": "save"},
                                  timeout=180)
    assert kind == "ok", body

    def joined(name: str) -> dict:
        return frame_op("group_by",
                        input=frame_op("join", left=scan(name), right=frame_op("saved", name="by_sex"), how="inner",
                                       left_on=[col("sex")], right_on=[col("sex")], suffix="_saved"),
                        keys=[col("sex")], aggs=[alias(length(), "rows"), alias(fn("max", col("n")), "group_rows")])

    on_spark = _fetch_table(alice, joined("patients_spark")).sort("sex")
    on_polars = _fetch_table(alice, joined("patients")).sort("sex")
    assert_frame_equal(on_spark, on_polars, check_dtypes=False)
    assert on_spark.schema == on_polars.schema


@pytest.mark.slow
def test_a_failed_spark_job_reaches_the_scientist_as_the_fixed_error_only(spark_executor):
    alice = spark_executor.client("alice")
    _fetch_table(alice, grouped("broken"))  # readable at first
    dataset = Workspace(spark_executor.workspace).catalog()["broken"]
    _damage(Path(dataset.path) / "part-1.parquet")
    kind, body, frames = alice.request("fetch", {"plan": grouped("broken"), "text": "cell"}, timeout=180)
    assert kind == "error" and body["ename"] == "ExecutionError" and frames == []
    assert body["evalue"] == DATA_FAILURE_TEXT and body.get("details", {}) == {}, body
    # The owner's log has Spark's reason; the scientist's reply has none of it.
    assert "FAILED_READ_FILE" in spark_executor.log() and "part-1" not in str(body)


# ---------------------------------------------------------------- Spark Connect
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def spark_connect_server(directory: Path) -> Iterator[str]:
    """A Spark Connect server on 127.0.0.1 (``spark-submit`` of the wheel's ``SparkConnectServer``); its URL."""
    import pyspark

    port = _free_port()
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    settings = {"spark.connect.grpc.binding.address": "127.0.0.1", "spark.connect.grpc.binding.port": str(port),
                "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2",
                "spark.sql.catalogImplementation": "in-memory",
                "spark.sql.warehouse.dir": str(directory / "warehouse"),
                "spark.driver.bindAddress": "127.0.0.1", "spark.driver.host": "127.0.0.1"}
    command = [str(spark_submit), "--master", "local[2]"]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    command += ["--class", "org.apache.spark.sql.connect.service.SparkConnectServer", "spark-internal"]
    log_file = directory / "spark-connect.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=directory)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Spark Connect did not start:\n{log_file.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)
        yield f"sc://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# A Spark Connect client of its own (this test process keeps its classic session).
_CONNECT_CLIENT = """
import sys
from pyspark.sql import SparkSession
spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()
rows = spark.read.parquet(sys.argv[2])
if sys.argv[3] == "create":
    rows.write.saveAsTable("patients_tbl")
else:
    rows.limit(20).write.mode("append").saveAsTable("patients_tbl")
"""
_TABLE_VERSION = """
import sys
from owner_console.workspace import Workspace
from owner_console.engine.spark import session
from owner_console.engine.spark.engine import SparkEngine
workspace = Workspace(sys.argv[1])
session.configure(session.settings_of(workspace))
print(SparkEngine().data_version(workspace.catalog()[sys.argv[2]]))
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.slow
def test_through_spark_connect_a_catalog_table_gets_the_same_answer(tmp_path, files):
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with spark_connect_server(tmp_path) as url:
        _python(_CONNECT_CLIENT, url, files["parquet"].as_uri(), "create")
        workspace = _spark_owner(tmp_path, files, {"remote": url}, ("patients_table", "table:default.patients_tbl"))
        record = _policy_of(workspace, "patients_table")
        assert (record["source_kind"], record["table"]) == ("table", "default.patients_tbl") and "path" not in record
        keys = register_scientists(Workspace(workspace), tmp_path / "keys", ("alice",))
        with running_executor(workspace, keys) as running:
            alice = running.client("alice")
            on_polars = _fetch_table(alice, grouped("patients")).sort("sex")
            for name in ("patients_table", "patients_spark"):
                assert_frame_equal(_fetch_table(alice, grouped(name)).sort("sex"), on_polars, check_exact=False)
            reply, latency = _cancel_through(alice, slow("patients_table"), after=3.0)
            print(f"\nSpark cancel through Spark Connect (interruptTag): error reply {latency:.3f} s after the cancel")
            assert reply["kind"] == "error" and reply["details"] == {"cancelled": True}
            assert latency < 5.0
            assert _fetch_table(alice, grouped("patients_table")).height == 2
        # A table's version is its description and its files: an append is a new version.
        before = _python(_TABLE_VERSION, str(workspace), "patients_table")
        assert before.startswith("table:") and before == _python(_TABLE_VERSION, str(workspace), "patients_table")
        _python(_CONNECT_CLIENT, url, files["parquet"].as_uri(), "append")
        assert _python(_TABLE_VERSION, str(workspace), "patients_table") != before
