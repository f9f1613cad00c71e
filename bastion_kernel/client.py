"""The scientist's end of the wire: a CURVE-encrypted ZeroMQ DEALER to the executor.

:class:`ExecutorClient` implements the language's ``Session`` over the
protocol of :mod:`bastion_kernel.contract.protocol`.  It deserializes nothing but the
JSON envelope and, for a ``result``, one Arrow IPC frame (decoded with
``polars.read_ipc``: polars on this side only decodes and displays results).

Replies are matched to requests by envelope id: a reply that arrives after
its request was interrupted or timed out is dropped, never read as the answer
to the next request.
"""
from __future__ import annotations

import io
import time
import uuid
from typing import Callable

import zmq

from .config import ScientistConfig, load_config
from .language.values import FetchedTable, RequestStatus
from .contract.protocol import REPLY_KINDS, BastionError, ProtocolError, decode, encode

DEFAULT_POLL_INTERVAL = 1.0
# Requests an interrupt cancels on the executor (a review wait is left pending instead).
_CANCELLABLE = ("fetch", "save")
CANCEL_ACK_SECONDS = 2.0

# What each request may be answered with, besides ``error``.
_EXPECTED_REPLIES = {
    "hello": ("ok",),
    "datasets": ("ok",),
    "schema": ("ok",),
    "fetch": ("result", "pending"),
    "request_status": ("result", "pending"),
    "save": ("ok",),
    "cancel": ("ok",),
    "dp_preview": ("ok",),
    "budget": ("ok",),
}

WaitCallback = Callable[[int, str, str, float], None]
ProgressCallback = Callable[[str, float], None]
PROGRESS_AFTER_SECONDS = 1.0  # a reply slower than this shows "running" in the cell


class _Progress:
    """Calls ``on_progress("running", elapsed)`` about once a second while a reply is slow, then ``("done", ...)``.

    The protocol has no progress messages: the client reports the only stage
    it knows, that the executor has the request and has not answered yet.
    """

    def __init__(self, callback: ProgressCallback | None, after: float) -> None:
        self.callback = callback
        self.started = time.monotonic()
        self.next_tick = self.started + after
        self.ticked = False

    def poll_ms(self, remaining: float) -> int:
        """How long to poll: until the deadline, or the next tick when someone listens."""
        if self.callback is not None:
            remaining = min(remaining, max(0.0, self.next_tick - time.monotonic()))
        return int(remaining * 1000) + 1

    def tick(self) -> None:
        now = time.monotonic()
        if self.callback is not None and now >= self.next_tick:
            self.ticked = True
            self.next_tick = now + 1.0
            self.callback("running", now - self.started)

    def done(self) -> None:
        if self.callback is not None and self.ticked:
            self.callback("done", time.monotonic() - self.started)


