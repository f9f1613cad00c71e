"""Fetched results computed in the kernel, Python habits, help lines and error positions, in the language.

Released tables come from the executor's own functions in process (the seam
of ``test_language_executes``: an open policy over the synthetic patients
table); each local operation is compared with the same polars code on that
table.  The kernel-level behaviour (files, audit, display) is in
``test_kernel_results.py``.
"""
from __future__ import annotations

import os

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import local
from bastion_kernel.contract import plan as P
from bastion_kernel.language.habits import ATTRIBUTE_HINTS, NAME_HINTS
from bastion_kernel.language.interpreter import Interpreter, PlanPositions, help_request, place_executor_error
from bastion_kernel.language.registry import FUNCTIONS, attribute_names
from bastion_kernel.language.results import LocalGroupBy, notebook_file
from bastion_kernel.language.values import FetchedTable, HelpText, Printed
from bastion_kernel.language import expr as expr_module, frame as frame_module
from bastion_kernel.language.namespaces import PolarsModule, polars_attribute_names
from bastion_kernel.contract.protocol import BastionError
from language_fake_session import PATIENTS_SCHEMA, FakeSession, LocalTablesSession
from owner_console.model import Dataset, Policy
from owner_console.sample_data import generate_patients, write_patients
from test_language_executes import ExecutorSession, open_patients_interpreter

ROWS = 600


@pytest.fixture(scope="module")
def patients() -> pl.DataFrame:
    return generate_patients(rows=ROWS)


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> Interpreter:
    return open_patients_interpreter(
        tmp_path_factory, ROWS,
        'p = dataset("patients")\n'
        'rows = p.select("patient_id", "sex", "age", "diagnosis", "cost", "smoker").fetch()\n'
        'by_diagnosis = p.group_by("diagnosis").agg(mean_cost=col("cost").mean()).fetch()')


def released(df: pl.DataFrame) -> pl.DataFrame:
    return df.select("patient_id", "sex", "age", "diagnosis", "cost", "smoker")


LOCAL_CASES = [
    ('rows.sort("age", "cost", descending=[True, False])',
     lambda df, d: released(df).sort("age", "cost", descending=[True, False], maintain_order=True), True),
    ('rows.filter(col("age") >= 65, smoker=True)', lambda df, d: released(df).filter(pl.col("age") >= 65, smoker=True),
     True),
    ('rows.select("sex", k=col("cost") / 1000)', lambda df, d: released(df).select("sex", k=pl.col("cost") / 1000),
     True),
    ('rows.with_columns(when(col("age") >= 65).then(lit("senior")).otherwise(lit("adult")).alias("band"))',
     lambda df, d: released(df).with_columns(pl.when(pl.col("age") >= 65).then(pl.lit("senior"))
                                             .otherwise(pl.lit("adult")).alias("band")), True),
    ('rows.head(7)', lambda df, d: released(df).head(7), True),
    ('rows.tail(4)', lambda df, d: released(df).tail(4), True),
    ('rows.tail(0)', lambda df, d: released(df).tail(0), True),
    ('rows.slice(-10, 3)', lambda df, d: released(df).slice(-10, 3), True),
    ('rows.rename({"cost": "price"}).drop("smoker")',
     lambda df, d: released(df).rename({"cost": "price"}).drop("smoker"), True),
    ('rows.join(by_diagnosis, on="diagnosis", how="left")',
     lambda df, d: released(df).join(d, on="diagnosis", how="left", maintain_order="left_right"), True),
    ('rows.join(by_diagnosis, on="diagnosis", how="anti")',
     lambda df, d: released(df).join(d, on="diagnosis", how="anti"), True),
    ('rows.group_by("sex", "diagnosis").agg(pl.len(), col("cost").mean().round(2))',
     lambda df, d: released(df).group_by("sex", "diagnosis").agg(pl.len(), pl.col("cost").mean().round(2)), False),
    ('rows.group_by("sex").len(name="n")', lambda df, d: released(df).group_by("sex").len(name="n"), False),
    ('rows.select(col("diagnosis").str.to_uppercase(), col("cost").cast(pl.Int64))',
     lambda df, d: released(df).select(pl.col("diagnosis").str.to_uppercase(), pl.col("cost").cast(pl.Int64)), True),
    ('rows.unique("sex").select("sex")',
     lambda df, d: released(df).unique("sex", keep="first", maintain_order=True).select("sex"), True),
    ('rows.with_row_index("i").filter(col("i") < 3)', lambda df, d: released(df).with_row_index("i").head(3), True),
]


