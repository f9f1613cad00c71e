"""Differential privacy: OpenDP releases, the odometer, routing and the differencing attack.

Real parts throughout: real OpenDP and polars in-process for the statistics,
a real workspace on disk for the odometer, and a real ``bastion-owner serve``
process (loopback) for the wire, restarts and isolation between scientists.
"""
from __future__ import annotations

import math
import statistics

import polars as pl
import pytest
import tomli_w

from bastion_kernel.contract import plan as P
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.contract.protocol import BastionError
from conftest import make_keys, run_owner, start_executor
from language_fake_session import FakeSession
from owner_console import dp, executor
from owner_console.sample_data import generate_patients
from owner_console.workspace import Workspace, WorkspaceError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROWS = 200
DP_TABLE = {"epsilon": 1.0, "epsilon_per_query": 0.1, "max_rows": 10_000,
            "bounds": {"age": [0, 100], "cost": [0, 50_000]}, "public_keys": {"sex": ["F", "M"]}}


def scan(name="pdp"):
    return P.scan(name)


def select(*exprs, frame=None, name="pdp"):
    return P.frame_op("select", input=frame or scan(name), exprs=list(exprs))


def grouped(keys, *aggs, frame=None):
    return P.frame_op("group_by", input=frame or scan(), keys=[P.col(k) for k in keys], aggs=list(aggs))


def filtered(predicate, name="pdp"):
    return P.frame_op("filter", input=scan(name), predicate=predicate)


COUNT = select(P.length())


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "patients.parquet"
    generate_patients(ROWS, seed=7).write_parquet(path)
    return path


