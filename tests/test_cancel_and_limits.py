"""Cancellation, the query time limit and the per-request limits, against a real executor process.

The slow query is a cross join of the 5,000-row patients table with itself
(25 million rows) aggregated by sex (mean, median, standard deviation and a
distinct count): about five seconds here (see
``test_the_slow_query_really_is_slow`` for the precondition, measured with
plain polars).  The limits are read from the workspace's ``config.toml`` on
every request, so tests change them in place and restore them.
"""
from __future__ import annotations

import contextlib
import io
import threading
import tomllib
from types import SimpleNamespace

import polars as pl
import pytest
import tomli_w

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import protocol
from bastion_kernel.contract.plan import alias, binary, col, fn, frame_op, length, lit, scan
from bastion_kernel.contract.protocol import BastionError
from owner_console import executor as core
from owner_console.audit import read_entries
from owner_console.model import Dataset, Policy
from owner_console.server import MAX_TEXT_CHARS
from owner_console.workspace import atomic_write

from conftest import serving
from test_kernel import bastion_kernel, connect_scientist

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

SLOW = frame_op("group_by",
                input=frame_op("join", left=scan("patients_open"),
                               right=frame_op("select", input=scan("patients_open"),
                                              exprs=[alias(col("age"), "age2")]),
                               how="cross", left_on=[], right_on=[], suffix="_r"),
                keys=[col("sex")],
                aggs=[alias(fn("mean", binary("sub", col("age"), col("age2"))), "d"),
                      alias(fn("median", binary("sub", col("age"), col("age2"))), "d_median"),
                      alias(fn("std", binary("sub", col("age"), col("age2"))), "d_std"),
                      alias(fn("n_unique", binary("add", binary("mul", col("age"), lit(1000)), col("age2"))),
                            "pairs")])
QUICK = frame_op("group_by", input=scan("patients"), keys=[col("sex")], aggs=[alias(length(), "n")])


@pytest.fixture(scope="module")
def running(tmp_path_factory, patients_csv):
    with serving(tmp_path_factory, patients_csv) as process:
        yield process


@contextlib.contextmanager
def config(running, **settings):
    """Set top-level ``config.toml`` keys for the duration (the executor re-reads it per request)."""
    path = running.workspace / "config.toml"
    original = path.read_bytes()
    data = tomllib.loads(original.decode())
    data.update(settings)
    atomic_write(path, tomli_w.dumps(data).encode())
    try:
        yield
    finally:
        atomic_write(path, original)


def _fetch(client, plan, msg_id=None):
    return client.send("fetch", {"plan": plan, "text": "cell"}, msg_id)


def _replies(client, *ids, timeout=120):
    """The replies to several requests, whatever order they arrive in: ``{id: (kind, body)}``."""
    got = {}
    while set(got) != set(ids):
        frames = client.recv(timeout)
        if frames is None:
            raise TimeoutError(f"no reply to {sorted(set(ids) - set(got))} within {timeout} s")
        kind, reply_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
        got[reply_id] = (kind, body)
    return got