@pytest.mark.parametrize("code,query,ordered", LOCAL_CASES, ids=[c for c, _, _ in LOCAL_CASES])
def test_local_operations_match_polars_on_the_released_table(interp, patients, code, query, ordered):
    got = interp.run_cell(code).value
    assert isinstance(got, FetchedTable) and got.notes == [] and got.request_id is None
    expected = query(patients, interp.variables["by_diagnosis"].frame)
    frame = got.frame
    if not ordered:
        frame, expected = frame.sort(frame.columns), expected.sort(expected.columns)
    assert_frame_equal(frame, expected, check_dtypes=False)


class CountingSession(ExecutorSession):
    """Counts what the language sends to the executor."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sent: list[str] = []

    def fetch(self, plan: dict, text: str) -> FetchedTable:
        self.sent.append("fetch")
        return super().fetch(plan, text)

    def schema(self, plan: dict) -> list[list[str]]:
        self.sent.append("schema")
        return super().schema(plan)


def test_local_operations_send_nothing_to_the_executor(tmp_path):
    path = write_patients(tmp_path / "patients.parquet", rows=200)
    session = CountingSession({"patients": Dataset("patients", path, "parquet", Policy(min_group_size=1,
                                                                                       unsafe="log"))}, tmp_path)
    interp = Interpreter(session)
    interp.run_cell('t = dataset("patients").group_by("sex", "smoker").agg(pl.len()).fetch()')
    sent = len(session.sent)
    interp.run_cell('u = t.filter(col("len") > 1).sort("len").group_by("sex").agg(col("len").sum())\n'
                    'v = t.join(u, on="sex").select("sex", "smoker", share=col("len") / col("len_right"))\n'
                    'v.shape, v.height, len(v), v.columns, v.schema, v.dtypes, v.width')
    assert len(session.sent) == sent


def test_dp_aggregates_are_not_computed_locally(interp):
    with pytest.raises(BastionError) as info:
        interp.run_cell('rows.select(col("age").dp.mean(bounds=(0, 100)))')
    assert info.value.ename == "UnsupportedOperation" and "owner's executor" in info.value.evalue


def test_a_local_type_error_shows_polars_message(interp):
    with pytest.raises(BastionError) as info:
        interp.run_cell('rows.select(col("sex") + col("nope"))')
    assert info.value.ename == "SchemaError" and "nope" in info.value.evalue
    assert (info.value.details["line"], info.value.details["col"]) == (1, 5)


def test_the_local_compiler_covers_the_plan_tables():
    assert set(local.FUNCTIONS) | local.REMOTE_ONLY_FUNCTIONS == set(P.EXPR_FUNCTIONS)
    compiler_ops = set(local._Compiler({}).ops)
    assert compiler_ops == set(P.FRAME_OPS)
    assert set(local._EXPRS) == set(P.EXPR_KINDS)


def test_collect_fetches(interp):
    session = interp.session
    saved_before = dict(session.catalog)
    got = interp.run_cell('p.group_by("sex").agg(pl.len()).collect()').value
    assert isinstance(got, FetchedTable) and set(got.frame.columns) == {"sex", "len"}
    assert session.catalog == saved_before


def test_len_and_shape_count_remote_frames_through_a_fetch(interp, patients):
    assert interp.run_cell("len(p)").value == patients.height
    assert interp.run_cell('p.filter(col("age") > 50).shape').value == (
        patients.filter(pl.col("age") > 50).height, patients.width)
    assert interp.run_cell("len(rows)").value == patients.height
    assert interp.run_cell('len(["a", "b"]), len("abc"), len({"a": 1})').value == (2, 3, 1)
    assert isinstance(interp.run_cell("len()").value, expr_module.Expr)
    with pytest.raises(BastionError) as info:
        interp.run_cell("len(col('a'))")
    assert "len() counts a frame" in info.value.evalue


# -- files -----------------------------------------------------------------------------------

def test_notebook_files_stay_in_the_working_directory(tmp_path, monkeypatch):
    folder, outside = tmp_path / "notebook", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "out").mkdir()
    (folder / "link").symlink_to(outside, target_is_directory=True)
    (folder / "file_link.csv").symlink_to(outside / "target.csv")
    monkeypatch.chdir(folder)
    assert notebook_file("a.csv", "write_csv()") == folder / "a.csv"
    assert notebook_file("out/a.csv", "write_csv()") == folder / "out" / "a.csv"
    for name in (str(outside / "a.csv"), "../a.csv", "out/../../a.csv", "~/a.csv", "link/a.csv", "file_link.csv"):
        with pytest.raises(BastionError) as info:
            notebook_file(name, "write_csv()")
        assert info.value.ename == "UnsupportedOperation", name
        assert "notebook's folder only" in info.value.evalue
    for name, fragment in (("missing/a.csv", "does not exist"), ("out", "is a folder"), ("", "file name"),
                           ("a\x00b", "not a usable")):
        with pytest.raises(BastionError) as info:
            notebook_file(name, "write_csv()")
        assert fragment in info.value.evalue, name


def test_write_csv_writes_the_released_table(interp, tmp_path, monkeypatch, patients):
    monkeypatch.chdir(tmp_path)
    assert interp.run_cell('by_diagnosis.sort("diagnosis").write_csv("costs.csv")').value is None
    expected = patients.group_by("diagnosis").agg(mean_cost=pl.col("cost").mean()).sort("diagnosis")
    assert_frame_equal(pl.read_csv(tmp_path / "costs.csv"), expected, check_dtypes=False)
    assert os.listdir(tmp_path) == ["costs.csv"]


def test_writing_is_an_effect_not_run_while_completing(interp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BastionError):
        interp.evaluate_pure('by_diagnosis.write_csv("x.csv")')
    assert not (tmp_path / "x.csv").exists()


# -- print, display, import ---------------------------------------------------------------

def test_print_and_display_go_to_the_outputs():
    interp = Interpreter(LocalTablesSession())
    interp.run_cell('p = dataset("patients")\nprint("n", 2, sep="=")\ndisplay(p.columns, 3)')
    assert interp.ctx.outputs == [("stream", Printed(["n", 2], "=", "\n")),
                                  ("display", [column for column, _ in PATIENTS_SCHEMA]), ("display", 3)]
    with pytest.raises(BastionError):
        interp.evaluate_pure('print("x")')


def test_import_polars_binds_the_language_pl():
    interp = Interpreter(FakeSession())
    interp.run_cell("import polars as pl\nimport polars\nimport polars as p2\nfrom polars import col as c, len")
    assert all(isinstance(interp.variables[name], PolarsModule) for name in ("pl", "polars", "p2"))
    assert interp.variables["c"] is FUNCTIONS["col"] and interp.variables["len"] is FUNCTIONS["len"]
    for code, name in (("import polars.selectors as cs", "polars.selectors"), ("import os, polars", "os"),
                       ("from pandas import DataFrame", "pandas"), ("import numpy as np", "numpy")):
        with pytest.raises(BastionError) as info:
            interp.run_cell(code)
        assert info.value.evalue.startswith(f"import {name}:"), info.value.evalue
    with pytest.raises(BastionError) as info:
        interp.run_cell("from polars import *")
    assert "import *" in info.value.evalue


# -- help lines ------------------------------------------------------------------------------

@pytest.mark.parametrize("code,expected", [
    ("x?", ("x", 0, 1, 0)), ("?x", ("x", 0, 1, 1)), ("x??", ("x", 1, 1, 0)), ("??x", ("x", 1, 1, 2)),
    ("  df.group_by?", ("df.group_by", 0, 1, 2)), ("# about x\nx?\n", ("x", 0, 2, 0)),
    ('col("a").alias ?', ('col("a").alias', 0, 1, 0)),
    ("x", None), ("x = 1", None), ("a?\nb?", None), ("x ? y", None), ("???x", None), ("'what?'", None),
])
def test_help_lines_are_recognised(code, expected):
    assert help_request(code) == expected


def test_help_shows_inspection():
    interp = Interpreter(FakeSession())
    interp.run_cell('p = dataset("patients")')
    text = interp.run_cell("p.filter?").value
    assert isinstance(text, HelpText) and text.text.startswith("RemoteFrame.filter(")
    assert "Plan tree:" in interp.run_cell("p??").value.text and "Plan tree:" not in interp.run_cell("?p").value.text
    assert interp.run_cell('col("age") > 1?').value.text.startswith('col("age") > 1: an expression')
    interp.run_cell("patients = p")
    with pytest.raises(BastionError) as info:
        interp.run_cell("\n  pateints?")
    assert "unknown name 'pateints'; did you mean 'patients'?" in info.value.evalue
    assert (info.value.details["line"], info.value.details["col"]) == (2, 2)
    assert not interp.session.fetched


# -- curated habits ----------------------------------------------------------------------------

def test_habit_hints_never_hide_a_real_operation():
    receivers = {"RemoteFrame": frame_module.RemoteFrame, "DataFrame": FetchedTable, "GroupBy": frame_module.GroupBy,
                 "LocalGroupBy": LocalGroupBy, "Expr": expr_module.Expr}
    from bastion_kernel.language.namespaces import DtNamespace, StrNamespace
    receivers.update({"Expr.str": StrNamespace, "Expr.dt": DtNamespace})
    for type_name, hints in ATTRIBUTE_HINTS.items():
        offered = set(polars_attribute_names()) if type_name == "pl" else set(attribute_names(receivers[type_name]))
        assert not offered & set(hints), (type_name, offered & set(hints))
    assert not set(NAME_HINTS) & (set(FUNCTIONS) | {"pl", "col"})


@pytest.mark.parametrize("code,way", [
    ("p.groupby('sex')", ".group_by"), ("p.sort_values('age')", ".sort("), ("p.merge(p)", ".join("),
    ("p.dropna()", ".drop_nulls()"), ("col('a').isnull()", ".is_null()"), ("col('a').astype(int)", ".cast("),
    ("col('a').str.lower()", ".to_lowercase()"), ("col('d').dt.dayofweek()", ".weekday()"),
    ("pl.read_csv('x.csv')", 'dataset("NAME")'), ("np.log(1)", "expressions"), ("help(p)", "x?"),
    ("p.height", "len(frame)"), ("p.tail(3)", ".slice(-n)"),
])
def test_habits_suggest_the_bastion_way(code, way):
    interp = Interpreter(FakeSession())
    interp.run_cell('p = dataset("patients")')
    with pytest.raises(BastionError) as info:
        interp.run_cell(code)
    assert way in info.value.evalue and "did you mean" not in info.value.evalue, info.value.evalue


def test_typos_still_get_edit_distance_suggestions():
    interp = Interpreter(FakeSession())
    interp.run_cell('p = dataset("patients")')
    with pytest.raises(BastionError) as info:
        interp.run_cell("p.gruop_by('sex')")
    assert "did you mean 'group_by'?" in info.value.evalue


def test_a_bar_chart_without_a_value_counts():
    interp = Interpreter(LocalTablesSession())
    chart = interp.run_cell('dataset("patients").plot.bar("sex")').value
    assert chart.columns == ["sex", "count"]
    assert {row["sex"]: row["count"] for row in chart.rows} == {"F": 4, "M": 4}
    line = interp.run_cell('dataset("patients").plot.line("age")').value
    assert line.columns == ["age", "count"]


# -- executor errors placed in the cell ---------------------------------------------------------

def test_executor_plan_paths_become_cell_positions(interp):
    code = 'older = p.filter(col("age") > 60)\nolder.select("age", (col("cost") * col("nope")).alias("x")).fetch()'
    with pytest.raises(BastionError) as info:
        interp.run_cell(code)
    error = info.value
    assert error.ename == "SchemaError" and "(at plan" not in error.evalue and str(error) == error.evalue
    line = code.splitlines()[1]
    assert (error.details["line"], error.details["col"]) == (2, line.index('col("nope")'))
    assert error.details["end_col"] == line.index('col("nope")') + len('col("nope")')


def test_a_path_without_a_known_node_is_only_dropped():
    error = BastionError("SchemaError", "unknown column 'x' (at plan.input.exprs[3].left)", at="plan.input.exprs[3].left")
    place_executor_error(error, {"op": "select"}, PlanPositions())
    assert error.evalue == "unknown column 'x'" and "line" not in error.details


def test_plan_positions_follow_indices_and_keep_the_deepest_known_node():
    positions = PlanPositions()
    inner, outer = P.col("a"), None
    outer = P.frame_op("select", input=P.scan("t"), exprs=[P.col("b"), P.alias(inner, "c")])
    positions.note(outer, {"line": 1, "col": 0})
    positions.note(inner, {"line": 1, "col": 9})
    assert positions.locate(outer, "plan.exprs[1].input") == {"line": 1, "col": 9}
    assert positions.locate(outer, "plan.exprs[0]") == {"line": 1, "col": 0}
    assert positions.locate(outer, "plan.exprs[7].input") == {"line": 1, "col": 0}
    assert positions.locate(outer, "elsewhere") is None
    # A node made by another plan (the same text, another object) is not taken for this one.
    assert positions.locate(P.frame_op("select", input=P.scan("t"), exprs=[P.col("b"), P.alias(P.col("a"), "c")]),
                            "plan.exprs[1].input") is None


def test_the_language_session_is_the_kernels_own():
    session = FakeSession()
    interp = Interpreter(session)
    assert interp.session is session and interp.ctx.session.described is session.described
