"""Plans shown to people: equivalent polars code and an indented tree."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.plan_text import plan_to_polars_text, plan_tree

pytestmark = pytest.mark.timeout(60)

col, lit, fn, binary, alias = P.col, P.lit, P.fn, P.binary, P.alias
scan = P.scan("patients")


def op(op_name, **fields):
    return P.frame_op(op_name, **fields)


adults = op("filter", input=scan, predicate=binary("ge", col("age"), lit(18)))
by_sex = op("group_by", input=adults, keys=[col("sex")], aggs=[fn("mean", col("cost"))])


def test_design_example():
    assert plan_to_polars_text(by_sex) == \
        'dataset("patients").filter(pl.col("age") >= 18).group_by("sex").agg(pl.col("cost").mean())'


def test_tree_has_one_node_per_line_result_first():
    assert plan_tree(by_sex).splitlines() == [
        'group_by "sex" agg pl.col("cost").mean()',
        '  filter pl.col("age") >= 18',
        '    scan "patients"',
    ]


def test_tree_of_a_join_shows_both_sides():
    joined = op("join", left=adults, right=P.scan("zips"), how="left", left_on=[col("zip")], right_on=[col("code")],
                suffix="_z")
    assert plan_tree(joined).splitlines() == [
        'join how="left" left_on "zip" right_on "code"',
        '  filter pl.col("age") >= 18',
        '    scan "patients"',
        '  scan "zips"',
    ]
    assert plan_to_polars_text(joined) == ('dataset("patients").filter(pl.col("age") >= 18).join(dataset("zips"), '
                                           'left_on="zip", right_on="code", how="left", suffix="_z")')


EXPRESSIONS = [
    (binary("and", binary("ge", col("age"), lit(18)), P.unary("not", fn("is_null", col("cost")))),
     '(pl.col("age") >= 18) & ~pl.col("cost").is_null()'),
    (alias(binary("truediv", fn("sum", col("cost")), P.length()), "avg"), '(pl.col("cost").sum() / pl.len()).alias("avg")'),
    (binary("sub", col("a"), binary("sub", col("b"), lit(1))), 'pl.col("a") - (pl.col("b") - 1)'),
    (binary("sub", binary("sub", col("a"), col("b")), lit(1)), 'pl.col("a") - pl.col("b") - 1'),
    (binary("mul", binary("add", col("a"), lit(1)), lit(2)), '(pl.col("a") + 1) * 2'),
    (binary("pow", binary("pow", col("a"), lit(2)), lit(3)), '(pl.col("a") ** 2) ** 3'),
    (binary("eq", col("sex"), lit("F")), 'pl.col("sex") == "F"'),
    (binary("add", lit(1), lit(2)), 'pl.lit(1) + pl.lit(2)'),
    (P.unary("neg", binary("add", col("a"), lit(-1))), '-(pl.col("a") + -1)'),
    (P.when([(binary("lt", col("age"), lit(18)), lit("child"))], lit("adult")),
     'pl.when(pl.col("age") < 18).then(pl.lit("child")).otherwise(pl.lit("adult"))'),
    (P.when([(col("smoker"), lit(1))], None), 'pl.when(pl.col("smoker")).then(1)'),
    (fn("quantile", col("cost"), quantile=0.9), 'pl.col("cost").quantile(0.9)'),
    (fn("quantile", col("cost"), quantile=0.9, interpolation="linear"),
     'pl.col("cost").quantile(0.9, interpolation="linear")'),
    (fn("cast", col("age"), dtype="Float64"), 'pl.col("age").cast(pl.Float64)'),
    (fn("cast", col("age"), dtype="Int8", strict=False), 'pl.col("age").cast(pl.Int8, strict=False)'),
    (fn("is_in", col("zip"), values=["75001", "75002"]), 'pl.col("zip").is_in(["75001", "75002"])'),
    (fn("is_between", col("age"), lower=lit(20), upper=lit(30)), 'pl.col("age").is_between(20, 30)'),
    (fn("clip", col("age"), lower=0), 'pl.col("age").clip(lower_bound=0)'),
    (fn("str.contains", col("name"), pattern="^A", literal=True), 'pl.col("name").str.contains("^A", literal=True)'),
    (fn("dt.truncate", col("admission_date"), every="1mo"), 'pl.col("admission_date").dt.truncate("1mo")'),
    (fn("fill_null", col("cost"), value=lit(0)), 'pl.col("cost").fill_null(0)'),
    (fn("sum", binary("mul", col("a"), col("b"))), '(pl.col("a") * pl.col("b")).sum()'),
]


@pytest.mark.parametrize("expr,text", EXPRESSIONS, ids=[t for _, t in EXPRESSIONS])
def test_expression_text(expr, text):
    plan = op("select", input=scan, exprs=[expr])
    assert plan_to_polars_text(plan) == f'dataset("patients").select({text})'


FRAMES = [
    (op("sort", input=scan, by=[col("age"), col("cost")], descending=[True, False], nulls_last=True),
     '.sort("age", "cost", descending=[True, False], nulls_last=True)'),
    (op("sort", input=scan, by=[col("age")], descending=[False], nulls_last=False), '.sort("age")'),
    (op("head", input=scan, n=5), ".head(5)"),
    (op("drop", input=scan, columns=["name", "zip"]), '.drop("name", "zip")'),
    (op("rename", input=scan, mapping={"age": "years"}), '.rename({"age": "years"})'),
    (op("drop_nulls", input=scan, subset=None), ".drop_nulls()"),
    (op("unique", input=scan, subset=["sex"]), '.unique(["sex"])'),
    (op("fill_null", input=scan, value=lit("n/a")), '.fill_null("n/a")'),
    (op("with_row_index", input=scan, name="i"), '.with_row_index("i")'),
    (op("with_columns", input=scan, exprs=[alias(fn("dt.year", col("admission_date")), "year")]),
     '.with_columns(pl.col("admission_date").dt.year().alias("year"))'),
    (op("join", left=scan, right=scan, how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_right"),
     '.join(dataset("patients"), on="zip", how="inner")'),
    (op("join", left=scan, right=scan, how="cross", left_on=[], right_on=[], suffix="_right"),
     '.join(dataset("patients"), how="cross")'),
]


@pytest.mark.parametrize("plan,tail", FRAMES, ids=[t for _, t in FRAMES])
def test_frame_text(plan, tail):
    assert plan_to_polars_text(plan) == 'dataset("patients")' + tail


def test_concat_and_saved():
    plan = op("concat", inputs=[scan, {"op": "saved", "name": "adults"}])
    assert plan_to_polars_text(plan) == 'pl.concat([dataset("patients"), saved("adults")])'
    assert plan_tree(plan).splitlines() == ["concat", '  scan "patients"', '  saved "adults"']


@pytest.mark.parametrize("plan", [by_sex] + [p for p, _ in FRAMES] +
                         [op("select", input=scan, exprs=[e]) for e, _ in EXPRESSIONS])
def test_text_is_valid_python(plan):
    ast.parse(plan_to_polars_text(plan), mode="eval")


def test_text_never_imports_polars():
    code = "import sys, bastion_kernel.contract.plan_text; print('polars' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "False"


def test_malformed_plans_render_without_raising():
    assert plan_to_polars_text({"op": "nope"}) == "<nope>"
    assert plan_tree({"op": "filter", "input": [1]}).splitlines()[1].strip() == "<list>"
