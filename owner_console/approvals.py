"""The approval queue: held requests and the owner's decisions, in SQLite.

The executor writes requests; the owner's command line and console decide
them; the executor releases approved ones.  These are different threads and
processes, so the database runs in WAL mode (readers never block the writer)
with a busy timeout, every change is one ``BEGIN IMMEDIATE`` transaction, and
every state change is a conditional update (``... WHERE status = 'pending'``)
so two deciders, or two releases, can never both win.

A request moves ``pending -> approved -> released``, ``pending -> rejected``
or ``pending -> approved -> expired`` (an approval not fetched within the
workspace's ``approval_ttl_seconds``); nothing else.  A released approval
keeps serving its scientist: the same key that runs the same plan again on
the same data version (``data_version``, the sources' file versions and
policies when it was held) gets the approved table again, a re-release,
until ``approval_ttl_seconds`` after the decision; unless the approval
serves one release only (``reuse = 'once'``: the owner's choice per
approval, or ``approval_reuse = "once"`` for the whole workspace).  The executor releases
in two steps (:meth:`ApprovalStore.begin_release`, then
:meth:`ApprovalStore.finish_release` once the table is handed over), so a
release that a crash interrupted between them is recognisable and is sent
again to the key that asked.  Only committed
transactions survive a crash (``synchronous=FULL``).

Stores written by an older version (schema 1: no ``expired`` status) are
migrated in place when opened, inside one ``BEGIN IMMEDIATE`` transaction,
so two processes opening an old store at once migrate it exactly once.
"""
from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from bastion_kernel.contract.plan import canonical_json, plan_hash as compute_plan_hash

STATUSES = ("pending", "approved", "rejected", "released", "expired")
_SCHEMA_VERSION = 5
# How long an approval serves its scientist: until it expires (re-releases), or for one release.
REUSE_MODES = ("until_expiry", "once")
# Columns every schema version has, in the order of schema 1 (copied by the migration).
_V1_COLUMNS = ("id, scientist, status, plan_json, plan_hash, plan_text, plan_tree, query_text, reason,"
               " columns_json, rows, notes_json, result_sha256, asked_at, decided_at, decided_by,"
               " decision_reason, released_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    scientist       TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'released', 'expired')),
    plan_json       TEXT NOT NULL,
    plan_hash       TEXT NOT NULL,
    plan_text       TEXT NOT NULL,
    plan_tree       TEXT NOT NULL,
    query_text      TEXT NOT NULL,
    reason          TEXT NOT NULL,
    columns_json    TEXT NOT NULL,
    rows            INTEGER NOT NULL,
    notes_json      TEXT NOT NULL,
    result_sha256   TEXT NOT NULL,
    asked_at        TEXT NOT NULL,
    decided_at      TEXT,
    decided_by      TEXT,
    decision_reason TEXT,
    released_at     TEXT,
    expired_at      TEXT,
    detail          TEXT NOT NULL DEFAULT '',
    scientist_key   TEXT NOT NULL DEFAULT '',
    data_version    TEXT NOT NULL DEFAULT '',
    reuse           TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status);
