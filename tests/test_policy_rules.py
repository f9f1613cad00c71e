"""The policy's newer rules, in process against real polars: people, contributions,
dominance, suppression, per-scientist overrides, limits, runtime failures,
inheritance, and the policy file.

Expected counts are computed here with plain polars; each rule is checked at
its boundary (allowed at the true smallest count, refused one above).
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import decide, engine, executor, policy, validate
from owner_console.model import Dataset, Held, Policy, Released
from owner_console.sample_data import write_patients
from owner_console.workspace import Workspace, WorkspaceError

from conftest import run_owner

pytestmark = pytest.mark.timeout(120)

col, lit, fn, binary, alias, length, when = P.col, P.lit, P.fn, P.binary, P.alias, P.length, P.when
op = P.frame_op


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("rules") / "patients.csv", rows=2000)


@pytest.fixture(scope="module")
def files(tmp_path_factory, patients_csv) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rules")
    raw = pl.read_csv(patients_csv)
    # Patient i has i % 4 + 1 visits.
    visits = raw.select("patient_id", "sex", "zip", "cost").join(pl.DataFrame({"visit": [1, 2, 3, 4]}), how="cross")
    visits = visits.filter(pl.col("visit") <= pl.col("patient_id") % 4 + 1)
    visits.write_csv(root / "visits.csv")
    return {"patients": patients_csv, "visits": root / "visits.csv"}


@pytest.fixture(scope="module")
def raw_visits(files) -> pl.DataFrame:
    return pl.read_csv(files["visits"])


def catalog(files, **policies: Policy) -> dict[str, Dataset]:
    return {name: Dataset(name, files[name], "csv", pol) for name, pol in policies.items()}


def decision(plan, cat, scientist="alice"):
    """(action, the owner's detail of the decision, result or None)."""
    try:
        result = executor.evaluate(plan, cat, scientist)
    except BastionError as error:
        assert error.ename == "PolicyViolation", error.evalue
        return "reject", error.details["detail"], None
    return result.decision.action, result.decision.detail, result


# ------------------------------------------------------------------ person id
def test_person_id_counts_people_not_rows(files, raw_visits):
    plan = op("group_by", input=P.scan("visits"), keys=[col("zip")], aggs=[length()])
    people = raw_visits.group_by("zip").agg(pl.col("patient_id").n_unique())["patient_id"].min()
    rows = raw_visits.group_by("zip").len()["len"].min()
    assert rows > people  # precondition: counting rows would overstate
    action, reason, _ = decision(plan, catalog(files, visits=Policy(people, "reject", person_id="patient_id")))
    assert action == "allow" and f"smallest: {people}" in reason
    action, reason, _ = decision(plan, catalog(files, visits=Policy(people + 1, "reject", person_id="patient_id")))
    assert action == "reject" and f"(smallest: {people})" in reason


def test_person_id_contributions_count_people(files, raw_visits):
    # Only patients 1..3 have a non-zero value: 1 + 2 + 3 + ... visits, but 3 people.
    flag = when([(binary("le", col("patient_id"), lit(3)), col("cost"))], lit(0))
    plan = op("select", input=P.scan("visits"), exprs=[fn("sum", flag)])
    assert raw_visits.filter(pl.col("patient_id") <= 3).height >= 4
    action, reason, _ = decision(plan, catalog(files, visits=Policy(4, "reject", person_id="patient_id")))
    assert action == "reject" and "fewer than 4 rows of 'visits' (smallest: 3)" in reason


def test_a_person_id_missing_from_the_data_fails_closed(files):
    plan = op("group_by", input=P.scan("visits"), keys=[col("zip")], aggs=[length()])
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, catalog(files, visits=Policy(2, person_id="nobody")), "alice")
    assert caught.value.ename == "PolicyViolation" and "'nobody'" in caught.value.evalue


# ------------------------------------------------------------------ contributions
@pytest.mark.parametrize("threshold", [90, 95])
def test_contribution_boundary_of_an_indicator_sum(files, raw, threshold):
    flag = when([(binary("gt", col("age"), lit(threshold)), col("cost"))], lit(0))
    plan = op("group_by", input=P.scan("patients"), keys=[col("sex")], aggs=[fn("sum", flag), length()])
    contributing = raw.group_by("sex").agg(((pl.col("age") > threshold) & pl.col("cost").is_not_null()
                                            & (pl.col("cost") != 0)).sum().alias("c"))["c"].min()
    action, reason, _ = decision(plan, catalog(files, patients=Policy(contributing, "reject")))
    assert action == "allow", reason
    action, reason, _ = decision(plan, catalog(files, patients=Policy(contributing + 1, "reject")))
    assert action == "reject" and f"(smallest: {contributing})" in reason


