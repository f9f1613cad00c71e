"""Approvals expire: an approved result not fetched within ``approval_ttl_seconds`` is never released.

Time is moved by back-dating a decision in the store (what a week of waiting
would leave there), so nothing here sleeps.  Also: the configuration, and the
migration of a store written before ``expired`` existed.
"""
from __future__ import annotations

import datetime as _dt
import sqlite3
import tomllib

import pytest
import tomli_w

from bastion_kernel.contract.plan import col, frame_op, scan
from owner_console.approvals import ApprovalStore, is_expired, record_decision, sweep_expired
from owner_console.approvals import _SCHEMA_VERSION as approvals_schema_version
from owner_console.audit import read_entries, verify
from owner_console.workspace import DEFAULT_APPROVAL_TTL_SECONDS, Workspace, WorkspaceError

from conftest import make_workspace, start_executor

TIMEOUT = 60


def rows_plan(columns, n):
    return frame_op("head", input=frame_op("select", input=scan("patients"), exprs=[col(c) for c in columns]), n=n)


def hold(client, plan) -> int:
    kind, body, _ = client.request("fetch", {"plan": plan, "text": "cell"}, timeout=TIMEOUT)
    assert kind == "pending", body
    return body["request_id"]


def backdate(workspace_path, request_id: int, seconds: float) -> None:
    """Move a decision ``seconds`` into the past, as if that much time had gone by."""
    when = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=seconds)
    with sqlite3.connect(workspace_path / "approvals.sqlite", timeout=30) as conn:
        conn.execute("UPDATE requests SET decided_at = ? WHERE id = ?", (when.isoformat(), request_id))


def set_ttl(workspace: Workspace, seconds: int) -> None:
    config = tomllib.loads(workspace.config_path.read_text())
    config["approval_ttl_seconds"] = seconds
    workspace.config_path.write_text(tomli_w.dumps(config))


