"""The executor's socket loop: CURVE allow-list, identities, dispatch, replies.

One ROUTER socket, CURVE server, bound on the owner's side.  A ZAP handler
(:class:`AllowListAuthenticator`) admits only the public keys registered in
the workspace and gives each connection its key as ``User-Id``.  Every
message's key is checked again against the allow-list
(:class:`owner_console.workspace.AllowList`, one ``stat`` when nothing
changed): a key that ``bastion-owner scientist remove`` or a rotation took
off the list is refused (``AuthenticationError``) on its next message, on a
connection that is already open too, and a reply computed for it while it
was being revoked is withheld.  Every request is attributed to the name the
allow-list gives that key, never to anything in the message itself; a held
request is served only to the key that asked it.

The edge.  Before anything reaches a handler, a store or a log: the envelope
(one frame, :func:`bastion_kernel.contract.protocol.decode`), its id (1 to 128
printable ASCII characters: it is logged and audited), the body's fields
(:data:`BODY_FIELDS`), every string in it (no lone UTF-16 surrogate: valid
JSON, not Unicode text), every number in a plan (finite: JSON's ``1e400`` is
no 64-bit float) and the plan's size (at most
:data:`bastion_kernel.contract.plan.MAX_PLAN_BYTES` of canonical JSON).  Each failure
is a typed error naming where it is, answered and audited like any refusal.

Nothing answered without its audit entry.  A refusal, an internal error, a
release and the first message of a connection are answered only after their
entry is on disk (the log fsyncs); if the entry cannot be written, the
request gets no answer at all and the owner's log says why.  Refused requests
are rate-limited per key (``max_refusals_per_minute``, see
:mod:`owner_console.limits`), so a key cannot make the audit log grow faster
than that.

Releasing an approved result.  The ``release`` entry is written first, then
the approval is consumed as an open release, the rows are handed to the
socket, and the release is closed: a crash between any two steps leaves the
approval or an open release, which the key that asked gets by asking again
(with a new entry); never an approval consumed for good without its rows,
nor rows without an entry.

Re-runs.  A held request is bound to its plan's hash, the key that asked and
the version of the data it read (:func:`data_version`: each source file's
size and modification time, and its policy).  A ``fetch`` of the same plan by
the same key on the same data version is answered from that request: still
pending, the same request id (no new review); rejected, the owner's
rejection; approved, its table (a ``release``), and once released, its table
again (a ``rerelease`` entry) until the approval is ``approval_ttl_seconds``
old, unless the owner approved it for one release (``approve --once``,
``approval_reuse = "once"``).  ``request_status`` re-releases the same way.
A changed file or policy makes a new version: the query goes to review again.

Mock data.  A plan whose scans carry ``"mock": true`` (``dataset(NAME,
mock=True)``) runs against the published mocks only
(:mod:`owner_console.mock`): the catalog it gets holds no real file.  It is
answered at once (a ``query`` and a ``release`` entry marked ``mock``),
never held, saved or charged; a plan that mixes mock and real sources is
refused.

Threads and processes.  ZeroMQ sockets are not thread-safe, so only the loop
thread touches the ROUTER.  Requests run on two thread pools (quick ones:
``hello``, ``datasets``, ``schema``, ``request_status``, ``dp_preview``,
``budget``; queries: ``fetch``, ``save``), so that a small request never waits
behind a long query.  A query thread hands the query itself to a worker
process (:mod:`owner_console.workers`): polars has one thread pool per
process, and only separate processes let the operating system share the CPU
fairly, stop a query for real, and survive a query that exhausts memory.
A thread hands its reply back through its own inproc PUSH socket to a PULL
socket that the loop polls next to the ROUTER.

Every request gets exactly one reply: an ``ok``/``result``/``pending``, or the
one error shape.  A handler that fails in an unexpected way answers
``ExecutionError`` with a reference (the details, which may hold data values,
go to the owner's log only) and the loop keeps serving.

Limits.  ZeroMQ drops a connection that sends a frame larger than
:data:`MAX_MESSAGE_BYTES` (a little over the envelope limit, so a slightly too
large envelope still gets a typed error); a scientist may have at most
:data:`MAX_IN_FLIGHT_PER_SCIENTIST` requests queued or running.

Cancellation.  A ``fetch`` or ``save`` is registered under (scientist,
envelope id) from the moment it is accepted; a ``cancel`` from the same
scientist sets its event, and the worker process running the query is
killed at once (:class:`owner_console.workers.QueryWorkers`).  Queries also
stop that way at the workspace's ``query_timeout_seconds``
(:mod:`owner_console.limits`), and a result over ``max_rows_released`` rows
is neither sent nor held.

Saved results.  ``save`` keeps a table per scientist
(:mod:`owner_console.saved`); each request's catalog is the owner's datasets
plus that scientist's own saved results, so another scientist's names fail
exactly like names that do not exist.

Audit.  Each scientist's first message on a connection (``connection``),
each ``fetch`` (``query`` with the plan and the cell text), its ``decision``,
``release`` (SHA-256 of the Arrow bytes sent), ``rerelease`` or ``held``, each refusal of
any request (typed errors, malformed messages, a revoked key, a rate limit),
each ``save`` (name, rows, columns, SHA-256 of the Parquet file, inherited
policy, source datasets), each ``cancel`` (its target and whether it was
found) and each unexpected ``error``.  Plans are kept once each, by their
hash (:mod:`owner_console.audit`).  ``hello``, ``datasets`` and ``schema``
that succeed reveal no data and are not audited; nor are ``dp_preview`` (the
noise of a DP query depends on the owner's policy and the query only) and
``budget`` (the scientist's own spending, which the DP releases'
``decision`` entries already record).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bastion_kernel.contract import protocol, walk
from bastion_kernel.contract.plan import MAX_PLAN_BYTES, PLAN_VERSION, canonical_json, frame_op, plan_hash, scan
from bastion_kernel.contract.protocol import BastionError, ProtocolError
from owner_console import mock
from owner_console.approvals import (ApprovalError, Request, describe_seconds, effective_reuse, expires_at,
                                     interrupted_release, is_expired, serves_again, sweep_expired, utc_now)
from owner_console.limits import Limits, limits_from_config
from owner_console.model import Held, Released
from owner_console.saved import SavedResults, check_saved_name
from owner_console.workspace import AllowList, Workspace, atomic_write

log = logging.getLogger("bastion.executor")

ZAP_DOMAIN = "bastion"
# A message a little over the envelope limit still reaches protocol.decode,
# which answers with a typed error; a much larger one is cut off by ZeroMQ
# (the connection is dropped) before it is ever buffered whole.
MAX_MESSAGE_BYTES = protocol.MAX_ENVELOPE_BYTES + 64 * 1024
MAX_TEXT_CHARS = 100_000
# The reply id for a request whose own id cannot be read (an envelope needs one).
UNREADABLE_ID = "?"
# An envelope id the executor takes: it goes to the log and the audit as it is.
ID_PATTERN = re.compile(r"[\x20-\x7e]{1,128}")
POLL_MS = 100
# Back-pressure: requests waiting or running, per scientist and in all; one
# scientist flooding the executor gets LimitExceeded instead of its memory.
MAX_IN_FLIGHT_PER_SCIENTIST = 32
MAX_IN_FLIGHT = 256
# Messages taken from the ROUTER per loop turn, so replies keep flowing under load.
RECEIVE_BATCH = 64

# The body fields each request kind takes: name -> (JSON type, required).
# Anything else in a body is refused, so a body cannot smuggle in, say, a
# "scientist" field that some later code might trust.
BODY_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {},
    "datasets": {},
    "schema": {"plan": (dict, True)},
    "fetch": {"plan": (dict, True), "text": (str, False)},
    "request_status": {"request_id": (int, True)},
    "save": {"plan": (dict, True), "name": (str, True), "text": (str, False)},
    "cancel": {"target": (str, True)},
    "dp_preview": {"plan": (dict, True)},
    "budget": {},
}
QUERY_KINDS = frozenset({"fetch", "save"})


def server_version() -> str:
    """The installed Bastion version, as ``hello`` reports it."""
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class AllowListAuthenticator(ThreadAuthenticator):
    """ZAP handler: a CURVE key is admitted iff the workspace allow-list has it.

    The allow-list (``scientists/*.toml``, through :class:`AllowList`) is
    checked at every handshake, so ``bastion-owner scientist add`` takes
    effect without a restart.  The connection's ``User-Id`` is the Z85 public
    key, which the executor looks up again on every message.
    """

    def __init__(self, context: zmq.Context, workspace: Workspace, allow_list: AllowList | None = None):
        super().__init__(context, log=logging.getLogger("bastion.zap"))
        self.workspace = workspace
        self.allow_list = allow_list or AllowList(workspace)
        self._names: dict[bytes, str] = {}
        self._refused: set[bytes] = set()

    def admitted_name(self, key: str) -> str | None:
        """The name a key had when it was last admitted (for the audit of a revoked key's messages)."""
        return self._names.get(key.encode("ascii", "replace"))

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials-provider hook: is this Z85 public key allowed?"""
        try:
            name = self.allow_list.name_of(bytes(key))
        except Exception:  # a broken workspace admits no one, and must not kill the ZAP thread
            log.exception("cannot read the scientist allow-list; refusing %s", bytes(key)[:8])
            return False
        if name is None:
            # A refused client keeps reconnecting: say it once per key, not every 100 ms.
            if bytes(key) not in self._refused and len(self._refused) < 10_000:
                self._refused.add(bytes(key))
                log.warning("refused an unknown CURVE key %s", bytes(key).decode("ascii", "replace"))
            return False
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[bytes(key)] = name
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        return z85.encode(client_public_key).decode("ascii")


class _Request:
    """One decoded request, who sent it (``key``, and the ``scientist`` the allow-list names), and what the
    edge already knows: ``first`` message of its connection, a ``refusal`` decided there, messages of its key
    ``throttled`` (dropped) before it, whether it ``holds_slot`` of the in-flight limit, audit ``notes``."""

    __slots__ = ("identity", "key", "scientist", "kind", "msg_id", "body", "cancel", "first", "refusal",
                 "throttled", "holds_slot", "notes", "plan_checked")

    def __init__(self, identity: bytes, key: str, scientist: str, kind: str, msg_id: str, body: dict, *,
                 first: bool = False, refusal: BastionError | None = None, throttled: dict | None = None,
                 holds_slot: bool = True, notes: dict | None = None):
        self.identity, self.key, self.scientist = identity, key, scientist
        self.kind, self.msg_id, self.body = kind, msg_id, body
        # Set by the scientist's ``cancel``; the query's worker stops waiting for polars.
        self.cancel = threading.Event()
        self.first, self.refusal, self.throttled = first, refusal, throttled
        self.holds_slot, self.notes = holds_slot, notes or {}
        # True once the body passed _check_content: its plan can be hashed, stored and audited.
        self.plan_checked = False


class _Unanswered(Exception):
    """A request whose audit entry could not be written: it gets no answer (the owner's log says why)."""


class RefusalBudget:
    """Each key's allowance of refused requests: a token bucket of ``limit`` tokens, refilled at
    ``limit`` a minute (``max_refusals_per_minute``, :mod:`owner_console.limits`).  Thread-safe.

    :meth:`check` says what to do with a key's next message: ``"serve"`` it, ``"refuse"`` it (the first
    message after the allowance ran out: answered ``LimitExceeded``, audited) or ``"drop"`` it (unanswered,
    unprocessed, counted).  With ``"serve"`` comes, once, the count of messages dropped before, for the
    ``throttled`` audit entry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [tokens, refilled at (monotonic), refused since empty, dropped, first and last drop (UTC)]
        self._keys: dict[str, list] = {}

    def _state(self, key: str, limit: int, now: float) -> list:
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= 10_000:  # forget keys that are back to a full allowance
                self._keys = {k: s for k, s in self._keys.items() if s[0] < limit or s[3]}
            state = self._keys[key] = [float(limit), now, False, 0, None, None]
        state[0] = min(float(limit), state[0] + (now - state[1]) * limit / 60.0)
        state[1] = now
        return state

    def check(self, key: str, limit: int) -> tuple[str, dict | None]:
        with self._lock:
            state = self._state(key, limit, time.monotonic())
            if state[0] >= 1.0:
                state[2] = False
                return "serve", self._take_dropped(state, limit)
            if not state[2]:
                state[2] = True
                return "refuse", None
            moment = utc_now()
            state[3] += 1
            state[4] = state[4] or moment
            state[5] = moment
            return "drop", None

    def spend(self, key: str, limit: int) -> None:
        """One refusal of ``key``."""
        with self._lock:
            state = self._state(key, limit, time.monotonic())
            state[0] = max(0.0, state[0] - 1.0)

    def drain(self, limit: int) -> dict[str, dict]:
        """Every key's count of dropped messages not yet reported (at shutdown)."""
        with self._lock:
            found = {key: self._take_dropped(state, limit) for key, state in self._keys.items()}
        return {key: dropped for key, dropped in found.items() if dropped}

    @staticmethod
    def _take_dropped(state: list, limit: int) -> dict | None:
        if not state[3]:
            return None
        dropped = {"dropped": state[3], "first_dropped_at": state[4], "last_dropped_at": state[5],
                   "limit": "max_refusals_per_minute", "max_refusals_per_minute": limit}
        state[3], state[4], state[5] = 0, None, None
        return dropped




class ExecutorServer:
    """The executor: serves one workspace's datasets to its allow-listed scientists.

    Parameters
    ----------
    workspace : Workspace
        An initialised workspace.
    bind : str, optional
        ZeroMQ endpoint; defaults to the workspace's ``config.toml``.  A
        ``tcp://127.0.0.1:*`` endpoint picks a free port (see :attr:`endpoint`).
    query_workers, quick_workers : int
        Threads (and so at most as many worker processes at once) for
        ``fetch``/``save`` queries, and threads for everything else.
    """

    def __init__(self, workspace: Workspace, bind: str | None = None, query_workers: int = 4,
                 quick_workers: int = 2):
        from owner_console.workers import QueryWorkers  # imported late: a workspace CLI needs no engine
        self.workspace = workspace.require()
        # Queries run in worker processes; quick requests and DP plans in this one.
        self._executor = QueryWorkers(self.workspace.dataset_cache_dir, size=query_workers)
        self.bind = bind or workspace.bind
        self.endpoint: str | None = None
        self.store = workspace.approvals()
        self.audit = workspace.audit_log()
        self._stop = threading.Event()
        self._query_workers, self._quick_workers = query_workers, quick_workers
        self._context: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._replies: zmq.Socket | None = None
        self._auth: AllowListAuthenticator | None = None
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._reply_address = f"inproc://bastion-replies-{uuid.uuid4().hex}"
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self._seen: set[tuple[str, bytes]] = set()
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()
        self._logged_catalog_errors: set[str] = set()
        self.saved = SavedResults(self.workspace.path / "saved")
        # Queries queued or running, by (scientist, envelope id), for ``cancel``.
        self._running: dict[tuple[str, str], list[_Request]] = {}
        self._running_lock = threading.Lock()
        self._logged_limit_error = False
        self._allow = AllowList(self.workspace)
        self._refusals = RefusalBudget()
        # Releases of approved results, one at a time: an approval is released once (see _release_approved).
        self._release_lock = threading.Lock()
        self._limits_cache: tuple[tuple[int, int, int], float, Limits] | None = None
        self._handlers: dict[str, Callable[[_Request], list[bytes]]] = {
            "hello": self._hello,
            "datasets": self._datasets,
            "schema": self._schema,
            "fetch": self._fetch,
            "request_status": self._request_status,
            "save": self._save,
            "cancel": self._cancel,
            "dp_preview": self._dp_preview,
            "budget": self._budget,
        }

    # -- life cycle --------------------------------------------------------
    def start(self) -> str:
        """Bind the sockets and start the authenticator; returns the bound endpoint."""
        context = zmq.Context()
        self._context = context
        self._auth = AllowListAuthenticator(context, self.workspace, self._allow)
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self._auth)

        public, secret = self.workspace.server_keys()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, secret)
        router.setsockopt(zmq.CURVE_PUBLICKEY, public)
        try:
            router.bind(self.bind)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            self._close()
            raise OSError(f"cannot bind {self.bind}: {exc}") from None
        self._router = router
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sweep_expired()

        replies = context.socket(zmq.PULL)
        replies.setsockopt(zmq.LINGER, 0)
        replies.bind(self._reply_address)
        self._replies = replies
        self._pools = (ThreadPoolExecutor(self._query_workers, thread_name_prefix="bastion-query"),
                       ThreadPoolExecutor(self._quick_workers, thread_name_prefix="bastion-quick"))
        self._executor.warm()
        return self.endpoint

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return; safe from a signal handler or another thread."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`, then close everything (running queries finish first)."""
        if self._router is None:
            self.start()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    events = dict(poller.poll(POLL_MS))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EINTR:
                        continue
                    raise
                if self._replies in events:
                    self._forward_replies()
                if self._router in events:
                    self._receive()
        finally:
            self._close()

    def _close(self) -> None:
        if self._pools is not None:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools = None
        self._report_throttled()
        self._executor.close()
        with self._push_lock:
            for sock in self._push_sockets:
                sock.close(linger=0)
            self._push_sockets.clear()
        for sock in (self._replies, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._replies = self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None
        self.store.close()

    def _report_throttled(self) -> None:
        """The ``throttled`` entries not yet written (keys that stayed away after being throttled)."""
        for key, dropped in self._refusals.drain(self._limits().max_refusals_per_minute).items():
            try:
                self.audit.append("throttled", self._name_for_audit(key), key=key, **dropped)
            except Exception:
                log.exception("cannot write the audit log")

    # -- the loop thread ---------------------------------------------------
    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._router.send_multipart(frames, copy=False)

    def _receive(self) -> None:
        for _ in range(RECEIVE_BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(frames)

    def _accept(self, frames: list[zmq.Frame]) -> None:
        identity, parts = frames[0].bytes, frames[1:]
        key = parts[0].get("User-Id") if parts else None
        if not key:
            # CURVE plus ZAP always sets it; without it nobody can be held to account.
            log.error("dropped a message without an authenticated identity")
            return
        limit = self._limits().max_refusals_per_minute
        verdict, dropped = self._refusals.check(key, limit)
        if verdict == "drop":
            return  # counted; reported in one ``throttled`` entry when the key is served again
        scientist = self._allowed_name(key)
        first = (key, identity) not in self._seen
        if first:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen.add((key, identity))
        salvaged = _salvage_id(parts[0].bytes) if parts else UNREADABLE_ID

        def refuse(msg_id: str, error: BastionError, kind: str = "?", **notes: Any) -> None:
            if verdict == "serve":
                self._refusals.spend(key, limit)  # now, not when audited: a burst cannot outrun the allowance
            name = scientist or self._name_for_audit(key)
            self._pools[1].submit(self._run, _Request(identity, key, name, kind, msg_id, {}, first=first,
                                                      refusal=error, throttled=dropped, holds_slot=False,
                                                      notes={"key": key, **notes} if scientist is None else notes))

        if verdict == "refuse":
            refuse(salvaged, BastionError("LimitExceeded", f"too many refused requests: this key may make at most "
                                                           f"{limit} a minute; its messages are dropped until "
                                                           "then", limit="max_refusals_per_minute"))
            return
        if scientist is None:
            refuse(salvaged, BastionError("AuthenticationError", "this key is no longer allowed: the owner "
                                                                 "removed or replaced it"))
            return
        if len(parts) != 1:
            refuse(salvaged, BastionError("ProtocolError", f"a request is one frame (the envelope); got {len(parts)} "
                                                           "frames"))
            return
        data = parts[0].bytes
        try:
            kind, msg_id, body = protocol.decode(data, protocol.REQUEST_KINDS)
        except ProtocolError as exc:
            refuse(salvaged, BastionError("ProtocolError", str(exc)))
            return
        if ID_PATTERN.fullmatch(msg_id) is None:
            refuse(UNREADABLE_ID, BastionError("ProtocolError", "envelope id must be 1 to 128 printable ASCII "
                                                                "characters"), kind, id_sent=ascii(msg_id)[:300])
            return
        try:
            _check_body(kind, body)
        except ProtocolError as exc:
            refuse(msg_id, BastionError("ProtocolError", str(exc)), kind)
            return
        if not self._admit(scientist):
            refuse(msg_id, BastionError("LimitExceeded", "too many requests at once; wait for earlier answers and "
                                                         "try again", limit="in_flight"), kind)
            return
        request = _Request(identity, key, scientist, kind, msg_id, body, first=first, throttled=dropped)
        if kind in QUERY_KINDS:
            with self._running_lock:
                self._running.setdefault((scientist, msg_id), []).append(request)
        pool = self._pools[0] if kind in QUERY_KINDS else self._pools[1]
        pool.submit(self._run, request)

    def _allowed_name(self, key: str) -> str | None:
        """The scientist the allow-list names for this key now; None if none, or if it cannot be read
        (a broken allow-list admits no one, and must not stop the loop)."""
        try:
            return self._allow.name_of(key)
        except Exception:
            log.exception("cannot read the scientist allow-list; refusing %s", key[:8])
            return None

    def _name_for_audit(self, key: str) -> str | None:
        """The scientist a key belongs to, or belonged to when it was admitted (a revoked key)."""
        name = self._allowed_name(key)
        if name is None and self._auth is not None:
            name = self._auth.admitted_name(key)
        return name

    def _admit(self, scientist: str) -> bool:
        with self._in_flight_lock:
            mine = self._in_flight.get(scientist, 0)
            if mine >= MAX_IN_FLIGHT_PER_SCIENTIST or sum(self._in_flight.values()) >= MAX_IN_FLIGHT:
                return False
            self._in_flight[scientist] = mine + 1
            return True

    def _release_slot(self, scientist: str) -> None:
        with self._in_flight_lock:
            left = self._in_flight.get(scientist, 1) - 1
            if left > 0:
                self._in_flight[scientist] = left
            else:
                self._in_flight.pop(scientist, None)

    # -- worker threads ----------------------------------------------------
    def _send(self, frames: list[bytes]) -> None:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._reply_address)
            with self._push_lock:
                self._push_sockets.append(sock)
            self._local.push = sock
        sock.send_multipart(frames, copy=False)

    def _run(self, request: _Request) -> None:
        try:
            frames = self._answer(request)
            if not frames:
                return
            if request.refusal is None and self._allowed_name(request.key) != request.scientist:
                self._withhold(request)
                return
            self._send([request.identity, *frames])
        finally:
            if request.kind in QUERY_KINDS and request.refusal is None:
                self._forget_running(request)
            if request.holds_slot:
                self._release_slot(request.scientist)

    def _answer(self, request: _Request) -> list[bytes] | None:
        """The reply frames, each with its audit entry on disk; None: nothing (more) to send."""
        try:
            self._audit_arrival(request)
            if request.refusal is not None:
                raise request.refusal
            self._check_content(request)
            return self._handlers[request.kind](request)
        except _Unanswered:
            return None
        except BastionError as exc:
            try:
                return self._refused(request, exc)
            except _Unanswered:
                return None
        except Exception:
            try:
                return [protocol.encode("error", self._internal_error(request), request.msg_id)]
            except _Unanswered:
                return None

    def _audit(self, request: _Request, entries: list[tuple[str, str | None, dict]]) -> None:
        """Write ``entries`` (fsynced) or raise :class:`_Unanswered`: no answer goes out without them."""
        try:
            self.audit.append_many(entries)
        except Exception:
            log.exception("cannot write the audit log: request %s (%s from %s) is left unanswered",
                          request.msg_id, request.kind, request.scientist)
            raise _Unanswered() from None

    def _audit_arrival(self, request: _Request) -> None:
        """The ``connection`` entry of a connection's first message, and the ``throttled`` count before it."""
        entries = []
        if request.throttled:
            entries.append(("throttled", request.scientist, {"key": request.key, **request.throttled}))
        if request.first:
            entries.append(("connection", request.scientist, {"key": request.key}))
        if entries:
            self._audit(request, entries)

    def _refused(self, request: _Request, exc: BastionError) -> list[bytes]:
        """Audit a refusal (unless its handler did) and count it against the key's allowance; the reply."""
        if not getattr(exc, "audited", False):
            fields: dict[str, Any] = {"request": request.msg_id, "kind": request.kind, "ename": exc.ename,
                                      "evalue": exc.evalue, **request.notes, **_owner_details(exc)}
            if request.plan_checked and "plan" in request.body:
                fields["plan"] = request.body["plan"]  # kept once by its hash (owner_console.audit)
            self._audit(request, [("refusal", request.scientist, fields)])
        if request.refusal is None:  # (an edge refusal was counted when it arrived)
            self._refusals.spend(request.key, self._limits().max_refusals_per_minute)
        return [protocol.encode("error", exc.body(), request.msg_id)]

    def _withhold(self, request: _Request) -> None:
        """A reply computed for a key revoked while it ran: not sent, and audited as refused."""
        log.warning("withheld the reply to %s (%s): the key of %s was revoked while it ran", request.msg_id,
                    request.kind, request.scientist)
        try:
            self.audit.append("refusal", request.scientist, request=request.msg_id, kind=request.kind,
                              ename="AuthenticationError", key=request.key,
                              evalue="the reply was withheld: the owner removed or replaced this key while the "
                                     "request ran")
        except Exception:
            log.exception("cannot write the audit log")

    def _check_content(self, request: _Request) -> None:
        """Every string in the body is Unicode text, every number in it is finite, the plan is not too large.

        Raises ``ProtocolError`` (a lone UTF-16 surrogate) or ``LimitExceeded`` (a number such as ``1e400``
        that no 64-bit float holds; a plan over :data:`MAX_PLAN_BYTES`), naming where.
        """
        try:
            json.dumps(request.body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            raise _content_error(request.body) from None
        plan = request.body.get("plan")
        if plan is not None:
            size = len(canonical_json(plan))
            if size > MAX_PLAN_BYTES:
                request.notes["plan_bytes"] = size
                raise BastionError("LimitExceeded", f"the plan is {size:,} bytes of JSON; the executor takes plans "
                                                    f"of at most {MAX_PLAN_BYTES:,} bytes",
                                   limit="max_plan_bytes", max_bytes=MAX_PLAN_BYTES)
            request.plan_checked = True

    def _forget_running(self, request: _Request) -> None:
        key = (request.scientist, request.msg_id)
        with self._running_lock:
            running = self._running.get(key, [])
            if request in running:
                running.remove(request)
            if not running:
                self._running.pop(key, None)

    def _internal_error(self, request: _Request, **audit_fields: Any) -> dict:
        """Log an unexpected failure for the owner; the scientist gets a reference only.

        Raises :class:`_Unanswered` when its ``error`` entry cannot be written.
        """
        reference = uuid.uuid4().hex[:12]
        log.exception("request %s (%s from %s) failed; reference %s",
                      request.msg_id, request.kind, request.scientist, reference)
        self._audit(request, [("error", request.scientist, {"request": request.msg_id, "kind": request.kind,
                                                            "reference": reference, **audit_fields})])
        return protocol.error_body("ExecutionError",
                                   f"the executor could not complete this request; the owner can look "
                                   f"it up in the executor's log under reference {reference}",
                                   reference=reference)

    def _catalog(self, scientist: str | None = None) -> dict:
        """The owner's datasets; with ``scientist``, plus that scientist's own saved results.

        Saved results are never in another scientist's catalog, so their names
        fail exactly like names that do not exist.  A dataset shadows a saved
        result of the same name (``save`` refuses dataset names).
        """
        catalog, errors = self.workspace.catalog_with_errors()
        for error in errors:
            if str(error) not in self._logged_catalog_errors:
                self._logged_catalog_errors.add(str(error))
                log.error("skipping a dataset: %s", error)
        if scientist is None:
            return catalog
        return {**self.saved.catalog(scientist), **catalog}

    def _limits(self) -> Limits:
        """The workspace's limits, re-read when ``config.toml`` changed (defaults if it is broken).

        Checked on every message, so a ``stat`` decides; a file changed within
        :data:`AllowList.RACY_SECONDS` of its last read is read again (a second
        change in the same clock tick would not move its time).
        """
        try:
            stat = os.stat(self.workspace.config_path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            cached = self._limits_cache
            if cached is not None and cached[0] == stamp and \
                    cached[1] - stat.st_mtime_ns / 1e9 >= AllowList.RACY_SECONDS:
                return cached[2]
            read_at = time.time()
            limits = limits_from_config(self.workspace.config)
            self._limits_cache = (stamp, read_at, limits)
            return limits
        except Exception as exc:  # a typo in config.toml must not stop the executor
            if not self._logged_limit_error:
                self._logged_limit_error = True
                log.error("using the default limits: %s", exc)
            return Limits()

    # -- handlers: each returns the reply frames (envelope [+ table]) ------
    def _hello(self, request: _Request) -> list[bytes]:
        return [_ok(request, {"scientist": request.scientist, "server_version": server_version(),
                              "plan_version": PLAN_VERSION})]

    def _datasets(self, request: _Request) -> list[bytes]:
        owners = self._catalog()
        catalog = self._catalog(request.scientist)
        mocked = set(self.workspace.mocks())
        described = []
        for name in sorted(catalog):
            saved = name not in owners
            try:
                schema = self._executor.schema_of(frame_op("saved", name=name) if saved else scan(name), catalog,
                                                  scientist=request.scientist)
            except Exception as exc:  # an unreadable file hides that dataset, not the others
                log.error("dataset %r is unavailable: %s", name, exc)
                continue
            # the policy as it applies to this scientist: no other scientist's overrides
            entry = {"name": name, "schema": [list(pair) for pair in schema],
                     "policy": catalog[name].policy.for_scientist(request.scientist).to_dict()}
            if getattr(catalog[name], "dp", None) is not None:
                entry["dp"] = catalog[name].dp.describe()
            if not saved and name in mocked:
                entry["mock"] = True  # dataset(name, mock=True) reads the owner's mock of it
            if saved:
                record = self.saved.record(request.scientist, name) or {}
                entry.update(saved=True, sources=record.get("sources", []))
            described.append(entry)
        return [_ok(request, {"datasets": described})]

    def _dp_preview(self, request: _Request) -> list[bytes]:
        """The cost and expected error of a differentially private query (spends nothing, reveals no data)."""
        from owner_console import dp
        plan, reads_mock = mock.route(request.body["plan"])
        if reads_mock:
            raise BastionError("PolicyViolation", "this query reads mock data: it has no privacy cost (use .fetch())")
        catalog = self._executor.for_scientist(self._catalog(request.scientist), request.scientist)
        if not dp.touches_dp(plan, catalog):
            raise BastionError("PolicyViolation", "this query reads no differentially private dataset: it has "
                                                  "no privacy cost (use .fetch())")
        return [_ok(request, dp.preview(plan, catalog, request.scientist))]

    def _budget(self, request: _Request) -> list[bytes]:
        """The scientist's own privacy budget on every DP dataset."""
        from owner_console import dp
        return [_ok(request, {"datasets": dp.budget(self._catalog(), request.scientist)})]

    def _schema(self, request: _Request) -> list[bytes]:
        plan, reads_mock = mock.route(request.body["plan"])
        if reads_mock:
            catalog = mock.mock_catalog({name: record["path"] for name, record in self.workspace.mocks().items()},
                                        self._catalog(), request.scientist)
        else:
            catalog = self._catalog(request.scientist)
        schema = self._executor.schema_of(plan, catalog, scientist=request.scientist)
        return [_ok(request, {"schema": [list(pair) for pair in schema]})]

    def _save(self, request: _Request) -> list[bytes]:
        """Run the plan and keep its table as the scientist's saved result (nothing is released)."""
        plan = request.body["plan"]
        text = request.body.get("text", "")
        digest = plan_hash(plan)
        self.audit.append("query", request.scientist, request=request.msg_id, plan=plan,
                          plan_hash=digest, text=text, save_as=str(request.body["name"])[:64])
        try:
            plan, reads_mock = mock.route(plan)
            if reads_mock:
                raise BastionError("PolicyViolation", "a query of mock data cannot be saved: save() keeps results "
                                                      "of the real data on the owner's side; fetch() the mock query "
                                                      "instead")
            name = check_saved_name(request.body["name"])
            owners = self._catalog()
            if name in owners:
                raise BastionError("SchemaError", f"{name!r} is the name of a dataset; save under another name")
            catalog = self._catalog(request.scientist)
            table, inherited = self._executor.prepare_save(plan, catalog, cancel=request.cancel,
                                                           timeout=self._limits().query_timeout_seconds,
                                                           scientist=request.scientist)
        except BastionError:
            raise  # audited as a refusal by _answer
        except Exception:
            return [protocol.encode("error", self._internal_error(request, plan_hash=digest), request.msg_id)]
        sources = self._lineage(plan, request.scientist, owners)
        _, record = self.saved.save(request.scientist, name, table, inherited, sources=sources,
                                    plan_hash=digest, text=text)
        self.audit.append("save", request.scientist, request=request.msg_id, plan_hash=digest, name=name,
                          rows=record["rows"], columns=[c for c, _ in record["columns"]],
                          sha256=record["sha256"], policy=record["policy"], sources=record["sources"])
        schema = self._executor.schema_of(frame_op("saved", name=name), self._catalog(request.scientist),
                                          scientist=request.scientist)
        return [_ok(request, {"name": name, "schema": [list(pair) for pair in schema],
                              "policy": inherited.to_dict()})]

    def _lineage(self, plan: dict, scientist: str, owners: dict) -> list[str]:
        """The owner's datasets a (validated) plan reads, through the saved results it reads."""
        found: set[str] = set()
        for name in walk.source_names(plan):
            if name in owners:
                found.add(name)
            else:
                found.update((self.saved.record(scientist, name) or {}).get("sources", []))
        return sorted(found)

    def _cancel(self, request: _Request) -> list[bytes]:
        """Cancel one of the scientist's own queued or running ``fetch``/``save`` requests."""
        target = request.body["target"]
        with self._running_lock:
            running = list(self._running.get((request.scientist, target), ()))
        for query in running:
            query.cancel.set()
        self.audit.append("cancel", request.scientist, request=request.msg_id, target=target[:128],
                          found=bool(running))
        if not running:
            # The same answer for "finished", "never sent" and "someone else's".
            error = BastionError("NotFound", f"no running request {target[:128]!r} to cancel", target=target[:128])
            error.audited = True  # the cancel entry above says it was not found
            raise error
        return [_ok(request, {"target": target, "cancelled": True})]

    def _fetch(self, request: _Request) -> list[bytes] | None:
        plan = request.body["plan"]
        text = request.body.get("text", "")
        digest = plan_hash(plan)
        queried: list[bool] = []

        def audit_query(**fields: Any) -> None:
            if not queried:
                self.audit.append("query", request.scientist, request=request.msg_id, plan=plan, plan_hash=digest,
                                  text=text, **fields)
                queried.append(True)

        runnable, reads_mock = mock.route(plan)
        if reads_mock:
            return self._fetch_mock(request, runnable, digest, lambda: audit_query(mock=True))
        catalog = self._catalog(request.scientist)
        version = data_version(plan, catalog, request.scientist)
        earlier = self._earlier(request, digest, version)
        if earlier is not None:
            audit_query()
            answer = self._answer_from(request, earlier)
            if answer is not _NEW_REVIEW:
                return answer
        try:
            # The fsynced ``query`` entry is written while the worker computes; it is on disk before any
            # refusal, decision or release of this request is written, and before anything is sent.
            outcome = self._executor.evaluate(
                runnable, catalog, request.scientist, cancel=request.cancel,
                timeout=self._limits().query_timeout_seconds, on_started=audit_query)
            _check_rows_released(outcome.table.height, self._limits().max_rows_released)
        except BastionError:
            raise  # audited as a refusal by _answer, after the query entry
        except Exception:
            return [protocol.encode("error", self._internal_error(request, plan_hash=digest), request.msg_id)]
        decision = outcome.decision
        decided = ("decision", request.scientist, {"request": request.msg_id, "plan_hash": digest,
                                                   "action": decision.action, "reason": decision.reason,
                                                   "detail": decision.detail, "sources": list(decision.sources)})
        if not isinstance(outcome, Released):
            self.audit.append_many([decided])
        ipc = outcome.ipc if outcome.ipc is not None else self._executor.table_to_ipc(outcome.table)
        columns = _table_schema(outcome.table)
        if isinstance(outcome, Released):
            sha = hashlib.sha256(ipc).hexdigest()
            # The decision and its release in one locked, fsynced write: on disk before the result leaves.
            self.audit.append_many([decided, ("release", request.scientist, {
                "request": request.msg_id, "plan_hash": digest, "request_id": None, "sha256": sha,
                "rows": outcome.table.height, "columns": [name for name, _ in columns]})])
            body = {"schema": columns, "rows": outcome.table.height, "notes": list(outcome.notes),
                    "request_id": None, "decision": {"action": decision.action, "reason": decision.reason}}
            return [protocol.encode("result", body, request.msg_id), ipc]
        if not isinstance(outcome, Held):
            raise TypeError(f"evaluate returned {type(outcome).__name__}")
        request_id = self._hold(request, plan, text, outcome, ipc, columns, version)
        self.audit.append("held", request.scientist, request=request.msg_id, plan_hash=digest,
                          request_id=request_id, reason=decision.reason, rows=outcome.table.height,
                          sha256=hashlib.sha256(ipc).hexdigest())
        return [protocol.encode("pending", {"request_id": request_id, "status": "pending",
                                            "reason": decision.reason}, request.msg_id)]

    def _earlier(self, request: _Request, digest: str, version: str) -> Request | None:
        """This key's latest request for the same plan on the same data version, if it can answer a re-run.

        Pending (its id, no new review), rejected (the rejection), approved
        and not expired, or released and still serving re-releases (see
        :func:`owner_console.approvals.serves_again`); None: a new review.
        """
        record = self.store.latest_for(request.scientist, request.key, digest, version)
        if record is None:
            return None
        ttl = self.workspace.approval_ttl_seconds
        if record.status in ("pending", "rejected"):
            return record
        if record.status == "approved":
            return None if is_expired(record, ttl) else record
        if record.status == "released" and (interrupted_release(record)
                                            or serves_again(record, ttl, self.workspace.approval_reuse)):
            return record
        return None

    def _answer_from(self, request: _Request, record: Request) -> Any:
        """A re-run answered from ``record`` (see :meth:`_earlier`); :data:`_NEW_REVIEW` when it no longer can."""
        if record.status == "pending":
            self.audit.append("held", request.scientist, request=request.msg_id, plan_hash=record.plan_hash,
                              request_id=record.id, again=True)
            return [protocol.encode("pending", {"request_id": record.id, "status": "pending",
                                                "reason": record.reason}, request.msg_id)]
        if record.status == "rejected":
            raise BastionError("ReviewRejected",
                               f"the owner rejected this query as request {record.id}: {record.decision_reason}; "
                               "change the query to ask again",
                               request_id=record.id, reason=record.decision_reason)
        try:
            return self._release_approved(request, record)
        except BastionError as exc:
            if exc.ename != "NotFound":
                raise
            return _NEW_REVIEW  # expired, withdrawn or used up meanwhile: the query goes to review again

    def _fetch_mock(self, request: _Request, plan: dict, digest: str, audit_query: Callable[[], None]) -> list[bytes]:
        """Run a plan over the published mocks only and release it at once, marked as mock."""
        published = self.workspace.mocks()
        owners = self._catalog()
        catalog = mock.mock_catalog({name: record["path"] for name, record in published.items()}, owners,
                                    request.scientist)
        missing = sorted(walk.source_names(plan) - set(catalog))
        if missing:
            raise BastionError("SchemaError", f"the owner published no mock of {missing[0]!r}; datasets() marks the "
                                              "datasets that have one", dataset=missing[0])
        try:
            outcome = self._executor.evaluate(plan, catalog, request.scientist, cancel=request.cancel,
                                              timeout=self._limits().query_timeout_seconds, on_started=audit_query)
            _check_rows_released(outcome.table.height, self._limits().max_rows_released)
            if not isinstance(outcome, Released):
                raise TypeError(f"a mock query was {type(outcome).__name__}, not released")
        except BastionError:
            raise  # audited as a refusal by _answer, after the query entry
        except Exception:
            return [protocol.encode("error", self._internal_error(request, plan_hash=digest), request.msg_id)]
        ipc = outcome.ipc if outcome.ipc is not None else self._executor.table_to_ipc(outcome.table)
        columns = _table_schema(outcome.table)
        notes = mock.notes(request.body["plan"], {name: record.get("origin", "generated")
                                                  for name, record in published.items()})
        self._audit(request, [("release", request.scientist, {
            "request": request.msg_id, "plan_hash": digest, "request_id": None, "mock": True,
            "sha256": hashlib.sha256(ipc).hexdigest(), "rows": outcome.table.height,
            "columns": [name for name, _ in columns]})])
        body = {"schema": columns, "rows": outcome.table.height, "notes": notes + list(outcome.notes),
                "request_id": None, "mock": True, "decision": {"action": "mock", "reason": notes[0] if notes else ""}}
        return [protocol.encode("result", body, request.msg_id), ipc]

    def _hold(self, request: _Request, plan: dict, text: str, outcome: Held, ipc: bytes,
              columns: list[list[str]], version: str = "") -> int:
        """Keep a held table in ``results/<id>.arrow`` and queue it for the owner."""
        from bastion_kernel.contract.plan_text import plan_to_polars_text, plan_tree

        def write_result(request_id: int) -> str:
            atomic_write(self.workspace.result_path(request_id), ipc, mode=0o600)
            return hashlib.sha256(ipc).hexdigest()

        return self.store.create(scientist=request.scientist, plan=plan,
                                 plan_text=plan_to_polars_text(plan), plan_tree=plan_tree(plan),
                                 query_text=text, reason=outcome.decision.reason,
                                 detail=outcome.decision.detail, columns=columns,
                                 rows=outcome.table.height, notes=list(outcome.notes),
                                 write_result=write_result, scientist_key=request.key, data_version=version)

    def _request_status(self, request: _Request) -> list[bytes]:
        request_id = request.body["request_id"]
        record = self.store.get(request_id) if 0 < request_id < 2**63 else None
        if record is None or record.scientist != request.scientist or \
                record.scientist_key not in ("", request.key):
            # The same answer for "no such id", "someone else's" and "asked with a key since replaced".
            raise BastionError("NotFound", f"no request {request_id}", request_id=request_id)
        if record.status == "pending":
            return [protocol.encode("pending", {"request_id": record.id, "status": "pending",
                                                "reason": record.reason}, request.msg_id)]
        if record.status == "rejected":
            raise BastionError("ReviewRejected",
                               f"the owner rejected request {record.id}: {record.decision_reason}",
                               request_id=record.id, reason=record.decision_reason)
        ttl = self.workspace.approval_ttl_seconds
        used_up = record.status == "released" and not interrupted_release(record) and \
            not serves_again(record, ttl, self.workspace.approval_reuse)
        if is_expired(record, ttl) or used_up:
            self._sweep_expired()
            raise self._no_more_releases(record)
        return self._release_approved(request, record)

    def _no_more_releases(self, record: Request) -> BastionError:
        """Why an approved request serves no (more) release: its approval expired, or served its one release."""
        ttl = self.workspace.approval_ttl_seconds
        if record.status == "released" and effective_reuse(record, self.workspace.approval_reuse) == "once":
            return BastionError("NotFound", f"request {record.id} was already released: the owner approved it for "
                                            "one release; send the query again for a new review",
                                request_id=record.id, status="released")
        deadline = expires_at(record, ttl)
        return BastionError("NotFound",
                            f"the owner's approval of request {record.id} expired at "
                            f"{deadline.isoformat(timespec='seconds') if deadline else '?'} (approved results "
                            f"are kept for {describe_seconds(ttl)}); send the query again for a new review",
                            request_id=record.id, status="expired")

    def _sweep_expired(self) -> None:
        """Expire stale approvals and delete their held results (see :func:`approvals.sweep_expired`)."""
        try:
            sweep_expired(self.store, self.audit, self.workspace.approval_ttl_seconds, self.workspace.result_path,
                          self.workspace.approval_reuse)
        except Exception:  # a failed sweep must not fail the request; the next one retries
            log.exception("cannot expire stale approvals")

    def _release_approved(self, request: _Request, record: Request) -> None:
        """Send an approved result: its ``release`` entry, the approval consumed, the rows, the release finished.

        A request already released is sent again while its approval serves
        re-releases (a ``rerelease`` entry; nothing is consumed), else
        ``NotFound`` says why not.

        Each step is durable before the next: the entry is fsynced, the
        approval is consumed without a ``released_at``
        (:meth:`ApprovalStore.begin_release`), the rows are handed to the
        socket, then ``released_at`` is set.  A crash before the approval is
        consumed leaves it approved; a crash after leaves an interrupted
        release: either way the scientist who asked gets the rows by asking
        again, with a new ``release`` entry.  So no approval is consumed
        without its rows being handed over, and no rows leave without an
        entry.  Sends the reply itself (returns None).
        """
        with self._release_lock:  # two polls of one request: the second finds it released
            asked = record.id
            record = self.store.get(asked)
            if record is None or record.status not in ("approved", "released"):
                raise BastionError("NotFound", f"request {asked} is no longer approved", request_id=asked)
            again = record.status == "released" and not interrupted_release(record)
            if again and not serves_again(record, self.workspace.approval_ttl_seconds,
                                          self.workspace.approval_reuse):
                self._sweep_expired()  # its table is no longer needed
                raise self._no_more_releases(record)
            try:
                ipc = self.workspace.result_path(record.id).read_bytes()
            except FileNotFoundError:
                if record.status == "approved":
                    raise
                raise BastionError("NotFound", f"the approved result of request {record.id} is no longer kept; "
                                               "send the query again for a new review",
                                   request_id=record.id, status="released") from None
            sha = hashlib.sha256(ipc).hexdigest()
            if sha != record.result_sha256:
                # Not what the owner reviewed: never release it.
                raise RuntimeError(f"held result {record.id} changed on disk since it was reviewed")
            if self._allowed_name(request.key) != request.scientist:
                raise BastionError("AuthenticationError", "this key is no longer allowed: the owner removed or "
                                                          "replaced it")
            notes = list(record.notes)
            if again:
                notes.append(f"the owner approved this query as request {record.id} on "
                             f"{record.decided_at[:10] if record.decided_at else '?'}: this is the approved result, "
                             "sent again")
            body = {"schema": record.columns, "rows": record.rows, "notes": notes,
                    "request_id": record.id,
                    "decision": {"action": "approved", "reason": record.decision_reason or ""}}
            frames = [protocol.encode("result", body, request.msg_id), ipc]
            self._audit(request, [("rerelease" if again else "release", request.scientist, {
                "request": request.msg_id, "plan_hash": record.plan_hash, "request_id": record.id, "sha256": sha,
                "rows": record.rows, "columns": [name for name, _ in record.columns],
                **({"again": "an earlier release was interrupted"} if interrupted_release(record) else {})})])
            if record.status == "approved":
                try:
                    self.store.begin_release(record.id)
                except ApprovalError:  # expired or withdrawn by the owner meanwhile
                    raise BastionError("NotFound", f"request {record.id} is no longer approved",
                                       request_id=record.id) from None
            self._send([request.identity, *frames])
            if again:
                return None
            try:
                self.store.finish_release(record.id)
            except Exception:  # the rows left: no second answer; the release stays open, so it is sent again
                log.exception("request %s was sent but its release cannot be recorded as finished; its "
                              "scientist gets it again when they ask (each copy has its release entry)", record.id)
        return None


# What _answer_from returns when an earlier request can no longer answer a re-run.
_NEW_REVIEW = object()


def data_version(plan: Any, catalog: dict, scientist: str) -> str:
    """The identity of the data a plan reads: each source's file version and policy, hashed ("" if unknown).

    A source's version is its resolved path, size and modification time (as
    :class:`owner_console.engine.DatasetCache` keys its copies), with the
    policy (and DP policy) that applies to ``scientist``: a replaced file or
    a changed policy is a new version, and an approval of the old one does
    not answer the query on the new one.
    """
    parts = []
    for name in sorted(walk.source_names(plan)):
        dataset = catalog.get(name)
        if dataset is None:
            return ""
        try:
            path = Path(dataset.path).resolve()
            stat = path.stat()
        except OSError:
            return ""
        parts.append([name, str(path), stat.st_size, stat.st_mtime_ns,
                      dataset.policy.for_scientist(scientist).to_dict(),
                      dataset.dp.to_dict() if getattr(dataset, "dp", None) is not None else None])
    return hashlib.sha256(canonical_json(parts)).hexdigest() if parts else ""


def _check_rows_released(rows: int, limit: int) -> None:
    """Refuse a result over the workspace's row limit (before it is held or sent)."""
    if rows > limit:
        # Only "more than the limit": the exact count of a result that is not released stays inside.
        raise BastionError("LimitExceeded", f"the result has more than {limit:,} rows, the most the executor "
                                            "releases in one request; aggregate it, filter it or take head(n)",
                           limit="max_rows_released", max_rows=limit)


def _owner_details(exc: BastionError) -> dict:
    """A refusal's owner-only details for its audit entry (the scientist's reply carries only the public ones)."""
    owner = exc.owner_details()
    return {"details": owner} if owner else {}


def _ok(request: _Request, body: dict) -> bytes:
    return protocol.encode("ok", body, request.msg_id)


def _check_body(kind: str, body: dict) -> None:
    """Refuse unknown, missing or mistyped body fields (raises ProtocolError)."""
    fields = BODY_FIELDS[kind]
    for name in body:
        if name not in fields:
            raise ProtocolError(f"{kind} takes no field {str(name)[:64]!r}"
                                + (f"; it takes {', '.join(sorted(fields))}" if fields else ""))
    for name, (expected, required) in fields.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{kind} needs the field {name!r}")
            continue
        value = body[name]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ProtocolError(f"{kind} field {name!r} must be a JSON {_JSON_TYPE_NAMES[expected]}")
        if expected is str and len(value) > MAX_TEXT_CHARS:
            raise ProtocolError(f"{kind} field {name!r} is longer than {MAX_TEXT_CHARS} characters")


_JSON_TYPE_NAMES = {dict: "object", str: "string", int: "integer"}


def _content_error(body: dict) -> BastionError:
    """The typed error for the first string or number in ``body`` that cannot be stored (see _check_content).

    Walks the body iteratively (its nesting is bounded only by the envelope's size), keys and values alike.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return BastionError("ProtocolError", "strings must be Unicode text; this one holds a lone UTF-16 "
                                                     f"surrogate, a \\ud800-\\udfff escape without its pair (at {where})")
        elif isinstance(value, float) and not math.isfinite(value):
            return BastionError("LimitExceeded", "numbers must fit in a 64-bit float (at most about 1.8e308 in "
                                                 f"size); this one does not (at {where})", limit="number_range")
        elif isinstance(value, dict):
            for name, item in reversed(list(value.items())):
                if not _is_text(name):
                    return BastionError("ProtocolError", "field names must be Unicode text; one holds a lone "
                                                         f"UTF-16 surrogate (at {where or 'body'})")
                stack.append((f"{where}.{name}".lstrip(".") if len(where) < 200 else where, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]" if len(where) < 200 else where, item)
                         for i, item in reversed(list(enumerate(value))))
    return BastionError("LimitExceeded", "the request is nested too deeply", limit="nesting")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _salvage_id(data: bytes) -> str:
    """The id of an envelope that failed to decode, when one can be read; else :data:`UNREADABLE_ID`."""
    if len(data) > protocol.MAX_ENVELOPE_BYTES:
        return UNREADABLE_ID
    try:
        message = json.loads(data)
    except Exception:  # whatever is wrong with it, decode() already said so
        return UNREADABLE_ID
    msg_id = message.get("id") if isinstance(message, dict) else None
    return msg_id if isinstance(msg_id, str) and ID_PATTERN.fullmatch(msg_id) else UNREADABLE_ID


def _table_schema(table: Any) -> list[list[str]]:
    """``[[column, dtype], ...]`` of a released table, dtype named as polars prints it."""
    return [[name, str(dtype)] for name, dtype in table.schema.items()]
