"""Completion, inspection and is_complete: names and metadata only, never data, never effects."""
from __future__ import annotations

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.language.interpreter import Completion, Interpreter
from bastion_kernel.language.registry import methods_of, properties_of
from bastion_kernel.language.frame import RemoteFrame
from bastion_kernel.language.expr import Expr
from language_fake_session import PATIENTS_SCHEMA, VISITS_SCHEMA, FakeSession

PATIENT_COLUMNS = [name for name, _ in PATIENTS_SCHEMA]


@pytest.fixture
def interp():
    interpreter = Interpreter(FakeSession())
    interpreter.run_cell('df = dataset("patients")\ne = col("age")\ng = df.group_by("sex")\nn = 3')
    return interpreter


def complete(interp, code, cursor=None):
    return interp.complete(code, len(code) if cursor is None else cursor)


def test_dataset_names_inside_dataset_call(interp):
    result = complete(interp, 'x = dataset("pa')
    assert result == Completion(["patients"], len('x = dataset("'), len('x = dataset("pa'))
    assert complete(interp, "pl.dataset('").matches == ["patients", "visits"]


def test_column_names_inside_col_use_the_enclosing_frame(interp):
    result = complete(interp, 'df.filter(col("a')
    assert result.matches == sorted(c for c in PATIENT_COLUMNS if c.startswith("a"))
    assert result.cursor_start == len('df.filter(col("')
    assert complete(interp, 'dataset("visits").select(pl.col("').matches == sorted(n for n, _ in VISITS_SCHEMA)


def test_column_names_without_a_frame_come_from_the_datasets(interp):
    names = set(complete(interp, 'col("').matches)
    assert names == set(PATIENT_COLUMNS) | {n for n, _ in VISITS_SCHEMA}


@pytest.mark.parametrize("code,expected", [
    ('df.select("c', ["cost"]),
    ('df.group_by("di', ["diagnosis"]),
    ('df.sort(["ag', ["age"]),
    ('df.drop("na', ["name"]),
    ('df.filter(e > 1).select("s', ["sex", "smoker"]),
    ('g.agg(col("co', ["cost"]),
    ("df.unique(subset=['zi", ["zip"]),
])
def test_column_names_in_frame_method_strings(interp, code, expected):
    assert complete(interp, code).matches == expected


def test_methods_after_a_dot(interp):
    frame_names = sorted(set(methods_of(RemoteFrame)) | set(properties_of(RemoteFrame)))
    assert complete(interp, "df.").matches == frame_names
    result = complete(interp, "df.gr")
    assert result == Completion(["group_by"], 3, 5)
    assert complete(interp, 'df.filter(col("age") > 1).wi').matches == ["width", "with_columns", "with_row_index"]
    assert complete(interp, "(df\n  .filter(e > 1)\n  .sel").matches == ["select"]
    assert complete(interp, "e.is_").matches == ["is_between", "is_in", "is_not_null", "is_null"]
    assert complete(interp, "g.").matches == ["agg", "len"]
    assert complete(interp, "when(e > 1).").matches == ["then"]
    assert "otherwise" in complete(interp, "when(e > 1).then(1).").matches


def test_namespace_methods(interp):
    assert complete(interp, "e.str.").matches == sorted(
        n.split(".", 1)[1] for n in P.EXPR_FUNCTIONS if n.startswith("str."))
    assert complete(interp, 'col("d").dt.').matches == sorted(
        n.split(".", 1)[1] for n in P.EXPR_FUNCTIONS if n.startswith("dt."))
    assert complete(interp, "pl.In").matches == ["Int16", "Int32", "Int64", "Int8"]
    assert "col" in complete(interp, "pl.").matches


def test_top_level_names(interp):
    result = complete(interp, "co")
    assert result == Completion(["col", "concat"], 0, 2)
    assert "df" in complete(interp, "x = d").matches
    assert "dataset" in complete(interp, "x = d").matches
    assert complete(interp, "x = 1").matches == []  # a number is not a name


def test_completion_in_the_middle_of_a_cell(interp):
    code = 'df.gr\nx = 1'
    assert interp.complete(code, 5) == Completion(["group_by"], 3, 5)


