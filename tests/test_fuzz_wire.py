"""Fuzzing the wire: random and mutated messages from a registered scientist to a real executor.

A registered scientist (alice, with a valid CURVE key) sends random frames,
mutated envelopes, odd encodings (UTF-16, Latin-1), sizes around the envelope
limit, unknown kinds, random bodies and random plans to a real ``bastion-owner
serve`` process on 127.0.0.1.  Every message must get exactly one reply that
is either a valid reply envelope or the canonical error shape ``{ename,
evalue, details}`` with a documented name, within a bound; afterwards the
executor still answers ``hello`` and its process is alive.
"""
from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings

from bastion_kernel.contract import protocol
from hypothesis import strategies as st

from fuzz_strategies import plans, wire_messages

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

REPLY_SECONDS = 20
FUZZ_SETTINGS = settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])


def check_reply(frames: list[bytes] | None) -> tuple[str, str, dict]:
    """A reply is a valid envelope; an error has exactly the canonical shape and a documented name."""
    assert frames is not None, "no reply"
    kind, msg_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
    if kind == "error":
        assert set(body) == {"ename", "evalue", "details"}, body
        assert body["ename"] in protocol.ERROR_NAMES, body
        assert isinstance(body["evalue"], str) and body["evalue"]
        assert isinstance(body["details"], dict)
        assert len(frames) == 1
    elif kind == "result":
        assert len(frames) == 2 and frames[1][:6] == b"ARROW1", "a result carries one Arrow IPC frame"
    else:
        assert len(frames) == 1
    return kind, msg_id, body


def still_serves(client, process) -> None:
    """The executor answers hello (after draining any earlier reply) and its process is alive."""
    probe = uuid.uuid4().hex
    client.send("hello", {}, msg_id=probe)
    kind, body, _ = client.reply(probe, timeout=REPLY_SECONDS)
    assert (kind, body["scientist"]) == ("ok", "alice")
    assert process.poll() is None, "the executor process died"


@pytest.fixture(scope="module")
def alice(executor):
    return executor.client("alice")


@FUZZ_SETTINGS
@given(message=wire_messages())
def test_random_messages_get_one_typed_reply(executor, alice, message):
    alice.send_frames(message)
    kind, _, body = check_reply(alice.recv(REPLY_SECONDS))
    event(f"{kind} {body.get('ename', '')}")  # pytest --hypothesis-show-statistics shows the mix
    still_serves(alice, executor.process)


@FUZZ_SETTINGS
@given(kind=st.sampled_from(["fetch", "schema"]), plan=plans)
def test_random_plans_in_well_formed_envelopes_get_one_typed_reply(executor, alice, kind, plan):
    # Straight past the envelope checks, into the validator, policy and engine.
    msg_id = alice.send(kind, {"plan": plan, "text": "fuzz"} if kind == "fetch" else {"plan": plan})
    reply_kind, reply_id, body = check_reply(alice.recv(REPLY_SECONDS))
    assert reply_id == msg_id
    event(f"{reply_kind} {body.get('ename', '')}")
    still_serves(alice, executor.process)


def test_executor_survived_the_fuzz_and_logged_no_crash(executor, alice):
    # Runs after the fuzz (same module): the process is alive and nothing
    # escaped the handlers as an unexpected error.
    still_serves(alice, executor.process)
    assert "Traceback" not in executor.log(), executor.log()[-3000:]
