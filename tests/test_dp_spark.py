"""Differential privacy on the Spark engine: Spark's exact values, OpenDP's noise, one ledger.

Real parts throughout: the session's local Spark, real OpenDP, a real
workspace and odometer on disk, and a real ``bastion-owner serve`` process on
loopback serving a Spark DP dataset.
"""
from __future__ import annotations

import io
import math
import re
import statistics
import threading

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from conftest import register_scientists, run_owner, running_executor, spark_unavailable
from owner_console import dp, executor
from owner_console.dp import mechanism
from owner_console.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(600)]

POLICY = {"epsilon": 1.0, "epsilon_per_query": 0.1, "max_rows": 1_000, "privacy_unit_column": "pid",
          "max_contributions": 2, "bounds": {"age": [0, 100], "cost": [0.0, 50.0]},
          "public_keys": {"sex": ["F", "M", "U"]}}
# Close enough to no noise to read the values OpenDP adds its noise to (integers exact, floats to 1e-4).
NO_NOISE = {**POLICY, "epsilon": 2e7, "epsilon_per_query": 1e7}


def _rows() -> pl.DataFrame:
    """Nulls in every column, values outside the bounds, a key value that is not public ("X"), a public key
    with no rows ("U"), and people with more rows than ``max_contributions`` (each such person's rows are
    identical, so whichever two OpenDP or Spark keeps, the aggregates are the same)."""
    rows = [  # pid, sex, site, age, cost
        (1, "F", "north", 30, 10.5), (2, "F", "south", 150, 99.0), (3, "F", "south", None, None),
        (4, "M", "south", -5, float("nan")), (5, "M", "north", 40, -3.0), (6, None, "south", 50, 1.0),
        (7, "X", "south", 20, 2.0), (8, "M", "south", 61, 7.25), (9, "F", None, 70, 12.0),
    ]
    rows += [(10, "M", "south", 33, 4.5)] * 3 + [(11, "F", "south", None, 60.0)] * 4
    rows += [(None, "F", "south", 45, 5.0)] * 3
    return pl.DataFrame(rows, schema={"pid": pl.Int64, "sex": pl.String, "site": pl.String, "age": pl.Int64,
                                      "cost": pl.Float64}, orient="row")


def _workspace(directory, policy: dict, file) -> Workspace:
    ws = Workspace(directory)
    ws.init()
    ws.add_dataset("pdp_polars", file, dp=policy)
    ws.add_dataset("pdp_spark", file, dp=policy, engine="spark")
    return ws


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp-spark") / "people.parquet"
    _rows().write_parquet(path)
    return path


def _query(name: str) -> dict:
    """A filter, the public keys, and every aggregate Spark computes (a count, a sum and a mean of each type)."""
    rows = P.frame_op("filter", input=P.scan(name), predicate=P.binary("ne", P.col("site"), P.lit("north")))
    return P.frame_op("group_by", input=rows, keys=[P.col("sex")],
                      aggs=[P.length(), P.alias(P.fn("dp.sum", P.col("age"), lower=0, upper=100), "age_sum"),
                            P.alias(P.fn("dp.mean", P.col("age"), lower=0, upper=100), "age_mean"),
                            P.alias(P.fn("dp.sum", P.col("cost"), lower=0.0, upper=50.0), "cost_sum"),
                            P.alias(P.fn("dp.mean", P.col("cost"), lower=0.0, upper=50.0), "cost_mean")])


