"""Charts and describe(): the numbers come from the real executor and match plain polars.

Each chart cell is interpreted into plans that run through
``owner_console.executor.evaluate`` over the synthetic patients table; the
released numbers are compared with the same aggregation written in plain
polars, and every Vega-Lite spec is validated against the Vega-Lite v5 JSON
schema shipped by ``altair``.  Histograms and heatmaps take their bins from
the owner's public bounds (``BOUNDS``) or ``range=``, never from the data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from bastion_kernel import display
from bastion_kernel.language import plot
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.values import Chart, FetchedTable, RequestStatus
from bastion_kernel.contract.protocol import BastionError
from owner_console import executor
from owner_console.dp import DPPolicy
from owner_console.model import Dataset, Held, Policy, Released
from owner_console.sample_data import generate_patients, write_patients

ROWS = 800
# The owner's public bounds of the numeric columns (declared facts, not the data's min and max).
BOUNDS = {"age": (0, 100), "length_of_stay": (0, 60), "cost": (0, 200_000)}
OPEN = Policy(min_group_size=1, unsafe="log", bounds=BOUNDS)


class ExecutorSession:
    """The Session seam answered in process by the executor; a held result counts as approved."""

    def __init__(self, catalog: dict[str, Dataset]) -> None:
        self.catalog = catalog
        self.plans: list[dict] = []
        self.outcomes: list[Released | Held] = []

    def datasets(self) -> list[dict]:
        described = []
        for name, dataset in self.catalog.items():  # as the server's ``datasets`` reply
            entry = {"name": name, "schema": self.schema({"op": "scan", "dataset": name}),
                     "policy": dataset.policy.to_dict()}
            if dataset.dp is not None:
                entry["dp"] = dataset.dp.describe()
            described.append(entry)
        return described

    def schema(self, plan: dict) -> list[list[str]]:
        return [list(pair) for pair in executor.schema_of(plan, self.catalog)]

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable | RequestStatus:
        self.plans.append(plan)
        outcome = executor.evaluate(plan, self.catalog, "alice")
        self.outcomes.append(outcome)
        request_id = len(self.outcomes) if isinstance(outcome, Held) else None
        if request_id is not None and not wait:
            return RequestStatus(request_id, "pending", outcome.decision.reason)
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


def bounded(**settings) -> Policy:
    """A policy with the owner's public bounds of the numeric columns."""
    return Policy(bounds=BOUNDS, **settings)


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


