"""The display layer: values -> mime bundles, on real polars frames."""
from __future__ import annotations

import datetime as dt
import json
import math

import polars as pl
import pytest

from bastion_kernel import display
from bastion_kernel.language.values import DatasetList, FetchedTable, RequestStatus
from owner_console.sample_data import generate_patients


@pytest.fixture(scope="module")
def patients() -> pl.DataFrame:
    return generate_patients(rows=200)


def test_table_bundle_has_the_three_mime_types(patients):
    bundle = display.mime_bundle(FetchedTable(patients.head(5)))
    assert set(bundle) == {"text/plain", "text/html", display.DATARESOURCE_MIME}
    assert bundle["text/plain"].startswith(repr(patients.head(5)))
    json.dumps(bundle)  # every part is JSON: it travels in a Jupyter message


def test_data_resource_structure_and_values(patients):
    frame = patients.head(7)
    resource = display.data_resource(frame)
    fields = resource["schema"]["fields"]
    assert [f["name"] for f in fields] == frame.columns
    types = {f["name"]: f["type"] for f in fields}
    assert types == {"patient_id": "integer", "name": "string", "age": "integer", "sex": "string",
                     "zip": "string", "diagnosis": "string", "admission_date": "date",
                     "length_of_stay": "integer", "cost": "number", "smoker": "boolean"}
    assert "primaryKey" not in resource["schema"]
    assert len(resource["data"]) == frame.height
    for record, row in zip(resource["data"], frame.iter_rows(named=True)):
        assert record["admission_date"] == row["admission_date"].isoformat()
        assert record["patient_id"] == row["patient_id"]
        assert record["name"] == row["name"]
        assert record["cost"] == row["cost"]
        assert record["smoker"] == row["smoker"]
    json.dumps(resource, allow_nan=False)


def test_data_resource_is_json_safe_for_awkward_values():
    frame = pl.DataFrame({
        "x": [1.5, float("nan"), float("inf"), None],
        "when": [dt.datetime(2024, 1, 2, 3, 4, 5), None, None, None],
        "span": [dt.timedelta(days=1, seconds=30), None, None, None],
        "tags": [["a", "b"], None, [], ["c"]],
    })
    resource = display.data_resource(frame)
    types = {f["name"]: f["type"] for f in resource["schema"]["fields"]}
    assert types == {"x": "number", "when": "datetime", "span": "duration", "tags": "array"}
    xs = [r["x"] for r in resource["data"]]
    assert xs == [1.5, None, None, None]
    assert resource["data"][0]["when"] == "2024-01-02T03:04:05"
    assert resource["data"][0]["tags"] == ["a", "b"]
    json.dumps(resource, allow_nan=False)


def test_html_has_dtypes_rowcount_and_notes(patients):
    frame = patients.select("sex", "age").head(3)
    html = display.table_html(FetchedTable(frame, notes=["column name was wiped to *"], request_id=4))
    assert "<th>sex<br>" in html and "String" in html and "Int64" in html
    assert "3 rows × 2 columns" in html
    assert "column name was wiped to *" in html
    assert "request #4" in html


def test_html_escapes_every_value_and_name():
    evil = "<script>alert('x')</script>"
    frame = pl.DataFrame({evil: [evil, "a & b"]})
    bundle = display.mime_bundle(FetchedTable(frame, notes=[evil]))
    html = bundle["text/html"]
    assert "<script>" not in html
    assert html.count("&lt;script&gt;") == 3  # header, value, note
    assert "a &amp; b" in html
    # the data resource carries the raw text: it is data, rendered by the frontend
    assert bundle[display.DATARESOURCE_MIME]["data"][0][evil] == evil


def test_long_tables_are_truncated_in_display_only(patients):
    table = FetchedTable(patients)
    html = display.table_html(table, max_rows=10)
    assert html.count("<tr>") == 1 + 10  # header + 10 rows
    assert f"showing the first 10 rows; the result holds all {patients.height}" in html
    assert f"{patients.height} rows" in html
    resource = display.data_resource(patients, max_rows=25)
    assert len(resource["data"]) == 25
    assert table.frame.height == patients.height  # the value itself is untouched


