"""The executor as a process: queries, the review round trip, policy modes, shutdown, audit."""
from __future__ import annotations

import hashlib
import io
import json
import signal

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import alias, col, fn, frame_op, length, plan_hash, scan
from owner_console.audit import read_entries
from owner_console.model import Policy

from conftest import make_keys, make_workspace, start_executor

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier


def _table(frames) -> pl.DataFrame:
    assert len(frames) == 1
    return pl.read_ipc(io.BytesIO(frames[0]))


def _aggregate_plan(dataset="patients"):
    return frame_op("group_by", input=scan(dataset), keys=[col("diagnosis")],
                    aggs=[alias(fn("mean", col("cost")), "mean_cost"), alias(length(), "n")])


def _rows_plan(dataset="patients", columns=("age",), n=5):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def _fetch(client, plan, text="cell"):
    return client.request("fetch", {"plan": plan, "text": text}, timeout=60)


def test_hello_and_datasets(executor, owner_workspace):
    client = executor.client("alice")
    kind, body, _ = client.request("hello", {})
    assert kind == "ok" and body["scientist"] == "alice" and body["plan_version"] == 1
    kind, body, _ = client.request("datasets", {})
    assert kind == "ok"
    described = {d["name"]: d for d in body["datasets"]}
    assert sorted(described) == ["patients", "patients_open", "patients_strict"]
    expected_columns = pl.read_csv(owner_workspace.data_file).columns
    assert [name for name, _ in described["patients"]["schema"]] == expected_columns
    assert described["patients"]["policy"] == Policy(10, "review", frozenset({"name"})).to_dict()
    kind, body, _ = client.request("schema", {"plan": _aggregate_plan()})
    assert kind == "ok" and [name for name, _ in body["schema"]] == ["diagnosis", "mean_cost", "n"]


def test_aggregate_is_released_and_matches_polars(executor, owner_workspace):
    client = executor.client("alice")
    kind, body, frames = _fetch(client, _aggregate_plan())
    assert kind == "result", body
    got = _table(frames).sort("diagnosis")
    expected = (pl.read_csv(owner_workspace.data_file).group_by("diagnosis")
                .agg(pl.col("cost").mean().alias("mean_cost"), pl.len().alias("n")).sort("diagnosis"))
    assert expected["n"].min() >= 10  # precondition: every group passes K
    assert_frame_equal(got, expected)
    assert body["request_id"] is None and body["rows"] == expected.height
    assert body["decision"]["action"] == "allow" and body["decision"]["reason"]
    assert [name for name, _ in body["schema"]] == expected.columns

    sha = hashlib.sha256(frames[0]).hexdigest()
    releases = [e for e in read_entries(executor.workspace / "audit.jsonl")
                if e["event"] == "release" and e.get("sha256") == sha]
    assert len(releases) == 1 and releases[0]["scientist"] == "alice"
    assert releases[0]["plan_hash"] == plan_hash(_aggregate_plan())