@pytest.fixture()
def workspace(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("pdp", data, dp=DP_TABLE)
    ws.add_dataset("plain", data, min_group_size=5)
    return ws


def spends(ws: Workspace) -> list[tuple]:
    return [(row["scientist"], row["dataset"], row["epsilon"]) for row in dp.BudgetLedger(ws.dp_ledger_path).history()]


# ------------------------------------------------------------------ policy
def test_policy_round_trips_through_the_dataset_toml(workspace):
    dataset = workspace.catalog()["pdp"]
    assert dataset.dp.epsilon == 1.0 and dataset.dp.epsilon_per_query == 0.1
    assert dataset.dp.bounds == {"age": (0, 100), "cost": (0, 50_000)}
    assert dataset.dp.public_keys == {"sex": ("F", "M")}
    assert dataset.dp.ledger == workspace.dp_ledger_path
    assert workspace.catalog()["plain"].dp is None


@pytest.mark.parametrize("table, key", [
    ({"max_rows": 10}, "dp.epsilon"),
    ({"epsilon": -1, "max_rows": 10}, "dp.epsilon"),
    ({"epsilon": 1, "max_rows": 10, "epsilon_per_query": 2}, "dp.epsilon_per_query"),
    ({"epsilon": 1, "max_rows": 0}, "dp.max_rows"),
    ({"epsilon": 1, "max_rows": 10, "bounds": {"age": [5, 1]}}, "dp.bounds.age"),
    ({"epsilon": 1, "max_rows": 10, "public_keys": {"sex": []}}, "dp.public_keys.sex"),
    ({"epsilon": 1, "max_rows": 10, "budget_reset": True}, "dp.budget_reset"),
])
def test_a_malformed_dp_table_names_the_file_and_the_key(workspace, data, table, key):
    toml_path = workspace.datasets_dir / "broken.toml"
    toml_path.write_text(tomli_w.dumps({"name": "broken", "path": str(data), "format": "parquet",
                                        "policy": {}, "dp": table}))
    with pytest.raises(WorkspaceError) as caught:
        workspace.load_dataset(toml_path)
    assert str(toml_path) in str(caught.value) and key in str(caught.value)


def test_a_policy_naming_a_missing_column_is_refused(workspace, data):
    with pytest.raises(WorkspaceError, match="'weight'"):
        workspace.add_dataset("bad", data, dp={"epsilon": 1, "max_rows": 10, "bounds": {"weight": [0, 1]}})


# ------------------------------------------------------------------ noise at the configured scale
def test_releases_are_noisy_at_the_scale_opendp_reports(workspace, data):
    """The empirical spread of a noised count matches OpenDP's reported scale (discrete Laplace)."""
    ws = workspace
    ws.add_dataset("many", data, dp={"epsilon": 1000.0, "epsilon_per_query": 0.1, "max_rows": 10_000})
    catalog = ws.catalog()
    plan = select(P.length(), name="many")
    scale = dp.preview(plan, catalog, "alice")["columns"][0]["scale"]
    assert scale == pytest.approx(1 / 0.1, rel=1e-6)  # a count has sensitivity 1: scale = 1/epsilon
    truth = pl.read_parquet(data).height
    values = [executor.evaluate(plan, catalog, "alice").table["len"][0] for _ in range(400)]
    # Discrete Laplace with parameter t = 1/scale: variance 2 e^-t / (1 - e^-t)^2.
    t = 1 / scale
    expected_std = math.sqrt(2 * math.exp(-t)) / (1 - math.exp(-t))
    std = statistics.pstdev(values)
    assert len(set(values)) > 20, "the counts are not noisy"
    # Relative standard error of a Laplace sample's std over n=400 is about sqrt(5/4n) ~ 5.6%.
    assert abs(std / expected_std - 1) < 0.2, (std, expected_std)
    assert abs(statistics.fmean(values) - truth) < 4 * expected_std / math.sqrt(len(values))


def test_a_grouped_release_has_one_noisy_row_per_public_key(workspace, data):
    plan = grouped(["sex"], P.length(), P.alias(P.fn("dp.mean", P.col("age")), "mean_age"),
                   P.alias(P.fn("dp.quantile", P.col("age"), quantile=0.5), "median_age"),
                   P.fn("dp.sum", P.col("cost"), lower=0, upper=10_000))
    released = executor.evaluate(plan, workspace.catalog(), "alice")
    assert released.table.columns == ["sex", "len", "mean_age", "median_age", "cost"]
    assert released.table["sex"].to_list() == ["F", "M"]
    assert released.decision.action == "allow" and "epsilon 0.1 spent" in released.decision.reason
    truth = pl.read_parquet(data).group_by("sex").len().sort("sex")["len"].to_list()
    # noisy, but not wildly off: scale is ~ a few dozen at epsilon 0.1 shared by 6 statistics
    assert all(abs(a - b) < 400 for a, b in zip(released.table["len"].to_list(), truth))
    # the schema reported before running is the released one
    assert executor.schema_of(plan, workspace.catalog()) == [(n, str(t)) for n, t in released.table.schema.items()]


@pytest.mark.parametrize("unit", [{"max_contributions": 3},
                                  {"privacy_unit_column": "patient_id", "max_contributions": 2}])
def test_the_privacy_unit_sets_the_noise_of_a_count(workspace, data, unit):
    """A count's sensitivity is what one person may contribute: its scale is max_contributions / epsilon."""
    workspace.add_dataset("unit", data, dp={"epsilon": 1.0, "epsilon_per_query": 0.1, "max_rows": 10_000, **unit})
    preview = dp.preview(select(P.length(), name="unit"), workspace.catalog(), "alice")
    assert preview["columns"][0]["scale"] == pytest.approx(unit["max_contributions"] / 0.1, rel=1e-9)


@pytest.mark.parametrize("max_contributions", [1, 2])
def test_an_identifier_column_keeps_at_most_max_contributions_rows_per_person(workspace, data, tmp_path,
                                                                             max_contributions):
    """Every patient has three rows; with privacy_unit_column, OpenDP keeps max_contributions of each."""
    tripled = tmp_path / "tripled.parquet"
    pl.concat([pl.read_parquet(data)] * 3).write_parquet(tripled)
    # A large epsilon per query: the noise (scale max_contributions / 500) rounds to nothing.
    workspace.add_dataset("tripled", tripled, dp={"epsilon": 1000.0, "epsilon_per_query": 500.0, "max_rows": 10_000,
                                                  "privacy_unit_column": "patient_id",
                                                  "max_contributions": max_contributions})
    released = executor.evaluate(select(P.length(), name="tripled"), workspace.catalog(), "alice")
    assert abs(released.table["len"][0] - ROWS * max_contributions) <= 1


def test_a_policy_with_delta_releases_and_charges_its_delta(workspace, data):
    """(epsilon, delta) per query: the release is calibrated to epsilon and the odometer records the delta."""
    workspace.add_dataset("approx", data, dp={**DP_TABLE, "epsilon_per_query": 0.5, "delta": 1e-5,
                                              "delta_per_query": 1e-6})
    workspace.add_dataset("pure", data, dp={**DP_TABLE, "epsilon_per_query": 0.5})
    catalog = workspace.catalog()

    def plan(name):
        return grouped(["sex"], P.length(), P.alias(P.fn("dp.mean", P.col("age")), "mean_age"), frame=scan(name))

    preview = dp.preview(plan("approx"), catalog, "alice")
    assert preview["delta"] == 1e-6
    # Public keys need no threshold, so the noise is that of the pure policy with the same epsilon.
    assert [c["scale"] for c in preview["columns"]] == [c["scale"] for c in dp.preview(plan("pure"), catalog,
                                                                                         "alice")["columns"]]
    plan = plan("approx")
    released = executor.evaluate(plan, catalog, "alice")
    assert released.table.columns == ["sex", "len", "mean_age"]
    assert released.decision.details["dp"]["delta_spent"] == 1e-6
    assert [(row["dataset"], row["epsilon"], row["delta"])
            for row in dp.BudgetLedger(workspace.dp_ledger_path).history()] == [("approx", 0.5, 1e-6)]


# ------------------------------------------------------------------ the odometer
def test_the_budget_is_spent_exactly_and_refused_when_exhausted(workspace):
    catalog = workspace.catalog()
    for i in range(10):
        executor.evaluate(COUNT, catalog, "alice")
    assert [row[2] for row in spends(workspace)] == [0.1] * 10
    assert math.fsum(row[2] for row in spends(workspace)) == 1.0
    with pytest.raises(BastionError) as caught:
        executor.evaluate(COUNT, catalog, "alice")
    assert caught.value.ename == "PolicyViolation" and "exhausted" in caught.value.evalue
    assert "not run" in caught.value.evalue
    assert len(spends(workspace)) == 10  # the refused query was not charged
    [left] = dp.budget(catalog, "alice")
    assert left["epsilon_spent"] == 1.0 and left["epsilon_remaining"] == 0 and left["queries_left"] == 0


def test_a_query_refused_by_the_policy_costs_nothing(workspace):
    catalog = workspace.catalog()
    for bad in (scan(), select(P.fn("mean", P.col("age"))), grouped(["zip"], P.length())):
        with pytest.raises(BastionError):
            executor.evaluate(bad, catalog, "alice")
    assert spends(workspace) == []


def test_preview_spends_nothing_and_reports_accuracy(workspace):
    catalog = workspace.catalog()
    preview = dp.preview(grouped(["sex"], P.length(), P.fn("dp.sum", P.col("age"))), catalog, "alice")
    assert preview["epsilon"] == 0.1 and preview["alpha"] == 0.05
    assert [c["aggregate"] for c in preview["columns"]] == ["Frame Length", "Sum"]
    assert all(c["scale"] > 0 and c["accuracy"] > c["scale"] for c in preview["columns"])
    assert preview["budget"]["epsilon_remaining"] == 1.0
    assert spends(workspace) == []


def test_preview_of_a_mean_reports_the_error_of_the_mean(workspace):
    # OpenDP releases a mean as a noisy sum over a noisy count; the scientist asked for the mean.
    catalog = workspace.catalog()
    mean = P.alias(P.fn("dp.mean", P.col("age"), lower=0, upper=100), "mean_age")
    preview = dp.preview(grouped(["sex"], P.length(), mean), catalog, "alice")
    by_name = {c["name"]: c for c in preview["columns"]}
    assert by_name["mean_age"]["aggregate"] == "Mean" and by_name["mean_age"]["accuracy"] is None
    count_accuracy = next(c["accuracy"] for c in preview["columns"] if c["aggregate"] == "Frame Length")
    per_rows = by_name["mean_age"]["accuracy_for_rows"]
    # (a_sum + B * a_count) / n, B = 100 the larger bound: it shrinks as 1/n and is at least B * a_count / n.
    assert per_rows["100"] == pytest.approx(10 * per_rows["1000"]) == pytest.approx(100 * per_rows["10000"])
    assert per_rows["1000"] * 1000 > 100 * count_accuracy
    assert per_rows["100"] > per_rows["1000"] > per_rows["10000"]
    assert spends(workspace) == []


def test_each_scientist_has_their_own_budget(workspace):
    catalog = workspace.catalog()
    for _ in range(10):
        executor.evaluate(COUNT, catalog, "alice")
    with pytest.raises(BastionError, match="exhausted"):
        executor.evaluate(COUNT, catalog, "alice")
    assert executor.evaluate(COUNT, catalog, "bob").table.height == 1
    assert dp.budget(catalog, "bob")[0]["epsilon_spent"] == pytest.approx(0.1)
    assert dp.budget(catalog, "alice")[0]["epsilon_spent"] == 1.0


# ------------------------------------------------------------------ only DP aggregates leave
@pytest.mark.parametrize("plan", [
    scan(),
    P.frame_op("head", input=scan(), n=5),
    select(P.col("age")),
    select(P.fn("mean", P.col("age"))),
    select(P.fn("dp.sum", P.col("name"), lower=0, upper=1)),
    grouped(["zip"], P.length()),
    grouped(["sex"], P.fn("first", P.col("age"))),
    P.frame_op("sort", input=select(P.length()), by=[P.col("len")], descending=[False], nulls_last=False),
    P.frame_op("concat", inputs=[scan(), scan("plain")]),
    select(P.length(), frame=P.frame_op("with_columns", input=scan(), exprs=[P.col("age")])),
])
def test_a_non_dp_query_on_a_dp_dataset_is_refused(workspace, plan):
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, workspace.catalog(), "alice")
    assert caught.value.ename in ("PolicyViolation", "SchemaError", "UnsupportedOperation")
    assert spends(workspace) == []


