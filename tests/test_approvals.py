"""The approval store: states, atomic decisions, durability and concurrent writers."""
from __future__ import annotations

import hashlib
import multiprocessing
import sqlite3
import threading

import pytest

from bastion_kernel.contract.plan import plan_hash, scan
from owner_console.approvals import ApprovalError, ApprovalStore

PLAN = {"op": "head", "input": scan("patients"), "n": 5}


def _create(store, scientist="alice", payload=b"table"):
    return store.create(scientist=scientist, plan=PLAN, plan_text="dataset('patients').head(5)",
                        plan_tree={"op": "head"}, query_text="patients.head(5).fetch()",
                        reason="row-level result", columns=[["age", "Int64"]], rows=5, notes=["n"],
                        write_result=lambda request_id: hashlib.sha256(payload).hexdigest())


def test_create_and_read_back(tmp_path):
    store = ApprovalStore(tmp_path / "a.sqlite")
    request_id = _create(store)
    record = store.get(request_id)
    assert record.status == "pending" and record.scientist == "alice"
    assert record.plan == PLAN and record.plan_hash == plan_hash(PLAN)
    assert record.columns == [["age", "Int64"]] and record.rows == 5 and record.notes == ["n"]
    assert record.result_sha256 == hashlib.sha256(b"table").hexdigest()
    assert [r.id for r in store.list("pending")] == [request_id]
    assert store.get(request_id + 1) is None
    mode = sqlite3.connect(tmp_path / "a.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_state_machine(tmp_path):
    store = ApprovalStore(tmp_path / "a.sqlite")
    first, second = _create(store), _create(store)
    with pytest.raises(ApprovalError):
        store.mark_released(first)  # not approved yet
    assert store.decide(first, True, "fine").status == "approved"
    with pytest.raises(ApprovalError):
        store.decide(first, False, "changed my mind")
    assert store.mark_released(first).status == "released"
    with pytest.raises(ApprovalError):
        store.mark_released(first)  # released once
    rejected = store.decide(second, False, "too detailed")
    assert rejected.status == "rejected" and rejected.decision_reason == "too detailed"
    with pytest.raises(ApprovalError):
        store.decide(999, True, "")
    assert store.list("pending") == []


def test_failed_result_write_stores_nothing(tmp_path):
    store = ApprovalStore(tmp_path / "a.sqlite")

    def broken(_request_id):
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.create(scientist="alice", plan=PLAN, plan_text="", plan_tree=None, query_text="",
                     reason="", columns=[], rows=0, notes=[], write_result=broken)
    assert store.list() == []


def test_committed_state_survives_reopening(tmp_path):
    store = ApprovalStore(tmp_path / "a.sqlite")
    request_id = _create(store)
    store.decide(request_id, True, "ok")
    store.close()
    assert ApprovalStore(tmp_path / "a.sqlite").get(request_id).status == "approved"


def test_only_one_of_racing_decisions_wins(tmp_path):
    store = ApprovalStore(tmp_path / "a.sqlite")
    request_id = _create(store)
    outcomes = []

    def decide(approved):
        try:
            store.decide(request_id, approved, "race")
            outcomes.append(approved)
        except ApprovalError:
            outcomes.append(None)

    threads = [threading.Thread(target=decide, args=(i % 2 == 0,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert store.get(request_id).status == ("approved" if winners[0] else "rejected")


def _create_many(path, count):
    store = ApprovalStore(path)
    for _ in range(count):
        _create(store)


def test_concurrent_processes_write(tmp_path):
    path = tmp_path / "a.sqlite"
    ApprovalStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_create_many, args=(path, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    ids = [r.id for r in ApprovalStore(path).list()]
    assert len(ids) == 100 and len(set(ids)) == 100
