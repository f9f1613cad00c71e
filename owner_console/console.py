"""The owner's console: an ipywidgets view of the approval queue, history, audit log and policies.

Open it in a notebook on the owner's side::

    from owner_console.console import OwnerConsole
    OwnerConsole("path/to/workspace")      # the cell's value displays the console

Four tabs: **Pending** (the live queue: each request opens to its plan, its
reason, the cell text and a preview of the exact table that approval would
release, with Approve / Reject buttons and a reason field), **History**
(decided requests), **Audit** (the log, filtered by scientist, dataset and
event, with a verify status line) and **Datasets** (each dataset's policy).

Everything the buttons do is a plain method (:meth:`OwnerConsole.refresh`,
:meth:`~OwnerConsole.approve`, :meth:`~OwnerConsole.reject`, ...), so the
console can be driven, and tested, from Python without a browser.  Decisions
go through :func:`owner_console.approvals.record_decision`, the same path as
``bastion-owner approve``.

Live updates.  A daemon thread polls the stores every ``refresh_seconds`` and
rebuilds the views when something changed (a new request, a decision made
elsewhere, new audit entries); widget state changes are sent to the browser
from that thread, which ipykernel allows.  A lock keeps a refresh and a click
from interleaving.
"""
from __future__ import annotations

import html
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import ipywidgets as widgets

from owner_console.approvals import ApprovalError, Request, describe_seconds, record_decision, sweep_expired
from owner_console.audit import EVENTS, read_entries, verify
from owner_console.workspace import Workspace

log = logging.getLogger("bastion.console")

ALL = "(all)"
PREVIEW_ROWS = 20
AUDIT_ROWS_SHOWN = 200
DEFAULT_APPROVE_REASON = "approved by the owner"
# Audit entry fields not worth a column of their own in the audit tab.
_AUDIT_HIDDEN_FIELDS = ("seq", "time", "event", "scientist", "prev", "hash", "sig")


@dataclass
class PendingRow:
    """The widgets of one pending request in the Pending tab."""

    request: Request
    widget: widgets.VBox
    details: widgets.HTML
    preview: widgets.HTML
    reason: widgets.Text
    approve_button: widgets.Button
    reject_button: widgets.Button
    message: widgets.HTML