@pytest.mark.parametrize("dp_side", ["left", "right"])
def test_a_join_with_a_dp_dataset_releases_only_dp_results(workspace, dp_side):
    other = "plain"
    left, right = (scan(), scan(other)) if dp_side == "left" else (scan(other), scan())
    joined = P.frame_op("join", left=left, right=right, how="inner", left_on=[P.col("patient_id")],
                        right_on=[P.col("patient_id")], suffix="_r")
    for plan in (joined, P.frame_op("group_by", input=joined, keys=[P.col("sex")], aggs=[P.length()])):
        with pytest.raises(BastionError) as caught:
            executor.evaluate(plan, workspace.catalog(), "alice")
        assert caught.value.ename == "PolicyViolation"
    # the same join without the DP dataset is an ordinary (K-checked) query
    both_plain = P.frame_op("group_by", input=P.frame_op(
        "join", left=scan(other), right=scan(other), how="inner", left_on=[P.col("patient_id")],
        right_on=[P.col("patient_id")], suffix="_r"), keys=[P.col("sex")], aggs=[P.length()])
    assert executor.evaluate(both_plain, workspace.catalog(), "alice").decision.action == "allow"


def test_dp_aggregates_are_refused_on_a_non_dp_dataset(workspace):
    with pytest.raises(BastionError) as caught:
        executor.evaluate(select(P.fn("dp.sum", P.col("age")), name="plain"), workspace.catalog(), "alice")
    assert caught.value.ename == "PolicyViolation" and "differential privacy" in caught.value.evalue


