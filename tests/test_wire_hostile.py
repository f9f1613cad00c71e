"""A hostile scientist on the wire: hand-made frames, unknown keys, forged identities.

Each malformed message must get the canonical typed error (``{"ename",
"evalue", "details"}``), and the executor must keep serving afterwards.
"""
from __future__ import annotations

import json
import time

import pytest
import zmq.auth

from bastion_kernel.contract import protocol
from bastion_kernel.contract.plan import col, frame_op, scan
from owner_console.approvals import ApprovalStore
from owner_console.audit import read_entries

from wire import RawClient

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier


def _envelope(**fields) -> bytes:
    message = {"v": 1, "id": "m1", "kind": "hello", "body": {}}
    message.update(fields)
    return json.dumps({k: v for k, v in message.items() if v is not ...}).encode()


def _assert_error(frames, ename):
    assert frames is not None, "no reply"
    kind, _msg_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
    assert kind == "error"
    assert set(body) == {"ename", "evalue", "details"}
    assert body["ename"] == ename, body
    assert isinstance(body["evalue"], str) and body["evalue"]
    assert isinstance(body["details"], dict)
    return body


def _assert_still_serves(client, name="alice"):
    kind, body, _ = client.request("hello", {})
    assert (kind, body["scientist"]) == ("ok", name)


