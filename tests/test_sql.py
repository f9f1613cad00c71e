"""``%%sql``: SQL text -> plan, run through the real executor, checked against plain polars.

Each query is translated by :func:`bastion_kernel.language.sql.sql_to_plan`,
run by :func:`owner_console.executor.evaluate` (validate -> account -> run ->
decide) under a permissive policy, and the released table is compared with the
same query run by polars' own SQL engine (``polars.SQLContext``) or, where
polars' SQL differs from the subset's documented behaviour, with hand-written
polars over the same files.  Results are compared sorted unless the query
orders them.
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.walk import walk
from bastion_kernel.language.sql import sql_to_plan
from bastion_kernel.contract.protocol import BastionError
from owner_console import executor
from owner_console.model import Dataset, Policy, Released
from owner_console.sample_data import generate_patients

pytestmark = pytest.mark.timeout(120)

PERMISSIVE = Policy(min_group_size=1, unsafe="log")


# --------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sql")
    patients = root / "patients.parquet"
    generate_patients(1500, seed=7).write_parquet(patients)
    # zip -> region: written to CSV, so the executor infers zip as an integer
    # (joining it to patients.zip needs a CAST, which is tested).
    regions = root / "regions.csv"
    pl.DataFrame({
        "zip": [f"750{n:02d}" for n in range(1, 16)],          # 75016..75020 have no region
        "region": ["north" if n % 3 else "south" for n in range(1, 16)],
        "name": [f"region {n}" for n in range(1, 16)],
    }).write_csv(regions)
    # diagnosis -> category (string key; "migraine" and "rare disease X" missing,
    # "sprain" unmatched), with regex metacharacters in a category.
    diagnoses = root / "diagnoses.csv"
    pl.DataFrame({
        "diagnosis": ["hypertension", "diabetes", "asthma", "influenza", "fracture", "depression",
                      "heart failure", "appendicitis", "sprain"],
        "category": ["cardio", "metabolic", "respiratory", "respiratory", "trauma (bone)+[x]", "mental",
                     "cardio", "surgical", "trauma (bone)+[x]"],
        "name": ["HT", "DM", "AS", "FLU", "FX", "DEP", "HF", "APP", "SPR"],
    }).write_csv(diagnoses)
    return {"patients": patients, "regions": regions, "diagnoses": diagnoses}


@pytest.fixture(scope="module")
def catalog(files: dict[str, Path]) -> dict[str, Dataset]:
    return {name: Dataset(name, path, "parquet" if path.suffix == ".parquet" else "csv", PERMISSIVE)
            for name, path in files.items()}


@pytest.fixture(scope="module")
def tables(catalog: dict[str, Dataset]) -> dict[str, list[list[str]]]:
    """Schemas as the kernel gets them: the executor's own view of each dataset."""
    return {name: [[c, d] for c, d in executor.schema_of(P.scan(name), catalog)] for name in catalog}


@pytest.fixture(scope="module")
def frames(files: dict[str, Path]) -> dict[str, pl.DataFrame]:
    """The same files read independently with plain polars (the oracle's input)."""
    return {"patients": pl.read_parquet(files["patients"]),
            "regions": pl.read_csv(files["regions"], try_parse_dates=True),
            "diagnoses": pl.read_csv(files["diagnoses"], try_parse_dates=True)}


@pytest.fixture(scope="module")
def oracle(frames: dict[str, pl.DataFrame]) -> pl.SQLContext:
    return pl.SQLContext(frames, eager=True)


@pytest.fixture(scope="module")
def run(tables, catalog):
    def run_sql(query: str) -> pl.DataFrame:
        plan = sql_to_plan(query, tables)
        outcome = executor.evaluate(plan, catalog, "alice")
        assert isinstance(outcome, Released), outcome
        return outcome.table
    return run_sql


