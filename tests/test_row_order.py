"""Row order is defined where polars leaves it open: after a ``group_by``, a ``unique`` and a sort's ties.

polars itself returns groups in whatever order its hash tables leave them,
and ``unique`` keeps any one row of each set of duplicates, in any order;
both change from run to run, and a row index, ``head`` or ``first`` over
them (or the other columns of a ``unique``) would release a different
answer, and a different decision, for the same plan.  The engine sorts
groups by their keys (nulls first), keeps the first row of duplicates in
row order, and sorts stably (ties keep their order), as the Spark engine
does, so those answers are a function of the plan and the data only.
"""
from __future__ import annotations

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from owner_console import executor
from owner_console.model import Dataset, Policy
from wire import fetch, released

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    # Many keys, with nulls in both key columns, so a hash order is very unlikely to be the sorted one.
    rows = 6000
    frame = pl.DataFrame({
        "k": [None if i % 97 == 0 else (i * 7919) % 300 for i in range(rows)],
        "s": [None if i % 89 == 0 else f"s{(i * 31) % 5}" for i in range(rows)],
        "v": [float(i % 13) for i in range(rows)],
    })
    path = tmp_path_factory.mktemp("order") / "keyed.parquet"
    frame.write_parquet(path)
    return {"keyed": Dataset("keyed", path, "parquet", Policy(min_group_size=1, unsafe="reject"))}, frame


def grouped(keys: list[str]) -> dict:
    return P.frame_op("group_by", input=P.scan("keyed"), keys=[P.col(k) for k in keys],
                      aggs=[P.alias(P.fn("sum", P.col("v")), "total"), P.alias(P.length(), "n")])


@pytest.mark.parametrize("keys", [["k"], ["s", "k"]])
def test_groups_are_sorted_by_their_keys_nulls_first_on_every_run(keyed, keys):
    catalog, frame = keyed
    expected = (frame.group_by(keys).agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
                .sort(keys, nulls_last=False))
    for _ in range(3):
        table = executor.evaluate(grouped(keys), catalog, "alice").table
        assert table.columns == keys + ["total", "n"]
        assert table.select(keys).equals(expected.select(keys))
        assert table["total"].to_list() == expected["total"].to_list()


def test_a_row_index_over_groups_numbers_them_in_key_order(keyed):
    catalog, frame = keyed
    plan = P.frame_op("with_row_index", input=grouped(["s"]), name="i")
    table = executor.evaluate(plan, catalog, "alice").table
    assert table["s"].to_list() == [None, "s0", "s1", "s2", "s3", "s4"]
    assert table["i"].to_list() == list(range(6))


def test_head_of_groups_through_the_executor_is_the_smallest_keys(executor):
    # Straight to a real executor: head(2) of the groups by sex over a dataset of the shared workspace.
    plan = P.frame_op("head", input=P.frame_op(
        "group_by", input=P.scan("patients"), keys=[P.col("sex")], aggs=[P.alias(P.length(), "n")]), n=2)
    table, _ = released(fetch(executor, plan))
    assert table["sex"].to_list() == sorted(table["sex"].to_list()) and table.height == 2
    again, _ = released(fetch(executor, plan))
    assert again.equals(table)


def test_unique_keeps_the_first_row_of_duplicates_in_row_order(keyed):
    catalog, frame = keyed
    plan = P.frame_op("unique", input=P.scan("keyed"), subset=["s"])
    expected = frame.unique(subset=["s"], keep="first", maintain_order=True)
    for _ in range(3):
        table = executor.evaluate(plan, catalog, "alice").table
        assert table.equals(expected)


def test_a_sort_keeps_tied_rows_in_their_order(keyed):
    catalog, frame = keyed
    # Five distinct values of s over 6,000 rows: nearly every row ties; v tells the rows apart.
    plan = P.frame_op("sort", input=P.scan("keyed"), by=[P.col("s")], descending=[True], nulls_last=True)
    expected = frame.sort("s", descending=True, nulls_last=True, maintain_order=True)
    for _ in range(3):
        assert executor.evaluate(plan, catalog, "alice").table.equals(expected)


def test_head_after_a_join_is_the_first_rows_in_left_right_order(tmp_path):
    # polars 1.36's in-memory engine pushes the head into the join and returns the first right row with its left
    # matches ([0, 0, 0] here); the engine runs such a query without slice pushdown.
    names = pl.DataFrame({"name": [f"n{(i * 37) % 50}" for i in range(300)], "age": list(range(300))})
    path = tmp_path / "names.parquet"
    names.write_parquet(path)
    catalog = {"names": Dataset("names", path, "parquet", Policy(min_group_size=1, unsafe="reject"))}
    right = P.frame_op("select", input=P.scan("names"), exprs=[P.alias(P.col("name"), "n2"),
                                                              P.alias(P.col("age"), "age2")])
    joined = P.frame_op("join", left=P.scan("names"), right=right, how="inner", left_on=[P.col("name")],
                        right_on=[P.col("n2")], suffix="_r")
    for limited in (P.frame_op("head", input=joined, n=3), P.frame_op("slice", input=joined, offset=1, length=3)):
        table = executor.evaluate(limited, catalog, "alice").table
        expected = names.join(names.rename({"name": "n2", "age": "age2"}), left_on="name", right_on="n2",
                              how="inner", maintain_order="left_right")
        expected = expected.head(3) if limited["op"] == "head" else expected.slice(1, 3)
        assert table["age2"].to_list() == expected["age2"].to_list()
