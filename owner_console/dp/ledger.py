"""The privacy odometer: what each scientist spent on each DP data account, in SQLite.

The odometer (:class:`BudgetLedger`) is a SQLite (WAL, synchronous) file in
the workspace, one row per charged query.  Spending is charged to the data,
not to the dataset's name: an account is identified by the SHA-256 of the
source file's content, and later versions of a file at the same path stay on
the same account (see docs/dp.md for why).  Nothing on the wire can delete or
reset spending; only the owner can (``bastion-owner dp reset``, audited), and
it survives restarts.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .policy import DPPolicy

TOLERANCE = 1e-12                 # float slack when comparing spent budget to the total


@dataclass(frozen=True)
class DataVersion:
    """One version of a DP dataset's source file, as the odometer identifies it.

    ``content_hash`` is the SHA-256 of the file's bytes.  ``account`` is what
    spending on it is charged to: the content hash of the first version the
    odometer saw of this data.  Every file with the same content, under any
    dataset name, and every later version of a file at the same path share
    that account (see :meth:`BudgetLedger.version`).
    """

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    account: str


@dataclass(frozen=True)
class Spent:
    """What was spent on one data account: by one scientist, and by all scientists together."""

    epsilon: float
    delta: float
    epsilon_all: float


class BudgetLedger:
    """The durable odometer: what each scientist spent on each DP data account.

    One row per charged query (table ``spends``), charged to the account of
    the data's file version (table ``file_versions``, see :meth:`version`).
    A charge checks both bounds (per scientist, and the total of all
    scientists when the owner set one) and records the spend in one
    ``BEGIN IMMEDIATE`` transaction, so concurrent queries (threads or
    processes) cannot overspend; ``synchronous=FULL`` keeps a committed
    charge through a crash or a power cut.  Spends are never deleted: the
    owner's :meth:`reset` marks them reset, and :meth:`history` still shows
    them.

    Spends recorded before accounts existed carry only a dataset name;
    :func:`adopt_legacy_spends` moves them onto the account of the data that
    name reads.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        conn = self._connect()
        try:
            if not _schema_is_current(conn):
                conn.execute("PRAGMA journal_mode=WAL")
                with _transaction(conn):
                    _create_schema(conn)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=FULL")  # WAL's default (NORMAL) may lose the last commits on power loss
        return conn

    def version(self, path: str | Path) -> DataVersion:
        """The identity of the file at ``path`` as it is now (its content is hashed once per version).

        A version is known by its resolved path, size and modification time.
        The first time the odometer sees one, it hashes the content and gives
        the version an account: the account of any known file with the same
        content or of any earlier version at the same path (several such
        accounts are merged into one, so no spending is lost), else a new
        account named after the hash.

        Raises
        ------
        OSError
            When the file cannot be read, or keeps changing while it is read.
        """
        resolved = str(Path(path).resolve())
        for _ in range(5):
            stat = os.stat(resolved)
            key = (resolved, stat.st_size, stat.st_mtime_ns)
            conn = self._connect()
            try:
                known = _known_version(conn, key)
                if known is not None:
                    return known
                digest = _file_sha256(resolved)
                after = os.stat(resolved)
                if (after.st_size, after.st_mtime_ns) != key[1:]:
                    continue  # rewritten while it was read: identify the new version
                with _transaction(conn):
                    known = _known_version(conn, key)
                    if known is not None:
                        return known
                    accounts = sorted({row[0] for row in conn.execute(
                        "SELECT DISTINCT account FROM file_versions WHERE content_hash = ? OR path = ?",
                        (digest, resolved))})
                    account = accounts[0] if accounts else digest
                    for other in accounts[1:]:
                        conn.execute("UPDATE file_versions SET account = ? WHERE account = ?", (account, other))
                        conn.execute("UPDATE spends SET account = ? WHERE account = ?", (account, other))
                    conn.execute("INSERT INTO file_versions (path, size, mtime_ns, content_hash, account, seen_at) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (*key, digest, account, _now()))
                return DataVersion(*key, digest, account)
            finally:
                conn.close()
        raise OSError(f"{resolved}: the file kept changing while it was read")

    def spent(self, scientist: str, version: DataVersion) -> Spent:
        """What ``scientist``, and all scientists together, spent on ``version``'s account since its last reset."""
        conn = self._connect()
        try:
            return _spent(conn, _account(conn, version), scientist)
        finally:
            conn.close()

    def charge(self, scientist: str, version: DataVersion, dataset: str, policy: DPPolicy,
               plan_hash: str) -> Spent:
        """Record one query's cost, or refuse it if either bound cannot pay.

        Parameters
        ----------
        scientist : str
            Who asks.
        version : DataVersion
            The data the query reads (:meth:`version`).
        dataset : str
            The name the query used (kept with the spend, and named in a refusal).
        policy : DPPolicy
            The policy of that name: its cost per query and its bounds.
        plan_hash : str
            The plan's hash, kept with the spend.

        Returns
        -------
        Spent
            Spending on the account after this charge.

        Raises
        ------
        BastionError
            ``PolicyViolation`` naming the bound (per scientist, or the total
            of all scientists) when the query would pass it; nothing is
            recorded then.
        """
        cost_e, cost_d = policy.epsilon_per_query, policy.delta_per_query
        conn = self._connect()
        try:
            with _transaction(conn):
                account = _account(conn, version)
                spent = _spent(conn, account, scientist)
                _check_bounds(spent, policy, dataset)
                conn.execute("INSERT INTO spends (scientist, dataset, epsilon, delta, plan_hash, at, account) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (scientist, dataset, cost_e, cost_d, plan_hash, _now(), account))
            return Spent(spent.epsilon + cost_e, spent.delta + cost_d, spent.epsilon_all + cost_e)
        finally:
            conn.close()

    def spending(self, version: DataVersion) -> dict[str, tuple[float, float]]:
        """``{scientist: (epsilon, delta)}`` spent on ``version``'s account since its last reset (for the owner)."""
        conn = self._connect()
        try:
            rows = conn.execute("SELECT scientist, epsilon, delta FROM spends WHERE account = ? AND reset_at IS NULL",
                                (_account(conn, version),)).fetchall()
        finally:
            conn.close()
        by_scientist: dict[str, list[tuple[float, float]]] = {}
        for scientist, epsilon, delta in rows:
            by_scientist.setdefault(scientist, []).append((epsilon, delta))
        return {name: (math.fsum(e for e, _ in spends), math.fsum(d for _, d in spends))
                for name, spends in sorted(by_scientist.items())}

    def reset(self, version: DataVersion, scientist: str | None = None,
              record: Callable[[dict], Any] | None = None) -> dict:
        """Mark the spends on the account of ``version`` (of one scientist, or of all) as reset.

        ``record`` is called with the summary inside the transaction, before
        it commits: the owner's command line writes the audit entry there, so
        when the audit write fails nothing is reset.

        Returns
        -------
        dict
            ``{"account", "scientist", "queries", "epsilon": {scientist: epsilon cleared}}``.
        """
        conn = self._connect()
        try:
            with _transaction(conn):
                account = _account(conn, version)
                where = "account = ? AND reset_at IS NULL" + ("" if scientist is None else " AND scientist = ?")
                params = (account,) if scientist is None else (account, scientist)
                rows = conn.execute(f"SELECT scientist, epsilon FROM spends WHERE {where}", params).fetchall()
                cleared: dict[str, list[float]] = {}
                for name, epsilon in rows:
                    cleared.setdefault(name, []).append(epsilon)
                summary = {"account": account, "scientist": scientist, "queries": len(rows),
                           "epsilon": {name: math.fsum(v) for name, v in sorted(cleared.items())}}
                conn.execute(f"UPDATE spends SET reset_at = ? WHERE {where}", (_now(), *params))
                if record is not None:
                    record(summary)
            return summary
        finally:
            conn.close()

    def legacy_names(self) -> set[str]:
        """Dataset names of spends recorded before accounts existed and not yet adopted."""
        conn = self._connect()
        try:
            return {row[0] for row in conn.execute("SELECT DISTINCT dataset FROM spends WHERE account IS NULL")}
        finally:
            conn.close()

    def adopt(self, name: str, version: DataVersion) -> int:
        """Charge the account-less spends made under dataset ``name`` to ``version``'s account; returns how many."""
        conn = self._connect()
        try:
            with _transaction(conn):
                return conn.execute("UPDATE spends SET account = ? WHERE account IS NULL AND dataset = ?",
                                    (_account(conn, version), name)).rowcount
        finally:
            conn.close()

    def history(self, scientist: str | None = None) -> list[dict]:
        """Every recorded spend, reset ones included (oldest first), optionally of one scientist."""
        keys = ("id", "scientist", "dataset", "epsilon", "delta", "plan_hash", "at", "account", "reset_at")
        conn = self._connect()
        try:
            query = f"SELECT {', '.join(keys)} FROM spends"
            rows = conn.execute(query + (" WHERE scientist = ? ORDER BY id" if scientist else " ORDER BY id"),
                                (scientist,) if scientist else ()).fetchall()
        finally:
            conn.close()
        return [dict(zip(keys, row)) for row in rows]


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _schema_is_current(conn: sqlite3.Connection) -> bool:
    columns = {row[1] for row in conn.execute("PRAGMA table_info(spends)")}
    versions = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'file_versions'").fetchone()
    return {"account", "reset_at"} <= columns and versions is not None


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, or add the account columns to a ledger written before accounts existed."""
    conn.execute("CREATE TABLE IF NOT EXISTS spends (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                 "scientist TEXT NOT NULL, dataset TEXT NOT NULL, epsilon REAL NOT NULL, "
                 "delta REAL NOT NULL, plan_hash TEXT NOT NULL, at TEXT NOT NULL, account TEXT, reset_at TEXT)")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(spends)")}
    for column in ("account", "reset_at"):
        if column not in columns:
            conn.execute(f"ALTER TABLE spends ADD COLUMN {column} TEXT")
    conn.execute("CREATE INDEX IF NOT EXISTS spends_by_account ON spends (account, scientist)")
    conn.execute("CREATE TABLE IF NOT EXISTS file_versions (path TEXT NOT NULL, size INTEGER NOT NULL, "
                 "mtime_ns INTEGER NOT NULL, content_hash TEXT NOT NULL, account TEXT NOT NULL, "
                 "seen_at TEXT NOT NULL, PRIMARY KEY (path, size, mtime_ns))")
    conn.execute("CREATE INDEX IF NOT EXISTS file_versions_by_hash ON file_versions (content_hash)")
    conn.execute("CREATE INDEX IF NOT EXISTS file_versions_by_account ON file_versions (account)")


def _known_version(conn: sqlite3.Connection, key: tuple[str, int, int]) -> DataVersion | None:
    row = conn.execute("SELECT content_hash, account FROM file_versions WHERE path = ? AND size = ? AND mtime_ns = ?",
                       key).fetchone()
    return None if row is None else DataVersion(*key, row[0], row[1])


def _account(conn: sqlite3.Connection, version: DataVersion) -> str:
    """The version's account as the ledger has it now (a later merge may have moved it)."""
    row = conn.execute("SELECT account FROM file_versions WHERE path = ? AND size = ? AND mtime_ns = ?",
                       (version.path, version.size, version.mtime_ns)).fetchone()
    return version.account if row is None else row[0]


def _spent(conn: sqlite3.Connection, account: str, scientist: str) -> Spent:
    rows = conn.execute("SELECT scientist, epsilon, delta FROM spends WHERE account = ? AND reset_at IS NULL",
                        (account,)).fetchall()
    mine = [row for row in rows if row[0] == scientist]
    return Spent(math.fsum(r[1] for r in mine), math.fsum(r[2] for r in mine), math.fsum(r[1] for r in rows))


def _check_bounds(spent: Spent, policy: DPPolicy, dataset: str) -> None:
    """Refuse a charge that would pass a bound.

    The text names the bound and the policy's numbers.  The per-scientist
    refusal says what is left to the scientist who asks (their own
    spending); the total's says only that it is spent, never how much other
    scientists spent.
    """
    cost_e, cost_d = policy.epsilon_per_query, policy.delta_per_query
    over_e = spent.epsilon + cost_e > policy.epsilon + TOLERANCE
    if over_e or spent.delta + cost_d > policy.delta + TOLERANCE:
        measure, cost, bound, left = ("epsilon", cost_e, policy.epsilon, policy.epsilon - spent.epsilon) if over_e \
            else ("delta", cost_d, policy.delta, policy.delta - spent.delta)
        raise BastionError(
            "PolicyViolation",
            f"your privacy budget on dataset {dataset!r} is exhausted (the per-scientist bound): this query costs "
            f"{measure} {cost:g}, each scientist may spend {measure} {bound:g} on this data, and {max(left, 0.0):g} "
            "is left to you; the query was not run",
            dataset=dataset, limit=measure, epsilon=policy.epsilon, epsilon_cost=cost_e,
            epsilon_spent=spent.epsilon)
    if policy.epsilon_total is not None and spent.epsilon_all + cost_e > policy.epsilon_total + TOLERANCE:
        raise BastionError(
            "PolicyViolation",
            f"the total privacy budget of dataset {dataset!r}, shared by all scientists, is exhausted (the total "
            f"bound): this query costs epsilon {cost_e:g} and all scientists together may spend epsilon "
            f"{policy.epsilon_total:g} on this data; the query was not run",
            dataset=dataset, limit="epsilon_total", epsilon=policy.epsilon_total, epsilon_cost=cost_e)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def ledger_of(dataset: Dataset) -> BudgetLedger:
    """The odometer of a DP dataset (``PolicyViolation`` when the workspace gave it none)."""
    path = dataset.dp.ledger
    if path is None:
        # Without an odometer nothing can be charged: refuse rather than release unmetered.
        raise BastionError("PolicyViolation", f"dataset {dataset.name!r} is differentially private but the "
                                              "executor has no privacy budget store for it; ask the owner")
    return BudgetLedger(path)


def data_version(ledger: BudgetLedger, dataset: Dataset) -> DataVersion:
    """The version of ``dataset``'s data on ``ledger`` (``ExecutionError`` when the file cannot be read)."""
    try:
        return ledger.version(dataset.path)
    except OSError as exc:
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} cannot be read "
                                             f"({type(exc).__name__})") from None


def adopt_legacy_spends(ledger: BudgetLedger, catalog: Mapping[str, Dataset]) -> int:
    """Charge spends recorded by dataset name (before accounts existed) to the data each name reads now.

    Spending is kept, never forgiven: a legacy spend goes to the account of
    the file its name is registered on today.  Spends of a name that is not
    a DP dataset of ``catalog`` wait until it is one again.

    Returns
    -------
    int
        How many spends were adopted.
    """
    adopted = 0
    for name in sorted(ledger.legacy_names()):
        dataset = catalog.get(name)
        if dataset is not None and getattr(dataset, "dp", None) is not None:
            adopted += ledger.adopt(name, data_version(ledger, dataset))
    return adopted


def account_of(dataset: Dataset, catalog: Mapping[str, Dataset]) -> tuple[BudgetLedger, DataVersion]:
    """The odometer of a DP dataset and the version of its data, legacy spends adopted first."""
    ledger = ledger_of(dataset)
    adopt_legacy_spends(ledger, catalog)
    return ledger, data_version(ledger, dataset)