def assert_same(got: pl.DataFrame, expected: pl.DataFrame, ordered: bool) -> None:
    assert got.columns == expected.columns
    if not ordered:
        got, expected = got.sort(got.columns, nulls_last=True), expected.sort(expected.columns, nulls_last=True)
    assert_frame_equal(got, expected, check_dtypes=False, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


# ----------------------------------------------------- queries vs polars SQL
# (query, ordered): polars' SQL engine runs the same text as the oracle.
SAME_AS_POLARS_SQL = [
    ("SELECT * FROM patients", False),
    ("SELECT patient_id, age, cost FROM patients WHERE age >= 65 AND sex = 'F'", False),
    ("SELECT patient_id, age * 2 + 1 AS x, cost / length_of_stay AS per_day, -age AS neg, age % 7 AS m "
     "FROM patients", False),
    ("SELECT patient_id FROM patients WHERE diagnosis IN ('asthma', 'diabetes') AND NOT smoker", False),
    ("SELECT patient_id FROM patients WHERE diagnosis NOT IN ('asthma', 'diabetes') OR smoker IS NULL", False),
    ("SELECT patient_id, age FROM patients WHERE age BETWEEN 30 AND 40", False),
    ("SELECT patient_id FROM patients WHERE cost IS NULL", False),
    ("SELECT patient_id FROM patients WHERE cost IS NOT NULL AND (age < 20 OR age > 80)", False),
    ("SELECT name FROM patients WHERE name LIKE 'A%'", False),
    ("SELECT name FROM patients WHERE name LIKE '%son'", False),
    ("SELECT name FROM patients WHERE name LIKE '%an%'", False),
    ("SELECT name FROM patients WHERE name LIKE 'A_a %'", False),
    ("SELECT name FROM patients WHERE name NOT LIKE '%a%'", False),
    ("SELECT name FROM patients WHERE name ILIKE 'ada%'", False),
    ("SELECT diagnosis FROM patients WHERE diagnosis LIKE 'rare disease X'", False),
    ("SELECT patient_id, CASE WHEN age < 18 THEN 'child' WHEN age < 65 THEN 'adult' ELSE 'senior' END AS band "
     "FROM patients", False),
    ("SELECT patient_id, CASE sex WHEN 'F' THEN 1 WHEN 'M' THEN 2 END AS s FROM patients", False),
    ("SELECT CAST(age AS DOUBLE) AS a, CAST(patient_id AS VARCHAR) AS pid, CAST(age AS INTEGER) AS i "
     "FROM patients", False),
    ("SELECT ROUND(cost, 1) AS r, ABS(cost - 2000) AS a, SQRT(age) AS s, EXP(age / 100.0) AS e, "
     "LN(age + 1) AS l, POWER(age, 2) AS p FROM patients", False),
    ("SELECT LOWER(name) AS lo, UPPER(diagnosis) AS up, LENGTH(name) AS len, SUBSTRING(name, 2, 3) AS sub, "
     "SUBSTR(name, 3) AS tail FROM patients", False),
    ("SELECT TRIM('  ' || name || ' ') AS t, name || '/' || sex AS ns FROM patients", False),
    ("SELECT patient_id, COALESCE(cost, 0) AS c, COALESCE(smoker, false) AS s FROM patients", False),
    ("SELECT EXTRACT(YEAR FROM admission_date) AS y, EXTRACT(MONTH FROM admission_date) AS m, "
     "EXTRACT(DAY FROM admission_date) AS d FROM patients", False),
    ("SELECT patient_id FROM patients WHERE admission_date >= '2024-06-01'", False),
    ("SELECT patient_id FROM patients WHERE admission_date BETWEEN '2023-03-01' AND '2023-03-31'", False),
    ("SELECT patient_id FROM patients WHERE admission_date = DATE '2023-05-01'", False),
    ("SELECT DISTINCT diagnosis FROM patients", False),
    ("SELECT * EXCLUDE (name, cost) FROM patients", False),
    ("SELECT DISTINCT sex, smoker FROM patients", False),
    ("SELECT diagnosis, COUNT(*) AS n, COUNT(cost) AS n_cost, COUNT(DISTINCT zip) AS zips, "
     "COUNT(DISTINCT smoker) AS smoke_kinds, SUM(cost) AS total, AVG(age) AS mean_age, MIN(age) AS youngest, "
     "MAX(admission_date) AS last_seen, MEDIAN(cost) AS med FROM patients GROUP BY diagnosis", False),
    ("SELECT sex, STDDEV(cost) AS sd, STDDEV_SAMP(age) AS sd2, VARIANCE(cost) AS v, VAR_SAMP(age) AS v2 "
     "FROM patients GROUP BY sex", False),
    ("SELECT diagnosis, sex, AVG(cost) AS c FROM patients GROUP BY 1, 2", False),
    ("SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis HAVING COUNT(*) > 100", False),
    ("SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis HAVING AVG(cost) > 2500", False),
    ("SELECT COUNT(*) AS n, AVG(age) AS a, MAX(cost) AS top FROM patients WHERE smoker", False),
    ("SELECT diagnosis, SUM(cost) / COUNT(*) AS per_patient, MAX(age) - MIN(age) AS span "
     "FROM patients GROUP BY diagnosis", False),
    ("SELECT patient_id, cost FROM patients ORDER BY cost DESC NULLS LAST, patient_id LIMIT 20", True),
    ("SELECT patient_id, cost FROM patients ORDER BY cost ASC NULLS FIRST, patient_id LIMIT 20", True),
    ("SELECT patient_id, age FROM patients ORDER BY 2 DESC, 1 LIMIT 15", True),
    ("SELECT patient_id AS id, age AS years FROM patients ORDER BY years, id LIMIT 15", True),
    ("SELECT patient_id FROM patients ORDER BY age * -1, patient_id LIMIT 10", True),
    ("SELECT patient_id, age FROM patients ORDER BY age, patient_id LIMIT 10 OFFSET 5", True),
    ("SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis ORDER BY n DESC, diagnosis", True),
    ("SELECT DISTINCT diagnosis FROM patients ORDER BY diagnosis LIMIT 4", True),
    ("SELECT p.patient_id, d.category, d.name AS code FROM patients p JOIN diagnoses d "
     "ON p.diagnosis = d.diagnosis", False),
    ("SELECT p.patient_id, d.category FROM patients AS p LEFT JOIN diagnoses AS d "
     "ON p.diagnosis = d.diagnosis", False),
    ("SELECT p.patient_id, p.diagnosis, d.diagnosis AS d_diag, d.category FROM patients p FULL JOIN diagnoses d "
     "ON p.diagnosis = d.diagnosis", False),
    ("SELECT d.category, COUNT(*) AS n, AVG(p.cost) AS c FROM patients p INNER JOIN diagnoses d "
     "ON d.diagnosis = p.diagnosis GROUP BY d.category", False),
    ("SELECT p.patient_id, r.region FROM patients p JOIN regions r ON p.zip = CAST(r.zip AS VARCHAR) "
     "WHERE r.region = 'south'", False),
    ("SELECT d.name AS code, r.region FROM diagnoses d CROSS JOIN regions r", False),
    ("SELECT t.diagnosis, t.n FROM (SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis) AS t "
     "WHERE t.n > 50", False),
    ("WITH old AS (SELECT * FROM patients WHERE age > 70), "
     "per AS (SELECT zip, COUNT(*) AS n, AVG(cost) AS c FROM old GROUP BY zip) "
     "SELECT zip, n, c FROM per WHERE n > 5", False),
    ("WITH a AS (SELECT zip, COUNT(*) AS n FROM patients GROUP BY zip), "
     "b AS (SELECT zip, AVG(cost) AS c FROM patients GROUP BY zip) "
     "SELECT a.zip, a.n, b.c FROM a JOIN b ON a.zip = b.zip", False),
    ("SELECT diagnosis AS x FROM patients WHERE age < 10 UNION ALL SELECT sex AS x FROM patients "
     "WHERE age > 95", False),
    ("SELECT diagnosis AS x FROM patients UNION SELECT sex AS x FROM patients", False),
]


@pytest.mark.parametrize("query, ordered", SAME_AS_POLARS_SQL, ids=[q[:80] for q, _ in SAME_AS_POLARS_SQL])
def test_query_matches_polars_sql(query: str, ordered: bool, run, oracle) -> None:
    got = run(query)
    expected = oracle.execute(query)
    assert_same(got, expected, ordered)


# ----------------------------------------- queries vs hand-written polars
def test_select_star_join_suffixes_clashes_with_right(run, frames) -> None:
    got = run("SELECT * FROM patients p JOIN diagnoses d ON p.diagnosis = d.diagnosis")
    p, d = frames["patients"], frames["diagnoses"]
    expected = p.join(d.rename({"diagnosis": "diagnosis_right", "name": "name_right"}),
                      left_on="diagnosis", right_on="diagnosis_right", how="inner", coalesce=False)
    assert got.columns == p.columns + ["diagnosis_right", "category", "name_right"]
    assert_same(got, expected.select(got.columns), ordered=False)


def test_qualified_access_to_clashing_columns(run, frames) -> None:
    got = run("SELECT p.name, d.name, p.diagnosis FROM patients p JOIN diagnoses d ON p.diagnosis = d.diagnosis")
    expected = (frames["patients"].join(frames["diagnoses"], on="diagnosis", suffix="_right")
                .select("name", "name_right", "diagnosis"))
    assert_same(got, expected, ordered=False)


def test_right_join_keeps_sql_column_order(run, frames) -> None:
    got = run("SELECT p.patient_id, d.diagnosis, d.category FROM patients p RIGHT JOIN diagnoses d "
              "ON p.diagnosis = d.diagnosis")
    expected = (frames["diagnoses"].join(frames["patients"], on="diagnosis", how="left", coalesce=False,
                                         suffix="_p")
                .select("patient_id", "diagnosis", "category"))
    assert_same(got, expected, ordered=False)
    assert got.filter(pl.col("diagnosis") == "sprain")["patient_id"].to_list() == [None]


def test_using_shows_the_key_once(run, frames) -> None:
    got = run("SELECT * FROM patients LEFT JOIN diagnoses USING (diagnosis)")
    expected = frames["patients"].join(frames["diagnoses"], on="diagnosis", how="left", suffix="_right")
    assert got.columns == expected.columns
    assert_same(got, expected, ordered=False)


def test_semi_and_anti_join(run, frames) -> None:
    p, d = frames["patients"], frames["diagnoses"]
    got = run("SELECT patient_id FROM patients p SEMI JOIN diagnoses d ON p.diagnosis = d.diagnosis")
    assert_same(got, p.join(d, on="diagnosis", how="semi").select("patient_id"), ordered=False)
    got = run("SELECT patient_id, diagnosis FROM patients p ANTI JOIN diagnoses d ON p.diagnosis = d.diagnosis")
    assert_same(got, p.join(d, on="diagnosis", how="anti").select("patient_id", "diagnosis"), ordered=False)
    assert set(got["diagnosis"]) == {"migraine", "rare disease X"}


def test_like_escapes_regex_metacharacters(run, frames) -> None:
    got = run("SELECT diagnosis, category FROM diagnoses WHERE category LIKE '%(bone)+[%'")
    expected = frames["diagnoses"].filter(pl.col("category").str.contains("(bone)+[", literal=True))
    assert_same(got, expected.select("diagnosis", "category"), ordered=False)
    assert got.height == 2
    got = run("SELECT diagnosis FROM diagnoses WHERE category LIKE 'trauma _bone_+[x]'")
    assert sorted(got["diagnosis"]) == ["fracture", "sprain"]
    got = run("SELECT diagnosis FROM diagnoses WHERE category LIKE 'trauma%' ESCAPE '!' "
              "AND category NOT LIKE '%!%%' ESCAPE '!'")
    assert sorted(got["diagnosis"]) == ["fracture", "sprain"]


def test_constant_join_conditions(run, frames) -> None:
    got = run("SELECT COUNT(*) AS n FROM diagnoses d JOIN regions r ON 1 = 1")
    assert got["n"].to_list() == [frames["diagnoses"].height * frames["regions"].height]
    with pytest.raises(BastionError) as caught:
        run("SELECT * FROM diagnoses d LEFT JOIN regions r ON 1 = 1")
    assert caught.value.ename == "UnsupportedOperation" and "LEFT JOIN" in caught.value.evalue


def test_group_by_expression(run, frames) -> None:
    got = run("SELECT EXTRACT(YEAR FROM admission_date) AS y, sex, COUNT(*) AS n FROM patients "
              "GROUP BY EXTRACT(YEAR FROM admission_date), sex")
    expected = frames["patients"].group_by(pl.col("admission_date").dt.year().alias("y"), "sex") \
        .agg(pl.len().alias("n"))
    assert_same(got, expected, ordered=False)


def test_order_by_an_aggregate_not_selected(run, frames) -> None:
    got = run("SELECT diagnosis FROM patients GROUP BY diagnosis ORDER BY AVG(cost) DESC")
    expected = frames["patients"].group_by("diagnosis").agg(pl.col("cost").mean().alias("c")) \
        .sort("c", descending=True).select("diagnosis")
    assert_same(got, expected, ordered=True)


def test_inner_join_with_extra_condition(run, frames) -> None:
    got = run("SELECT p.patient_id, d.category FROM patients p JOIN diagnoses d "
              "ON p.diagnosis = d.diagnosis AND p.age > 70")
    expected = frames["patients"].join(frames["diagnoses"], on="diagnosis") \
        .filter(pl.col("age") > 70).select("patient_id", "category")
    assert got.height > 0
    assert_same(got, expected, ordered=False)


def test_population_variance(run, frames) -> None:
    got = run("SELECT sex, VAR_POP(age) AS vp, STDDEV_POP(age) AS sp FROM patients GROUP BY sex")
    expected = frames["patients"].group_by("sex").agg(pl.col("age").var(ddof=0).alias("vp"),
                                                      pl.col("age").std(ddof=0).alias("sp"))
    assert_same(got, expected, ordered=False)


def test_log_bases(run, frames) -> None:
    got = run("SELECT LOG(age + 1) AS l10, LOG(2, age + 1) AS l2, LN(age + 1) AS ln FROM patients")
    age = pl.col("age") + 1
    expected = frames["patients"].select(age.log(10).alias("l10"), age.log(2).alias("l2"),
                                         age.log(math.e).alias("ln"))
    assert_same(got, expected, ordered=False)


def test_hour_and_weekday(run, frames) -> None:
    got = run("SELECT patient_id, EXTRACT(ISODOW FROM admission_date) AS wd, "
              "HOUR(CAST(admission_date AS TIMESTAMP)) AS h FROM patients")
    expected = frames["patients"].select("patient_id", pl.col("admission_date").dt.weekday().alias("wd"),
                                         pl.col("admission_date").cast(pl.Datetime).dt.hour().alias("h"))
    assert_same(got, expected, ordered=False)


def test_date_in_list_of_strings(run, frames) -> None:
    got = run("SELECT patient_id FROM patients WHERE admission_date IN ('2023-05-01', '2024-02-29')")
    days = [datetime.date(2023, 5, 1), datetime.date(2024, 2, 29)]
    expected = frames["patients"].filter(pl.col("admission_date").is_in(days)).select("patient_id")
    assert got.height > 0
    assert_same(got, expected, ordered=False)


def test_lateral_alias_in_select_and_having_alias(run, frames) -> None:
    got = run("SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis HAVING n > 100")
    expected = frames["patients"].group_by("diagnosis").agg(pl.len().alias("n")).filter(pl.col("n") > 100)
    assert_same(got, expected, ordered=False)


def test_group_by_select_alias(run, frames) -> None:
    got = run("SELECT UPPER(sex) AS s, COUNT(*) AS n FROM patients GROUP BY s")
    expected = frames["patients"].group_by(pl.col("sex").str.to_uppercase().alias("s")).agg(pl.len().alias("n"))
    assert_same(got, expected, ordered=False)


def young_and_old(frames, below: int, above: int) -> pl.DataFrame:
    """The patients younger than ``below``, then those older than ``above``: a UNION ALL of the two."""
    p = frames["patients"]
    return pl.concat([p.filter(pl.col("age") < below), p.filter(pl.col("age") > above)])


def test_union_all_orders_and_limits(run, frames) -> None:
    got = run("SELECT patient_id AS id FROM patients WHERE age < 5 UNION ALL "
              "SELECT patient_id FROM patients WHERE age > 95 ORDER BY id DESC LIMIT 7")
    expected = young_and_old(frames, 5, 95).select(pl.col("patient_id").alias("id")) \
        .sort("id", descending=True).head(7)
    assert_same(got, expected, ordered=True)


def test_mixed_nulls_placement(run, frames) -> None:
    got = run("SELECT patient_id, smoker, cost FROM patients "
              "ORDER BY smoker NULLS FIRST, cost DESC NULLS LAST, patient_id LIMIT 60")
    expected = (frames["patients"].select("patient_id", "smoker", "cost")
                .sort(["smoker", "cost", "patient_id"], descending=[False, True, False],
                      nulls_last=[False, True, False]).head(60))
    assert_same(got, expected, ordered=True)


def test_unaliased_output_names(run) -> None:
    got = run("SELECT sex, COUNT(*), SUM(cost), AVG(age), COUNT(DISTINCT zip), MIN(age), MAX(age), "
              "UPPER(sex), CAST(MAX(age) AS DOUBLE) FROM patients GROUP BY sex")
    assert got.columns == ["sex", "count", "sum_cost", "avg_age", "count_distinct_zip", "min_age", "max_age",
                           "upper_sex", "max_age_1"]
    got = run("SELECT age + 1, age * 2, 42, p.zip, d.name, p.name FROM patients p "
              "JOIN diagnoses d ON p.diagnosis = d.diagnosis LIMIT 1")
    assert got.columns == ["age", "age_1", "literal", "zip", "name_right", "name"]


def test_hidden_aggregates_and_keys_do_not_leak(run) -> None:
    got = run("SELECT diagnosis FROM patients GROUP BY diagnosis, sex HAVING AVG(cost) > 0 "
              "ORDER BY MAX(age), diagnosis LIMIT 3")
    assert got.columns == ["diagnosis"]
    assert got.height == 3


# ------------------------------------ names and types (sqlglot's qualify and annotate_types)
def test_names_ignore_case(run, oracle) -> None:
    got = run("SELECT Patient_ID, P.AGE FROM Patients AS p WHERE p.Age > 80")
    assert got.columns == ["Patient_ID", "AGE"]
    expected = oracle.execute("SELECT patient_id, age FROM patients WHERE age > 80")
    assert_same(got.rename({"Patient_ID": "patient_id", "AGE": "age"}), expected, ordered=False)


def test_select_aliases_in_where_and_later_items(run, frames) -> None:
    got = run("SELECT age * 2 AS a, a + 1 AS b FROM patients WHERE a > 150")
    twice = pl.col("age") * 2
    expected = frames["patients"].filter(twice > 150).select(twice.alias("a"), (twice + 1).alias("b"))
    assert got.height > 0
    assert_same(got, expected, ordered=False)


def test_star_over_a_subquery_keeps_its_unique_names(run, frames) -> None:
    got = run("SELECT * FROM (SELECT p.name, d.name, age + 1, age * 2 FROM patients p "
              "JOIN diagnoses d ON p.diagnosis = d.diagnosis) t")
    assert got.columns == ["name", "name_right", "age", "age_1"]
    expected = (frames["patients"].join(frames["diagnoses"], on="diagnosis", suffix="_right")
                .select("name", "name_right", (pl.col("age") + 1).alias("age"), (pl.col("age") * 2).alias("age_1")))
    assert_same(got, expected, ordered=False)


def test_with_query_outputs_keep_their_names_and_types(run, frames) -> None:
    # The date literal is compared with a date: the type of MAX(admission_date) crosses the WITH.
    got = run("WITH per AS (SELECT zip, COUNT(*), MAX(admission_date) FROM patients GROUP BY zip) "
              "SELECT zip, count FROM per WHERE max_admission_date >= '2024-06-01'")
    expected = (frames["patients"].group_by("zip")
                .agg(pl.len().alias("count"), pl.col("admission_date").max().alias("last"))
                .filter(pl.col("last") >= datetime.date(2024, 6, 1)).select("zip", "count"))
    assert got.height > 0
    assert_same(got, expected, ordered=False)


def test_union_order_by_position_and_date_literal(run, frames) -> None:
    got = run("SELECT admission_date AS d FROM patients WHERE age < 20 UNION ALL "
              "SELECT admission_date FROM patients WHERE age > 90 ORDER BY d >= '2024-01-01', 1 DESC")
    union = young_and_old(frames, 20, 90).select(pl.col("admission_date").alias("d"))
    expected = union.sort([pl.col("d") >= datetime.date(2024, 1, 1), pl.col("d")], descending=[False, True],
                          nulls_last=True)
    assert_same(got, expected, ordered=True)


def test_using_joins_after_a_right_join_use_the_merged_key(run, frames) -> None:
    # Patients whose diagnosis has no category come in through the RIGHT JOIN; the next
    # USING join must match them on the merged key, not on the diagnoses side's (null) copy.
    got = run("SELECT patient_id, diagnosis, category, n FROM diagnoses d RIGHT JOIN "
              "(SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis) c USING (diagnosis) "
              "JOIN patients p USING (diagnosis)")
    p, d = frames["patients"], frames["diagnoses"]
    counts = p.group_by("diagnosis").agg(pl.len().alias("n"))
    expected = (counts.join(d, on="diagnosis", how="left").join(p, on="diagnosis")
                .select("patient_id", "diagnosis", "category", "n"))
    assert "migraine" in set(got["diagnosis"])
    assert_same(got, expected, ordered=False)


def test_qualified_star_shows_the_tables_own_using_copy(run, frames) -> None:
    got = run("SELECT d.* FROM patients p LEFT JOIN diagnoses d USING (diagnosis)")
    expected = (frames["patients"].join(frames["diagnoses"], on="diagnosis", how="left", coalesce=False,
                                        suffix="_d")
                .select(pl.col("diagnosis_d").alias("diagnosis"), "category", pl.col("name_d").alias("name")))
    assert got["diagnosis"].null_count() > 0
    assert_same(got, expected, ordered=False)


def test_a_hidden_key_joined_with_using_passes_through(files) -> None:
    # The USING key shown once is the kept side's column itself, not COALESCE of both copies:
    # a hidden key may pass through a join, and is released masked.
    hidden = Policy(min_group_size=1, unsafe="log", hidden=frozenset({"patient_id"}))
    catalog = {name: Dataset(name, files["patients"], "parquet", hidden) for name in ("patients", "again")}
    tables = {name: [[c, d] for c, d in executor.schema_of(P.scan(name), catalog)] for name in catalog}
    for query in ("SELECT * FROM patients JOIN again USING (patient_id)",
                  "SELECT patient_id, a.cost FROM patients LEFT JOIN again a USING (patient_id)"):
        outcome = executor.evaluate(sql_to_plan(query, tables), catalog, "alice")
        assert isinstance(outcome, Released), outcome
        assert "patient_id" in outcome.table.columns


def test_columns_sql_cannot_tell_apart_are_refused() -> None:
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT age FROM t", {"t": [["Age", "Int64"], ["age", "Int64"]]})
    assert caught.value.ename == "SchemaError"
    assert "'Age'" in caught.value.evalue and "'age'" in caught.value.evalue


# --------------------------------------------------------------- plan shape
def test_plans_use_only_whitelisted_names(tables) -> None:
    for query, _ in SAME_AS_POLARS_SQL:
        plan = sql_to_plan(query, tables)
        for node in walk(plan):
            if "expr" in node:
                assert node["expr"] in P.EXPR_KINDS
                assert set(node) - {"expr"} == set(P.EXPR_KINDS[node["expr"]])
                if node["expr"] == "fn":
                    assert node["name"] in P.EXPR_FUNCTIONS
            else:
                assert node["op"] in P.FRAME_OPS
                assert set(node) - {"op"} == set(P.FRAME_OPS[node["op"]])
        P.canonical_json(plan)  # plain JSON


def test_saved_results_are_read_with_a_saved_node(tables) -> None:
    plan = sql_to_plan("SELECT * FROM mine", {**tables, "mine": [["a", "Int64"]]}, saved={"mine"})
    assert plan["input"] == {"op": "saved", "name": "mine"}


# --------------------------------------------------------------- refusals
REFUSALS = [
    ("SELECT * FROM read_csv('/etc/passwd')", "UnsupportedOperation", "read_csv"),
    ("SELECT * FROM read_parquet('x.parquet')", "UnsupportedOperation", "read_parquet"),
    ("SELECT * FROM read_csv_auto('x.csv')", "UnsupportedOperation", "read_csv"),
    ("SELECT * FROM generate_series(1, 10)", "UnsupportedOperation", "generate_series"),
    ("SELECT * FROM 'patients.csv'", "UnsupportedOperation", "file path"),
    ("SELECT * FROM '/data/x.parquet'", "UnsupportedOperation", "file path"),
    ("SELECT * FROM main.patients", "UnsupportedOperation", "schema-qualified"),
    ("SELECT main.patients.age FROM patients", "UnsupportedOperation", "schema-qualified"),
    ("SELECT * EXCLUDE (nosuch) FROM patients", "SchemaError", "nosuch"),
    ("INSERT INTO patients VALUES (1)", "UnsupportedOperation", "INSERT"),
    ("DROP TABLE patients", "UnsupportedOperation", "DROP"),
    ("ATTACH 'other.db' AS other", "UnsupportedOperation", "ATTACH"),
    ("COPY patients TO 'out.csv'", "UnsupportedOperation", "COPY"),
    ("PRAGMA table_info('patients')", "UnsupportedOperation", "PRAGMA"),
    ("SET threads = 1", "UnsupportedOperation", "SET"),
    ("CREATE TABLE t AS SELECT * FROM patients", "UnsupportedOperation", "CREATE"),
    ("UPDATE patients SET age = 1", "UnsupportedOperation", "UPDATE"),
    ("DELETE FROM patients", "UnsupportedOperation", "DELETE"),
    ("SELECT * FROM patients; SELECT * FROM patients", "UnsupportedOperation", "multiple statements"),
    ("SELECT * FROM nosuch", "SchemaError", "nosuch"),
    ("SELECT nosuch FROM patients", "SchemaError", "nosuch"),
    ("SELECT q.age FROM patients p", "SchemaError", "'q'"),
    ("SELECT name FROM patients p JOIN diagnoses d ON p.diagnosis = d.diagnosis", "SchemaError", "ambiguous"),
    ("SELECT ROW_NUMBER() OVER (PARTITION BY zip) AS r FROM patients", "UnsupportedOperation", "window"),
    ("SELECT AVG(cost) OVER () FROM patients", "UnsupportedOperation", "window"),
    ("SELECT * FROM patients p WHERE cost > (SELECT AVG(cost) FROM patients q WHERE q.zip = p.zip)",
     "UnsupportedOperation", "correlated subquery"),
    ("SELECT * FROM patients WHERE cost > (SELECT AVG(cost) FROM patients)", "UnsupportedOperation",
     "scalar subquery"),
    ("SELECT * FROM patients WHERE zip IN (SELECT zip FROM patients)", "UnsupportedOperation", "IN (subquery)"),
    ("SELECT * FROM patients p WHERE EXISTS (SELECT 1 FROM diagnoses d WHERE d.diagnosis = p.diagnosis)",
     "UnsupportedOperation", "correlated subquery"),
    ("SELECT my_udf(age) FROM patients", "UnsupportedOperation", "Anonymous function my_udf"),
    ("SELECT 1", "UnsupportedOperation", "without FROM"),
    ("SELECT * FROM patients INTERSECT SELECT * FROM patients", "UnsupportedOperation", "INTERSECT"),
    ("SELECT * FROM patients p NATURAL JOIN diagnoses d", "UnsupportedOperation", "NATURAL"),
    ("SELECT * FROM patients p LEFT JOIN diagnoses d ON p.age > 3", "UnsupportedOperation", "LEFT JOIN"),
    ("SELECT age FROM patients QUALIFY age > 3", "UnsupportedOperation", "QUALIFY"),
    ("SELECT SUM(cost) FILTER (WHERE age > 3) FROM patients", "UnsupportedOperation", "FILTER"),
    ("SELECT age, COUNT(*) FROM patients", "SchemaError", "GROUP BY"),
    ("SELECT * FROM patients WHERE SUM(age) > 3", "UnsupportedOperation", "WHERE"),
    ("SELECT CAST(age AS DECIMAL(10, 2)) FROM patients", "UnsupportedOperation", "DECIMAL"),
    ("WITH RECURSIVE r AS (SELECT 1) SELECT * FROM r", "UnsupportedOperation", "RECURSIVE"),
    ("SELECT SUM(DISTINCT age) FROM patients", "UnsupportedOperation", "DISTINCT"),
    ("SELECT age AS a, cost AS a FROM patients", "SchemaError", "two columns named 'a'"),
    ("SELECT * FROM patients TABLESAMPLE 10%", "UnsupportedOperation", "SAMPLE"),
    ("SELECT * FROM patients LIMIT age", "UnsupportedOperation", "LIMIT"),
    ("SELECT * FROM patients p FULL JOIN diagnoses d USING (diagnosis)", "UnsupportedOperation", "FULL JOIN"),
    ("SELECT * FROM patients p JOIN diagnoses d USING (nosuch)", "SchemaError", "nosuch"),
    ("SELECT p.nosuch FROM patients p", "SchemaError", "nosuch"),
    ("SELECT p FROM patients p", "SchemaError", "unknown column 'p'"),
    ("SELECT patient_id FROM patients ORDER BY 5", "SchemaError", "5"),
    ("SELECT age FROM patients WHERE age IN (SELECT age FROM (SELECT age FROM patients) s)", "UnsupportedOperation",
     "IN (subquery)"),
]


@pytest.mark.parametrize("query, ename, named", REFUSALS, ids=[q[:60] for q, _, _ in REFUSALS])
def test_refusals_are_typed_and_name_the_construct(query: str, ename: str, named: str, tables) -> None:
    with pytest.raises(BastionError) as caught:
        sql_to_plan(query, tables)
    assert caught.value.ename == ename, caught.value.evalue
    assert named.lower() in caught.value.evalue.lower(), caught.value.evalue


def test_unknown_names_list_the_known_ones(tables) -> None:
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT * FROM nosuch", tables)
    assert all(name in caught.value.evalue for name in ("patients", "regions", "diagnoses"))
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT agee FROM patients", tables)
    assert "admission_date" in caught.value.evalue and caught.value.details["column"] == "agee"
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT name FROM patients p JOIN diagnoses d ON p.diagnosis = d.diagnosis", tables)
    assert "p.name" in caught.value.evalue and "d.name" in caught.value.evalue


def test_parse_errors_carry_a_position(tables) -> None:
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT age\nFROM patients WHERE (age >", tables)
    assert caught.value.ename == "ParseError"
    assert caught.value.details.get("line") == 2
    for text in ("SELECT 'unterminated FROM patients", "", "   ;  ", "SELEC age FROM patients"):
        with pytest.raises(BastionError) as caught:
            sql_to_plan(text, tables)
        assert caught.value.ename == "ParseError", (text, caught.value.evalue)


def test_refusal_points_at_the_construct(tables) -> None:
    with pytest.raises(BastionError) as caught:
        sql_to_plan("SELECT age,\n       my_udf(age) FROM patients", tables)
    assert caught.value.details.get("line") == 2


def test_replace_is_refused_until_the_plan_has_replace_all(tables) -> None:
    query = "SELECT REPLACE(name, 'a', 'o') AS n FROM patients"
    if "str.replace_all" in P.EXPR_FUNCTIONS:
        assert sql_to_plan(query, tables)["exprs"][0]["input"]["name"] == "str.replace_all"
    else:
        with pytest.raises(BastionError) as caught:
            sql_to_plan(query, tables)
        assert caught.value.ename == "UnsupportedOperation" and "REPLACE" in caught.value.evalue


def test_deep_nesting_is_a_typed_error(tables) -> None:
    query = "SELECT " + "(" * 3000 + "age" + ")" * 3000 + " FROM patients"
    with pytest.raises(BastionError) as caught:
        sql_to_plan(query, tables)
    assert caught.value.ename in ("ParseError", "LimitExceeded")