def test_a_plain_aggregate_ignores_repeated_values(files, raw):
    # Many patients share a length of stay: that is data, not padding.
    plan = op("group_by", input=P.scan("patients"), keys=[col("diagnosis")], aggs=[fn("mean", col("length_of_stay"))])
    action, _, result = decision(plan, catalog(files, patients=Policy(10, "reject")))
    assert action == "allow"
    assert_frame_equal(result.table.sort("diagnosis"),
                       raw.group_by("diagnosis").agg(pl.col("length_of_stay").mean()).sort("diagnosis"))


def test_a_conditional_aggregate_counts_values_other_than_the_common_one(files, raw):
    flag = when([(binary("gt", col("age"), lit(90)), col("cost"))], lit(7))
    plan = op("select", input=P.scan("patients"), exprs=[fn("sum", flag)])
    distinct = raw.filter((pl.col("age") > 90) & pl.col("cost").is_not_null() & (pl.col("cost") != 7)).height
    assert decision(plan, catalog(files, patients=Policy(distinct, "reject")))[0] == "allow"
    assert decision(plan, catalog(files, patients=Policy(distinct + 1, "reject")))[0] == "reject"


# ------------------------------------------------------------------ dominance
def test_dominance_boundary(files, raw):
    # max_share bounds the largest distance from the group's median, as a share of the total distance.
    plan = op("group_by", input=P.scan("patients"), keys=[col("diagnosis")], aggs=[fn("sum", col("cost"))])
    distance = (pl.col("cost") - pl.col("cost").median()).abs()
    shares = raw.group_by("diagnosis").agg((distance.max() / distance.sum()).alias("s"))
    largest = shares["s"].max()
    assert decision(plan, catalog(files, patients=Policy(10, "reject", max_share=min(1.0, largest + 0.001))))[0] \
        == "allow"
    action, reason, _ = decision(plan, catalog(files, patients=Policy(10, "reject", max_share=largest - 0.001)))
    assert action == "reject" and "dominance" in reason


def dominance_flags(files, plan, exact: bool) -> list[int]:
    """The dominance column of the plan's one aggregate (its last column), per group, measured cheaply or exactly."""
    cat = catalog(files, patients=Policy(10, "reject"))
    cache = engine.DatasetCache()
    accounted = policy.account(validate.validate(plan, cat, dataset_columns=cache.columns), exact_dominance=exact)
    table = engine.run(accounted.plan, cat, cache)
    (column,) = [c for c, (kind, _) in accounted.contribs.items() if kind == "dominated"]
    return table.sort(list(accounted.columns[:-1]))[column].to_list()  # by the group keys


def test_the_dominance_bound_clears_ordinary_groups_and_defers_the_others(files, raw):
    # Ages of a thousand people per group are cleared by the cheap bound; costs (a long tail, smaller
    # groups) are not always, and then the exact measure decides, exactly as it would have alone.
    ages = op("group_by", input=P.scan("patients"), keys=[col("sex")], aggs=[fn("sum", col("age"))])
    assert set(dominance_flags(files, ages, exact=False)) == {0}
    costs = op("group_by", input=P.scan("patients"), keys=[col("diagnosis"), col("sex")],
               aggs=[fn("sum", col("cost"))])
    cheap, exact = dominance_flags(files, costs, exact=False), dominance_flags(files, costs, exact=True)
    assert 2 in cheap and set(exact) <= {0, 1}
    assert all(e == c for c, e in zip(cheap, exact) if c != 2)  # what the bound clears, the exact measure clears
    # The executor runs the exact measure when the bound is unsure: the decision is the exact one.
    action, detail, _ = decision(costs, catalog(files, patients=Policy(10, "reject")))
    assert action == ("reject" if 1 in exact else "allow"), detail


# ------------------------------------------------------------------ suppression
def test_suppression_drops_small_groups_and_counts_them(files, raw):
    plan = op("group_by", input=P.scan("patients"), keys=[col("diagnosis"), col("zip")], aggs=[alias(length(), "n")])
    action, reason, result = decision(plan, catalog(files, patients=Policy(10, "reject", suppress_small_groups=True)))
    sizes = raw.group_by("diagnosis", "zip").len()
    small = sizes.filter(pl.col("len") < 10).height
    assert action == "allow" and isinstance(result, Released)
    assert result.table.height == sizes.height - small and result.table["n"].min() >= 10
    assert result.decision.details["suppressed_groups"] == small
    assert f"{small} group(s) suppressed" in result.decision.detail  # the count is the owner's
    # The scientist's note is the same whether any group was dropped or not.
    assert decide.PUBLIC_TEXTS["suppressed"] in result.notes
    assert not any(str(small) in note for note in result.notes)