DEEP = 100_000
MALFORMED = {
    "not JSON": [b"{this is not json"],
    "not UTF-8": [b"\xff\xfe\x00{"],
    "JSON but not an object": [b"[1, 2, 3]"],
    "NaN constant": [b'{"v": 1, "id": "m1", "kind": "hello", "body": {"x": NaN}}'],
    "wrong version": [_envelope(v=2)],
    "version as bool": [_envelope(v=True)],
    "unknown kind": [_envelope(kind="drop_tables")],
    "a reply kind": [_envelope(kind="ok")],
    "missing body": [_envelope(body=...)],
    "body not an object": [_envelope(body=["plan"])],
    "missing id": [_envelope(id=...)],
    "unknown envelope field": [_envelope(user="bob")],
    "extra frames": [_envelope(), b"second frame"],
    "empty frame": [b""],
    "deeply nested JSON": [b'{"v": 1, "id": "m1", "kind": "hello", "body": ' + b"[" * DEEP + b"]" * DEEP + b"}"],
    "just over the size limit": [_envelope(body={"pad": "x" * (protocol.MAX_ENVELOPE_BYTES + 10)})],
    "a body claiming another scientist": [_envelope(body={"scientist": "bob"})],
    "fetch without a plan": [_envelope(kind="fetch", body={"text": "x"})],
    "fetch with a string plan": [_envelope(kind="fetch", body={"plan": "DROP TABLE", "text": "x"})],
    "fetch claiming another scientist": [_envelope(kind="fetch", body={"plan": scan("patients"), "text": "",
                                                                       "scientist": "bob"})],
    "request id not a number": [_envelope(kind="request_status", body={"request_id": "1"})],
    "request id a bool": [_envelope(kind="request_status", body={"request_id": True})],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_gets_protocol_error(executor, frames):
    client = executor.client("alice")
    client.send_frames(frames)
    _assert_error(client.recv(30), "ProtocolError")
    _assert_still_serves(client)


def test_error_reply_carries_the_request_id_when_readable(executor):
    client = executor.client("alice")
    client.send_frames([_envelope(id="my-id", kind="nope")])
    frames = client.recv(30)
    _assert_error(frames, "ProtocolError")
    assert json.loads(frames[0])["id"] == "my-id"


def test_identity_comes_from_the_key_not_the_message(executor):
    alice, bob = executor.client("alice"), executor.client("bob")
    _assert_still_serves(alice, "alice")
    _assert_still_serves(bob, "bob")


def test_far_oversized_message_drops_only_that_connection(executor):
    client = executor.client("alice")
    client.send_frames([b"x" * (protocol.MAX_ENVELOPE_BYTES * 4)])
    other = executor.client("bob")
    _assert_still_serves(other, "bob")
    # ZeroMQ cut the connection before buffering the message; the client reconnects.
    _assert_still_serves(client)


def test_many_frames_message_is_refused(executor):
    client = executor.client("alice")
    client.send_frames([_envelope()] + [b"x"] * 50)
    body = _assert_error(client.recv(30), "ProtocolError")
    assert "51 frames" in body["evalue"]
    _assert_still_serves(client)


def test_unknown_plan_operation_is_a_typed_error(executor):
    client = executor.client("alice")
    kind, body, frames = client.request("fetch", {"plan": {"op": "read_file", "path": "/etc/passwd"}, "text": ""})
    assert kind == "error" and body["ename"] == "UnsupportedOperation" and frames == []
    assert "read_file" in body["evalue"]
    kind, body, _ = client.request("schema", {"plan": frame_op("select", input=scan("patients"),
                                                                 exprs=[col("no_such_column")])})
    assert kind == "error" and body["ename"] == "SchemaError"
    kind, body, _ = client.request("fetch", {"plan": scan("no_such_dataset"), "text": ""})
    assert kind == "error" and body["ename"] == "SchemaError"
    _assert_still_serves(client)


def test_unknown_key_gets_nothing_and_changes_nothing(executor, tmp_path):
    workspace = executor.workspace
    requests_before = ApprovalStore(workspace / "approvals.sqlite").list()
    mallory = executor.client("mallory")
    mallory.send("hello", {})
    mallory.send("fetch", {"plan": frame_op("head", input=scan("patients"), n=5), "text": ""})
    alice = executor.client("alice")
    _assert_still_serves(alice)  # served while mallory waits
    assert mallory.recv(3) is None
    # A key pair nobody registered, but made up on the spot, fares no better.
    _public_file, secret_file = zmq.auth.create_certificates(tmp_path, "stranger")
    pub, sec = zmq.auth.load_certificate(secret_file)
    with RawClient(executor.endpoint, executor.server_public_key, pub, sec) as stranger:
        stranger.send("hello", {})
        assert stranger.recv(2) is None
    audit_after = list(read_entries(workspace / "audit.jsonl"))
    assert not [e for e in audit_after if e.get("scientist") not in ("alice", "bob")]
    assert ApprovalStore(workspace / "approvals.sqlite").list() == requests_before
    _assert_still_serves(alice)


def test_wrong_server_key_gets_nothing(executor, scientist_keys):
    alice = scientist_keys["alice"]
    wrong_server = zmq.auth.load_certificate(alice.public_file)[0]
    with RawClient(executor.endpoint, wrong_server, alice.public, alice.secret) as client:
        client.send("hello", {})
        assert client.recv(2) is None
    _assert_still_serves(executor.client("alice"))


def test_concurrent_clients_are_all_answered(executor):
    clients = [executor.client(name) for name in ("alice", "bob") * 5]
    ids = [client.send("hello", {}) for client in clients]
    for client, msg_id, name in zip(clients, ids, ("alice", "bob") * 5):
        kind, body, _ = client.reply(msg_id, 30)
        assert (kind, body["scientist"]) == ("ok", name)


def test_a_flood_gets_one_reply_per_request(executor):
    """Under a flood every request is answered exactly once: served, or refused with LimitExceeded."""
    client = executor.client("bob")
    plan = frame_op("select", input=scan("patients"), exprs=[col("age")])
    sent = [client.send("schema", {"plan": plan}) for _ in range(150)]
    answers = {}
    while len(answers) < len(sent):
        frames = client.recv(60)
        assert frames is not None, f"{len(sent) - len(answers)} requests were never answered"
        kind, msg_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
        assert msg_id in sent and msg_id not in answers
        answers[msg_id] = (kind, body)
    for kind, body in answers.values():
        assert kind == "ok" or (kind == "error" and body["ename"] == "LimitExceeded"), body
    assert client.recv(1) is None
    _assert_still_serves(client, "bob")


def test_malformed_messages_are_audited_under_the_sender(executor):
    client = executor.client("bob")
    client.send_frames([_envelope(id="audit-me", kind="steal")])
    _assert_error(client.recv(30), "ProtocolError")
    _assert_still_serves(client, "bob")
    deadline = time.monotonic() + 30  # the entry is written by a worker, maybe after the reply
    while True:
        refusals = [e for e in read_entries(executor.workspace / "audit.jsonl")
                    if e["event"] == "refusal" and e.get("request") == "audit-me"]
        if refusals or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(e["scientist"], e["ename"]) for e in refusals] == [("bob", "ProtocolError")]
