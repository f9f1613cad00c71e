"""Large datasets (Parquet or CSV) are scanned lazily and run on polars' streaming engine, with the same results.

The threshold (``engine.cache.STREAMING_MIN_BYTES``) is lowered so that a small
file takes the streaming path; each result is compared with the in-memory
path and with plain polars.
"""
from __future__ import annotations

import threading

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from owner_console import engine, executor
from owner_console.engine import cache as engine_cache, running
from owner_console.model import Dataset, Policy

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def table() -> pl.DataFrame:
    n = 20_000
    return pl.DataFrame({"id": range(n), "group": [i % 7 for i in range(n)],
                         "x": [(i * 37) % 101 / 10 for i in range(n)], "k": [i % 13 for i in range(n)]})


@pytest.fixture(scope="module")
def catalog(table, tmp_path_factory) -> dict[str, Dataset]:
    root = tmp_path_factory.mktemp("streaming")
    table.write_parquet(root / "big.parquet", row_group_size=2_000)
    lookup = pl.DataFrame({"k": range(13), "label": [f"l{i % 4}" for i in range(13)]})
    lookup.write_parquet(root / "lookup.parquet")
    policy = Policy(min_group_size=5, unsafe="reject")
    return {"big": Dataset("big", root / "big.parquet", "parquet", policy),
            "lookup": Dataset("lookup", root / "lookup.parquet", "parquet", Policy(min_group_size=1))}


@pytest.fixture
def streamed(monkeypatch, catalog):
    """Stream every Parquet file larger than the small lookup table."""
    monkeypatch.setattr(engine_cache, "STREAMING_MIN_BYTES", catalog["big"].path.stat().st_size)
    assert engine.is_streamed(catalog["big"]) and not engine.is_streamed(catalog["lookup"])


GROUPED = P.frame_op("group_by", input=P.frame_op("filter", input=P.scan("big"),
                                                  predicate=P.binary("gt", P.col("x"), P.lit(2.0))),
                     keys=[P.col("group")], aggs=[P.alias(P.fn("mean", P.col("x")), "mean_x"),
                                                  P.alias(P.fn("sum", P.col("id")), "sum_id"),
                                                  P.alias(P.length(), "n")])
JOINED = P.frame_op("group_by", input=P.frame_op("join", left=P.scan("big"), right=P.scan("lookup"), how="inner",
                                                 left_on=[P.col("k")], right_on=[P.col("k")], suffix="_r"),
                    keys=[P.col("label")], aggs=[P.alias(P.fn("sum", P.col("x")), "sum_x"),
                                                 P.alias(P.length(), "n")])


def _released(plan, catalog, **kwargs) -> pl.DataFrame:
    outcome = executor.evaluate(plan, catalog, "alice", cache=engine.DatasetCache(), **kwargs)
    assert outcome.decision.action == "allow", outcome.decision.reason
    return outcome.table


@pytest.mark.parametrize("plan", [GROUPED, JOINED], ids=["group_by", "join"])
@pytest.mark.parametrize("cancellable", [False, True], ids=["direct", "cancellable"])
def test_a_streamed_dataset_gives_the_in_memory_result(plan, cancellable, catalog, table, monkeypatch):
    kwargs = {"cancel": threading.Event(), "timeout": 60.0} if cancellable else {}
    in_memory = _released(plan, catalog, **kwargs)
    monkeypatch.setattr(engine_cache, "STREAMING_MIN_BYTES", catalog["big"].path.stat().st_size)
    assert engine.is_streamed(catalog["big"])
    streamed = _released(plan, catalog, **kwargs)
    key = in_memory.columns[0]
    assert_frame_equal(streamed.sort(key), in_memory.sort(key), check_exact=False)
    if plan is GROUPED:
        plain = table.filter(pl.col("x") > 2.0).group_by("group").agg(
            pl.col("x").mean().alias("mean_x"), pl.col("id").sum().alias("sum_id"), pl.len().alias("n"))
        assert_frame_equal(streamed.sort("group"), plain.sort("group"), check_exact=False, check_dtypes=False)


def test_a_streamed_dataset_is_never_read_into_the_cache(streamed, catalog, table):
    cache = engine.DatasetCache()
    assert cache.columns(catalog["big"]) == tuple(table.columns)
    assert cache.schema(catalog["big"]) == [(n, engine.dtype_name(t)) for n, t in table.schema.items()]
    executor.evaluate(GROUPED, catalog, "alice", cache=cache)
    assert str(catalog["big"].path.resolve()) not in cache._frames  # the footer and the scan only
    assert not cache.unique_keys(catalog["big"], ("id",))  # never checked by reading the file whole