class ExecutorClient:
    """A connection to one executor, implementing ``bastion_kernel.language.session.Session``.

    Parameters
    ----------
    endpoint
        ``tcp://host:port`` of the executor.
    server_public_key, public_key, secret_key
        CURVE keys as Z85 bytes (40 bytes each).
    timeout
        Seconds to wait for any one reply before giving up.
    poll_interval
        Seconds between ``request_status`` polls while a result waits for review.

    Attributes
    ----------
    on_wait
        ``on_wait(request_id, status, reason, elapsed_seconds)``, called while
        :meth:`fetch` waits for the owner; the kernel sets it to update the
        cell's display.
    on_progress
        ``on_progress(stage, elapsed_seconds)``: ``"running"`` about once a
        second while a reply takes longer than :attr:`progress_after`
        seconds, then ``"done"`` when it arrives.
    wait_for_review
        False for a run that must not wait for the owner (a batch client:
        nbconvert, papermill): a held result then raises ``ReviewPending``
        at once instead of being waited for.
    """

    def __init__(self, endpoint: str, server_public_key: bytes, public_key: bytes, secret_key: bytes,
                 timeout: float = 30.0, poll_interval: float = DEFAULT_POLL_INTERVAL):
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.on_wait: WaitCallback | None = None
        self.on_progress: ProgressCallback | None = None
        self.wait_for_review = True
        self.progress_after = PROGRESS_AFTER_SECONDS
        self._keys = (server_public_key, public_key, secret_key)
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None

    @classmethod
    def from_config(cls, config: ScientistConfig) -> "ExecutorClient":
        """A client for a loaded :class:`~bastion_kernel.config.ScientistConfig`."""
        return cls(config.endpoint, config.server_public_key, config.public_key, config.secret_key,
                   timeout=config.timeout_seconds)

    # -- the wire ----------------------------------------------------------

    def _connected_socket(self) -> zmq.Socket:
        if self._socket is None:
            server_key, public_key, secret_key = self._keys
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_serverkey = server_key
            sock.curve_publickey = public_key
            sock.curve_secretkey = secret_key
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset_socket(self) -> None:
        # A fresh socket after a timeout: a late reply then lands on the closed one.
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        """Close the socket and the ZeroMQ context."""
        self._reset_socket()
        self._context.term()

    def request_raw(self, kind: str, body: dict) -> tuple[str, dict, list[bytes]]:
        """Send one request and wait for its reply.

        Returns
        -------
        (kind, body, frames)
            The reply's kind, its body and the frames after the envelope.

        Raises
        ------
        BastionError
            ``ExecutionError`` when the executor does not answer within the
            timeout, ``ProtocolError`` when the reply is not a valid envelope.
        """
        msg_id = uuid.uuid4().hex
        sock = self._connected_socket()
        sock.send_multipart([encode(kind, body, msg_id)])
        try:
            return self._await_reply(sock, msg_id)
        except KeyboardInterrupt:
            if kind in _CANCELLABLE:
                self._cancel(msg_id)
            raise
        except BastionError as exc:
            # We stopped waiting (timeout): the executor need not keep computing an answer no one reads.
            if kind in _CANCELLABLE and exc.ename == "ExecutionError":
                self._cancel(msg_id, wait=False)
            raise

    def _cancel(self, target: str, wait: bool = True) -> None:
        """Ask the executor to cancel request ``target``; waits briefly for the acknowledgement.

        The executor knows requests by scientist and envelope id, not by
        connection, so a fresh socket (after a timeout) can cancel too.
        """
        cancel_id = uuid.uuid4().hex
        try:
            self._connected_socket().send_multipart([encode("cancel", {"target": target}, cancel_id)])
            if not wait:
                return
            deadline = time.monotonic() + CANCEL_ACK_SECONDS
            while (remaining := deadline - time.monotonic()) > 0:
                if not self._socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    break
                frames = self._socket.recv_multipart(copy=True)
                try:
                    _, reply_id, _ = decode(frames[0], REPLY_KINDS)
                except ProtocolError:
                    continue
                if reply_id == cancel_id:
                    return
        except (zmq.ZMQError, KeyboardInterrupt):
            pass  # the interrupt goes on regardless; the executor's own time limit still applies

    def _await_reply(self, sock: zmq.Socket, msg_id: str) -> tuple[str, dict, list[bytes]]:
        deadline = time.monotonic() + self.timeout
        progress = _Progress(self.on_progress, self.progress_after)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(progress.poll_ms(remaining), zmq.POLLIN):
                if time.monotonic() < deadline:
                    progress.tick()
                    continue
                self._reset_socket()
                raise BastionError(
                    "ExecutionError",
                    f"the executor did not answer at {self.endpoint} within {self.timeout:g} s: "
                    "check that the executor runs (bastion-owner serve), that its server key in your "
                    "config is right and that the owner registered your public key")
            frames = sock.recv_multipart(copy=True)
            try:
                reply_kind, reply_id, reply_body = decode(frames[0], REPLY_KINDS)
            except ProtocolError as exc:
                raise BastionError("ProtocolError", f"the executor sent an invalid reply: {exc}") from None
            if reply_id != msg_id:
                continue  # the late answer to an interrupted or timed-out request
            progress.done()
            return reply_kind, reply_body, frames[1:]

    def _call(self, kind: str, body: dict) -> tuple[str, dict, list[bytes]]:
        reply_kind, reply_body, frames = self.request_raw(kind, body)
        if reply_kind == "error":
            raise BastionError.from_body(reply_body)
        if reply_kind not in _EXPECTED_REPLIES[kind]:
            raise BastionError("ProtocolError", f"the executor answered {kind!r} with {reply_kind!r}")
        return reply_kind, reply_body, frames

    # -- the Session protocol ---------------------------------------------

    def hello(self) -> dict:
        """``{"scientist", "server_version", "plan_version"}``: who the executor thinks we are."""
        return self._call("hello", {})[1]

    def datasets(self) -> list[dict]:
        """``[{"name", "schema": [[column, dtype], ...], "policy": {...}}]``."""
        body = self._call("datasets", {})[1]
        datasets = body.get("datasets")
        if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
            raise BastionError("ProtocolError", "the executor's dataset list is malformed")
        return datasets

    def schema(self, plan: dict) -> list[list[str]]:
        """The output schema of ``plan`` as the executor computes it: ``[[name, dtype], ...]``."""
        body = self._call("schema", {"plan": plan})[1]
        schema = body.get("schema")
        if not isinstance(schema, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                for pair in schema):
            raise BastionError("ProtocolError", "the executor's schema reply is malformed")
        return schema

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable | RequestStatus:
        """Run ``plan`` through the policy and return the released table.

        While the owner reviews it, calls :attr:`on_wait` and polls
        ``request_status`` every :attr:`poll_interval` seconds.  A
        ``KeyboardInterrupt`` ends the wait; the request stays pending on the
        executor and ``request(id)`` fetches it later.  With ``wait=False`` a
        held result is not waited for: its :class:`RequestStatus` comes back.
        When :attr:`wait_for_review` is False (a batch run), a held result
        that ``wait`` asks to wait for raises ``ReviewPending`` instead.
        """
        started = time.monotonic()
        kind, body, frames = self._call("fetch", {"plan": plan, "text": text})
        if kind == "pending" and not wait:
            return RequestStatus(*_pending_fields(body))
        if kind == "pending" and not self.wait_for_review:
            request_id, status, reason = _pending_fields(body)
            raise review_pending(request_id, reason, "this run does not wait for the owner (a notebook run "
                                                     "by nbconvert or papermill)")
        while kind == "pending":
            request_id, status, reason = _pending_fields(body)
            if self.on_wait is not None:
                self.on_wait(request_id, status, reason, time.monotonic() - started)
            time.sleep(self.poll_interval)
            kind, body, frames = self._call("request_status", {"request_id": request_id})
        return _fetched_table(body, frames)

    def request(self, request_id: int) -> FetchedTable | RequestStatus:
        """Where request ``request_id`` stands; an approved one is fetched."""
        kind, body, frames = self._call("request_status", {"request_id": request_id})
        if kind == "pending":
            return RequestStatus(*_pending_fields(body))
        return _fetched_table(body, frames)

    def save(self, plan: dict, name: str, text: str) -> None:
        """Keep the result of ``plan`` on the owner's side under ``name``."""
        self._call("save", {"plan": plan, "name": name, "text": text})


    def dp_preview(self, plan: dict) -> FetchedTable:
        """What a differentially private query would cost and its expected error (nothing is spent).

        Returns a table with one row per noisy statistic (``column``,
        ``aggregate``, ``distribution``, ``scale``, ``accuracy`` at 95%);
        the notes say the query's epsilon and the budget left.
        """
        body = self._call("dp_preview", {"plan": plan})[1]
        columns = body.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, dict) for c in columns):
            raise BastionError("ProtocolError", "the executor's dp_preview reply is malformed")
        rows = [{"column": c.get("name"), "aggregate": c.get("aggregate"), "distribution": c.get("distribution"),
                 "scale": c.get("scale"), "accuracy (95%)": _accuracy_text(c)} for c in columns]
        left = body.get("budget") if isinstance(body.get("budget"), dict) else {}
        notes = [f"this query costs epsilon {body.get('epsilon')} of dataset {body.get('dataset')!r}; "
                 f"{left.get('epsilon_remaining')} of {left.get('epsilon_total')} is left "
                 f"({left.get('queries_left')} such queries)",
                 "accuracy: with 95% confidence the released value is within this distance of the true one; "
                 "a mean's depends on how many rows its group has (n): shown for n = 100, 1,000 and 10,000"]
        return FetchedTable(frame=_json_table(rows, ["column", "aggregate", "distribution", "scale",
                                                     "accuracy (95%)"]), notes=notes)

    def budget(self) -> FetchedTable:
        """The scientist's privacy budget on every differentially private dataset, as a table."""
        body = self._call("budget", {})[1]
        datasets = body.get("datasets")
        if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
            raise BastionError("ProtocolError", "the executor's budget reply is malformed")
        names = ["name", "epsilon_total", "epsilon_spent", "epsilon_remaining", "epsilon_per_query",
                 "queries_left"]
        if any(d.get("shared_epsilon_total") is not None for d in datasets):
            # The owner's bound on all scientists together, and what all of them have left of it.
            names[-1:-1] = ["shared_epsilon_total", "shared_epsilon_remaining"]
        notes = [] if datasets else ["no dataset of this executor is differentially private"]
        return FetchedTable(frame=_json_table([{n: d.get(n) for n in names} for d in datasets], names),
                            notes=notes)


