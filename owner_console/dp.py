"""Differential privacy: a budgeted release mode built on OpenDP.

A dataset whose ``datasets/NAME.toml`` has a ``[dp]`` table releases nothing
but differentially private aggregates.  Every plan that reads such a dataset
comes here instead of the K-anonymity path (``executor.evaluate`` routes it)::

    query  = translate(plan, catalog)              # the DP subset, or a typed refusal
    ledger.charge(scientist, dataset, policy)      # refused *before* anything runs
    table  = OpenDP context (owner's policy only) -> query -> release

What the owner writes (all in ``[dp]``)::

    epsilon = 1.0                 # total budget of each scientist on this data
    epsilon_per_query = 0.1       # what one released query costs (default epsilon / 10)
    epsilon_total = 3.0           # optional: what all scientists together may spend on this data
    delta = 0.0                   # total delta (0: pure DP); delta_per_query likewise
    max_rows = 100000             # a public upper bound on the number of rows
    privacy_unit_column = "patient_id"   # optional: rows of one person share this id
    max_contributions = 1         # rows one person may contribute (kept per id)
    [dp.bounds]                   # optional clipping bounds, per column
    age = [0, 100]
    [dp.public_keys]              # group-by keys and their public values
    sex = ["F", "M"]

The OpenDP context (privacy unit, privacy loss, margins) is built from this
policy only; a plan contributes nothing but which aggregates to compute, over
which public keys, after which row filters.  Clipping bounds from the plan
are accepted only inside the owner's bounds for that column (OpenDP
calibrates the noise to whichever bounds are used, so they cannot weaken the
guarantee, but the owner decides how much a single row may move a sum).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from bastion_kernel.contract import plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from .model import Dataset, Decision, Released

LEDGER_FILE = "dp_budget.sqlite"
ALPHA = 0.05                      # accuracy is reported at 95% confidence
MAX_CANDIDATES = 1000             # quantile candidates in one plan
DEFAULT_CANDIDATES = 101          # evenly spaced over the bounds when the plan gives none
MAX_KEY_COMBINATIONS = 10_000     # rows of the public key set of one group_by
_TOLERANCE = 1e-12                # float slack when comparing spent budget to the total
DP_FUNCTIONS = ("dp.sum", "dp.mean", "dp.quantile")
_NUMERIC_PREFIXES = ("Int", "UInt", "Float")


# ----------------------------------------------------------------- policy
@dataclass(frozen=True)
class DPPolicy:
    """The owner's differential privacy settings of one dataset (the ``[dp]`` table).

    ``ledger`` is where the workspace keeps the odometer; it is set by the
    workspace when it reads the dataset, never by a scientist.
    """

    epsilon: float
    max_rows: int
    epsilon_per_query: float | None = None
    epsilon_total: float | None = None
    delta: float = 0.0
    delta_per_query: float | None = None
    privacy_unit_column: str | None = None
    max_contributions: int = 1
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    public_keys: Mapping[str, tuple] = field(default_factory=dict, hash=False)
    ledger: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not _is_number(self.epsilon) or not self.epsilon > 0:
            raise ValueError(f"dp.epsilon must be a number > 0, got {self.epsilon!r}")
        per_query = self.epsilon / 10 if self.epsilon_per_query is None else self.epsilon_per_query
        if not _is_number(per_query) or not 0 < per_query <= self.epsilon:
            raise ValueError(f"dp.epsilon_per_query must be a number in (0, epsilon], got {per_query!r}")
        object.__setattr__(self, "epsilon_per_query", float(per_query))
        object.__setattr__(self, "epsilon", float(self.epsilon))
        if self.epsilon_total is not None:
            if not _is_finite(self.epsilon_total) or not self.epsilon_total >= per_query:
                raise ValueError(f"dp.epsilon_total must be a number >= epsilon_per_query ({per_query:g}), "
                                 f"got {self.epsilon_total!r}")
            object.__setattr__(self, "epsilon_total", float(self.epsilon_total))
        if not _is_number(self.delta) or not 0 <= self.delta < 1:
            raise ValueError(f"dp.delta must be a number in [0, 1), got {self.delta!r}")
        delta_per_query = self.delta / 10 if self.delta_per_query is None else self.delta_per_query
        if not _is_number(delta_per_query) or not 0 <= delta_per_query <= self.delta:
            raise ValueError(f"dp.delta_per_query must be a number in [0, delta], got {delta_per_query!r}")
        object.__setattr__(self, "delta_per_query", float(delta_per_query))
        object.__setattr__(self, "delta", float(self.delta))
        if not _is_whole(self.max_rows) or self.max_rows < 1:
            raise ValueError(f"dp.max_rows must be a whole number >= 1, got {self.max_rows!r}")
        if self.privacy_unit_column is not None and (not isinstance(self.privacy_unit_column, str)
                                                     or not self.privacy_unit_column):
            raise ValueError(f"dp.privacy_unit_column must be a column name, got {self.privacy_unit_column!r}")
        if not _is_whole(self.max_contributions) or not 1 <= self.max_contributions <= 10_000:
            raise ValueError(f"dp.max_contributions must be a whole number from 1 to 10000, "
                             f"got {self.max_contributions!r}")
        if not isinstance(self.bounds, Mapping):
            raise ValueError("dp.bounds must be a table of column = [lower, upper]")
        bounds = {}
        for column, pair in self.bounds.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_is_finite(v) for v in pair) \
                    or not pair[0] < pair[1]:
                raise ValueError(f"dp.bounds.{column} must be [lower, upper] with finite numbers, lower < upper")
            bounds[str(column)] = (pair[0], pair[1])
        object.__setattr__(self, "bounds", bounds)
        if not isinstance(self.public_keys, Mapping):
            raise ValueError("dp.public_keys must be a table of column = [value, ...]")
        keys = {}
        for column, values in self.public_keys.items():
            if not isinstance(values, (list, tuple)) or not values or len(values) > MAX_KEY_COMBINATIONS \
                    or not all(isinstance(v, (str, int, float, bool)) for v in values) \
                    or len(set(values)) != len(values):
                raise ValueError(f"dp.public_keys.{column} must be a non-empty list of distinct values "
                                 f"(at most {MAX_KEY_COMBINATIONS})")
            keys[str(column)] = tuple(values)
        object.__setattr__(self, "public_keys", keys)

    @property
    def columns(self) -> set[str]:
        """The columns this policy names (they must exist in the data)."""
        named = set(self.bounds) | set(self.public_keys)
        if self.privacy_unit_column:
            named.add(self.privacy_unit_column)
        return named

    def to_dict(self) -> dict[str, Any]:
        """The ``[dp]`` table as written to ``datasets/NAME.toml``."""
        data: dict[str, Any] = {"epsilon": self.epsilon, "epsilon_per_query": self.epsilon_per_query,
                                "delta": self.delta, "delta_per_query": self.delta_per_query,
                                "max_rows": self.max_rows, "max_contributions": self.max_contributions}
        if self.epsilon_total is not None:
            data["epsilon_total"] = self.epsilon_total
        if self.privacy_unit_column:
            data["privacy_unit_column"] = self.privacy_unit_column
        if self.bounds:
            data["bounds"] = {c: list(b) for c, b in self.bounds.items()}
        if self.public_keys:
            data["public_keys"] = {c: list(v) for c, v in self.public_keys.items()}
        return data

    def describe(self) -> dict[str, Any]:
        """What a scientist may know of the policy (``datasets`` shows it)."""
        data = self.to_dict()
        data.pop("max_rows")
        return data

    @classmethod
    def from_dict(cls, data: Any, ledger: Path | None = None) -> "DPPolicy":
        """Parse a ``[dp]`` table; raises ValueError naming the key (``dp.KEY: ...``)."""
        if not isinstance(data, Mapping):
            raise ValueError("[dp] must be a table")
        known = {"epsilon", "epsilon_per_query", "epsilon_total", "delta", "delta_per_query", "max_rows",
                 "privacy_unit_column", "max_contributions", "bounds", "public_keys"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"dp.{sorted(extra)[0]}: unknown setting; known: {', '.join(sorted(known))}")
        for required in ("epsilon", "max_rows"):
            if required not in data:
                raise ValueError(f"dp.{required}: missing (a [dp] table needs epsilon and max_rows)")
        return cls(ledger=ledger, **dict(data))


def check_columns(policy: DPPolicy, columns: Iterable[str], where: str) -> None:
    """Refuse a policy naming a column the data does not have (ValueError naming ``where``)."""
    available = list(columns)
    for column in sorted(policy.columns):
        if column not in available:
            raise ValueError(f"{where}: the [dp] policy names the column {column!r}, which is not in the data "
                             f"(columns: {', '.join(available)})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------- odometer
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
    over_e = spent.epsilon + cost_e > policy.epsilon + _TOLERANCE
    if over_e or spent.delta + cost_d > policy.delta + _TOLERANCE:
        measure, cost, bound, left = ("epsilon", cost_e, policy.epsilon, policy.epsilon - spent.epsilon) if over_e \
            else ("delta", cost_d, policy.delta, policy.delta - spent.delta)
        raise BastionError(
            "PolicyViolation",
            f"your privacy budget on dataset {dataset!r} is exhausted (the per-scientist bound): this query costs "
            f"{measure} {cost:g}, each scientist may spend {measure} {bound:g} on this data, and {max(left, 0.0):g} "
            "is left to you; the query was not run",
            dataset=dataset, limit=measure, epsilon=policy.epsilon, epsilon_cost=cost_e,
            epsilon_spent=spent.epsilon)
    if policy.epsilon_total is not None and spent.epsilon_all + cost_e > policy.epsilon_total + _TOLERANCE:
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


def _ledger(dataset: Dataset) -> BudgetLedger:
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


def _account_of(dataset: Dataset, catalog: Mapping[str, Dataset]) -> tuple[BudgetLedger, DataVersion]:
    ledger = _ledger(dataset)
    adopt_legacy_spends(ledger, catalog)
    return ledger, data_version(ledger, dataset)


def _budget_row(name: str, policy: DPPolicy, spent: Spent) -> dict:
    remaining = max(policy.epsilon - spent.epsilon, 0.0)
    shared = None if policy.epsilon_total is None else max(policy.epsilon_total - spent.epsilon_all, 0.0)
    usable = remaining if shared is None else min(remaining, shared)
    return {"name": name, "epsilon_total": policy.epsilon, "epsilon_spent": spent.epsilon,
            "epsilon_remaining": remaining, "epsilon_per_query": policy.epsilon_per_query,
            "delta_total": policy.delta, "delta_spent": spent.delta,
            "shared_epsilon_total": policy.epsilon_total, "shared_epsilon_remaining": shared,
            "queries_left": int((usable + _TOLERANCE) // policy.epsilon_per_query)}


def budget(catalog: Mapping[str, Dataset], scientist: str) -> list[dict]:
    """What ``scientist`` has spent and has left on every DP dataset of ``catalog``.

    Spending is counted on the dataset's data, under every name it has.
    ``epsilon_total`` is the per-scientist bound; ``shared_epsilon_total``
    the owner's bound on all scientists together (null when none is set), and
    ``shared_epsilon_remaining`` what all scientists together have left of it.

    Returns
    -------
    list of dict
        ``{"name", "epsilon_total", "epsilon_spent", "epsilon_remaining",
        "epsilon_per_query", "delta_total", "delta_spent",
        "shared_epsilon_total", "shared_epsilon_remaining", "queries_left"}``.
    """
    rows = []
    adopted: set[Path] = set()
    for name in sorted(catalog):
        dataset = catalog[name]
        policy = getattr(dataset, "dp", None)
        if policy is None:
            continue
        ledger = _ledger(dataset)
        if ledger.path not in adopted:
            adopt_legacy_spends(ledger, catalog)
            adopted.add(ledger.path)
        rows.append(_budget_row(name, policy, ledger.spent(scientist, data_version(ledger, dataset))))
    return rows


# ----------------------------------------------------------------- routing
def dp_datasets(plan: Any, catalog: Mapping[str, Dataset]) -> list[str]:
    """Names of the DP datasets a (not yet validated) plan scans, anywhere in it.

    Walks every JSON object of the plan, not only the fields the validator
    knows, so that no shape of plan can reach a DP dataset past this check.
    """
    return sorted(name for name in walk.source_names(plan)
                  if name in catalog and getattr(catalog[name], "dp", None) is not None)


def touches_dp(plan: Any, catalog: Mapping[str, Dataset]) -> bool:
    """True when the plan reads any dataset with a differential privacy policy."""
    return bool(dp_datasets(plan, catalog))


# ----------------------------------------------------------------- translation
@dataclass
class _Aggregate:
    name: str          # output column
    function: str      # "len", "dp.sum", "dp.mean", "dp.quantile"
    column: str | None
    args: dict


@dataclass
class _Query:
    dataset: Dataset
    rows: dict             # the checked scan -> filter* part
    keys: list[str]
    aggregates: list[_Aggregate]
    key_dtypes: dict[str, str]
    column_dtypes: dict[str, str]


def _refuse_shape(dataset: str, what: str) -> BastionError:
    return BastionError("PolicyViolation",
                        f"dataset {dataset!r} is differentially private: it only releases DP aggregates "
                        f"({what}). Write dataset(...).filter(...).group_by(public keys).agg(pl.len(), "
                        "col(x).dp.sum(bounds=(lo, hi)), col(x).dp.mean(...), col(x).dp.quantile(q)) or "
                        ".select(...) of such aggregates", dataset=dataset)


def translate(plan: Any, catalog: Mapping[str, Dataset], cache: Any = None) -> _Query:
    """Check that a plan is in the DP subset and describe it for OpenDP.

    The subset: ``scan(DP dataset) -> filter* -> group_by(public keys, aggs)``
    or ``-> select(aggs)``, where every aggregate is ``len`` or a ``dp.*``
    function of a numeric column (optionally aliased).

    Raises
    ------
    BastionError
        ``PolicyViolation`` for anything that would release more than DP
        aggregates (row-level frames, plain aggregates, joins, private keys),
        ``SchemaError`` / ``UnsupportedOperation`` for malformed parts.
    """
    from . import engine, validate

    names = dp_datasets(plan, catalog)
    if len(names) > 1:
        raise BastionError("PolicyViolation", f"a query may read only one differentially private dataset; "
                                              f"this one reads {', '.join(names)}")
    name = names[0]
    dataset = catalog[name]
    policy: DPPolicy = dataset.dp
    if not isinstance(plan, dict) or plan.get("op") not in ("group_by", "select"):
        shown = plan.get("op") if isinstance(plan, dict) and isinstance(plan.get("op"), str) else "this query"
        raise _refuse_shape(name, f"the query ends in {str(shown)[:32]!r}, not in an aggregation")
    # The rows part: only filters over the scan.
    node = plan.get("input")
    while isinstance(node, dict) and node.get("op") == "filter":
        node = node.get("input")
    if not (isinstance(node, dict) and node.get("op") == "scan" and node.get("dataset") == name):
        shown = node.get("op") if isinstance(node, dict) and isinstance(node.get("op"), str) else "?"
        raise _refuse_shape(name, f"{str(shown)[:32]!r} before the aggregation is not supported; "
                                  "a join or any other combination with a DP dataset is refused")
    cache = cache or engine.DEFAULT_CACHE
    checked = validate.validate(plan["input"], catalog, dataset_columns=cache.columns)
    schema = dict(cache.schema(dataset))
    hidden = dataset.policy.hidden
    if plan["op"] == "group_by":
        fields = {"op", "input", "keys", "aggs"}
        key_nodes, agg_nodes = plan.get("keys"), plan.get("aggs")
    else:
        fields = {"op", "input", "exprs"}
        key_nodes, agg_nodes = [], plan.get("exprs")
    if set(plan) != fields or not isinstance(key_nodes, list) or not isinstance(agg_nodes, list) or not agg_nodes:
        raise BastionError("UnsupportedOperation", f"malformed {plan['op']} node in a DP query")
    keys = []
    for key in key_nodes:
        column = key.get("name") if isinstance(key, dict) and key.get("expr") == "col" and set(key) == {"expr", "name"} \
            else None
        if not isinstance(column, str) or column not in policy.public_keys:
            public = ", ".join(policy.public_keys) or "none"
            raise BastionError("PolicyViolation", f"dataset {name!r} is differentially private: group_by keys "
                                                  f"must be plain columns with public values ({public})",
                               dataset=name)
        keys.append(column)
    if len(set(keys)) != len(keys):
        raise BastionError("SchemaError", "a group_by key is repeated")
    combinations = math.prod(len(policy.public_keys[k]) for k in keys)
    if combinations > MAX_KEY_COMBINATIONS:
        raise BastionError("LimitExceeded", f"these keys have {combinations} combinations; at most "
                                            f"{MAX_KEY_COMBINATIONS} are released at once")
    aggregates = [_aggregate(node, i, name, policy, schema, hidden) for i, node in enumerate(agg_nodes)]
    out = keys + [a.name for a in aggregates]
    if len(set(out)) != len(out):
        raise BastionError("SchemaError", "two output columns have the same name; give one of them another "
                                          "name with .alias()")
    return _Query(dataset, checked.root, keys, aggregates, {k: schema[k] for k in keys}, schema)


def _aggregate(node: Any, index: int, dataset: str, policy: DPPolicy, schema: dict[str, str],
               hidden: frozenset[str]) -> _Aggregate:
    at = f"aggregate {index + 1}"
    alias = None
    if isinstance(node, dict) and node.get("expr") == "alias" and set(node) == {"expr", "input", "name"}:
        alias = node["name"]
        if not isinstance(alias, str) or not alias or len(alias) > P.MAX_NAME_LENGTH or alias.startswith("__"):
            raise BastionError("SchemaError", f"{at}: invalid column name")
        node = node["input"]
    if isinstance(node, dict) and node == {"expr": "len"}:
        return _Aggregate(alias or "len", "len", None, {})
    if not (isinstance(node, dict) and node.get("expr") == "fn" and node.get("name") in DP_FUNCTIONS
            and set(node) == {"expr", "name", "input", "args"}):
        raise BastionError("PolicyViolation",
                           f"dataset {dataset!r} is differentially private: {at} is not a DP aggregate; "
                           "use pl.len(), col(x).dp.sum(bounds=(lo, hi)), col(x).dp.mean(bounds=(lo, hi)) "
                           "or col(x).dp.quantile(q)", dataset=dataset)
    function = node["name"]
    source = node["input"]
    column = source.get("name") if isinstance(source, dict) and source.get("expr") == "col" \
        and set(source) == {"expr", "name"} else None
    if not isinstance(column, str):
        raise BastionError("UnsupportedOperation", f"{at}: {function} applies to a plain column, col(\"name\")")
    if column not in schema:
        raise BastionError("SchemaError", f"{at}: unknown column {column!r}; available columns: "
                                          f"{', '.join(repr(c) for c in schema)}", column=column)
    if column in hidden or column == policy.privacy_unit_column:
        raise BastionError("PolicyViolation", f"{at}: column {column!r} is hidden by the owner's policy")
    if not schema[column].startswith(_NUMERIC_PREFIXES):
        raise BastionError("SchemaError", f"{at}: {function} needs a numeric column; {column!r} is "
                                          f"{schema[column]}")
    args = node["args"]
    spec = P.EXPR_FUNCTIONS[function]
    if not isinstance(args, dict) or set(args) != {p for p, _ in spec.params}:
        raise BastionError("UnsupportedOperation", f"{at}: {function} takes the arguments "
                                                   f"{', '.join(p for p, _ in spec.params)}")
    lower, upper = _bounds(args["lower"], args["upper"], column, policy, at)
    checked: dict[str, Any] = {"lower": lower, "upper": upper}
    if function == "dp.quantile":
        q = args["quantile"]
        if not _is_finite(q) or not 0 <= q <= 1:
            raise BastionError("SchemaError", f"{at}: the quantile must be a number between 0 and 1")
        candidates = args["candidates"]
        if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES \
                or not all(_is_finite(c) for c in candidates):
            raise BastionError("SchemaError", f"{at}: candidates must be a list of at most {MAX_CANDIDATES} "
                                              "numbers")
        if not candidates:
            step = (upper - lower) / (DEFAULT_CANDIDATES - 1)
            candidates = [lower + i * step for i in range(DEFAULT_CANDIDATES)]
            if schema[column].startswith(("Int", "UInt")):
                candidates = sorted({round(c) for c in candidates})
        if any(b <= a for a, b in zip(candidates, candidates[1:])):
            raise BastionError("SchemaError", f"{at}: candidates must be strictly increasing")
        if schema[column].startswith(("Int", "UInt")) and not all(float(c).is_integer() for c in candidates):
            raise BastionError("SchemaError", f"{at}: {column!r} holds whole numbers; give whole-number candidates")
        if schema[column].startswith(("Int", "UInt")):
            candidates = [int(c) for c in candidates]
        checked.update(quantile=q, candidates=candidates)
    return _Aggregate(alias or column, function, column, checked)


def _bounds(lower: Any, upper: Any, column: str, policy: DPPolicy, at: str) -> tuple[Any, Any]:
    owner = policy.bounds.get(column)
    if lower is None and upper is None:
        if owner is None:
            raise BastionError("SchemaError", f"{at}: give clipping bounds for {column!r}, for example "
                                              "bounds=(0, 100); the owner set none for this column")
        return owner
    if not (_is_finite(lower) and _is_finite(upper)) or not lower < upper:
        raise BastionError("SchemaError", f"{at}: bounds must be two finite numbers, lower < upper")
    if owner is not None and not owner[0] <= lower < upper <= owner[1]:
        raise BastionError("PolicyViolation", f"{at}: bounds for {column!r} must lie within the owner's "
                                              f"({owner[0]}, {owner[1]})")
    return lower, upper


# ----------------------------------------------------------------- OpenDP
def _opendp():
    import opendp.prelude as dp
    dp.enable_features("contrib")
    return dp


def _opendp_query(query: _Query, cache: Any):
    """The OpenDP query of a translated plan, on a context built from the owner's policy only."""
    import polars as pl

    from . import engine

    dp = _opendp()
    policy: DPPolicy = query.dataset.dp
    cache = cache or engine.DEFAULT_CACHE
    data = cache.frame(query.dataset).lazy()
    if policy.privacy_unit_column:
        unit = dp.unit_of(contributions=1, identifier=pl.col(policy.privacy_unit_column))
    else:
        unit = dp.unit_of(contributions=policy.max_contributions)
    loss = {"epsilon": policy.epsilon_per_query}
    if policy.delta_per_query > 0:
        loss["delta"] = policy.delta_per_query
    # A privacy filter bounded by this one query's loss: OpenDP refuses to release more than it.
    # (The scientist's total is the odometer's job; split_evenly_over would cost a binary search.)
    context = dp.Context.compositor(data=data, privacy_unit=unit, privacy_loss=dp.loss_of(**loss),
                                    margins=[dp.polars.Margin(by=[], max_length=policy.max_rows)])
    q = context.query(**loss)
    if policy.privacy_unit_column:
        q = q.truncate_per_group(policy.max_contributions)
    for predicate in _filters(query.rows):
        q = q.filter(_predicate(predicate))
    exprs = [_agg_expr(a, dp) for a in query.aggregates]
    if not query.keys:
        return q.select(exprs)
    keys = None
    for key in query.keys:
        values = pl.DataFrame({key: pl.Series(list(policy.public_keys[key]))})
        try:
            values = values.cast({key: _dtype(query.key_dtypes[key])})
        except Exception:  # noqa: BLE001 - a public value of the wrong type is the owner's mistake
            raise BastionError("ExecutionError", f"the public keys of {key!r} do not fit its type "
                                                 f"{query.key_dtypes[key]}; ask the owner") from None
        keys = values if keys is None else keys.join(values, how="cross")
    return q.group_by(query.keys).agg(exprs).with_keys(keys.lazy())