def test_null_and_hidden_values_render(patients):
    frame = pl.DataFrame({"name": ["*", "*"], "cost": [None, 2.0]})
    html = display.table_html(FetchedTable(frame))
    assert "<td>*</td>" in html and "<td>null</td>" in html
    records = display.data_resource(frame)["data"]
    assert records == [{"name": "*", "cost": None}, {"name": "*", "cost": 2.0}]


def test_dataset_list_bundle():
    datasets = DatasetList([{
        "name": "patients",
        "schema": [["age", "Int64"], ["<b>name</b>", "String"]],
        "policy": {"min_group_size": 10, "unsafe": "review", "hidden": ["<b>name</b>"], "allow_save": True},
    }])
    bundle = display.mime_bundle(datasets)
    assert set(bundle) == {"text/plain", "text/html"}
    plain = bundle["text/plain"]
    assert "patients" in plain and "K=10" in plain and "unsafe: review" in plain
    assert "age: Int64" in plain and "hidden: <b>name</b>" in plain
    assert "<b>name</b>" not in bundle["text/html"]
    assert "&lt;b&gt;name&lt;/b&gt;" in bundle["text/html"]


def test_dataset_list_shows_each_privacy_mode():
    datasets = DatasetList([
        {"name": "visits", "schema": [["cost", "Float64"]],
         "policy": {"min_group_size": 10, "unsafe": "reject", "hidden": [], "person_id": "patient_id",
                    "dominance": False, "max_rows_released": 500, "bounds": {"cost": [0, 5000]}}},
        {"name": "census", "schema": [["age", "Int64"]],
         "policy": {"min_group_size": 1, "unsafe": "reject", "hidden": []},
         "dp": {"epsilon": 3.0, "epsilon_per_query": 0.5, "epsilon_total": 6.0, "delta": 1e-7}},
    ])
    plain = display.mime_bundle(datasets)["text/plain"]
    visits, census = plain.split("\n")[0], plain.split("\n")[2]
    assert "K=10, K counts people (patient_id), dominance off" in visits
    assert "at most 500 rows per request" in visits and "bounds: cost=0:5000" in visits
    assert census.startswith("census  (differential privacy: epsilon 3.0 per scientist; 6.0 in all; 0.5 per query")
    assert "K=" not in census and "budget()" in census


def test_request_status_and_other_values():
    assert display.mime_bundle(RequestStatus(3, "pending", "row-level result")) == {
        "text/plain": "request #3: pending: row-level result\n"
                      "request(3) fetches it once the owner approves it; running this cell again then answers at once"}
    assert display.mime_bundle(RequestStatus(3, "rejected", "no")) == {"text/plain": "request #3: rejected: no"}
    assert display.mime_bundle(3) == {"text/plain": "3"}
    assert display.mime_bundle("a") == {"text/plain": "'a'"}


def test_waiting_bundle_counts_seconds():
    assert display.waiting_bundle(7, "pending", "", 12.7)["text/plain"] == \
        "waiting for the owner (request #7) — 12 s"


def test_error_traceback_points_at_the_offending_part():
    code = "x = 1\ny = import_me(2)"
    lines = display.error_traceback("UnsupportedOperation", "no such function", {"line": 2, "col": 4}, code)
    assert lines[-1] == "UnsupportedOperation: no such function"
    assert "line 2, column 5" in lines[0]
    source, caret = lines[1], lines[2]
    assert source.strip() == "y = import_me(2)"
    assert caret.index("^") == source.index("import_me")
    wide = display.error_traceback("E", "m", {"line": 2, "col": 4, "end_col": 13}, code)
    assert wide[2].strip() == "^" * len("import_me")
    assert display.error_traceback("PolicyViolation", "too small", {}, code) == ["PolicyViolation: too small"]
    # a position outside the cell is ignored rather than trusted
    assert display.error_traceback("E", "m", {"line": 9, "col": 0}, code) == ["E: m"]


def test_json_safe_scalars():
    assert display.json_safe(math.inf) is None
    assert display.json_safe(dt.date(2024, 2, 29)) == "2024-02-29"
    assert display.json_safe(b"\x01") == "01"