def review_pending(request_id: int, reason: str, why: str) -> BastionError:
    """The ``ReviewPending`` error of a held request that the cell stops waiting for.

    Parameters
    ----------
    request_id : int
        The held request.
    reason : str
        Why it is held, as the executor told the scientist (plan and policy only).
    why : str
        Why the cell does not wait: a batch run, an interrupt.
    """
    held = f"request #{request_id} waits for the owner's review" + (f" ({reason})" if reason else "")
    return BastionError("ReviewPending",
                        f"{held}; {why}. request({request_id}) fetches it once the owner approves it, and "
                        "running this cell again then answers at once from the approved result",
                        request_id=request_id, status="pending", reason=reason)


def _accuracy_text(column: dict) -> str | None:
    """A column's accuracy as the preview shows it: a number, or a mean's accuracy for groups of n rows."""
    per_rows = column.get("accuracy_for_rows")
    if isinstance(per_rows, dict) and per_rows:
        return ", ".join(f"{float(v):.4g} at n={int(n):,}" for n, v in per_rows.items())
    accuracy = column.get("accuracy")
    return None if accuracy is None else f"{float(accuracy):.6g}"


def _json_table(rows: list[dict], names: list[str]):
    import polars

    return polars.DataFrame(rows, schema=names, orient="row") if rows else \
        polars.DataFrame({n: [] for n in names})


