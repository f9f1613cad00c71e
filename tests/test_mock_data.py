"""Mock data: ``bastion-owner dataset mock`` and ``dataset(NAME, mock=True)``, for real.

The owner publishes a mock with the real command line; a real executor serves
it; hostile plans go straight to the executor over the wire (``wire.py``), and
a real Bastion kernel shows what a scientist sees.

- the mock is made from the schema and declared facts only: two datasets with
  the same schema and different rows give the same mock; values keep to the
  declared bounds and categories; an owner's file must have the schema and
  must not be the real data;
- a mock query is answered at once, row by row, with values that are not the
  real rows, marked as mock, audited (``query`` and ``release``, both
  ``mock``) and never held; the real file is not read (it can be gone);
- a plan mixing mock and real sources is refused, as are a malformed mock
  flag, a mock nobody published, saving a mock and a DP preview of one.
"""
from __future__ import annotations

import io
import shutil
import tomllib

import polars as pl
import pytest

from bastion_kernel.contract.plan import col, frame_op, length, plan_hash, scan
from owner_console.audit import read_entries

from conftest import make_workspace, register_scientists, running_executor
from test_kernel import DATARESOURCE_MIME, bastion_kernel, connect_scientist, execute, of_type

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

TIMEOUT = 60
BOUNDS = {"age": (0, 100), "length_of_stay": (0, 60), "cost": (0, 200000)}


@pytest.fixture(scope="module")
def owned(tmp_path_factory, patients_csv):
    """A workspace over its own copy of the table, with the demo's public bounds and a published mock."""
    csv = tmp_path_factory.mktemp("mock-data") / "patients.csv"
    shutil.copy(patients_csv, csv)
    owner = make_workspace(tmp_path_factory.mktemp("mock") / "ws", csv)
    owner.workspace.add_dataset("patients", csv, min_group_size=10, hidden=["name"], bounds=BOUNDS, replace=True)
    done = owner.owner("dataset", "mock", "patients", "--rows", "200", "--categories", "sex=F,M")
    assert done.returncode == 0, done.stderr
    return owner


@pytest.fixture(scope="module")
def running(owned, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mock-keys")
    keys = register_scientists(owned.workspace, directory, ("alice", "bob"))
    with running_executor(owned.path, keys) as process:
        yield process


@pytest.fixture(scope="module")
def real(owned) -> pl.DataFrame:
    return pl.read_csv(owned.data_file, try_parse_dates=True)


def fetch(client, plan, kind="fetch"):
    """Send ``plan`` as a ``fetch`` (or a ``schema``, ``dp_preview``) request; its reply."""
    return client.request(kind, {"plan": plan, **({"text": "a cell"} if kind == "fetch" else {})}, timeout=TIMEOUT)


def mock_scan():
    return scan("patients", mock=True)


def table(frames) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(frames[0]))


# -- publishing a mock ------------------------------------------------------------------------

