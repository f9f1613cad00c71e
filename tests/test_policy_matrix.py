"""The release rule, rule x operation, against real polars.

A released row must be computed from at least K rows of every protected source
that fed it.  The counts are checked for exactness at the boundary: with K set
to the smallest true count (computed here in plain polars) the result is
allowed, with K one higher it is not, and the reason names that count.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import decide, executor, policy, validate
from owner_console.model import Dataset, Held, Policy, Released
from owner_console.sample_data import ZIP_CODES, write_patients

pytestmark = pytest.mark.timeout(120)

col, lit, fn, binary, alias, length = P.col, P.lit, P.fn, P.binary, P.alias, P.length
scan = P.scan("patients")
zips_scan = P.scan("zips")


def op(op_name, **fields):
    return P.frame_op(op_name, **fields)


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("policy") / "patients.csv", rows=2000)


@pytest.fixture(scope="module")
def files(tmp_path_factory, patients_csv) -> dict[str, Path]:
    zips = tmp_path_factory.mktemp("policy") / "zips.csv"
    pl.DataFrame({"zip": [int(z) for z in ZIP_CODES],
                  "region": ["north" if i % 3 else "south" for i in range(len(ZIP_CODES))],
                  "population": [1000 + 37 * i for i in range(len(ZIP_CODES))]}).write_csv(zips)
    return {"patients": patients_csv, "zips": zips}


@pytest.fixture(scope="module")
def raw_zips(files) -> pl.DataFrame:
    return pl.read_csv(files["zips"])


@pytest.fixture
def catalog(files):
    """``catalog(patients=Policy(...), zips=Policy(...))``."""
    def make(**policies: Policy) -> dict[str, Dataset]:
        return {name: Dataset(name, files[name], "csv", pol) for name, pol in policies.items()}
    return make


def outcome(plan, catalog) -> tuple[str, object]:
    """(action, result or error) for any outcome, so tests can be parametrized over unsafe modes."""
    try:
        result = executor.evaluate(plan, catalog, "alice")
    except BastionError as error:
        assert error.ename == "PolicyViolation", error.evalue
        return "reject", error
    expected_type = Held if result.decision.action == "review" else Released
    assert isinstance(result, expected_type)
    return result.decision.action, result


def reason_of(thing) -> str:
    return thing.details["detail"] if isinstance(thing, BastionError) else thing.decision.detail


def boundary(plan, catalog, smallest: int, **other_policies: Policy) -> None:
    """Allowed at K = smallest, refused at K = smallest + 1, reason naming the smallest count."""
    action, result = outcome(plan, catalog(patients=Policy(min_group_size=smallest, unsafe="reject"), **other_policies))
    assert action == "allow", reason_of(result)
    assert f"smallest: {smallest}" in result.decision.detail
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=smallest + 1, unsafe="reject"),
                                          **other_policies))
    assert action == "reject"
    assert f"fewer than {smallest + 1} rows of 'patients' (smallest: {smallest})" in error.details["detail"]


def contributors(frame: pl.DataFrame, keys: list[str], column: str) -> int:
    """Smallest number, over groups, of rows whose ``column`` is neither null nor zero (plain polars)."""
    value = pl.col(column)
    return frame.group_by(keys).agg((value.is_not_null() & (value != 0)).sum().alias("c"))["c"].min()


# ---------------------------------------------------------------- exact counts
by_sex_zip = op("group_by", input=scan, keys=[col("sex"), col("zip")], aggs=[fn("mean", col("cost"))])


def test_group_by_counts_are_exact(raw, catalog):
    smallest = raw.group_by("sex", "zip").len()["len"].min()
    boundary(by_sex_zip, catalog, smallest)


def test_filter_then_group_by_counts_only_rows_that_passed_the_filter(raw, catalog):
    plan = op("group_by", input=op("filter", input=scan, predicate=binary("gt", col("age"), lit(60))),
              keys=[col("diagnosis")], aggs=[fn("mean", col("cost"))])
    old = raw.filter(pl.col("age") > 60)
    # The group size and the contribution rule: a null cost does not contribute to mean(cost).
    smallest = min(old.group_by("diagnosis").len()["len"].min(), contributors(old, ["diagnosis"], "cost"))
    boundary(plan, catalog, smallest)


def test_global_aggregate_counts_the_filtered_rows(raw, catalog):
    plan = op("select", input=op("filter", input=scan, predicate=binary("eq", col("diagnosis"), lit("migraine"))),
              exprs=[fn("mean", col("cost"))])
    boundary(plan, catalog, raw.filter(pl.col("diagnosis") == "migraine").height)


def test_self_join_counts_distinct_rows_of_each_occurrence(raw, catalog):
    # Each patient is joined with every patient of the same zip: rows repeat,
    # so the count must be of distinct source rows, not of joined rows.
    joined = op("join", left=op("filter", input=scan, predicate=binary("lt", col("age"), lit(30))),
                right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    plan = op("group_by", input=joined, keys=[col("diagnosis")], aggs=[length()])
    young = raw.filter(pl.col("age") < 30)
    exact = (young.join(raw, on="zip", suffix="_b").group_by("diagnosis")
             .agg(pl.col("patient_id").n_unique().alias("a"), pl.col("patient_id_b").n_unique().alias("b")))
    smallest = min(exact["a"].min(), exact["b"].min())
    boundary(plan, catalog, smallest)
    # Counting joined rows instead would have been far larger than the true count.
    joined_rows = young.join(raw, on="zip").group_by("diagnosis").len()["len"].min()
    assert joined_rows > smallest


def test_join_of_two_datasets_checks_each_source_against_its_own_k(raw, raw_zips, catalog):
    plan = op("group_by", input=op("join", left=scan, right=zips_scan, how="inner", left_on=[col("zip")],
                                   right_on=[col("zip")], suffix="_z"),
              keys=[col("region"), col("sex")], aggs=[fn("mean", col("cost")), fn("sum", col("population"))])
    exact = raw.join(raw_zips, on="zip").group_by("region", "sex").agg(
        pl.col("patient_id").n_unique().alias("p"), pl.col("zip").n_unique().alias("z"))
    smallest_p, smallest_z = exact["p"].min(), exact["z"].min()
    smallest_p = min(smallest_p, contributors(raw.join(raw_zips, on="zip"), ["region", "sex"], "cost"))
    boundary(plan, catalog, smallest_p, zips=Policy(min_group_size=smallest_z))
    # The zips table's own K decides for its rows.
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=1),
                                          zips=Policy(min_group_size=smallest_z + 1, unsafe="reject")))
    assert action == "reject"
    assert f"fewer than {smallest_z + 1} rows of 'zips' (smallest: {smallest_z})" in error.details["detail"]


def test_nested_group_by_sums_counts_of_partitioning_groups(raw, catalog):
    first = op("group_by", input=scan, keys=[col("sex"), col("zip")], aggs=[alias(length(), "n")])
    plan = op("group_by", input=first, keys=[col("sex")], aggs=[alias(fn("sum", col("n")), "total")])
    boundary(plan, catalog, raw.group_by("sex").len()["len"].min())


def test_nested_aggregates_keep_the_contributions_of_the_inner_groups(raw, catalog):
    # max of the per-(sex, zip) means can be one inner mean: the inner groups'
    # contributions count, not only the outer group's size.
    first = op("group_by", input=scan, keys=[col("sex"), col("zip")], aggs=[alias(fn("mean", col("cost")), "m")])
    plan = op("group_by", input=first, keys=[col("sex")], aggs=[alias(fn("max", col("m")), "max_mean")])
    boundary(plan, catalog, contributors(raw, ["sex", "zip"], "cost"))


def test_nested_group_by_after_a_join_is_not_guessed(catalog):
    # After a join the first-level groups may share source rows; summing
    # their counts could overstate, so each first-level row counts as one.
    joined = op("join", left=scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    first = op("group_by", input=joined, keys=[col("sex"), col("sex_b")], aggs=[alias(length(), "n")])
    plan = op("group_by", input=first, keys=[col("sex")], aggs=[alias(fn("sum", col("n")), "total")])
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=3, unsafe="reject")))
    assert action == "reject"
    assert "fewer than 3 rows" in error.details["detail"]


def test_concat_keeps_each_rows_own_counts(raw, catalog):
    women = op("filter", input=scan, predicate=binary("eq", col("sex"), lit("F")))
    men = op("filter", input=scan, predicate=binary("eq", col("sex"), lit("M")))
    plan = op("group_by", input=op("concat", inputs=[women, men]), keys=[col("sex"), col("smoker")],
              aggs=[fn("mean", col("age"))])
    # Each group is made of rows of one input only: the other occurrence did not feed it.
    smallest = min(raw.group_by("sex", "smoker").len()["len"].min(), contributors(raw, ["sex", "smoker"], "age"))
    boundary(plan, catalog, smallest)


def test_counts_survive_sort_head_and_filter_of_aggregates(raw, catalog):
    grouped = op("group_by", input=scan, keys=[col("diagnosis")], aggs=[alias(length(), "n")])
    plan = op("head", input=op("sort", input=op("filter", input=grouped, predicate=binary("gt", col("n"), lit(50))),
                               by=[col("n")], descending=[False], nulls_last=False), n=3)
    sizes = raw.group_by("diagnosis").len().filter(pl.col("len") > 50)
    boundary(plan, catalog, sizes["len"].min())


def test_unique_rows_then_group_by_counts_the_rows_kept(raw, catalog):
    plan = op("group_by", input=op("unique", input=op("select", input=scan, exprs=[col("sex"), col("zip")]),
                                   subset=None),
              keys=[col("sex")], aggs=[length()])
    boundary(plan, catalog, raw.select("sex", "zip").unique().group_by("sex").len()["len"].min())


# ---------------------------------------------------------------- rule x unsafe mode
MODES = ["review", "reject", "log"]

small_groups = op("group_by", input=scan, keys=[col("diagnosis"), col("zip")], aggs=[fn("mean", col("cost"))])
row_level = op("head", input=op("select", input=scan, exprs=[col("age"), col("cost")]), n=5)
first_values = op("group_by", input=scan, keys=[col("sex")], aggs=[fn("first", col("age"))])
implicit_list = op("group_by", input=scan, keys=[col("sex")], aggs=[col("age")])
empty_filtered = op("group_by", input=op("filter", input=scan, predicate=binary("gt", col("age"), lit(500))),
                    keys=[col("sex")], aggs=[length()])
empty_global = op("select", input=op("filter", input=scan, predicate=binary("gt", col("age"), lit(500))),
                  exprs=[fn("mean", col("cost"))])

FAILING = [
    ("small_groups", small_groups, "groups were computed from fewer than 10 rows of 'patients'"),
    ("row_level", row_level, "the result is row-level ("),
    ("first_values", first_values, "individual values of 'patients'"),
    ("implicit_list", implicit_list, "individual values of 'patients'"),
    ("empty_filtered", empty_filtered, "the result is empty"),
    ("empty_global", empty_global, "fewer than 10 rows of 'patients' (smallest: 0)"),
    ("with_row_index", op("with_row_index", input=op("group_by", input=scan, keys=[col("sex")], aggs=[length()]),
                          name="i"), None),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case_id,plan,phrase", FAILING, ids=[f[0] for f in FAILING])
def test_failing_results_follow_the_unsafe_mode(case_id, plan, phrase, mode, catalog):
    action, result = outcome(plan, catalog(patients=Policy(min_group_size=10, unsafe=mode)))
    if case_id == "with_row_index":  # an index on big groups is still an aggregate result
        assert action == "allow"
        return
    assert action == mode
    assert phrase in reason_of(result)  # the owner's detail says what failed
    told = result.evalue if mode == "reject" else result.decision.reason
    # The scientist is told the rules this plan can fail, never which one failed nor a count.
    assert told.endswith(decide.PUBLIC_TEXTS[mode]) and "at least 10" in told
    assert not set(told.replace("10", "")) & set("0123456789"), told
    if mode == "reject":
        # The owner's count of rows stays in the error; the scientist's reply carries only public fields.
        assert isinstance(result.details["rows"], int) and result.details["sources"] == ["patients"]
        assert set(result.body()["details"]) == {"sources", "min_group_size", "action"}
    else:
        assert result.decision.details["sources"] == ["patients"]
        assert not any(c.startswith(validate.RESERVED_PREFIX) for c in result.table.columns)


@pytest.mark.parametrize("mode", MODES)
def test_big_groups_are_allowed_whatever_the_mode(mode, raw, catalog):
    plan = op("group_by", input=scan, keys=[col("sex")], aggs=[fn("mean", col("cost")), length()])
    action, result = outcome(plan, catalog(patients=Policy(min_group_size=10, unsafe=mode)))
    assert action == "allow"
    assert_frame_equal(result.table.sort("sex"), raw.group_by("sex").agg(pl.col("cost").mean(), pl.len()).sort("sex"))
    assert result.decision.details["smallest_count"] == raw.group_by("sex").len()["len"].min()
    assert result.decision.details["failing_rows"] == 0


def test_review_holds_the_table_that_would_be_released(raw, catalog):
    action, held = outcome(small_groups, catalog(patients=Policy(min_group_size=10)))
    assert action == "review"
    expected = raw.group_by("diagnosis", "zip").agg(pl.col("cost").mean())
    assert_frame_equal(held.table.sort("diagnosis", "zip"), expected.sort("diagnosis", "zip"))
    sizes = raw.group_by("diagnosis", "zip").len()["len"]
    failing = int((sizes < 10).sum())
    assert held.decision.details["failing_rows"] == failing
    assert f"{failing} of {sizes.len()} groups" in held.decision.detail
    # A hidden column in the held table is wiped as in a released one.
    action, held = outcome(op("head", input=op("select", input=scan, exprs=[col("name"), col("age")]), n=5),
                           catalog(patients=Policy(min_group_size=10, hidden={"name"})))
    assert action == "review" and held.table["name"].to_list() == ["*"] * 5


def test_k_of_one_releases_rows(raw, catalog):
    action, result = outcome(row_level, catalog(patients=Policy(min_group_size=1, unsafe="reject")))
    assert action == "allow"
    assert_frame_equal(result.table, raw.select("age", "cost").head(5))


def test_the_strictest_unsafe_mode_among_sources_applies(catalog):
    plan = op("join", left=row_level, right=op("select", input=zips_scan, exprs=[col("population")]),
              how="cross", left_on=[], right_on=[], suffix="_z")
    cat = catalog(patients=Policy(min_group_size=5, unsafe="log"), zips=Policy(min_group_size=1, unsafe="reject"))
    action, error = outcome(plan, cat)
    assert action == "reject"
    assert "row-level" in error.details["detail"]


# ---------------------------------------------------------------- joins: missing sides
def test_unmatched_rows_of_an_outer_join_fail_the_rule(raw, raw_zips, catalog):
    # Only half of the zip codes are in the right-hand table: groups of
    # patients whose zip has no partner depend on what zips is missing.
    half = op("filter", input=zips_scan, predicate=binary("lt", col("population"), lit(1000 + 37 * 10)))
    plan = op("group_by", input=op("join", left=scan, right=half, how="left", left_on=[col("zip")],
                                   right_on=[col("zip")], suffix="_z"),
              keys=[col("region")], aggs=[length()])
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=1), zips=Policy(min_group_size=2,
                                                                                           unsafe="reject")))
    assert action == "reject"
    assert "no match in a join" in error.details["detail"]
    # With every zip present on the right, nothing is unmatched and the rule passes.
    full_plan = op("group_by", input=op("join", left=scan, right=zips_scan, how="left", left_on=[col("zip")],
                                        right_on=[col("zip")], suffix="_z"),
                   keys=[col("region")], aggs=[length()])
    smallest_z = raw.join(raw_zips, on="zip").group_by("region").agg(pl.col("zip").n_unique())["zip"].min()
    action, result = outcome(full_plan, catalog(patients=Policy(min_group_size=1),
                                                zips=Policy(min_group_size=smallest_z, unsafe="reject")))
    assert action == "allow", reason_of(result)


def test_anti_join_rows_depend_on_what_is_missing(catalog):
    half = op("filter", input=zips_scan, predicate=binary("lt", col("population"), lit(1000 + 37 * 10)))
    plan = op("group_by", input=op("join", left=scan, right=half, how="anti", left_on=[col("zip")],
                                   right_on=[col("zip")], suffix="_z"),
              keys=[col("sex")], aggs=[length()])
    action, _ = outcome(plan, catalog(patients=Policy(min_group_size=5), zips=Policy(min_group_size=1)))
    assert action == "allow"
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=5), zips=Policy(min_group_size=2,
                                                                                           unsafe="reject")))
    assert action == "reject" and "no match in a join" in error.details["detail"]


def test_semi_join_counts_matching_rows_of_the_right_side(raw, catalog):
    # Each patient row is fed by the zips rows that share its code (one here).
    plan = op("join", left=op("head", input=scan, n=20), right=zips_scan, how="semi",
              left_on=[col("zip")], right_on=[col("zip")], suffix="_z")
    action, result = outcome(plan, catalog(patients=Policy(min_group_size=1), zips=Policy(min_group_size=1)))
    assert action == "allow"
    assert_frame_equal(result.table.sort("patient_id"), raw.head(20).sort("patient_id"))
    action, error = outcome(plan, catalog(patients=Policy(min_group_size=1),
                                          zips=Policy(min_group_size=2, unsafe="reject")))
    assert action == "reject" and "fewer than 2 rows of 'zips' (smallest: 1)" in error.details["detail"]


# ---------------------------------------------------------------- hidden columns
# A hidden column passes through unchanged (selected, renamed, joined on, kept
# through operations on other columns) and comes back as *.
HIDDEN = [
    ("plain", op("select", input=scan, exprs=[col("name"), col("age")]), {"name"}),
    ("renamed", op("rename", input=op("select", input=scan, exprs=[col("name"), col("sex")]),
                   mapping={"name": "who"}), {"who"}),
    ("joined_key", op("join", left=op("select", input=scan, exprs=[col("name"), col("age")]),
                      right=op("select", input=scan, exprs=[col("name"), col("sex")]), how="inner",
                      left_on=[col("name")], right_on=[col("name")], suffix="_b"), {"name"}),
    ("filtered_and_sorted_by_others", op("sort", input=op("filter", input=op("select", input=scan,
                                                                             exprs=[alias(col("name"), "who"),
                                                                                    col("age")]),
                                                       predicate=binary("gt", col("age"), lit(40))),
                                         by=[col("age")], descending=[False], nulls_last=False), {"who"}),
    ("concat", op("concat", inputs=[op("select", input=scan, exprs=[alias(col("name"), "x")]),
                                    op("select", input=scan, exprs=[alias(col("sex"), "x")])]), {"x"}),
]
# Any other use of a hidden column is refused before anything runs.
HIDDEN_REFUSED = [
    ("derived", op("select", input=scan, exprs=[alias(fn("str.to_uppercase", col("name")), "upper"), col("age")]),
     "name", "str.to_uppercase() in a select() expression"),
    ("binary", op("select", input=scan, exprs=[alias(binary("add", col("age"), fn("str.len_chars", col("name"))),
                                                     "x")]),
     "name", "str.len_chars() in a select() expression"),
    ("when", op("select", input=scan, exprs=[alias(P.when([(binary("eq", col("name"), lit("Ada Adams")), lit(1))],
                                                          lit(0)), "flag")]), "name", "eq() in a select() expression"),
    ("group_key", op("group_by", input=scan, keys=[col("name")], aggs=[length()]), "name", "a group_by key"),
    ("min_of_hidden", op("group_by", input=scan, keys=[col("sex")], aggs=[fn("min", col("name"))]), "name",
     "min() in an aggregation"),
    ("list_of_hidden", op("group_by", input=scan, keys=[col("sex")], aggs=[col("name")]), "name", "an aggregation"),
    ("fill_null_from_hidden", op("select", input=scan, exprs=[alias(fn("fill_null", fn("cast", col("smoker"),
                                                                                        dtype="String"),
                                                                       value=col("name")), "s")]),
     "name", "fill_null() in a select() expression"),
    ("count_of_hidden", op("group_by", input=scan, keys=[col("sex")], aggs=[fn("count", col("name"))]), "name",
     "count() in an aggregation"),
    ("n_unique_of_hidden", op("select", input=scan, exprs=[fn("n_unique", col("name"))]), "name",
     "n_unique() in a select() expression"),
    ("is_null_of_hidden", op("select", input=scan, exprs=[fn("sum", fn("is_null", col("name")))]), "name",
     "is_null() in a select() expression"),
    ("filter_on_hidden", op("select", input=op("filter", input=scan, predicate=fn("str.starts_with", col("name"),
                                                                                  prefix="A")),
                            exprs=[col("age")]), "name", "str.starts_with() in a filter predicate"),
    ("hidden_key_not_output", op("select", input=op("group_by", input=scan, keys=[col("name")],
                                                    aggs=[alias(length(), "n")]), exprs=[col("n")]),
     "name", "a group_by key"),
    ("sort_by_hidden", op("select", input=op("sort", input=scan, by=[col("name")], descending=[False],
                                             nulls_last=False), exprs=[col("age")]), "name", "a sort key"),
    ("renamed_then_filtered", op("filter", input=op("rename", input=scan, mapping={"name": "who"}),
                                 predicate=fn("is_null", col("who"))), "who", "is_null() in a filter predicate"),
    ("window_partition", op("select", input=scan, exprs=[fn("over", fn("mean", col("cost")),
                                                            partition_by=[col("name")])]),
     "name", "over() in a select() expression"),
    ("unique_subset", op("unique", input=scan, subset=["name"]), "name", "the subset of unique()"),
    ("unique_every_column", op("select", input=op("unique", input=scan, subset=None), exprs=[length()]), "name",
     "unique() without a subset"),
    ("drop_nulls_every_column", op("select", input=op("drop_nulls", input=scan, subset=None), exprs=[length()]),
     "name", "drop_nulls() without a subset"),
    ("fill_value", op("fill_null", input=op("select", input=scan, exprs=[col("diagnosis"), col("name")]),
                      value=col("name")), "name", "a fill_null value"),
    ("concat_then_used", op("group_by", input=op("concat", inputs=[
        op("select", input=scan, exprs=[alias(col("name"), "x")]),
        op("select", input=scan, exprs=[alias(col("sex"), "x")])]), keys=[col("x")], aggs=[length()]),
     "x", "a group_by key"),
    ("joined_then_used", op("filter", input=op("join", left=op("select", input=scan, exprs=[col("patient_id")]),
                                               right=op("select", input=scan,
                                                        exprs=[alias(col("patient_id"), "pid"), col("name")]),
                                               how="inner", left_on=[col("patient_id")], right_on=[col("pid")],
                                               suffix="_b"),
                            predicate=fn("str.contains", col("name"), pattern="^A")),
     "name", "str.contains() in a filter predicate"),
]


@pytest.mark.parametrize("case_id,plan,wiped", HIDDEN, ids=[h[0] for h in HIDDEN])
def test_hidden_columns_pass_through_and_are_wiped(case_id, plan, wiped, raw, catalog):
    cat = catalog(patients=Policy(min_group_size=1, hidden={"name"}))
    result = executor.evaluate(plan, cat, "alice")
    reference = executor.evaluate(plan, catalog(patients=Policy(min_group_size=1)), "alice").table
    assert result.table.columns == reference.columns
    for column in result.table.columns:
        if column in wiped:
            assert result.table.schema[column] == pl.String
            assert result.table.get_column(column).to_list() == ["*"] * reference.height
            assert any(repr(column) in note and "*" in note for note in result.notes)
        else:
            assert_frame_equal(result.table.select(column).sort(column), reference.select(column).sort(column))
    assert len(result.notes) == len(wiped)
    # The schema a scientist sees before fetching agrees.
    schema = dict(executor.schema_of(plan, cat))
    assert {c for c, t in schema.items() if t == "String" and c in wiped} == wiped


@pytest.mark.parametrize("case_id,plan,column,use", HIDDEN_REFUSED, ids=[h[0] for h in HIDDEN_REFUSED])
def test_any_other_use_of_a_hidden_column_is_refused_before_running(case_id, plan, column, use, catalog):
    cat = catalog(patients=Policy(min_group_size=1, unsafe="log", hidden={"name"}))
    executor.evaluate(plan, catalog(patients=Policy(min_group_size=1, unsafe="log")), "alice")  # valid otherwise
    for entry in (lambda: executor.evaluate(plan, cat, "alice"), lambda: executor.schema_of(plan, cat)):
        with pytest.raises(BastionError) as caught:
            entry()
        assert caught.value.ename == "PolicyViolation"
        assert f"column {column!r}" in caught.value.evalue and use in caught.value.evalue
        assert "hidden columns can only be equality join keys" in caught.value.evalue
        assert caught.value.public_details()["column"] == column
        assert caught.value.public_details()["dataset"] == "patients"


def test_hidden_column_of_one_dataset_does_not_hide_a_same_named_column_of_another(files, tmp_path, catalog):
    # zips has no hidden columns; a column named like a hidden column elsewhere stays visible.
    other = tmp_path / "people.csv"
    pl.DataFrame({"zip": [int(ZIP_CODES[0])], "name": ["visible"]}).write_csv(other)
    cat = {**catalog(patients=Policy(min_group_size=1, hidden={"name"})),
           "people": Dataset("people", other, "csv", Policy(min_group_size=1))}
    result = executor.evaluate(op("select", input=P.scan("people"), exprs=[col("name")]), cat, "alice")
    assert result.table["name"].to_list() == ["visible"]


# ---------------------------------------------------------------- accounting internals
def test_cheap_path_uses_len_and_no_row_ids(files, catalog):
    checked = validate.validate(by_sex_zip, catalog(patients=Policy()))
    accounted = policy.account(checked)
    text = repr(accounted.plan)
    assert "acct_len" in text and "acct_row_id" not in text and "acct_distinct" not in text


def test_joins_count_distinct_row_ids(files, catalog):
    joined = op("join", left=scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    accounted = policy.account(validate.validate(op("group_by", input=joined, keys=[col("sex")], aggs=[length()]),
                                                 catalog(patients=Policy())))
    assert repr(accounted.plan).count("acct_row_id") == 2
    assert len(accounted.sources) == 2


# ---------------------------------------------------------------- save
def test_a_saved_result_inherits_the_policy_and_is_counted_as_a_source(raw, catalog, tmp_path):
    cat = catalog(patients=Policy(min_group_size=5, unsafe="reject", hidden={"name"}),
                  zips=Policy(min_group_size=3, unsafe="log"))
    adults = op("filter", input=scan, predicate=binary("gt", col("age"), lit(70)))
    with pytest.raises(BastionError, match="column 'name' of 'patients' is hidden"):
        executor.prepare_save(op("with_columns", input=adults,
                                 exprs=[alias(fn("str.to_lowercase", col("name")), "lower")]), cat)
    plan = op("with_columns", input=adults, exprs=[alias(col("name"), "copy")])
    table, inherited = executor.prepare_save(plan, cat)
    assert_frame_equal(table, raw.filter(pl.col("age") > 70).with_columns(pl.col("name").alias("copy")))
    assert inherited == Policy(min_group_size=5, unsafe="reject", hidden=frozenset({"name", "copy"}))
    path = tmp_path / "saved.parquet"
    table.write_parquet(path)
    cat["mine"] = Dataset("mine", path, "parquet", inherited)
    saved = {"op": "saved", "name": "mine"}
    result = executor.evaluate(op("select", input=saved, exprs=[fn("sum", col("age")), length()]), cat, "alice")
    assert result.table["age"].item() == raw.filter(pl.col("age") > 70)["age"].sum()
    with pytest.raises(BastionError, match="column 'copy' of 'mine' is hidden"):
        executor.evaluate(op("select", input=saved, exprs=[fn("min", col("copy"))]), cat, "alice")
    with pytest.raises(BastionError, match="row-level"):
        executor.evaluate(op("head", input=saved, n=3), cat, "alice")


def test_saving_is_refused_when_rows_may_repeat_source_rows_or_the_owner_says_no(catalog):
    self_join = op("join", left=scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")],
                   suffix="_b")
    with pytest.raises(BastionError, match="repeat rows of 'patients'") as caught:
        executor.prepare_save(self_join, catalog(patients=Policy()))
    assert caught.value.ename == "PolicyViolation"
    enrich = op("join", left=scan, right=zips_scan, how="inner", left_on=[col("zip")], right_on=[col("zip")],
                suffix="_z")  # many patients share one zips row
    with pytest.raises(BastionError, match="'zips'"):
        executor.prepare_save(enrich, catalog(patients=Policy(), zips=Policy()))
    with pytest.raises(BastionError, match="does not allow saving results derived from 'patients'"):
        executor.prepare_save(by_sex_zip, catalog(patients=Policy(allow_save=False)))


def test_an_aggregate_over_first_values_counts_the_groups_it_came_from(raw, catalog):
    # first() gives one individual per group; a mean over those is computed
    # from as many individuals as there were groups.
    firsts = op("group_by", input=scan, keys=[col("zip")], aggs=[alias(fn("first", col("age")), "a")])
    plan = op("select", input=firsts, exprs=[fn("mean", col("a"))])
    boundary(plan, catalog, raw["zip"].n_unique())


# ---------------------------------------------------------------- joins on a unique right key
def _counts(accounted, catalog, keys):
    """The engine's per-source counts and contribution counts, sorted by the group keys."""
    from owner_console import engine

    table = engine.run(accounted.plan, catalog, engine.DatasetCache())
    accounting = sorted(c for c in table.columns if c not in accounted.columns)
    return table.sort(keys).select(keys + accounting)