def test_suppression_needs_every_source_to_ask_for_it(files):
    joined = op("join", left=P.scan("patients"), right=P.scan("visits"), how="inner", left_on=[col("patient_id")],
                right_on=[col("patient_id")], suffix="_v")
    plan = op("group_by", input=joined, keys=[col("diagnosis"), col("zip")], aggs=[length()])
    cat = catalog(files, patients=Policy(10, "reject", suppress_small_groups=True), visits=Policy(10, "reject"))
    assert decision(plan, cat)[0] == "reject"


# ------------------------------------------------------------------ scientists and limits
def test_overrides_apply_to_their_scientist_only(files):
    plan = op("group_by", input=P.scan("patients"), keys=[col("diagnosis"), col("zip")], aggs=[length()])
    pol = Policy(10, "review", scientists={"bob": {"unsafe": "reject"}, "carol": {"min_group_size": 1}})
    cat = catalog(files, patients=pol)
    assert decision(plan, cat, "alice")[0] == "review"
    assert decision(plan, cat, "bob")[0] == "reject"
    assert decision(plan, cat, "carol")[0] == "allow"


def test_aggregates_only_rejects_row_level_results_even_with_k_of_one(files):
    rows = op("head", input=P.scan("patients"), n=3)
    cat = catalog(files, patients=Policy(1, "log", aggregates_only=True))
    action, reason, _ = decision(rows, cat)
    assert action == "reject" and "only aggregates" in reason


def test_max_rows_released(files):
    plan = op("head", input=P.scan("patients"), n=30)
    cat = catalog(files, patients=Policy(1, "review", max_rows_released=20))
    action, reason, result = decision(plan, cat)
    assert action == "review" and "more than the 20" in reason and isinstance(result, Held)
    assert decision(op("head", input=P.scan("patients"), n=20), cat)[0] == "allow"


# ------------------------------------------------------------------ runtime failures look like refusals
def _accounted(files, plan, pol):
    checked = validate.validate(plan, catalog(files, patients=pol))
    return policy.account(checked)


def test_a_failed_row_level_query_gets_the_static_refusal(files):
    plan = op("select", input=P.scan("patients"), exprs=[col("age")])
    error = BastionError("ExecutionError", "the query failed while running")
    with pytest.raises(BastionError) as caught:
        decide.decide_failed(_accounted(files, plan, Policy(10, "reject")), error)
    with pytest.raises(BastionError) as refusal:
        executor.evaluate(op("head", input=plan, n=3), catalog(files, patients=Policy(10, "reject")), "alice")
    assert caught.value.ename == refusal.value.ename == "PolicyViolation"
    assert caught.value.evalue == refusal.value.evalue


def test_a_failed_aggregate_is_held_or_refused_without_values(files):
    plan = op("group_by", input=P.scan("patients"), keys=[col("sex")], aggs=[fn("mean", col("cost"))])
    error = BastionError("ExecutionError", "the query failed while running")
    held = decide.decide_failed(_accounted(files, plan, Policy(10, "review")), error)
    assert isinstance(held, Held) and held.table.height == 0 and held.decision.action == "review"
    with pytest.raises(BastionError) as caught:
        decide.decide_failed(_accounted(files, plan, Policy(10, "log")), error)
    assert caught.value is error
    with pytest.raises(BastionError) as caught:
        decide.decide_failed(_accounted(files, plan, Policy(10, "reject")), error)
    assert caught.value.ename == "PolicyViolation"


# ------------------------------------------------------------------ inheritance: the strictest combination
def test_saved_results_inherit_the_strictest_combination(files):
    plan = op("filter", input=P.scan("patients"), predicate=binary("gt", col("age"), lit(30)))
    pol = Policy(7, "log", frozenset({"name"}), max_share=0.8, suppress_small_groups=True, max_rows_released=50,
                 query_timeout_seconds=5, scientists={"bob": {"min_group_size": 12, "unsafe": "reject"}})
    table, inherited = executor.prepare_save(plan, catalog(files, patients=pol), scientist="bob")
    assert inherited == Policy(12, "reject", frozenset({"name"}), max_share=0.8, suppress_small_groups=True,
                               max_rows_released=50, query_timeout_seconds=5)
    assert table.height > 0


def test_saving_from_a_person_id_source_keeps_the_person_column(files):
    pol = Policy(5, person_id="patient_id")
    kept = op("filter", input=P.scan("visits"), predicate=binary("gt", col("cost"), lit(100)))
    _, inherited = executor.prepare_save(kept, catalog(files, visits=pol))
    assert inherited.person_id == "patient_id"
    dropped = op("select", input=kept, exprs=[col("zip"), col("cost")])
    with pytest.raises(BastionError) as caught:
        executor.prepare_save(dropped, catalog(files, visits=pol))
    assert caught.value.ename == "PolicyViolation" and "'patient_id'" in caught.value.evalue


