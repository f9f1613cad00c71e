"""The audit log: chaining, signatures, tamper detection, torn lines, concurrent appends."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from owner_console.audit import GENESIS, AuditLog, entry_hash, read_entries, verify


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def _log_with(tmp_path, key, n=5):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    for i in range(n):
        log.append("query", "alice", text=f"cell {i}", n=i)
    return log


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def _verify_rewritten(log, key, lines):
    """Verify the log once ``lines`` (its lines, tampered with) are written over it."""
    log.path.write_bytes(b"".join(lines))
    return verify(log.path, key.public_key())


def test_entries_chain_and_verify(tmp_path, key):
    log = _log_with(tmp_path, key)
    entries = list(read_entries(log.path))
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(entries, entries[1:]))
    assert all(entry_hash(e) == e["hash"] for e in entries)
    report = verify(log.path, key.public_key())
    assert report.ok and report.entries == 5 and report.first_bad is None
    assert report.last_hash == entries[-1]["hash"]


def test_empty_log_verifies(tmp_path, key):
    (tmp_path / "audit.jsonl").touch()
    assert verify(tmp_path / "audit.jsonl", key.public_key()).ok


def test_edited_line_is_caught(tmp_path, key):
    log = _log_with(tmp_path, key)
    lines = _lines(log.path)
    lines[2] = lines[2].replace(b'"cell 2"', b'"cell X"')
    report = _verify_rewritten(log, key, lines)
    assert not report.ok and report.first_bad == 3 and "edited" in report.problem


def test_rehashed_edit_fails_the_signature(tmp_path, key):
    log = _log_with(tmp_path, key)
    lines = _lines(log.path)
    entry = json.loads(lines[1])
    entry["text"] = "something else"
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry).encode() + b"\n"
    report = _verify_rewritten(log, key, lines)
    assert not report.ok and report.first_bad == 2 and "signature" in report.problem


def test_deleted_line_is_caught(tmp_path, key):
    log = _log_with(tmp_path, key)
    lines = _lines(log.path)
    del lines[1]
    report = _verify_rewritten(log, key, lines)
    assert not report.ok and report.first_bad == 2


def test_swapped_lines_are_caught(tmp_path, key):
    log = _log_with(tmp_path, key)
    lines = _lines(log.path)
    lines[1], lines[3] = lines[3], lines[1]
    report = _verify_rewritten(log, key, lines)
    assert not report.ok and report.first_bad == 2


def test_another_key_does_not_verify(tmp_path, key):
    log = _log_with(tmp_path, key)
    report = verify(log.path, Ed25519PrivateKey.generate().public_key())
    assert not report.ok and report.first_bad == 1 and "signature" in report.problem


def test_torn_last_line_is_reported_then_recovered_by_the_next_append(tmp_path, key):
    log = _log_with(tmp_path, key, n=3)
    last_good = list(read_entries(log.path))[-1]
    fragment = b'{"seq": 4, "time": "2026-01-'  # a crash mid-write
    with open(log.path, "ab") as handle:
        handle.write(fragment)
    report = verify(log.path, key.public_key())
    assert not report.ok and report.first_bad == 4 and "incomplete" in report.problem

    # The same writer (its cached tail is stale: the file grew) cuts the fragment
    # off, records it in a signed "recovered" entry, then appends.
    after = log.append("release", "alice", sha256="ab" * 32)
    entries = list(read_entries(log.path))
    assert [e["event"] for e in entries] == ["query"] * 3 + ["recovered", "release"]
    recovered = entries[3]
    assert recovered["seq"] == 4 and recovered["prev"] == last_good["hash"]
    assert recovered["fragment"] == fragment.decode()
    assert recovered["fragment_bytes"] == len(fragment)
    assert recovered["fragment_sha256"] == hashlib.sha256(fragment).hexdigest()
    assert after["seq"] == 5 and after["prev"] == recovered["hash"]
    report = verify(log.path, key.public_key())
    assert report.ok and report.entries == 5


def test_opening_the_log_recovers_a_torn_last_line(tmp_path, key):
    log = _log_with(tmp_path, key, n=2)
    with open(log.path, "ab") as handle:
        handle.write(b'{"seq": 3, "ev')
    assert not verify(log.path, key.public_key()).ok
    AuditLog(log.path, key)  # e.g. the executor restarting after SIGKILL
    report = verify(log.path, key.public_key())
    assert report.ok and report.entries == 3
    assert [e["event"] for e in read_entries(log.path)][-1] == "recovered"
    assert AuditLog(log.path, key).recover() is None  # nothing more to do


def test_only_a_torn_final_line_is_recovered(tmp_path, key):
    log = _log_with(tmp_path, key, n=3)
    lines = _lines(log.path)
    lines[1] = lines[1][:20] + b"\n"  # a damaged line in the middle stays damaged
    log.path.write_bytes(b"".join(lines))
    AuditLog(log.path, key).append("query", "alice")
    report = verify(log.path, key.public_key())
    assert not report.ok and report.first_bad == 2
    assert [e["event"] for e in read_entries(log.path)].count("recovered") == 0


def test_reserved_and_unknown_names_are_refused(tmp_path, key):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    with pytest.raises(ValueError):
        log.append("query", "alice", hash="forged")
    with pytest.raises(ValueError):
        log.append("not-an-event", "alice")


def _append_many(path, pem, count, who):
    from cryptography.hazmat.primitives import serialization
    log = AuditLog(path, serialization.load_pem_private_key(pem, password=None))
    for i in range(count):
        log.append("query", who, n=i)


def test_concurrent_processes_append_one_chain(tmp_path, key):
    from cryptography.hazmat.primitives import serialization
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(path, pem, 40, f"w{i}")) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    report = verify(path, key.public_key())
    assert report.ok and report.entries == 160


def test_cli_verify_catches_each_tampering(tmp_path):
    """``bastion-owner audit verify`` exits 0 on an intact log and 1 on each kind of tampering."""
    from owner_console.workspace import Workspace
    workspace = Workspace(tmp_path / "ws")
    workspace.init()
    log = AuditLog(workspace.audit_path, workspace.audit_private_key_path)
    for i in range(6):
        log.append("query", "alice", n=i)
    intact = workspace.audit_path.read_bytes()

    def verify_cli():
        return subprocess.run([sys.executable, "-m", "owner_console.cli", "audit", "verify",
                               "--workspace", str(workspace.path)], capture_output=True, text=True, timeout=60)

    result = verify_cli()
    assert result.returncode == 0, result.stderr
    lines = intact.splitlines(keepends=True)
    tampered = {
        "edited": lines[:2] + [lines[2].replace(b'"n":2', b'"n":7')] + lines[3:],
        "deleted": lines[:2] + lines[3:],
        "swapped": lines[:1] + [lines[2], lines[1]] + lines[3:],
    }
    for what, content in tampered.items():
        workspace.audit_path.write_bytes(b"".join(content))
        result = verify_cli()
        assert result.returncode == 1, what
        assert "line 2" in result.stderr or "line 3" in result.stderr, (what, result.stderr)


# -- plans once, entries bounded, any value written safely ----------------------------------------

def _big_plan(values: int = 3000) -> dict:
    from bastion_kernel.contract.plan import col, fn, frame_op, scan
    return frame_op("filter", input=scan("patients"),
                    predicate=fn("is_in", col("name"), values=[f"name-{i:08d}" for i in range(values)]))


def test_a_plan_is_kept_once_and_every_entry_refers_to_it_by_its_hash(tmp_path, key):
    from bastion_kernel.contract.plan import canonical_json, plan_hash
    plan = _big_plan()
    log = AuditLog(tmp_path / "audit.jsonl", key)
    written = [log.append("query", "alice", plan=plan, plan_hash=plan_hash(plan), text=f"cell {i}")
               for i in range(20)]
    # Another writer (another process: a new AuditLog on the same file) finds the plan already there.
    AuditLog(log.path, key).append("refusal", "bob", plan=plan, ename="PolicyViolation", evalue="no")
    entries = list(read_entries(log.path))
    [stored] = [e for e in entries if e["event"] == "plan"]
    assert stored["plan"] == plan and stored["plan_hash"] == plan_hash(plan) and stored["scientist"] == "alice"
    assert entries[0] is not None and entries[0]["event"] == "plan"  # before the first entry that refers to it
    assert all("plan" not in e and e["plan_hash"] == plan_hash(plan) for e in entries[1:])
    assert [w["seq"] for w in written] == list(range(2, 22))
    # The plan's bytes are in the log once; each entry that refers to it is small.
    size = len(canonical_json(plan))
    assert size > 40_000 and log.path.stat().st_size < size + 21 * 1000
    assert verify(log.path, key.public_key()).ok


def test_an_entry_whose_plan_the_log_does_not_hold_fails_verify(tmp_path, key):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    log.append("query", "alice", plan={"op": "scan", "dataset": "patients"})
    assert verify(log.path, key.public_key()).ok
    # Correctly chained and signed, but it names a plan no entry holds (as if its plan entry were dropped
    # by someone holding the key, and the chain rebuilt).
    log.append("query", "alice", plan_hash="ab" * 32)
    report = verify(log.path, key.public_key())
    assert not report.ok and report.first_bad == 3 and "not held earlier" in report.problem


def test_a_log_with_plans_inline_still_verifies_and_its_plans_are_checked(tmp_path, key):
    from bastion_kernel.contract.plan import plan_hash
    from owner_console.audit import canonical
    plan = {"op": "scan", "dataset": "patients"}
    log = AuditLog(tmp_path / "audit.jsonl", key)
    # As a log written before plans were kept once: the plan inside the query entry.
    first = log._entry(1, GENESIS, "query", "alice", {"plan": plan, "plan_hash": plan_hash(plan)})
    later = log._entry(2, first["hash"], "refusal", "alice", {"plan_hash": plan_hash(plan), "ename": "SchemaError"})
    log.path.write_bytes(canonical(first) + b"\n" + canonical(later) + b"\n")
    assert verify(log.path, key.public_key()).ok
    log.append("query", "alice", plan=plan)  # known already: no plan entry is added
    assert [e["event"] for e in read_entries(log.path)] == ["query", "refusal", "query"]
    assert verify(log.path, key.public_key()).ok
    wrong = log._entry(1, GENESIS, "query", "alice", {"plan": plan, "plan_hash": "cd" * 32})
    log.path.write_bytes(canonical(wrong) + b"\n")
    report = verify(log.path, key.public_key())
    assert not report.ok and "plan does not match its hash" in report.problem


def test_a_long_text_is_kept_once_and_a_short_one_inline(tmp_path, key):
    from owner_console.audit import INLINE_TEXT_CHARS
    log = AuditLog(tmp_path / "audit.jsonl", key)
    long_text = "patients.filter(...)\n" * INLINE_TEXT_CHARS
    first = log.append("query", "alice", text=long_text)
    again = log.append("query", "alice", text=long_text)
    short = log.append("query", "alice", text="patients.head(3)")
    events = [e["event"] for e in read_entries(log.path)]
    assert events == ["text", "query", "query", "query"]
    assert first["text_sha256"] == again["text_sha256"] == hashlib.sha256(long_text.encode()).hexdigest()
    assert "text" not in first and short["text"] == "patients.head(3)"
    assert [e for e in read_entries(log.path) if e["event"] == "text"][0]["text"] == long_text
    assert verify(log.path, key.public_key()).ok


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\ud83d", float("inf"), float("-inf"), float("nan"),
                                   10**400, -(2**64), b"\xff\xfe", object(), {"\ud800": [1e308, float("nan")]}],
                         ids=["lone high surrogate", "lone low surrogate", "half an emoji", "inf", "-inf", "nan",
                              "huge int", "int past 64 bits", "bytes", "an object", "nested"])
def test_any_value_is_written_safely_and_the_log_still_verifies(tmp_path, key, value):
    log = AuditLog(tmp_path / "audit.jsonl", key)
    entry = log.append("refusal", "alice\ud800", request=value, detail={"v": value}, plan={"op": value})
    [written] = [e for e in read_entries(log.path) if e["event"] == "refusal"]
    assert written == entry
    assert "\ud800" not in json.dumps(written, ensure_ascii=False).encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")
    raw = log.path.read_bytes()
    raw.decode("utf-8")  # strict UTF-8: every line is Unicode text
    assert b"NaN" not in raw and b"Infinity" not in raw
    assert verify(log.path, key.public_key()).ok


def test_every_entry_is_bounded_whatever_its_fields_hold(tmp_path, key):
    from owner_console.audit import MAX_ENTRY_BYTES, MAX_FIELD_CHARS
    log = AuditLog(tmp_path / "audit.jsonl", key)
    huge = "x" * (10 * MAX_FIELD_CHARS)
    entry = log.append("refusal", "alice", evalue=huge, columns=[f"column_{i:05d}_" + "y" * 200 for i in range(2000)],
                       details={"nested": [huge] * 50})
    line = log.path.read_bytes().splitlines()[-1]
    assert len(line) <= MAX_ENTRY_BYTES
    assert entry["evalue"].startswith("x" * 100) and hashlib.sha256(huge.encode()).hexdigest() in entry["evalue"]
    assert "omitted_bytes" in json.dumps(entry)
    assert verify(log.path, key.public_key()).ok