def test_spark_computes_the_values_opendp_adds_noise_to(spark, tmp_path, data_file):
    catalog = _workspace(tmp_path / "ws", NO_NOISE, data_file).catalog()
    on_polars = executor.evaluate(_query("pdp_polars"), catalog, "alice").table
    on_spark = executor.evaluate(_query("pdp_spark"), catalog, "alice").table
    assert on_spark.schema == on_polars.schema
    assert on_polars["sex"].to_list() == ["F", "M", "U"]
    # (the mean of the empty group "U" is a noisy 0 over a noisy 0 on both: its sign is noise)
    assert_frame_equal(on_spark.head(2), on_polars.head(2), check_exact=False, rel_tol=1e-4, abs_tol=1e-3)
    assert_frame_equal(on_spark.tail(1).drop("age_mean", "cost_mean"), on_polars.tail(1).drop("age_mean", "cost_mean"),
                       check_exact=False, rel_tol=1e-4, abs_tol=1e-3)
    # The exact values themselves: 2 rows kept per person (the null pid is one person), then the filter (a
    # null site is dropped), "X" and the null key left out, nulls and NaN at the midpoint, values clamped,
    # "U" zeros.
    query = dp.translate(_query("pdp_spark"), catalog)
    exact = query.engine.dp_exact(query, catalog)
    expected = pl.DataFrame({"sex": ["F", "M", "U"],
                             "__dp_0_len": [6, 4, 0],
                             "__dp_1_sum": [100 + 50 + 50 + 50 + 45 + 45, 0 + 61 + 33 + 33, 0],
                             "__dp_2_sum": [100 + 50 + 50 + 50 + 45 + 45, 0 + 61 + 33 + 33, 0],
                             "__dp_2_len": [6, 4, 0],
                             "__dp_3_sum": [50.0 + 25 + 50 + 50 + 5 + 5, 25 + 7.25 + 4.5 + 4.5, 0.0],
                             "__dp_4_sum": [50.0 + 25 + 50 + 50 + 5 + 5, 25 + 7.25 + 4.5 + 4.5, 0.0],
                             "__dp_4_len": [6, 4, 0]})
    assert_frame_equal(exact.sort("sex"), expected, check_dtypes=False)
    assert_frame_equal(on_spark.select("len", "age_sum", "cost_sum").cast(pl.Float64),
                       expected.select("__dp_0_len", "__dp_1_sum", "__dp_3_sum").cast(pl.Float64)
                       .rename({"__dp_0_len": "len", "__dp_1_sum": "age_sum", "__dp_3_sum": "cost_sum"}),
                       check_exact=False, rel_tol=1e-4, abs_tol=1e-3)


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_the_values_agree_on_narrow_types_and_fractional_bounds(spark, tmp_path, suffix):
    """Int32 and Float32 columns (Parquet keeps them, CSV reads Int64 and Float64), and fractional bounds on a
    whole-number column, which OpenDP truncates toward zero (its null midpoint too: (-5 + 60) / 2 -> 27)."""
    path = tmp_path / f"narrow.{suffix}"
    narrow = _rows().with_columns(pl.col("age").cast(pl.Int32), pl.col("cost").cast(pl.Float32))
    narrow.write_parquet(path) if suffix == "parquet" else narrow.write_csv(path)
    catalog = _workspace(tmp_path / "ws", {**NO_NOISE, "bounds": {}}, path).catalog()

    def query(name: str) -> dict:
        return P.frame_op("group_by", input=P.scan(name), keys=[P.col("sex")],
                          aggs=[P.length(), P.alias(P.fn("dp.sum", P.col("age"), lower=0.5, upper=99.7), "age_sum"),
                                P.alias(P.fn("dp.mean", P.col("age"), lower=-5.5, upper=60), "age_mean"),
                                P.alias(P.fn("dp.sum", P.col("cost"), lower=0.1, upper=50.3), "cost_sum")])

    on_polars = executor.evaluate(query("pdp_polars"), catalog, "alice").table
    on_spark = executor.evaluate(query("pdp_spark"), catalog, "alice").table
    assert on_spark.schema == on_polars.schema
    assert_frame_equal(on_spark.head(2), on_polars.head(2), check_exact=False, rel_tol=1e-4, abs_tol=1e-3)
    assert on_spark["age_sum"].to_list() == on_polars["age_sum"].to_list() == [436, 167, 0]


def test_truncation_keeps_a_random_choice_of_each_persons_rows(spark, tmp_path):
    """OpenDP keeps max_contributions rows per person at random (a shuffle per person): so does Spark."""
    path = tmp_path / "one.parquet"
    pl.DataFrame({"pid": [1, 1, 1], "sex": ["F", "F", "F"], "site": ["s"] * 3, "age": [10, 20, 30],
                  "cost": [1.0, 2.0, 3.0]}).write_parquet(path)
    catalog = _workspace(tmp_path / "ws", {**NO_NOISE, "max_contributions": 1}, path).catalog()
    plan = P.frame_op("select", input=P.scan("pdp_spark"),
                      exprs=[P.fn("dp.sum", P.col("age"), lower=0, upper=100)])
    query = dp.translate(plan, catalog)
    seen = [query.engine.dp_exact(query, catalog)["__dp_0_sum"].item() for _ in range(12)]
    assert set(seen) <= {10, 20, 30} and len(set(seen)) > 1, seen


def test_the_noise_scales_and_accuracy_are_the_same_on_both_engines(spark, tmp_path, data_file):
    catalog = _workspace(tmp_path / "ws", POLICY, data_file).catalog()
    on_polars = dp.preview(_query("pdp_polars"), catalog, "alice")
    on_spark = dp.preview(_query("pdp_spark"), catalog, "alice")
    assert on_spark["columns"] == on_polars["columns"]
    assert {k: v for k, v in on_spark.items() if k not in ("dataset", "budget")} == \
        {k: v for k, v in on_polars.items() if k not in ("dataset", "budget")}
    # the noise is OpenDP's own measurement per part, at the scale its summary of the calibrated measurement gives
    query = dp.translate(_query("pdp_spark"), catalog)
    calibrated = mechanism.build(query, None)
    scales = {(r["column"], str(r["aggregate"]).lower()): r["scale"] for r in calibrated.summary(0.05)}
    assert [scales[(c["name"], str(c["aggregate"]).lower())] for c in on_spark["columns"] if c["scale"]] == \
        [c["scale"] for c in on_polars["columns"] if c["scale"]]
    assert {name: dtype for name, (dtype, _) in calibrated.noise.items()} == {
        "__dp_0_len": "UInt32", "__dp_1_sum": "Int64", "__dp_2_sum": "Int64", "__dp_2_len": "UInt32",
        "__dp_3_sum": "Float64", "__dp_4_sum": "Float64", "__dp_4_len": "UInt32"}


