"""The executor's core against real polars: every frame op, many functions, hostile plans.

Each released table is compared with the same query written in plain polars
on the same file, so expected results are computed, never hard-coded.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine, executor, validate
from owner_console.model import Dataset, Policy, Released
from owner_console.sample_data import write_patients

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("data") / "patients.csv", rows=3000)


@pytest.fixture(scope="module")
def open_catalog(patients_csv) -> dict[str, Dataset]:
    """K = 1 and reject: everything is released, and a policy failure would raise instead of passing quietly."""
    return {"patients": Dataset("patients", patients_csv, "csv", Policy(min_group_size=1, unsafe="reject"))}


scan = P.scan("patients")
col, lit, fn, binary, alias = P.col, P.lit, P.fn, P.binary, P.alias


def op(op_name, **fields):
    return P.frame_op(op_name, **fields)


def adults():
    return op("filter", input=scan, predicate=binary("ge", col("age"), lit(18)))


# (id, plan, plain polars query on the LazyFrame, columns to sort by before comparing or None)
Case = tuple[str, dict, Callable[[pl.LazyFrame], pl.LazyFrame], "list[str] | None"]

FRAME_CASES: list[Case] = [
    ("scan", scan, lambda lf: lf, None),
    ("filter", adults(), lambda lf: lf.filter(pl.col("age") >= 18), None),
    ("select", op("select", input=scan, exprs=[col("age"), alias(binary("mul", col("cost"), lit(2)), "double")]),
     lambda lf: lf.select(pl.col("age"), (pl.col("cost") * 2).alias("double")), None),
    ("with_columns", op("with_columns", input=scan, exprs=[alias(binary("add", col("age"), lit(1)), "age"),
                                                          alias(fn("dt.year", col("admission_date")), "year")]),
     lambda lf: lf.with_columns((pl.col("age") + 1).alias("age"), pl.col("admission_date").dt.year().alias("year")),
     None),
    ("group_by", op("group_by", input=adults(), keys=[col("sex"), col("diagnosis")],
                    aggs=[fn("mean", col("cost")), P.length(), alias(fn("max", col("age")), "oldest")]),
     lambda lf: lf.filter(pl.col("age") >= 18).group_by("sex", "diagnosis").agg(
         pl.col("cost").mean(), pl.len(), pl.col("age").max().alias("oldest")), ["sex", "diagnosis"]),
    ("group_by_expr_key", op("group_by", input=scan, keys=[alias(fn("dt.month", col("admission_date")), "m")],
                             aggs=[fn("sum", col("length_of_stay"))]),
     lambda lf: lf.group_by(pl.col("admission_date").dt.month().alias("m")).agg(pl.col("length_of_stay").sum()),
     ["m"]),
    ("sort", op("sort", input=scan, by=[col("age"), col("patient_id")], descending=[True, False], nulls_last=True),
     lambda lf: lf.sort(["age", "patient_id"], descending=[True, False], nulls_last=True), None),
    ("head", op("head", input=op("sort", input=scan, by=[col("cost")], descending=[False], nulls_last=True), n=7),
     lambda lf: lf.sort("cost", nulls_last=True).head(7), None),
    ("drop", op("drop", input=scan, columns=["name", "zip"]), lambda lf: lf.drop("name", "zip"), None),
    ("rename", op("rename", input=scan, mapping={"age": "years", "sex": "gender"}),
     lambda lf: lf.rename({"age": "years", "sex": "gender"}), None),
    ("drop_nulls", op("drop_nulls", input=scan, subset=None), lambda lf: lf.drop_nulls(), None),
    ("drop_nulls_subset", op("drop_nulls", input=scan, subset=["cost"]), lambda lf: lf.drop_nulls(["cost"]), None),
    ("fill_null_int", op("fill_null", input=scan, value=lit(0)), lambda lf: lf.fill_null(0), None),
    ("fill_null_bool", op("fill_null", input=scan, value=lit(False)), lambda lf: lf.fill_null(False), None),
    ("fill_null_expr", op("fill_null", input=op("select", input=scan, exprs=[col("cost"), col("length_of_stay")]),
                          value=binary("mul", col("length_of_stay"), lit(100))),
     lambda lf: lf.select("cost", "length_of_stay").fill_null(pl.col("length_of_stay") * 100), None),
    ("unique", op("unique", input=op("select", input=scan, exprs=[col("sex"), col("zip")]), subset=None),
     lambda lf: lf.select("sex", "zip").unique(), ["sex", "zip"]),
    ("unique_subset", op("select", input=op("unique", input=scan, subset=["diagnosis"]), exprs=[col("diagnosis")]),
     lambda lf: lf.unique(subset=["diagnosis"]).select("diagnosis"), ["diagnosis"]),
    ("with_row_index", op("with_row_index", input=scan, name="i"), lambda lf: lf.with_row_index("i"), None),
    ("concat", op("concat", inputs=[op("filter", input=scan, predicate=binary("eq", col("sex"), lit("F"))),
                                    op("filter", input=scan, predicate=binary("gt", col("age"), lit(80)))]),
     lambda lf: pl.concat([lf.filter(pl.col("sex") == "F"), lf.filter(pl.col("age") > 80)]), ["patient_id"]),
    ("concat_then_group_by",
     op("group_by", input=op("concat", inputs=[op("filter", input=scan, predicate=binary("eq", col("sex"), lit("F"))),
                                               op("filter", input=scan, predicate=binary("eq", col("sex"), lit("M")))]),
        keys=[col("sex")], aggs=[P.length(), fn("mean", col("age"))]),
     lambda lf: pl.concat([lf.filter(pl.col("sex") == "F"), lf.filter(pl.col("sex") == "M")])
     .group_by("sex").agg(pl.len(), pl.col("age").mean()), ["sex"]),
    ("global_aggregate", op("select", input=scan, exprs=[fn("mean", col("cost")), alias(P.length(), "n"),
                                                         alias(binary("truediv", fn("sum", col("cost")), P.length()),
                                                               "per_row")]),
     lambda lf: lf.select(pl.col("cost").mean(), pl.len().alias("n"), (pl.col("cost").sum() / pl.len()).alias("per_row")),
     None),
    ("nested_group_by",
     op("group_by", input=op("group_by", input=scan, keys=[col("sex"), col("zip")], aggs=[alias(P.length(), "n")]),
        keys=[col("sex")], aggs=[alias(fn("sum", col("n")), "total"), alias(fn("mean", col("n")), "mean_n")]),
     lambda lf: lf.group_by("sex", "zip").agg(pl.len().alias("n")).group_by("sex").agg(
         pl.col("n").sum().alias("total"), pl.col("n").mean().alias("mean_n")), ["sex"]),
]

# Small frames for joins, so cross joins stay small.
small_left = op("select", input=op("head", input=scan, n=40), exprs=[col("patient_id"), col("zip"), col("age")])
small_right = op("select", input=op("filter", input=scan, predicate=binary("lt", col("patient_id"), lit(60))),
                 exprs=[col("patient_id"), col("zip"), col("cost")])


def _small_left(lf):
    return lf.head(40).select("patient_id", "zip", "age")


def _small_right(lf):
    return lf.filter(pl.col("patient_id") < 60).select("patient_id", "zip", "cost")


JOIN_CASES: list[Case] = [
    (f"join_{how}_{label}",
     op("join", left=small_left, right=small_right, how=how, left_on=[col(lk)], right_on=[col(rk)], suffix="_r"),
     (lambda how, lk, rk: lambda lf: _small_left(lf).join(_small_right(lf), left_on=lk, right_on=rk, how=how,
                                                        suffix="_r"))(how, lk, rk),
     None)
    for how in ("inner", "left", "full", "semi", "anti")
    for label, lk, rk in (("same_key", "zip", "zip"), ("other_key", "patient_id", "patient_id"))
] + [
    (f"join_{how}_different_names",
     op("join", left=small_left, right=small_right, how=how, left_on=[col("age")], right_on=[col("patient_id")],
        suffix="_r"),
     (lambda how: lambda lf: _small_left(lf).join(_small_right(lf), left_on="age", right_on="patient_id", how=how,
                                                  suffix="_r"))(how),
     None)
    for how in ("inner", "left", "full", "semi", "anti")
] + [
    ("join_two_keys", op("join", left=small_left, right=small_right, how="inner",
                         left_on=[col("zip"), col("patient_id")], right_on=[col("zip"), col("patient_id")],
                         suffix="_r"),
     lambda lf: _small_left(lf).join(_small_right(lf), on=["zip", "patient_id"], suffix="_r"), None),
    ("join_cross", op("join", left=op("head", input=small_left, n=5), right=op("head", input=small_right, n=4),
                      how="cross", left_on=[], right_on=[], suffix="_right"),
     lambda lf: _small_left(lf).head(5).join(_small_right(lf).head(4), how="cross"), None),
    ("join_then_group_by",
     op("group_by", input=op("join", left=scan, right=scan, how="inner", left_on=[col("zip")],
                             right_on=[col("zip")], suffix="_other"),
        keys=[col("sex")], aggs=[P.length(), fn("n_unique", col("patient_id_other"))]),
     lambda lf: lf.join(lf, on="zip", suffix="_other").group_by("sex").agg(pl.len(), pl.col("patient_id_other").n_unique()),
     ["sex"]),
]


def _cost(name, **args):
    return alias(fn(name, col("cost"), **args), name.replace(".", "_"))


FUNCTION_AGG_CASES: list[Case] = [
    (f"agg_{name}", op("group_by", input=scan, keys=[col("diagnosis")], aggs=[_cost(name, **args)]),
     (lambda expr, name: lambda lf: lf.group_by("diagnosis").agg(expr.alias(name.replace(".", "_"))))(expr, name),
     ["diagnosis"])
    for name, args, expr in [
        ("sum", {}, pl.col("cost").sum()), ("mean", {}, pl.col("cost").mean()),
        ("median", {}, pl.col("cost").median()), ("min", {}, pl.col("cost").min()),
        ("max", {}, pl.col("cost").max()), ("std", {}, pl.col("cost").std()),
        ("var", {"ddof": 0}, pl.col("cost").var(ddof=0)),
        ("quantile", {"quantile": 0.9, "interpolation": "linear"}, pl.col("cost").quantile(0.9, "linear")),
        ("count", {}, pl.col("cost").count()), ("len", {}, pl.col("cost").len()),
        ("n_unique", {}, pl.col("cost").n_unique()), ("null_count", {}, pl.col("cost").null_count()),
        ("first", {}, pl.col("cost").first()), ("last", {}, pl.col("cost").last()),
    ]
]

ELEMENTWISE: list[tuple[str, dict, pl.Expr]] = [
    ("is_null", fn("is_null", col("cost")), pl.col("cost").is_null()),
    ("is_not_null", fn("is_not_null", col("smoker")), pl.col("smoker").is_not_null()),
    ("is_in", fn("is_in", col("zip"), values=[75001, 75002]), pl.col("zip").is_in([75001, 75002])),
    ("is_between", fn("is_between", col("age"), lower=lit(20), upper=lit(30), closed="left"),
     pl.col("age").is_between(20, 30, closed="left")),
    ("fill_null", fn("fill_null", col("cost"), value=lit(-1.0)), pl.col("cost").fill_null(-1.0)),
    ("cast", fn("cast", col("age"), dtype="Float32"), pl.col("age").cast(pl.Float32)),
    ("cast_str", fn("cast", col("age"), dtype="String"), pl.col("age").cast(pl.String)),
    ("round", fn("round", col("cost"), decimals=1), pl.col("cost").round(1)),
    ("abs", fn("abs", binary("sub", col("age"), lit(50))), (pl.col("age") - 50).abs()),
    ("clip", fn("clip", col("age"), lower=10, upper=90), pl.col("age").clip(10, 90)),
    ("log", fn("log", col("cost"), base=10), pl.col("cost").log(10)),
    ("exp", fn("exp", binary("truediv", col("age"), lit(100))), (pl.col("age") / 100).exp()),
    ("sqrt", fn("sqrt", col("cost")), pl.col("cost").sqrt()),
    ("pow", fn("pow", col("age"), exponent=lit(2)), pl.col("age").pow(2)),
    ("str.len_chars", fn("str.len_chars", col("name")), pl.col("name").str.len_chars()),
    ("str.to_lowercase", fn("str.to_lowercase", col("name")), pl.col("name").str.to_lowercase()),
    ("str.to_uppercase", fn("str.to_uppercase", col("diagnosis")), pl.col("diagnosis").str.to_uppercase()),
    ("str.contains", fn("str.contains", col("diagnosis"), pattern="^d"), pl.col("diagnosis").str.contains("^d")),
    ("str.starts_with", fn("str.starts_with", col("name"), prefix="A"), pl.col("name").str.starts_with("A")),
    ("str.ends_with", fn("str.ends_with", col("name"), suffix="s"), pl.col("name").str.ends_with("s")),
    ("str.slice", fn("str.slice", col("name"), offset=1, length=3), pl.col("name").str.slice(1, 3)),
    ("str.replace", fn("str.replace", col("diagnosis"), pattern=" ", value="_", literal=True),
     pl.col("diagnosis").str.replace(" ", "_", literal=True)),
    ("str.strip_chars", fn("str.strip_chars", col("name"), characters="AZ"), pl.col("name").str.strip_chars("AZ")),
    ("str.to_date", fn("str.to_date", fn("dt.strftime", col("admission_date"), format="%d/%m/%Y"), format="%d/%m/%Y"),
     pl.col("admission_date").dt.strftime("%d/%m/%Y").str.to_date("%d/%m/%Y")),
    ("str.to_datetime", fn("str.to_datetime", fn("dt.strftime", col("admission_date"), format="%Y-%m-%d 10:00"),
                           format="%Y-%m-%d %H:%M"),
     pl.col("admission_date").dt.strftime("%Y-%m-%d 10:00").str.to_datetime("%Y-%m-%d %H:%M")),
    ("dt.year", fn("dt.year", col("admission_date")), pl.col("admission_date").dt.year()),
    ("dt.month", fn("dt.month", col("admission_date")), pl.col("admission_date").dt.month()),
    ("dt.day", fn("dt.day", col("admission_date")), pl.col("admission_date").dt.day()),
    ("dt.weekday", fn("dt.weekday", col("admission_date")), pl.col("admission_date").dt.weekday()),
    ("dt.hour", fn("dt.hour", fn("cast", col("admission_date"), dtype="Datetime")),
     pl.col("admission_date").cast(pl.Datetime).dt.hour()),
    ("dt.truncate", fn("dt.truncate", col("admission_date"), every="1mo"), pl.col("admission_date").dt.truncate("1mo")),
    ("when", P.when([(binary("lt", col("age"), lit(18)), lit("child")),
                     (binary("lt", col("age"), lit(65)), lit("adult"))], lit("senior")),
     pl.when(pl.col("age") < 18).then(pl.lit("child")).when(pl.col("age") < 65).then(pl.lit("adult"))
     .otherwise(pl.lit("senior"))),
    ("when_no_otherwise", P.when([(binary("gt", col("cost"), lit(10000)), lit(1))], None),
     pl.when(pl.col("cost") > 10000).then(pl.lit(1))),
    ("not", P.unary("not", col("smoker")), ~pl.col("smoker")),
    ("neg", P.unary("neg", col("age")), -pl.col("age")),
] + [
    (f"binary_{name}", binary(name, col("length_of_stay"), lit(3)), expr)
    for name, expr in [("add", pl.col("length_of_stay") + 3), ("sub", pl.col("length_of_stay") - 3),
                       ("mul", pl.col("length_of_stay") * 3), ("truediv", pl.col("length_of_stay") / 3),
                       ("floordiv", pl.col("length_of_stay") // 3), ("mod", pl.col("length_of_stay") % 3),
                       ("pow", pl.col("length_of_stay") ** 3), ("eq", pl.col("length_of_stay") == 3),
                       ("ne", pl.col("length_of_stay") != 3), ("lt", pl.col("length_of_stay") < 3),
                       ("le", pl.col("length_of_stay") <= 3), ("gt", pl.col("length_of_stay") > 3),
                       ("ge", pl.col("length_of_stay") >= 3)]
] + [
    (f"logic_{name}", binary(name, binary("gt", col("age"), lit(40)), col("smoker")), expr)
    for name, expr in [("and", (pl.col("age") > 40) & pl.col("smoker")),
                       ("or", (pl.col("age") > 40) | pl.col("smoker")),
                       ("xor", (pl.col("age") > 40) ^ pl.col("smoker"))]
]

ELEMENTWISE_CASES: list[Case] = [
    (f"fn_{name}", op("select", input=scan, exprs=[col("patient_id"), alias(plan_expr, "out")]),
     (lambda expr: lambda lf: lf.select(pl.col("patient_id"), expr.alias("out")))(expr), None)
    for name, plan_expr, expr in ELEMENTWISE
]

ALL_CASES = FRAME_CASES + JOIN_CASES + FUNCTION_AGG_CASES + ELEMENTWISE_CASES


@pytest.mark.parametrize("case_id,plan,query,sort_by", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_released_table_equals_plain_polars(case_id, plan, query, sort_by, open_catalog, raw):
    result = executor.evaluate(plan, open_catalog, "alice")
    assert isinstance(result, Released)
    assert result.decision.action == "allow"
    expected = query(raw.lazy()).collect()
    table = result.table
    if sort_by is None and case_id.startswith("join"):
        sort_by = list(expected.columns)  # join output order is not defined
    if sort_by:
        table, expected = table.sort(sort_by, nulls_last=True), expected.sort(sort_by, nulls_last=True)
    assert_frame_equal(table, expected)


@pytest.mark.parametrize("case_id,plan,query,sort_by", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_schema_of_matches_plain_polars(case_id, plan, query, sort_by, open_catalog, raw):
    expected = query(raw.lazy()).collect_schema()
    assert executor.schema_of(plan, open_catalog) == [(n, str(t)) for n, t in expected.items()]


def test_plan_survives_a_json_round_trip(open_catalog, raw):
    plan = json.loads(P.canonical_json(FRAME_CASES[4][1]))
    result = executor.evaluate(plan, open_catalog, "alice")
    expected = FRAME_CASES[4][2](raw.lazy()).collect()
    assert_frame_equal(result.table.sort("sex", "diagnosis"), expected.sort("sex", "diagnosis"))


def test_table_to_ipc_round_trips(open_catalog, raw):
    result = executor.evaluate(FRAME_CASES[4][1], open_catalog, "alice")
    data = executor.table_to_ipc(result.table)
    assert data[:6] == b"ARROW1"  # the file format, not the stream format
    assert_frame_equal(pl.read_ipc(data), result.table)


def test_validate_does_not_keep_references_to_the_callers_plan(open_catalog):
    plan = json.loads(json.dumps(adults()))
    checked = validate.validate(plan, open_catalog)
    plan["predicate"]["right"]["value"] = 99
    assert checked.root["predicate"]["right"]["value"] == 18


# ---------------------------------------------------------------- hostile plans
def _deep_filter(depth: int) -> dict:
    node = scan
    for _ in range(depth):
        node = op("filter", input=node, predicate=lit(True))
    return node


def _deep_expr(depth: int) -> dict:
    expr = col("age")
    for _ in range(depth):
        expr = binary("add", expr, lit(1))
    return op("select", input=scan, exprs=[expr])


HOSTILE: list[tuple[str, object, str, list[str]]] = [
    ("unknown_op", {"op": "read_csv", "path": "/etc/passwd"}, "UnsupportedOperation", ["read_csv"]),
    ("unknown_expr_kind", op("select", input=scan, exprs=[{"expr": "python", "code": "1"}]),
     "UnsupportedOperation", ["python"]),
    ("unknown_function", op("select", input=scan, exprs=[{"expr": "fn", "name": "map_elements", "input": col("age"),
                                                         "args": {}}]),
     "UnsupportedOperation", ["map_elements"]),
    ("dunder_function", op("select", input=scan, exprs=[{"expr": "fn", "name": "__class__", "input": col("age"),
                                                        "args": {}}]),
     "UnsupportedOperation", ["__class__"]),
    ("unknown_parameter", op("select", input=scan, exprs=[{"expr": "fn", "name": "round", "input": col("cost"),
                                                          "args": {"decimals": 1, "mode": "x"}}]),
     "UnsupportedOperation", ["mode"]),
    ("missing_parameter", op("select", input=scan, exprs=[{"expr": "fn", "name": "round", "input": col("cost"),
                                                          "args": {}}]),
     "UnsupportedOperation", ["decimals"]),
    ("extra_field_on_op", {**op("head", input=scan, n=3), "path": "x"}, "UnsupportedOperation", ["path"]),
    ("extra_field_on_expr", op("select", input=scan, exprs=[{"expr": "col", "name": "age", "extra": 1}]),
     "UnsupportedOperation", ["extra"]),
    ("missing_field", {"op": "head", "input": scan}, "UnsupportedOperation", ["'n'"]),
    ("bool_where_int", op("head", input=scan, n=True), "SchemaError", ["whole number"]),
    ("string_where_int", op("head", input=scan, n="5"), "SchemaError", ["whole number"]),
    ("float_where_int", op("select", input=scan, exprs=[fn("round", col("cost"), decimals=1.5)]), "SchemaError",
     ["whole number"]),
    ("huge_head", op("head", input=scan, n=10 ** 30), "LimitExceeded", ["whole number"]),
    ("huge_int_literal", op("filter", input=scan, predicate=binary("gt", col("age"), lit(2 ** 70))),
     "LimitExceeded", ["64 bits"]),
    ("nan_literal", op("filter", input=scan, predicate=binary("gt", col("age"), lit(float("nan")))),
     "SchemaError", ["NaN"]),
    ("infinite_parameter", op("select", input=scan, exprs=[fn("log", col("cost"), base=float("inf"))]),
     "SchemaError", ["finite"]),
    ("object_literal", op("filter", input=scan, predicate=binary("gt", col("age"), {"expr": "lit", "value": {"a": 1}})),
     "SchemaError", ["literal"]),
    ("unknown_binary_op", op("filter", input=scan, predicate={"expr": "binary", "op": "matmul", "left": col("age"),
                                                               "right": lit(1)}),
     "UnsupportedOperation", ["matmul"]),
    ("unknown_dtype", op("select", input=scan, exprs=[fn("cast", col("age"), dtype="Object")]),
     "UnsupportedOperation", ["Object"]),
    ("unknown_join_how", op("join", left=scan, right=scan, how="asof", left_on=[col("age")], right_on=[col("age")],
                            suffix="_r"), "UnsupportedOperation", ["asof"]),
    ("join_on_expression", op("join", left=scan, right=scan, how="inner",
                              left_on=[binary("add", col("age"), lit(1))], right_on=[col("age")], suffix="_r"),
     "UnsupportedOperation", ["join keys"]),
    ("bad_interval", op("select", input=scan, exprs=[fn("dt.truncate", col("admission_date"), every="1 fortnight")]),
     "SchemaError", ["duration"]),
    ("bad_interpolation", op("select", input=scan, exprs=[fn("quantile", col("cost"), quantile=0.5,
                                                             interpolation="cubic")]), "SchemaError", ["interpolation"]),
    ("quantile_out_of_range", op("select", input=scan, exprs=[fn("quantile", col("cost"), quantile=2)]),
     "LimitExceeded", ["quantile"]),
    ("deep_frames", _deep_filter(P.MAX_PLAN_DEPTH + 5), "LimitExceeded", ["deeper"]),
    ("deep_expression", _deep_expr(P.MAX_PLAN_DEPTH + 5), "LimitExceeded", ["deeper"]),
    ("too_many_nodes", op("select", input=scan, exprs=[col("age")] * (P.MAX_PLAN_NODES + 1)),
     "LimitExceeded", ["nodes"]),
    ("long_name", op("select", input=scan, exprs=[alias(col("age"), "x" * (P.MAX_NAME_LENGTH + 1))]),
     "LimitExceeded", ["longer"]),
    ("reserved_column", op("select", input=scan, exprs=[col("__bastion_r0")]), "SchemaError", ["reserved"]),
    ("reserved_alias", op("select", input=scan, exprs=[alias(P.length(), "__bastion_n0")]), "SchemaError",
     ["reserved"]),
    ("reserved_rename", op("rename", input=scan, mapping={"age": "__bastion_x"}), "SchemaError", ["reserved"]),
    ("reserved_row_index", op("with_row_index", input=scan, name="__bastion_r0"), "SchemaError", ["reserved"]),
    ("path_as_dataset", P.scan("../../etc/passwd"), "SchemaError", ["unknown dataset", "'patients'"]),
    ("unknown_column", op("select", input=scan, exprs=[col("salary")]), "SchemaError",
     ["unknown column 'salary'", "'age'", "'cost'"]),
    ("column_gone_after_select", op("filter", input=op("select", input=scan, exprs=[col("age")]),
                                    predicate=binary("eq", col("sex"), lit("F"))), "SchemaError",
     ["unknown column 'sex'"]),
    ("duplicate_output", op("select", input=scan, exprs=[col("age"), col("age")]), "SchemaError", ["twice"]),
    ("empty_select", op("select", input=scan, exprs=[]), "SchemaError", ["at least one"]),
    ("concat_mismatch", op("concat", inputs=[scan, op("drop", input=scan, columns=["zip"])]), "SchemaError",
     ["same columns"]),
    ("list_plan", [scan], "UnsupportedOperation", ["a list"]),
    ("string_plan", "dataset('patients')", "UnsupportedOperation", ["a string"]),
    ("null_plan", None, "UnsupportedOperation", ["null"]),
    ("frame_where_expr", op("filter", input=scan, predicate=scan), "UnsupportedOperation", ["expression kind"]),
    ("non_string_key", {"op": "head", "input": scan, "n": 1, 5: 1}, "UnsupportedOperation", ["5"]),
]


@pytest.mark.parametrize("case_id,plan,ename,phrases", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_plans_get_a_typed_error_naming_what_was_refused(case_id, plan, ename, phrases, open_catalog):
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, open_catalog, "mallory")
    assert caught.value.ename == ename, caught.value.evalue
    for phrase in phrases:
        assert phrase in caught.value.evalue
    # The same refusal from schema_of: every entry point goes through the validator.
    with pytest.raises(BastionError) as again:
        executor.schema_of(plan, open_catalog)
    assert again.value.ename == ename


def test_the_executor_keeps_serving_after_refusals(open_catalog, raw):
    for _, plan, _, _ in HOSTILE[:10]:
        with pytest.raises(BastionError):
            executor.evaluate(plan, open_catalog, "mallory")
    result = executor.evaluate(op("select", input=scan, exprs=[P.length()]), open_catalog, "alice")
    assert result.table.item() == raw.height


def test_a_type_mismatch_is_a_schema_error_naming_the_operation(open_catalog):
    # zip codes are read as integers: a list of strings does not fit them.
    plan = op("filter", input=scan, predicate=fn("is_in", col("zip"), values=["75001"]))
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, open_catalog, "alice")
    assert caught.value.ename == "SchemaError"
    assert "filter" in caught.value.evalue


def test_runtime_failures_carry_no_data_values(open_catalog):
    # A pattern polars cannot compile fails while running; the message must be generic.
    plan = op("select", input=scan, exprs=[fn("str.replace", col("diagnosis"), pattern="(flu", value="x")])
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, open_catalog, "alice")
    assert caught.value.ename == "ExecutionError"
    text = caught.value.evalue + json.dumps(caught.value.details)
    assert "ComputeError" in text
    assert "(flu" not in text and "influenza" not in text


@pytest.mark.parametrize("rows", ["all", "none"])
def test_a_format_polars_cannot_apply_is_refused_before_running_whatever_the_rows(rows, open_catalog):
    # polars checks a strftime format only against non-null values, so at run
    # time the failure would tell whether any row was selected: it is checked
    # on a sample value of the column's type instead, with the same error either way.
    source = scan if rows == "all" else op("filter", input=scan, predicate=binary("lt", col("age"), lit(-1)))
    plan = op("select", input=source, exprs=[fn("dt.strftime", col("admission_date"), format="%Q")])
    with pytest.raises(BastionError) as caught:
        executor.evaluate(plan, open_catalog, "alice")
    assert caught.value.ename == "SchemaError"
    assert caught.value.evalue == ("dt.strftime: the format cannot be applied to Date values "
                                   "(for example %H on a Date)")
    assert "2023" not in caught.value.evalue + json.dumps(caught.value.details)


@pytest.mark.parametrize("plan_exponent", [binary("sub", lit(30), col("age")),
                                           binary("mul", col("age"), lit(10 ** 9)), P.length()],
                         ids=["from_a_column", "scaled_column", "row_count"])
def test_an_exponent_computed_from_data_is_refused_before_running(plan_exponent, open_catalog):
    # 2 ** x gives each row a weight of its own: one sum could pack many rows' values.
    for plan, at in ((op("select", input=scan, exprs=[fn("pow", lit(2), exponent=plan_exponent)]),
                      "plan.exprs[0].args.exponent"),
                     (op("select", input=scan, exprs=[alias(binary("pow", col("length_of_stay"), plan_exponent),
                                                            "b")]), "plan.exprs[0].input.right")):
        for entry in (lambda: executor.evaluate(plan, open_catalog, "alice"),
                      lambda: executor.schema_of(plan, open_catalog)):
            with pytest.raises(BastionError) as caught:
                entry()
            assert caught.value.ename == "PolicyViolation"
            assert caught.value.evalue.startswith("pow: the exponent must be a literal number")
            assert caught.value.public_details() == {"function": "pow", "at": at}


@pytest.mark.parametrize("exponent", [-1, 10 ** 10])
def test_literal_integer_exponents_that_polars_cannot_use_give_null_instead_of_failing(exponent, open_catalog, raw):
    plan = op("select", input=scan, exprs=[alias(binary("pow", col("length_of_stay"), lit(exponent)), "b"),
                                           fn("pow", lit(2), exponent=binary("add", lit(exponent), lit(0)))])
    result = executor.evaluate(plan, open_catalog, "alice")
    assert result.table["b"].null_count() == result.table["literal"].null_count() == raw.height


def test_float_exponents_are_untouched(open_catalog, raw):
    plan = op("select", input=scan, exprs=[binary("pow", col("cost"), lit(-0.5))])
    assert_frame_equal(executor.evaluate(plan, open_catalog, "alice").table, raw.select(pl.col("cost") ** -0.5))


def test_failed_conversions_become_null_instead_of_revealing_that_a_row_exists(open_catalog, raw):
    # A strict cast would fail only if some filtered row exists: an oracle on
    # the data. Conversions run non-strict, so the result is a plain (held) table.
    plan = op("select", input=op("filter", input=scan, predicate=fn("str.starts_with", col("name"), prefix="Ada ")),
              exprs=[fn("cast", col("name"), dtype="Int64"),
                     alias(fn("str.to_date", col("diagnosis"), format="%Y"), "d")])
    result = executor.evaluate(plan, open_catalog, "alice")
    expected = raw.filter(pl.col("name").str.starts_with("Ada ")).select(
        pl.col("name").cast(pl.Int64, strict=False), pl.col("diagnosis").str.to_date("%Y", strict=False).alias("d"))
    assert_frame_equal(result.table, expected)
    assert result.table["name"].null_count() == result.table.height > 0


# ---------------------------------------------------------------- dataset cache
def test_dataset_cache_reads_once_and_rereads_a_changed_file(tmp_path):
    path = write_patients(tmp_path / "p.csv", rows=50)
    dataset = Dataset("p", path, "csv", Policy())
    cache = engine.DatasetCache()
    first = cache.frame(dataset)
    assert cache.frame(dataset) is first
    assert first.schema["admission_date"] == pl.Date  # CSV dates are parsed
    write_patients(path, rows=60)
    second = cache.frame(dataset)
    assert second is not first and second.height == 60


def test_dataset_cache_is_shared_across_threads(tmp_path):
    path = write_patients(tmp_path / "p.parquet", rows=200)
    dataset = Dataset("p", path, "parquet", Policy())
    cache = engine.DatasetCache()
    frames, barrier = [], threading.Barrier(8)

    def load():
        barrier.wait()
        frames.append(cache.frame(dataset))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(frames) == 8 and all(f is frames[0] for f in frames)
    assert_frame_equal(frames[0], pl.read_parquet(path))


def test_a_missing_file_is_an_execution_error_without_its_path(tmp_path):
    dataset = Dataset("gone", tmp_path / "secret-location" / "gone.csv", "csv", Policy())
    with pytest.raises(BastionError) as caught:
        executor.evaluate(P.scan("gone"), {"gone": dataset}, "alice")
    assert caught.value.ename == "ExecutionError"
    assert "secret-location" not in caught.value.evalue


# ---------------------------------------------------------------- fuzzing
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["age", "cost", "name", "sex", "patients", "__bastion_r0", "sum", "col",
                                          "scan", "inner", "Int64", "1d", "both"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["op", "expr", "name", "input", "exprs", "keys",
                                                                "aggs", "predicate", "value", "args", "left",
                                                                "right", "n", "dataset", "how"]) | st.text(max_size=5),
                                               inner, max_size=5)), max_leaves=20)

SEEDS = [c[1] for c in ALL_CASES[::7]]


def _mutate(plan, path_choice: int, replacement):
    """Replace one node (chosen by index in a walk) of a valid plan with arbitrary JSON."""
    nodes = []

    def walk(value, setter):
        nodes.append(setter)
        if isinstance(value, dict):
            for key in list(value):
                walk(value[key], lambda v, value=value, key=key: value.__setitem__(key, v))
        elif isinstance(value, list):
            for i in range(len(value)):
                walk(value[i], lambda v, value=value, i=i: value.__setitem__(i, v))

    copy = json.loads(json.dumps(plan))
    box = {"root": copy}
    walk(copy, lambda v: box.__setitem__("root", v))
    nodes[path_choice % len(nodes)](replacement)
    return box["root"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS), where=st.integers(min_value=0, max_value=500), replacement=json_values)
def test_any_mutated_plan_gets_a_result_or_a_typed_error(seed, where, replacement, open_catalog):
    plan = _mutate(seed, where, replacement)
    try:
        outcome = executor.evaluate(plan, open_catalog, "fuzz")
    except BastionError as error:
        assert error.ename in {"UnsupportedOperation", "SchemaError", "LimitExceeded", "ExecutionError",
                               "PolicyViolation"}
        assert error.evalue
    else:
        assert not any(c.startswith(validate.RESERVED_PREFIX) for c in outcome.table.columns)
