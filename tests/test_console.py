"""The owner's ipywidgets console, driven from Python against a real executor process.

A scientist sends row-level fetches over the wire (``RawClient`` and the
kernel's ``ExecutorClient``); the test finds each request in the console,
reads its preview, clicks its buttons with ``Button.click()`` (which fires
the same handlers a browser click does) and checks what the scientist gets.
"""
from __future__ import annotations

import html
import io
import time
from html.parser import HTMLParser

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import col, frame_op, length, scan
from bastion_kernel.contract.protocol import BastionError
from owner_console.audit import read_entries
from owner_console.console import ALL, OwnerConsole

WAIT_SECONDS = 60


class _Tables(HTMLParser):
    """Every ``<table>`` in an HTML string, as lists of rows of cell texts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables(markup: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(markup)
    return parser.tables


def rows_plan(columns, n, dataset="patients"):
    return frame_op("head", input=frame_op("select", input=scan(dataset), exprs=[col(c) for c in columns]), n=n)


def hold(client, plan, text="cell") -> int:
    kind, body, _ = client.request("fetch", {"plan": plan, "text": text}, timeout=WAIT_SECONDS)
    assert kind == "pending", body
    return body["request_id"]


@pytest.fixture(scope="module")
def source(patients_csv) -> pl.DataFrame:
    return pl.read_csv(patients_csv)


@pytest.fixture
def console(executor):
    console = OwnerConsole(executor.workspace, refresh_seconds=None)
    yield console
    console.close()


def test_preview_shows_the_real_held_rows_and_approve_releases_them(executor, console, source):
    alice = executor.client("alice")
    request_id = hold(alice, rows_plan(("age", "sex", "name"), 6), "dataset('patients').head(6).fetch()")
    assert request_id not in console.pending_ids()
    console.refresh()
    assert request_id in console.pending_ids()
    row = console.rows[request_id]

    # What the owner sees is what approval releases: the real values, hidden column as "*".
    expected = source.select("age", "sex").head(6).with_columns(name=pl.lit("*"))
    [preview] = tables(row.preview.value)
    assert preview[0] == ["age", "sex", "name"]
    assert preview[1:] == [[str(v) for v in values] for values in expected.iter_rows()]
    assert_frame_equal(console.preview_frame(request_id), expected)
    record = console.store.get(request_id)
    for shown in ("alice", record.asked_at, record.reason, record.plan_text, record.plan_tree,
                  "dataset('patients').head(6).fetch()", "6 rows"):
        assert html.escape(shown) in row.details.value

    row.reason.value = "aggregate study, six rows are fine"
    row.approve_button.click()
    assert request_id not in console.pending_ids()
    assert console.status.value == f"request #{request_id} from alice: approved"
    kind, body, frames = alice.request("request_status", {"request_id": request_id})
    assert kind == "result" and body["request_id"] == request_id
    assert_frame_equal(pl.read_ipc(io.BytesIO(frames[0])), expected)

    [approval] = [e for e in read_entries(executor.workspace / "audit.jsonl")
                  if e["event"] == "approval" and e.get("request_id") == request_id]
    assert approval["reason"] == "aggregate study, six rows are fine" and approval["scientist"] == "alice"
    console.refresh()
    [history] = tables(console.history.value)
    [line] = [r for r in history[1:] if r[0] == str(request_id)]
    assert line[1:4] == ["alice", "released", "aggregate study, six rows are fine"]


def test_reject_needs_a_reason_and_the_scientist_gets_it(executor, console):
    scientist = executor.kernel_client("alice")
    request_id = hold(executor.client("alice"), rows_plan(("zip",), 4))
    console.refresh()
    row = console.rows[request_id]

    row.reject_button.click()  # no reason typed: nothing is decided
    assert "reason" in row.message.value
    assert console.store.get(request_id).status == "pending" and request_id in console.pending_ids()

    row.reason.value = "zip codes <b>identify</b> people"
    row.reject_button.click()
    assert request_id not in console.pending_ids()
    with pytest.raises(BastionError) as caught:
        scientist.request(request_id)
    assert caught.value.ename == "ReviewRejected"
    assert "zip codes <b>identify</b> people" in caught.value.evalue
    assert caught.value.details["reason"] == "zip codes <b>identify</b> people"
    assert "zip codes &lt;b&gt;identify&lt;/b&gt; people" in console.history.value


def test_new_requests_appear_on_refresh_and_decided_ones_leave(executor, console):
    bob = executor.client("bob")
    before = console.pending_ids()
    first = hold(bob, rows_plan(("age",), 2))
    second = hold(bob, rows_plan(("cost",), 3))
    console.refresh()
    assert console.pending_ids()[-2:] == [first, second]
    assert console.pending_ids()[:-2] == [i for i in before if i in console.pending_ids()]
    assert len(console.pending_list.children) == len(console.pending_ids())
    assert any(f"#{first}" in title for title in console.pending_list.titles)

    # Decided elsewhere (the command line) while the console shows it.
    assert executor.owner("approve", str(first)).returncode == 0
    stale = console.rows[first]
    stale.approve_button.click()
    assert "not done" in stale.message.value and "approved" in stale.message.value
    assert f"#{first}" in console.status.value and "not done" in console.status.value
    assert first not in console.pending_ids() and second in console.pending_ids()
    console.reject(second, "not needed")


def test_the_background_thread_shows_new_requests_without_a_refresh_call(executor):
    console = OwnerConsole(executor.workspace, refresh_seconds=0.1)
    try:
        request_id = hold(executor.client("alice"), rows_plan(("sex",), 2))
        deadline = time.monotonic() + WAIT_SECONDS
        while request_id not in console.pending_ids():
            assert time.monotonic() < deadline, "the console never showed the new request"
            time.sleep(0.05)
        console.approve(request_id)
        kind, _, _ = executor.client("alice").request("request_status", {"request_id": request_id})
        assert kind == "result"
        # The release happened in the executor; the thread notices it on its own.
        deadline = time.monotonic() + WAIT_SECONDS
        while not any(r.id == request_id and r.status == "released" for r in console.history_requests()) \
                or f"<td>{request_id}</td><td>alice</td><td>released</td>" not in console.history.value:
            assert time.monotonic() < deadline, "the console never showed the release"
            time.sleep(0.05)
    finally:
        console.close()


def test_audit_tab_filters_by_scientist_dataset_and_event(executor, console):
    bob = executor.client("bob")
    aggregate = frame_op("group_by", input=scan("patients_open"), keys=[col("sex")], aggs=[length()])
    kind, _, _ = bob.request("fetch", {"plan": aggregate, "text": "open aggregate"}, timeout=WAIT_SECONDS)
    assert kind == "result"
    console.refresh()
    everything = list(read_entries(executor.workspace / "audit.jsonl"))
    assert {"alice", "bob"} <= set(console.scientist_filter.options)
    assert {"patients", "patients_open", "patients_strict"} <= set(console.dataset_filter.options)

    console.scientist_filter.value = "bob"
    shown = console.audit_entries(console.scientist_filter.value)
    assert shown == [e for e in everything if e.get("scientist") == "bob"]
    [table] = tables(console.audit_table.value)
    assert table[1:] and {r[3] for r in table[1:]} == {"bob"}

    console.dataset_filter.value = "patients_open"
    [table] = tables(console.audit_table.value)
    open_hashes = {e["plan_hash"] for e in everything if e.get("plan", {}).get("input", {}) == scan("patients_open")}
    bob_open = [e for e in everything if e.get("scientist") == "bob" and e.get("plan_hash") in open_hashes]
    assert bob_open  # the query, its decision and its release
    assert [int(r[0]) for r in table[1:]] == [e["seq"] for e in reversed(bob_open)]
    assert {r[2] for r in table[1:]} >= {"query", "decision", "release"}

    console.scientist_filter.value = ALL
    console.dataset_filter.value = ALL
    console.event_filter.value = "rejection"
    [table] = tables(console.audit_table.value)
    rejections = [e for e in everything if e["event"] == "rejection"]
    assert [int(r[0]) for r in table[1:]] == [e["seq"] for e in reversed(rejections)]

    console.verify_button.click()
    assert "verifies" in console.verify_status.value and "NOT" not in console.verify_status.value


def test_audit_tab_reports_a_broken_log(tmp_path, patients_csv):
    from conftest import make_workspace
    owned = make_workspace(tmp_path / "ws", patients_csv)
    log = owned.workspace.audit_log()
    for i in range(3):
        log.append("query", "alice", n=i)
    lines = owned.workspace.audit_path.read_bytes().splitlines(keepends=True)
    owned.workspace.audit_path.write_bytes(lines[0] + lines[2])  # a deleted line
    console = OwnerConsole(owned.path, refresh_seconds=None)
    try:
        report = console.verify_audit()
        assert not report.ok and report.first_bad == 2
        assert "does NOT verify: line 2" in console.verify_status.value
    finally:
        console.close()


def test_datasets_tab_shows_each_policy(owner_workspace, console):
    [table] = tables(console.datasets.value)
    shown = {r[0]: r for r in table[1:]}
    catalog = owner_workspace.workspace.catalog()
    assert set(shown) == set(catalog)
    for name, dataset in catalog.items():
        policy = dataset.policy
        assert shown[name][3:] == [str(policy.min_group_size), policy.unsafe,
                                   ", ".join(sorted(policy.hidden)) or "none",
                                   "yes" if policy.allow_save else "no"]
    assert console.dataset_policies()["patients_strict"]["unsafe"] == "reject"
    assert "7 days" in console.datasets.value


def test_scientist_text_is_escaped_in_the_console(executor, console):
    request_id = hold(executor.client("alice"), rows_plan(("age",), 1), "<script>alert(1)</script>")
    console.refresh()
    details = console.rows[request_id].details.value
    assert "<script>" not in details and "&lt;script&gt;alert(1)&lt;/script&gt;" in details
    console.reject(request_id, "test")


def test_the_console_displays_as_a_tab_widget(console):
    import ipywidgets
    assert isinstance(console.widget, ipywidgets.Tab)
    assert console.widget.titles == ("Pending", "History", "Audit", "Datasets")
    assert hasattr(console, "_ipython_display_")
