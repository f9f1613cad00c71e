"""The Bastion kernel end to end: a real kernel (jupyter_client) talking to a real executor.

The scientist's side is set up as a scientist would: ``bastion-kernel keygen``,
the owner's ``bastion-owner scientist add``, ``bastion-kernel connect`` and
``bastion-kernel install --prefix`` into a temporary prefix that
``JUPYTER_PATH`` points at.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from jupyter_client.manager import start_new_kernel

from bastion_kernel.display import DATARESOURCE_MIME

TIMEOUT = 60
CLI = str(Path(sys.executable).parent / "bastion-kernel")
WAITING = re.compile(r"waiting for the owner \(request #(\d+)\)")


def waiting_display(msg: dict):
    """The ``WAITING`` match of a ``display_data`` message that says a request waits for the owner, else None."""
    if msg["msg_type"] != "display_data":
        return None
    return WAITING.search(msg["content"].get("data", {}).get("text/plain", ""))


# -- set-up helpers (shared with test_kernel_conformance.py) ------------------------------

def scientist_cli(*args: str) -> None:
    done = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def connect_scientist(executor, directory: Path, name: str = "carol") -> tuple[Path, Path]:
    """Keys, registration, config and kernelspec for a new scientist.

    Returns ``(config file, jupyter data dir)`` for ``BASTION_CONFIG`` and ``JUPYTER_PATH``.
    """
    keys, config, prefix = directory / "keys", directory / "config.toml", directory / "prefix"
    scientist_cli("keygen", "--dir", str(keys))
    added = executor.owner("scientist", "add", name, str(keys / "scientist.key"))
    assert added.returncode == 0, added.stderr
    scientist_cli("connect", "--endpoint", executor.endpoint, "--server-key",
                  str(Path(executor.workspace) / "keys" / "server.key"), "--key-dir", str(keys),
                  "--config", str(config))
    scientist_cli("install", "--prefix", str(prefix))
    return config, prefix / "share" / "jupyter"


@contextlib.contextmanager
def bastion_kernel(config: Path, jupyter_path: Path):
    """Start the installed ``bastion`` kernel with this configuration; yields ``(km, kc)``."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(jupyter_path))
        env.setenv("BASTION_CONFIG", str(config))
        km, kc = start_new_kernel(kernel_name="bastion", startup_timeout=TIMEOUT)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, on_output=None, silent: bool = False, timeout: float = TIMEOUT,
            allow_stdin: bool | None = None):
    """Run one cell; returns ``(reply content, [iopub output messages])``.

    ``on_output(msg)`` sees each output message as it arrives (the cell is
    still running then).  ``allow_stdin=False`` runs it as nbconvert and
    papermill do.
    """
    msg_id = kc.execute(code, silent=silent, stop_on_error=False, allow_stdin=allow_stdin)
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "status":
            if msg["content"]["execution_state"] == "idle":
                break
            continue
        if kind == "execute_input":
            continue
        outputs.append(msg)
        if on_output is not None:
            on_output(msg)
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"], outputs


def of_type(outputs, msg_type: str) -> list[dict]:
    return [m["content"] for m in outputs if m["msg_type"] == msg_type]


def shell_reply(kc, msg_id: str) -> dict:
    while True:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv, try_parse_dates=True)


@pytest.fixture(scope="module")
def scientist_setup(executor, tmp_path_factory):
    return connect_scientist(executor, tmp_path_factory.mktemp("carol"))


@pytest.fixture(scope="module")
def kernel(scientist_setup):
    with bastion_kernel(*scientist_setup) as (km, kc):
        yield km, kc


@pytest.fixture
def kc(kernel):
    return kernel[1]


# -- tests ---------------------------------------------------------------------------

def test_kernel_info(kc):
    msg_id = kc.kernel_info()
    info = shell_reply(kc, msg_id)
    assert info["status"] == "ok"
    assert info["implementation"] == "bastion"
    assert info["language_info"]["name"] == "bastion"
    assert info["language_info"]["mimetype"] == "text/x-python"
    assert "debugger" not in info["supported_features"]


def test_local_arithmetic_gives_an_execute_result(kc):
    reply, outputs = execute(kc, "1 + 2")
    assert reply["status"] == "ok"
    results = of_type(outputs, "execute_result")
    assert [r["data"]["text/plain"] for r in results] == ["3"]
    assert results[0]["execution_count"] == reply["execution_count"]


