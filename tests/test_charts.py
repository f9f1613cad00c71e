"""Charts and describe(): the numbers come from the real executor and match plain polars.

Each chart cell is interpreted into plans that run through
``owner_console.executor.evaluate`` over the synthetic patients table; the
released numbers are compared with the same aggregation written in plain
polars, and every Vega-Lite spec is validated against the Vega-Lite v5 JSON
schema shipped by ``altair``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from bastion_kernel import display
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.values import Chart, FetchedTable
from bastion_kernel.protocol import BastionError
from owner_console import executor
from owner_console.model import Dataset, Held, Policy, Released
from owner_console.sample_data import generate_patients, write_patients

ROWS = 800
OPEN = Policy(min_group_size=1, unsafe="log")


class ExecutorSession:
    """The Session seam answered in process by the executor; a held result counts as approved."""

    def __init__(self, catalog: dict[str, Dataset]) -> None:
        self.catalog = catalog
        self.outcomes: list[Released | Held] = []

    def datasets(self) -> list[dict]:
        return [{"name": name, "schema": self.schema({"op": "scan", "dataset": name}),
                 "policy": dataset.policy.to_dict()} for name, dataset in self.catalog.items()]

    def schema(self, plan: dict) -> list[list[str]]:
        return [list(pair) for pair in executor.schema_of(plan, self.catalog)]

    def fetch(self, plan: dict, text: str) -> FetchedTable:
        outcome = executor.evaluate(plan, self.catalog, "alice")
        self.outcomes.append(outcome)
        request_id = len(self.outcomes) if isinstance(outcome, Held) else None
        return FetchedTable(outcome.table, outcome.notes, request_id)

    def request(self, request_id: int):
        raise AssertionError("not used")

    def save(self, plan: dict, name: str, text: str) -> None:
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def patients() -> pl.DataFrame:
    return generate_patients(rows=ROWS)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("data") / "patients.parquet", rows=ROWS)


def interpreter(data_path: Path, policy: Policy = OPEN) -> Interpreter:
    catalog = {"patients": Dataset("patients", data_path, "parquet", policy)}
    interp = Interpreter(ExecutorSession(catalog))
    interp.run_cell('p = dataset("patients")')
    return interp


@pytest.fixture(scope="module")
def interp(data_path) -> Interpreter:
    return interpreter(data_path)


@pytest.fixture(scope="module")
def vega_lite_validator():
    import altair  # the test extra pins altair 5: the Vega-Lite v5 schema ships with it
    import jsonschema
    path = Path(altair.__file__).parent / "vegalite" / "v5" / "schema" / "vega-lite-schema.json"
    schema = json.loads(path.read_text())
    return jsonschema.Draft7Validator(schema)


def chart(interp: Interpreter, code: str) -> Chart:
    value = interp.run_cell(code).value
    assert isinstance(value, Chart), value
    return value


def as_frame(value: Chart) -> pl.DataFrame:
    return pl.DataFrame(value.rows, schema=value.columns, orient="row") if value.rows else pl.DataFrame()


def expected_bins(values: pl.Series, bins: int, low: float | None = None, high: float | None = None) -> list[int]:
    """Counts per equal-width bin, the last bin closed on the right (numpy's rule), from the edges."""
    values = values.drop_nulls()
    low = values.min() if low is None else low
    high = values.max() if high is None else high
    edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    counts = []
    for i in range(bins):
        upper = (values <= edges[i + 1]) if i == bins - 1 else (values < edges[i + 1])
        counts.append(int(((values >= edges[i]) & upper).sum()))
    return counts


# -- the numbers ------------------------------------------------------------------------

def test_hist_counts_match_polars(interp, patients):
    got = chart(interp, 'p.plot.hist("age", bins=7)')
    want = expected_bins(patients["age"], 7)
    counts = {round(row["bin_start"], 9): row["count"] for row in got.rows}
    low, high = patients["age"].min(), patients["age"].max()
    width = (high - low) / 7
    assert [counts.get(round(low + i * width, 9), 0) for i in range(7)] == want
    assert sum(counts.values()) == patients["age"].drop_nulls().len()
    assert got.rows[0]["bin_start"] == pytest.approx(low)
    assert got.rows[-1]["bin_end"] == pytest.approx(high)


def test_hist_with_a_range_and_a_colour_grouping(interp, patients):
    got = as_frame(chart(interp, 'p.plot.hist("cost", bins=4, by="sex", range=(0, 8000))'))
    for sex in ("F", "M"):
        mine = got.filter(pl.col("sex") == sex).sort("bin_start")
        want = expected_bins(patients.filter(pl.col("sex") == sex)["cost"], 4, 0.0, 8000.0)
        by_start = dict(zip(mine["bin_start"].to_list(), mine["count"].to_list()))
        assert [by_start.get(start, 0) for start in (0.0, 2000.0, 4000.0, 6000.0)] == want


def test_bar_means_match_polars(interp, patients):
    got = as_frame(chart(interp, 'p.plot.bar("sex", "cost", agg="mean")')).sort("sex")
    want = patients.group_by("sex").agg(pl.col("cost").mean()).sort("sex")
    assert got["sex"].to_list() == want["sex"].to_list()
    assert got["mean_cost"].to_list() == pytest.approx(want["cost"].to_list())


def test_bar_counts_by_colour(interp, patients):
    got = as_frame(chart(interp, 'p.plot.bar("diagnosis", agg="count", by="sex")')).sort("diagnosis", "sex")
    want = patients.group_by("diagnosis", "sex").agg(pl.len().alias("count")).sort("diagnosis", "sex")
    assert got.select("diagnosis", "sex", "count").to_dicts() == want.to_dicts()


def test_line_sums_match_polars(interp, patients):
    got = chart(interp, 'p.plot.line(col("admission_date").dt.truncate("1mo").alias("month"), "cost", agg="sum")')
    frame = as_frame(got)
    want = (patients.group_by(pl.col("admission_date").dt.truncate("1mo").alias("month"))
            .agg(pl.col("cost").sum()).sort("month"))
    assert frame["month"].to_list() == want["month"].to_list()  # in order of x
    assert frame["sum_cost"].to_list() == pytest.approx(want["cost"].to_list())
    assert got.spec["encoding"]["x"]["type"] == "temporal"


def test_box_quartiles_match_polars(interp, patients):
    got = as_frame(chart(interp, 'p.plot.box("diagnosis", "cost")')).sort("diagnosis")
    cost = pl.col("cost")
    want = (patients.group_by("diagnosis")
            .agg(cost.min().alias("min"), cost.quantile(0.25, "linear").alias("q1"),
                 cost.quantile(0.5, "linear").alias("median"), cost.quantile(0.75, "linear").alias("q3"),
                 cost.max().alias("max"), pl.len().alias("count"))
            .sort("diagnosis"))
    assert got["diagnosis"].to_list() == want["diagnosis"].to_list()
    for column in ("min", "q1", "median", "q3", "max", "count"):
        assert got[column].to_list() == pytest.approx(want[column].to_list()), column


def test_heatmap_counts_match_polars(interp, patients):
    got = as_frame(chart(interp, 'p.plot.heatmap("age", "length_of_stay", bins=(4, 3))'))
    both = patients.drop_nulls(["age", "length_of_stay"])
    age, stay = both["age"], both["length_of_stay"]
    age_edges = [age.min() + (age.max() - age.min()) * i / 4 for i in range(5)]
    stay_edges = [stay.min() + (stay.max() - stay.min()) * i / 3 for i in range(4)]

    def cell_of(value: float, edges: list[float]) -> int:
        return next(i for i in range(len(edges) - 1) if value < edges[i + 1] or i == len(edges) - 2)

    want: dict[tuple[int, int], int] = {}
    for a, s in zip(age.to_list(), stay.to_list()):
        key = (cell_of(a, age_edges), cell_of(s, stay_edges))
        want[key] = want.get(key, 0) + 1
    mine = {(age_edges.index(min(age_edges, key=lambda e: abs(e - row["age_start"]))),
             stay_edges.index(min(stay_edges, key=lambda e: abs(e - row["length_of_stay_start"])))): row["count"]
            for row in got.to_dicts()}
    assert mine == want
    assert got["count"].sum() == both.height


def test_describe_matches_polars(interp, patients):
    value = interp.run_cell("p.describe()").value
    assert isinstance(value, FetchedTable)
    got, want = value.frame, patients.describe()
    assert got.columns == want.columns
    assert got["statistic"].to_list() == want["statistic"].to_list()
    for column in ("patient_id", "age", "length_of_stay", "cost"):
        assert got[column].to_list() == pytest.approx(want[column].to_list(), nan_ok=True), column
    assert got.schema["cost"] == pl.Float64
    for column in ("name", "sex", "diagnosis"):  # text columns: counts, min, max
        assert got[column].to_list() == want[column].to_list(), column
    assert got["smoker"].to_list()[:3] == pytest.approx(want["smoker"].to_list()[:3])


def test_describe_is_one_aggregate_plan(data_path):
    interp = interpreter(data_path)
    interp.run_cell('p.select("age", "cost").describe()')
    outcomes = interp.session.outcomes
    assert len(outcomes) == 1 and outcomes[0].table.height == 1


def test_describe_shows_hidden_columns_as_stars(data_path, patients):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log", hidden=frozenset({"cost"})))
    value = interp.run_cell('p.select("age", "cost").describe()').value
    cost = dict(zip(value.frame["statistic"].to_list(), value.frame["cost"].to_list()))
    # The executor reports a hidden column as text (its values are released as *), so it gets
    # a text column's statistics: counts, and min/max as *.
    assert cost["min"] == cost["max"] == "*"
    assert cost["count"] == str(patients["cost"].count())
    assert any("cost" in note for note in value.notes)
    assert value.frame["age"].to_list()[2] == pytest.approx(patients["age"].mean())


def test_describe_of_a_small_frame_goes_to_review(data_path):
    interp = interpreter(data_path, Policy(min_group_size=10, unsafe="review"))
    value = interp.run_cell('p.filter(col("age") > 95).describe()').value
    assert isinstance(interp.session.outcomes[-1], Held)
    assert value.request_id is not None


# -- the policy --------------------------------------------------------------------------

def test_small_bins_are_held_for_review(data_path, patients):
    interp = interpreter(data_path, Policy(min_group_size=10, unsafe="review"))
    got = chart(interp, 'p.plot.hist("age", bins=20)')
    extent, binned = interp.session.outcomes
    assert isinstance(extent, Released)  # the min/max over 800 rows is a large enough aggregate
    assert isinstance(binned, Held)  # the top ages fall in bins under K
    assert "10" in binned.decision.reason
    assert min(expected_bins(patients["age"], 20)) < 10
    assert got.request_ids == [2]


def test_large_bins_are_released_at_once(data_path):
    interp = interpreter(data_path, Policy(min_group_size=10, unsafe="review"))
    chart(interp, 'p.plot.hist("age", bins=3)')
    assert all(isinstance(outcome, Released) for outcome in interp.session.outcomes)


def test_small_bins_are_refused_when_the_policy_rejects(data_path):
    interp = interpreter(data_path, Policy(min_group_size=10, unsafe="reject"))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist("age", bins=20)')
    assert info.value.ename == "PolicyViolation"


def test_small_bins_are_suppressed_when_the_owner_suppresses_small_groups(data_path, patients):
    policy = Policy(min_group_size=10, unsafe="review", suppress_small_groups=True)
    interp = interpreter(data_path, policy)
    got = chart(interp, 'p.plot.hist("age", bins=20)')
    assert all(isinstance(outcome, Released) for outcome in interp.session.outcomes)
    want = [count for count in expected_bins(patients["age"], 20) if count >= 10]
    assert [row["count"] for row in got.rows] == want
    assert got.notes  # the chart says that bins were left out


def test_hidden_columns_cannot_be_binned(data_path):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log", hidden=frozenset({"age"})))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist("age")')
    assert info.value.ename == "PolicyViolation" and "hidden" in info.value.evalue


def test_hidden_values_are_not_drawn(data_path):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log", hidden=frozenset({"cost"})))
    got = chart(interp, 'p.plot.bar("sex", "cost")')
    assert got.rows == []
    assert any("hidden" in note for note in got.notes)


@pytest.mark.parametrize("code,message", [
    ('p.plot.hist("age", bins=0)', "bins"),
    ('p.plot.hist("age", bins=5000)', "bins"),
    ('p.plot.hist("age", range=(5, 1))', "range"),
    ('p.plot.bar("sex", "cost", agg="mode")', "agg"),
    ('p.plot.bar("sex", agg="mean")', "value column"),
    ('p.plot.bar("sex", "sex", agg="count", by="sex")', "twice"),
    ('p.plot.heatmap("age", "cost", bins=(1, 2, 3))', "bins"),
    ('p.plot.hist(lit(1))', "literal"),
    ('p.plot.hist("admission_date")', "dates"),
    ('p.plot.scatter("age", "cost")', "scatter"),
])
def test_bad_chart_arguments_are_typed_errors(interp, code, message):
    with pytest.raises(BastionError) as info:
        interp.run_cell(code)
    assert info.value.ename in ("SchemaError", "UnsupportedOperation")
    assert message in info.value.evalue


# -- the rendering -----------------------------------------------------------------------

CHART_CELLS = [
    'p.plot.hist("age", bins=20)',
    'p.plot.hist("cost", bins=10, by="sex")',
    'p.plot.bar("sex", "cost", agg="mean")',
    'p.plot.bar("diagnosis", agg="count", by="smoker")',
    'p.plot.line(col("admission_date").dt.truncate("1mo").alias("month"), "cost", agg="sum")',
    'p.plot.line(col("admission_date").dt.month().alias("month"), "cost", agg="mean", by="sex")',
    'p.plot.box("diagnosis", "cost")',
    'p.plot.box("sex", "length_of_stay", by="smoker")',
    'p.plot.heatmap("age", "cost", bins=(20, 20))',
    'p.plot.heatmap("age", "length_of_stay", bins=5, by="sex")',
]


@pytest.mark.parametrize("code", CHART_CELLS)
def test_vega_lite_specs_validate_against_the_v5_schema(interp, vega_lite_validator, code):
    bundle = display.mime_bundle(chart(interp, code))
    spec = bundle[display.VEGALITE_MIME]
    errors = sorted(vega_lite_validator.iter_errors(spec), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]
    assert spec["$schema"].endswith("/v5.json")
    json.dumps(spec, allow_nan=False)  # the bundle is plain JSON
    assert spec["data"]["values"], code
    assert "text/plain" in bundle


def test_text_fallback_is_a_table_of_the_aggregates(interp, patients):
    bundle = display.mime_bundle(chart(interp, 'p.plot.bar("sex", "cost", agg="mean")'))
    text = bundle["text/plain"]
    assert "mean_cost" in text and "F" in text and "M" in text
    mean_f = patients.filter(pl.col("sex") == "F")["cost"].mean()
    assert f"{mean_f:.6g}" in text


def test_chart_values_are_inlined_json_safe(interp):
    spec = display.mime_bundle(chart(interp, 'p.plot.line(col("admission_date").dt.truncate("1y")'
                                             '.alias("year"), agg="count")'))[display.VEGALITE_MIME]
    years = [row["year"] for row in spec["data"]["values"]]
    assert all(isinstance(y, str) for y in years) and years == sorted(years)
    assert all(not (isinstance(v, float) and math.isnan(v)) for row in spec["data"]["values"] for v in row.values())
