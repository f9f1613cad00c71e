"""Charts and describe() end to end: the real kernel, a real executor, the owner's CSV.

The cell's ``execute_result`` carries the Vega-Lite chart (data inlined),
and its numbers equal the same aggregation in plain polars.  Beside the
shared datasets, the owner registers ``patients_bounded`` (unsafe
``review``) and ``patients_bounded_strict`` (``reject``) with public bounds
of the numeric columns, through ``bastion-owner dataset add --bounds``.
"""
from __future__ import annotations

import json

import polars as pl
import pytest

from bastion_kernel.display import DATARESOURCE_MIME, VEGALITE_MIME
from conftest import OwnerWorkspace, make_workspace
from owner_console.approvals import ApprovalStore
from owner_console.audit import read_entries
from test_kernel import bastion_kernel, connect_scientist, execute, of_type

BOUNDS = ("--bounds", "age=0:100", "--bounds", "length_of_stay=0:60", "--bounds", "cost=0:200000")


@pytest.fixture(scope="module")
def owner_workspace(tmp_path_factory, patients_csv) -> OwnerWorkspace:
    owner = make_workspace(tmp_path_factory.mktemp("owner") / "workspace", patients_csv)
    for name, unsafe in (("patients_bounded", "review"), ("patients_bounded_strict", "reject")):
        added = owner.owner("dataset", "add", name, str(patients_csv), "--hide", "name", "--unsafe", unsafe, *BOUNDS)
        assert added.returncode == 0, added.stderr
    return owner


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv, try_parse_dates=True)


def queries_run(owner_workspace) -> int:
    """How many queries the executor has run (its audit log's ``query`` entries)."""
    return sum(entry.get("event") == "query" for entry in read_entries(owner_workspace.workspace.audit_path))


def bin_counts(values: pl.Series, edges: list[float]) -> list[int]:
    """Counts per bin, the last bin closed on the right (numpy's rule)."""
    last = len(edges) - 2
    return [int(((values >= edges[i]) & ((values <= edges[i + 1]) if i == last else (values < edges[i + 1]))).sum())
            for i in range(last + 1)]


@pytest.fixture(scope="module")
def kc(executor, tmp_path_factory):
    with bastion_kernel(*connect_scientist(executor, tmp_path_factory.mktemp("dora"), "dora")) as (_, client):
        yield client


def test_a_bar_chart_is_an_execute_result_in_vega_lite(kc, source):
    reply, outputs = execute(kc, 'dataset("patients").plot.bar("diagnosis", "cost", agg="mean")')
    assert reply["status"] == "ok", reply
    [result] = of_type(outputs, "execute_result")
    spec = result["data"][VEGALITE_MIME]
    assert spec["$schema"].endswith("/v5.json") and spec["mark"] == "bar"
    got = {row["diagnosis"]: row["mean_cost"] for row in spec["data"]["values"]}
    want = dict(source.group_by("diagnosis").agg(pl.col("cost").mean()).iter_rows())
    # Every diagnosis group of the 5000-row table has at least K=10 rows: released at once.
    assert got.keys() == want.keys()
    for diagnosis, mean in want.items():
        assert got[diagnosis] == pytest.approx(mean, rel=1e-12)
    assert "mean_cost" in result["data"]["text/plain"]


def test_a_histogram_takes_its_bins_from_the_owners_public_bounds(kc, source, owner_workspace):
    before = queries_run(owner_workspace)
    reply, outputs = execute(kc, 'dataset("patients_bounded").plot.hist("age", bins=4)')
    assert reply["status"] == "ok", reply
    [result] = of_type(outputs, "execute_result")
    values = result["data"][VEGALITE_MIME]["data"]["values"]
    edges = [0.0, 25.0, 50.0, 75.0, 100.0]  # the owner's bounds 0:100, not the data's min and max
    assert [(row["bin_start"], row["bin_end"]) for row in values] == list(zip(edges, edges[1:]))
    assert [row["count"] for row in values] == bin_counts(source["age"], edges)
    assert "public bounds" in result["data"]["text/plain"]
    assert queries_run(owner_workspace) == before + 1  # the bins only: nothing asked the data for its extremes


def test_a_histogram_with_a_range_needs_no_bounds(kc, source):
    reply, outputs = execute(kc, 'dataset("patients").plot.hist("cost", bins=2, range=(0, 40000))')
    assert reply["status"] == "ok", reply
    values = of_type(outputs, "execute_result")[0]["data"][VEGALITE_MIME]["data"]["values"]
    assert [row["bin_end"] for row in values] == [20000.0, 40000.0]
    assert [row["count"] for row in values] == bin_counts(source["cost"].drop_nulls(), [0.0, 20000.0, 40000.0])


