"""A plan's polars query is compiled once per plan and table versions, and dropped with its tables' old versions.

Compiling reads only the cached tables and their facts, so the kept query
answers exactly as a new one would; a replaced file gives a new version,
so a new query, and the old one (which holds the old table in memory) is
let go.
"""
from __future__ import annotations

import os

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from owner_console import engine, executor, policy, validate
from owner_console.model import Dataset, Policy

pytestmark = pytest.mark.timeout(120)


def _accounted(plan, catalog, cache):
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    return policy.account(checked, unique_keys=lambda name, keys: cache.unique_keys(catalog[name], keys)).plan


def test_a_repeated_plan_reuses_its_query_until_the_file_changes(tmp_path):
    path = tmp_path / "t.parquet"
    pl.DataFrame({"g": [1] * 12 + [2] * 12, "x": [1.0] * 24}).write_parquet(path)
    catalog = {"t": Dataset("t", path, "parquet", Policy(min_group_size=3, unsafe="review"))}
    plan = P.frame_op("group_by", input=P.scan("t"), keys=[P.col("g")], aggs=[P.alias(P.fn("sum", P.col("x")), "x")])
    cache = engine.DatasetCache()
    runner = engine.PolarsEngine(cache)
    accounted = _accounted(plan, catalog, cache)
    first = runner._compiled(accounted, catalog)
    assert runner._compiled(accounted, catalog) is first
    assert executor.evaluate(plan, catalog, "alice", cache=cache).table["x"].to_list() == [12.0, 12.0]

    pl.DataFrame({"g": [1] * 12 + [2] * 12, "x": [2.0] * 24}).write_parquet(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert executor.evaluate(plan, catalog, "alice", cache=cache).table["x"].to_list() == [24.0, 24.0]
    second = runner._compiled(accounted, catalog)
    assert second is not first
    assert all(value is not first for value in cache._derived.values())  # the old table's query is let go


def test_a_plan_over_a_streamed_file_is_compiled_every_time(tmp_path, monkeypatch):
    from owner_console.engine import cache as cache_module

    path = tmp_path / "t.parquet"
    pl.DataFrame({"g": [1] * 12, "x": [1.0] * 12}).write_parquet(path)
    monkeypatch.setattr(cache_module, "STREAMING_MIN_BYTES", 0)  # every Parquet file is streamed
    catalog = {"t": Dataset("t", path, "parquet", Policy(min_group_size=3, unsafe="review"))}
    plan = P.frame_op("group_by", input=P.scan("t"), keys=[P.col("g")], aggs=[P.alias(P.fn("sum", P.col("x")), "x")])
    cache = engine.DatasetCache()
    runner = engine.PolarsEngine(cache)
    accounted = _accounted(plan, catalog, cache)
    assert runner._compiled(accounted, catalog) is not runner._compiled(accounted, catalog)
