"""AuditLog.append_many: several entries, chained in order, in one locked write."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from owner_console.audit import AuditLog, read_entries, verify


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_a_batch_is_chained_like_single_appends_and_verifies(tmp_path, key):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    first = log.append("query", "alice", plan={"op": "scan", "dataset": "patients"}, text="cell")
    decision, release = log.append_many([
        ("decision", "alice", {"action": "allow", "reason": "every group was computed from at least 5 rows"}),
        ("release", "alice", {"sha256": "ab" * 32, "rows": 3})])
    after = log.append("query", "bob", text="next")
    # The plan went to its own entry, written just before the first entry that refers to it.
    assert [first["seq"], decision["seq"], release["seq"], after["seq"]] == [2, 3, 4, 5]
    assert decision["prev"] == first["hash"] and release["prev"] == decision["hash"]
    assert after["prev"] == release["hash"]
    assert [e["event"] for e in read_entries(log.path)] == ["plan", "query", "decision", "release", "query"]
    report = verify(log.path, key.public_key())
    assert report.ok and report.entries == 5


def test_a_batch_after_a_torn_line_records_the_recovery_first(tmp_path, key):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    log.append("query", "alice", text="cell")
    with open(log.path, "ab") as handle:
        handle.write(b'{"seq": 2, "ti')  # a crash mid-write
    log.append_many([("decision", "alice", {"action": "allow"}), ("release", "alice", {"rows": 1})])
    assert [e["event"] for e in read_entries(log.path)] == ["query", "recovered", "decision", "release"]
    assert verify(log.path, key.public_key()).ok


def test_a_bad_entry_refuses_the_whole_batch(tmp_path, key):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    with pytest.raises(ValueError):
        log.append_many([("decision", "alice", {"action": "allow"}), ("release", "alice", {"seq": 9})])
    with pytest.raises(ValueError):
        log.append_many([("decision", "alice", {}), ("no-such-event", "alice", {})])
    assert not log.path.exists() or log.path.read_bytes() == b""
    assert log.append_many([]) == []


def test_an_unsynced_entry_is_written_at_once_and_made_durable_by_the_next_fsync(tmp_path, key, monkeypatch):
    import owner_console.audit as audit_module
    log = AuditLog(tmp_path / "audit.jsonl", key)
    synced: list[int] = []
    real_fsync = audit_module.os.fsync
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log.append_many([("query", "alice", {"plan": {"op": "scan", "dataset": "patients"}, "text": "cell"})],
                    sync=False)
    # In the file (another process reads it; a crash of this one loses nothing), not yet fsynced.
    assert [e["event"] for e in read_entries(log.path)] == ["plan", "query"] and synced == []
    log.append_many([("decision", "alice", {"action": "allow"}), ("release", "alice", {"rows": 1})])
    assert len(synced) == 1  # one fsync for the request's three entries
    log.sync()
    assert len(synced) == 1  # nothing was pending
    log.append_many([("query", "alice", {"text": "again"})], sync=False)
    log.sync()
    log.sync()
    assert len(synced) == 2
    assert verify(log.path, key.public_key()).ok