def test_a_histogram_without_a_range_or_bounds_is_refused_in_the_kernel(kc, owner_workspace):
    before = queries_run(owner_workspace)
    reply, _ = execute(kc, 'dataset("patients").plot.hist("age")')
    assert reply["status"] == "error" and reply["ename"] == "SchemaError", reply
    assert "range=(low, high)" in reply["evalue"] and "--bounds age=LO:HI" in reply["evalue"]
    assert queries_run(owner_workspace) == before


def test_a_heatmap_takes_both_axes_from_the_public_bounds(kc, source):
    reply, outputs = execute(kc, 'dataset("patients_bounded_strict").plot.heatmap("age", "length_of_stay", '
                                 'bins=(2, 1))')
    assert reply["status"] == "ok", reply
    values = of_type(outputs, "execute_result")[0]["data"][VEGALITE_MIME]["data"]["values"]
    got = {(row["age_start"], row["length_of_stay_start"], row["length_of_stay_end"]): row["count"]
           for row in values}
    assert got == {(0.0, 0.0, 60.0): bin_counts(source["age"], [0.0, 50.0, 100.0])[0],
                   (50.0, 0.0, 60.0): bin_counts(source["age"], [0.0, 50.0, 100.0])[1]}


def test_small_bins_are_refused_by_a_strict_policy(kc):
    reply, _ = execute(kc, 'dataset("patients_strict").plot.hist("age", bins=100, range=(0, 100))')
    assert reply["status"] == "error" and reply["ename"] == "PolicyViolation", reply


def test_describe_end_to_end(kc, source):
    # Every order statistic of age is a value at least K=10 patients share: released at once.
    reply, outputs = execute(kc, 'dataset("patients_bounded").select("age", "name").describe()')
    assert reply["status"] == "ok", reply
    rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
    by_statistic = {row["statistic"]: row for row in rows}
    for statistic, age in source.select("age").describe().iter_rows():
        assert by_statistic[statistic]["age"] == pytest.approx(age), statistic
    # The hidden column: a text column's statistics, all *, never computed.
    assert {row["statistic"]: row["name"] for row in rows if row["name"] is not None} == dict.fromkeys(
        ["count", "null_count", "min", "max"], "*")


def test_describe_does_not_wait_for_order_statistics_held_for_review(kc, source, owner_workspace):
    reply, outputs = execute(kc, 'dataset("patients_bounded").select("cost").describe()')
    assert reply["status"] == "ok", reply  # at once: the kernel did not wait for the owner
    [result] = of_type(outputs, "execute_result")
    by_statistic = {row["statistic"]: row["cost"] for row in result["data"][DATARESOURCE_MIME]["data"]}
    assert by_statistic["mean"] == pytest.approx(source["cost"].mean())
    assert by_statistic["min"] is None and by_statistic["max"] is None
    store = ApprovalStore(owner_workspace.workspace.approvals_path)
    try:
        [held] = [r for r in store.list("pending") if "min(cost)" in json.dumps(r.plan)]
    finally:
        store.close()
    assert f"request({held.id}) fetches them" in result["data"]["text/plain"]
    assert "cost 0 to 200000" in result["data"]["text/plain"]


def test_describe_shows_the_moments_when_the_order_statistics_are_refused(kc, source):
    # No cost is shared by 10 patients: its min, percentiles and max are one person's values each.
    reply, outputs = execute(kc, 'dataset("patients_bounded_strict").select("age", "cost").describe()')
    assert reply["status"] == "ok", reply
    [result] = of_type(outputs, "execute_result")
    by_statistic = {row["statistic"]: row for row in result["data"][DATARESOURCE_MIME]["data"]}
    for statistic, age, cost in source.select("age", "cost").describe().iter_rows():
        if statistic in ("count", "null_count", "mean", "std"):
            assert by_statistic[statistic]["age"] == pytest.approx(age), statistic
            assert by_statistic[statistic]["cost"] == pytest.approx(cost), statistic
        else:
            assert by_statistic[statistic]["age"] is None and by_statistic[statistic]["cost"] is None, statistic
    text = result["data"]["text/plain"]
    assert "refused" in text and "order statistics" in text
    assert "age 0 to 100, cost 0 to 200000" in text