# ------------------------------------------------------------------ policy as configuration
@pytest.fixture
def workspace(tmp_path, files) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.init()
    return ws


def test_policy_file_round_trip_with_overrides(workspace, files):
    added = workspace.add_dataset("visits", files["visits"], person_id="patient_id", max_share=0.9,
                                  suppress_small_groups=True, max_rows_released=1000, max_join_rows=10 ** 6,
                                  query_timeout_seconds=30,
                                  scientists={"bob": {"aggregates_only": True, "min_group_size": 20}})
    text = (workspace.datasets_dir / "visits.toml").read_text()
    assert "[scientists.bob]" in text and "person_id = \"patient_id\"" in text
    assert workspace.catalog()["visits"] == added
    assert added.policy.for_scientist("bob").min_group_size == 20
    assert added.policy.for_scientist("alice") == Policy(person_id="patient_id", max_share=0.9,
                                                          suppress_small_groups=True, max_rows_released=1000,
                                                          max_join_rows=10 ** 6, query_timeout_seconds=30)


@pytest.mark.parametrize("snippet, phrase", [
    ('[policy]\nmax_share = 2\n', "max_share must be a number in (0, 1]"),
    ('[policy]\nsuppress_small_groups = "yes"\n', "suppress_small_groups must be true or false"),
    ('[policy]\nmax_rows_released = 0\n', "max_rows_released must be a whole number >= 1"),
    ('[policy]\nquery_timeout_seconds = -1\n', "query_timeout_seconds must be a number > 0"),
    ('[policy]\nmin_group_sise = 3\n', "unknown policy setting 'min_group_sise'"),
    ('[scientists.bob]\nperson_id = "x"\n', "scientists.bob: unknown or not overridable setting 'person_id'"),
    ('[scientists.bob]\nmin_group_size = 0\n', "scientists.bob: min_group_size must be a whole number >= 1"),
])
def test_policy_file_errors_name_the_file_and_the_key(workspace, files, snippet, phrase):
    workspace.add_dataset("patients", files["patients"])
    path = workspace.datasets_dir / "patients.toml"
    text = path.read_text().replace("[policy]\n", "[policy]\n" + snippet.split("\n", 1)[1]) \
        if snippet.startswith("[policy]") else path.read_text() + "\n" + snippet
    path.write_text(text)
    with pytest.raises(WorkspaceError) as caught:
        workspace.catalog()
    assert str(path) in str(caught.value) and phrase in str(caught.value)


def test_cli_dataset_add_flags_and_show(workspace, files):
    added = run_owner(workspace.path, "dataset", "add", "visits", files["visits"], "--person-id", "patient_id",
                      "--suppress-small-groups", "--max-share", "0.75", "--hide", "cost")
    assert added.returncode == 0, added.stderr
    assert "person id patient_id" in added.stdout
    shown = run_owner(workspace.path, "dataset", "show", "visits")
    assert shown.returncode == 0, shown.stderr
    assert 'person_id = "patient_id"' in shown.stdout and "max_share = 0.75" in shown.stdout
    assert "suppress_small_groups = true" in shown.stdout
    bad = run_owner(workspace.path, "dataset", "add", "v2", files["visits"], "--max-share", "1.5")
    assert bad.returncode == 2 and "at most 1" in bad.stderr
    missing = run_owner(workspace.path, "dataset", "show", "nothing")
    assert missing.returncode == 2 and "no dataset 'nothing'" in missing.stderr


@pytest.mark.parametrize("how", ["inner", "left", "full", "cross"])
def test_max_join_rows_is_checked_from_key_counts(files, raw, raw_visits, how):
    left, right = P.scan("patients"), P.scan("visits")
    keys = ([], []) if how == "cross" else ([col("zip")], [col("zip")])
    plan = op("group_by", input=op("join", left=left, right=right, how=how, left_on=keys[0], right_on=keys[1],
                                   suffix="_v"), keys=[col("sex")], aggs=[length()])
    expected = raw.join(raw_visits, how=how, **({} if how == "cross" else {"on": "zip"})).height
    exact = catalog(files, patients=Policy(1, "log", max_join_rows=expected), visits=Policy(1, "log"))
    assert decision(plan, exact)[0] == "allow"
    smaller = catalog(files, patients=Policy(1, "log"), visits=Policy(1, "log", max_join_rows=expected - 1))
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, smaller, "alice")
    assert caught.value.ename == "LimitExceeded" and str(expected) not in caught.value.evalue.replace(
        str(expected - 1), "")
