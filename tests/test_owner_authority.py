"""Only the owner decides: a scientist's key can never approve, and an approval binds one plan and one scientist.

Real executor process; the scientist's side is a raw wire client that sends
whatever it is told, so these are the messages a hostile scientist could
hand-make with their own key.
"""
from __future__ import annotations

import io
import json
import uuid

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import protocol
from bastion_kernel.contract.plan import col, frame_op, plan_hash, scan
from owner_console.audit import read_entries

TIMEOUT = 60


def rows_plan(columns, n, dataset="patients"):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def hold(client, plan) -> int:
    kind, body, _ = client.request("fetch", {"plan": plan, "text": "cell"}, timeout=TIMEOUT)
    assert kind == "pending", body
    return body["request_id"]


def hand_made(client, kind: str, body: dict) -> dict:
    """Send an envelope of any kind (``protocol.encode`` refuses unknown ones) and return the reply body."""
    msg_id = uuid.uuid4().hex
    client.send_frames([json.dumps({"v": protocol.PROTOCOL_VERSION, "id": msg_id, "kind": kind,
                                    "body": body}).encode()])
    reply_kind, reply_body, _ = client.reply(msg_id, timeout=TIMEOUT)
    assert reply_kind == "error", (kind, reply_body)
    return reply_body


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv)


def status_of(executor, request_id: int) -> str:
    from owner_console.approvals import ApprovalStore
    store = ApprovalStore(executor.workspace / "approvals.sqlite")
    try:
        return store.get(request_id).status
    finally:
        store.close()


DECIDING_KINDS = ["approve", "decide", "approval", "reject", "release", "set_status", "owner", "admin"]


@pytest.mark.parametrize("kind", DECIDING_KINDS)
def test_no_message_kind_lets_a_scientist_decide(executor, kind):
    alice = executor.client("alice")
    request_id = hold(alice, rows_plan(("age",), 2))
    for body in ({"request_id": request_id}, {"request_id": request_id, "approved": True, "reason": "ok"},
                 {"id": request_id, "status": "approved"}):
        error = hand_made(alice, kind, body)
        assert error["ename"] == "ProtocolError" and kind in error["evalue"]
    assert status_of(executor, request_id) == "pending"
    kind_, body, _ = alice.request("request_status", {"request_id": request_id})
    assert (kind_, body["status"]) == ("pending", "pending")


@pytest.mark.parametrize("body", [
    {"approved": True}, {"status": "approved"}, {"decision": "approve", "reason": "mine"},
    {"scientist": "owner"}, {"by": "owner"},
])
def test_extra_fields_on_known_kinds_cannot_decide(executor, body):
    alice = executor.client("alice")
    request_id = hold(alice, rows_plan(("sex",), 2))
    error = hand_made(alice, "request_status", {"request_id": request_id, **body})
    assert error["ename"] == "ProtocolError" and "takes no field" in error["evalue"]
    error = hand_made(alice, "fetch", {"plan": rows_plan(("sex",), 2), "text": "", **body})
    assert error["ename"] == "ProtocolError"
    assert status_of(executor, request_id) == "pending"
    assert not [e for e in read_entries(executor.workspace / "audit.jsonl")
                if e["event"] in ("approval", "release") and e.get("request_id") == request_id]


def test_a_changed_plan_needs_a_new_approval(executor, source):
    alice = executor.client("alice")
    approved_plan = rows_plan(("age", "cost"), 4)
    approved_id = hold(alice, approved_plan)
    assert executor.owner("approve", str(approved_id)).returncode == 0

    # A different plan after the approval: a new pending request, not the approved table.
    changed_plan = rows_plan(("age", "cost"), 400)
    kind, body, frames = alice.request("fetch", {"plan": changed_plan, "text": "more rows"}, timeout=TIMEOUT)
    assert kind == "pending" and frames == []
    assert body["request_id"] != approved_id
    listed = {r["id"]: r for r in json.loads(executor.owner("requests", "--json").stdout)}
    assert listed[body["request_id"]]["plan_hash"] == plan_hash(changed_plan)
    assert approved_id not in listed

    # The approved request releases exactly the reviewed plan's table.
    kind, released, frames = alice.request("request_status", {"request_id": approved_id})
    assert kind == "result" and released["rows"] == 4
    assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), source.select("age", "cost").head(4))
    [release] = [e for e in read_entries(executor.workspace / "audit.jsonl")
                 if e["event"] == "release" and e.get("request_id") == approved_id]
    assert release["plan_hash"] == plan_hash(approved_plan)
    assert status_of(executor, body["request_id"]) == "pending"


def test_a_held_table_changed_on_disk_is_never_released(executor):
    alice = executor.client("alice")
    request_id = hold(alice, rows_plan(("age",), 3))
    assert executor.owner("approve", str(request_id)).returncode == 0
    path = executor.workspace / "results" / f"{request_id}.arrow"
    frame = pl.read_ipc(path, memory_map=False).with_columns(pl.col("age") + 1)
    frame.write_ipc(path)  # not what the owner reviewed
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "error" and body["ename"] == "ExecutionError" and frames == []
    assert status_of(executor, request_id) == "approved"


def test_another_scientist_who_knows_the_id_gets_nothing(executor, source):
    alice, bob = executor.client("alice"), executor.client("bob")
    request_id = hold(alice, rows_plan(("zip",), 3))
    missing = request_id + 100_000

    def bob_asks(rid):
        kind, body, frames = bob.request("request_status", {"request_id": rid})
        assert kind == "error" and body["ename"] == "NotFound" and frames == []
        return body["evalue"].replace(str(rid), "N")

    assert bob_asks(request_id) == bob_asks(missing)  # pending: same answer as no such id
    assert executor.owner("approve", str(request_id)).returncode == 0
    for _ in range(3):
        assert bob_asks(request_id) == bob_asks(missing)  # approved: still nothing
    # Bob's attempts did not use up alice's one release.
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "result"
    assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), source.select("zip").head(3))
    assert bob_asks(request_id) == bob_asks(missing)  # released: nothing either
    releases = [e for e in read_entries(executor.workspace / "audit.jsonl")
                if e["event"] == "release" and e.get("request_id") == request_id]
    assert [e["scientist"] for e in releases] == ["alice"]
