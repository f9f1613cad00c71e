"""The executor's edge, tried as an attacker with a valid key and a raw ZeroMQ client (never the kernel).

- **Revocation bites**: ``bastion-owner scientist remove`` and a key rotation
  (``scientist add`` again, with a new key) refuse the old key on its next
  message, on a connection that was already open, and its requests are served
  to no one.
- **Nothing answered without its audit entry**: ids and strings that cannot be
  stored (a lone UTF-16 surrogate) get a typed, audited refusal; a request
  whose entry cannot be written gets no answer; a release and its entry are
  one durable step, even when the executor is killed between them.
- **Bounded growth**: the plan size limit, plans kept once in the audit log,
  and the per-key rate limit on refused requests.

Every test runs a real ``bastion-owner serve`` on 127.0.0.1 and ends with
``bastion-owner audit verify`` green.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import signal
import sqlite3
import time
import tomllib

import polars as pl
import pytest
import tomli_w
from polars.testing import assert_frame_equal

from bastion_kernel.contract import protocol
from bastion_kernel.contract.plan import MAX_PLAN_BYTES, canonical_json, col, fn, frame_op, plan_hash, scan
from owner_console.approvals import ApprovalStore
from owner_console.audit import MAX_ENTRY_BYTES, read_entries

from conftest import make_keys, make_workspace, start_executor

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

TIMEOUT = 60


def rows_plan(n=3, columns=("age",), dataset="patients"):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def large_plan(values: int, dataset="patients_strict"):
    """A row-level plan (refused on ``patients_strict``) carrying ``values`` 16-character strings."""
    return frame_op("filter", input=scan(dataset),
                    predicate=fn("is_in", col("name"), values=[f"name-{i:011d}" for i in range(values)]))


def raw_envelope(kind: str, body_json: str, id_json: str) -> bytes:
    """An envelope written by hand, so it can hold what Python's json would not write (``"\\ud800"``)."""
    return f'{{"v":1,"id":{id_json},"kind":"{kind}","body":{body_json}}}'.encode()


def reply_of(frames):
    assert frames is not None, "no reply"
    return protocol.decode(frames[0], protocol.REPLY_KINDS)


def entries(owned) -> list[dict]:
    return list(read_entries(owned.workspace.audit_path))


def verified(owned) -> None:
    result = owned.owner("audit", "verify")
    assert result.returncode == 0, result.stderr


def set_config(owned, **values) -> None:
    config = tomllib.loads(owned.workspace.config_path.read_text())
    config.update(values)
    owned.workspace.config_path.write_text(tomli_w.dumps(config))