def _audit(running, event, **match):
    return [e for e in read_entries(running.workspace / "audit.jsonl")
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _serves(client, text: str) -> None:
    """A quick query of ``client`` completes."""
    kind, body, _ = client.request("fetch", {"plan": QUICK, "text": text}, timeout=120)
    assert kind == "result", body


def _still_serving(running):
    bob = running.client("bob")
    assert bob.request("hello", {})[0] == "ok"
    _serves(bob, "after")


def test_the_slow_query_really_is_slow(patients_csv):
    # Precondition for the tests below: plain polars needs 25 million joined rows for it.
    source = pl.read_csv(patients_csv)
    assert source.height ** 2 >= 25_000_000


def test_engine_stops_waiting_when_cancelled(patients_csv):
    catalog = {"patients_open": Dataset("patients_open", patients_csv, "csv", Policy(unsafe="log"))}
    for delay in (0.0, 0.3):  # before it starts, and while polars runs it
        cancel = threading.Event()
        threading.Timer(delay, cancel.set).start()
        with pytest.raises(BastionError) as raised:
            core.evaluate(SLOW, catalog, "alice", cancel=cancel)
        assert raised.value.ename == "ExecutionError" and raised.value.details == {"cancelled": True}
    # Without cancel or limit the same call completes (and matches plain polars).
    quick = frame_op("select", input=scan("patients_open"), exprs=[alias(fn("mean", col("age")), "m")])
    table = core.evaluate(quick, catalog, "alice", cancel=threading.Event(), timeout=600).table
    assert table["m"].to_list() == pl.read_csv(patients_csv).select(pl.col("age").mean().alias("m"))["m"].to_list()


def test_the_smallest_time_limit_wins():
    def dataset(limit):
        return SimpleNamespace(policy=SimpleNamespace(query_timeout_seconds=limit))
    assert core.query_timeout([dataset(None), dataset(20)], 300) == 20
    assert core.query_timeout([dataset(500)], 300) == 300
    assert core.query_timeout([SimpleNamespace(policy=SimpleNamespace())], None) is None
    assert core.query_timeout([], 7.5) == 7.5


def test_a_cancel_message_cancels_a_running_query(running):
    alice = running.client("alice")
    target = _fetch(alice, SLOW)
    threading.Event().wait(0.5)  # (running or still queued: either way it is cancelled)
    cancel = alice.send("cancel", {"target": target})
    replies = _replies(alice, target, cancel)
    kind, body = replies[cancel]
    assert kind == "ok" and body == {"target": target, "cancelled": True}, body
    kind, body = replies[target]
    assert kind == "error" and body["ename"] == "ExecutionError" and body["details"] == {"cancelled": True}, body
    assert "cancelled" in body["evalue"]
    [cancel] = _audit(running, "cancel", target=target)
    assert cancel["scientist"] == "alice" and cancel["found"] is True
    assert _audit(running, "refusal", request=target)[0]["ename"] == "ExecutionError"
    _still_serving(running)
    _serves(alice, "again")  # the same scientist's next query completes too


def test_only_the_same_scientist_can_cancel(running):
    alice, bob = running.client("alice"), running.client("bob")
    target = _fetch(alice, SLOW)
    kind, body, _ = bob.request("cancel", {"target": target})
    assert kind == "error" and body["ename"] == "NotFound", body
    kind, unknown, _ = bob.request("cancel", {"target": "no-such-request"})
    assert unknown["ename"] == "NotFound"
    assert body["evalue"].replace(target, "ID") == unknown["evalue"].replace("no-such-request", "ID")
    cancel = alice.send("cancel", {"target": target})
    replies = _replies(alice, target, cancel)
    assert replies[cancel][0] == "ok"
    assert replies[target][1]["details"] == {"cancelled": True}


def test_a_kernel_client_that_stops_waiting_cancels_its_query(running):
    client = running.kernel_client("alice", timeout=1.0)
    with pytest.raises(BastionError) as raised:
        client.fetch(SLOW, "slow")
    assert raised.value.ename == "ExecutionError" and "did not answer" in raised.value.evalue
    [query] = [e for e in _audit(running, "query", scientist="alice") if e.get("text") == "slow"]
    for _ in range(400):  # the cancel is sent without waiting for its answer
        if _audit(running, "cancel", target=query["request"]) and _audit(running, "refusal",
                                                                          request=query["request"]):
            break
        threading.Event().wait(0.05)
    [cancel] = _audit(running, "cancel", target=query["request"])
    assert cancel["found"] is True
    assert _audit(running, "refusal", request=query["request"])[0]["ename"] == "ExecutionError"


def test_the_time_limit_cancels_a_long_query(running):
    alice = running.client("alice")
    with config(running, query_timeout_seconds=1):
        kind, body, _ = alice.request("fetch", {"plan": SLOW, "text": "slow, limited"}, timeout=120)
    assert kind == "error" and body["ename"] == "LimitExceeded", body
    assert body["evalue"] == "the query ran longer than 1 s and was cancelled"
    _still_serving(running)


def test_rows_released_per_request_are_limited(running, patients_csv):
    alice = running.client("alice")
    rows = frame_op("select", input=scan("patients_open"), exprs=[col("age")])
    with config(running, max_rows_released=100):
        kind, body, _ = alice.request("fetch", {"plan": rows, "text": "all ages"}, timeout=120)
        assert kind == "error" and body["ename"] == "LimitExceeded", body
        assert "more than 100 rows" in body["evalue"]
        kind, body, frames = alice.request("fetch", {"plan": frame_op("head", input=rows, n=100), "text": "100"},
                                           timeout=120)
        assert kind == "result", body
        assert pl.read_ipc(io.BytesIO(frames[0]))["age"].to_list() == pl.read_csv(patients_csv)["age"].head(100).to_list()
        # A held (review) result over the limit is refused too, before the owner is asked.
        kind, body, _ = alice.request("fetch", {"plan": frame_op("select", input=scan("patients"),
                                                                 exprs=[col("age")]), "text": "x"}, timeout=120)
        assert kind == "error" and body["ename"] == "LimitExceeded", body
    _still_serving(running)


def test_plan_depth_is_limited(running):
    alice = running.client("alice")
    plan = scan("patients")
    for _ in range(P.MAX_PLAN_DEPTH + 1):
        plan = frame_op("head", input=plan, n=5)
    kind, body, _ = alice.request("fetch", {"plan": plan, "text": "deep"})
    assert kind == "error" and body["ename"] == "LimitExceeded", body
    _still_serving(running)


def test_cell_text_and_envelope_size_are_limited(running):
    alice = running.client("alice")
    kind, body, _ = alice.request("fetch", {"plan": QUICK, "text": "x" * (MAX_TEXT_CHARS + 1)})
    assert kind == "error" and body["ename"] == "ProtocolError" and "longer than" in body["evalue"], body
    # Just over the envelope limit: a typed error (much larger messages are cut off by ZeroMQ).
    # (Its id cannot be read without parsing it, so the reply carries the placeholder id.)
    alice.send("fetch", {"plan": QUICK, "text": "y" * (protocol.MAX_ENVELOPE_BYTES + 10)})
    kind, body, _ = alice.reply(timeout=30)
    assert kind == "error" and body["ename"] == "ProtocolError" and "exceeds" in body["evalue"], body
    _still_serving(running)


def test_a_kernel_interrupt_cancels_the_query_on_the_executor(running, tmp_path):
    config_file, jupyter_path = connect_scientist(running, tmp_path, name="carol")
    with bastion_kernel(config_file, jupyter_path) as (km, kc):
        msg_id = kc.execute('dataset("patients_open").join(dataset("patients_open").select(age2=col("age")), '
                            'how="cross").group_by("sex").agg((col("age") - col("age2")).mean()).fetch()')
        # Interrupt once the executor has the query (its audit log says so).
        for _ in range(600):
            if _audit(running, "query", scientist="carol"):
                break
            threading.Event().wait(0.05)
        km.interrupt_kernel()
        while True:
            reply = kc.get_shell_msg(timeout=120)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        [query] = _audit(running, "query", scientist="carol")
        cancels = _audit(running, "cancel", scientist="carol", target=query["request"])
        assert cancels and cancels[0]["found"] is True
        # The kernel and the executor carry on.
        msg_id = kc.execute('dataset("patients").group_by("sex").agg(pl.len()).fetch()')
        while True:
            reply = kc.get_shell_msg(timeout=120)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        assert reply["content"]["status"] == "ok", reply["content"]