def test_a_dp_dataset_cannot_be_saved(workspace):
    with pytest.raises(BastionError, match="differentially private") as caught:
        executor.prepare_save(filtered(P.binary("ge", P.col("age"), P.lit(0))), workspace.catalog(),
                              scientist="alice")
    assert caught.value.ename == "PolicyViolation"


def test_bounds_outside_the_owners_are_refused(workspace):
    with pytest.raises(BastionError, match="within the owner's"):
        executor.evaluate(select(P.fn("dp.sum", P.col("age"), lower=0, upper=1000)), workspace.catalog(), "alice")
    assert spends(workspace) == []


# ------------------------------------------------------------------ the differencing attack
def test_the_differencing_attack_no_longer_reveals_membership(tmp_path):
    """count(everyone) - count(everyone but the target) told the attacker whether the target is in.

    Two worlds: the target's row is in the data, or it is not.  The attacker
    asks both counts (two queries of epsilon e each, so 2e in all) and guesses
    "in" when the difference is positive.  Any test on an epsilon-DP release
    with a fair prior is right with probability at most e^eps / (1 + e^eps).
    """
    full = generate_patients(ROWS, seed=11)
    target = int(full["patient_id"][0])
    worlds = {"in": full, "out": full.filter(pl.col("patient_id") != target)}
    ws = Workspace(tmp_path / "ws")
    ws.init()
    per_query = 0.1
    for world, frame in worlds.items():
        path = tmp_path / f"{world}.parquet"
        frame.write_parquet(path)
        ws.add_dataset(f"dp_{world}", path, dp={"epsilon": 10_000.0, "epsilon_per_query": per_query,
                                                "max_rows": 10_000})
        ws.add_dataset(f"plain_{world}", path, min_group_size=10)
    catalog = ws.catalog()

    def difference(name: str) -> int:
        everyone = select(P.length(), name=name)
        but_target = select(P.length(), frame=filtered(P.binary("ne", P.col("patient_id"), P.lit(target)), name))
        return (executor.evaluate(everyone, catalog, "eve").table["len"][0]
                - executor.evaluate(but_target, catalog, "eve").table["len"][0])

    # Without DP, both counts pass the minimum group size and the difference is the answer.
    assert difference("plain_in") == 1 and difference("plain_out") == 0

    trials = 200
    right = sum(difference("dp_in") > 0 for _ in range(trials)) + sum(difference("dp_out") <= 0 for _ in range(trials))
    success = right / (2 * trials)
    epsilon = 2 * per_query
    bound = math.exp(epsilon) / (1 + math.exp(epsilon))   # 0.5498 for epsilon 0.2
    standard_error = math.sqrt(0.25 / (2 * trials))
    assert success <= bound + 3 * standard_error, (success, bound)


