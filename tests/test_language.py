"""The Bastion language: cells -> the exact plan JSON, values and session calls.

Pure language tests: the executor is replaced by the in-memory
``FakeSession`` (the ``Session`` seam), which records what was asked.
"""
from __future__ import annotations

import json

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.language.expr import Expr, Then, When
from bastion_kernel.language.frame import GroupBy, RemoteFrame
from bastion_kernel.language.interpreter import CellResult, Interpreter
from bastion_kernel.language.sql import sql_to_plan
from bastion_kernel.language.values import DatasetList, FetchedTable, RequestStatus
from bastion_kernel.contract.plan_text import plan_to_polars_text
from bastion_kernel.contract.protocol import BastionError
from language_fake_session import PATIENTS_SCHEMA, FakeSession, plan_of, refusal

SCAN = {"op": "scan", "dataset": "patients"}
VISITS = {"op": "scan", "dataset": "visits"}


def col(name):
    return {"expr": "col", "name": name}


def lit(value):
    return {"expr": "lit", "value": value}


def fn(name, node, **args):
    return {"expr": "fn", "name": name, "input": node, "args": args}


def binary(op, left, right):
    return {"expr": "binary", "op": op, "left": left, "right": right}


@pytest.fixture
def session():
    return FakeSession()


@pytest.fixture
def interp(session):
    interpreter = Interpreter(session)
    interpreter.run_cell('patients = dataset("patients")\nvisits = dataset("visits")')
    return interpreter


def expr_of(interp, code):
    value = interp.run_cell(code).value
    assert isinstance(value, Expr), value
    return value.node


# ---------------------------------------------------------------- frame operations
FRAME_CASES = [
    ('patients', SCAN),
    ('patients.select("age", col("cost"))',
     {"op": "select", "input": SCAN, "exprs": [col("age"), col("cost")]}),
    ('patients.select(["age", "sex"], stay=col("length_of_stay"))',
     {"op": "select", "input": SCAN, "exprs": [col("age"), col("sex"),
                                               {"expr": "alias", "input": col("length_of_stay"), "name": "stay"}]}),
    ('patients.with_columns((col("cost") * 2).alias("double"))',
     {"op": "with_columns", "input": SCAN,
      "exprs": [{"expr": "alias", "input": binary("mul", col("cost"), lit(2)), "name": "double"}]}),
    ('patients.filter(col("age") >= 18)',
     {"op": "filter", "input": SCAN, "predicate": binary("ge", col("age"), lit(18))}),
    ('patients.filter(col("age") >= 18, sex="F")',
     {"op": "filter", "input": SCAN, "predicate": binary("and", binary("ge", col("age"), lit(18)),
                                                         binary("eq", col("sex"), lit("F")))}),
    ('patients.group_by("sex").agg(col("cost").mean(), n=len())',
     {"op": "group_by", "input": SCAN, "keys": [col("sex")],
      "aggs": [fn("mean", col("cost")), {"expr": "alias", "input": {"expr": "len"}, "name": "n"}]}),
    ('patients.group_by(["sex", col("zip")]).agg([pl.len()])',
     {"op": "group_by", "input": SCAN, "keys": [col("sex"), col("zip")], "aggs": [{"expr": "len"}]}),
    ('patients.group_by("diagnosis").len()',
     {"op": "group_by", "input": SCAN, "keys": [col("diagnosis")], "aggs": [{"expr": "len"}]}),
    ('patients.sort("age")',
     {"op": "sort", "input": SCAN, "by": [col("age")], "descending": [False], "nulls_last": False}),
    ('patients.sort("age", col("cost"), descending=[True, False], nulls_last=True)',
     {"op": "sort", "input": SCAN, "by": [col("age"), col("cost")], "descending": [True, False],
      "nulls_last": True}),
    ('patients.sort(["age", "cost"], descending=True)',
     {"op": "sort", "input": SCAN, "by": [col("age"), col("cost")], "descending": [True, True],
      "nulls_last": False}),
    ('patients.head()', {"op": "head", "input": SCAN, "n": 5}),
    ('patients.head(12)', {"op": "head", "input": SCAN, "n": 12}),
    ('patients.limit(n=3)', {"op": "head", "input": SCAN, "n": 3}),
    ('patients.drop("name", ["zip"])', {"op": "drop", "input": SCAN, "columns": ["name", "zip"]}),
    ('patients.rename({"age": "years"})', {"op": "rename", "input": SCAN, "mapping": {"age": "years"}}),
    ('patients.drop_nulls()', {"op": "drop_nulls", "input": SCAN, "subset": None}),
    ('patients.drop_nulls("cost")', {"op": "drop_nulls", "input": SCAN, "subset": ["cost"]}),
    ('patients.fill_null(0)', {"op": "fill_null", "input": SCAN, "value": lit(0)}),
    ('patients.unique()', {"op": "unique", "input": SCAN, "subset": None}),
    ('patients.unique(subset=["sex", "zip"])', {"op": "unique", "input": SCAN, "subset": ["sex", "zip"]}),
    ('patients.join(visits, on="patient_id")',
     {"op": "join", "left": SCAN, "right": VISITS, "how": "inner", "left_on": [col("patient_id")],
      "right_on": [col("patient_id")], "suffix": "_right"}),
    ('patients.join(visits, left_on="patient_id", right_on=col("patient_id"), how="left", suffix="_v")',
     {"op": "join", "left": SCAN, "right": VISITS, "how": "left", "left_on": [col("patient_id")],
      "right_on": [col("patient_id")], "suffix": "_v"}),
    ('patients.join(visits, how="cross")',
     {"op": "join", "left": SCAN, "right": VISITS, "how": "cross", "left_on": [], "right_on": [],
      "suffix": "_right"}),
    ('concat([patients.head(1), patients.head(2)])',
     {"op": "concat", "inputs": [{"op": "head", "input": SCAN, "n": 1}, {"op": "head", "input": SCAN, "n": 2}]}),
    ('pl.concat([patients, patients])', {"op": "concat", "inputs": [SCAN, SCAN]}),
    ('patients.with_row_index()', {"op": "with_row_index", "input": SCAN, "name": "index"}),
    ('patients.with_row_index("row")', {"op": "with_row_index", "input": SCAN, "name": "row"}),
    ('saved("adults")', {"op": "saved", "name": "adults"}),
]