@pytest.mark.parametrize("how", ["inner", "left"])
def test_a_unique_right_key_counts_the_left_side_by_len_with_the_same_counts(how, raw, raw_zips, catalog):
    from owner_console import engine

    right = op("filter", input=zips_scan, predicate=binary("gt", col("population"), lit(1100)))
    plan = op("group_by", input=op("join", left=scan, right=right, how=how, left_on=[col("zip")],
                                   right_on=[col("zip")], suffix="_z"),
              keys=[col("region"), col("sex")], aggs=[fn("mean", col("cost")), fn("sum", col("population"))])
    cat = catalog(patients=Policy(min_group_size=5), zips=Policy(min_group_size=2))
    checked = validate.validate(plan, cat)
    cache = engine.DatasetCache()
    assert cache.unique_keys(cat["zips"], ("zip",))
    assert not cache.unique_keys(cat["patients"], ("zip",))
    fast = policy.account(checked, unique_keys=lambda name, keys: cache.unique_keys(cat[name], keys))
    slow = policy.account(checked)
    # Only the right side carries row ids; the left source is counted by len.
    assert repr(fast.plan).count("acct_row_id") == 1 and "acct_unique" in repr(fast.plan)
    assert repr(slow.plan).count("acct_row_id") == 2
    assert fast.reps[0].kind == "count" and not fast.reps[0].repeated
    assert_frame_equal(_counts(fast, cat, ["region", "sex"]), _counts(slow, cat, ["region", "sex"]))
    # And both are the true counts, from plain polars.
    joined = raw.join(raw_zips.filter(pl.col("population") > 1100), on="zip", how=how)
    exact = joined.group_by("region", "sex").len().sort("region", "sex", nulls_last=False)
    got = _counts(fast, cat, ["region", "sex"])
    assert got["__bastion_n0"].to_list() == exact["len"].to_list()
    # Through the executor: the same table as plain polars.
    result = executor.evaluate(plan, cat, "alice")
    expected = joined.group_by("region", "sex").agg(pl.col("cost").mean(), pl.col("population").sum())
    assert_frame_equal(result.table.sort("region", "sex"), expected.sort("region", "sex"), check_dtypes=False)