def test_the_budget_is_one_ledger_and_refused_alike_on_both_engines(spark, tmp_path, data_file):
    replies = {}
    for engine in ("polars", "spark"):
        ws = Workspace(tmp_path / engine)
        ws.init()
        ws.add_dataset("pdp", data_file, dp={**POLICY, "epsilon": 0.3}, engine=engine)
        catalog = ws.catalog()
        notes = [executor.evaluate(_query("pdp"), catalog, "alice").notes for _ in range(3)]
        with pytest.raises(BastionError) as refused:
            executor.evaluate(_query("pdp"), catalog, "alice")
        spent = [(r["scientist"], r["dataset"], r["epsilon"]) for r in dp.BudgetLedger(ws.dp_ledger_path).history()]
        replies[engine] = (notes, refused.value.ename, refused.value.evalue, spent, dp.budget(catalog, "alice"))
    assert replies["spark"] == replies["polars"]
    assert replies["spark"][1] == "PolicyViolation" and "exhausted" in replies["spark"][2]
    # one file under a polars name and a Spark name is one account: spending on either counts for both
    catalog = _workspace(tmp_path / "both", {**POLICY, "epsilon": 0.2}, data_file).catalog()
    executor.evaluate(_query("pdp_spark"), catalog, "alice")
    executor.evaluate(_query("pdp_polars"), catalog, "alice")
    for name in ("pdp_spark", "pdp_polars"):
        with pytest.raises(BastionError, match="exhausted"):
            executor.evaluate(_query(name), catalog, "alice")


def test_a_quantile_is_refused_on_spark_before_anything_is_spent(spark, tmp_path, data_file):
    ws = _workspace(tmp_path / "ws", POLICY, data_file)
    catalog = ws.catalog()
    plan = P.frame_op("select", input=P.scan("pdp_spark"), exprs=[P.fn("dp.quantile", P.col("age"), quantile=0.5,
                                                                       candidates=[10, 20, 30])])
    with pytest.raises(BastionError) as refused:
        executor.evaluate(plan, catalog, "alice")
    assert refused.value.ename == "UnsupportedOperation" and "dp.quantile" in refused.value.evalue
    assert dp.BudgetLedger(ws.dp_ledger_path).history() == []


def test_releases_of_a_count_on_spark_are_noisy_at_the_scale(spark, tmp_path, data_file):
    catalog = _workspace(tmp_path / "ws", {**POLICY, "epsilon": 1e6, "privacy_unit_column": None,
                                           "max_contributions": 1}, data_file).catalog()
    plan = P.frame_op("select", input=P.scan("pdp_spark"), exprs=[P.length()])
    query = dp.translate(plan, catalog)
    calibrated = mechanism.build(query, None)
    [row] = calibrated.summary(0.05)
    scale, exact = row["scale"], len(_rows())
    assert scale == pytest.approx(1 / 0.1)
    # every release runs Spark's count and OpenDP's noise; then the noise step alone, many times, for the spread
    released = [executor.evaluate(plan, catalog, "alice").table["len"][0] for _ in range(20)]
    exact_values = query.engine.dp_exact(query, catalog)
    released += [calibrated.release_exact(exact_values, query)["len"][0] for _ in range(1500)]
    assert all(v >= 0 for v in released)
    # A count near 0 is clipped at 0 (UInt32) by OpenDP as on polars; at 18 rows and scale 10 few are.
    mean, spread = statistics.fmean(released), statistics.pstdev(released)
    assert abs(mean - exact) < 5 * scale * math.sqrt(2) / math.sqrt(len(released)) + 1.0, (mean, exact)
    assert 0.75 * scale * math.sqrt(2) < spread < 1.25 * scale * math.sqrt(2), (spread, scale)