@pytest.mark.parametrize("code,expected", FRAME_CASES, ids=[c for c, _ in FRAME_CASES])
def test_frame_operation_plans(interp, code, expected):
    plan = plan_of(interp, code)
    assert plan == expected
    assert json.loads(P.canonical_json(plan)) == expected  # it is plain JSON


def test_every_frame_plan_uses_only_the_plan_format(interp):
    for code, _ in FRAME_CASES:
        _check_frame_node(plan_of(interp, code))


def _check_frame_node(node):
    assert set(node) == {"op", *P.FRAME_OPS[node["op"]]}
    for key in ("input", "left", "right"):
        if key in node:
            _check_frame_node(node[key])
    for child in node.get("inputs", []):
        _check_frame_node(child)


def test_count_selects_the_count_of_every_column(interp, session):
    plan = plan_of(interp, "patients.count()")
    assert plan == {"op": "select", "input": SCAN,
                    "exprs": [fn("count", col(name)) for name, _ in PATIENTS_SCHEMA]}
    assert ("schema", SCAN) in session.calls


def test_group_by_is_pending_until_agg(interp):
    grouped = interp.run_cell('patients.group_by("sex")').value
    assert isinstance(grouped, GroupBy)
    assert "agg" in repr(grouped)


# ---------------------------------------------------------------- expressions
EXPR_CASES = [
    ('col("a")', col("a")),
    ('pl.col("a")', col("a")),
    ('lit(3)', lit(3)),
    ('lit(None, pl.Float64)', fn("cast", lit(None), dtype="Float64", strict=True)),
    ('len()', {"expr": "len"}),
    ('col("a") + 1', binary("add", col("a"), lit(1))),
    ('1 - col("a")', binary("sub", lit(1), col("a"))),
    ('col("a") * col("b")', binary("mul", col("a"), col("b"))),
    ('col("a") / 2', binary("truediv", col("a"), lit(2))),
    ('col("a") // 2', binary("floordiv", col("a"), lit(2))),
    ('col("a") % 2', binary("mod", col("a"), lit(2))),
    ('col("a") ** 2', binary("pow", col("a"), lit(2))),
    ('(col("a") > 1) & (col("b") < 2)', binary("and", binary("gt", col("a"), lit(1)), binary("lt", col("b"), lit(2)))),
    ('(col("a") == "x") | (col("b") != 2.5)',
     binary("or", binary("eq", col("a"), lit("x")), binary("ne", col("b"), lit(2.5)))),
    ('col("a") ^ col("b")', binary("xor", col("a"), col("b"))),
    ('col("a") <= 3', binary("le", col("a"), lit(3))),
    ('3 < col("a")', binary("lt", lit(3), col("a"))),
    ('~col("smoker")', {"expr": "unary", "op": "not", "operand": col("smoker")}),
    ('col("smoker").not_()', {"expr": "unary", "op": "not", "operand": col("smoker")}),
    ('-col("a")', {"expr": "unary", "op": "neg", "operand": col("a")}),
    ('+col("a")', col("a")),
    ('col("a").alias("b")', {"expr": "alias", "input": col("a"), "name": "b"}),
    ('col("a") + 2 * 3', binary("add", col("a"), lit(6))),
    ('col("a").sum()', fn("sum", col("a"))),
    ('col("a").std()', fn("std", col("a"), ddof=1)),
    ('col("a").var(ddof=0)', fn("var", col("a"), ddof=0)),
    ('col("a").quantile(0.5)', fn("quantile", col("a"), quantile=0.5, interpolation="nearest")),
    ('col("a").quantile(0.5, "linear")', fn("quantile", col("a"), quantile=0.5, interpolation="linear")),
    ('col("a").is_in([1, 2, None])', fn("is_in", col("a"), values=[1, 2, None])),
    ('col("a").is_in(other=("x",))', fn("is_in", col("a"), values=["x"])),
    ('col("a").is_between(1, 5)', fn("is_between", col("a"), lower=lit(1), upper=lit(5), closed="both")),
    ('col("a").is_between("lo", lit("z"), closed="left")',
     fn("is_between", col("a"), lower=col("lo"), upper=lit("z"), closed="left")),
    ('col("a").is_between(lower_bound=0, upper_bound=col("b"))',
     fn("is_between", col("a"), lower=lit(0), upper=col("b"), closed="both")),
    ('col("a").fill_null("missing")', fn("fill_null", col("a"), value=lit("missing"))),
    ('col("a").fill_null(col("b"))', fn("fill_null", col("a"), value=col("b"))),
    ('col("a").cast(pl.Int32)', fn("cast", col("a"), dtype="Int32", strict=True)),
    ('col("a").cast(float, strict=False)', fn("cast", col("a"), dtype="Float64", strict=False)),
    ('col("a").cast(str)', fn("cast", col("a"), dtype="String", strict=True)),
    ('col("a").round()', fn("round", col("a"), decimals=0)),
    ('col("a").round(2)', fn("round", col("a"), decimals=2)),
    ('col("a").clip(0)', fn("clip", col("a"), lower=0, upper=None)),
    ('col("a").clip(upper_bound=9.5)', fn("clip", col("a"), lower=None, upper=9.5)),
    ('col("a").log()', fn("log", col("a"), base=2.718281828459045)),
    ('col("a").log(10)', fn("log", col("a"), base=10)),
    ('col("a").pow(2)', fn("pow", col("a"), exponent=lit(2))),
    ('col("a").pow("b")', fn("pow", col("a"), exponent=col("b"))),
    ('col("a").abs().sqrt().exp()', fn("exp", fn("sqrt", fn("abs", col("a"))))),
    ('col("a").is_null()', fn("is_null", col("a"))),
    ('col("a").is_not_null()', fn("is_not_null", col("a"))),
    ('col("a").str.contains("x")', fn("str.contains", col("a"), pattern="x", literal=False)),
    ('col("a").str.contains("x", literal=True)', fn("str.contains", col("a"), pattern="x", literal=True)),
    ('col("a").str.starts_with("x")', fn("str.starts_with", col("a"), prefix="x")),
    ('col("a").str.ends_with("x")', fn("str.ends_with", col("a"), suffix="x")),
    ('col("a").str.slice(1)', fn("str.slice", col("a"), offset=1, length=None)),
    ('col("a").str.slice(0, 3)', fn("str.slice", col("a"), offset=0, length=3)),
    ('col("a").str.replace("a", "b")', fn("str.replace", col("a"), pattern="a", value="b", literal=False)),
    ('col("a").str.strip_chars()', fn("str.strip_chars", col("a"), characters=None)),
    ('col("a").str.to_lowercase().str.len_chars()', fn("str.len_chars", fn("str.to_lowercase", col("a")))),
    ('col("a").str.to_uppercase()', fn("str.to_uppercase", col("a"))),
    ('col("a").str.to_date("%Y-%m-%d")', fn("str.to_date", col("a"), format="%Y-%m-%d", strict=True)),
    ('col("a").str.to_datetime("%Y", strict=False)', fn("str.to_datetime", col("a"), format="%Y", strict=False)),
    ('col("d").dt.year()', fn("dt.year", col("d"))),
    ('col("d").dt.month()', fn("dt.month", col("d"))),
    ('col("d").dt.day()', fn("dt.day", col("d"))),
    ('col("d").dt.weekday()', fn("dt.weekday", col("d"))),
    ('col("d").dt.hour()', fn("dt.hour", col("d"))),
    ('col("d").dt.truncate("1mo")', fn("dt.truncate", col("d"), every="1mo")),
    ('col("d").dt.strftime("%Y-%m")', fn("dt.strftime", col("d"), format="%Y-%m")),
    ('when(col("a") > 1).then(lit("big")).otherwise(lit("small"))',
     {"expr": "when", "branches": [{"when": binary("gt", col("a"), lit(1)), "then": lit("big")}],
      "otherwise": lit("small")}),
    ('pl.when(col("a") > 1).then("b").when(a=2).then(0)',
     {"expr": "when", "branches": [{"when": binary("gt", col("a"), lit(1)), "then": col("b")},
                                   {"when": binary("eq", col("a"), lit(2)), "then": lit(0)}],
      "otherwise": None}),
    ('col("a").repeat_by(2)', fn("repeat_by", col("a"), by=lit(2))),
    ('col("a").mean().over("b")', fn("over", fn("mean", col("a")), partition_by=[col("b")])),
    ('col("a").filter(col("b") > 1).sum()',
     fn("sum", fn("filter", col("a"), predicate=binary("gt", col("b"), lit(1))))),
    ('col("a").sort_by("b").first()', fn("first", fn("sort_by", col("a"), by=col("b"), descending=False))),
]