def _filters(rows: dict) -> list[dict]:
    predicates = []
    node = rows
    while node["op"] == "filter":
        predicates.append(node["predicate"])
        node = node["input"]
    return list(reversed(predicates))


def _dtype(name: str):
    import polars as pl
    dtypes = {"Int8": pl.Int8, "Int16": pl.Int16, "Int32": pl.Int32, "Int64": pl.Int64, "UInt8": pl.UInt8,
              "UInt16": pl.UInt16, "UInt32": pl.UInt32, "UInt64": pl.UInt64, "Float32": pl.Float32,
              "Float64": pl.Float64, "String": pl.String, "Boolean": pl.Boolean}
    if name not in dtypes:
        raise BastionError("UnsupportedOperation", f"public keys of type {name} are not supported")
    return dtypes[name]


def _predicate(node: dict):
    """A validated filter predicate as a polars expression (the subset OpenDP can analyse)."""
    import polars as pl
    kind = node["expr"]
    if kind == "col":
        return pl.col(node["name"])
    if kind == "lit":
        return pl.lit(node["value"])
    if kind == "binary" and node["op"] in _BINARY:
        return _BINARY[node["op"]](_predicate(node["left"]), _predicate(node["right"]))
    if kind == "unary" and node["op"] == "not":
        return ~_predicate(node["operand"])
    if kind == "fn" and node["name"] in ("is_null", "is_not_null"):
        inner = _predicate(node["input"])
        return inner.is_null() if node["name"] == "is_null" else inner.is_not_null()
    shown = node.get("name") if kind == "fn" else node.get("op", kind)
    raise BastionError("UnsupportedOperation", f"a filter on a differentially private dataset may use "
                                               f"columns, literals, comparisons, &, |, ~ and is_null; "
                                               f"{str(shown)[:32]!r} is not supported")


