"""Charts and describe() end to end: the real kernel, a real executor, the owner's CSV.

The cell's ``execute_result`` carries the Vega-Lite chart (data inlined),
and its numbers equal the same aggregation in plain polars.
"""
from __future__ import annotations

import polars as pl
import pytest

from bastion_kernel.display import DATARESOURCE_MIME, VEGALITE_MIME
from test_kernel import bastion_kernel, connect_scientist, execute, of_type


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv, try_parse_dates=True)


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


def test_a_histogram_runs_two_aggregates_through_the_policy(kc, source):
    reply, outputs = execute(kc, 'dataset("patients").plot.hist("age", bins=4)')
    assert reply["status"] == "ok", reply
    values = of_type(outputs, "execute_result")[0]["data"][VEGALITE_MIME]["data"]["values"]
    assert sum(row["count"] for row in values) == source["age"].drop_nulls().len()
    assert values[0]["bin_start"] == pytest.approx(source["age"].min())
    assert values[-1]["bin_end"] == pytest.approx(source["age"].max())


def test_small_bins_are_refused_by_a_strict_policy(kc):
    reply, _ = execute(kc, 'dataset("patients_strict").plot.hist("age", bins=100)')
    assert reply["status"] == "error" and reply["ename"] == "PolicyViolation", reply


def test_describe_end_to_end(kc, source):
    reply, outputs = execute(kc, 'dataset("patients").select("age", "cost", "name").describe()')
    assert reply["status"] == "ok", reply
    rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
    by_statistic = {row["statistic"]: row for row in rows}
    want = source.select("age", "cost").describe()
    for statistic, age, cost in want.iter_rows():
        assert by_statistic[statistic]["age"] == pytest.approx(age)
        assert by_statistic[statistic]["cost"] == pytest.approx(cost)
    assert by_statistic["max"]["name"] == "*"  # the hidden column
