"""Plans the language builds run on the real executor and match plain polars.

Each cell is interpreted into a plan, run through
``owner_console.executor.evaluate`` over the synthetic patients table (an
open policy: K=1, unsafe ``log``, nothing hidden, so everything is
released), and compared with the same query written in plain polars.
"""
from __future__ import annotations

from typing import Callable

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.values import FetchedTable
from owner_console import executor
from owner_console.model import Dataset, Policy, Released
from owner_console.sample_data import generate_patients, write_patients

ROWS = 800


class ExecutorSession:
    """The Session seam answered by the executor's own functions, in process."""

    def __init__(self, catalog: dict[str, Dataset], directory) -> None:
        self.catalog = catalog
        self.directory = directory

    def datasets(self) -> list[dict]:
        return [{"name": name, "schema": self.schema({"op": "scan", "dataset": name}),
                 "policy": dataset.policy.to_dict()} for name, dataset in self.catalog.items()]

    def schema(self, plan: dict) -> list[list[str]]:
        return [list(pair) for pair in executor.schema_of(plan, self.catalog)]

    def fetch(self, plan: dict, text: str) -> FetchedTable:
        outcome = executor.evaluate(plan, self.catalog, "alice")
        assert isinstance(outcome, Released), outcome
        return FetchedTable(outcome.table, outcome.notes)

    def request(self, request_id: int):
        raise AssertionError("not used")

    def save(self, plan: dict, name: str, text: str) -> None:
        # As the server does: the executor prepares the table, it becomes a dataset of its own.
        table, policy = executor.prepare_save(plan, self.catalog)
        path = self.directory / f"{name}.parquet"
        table.write_parquet(path)
        self.catalog[name] = Dataset(name, path, "parquet", policy)


@pytest.fixture(scope="module")
def patients() -> pl.DataFrame:
    return generate_patients(rows=ROWS)


def open_patients_interpreter(tmp_path_factory, rows: int, cell: str) -> Interpreter:
    """An interpreter over ``rows`` synthetic patients released by an open policy, once ``cell`` ran.

    Its session is :class:`ExecutorSession`: the executor's own functions, in process.
    """
    path = write_patients(tmp_path_factory.mktemp("data") / "patients.parquet", rows=rows)
    open_policy = Policy(min_group_size=1, unsafe="log")
    catalog = {"patients": Dataset("patients", path, "parquet", open_policy)}
    interpreter = Interpreter(ExecutorSession(catalog, tmp_path_factory.mktemp("saved")))
    interpreter.run_cell(cell)
    return interpreter


@pytest.fixture(scope="module")
def interp(tmp_path_factory) -> Interpreter:
    return open_patients_interpreter(tmp_path_factory, ROWS, 'p = dataset("patients")')


Query = Callable[[pl.DataFrame], pl.DataFrame]