def test_a_repeated_right_key_keeps_row_ids_on_both_sides(catalog):
    from owner_console import engine

    joined = op("join", left=zips_scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")],
                suffix="_p")
    cat = catalog(patients=Policy(), zips=Policy())
    cache = engine.DatasetCache()
    accounted = policy.account(validate.validate(op("group_by", input=joined, keys=[col("region")],
                                                    aggs=[length()]), cat),
                               unique_keys=lambda name, keys: cache.unique_keys(cat[name], keys))
    assert repr(accounted.plan).count("acct_row_id") == 2 and "acct_unique" not in repr(accounted.plan)


def test_the_engine_refuses_a_unique_key_claim_the_table_does_not_hold(catalog):
    # A file replaced between the policy's question and the run must fail
    # closed, never count a repeated left row once.
    from owner_console import engine

    joined = op("join", left=zips_scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")],
                suffix="_p")
    cat = catalog(patients=Policy(), zips=Policy())
    accounted = policy.account(validate.validate(op("group_by", input=joined, keys=[col("region")],
                                                    aggs=[length()]), cat),
                               unique_keys=lambda name, keys: True)
    with pytest.raises(BastionError) as caught:
        engine.run(accounted.plan, cat, engine.DatasetCache())
    assert caught.value.ename == "ExecutionError" and caught.value.details.get("changed")