_BINARY = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "and": lambda a, b: a & b, "or": lambda a, b: a | b,
}


def _agg_expr(aggregate: _Aggregate, dp: Any):
    import polars as pl
    if aggregate.function == "len":
        return pl.len().dp.noise().alias(aggregate.name)
    column = pl.col(aggregate.column)
    bounds = (aggregate.args["lower"], aggregate.args["upper"])
    if aggregate.function == "dp.sum":
        expr = column.dp.sum(bounds)
    elif aggregate.function == "dp.mean":
        expr = column.dp.mean(bounds)
    else:
        expr = column.dp.quantile(aggregate.args["quantile"], aggregate.args["candidates"])
    return expr.alias(aggregate.name)


def _calibrate(opendp_query: Any):
    """The OpenDP measurement of a query at the policy's privacy loss (what ``resolve()`` finds).

    OpenDP's own ``resolve()`` binary-searches the noise scale to full float
    precision (over a thousand measurement builds, most of a second).  With one
    global scale every mechanism used here (Laplace counts and sums, the
    exponential mechanism of quantiles) has an epsilon proportional to
    1/scale, so the scale follows from one privacy map; OpenDP's ``check``
    then verifies the guarantee, and the scale is nudged up if rounding left
    it a hair short.  Reads the query's fields as ``resolve()`` does
    (pinned OpenDP 0.16).
    """
    dp = _opendp()
    plan = object.__getattribute__(opendp_query, "polars_plan")
    query = object.__getattribute__(opendp_query, "_query")
    input_domain, input_metric = query._chain
    d_in, d_out = query._d_in, query._d_out

    def make(scale: float):
        return dp.m.make_private_lazyframe(input_domain=input_domain, input_metric=input_metric,
                                           output_measure=query._output_measure, lazyframe=plan,
                                           global_scale=scale)

    target = d_out[0] if isinstance(d_out, tuple) else d_out
    at_one = make(1.0).map(d_in)
    epsilon_at_one = at_one[0] if isinstance(at_one, tuple) else at_one
    scale = max(float(epsilon_at_one) / float(target), 1e-12)
    for _ in range(64):
        measurement = make(scale)
        if measurement.check(d_in, d_out):
            return measurement
        scale *= 1 + 1e-12 * 4 ** _
    raise BastionError("UnsupportedOperation", "OpenDP could not calibrate the noise of this query")