def test_row_level_result_waits_for_approval_and_is_released_to_its_key_only(executor, owner_workspace):
    alice, bob = executor.client("alice"), executor.client("bob")
    plan = _rows_plan(columns=("age", "cost"))
    kind, body, frames = _fetch(alice, plan, "patients.select('age', 'cost').head(5).fetch()")
    assert kind == "pending" and body["status"] == "pending" and body["reason"] and frames == []
    request_id = body["request_id"]

    listed = json.loads(executor.owner("requests", "--json").stdout)
    mine = [r for r in listed if r["id"] == request_id]
    assert len(mine) == 1
    assert mine[0]["scientist"] == "alice" and mine[0]["reason"] == body["reason"]
    assert mine[0]["rows"] == 5 and [c for c, _ in mine[0]["columns"]] == ["age", "cost"]
    assert "head(5)" in mine[0]["plan_text"] and mine[0]["asked_at"]

    kind, status, _ = alice.request("request_status", {"request_id": request_id})
    assert (kind, status["status"]) == ("pending", "pending")

    # bob cannot see alice's request: the same answer as for an id that does not exist.
    kind, theirs, _ = bob.request("request_status", {"request_id": request_id})
    missing = request_id + 10_000
    kind2, nothing, _ = bob.request("request_status", {"request_id": missing})
    assert kind == kind2 == "error" and theirs["ename"] == nothing["ename"] == "NotFound"
    assert theirs["evalue"].replace(str(request_id), "N") == nothing["evalue"].replace(str(missing), "N")

    assert executor.owner("approve", str(request_id)).returncode == 0
    kind, bob_after, _ = bob.request("request_status", {"request_id": request_id})
    assert (kind, bob_after["ename"]) == ("error", "NotFound")
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "result" and body["request_id"] == request_id
    expected = pl.read_csv(owner_workspace.data_file).select("age", "cost").head(5)
    assert_frame_equal(_table(frames), expected)

    # Asked again while the approval lasts: the same approved table, audited as a re-release; bob still gets nothing.
    kind, again, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "result" and again["request_id"] == request_id
    assert_frame_equal(_table(frames), expected)
    kind, bob_after, _ = bob.request("request_status", {"request_id": request_id})
    assert (kind, bob_after["ename"]) == ("error", "NotFound")
    events = [e["event"] for e in read_entries(executor.workspace / "audit.jsonl")
              if e.get("request_id") == request_id]
    assert events == ["held", "approval", "release", "rerelease"]


def test_rejected_request_reports_the_owner_reason(executor):
    alice = executor.client("alice")
    kind, body, _ = _fetch(alice, _rows_plan(columns=("sex",), n=3))
    assert kind == "pending"
    request_id = body["request_id"]
    result = executor.owner("reject", str(request_id), "--reason", "individual rows are not released")
    assert result.returncode == 0, result.stderr
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "error" and body["ename"] == "ReviewRejected" and frames == []
    assert "individual rows are not released" in body["evalue"]
    assert body["details"]["reason"] == "individual rows are not released"


def test_reject_mode_refuses_at_once(executor):
    alice = executor.client("alice")
    kind, body, frames = _fetch(alice, _rows_plan("patients_strict"))
    assert kind == "error" and body["ename"] == "PolicyViolation" and frames == []
    refusals = [e for e in read_entries(executor.workspace / "audit.jsonl")
                if e["event"] == "refusal" and e.get("plan_hash") == plan_hash(_rows_plan("patients_strict"))]
    assert refusals and refusals[-1]["ename"] == "PolicyViolation"


def test_log_mode_releases_and_records_it(executor, owner_workspace):
    alice = executor.client("alice")
    plan = _rows_plan("patients_open", columns=("age", "zip"), n=7)
    kind, body, frames = _fetch(alice, plan)
    assert kind == "result" and body["decision"]["action"] == "log"
    assert_frame_equal(_table(frames), pl.read_csv(owner_workspace.data_file).select("age", "zip").head(7))
    decisions = [e for e in read_entries(executor.workspace / "audit.jsonl")
                 if e["event"] == "decision" and e.get("plan_hash") == plan_hash(plan)]
    assert decisions and decisions[-1]["action"] == "log"


def test_hidden_column_shows_stars(executor, owner_workspace):
    alice = executor.client("alice")
    kind, body, frames = _fetch(alice, _rows_plan("patients_open", columns=("name", "age"), n=6))
    assert kind == "result"
    table = _table(frames)
    assert table["name"].to_list() == ["*"] * 6
    assert table["age"].to_list() == pl.read_csv(owner_workspace.data_file)["age"].head(6).to_list()
    secret_names = set(pl.read_csv(owner_workspace.data_file)["name"].head(6))
    assert not any(name.encode() in frames[0] for name in secret_names)