def test_datasets_are_listed(kc):
    reply, outputs = execute(kc, "datasets()")
    assert reply["status"] == "ok", reply
    [result] = of_type(outputs, "execute_result")
    plain = result["data"]["text/plain"]
    for name in ("patients", "patients_strict", "patients_open"):
        assert name in plain
    assert "K=10" in plain and "hidden: name" in plain
    assert "<table>" in result["data"]["text/html"]


def test_an_aggregate_fetch_matches_plain_polars(kc, source):
    reply, outputs = execute(kc, 'dataset("patients").group_by("sex").agg(col("cost").mean()).fetch()')
    assert reply["status"] == "ok", reply
    [result] = of_type(outputs, "execute_result")
    assert {"text/plain", "text/html", DATARESOURCE_MIME} <= set(result["data"])
    resource = result["data"][DATARESOURCE_MIME]
    assert [f["name"] for f in resource["schema"]["fields"]] == ["sex", "cost"]
    assert [f["type"] for f in resource["schema"]["fields"]] == ["string", "number"]
    expected = dict(source.group_by("sex").agg(pl.col("cost").mean()).iter_rows())
    got = {row["sex"]: row["cost"] for row in resource["data"]}
    assert got.keys() == expected.keys()
    for sex, mean in expected.items():
        assert got[sex] == pytest.approx(mean, rel=1e-12)
    # nothing waited for the owner (a slow reply may show "running", never "waiting")
    assert not any(WAITING.search(d["data"]["text/plain"]) for d in of_type(outputs, "display_data"))


def test_a_row_level_fetch_waits_for_the_owner_in_the_same_cell(kc, executor, source):
    approved = []

    def approve_when_waiting(msg):
        # A progress line (a slow first query) may come before the waiting display.
        match = waiting_display(msg)
        if match and not approved:
            approved.append(int(match.group(1)))
            done = executor.owner("approve", match.group(1))
            assert done.returncode == 0, done.stderr

    reply, outputs = execute(kc, 'dataset("patients").select(col("name"), col("age")).head(5).fetch()',
                             on_output=approve_when_waiting)
    assert reply["status"] == "ok", reply
    [waiting] = [d for d in of_type(outputs, "display_data") if WAITING.search(d["data"]["text/plain"])]
    display_id = waiting["transient"]["display_id"]
    updates = of_type(outputs, "update_display_data")
    assert updates and all(u["transient"]["display_id"] == display_id for u in updates)
    assert f"request #{approved[0]}: approved" in updates[-1]["data"]["text/plain"]
    [result] = of_type(outputs, "execute_result")
    rows = result["data"][DATARESOURCE_MIME]["data"]
    assert [row["name"] for row in rows] == ["*"] * 5  # the hidden column
    assert [row["age"] for row in rows] == source["age"].head(5).to_list()
    assert "Ada" not in result["data"]["text/html"]


def test_an_interrupted_wait_can_be_picked_up_with_request(kernel, executor, source):
    km, kc = kernel
    waiting = []

    def interrupt_when_waiting(msg):
        match = waiting_display(msg)
        if match and not waiting:
            waiting.append(int(match.group(1)))
            km.interrupt_kernel()

    reply, outputs = execute(kc, 'dataset("patients").select(col("age")).head(3).fetch()',
                             on_output=interrupt_when_waiting)
    request_id = waiting[0]
    # The wait ends as a batch run's held cell does: the request id, and how to pick it up.
    assert reply["status"] == "error" and reply["ename"] == "ReviewPending"
    assert f"request #{request_id}" in reply["evalue"] and f"request({request_id})" in reply["evalue"]
    assert of_type(outputs, "error")[0]["ename"] == "ReviewPending"

    reply, outputs = execute(kc, f"request({request_id})")
    assert reply["status"] == "ok", reply
    assert "pending" in of_type(outputs, "execute_result")[0]["data"]["text/plain"]

    assert executor.owner("approve", str(request_id)).returncode == 0
    reply, outputs = execute(kc, f"request({request_id})")
    assert reply["status"] == "ok", reply
    rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
    assert [row["age"] for row in rows] == source["age"].head(3).to_list()


def test_a_refused_policy_is_an_error_reply(kc):
    reply, outputs = execute(kc, 'dataset("patients_strict").select(col("age")).head(2).fetch()')
    assert reply["status"] == "error"
    assert reply["ename"] == "PolicyViolation"
    [error] = of_type(outputs, "error")
    assert error["ename"] == "PolicyViolation" and error["traceback"][-1].startswith("PolicyViolation: ")


