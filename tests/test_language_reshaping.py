"""The language side of slice, explode, repeat_by, filter, over and the list aggregations:
the cells a scientist types -> the plans the executor gets, their polars text, and SQL OFFSET."""
from __future__ import annotations

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.sql import sql_to_plan
from bastion_kernel.contract.plan_text import plan_to_polars_text
from bastion_kernel.contract.protocol import BastionError
from language_fake_session import PATIENTS_SCHEMA, FakeSession, plan_of

SCAN = P.scan("patients")
col, lit, fn, alias = P.col, P.lit, P.fn, P.alias


@pytest.fixture
def interp():
    interpreter = Interpreter(FakeSession())
    interpreter.run_cell('patients = dataset("patients")')
    return interpreter


CASES = [
    ('patients.slice(10, 5)', P.frame_op("slice", input=SCAN, offset=10, length=5)),
    ('patients.slice(-3)', P.frame_op("slice", input=SCAN, offset=-3, length=None)),
    ('patients.with_columns(col("age").repeat_by(2)).explode("age")',
     P.frame_op("explode", input=P.frame_op("with_columns", input=SCAN,
                                            exprs=[fn("repeat_by", col("age"), by=lit(2))]), columns=["age"])),
    ('patients.with_columns(col("cost").mean().over("diagnosis", "sex").alias("m"))',
     P.frame_op("with_columns", input=SCAN, exprs=[alias(fn("over", fn("mean", col("cost")),
                                                             partition_by=[col("diagnosis"), col("sex")]), "m")])),
    ('patients.with_columns(col("cost").mean().over(["diagnosis"]))',
     P.frame_op("with_columns", input=SCAN, exprs=[fn("over", fn("mean", col("cost")),
                                                      partition_by=[col("diagnosis")])])),
    ('patients.group_by("sex").agg(col("cost").filter(col("smoker")).sum())',
     P.frame_op("group_by", input=SCAN, keys=[col("sex")],
                aggs=[fn("sum", fn("filter", col("cost"), predicate=col("smoker")))])),
    ('patients.group_by("sex").agg(col("age").sort_by("cost", descending=True).first())',
     P.frame_op("group_by", input=SCAN, keys=[col("sex")],
                aggs=[fn("first", fn("sort_by", col("age"), by=col("cost"), descending=True))])),
    ('patients.group_by("sex").agg(col("age").implode(), col("zip").unique(), col("cost").head(3))',
     P.frame_op("group_by", input=SCAN, keys=[col("sex")],
                aggs=[fn("implode", col("age")), fn("unique", col("zip")), fn("head", col("cost"), n=3)])),
]


@pytest.mark.parametrize("code, plan", CASES, ids=[c for c, _ in CASES])
def test_cells_make_plans(interp, code, plan):
    assert plan_of(interp, code) == plan


@pytest.mark.parametrize("code, text", [
    ('patients.slice(10, 5)', 'dataset("patients").slice(10, 5)'),
    ('patients.explode("age")', 'dataset("patients").explode(["age"])'),
    ('patients.select(col("cost").mean().over("diagnosis"))',
     'dataset("patients").select(pl.col("cost").mean().over(["diagnosis"]))'),
    ('patients.group_by("sex").agg(col("cost").filter(col("smoker")).sum())',
     'dataset("patients").group_by("sex").agg(pl.col("cost").filter(pl.col("smoker")).sum())'),
])
def test_polars_text(interp, code, text):
    assert plan_to_polars_text(plan_of(interp, code)) == text


@pytest.mark.parametrize("code", ['patients.slice("a")', 'patients.slice(0, -1)', 'patients.explode()',
                                  'patients.select(col("cost").over())'])
def test_bad_arguments_are_refused(interp, code):
    with pytest.raises(BastionError):
        interp.run_cell(code)


def test_sql_offset_is_a_slice():
    plan = sql_to_plan("SELECT age FROM patients ORDER BY age LIMIT 10 OFFSET 5",
                       {"patients": PATIENTS_SCHEMA})
    assert plan["op"] == "slice" and plan["offset"] == 5 and plan["length"] == 10