def test_the_unique_key_check_follows_the_file_version(tmp_path):
    from owner_console import engine

    path = tmp_path / "lookup.csv"
    pl.DataFrame({"k": [1, 2, 3], "v": ["a", "b", "c"]}).write_csv(path)
    lookup = Dataset("lookup", path, "csv", Policy())
    cache = engine.DatasetCache()
    assert cache.unique_keys(lookup, ("k",)) and cache.unique_keys(lookup, ("v",))
    old = cache.frame(lookup)
    pl.DataFrame({"k": [1, 2, 2, 3], "v": ["a", "b", "b2", "c"]}).write_csv(path)  # replaced by the owner
    assert not cache.unique_keys(lookup, ("k",))
    assert not cache.unique_keys(lookup, ("v",), table=old)  # a claim about a stale table is not honoured
    assert cache.unique_keys(lookup, ("k", "v"))


# ---------------------------------------------------------------- distinct row ids counted in bit words
_small_patients = op("head", input=scan, n=200)  # a bound of 200 rows: four 64-bit words
_BITSET_PLANS = {
    "inner, keys from the right": op("group_by", input=op("join", left=_small_patients, right=zips_scan, how="inner",
                                                          left_on=[col("zip")], right_on=[col("zip")], suffix="_z"),
                                     keys=[col("region")], aggs=[fn("mean", col("cost")), fn("sum", col("population")),
                                                                 length()]),
    "left, repeated right key": op("group_by", input=op("join", left=zips_scan, right=_small_patients, how="left",
                                                        left_on=[col("zip")], right_on=[col("zip")], suffix="_p"),
                                   keys=[col("region"), col("sex")],
                                   aggs=[fn("sum", col("cost")), alias(fn("sum", P.when(
                                       [(binary("gt", col("age"), lit(60)), lit(1))], lit(0))), "old")]),
    "full": op("group_by", input=op("join", left=op("filter", input=_small_patients,
                                                    predicate=binary("lt", col("age"), lit(40))),
                                    right=zips_scan, how="full", left_on=[col("zip")], right_on=[col("zip")],
                                    suffix="_z"),
               keys=[col("region")], aggs=[fn("max", col("age")), fn("sum", col("population"))]),
    # Row ids are given to source rows before an explode repeats them: the bound still holds.
    "explode": op("group_by", input=op("join", left=zips_scan, right=op("explode", input=op(
        "with_columns", input=_small_patients, exprs=[alias(fn("repeat_by", col("age"), by=lit(2)), "ages")]),
        columns=["ages"]), how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_p"),
        keys=[col("region")], aggs=[fn("sum", col("ages")), length()]),
    "global": op("select", input=op("join", left=_small_patients, right=zips_scan, how="inner",
                                    left_on=[col("zip")], right_on=[col("zip")], suffix="_z"),
                 exprs=[fn("sum", col("population")), length()]),
}


@pytest.mark.parametrize("name", sorted(_BITSET_PLANS))
def test_row_ids_counted_in_bit_words_give_the_same_counts_as_hash_sets(name, catalog, monkeypatch):
    from owner_console import engine
    from owner_console.engine import accounting
    from owner_console.engine.compile import Compiler

    plan = _BITSET_PLANS[name]
    cat = catalog(patients=Policy(min_group_size=3), zips=Policy(min_group_size=2))
    accounted = policy.account(validate.validate(plan, cat))
    compiler = Compiler(cat, engine.DatasetCache())
    compiled = compiler.frame(accounted.plan)
    assert compiler.row_words and all(compiler.row_words.values())  # every side's ids counted in words
    assert "n_unique" not in compiled.explain()
    keys = [c for c in accounted.columns if c in ("region", "sex")]

    def counts():
        table = engine.run(accounted.plan, cat, engine.DatasetCache())
        return table.sort(keys, nulls_last=True) if keys else table

    in_words = counts()
    monkeypatch.setattr(accounting, "BITSET_MAX_ROWS", 0)  # every row id through n_unique
    assert_frame_equal(in_words, counts())


def test_row_ids_of_a_large_side_are_counted_in_hash_sets(catalog):
    from owner_console import engine
    from owner_console.engine.compile import Compiler

    cat = catalog(patients=Policy(min_group_size=3), zips=Policy(min_group_size=2))
    joined = op("join", left=zips_scan, right=scan, how="left", left_on=[col("zip")], right_on=[col("zip")],
                suffix="_p")
    compiler = Compiler(cat, engine.DatasetCache())
    compiler.frame(policy.account(validate.validate(op("group_by", input=joined, keys=[col("region")],
                                                       aggs=[length()]), cat)).plan)
    # zips (20 rows): one word; patients (2000 rows): hashed.
    assert {name: len(words) for name, words in compiler.row_words.items()} == {"__bastion_r0": 1,
                                                                               "__bastion_r1": 0}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(left_rows=st.integers(0, 150), right_rows=st.integers(1, 140), how=st.sampled_from(["inner", "left", "full"]),
       seed=st.integers(0, 10_000), group_side=st.sampled_from(["left", "right"]))
def test_bit_word_counts_equal_hash_set_counts_on_random_tables(tmp_path, monkeypatch, left_rows, right_rows, how,
                                                                 seed, group_side):
    from owner_console import engine
    from owner_console.engine import accounting
    from owner_console.engine.compile import Compiler

    def values(n, salt, zeros=True):
        return [None if (i * 7 + seed + salt) % 11 == 0 else ((i * 13 + seed + salt) % 5 if zeros else i + 1)
                for i in range(n)]

    left = pl.DataFrame({"k": [(i * 3 + seed) % 17 for i in range(left_rows)], "g": [i % 3 for i in range(left_rows)],
                         "x": values(left_rows, 1)}, schema={"k": pl.Int64, "g": pl.Int64, "x": pl.Int64})
    right = pl.DataFrame({"k": [(i * 5 + seed) % 23 for i in range(right_rows)],
                          "h": [f"h{i % 4}" for i in range(right_rows)], "y": values(right_rows, 2)},
                         schema={"k": pl.Int64, "h": pl.String, "y": pl.Int64})
    left.write_parquet(tmp_path / "left.parquet")
    right.write_parquet(tmp_path / "right.parquet")
    cat = {name: Dataset(name, tmp_path / f"{name}.parquet", "parquet", Policy(min_group_size=2))
           for name in ("left", "right")}
    joined = op("join", left=P.scan("left"), right=P.scan("right"), how=how, left_on=[col("k")], right_on=[col("k")],
                suffix="_r")
    key = "g" if group_side == "left" else "h"
    plan = op("group_by", input=joined, keys=[col(key)],
              aggs=[fn("sum", col("x")), fn("sum", col("y")), alias(fn("count", col("y")), "n_y"), length()])
    accounted = policy.account(validate.validate(plan, cat))

    def counts():
        return engine.run(accounted.plan, cat, engine.DatasetCache()).sort(key, nulls_last=True)

    compiler = Compiler(cat, engine.DatasetCache())
    assert "n_unique" not in compiler.frame(accounted.plan).explain()  # both sides counted in words
    assert len(compiler.row_words) == 2 and all(compiler.row_words.values())
    in_words = counts()
    with monkeypatch.context() as patched:
        patched.setattr(accounting, "BITSET_MAX_ROWS", 0)
        assert_frame_equal(in_words, counts())
