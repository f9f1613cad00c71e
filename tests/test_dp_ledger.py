"""The DP odometer: spending keyed by the data, a total bound across scientists, audited resets.

Queries go to a real ``bastion-owner serve`` process over the wire (CURVE on
loopback); the owner's acts run the real ``bastion-owner`` command line; the
ledger is the real SQLite file of the workspace.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading

import polars as pl
import pytest
import tomli_w

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from conftest import register_scientists, run_owner, start_executor
from owner_console import dp
from owner_console.audit import read_entries
from owner_console.sample_data import generate_patients
from owner_console.workspace import Workspace, WorkspaceError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DP_TABLE = {"epsilon": 0.3, "epsilon_per_query": 0.1, "max_rows": 10_000,
            "bounds": {"age": [0, 100]}, "public_keys": {"sex": ["F", "M"]}}
PUBLIC_REFUSAL_FIELDS = {"dataset", "limit", "epsilon", "epsilon_cost"}


def count(name: str) -> dict:
    return P.frame_op("select", input=P.scan(name), exprs=[P.length()])


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "patients.parquet"
    generate_patients(200, seed=7).write_parquet(path)
    return path


def serve(ws: Workspace, tmp_path, scientists=("alice", "bob", "carol")):
    keys = register_scientists(ws, tmp_path / "keys", tuple(scientists))
    return start_executor(ws.path, keys), keys


@pytest.fixture()
def running(tmp_path):
    started = []

    def start(ws: Workspace):
        process, keys = serve(ws, tmp_path)
        started.append(process)
        return process, keys

    yield start
    for process in started:
        process.stop()


def fetch(client, name: str) -> tuple[str, dict]:
    kind, body, _ = client.request("fetch", {"plan": count(name), "text": f"count {name}"})
    return kind, body


def budget(client) -> dict:
    kind, body, _ = client.request("budget", {})
    assert kind == "ok", body
    return {row["name"]: row for row in body["datasets"]}


# ------------------------------------------------------------------ keyed by the data
def test_one_file_under_two_names_and_a_copy_share_one_budget(tmp_path, data, running):
    copy = tmp_path / "elsewhere" / "same_bytes.parquet"
    copy.parent.mkdir()
    shutil.copyfile(data, copy)
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("first", data, dp=DP_TABLE)
    ws.add_dataset("second", data, dp=DP_TABLE)
    ws.add_dataset("copied", copy, dp=DP_TABLE)
    executor, _ = running(ws)
    alice = executor.client("alice")

    assert fetch(alice, "first")[0] == "result"
    assert fetch(alice, "second")[0] == "result"
    assert fetch(alice, "copied")[0] == "result"
    kind, body = fetch(alice, "second")
    assert kind == "error" and body["ename"] == "PolicyViolation", body
    assert body["evalue"] == ("your privacy budget on dataset 'second' is exhausted (the per-scientist bound): "
                              "this query costs epsilon 0.1, each scientist may spend epsilon 0.3 on this data, "
                              "and 0 is left to you; the query was not run")
    assert set(body.get("details", {})) <= PUBLIC_REFUSAL_FIELDS
    shown = budget(alice)
    assert {name: round(row["epsilon_spent"], 9) for name, row in shown.items()} == \
        {"first": 0.3, "second": 0.3, "copied": 0.3}
    assert all(row["queries_left"] == 0 for row in shown.values())
    # one account: the file's content hash
    accounts = {row["account"] for row in dp.BudgetLedger(ws.dp_ledger_path).history()}
    assert len(accounts) == 1 and len(accounts.pop()) == 64
    # bob's budget on the same data is his own
    assert fetch(executor.client("bob"), "copied")[0] == "result"


def test_a_new_version_of_a_file_keeps_its_spending_and_other_data_does_not(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    other = tmp_path / "other.parquet"
    generate_patients(200, seed=8).write_parquet(other)
    ws.add_dataset("pdp", data, dp=DP_TABLE)
    ws.add_dataset("unrelated", other, dp=DP_TABLE)
    from owner_console import executor

    for _ in range(3):
        executor.evaluate(count("pdp"), ws.catalog(), "alice")
    # The owner appends rows: mostly the same people, so the spending carries over.
    frame = pl.read_parquet(data)
    pl.concat([frame, frame.head(5)]).write_parquet(data)
    with pytest.raises(BastionError, match="per-scientist bound"):
        executor.evaluate(count("pdp"), ws.catalog(), "alice")
    ledger = dp.BudgetLedger(ws.dp_ledger_path)
    versions = [ledger.version(data)]
    assert versions[0].content_hash != versions[0].account  # a second version, on the first one's account
    # Different content at another path is other data, with a budget of its own.
    assert executor.evaluate(count("unrelated"), ws.catalog(), "alice").table.height == 1
    assert ledger.version(other).account != versions[0].account


def test_the_content_hash_is_computed_once_per_file_version(tmp_path, data):
    ledger = dp.BudgetLedger(tmp_path / "ledger.sqlite")
    first = ledger.version(data)
    stat = os.stat(data)
    # Same size and modification time, other bytes: the cached identity is used, not a new hash.
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ledger.version(data) == first
    # A new modification time is a new version: hashed again, on the same account.
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = ledger.version(data)
    assert second.content_hash != first.content_hash and second.account == first.account
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM file_versions").fetchone()[0] == 2


# ------------------------------------------------------------------ the total across scientists
def test_two_scientists_hit_the_total_and_the_refusal_names_only_the_policy(tmp_path, data, running):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("pdp", data, dp={**DP_TABLE, "epsilon_total": 0.4})
    executor, _ = running(ws)
    alice, bob, carol = (executor.client(name) for name in ("alice", "bob", "carol"))
    assert budget(carol)["pdp"]["shared_epsilon_total"] == 0.4
    assert budget(carol)["pdp"]["shared_epsilon_remaining"] == pytest.approx(0.4)

    for _ in range(3):
        assert fetch(alice, "pdp")[0] == "result"
    assert fetch(bob, "pdp")[0] == "result"
    refusals = {}
    for name, client in (("bob", bob), ("carol", carol)):
        kind, body = fetch(client, "pdp")
        assert kind == "error" and body["ename"] == "PolicyViolation", body
        refusals[name] = body
    expected = ("the total privacy budget of dataset 'pdp', shared by all scientists, is exhausted (the total "
                "bound): this query costs epsilon 0.1 and all scientists together may spend epsilon 0.4 on this "
                "data; the query was not run")
    # bob (who spent 0.1) and carol (who spent nothing) read the same words: no one's spending is in them
    assert refusals["bob"]["evalue"] == refusals["carol"]["evalue"] == expected
    assert refusals["bob"].get("details") == refusals["carol"].get("details")
    assert set(refusals["bob"].get("details", {})) <= PUBLIC_REFUSAL_FIELDS
    # the budget request: each scientist's own spending, and what is left of the total
    shown = budget(carol)["pdp"]
    assert shown["epsilon_spent"] == 0 and shown["epsilon_remaining"] == pytest.approx(0.3)
    assert shown["shared_epsilon_remaining"] == pytest.approx(0, abs=1e-12) and shown["queries_left"] == 0
    assert budget(bob)["pdp"]["epsilon_spent"] == pytest.approx(0.1)
    assert len(dp.BudgetLedger(ws.dp_ledger_path).history()) == 4  # the refusals were not charged


def test_concurrent_charges_never_pass_the_total(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    dataset = ws.add_dataset("pdp", data, dp={**DP_TABLE, "epsilon": 1.0, "epsilon_total": 1.0})
    ledger = dp.BudgetLedger(ws.dp_ledger_path)
    version = ledger.version(data)
    outcomes = []

    def charge(scientist: str) -> None:
        try:
            dp.BudgetLedger(ws.dp_ledger_path).charge(scientist, version, "pdp", dataset.dp, "h")
            outcomes.append("charged")
        except BastionError as exc:
            outcomes.append(exc.details["limit"])

    threads = [threading.Thread(target=charge, args=(f"s{i % 7}",)) for i in range(25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("charged") == 10 and outcomes.count("epsilon_total") == 15
    assert ledger.spent("s0", version).epsilon_all == pytest.approx(1.0)


def test_the_cli_writes_the_total_and_checks_it(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    done = run_owner(ws.path, "dataset", "add", "pdp", str(data), "--privacy", "dp", "--epsilon", "1",
                     "--epsilon-total", "2.5")
    assert done.returncode == 0, done.stderr
    assert "2.5 for all scientists together" in done.stdout
    assert ws.catalog()["pdp"].dp.epsilon_total == 2.5
    assert "epsilon_total = 2.5" in (ws.datasets_dir / "pdp.toml").read_text()
    done = run_owner(ws.path, "dataset", "add", "low", str(data), "--privacy", "dp", "--epsilon", "1",
                     "--epsilon-total", "0.01")
    assert done.returncode == 2 and "epsilon_total" in done.stderr and "0.1" in done.stderr
    done = run_owner(ws.path, "dataset", "add", "plain", str(data), "--epsilon-total", "1")
    assert done.returncode == 2 and "--privacy dp" in done.stderr
    # the same file again, with other bounds: registered, sharing the budget, and the owner is warned
    done = run_owner(ws.path, "dataset", "add", "again", str(data), "--privacy", "dp", "--epsilon", "1")
    assert done.returncode == 0, done.stderr
    assert "the same data is registered as: pdp" in done.stdout
    assert "warning: pdp over the same data has other budget settings" in done.stderr


def test_a_malformed_total_in_the_policy_file_is_refused_naming_the_key(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    toml_path = ws.datasets_dir / "broken.toml"
    toml_path.write_text(tomli_w.dumps({"name": "broken", "path": str(data), "format": "parquet", "policy": {},
                                        "dp": {**DP_TABLE, "epsilon_total": "lots"}}))
    with pytest.raises(WorkspaceError) as caught:
        ws.load_dataset(toml_path)
    assert str(toml_path) in str(caught.value) and "dp.epsilon_total" in str(caught.value)


# ------------------------------------------------------------------ the owner's reset
def test_a_reset_is_an_audited_owner_act_and_the_log_still_verifies(tmp_path, data, running):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("pdp", data, dp=DP_TABLE)
    ws.add_dataset("pdp_alias", data, dp=DP_TABLE)
    executor, _ = running(ws)
    alice, bob = executor.client("alice"), executor.client("bob")
    for _ in range(3):
        assert fetch(alice, "pdp")[0] == "result"
    assert fetch(bob, "pdp_alias")[0] == "result"
    assert fetch(alice, "pdp_alias")[0] == "error"

    done = run_owner(ws.path, "dp", "reset", "pdp_alias", "--scientist", "alice", "--reason", "new study period")
    assert done.returncode == 0, done.stderr
    assert "pdp, pdp_alias" in done.stdout
    [entry] = [e for e in read_entries(ws.audit_path) if e["event"] == "budget_reset"]
    assert entry["scientist"] == "alice" and entry["dataset"] == "pdp_alias"
    assert entry["datasets"] == ["pdp", "pdp_alias"] and entry["reason"] == "new study period"
    assert entry["queries"] == 3 and entry["cleared"] == {"alice": pytest.approx(0.3)}
    verified = run_owner(ws.path, "audit", "verify")
    assert verified.returncode == 0, verified.stderr

    # alice starts again on the data (under both names); bob's spending was not touched
    assert budget(alice)["pdp"]["epsilon_spent"] == 0
    assert budget(bob)["pdp"]["epsilon_spent"] == pytest.approx(0.1)
    assert fetch(alice, "pdp")[0] == "result"
    shown = run_owner(ws.path, "dp", "show", "pdp")
    assert shown.returncode == 0 and "alice\tepsilon 0.1" in shown.stdout and "bob\tepsilon 0.1" in shown.stdout
    # the reset spends are kept, marked, in the ledger
    history = dp.BudgetLedger(ws.dp_ledger_path).history("alice")
    assert [row["reset_at"] is not None for row in history] == [True, True, True, False]

    # without --scientist: everyone's spending on that data
    done = run_owner(ws.path, "dp", "reset", "pdp")
    assert done.returncode == 0, done.stderr
    assert budget(bob)["pdp"]["epsilon_spent"] == 0 and budget(alice)["pdp_alias"]["epsilon_spent"] == 0
    assert run_owner(ws.path, "audit", "verify").returncode == 0
    # a scientist has no way to do it: budget takes no arguments (see test_dp), and the owner's CLI refuses
    # a dataset without a DP policy
    ws.add_dataset("plain", data)
    done = run_owner(ws.path, "dp", "reset", "plain")
    assert done.returncode == 2 and "not differentially private" in done.stderr


def test_a_reset_that_cannot_be_audited_resets_nothing(tmp_path, data):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    dataset = ws.add_dataset("pdp", data, dp=DP_TABLE)
    ledger = dp.BudgetLedger(ws.dp_ledger_path)
    version = ledger.version(data)
    ledger.charge("alice", version, "pdp", dataset.dp, "h")

    def failing_audit(summary: dict) -> None:
        raise OSError("the audit log is not writable")

    with pytest.raises(OSError):
        ledger.reset(version, "alice", record=failing_audit)
    assert ledger.spent("alice", version).epsilon == pytest.approx(0.1)


# ------------------------------------------------------------------ durability and migration
def test_spending_survives_a_crash_of_the_executor(tmp_path, data, running):
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("pdp", data, dp={**DP_TABLE, "epsilon_total": 0.5})
    executor, keys = running(ws)
    alice = executor.client("alice")
    for _ in range(2):
        assert fetch(alice, "pdp")[0] == "result"
    executor.stop(signal.SIGKILL)  # no handler runs: only what was committed remains

    restarted = start_executor(ws.path, keys)
    try:
        alice, bob = restarted.client("alice"), restarted.client("bob")
        assert budget(alice)["pdp"]["epsilon_spent"] == pytest.approx(0.2)
        assert budget(bob)["pdp"]["shared_epsilon_remaining"] == pytest.approx(0.3)
        assert fetch(alice, "pdp")[0] == "result"
        assert fetch(alice, "pdp")[0] == "error"
    finally:
        restarted.stop()


def test_a_ledger_keyed_by_dataset_name_is_migrated_onto_the_data(tmp_path, data):
    """Spends written before accounts existed are kept: charged to the data their name reads now."""
    ws = Workspace(tmp_path / "ws")
    ws.init()
    ws.add_dataset("old_name", data, dp=DP_TABLE)
    ws.add_dataset("new_name", data, dp=DP_TABLE)
    with sqlite3.connect(ws.dp_ledger_path) as conn:  # the schema of the name-keyed ledger
        conn.execute("CREATE TABLE spends (id INTEGER PRIMARY KEY AUTOINCREMENT, scientist TEXT NOT NULL, "
                     "dataset TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL, plan_hash TEXT NOT NULL, "
                     "at TEXT NOT NULL)")
        conn.executemany("INSERT INTO spends (scientist, dataset, epsilon, delta, plan_hash, at) "
                         "VALUES (?, ?, 0.1, 0.0, 'h', '2025-01-01T00:00:00Z')",
                         [("alice", "old_name")] * 3 + [("bob", "gone")])
    from owner_console import executor

    catalog = ws.catalog()
    # alice spent everything under the old name: the new name over the same file has nothing left
    assert {row["name"]: row["epsilon_spent"] for row in dp.budget(catalog, "alice")} == \
        {"new_name": pytest.approx(0.3), "old_name": pytest.approx(0.3)}
    with pytest.raises(BastionError, match="per-scientist bound"):
        executor.evaluate(count("new_name"), catalog, "alice")
    history = dp.BudgetLedger(ws.dp_ledger_path).history()
    assert [row["account"] is not None for row in history] == [True, True, True, False]  # "gone" waits
    shown = run_owner(ws.path, "dp", "show")
    assert shown.returncode == 0 and "alice\tepsilon 0.3" in shown.stdout, shown.stdout