@pytest.mark.parametrize("code,expected", EXPR_CASES, ids=[c for c, _ in EXPR_CASES])
def test_expression_plans(interp, code, expected):
    assert expr_of(interp, code) == expected


def test_every_expression_function_is_reachable(interp):
    reached = {case[1]["name"] for case in EXPR_CASES if case[1].get("expr") == "fn"}

    def walk(node):
        if isinstance(node, dict):
            if node.get("expr") == "fn":
                reached.add(node["name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    for _, expected in EXPR_CASES:
        walk(expected)
    aggregations = [name for name, spec in P.EXPR_FUNCTIONS.items()
                    if spec.kind != "elementwise" and all(p in spec.defaults for p, _ in spec.params)]
    for name in aggregations:
        assert expr_of(interp, f'col("a").{name}()')["name"] == name
        reached.add(name)
    assert reached == set(P.EXPR_FUNCTIONS)


def test_multi_column_col_expands_in_frame_methods(interp):
    plan = plan_of(interp, 'patients.select(col("age", "cost").mean())')
    assert plan["exprs"] == [fn("mean", col("age")), fn("mean", col("cost"))]
    plan = plan_of(interp, 'patients.select(col(["age", "cost"]) * 2)')
    assert plan["exprs"] == [binary("mul", col("age"), lit(2)), binary("mul", col("cost"), lit(2))]


def test_when_chain_values(interp):
    assert isinstance(interp.run_cell('when(col("a") > 1)').value, When)
    then = interp.run_cell('when(col("a") > 1).then(1)').value
    assert isinstance(then, Then) and then.node["otherwise"] is None
    # a Then is an expression: it takes Expr methods
    assert interp.run_cell('when(col("a") > 1).then(1).alias("x")').value.node["expr"] == "alias"


def test_builtin_type_names_are_cast_targets(interp):
    assert expr_of(interp, 'col("a").cast(bool)') == fn("cast", col("a"), dtype="Boolean", strict=True)
    assert expr_of(interp, 'col("a").cast(int)') == fn("cast", col("a"), dtype="Int64", strict=True)
    for dtype in P.DTYPES:
        assert expr_of(interp, f'col("a").cast(pl.{dtype})')["args"]["dtype"] == dtype


# ---------------------------------------------------------------- literals and variables
def test_literal_arithmetic_and_values(interp):
    assert interp.run_cell("2 ** 10").value == 1024
    assert interp.run_cell("7 // 2, 7 % 2, -3, 1.5 * 2").value == (3, 1, -3, 3.0)
    assert interp.run_cell('"ab" + "cd"').value == "abcd"
    assert interp.run_cell('[1, "x", None, True]').value == [1, "x", None, True]
    assert interp.run_cell('{"a": 1, "b": [2]}').value == {"a": 1, "b": [2]}
    assert interp.run_cell("1 < 2").value is True
    assert interp.run_cell("not False").value is True
    assert interp.run_cell("True and 0").value == 0
    assert interp.run_cell('f"plain"').value == "plain"
    assert interp.run_cell("[1, 2, 3][1:]").value == [2, 3]
    assert interp.run_cell('{"a": 1}["a"]').value == 1
    assert interp.run_cell("pass").value is None


def test_assignment_and_variables(interp):
    result = interp.run_cell('adults = patients.filter(col("age") >= 18)')
    assert isinstance(result, CellResult) and result.value is None
    assert isinstance(interp.variables["adults"], RemoteFrame)
    interp.run_cell('a, b = 1, col("x")\nc = d = 3\nc += 1')
    assert interp.variables["a"] == 1 and isinstance(interp.variables["b"], Expr)
    assert interp.variables["c"] == 4 and interp.variables["d"] == 3
    interp.run_cell('e = col("x")\ne *= 2')
    assert interp.variables["e"].node == binary("mul", col("x"), lit(2))
    # the value of a cell is its final expression statement only
    assert interp.run_cell("x = 1\nx + 1\nx").value == 1


def test_variables_persist_and_builtins_can_be_shadowed(interp):
    interp.run_cell("limit = 3")
    assert plan_of(interp, "patients.head(limit)")["n"] == 3
    interp.run_cell('col = "not a function"')
    error = refusal(interp, 'col("a")')
    assert error.ename == "UnsupportedOperation"


def test_properties_ask_the_executor_for_the_schema_once(interp, session):
    assert interp.run_cell("patients.columns").value == [n for n, _ in PATIENTS_SCHEMA]
    assert interp.run_cell("patients.schema").value == dict(PATIENTS_SCHEMA)
    assert interp.run_cell("patients.dtypes").value == [d for _, d in PATIENTS_SCHEMA]
    assert interp.run_cell("patients.width").value == len(PATIENTS_SCHEMA)
    assert interp.run_cell('patients.schema["age"]').value == "Int64"
    assert interp.run_cell("patients.columns[0]").value == "patient_id"
    assert sum(1 for call in session.calls if call[0] == "schema") == 1


def test_reprs_are_readable_and_do_not_fetch(interp, session):
    frame = interp.run_cell('patients.filter(col("age") >= 18).group_by("sex").agg(col("cost").mean())').value
    text = repr(frame)
    assert "patients" in text and 'filter(pl.col("age") >= 18)' in text and "mean()" in text
    assert frame.summary() == text
    assert 'pl.col("age") >= 18' in repr(interp.run_cell('col("age") >= 18').value)
    assert not any(call[0] in ("fetch", "schema") for call in session.calls)


def test_plans_read_back_as_text_to_the_same_plan(interp):
    """The polars-like text of a plan (shown in reprs) is itself a cell giving that plan."""
    for code, expected in FRAME_CASES:
        if code == "patients":
            continue
        text = plan_to_polars_text(expected)
        assert plan_of(interp, text) == expected, text
    for code, expected in EXPR_CASES:
        text = repr(Expr(expected))[len("<Expr "):-1]
        assert expr_of(interp, text) == expected, text


# ---------------------------------------------------------------- the session
def test_fetch_sends_the_plan_and_the_cell_text(interp, session):
    code = 'patients.group_by("sex").agg(len()).fetch()'
    value = interp.run_cell(code).value
    assert isinstance(value, FetchedTable)
    assert session.fetched == [({"op": "group_by", "input": SCAN, "keys": [col("sex")],
                                 "aggs": [{"expr": "len"}]}, code)]


def test_save_request_and_datasets(interp, session):
    code = 'mine = patients.select("age").save("ages")'
    interp.run_cell(code)
    assert session.saved == [({"op": "select", "input": SCAN, "exprs": [col("age")]}, "ages", code)]
    assert interp.variables["mine"].plan == {"op": "saved", "name": "ages"}
    status = interp.run_cell("request(7)").value
    assert isinstance(status, RequestStatus) and status.request_id == 7
    listed = interp.run_cell("datasets()").value
    assert isinstance(listed, DatasetList) and [d["name"] for d in listed.datasets] == ["patients", "visits"]


def test_unknown_dataset_suggests_the_nearest(interp):
    error = refusal(interp, 'dataset("patient")')
    assert error.ename == "SchemaError"
    assert "did you mean 'patients'?" in error.evalue
    assert error.details == {"line": 1, "col": 0}


def test_session_errors_pass_through(interp, session):
    def refuse(plan, text):
        raise BastionError("PolicyViolation", "groups too small")
    session.fetch = refuse
    error = refusal(interp, "x = 1\npatients.fetch()")
    assert error.ename == "PolicyViolation"
    assert error.details == {"line": 2, "col": 9}


def test_keyboard_interrupt_passes_through(interp, session):
    def interrupted(plan, text):
        raise KeyboardInterrupt
    session.fetch = interrupted
    with pytest.raises(KeyboardInterrupt):
        interp.run_cell("patients.fetch()")
    assert interp.run_cell("1 + 1").value == 2  # still usable


# ---------------------------------------------------------------- SQL
def test_sql_cell_fetches_the_translated_plan(interp, session):
    query = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex"
    code = f"%%sql\n{query}\n"
    value = interp.run_cell(code).value
    assert isinstance(value, FetchedTable)
    tables = {d["name"]: d["schema"] for d in session.described}
    assert session.fetched == [(sql_to_plan(query + "\n", tables), code)]


def test_sql_function_gives_a_remote_frame(interp, session):
    query = "SELECT age FROM patients WHERE age > 30"
    frame = interp.run_cell(f'sql("{query}").head(3)').value
    tables = {d["name"]: d["schema"] for d in session.described}
    assert frame.plan == {"op": "head", "input": sql_to_plan(query, tables), "n": 3}
    assert not session.fetched


def test_sql_errors_carry_a_cell_position(interp):
    error = refusal(interp, "%%sql\nSELECT nothing FROM nowhere")
    assert error.ename in ("SchemaError", "ParseError", "UnsupportedOperation")
    error = refusal(interp, "%%sql\n")
    assert error.ename == "ParseError"


# ---------------------------------------------------------------- argument checking
ARGUMENT_ERRORS = [
    ('col("a").is_in(col("b"))', "SchemaError", "list of literal"),
    ('col("a").is_in([col("b")])', "SchemaError", "not a literal"),
    ('col("a").cast("Int64")', "SchemaError", "data type"),
    ('col("a").str.contains(col("b"))', "SchemaError", "must be a string"),
    ('col("a").round(1.5)', "SchemaError", "whole number"),
    ('col("a").str.contains("x", literal="yes")', "SchemaError", "True or False"),
    ('col("a").is_between(1, 2, closed="middle")', "SchemaError", "'both'"),
    ('col("a").dt.truncate("monthly")', "SchemaError", "interval"),
    ('col("a").quantile()', "UnsupportedOperation", "quantile"),
    ('col("a").sum(1)', "UnsupportedOperation", "too many"),
    ('col("a").round(digits=1)', "UnsupportedOperation", "decimals"),
    ('patients.sort("a", decending=True)', "UnsupportedOperation", "did you mean 'descending'?"),
    ('patients.head("x")', "SchemaError", "whole number"),
    ('patients.head(-1)', "SchemaError", "whole number"),
    ('patients.sort("a", descending=[True, False])', "SchemaError", "flags"),
    ('patients.join(visits, on="patient_id", how="outer")', "SchemaError", "how must be one of"),
    ('patients.join(visits)', "SchemaError", "on="),
    ('patients.join(1, on="a")', "SchemaError", "frame"),
    ('patients.rename(["a"])', "SchemaError", "dict"),
    ('patients.group_by("a", maintain_order=True)', "UnsupportedOperation", "sort"),
    ('patients.select()', "SchemaError", "at least one"),
    ('patients.filter()', "SchemaError", "at least one"),
    ('patients.select(col("a", "b").alias("c"))', "SchemaError", "several"),
    ('col("x").is_between(col("a", "b"), 3)', "SchemaError", "several columns"),
    ('col("*")', "UnsupportedOperation", "wildcard"),
    ('lit(float("nan"))', "UnsupportedOperation", "cast target"),
    ('lit([1, 2])', "SchemaError", "not a literal"),
    ('concat([])', "SchemaError", "non-empty"),
    ('concat([patients], how="diagonal")', "UnsupportedOperation", "vertical"),
    ('request("x")', "SchemaError", "request id"),
    ('patients.save(3)', "SchemaError", "name"),
    ('col("a") + [1]', "UnsupportedOperation", "does not combine"),
    ('col("a") + patients', "UnsupportedOperation", "does not combine"),
    ('1 / 0', "ExecutionError", "division by zero"),
    ('"a" * 3', "UnsupportedOperation", "does not apply"),
    ('10 ** 100000', "LimitExceeded", "too large"),
    ('pl.Int64(3)', "UnsupportedOperation", "cast target"),
    ('patients()', "UnsupportedOperation", "not callable"),
]


@pytest.mark.parametrize("code,ename,fragment", ARGUMENT_ERRORS, ids=[c for c, _, _ in ARGUMENT_ERRORS])
def test_argument_errors(interp, code, ename, fragment):
    error = refusal(interp, code)
    assert error.ename == ename
    assert fragment in error.evalue
    assert isinstance(error.details.get("line"), int) and isinstance(error.details.get("col"), int)


def test_argument_error_points_at_the_method_name(interp):
    error = refusal(interp, 'x = 1\ny = patients.filter(col("age") > 1).head("many")')
    assert error.details == {"line": 2, "col": len('y = patients.filter(col("age") > 1).')}


def test_plan_size_is_bounded(interp):
    # Doubling an expression would make an enormous plan: it is refused early.
    error = refusal(interp, "e = col('a')\n" + "e = e + e\n" * 40)
    assert error.ename == "LimitExceeded"
    assert error.details["line"] > 1


def test_interpreter_keeps_serving_after_errors(interp):
    for code in ("import os", "1 +", "patients.nope()", "!ls"):
        with pytest.raises(BastionError):
            interp.run_cell(code)
    assert plan_of(interp, "patients.head(1)") == {"op": "head", "input": SCAN, "n": 1}


# ---------------------------------------------------------------- robustness and layering
TOKENS = ['patients', 'col("age")', 'col', '(', ')', '[', ']', '.', ',', '+', '-', '*', '/', '**', '&', '|', '~',
          '==', '<', '=', 'x', '1', '2.5', '"s"', 'None', 'True', 'filter', 'select', 'group_by', 'agg', 'mean',
          'alias', 'str', 'dt', 'pl', 'lit', 'when', 'then', 'otherwise', 'fetch', 'head', 'sort', 'join',
          '__class__', 'lambda', ':', 'not', 'and', 'in', 'is_in', 'cast', 'Int64', '{', '}', '\n', ' ', '%', '!']


def test_random_token_soup_gives_only_typed_errors(interp):
    import random
    rng = random.Random(20260101)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        code = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 12)))
        try:
            interp.run_cell(code)
            outcomes["ok"] += 1
        except BastionError as exc:
            assert exc.ename in ("ParseError", "UnsupportedOperation", "SchemaError", "LimitExceeded",
                                 "ExecutionError"), (code, exc.ename)
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


def test_the_language_imports_neither_ipykernel_zmq_nor_polars():
    import subprocess
    import sys
    probe = ("import sys\n"
             "import bastion_kernel.language.interpreter, bastion_kernel.language.complete\n"
             "from bastion_kernel.language.operations import documented_operations\n"
             "documented_operations()\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ipykernel', 'zmq', 'polars'))\n"
             "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