def functions_in(node) -> set[str]:
    """The names of the expression functions anywhere in a plan."""
    if isinstance(node, list):
        return set().union(*map(functions_in, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["name"]} if node.get("expr") == "fn" else set()
    return found.union(*map(functions_in, node.values()))


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

def test_hist_bins_span_the_owners_public_bounds_and_counts_match_polars(data_path, patients):
    interp = interpreter(data_path)
    got = chart(interp, 'p.plot.hist("age", bins=8)')
    want = expected_bins(patients["age"], 8, 0.0, 100.0)
    counts = {round(row["bin_start"], 9): row["count"] for row in got.rows}
    assert [counts.get(12.5 * i, 0) for i in range(8)] == want
    assert sum(counts.values()) == patients["age"].drop_nulls().len()
    assert got.rows[-1]["bin_end"] == pytest.approx(100.0)  # the bound, not the oldest patient's age
    assert any("public bounds" in note and "0 to 100" in note for note in got.notes)
    [binned] = interp.session.outcomes  # one aggregate: no min/max of the data was asked for
    assert isinstance(binned, Released)
    [plan] = interp.session.plans
    assert functions_in(plan) == {"is_between", "clip", "cast"}  # edges are literals; no extreme is computed


def test_hist_without_a_range_or_public_bounds_is_refused_before_anything_is_sent(data_path):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log"))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist("age", bins=8)')
    assert info.value.ename == "SchemaError"
    assert "range=(low, high)" in info.value.evalue and "--bounds age=LO:HI" in info.value.evalue
    assert interp.session.outcomes == []
    # A range the scientist gives is enough; so are bounds only on another column: each column needs its own.
    assert chart(interp, 'p.plot.hist("age", bins=4, range=(0, 100))').rows
    with pytest.raises(BastionError):
        interpreter(data_path, Policy(min_group_size=1, unsafe="log", bounds={"cost": (0, 1)})).run_cell(
            'p.plot.hist("age")')


def test_an_expression_takes_no_column_bounds(data_path):
    interp = interpreter(data_path)
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist(col("age") * 12)')
    assert info.value.ename == "SchemaError" and "range=" in info.value.evalue
    assert chart(interp, 'p.plot.hist((col("age") * 12).alias("months"), range=(0, 1200))').rows


def test_public_bounds_are_read_from_the_policy_and_from_the_dp_policy(data_path):
    dp_policy = DPPolicy(epsilon=1.0, max_rows=10_000, bounds={"age": [10, 90], "cost": [0, 50_000]})
    catalog = {"patients": Dataset("patients", data_path, "parquet", Policy(bounds={"age": (0, 100)})),
               "patients_dp": Dataset("patients_dp", data_path, "parquet", Policy(), dp=dp_policy)}
    interp = Interpreter(ExecutorSession(catalog))
    interp.run_cell('p = dataset("patients")\nq = dataset("patients_dp")\nboth = p.join(q, on="patient_id")')
    frames = {name: interp.variables[name] for name in ("p", "q", "both")}
    assert plot.public_bounds(interp.ctx, frames["p"], "age") == (0.0, 100.0)
    assert plot.public_bounds(interp.ctx, frames["q"], "age") == (10.0, 90.0)
    assert plot.public_bounds(interp.ctx, frames["q"], "cost") == (0.0, 50_000.0)
    assert plot.public_bounds(interp.ctx, frames["p"], "cost") is None
    assert plot.public_bounds(interp.ctx, frames["both"], "age") == (0.0, 100.0)  # several sources: joined


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


@pytest.mark.parametrize("code,stay_high", [
    ('p.plot.heatmap("age", "length_of_stay", bins=(4, 3))', 60.0),  # both axes from the public bounds
    ('p.plot.heatmap("age", "length_of_stay", bins=(4, 3), range=(None, (0, 30)))', 30.0),
])
def test_heatmap_counts_match_polars(interp, patients, code, stay_high):
    got = as_frame(chart(interp, code))
    both = patients.drop_nulls(["age", "length_of_stay"]).filter(pl.col("length_of_stay") <= stay_high)
    age, stay = both["age"], both["length_of_stay"]
    age_edges = [100 * i / 4 for i in range(5)]
    stay_edges = [stay_high * i / 3 for i in range(4)]

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


def test_describe_asks_for_the_order_statistics_apart_from_the_moments(data_path):
    interp = interpreter(data_path)
    interp.run_cell('p.select("age", "cost").describe()')
    moments, ordered = interp.session.outcomes
    assert moments.table.height == ordered.table.height == 1
    assert sorted(moments.table.columns) == sorted(f"{stat}({column})" for stat in ("count", "null_count", "mean", "std")
                                                   for column in ("age", "cost"))
    assert sorted(ordered.table.columns) == sorted(f"{stat}({column})" for stat in ("min", "25%", "50%", "75%", "max")
                                                   for column in ("age", "cost"))


def test_describe_shows_the_moments_while_the_order_statistics_wait_for_review(data_path, patients):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="review"))
    value = interp.run_cell('p.filter(col("age") > 90).select("age", "cost").describe()').value
    moments, ordered = interp.session.outcomes
    assert isinstance(moments, Held) and isinstance(ordered, Held)  # a group of fewer than 10 patients
    stats = {row["statistic"]: row for row in value.frame.to_dicts()}
    old = patients.filter(pl.col("age") > 90)
    assert stats["count"]["age"] == old.height  # approved (the test's owner approves what is held)
    assert stats["mean"]["cost"] == pytest.approx(old["cost"].mean())
    assert all(stats[stat][column] is None for stat in ("min", "25%", "50%", "75%", "max")
               for column in ("age", "cost"))
    assert any("request #2" in note and "request(2)" in note and "order statistics" in note for note in value.notes)
    assert any(note.startswith("the owner's public bounds") and "age 0 to 100" in note and "cost 0 to 200000" in note
               for note in value.notes)