# ------------------------------------------------------------------ the language
def test_the_language_builds_dp_plans():
    interp = Interpreter(FakeSession())
    interp.run_cell('patients = dataset("patients")')
    frame = interp.run_cell('patients.group_by("sex").agg(pl.len(), col("cost").dp.sum(bounds=(0, 5000)), '
                            'col("age").dp.mean(), col("age").dp.quantile(0.25, candidates=[10, 20, 30]))').value
    aggs = frame.plan["aggs"]
    assert aggs[1] == P.fn("dp.sum", P.col("cost"), lower=0, upper=5000)
    assert aggs[2] == P.fn("dp.mean", P.col("age"))
    assert aggs[3] == P.fn("dp.quantile", P.col("age"), quantile=0.25, candidates=[10, 20, 30])
    for bad in ('col("a").dp.sum(bounds=(5, 1))', 'col("a").dp.sum(bounds=3)', 'col("a").dp.quantile(2)'):
        with pytest.raises(BastionError):
            interp.run_cell(bad)


def test_budget_and_preview_ask_the_session():
    session = FakeSession()
    interp = Interpreter(session)
    interp.run_cell('patients = dataset("patients")')
    interp.run_cell("budget()")
    interp.run_cell('patients.select(col("age").dp.mean(bounds=(0, 100))).dp_preview()')
    kinds = [call[0] for call in session.calls]
    assert "budget" in kinds and "dp_preview" in kinds


