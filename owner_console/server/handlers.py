"""The handlers of each request kind: each returns the reply frames (envelope [+ table]).

``hello``, ``datasets``, ``schema``, ``dp_preview`` and ``budget`` reveal no
data; ``fetch`` runs a query in a worker process and releases, holds or
refuses its result (re-runs of a held query are answered by
:mod:`.releases`); ``save`` keeps a result on the owner's side;
``cancel`` stops one of the scientist's own queries.

Mock data.  A plan whose scans carry ``"mock": true`` (``dataset(NAME,
mock=True)``) runs against the published mocks only
(:mod:`owner_console.mock`): the catalog it gets holds no real file.  It is
answered at once (a ``query`` and a ``release`` entry marked ``mock``),
never held, saved or charged; a plan that mixes mock and real sources is
refused.
"""
from __future__ import annotations

import hashlib
import logging
from importlib import metadata
from typing import Any, Callable

from bastion_kernel.contract import protocol, walk
from bastion_kernel.contract.plan import PLAN_VERSION, frame_op, plan_hash, scan
from bastion_kernel.contract.protocol import BastionError

from .. import mock
from ..model import Held, Released
from ..saved import check_saved_name
from .edge import Incoming
from .releases import NEW_REVIEW
from .versions import data_version

log = logging.getLogger("bastion.executor")


def server_version() -> str:
    """The installed Bastion version, as ``hello`` reports it."""
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Handlers:
    """The per-kind request handlers of :class:`~.dispatch.ExecutorServer` (a mixin: they use its workspace,
    stores, audit log, worker processes and catalog)."""

    def _hello(self, request: Incoming) -> list[bytes]:
        return [_ok(request, {"scientist": request.scientist, "server_version": server_version(),
                              "plan_version": PLAN_VERSION})]

    def _datasets(self, request: Incoming) -> list[bytes]:
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

    def _dp_preview(self, request: Incoming) -> list[bytes]:
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

    def _budget(self, request: Incoming) -> list[bytes]:
        """The scientist's own privacy budget on every DP dataset."""
        from owner_console import dp
        return [_ok(request, {"datasets": dp.budget(self._catalog(), request.scientist)})]

    def _schema(self, request: Incoming) -> list[bytes]:
        plan, reads_mock = mock.route(request.body["plan"])
        if reads_mock:
            catalog = mock.mock_catalog({name: record["path"] for name, record in self.workspace.mocks().items()},
                                        self._catalog(), request.scientist)
        else:
            catalog = self._catalog(request.scientist)
        schema = self._executor.schema_of(plan, catalog, scientist=request.scientist)
        return [_ok(request, {"schema": [list(pair) for pair in schema]})]

    def _save(self, request: Incoming) -> list[bytes]:
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

    def _cancel(self, request: Incoming) -> list[bytes]:
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

    def _fetch(self, request: Incoming) -> list[bytes] | None:
        plan = request.body["plan"]
        text = request.body.get("text", "")
        digest = plan_hash(plan)
        queried: list[bool] = []

        def audit_query(**fields: Any) -> None:
            if not queried:
                # Not fsynced by itself: the fsync of this request's decision, refusal or error (or the one
                # ExecutorServer._run makes before any reply) makes it durable, before anything is answered.
                self.audit.append_many([("query", request.scientist, {
                    "request": request.msg_id, "plan": plan, "plan_hash": digest, "text": text, **fields})],
                    sync=False)
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
            if answer is not NEW_REVIEW:
                return answer
        limits = self._limits()
        try:
            # The ``query`` entry is written while the worker computes; it is in the log before any refusal,
            # decision or release of this request, and on disk (their fsync) before anything is sent.
            outcome = self._executor.evaluate(
                runnable, catalog, request.scientist, cancel=request.cancel,
                timeout=limits.query_timeout_seconds, on_started=audit_query)
            _check_rows_released(outcome.table.height, limits.max_rows_released)
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

    def _fetch_mock(self, request: Incoming, plan: dict, digest: str, audit_query: Callable[[], None]) -> list[bytes]:
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


def _ok(request: Incoming, body: dict) -> bytes:
    return protocol.encode("ok", body, request.msg_id)


def _check_rows_released(rows: int, limit: int) -> None:
    """Refuse a result over the workspace's row limit (before it is held or sent)."""
    if rows > limit:
        # Only "more than the limit": the exact count of a result that is not released stays inside.
        raise BastionError("LimitExceeded", f"the result has more than {limit:,} rows, the most the executor "
                                            "releases in one request; aggregate it, filter it or take head(n)",
                           limit="max_rows_released", max_rows=limit)


def _table_schema(table: Any) -> list[list[str]]:
    """``[[column, dtype], ...]`` of a released table, dtype named as polars prints it."""
    return [[name, str(dtype)] for name, dtype in table.schema.items()]
