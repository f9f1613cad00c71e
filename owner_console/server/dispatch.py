"""The executor's socket loop: one ROUTER, two thread pools, and every request's one reply.

One ROUTER socket, CURVE server, bound on the owner's side; the ZAP
allow-list and the per-message key check are :mod:`.auth`'s, the checks of
each message :mod:`.edge`'s.  Every request is attributed to the name the
allow-list gives its key, never to anything in the message itself.

Nothing answered without its audit entry.  A refusal, an internal error, a
release and the first message of a connection are answered only after their
entry is on disk (the log fsyncs); if the entry cannot be written, the
request gets no answer at all and the owner's log says why.  Refused requests
are rate-limited per key (:class:`.refusals.RefusalBudget`).

Threads and processes.  ZeroMQ sockets are not thread-safe, so only the loop
thread touches the ROUTER.  Requests run on two thread pools (quick ones:
``hello``, ``datasets``, ``schema``, ``request_status``, ``dp_preview``,
``budget``; queries: ``fetch``, ``save``), so that a small request never waits
behind a long query.  A query thread hands the query itself to a worker
process (:mod:`owner_console.workers`): polars has one thread pool per
process, and only separate processes let the operating system share the CPU
fairly, stop a query for real, and survive a query that exhausts memory.
A thread hands its reply back through its own inproc PUSH socket to a PULL
socket that the loop polls next to the ROUTER.  The handlers of each
request kind are in :mod:`.handlers` and :mod:`.releases`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import zmq

from bastion_kernel.contract import protocol
from bastion_kernel.contract.protocol import BastionError

from ..limits import Limits, limits_from_config
from ..saved import SavedResults
from ..workspace import AllowList, Workspace
from .auth import ZAP_DOMAIN, Keys
from .edge import MAX_MESSAGE_BYTES, UNREADABLE_ID, EdgeRefusal, Incoming, check_content, read_request, salvage_id
from .handlers import Handlers
from .refusals import RefusalBudget
from .releases import Releases

log = logging.getLogger("bastion.executor")

POLL_MS = 100
# Back-pressure: requests waiting or running, per scientist and in all; one
# scientist flooding the executor gets LimitExceeded instead of its memory.
MAX_IN_FLIGHT_PER_SCIENTIST = 32
MAX_IN_FLIGHT = 256
# Messages taken from the ROUTER per loop turn, so replies keep flowing under load.
RECEIVE_BATCH = 64
QUERY_KINDS = frozenset({"fetch", "save"})


class _Unanswered(Exception):
    """A request whose audit entry could not be written: it gets no answer (the owner's log says why)."""


class ExecutorServer(Handlers, Releases):
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
        self._running: dict[tuple[str, str], list[Incoming]] = {}
        self._running_lock = threading.Lock()
        self._logged_limit_error = False
        self._keys = Keys(self.workspace)
        self._refusals = RefusalBudget()
        # Releases of approved results, one at a time: an approval is released once (see _release_approved).
        self._release_lock = threading.Lock()
        self._limits_cache: tuple[tuple[int, int, int], float, Limits] | None = None
        self._config_path = str(self.workspace.config_path)  # (stat on every message)
        self._catalog_cache: tuple[tuple, float, tuple[dict, list]] | None = None
        self._handlers: dict[str, Callable[[Incoming], list[bytes]]] = {
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
        self._keys.start(context)

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
        self._keys.stop()
        if self._context is not None:
            self._context.term()
            self._context = None
        self.store.close()

    def _report_throttled(self) -> None:
        """The ``throttled`` entries not yet written (keys that stayed away after being throttled)."""
        for key, dropped in self._refusals.drain(self._limits().max_refusals_per_minute).items():
            try:
                self.audit.append("throttled", self._keys.name_for_audit(key), key=key, **dropped)
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
        scientist = self._keys.name_of(key)
        first = (key, identity) not in self._seen
        if first:
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen.add((key, identity))

        def salvaged() -> str:  # (parsed only for a refusal: a served request's id is read with its body)
            return salvage_id(parts[0].bytes) if parts else UNREADABLE_ID

        def refuse(msg_id: str, error: BastionError, kind: str = "?", **notes: Any) -> None:
            if verdict == "serve":
                self._refusals.spend(key, limit)  # now, not when audited: a burst cannot outrun the allowance
            name = scientist or self._keys.name_for_audit(key)
            self._pools[1].submit(self._run, Incoming(identity, key, name, kind, msg_id, {}, first=first,
                                                      refusal=error, throttled=dropped, holds_slot=False,
                                                      notes={"key": key, **notes} if scientist is None else notes))

        if verdict == "refuse":
            refuse(salvaged(), BastionError("LimitExceeded", f"too many refused requests: this key may make at "
                                                             f"most {limit} a minute; its messages are dropped "
                                                             "until then", limit="max_refusals_per_minute"))
            return
        if scientist is None:
            refuse(salvaged(), BastionError("AuthenticationError", "this key is no longer allowed: the owner "
                                                                   "removed or replaced it"))
            return
        if len(parts) != 1:
            refuse(salvaged(), BastionError("ProtocolError", "a request is one frame (the envelope); got "
                                                             f"{len(parts)} frames"))
            return
        try:
            kind, msg_id, body = read_request(parts[0].bytes)
        except EdgeRefusal as refused:
            refuse(refused.msg_id, refused.error, refused.kind, **refused.notes)
            return
        if not self._admit(scientist):
            refuse(msg_id, BastionError("LimitExceeded", "too many requests at once; wait for earlier answers and "
                                                         "try again", limit="in_flight"), kind)
            return
        request = Incoming(identity, key, scientist, kind, msg_id, body, first=first, throttled=dropped)
        if kind in QUERY_KINDS:
            with self._running_lock:
                self._running.setdefault((scientist, msg_id), []).append(request)
        pool = self._pools[0] if kind in QUERY_KINDS else self._pools[1]
        pool.submit(self._run, request)

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

    def _run(self, request: Incoming) -> None:
        try:
            frames = self._answer(request)
            if not frames:
                return
            if request.refusal is None and self._keys.name_of(request.key) != request.scientist:
                self._withhold(request)
                return
            try:
                self.audit.sync()  # entries written without their own fsync (a query's) are on disk first
            except Exception:
                log.exception("cannot write the audit log: request %s (%s from %s) is left unanswered",
                              request.msg_id, request.kind, request.scientist)
                return
            self._send([request.identity, *frames])
        finally:
            if request.kind in QUERY_KINDS and request.refusal is None:
                self._forget_running(request)
            if request.holds_slot:
                self._release_slot(request.scientist)

    def _answer(self, request: Incoming) -> list[bytes] | None:
        """The reply frames, each with its audit entry on disk; None: nothing (more) to send."""
        try:
            self._audit_arrival(request)
            if request.refusal is not None:
                raise request.refusal
            check_content(request)
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

    def _audit(self, request: Incoming, entries: list[tuple[str, str | None, dict]]) -> None:
        """Write ``entries`` (fsynced) or raise :class:`_Unanswered`: no answer goes out without them."""
        try:
            self.audit.append_many(entries)
        except Exception:
            log.exception("cannot write the audit log: request %s (%s from %s) is left unanswered",
                          request.msg_id, request.kind, request.scientist)
            raise _Unanswered() from None

    def _audit_arrival(self, request: Incoming) -> None:
        """The ``connection`` entry of a connection's first message, and the ``throttled`` count before it."""
        entries = []
        if request.throttled:
            entries.append(("throttled", request.scientist, {"key": request.key, **request.throttled}))
        if request.first:
            entries.append(("connection", request.scientist, {"key": request.key}))
        if entries:
            self._audit(request, entries)

    def _refused(self, request: Incoming, exc: BastionError) -> list[bytes]:
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

    def _withhold(self, request: Incoming) -> None:
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

    def _forget_running(self, request: Incoming) -> None:
        key = (request.scientist, request.msg_id)
        with self._running_lock:
            running = self._running.get(key, [])
            if request in running:
                running.remove(request)
            if not running:
                self._running.pop(key, None)

    def _internal_error(self, request: Incoming, **audit_fields: Any) -> dict:
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
        catalog, errors = self._owners_catalog()
        for error in errors:
            if str(error) not in self._logged_catalog_errors:
                self._logged_catalog_errors.add(str(error))
                log.error("skipping a dataset: %s", error)
        if scientist is None:
            return dict(catalog)
        return {**self.saved.catalog(scientist), **catalog}

    def _owners_catalog(self) -> tuple[dict, list]:
        """The workspace's datasets and unreadable dataset files, read again only when a dataset file changed.

        Asked on every query, so a ``stat`` of the directory and of each
        dataset file decides (the parsed files cost far more); a file changed
        within :data:`AllowList.RACY_SECONDS` of the last read is read again,
        as :meth:`_limits` does.
        """
        directory = self.workspace.datasets_dir
        try:
            directory_stat = os.stat(directory)
            files = []
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".toml"):
                        stat = entry.stat()
                        files.append((entry.name, stat.st_mtime_ns, stat.st_size, stat.st_ino))
        except OSError:
            return self.workspace.catalog_with_errors()
        stamp = (directory_stat.st_mtime_ns, directory_stat.st_ino, tuple(sorted(files)))
        newest = max([directory_stat.st_mtime_ns, *(file[1] for file in files)])
        cached = self._catalog_cache
        if cached is not None and cached[0] == stamp and cached[1] - newest / 1e9 >= AllowList.RACY_SECONDS:
            return cached[2]
        read_at = time.time()
        read = self.workspace.catalog_with_errors()
        self._catalog_cache = (stamp, read_at, read)
        return read

    def _limits(self) -> Limits:
        """The workspace's limits, re-read when ``config.toml`` changed (defaults if it is broken).

        Checked on every message, so a ``stat`` decides; a file changed within
        :data:`AllowList.RACY_SECONDS` of its last read is read again (a second
        change in the same clock tick would not move its time).
        """
        try:
            stat = os.stat(self._config_path)
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


def _owner_details(exc: BastionError) -> dict:
    """A refusal's owner-only details for its audit entry (the scientist's reply carries only the public ones)."""
    owner = exc.owner_details()
    return {"details": owner} if owner else {}