def test_completion_never_offers_data_and_never_fetches(interp):
    session = interp.session
    for code in ("df.fetch().", "df.save('x').", "request(1).", 'df.select("', "df.head(1).fetch().fr"):
        complete(interp, code)
    assert not any(call[0] in ("fetch", "save", "request") for call in session.calls)
    assert not session.fetched and not session.saved


def test_completion_of_unknown_things_is_empty(interp):
    for code in ('"abc".', "nothing.", "df.nope().", "import os; os.", "n."):
        result = complete(interp, code)
        assert result.matches == []


def test_completion_survives_a_failing_session(interp):
    def broken():
        raise ConnectionError("executor down")
    interp.ctx._datasets = None
    interp.session.datasets = broken
    assert complete(interp, 'dataset("').matches == []


def test_sql_cell_completion(interp):
    result = complete(interp, "%%sql\nSELECT a")
    assert {"age", "admission_date"} <= set(result.matches)
    assert "patients" in complete(interp, "%%sql\nSELECT * FROM pat").matches


# ---------------------------------------------------------------- inspection
def test_inspect_a_frame_variable_shows_schema_and_policy(interp):
    text = interp.inspect("df", 1)
    assert "patients" in text
    for name, dtype in PATIENTS_SCHEMA:
        assert f"{name}: {dtype}" in text
    assert "groups need >= 10 rows" in text and "name" in text and "review" in text
    assert '"op"' not in text
    detailed = interp.inspect("df", 1, detail_level=1)
    assert '"op": "scan"' in detailed


def test_inspect_operations(interp):
    assert interp.inspect("df.group_by", 6).startswith("RemoteFrame.group_by(*by, maintain_order=False)")
    assert "Examples" in interp.inspect("df.group_by", 6)
    assert interp.inspect("col", 1).startswith("col(name, *more_names)")
    assert interp.inspect('e.str.contains("x")', 8).startswith("Expr.str.contains(pattern, literal=False)")
    assert "Parameters" in interp.inspect("e.is_between", 5)
    assert "Int64" in interp.inspect("pl.Int64", 5)
    names = interp.inspect("pl", 1).splitlines()[1].split(", ")
    assert {"col", "lit", "len", "when", "Int64", "String"} <= set(names) and "read_csv" not in names


def test_inspect_inside_call_parentheses_describes_the_call(interp):
    code = 'df.filter('
    assert interp.inspect(code, len(code)).startswith("RemoteFrame.filter(")
    code = 'col("age").is_in('
    assert interp.inspect(code, len(code)).startswith("Expr.is_in(other)")


def test_inspect_expressions_and_unknowns(interp):
    assert 'pl.col("age")' in interp.inspect("e", 1)
    assert interp.inspect("nothing_here", 3) is None
    assert interp.inspect("", 0) is None
    assert interp.inspect("df.fetch().x", 12) is None
    assert not interp.session.fetched


# ---------------------------------------------------------------- is_complete
@pytest.mark.parametrize("code,status", [
    ("", "complete"),
    ("x = 1", "complete"),
    ('df.filter(col("a") > 1)', "complete"),
    ("df.filter(", "incomplete"),
    ("x = [1,\n 2", "incomplete"),
    ("x = (1,\n 2)", "complete"),
    ('"""abc', "incomplete"),
    ("x = 1 + \\", "incomplete"),
    ("a b", "invalid"),
    ("x = )", "invalid"),
    ("%%sql\nSELECT * FROM", "complete"),
    ("import os", "complete"),  # syntactically complete; refused when run
])
def test_is_complete(interp, code, status):
    assert interp.is_complete(code)[0] == status


def test_is_complete_indent_after_a_colon(interp):
    assert interp.is_complete("if x:") == ("incomplete", "    ")
    assert interp.is_complete("x = 1") == ("complete", "")


def test_complete_inspect_leave_variables_alone(interp):
    before = dict(interp.variables)
    complete(interp, "y = df.")
    interp.inspect("y = df", 5)
    interp.is_complete("y = 1")
    assert interp.variables == before
    assert isinstance(interp.variables["e"], Expr)
