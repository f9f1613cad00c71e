"""Held results and their release: re-runs answered from an earlier request, approved results sent once each.

Re-runs.  A held request is bound to its plan's hash, the key that asked and
the version of the data it read (:func:`.versions.data_version`: each source
file's size and modification time, and its policy).  A ``fetch`` of the same
plan by the same key on the same data version is answered from that request:
still pending, the same request id (no new review); rejected, the owner's
rejection; approved, its table (a ``release``), and once released, its table
again (a ``rerelease`` entry) until the approval is ``approval_ttl_seconds``
old, unless the owner approved it for one release (``approve --once``,
``approval_reuse = "once"``).  ``request_status`` re-releases the same way.
A changed file or policy makes a new version: the query goes to review again.

Releasing an approved result.  The ``release`` entry is written first, then
the approval is consumed as an open release, the rows are handed to the
socket, and the release is closed: a crash between any two steps leaves the
approval or an open release, which the key that asked gets by asking again
(with a new entry); never an approval consumed for good without its rows,
nor rows without an entry.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from bastion_kernel.contract import protocol
from bastion_kernel.contract.protocol import BastionError

from ..approvals import (ApprovalError, Request, describe_seconds, effective_reuse, expires_at, interrupted_release,
                         is_expired, serves_again, sweep_expired)
from ..model import Held
from ..workspace import atomic_write
from .edge import Incoming

log = logging.getLogger("bastion.executor")

# What Releases._answer_from returns when an earlier request can no longer answer a re-run.
NEW_REVIEW = object()


class Releases:
    """Holding results, answering re-runs and releasing approved results, for
    :class:`~.dispatch.ExecutorServer` (a mixin: it uses its store, audit log, workspace and socket)."""

    def _earlier(self, request: Incoming, digest: str, version: str) -> Request | None:
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

    def _answer_from(self, request: Incoming, record: Request) -> Any:
        """A re-run answered from ``record`` (see :meth:`_earlier`); :data:`NEW_REVIEW` when it no longer can."""
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
            return NEW_REVIEW  # expired, withdrawn or used up meanwhile: the query goes to review again

    def _hold(self, request: Incoming, plan: dict, text: str, outcome: Held, ipc: bytes,
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

    def _request_status(self, request: Incoming) -> list[bytes]:
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

    def _release_approved(self, request: Incoming, record: Request) -> None:
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
            if self._keys.name_of(request.key) != request.scientist:
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
