"""Which engine runs a plan: one engine per plan, chosen from its datasets, refused otherwise.

The executor's core (and a real query worker process) is given catalogs
whose datasets name their engine; only the polars engine exists, so a
dataset on an engine the executor does not have (``"duckdb"`` here) is
refused with a message naming the engines, whatever the data.
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine, executor, workers
from owner_console.engine.interface import Engine
from owner_console.model import Dataset, Policy, Released
from owner_console.sample_data import write_patients

pytestmark = pytest.mark.timeout(120)

OPEN = Policy(min_group_size=1, unsafe="reject")


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("data") / "patients.csv", rows=200)


def joined(left: str, right: str) -> dict:
    return P.frame_op("join", left=P.scan(left), right=P.scan(right), how="inner", left_on=[P.col("patient_id")],
                      right_on=[P.col("patient_id")], suffix="_r")


def test_a_plan_of_polars_datasets_runs_on_the_polars_engine(patients_csv):
    catalog = {"a": Dataset("a", patients_csv, "csv", OPEN), "b": Dataset("b", patients_csv, "csv", OPEN)}
    runner = engine.engine_for(catalog.values())
    assert isinstance(runner, engine.PolarsEngine) and isinstance(runner, Engine) and runner.name == "polars"
    assert runner.cache is engine.DEFAULT_CACHE
    own = engine.DatasetCache()
    assert engine.engine_for(catalog.values(), own).cache is own
    assert isinstance(executor.evaluate(joined("a", "b"), catalog, "alice"), Released)


@pytest.mark.parametrize("operation", ["evaluate", "schema_of", "prepare_save"])
def test_a_plan_over_two_engines_is_refused_naming_them(patients_csv, operation):
    catalog = {"a": Dataset("a", patients_csv, "csv", OPEN),
               "b": Dataset("b", patients_csv, "csv", OPEN, engine="spark")}
    with pytest.raises(BastionError) as caught:
        if operation == "evaluate":
            executor.evaluate(joined("a", "b"), catalog, "alice")
        elif operation == "schema_of":
            executor.schema_of(joined("a", "b"), catalog)
        else:
            executor.prepare_save(joined("a", "b"), catalog)
    assert caught.value.ename == "UnsupportedOperation"
    assert "polars: a" in caught.value.evalue and "spark: b" in caught.value.evalue
    assert caught.value.details["engines"] == ["polars", "spark"]


def test_a_dataset_on_an_engine_the_executor_lacks_is_refused_naming_it(patients_csv):
    catalog = {"b": Dataset("b", patients_csv, "csv", OPEN, engine="duckdb")}
    with pytest.raises(BastionError) as caught:
        executor.evaluate(P.scan("b"), catalog, "alice")
    assert caught.value.ename == "UnsupportedOperation"
    assert "'duckdb'" in caught.value.evalue and "polars" in caught.value.evalue


def test_the_refusal_is_the_same_whatever_the_data(patients_csv, tmp_path):
    # Twin datasets, one person apart: the reply is a function of the plan and the catalog's engines only.
    full = pl.read_csv(patients_csv, try_parse_dates=True)
    full.head(full.height - 1).write_csv(tmp_path / "fewer.csv")
    replies = []
    for path in (patients_csv, tmp_path / "fewer.csv"):
        catalog = {"a": Dataset("a", path, "csv", OPEN), "b": Dataset("b", path, "csv", OPEN, engine="spark")}
        with pytest.raises(BastionError) as caught:
            executor.evaluate(joined("a", "b"), catalog, "alice")
        replies.append(caught.value.body())
    assert replies[0] == replies[1]


def test_the_engine_of_a_dataset_travels_to_a_query_worker(patients_csv, tmp_path):
    # The worker process rebuilds the catalog from JSON: a dataset must stay on its engine there.
    pool = workers.QueryWorkers(tmp_path / "shared", size=1)
    try:
        catalog = {"b": Dataset("b", patients_csv, "csv", OPEN, engine="duckdb")}
        with pytest.raises(BastionError) as caught:
            pool.evaluate(P.scan("b"), catalog, "alice")
        assert caught.value.ename == "UnsupportedOperation" and "'duckdb'" in caught.value.evalue
    finally:
        pool.close()


def test_the_polars_engines_data_version_follows_the_file(patients_csv, tmp_path):
    copy = tmp_path / "copy.csv"
    copy.write_bytes(Path(patients_csv).read_bytes())
    dataset = Dataset("p", copy, "csv", OPEN)
    runner = engine.engine_for([dataset])
    before = runner.data_version(dataset)
    assert before and before == runner.data_version(dataset)
    os.utime(copy, ns=(1, 1))  # same bytes, another modification time: the cache reads it again
    assert runner.data_version(dataset) != before
    assert runner.data_version(Dataset("gone", tmp_path / "missing.csv", "csv", OPEN)) == ""


def test_the_empty_result_has_the_plans_columns_and_types_and_no_rows(patients_csv):
    catalog = {"a": Dataset("a", patients_csv, "csv", OPEN)}
    plan = P.frame_op("group_by", input=P.scan("a"), keys=[P.col("sex")], aggs=[P.fn("mean", P.col("age"))])
    runner = engine.engine_for(catalog.values())
    empty = runner.empty_result(plan, catalog)
    assert empty.height == 0
    assert [(name, engine.dtype_name(dtype)) for name, dtype in empty.schema.items()] == \
        runner.output_schema(plan, catalog)