@pytest.mark.parametrize("code", ["import os", "df.__class__", "lambda: 1", 'open("x")', "!ls", "%time 1"])
def test_python_is_refused_and_the_kernel_keeps_serving(kc, code):
    reply, _ = execute(kc, 'df = dataset("patients")')
    assert reply["status"] == "ok", reply
    reply, outputs = execute(kc, code)
    assert reply["status"] == "error"
    assert reply["ename"] == "UnsupportedOperation"
    assert set(reply) >= {"ename", "evalue", "traceback", "execution_count"}
    assert [m["msg_type"] for m in outputs] == ["error"]
    assert reply["traceback"][-1] == f"UnsupportedOperation: {reply['evalue']}"
    reply, outputs = execute(kc, "40 + 2")
    assert reply["status"] == "ok"
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"] == "42"


def test_an_error_traceback_points_at_the_offending_part(kc):
    code = 'df = dataset("patients")\ndf.filter(col("age") > 3).pivot("x")'
    reply, _ = execute(kc, code)
    assert reply["status"] == "error"
    source_line, caret = reply["traceback"][1], reply["traceback"][2]
    assert source_line.strip() == code.splitlines()[1]
    assert caret.index("^") == source_line.index("pivot")


def test_a_parse_error_is_reported(kc):
    reply, _ = execute(kc, "x = (")
    assert reply["status"] == "error" and reply["ename"] == "ParseError"


def test_silent_execution_publishes_nothing(kc):
    reply, outputs = execute(kc, "1 + 2", silent=True)
    assert reply["status"] == "ok"
    assert outputs == []
    reply, outputs = execute(kc, "import os", silent=True)
    assert reply["status"] == "error" and outputs == []


@pytest.mark.parametrize("code, status", [
    ("1 + 2", "complete"),
    ('dataset("patients").filter(', "incomplete"),
    ("x = (1,", "incomplete"),
    ("1 +* 2", "invalid"),
])
def test_is_complete(kc, code, status):
    msg_id = kc.is_complete(code)
    assert shell_reply(kc, msg_id)["status"] == status


def test_completion_of_frame_methods_and_dataset_names(kc):
    execute(kc, 'df = dataset("patients")')
    code = "df."
    reply = shell_reply(kc, kc.complete(code, len(code)))
    assert {"filter", "group_by", "select", "fetch"} <= set(reply["matches"])
    assert reply["cursor_start"] == reply["cursor_end"] == len(code)
    code = 'dataset("'
    reply = shell_reply(kc, kc.complete(code, len(code)))
    assert {"patients", "patients_strict", "patients_open"} <= set(reply["matches"])
    code = 'df.filter(col("ag'
    reply = shell_reply(kc, kc.complete(code, len(code)))
    assert "age" in reply["matches"]


def test_inspect_shows_help(kc):
    code = "df.group_by"
    reply = shell_reply(kc, kc.inspect(code, len(code)))
    assert reply["status"] == "ok" and reply["found"] is True
    assert "group_by" in reply["data"]["text/plain"]


def test_history_keeps_the_cells(kc):
    execute(kc, "7 * 6")
    reply = shell_reply(kc, kc.history(hist_access_type="tail", n=1, output=False, raw=True))
    assert reply["status"] == "ok"
    assert reply["history"][-1][2] == "7 * 6"


def test_comms_are_not_served(kc):
    reply = shell_reply(kc, kc.comm_info())
    assert reply["status"] == "ok" and reply["comms"] == {}


def test_without_a_configuration_the_kernel_starts_and_explains(scientist_setup, tmp_path):
    _, jupyter_path = scientist_setup
    with bastion_kernel(tmp_path / "no-config.toml", jupyter_path) as (_, kc):
        reply, outputs = execute(kc, "1 + 2")
        assert reply["status"] == "ok"
        code = "pl.co"
        assert "col" in shell_reply(kc, kc.complete(code, len(code)))["matches"]
        reply, outputs = execute(kc, "datasets()")
        assert reply["status"] == "error" and reply["ename"] == "ConfigError"
        assert "bastion-kernel connect" in reply["evalue"]
        assert str(tmp_path / "no-config.toml") in reply["evalue"]