def test_a_generated_mock_comes_from_the_schema_and_declared_facts_only(owned, real, tmp_path):
    mock = pl.read_parquet(owned.path / "mocks" / "patients.parquet")
    assert mock.schema == real.schema and mock.height == 200
    assert set(mock["sex"]) <= {"F", "M"}
    for column, (low, high) in BOUNDS.items():
        assert mock[column].min() >= low and mock[column].max() <= high
    assert not set(mock["diagnosis"]) & set(real["diagnosis"])  # no category declared: made-up values
    described = tomllib.loads((owned.path / "mocks" / "patients.toml").read_text())
    assert described["origin"] == "generated" and described["categories"] == {"sex": ["F", "M"]}

    # The same schema over other rows makes the same mock: no row was read.
    other = tmp_path / "other.csv"
    real.reverse().with_columns(pl.col("age") // 2, pl.col("cost") * 3).write_csv(other)
    owned.workspace.add_dataset("other", other, min_group_size=10, hidden=["name"], bounds=BOUNDS)
    try:
        done = owned.owner("dataset", "mock", "other", "--rows", "200", "--categories", "sex=F,M")
        assert done.returncode == 0, done.stderr
        assert pl.read_parquet(owned.path / "mocks" / "other.parquet").equals(mock)
    finally:
        (owned.path / "datasets" / "other.toml").unlink()


def test_an_owners_mock_file_must_have_the_schema_and_not_be_the_data(owned, real, tmp_path):
    done = owned.owner("dataset", "mock", "patients", "--from", str(owned.data_file))
    assert done.returncode == 2 and "the dataset's own data" in done.stderr
    copy = tmp_path / "copy.csv"
    shutil.copy(owned.data_file, copy)
    done = owned.owner("dataset", "mock", "patients", "--from", str(copy))
    assert done.returncode == 2 and "the dataset's own data" in done.stderr
    wrong = tmp_path / "wrong.csv"
    real.head(3).drop("smoker").write_csv(wrong)
    done = owned.owner("dataset", "mock", "patients", "--from", str(wrong))
    assert done.returncode == 2 and "columns" in done.stderr
    done = owned.owner("dataset", "mock", "patients", "--categories", "nope=a")
    assert done.returncode == 2 and "no column 'nope'" in done.stderr
    done = owned.owner("dataset", "mock", "patients_strict", "--from", str(wrong))
    assert done.returncode == 2

    mine = tmp_path / "mine.parquet"
    pl.read_parquet(owned.path / "mocks" / "patients.parquet").head(20).write_parquet(mine)
    done = owned.owner("dataset", "mock", "patients_open", "--from", str(mine))
    assert done.returncode == 0, done.stderr
    described = tomllib.loads((owned.path / "mocks" / "patients_open.toml").read_text())
    assert described["origin"] == "file" and described["rows"] == 20 and described["from"] == str(mine)


# -- the executor, over the wire ---------------------------------------------------------------

def test_a_mock_answers_rows_at_once_marked_and_audited(running, owned, real):
    alice = running.client("alice")
    store = owned.workspace.approvals()
    filed = len(store.list())
    plan = frame_op("head", input=mock_scan(), n=8)
    kind, body, frames = fetch(alice, plan)
    assert kind == "result" and body["mock"] is True and body["request_id"] is None
    assert any(note.startswith("mock data") for note in body["notes"])
    rows = table(frames)
    assert rows.height == 8 and set(rows["name"]) == {"*"}  # hidden columns stay hidden in the mock
    shown = [c for c in rows.columns if c != "name"]
    assert not set(rows.select(shown).rows()) & set(real.select(shown).rows())
    assert len(store.list()) == filed  # nothing held for review
    store.close()
    entries = [e for e in read_entries(owned.workspace.audit_path) if e.get("plan_hash") == plan_hash(plan)
               and e["event"] != "plan"]
    assert [e["event"] for e in entries] == ["query", "release"] and all(e["mock"] for e in entries)

    # An aggregate of the mock is the mock's, not the data's.
    kind, body, frames = fetch(alice, frame_op("select", input=mock_scan(), exprs=[length()]))
    assert kind == "result" and table(frames).item() == 200


def test_a_mock_query_never_reads_the_real_file(running, owned):
    alice = running.client("alice")
    moved = owned.data_file.with_suffix(".away")
    owned.data_file.rename(moved)
    try:
        kind, body, _ = fetch(alice, frame_op("head", input=mock_scan(), n=3))
        assert kind == "result" and body["mock"] is True
        kind, body, _ = fetch(alice, frame_op("select", input=mock_scan(), exprs=[col("age")]), kind="schema")
        assert kind == "ok" and body["schema"] == [["age", "Int64"]], body
        kind, body, _ = fetch(alice, frame_op("select", input=scan("patients"), exprs=[length()]))
        assert kind == "error" and body["ename"] == "ExecutionError"  # the real file is gone
    finally:
        moved.rename(owned.data_file)


@pytest.mark.parametrize("kind", ["fetch", "schema"])
@pytest.mark.parametrize("plan", [
    frame_op("join", left=scan("patients", mock=True), right=scan("patients"), how="inner",
             left_on=[col("patient_id")], right_on=[col("patient_id")], suffix="_real"),
    frame_op("concat", inputs=[scan("patients_open"), scan("patients", mock=True)]),
    frame_op("join", left=scan("patients", mock=True), right=frame_op("saved", name="mine"), how="inner",
             left_on=[col("patient_id")], right_on=[col("patient_id")], suffix="_saved"),
], ids=["join-real", "concat-real", "join-saved"])
def test_a_plan_mixing_mock_and_real_data_is_refused(running, plan, kind):
    kind_, body, frames = fetch(running.client("alice"), plan, kind=kind)
    assert kind_ == "error" and body["ename"] == "PolicyViolation" and frames == []
    assert "mixes mock data" in body["evalue"]


def test_malformed_and_unpublished_mocks_are_refused(running):
    alice = running.client("alice")
    forged = frame_op("head", input={"op": "scan", "dataset": "patients", "mock": "yes"}, n=2)
    kind, body, _ = fetch(alice, forged)
    assert kind == "error" and body["ename"] == "UnsupportedOperation" and "'mock'" in body["evalue"]
    kind, body, _ = fetch(alice, frame_op("head", input=scan("patients_strict", mock=True), n=2))
    assert kind == "error" and body["ename"] == "SchemaError" and "no mock of 'patients_strict'" in body["evalue"]
    kind, body, _ = alice.request("save", {"plan": frame_op("head", input=mock_scan(), n=2), "name": "fake"},
                                  timeout=TIMEOUT)
    assert kind == "error" and body["ename"] == "PolicyViolation" and "mock" in body["evalue"]
    kind, body, _ = fetch(alice, frame_op("select", input=mock_scan(), exprs=[length()]), kind="dp_preview")
    assert kind == "error" and body["ename"] == "PolicyViolation"
    # "mock": false is the real data, as without the field.
    kind, body, _ = fetch(alice, frame_op("select", input={"op": "scan", "dataset": "patients", "mock": False},
                                          exprs=[length()]))
    assert kind == "result" and "mock" not in body


# -- the kernel ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kc(running, tmp_path_factory):
    with bastion_kernel(*connect_scientist(running, tmp_path_factory.mktemp("erin"), name="erin")) as (_, client):
        yield client


def test_the_scientist_switches_between_mock_and_real_with_one_argument(kc, real):
    reply, outputs = execute(kc, 'datasets()')
    assert "dataset('patients', mock=True)" in of_type(outputs, "execute_result")[0]["data"]["text/plain"]

    reply, outputs = execute(kc, 'dataset("patients", mock=True).select("age", "sex", "diagnosis").head(5).fetch()')
    assert reply["status"] == "ok", reply
    data = of_type(outputs, "execute_result")[0]["data"]
    assert data["text/plain"].startswith("MOCK DATA") and "MOCK DATA" in data["text/html"]
    assert not {row["diagnosis"] for row in data[DATARESOURCE_MIME]["data"]} & set(real["diagnosis"])

    reply, outputs = execute(kc, 'm = dataset("patients", mock=True).head(5).fetch()\nm.sort("age")')
    assert of_type(outputs, "execute_result")[0]["data"]["text/plain"].startswith("MOCK DATA")

    reply, outputs = execute(kc, 'dataset("patients").group_by("sex").agg(pl.len()).fetch()')
    assert reply["status"] == "ok" and "MOCK" not in of_type(outputs, "execute_result")[0]["data"]["text/plain"]

    reply, _ = execute(kc, 'dataset("patients", mock=True).join(dataset("patients"), on="patient_id").fetch()')
    assert reply["status"] == "error" and reply["ename"] == "PolicyViolation" and "mixes mock" in reply["evalue"]
    reply, _ = execute(kc, 'dataset("patients_strict", mock=True)')
    assert reply["status"] == "error" and reply["ename"] == "SchemaError" and "no mock" in reply["evalue"]