def _release(opendp_query: Any, measurement: Any):
    """Run a calibrated measurement in the query's context (its compositor checks the loss again)."""
    query = object.__getattribute__(opendp_query, "_query")
    return query._context(measurement).collect()


def _resolve_opendp(call, what: str):
    """Run an OpenDP step; its refusals become typed errors (no data is in its messages)."""
    try:
        return call()
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenDPException and the value errors of its builders
        message = str(exc).strip()
        for marker in ('MakeMeasurement("', 'MakeTransformation("', 'FailedFunction("'):
            if marker in message:
                message = message.split(marker, 1)[1].split('")', 1)[0]
                break
        message = message.splitlines()[0] if message else type(exc).__name__
        raise BastionError("UnsupportedOperation", f"OpenDP cannot {what} this query: {message[:300]}") from None


# ----------------------------------------------------------------- entry points
def preview(plan: Any, catalog: Mapping[str, Dataset], scientist: str, cache: Any = None) -> dict:
    """What a DP query would cost and how accurate it would be, without spending anything.

    Returns
    -------
    dict
        ``{"dataset", "epsilon", "delta", "alpha", "columns": [{"name", "aggregate",
        "distribution", "scale", "accuracy"}], "budget": {...}}``; ``accuracy``
        is the half-width of the (1 - alpha) interval (null for quantiles).
    """
    query = translate(plan, catalog, cache)
    opendp_query = _resolve_opendp(lambda: _opendp_query(query, cache), "build")
    from opendp.accuracy import summarize_polars_measurement
    measurement = _resolve_opendp(lambda: _calibrate(opendp_query), "analyse")
    summary = _resolve_opendp(lambda: summarize_polars_measurement(measurement, ALPHA), "analyse")
    columns = _accuracy_per_column(summary.to_dicts(), query)
    policy = query.dataset.dp
    ledger, version = _account_of(query.dataset, catalog)
    left = _budget_row(query.dataset.name, policy, ledger.spent(scientist, version))
    return {"dataset": query.dataset.name, "epsilon": policy.epsilon_per_query, "delta": policy.delta_per_query,
            "alpha": ALPHA, "columns": columns, "budget": left}


