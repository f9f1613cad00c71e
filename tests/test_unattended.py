"""Unattended runs: re-runs answered from approvals, batch clients that never wait, nbconvert and papermill.

A real executor (``bastion-owner serve``) over its own copy of the patients
table, and for the kernel tests a real Bastion kernel set up as a scientist
would (see ``test_kernel.py``).  Requests are counted in the executor's
approval store: "no new request" means the store holds as many as before.

- the wire: a held query sent again is the same request; approved, it comes
  back at once (a ``release``, then ``rerelease`` entries) to its key only,
  until the approval expires or, approved ``--once``, after one release; a
  changed data file or policy makes a new review; a rejected one is rejected
  at once;
- the kernel: ``fetch(wait=False)``, ``%%sql --no-wait`` and
  ``plot.*(wait=False)`` answer with the request's id; ``request(N)`` fetches
  it; a cell run with ``allow_stdin: false`` (nbconvert, papermill) ends at
  once with ``ReviewPending``; a notebook run again after approval files no
  new request;
- ``jupyter nbconvert --execute --allow-errors`` writes the example notebook
  with its held cells' errors; ``papermill -k bastion -p NAME VALUE`` runs.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nbformat
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import col, frame_op, scan
from owner_console.audit import read_entries
from owner_console.workspace import DEFAULT_APPROVAL_TTL_SECONDS, Workspace, WorkspaceError

from conftest import make_workspace, register_scientists, running_executor
from test_kernel import DATARESOURCE_MIME, WAITING, bastion_kernel, connect_scientist, execute, of_type

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60
BOUNDS = {"age": (0, 100), "length_of_stay": (0, 60), "cost": (0, 200000)}


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def owned(tmp_path_factory, patients_csv):
    """A workspace over its own copies of the table: ``patients`` (with the demo's public bounds), and
    ``visits``, whose file and policy the tests change."""
    data = tmp_path_factory.mktemp("unattended-data")
    csv, visits = data / "patients.csv", data / "visits.csv"
    shutil.copy(patients_csv, csv)
    shutil.copy(patients_csv, visits)
    owner = make_workspace(tmp_path_factory.mktemp("unattended") / "ws", csv)
    owner.workspace.add_dataset("patients", csv, min_group_size=10, hidden=["name"], bounds=BOUNDS, replace=True)
    owner.workspace.add_dataset("visits", visits, min_group_size=10, hidden=["name"])
    return owner


@pytest.fixture(scope="module")
def keys(tmp_path_factory, owned):
    return register_scientists(owned.workspace, tmp_path_factory.mktemp("unattended-keys"), ("alice", "bob"))


@pytest.fixture(scope="module")
def running(owned, keys):
    with running_executor(owned.path, keys) as process:
        yield process


@pytest.fixture(scope="module")
def source(owned) -> pl.DataFrame:
    return pl.read_csv(owned.data_file, try_parse_dates=True)


@pytest.fixture(scope="module")
def scientist(running, tmp_path_factory):
    """``(config file, jupyter data dir)`` of scientist erin (keys, registration, kernelspec)."""
    return connect_scientist(running, tmp_path_factory.mktemp("erin"), name="erin")


@pytest.fixture(scope="module")
def kernel(scientist):
    with bastion_kernel(*scientist) as (km, kc):
        yield km, kc


# -- helpers -------------------------------------------------------------------------------

def rows_plan(columns, n, dataset="patients"):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def fetch(client, plan):
    return client.request("fetch", {"plan": plan, "text": "a cell"}, timeout=TIMEOUT)


def table(frames) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(frames[0]))


def requests_filed(owned) -> int:
    store = owned.workspace.approvals()
    try:
        return len(store.list())
    finally:
        store.close()


def events_of(owned, request_id) -> list[str]:
    return [e["event"] for e in read_entries(owned.workspace.audit_path) if e.get("request_id") == request_id]


def approve(running, request_id, *flags):
    done = running.owner("approve", str(request_id), *flags)
    assert done.returncode == 0, done.stderr


def backdate(owned, request_id: int, seconds: float) -> None:
    """Move a decision ``seconds`` into the past, as if that much time had gone by."""
    when = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=seconds)
    with sqlite3.connect(owned.workspace.approvals_path, timeout=30) as conn:
        conn.execute("UPDATE requests SET decided_at = ? WHERE id = ?", (when.isoformat(), request_id))


def execute_batch(kc, code: str):
    """Run one cell as nbconvert and papermill do (``allow_stdin: false``); ``(reply, outputs)``."""
    return execute(kc, code, allow_stdin=False, timeout=TIMEOUT)


def kernel_env(scientist) -> dict:
    config, jupyter_path = scientist
    return dict(os.environ, BASTION_CONFIG=str(config), JUPYTER_PATH=str(jupyter_path))


# -- the wire: re-runs answered from earlier requests --------------------------------------------

def test_a_rerun_files_no_new_request_and_an_approved_one_comes_back_at_once_to_its_key_only(running, owned, source):
    alice, bob = running.client("alice"), running.client("bob")
    plan = rows_plan(("age", "sex"), 4)
    kind, body, _ = fetch(alice, plan)
    assert kind == "pending"
    request_id = body["request_id"]
    filed = requests_filed(owned)

    kind, again, _ = fetch(alice, plan)  # Restart & Run All before the owner decided
    assert (kind, again["request_id"], again["reason"]) == ("pending", request_id, body["reason"])
    assert requests_filed(owned) == filed

    approve(running, request_id)
    expected = source.select("age", "sex").head(4)
    for _ in range(3):  # the first re-run consumes the approval, the next ones are re-releases
        kind, body, frames = fetch(alice, plan)
        assert kind == "result" and body["request_id"] == request_id
        assert_frame_equal(table(frames), expected)
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "result" and body["request_id"] == request_id
    assert requests_filed(owned) == filed
    assert events_of(owned, request_id) == ["held", "held", "approval", "release", "rerelease", "rerelease",
                                            "rerelease"]

    # Another scientist's key never gets alice's approval: the same plan is a new review for bob.
    kind, theirs, _ = fetch(bob, plan)
    assert kind == "pending" and theirs["request_id"] != request_id
    kind, refused, _ = bob.request("request_status", {"request_id": request_id})
    assert (kind, refused["ename"]) == ("error", "NotFound")


def test_an_approval_for_one_release_sends_its_table_once(running, owned):
    alice = running.client("alice")
    plan = rows_plan(("cost",), 3)
    request_id = fetch(alice, plan)[1]["request_id"]
    approve(running, request_id, "--once")
    kind, body, _ = fetch(alice, plan)
    assert kind == "result" and body["request_id"] == request_id

    kind, body, _ = alice.request("request_status", {"request_id": request_id})
    assert kind == "error" and body["ename"] == "NotFound" and "one release" in body["evalue"]
    kind, body, _ = fetch(alice, plan)  # a re-run goes to review again
    assert kind == "pending" and body["request_id"] > request_id
    assert "rerelease" not in events_of(owned, request_id)


def test_an_approval_serves_reruns_until_it_expires(running, owned):
    alice = running.client("alice")
    plan = rows_plan(("zip",), 3)
    request_id = fetch(alice, plan)[1]["request_id"]
    approve(running, request_id)
    assert fetch(alice, plan)[0] == "result"
    backdate(owned, request_id, DEFAULT_APPROVAL_TTL_SECONDS + 60)

    kind, body, _ = alice.request("request_status", {"request_id": request_id})
    assert kind == "error" and body["ename"] == "NotFound" and "expired" in body["evalue"]
    assert body["details"]["status"] == "expired"
    kind, body, _ = fetch(alice, plan)
    assert kind == "pending" and body["request_id"] > request_id
    assert not owned.workspace.result_path(request_id).exists()  # the sweep dropped the spent table


def test_a_changed_data_file_or_policy_needs_a_new_review(running, owned):
    alice = running.client("alice")
    plan = rows_plan(("age",), 5, dataset="visits")
    first = fetch(alice, plan)[1]["request_id"]
    approve(running, first)
    kind, body, frames = fetch(alice, plan)
    assert kind == "result" and body["request_id"] == first
    before = table(frames)

    # The owner replaces the file: the approval of the old data does not answer the query on the new data.
    visits = owned.workspace.catalog()["visits"].path
    changed = pl.read_csv(visits, try_parse_dates=True).with_columns(pl.col("age") + 1)
    changed.write_csv(visits)
    kind, body, _ = fetch(alice, plan)
    assert kind == "pending" and body["request_id"] > first
    second = body["request_id"]
    approve(running, second)
    kind, body, frames = fetch(alice, plan)
    assert kind == "result" and body["request_id"] == second
    assert table(frames)["age"].to_list() == [age + 1 for age in before["age"].to_list()]

    # The owner changes the policy: a new review too.
    owned.workspace.add_dataset("visits", visits, min_group_size=12, hidden=["name"], replace=True)
    kind, body, _ = fetch(alice, plan)
    assert kind == "pending" and body["request_id"] > second
    # request(N) still gives the table that was approved (it is that request's, whatever the data now).
    kind, body, frames = alice.request("request_status", {"request_id": first})
    assert kind == "result" and body["request_id"] == first
    assert_frame_equal(table(frames), before)


def test_a_rejected_query_run_again_is_rejected_at_once(running, owned):
    alice = running.client("alice")
    plan = rows_plan(("length_of_stay",), 2)
    request_id = fetch(alice, plan)[1]["request_id"]
    done = running.owner("reject", str(request_id), "--reason", "stays are not released row by row")
    assert done.returncode == 0, done.stderr
    filed = requests_filed(owned)
    kind, body, _ = fetch(alice, plan)
    assert kind == "error" and body["ename"] == "ReviewRejected"
    assert body["details"] == {"request_id": request_id, "reason": "stays are not released row by row"}
    assert requests_filed(owned) == filed


def test_the_workspace_chooses_one_release_per_approval(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.init(approval_reuse="once")
    assert workspace.approval_reuse == "once"
    with pytest.raises(WorkspaceError, match="approval_reuse"):
        Workspace(tmp_path / "other").init(approval_reuse="forever")
    config = workspace.config_path.read_text().replace('"once"', '"twice"')
    workspace.config_path.write_text(config)
    with pytest.raises(WorkspaceError, match="approval_reuse must be one of until_expiry, once"):
        workspace.approval_reuse


# -- the kernel --------------------------------------------------------------------------------

def test_fetch_without_waiting_then_request_then_the_same_cell_again(kernel, running, owned, source):
    _, kc = kernel
    cell = 'dataset("patients").select(col("age"), col("cost")).head(6).fetch(wait=False)'
    reply, outputs = execute(kc, cell)
    assert reply["status"] == "ok", reply
    plain = of_type(outputs, "execute_result")[0]["data"]["text/plain"]
    request_id = int(re.search(r"request #(\d+): pending", plain).group(1))
    assert f"request({request_id})" in plain
    assert not any(WAITING.search(d["data"].get("text/plain", "")) for d in of_type(outputs, "display_data"))

    approve(running, request_id)
    filed = requests_filed(owned)
    reply, outputs = execute(kc, f"request({request_id})")
    assert reply["status"] == "ok", reply
    rows = of_type(outputs, "execute_result")[0]["data"][DATARESOURCE_MIME]["data"]
    assert [(r["age"], r["cost"]) for r in rows] == list(source.select("age", "cost").head(6).iter_rows())

    reply, outputs = execute(kc, cell.replace("wait=False", ""))  # run again: the approved result, at once
    assert reply["status"] == "ok", reply
    result = of_type(outputs, "execute_result")[0]["data"]
    assert len(result[DATARESOURCE_MIME]["data"]) == 6 and f"request #{request_id}" in result["text/plain"]
    assert requests_filed(owned) == filed


def test_sql_cells_and_charts_need_not_wait(kernel):
    _, kc = kernel
    reply, outputs = execute(kc, "%%sql --no-wait\nSELECT age, sex FROM patients LIMIT 7")
    assert reply["status"] == "ok", reply
    assert re.search(r"request #\d+: pending", of_type(outputs, "execute_result")[0]["data"]["text/plain"])

    reply, outputs = execute(kc, 'dataset("patients").plot.heatmap("age", "cost", bins=(50, 50), wait=False)')
    assert reply["status"] == "ok", reply
    assert re.search(r"request #\d+: pending", of_type(outputs, "execute_result")[0]["data"]["text/plain"])

    reply, _ = execute(kc, "%%sql --nowait\nSELECT age FROM patients LIMIT 7")
    assert reply["status"] == "error" and reply["ename"] == "UnsupportedOperation"
    assert "--no-wait" in reply["evalue"]
    reply, _ = execute(kc, 'dataset("patients").head(2).fetch(wait="no")')
    assert reply["status"] == "error" and reply["ename"] == "SchemaError"


def test_a_batch_client_never_waits_for_the_owner(kernel, owned):
    _, kc = kernel
    cell = 'dataset("patients").select(col("sex"), col("zip")).head(3).fetch()'
    reply, outputs = execute_batch(kc, cell)
    assert reply["status"] == "error" and reply["ename"] == "ReviewPending", reply
    request_id = int(re.search(r"request #(\d+) waits for the owner's review", reply["evalue"]).group(1))
    assert f"request({request_id})" in reply["evalue"]
    assert [m["msg_type"] for m in outputs if m["msg_type"] != "display_data"] == ["error"]
    assert not any(WAITING.search(m["content"]["data"].get("text/plain", ""))
                   for m in outputs if m["msg_type"] == "display_data")
    filed = requests_filed(owned)
    reply, _ = execute_batch(kc, cell)  # the same cell again: the same request, none filed
    assert reply["ename"] == "ReviewPending" and f"request #{request_id} " in reply["evalue"]
    assert requests_filed(owned) == filed
    # Aggregates released at once need no waiting and run as usual.
    reply, outputs = execute_batch(kc, 'dataset("patients").group_by("sex").agg(pl.len()).fetch()')
    assert reply["status"] == "ok" and of_type(outputs, "execute_result")


def test_restart_and_run_all_after_the_approval_files_no_new_request(scientist, running, owned, source):
    from nbclient import NotebookClient

    cells = ['adults = dataset("patients").filter(col("age") >= 30)',
             'adults.select(col("age"), col("diagnosis")).head(4).fetch()']

    def run_all():
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
        with pytest.MonkeyPatch.context() as env:
            env.setenv("BASTION_CONFIG", str(scientist[0]))
            env.setenv("JUPYTER_PATH", str(scientist[1]))
            NotebookClient(notebook, timeout=TIMEOUT, kernel_name="bastion", allow_errors=True).execute()
        return notebook.cells[1].outputs

    [held] = run_all()
    assert held.output_type == "error" and held.ename == "ReviewPending"
    request_id = int(re.search(r"request #(\d+)", held.evalue).group(1))
    approve(running, request_id)
    filed = requests_filed(owned)
    [result] = run_all()  # Restart & Run All: a new kernel, the approved result at once
    assert result.output_type == "execute_result", result
    got = pl.DataFrame(result.data[DATARESOURCE_MIME]["data"]).select("age", "diagnosis")  # (keys sorted)
    assert got.rows() == source.filter(pl.col("age") >= 30).select("age", "diagnosis").head(4).rows()
    assert requests_filed(owned) == filed


def test_nbconvert_writes_the_example_notebook_with_its_held_cells_errors(scientist, owned, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--allow-errors",
         "--ExecutePreprocessor.timeout=60", "--output-dir", str(tmp_path), str(ROOT / "examples" / "scientist.ipynb")],
        capture_output=True, text=True, timeout=300, env=kernel_env(scientist), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = nbformat.read(tmp_path / "scientist.ipynb", as_version=4)
    code = {cell.source: cell for cell in written.cells if cell.cell_type == "code"}
    rows = next(cell for source, cell in code.items() if 'select(col("age"), col("zip"))' in source)
    [error] = [o for o in rows.outputs if o.output_type == "error"]
    assert error.ename == "ReviewPending"
    request_id = int(re.search(r"request #(\d+)", error.evalue).group(1))
    store = owned.workspace.approvals()
    assert store.get(request_id).status == "pending" and store.get(request_id).scientist == "erin"
    store.close()
    # The aggregates ran as usual around the held cells.
    by_diagnosis = next(cell for source, cell in code.items() if 'group_by("diagnosis")' in source)
    assert [o.output_type for o in by_diagnosis.outputs] == ["execute_result"]


def test_papermill_runs_a_bastion_notebook_with_parameters(scientist, tmp_path, source):
    parameters = nbformat.v4.new_code_cell('min_age = 0\nsex = "F"', metadata={"tags": ["parameters"]})
    query = nbformat.v4.new_code_cell('dataset("patients").filter((col("age") >= min_age) & (col("sex") == sex))'
                                      '.group_by("smoker").agg(pl.len()).sort("smoker").fetch()')
    notebook = nbformat.v4.new_notebook(cells=[parameters, query], metadata={
        "kernelspec": {"name": "bastion", "display_name": "Bastion", "language": "bastion"},
        "language_info": {"name": "bastion"}})
    nbformat.write(notebook, tmp_path / "in.ipynb")
    done = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                           "-k", "bastion", "-p", "min_age", "40", "-p", "sex", "M"],
                          capture_output=True, text=True, timeout=300, env=kernel_env(scientist), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    [injected] = [c for c in written.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "min_age = 40" in injected.source and 'sex = "M"' in injected.source
    [result] = [o for o in written.cells[-1].outputs if o.output_type == "execute_result"]
    got = pl.DataFrame(result.data[DATARESOURCE_MIME]["data"]).select("smoker", "len")  # (nbformat sorts keys)
    want = source.filter((pl.col("age") >= 40) & (pl.col("sex") == "M")).group_by("smoker").agg(pl.len()).sort("smoker")
    assert got.rows() == want.rows()
    assert json.loads(json.dumps(written.metadata.papermill["parameters"])) == {"min_age": 40, "sex": "M"}


def test_a_store_from_the_previous_version_gains_the_reuse_columns_and_its_requests_answer_no_rerun(tmp_path):
    from owner_console.approvals import ApprovalStore

    path = tmp_path / "approvals.sqlite"
    store = ApprovalStore(path)
    request_id = store.create(scientist="alice", plan={"op": "scan", "dataset": "x"}, plan_text="", plan_tree=[],
                              query_text="", reason="", columns=[], rows=0, notes=[],
                              write_result=lambda _: "0" * 64, scientist_key="k" * 40)
    store.close()
    with sqlite3.connect(path) as conn:  # what the previous version wrote
        conn.execute("DROP INDEX requests_plan")
        conn.execute("ALTER TABLE requests DROP COLUMN data_version")
        conn.execute("ALTER TABLE requests DROP COLUMN reuse")
        conn.execute("PRAGMA user_version = 4")
    store = ApprovalStore(path)
    old = store.get(request_id)
    assert (old.data_version, old.reuse) == ("", "")
    assert store.latest_for("alice", "k" * 40, old.plan_hash, "") is None  # no version: never a re-run's answer
    store.close()
