"""Every public operation of the language is documented, and its examples run."""
from __future__ import annotations

import ast
import importlib.util
import re

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.operations import doc_index, documented_operations
from bastion_kernel.contract.protocol import BastionError
from language_fake_session import FakeSession, LocalTablesSession

OPERATIONS = documented_operations()
# Operations whose examples need a fetched result with a real table (the others run on plans alone).
NEEDS_TABLES = ("DataFrame.", "LocalGroupBy.", "RemoteFrame.shape", "len")


def test_the_index_covers_the_plan_tables():
    names = {op.qualified_name for op in OPERATIONS}
    for fn_name in P.EXPR_FUNCTIONS:
        space, _, short = fn_name.rpartition(".")
        qualified = f"Expr.{space}.{short}" if space else f"Expr.{short}"
        assert qualified in names, qualified
    for function in ("col", "lit", "len", "when", "dataset", "datasets", "sql", "concat", "request", "print",
                     "display"):
        assert function in names
    for method in ("select", "with_columns", "filter", "group_by", "sort", "head", "limit", "drop", "rename",
                   "drop_nulls", "fill_null", "unique", "join", "with_row_index", "count", "collect", "fetch",
                   "save", "columns", "schema", "dtypes", "width", "shape"):
        assert f"RemoteFrame.{method}" in names
    for method in ("select", "with_columns", "filter", "sort", "head", "tail", "join", "group_by", "rename", "drop",
                   "to_pandas", "write_csv", "write_parquet", "shape", "height", "columns", "schema"):
        assert f"DataFrame.{method}" in names
    assert set(doc_index()) == names


@pytest.mark.parametrize("op", OPERATIONS, ids=[op.qualified_name for op in OPERATIONS])
def test_operation_has_a_numpydoc_docstring(op):
    doc = op.doc
    assert doc, f"{op.qualified_name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.strip() and summary.rstrip().endswith("."), summary
    sections = re.findall(r"^(\w[\w ]*)\n-{3,}$", doc, flags=re.M)
    assert "Returns" in sections
    assert "Examples" in sections
    visible = [p for p in op.visible_parameters()]
    if visible:
        assert "Parameters" in sections, f"{op.qualified_name} documents no parameters"
        for param in visible:
            assert re.search(rf"^\*{{0,2}}[\w, ]*\b{param.name}\b.*:", doc, flags=re.M), \
                f"{op.qualified_name}: parameter {param.name} is not documented"


def _examples(doc: str) -> list[str]:
    return [line.strip()[4:] for line in doc.splitlines() if line.strip().startswith(">>> ")]


@pytest.mark.parametrize("op", OPERATIONS, ids=[op.qualified_name for op in OPERATIONS])
def test_examples_are_bastion_cells_that_run(op, tmp_path, monkeypatch):
    examples = _examples(op.doc)
    assert examples, f"{op.qualified_name} has no example"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tables = op.qualified_name.startswith(NEEDS_TABLES) or op.qualified_name in NEEDS_TABLES
    interp = Interpreter(LocalTablesSession() if tables else FakeSession())
    interp.run_cell('patients = dataset("patients")')
    for example in examples:
        ast.parse(example)
        try:
            interp.run_cell(example)
        except BastionError as exc:  # pragma: no cover - the assertion message says which
            if op.qualified_name == "DataFrame.to_pandas" and importlib.util.find_spec("pandas") is None \
                    and "needs pandas, which is not installed" in exc.evalue:
                continue  # the documented refusal without pandas
            pytest.fail(f"{op.qualified_name} example {example!r} fails: {exc.ename}: {exc.evalue}")
    # the examples use the operation they document
    assert any(op.name in example for example in examples), examples


def _section(doc: str, title: str) -> str:
    return doc.split(f"{title}\n{'-' * len(title)}\n", 1)[1].split("\n\n", 1)[0]


def test_sections_written_once_read_the_same_on_every_operation_that_shares_them():
    docs = doc_index()
    for name in ("select", "with_columns", "filter", "sort", "head", "limit", "slice", "unique", "drop_nulls",
                 "fill_null", "with_row_index", "rename", "drop"):
        shared = _section(docs[f"RemoteFrame.{name}"], "Parameters")
        assert _section(docs[f"DataFrame.{name}"], "Parameters") == shared
        assert "DataFrame" in _section(docs[f"DataFrame.{name}"], "Returns")
    # An entry a receiver writes itself stays its own, in the shared order.
    join = _section(docs["DataFrame.join"], "Parameters")
    assert join.startswith("other : DataFrame\n") and join.endswith(_section(docs["RemoteFrame.join"], "Parameters")
                                                                       .split("on : ", 1)[1])
    assert "maintain_order : bool" in _section(docs["DataFrame.group_by"], "Parameters")
    assert _section(docs["DataFrame.group_by"], "Parameters") != _section(docs["RemoteFrame.group_by"], "Parameters")
    # Every chart method documents its last parameter, wait, and returns a chart.
    charts = [name for name in docs if name.startswith("RemoteFrame.plot.")]
    assert len(charts) == 5
    for name in charts:
        assert _section(docs[name], "Parameters").split("\n")[-4].startswith("wait : bool, default True")
        assert _section(docs[name], "Returns").startswith("Chart\n    Drawn as Vega-Lite")


def test_inspect_shows_each_docstring():
    interp = Interpreter(FakeSession())
    interp.run_cell('patients = dataset("patients")\ne = col("a")\nt = patients.fetch()')
    for op in OPERATIONS:
        if op.receiver is None:
            code = op.name
        else:
            receiver = {"RemoteFrame": "patients", "Expr": "e", "Expr.str": "e.str", "Expr.dt": "e.dt", "Expr.dp": "e.dp",
                        "GroupBy": "patients.group_by('a')", "When": "when(e)",
                        "Then": "when(e).then(1)", "RemoteFrame.plot": "patients.plot", "DataFrame": "t",
                        "LocalGroupBy": "t.group_by('a')"}[op.qualified_name.rsplit(".", 1)[0]]
            code = f"{receiver}.{op.name}"
        text = interp.inspect(code, len(code))
        assert text is not None and op.doc in text, code


def test_the_language_reference_lists_every_error_name():
    from bastion_kernel.contract.protocol import ERROR_NAMES

    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "language.md").read_text()
    listed = set(re.findall(r"^\| `([A-Za-z]+)` \|", text.split("## Errors", 1)[1].split("\n## ", 1)[0], re.M))
    assert listed == set(ERROR_NAMES)