def _accuracy_per_column(rows: list[dict], query: _Query) -> list[dict]:
    """One entry per released column: OpenDP's rows, a mean's two noisy parts made one.

    OpenDP releases a mean as a noisy sum over a noisy count and summarizes
    the two apart; what the scientist asked for is the mean.  Its error
    depends on the group's size n, which the preview does not reveal: with
    |mean| <= B (the larger bound in absolute value), the error is at most
    (a_sum + B * a_count) / n when each part is within its own accuracy
    a_sum, a_count (both at once hold with at least 1 - 2 * alpha), given as
    ``accuracy_for_rows`` for n of 100, 1,000 and 10,000.
    """
    means = {a.name: a for a in query.aggregates if a.function == "dp.mean"}
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(row["column"], []).append(row)
    columns = []
    for name, parts in found.items():
        by_kind = {str(part["aggregate"]).lower(): part for part in parts}
        mean = means.get(name)
        if mean is None or "sum" not in by_kind or "length" not in by_kind:
            columns += [{"name": name, "aggregate": part["aggregate"], "distribution": part["distribution"],
                         "scale": part["scale"], "accuracy": part.get("accuracy")} for part in parts]
            continue
        total, count = by_kind["sum"], by_kind["length"]
        bound = max(abs(float(mean.args["lower"])), abs(float(mean.args["upper"])))
        if total.get("accuracy") is None or count.get("accuracy") is None:
            per_rows = None
        else:
            spread = float(total["accuracy"]) + bound * float(count["accuracy"])
            per_rows = {str(n): spread / n for n in (100, 1_000, 10_000)}
        columns.append({"name": name, "aggregate": "Mean", "distribution": total["distribution"],
                        "scale": None, "accuracy": None, "accuracy_for_rows": per_rows})
    return columns