def test_join_sizes_of_a_streamed_dataset_are_exact(streamed, catalog, table):
    joined = P.frame_op("join", left=P.scan("big"), right=P.scan("lookup"), how="left",
                        left_on=[P.col("k")], right_on=[P.col("k")], suffix="_r")
    assert engine.join_sizes(joined, catalog, engine.DatasetCache()) == [table.height]


def test_a_streamed_query_that_is_cancelled_is_let_go(streamed, catalog):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Exception) as caught:
        executor.evaluate(GROUPED, catalog, "alice", cache=engine.DatasetCache(), cancel=cancel, timeout=60.0)
    assert getattr(caught.value, "details", {}).get("cancelled")


def test_the_default_threshold_follows_the_executors_memory_limit():
    # In a child process: an address-space limit set while it runs lowers the threshold.
    import subprocess
    import sys

    code = ("import os, resource; from owner_console import engine\n"
            "physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')\n"
            "before = engine.streaming_threshold()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "print(before, engine.streaming_threshold(), physical)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after, physical = map(int, out.stdout.split())
    assert engine_cache.STREAMING_MIN_BYTES is None  # the default: derived from memory
    assert before <= max(64 * 2**20, physical // 8)
    assert after == max(64 * 2**20, min(before * 8, 8 * 2**30) // 8)


def test_a_large_csv_is_streamed_too_with_the_same_types_and_results(table, tmp_path, monkeypatch):
    # A CSV larger than the executor's memory would otherwise be read whole (and abort the process).
    dated = table.with_columns(pl.date(2024, 1, 1).dt.offset_by(pl.format("{}d", pl.col("k"))).alias("day"))
    dated.write_csv(tmp_path / "big.csv")
    catalog = {"big": Dataset("big", tmp_path / "big.csv", "csv", Policy(min_group_size=5, unsafe="reject"))}
    in_memory_cache = engine.DatasetCache()
    in_memory = _released(GROUPED, catalog)
    in_memory_schema = in_memory_cache.schema(catalog["big"])
    monkeypatch.setattr(engine_cache, "STREAMING_MIN_BYTES", (tmp_path / "big.csv").stat().st_size)
    assert engine.is_streamed(catalog["big"])
    cache = engine.DatasetCache()
    assert cache.schema(catalog["big"]) == in_memory_schema  # dates parsed the same way
    assert ("day", "Date") in in_memory_schema
    streamed = executor.evaluate(GROUPED, catalog, "alice", cache=cache).table
    assert str(catalog["big"].path.resolve()) not in cache._frames
    assert_frame_equal(streamed.sort("group"), in_memory.sort("group"), check_exact=False)
    plain = dated.filter(pl.col("x") > 2.0).group_by("group").agg(
        pl.col("x").mean().alias("mean_x"), pl.col("id").sum().alias("sum_id"), pl.len().alias("n"))
    assert_frame_equal(streamed.sort("group"), plain.sort("group"), check_exact=False, check_dtypes=False)


def test_a_panic_in_the_streaming_engine_is_answered_by_the_in_memory_engine(patients_csv, caplog):
    # polars 1.36.1's streaming cross join panics on this input (a Rust panic, raised as a BaseException);
    # if a polars upgrade fixes it, this test says so and the workaround in engine.running.collect can go.
    patients = pl.read_csv(patients_csv, try_parse_dates=True)
    query = patients.lazy().join(patients.lazy().select("age").head(10), how="cross", maintain_order="left_right")
    with caplog.at_level("WARNING", logger="bastion.executor"):
        result = running.collect(query, streaming=True)
    assert result.equals(query.collect())
    assert "streaming engine failed" in caplog.text
    assert engine.is_polars_panic(caplog.records[0].args[0])


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_the_threshold_reads_the_executors_own_cgroup_memory_limit(tmp_path, layout):
    proc = tmp_path / "cgroup"
    if layout == "v2":
        proc.write_text("0::/owner/executor\n")
        limit_file = tmp_path / "owner" / "executor" / "memory.max"
    else:
        proc.write_text("9:pids:/\n4:memory:/owner/executor\n1:cpu,cpuacct:/\n")
        limit_file = tmp_path / "memory" / "owner" / "executor" / "memory.limit_in_bytes"
    limit_file.parent.mkdir(parents=True)
    limit_file.write_text(f"{3 * 2**30}\n")
    assert engine_cache._cgroup_memory_limit(str(proc), str(tmp_path)) == 3 * 2**30
    limit_file.write_text("max\n" if layout == "v2" else "9223372036854771712\n")  # no limit
    assert engine_cache._cgroup_memory_limit(str(proc), str(tmp_path)) is None
    assert engine_cache._cgroup_memory_limit(str(tmp_path / "missing"), str(tmp_path)) is None
