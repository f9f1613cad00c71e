"""Values -> Jupyter mime bundles.  Pure functions: no kernel, no socket.

A fetched table is shown as ``text/plain`` (polars' own repr),
``text/html`` (with dtypes, row count and the executor's notes) and
``application/vnd.dataresource+json`` (the Table Schema data resource).
Every value is untrusted text: the HTML escapes all of it.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import html
import math
from typing import Any

from .language.values import Chart, DatasetList, FetchedTable, HelpText, Printed, RequestStatus

HTML_MAX_ROWS = 50           # rows shown in the HTML table
RESOURCE_MAX_ROWS = 10_000   # rows carried in the data resource
DATARESOURCE_MIME = "application/vnd.dataresource+json"
VEGALITE_MIME = "application/vnd.vegalite.v5+json"
CHART_TEXT_MAX_ROWS = 40     # rows of a chart's text fallback
# The marker on every output made from the owner's mock data (dataset(name, mock=True)).
MOCK_MARKER = "MOCK DATA: made by the owner from public facts, not real records"

# Table Schema field types by polars dtype name (the base name, before any "(").
_TABLE_SCHEMA_TYPES = {
    **{name: "integer" for name in ("Int8", "Int16", "Int32", "Int64", "Int128",
                                      "UInt8", "UInt16", "UInt32", "UInt64")},
    "Float32": "number", "Float64": "number", "Decimal": "number",
    "String": "string", "Utf8": "string", "Categorical": "string", "Enum": "string",
    "Boolean": "boolean",
    "Date": "date", "Datetime": "datetime", "Time": "time", "Duration": "duration",
    "List": "array", "Array": "array", "Struct": "object",
}


def mime_bundle(value: Any) -> dict[str, Any]:
    """The mime bundle for a cell's value.

    Parameters
    ----------
    value
        A :class:`FetchedTable`, :class:`DatasetList`, :class:`RequestStatus`
        or anything else (shown by its ``repr``).

    Returns
    -------
    dict
        ``{mime type: data}``, always with ``text/plain``.
    """
    if isinstance(value, FetchedTable):
        return table_bundle(value)
    if isinstance(value, Chart):
        return chart_bundle(value)
    if isinstance(value, DatasetList):
        return dataset_list_bundle(value)
    if isinstance(value, RequestStatus):
        return {"text/plain": request_status_text(value)}
    if isinstance(value, HelpText):
        return {"text/plain": value.text}
    return {"text/plain": repr(value)}


def printed_text(printed: Printed) -> str:
    """What ``print(...)`` writes: strings as they are, other values as their plain-text display."""
    parts = [value if isinstance(value, str) else mime_bundle(value)["text/plain"] for value in printed.values]
    return printed.sep.join(parts) + printed.end


# -- tables -----------------------------------------------------------------

def table_bundle(table: FetchedTable, html_max_rows: int = HTML_MAX_ROWS,
                 resource_max_rows: int = RESOURCE_MAX_ROWS) -> dict[str, Any]:
    """``text/plain``, ``text/html`` and the data resource for a released table."""
    plain = repr(table.frame)
    if table.mock:
        plain = f"{MOCK_MARKER}\n{plain}"
    if table.notes:
        plain += "\n" + "\n".join(f"note: {note}" for note in table.notes)
    if table.request_id is not None:
        plain += f"\n(approved by the owner: request #{table.request_id})"
    # The frame's names, types and rows are read once for both renderings: a table is shown right after its
    # query, when the interpreter's caches are cold and every polars call costs several times its warm time.
    shown = _Shown(table.frame, max(html_max_rows, resource_max_rows))
    return {
        "text/plain": plain,
        "text/html": table_html(table, html_max_rows, shown),
        DATARESOURCE_MIME: data_resource(table.frame, resource_max_rows, shown),
    }


class _Shown:
    """A frame's column names, dtypes, height and first ``rows`` rows as tuples."""

    def __init__(self, frame: Any, rows: int) -> None:
        self.names = list(frame.columns)
        self.dtypes = list(frame.dtypes)
        self.height = frame.height
        self.rows = (frame if self.height <= rows else frame.head(rows)).rows()