def test_describe_shows_hidden_columns_as_stars(data_path, patients):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log", hidden=frozenset({"cost"})))
    value = interp.run_cell('p.select("age", "cost").describe()').value
    cost = dict(zip(value.frame["statistic"].to_list(), value.frame["cost"].to_list()))
    # The executor reports a hidden column as text and computes nothing over it: its statistics
    # (a text column's: counts, min, max) are * and never asked for.
    assert cost["count"] == cost["null_count"] == cost["min"] == cost["max"] == "*"
    assert not any("cost" in column for outcome in interp.session.outcomes for column in outcome.table.columns)
    assert any("hidden" in note and "cost" in note for note in value.notes)
    assert value.frame["age"].to_list()[2] == pytest.approx(patients["age"].mean())


def test_describe_of_a_small_frame_goes_to_review(data_path):
    interp = interpreter(data_path, Policy(min_group_size=10, unsafe="review"))
    value = interp.run_cell('p.filter(col("age") > 95).describe()').value
    assert isinstance(interp.session.outcomes[-1], Held)
    assert value.request_id is not None


# -- the policy --------------------------------------------------------------------------

def test_small_bins_are_held_for_review(data_path, patients):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="review"))
    got = chart(interp, 'p.plot.hist("age", bins=20)')
    [binned] = interp.session.outcomes
    assert isinstance(binned, Held)  # the top ages fall in bins under K
    assert "10" in binned.decision.reason
    assert min(expected_bins(patients["age"], 20, 0.0, 100.0)) < 10
    assert got.request_ids == [1]


def test_large_bins_are_released_at_once(data_path):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="review"))
    chart(interp, 'p.plot.hist("age", bins=2)')
    assert all(isinstance(outcome, Released) for outcome in interp.session.outcomes)


def test_small_bins_are_refused_when_the_policy_rejects(data_path):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="reject"))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist("age", bins=20)')
    assert info.value.ename == "PolicyViolation"


def test_small_bins_are_suppressed_when_the_owner_suppresses_small_groups(data_path, patients):
    policy = bounded(min_group_size=10, unsafe="review", suppress_small_groups=True)
    interp = interpreter(data_path, policy)
    got = chart(interp, 'p.plot.hist("age", bins=20)')
    assert all(isinstance(outcome, Released) for outcome in interp.session.outcomes)
    want = [count for count in expected_bins(patients["age"], 20, 0.0, 100.0) if count >= 10]
    assert [row["count"] for row in got.rows] == want
    assert got.notes  # the chart says that bins were left out


def test_hidden_columns_cannot_be_binned(data_path):
    interp = interpreter(data_path, bounded(min_group_size=1, unsafe="log", hidden=frozenset({"age"})))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.plot.hist("age")')
    assert info.value.ename == "PolicyViolation" and "hidden" in info.value.evalue
    assert interp.session.outcomes == []


def test_a_box_plot_says_its_extremes_are_order_statistics_when_held(data_path):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="review"))
    got = chart(interp, 'p.filter(col("age") > 90).plot.box("sex", "cost")')
    [held] = interp.session.outcomes
    assert isinstance(held, Held) and got.request_ids == [1]
    assert any("min, quartiles and max are order statistics" in note for note in got.notes)


def test_a_refused_box_plot_says_its_extremes_are_order_statistics(data_path):
    interp = interpreter(data_path, bounded(min_group_size=10, unsafe="reject"))
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.filter(col("age") > 90).plot.box("sex", "cost")')
    assert info.value.ename == "PolicyViolation"
    assert "plot.box(): min, quartiles and max are order statistics" in info.value.evalue
    with pytest.raises(BastionError) as info:
        interp.run_cell('p.filter(col("age") > 90).plot.bar("sex", "cost", agg="max")')
    assert "plot.bar(): agg='max' values are order statistics" in info.value.evalue


def test_hidden_values_are_not_aggregated(data_path):
    interp = interpreter(data_path, Policy(min_group_size=1, unsafe="log", hidden=frozenset({"cost"})))
    with pytest.raises(BastionError) as info:  # the executor refuses any computation over a hidden column
        interp.run_cell('p.plot.bar("sex", "cost")')
    assert info.value.ename == "PolicyViolation" and "hidden" in info.value.evalue


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