def test_init_writes_the_default_ttl_and_the_config_is_checked(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.init()
    assert tomllib.loads(workspace.config_path.read_text())["approval_ttl_seconds"] == 7 * 24 * 3600
    assert workspace.approval_ttl_seconds == DEFAULT_APPROVAL_TTL_SECONDS == 604800
    set_ttl(workspace, 60)
    assert workspace.approval_ttl_seconds == 60
    for bad in (0, -5, "a week", True):
        set_ttl(workspace, bad)
        with pytest.raises(WorkspaceError, match="approval_ttl_seconds"):
            workspace.approval_ttl_seconds
    config = tomllib.loads(workspace.config_path.read_text())
    del config["approval_ttl_seconds"]  # a workspace made before the setting existed
    workspace.config_path.write_text(tomli_w.dumps(config))
    assert workspace.approval_ttl_seconds == DEFAULT_APPROVAL_TTL_SECONDS


def test_init_on_the_command_line_takes_a_ttl(tmp_path):
    from conftest import run_owner
    done = run_owner(tmp_path / "ws", "init", "--approval-ttl-seconds", "3600")
    assert done.returncode == 0, done.stderr
    assert Workspace(tmp_path / "ws").approval_ttl_seconds == 3600
    refused = run_owner(tmp_path / "other", "init", "--approval-ttl-seconds", "0")
    assert refused.returncode == 2 and "must be at least 1" in refused.stderr
    assert not (tmp_path / "other" / "config.toml").exists()


@pytest.fixture(scope="module")
def expiring(tmp_path_factory, patients_csv, scientist_keys):
    owned = make_workspace(tmp_path_factory.mktemp("expiry") / "ws", patients_csv)
    for name in ("alice", "bob"):
        owned.workspace.add_scientist(name, scientist_keys[name].public_file)
    running = start_executor(owned.path, scientist_keys)
    try:
        yield owned, running
    finally:
        running.stop()


def test_an_expired_approval_is_not_released_and_its_table_is_removed(expiring):
    owned, running = expiring
    alice = running.client("alice")
    request_id = hold(alice, rows_plan(("age",), 3))
    assert running.owner("approve", str(request_id)).returncode == 0
    result = owned.workspace.result_path(request_id)
    assert result.exists()
    backdate(owned.path, request_id, DEFAULT_APPROVAL_TTL_SECONDS + 60)  # a week and a minute later

    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "error" and body["ename"] == "NotFound" and frames == []
    assert "expired" in body["evalue"] and "7 days" in body["evalue"]
    assert body["details"]["status"] == "expired"
    assert not result.exists()
    store = owned.workspace.approvals()
    assert store.get(request_id).status == "expired" and store.get(request_id).expired_at
    [expiry] = [e for e in read_entries(owned.workspace.audit_path)
                if e["event"] == "expiry" and e.get("request_id") == request_id]
    assert expiry["scientist"] == "alice"
    # Asking again gives the same clear answer, and nothing was released.
    kind, again, _ = alice.request("request_status", {"request_id": request_id})
    assert again["ename"] == "NotFound" and "expired" in again["evalue"]
    assert not [e for e in read_entries(owned.workspace.audit_path)
                if e["event"] == "release" and e.get("request_id") == request_id]
    assert verify(owned.workspace.audit_path, owned.workspace.audit_public_key_path).ok


def test_the_configured_ttl_is_used(expiring):
    owned, running = expiring
    alice = running.client("alice")
    old, recent = hold(alice, rows_plan(("sex",), 2)), hold(alice, rows_plan(("cost",), 2))
    for request_id in (old, recent):
        assert running.owner("approve", str(request_id)).returncode == 0
    set_ttl(owned.workspace, 3600)  # read by the running executor on the next request
    try:
        backdate(owned.path, old, 2 * 3600)      # within 7 days, beyond one hour
        backdate(owned.path, recent, 30 * 60)    # within one hour
        kind, body, _ = alice.request("request_status", {"request_id": old})
        assert kind == "error" and "expired" in body["evalue"] and "1 hour" in body["evalue"]
        kind, body, frames = alice.request("request_status", {"request_id": recent})
        assert kind == "result" and body["rows"] == 2
    finally:
        set_ttl(owned.workspace, DEFAULT_APPROVAL_TTL_SECONDS)


def test_the_executor_sweeps_expired_tables_when_it_starts(expiring, scientist_keys):
    owned, running = expiring
    alice = running.client("alice")
    stale, pending = hold(alice, rows_plan(("age",), 4)), hold(alice, rows_plan(("age",), 5))
    assert running.owner("approve", str(stale)).returncode == 0
    running.stop()
    backdate(owned.path, stale, DEFAULT_APPROVAL_TTL_SECONDS + 1)
    restarted = start_executor(owned.path, scientist_keys)
    try:
        assert not owned.workspace.result_path(stale).exists()  # no scientist had to ask
        assert owned.workspace.result_path(pending).exists()
        store = owned.workspace.approvals()
        assert store.get(stale).status == "expired" and store.get(pending).status == "pending"
    finally:
        restarted.stop()


def test_pending_requests_never_expire_and_sweeps_are_idempotent(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    workspace.init()
    store, audit = workspace.approvals(), workspace.audit_log()

    def write(request_id):
        workspace.result_path(request_id).write_bytes(b"table")
        return "0" * 64

    ids = [store.create(scientist="alice", plan=rows_plan(("age",), i + 1), plan_text="t", plan_tree="t",
                        query_text="q", reason="r", columns=[["age", "i64"]], rows=1, notes=[],
                        write_result=write) for i in range(3)]
    record_decision(store, audit, ids[1], True, "ok")
    record_decision(store, audit, ids[2], False, "no")
    later = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=365)
    assert [is_expired(store.get(i), 60, later) for i in ids] == [False, True, False]
    backdate(workspace.path, ids[1], 120)
    assert [r.id for r in sweep_expired(store, audit, 60, workspace.result_path)] == [ids[1]]
    assert sweep_expired(store, audit, 60, workspace.result_path) == []
    assert [store.get(i).status for i in ids] == ["pending", "expired", "rejected"]
    assert [workspace.result_path(i).exists() for i in ids] == [True, False, True]
    assert [e["event"] for e in read_entries(workspace.audit_path)] == ["approval", "rejection", "expiry"]


SCHEMA_1 = """
CREATE TABLE requests (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    scientist       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'released')),
    plan_json       TEXT NOT NULL,
    plan_hash       TEXT NOT NULL,
    plan_text       TEXT NOT NULL,
    plan_tree       TEXT NOT NULL,
    query_text      TEXT NOT NULL,
    reason          TEXT NOT NULL,
    columns_json    TEXT NOT NULL,
    rows            INTEGER NOT NULL,
    notes_json      TEXT NOT NULL,
    result_sha256   TEXT NOT NULL,
    asked_at        TEXT NOT NULL,
    decided_at      TEXT,
    decided_by      TEXT,
    decision_reason TEXT,
    released_at     TEXT
);
CREATE INDEX requests_status ON requests (status);
PRAGMA user_version = 1;
"""


def test_a_store_from_the_previous_version_is_migrated(tmp_path):
    path = tmp_path / "approvals.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_1)
        for status, decided in (("pending", None), ("approved", "2020-01-01T00:00:00+00:00"),
                                ("released", "2020-01-01T00:00:00+00:00")):
            conn.execute("INSERT INTO requests (scientist, status, plan_json, plan_hash, plan_text, plan_tree,"
                         " query_text, reason, columns_json, rows, notes_json, result_sha256, asked_at,"
                         " decided_at) VALUES ('alice', ?, '{}', 'h', 't', '\"t\"', 'q', 'r', '[]', 1, '[]',"
                         " 's', '2020-01-01T00:00:00+00:00', ?)", (status, decided))
    store = ApprovalStore(path)
    assert [(r.id, r.status) for r in store.list()] == [(1, "pending"), (2, "approved"), (3, "released")]
    assert store.get(1).expired_at is None
    assert store.expire(2).status == "expired"  # the new status is allowed now
    new_id = store.create(scientist="bob", plan={}, plan_text="t", plan_tree="t", query_text="q", reason="r",
                          columns=[], rows=0, notes=[], write_result=lambda _id: "s")
    assert new_id == 4
    assert [r.id for r in store.list("pending")] == [1, 4]
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == approvals_schema_version
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'requests_status'").fetchone()
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE '%schema_1%'").fetchone()
    assert [r.status for r in ApprovalStore(path).list()] == ["pending", "expired", "released", "pending"]
