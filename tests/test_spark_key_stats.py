"""Per-key statistics on the Spark engine (owner_console/engine/spark/key_stats.py) against a real Spark.

The accounted result of a group-by of a whole source is the same, column for
column and value for value (the accounting columns included), with and
without the statistics, on data with nulls, zeros, NaN, inf and a rare key;
the statistics follow a replaced file; and the Spark job of a covered
group-by aggregates no accounting column (its plan holds the scientist's
aggregates and one row count).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import alias, binary, col, fn, frame_op, length, lit, scan
from owner_console.engine.spark import engine as spark_engine
from owner_console.engine.spark import key_stats
from owner_console.engine.spark.engine import SparkEngine
from owner_console.model import Dataset, Policy
from owner_console.policy import account
from owner_console.validate import validate

pytestmark = [pytest.mark.spark, pytest.mark.slow]

NAN, INF = float("nan"), float("inf")


def table(shift: float = 0.0) -> pl.DataFrame:
    """Groups a (many rows), b, c, a rare key, a null key; ints with nulls and zeros; floats with NaN, inf."""
    rows = 600
    region = (["a"] * 300 + ["b"] * 150 + ["c"] * 120 + ["rare"] + [None] * 29)[:rows]
    x = [None if i % 17 == 0 else (0 if i % 5 == 0 else i % 41 - 7) for i in range(rows)]
    y = [None if i % 13 == 0 else 0.0 if i % 7 == 0 else (i % 23) * 1.5 - 4.0 + shift for i in range(rows)]
    y[455] = NAN   # in group c: its dominance bound is not finite
    y[320] = INF   # in group b
    y[570] = -INF  # the rare key's one row
    flag = [None if i % 11 == 0 else i % 3 == 0 for i in range(rows)]
    return pl.DataFrame({"region": region, "x": x, "y": y, "flag": flag},
                        schema={"region": pl.String, "x": pl.Int64, "y": pl.Float64, "flag": pl.Boolean})


GROUPED = frame_op("group_by", input=scan("t"), keys=[col("region")],
                   aggs=[alias(length(), "n"), alias(fn("mean", col("y")), "mean_y"),
                         alias(fn("sum", col("x")), "sum_x"), alias(fn("count", col("x")), "count_x"),
                         alias(fn("sum", col("flag")), "flags"), alias(fn("max", col("y")), "max_y")])
# The group-by over a rename and a sort of the whole source: still every row once.
RENAMED = frame_op("group_by", input=frame_op("rename", input=frame_op("sort", input=scan("t"), by=[col("x")],
                                                                       descending=[False], nulls_last=False),
                                              mapping={"region": "area"}),
                   keys=[col("area")], aggs=[alias(fn("sum", col("y")), "sum_y"), alias(length(), "n")])
# A filtered source is not the whole source: no statistics.
FILTERED = frame_op("group_by", input=frame_op("filter", input=scan("t"), predicate=binary("gt", col("x"), lit(0))),
                    keys=[col("region")], aggs=[alias(fn("sum", col("y")), "sum_y")])


@pytest.fixture
def engine(spark, monkeypatch):
    monkeypatch.setattr(key_stats, "KEY_STATS_MIN_ROWS", 0)
    spark_engine._compiled_plans.clear()
    key_stats.forget()
    yield SparkEngine()
    spark_engine._compiled_plans.clear()
    key_stats.forget()


def catalog_of(path: Path) -> dict[str, Dataset]:
    return {"t": Dataset("t", path, "parquet", Policy(min_group_size=3), engine="spark")}


def accounted(plan: dict, catalog: dict, engine: SparkEngine) -> dict:
    checked = validate(plan, catalog, dataset_columns=engine.columns)
    return account(checked, unique_keys=lambda name, keys: engine.unique_keys(catalog[name], keys)).plan


def run(engine: SparkEngine, plan: dict, catalog: dict, stats: bool, monkeypatch) -> pl.DataFrame:
    """The accounted plan's whole result (accounting columns included), compiled afresh with or without
    statistics."""
    spark_engine._compiled_plans.clear()
    if not stats:
        monkeypatch.setattr(SparkEngine, "_key_stats", lambda *args, **kwargs: None)
    try:
        return engine.run(accounted(plan, catalog, engine), catalog)
    finally:
        monkeypatch.undo()
        monkeypatch.setattr(key_stats, "KEY_STATS_MIN_ROWS", 0)
        spark_engine._compiled_plans.clear()


def covered(engine: SparkEngine, plan: dict, catalog: dict) -> bool:
    """True when the compiled plan's aggregation reads its checks from per-key statistics."""
    compiled = engine._compiled(accounted(plan, catalog, engine), catalog)
    optimized = compiled.frame._jdf.queryExecution().optimizedPlan().toString()
    return "var_pop" not in optimized


