"""``bastion-owner``: workspace set-up, datasets, scientists, reviews and the audit log, as processes."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import tomllib

import polars as pl
import pytest

from bastion_kernel.contract.plan import scan
from owner_console.approvals import ApprovalStore
from owner_console.audit import read_entries
from owner_console.model import Policy
from owner_console.workspace import Workspace, WorkspaceError

from conftest import make_keys, run_owner

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier


def _assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") or "error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def fresh(tmp_path):
    path = tmp_path / "ws"
    result = run_owner(path, "init")
    assert result.returncode == 0, result.stderr
    return path


def test_init_lays_out_the_workspace(fresh):
    for name in ("config.toml", "keys/server.key", "keys/server.key_secret", "keys/audit_ed25519",
                 "keys/audit_ed25519.pub", "approvals.sqlite", "audit.jsonl"):
        assert (fresh / name).is_file(), name
    for name in ("datasets", "scientists", "results"):
        assert (fresh / name).is_dir(), name
    config = tomllib.loads((fresh / "config.toml").read_text())
    assert config["server"]["bind"] == "tcp://127.0.0.1:5555"
    assert (fresh / "keys/server.key_secret").stat().st_mode & 0o077 == 0
    assert (fresh / "keys/audit_ed25519").stat().st_mode & 0o077 == 0
    mode = sqlite3.connect(fresh / "approvals.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert run_owner(fresh, "audit", "verify").returncode == 0


def test_init_refuses_to_overwrite(fresh):
    key = (fresh / "keys/server.key_secret").read_bytes()
    _assert_user_error(run_owner(fresh, "init"), "already")
    assert (fresh / "keys/server.key_secret").read_bytes() == key


def test_commands_need_a_workspace(tmp_path):
    for args in (("dataset", "list"), ("requests",), ("audit", "verify"), ("serve",)):
        _assert_user_error(run_owner(tmp_path / "nowhere", *args), "not a Bastion workspace")


def test_dataset_add_csv_and_parquet(fresh, patients_csv, tmp_path):
    result = run_owner(fresh, "dataset", "add", "patients", patients_csv, "--min-group-size", "5",
                       "--hide", "name", "--hide", "zip", "--unsafe", "reject", "--no-save")
    assert result.returncode == 0, result.stderr
    record = tomllib.loads((fresh / "datasets/patients.toml").read_text())
    assert record["path"] == str(patients_csv.absolute()) and record["format"] == "csv"
    assert record["policy"] == Policy(5, "reject", frozenset({"name", "zip"}), False).to_dict()

    parquet = tmp_path / "patients.parquet"
    pl.read_csv(patients_csv).write_parquet(parquet)
    assert run_owner(fresh, "dataset", "add", "pq", parquet).returncode == 0
    record = tomllib.loads((fresh / "datasets/pq.toml").read_text())
    assert record["format"] == "parquet" and record["policy"] == Policy().to_dict()

    catalog = Workspace(fresh).catalog()
    assert sorted(catalog) == ["patients", "pq"]
    assert catalog["patients"].policy.hidden == {"name", "zip"}
    listing = run_owner(fresh, "dataset", "list")
    assert listing.returncode == 0
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == ["patients", "pq"]
    assert [line.split("\t")[3] for line in listing.stdout.splitlines()] == ["polars", "polars"]


def test_dataset_add_refuses_bad_input(fresh, patients_csv, tmp_path):
    _assert_user_error(run_owner(fresh, "dataset", "add", "patients", patients_csv, "--hide", "ssn"), "'ssn'")
    _assert_user_error(run_owner(fresh, "dataset", "add", "../escape", patients_csv), "invalid dataset name")
    _assert_user_error(run_owner(fresh, "dataset", "add", "x", tmp_path / "missing.csv"), "no such file")
    _assert_user_error(run_owner(fresh, "dataset", "add", "x", patients_csv, "--min-group-size", "0"))
    _assert_user_error(run_owner(fresh, "dataset", "add", "x", patients_csv, "--unsafe", "allow"))
    (tmp_path / "notes.txt").write_text("hello")
    _assert_user_error(run_owner(fresh, "dataset", "add", "x", tmp_path / "notes.txt"), "unsupported file type")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    _assert_user_error(run_owner(fresh, "dataset", "add", "x", tmp_path / "broken.parquet"), "cannot read")
    assert run_owner(fresh, "dataset", "add", "patients", patients_csv).returncode == 0
    _assert_user_error(run_owner(fresh, "dataset", "add", "patients", patients_csv), "already registered")
    assert sorted(p.name for p in (fresh / "datasets").iterdir()) == ["patients.toml"]


def test_dataset_add_public_bounds_without_dp(fresh, patients_csv):
    result = run_owner(fresh, "dataset", "add", "patients", patients_csv, "--bounds", "age=0:100",
                       "--bounds", "cost=-0.5:2e5")
    assert result.returncode == 0, result.stderr
    record = tomllib.loads((fresh / "datasets/patients.toml").read_text())
    assert record["policy"]["bounds"] == {"age": [0, 100], "cost": [-0.5, 200000.0]}
    assert "dp" not in record
    policy = Workspace(fresh).catalog()["patients"].policy
    assert policy.bounds == {"age": (0, 100), "cost": (-0.5, 200000.0)}
    assert Policy.from_dict(policy.to_dict()) == policy
    assert "bounds" not in Policy().to_dict()  # set only when declared: files without bounds stay as they were
    for bounds, fragment in (("age=100:0", "low < high"), ("age=0:inf", "--bounds"), ("age", "--bounds"),
                             ("ssn=0:1", "'ssn'")):
        _assert_user_error(run_owner(fresh, "dataset", "add", "x", patients_csv, "--bounds", bounds), fragment)
    assert sorted(p.name for p in (fresh / "datasets").iterdir()) == ["patients.toml"]


@pytest.mark.parametrize("bounds,fragment", [
    ([0, 1], "table"), ({"age": [1, 1]}, "low < high"), ({"age": [0, float("nan")]}, "finite"),
    ({"age": [True, 2]}, "finite"), ({"age": [0, "9"]}, "finite"), ({"": [0, 1]}, "column name"),
])
def test_policy_bounds_are_validated(bounds, fragment):
    with pytest.raises(ValueError, match=fragment):
        Policy.from_dict({"bounds": bounds})
    with pytest.raises(ValueError, match="not overridable"):  # a public fact of the data, not of the reader
        Policy(scientists={"bob": {"bounds": {"age": [0, 1]}}})


def test_malformed_dataset_file_is_named_and_skipped(fresh, patients_csv):
    assert run_owner(fresh, "dataset", "add", "patients", patients_csv).returncode == 0
    (fresh / "datasets/broken.toml").write_text("name = [unclosed\n")
    (fresh / "datasets/wrong.toml").write_text('name = "wrong"\npath = "relative.csv"\nformat = "csv"\n')
    with pytest.raises(WorkspaceError, match="broken.toml"):
        Workspace(fresh).catalog()
    catalog, errors = Workspace(fresh).catalog_with_errors()
    assert list(catalog) == ["patients"]
    assert [e for e in errors if "broken.toml" in str(e)] and [e for e in errors if "wrong.toml" in str(e)]
    listing = run_owner(fresh, "dataset", "list")
    assert listing.returncode == 0 and listing.stdout.startswith("patients\t")
    assert "broken.toml" in listing.stderr and "absolute" in listing.stderr


def test_scientist_add(fresh, tmp_path):
    alice = make_keys(tmp_path / "keys", "alice")
    result = run_owner(fresh, "scientist", "add", "alice", alice.public_file)
    assert result.returncode == 0, result.stderr
    assert Workspace(fresh).scientists() == {alice.public: "alice"}
    # Registering from the secret file keeps only the public key.
    bob = make_keys(tmp_path / "keys", "bob")
    assert run_owner(fresh, "scientist", "add", "bob", bob.secret_file).returncode == 0
    assert bob.secret.decode() not in (fresh / "scientists/bob.toml").read_text()
    assert Workspace(fresh).scientists()[bob.public] == "bob"
    listing = run_owner(fresh, "scientist", "list").stdout.splitlines()
    assert listing == [f"alice\t{alice.public.decode()}", f"bob\t{bob.public.decode()}"]

    _assert_user_error(run_owner(fresh, "scientist", "add", "alice2", alice.public_file), "already registered")
    _assert_user_error(run_owner(fresh, "scientist", "add", "alice", bob.public_file), "already registered")
    _assert_user_error(run_owner(fresh, "scientist", "add", "a b", alice.public_file), "invalid scientist name")
    (tmp_path / "junk.key").write_text("public-key = \"tooshort\"\n")
    _assert_user_error(run_owner(fresh, "scientist", "add", "carol", tmp_path / "junk.key"))
    _assert_user_error(run_owner(fresh, "scientist", "add", "carol", tmp_path / "absent.key"), "no such file")


def test_scientist_rotation_and_removal_are_audited_and_withdraw_open_requests(fresh, tmp_path):
    old, new = make_keys(tmp_path / "old", "alice"), make_keys(tmp_path / "new", "alice")
    workspace = Workspace(fresh)
    added = run_owner(fresh, "scientist", "add", "alice", old.public_file)
    assert added.returncode == 0 and "allowed scientist 'alice'" in added.stdout
    held = _held(workspace, "alice", b"1")

    rotated = run_owner(fresh, "scientist", "add", "alice", new.public_file)
    assert rotated.returncode == 0, rotated.stderr
    assert "replaced the CURVE key" in rotated.stdout and f"#{held} (rejected)" in rotated.stdout
    assert workspace.scientists() == {new.public: "alice"}
    store = ApprovalStore(workspace.approvals_path)
    assert (store.get(held).status, store.get(held).decision_reason) == ("rejected", "the scientist's key was replaced")
    assert run_owner(fresh, "scientist", "list").stdout.splitlines() == [f"alice\t{new.public.decode()}"]

    removed = run_owner(fresh, "scientist", "remove", "alice")
    assert removed.returncode == 0 and "open connections" in removed.stdout, removed.stderr
    assert workspace.scientists() == {} and run_owner(fresh, "scientist", "list").stdout == ""
    _assert_user_error(run_owner(fresh, "scientist", "remove", "alice"), "no scientist 'alice'")
    _assert_user_error(run_owner(fresh, "scientist", "remove", "a b"), "invalid scientist name")

    access = [(e["event"], e["scientist"], e.get("action"), e.get("key"), e.get("previous_key"))
              for e in read_entries(workspace.audit_path) if e["event"] in ("access", "rejection")]
    assert access == [("access", "alice", "granted", old.public.decode(), None),
                      ("access", "alice", "rotated", new.public.decode(), old.public.decode()),
                      ("rejection", "alice", None, None, None),
                      ("access", "alice", "revoked", new.public.decode(), None)]
    assert run_owner(fresh, "audit", "verify").returncode == 0


def _held(workspace: Workspace, scientist: str, payload: bytes) -> int:
    store = ApprovalStore(workspace.approvals_path)
    try:
        return store.create(scientist=scientist, plan={"op": "head", "input": scan("patients"), "n": 3},
                            plan_text='dataset("patients").head(3)', plan_tree=["head", ["scan"]],
                            query_text="patients.head(3).fetch()", reason="a row-level result",
                            columns=[["age", "Int64"]], rows=3, notes=[],
                            write_result=lambda _id: hashlib.sha256(payload).hexdigest())
    finally:
        store.close()


def test_requests_approve_reject(fresh):
    workspace = Workspace(fresh)
    assert json.loads(run_owner(fresh, "requests", "--json").stdout) == []
    first, second = _held(workspace, "alice", b"1"), _held(workspace, "bob", b"2")

    listed = json.loads(run_owner(fresh, "requests", "--json").stdout)
    assert [r["id"] for r in listed] == [first, second]
    for row, who in zip(listed, ("alice", "bob")):
        assert {"id", "scientist", "reason", "asked_at", "status", "columns", "rows", "plan_text"} <= set(row)
        assert row["scientist"] == who and row["status"] == "pending" and row["rows"] == 3
        assert row["reason"] == "a row-level result" and row["columns"] == [["age", "Int64"]]
        assert row["asked_at"].endswith("+00:00")
    assert "a row-level result" in run_owner(fresh, "requests").stdout

    assert run_owner(fresh, "approve", str(first)).returncode == 0
    _assert_user_error(run_owner(fresh, "reject", str(second), "--reason", "  "), "--reason")
    assert run_owner(fresh, "reject", str(second), "--reason", "too detailed").returncode == 0
    assert json.loads(run_owner(fresh, "requests", "--json").stdout) == []
    store = ApprovalStore(workspace.approvals_path)
    assert store.get(first).status == "approved"
    assert (store.get(second).status, store.get(second).decision_reason) == ("rejected", "too detailed")

    _assert_user_error(run_owner(fresh, "approve", str(second)), "rejected")
    _assert_user_error(run_owner(fresh, "reject", str(first), "--reason", "late"), "approved")
    _assert_user_error(run_owner(fresh, "approve", "999"), "no request 999")
    _assert_user_error(run_owner(fresh, "approve", "abc"))

    events = [(e["event"], e["scientist"], e.get("request_id")) for e in read_entries(workspace.audit_path)]
    assert events == [("approval", "alice", first), ("rejection", "bob", second)]
    assert run_owner(fresh, "audit", "verify").returncode == 0


def test_audit_show_filters(fresh):
    workspace = Workspace(fresh)
    first, second = _held(workspace, "alice", b"1"), _held(workspace, "bob", b"2")
    run_owner(fresh, "approve", str(first))
    run_owner(fresh, "reject", str(second), "--reason", "no")
    everyone = run_owner(fresh, "audit", "show").stdout.splitlines()
    assert len(everyone) == 2
    only_bob = run_owner(fresh, "audit", "show", "--scientist", "bob", "--json").stdout.splitlines()
    assert [json.loads(line)["event"] for line in only_bob] == ["rejection"]
    second_time = json.loads(only_bob[0])["time"]
    since = run_owner(fresh, "audit", "show", "--since", second_time, "--json").stdout.splitlines()
    assert [json.loads(line)["scientist"] for line in since] == ["bob"]
    assert run_owner(fresh, "audit", "show", "--since", "2999-01-01").stdout == ""
    _assert_user_error(run_owner(fresh, "audit", "show", "--since", "yesterday"), "ISO 8601")
