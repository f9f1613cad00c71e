"""Nothing lost: SIGKILL the executor (and the owner's tools) at awkward moments, restart, check everything.

Each test builds its own workspace, runs a real ``bastion-owner serve``,
kills it with SIGKILL (no handler runs, nothing is flushed on the way out)
and starts a new executor on the same workspace.  After every restart:

* ``bastion-owner audit verify`` exits 0 (a line torn by the kill is cut off
  and recorded as a ``recovered`` entry when the log is next opened);
* every request that was pending is still pending, with its held table
  intact (its SHA-256 matches the store);
* every approval that was committed can still be fetched by its scientist;
* no decision is stored without its audit entry.

Where the kill lands is not exactly controllable, so each test kills at
several points and the checks hold wherever it landed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from typing import Iterator

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import col, frame_op, length, scan
from owner_console.approvals import ApprovalStore
from owner_console.audit import read_entries
from owner_console.console import OwnerConsole

from conftest import ExecutorProcess, make_keys, make_workspace, running_executor, start_executor

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

TIMEOUT = 60


def rows_plan(columns, n, dataset="patients"):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def slow_plan():
    """A self-join on a ten-valued key (millions of intermediate rows), then counts: a query that takes a while."""
    joined = frame_op("join", left=scan("patients_open"), right=scan("patients_open"), how="inner",
                      left_on=[col("diagnosis")], right_on=[col("diagnosis")], suffix="_other")
    return frame_op("group_by", input=joined, keys=[col("diagnosis")], aggs=[length()])


@pytest.fixture
def keys(tmp_path):
    return {name: make_keys(tmp_path / "keys", name) for name in ("alice", "bob")}


@pytest.fixture
def owned(tmp_path, patients_csv, keys):
    owned = make_workspace(tmp_path / "ws", patients_csv)
    for name in keys:
        owned.workspace.add_scientist(name, keys[name].public_file)
    return owned


@pytest.fixture
def source(patients_csv):
    return pl.read_csv(patients_csv)


def sigkill(running) -> None:
    for client in running._clients:
        client.close()
    running._clients.clear()
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(30)
    assert running.process.returncode == -signal.SIGKILL


def audit_events(owned) -> list[dict]:
    return list(read_entries(owned.workspace.audit_path))


@contextlib.contextmanager
def restarted_after_crash(owned, keys) -> Iterator[tuple[ExecutorProcess, ApprovalStore]]:
    """The executor started again after a crash, once its workspace passed :func:`assert_consistent`."""
    with running_executor(owned.path, keys) as restarted:
        yield restarted, assert_consistent(owned)


def assert_consistent(owned, reopen_log: bool = False) -> ApprovalStore:
    """The checks every restart must pass (see the module docstring); returns the store.

    ``reopen_log`` opens the audit log as the next writer would (which cuts a
    torn last line off), for a check made while no writer has restarted.
    """
    if reopen_log:
        owned.workspace.audit_log()
    verified = owned.owner("audit", "verify")
    assert verified.returncode == 0, verified.stderr
    store = owned.workspace.approvals()
    entries = audit_events(owned)
    decided = {(e["event"], e["request_id"]) for e in entries if e["event"] in ("approval", "rejection")}
    for request in store.list():
        if request.status in ("pending", "approved"):
            held = owned.workspace.result_path(request.id).read_bytes()
            assert hashlib.sha256(held).hexdigest() == request.result_sha256, request.id
        if request.status in ("approved", "released"):
            assert ("approval", request.id) in decided, request.id
        if request.status == "rejected":
            assert ("rejection", request.id) in decided, request.id
    return store


def send_burst(client, count: int) -> None:
    """Send ``count`` row-level fetches (each a distinct plan) plus a slow query, without waiting."""
    for i in range(count):
        client.send("fetch", {"plan": rows_plan(("age", "cost"), i + 1), "text": f"burst {i}"})
    client.send("fetch", {"plan": slow_plan(), "text": "slow"})


@pytest.mark.parametrize("replies_before_kill", [0, 3, 12])
def test_kill_mid_queries_keeps_pending_requests_pending(owned, keys, source, replies_before_kill):
    running = start_executor(owned.path, keys)
    alice = running.client("alice")
    earlier = [alice.request("fetch", {"plan": rows_plan(("sex",), 2), "text": "before"}, timeout=TIMEOUT)[1]
               ["request_id"] for _ in range(2)]
    send_burst(alice, 20)
    pending_seen = []
    for _ in range(replies_before_kill):
        kind, body, _ = alice.reply(timeout=TIMEOUT)
        if kind == "pending":
            pending_seen.append(body["request_id"])
    sigkill(running)

    with restarted_after_crash(owned, keys) as (restarted, store):
        pending = {r.id for r in store.list("pending")}
        assert set(earlier) | set(pending_seen) <= pending
        alice = restarted.client("alice")
        for request_id in earlier + pending_seen:
            kind, body, _ = alice.request("request_status", {"request_id": request_id})
            assert (kind, body["status"]) == ("pending", "pending")
        # The queue still works: approve one from before the crash and fetch it.
        assert restarted.owner("approve", str(earlier[0])).returncode == 0
        kind, body, frames = alice.request("request_status", {"request_id": earlier[0]})
        assert kind == "result"
        assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), source.select("sex").head(2))
        # Every request the crash left in the store holds the table of its own plan.
        for request in store.list("pending"):
            held = pl.read_ipc(owned.workspace.result_path(request.id), memory_map=False)
            if request.query_text.startswith("burst"):
                assert_frame_equal(held, source.select("age", "cost").head(request.plan["n"]))
        assert_consistent(owned)


def test_kill_right_after_approvals_loses_none(owned, keys, source):
    running = start_executor(owned.path, keys)
    alice, bob = running.client("alice"), running.client("bob")
    plans = {}
    for client, name, n in ((alice, "alice", 3), (alice, "alice", 4), (bob, "bob", 5), (alice, "alice", 6)):
        kind, body, _ = client.request("fetch", {"plan": rows_plan(("age",), n), "text": "x"}, timeout=TIMEOUT)
        plans[body["request_id"]] = (name, n)
    ids = list(plans)
    assert running.owner("approve", str(ids[0])).returncode == 0
    assert running.owner("approve", str(ids[2])).returncode == 0
    assert running.owner("reject", str(ids[3]), "--reason", "no").returncode == 0
    sigkill(running)  # straight after the decisions: nothing has been fetched yet

    with restarted_after_crash(owned, keys) as (restarted, store):
        assert [store.get(i).status for i in ids] == ["approved", "pending", "approved", "rejected"]
        for request_id in (ids[0], ids[2]):
            name, n = plans[request_id]
            kind, body, frames = restarted.client(name).request("request_status", {"request_id": request_id})
            assert kind == "result"
            assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), source.select("age").head(n))
        kind, body, _ = restarted.client("alice").request("request_status", {"request_id": ids[3]})
        assert body["ename"] == "ReviewRejected" and body["details"]["reason"] == "no"
        kind, body, _ = restarted.client("alice").request("request_status", {"request_id": ids[1]})
        assert kind == "pending"
        assert_consistent(owned)


def test_kill_during_a_burst_of_audit_writes(owned, keys):
    running = start_executor(owned.path, keys)
    bob = running.client("bob")
    # Each malformed message is answered and audited as a refusal; hellos are not
    # audited, so the audit writes are the refusals (and connections).
    for i in range(300):
        bob.send_frames([json.dumps({"v": 1, "id": f"junk{i}", "kind": "nope", "body": {}}).encode()])
    deadline = time.monotonic() + TIMEOUT
    while sum(1 for e in audit_events(owned) if e["event"] == "refusal") < 10:
        assert time.monotonic() < deadline, "the refusals were never audited"
    sigkill(running)  # the refusals are being written while the replies stream out

    with restarted_after_crash(owned, keys) as (restarted, _):
        kind, body, _ = restarted.client("bob").request("hello", {})
        assert kind == "ok"


def test_a_torn_audit_line_left_by_a_crash_is_recovered_on_restart(owned, keys):
    running = start_executor(owned.path, keys)
    running.client("alice").request("fetch", {"plan": rows_plan(("age",), 2), "text": "x"}, timeout=TIMEOUT)
    sigkill(running)
    # What a kill in the middle of writing a long line leaves: a fragment without its newline.
    with open(owned.workspace.audit_path, "ab") as handle:
        handle.write(b'{"event":"query","plan":{"op":"head","input":{"op":"sel')
    assert owned.owner("audit", "verify").returncode == 1

    with restarted_after_crash(owned, keys) as (restarted, _):
        [recovered] = [e for e in audit_events(owned) if e["event"] == "recovered"]
        assert recovered["fragment"].startswith('{"event":"query"')
        kind, _, _ = restarted.client("alice").request("hello", {})
        assert kind == "ok"


def test_kill_mid_slow_query(owned, keys):
    running = start_executor(owned.path, keys)
    alice = running.client("alice")
    alice.send("fetch", {"plan": slow_plan(), "text": "slow"})
    deadline = time.monotonic() + TIMEOUT
    while not any(e["event"] == "query" and e.get("text") == "slow" for e in audit_events(owned)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    sigkill(running)  # the query was received and audited; whether it finished is unknown

    with restarted_after_crash(owned, keys) as (restarted, _):
        kind, body, _ = restarted.client("alice").request("fetch", {"plan": slow_plan(), "text": "again"},
                                                          timeout=TIMEOUT)
        assert kind == "result", body


# -- the owner's tools killed, and writing concurrently with the executor --------------------

_DECIDER = """
import sys
from owner_console.approvals import ApprovalError, record_decision
from owner_console.workspace import Workspace
workspace = Workspace(sys.argv[1])
store, audit = workspace.approvals(), workspace.audit_log()
print("ready", flush=True)
for line in sys.stdin:
    request_id = int(line)
    try:
        record_decision(store, audit, request_id, request_id % 2 == 0, "decided by a script", by=sys.argv[2])
    except ApprovalError:
        pass
    for i in range(5):
        audit.append("error", None, note=f"filler {i}", request_id=request_id)
    print(request_id, flush=True)