# ------------------------------------------------------------------ the real executor process
@pytest.fixture()
def dp_executor(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("pdp", data, dp={**DP_TABLE, "epsilon": 0.3})
    ws.add_dataset("plain", data, min_group_size=5)
    keys = {name: make_keys(tmp_path / "keys" / name, name) for name in ("alice", "bob")}
    for name in keys:
        ws.add_scientist(name, keys[name].public_file)
    running = start_executor(ws.path, keys)
    state = {"running": running, "ws": ws, "keys": keys}
    try:
        yield state
    finally:
        state["running"].stop()


def _budget(client) -> dict:
    kind, body, _ = client.request("budget", {})
    assert kind == "ok", body
    return {d["name"]: d for d in body["datasets"]}


def test_the_budget_survives_an_executor_restart(dp_executor):
    alice = dp_executor["running"].client("alice")
    for _ in range(2):
        kind, body, frames = alice.request("fetch", {"plan": COUNT, "text": "count"})
        assert kind == "result", body
        assert "differentially private" in body["notes"][0]
    assert _budget(alice)["pdp"]["epsilon_spent"] == pytest.approx(0.2)
    assert dp_executor["running"].stop() == 0

    dp_executor["running"] = start_executor(dp_executor["ws"].path, dp_executor["keys"])
    alice = dp_executor["running"].client("alice")
    assert _budget(alice)["pdp"]["epsilon_spent"] == pytest.approx(0.2)
    kind, body, _ = alice.request("fetch", {"plan": COUNT, "text": "count"})
    assert kind == "result", body
    kind, body, _ = alice.request("fetch", {"plan": COUNT, "text": "count"})
    assert kind == "error" and body["ename"] == "PolicyViolation" and "exhausted" in body["evalue"]
    # the spend and the refusal are in the audit log
    log = (dp_executor["ws"].audit_path).read_text()
    assert "epsilon 0.1 spent" in log and "exhausted" in log


def test_a_scientist_cannot_reset_or_spend_anothers_budget(dp_executor):
    running = dp_executor["running"]
    alice, bob = running.client("alice"), running.client("bob")
    for _ in range(3):
        assert alice.request("fetch", {"plan": COUNT})[0] == "result"
    for body in ({"reset": True}, {"scientist": "bob"}, {"datasets": []}):
        kind, reply, _ = alice.request("budget", body)
        assert kind == "error" and reply["ename"] == "ProtocolError"
    assert _budget(alice)["pdp"]["epsilon_remaining"] == 0
    assert _budget(bob)["pdp"]["epsilon_spent"] == 0
    assert bob.request("fetch", {"plan": COUNT})[0] == "result"
    assert _budget(alice)["pdp"]["epsilon_spent"] == pytest.approx(0.3)


def test_preview_and_refusals_over_the_wire(dp_executor):
    running = dp_executor["running"]
    alice = running.client("alice")
    plan = grouped(["sex"], P.length(), P.fn("dp.mean", P.col("age")))
    kind, body, _ = alice.request("dp_preview", {"plan": plan})
    assert kind == "ok", body
    assert body["epsilon"] == 0.1 and {c["name"] for c in body["columns"]} == {"len", "age"}
    assert _budget(alice)["pdp"]["epsilon_spent"] == 0
    kind, body, _ = alice.request("fetch", {"plan": scan()})
    assert kind == "error" and body["ename"] == "PolicyViolation"
    kind, body, _ = alice.request("dp_preview", {"plan": select(P.length(), name="plain")})
    assert kind == "error" and body["ename"] == "PolicyViolation"
    kind, body, _ = alice.request("datasets", {})
    described = {d["name"]: d for d in body["datasets"]}
    assert described["pdp"]["dp"]["public_keys"] == {"sex": ["F", "M"]} and "dp" not in described["plain"]
    # the kernel's client shows both as tables
    client = running.kernel_client("alice")
    preview = client.dp_preview(plan)
    assert preview.frame.columns[:4] == ["column", "aggregate", "distribution", "scale"]
    assert client.budget().frame["name"].to_list() == ["pdp"]


# ------------------------------------------------------------------ the owner's command line
def test_the_cli_registers_a_dp_dataset(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    done = run_owner(ws.path, "dataset", "add", "pdp", str(data), "--privacy", "dp", "--epsilon", "2",
                     "--epsilon-per-query", "0.5", "--privacy-unit-column", "patient_id", "--max-contributions", "2",
                     "--bounds", "age=0:100", "--bounds", "cost=0:5e4", "--public-keys", "sex=F,M")
    assert done.returncode == 0, done.stderr
    policy = ws.catalog()["pdp"].dp
    assert (policy.epsilon, policy.epsilon_per_query, policy.privacy_unit_column, policy.max_contributions) == \
        (2.0, 0.5, "patient_id", 2)
    assert policy.bounds == {"age": (0, 100), "cost": (0.0, 50000.0)}
    assert policy.public_keys == {"sex": ("F", "M")} and policy.max_rows >= 10 * ROWS
    # identifier-based privacy unit: releases work through OpenDP's truncation
    released = executor.evaluate(grouped(["sex"], P.length()), ws.catalog(), "alice")
    assert released.table["sex"].to_list() == ["F", "M"]
    for args, message in ((["--bounds", "age=oops"], "--bounds"), (["--public-keys", "zz=1"], "zz"),
                          ([], "--epsilon")):
        epsilon = [] if message == "--epsilon" else ["--epsilon", "1"]
        done = run_owner(ws.path, "dataset", "add", "bad", str(data), "--privacy", "dp", *epsilon, *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = run_owner(ws.path, "dataset", "add", "bad", str(data), "--epsilon", "1")
    assert done.returncode == 2 and "--privacy dp" in done.stderr


# ------------------------------------------------------------------ the example notebook
def test_the_dp_notebook_runs_on_the_bastion_kernel(tmp_path, monkeypatch):
    """examples/dp.ipynb, executed by a real Bastion kernel against a real executor set up as the demo does."""
    import subprocess
    import sys
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    from owner_console.demo import DP_DATASET, DP_OPTIONS
    from owner_console.sample_data import write_patients

    examples = Path(__file__).resolve().parent.parent / "examples"
    notebook = nbformat.read(examples / "dp.ipynb", as_version=4)
    assert notebook.metadata.kernelspec.name == "bastion"
    data = write_patients(tmp_path / "patients.csv")
    ws = Workspace(tmp_path / "ws")
    ws.init()
    done = run_owner(ws.path, "dataset", "add", DP_DATASET, str(data), *DP_OPTIONS)
    assert done.returncode == 0, done.stderr
    kernel_cli = [sys.executable, "-m", "bastion_kernel.cli"]
    subprocess.run([*kernel_cli, "keygen", "--dir", str(tmp_path / "sci")], check=True, capture_output=True)
    ws.add_scientist("alice", tmp_path / "sci" / "scientist.key")
    keys = {"alice": make_keys(tmp_path / "unused", "alice")}
    running = start_executor(ws.path, keys, ready_as=None)
    try:
        config = tmp_path / "config.toml"
        subprocess.run([*kernel_cli, "connect", "--endpoint", running.endpoint, "--server-key",
                        str(ws.server_public_key_path), "--key-dir", str(tmp_path / "sci"), "--config", str(config)],
                       check=True, capture_output=True)
        monkeypatch.setenv("BASTION_CONFIG", str(config))
        NotebookClient(notebook, timeout=180, kernel_name="bastion",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        running.stop()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.get("output_type") == "error"]
    assert [e["ename"] for e in errors] == ["PolicyViolation", "PolicyViolation"]
    assert all("raises-exception" in cell.metadata.get("tags", []) for cell in code
               if any(o.get("output_type") == "error" for o in cell.outputs))
    spent = dp.BudgetLedger(ws.dp_ledger_path).history("alice")
    assert len(spent) == 4 and math.fsum(s["epsilon"] for s in spent) == pytest.approx(2.0)