def _pending_fields(body: dict) -> tuple[int, str, str]:
    request_id = body.get("request_id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise BastionError("ProtocolError", "a pending reply without a request id")
    status = body.get("status") if isinstance(body.get("status"), str) else "pending"
    reason = body.get("reason") if isinstance(body.get("reason"), str) else ""
    return request_id, status, reason


def _fetched_table(body: dict, frames: list[bytes]) -> FetchedTable:
    import polars

    if len(frames) != 1:
        raise BastionError("ProtocolError", f"a result reply must carry one table frame, got {len(frames)}")
    try:
        frame = polars.read_ipc(io.BytesIO(frames[0]))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's fault
        raise BastionError("ProtocolError", f"the result frame is not Arrow IPC: {str(exc)[:200]}") from None
    notes = body.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise BastionError("ProtocolError", "result notes must be a list of strings")
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, int) or isinstance(request_id, bool)):
        raise BastionError("ProtocolError", "result request_id must be a whole number or null")
    return FetchedTable(frame=frame, notes=list(notes), request_id=request_id, mock=body.get("mock") is True)


class ConfiguredSession:
    """A ``Session`` that connects on first use, from the scientist's configuration.

    The kernel starts with one of these, so that a missing or broken
    configuration is reported at the first cell that needs the executor
    (as a :class:`~bastion_kernel.config.ConfigError`) and not at start-up.

    Parameters
    ----------
    loader
        Returns a :class:`~bastion_kernel.config.ScientistConfig`; by default
        :func:`~bastion_kernel.config.load_config`.
    """

    def __init__(self, loader: Callable[[], ScientistConfig] = load_config):
        self._loader = loader
        self._client: ExecutorClient | None = None
        self.on_wait: WaitCallback | None = None
        self.on_progress: ProgressCallback | None = None
        self.wait_for_review = True

    @property
    def client(self) -> ExecutorClient:
        if self._client is None:
            self._client = ExecutorClient.from_config(self._loader())
        self._client.on_wait = self.on_wait
        self._client.on_progress = self.on_progress
        self._client.wait_for_review = self.wait_for_review
        return self._client

    def datasets(self) -> list[dict]:
        return self.client.datasets()

    def schema(self, plan: dict) -> list[list[str]]:
        return self.client.schema(plan)

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable | RequestStatus:
        return self.client.fetch(plan, text, wait)

    def dp_preview(self, plan: dict) -> FetchedTable:
        return self.client.dp_preview(plan)

    def budget(self) -> FetchedTable:
        return self.client.budget()

    def request(self, request_id: int) -> FetchedTable | RequestStatus:
        return self.client.request(request_id)

    def save(self, plan: dict, name: str, text: str) -> None:
        self.client.save(plan, name, text)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