def test_save_answers_with_the_saved_name_or_a_typed_error(executor):
    # (save and saved results in depth: tests/test_saved_results.py)
    kind, body, _ = executor.client("alice").request("save", {"plan": _aggregate_plan(), "name": "x", "text": ""})
    assert kind == "ok" and body["name"] == "x", body
    kind, body, _ = executor.client("alice").request("save", {"plan": _aggregate_plan(), "name": "../x", "text": ""})
    assert kind == "error" and body["ename"] == "SchemaError"


def test_kernel_client_round_trip(executor, owner_workspace):
    client = executor.kernel_client("alice")
    fetched = client.fetch(_aggregate_plan(), "cell")
    assert fetched.frame.height == pl.read_csv(owner_workspace.data_file)["diagnosis"].n_unique()


def test_session_shutdown_and_audit_verify(tmp_path, patients_csv):
    """A whole session in its own workspace: new scientist without restart, a broken dataset file,
    SIGTERM exits 0, the audit log verifies, and the CLI catches each kind of tampering."""
    owned = make_workspace(tmp_path / "ws", patients_csv)
    keys = {name: make_keys(tmp_path / "keys", name) for name in ("alice", "carol")}
    owned.workspace.add_scientist("alice", keys["alice"].public_file)
    (owned.path / "datasets" / "broken.toml").write_text("this is = = not toml")
    running = start_executor(owned.path, keys)
    try:
        alice = running.client("alice")
        kind, body, _ = alice.request("datasets", {})
        assert kind == "ok" and "broken" not in [d["name"] for d in body["datasets"]]
        assert "broken.toml" in running.log()

        carol = running.client("carol")
        carol.send("hello", {})
        assert carol.recv(2) is None
        assert running.owner("scientist", "add", "carol", keys["carol"].public_file).returncode == 0
        carol = running.client("carol")  # a new handshake sees the updated allow-list
        kind, body, _ = carol.request("hello", {})
        assert (kind, body["scientist"]) == ("ok", "carol")

        assert _fetch(alice, _aggregate_plan())[0] == "result"
        kind, body, _ = _fetch(alice, _rows_plan())
        assert kind == "pending"
        assert running.owner("approve", str(body["request_id"])).returncode == 0
        assert alice.request("request_status", {"request_id": body["request_id"]})[0] == "result"
    finally:
        status = running.stop(signal.SIGTERM)
    assert status == 0, running.log()

    events = {e["event"] for e in read_entries(owned.path / "audit.jsonl")}
    assert {"connection", "query", "decision", "release", "held", "approval"} <= events
    assert running.owner("audit", "verify").returncode == 0

    log_path = owned.path / "audit.jsonl"
    intact = log_path.read_bytes()
    lines = intact.splitlines(keepends=True)
    assert len(lines) >= 6
    edited = lines[3].replace(b'"scientist":"carol"', b'"scientist":"bob"')  # carol's connection
    assert edited != lines[3]
    for what, content in {"edited": lines[:3] + [edited] + lines[4:],
                          "deleted": lines[:2] + lines[3:],
                          "swapped": lines[:2] + [lines[3], lines[2]] + lines[4:]}.items():
        log_path.write_bytes(b"".join(content))
        result = running.owner("audit", "verify")
        assert result.returncode == 1, what
        assert "line 3" in result.stderr or "line 4" in result.stderr, (what, result.stderr)
    log_path.write_bytes(intact)
    assert running.owner("audit", "verify").returncode == 0


def test_busy_endpoint_is_a_clear_error(executor):
    result = executor.owner("serve", "--bind", executor.endpoint)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot bind"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_cleanly(tmp_path, patients_csv, sig):
    owned = make_workspace(tmp_path / "ws", patients_csv)
    keys = {"alice": make_keys(tmp_path / "keys", "alice")}
    owned.workspace.add_scientist("alice", keys["alice"].public_file)
    running = start_executor(owned.path, keys)
    assert running.stop(sig) == 0, running.log()
    assert "Traceback" not in running.log()
