"""Fetched results, Python habits and error positions, through a real kernel and a real executor.

The kernel runs in its own working directory (the notebook's folder), so the
files it writes can be checked, and with its stderr captured, so ipykernel's
log can be read.  The executor's audit log shows what reached the executor:
the local operations of a fetched result never do.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import polars as pl
import pytest
from jupyter_client.manager import start_new_kernel
from polars.testing import assert_frame_equal

from bastion_kernel.display import DATARESOURCE_MIME, VEGALITE_MIME
from owner_console.audit import read_entries

from test_kernel import TIMEOUT, connect_scientist, execute, of_type

PATIENTS = 'p = dataset("patients")\n'


@contextlib.contextmanager
def kernel_in(folder: Path, config: str, jupyter_path: Path, stderr_file: Path):
    """The installed ``bastion`` kernel started in ``folder`` with ``BASTION_CONFIG=config``; yields ``kc``.

    Its stderr goes to ``stderr_file``, with ipykernel logging at INFO (an IPython profile of the
    test's own, so that the kernel's log lines can be checked).
    """
    profile = stderr_file.parent / "ipython" / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "ipython_kernel_config.py").write_text('c.IPKernelApp.log_level = "INFO"\n')
    with pytest.MonkeyPatch.context() as env, open(stderr_file, "wb") as stderr:
        env.setenv("JUPYTER_PATH", str(jupyter_path))
        env.setenv("BASTION_CONFIG", config)
        env.setenv("IPYTHONDIR", str(profile.parent))
        km, kc = start_new_kernel(kernel_name="bastion", startup_timeout=TIMEOUT, cwd=str(folder), stderr=stderr)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv, try_parse_dates=True)


@pytest.fixture(scope="module")
def scientist_setup(executor, tmp_path_factory):
    return connect_scientist(executor, tmp_path_factory.mktemp("dana"), name="dana")


@pytest.fixture(scope="module")
def notebook_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook")


@pytest.fixture(scope="module")
def kernel_stderr(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernel-log") / "stderr.txt"


@pytest.fixture(scope="module")
def kc(scientist_setup, notebook_folder, kernel_stderr):
    config, jupyter_path = scientist_setup
    with kernel_in(notebook_folder, str(config), jupyter_path, kernel_stderr) as client:
        reply, _ = execute(client, PATIENTS)
        assert reply["status"] == "ok", reply
        yield client


def result_frame(outputs) -> pl.DataFrame:
    [result] = of_type(outputs, "execute_result")
    resource = result["data"][DATARESOURCE_MIME]
    return pl.DataFrame(resource["data"], schema=[f["name"] for f in resource["schema"]["fields"]], orient="row")


def audit_entries(executor) -> list[dict]:
    return list(read_entries(Path(executor.workspace) / "audit.jsonl"))


def ok(kc, code: str):
    reply, outputs = execute(kc, code)
    assert reply["status"] == "ok", reply
    return outputs


def refused(kc, code: str) -> dict:
    reply, _ = execute(kc, code)
    assert reply["status"] == "error", reply
    return reply


# -- fetched results are local frames ---------------------------------------------------------

def test_a_fetched_result_is_sorted_filtered_joined_and_written_in_the_kernel(kc, executor, source,
                                                                               notebook_folder):
    ok(kc, 'counts = p.group_by("diagnosis").agg(n=pl.len()).fetch()\n'
           'costs = p.group_by("diagnosis").agg(mean_cost=col("cost").mean()).fetch()')
    before = len(audit_entries(executor))
    outputs = ok(kc, 'table = counts.filter(col("n") >= 10).join(costs, on="diagnosis")'
                     '.sort("mean_cost", descending=True)\n'
                     'table.write_csv("by_diagnosis.csv")\n'
                     'table.with_columns(thousands=col("mean_cost") / 1000).head(3)')
    # Nothing of that cell reached the executor: no request, no audit entry.
    assert len(audit_entries(executor)) == before
    expected = (source.group_by("diagnosis").agg(n=pl.len())
                .join(source.group_by("diagnosis").agg(mean_cost=pl.col("cost").mean()), on="diagnosis")
                .filter(pl.col("n") >= 10).sort("mean_cost", descending=True))
    written = pl.read_csv(notebook_folder / "by_diagnosis.csv")
    assert_frame_equal(written, expected, check_dtypes=False)
    shown = result_frame(outputs)
    assert_frame_equal(shown, expected.with_columns(thousands=pl.col("mean_cost") / 1000).head(3), check_dtypes=False)
    outputs = ok(kc, 'table.shape, table.height, len(table), table.columns')
    [result] = of_type(outputs, "execute_result")
    assert result["data"]["text/plain"] == repr(((expected.height, 3), expected.height, expected.height,
                                                  ["diagnosis", "n", "mean_cost"]))


def test_local_group_by_and_parquet(kc, source, notebook_folder):
    ok(kc, 'p.group_by("sex", "diagnosis").agg(pl.len()).fetch().group_by("sex").agg(col("len").sum())'
           '.sort("sex").write_parquet("by_sex.parquet")')
    expected = source.group_by("sex").agg(pl.len()).sort("sex")
    assert_frame_equal(pl.read_parquet(notebook_folder / "by_sex.parquet"), expected, check_dtypes=False)


@pytest.mark.parametrize("name", ["{outside}/escape.csv", "../escape.csv", "link/escape.csv", "~/escape.csv"])
def test_writes_outside_the_notebook_folder_are_refused(kc, notebook_folder, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = notebook_folder / "link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    else:
        link.unlink()
        link.symlink_to(outside, target_is_directory=True)
    ok(kc, 'small = p.group_by("sex").agg(pl.len()).fetch()')
    reply = refused(kc, f'small.write_csv({name.format(outside=outside)!r})')
    assert reply["ename"] == "UnsupportedOperation"
    assert "writes into the notebook's folder only" in reply["evalue"]
    assert not (outside / "escape.csv").exists()
    assert not (notebook_folder.parent / "escape.csv").exists()


def test_collect_fetches_and_saves_nothing(kc, source):
    [before] = of_type(ok(kc, "datasets()"), "execute_result")
    outputs = ok(kc, 'p.group_by("sex").agg(pl.len()).collect().sort("sex")')
    assert_frame_equal(result_frame(outputs), source.group_by("sex").agg(pl.len()).sort("sex"), check_dtypes=False)
    [after] = of_type(ok(kc, "datasets()"), "execute_result")
    assert after["data"]["text/plain"] == before["data"]["text/plain"]
    assert "collected_" not in after["data"]["text/plain"]


def test_a_remote_frame_is_not_joined_to_a_fetched_result(kc):
    reply = refused(kc, 'p.group_by("sex").agg(pl.len()).fetch().join(p, on="sex")')
    assert reply["ename"] == "SchemaError" and "fetch it first" in reply["evalue"]


def test_to_pandas_needs_pandas_in_the_kernels_environment(kc):
    reply, outputs = execute(kc, 'p.group_by("sex").agg(pl.len()).fetch().sort("sex").to_pandas()')
    if importlib.util.find_spec("pandas") is None:  # the kernel runs in this test's environment
        assert reply["status"] == "error" and "needs pandas, which is not installed" in reply["evalue"]
    else:
        assert reply["status"] == "ok", reply
        [result] = of_type(outputs, "execute_result")
        assert "sex" in result["data"]["text/plain"] and "len" in result["data"]["text/plain"]


# -- Python habits ------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["import polars as pl\npl.col('age')", "import polars\npolars.col('age')",
                                  "from polars import col\ncol('age')"])
def test_importing_polars_names_the_languages_pl(kc, code):
    [result] = of_type(ok(kc, code), "execute_result")
    assert 'col("age")' in result["data"]["text/plain"]


def test_other_imports_are_refused_naming_the_module(kc):
    reply = refused(kc, "import polars as pl\nimport pandas as pd")
    assert reply["ename"] == "UnsupportedOperation" and reply["evalue"].startswith("import pandas:")
    assert ".to_pandas()" in reply["evalue"]


def test_print_and_display_show_at_once(kc):
    outputs = ok(kc, 'print("columns:", p.columns)\ndisplay(p.group_by("sex").agg(pl.len()).fetch())\n1 + 1')
    assert [m["msg_type"] for m in outputs] == ["stream", "display_data", "execute_result"]
    [stream] = of_type(outputs, "stream")
    assert stream["name"] == "stdout" and stream["text"].startswith("columns: ['patient_id', 'name', 'age'")
    [shown] = of_type(outputs, "display_data")
    assert DATARESOURCE_MIME in shown["data"] and "<table>" in shown["data"]["text/html"]


def test_len_and_shape_of_a_remote_frame_are_counts_through_the_policy(kc, source):
    [result] = of_type(ok(kc, "len(p)"), "execute_result")
    assert result["data"]["text/plain"] == str(source.height)
    [result] = of_type(ok(kc, 'p.filter(col("age") >= 60).shape'), "execute_result")
    assert result["data"]["text/plain"] == repr((source.filter(pl.col("age") >= 60).height, source.width))


@pytest.mark.parametrize("code,detail", [("?p", "Schema:"), ("p?", "Schema:"), ("p??", "Plan tree:"),
                                         ("p.group_by?", "RemoteFrame.group_by(*by"),
                                         ("??col", "col(name, *more_names)")])
def test_ipython_help_syntax_shows_inspection(kc, code, detail):
    reply, outputs = execute(kc, code)
    assert reply["status"] == "ok", reply
    assert not of_type(outputs, "execute_result")
    [page] = reply["payload"]  # as IPython answers x?
    assert page["source"] == "page" and detail in page["data"]["text/plain"]


@pytest.mark.parametrize("code,way", [
    ('p.groupby("sex")', '.group_by("x").agg(...)'),
    ("p.iloc", ".head(n)"),
    ("p.loc", ".filter("),
    ('p.apply("x")', "write it as an expression"),
    ('p.to_csv("x.csv")', '.fetch().write_csv("file.csv")'),
    ("p.value_counts()", 'group_by("x").agg(pl.len())'),
    ("type(p)", "x? shows what x is"),
    ("dir(p)", "press Tab"),
    ("list(p.columns)", "already a list"),
    ('p.group_by("sex").agg(pl.len()).fetch().to_csv("x.csv")', '.write_csv("file.csv")'),
])
def test_python_habits_get_the_bastion_way(kc, code, way):
    reply = refused(kc, code)
    assert reply["ename"] == "UnsupportedOperation"
    assert way in reply["evalue"], reply["evalue"]
    assert "did you mean" not in reply["evalue"]


def test_a_bar_chart_without_a_value_column_counts(kc, source):
    [chart] = of_type(ok(kc, 'p.plot.bar("sex")'), "execute_result")
    values = {row["sex"]: row["count"] for row in chart["data"][VEGALITE_MIME]["data"]["values"]}
    assert values == dict(source.group_by("sex").len().iter_rows())


# -- errors point at the cell, never at plan paths ---------------------------------------------

def test_an_executor_error_points_at_the_sub_expression(kc):
    code = 'adults = p.filter(col("age") >= 18)\nadults.filter(col("nope") > 1).select("age").fetch()'
    reply = refused(kc, code)
    assert reply["ename"] == "SchemaError" and "nope" in reply["evalue"]
    assert "plan." not in reply["evalue"] and not any("plan." in line for line in reply["traceback"])
    assert reply["traceback"][0] == "  cell line 2, column 15:"
    assert reply["traceback"][2] == "    " + " " * 14 + "^" * len('col("nope")')


def test_an_sql_error_shows_no_plan_path(kc):
    reply = refused(kc, "%%sql\nSELECT age FROM patients WHERE nope > 1")
    assert "plan." not in reply["evalue"]


# -- the kernel's own set-up ------------------------------------------------------------------------

def test_the_unencrypted_tcp_warning_is_explained_on_loopback(kc, kernel_stderr):
    ok(kc, "1")
    log = kernel_stderr.read_text(errors="replace")
    assert "Starting the kernel at pid" in log  # the log is captured at INFO
    assert "without encryption" not in log
    assert "loopback: nothing leaves this machine" in log and "CURVE-encrypted" in log


def test_a_config_error_names_the_absolute_path_it_looked_in(scientist_setup, tmp_path):
    _, jupyter_path = scientist_setup
    folder = tmp_path / "examples"
    folder.mkdir()
    with kernel_in(folder, os.path.join("demo", "scientist", "config.toml"), jupyter_path,
                   tmp_path / "stderr.txt") as client:
        reply = refused(client, "datasets()")
    assert reply["ename"] == "ConfigError"
    assert str(folder / "demo" / "scientist" / "config.toml") in reply["evalue"]
    assert "relative path" in reply["evalue"] and str(folder) in reply["evalue"]