"""


def start_decider(owned, name: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _DECIDER, str(owned.path), name],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_owner_process_killed_mid_decision_never_leaves_an_unaudited_decision(owned, keys):
    running = start_executor(owned.path, keys)
    try:
        alice = running.client("alice")
        ids = [alice.request("fetch", {"plan": rows_plan(("age",), n), "text": "x"}, timeout=TIMEOUT)[1]
               ["request_id"] for n in range(1, 13)]
        for cut in range(0, len(ids), 3):
            decider = start_decider(owned, f"script{cut}")
            for request_id in ids[cut:cut + 3]:
                decider.stdin.write(f"{request_id}\n")
            decider.stdin.flush()
            if cut:  # let some of it happen; the first one is killed at once
                decider.stdout.readline()
            decider.send_signal(signal.SIGKILL)
            decider.wait(30)
            store = assert_consistent(owned, reopen_log=True)
            for request_id in ids[cut:cut + 3]:
                assert store.get(request_id).status in ("pending", "approved", "rejected")
        # The executor was running all along and still releases what was approved.
        for request in store.list("approved"):
            kind, _, _ = running.client("alice").request("request_status", {"request_id": request.id})
            assert kind == "result"
    finally:
        running.stop()
    assert_consistent(owned)


def test_executor_console_and_command_line_writing_at_once(owned, keys):
    running = start_executor(owned.path, keys)
    console = OwnerConsole(owned.path, refresh_seconds=0.05)
    deciders = [start_decider(owned, f"cli{i}") for i in range(2)]
    try:
        alice, bob = running.client("alice"), running.client("bob")
        ids = []
        for n in range(1, 25):
            client = alice if n % 2 else bob
            kind, body, _ = client.request("fetch", {"plan": rows_plan(("cost",), n), "text": "x"}, timeout=TIMEOUT)
            ids.append(body["request_id"])
            # Every request is raced by both scripts and the console; one decision wins.
            for decider in deciders:
                decider.stdin.write(f"{body['request_id']}\n")
                decider.stdin.flush()
            try:
                console.approve(body["request_id"], "console")
            except Exception:
                pass
            bob.send_frames([b"junk"])  # an audited refusal at the same time
        for decider in deciders:
            decider.stdin.close()
            assert decider.wait(TIMEOUT) == 0
        store = assert_consistent(owned)
        entries = audit_events(owned)
        for request_id in ids:
            decisions = [e for e in entries if e["event"] in ("approval", "rejection")
                         and e.get("request_id") == request_id]
            assert len(decisions) == 1, (request_id, decisions)
            expected = "approved" if decisions[0]["event"] == "approval" else "rejected"
            assert store.get(request_id).status == expected
            assert store.get(request_id).decided_by == decisions[0]["by"]
    finally:
        console.close()
        for decider in deciders:
            if decider.poll() is None:
                decider.kill()
                decider.wait(10)
        running.stop()