def evaluate(plan: Any, catalog: Mapping[str, Dataset], scientist: str, cache: Any = None) -> Released:
    """Release a DP query: translate, charge the odometer, run OpenDP.

    The budget is charged before the query runs (a refused charge runs
    nothing); a query that fails after the charge keeps it spent, as DP
    accounting requires.  In the executor a DP query runs in a worker process
    (:mod:`owner_console.workers`) like any other: a cancel or the time limit
    kills it, and a charge already made stays spent.

    Raises
    ------
    BastionError
        As :func:`translate`; ``PolicyViolation`` when the budget is exhausted;
        ``UnsupportedOperation`` when OpenDP cannot analyse the query.
    """
    query = translate(plan, catalog, cache)
    opendp_query = _resolve_opendp(lambda: _opendp_query(query, cache), "build")
    measurement = _resolve_opendp(lambda: _calibrate(opendp_query), "analyse")  # refused here costs nothing
    policy: DPPolicy = query.dataset.dp
    name = query.dataset.name
    ledger, version = _account_of(query.dataset, catalog)
    spent = ledger.charge(scientist, version, name, policy, P.plan_hash(plan))
    table = _resolve_opendp(lambda: _release(opendp_query, measurement), "release")
    table = table.select(query.keys + [a.name for a in query.aggregates])
    if query.keys:
        table = table.sort(query.keys)  # post-processing: a stable order for the public keys
    left = _budget_row(name, policy, spent)
    remaining, shared = left["epsilon_remaining"], left["shared_epsilon_remaining"]
    shared_text = "" if shared is None else \
        f"; {shared:g} of the total {policy.epsilon_total:g} of all scientists left"
    reason = (f"differentially private release of {name!r}: epsilon {policy.epsilon_per_query:g} spent "
              f"({spent.epsilon:g} of {policy.epsilon:g} used, {remaining:g} left{shared_text})")
    # Owner-only: which data account was charged, and what all scientists together spent on it.
    decision = Decision("allow", reason, (name,), {"dp": {"dataset": name, "epsilon": policy.epsilon_per_query,
                                                         "delta": policy.delta_per_query,
                                                         "epsilon_spent": spent.epsilon,
                                                         "delta_spent": spent.delta,
                                                         "epsilon_remaining": remaining,
                                                         "data": version.account,
                                                         "epsilon_spent_all": spent.epsilon_all}})
    notes = [f"differentially private: epsilon {policy.epsilon_per_query:g} spent on {name!r}, "
             f"{remaining:g} of {policy.epsilon:g} left{shared_text}"]
    return Released(table, decision, notes)