def eventually(condition, seconds=10.0) -> None:
    """Wait for ``condition()``: an approval is marked released just after its rows are handed to the socket."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def hold_and_approve(running, client, n=3) -> int:
    kind, body, _ = client.request("fetch", {"plan": rows_plan(n), "text": "rows"}, timeout=TIMEOUT)
    assert kind == "pending", body
    done = running.owner("approve", str(body["request_id"]))
    assert done.returncode == 0, done.stderr
    return body["request_id"]


@pytest.fixture
def keys(tmp_path):
    return {name: make_keys(tmp_path / "keys", name) for name in ("alice", "bob", "alice_new")}


@pytest.fixture
def owned(tmp_path, patients_csv, keys):
    owned = make_workspace(tmp_path / "ws", patients_csv)
    for name in ("alice", "bob"):
        owned.workspace.add_scientist(name, keys[name].public_file)
    return owned


@pytest.fixture
def running(owned, keys):
    process = start_executor(owned.path, keys)
    try:
        yield process
    finally:
        process.stop()
    verified(owned)


# -- revocation ------------------------------------------------------------------------------------

def test_a_removed_key_is_refused_on_its_next_message_on_an_open_connection(owned, running):
    alice, bob = running.client("alice"), running.client("bob")
    kind, body, _ = alice.request("hello", {})
    assert (kind, body["scientist"]) == ("ok", "alice")
    pending = alice.request("fetch", {"plan": rows_plan(), "text": "held"}, timeout=TIMEOUT)[1]["request_id"]
    approved = hold_and_approve(running, alice, n=4)

    removed = running.owner("scientist", "remove", "alice")
    assert removed.returncode == 0, removed.stderr

    # The very next message on the same, still open connection: refused, typed, audited.
    for request_kind, request_body in (("hello", {}), ("fetch", {"plan": rows_plan(), "text": "after"}),
                                       ("request_status", {"request_id": approved})):
        kind, body, frames = alice.request(request_kind, request_body)
        assert (kind, body["ename"], frames) == ("error", "AuthenticationError", []), body
        assert "no longer allowed" in body["evalue"]
    # A new connection with the same key does not even get an answer (the handshake is refused).
    again = running.client("alice")
    again.send("hello", {})
    assert again.recv(2) is None
    # Everyone else carries on.
    assert bob.request("hello", {})[1]["scientist"] == "bob"

    refused = [e for e in entries(owned) if e["event"] == "refusal" and e.get("ename") == "AuthenticationError"]
    assert len(refused) == 3 and {e["scientist"] for e in refused} == {"alice"}
    assert {e["key"] for e in refused} == {running.keys["alice"].public.decode()}
    assert not [e for e in entries(owned) if e["event"] == "query" and e.get("text") == "after"]
    [revoked] = [e for e in entries(owned) if e["event"] == "access"]
    assert (revoked["scientist"], revoked["action"], revoked["key"]) == \
        ("alice", "revoked", running.keys["alice"].public.decode())
    # Alice's open requests were withdrawn: the pending one rejected, the approved one expired.
    store = ApprovalStore(owned.workspace.approvals_path)
    assert (store.get(pending).status, store.get(approved).status) == ("rejected", "expired")
    assert not owned.workspace.result_path(approved).exists()
    listed = running.owner("scientist", "list").stdout
    assert "alice" not in listed and "bob" in listed


def test_a_rotated_key_is_refused_and_its_requests_are_served_to_no_one(owned, running, keys):
    old = running.client("alice")
    pending = old.request("fetch", {"plan": rows_plan(), "text": "held"}, timeout=TIMEOUT)[1]["request_id"]
    approved = hold_and_approve(running, old, n=4)
    store = ApprovalStore(owned.workspace.approvals_path)
    assert store.get(pending).scientist_key == keys["alice"].public.decode()

    rotated = running.owner("scientist", "add", "alice", keys["alice_new"].public_file)
    assert rotated.returncode == 0, rotated.stderr
    assert "replaced" in rotated.stdout

    kind, body, _ = old.request("request_status", {"request_id": approved})
    assert (kind, body["ename"]) == ("error", "AuthenticationError")
    running.keys["alice_rotated"] = keys["alice_new"]
    new = running.client("alice_rotated")
    kind, body, _ = new.request("hello", {})
    assert (kind, body["scientist"]) == ("ok", "alice")
    # The old key's requests: the same answer as for an id that never existed, even under the same name.
    for request_id in (pending, approved):
        kind, body, frames = new.request("request_status", {"request_id": request_id})
        kind2, nothing, _ = new.request("request_status", {"request_id": request_id + 10_000})
        assert (kind, body["ename"], frames) == ("error", "NotFound", [])
        assert body["evalue"].replace(str(request_id), "N") == nothing["evalue"].replace(str(request_id + 10_000), "N")
    assert (store.get(pending).status, store.get(approved).status) == ("rejected", "expired")
    assert not [e for e in entries(owned) if e["event"] == "release" and e.get("request_id") == approved]
    # What the new key asks is its own.
    mine = hold_and_approve(running, new, n=2)
    kind, body, frames = new.request("request_status", {"request_id": mine})
    assert kind == "result" and body["request_id"] == mine
    access = [(e["action"], e["key"], e.get("previous_key")) for e in entries(owned) if e["event"] == "access"]
    assert access == [("rotated", keys["alice_new"].public.decode(), keys["alice"].public.decode())]
    # Adding the same key again changes nothing.
    again = running.owner("scientist", "add", "alice", keys["alice_new"].public_file)
    assert again.returncode == 0 and "already allowed" in again.stdout
    assert len([e for e in entries(owned) if e["event"] == "access"]) == 1


def test_a_reply_computed_while_the_key_is_revoked_is_withheld(owned, running):
    # A query accepted just before its key is removed: its answer does not go out.
    aggregate = frame_op("group_by", input=scan("patients_open"), keys=[col("sex")], aggs=[fn("len", col("age"))])
    alice = running.client("alice")
    assert alice.request("hello", {})[0] == "ok"
    with open(owned.workspace.audit_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # the query waits at its first audit entry
        msg_id = alice.send("fetch", {"plan": aggregate, "text": "in flight"})
        time.sleep(0.5)
        owned.workspace.remove_scientist("alice")
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    assert alice.recv(10) is None
    withheld = [e for e in entries(owned) if e["event"] == "refusal" and e.get("request") == msg_id]
    assert [e["ename"] for e in withheld] == ["AuthenticationError"] and "withheld" in withheld[0]["evalue"]


# -- nothing answered without its audit entry --------------------------------------------------------

def test_ids_and_strings_that_cannot_be_stored_get_a_typed_audited_refusal(owned, running):
    alice = running.client("alice")
    approved = hold_and_approve(running, alice)
    cases = {
        "lone surrogate id": raw_envelope("hello", "{}", '"\\ud800"'),
        "control characters in the id": raw_envelope("hello", "{}", '"a\\nb\\u0000"'),
        "an id too long": raw_envelope("hello", "{}", json.dumps("x" * 129)),
        "a poll with a lone surrogate id": raw_envelope("request_status", json.dumps({"request_id": approved}),
                                                         '"\\udc00poll"'),
        "lone surrogate cell text": raw_envelope("fetch", '{"plan":' + json.dumps(rows_plan()) + ',"text":"\\ud800"}',
                                                 '"text-1"'),
        "lone surrogate in the plan": raw_envelope(
            "fetch", '{"plan":' + json.dumps(rows_plan(columns=("AGE",))).replace("AGE", "\\udfff") + '}', '"plan-1"'),
        "lone surrogate save name": raw_envelope("save", '{"plan":' + json.dumps(rows_plan()) + ',"name":"\\ud83d"}',
                                                 '"save-1"'),
        "lone surrogate cancel target": raw_envelope("cancel", '{"target":"\\ud800"}', '"cancel-1"'),
    }
    for what, envelope in cases.items():
        alice.send_frames([envelope])
        kind, reply_id, body = reply_of(alice.recv(30))
        assert (kind, body["ename"]) == ("error", "ProtocolError"), (what, body)
        if "id" in what:
            assert reply_id == "?", what
        else:
            assert reply_id in ("text-1", "plan-1", "save-1", "cancel-1") and "lone UTF-16 surrogate" in body["evalue"]
    refusals = [e for e in entries(owned) if e["event"] == "refusal" and e.get("ename") == "ProtocolError"]
    assert len(refusals) == len(cases)
    assert "'\\ud800'" in [e.get("id_sent") for e in refusals]
    # The poll with a bad id consumed nothing: the approval is intact, no release was audited, and a good
    # poll still gets the rows (one release entry).
    store = ApprovalStore(owned.workspace.approvals_path)
    assert store.get(approved).status == "approved"
    assert not [e for e in entries(owned) if e["event"] == "release" and e.get("request_id") == approved]
    kind, body, frames = alice.request("request_status", {"request_id": approved})
    assert kind == "result"
    eventually(lambda: store.get(approved).status == "released")
    assert len([e for e in entries(owned) if e["event"] == "release" and e.get("request_id") == approved]) == 1
    log = running.log()
    assert "cannot write the audit log" not in log and "Traceback" not in log
    assert alice.request("hello", {})[0] == "ok"


def test_a_request_whose_audit_entry_cannot_be_written_gets_no_answer(owned, running):
    alice = running.client("alice")
    assert alice.request("hello", {})[0] == "ok"
    approved = hold_and_approve(running, alice)
    audit = owned.workspace.audit_path
    kept = audit.with_name("audit.jsonl.kept")
    audit.rename(kept)
    audit.mkdir()  # the log cannot be opened for writing (even by root)
    try:
        alice.send_frames([b"{not json"])
        alice.send("fetch", {"plan": rows_plan(2), "text": "unaudited"})
        alice.send("schema", {"plan": scan("no_such_dataset")})
        alice.send("request_status", {"request_id": approved})
        assert alice.recv(5) is None, "a request was answered without its audit entry"
        assert alice.request("hello", {})[0] == "ok"  # (hello is not audited: it reveals nothing)
    finally:
        audit.rmdir()
        kept.rename(audit)
    # The approval was not consumed: fetched now, with its entry.
    kind, body, frames = alice.request("request_status", {"request_id": approved})
    assert kind == "result"
    assert [e["event"] for e in entries(owned) if e.get("request_id") == approved][-1] == "release"
    assert "left unanswered" in running.log()


def _release_entries(owned, request_id):
    return [e for e in entries(owned) if e["event"] == "release" and e.get("request_id") == request_id]


def test_killed_before_the_release_entry_the_approval_is_intact(owned, keys, patients_csv):
    running = start_executor(owned.path, keys)
    alice = running.client("alice")
    assert alice.request("hello", {})[0] == "ok"  # the connection's entry is written now
    approved = hold_and_approve(running, alice, n=4)
    # Hold the audit log's lock: the executor stops at the release entry, before anything leaves.
    with open(owned.workspace.audit_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        alice.send("request_status", {"request_id": approved})
        assert alice.recv(2) is None
        running.process.send_signal(signal.SIGKILL)
        running.stop()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    store = ApprovalStore(owned.workspace.approvals_path)
    assert store.get(approved).status == "approved" and not _release_entries(owned, approved)
    verified(owned)

    restarted = start_executor(owned.path, keys)
    try:
        kind, body, frames = restarted.client("alice").request("request_status", {"request_id": approved})
        assert kind == "result"
        assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), pl.read_csv(patients_csv).select("age").head(4))
        [release] = _release_entries(owned, approved)
        assert release["sha256"] == hashlib.sha256(frames[0]).hexdigest()
        eventually(lambda: store.get(approved).status == "released")
    finally:
        restarted.stop()
    verified(owned)


def test_killed_between_the_release_entry_and_the_rows_the_approval_is_not_lost(owned, keys, patients_csv):
    running = start_executor(owned.path, keys)
    alice = running.client("alice")
    approved = hold_and_approve(running, alice, n=4)
    # Hold the approval store's write lock: the executor writes the release entry, then waits to consume the
    # approval (before any row leaves), and is killed there.
    blocker = sqlite3.connect(owned.workspace.approvals_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        alice.send("request_status", {"request_id": approved})
        eventually(lambda: len(_release_entries(owned, approved)) == 1)
        assert alice.recv(1) is None  # no rows before the approval is consumed
        running.process.send_signal(signal.SIGKILL)
        running.stop()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store = ApprovalStore(owned.workspace.approvals_path)
    assert store.get(approved).status == "approved"  # not consumed
    verified(owned)

    restarted = start_executor(owned.path, keys)
    try:
        alice = restarted.client("alice")
        kind, body, frames = alice.request("request_status", {"request_id": approved})
        assert kind == "result"
        assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), pl.read_csv(patients_csv).select("age").head(4))
        sha = hashlib.sha256(frames[0]).hexdigest()
        assert [e["sha256"] for e in _release_entries(owned, approved)] == [sha, sha]
        eventually(lambda: store.get(approved).released_at is not None)
        assert store.get(approved).status == "released"
        # The release is finished: asking again is a re-release (its own entry), not a third release.
        kind, body, frames = alice.request("request_status", {"request_id": approved})
        assert kind == "result" and hashlib.sha256(frames[0]).hexdigest() == sha
        assert len(_release_entries(owned, approved)) == 2
        assert [e["event"] for e in entries(owned) if e.get("request_id") == approved][-1] == "rerelease"
    finally:
        restarted.stop()
    verified(owned)


def test_a_release_interrupted_after_the_approval_was_consumed_is_sent_again_to_its_key_only(owned, running):
    alice, bob = running.client("alice"), running.client("bob")
    approved = hold_and_approve(running, alice, n=4)
    store = ApprovalStore(owned.workspace.approvals_path)
    # What a crash between consuming the approval and handing the rows over leaves behind.
    store.begin_release(approved)
    assert store.get(approved).status == "released" and store.get(approved).released_at is None
    kind, body, _ = bob.request("request_status", {"request_id": approved})
    assert (kind, body["ename"]) == ("error", "NotFound")
    kind, body, frames = alice.request("request_status", {"request_id": approved})
    assert kind == "result" and body["request_id"] == approved
    [release] = _release_entries(owned, approved)
    assert release["sha256"] == hashlib.sha256(frames[0]).hexdigest() and release["again"]
    eventually(lambda: store.get(approved).released_at is not None)
    # The release is finished: asking again is a re-release, audited as one; bob still gets nothing.
    kind, body, _ = alice.request("request_status", {"request_id": approved})
    assert kind == "result" and body["request_id"] == approved
    assert len(_release_entries(owned, approved)) == 1
    assert [e["event"] for e in entries(owned) if e.get("request_id") == approved][-1] == "rerelease"
    kind, body, _ = bob.request("request_status", {"request_id": approved})
    assert (kind, body["ename"]) == ("error", "NotFound")


# -- bounded growth ------------------------------------------------------------------------------------

def test_a_plan_over_the_size_limit_is_refused_with_a_clear_error(owned, running):
    alice = running.client("alice")
    plan = large_plan(MAX_PLAN_BYTES // 16)
    assert len(canonical_json(plan)) > MAX_PLAN_BYTES
    kind, body, _ = alice.request("fetch", {"plan": plan, "text": "too large"})
    assert (kind, body["ename"]) == ("error", "LimitExceeded")
    assert body["details"] == {"limit": "max_plan_bytes", "max_bytes": MAX_PLAN_BYTES}
    assert f"{MAX_PLAN_BYTES:,}" in body["evalue"]
    [refusal] = [e for e in entries(owned) if e["event"] == "refusal" and e.get("ename") == "LimitExceeded"]
    assert refusal["plan_bytes"] == len(canonical_json(plan)) and "plan_hash" not in refusal
    assert not [e for e in entries(owned) if e["event"] == "plan"]
    # Just under the limit is taken.
    smaller = large_plan(9000)
    assert len(canonical_json(smaller)) < MAX_PLAN_BYTES
    kind, body, _ = alice.request("fetch", {"plan": smaller, "text": "large"})
    assert (kind, body["ename"]) == ("error", "PolicyViolation")


def test_a_repeated_large_plan_is_kept_once_and_each_request_costs_a_bounded_entry(owned, running):
    alice = running.client("alice")
    plan = large_plan(9000)
    size = len(canonical_json(plan))
    before = owned.workspace.audit_path.stat().st_size
    for i in range(12):
        kind, body, _ = alice.request("fetch", {"plan": plan, "text": "the same large plan"}, timeout=TIMEOUT)
        assert (kind, body["ename"]) == ("error", "PolicyViolation")
    grown = owned.workspace.audit_path.stat().st_size - before
    plans = [e for e in entries(owned) if e["event"] == "plan" and e["plan_hash"] == plan_hash(plan)]
    assert len(plans) == 1 and plans[0]["plan"] == plan
    # One copy of the plan, then a few small entries per request (a query and its refusal).
    assert grown < size + 12 * 3000, (grown, size)
    lines = owned.workspace.audit_path.read_bytes().splitlines()
    assert max(len(line) for line in lines if b'"event":"plan"' not in line) <= MAX_ENTRY_BYTES
    queries = [e for e in entries(owned) if e["event"] == "query" and e.get("text") == "the same large plan"]
    assert len(queries) == 12 and {e["plan_hash"] for e in queries} == {plan_hash(plan)}


def test_refused_requests_are_rate_limited_per_key(owned, keys):
    set_config(owned, max_refusals_per_minute=30)  # refills one every 2 s
    running = start_executor(owned.path, keys)
    try:
        alice, bob = running.client("alice"), running.client("bob")
        for i in range(40):
            alice.send_frames([json.dumps({"v": 1, "id": f"junk{i}", "kind": "nope", "body": {}}).encode()])
        # Throttled: even a well-formed request is dropped, unprocessed; other keys are served.
        alice.send("hello", {}, msg_id="hello-while-throttled")
        assert bob.request("hello", {})[1]["scientist"] == "bob"
        answered = []
        while (frames := alice.recv(3)) is not None:
            answered.append(reply_of(frames))
        names = sorted(body["ename"] for _, _, body in answered)  # (answered by two threads: in any order)
        assert names == ["LimitExceeded"] + ["ProtocolError"] * 30, names
        [limited] = [body for _, _, body in answered if body["ename"] == "LimitExceeded"]
        assert "30 a minute" in limited["evalue"] and limited["details"] == {"limit": "max_refusals_per_minute"}
        refusals = [e for e in entries(owned) if e["event"] == "refusal" and e["scientist"] == "alice"]
        assert sorted(e["ename"] for e in refusals) == ["LimitExceeded"] + ["ProtocolError"] * 30
        # (by now one refusal's worth has refilled) served again, and the drops are accounted for
        kind, body, _ = alice.request("hello", {})
        assert (kind, body["scientist"]) == ("ok", "alice")
        [throttled] = [e for e in entries(owned) if e["event"] == "throttled"]
        assert throttled["scientist"] == "alice" and throttled["dropped"] == 10
        assert throttled["key"] == keys["alice"].public.decode() and throttled["max_refusals_per_minute"] == 30
    finally:
        running.stop()
    verified(owned)