@pytest.mark.parametrize("plan", [GROUPED, RENAMED], ids=["group_by", "renamed_sorted"])
def test_accounted_result_is_the_same_with_and_without_statistics(engine, tmp_path, monkeypatch, plan):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    with_stats = run(engine, plan, catalog, True, monkeypatch)
    without = run(engine, plan, catalog, False, monkeypatch)
    assert any(c.startswith("__bastion_") for c in with_stats.columns)
    assert_frame_equal(with_stats, without)
    # The rare key and the null key are groups of their own; the NaN and inf groups fail the bound.
    assert set(with_stats.get_column(with_stats.columns[0]).to_list()) == {"a", "b", "c", "rare", None}
    assert covered(engine, plan, catalog)


def test_a_covered_job_aggregates_no_accounting_column(engine, tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    plan = accounted(GROUPED, catalog, engine)
    spark_engine._compiled_plans.clear()
    frame = engine._compiled(plan, catalog).frame
    optimized = frame._jdf.queryExecution().optimizedPlan().toString()
    aggregates = [line for line in optimized.splitlines() if "Aggregate [" in line]
    # One aggregation: the scientist's mean, sum, count, sum, max, the length and the guard's count; no
    # variance, no sum of doubles (an integer sum's finiteness), no window (the holders of the max).
    assert len(aggregates) == 1
    for absent in ("var_pop", "as double", "min("):
        assert absent not in aggregates[0], aggregates[0]
    assert "Window" not in optimized and "LocalRelation" in optimized
    spark_engine._compiled_plans.clear()
    monkeypatch.setattr(SparkEngine, "_key_stats", lambda *args, **kwargs: None)
    plain = engine._compiled(plan, catalog).frame._jdf.queryExecution().optimizedPlan().toString()
    assert "var_pop" in next(line for line in plain.splitlines() if "Aggregate [" in line)


def test_a_filtered_source_gets_no_statistics(engine, tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    assert not covered(engine, FILTERED, catalog)
    assert_frame_equal(run(engine, FILTERED, catalog, True, monkeypatch),
                       run(engine, FILTERED, catalog, False, monkeypatch))


def test_statistics_follow_a_replaced_file(engine, tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    first = run(engine, GROUPED, catalog, True, monkeypatch)
    # New data: shifted values and one more row of the rare key (its group count changes).
    replaced = pl.concat([table(shift=1000.0), table().filter(pl.col("region") == "rare")])
    replaced.write_parquet(path)
    later = time.time() + 5
    os.utime(path, (later, later))
    with_stats = run(engine, GROUPED, catalog, True, monkeypatch)
    without = run(engine, GROUPED, catalog, False, monkeypatch)
    assert_frame_equal(with_stats, without)
    assert not with_stats.equals(first)
    versions = {key[1] for key in key_stats._kept}
    assert versions == {engine.data_version(catalog["t"])}


def test_a_group_the_statistics_do_not_know_fails_closed(engine, tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    plan = accounted(GROUPED, catalog, engine)
    stats = engine._key_stats(engine.spark(), catalog["t"], engine.data_version(catalog["t"]), ("region",),
                              {"x": pl.Int64, "y": pl.Float64, "flag": pl.Boolean}, {"y": pl.Float64})
    assert stats is not None and stats.height == 5
    # Statistics that disagree with the rows (a group count off by one): the checks get failing values.
    wrong = stats.with_columns(pl.col("__bastion_stat_len") + 1)
    monkeypatch.setattr(SparkEngine, "_key_stats", lambda *args, **kwargs: wrong)
    spark_engine._compiled_plans.clear()
    result = engine.run(plan, catalog)
    shares = [c for c in result.columns if c.startswith("__bastion_d")]
    contributors = [c for c in result.columns if c.startswith(("__bastion_k", "__bastion_h"))]
    assert shares and all(result.get_column(c).to_list() == [1] * 5 for c in shares)
    assert contributors and all(result.get_column(c).to_list() == [0] * 5 for c in contributors)


def test_statistics_are_measured_once_per_data_version_and_not_for_a_small_source(engine, tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    table().write_parquet(path)
    catalog = catalog_of(path)
    measured = []
    real = key_stats.measure

    def counting(*args, **kwargs):
        measured.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(key_stats, "measure", counting)
    run(engine, GROUPED, catalog, True, monkeypatch)
    monkeypatch.setattr(key_stats, "measure", counting)
    run(engine, GROUPED, catalog, True, monkeypatch)  # compiled afresh: the statistics are kept
    assert len(measured) == 1
    # A source whose Parquet footers count fewer rows than the threshold computes its checks in the job.
    monkeypatch.setattr(key_stats, "KEY_STATS_MIN_ROWS", table().height + 1)
    spark_engine._compiled_plans.clear()
    assert not covered(engine, GROUPED, catalog)


@pytest.mark.parametrize("dtype", [pl.Int32, pl.Date, pl.Boolean], ids=["int32", "date", "boolean"])
def test_keys_of_other_exact_types(engine, tmp_path, monkeypatch, dtype):
    raw = table()
    codes = pl.col("region").replace_strict({"a": 1, "b": 2, "c": 3, "rare": 4}, default=None)
    key = {pl.Int32: codes.cast(pl.Int32), pl.Date: (pl.date(2020, 1, 1) + pl.duration(days=codes)),
           pl.Boolean: codes > 1}[dtype]
    path = tmp_path / "t.parquet"
    raw.with_columns(key.alias("region")).write_parquet(path)
    catalog = catalog_of(path)
    assert covered(engine, GROUPED, catalog)
    assert_frame_equal(run(engine, GROUPED, catalog, True, monkeypatch),
                       run(engine, GROUPED, catalog, False, monkeypatch))


# ---------------------------------------------------------------- a group_by over a join with a small side
def big_table(nan: bool = False) -> pl.DataFrame:
    """The source: a join key (some keys absent from the small side, one null), a float with nulls and zeros
    (and a NaN when asked), an int."""
    rows = 600
    key = [None if i % 97 == 0 else i % 9 for i in range(rows)]
    a = [None if i % 13 == 0 else 0.0 if i % 7 == 0 else (i % 23) * 1.5 - 4.0 for i in range(rows)]
    if nan:
        a[200] = NAN
    x = [None if i % 17 == 0 else i % 41 - 7 for i in range(rows)]
    return pl.DataFrame({"key": key, "a": a, "x": x}, schema={"key": pl.Int64, "a": pl.Float64, "x": pl.Int64})


def small_table() -> pl.DataFrame:
    """The small side: a unique join key (one null), a region with a null, weights with a null and a zero."""
    return pl.DataFrame({"key": [0, 1, 2, 3, 4, 5, 6, 11, None],
                         "region": ["n", "n", "s", "s", None, "e", "e", "w", "w"],
                         "w1": [1.5, -2.0, 0.0, None, 3.0, 0.25, 4.0, 1.0, 2.0],
                         "w2": [1, 0, 2, None, 5, 7, 0, 1, 3]},
                        schema={"key": pl.Int64, "region": pl.String, "w1": pl.Float64, "w2": pl.Int64})


def joined(keys: list, aggs: list) -> dict:
    return frame_op("group_by", input=frame_op("join", left=scan("big"), right=scan("small"), how="inner",
                                               left_on=[col("key")], right_on=[col("key")], suffix="_right"),
                    keys=keys, aggs=aggs)


JOIN_LEFT = joined([col("region")], [alias(fn("sum", col("a")), "sum_a"), alias(fn("count", col("x")), "count_x"),
                                     alias(length(), "n")])
JOIN_RIGHT = joined([col("region")], [alias(fn("sum", col("w2")), "sum_w2"), alias(fn("mean", col("w1")), "m1")])
JOIN_PRODUCT = joined([col("region")], [alias(fn("mean", binary("mul", col("a"), col("w1"))), "mean_aw"),
                                        alias(fn("sum", col("w2")), "sum_w2"), alias(length(), "n")])
JOIN_BY_KEY = joined([col("key")], [alias(fn("mean", binary("mul", col("a"), col("w1"))), "mean_aw"),
                                    alias(fn("sum", col("a")), "sum_a")])


def join_catalog(tmp_path: Path, nan: bool = False) -> dict[str, Dataset]:
    big, small = tmp_path / "big.parquet", tmp_path / "small.parquet"
    big_table(nan).write_parquet(big)
    small_table().write_parquet(small)
    return {"big": Dataset("big", big, "parquet", Policy(min_group_size=3), engine="spark"),
            "small": Dataset("small", small, "parquet", Policy(min_group_size=3), engine="spark")}


def job_aggregates(engine: SparkEngine, plan: dict, catalog: dict) -> list[str]:
    spark_engine._compiled_plans.clear()
    optimized = engine._compiled(accounted(plan, catalog, engine), catalog).frame._jdf.queryExecution() \
        .optimizedPlan().toString()
    return [line for line in optimized.splitlines() if "Aggregate [" in line]


@pytest.mark.parametrize("plan", [JOIN_LEFT, JOIN_RIGHT, JOIN_PRODUCT, JOIN_BY_KEY],
                         ids=["left_column", "right_column", "product", "by_join_key"])
def test_a_join_is_accounted_the_same_with_and_without_statistics(engine, tmp_path, monkeypatch, plan):
    catalog = join_catalog(tmp_path)
    with_stats = run(engine, plan, catalog, True, monkeypatch)
    without = run(engine, plan, catalog, False, monkeypatch)
    assert any(c.startswith("__bastion_") for c in with_stats.columns)
    assert_frame_equal(with_stats, without)
    # The null region is a group; the region of a key the source lacks and of the null key meets nothing.
    if plan is not JOIN_BY_KEY:
        assert set(with_stats.get_column("region").to_list()) == {"n", "s", "e", None}
    assert all("var_pop" not in line for line in job_aggregates(engine, plan, catalog))


def test_a_covered_join_job_computes_no_accounting_of_its_terms(engine, tmp_path, monkeypatch):
    catalog = join_catalog(tmp_path)
    with_stats = " ".join(job_aggregates(engine, JOIN_PRODUCT, catalog))
    for absent in ("var_pop", "bit_or", "min("):
        assert absent not in with_stats, with_stats
    monkeypatch.setattr(SparkEngine, "_key_stats", lambda *args, **kwargs: None)
    without = " ".join(job_aggregates(engine, JOIN_PRODUCT, catalog))
    assert "var_pop" in without and "bit_or" in without


def test_a_product_with_a_nan_in_the_source_is_not_covered(engine, tmp_path, monkeypatch):
    catalog = join_catalog(tmp_path, nan=True)
    assert_frame_equal(run(engine, JOIN_PRODUCT, catalog, True, monkeypatch),
                       run(engine, JOIN_PRODUCT, catalog, False, monkeypatch))
    # The product's dominance bound stays in the job; the small side's w2 does not.
    aggregates = " ".join(job_aggregates(engine, JOIN_PRODUCT, catalog))
    assert "var_pop((a" in aggregates and "var_pop(cast(w2" not in aggregates, aggregates


def test_a_join_group_the_statistics_do_not_know_fails_closed(engine, tmp_path, monkeypatch):
    catalog = join_catalog(tmp_path)
    plan = accounted(JOIN_PRODUCT, catalog, engine)
    real = SparkEngine._key_stats

    def wrong(*args, **kwargs):
        stats = real(*args, **kwargs)
        return None if stats is None else stats.with_columns(pl.col("__bastion_stat_len") + 1)

    monkeypatch.setattr(SparkEngine, "_key_stats", wrong)
    spark_engine._compiled_plans.clear()
    result = engine.run(plan, catalog)
    shares = [c for c in result.columns if c.startswith("__bastion_d")]
    contributors = [c for c in result.columns if c.startswith("__bastion_k")]
    assert shares and all(set(result.get_column(c).to_list()) == {1} for c in shares)
    assert contributors and all(set(result.get_column(c).to_list()) == {0} for c in contributors)