# (Bastion cell, the same query in polars, whether row order is defined)
CASES: list[tuple[str, Query, bool]] = [
    ('p', lambda df: df, True),
    ('p.select("age", col("cost") * 2)', lambda df: df.select("age", pl.col("cost") * 2), True),
    ('p.select(stay=col("length_of_stay") + 1)', lambda df: df.select(stay=pl.col("length_of_stay") + 1), True),
    ('p.filter(col("age") >= 65)', lambda df: df.filter(pl.col("age") >= 65), True),
    ('p.filter(col("age") > 30, sex="F")', lambda df: df.filter(pl.col("age") > 30, sex="F"), True),
    ('p.filter((col("age") < 20) | ~col("smoker"))',
     lambda df: df.filter((pl.col("age") < 20) | ~pl.col("smoker")), True),
    ('p.filter(col("diagnosis").is_in(["asthma", "influenza"]))',
     lambda df: df.filter(pl.col("diagnosis").is_in(["asthma", "influenza"])), True),
    ('p.filter(col("age").is_between(18, 30, closed="left"))',
     lambda df: df.filter(pl.col("age").is_between(18, 30, closed="left")), True),
    ('p.filter(col("cost").is_null())', lambda df: df.filter(pl.col("cost").is_null()), True),
    ('p.filter(col("diagnosis").str.contains("itis"))',
     lambda df: df.filter(pl.col("diagnosis").str.contains("itis")), True),
    ('p.filter(col("zip").str.starts_with("7501"))',
     lambda df: df.filter(pl.col("zip").str.starts_with("7501")), True),
    ('p.group_by("sex").agg(col("cost").mean(), n=len())',
     lambda df: df.group_by("sex").agg(pl.col("cost").mean(), n=pl.len()), False),
    ('p.group_by("diagnosis", "sex").agg(col("age").min(), col("age").max().alias("oldest"), col("cost").sum())',
     lambda df: df.group_by("diagnosis", "sex").agg(pl.col("age").min(), pl.col("age").max().alias("oldest"),
                                                      pl.col("cost").sum()), False),
    ('p.group_by("diagnosis").agg(col("cost").std(), v=col("cost").var(ddof=0), m=col("cost").median())',
     lambda df: df.group_by("diagnosis").agg(pl.col("cost").std(), v=pl.col("cost").var(ddof=0),
                                             m=pl.col("cost").median()), False),
    ('p.group_by("sex").agg(col("smoker").count(), col("cost").null_count(), col("zip").n_unique())',
     lambda df: df.group_by("sex").agg(pl.col("smoker").count(), pl.col("cost").null_count(),
                                       pl.col("zip").n_unique()), False),
    ('p.group_by("sex").agg(col("cost").quantile(0.9))',
     lambda df: df.group_by("sex").agg(pl.col("cost").quantile(0.9, "nearest")), False),
    ('p.group_by(col("admission_date").dt.year()).agg(len())',
     lambda df: df.group_by(pl.col("admission_date").dt.year()).agg(pl.len()), False),
    ('p.group_by(col("admission_date").dt.truncate("1mo")).agg(len())',
     lambda df: df.group_by(pl.col("admission_date").dt.truncate("1mo")).agg(pl.len()), False),
    ('p.group_by("diagnosis").len()', lambda df: df.group_by("diagnosis").len(), False),
    ('p.select(col("age", "cost").mean())', lambda df: df.select(pl.col("age", "cost").mean()), True),
    ('p.select(pl.len(), col("cost").sum())', lambda df: df.select(pl.len(), pl.col("cost").sum()), True),
    ('p.with_columns((col("cost") / col("length_of_stay")).round(2).alias("per_day"))',
     lambda df: df.with_columns((pl.col("cost") / pl.col("length_of_stay")).round(2).alias("per_day")), True),
    ('p.with_columns(band=when(col("age") >= 65).then(lit("senior")).when(col("age") >= 18).then(lit("adult"))'
     '.otherwise(lit("minor")))',
     lambda df: df.with_columns(band=pl.when(pl.col("age") >= 65).then(pl.lit("senior"))
                                .when(pl.col("age") >= 18).then(pl.lit("adult")).otherwise(pl.lit("minor"))), True),
    ('p.select(col("age").cast(pl.Float64), col("age").cast(str).alias("age_text"))',
     lambda df: df.select(pl.col("age").cast(pl.Float64), pl.col("age").cast(pl.String).alias("age_text")), True),
    ('p.select(col("cost").fill_null(0.0), col("smoker").fill_null(False))',
     lambda df: df.select(pl.col("cost").fill_null(0.0), pl.col("smoker").fill_null(False)), True),
    ('p.select((col("cost") - 1000).abs().sqrt(), col("age").clip(18, 80), col("age").pow(2).alias("sq"))',
     lambda df: df.select((pl.col("cost") - 1000).abs().sqrt(), pl.col("age").clip(18, 80),
                          pl.col("age").pow(2).alias("sq")), True),
    ('p.select(col("length_of_stay").log(10), (-col("age")).alias("neg"), col("age") // 7, w=col("age") % 7)',
     lambda df: df.select(pl.col("length_of_stay").log(10), (-pl.col("age")).alias("neg"), pl.col("age") // 7,
                          w=pl.col("age") % 7), True),
    ('p.select(col("name").str.to_uppercase(), col("name").str.len_chars().alias("n"), '
     'col("zip").str.slice(0, 3).alias("z3"), col("diagnosis").str.replace(" ", "_").alias("d"))',
     lambda df: df.select(pl.col("name").str.to_uppercase(), pl.col("name").str.len_chars().alias("n"),
                          pl.col("zip").str.slice(0, 3).alias("z3"),
                          pl.col("diagnosis").str.replace(" ", "_").alias("d")), True),
    ('p.select(col("admission_date").dt.month(), col("admission_date").dt.strftime("%Y-%m").alias("ym"), '
     'col("admission_date").dt.weekday().alias("wd"))',
     lambda df: df.select(pl.col("admission_date").dt.month(),
                          pl.col("admission_date").dt.strftime("%Y-%m").alias("ym"),
                          pl.col("admission_date").dt.weekday().alias("wd")), True),
    ('p.sort("cost", descending=True, nulls_last=True).head(10)',
     lambda df: df.sort("cost", descending=True, nulls_last=True).head(10), True),
    ('p.sort(["sex", "age"], descending=[False, True]).limit(20)',
     lambda df: df.sort(["sex", "age"], descending=[False, True]).limit(20), False),
    ('p.drop("name", "zip").rename({"length_of_stay": "stay"})',
     lambda df: df.drop("name", "zip").rename({"length_of_stay": "stay"}), True),
    ('p.drop_nulls()', lambda df: df.drop_nulls(), True),
    ('p.drop_nulls("cost")', lambda df: df.drop_nulls("cost"), True),
    ('p.select("cost", "smoker").fill_null(0)', lambda df: df.select("cost", "smoker").fill_null(0), True),
    ('p.select("sex", "diagnosis").unique()', lambda df: df.select("sex", "diagnosis").unique(), False),
    ('p.with_row_index("row").head(3)', lambda df: df.with_row_index("row").head(3), True),
    ('p.count()', lambda df: df.count(), True),
    ('p.join(p.group_by("diagnosis").agg(avg=col("cost").mean()), on="diagnosis", how="left")',
     lambda df: df.join(df.group_by("diagnosis").agg(avg=pl.col("cost").mean()), on="diagnosis", how="left"),
     True),
    ('p.join(p.select("patient_id", "age").head(50), on="patient_id", how="semi")',
     lambda df: df.join(df.select("patient_id", "age").head(50), on="patient_id", how="semi"), True),
    ('p.join(p.filter(col("age") > 90).select("patient_id"), on="patient_id", how="anti")',
     lambda df: df.join(df.filter(pl.col("age") > 90).select("patient_id"), on="patient_id", how="anti"), True),
    ('p.select("sex").unique().join(p.select("zip").unique(), how="cross")',
     lambda df: df.select("sex").unique().join(df.select("zip").unique(), how="cross"), False),
    ('concat([p.head(3), p.filter(col("age") > 95)])',
     lambda df: pl.concat([df.head(3), df.filter(pl.col("age") > 95)]), True),
    ('p.filter(col("age") > 80).save("older_than_80").select("age")',
     lambda df: df.filter(pl.col("age") > 80).select("age"), True),
    ('sql("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")',
     lambda df: df.group_by("sex").agg(n=pl.len()), False),
]


@pytest.mark.parametrize("code,query,ordered", CASES, ids=[c for c, _, _ in CASES])
def test_cell_runs_like_polars(interp, patients, code, query, ordered):
    fetched = interp.run_cell(code + ".fetch()").value
    assert isinstance(fetched, FetchedTable)
    expected = query(patients)
    got = fetched.frame
    if not ordered:
        got, expected = got.sort(got.columns, nulls_last=True), expected.sort(expected.columns, nulls_last=True)
    assert_frame_equal(got, expected, check_dtypes=False)


def test_sql_cell_runs_like_polars(interp, patients):
    fetched = interp.run_cell("%%sql\nSELECT diagnosis, AVG(cost) AS avg_cost FROM patients GROUP BY diagnosis").value
    expected = patients.group_by("diagnosis").agg(avg_cost=pl.col("cost").mean())
    assert_frame_equal(fetched.frame.sort("diagnosis"), expected.sort("diagnosis"), check_dtypes=False)


def test_schema_properties_come_from_the_executor(interp, patients):
    assert interp.run_cell("p.columns").value == patients.columns
    assert interp.run_cell('p.select("age", "cost").width').value == 2
    assert interp.run_cell('p.group_by("sex").agg(len()).columns').value == ["sex", "len"]