def table_html(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table; every cell is escaped (values may come from the data or the scientist)."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell_text(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table class="bastion-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell_text(value: Any) -> str:
    return "null" if value is None else str(value)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def plan_datasets(plan: Any) -> set[str]:
    """The dataset names a plan scans (walks nested dicts and lists)."""
    found: set[str] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("op") == "scan" and isinstance(node.get("dataset"), str):
                found.add(node["dataset"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class OwnerConsole:
    """The owner's ipywidgets console for one workspace.

    Parameters
    ----------
    workspace_path : str or Path
        An initialised workspace (``bastion-owner init``).
    refresh_seconds : float or None
        How often the background thread looks for changes; ``None`` or ``0``
        starts no thread (call :meth:`refresh` yourself).

    Attributes
    ----------
    widget : ipywidgets.Tab
        The whole console; evaluating the console in a notebook displays it.
    rows : dict
        Request id -> :class:`PendingRow` for each pending request shown.
    """

    def __init__(self, workspace_path: str | os.PathLike, refresh_seconds: float | None = 1.0):
        self.workspace = Workspace(workspace_path).require()
        self.store = self.workspace.approvals()
        self._audit_log = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: Any = None
        self.refresh_seconds = refresh_seconds
        self.rows: dict[int, PendingRow] = {}
        self._build()
        self.refresh()
        # Once here and on the Verify button: verifying checks every signature, too slow for each refresh.
        self.verify_audit()
        if refresh_seconds:
            self.start()

    # -- construction ------------------------------------------------------
    def _build(self) -> None:
        self.status = widgets.HTML()
        self.pending_list = widgets.Accordion(children=[])
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _button: self.refresh())
        pending_tab = widgets.VBox([widgets.HBox([self.refresh_button, self.status]), self.pending_list])

        self.history = widgets.HTML()
        self.scientist_filter = widgets.Dropdown(description="scientist", options=[ALL], value=ALL)
        self.dataset_filter = widgets.Dropdown(description="dataset", options=[ALL], value=ALL)
        self.event_filter = widgets.Dropdown(description="event", options=[ALL, *EVENTS], value=ALL)
        for dropdown in (self.scientist_filter, self.dataset_filter, self.event_filter):
            dropdown.observe(lambda _change: self._show_audit(), names="value")
        self.verify_status = widgets.HTML()
        self.verify_button = widgets.Button(description="Verify", icon="check")
        self.verify_button.on_click(lambda _button: self.verify_audit())
        self.audit_table = widgets.HTML()
        audit_tab = widgets.VBox([
            widgets.HBox([self.scientist_filter, self.dataset_filter, self.event_filter]),
            widgets.HBox([self.verify_button, self.verify_status]), self.audit_table])

        self.datasets = widgets.HTML()
        self.widget = widgets.Tab(children=[pending_tab, self.history, audit_tab, self.datasets])
        self.widget.titles = ("Pending", "History", "Audit", "Datasets")

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    # -- live refresh ------------------------------------------------------
    def start(self) -> None:
        """Start the background thread that refreshes the console when the stores change."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="bastion-console-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background refresh (the console keeps working on :meth:`refresh`)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        self._thread = None

    def close(self) -> None:
        """Stop refreshing, close the widgets and the store connection."""
        self.stop()
        for row in self.rows.values():
            row.widget.close()
        self.widget.close()
        self.store.close()

    def _poll(self) -> None:
        while not self._stop.wait(float(self.refresh_seconds or 1.0)):
            try:
                if self._current_signature() != self._signature:
                    self.refresh()
            except Exception as exc:  # a failed poll is shown, and the next one retries
                log.exception("console refresh failed")
                self.status.value = f"<b>refresh failed:</b> {html.escape(str(exc))}"

    def _current_signature(self) -> Any:
        """A cheap fingerprint of everything the console shows: changes mean refresh."""
        requests = self.store.fingerprint()
        try:
            stat = self.workspace.audit_path.stat()
            audit = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            audit = None
        datasets = tuple(sorted((p.name, p.stat().st_mtime_ns)
                                for p in self.workspace.datasets_dir.glob("*.toml")))
        return requests, audit, datasets

    def refresh(self) -> None:
        """Re-read the stores and rebuild every tab (open requests stay open)."""
        with self._lock:
            self._expire_stale()
            self._signature = self._current_signature()
            self._show_pending()
            self._show_history()
            entries = list(read_entries(self.workspace.audit_path))
            self._update_audit_filters(entries)
            self._show_audit(entries)
            self._show_datasets()

    def _expire_stale(self) -> None:
        try:
            sweep_expired(self.store, self.audit_log, self.workspace.approval_ttl_seconds,
                          self.workspace.result_path)
        except Exception:  # shown by the next refresh; expiry is retried by the executor too
            log.exception("cannot expire stale approvals")

    # -- pending -------------------------------------------------------------
    def pending_ids(self) -> list[int]:
        """Ids of the pending requests shown, oldest first."""
        return list(self.rows)

    def pending_requests(self) -> list[Request]:
        """The pending requests in the store, oldest first."""
        return self.store.list("pending")

    def preview_frame(self, request_id: int, rows: int = PREVIEW_ROWS):
        """The first ``rows`` rows of the table held for ``request_id`` (a polars DataFrame)."""
        import polars as pl
        return pl.read_ipc(self.workspace.result_path(request_id), memory_map=False).head(rows)

    def preview_html(self, request_id: int, rows: int = PREVIEW_ROWS) -> str:
        """The held table's first rows as an escaped HTML table."""
        try:
            frame = self.preview_frame(request_id, rows)
        except Exception as exc:  # a missing or unreadable file is shown, not raised
            return f"<i>no preview: {html.escape(str(exc))}</i>"
        return table_html(frame.columns, frame.iter_rows())

    def _show_pending(self) -> None:
        pending = self.pending_requests()
        ids = [request.id for request in pending]
        if ids != list(self.rows):
            open_id = self._open_request_id()
            kept = {rid: row for rid, row in self.rows.items() if rid in ids}
            for request in pending:
                if request.id not in kept:
                    kept[request.id] = self._pending_row(request)
            for rid, row in self.rows.items():
                if rid not in kept:
                    row.widget.close()
            self.rows = {rid: kept[rid] for rid in ids}
            self.pending_list.children = [row.widget for row in self.rows.values()]
            self.pending_list.titles = tuple(
                f"#{r.id}  {r.scientist}  {r.rows} rows  asked {r.asked_at[:19].replace('T', ' ')}"
                for r in pending)
            self.pending_list.selected_index = ids.index(open_id) if open_id in ids else None
        waiting = len(ids)
        self.status.value = (f"{waiting} request{'s' if waiting != 1 else ''} waiting"
                             if waiting else "no requests waiting")

    def _open_request_id(self) -> int | None:
        index = self.pending_list.selected_index
        ids = list(self.rows)
        return ids[index] if index is not None and 0 <= index < len(ids) else None

    def _pending_row(self, request: Request) -> PendingRow:
        columns = ", ".join(f"{name} ({dtype})" for name, dtype in request.columns)
        notes = "".join(f"<li>{html.escape(str(note))}</li>" for note in request.notes)
        details = widgets.HTML(
            f"<p><b>scientist:</b> {html.escape(request.scientist)} &nbsp; "
            f"<b>asked at:</b> {html.escape(request.asked_at)}</p>"
            f"<p><b>why it needs review:</b> {html.escape(request.detail or request.reason)}</p>"
            f"<p><b>the scientist was told:</b> {html.escape(request.reason)}</p>"
            f"<p><b>result:</b> {request.rows} rows &times; {len(request.columns)} columns: "
            f"{html.escape(columns)}</p>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "<p><b>plan:</b></p>" + _pre(str(request.plan_tree))
            + "<p><b>as polars:</b></p>" + _pre(request.plan_text)
            + ("<p><b>the scientist's cell:</b></p>" + _pre(request.query_text) if request.query_text else ""))
        preview = widgets.HTML(f"<p><b>what approval releases</b> (first {min(PREVIEW_ROWS, request.rows)} "
                               f"of {request.rows} rows):</p>" + self.preview_html(request.id))
        reason = widgets.Text(placeholder="reason (the scientist sees it; required to reject)",
                              description="reason", layout=widgets.Layout(width="60%"))
        approve = widgets.Button(description="Approve", button_style="success", icon="check")
        reject = widgets.Button(description="Reject", button_style="danger", icon="times")
        message = widgets.HTML()
        row = PendingRow(request, widgets.VBox([details, preview, reason, widgets.HBox([approve, reject]), message]),
                         details, preview, reason, approve, reject, message)
        approve.on_click(lambda _button: self._clicked(row, True))
        reject.on_click(lambda _button: self._clicked(row, False))
        return row

    def _clicked(self, row: PendingRow, approved: bool) -> None:
        reason = row.reason.value.strip()
        try:
            if approved:
                request = self.approve(row.request.id, reason or DEFAULT_APPROVE_REASON)
            else:
                request = self.reject(row.request.id, reason)
        except (ApprovalError, ValueError) as exc:
            message = f"<b>not done:</b> {html.escape(str(exc))}"
            row.message.value = message
            self.refresh()  # e.g. decided elsewhere meanwhile: the row goes, so say it in the status line too
            self.status.value = f"request #{row.request.id}: {message}"
            return
        self.status.value = f"request #{request.id} from {html.escape(request.scientist)}: {request.status}"

    # -- actions -------------------------------------------------------------
    @property
    def audit_log(self):
        """The workspace's :class:`owner_console.audit.AuditLog` (opened on first use)."""
        if self._audit_log is None:
            self._audit_log = self.workspace.audit_log()
        return self._audit_log

    def approve(self, request_id: int, reason: str = DEFAULT_APPROVE_REASON) -> Request:
        """Approve a pending request (audited), then refresh; raises ApprovalError if it is not pending."""
        return self._decide(request_id, True, reason)

    def reject(self, request_id: int, reason: str) -> Request:
        """Reject a pending request with a reason the scientist sees (audited), then refresh.

        Raises
        ------
        ValueError
            ``reason`` is empty.
        ApprovalError
            No such request, or it is not pending.
        """
        if not str(reason).strip():
            raise ValueError("type a reason to reject (the scientist sees it)")
        return self._decide(request_id, False, str(reason).strip())

    def _decide(self, request_id: int, approved: bool, reason: str) -> Request:
        with self._lock:
            request = record_decision(self.store, self.audit_log, int(request_id), approved, reason,
                                      by="owner (console)")
            self.refresh()
            return request

    # -- history ---------------------------------------------------------------
    def history_requests(self) -> list[Request]:
        """Every decided request (approved, rejected, released, expired), newest first."""
        return [r for r in reversed(self.store.list()) if r.status != "pending"]

    def _show_history(self) -> None:
        rows = [(r.id, r.scientist, r.status, r.decision_reason or "", r.asked_at, r.decided_at or "",
                 r.decided_by or "", r.released_at or r.expired_at or "", r.rows, r.plan_text)
                for r in self.history_requests()]
        if not rows:
            self.history.value = "<i>no decisions yet</i>"
            return
        self.history.value = table_html(
            ("id", "scientist", "status", "decision reason", "asked at", "decided at", "decided by",
             "released / expired at", "rows", "plan"), rows)

    # -- audit -----------------------------------------------------------------
    def audit_entries(self, scientist: str | None = None, dataset: str | None = None,
                      event: str | None = None, entries: list[dict] | None = None) -> list[dict]:
        """Audit entries in log order, filtered (None or :data:`ALL` means no filter).

        An entry belongs to a dataset when its plan scans it, when it is a
        policy decision whose sources include it, or when it refers (by plan
        hash) to a plan that scans it.  ``entries`` defaults to the whole log.
        """
        if entries is None:
            entries = list(read_entries(self.workspace.audit_path))
        datasets_by_hash: dict[str, set[str]] = {}
        for entry in entries:
            if isinstance(entry.get("plan_hash"), str) and "plan" in entry:
                datasets_by_hash.setdefault(entry["plan_hash"], set()).update(plan_datasets(entry["plan"]))
        for request in self.store.list():
            datasets_by_hash.setdefault(request.plan_hash, set()).update(plan_datasets(request.plan))

        def datasets_of(entry: dict) -> set[str]:
            found = plan_datasets(entry.get("plan"))
            sources = entry.get("sources")
            if isinstance(sources, list):
                found.update(s for s in sources if isinstance(s, str))
            found.update(datasets_by_hash.get(entry.get("plan_hash"), ()))
            return found

        selected = []
        for entry in entries:
            if scientist not in (None, ALL) and entry.get("scientist") != scientist:
                continue
            if event not in (None, ALL) and entry.get("event") != event:
                continue
            if dataset not in (None, ALL) and dataset not in datasets_of(entry):
                continue
            selected.append(entry)
        return selected

    def _update_audit_filters(self, entries: list[dict]) -> None:
        scientists = sorted({e["scientist"] for e in entries if isinstance(e.get("scientist"), str)})
        names = set(self._catalog_names())
        for entry in entries:
            names.update(plan_datasets(entry.get("plan")))
        for dropdown, options in ((self.scientist_filter, scientists), (self.dataset_filter, sorted(names))):
            wanted = [ALL, *options]
            if list(dropdown.options) != wanted:
                current = dropdown.value
                dropdown.options = wanted
                dropdown.value = current if current in wanted else ALL

    def _show_audit(self, entries: list[dict] | None = None) -> None:
        entries = self.audit_entries(self.scientist_filter.value, self.dataset_filter.value,
                                     self.event_filter.value, entries)
        shown = entries[-AUDIT_ROWS_SHOWN:][::-1]
        rows = [(e.get("seq"), e.get("time"), e.get("event"), e.get("scientist") or "-",
                 "; ".join(f"{k}={_short(v)}" for k, v in sorted(e.items()) if k not in _AUDIT_HIDDEN_FIELDS))
                for e in shown]
        summary = (f"<p>{len(entries)} matching entries"
                   + (f" (newest {AUDIT_ROWS_SHOWN} shown)" if len(entries) > AUDIT_ROWS_SHOWN else "") + "</p>")
        self.audit_table.value = summary + table_html(("seq", "time", "event", "scientist", "details"), rows)

    def verify_audit(self):
        """Verify the whole audit log, show the result in the Audit tab and return the report."""
        report = verify(self.workspace.audit_path, self.workspace.audit_public_key_path)
        if report.ok:
            self.verify_status.value = (f"<span style='color:green'>the audit log verifies: {report.entries} "
                                        f"entries, last hash {report.last_hash[:16]}…</span>")
        else:
            self.verify_status.value = (f"<span style='color:red'>the audit log does NOT verify: line "
                                        f"{report.first_bad}: {html.escape(report.problem)}</span>")
        return report

    # -- datasets --------------------------------------------------------------
    def _catalog_names(self) -> list[str]:
        catalog, _errors = self.workspace.catalog_with_errors()
        return sorted(catalog)

    def dataset_policies(self) -> dict[str, dict]:
        """Each registered dataset's policy, ``{name: Policy.to_dict()}``."""
        catalog, _errors = self.workspace.catalog_with_errors()
        return {name: catalog[name].policy.to_dict() for name in sorted(catalog)}

    def _show_datasets(self) -> None:
        catalog, errors = self.workspace.catalog_with_errors()
        rows = []
        for name in sorted(catalog):
            dataset = catalog[name]
            policy = dataset.policy
            rows.append((name, dataset.format, dataset.source, policy.min_group_size, policy.unsafe,
                         ", ".join(sorted(policy.hidden)) or "none", "yes" if policy.allow_save else "no"))
        text = table_html(("dataset", "format", "file", "min group size (K)", "unsafe results",
                           "hidden columns", "saving allowed"), rows)
        text += f"<p>approved results expire after {describe_seconds(self.workspace.approval_ttl_seconds)}</p>"
        if errors:
            text += "".join(f"<p><b>skipped:</b> {html.escape(str(error))}</p>" for error in errors)
        self.datasets.value = text


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