# ------------------------------------------------------------------ a real executor serving a Spark DP dataset
@pytest.fixture(scope="module")
def dp_spark_executor(tmp_path_factory, data_file):
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("dp-spark-executor")
    workspace = directory / "ws"
    assert run_owner(workspace, "init").returncode == 0
    options = ("--privacy", "dp", "--epsilon", "1", "--epsilon-per-query", "0.1", "--public-keys", "sex=F,M,U",
               "--bounds", "age=0:100", "--bounds", "cost=0:50", "--privacy-unit-column", "pid",
               "--max-contributions", "2")
    for name, engine in (("pdp_spark", "spark"), ("pdp_polars", "polars")):
        added = run_owner(workspace, "dataset", "add", name, data_file, "--engine", engine, *options)
        assert added.returncode == 0, added.stderr
    keys = register_scientists(Workspace(workspace), directory / "keys", ("alice", "bob"))
    with running_executor(workspace, keys) as running:
        yield running


def _fetch(client, plan: dict) -> tuple[pl.DataFrame, list[str]]:
    kind, body, frames = client.request("fetch", {"plan": plan, "text": "cell"}, timeout=240)
    assert kind == "result", body
    return pl.read_ipc(io.BytesIO(frames[0])), body["notes"]


def test_an_executor_releases_a_spark_dp_query_as_on_polars(dp_spark_executor):
    alice = dp_spark_executor.client("alice")
    on_spark, spark_notes = _fetch(alice, _query("pdp_spark"))
    on_polars, polars_notes = _fetch(alice, _query("pdp_polars"))
    assert on_spark.schema == on_polars.schema and on_spark["sex"].to_list() == ["F", "M", "U"]
    # one account: the second release was charged to the same data, under the other name
    assert spark_notes == ["differentially private: epsilon 0.1 spent on 'pdp_spark', 0.9 of 1 left"]
    assert polars_notes == ["differentially private: epsilon 0.1 spent on 'pdp_polars', 0.8 of 1 left"]
    kind, body, _ = alice.request("dp_preview", {"plan": _query("pdp_spark")}, timeout=240)
    kind2, body2, _ = alice.request("dp_preview", {"plan": _query("pdp_polars")}, timeout=240)
    assert kind == kind2 == "ok" and body["columns"] == body2["columns"]
    kind, body, _ = alice.request("fetch", {"plan": P.scan("pdp_spark")}, timeout=240)
    assert kind == "error" and body["ename"] == "PolicyViolation"


def test_the_differencing_attacks_twin_queries_get_replies_of_the_same_form(dp_spark_executor):
    bob = dp_spark_executor.client("bob")
    everyone = P.frame_op("select", input=P.scan("pdp_spark"), exprs=[P.length()])
    but_one = P.frame_op("select", input=P.frame_op("filter", input=P.scan("pdp_spark"),
                                                    predicate=P.binary("ne", P.col("pid"), P.lit(8))),
                         exprs=[P.length()])
    first, first_notes = _fetch(bob, everyone)
    second, second_notes = _fetch(bob, but_one)
    assert first.schema == second.schema and first.height == second.height == 1
    shape = re.compile(r"differentially private: epsilon 0\.1 spent on 'pdp_spark', [0-9.]+ of 1 left")
    assert len(first_notes) == len(second_notes) == 1
    assert shape.fullmatch(first_notes[0]) and shape.fullmatch(second_notes[0])


def test_an_executor_refuses_a_quantile_on_spark_and_charges_nothing(dp_spark_executor):
    bob = dp_spark_executor.client("bob")

    def spent() -> float:
        kind, body, _ = bob.request("budget", {}, timeout=120)
        assert kind == "ok", body
        return {d["name"]: d for d in body["datasets"]}["pdp_spark"]["epsilon_spent"]

    before = spent()
    plan = P.frame_op("select", input=P.scan("pdp_spark"),
                      exprs=[P.fn("dp.quantile", P.col("age"), quantile=0.5, candidates=[10, 20, 30])])
    kind, body, _ = bob.request("fetch", {"plan": plan, "text": "cell"}, timeout=240)
    assert kind == "error" and body["ename"] == "UnsupportedOperation" and "dp.quantile" in body["evalue"]
    assert spent() == before


def test_cancel_and_the_time_limit_stop_a_spark_dp_query_and_the_charge_stays(spark, tmp_path, data_file):
    """As on polars, the budget is charged before the query runs: a stopped query keeps its charge."""
    ws = _workspace(tmp_path / "ws", POLICY, data_file)
    catalog = ws.catalog()
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(BastionError) as stopped:
        executor.evaluate(_query("pdp_spark"), catalog, "alice", cancel=cancelled)
    assert stopped.value.ename == "ExecutionError" and stopped.value.details.get("cancelled")
    with pytest.raises(BastionError) as late:
        executor.evaluate(_query("pdp_spark"), catalog, "alice", timeout=1e-9)
    assert late.value.ename == "LimitExceeded"
    assert [row["epsilon"] for row in dp.BudgetLedger(ws.dp_ledger_path).history()] == [0.1, 0.1]
