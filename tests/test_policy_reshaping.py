"""slice, explode, repeat_by, filter inside aggregations, over, and the list
aggregations (implode, head/tail, unique, sort_by().first()), in process
against real polars.

Under a permissive policy (K = 1) every query releases what the same query in
plain polars gives; under K = 10 the accounting decides: exploding never makes
one source row count as many, a filter inside an aggregation counts only the
rows it keeps, and what cannot be accounted exactly (window values, list
aggregations, sort_by) is row-level.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine, executor
from owner_console.model import Dataset, Policy
from owner_console.sample_data import write_patients

pytestmark = pytest.mark.timeout(120)

col, lit, fn, binary, alias, length = P.col, P.lit, P.fn, P.binary, P.alias, P.length
op, scan = P.frame_op, P.scan
PATIENTS = scan("patients")
K = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshaping")
    patients = write_patients(root / "patients.csv", rows=1000)
    raw = pl.read_csv(patients)
    visits = raw.select("patient_id", "sex", "cost").join(pl.DataFrame({"visit": [1, 2, 3]}), how="cross")
    visits.filter(pl.col("visit") <= pl.col("patient_id") % 3 + 1).write_csv(root / "visits.csv")
    return {"patients": patients, "visits": root / "visits.csv"}


@pytest.fixture(scope="module")
def raw(files) -> pl.DataFrame:
    return pl.read_csv(files["patients"], try_parse_dates=True)


def run(files, plan, k: int = 1, **extra):
    """(action, the owner's detail, released table or None) under a ``reject`` policy with minimum group size ``k``."""
    cat = {"patients": Dataset("patients", files["patients"], "csv", Policy(k, "reject", **extra)),
           "visits": Dataset("visits", files["visits"], "csv", Policy(k, "reject", person_id="patient_id"))}
    try:
        result = executor.evaluate(plan, cat, "alice")
    except BastionError as error:
        assert error.ename == "PolicyViolation", error.evalue
        return "reject", error.details["detail"], None
    return result.decision.action, result.decision.detail, result.table


def same(files, plan, expected: pl.DataFrame, sort_by: list[str] | None = None) -> None:
    action, reason, table = run(files, plan)
    assert action == "allow", reason
    if sort_by:
        table, expected = table.sort(sort_by), expected.sort(sort_by)
    assert_frame_equal(table, expected)


def repeated(frame: dict, column: str, times) -> dict:
    return op("explode", input=op("with_columns", input=frame,
                                  exprs=[fn("repeat_by", col(column), by=lit(times))]), columns=[column])


# ------------------------------------------------------------------ same as polars under K = 1
def test_slice_equals_polars(files, raw):
    plan = op("slice", input=op("sort", input=PATIENTS, by=[col("patient_id")], descending=[False],
                                nulls_last=False), offset=10, length=5)
    same(files, plan, raw.sort("patient_id").slice(10, 5))


def test_slice_with_negative_offset_and_no_length_equals_polars(files, raw):
    plan = op("slice", input=op("sort", input=PATIENTS, by=[col("patient_id")], descending=[False],
                                nulls_last=False), offset=-3, length=None)
    same(files, plan, raw.sort("patient_id").slice(-3))


def test_repeat_by_and_explode_equal_polars(files, raw):
    plan = repeated(op("select", input=PATIENTS, exprs=[col("patient_id"), col("age")]), "age", 3)
    expected = raw.select("patient_id", "age").with_columns(pl.col("age").repeat_by(3)).explode("age")
    same(files, plan, expected)


def test_repeat_by_a_column_equals_polars(files, raw):
    plan = op("explode", input=op("select", input=PATIENTS, exprs=[
        col("patient_id"), alias(fn("repeat_by", col("patient_id"), by=binary("mod", col("patient_id"), lit(3))),
                                 "r")]), columns=["r"])
    expected = raw.select("patient_id", pl.col("patient_id").repeat_by(pl.col("patient_id") % 3).alias("r")) \
        .explode("r")
    same(files, plan, expected)


def test_filter_inside_aggregation_equals_polars(files, raw):
    plan = op("group_by", input=PATIENTS, keys=[col("sex")],
              aggs=[fn("mean", fn("filter", col("cost"), predicate=col("smoker")))])
    same(files, plan, raw.group_by("sex").agg(pl.col("cost").filter(pl.col("smoker")).mean()), ["sex"])


def test_over_equals_polars(files, raw):
    plan = op("with_columns", input=PATIENTS,
              exprs=[alias(fn("over", fn("mean", col("cost")), partition_by=[col("diagnosis")]), "m")])
    same(files, plan, raw.with_columns(pl.col("cost").mean().over("diagnosis").alias("m")))


@pytest.mark.parametrize("name, args, polars_expr", [
    ("implode", {}, pl.col("age").implode()),
    ("head", {"n": 2}, pl.col("age").head(2)),
    ("tail", {"n": 2}, pl.col("age").tail(2)),
])
def test_list_aggregations_equal_polars(files, raw, name, args, polars_expr):
    plan = op("sort", input=op("group_by", input=op("sort", input=PATIENTS, by=[col("patient_id")],
                                                     descending=[False], nulls_last=False),
                               keys=[col("zip")], aggs=[fn(name, col("age"), **args)]),
              by=[col("zip")], descending=[False], nulls_last=False)
    expected = raw.sort("patient_id").group_by("zip").agg(polars_expr).sort("zip")
    same(files, plan, expected)


def test_unique_as_a_list_equals_polars(files, raw):
    plan = op("group_by", input=PATIENTS, keys=[col("sex")], aggs=[fn("unique", col("diagnosis"))])
    action, _, table = run(files, plan)
    expected = raw.group_by("sex").agg(pl.col("diagnosis").unique())
    assert action == "allow"
    got = {r["sex"]: sorted(r["diagnosis"]) for r in table.to_dicts()}
    assert got == {r["sex"]: sorted(r["diagnosis"]) for r in expected.to_dicts()}


def test_sort_by_first_equals_polars(files, raw):
    plan = op("group_by", input=PATIENTS, keys=[col("sex")],
              aggs=[fn("first", fn("sort_by", col("age"), by=col("patient_id"), descending=True))])
    same(files, plan, raw.group_by("sex").agg(pl.col("age").sort_by("patient_id", descending=True).first()),
         ["sex"])


# ------------------------------------------------------------------ the accounting under K = 10
def test_explode_keeps_counting_source_rows(files, raw):
    plan = op("group_by", input=repeated(PATIENTS, "age", 3), keys=[col("sex")], aggs=[length()])
    smallest = raw.group_by("sex").len()["len"].min()
    action, reason, table = run(files, plan, k=smallest)
    assert action == "allow" and f"smallest: {smallest})" in reason
    assert_frame_equal(table.sort("sex"), raw.group_by("sex").agg((pl.len() * 3).alias("len")).sort("sex"),
                       check_dtypes=False)
    assert run(files, plan, k=smallest + 1)[0] == "reject"


def test_repeat_by_inflation_of_one_person_is_refused(files):
    one = op("filter", input=PATIENTS, predicate=binary("eq", col("patient_id"), lit(1)))
    plan = op("group_by", input=repeated(one, "age", 100), keys=[col("sex")], aggs=[fn("mean", col("cost"))])
    action, reason, _ = run(files, plan, k=K)
    assert action == "reject" and "smallest: 1)" in reason


def test_explode_counts_people_with_person_id(files):
    visits = pl.read_csv(files["visits"])
    plan = op("group_by", input=repeated(scan("visits"), "cost", 4), keys=[col("sex")], aggs=[length()])
    people = visits.group_by("sex").agg(pl.col("patient_id").n_unique())["patient_id"].min()
    action, reason, _ = run(files, plan, k=people)
    assert action == "allow" and f"smallest: {people})" in reason


def test_aggregate_after_explode_counts_distinct_contributors(files):
    # An indicator keeps 9 people's cost, repeated 100 times: 900 non-zero values, but 9 contributors.
    nine = P.when([(binary("le", col("patient_id"), lit(9)), col("cost"))], lit(0.0))
    exploded = repeated(op("select", input=PATIENTS, exprs=[col("sex"), alias(nine, "x")]), "x", 100)
    plan = op("select", input=exploded, exprs=[fn("sum", col("x"))])
    action, reason, _ = run(files, plan, k=K)
    assert action == "reject" and "smallest: 9)" in reason


def test_filter_inside_aggregation_counts_only_kept_rows(files, raw):
    target = binary("eq", col("patient_id"), lit(1))
    plan = op("group_by", input=PATIENTS, keys=[col("sex")],
              aggs=[fn("sum", fn("filter", col("cost"), predicate=target))])
    action, reason, _ = run(files, plan, k=K)
    assert action == "reject" and "contributing" in reason


def test_filter_inside_aggregation_contributor_boundary(files, raw):
    # Smokers of each sex with a non-null, non-zero age: the contributors of mean(age.filter(smoker)).
    plan = op("group_by", input=PATIENTS, keys=[col("sex")],
              aggs=[fn("mean", fn("filter", col("patient_id"), predicate=col("smoker")))])
    contributors = raw.filter(pl.col("smoker") & (pl.col("patient_id") != 0)).group_by("sex").len()["len"].min()
    assert run(files, plan, k=contributors)[0] == "allow"
    assert run(files, plan, k=contributors + 1)[0] == "reject"


def test_over_makes_a_later_aggregate_row_level(files, raw):
    windowed = op("with_columns", input=PATIENTS,
                  exprs=[alias(fn("over", fn("mean", col("cost")), partition_by=[col("patient_id")]), "m")])
    plan = op("group_by", input=windowed, keys=[col("sex")], aggs=[fn("max", col("m"))])
    action, reason, _ = run(files, plan, k=K)
    assert action == "reject" and "individual values" in reason


def test_broadcast_first_makes_a_later_aggregate_row_level(files):
    broadcast = op("with_columns", input=PATIENTS, exprs=[alias(fn("first", col("age")), "f")])
    plan = op("group_by", input=broadcast, keys=[col("sex")], aggs=[fn("max", col("f"))])
    assert run(files, plan, k=K)[0] == "reject"


@pytest.mark.parametrize("agg", [
    fn("implode", col("age")),
    fn("head", col("age"), n=1),
    fn("tail", col("age"), n=1),
    fn("unique", col("age")),
    fn("first", fn("sort_by", col("age"), by=col("cost"), descending=True)),
    fn("sum", fn("sort_by", col("age"), by=col("cost"))),
], ids=["implode", "head", "tail", "unique", "sort_by_first", "sum_of_sort_by"])
def test_list_aggregations_are_row_level(files, agg):
    plan = op("group_by", input=PATIENTS, keys=[col("sex")], aggs=[agg])
    action, reason, _ = run(files, plan, k=K)
    assert action == "reject" and "individual values" in reason


def test_slice_is_row_level(files):
    assert run(files, op("slice", input=PATIENTS, offset=3, length=1), k=K)[0] == "reject"


@pytest.mark.parametrize("expr", [
    fn("filter", col("cost"), predicate=col("smoker")),
    fn("head", col("cost"), n=3),
    fn("sort_by", col("cost"), by=col("age")),
    fn("unique", col("cost")),
], ids=["filter", "head", "sort_by", "unique"])
def test_reshaping_outside_an_aggregation_is_refused(files, expr):
    with pytest.raises(BastionError) as caught:
        executor.evaluate(op("with_columns", input=PATIENTS, exprs=[alias(expr, "x")]),
                          {"patients": Dataset("patients", files["patients"], "csv", Policy(1, "log"))}, "alice")
    assert caught.value.ename == "UnsupportedOperation"


def test_repeat_by_count_is_capped_and_never_fails(files, raw):
    plan = op("select", input=op("filter", input=PATIENTS, predicate=binary("le", col("patient_id"), lit(2))),
              exprs=[alias(fn("repeat_by", col("age"), by=lit(-5)), "none"),
                     alias(fn("repeat_by", col("age"), by=lit(10 ** 9)), "capped")])
    action, _, table = run(files, plan)
    assert action == "allow"
    assert table["none"].list.len().to_list() == [0, 0]
    assert table["capped"].list.len().to_list() == [engine.MAX_REPEAT, engine.MAX_REPEAT]