def table_html(table: FetchedTable, max_rows: int = HTML_MAX_ROWS, shown: _Shown | None = None) -> str:
    """An HTML table: column names with dtypes, at most ``max_rows`` rows, the row count and notes."""
    shown = shown or _Shown(table.frame, max_rows)
    esc = html.escape
    height = shown.height
    header = "".join(
        f'<th>{esc(name)}<br><span style="font-weight:normal;opacity:0.7">{esc(str(dtype))}</span></th>'
        for name, dtype in zip(shown.names, shown.dtypes))
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_cell_text(v))}</td>" for v in row) + "</tr>"
        for row in shown.rows[:max_rows])
    rows_word = "row" if height == 1 else "rows"
    footer = [f"{height} {rows_word} × {len(shown.names)} columns"]
    if height > max_rows:
        footer.append(f"showing the first {max_rows} rows; the result holds all {height}")
    if table.request_id is not None:
        footer.append(f"approved by the owner: request #{table.request_id}")
    notes = "".join(f"<li>{esc(note)}</li>" for note in table.notes)
    return ('<div class="bastion-table">'
            + (_MOCK_BANNER if table.mock else "")
            + f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>{esc('; '.join(footer))}</p>"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "</div>")


_MOCK_BANNER = ('<p style="background:#fff3cd;color:#664d03;padding:2px 6px;font-weight:bold">'
                f"{html.escape(MOCK_MARKER)}</p>")


def data_resource(frame: Any, max_rows: int = RESOURCE_MAX_ROWS, shown: _Shown | None = None) -> dict[str, Any]:
    """The Table Schema data resource ``{"schema": {"fields": [...]}, "data": [{...}]}`` of a frame.

    Values are JSON-safe: dates and times as ISO 8601 strings, NaN and
    infinities as ``null``.
    """
    shown = shown or _Shown(frame, max_rows)
    names = shown.names
    fields = [{"name": name, "type": table_schema_type(dtype)} for name, dtype in zip(names, shown.dtypes)]
    data = [{name: json_safe(value) for name, value in zip(names, row)} for row in shown.rows[:max_rows]]
    return {"schema": {"fields": fields}, "data": data}


def table_schema_type(dtype: Any) -> str:
    """The Table Schema type of a polars dtype (``"string"`` for anything unmapped)."""
    base = str(dtype).split("(", 1)[0].split("[", 1)[0]
    return _TABLE_SCHEMA_TYPES.get(base, "string")


def json_safe(value: Any) -> Any:
    """A JSON-serializable form of one cell value."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return _iso_duration(value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _iso_duration(delta: _dt.timedelta) -> str:
    sign = "-" if delta < _dt.timedelta(0) else ""
    delta = abs(delta)
    seconds = delta.seconds + delta.microseconds / 1e6
    return f"{sign}P{delta.days}DT{seconds:g}S"


def _cell_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (_dt.date, _dt.datetime, _dt.time)):
        return value.isoformat()
    return str(value)


# -- charts -------------------------------------------------------------------

def vega_lite_spec(chart: Chart) -> dict[str, Any]:
    """The chart's Vega-Lite v5 spec with its released rows inlined as ``data.values``."""
    values = [{name: json_safe(row.get(name)) for name in chart.columns} for row in chart.rows]
    spec = {**chart.spec, "data": {"values": values}}
    if chart.mock:
        spec["title"] = f"{MOCK_MARKER} | {chart.spec.get('title', '')}"
    return spec


def chart_bundle(chart: Chart, text_max_rows: int = CHART_TEXT_MAX_ROWS) -> dict[str, Any]:
    """Vega-Lite for front ends that draw it (JupyterLab), and a text table of the aggregates otherwise."""
    title = chart.spec.get("title")
    lines = [MOCK_MARKER] if chart.mock else []
    lines.append(f"{chart.kind} chart" + (f": {title}" if isinstance(title, str) else ""))
    lines += text_table(chart.columns, chart.rows, text_max_rows)
    lines += [f"note: {note}" for note in chart.notes]
    lines += [f"(approved by the owner: request #{request_id})" for request_id in chart.request_ids]
    return {VEGALITE_MIME: vega_lite_spec(chart), "text/plain": "\n".join(lines)}


def text_table(columns: list[str], rows: list[dict], max_rows: int = CHART_TEXT_MAX_ROWS) -> list[str]:
    """Lines of a small, aligned text table (numbers right-aligned), with a note when cut."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return _cell_text(value)

    shown = [[cell(row.get(name)) for name in columns] for row in rows[:max_rows]]
    widths = [max([len(name)] + [len(r[i]) for r in shown]) for i, name in enumerate(columns)]
    numeric = [all(isinstance(row.get(name), (int, float)) and not isinstance(row.get(name), bool)
                   for row in rows[:max_rows]) and bool(rows) for name in columns]
    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    lines = [line(list(columns)), line(["-" * w for w in widths])] + [line(r) for r in shown]
    if not rows:
        lines.append("(nothing to draw)")
    elif len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows (all are in the chart)")
    return lines


# -- dataset lists and request states ------------------------------------------

def _policy_summary(policy: dict, dp: dict | None = None) -> str:
    """The privacy mode of a dataset as the executor describes it: DP with its budgets, or K and the rules."""
    hidden = policy.get("hidden") or []
    hidden_part = f"hidden: {', '.join(map(str, hidden)) if hidden else 'none'}"
    if dp:
        parts = [f"differential privacy: epsilon {dp.get('epsilon', '?')} per scientist"]
        if dp.get("epsilon_total") is not None:
            parts.append(f"{dp['epsilon_total']} in all")
        if dp.get("epsilon_per_query") is not None:
            parts.append(f"{dp['epsilon_per_query']} per query")
        if dp.get("delta"):
            parts.append(f"delta {dp['delta']}")
        parts.append(hidden_part)
        return "; ".join(parts) + "; budget() shows what is left"
    rules = [f"K={policy.get('min_group_size', '?')}"]
    if policy.get("person_id"):
        rules.append(f"K counts people ({policy['person_id']})")
    rules.append("dominance " + ("off" if policy.get("dominance") is False else "on"))
    if policy.get("max_share") is not None:
        rules.append(f"max_share {policy['max_share']}")
    parts = [", ".join(rules), hidden_part, f"unsafe: {policy.get('unsafe', '?')}"]
    if policy.get("aggregates_only"):
        parts.append("aggregates only")
    if policy.get("suppress_small_groups"):
        parts.append("small groups suppressed")
    if policy.get("max_rows_released") is not None:
        parts.append(f"at most {policy['max_rows_released']} rows per request")
    if policy.get("bounds"):
        parts.append("bounds: " + ", ".join(f"{c}={lo}:{hi}" for c, (lo, hi) in sorted(policy["bounds"].items())))
    if policy.get("allow_save") is False:
        parts.append("no save")
    return "; ".join(parts)


def _schema_pairs(dataset: dict) -> list[tuple[str, str]]:
    schema = dataset.get("schema") or []
    return [(str(pair[0]), str(pair[1])) for pair in schema
            if isinstance(pair, (list, tuple)) and len(pair) == 2]


def dataset_list_bundle(value: DatasetList) -> dict[str, Any]:
    """``text/plain`` and ``text/html`` for ``datasets()``: names, columns with dtypes, policies."""
    lines, rows = [], []
    esc = html.escape
    for dataset in value.datasets:
        name = str(dataset.get("name", "?"))
        policy = dataset.get("policy") if isinstance(dataset.get("policy"), dict) else {}
        columns = _schema_pairs(dataset)
        summary = _policy_summary(policy, dataset.get("dp") if isinstance(dataset.get("dp"), dict) else None)
        if dataset.get("mock"):
            summary += f"; mock: dataset({name!r}, mock=True)"
        lines.append(f"{name}  ({summary})")
        lines.extend(f"    {column}: {dtype}" for column, dtype in columns)
        column_html = ", ".join(f"{esc(column)} <i>{esc(dtype)}</i>" for column, dtype in columns)
        rows.append(f"<tr><td><b>{esc(name)}</b></td><td>{column_html}</td><td>{esc(summary)}</td></tr>")
    if not value.datasets:
        lines.append("no datasets are open to you")
    table = ("<table><thead><tr><th>dataset</th><th>columns</th><th>policy</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    return {"text/plain": "\n".join(lines), "text/html": table}


def request_status_text(status: RequestStatus) -> str:
    """One line saying where a held request stands (and, while it waits, how to fetch it later)."""
    text = f"request #{status.request_id}: {status.status}"
    text = f"{text}: {status.reason}" if status.reason else text
    if status.status == "pending":
        text += (f"\nrequest({status.request_id}) fetches it once the owner approves it; running this cell "
                 "again then answers at once")
    return text


def waiting_bundle(request_id: int, status: str, reason: str, elapsed_seconds: float) -> dict[str, Any]:
    """The in-place status of a result waiting for the owner's review."""
    text = f"waiting for the owner (request #{request_id}) — {int(elapsed_seconds)} s"
    if status and status != "pending":
        text += f" [{status}]"
    if reason:
        text += f"\n{reason}"
    return {"text/plain": text}


def progress_bundle(stage: str, elapsed_seconds: float) -> dict[str, Any]:
    """The in-place status of a query the executor is still working on (``stage``: ``"running"``)."""
    what = {"running": "running on the owner's executor"}.get(stage, stage)
    return {"text/plain": f"{what} — {int(elapsed_seconds)} s"}


def progress_ended_bundle(outcome: str, elapsed_seconds: float) -> dict[str, Any]:
    """What the running display becomes once the executor answered (``outcome``: ``"done"``, ``"ended (...)"``)."""
    return {"text/plain": f"query {outcome} after {int(elapsed_seconds)} s on the owner's executor"}


def wait_ended_bundle(request_id: int, outcome: str, elapsed_seconds: float) -> dict[str, Any]:
    """What the waiting display becomes once the wait is over (``outcome`` is a short phrase)."""
    return {"text/plain": f"request #{request_id}: {outcome} (waited {int(elapsed_seconds)} s)"}


# -- errors -------------------------------------------------------------------

def error_traceback(ename: str, evalue: str, details: dict | None, code: str) -> list[str]:
    """Traceback lines for an error reply: where in the cell, the line, a caret, then ``ename: evalue``.

    ``details`` may carry ``line`` (1-based), ``col`` (0-based, as ``ast``
    counts) and optionally ``end_line``/``end_col``; without them the
    traceback is the message alone.
    """
    details = details or {}
    lines: list[str] = []
    line_no, col = details.get("line"), details.get("col")
    source_lines = code.splitlines()
    if _is_count(line_no) and 1 <= line_no <= len(source_lines):
        source = source_lines[line_no - 1]
        if _is_count(col) and 0 <= col <= len(source):
            lines.append(f"  cell line {line_no}, column {col + 1}:")
            end_col = details.get("end_col")
            same_line = details.get("end_line", line_no) == line_no
            width = end_col - col if same_line and _is_count(end_col) and end_col > col else 1
            width = max(1, min(width, len(source) - col)) if len(source) > col else 1
            lines.append(f"    {source}")
            lines.append("    " + " " * col + "^" * width)
        else:
            lines.append(f"  cell line {line_no}:")
            lines.append(f"    {source}")
    lines.append(f"{ename}: {evalue}")
    return lines


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