def schema_of(plan: Any, catalog: Mapping[str, Dataset], cache: Any = None) -> list[tuple[str, str]]:
    """The schema a DP aggregation would release (computed without running it)."""
    query = translate(plan, catalog, cache)
    out = [(k, query.key_dtypes[k]) for k in query.keys]
    for a in query.aggregates:
        if a.function == "len":
            dtype = "UInt32"
        elif a.function == "dp.mean":
            dtype = "Float64"
        elif a.function == "dp.quantile":
            dtype = query.column_dtypes[a.column] if all(isinstance(c, int) for c in a.args["candidates"]) \
                else "Float64"
        else:
            dtype = query.column_dtypes[a.column]
        out.append((a.name, dtype))
    return out


def is_dp_aggregation(plan: Any) -> bool:
    """True when the plan's root aggregates (the shape :func:`translate` handles)."""
    return isinstance(plan, dict) and plan.get("op") in ("group_by", "select")


# ----------------------------------------------------------------- the owner's command line
def policy_from_options(file: str | Path, *, epsilon: float | None, epsilon_per_query: float | None = None,
                        epsilon_total: float | None = None, delta: float = 0.0, max_rows: int | None = None,
                        privacy_unit_column: str | None = None,
                        max_contributions: int = 1, bounds: Iterable[str] = (),
                        public_keys: Iterable[str] = ()) -> DPPolicy:
    """A :class:`DPPolicy` from ``bastion-owner dataset add --privacy dp`` options.

    ``bounds`` items are ``COL=LO:HI``; ``public_keys`` items ``COL=v1,v2,...``
    (values converted to the column's type).  ``max_rows`` defaults to ten
    times the file's row count, rounded up to a power of ten (a loose public
    bound that does not reveal the count).

    Raises
    ------
    ValueError
        Naming the option that is wrong.
    """
    import polars as pl

    if epsilon is None:
        raise ValueError("--privacy dp needs --epsilon (the total budget of each scientist)")
    path = Path(file)
    frame = pl.scan_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pl.scan_csv(path)
    schema = frame.collect_schema()
    if max_rows is None:
        rows = frame.select(pl.len()).collect().item()
        max_rows = 10 ** max(1, math.ceil(math.log10(max(rows, 1) * 10)))
    parsed_bounds = parse_bounds(bounds)
    keys = {}
    for item in public_keys:
        column, sep, rest = str(item).partition("=")
        if not sep or not column or not rest:
            raise ValueError(f"--public-keys {item!r}: expected COL=v1,v2,..., for example sex=F,M")
        if column not in schema:
            raise ValueError(f"--public-keys {item!r}: no column {column!r} in {path.name}")
        keys[column] = [_key_value(v, schema[column], item) for v in rest.split(",")]
    return DPPolicy(epsilon=epsilon, epsilon_per_query=epsilon_per_query, epsilon_total=epsilon_total, delta=delta,
                    delta_per_query=delta / 10 if delta else 0.0, max_rows=max_rows,
                    privacy_unit_column=privacy_unit_column, max_contributions=max_contributions,
                    bounds=parsed_bounds, public_keys=keys)


def parse_bounds(items: Iterable[str]) -> dict[str, list[int | float]]:
    """``--bounds COL=LO:HI`` options as ``{column: [low, high]}``.

    Raises
    ------
    ValueError
        Naming the option that is not ``COL=LO:HI`` with finite numbers.
    """
    parsed = {}
    for item in items:
        column, sep, rest = str(item).partition("=")
        low, colon, high = rest.rpartition(":") if rest.count(":") == 1 else ("", "", "")
        try:
            parsed[column] = [_number(low), _number(high)]
        except ValueError:
            raise ValueError(f"--bounds {item!r}: expected COL=LO:HI, for example age=0:100") from None
        if not sep or not colon or not column:
            raise ValueError(f"--bounds {item!r}: expected COL=LO:HI, for example age=0:100")
    return parsed


def _number(text: str) -> int | float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _key_value(text: str, dtype: Any, item: str) -> Any:
    if dtype.is_integer():
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--public-keys {item!r}: {text!r} is not a whole number") from None
    if dtype.is_float():
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--public-keys {item!r}: {text!r} is not a number") from None
    if str(dtype) == "Boolean":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--public-keys {item!r}: {text!r} is not true or false")
        return text.lower() == "true"
    return text