CREATE INDEX IF NOT EXISTS requests_plan ON requests (plan_hash);
"""


class ApprovalError(Exception):
    """A decision that cannot be made: no such request, or it is not in the right state."""


@dataclass(frozen=True)
class Request:
    """One held request, as stored.

    ``plan_text`` is the readable polars-shaped form of the plan and
    ``plan_tree`` its tree view (both for the owner's review); ``query_text``
    is what the scientist typed; ``columns`` is ``[[name, dtype], ...]`` and
    ``rows`` the row count of the held table; ``result_sha256`` is the SHA-256
    of the held table's Arrow IPC bytes, so what is released is what was
    reviewed.  ``reason`` is what the scientist was told (a function of the
    plan and the policy); ``detail`` says what failed, with its counts, for
    the owner only.  ``scientist_key`` is the Z85 CURVE key that asked (empty
    for requests stored before keys were recorded): only that key is ever
    served the request, so a removed or rotated key's requests are served to
    no one.  ``data_version`` identifies the data the held table was
    computed from (empty: never served to a re-run); ``reuse`` is
    ``"once"`` when the owner approved it for one release, else empty (the
    workspace's ``approval_reuse`` applies).
    """

    id: int
    scientist: str
    status: str
    plan: Any
    plan_hash: str
    plan_text: str
    plan_tree: Any
    query_text: str
    reason: str
    columns: list
    rows: int
    notes: list
    result_sha256: str
    asked_at: str
    decided_at: str | None
    decided_by: str | None
    decision_reason: str | None
    released_at: str | None
    expired_at: str | None = None
    detail: str = ""
    scientist_key: str = ""
    data_version: str = ""
    reuse: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (microseconds), as stores record it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class ApprovalStore:
    """The request store at ``path`` (created if missing).

    Safe to share between threads (one SQLite connection per thread) and
    between processes (WAL mode, busy timeout, ``BEGIN IMMEDIATE``).

    Parameters
    ----------
    path : str or Path
        The SQLite file, normally ``Workspace.approvals_path``.
    busy_timeout_ms : int
        How long a writer waits for another process's transaction.
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int = 10_000):
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._local = threading.local()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            _migrate_schema_1(conn)
            _migrate_schema_2(conn)
            _migrate_schema_3(conn)
            _migrate_schema_4(conn)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's store is dropped)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writing -----------------------------------------------------------
    def create(self, *, scientist: str, plan: Any, plan_text: str, plan_tree: Any, query_text: str,
               reason: str, columns: list, rows: int, notes: list[str],
               write_result: Callable[[int], str], detail: str = "", scientist_key: str = "",
               data_version: str = "") -> int:
        """Store a new pending request and return its id.

        ``write_result(id)`` is called inside the transaction, with the new
        id, to write the held table durably (``results/<id>.arrow``); it
        returns the SHA-256 of the bytes written.  If it raises, nothing is
        stored, so a request never exists without its table.
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                "INSERT INTO requests (scientist, status, plan_json, plan_hash, plan_text, plan_tree,"
                " query_text, reason, detail, columns_json, rows, notes_json, result_sha256, asked_at,"
                " scientist_key, data_version) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?)",
                (scientist, canonical_json(plan).decode("utf-8"), compute_plan_hash(plan),
                 str(plan_text), json.dumps(plan_tree), str(query_text), str(reason), str(detail),
                 json.dumps([list(c) for c in columns]), int(rows), json.dumps(list(notes)), utc_now(),
                 str(scientist_key), str(data_version)))
            request_id = int(cursor.lastrowid)
            digest = write_result(request_id)
            conn.execute("UPDATE requests SET result_sha256 = ? WHERE id = ?", (str(digest), request_id))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return request_id

    def decide(self, request_id: int, approved: bool, reason: str, by: str = "owner",
               before_commit: Callable[[Request], Any] | None = None, once: bool = False) -> Request:
        """Approve or reject a pending request; raises ApprovalError if it is not pending.

        ``before_commit(request)``, if given, is called inside the transaction
        with the decided request (used to audit the decision: if it raises,
        the decision is not stored).  ``once``: the approval serves one
        release (no re-release on a re-run).
        """
        return self._transition(request_id, "pending", "approved" if approved else "rejected",
                                "decided_at = ?, decided_by = ?, decision_reason = ?, reuse = ?",
                                (utc_now(), str(by), str(reason), "once" if once else ""), before_commit)

    def mark_released(self, request_id: int) -> Request:
        """Record that an approved request's table was sent; a request is released once."""
        return self._transition(request_id, "approved", "released", "released_at = ?", (utc_now(),))

    def begin_release(self, request_id: int) -> Request:
        """Consume an approval before its table is sent: ``released`` without a ``released_at`` yet.

        Until :meth:`finish_release`, the release counts as interrupted (a
        crash between the two): the executor sends the table again to the
        key that asked (:func:`interrupted_release`).
        """
        return self._transition(request_id, "approved", "released", "released_at = NULL", ())

    def finish_release(self, request_id: int) -> None:
        """Record that the table of a begun release was handed to the scientist's connection."""
        request_id = _check_id(request_id)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE requests SET released_at = ? WHERE id = ? AND status = 'released'"
                         " AND released_at IS NULL", (utc_now(), request_id))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def expire(self, request_id: int, before_commit: Callable[[Request], Any] | None = None) -> Request:
        """Mark an approved, not yet released request as expired; it can no longer be released.

        ``before_commit``: as in :meth:`decide`.
        """
        return self._transition(request_id, "approved", "expired", "expired_at = ?", (utc_now(),), before_commit)

    def expire_approved(self, ttl_seconds: float, now: _dt.datetime | None = None) -> list[Request]:
        """Expire every approval older than ``ttl_seconds``; returns the requests expired now.

        An approval that another process releases or expires at the same time
        is skipped (the conditional update lets only one of them win).
        """
        expired = []
        for request in self.list("approved"):
            if is_expired(request, ttl_seconds, now):
                try:
                    expired.append(self.expire(request.id))
                except ApprovalError:
                    continue
        return expired

    def _transition(self, request_id: int, source: str, target: str, sets: str, values: tuple,
                    before_commit: Callable[[Request], Any] | None = None) -> Request:
        request_id = _check_id(request_id)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT status FROM requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                raise ApprovalError(f"no request {request_id}")
            if row["status"] != source:
                raise ApprovalError(f"request {request_id} is {row['status']}, not {source}")
            conn.execute(f"UPDATE requests SET status = ?, {sets} WHERE id = ? AND status = ?",
                         (target, *values, request_id, source))
            if before_commit is not None:
                before_commit(_to_request(conn.execute("SELECT * FROM requests WHERE id = ?",
                                                       (request_id,)).fetchone()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return self.get(request_id)

    # -- reading -----------------------------------------------------------
    def get(self, request_id: int) -> Request | None:
        """The request with this id, or None."""
        row = self._conn().execute("SELECT * FROM requests WHERE id = ?", (_check_id(request_id),)).fetchone()
        return _to_request(row) if row is not None else None

    def latest_for(self, scientist: str, scientist_key: str, plan_hash: str, data_version: str) -> Request | None:
        """The newest request of this scientist and key for this plan on this data version, or None.

        Requests stored without a key or a data version never match.
        """
        if not scientist_key or not data_version:
            return None
        row = self._conn().execute(
            "SELECT * FROM requests WHERE plan_hash = ? AND scientist = ? AND scientist_key = ?"
            " AND data_version = ? ORDER BY id DESC LIMIT 1",
            (str(plan_hash), str(scientist), str(scientist_key), str(data_version))).fetchone()
        return _to_request(row) if row is not None else None

    def fingerprint(self) -> tuple:
        """``((status, count, max id), ...)``: changes whenever a request is added or changes status."""
        return tuple(tuple(row) for row in self._conn().execute(
            "SELECT status, COUNT(*), MAX(id) FROM requests GROUP BY status ORDER BY status").fetchall())

    def list(self, status: str | None = None) -> list[Request]:
        """All requests (or those with ``status``), oldest first."""
        if status is None:
            rows = self._conn().execute("SELECT * FROM requests ORDER BY id").fetchall()
        else:
            if status not in STATUSES:
                raise ApprovalError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
            rows = self._conn().execute("SELECT * FROM requests WHERE status = ? ORDER BY id",
                                        (status,)).fetchall()
        return [_to_request(row) for row in rows]


def record_decision(store: ApprovalStore, audit: Any, request_id: int, approved: bool, reason: str,
                    by: str = "owner", once: bool = False) -> Request:
    """Approve or reject a pending request and audit the decision (``approval`` / ``rejection``).

    The one way the owner's tools (command line, console) decide a request.

    Parameters
    ----------
    store : ApprovalStore
    audit : owner_console.audit.AuditLog
    request_id : int
    approved : bool
    reason : str
        Kept with the decision; a rejected scientist sees it.
    by : str
        Who decided.
    once : bool
        An approval that serves one release: a re-run of the same query
        goes to review again (otherwise the workspace's ``approval_reuse``
        applies).

    Returns
    -------
    Request
        The request after the decision.

    Raises
    ------
    ApprovalError
        No such request, or it is not pending.
    """
    # The entry is written inside the decision's transaction: a crash can leave an
    # audited decision that was not stored (the owner decides again), never a
    # stored decision that was not audited.
    def audited(request: Request) -> None:
        audit.append("approval" if approved else "rejection", request.scientist, request_id=request.id,
                     plan_hash=request.plan_hash, reason=reason, by=by,
                     **({"once": True} if approved and once else {}))

    return store.decide(request_id, approved, reason, by=by, before_commit=audited, once=approved and once)


def sweep_expired(store: ApprovalStore, audit: Any, ttl_seconds: float,
                  result_path: Callable[[int], Path], reuse: str = "until_expiry") -> list[Request]:
    """Expire stale approvals, audit each (``expiry``) and delete its held result file.

    Also deletes the tables of released requests that can serve no
    re-release any more (their approval is older than ``ttl_seconds``, or
    served one release: ``reuse``).

    Parameters
    ----------
    store : ApprovalStore
    audit : owner_console.audit.AuditLog
    ttl_seconds : float
        The workspace's ``approval_ttl_seconds``.
    result_path : callable
        ``Workspace.result_path``: request id -> its held result file.
    reuse : str
        The workspace's ``approval_reuse``.

    Returns
    -------
    list of Request
        The requests this call expired.
    """
    expired = store.expire_approved(ttl_seconds)
    for request in expired:
        audit.append("expiry", request.scientist, request_id=request.id, plan_hash=request.plan_hash,
                     decided_at=request.decided_at, ttl_seconds=ttl_seconds)
    # Also files left by an expiry whose process died before deleting them, and the tables of released
    # requests that serve no more re-releases.
    spent = [r for r in store.list("released") if not interrupted_release(r)
             and not serves_again(r, ttl_seconds, reuse)]
    for request in store.list("expired") + spent:
        try:
            Path(result_path(request.id)).unlink()
        except FileNotFoundError:
            pass
    return expired


def withdraw_requests(store: ApprovalStore, audit: Any, scientist: str, reason: str, by: str,
                      result_path: Callable[[int], Path], keep_key: str | None = None) -> list[Request]:
    """Withdraw a scientist's open requests when their key is removed or replaced.

    Every pending request of ``scientist`` is rejected (``rejection``) and
    every approved, not yet released one expired (``expiry``), each with
    ``reason`` and audited inside its transaction; held tables of expired
    requests are deleted.  Requests asked with ``keep_key`` (the new key of
    a rotation) are left alone.  The executor serves a request only to the
    key that asked it, so this is for the owner's queue: nothing withdrawn
    stays waiting for a decision that can no longer reach anyone.

    Returns
    -------
    list of Request
        The requests withdrawn, after the change.
    """
    withdrawn = []
    for request in store.list():
        if request.scientist != scientist or request.status not in ("pending", "approved"):
            continue
        if keep_key is not None and request.scientist_key == keep_key:
            continue

        def audited(changed: Request) -> None:
            audit.append("expiry", changed.scientist, request_id=changed.id, plan_hash=changed.plan_hash,
                         decided_at=changed.decided_at, reason=reason, by=by)

        try:
            if request.status == "pending":
                withdrawn.append(record_decision(store, audit, request.id, False, reason, by=by))
            else:
                withdrawn.append(store.expire(request.id, before_commit=audited))
                Path(result_path(request.id)).unlink(missing_ok=True)
        except ApprovalError:  # decided, released or expired meanwhile
            continue
    return withdrawn


def interrupted_release(request: Request) -> bool:
    """True for a release begun but never finished (:meth:`ApprovalStore.begin_release`): the executor
    stopped between consuming the approval and handing the table over, so it is sent again."""
    return request.status == "released" and request.released_at is None


def effective_reuse(request: Request, workspace_reuse: str) -> str:
    """``"once"`` when the owner approved ``request`` for one release or the workspace says so, else
    ``"until_expiry"``."""
    return "once" if request.reuse == "once" or workspace_reuse == "once" else "until_expiry"


def serves_again(request: Request, ttl_seconds: float, reuse: str, now: _dt.datetime | None = None) -> bool:
    """True when a released request's approved table may be released again now (a re-release).

    Its approval must be younger than ``ttl_seconds`` and serve more than one
    release (:func:`effective_reuse` with the workspace's ``reuse``).
    """
    if request.status != "released" or effective_reuse(request, reuse) == "once":
        return False
    deadline = expires_at(request, ttl_seconds)
    return deadline is not None and (now or _dt.datetime.now(_dt.timezone.utc)) < deadline


def describe_seconds(seconds: float) -> str:
    """``604800`` -> ``"7 days"``: a duration in the largest whole unit."""
    seconds = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def expires_at(request: Request, ttl_seconds: float) -> _dt.datetime | None:
    """When an approved request's approval expires (None if it was never approved)."""
    if request.decided_at is None or request.status not in ("approved", "released", "expired"):
        return None
    return _dt.datetime.fromisoformat(request.decided_at) + _dt.timedelta(seconds=float(ttl_seconds))


def is_expired(request: Request, ttl_seconds: float, now: _dt.datetime | None = None) -> bool:
    """True if ``request`` is approved (not yet released) and its approval is older than ``ttl_seconds``."""
    if request.status == "expired":
        return True
    deadline = expires_at(request, ttl_seconds) if request.status == "approved" else None
    return deadline is not None and (now or _dt.datetime.now(_dt.timezone.utc)) >= deadline


def _migrate_schema_1(conn: sqlite3.Connection) -> None:
    """Rebuild a schema-1 ``requests`` table (no ``expired`` status) as the current one.

    Runs inside the caller's transaction; SQLite cannot alter a CHECK
    constraint in place, so the table is renamed, recreated and copied.
    """
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone()
    if row is None or "'expired'" in row["sql"]:
        return
    conn.execute("DROP INDEX IF EXISTS requests_status")
    conn.execute("ALTER TABLE requests RENAME TO requests_schema_1")
    for statement in filter(str.strip, _SCHEMA.split(";")):
        conn.execute(statement)
    conn.execute(f"INSERT INTO requests ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM requests_schema_1")
    conn.execute("DROP TABLE requests_schema_1")


def _migrate_schema_2(conn: sqlite3.Connection) -> None:
    """Give a schema-2 ``requests`` table the owner-only ``detail`` column (empty for older requests)."""
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(requests)")}
    if columns and "detail" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN detail TEXT NOT NULL DEFAULT ''")


def _migrate_schema_3(conn: sqlite3.Connection) -> None:
    """Give a schema-3 ``requests`` table the ``scientist_key`` column (empty for older requests)."""
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(requests)")}
    if columns and "scientist_key" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN scientist_key TEXT NOT NULL DEFAULT ''")


def _migrate_schema_4(conn: sqlite3.Connection) -> None:
    """Give a schema-4 ``requests`` table ``data_version`` and ``reuse`` (empty: older requests are never
    re-released to a re-run, and follow the workspace's ``approval_reuse``)."""
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(requests)")}
    if columns and "data_version" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN data_version TEXT NOT NULL DEFAULT ''")
    if columns and "reuse" not in columns:
        conn.execute("ALTER TABLE requests ADD COLUMN reuse TEXT NOT NULL DEFAULT ''")


def _check_id(request_id: Any) -> int:
    if isinstance(request_id, bool) or not isinstance(request_id, int) or not 0 < request_id < 2**63:
        raise ApprovalError(f"invalid request id {request_id!r}")
    return request_id


def _to_request(row: sqlite3.Row) -> Request:
    return Request(
        id=row["id"], scientist=row["scientist"], status=row["status"],
        plan=json.loads(row["plan_json"]), plan_hash=row["plan_hash"], plan_text=row["plan_text"],
        plan_tree=json.loads(row["plan_tree"]), query_text=row["query_text"], reason=row["reason"],
        columns=json.loads(row["columns_json"]), rows=row["rows"], notes=json.loads(row["notes_json"]),
        result_sha256=row["result_sha256"], asked_at=row["asked_at"], decided_at=row["decided_at"],
        decided_by=row["decided_by"], decision_reason=row["decision_reason"],
        released_at=row["released_at"], expired_at=row["expired_at"] if "expired_at" in row.keys() else None,
        detail=row["detail"] if "detail" in row.keys() else "",
        scientist_key=row["scientist_key"] if "scientist_key" in row.keys() else "",
        data_version=row["data_version"] if "data_version" in row.keys() else "",
        reuse=row["reuse"] if "reuse" in row.keys() else "")
