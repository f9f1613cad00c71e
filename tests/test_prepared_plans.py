"""A plan is validated and accounted once per plan, the datasets it reads and their data versions.

What is kept must answer exactly as a new check would: a changed policy, a
replaced file or a scientist with other overrides gets a fresh check, and a
plan the validator refuses is refused every time.  Each test fails if the
kept check were reused where it must not be.
"""
from __future__ import annotations

import os

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine, executor
from owner_console.model import Dataset, Policy

pytestmark = pytest.mark.timeout(120)

GROUPED = P.frame_op("group_by", input=P.scan("t"), keys=[P.col("g")],
                     aggs=[P.alias(P.fn("sum", P.col("x")), "x")])
ROWS = P.frame_op("select", input=P.scan("t"), exprs=[P.col("g"), P.col("x")])


def _write(path, x: float = 1.0, with_x: bool = True) -> None:
    columns = {"g": [1] * 12 + [2] * 12}
    if with_x:
        columns["x"] = [x] * 24
    pl.DataFrame(columns).write_parquet(path)
    # A new modification time even within the file system's clock tick.
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9 * (int(x) + 1)))


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "t.parquet"
    _write(path)
    return path


def _catalog(path, **policy) -> dict[str, Dataset]:
    return {"t": Dataset("t", path, "parquet", Policy(**{"min_group_size": 3, "unsafe": "review", **policy}))}


def test_the_same_plan_over_the_same_data_is_checked_once(table):
    cache = engine.DatasetCache()
    catalog = executor.for_scientist(_catalog(table), "alice")
    runner = engine.PolarsEngine(cache)
    kept = executor._PreparedPlans()
    first = kept.checked_and_accounted(GROUPED, catalog, runner)
    again = kept.checked_and_accounted(GROUPED, executor.for_scientist(_catalog(table), "alice"), runner)
    assert again[0] is first[0] and again[1] is first[1]


def test_a_replaced_file_is_checked_again(table):
    cache = engine.DatasetCache()
    catalog = _catalog(table)
    assert executor.evaluate(GROUPED, catalog, "alice", cache=cache).table["x"].to_list() == [12.0, 12.0]
    _write(table, with_x=False)
    with pytest.raises(BastionError) as refused:
        executor.evaluate(GROUPED, catalog, "alice", cache=cache)
    assert refused.value.ename == "SchemaError"
    _write(table, x=2.0)
    assert executor.evaluate(GROUPED, catalog, "alice", cache=cache).table["x"].to_list() == [24.0, 24.0]


def test_a_changed_policy_is_checked_again(table):
    cache = engine.DatasetCache()
    released = executor.evaluate(ROWS, _catalog(table, min_group_size=1), "alice", cache=cache)
    assert released.table["x"].to_list() == [1.0] * 24
    hidden = executor.evaluate(ROWS, _catalog(table, min_group_size=1, hidden=["x"]), "alice", cache=cache)
    assert hidden.table["x"].to_list() == ["*"] * 24
    held = executor.evaluate(ROWS, _catalog(table), "alice", cache=cache)
    assert held.decision.action == "review"


def test_each_scientist_gets_their_own_overrides(table):
    cache = engine.DatasetCache()
    catalog = _catalog(table, min_group_size=1, scientists={"bob": {"hidden": ["x"]}})
    assert executor.evaluate(ROWS, catalog, "alice", cache=cache).table["x"].to_list() == [1.0] * 24
    assert executor.evaluate(ROWS, catalog, "bob", cache=cache).table["x"].to_list() == ["*"] * 24
    assert executor.evaluate(ROWS, catalog, "alice", cache=cache).table["x"].to_list() == [1.0] * 24


def test_a_refused_plan_is_refused_every_time(table):
    cache = engine.DatasetCache()
    unknown = P.frame_op("select", input=P.scan("t"), exprs=[P.col("nope")])
    for _ in range(2):
        with pytest.raises(BastionError) as refused:
            executor.evaluate(unknown, _catalog(table), "alice", cache=cache)
        assert refused.value.ename == "SchemaError"
    unlisted = P.frame_op("select", input=P.scan("elsewhere"), exprs=[P.col("g")])
    with pytest.raises(BastionError):
        executor.evaluate(unlisted, _catalog(table), "alice", cache=cache)


def test_at_most_the_kept_number_of_plans_is_held(table):
    cache = engine.DatasetCache()
    catalog = executor.for_scientist(_catalog(table), "alice")
    runner = engine.PolarsEngine(cache)
    kept = executor._PreparedPlans(kept=3)
    plans = [P.frame_op("group_by", input=P.scan("t"), keys=[P.col("g")],
                        aggs=[P.alias(P.fn("sum", P.col("x")), f"x{i}")]) for i in range(5)]
    first = kept.checked_and_accounted(plans[0], catalog, runner)
    for plan in plans[1:]:
        kept.checked_and_accounted(plan, catalog, runner)
    assert len(kept._plans) == 3
    assert kept.checked_and_accounted(plans[0], catalog, runner)[0] is not first[0]


def test_a_new_data_version_is_never_served_the_old_check(table):
    # Accounting reads the data (a join key's uniqueness): a file replaced by one with the same columns must not
    # get the check made for the old file.
    cache = engine.DatasetCache()
    runner = engine.PolarsEngine(cache)
    kept = executor._PreparedPlans()
    first = kept.checked_and_accounted(GROUPED, executor.for_scientist(_catalog(table), "alice"), runner)
    _write(table, x=2.0)
    second = kept.checked_and_accounted(GROUPED, executor.for_scientist(_catalog(table), "alice"), runner)
    assert second[0] is not first[0] and second[1] is not first[1]
    assert kept.checked_and_accounted(GROUPED, executor.for_scientist(_catalog(table), "alice"), runner)[1] is second[1]


def test_a_large_plan_is_checked_every_time(table):
    # A scientist sending many large plans must not fill the executor's memory with kept checks.
    cache = engine.DatasetCache()
    catalog = executor.for_scientist(_catalog(table), "alice")
    runner = engine.PolarsEngine(cache)
    kept = executor._PreparedPlans()
    wide = P.frame_op("group_by", input=P.scan("t"), keys=[P.col("g")],
                      aggs=[P.alias(P.fn("sum", P.col("x")), f"x{i:03d}_{'y' * 60}") for i in range(200)])
    first = kept.checked_and_accounted(wide, catalog, runner)
    assert kept.checked_and_accounted(wide, catalog, runner)[1] is not first[1]
    assert not kept._plans
    assert executor.evaluate(wide, _catalog(table), "alice", cache=cache).table.width == 201
