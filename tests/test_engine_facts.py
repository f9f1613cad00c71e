"""Owner-side facts (``engine.facts``) change how the accounting is computed, never what it decides.

A matrix of plans (group-bys by every kind of key, filters, joins, renamed
and overwritten columns, global selects, order statistics, every aggregate
over columns with and without nulls, zeros, NaN, inf and overflowing
integers) runs through the real executor path (``executor.evaluate``, real
polars) twice: with a dataset cache that measures facts and one that does
not.  The replies (released table, decision, reason, owner's details,
notes, or the error) and the accounting columns themselves must be
identical; the facts must be in use where they can be (else the test would
prove nothing), and must follow a replaced file.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine, executor, policy, validate
from owner_console.model import Dataset, Held, Policy

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

col, lit, fn, binary, alias, length = P.col, P.lit, P.fn, P.binary, P.alias, P.length
ROWS = 24_000  # at least cache.KEY_STATS_MIN_ROWS: group-bys of the whole table read per-key statistics


def op(name, **fields):
    return P.frame_op(name, **fields)


def _table(rows: int) -> pl.DataFrame:
    # Deterministic pseudo-random columns (seeded hashes), each with the property its name says.
    def uniform(seed: int) -> pl.Expr:
        return (pl.col("id").hash(seed) % 1_000_003).cast(pl.Float64) / 1_000_003

    frame = pl.select(pl.int_range(0, rows, dtype=pl.Int64).alias("id")).with_columns(
        # a key with nulls, and one with a rare value too (a group smaller than K)
        pl.when(pl.col("id") % 97 == 0).then(None).otherwise(pl.col("id").hash(1) % 4).cast(pl.Int64).alias("k"),
        pl.when(pl.col("id") % 401 == 0).then(7).otherwise(pl.col("id").hash(1) % 4).cast(pl.Int64).alias("kr"),
        pl.format("s{}", pl.col("id").hash(2) % 3).alias("s"),
        # no null, no zero, no two rows alike (the padded rule's most common value is then never tied)
        (pl.col("id").hash(3) % rows / rows + 0.5 + pl.col("id") / (rows * rows)).alias("f_clean"),
        pl.when(pl.col("id") % 5 == 0).then(0.0).otherwise(uniform(4)).alias("f_zero"),
        pl.when(pl.col("id") % 7 == 0).then(None).otherwise(uniform(5) + 1).alias("f_null"),
        pl.when(pl.col("id") == 11).then(float("nan")).when(pl.col("id") == 12).then(float("inf"))
        .otherwise(uniform(6)).alias("f_nan"),
        (pl.col("id").hash(7) % 1000 + 1).cast(pl.Int64).alias("i_small"),        # 1..1000
        (pl.col("id").hash(8) % 50).cast(pl.Int64).alias("i_zero"),
        (pl.lit(2 ** 62, dtype=pl.Int64) + pl.col("id")).alias("i_big"),        # sums overflow Int64
        pl.when(pl.col("id") % 13 == 0).then(None).otherwise(pl.col("id").hash(9) % 3 == 0).alias("b"),
        (uniform(10) * 4).round(0).alias("fk"),                                  # a float key
        # a long-tailed column: one person's value dominates its group
        pl.when(pl.col("id") == 17).then(1e9).otherwise(uniform(11)).alias("tail"),
        (pl.col("id") // 3).alias("person"),
    )
    return frame


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("facts")
    paths = {"t": root / "t.parquet", "dim": root / "dim.parquet"}
    _table(ROWS).write_parquet(paths["t"])
    pl.DataFrame({"k": [0, 1, 2, 3, 7], "w": [0.0, 0.5, 1.5, 2.0, 3.0], "region": ["n", "n", "s", "s", "e"],
                  "wi": [0, 1, 2, 3, 4]}).write_parquet(paths["dim"])
    # A small side with what its statistics must get right: NaN, -0.0, null values, a null group key, a
    # negative scale (its product's max is the scaled min), a tiny one and a huge one.
    paths["odd"] = root / "odd.parquet"
    pl.DataFrame({"k": [0, 1, 2, 3, 7], "w": [float("nan"), -0.0, None, -2.5, 1.0],
                  "v": [-1.5, 1e-290, 3.0, None, 1e200], "region": ["a", "a", "b", None, "b"],
                  "wi": [0, None, 2, 3, 4], "flag": [True, False, None, True, True]}).write_parquet(paths["odd"])
    return paths


POLICIES = {
    "k10": Policy(min_group_size=10, unsafe="review"),
    "k10_reject": Policy(min_group_size=10, unsafe="reject"),
    "people": Policy(min_group_size=10, unsafe="review", person_id="person"),
    "share": Policy(min_group_size=5, unsafe="review", max_share=0.3),
    "k1": Policy(min_group_size=1, unsafe="review"),
}

NUMERIC = ["f_clean", "f_zero", "f_null", "f_nan", "i_small", "i_zero", "i_big", "b", "tail"]
# Sums and the like (contributors, finiteness, dominance), and order statistics (holders of the value).
SUMS = [("sum", {}), ("mean", {}), ("std", {"ddof": 1}), ("var", {"ddof": 0}), ("count", {})]
ORDER = [("min", {}), ("max", {}), ("median", {}), ("quantile", {"quantile": 0.25, "interpolation": "nearest"}),
         ("n_unique", {})]
FUNCTIONS = SUMS + ORDER


def _aggs(columns, functions=FUNCTIONS):
    # Not the variance of integers near 2**62: polars' own result varies from run to run there (cancellation
    # in floating point, summed in a varying order), with or without facts.
    return [alias(fn(name, col(c), **args), f"{name}_{c}") for c in columns for name, args in functions
            if not (c == "b" and name in ("median", "quantile", "std", "var", "mean"))
            and not (c == "i_big" and name in ("std", "var"))]


def _plans() -> dict[str, dict]:
    t, dim = P.scan("t"), P.scan("dim")
    joined = op("join", left=t, right=dim, how="inner", left_on=[col("k")], right_on=[col("k")], suffix="_r")
    plans = {f"by_k_{c}": op("group_by", input=t, keys=[col("k")], aggs=_aggs([c], SUMS) + [alias(length(), "n")])
             for c in NUMERIC}
    plans.update({f"order_by_k_{c}": op("group_by", input=t, keys=[col("k")], aggs=_aggs([c], ORDER))
                  for c in ("i_zero", "b", "f_clean")})
    plans.update({
        "by_rare_key": op("group_by", input=t, keys=[col("kr")], aggs=_aggs(["f_clean", "i_zero"])),
        "by_string_key_aliased": op("group_by", input=t, keys=[alias(col("s"), "group")],
                                    aggs=_aggs(["f_clean", "i_zero"])),
        "by_two_keys": op("group_by", input=t, keys=[col("k"), col("s")], aggs=_aggs(["f_zero", "tail"])),
        "by_float_key": op("group_by", input=t, keys=[col("fk")], aggs=_aggs(["f_clean", "i_small"])),
        "by_high_cardinality_key": op("group_by", input=t, keys=[col("id")], aggs=_aggs(["f_clean"])),
        "filtered": op("group_by", input=op("filter", input=t, predicate=binary("gt", col("f_zero"), lit(0.3))),
                       keys=[col("k")], aggs=_aggs(["f_clean", "i_small", "tail"])),
        "sorted": op("group_by", input=op("sort", input=t, by=[col("f_zero")], descending=[False],
                                          nulls_last=False), keys=[col("k")], aggs=_aggs(["f_clean"])),
        # An overwritten column keeps its name but not its values (nor their facts).
        "overwritten": op("group_by", input=op("with_columns", input=t, exprs=[alias(col("f_zero"), "f_clean"),
                                                                              alias(col("f_nan"), "i_small")]),
                          keys=[col("k")], aggs=_aggs(["f_clean", "i_small"])),
        "renamed": op("group_by", input=op("rename", input=op("drop", input=t, columns=["f_clean"]),
                                           mapping={"f_zero": "f_clean"}),
                      keys=[col("k")], aggs=_aggs(["f_clean"])),
        "global": op("select", input=t, exprs=_aggs(["f_clean", "i_zero", "i_big", "f_nan"])),
        "global_filtered": op("select", input=op("filter", input=t, predicate=binary("lt", col("k"), lit(2))),
                              exprs=_aggs(["f_clean", "i_small"])),
        "padded": op("group_by", input=t, keys=[col("k")], aggs=[
            alias(fn("sum", P.when([(binary("gt", col("f_clean"), lit(1.4)), col("f_clean"))], lit(1.0))), "p")]),
        "inner_aggregate": op("group_by", input=t, keys=[col("k")], aggs=[
            alias(fn("sum", fn("filter", col("f_clean"), predicate=binary("gt", col("f_zero"), lit(0.5)))), "x")]),
        "expression": op("group_by", input=t, keys=[col("k")], aggs=[
            alias(fn("mean", binary("mul", col("f_clean"), col("f_zero"))), "m"),
            alias(fn("sum", binary("add", col("i_small"), lit(3))), "s"),
            alias(fn("sum", binary("mul", col("f_clean"), lit(1e300))), "huge")]),
        "join": op("group_by", input=joined, keys=[col("region")], aggs=[
            alias(fn("mean", binary("mul", col("f_clean"), col("w"))), "m"), alias(fn("sum", col("wi")), "s"),
            alias(fn("max", col("f_clean")), "top"), alias(length(), "n")]),
        "left_join": op("group_by", input=op("join", left=t, right=dim, how="left", left_on=[col("k")],
                                             right_on=[col("k")], suffix="_r"),
                        keys=[col("s")], aggs=[alias(fn("sum", col("w")), "w"), alias(fn("sum", col("i_zero")), "z")]),
        "rows": op("head", input=t, n=5),
        # Over a join of the whole table with a small side of unique keys, grouped by the small side's columns
        # or the join key: checks read from the table's per-key statistics and the small side's rows.
        "join_left_columns": op("group_by", input=joined, keys=[col("region")],
                                aggs=_aggs(["f_zero", "f_null", "f_nan", "i_small", "b", "tail"], SUMS)
                                + [alias(length(), "n")]),
        "join_by_key": op("group_by", input=joined, keys=[col("k")],
                          aggs=_aggs(["f_clean", "w", "wi"], SUMS) + [alias(length(), "n")]),
        "join_products": op("group_by", input=joined, keys=[col("region"), col("wi")], aggs=[
            alias(fn("mean", binary("mul", col("w"), col("f_zero"))), "a"),
            alias(fn("sum", binary("mul", col("f_null"), col("w"))), "b"),
            alias(fn("sum", binary("mul", col("f_nan"), col("w"))), "c"),
            alias(fn("sum", binary("mul", col("i_small"), col("w"))), "d")]),
        "join_odd_side": op("group_by", input=op("join", left=t, right=P.scan("odd"), how="inner",
                                                 left_on=[col("k")], right_on=[col("k")], suffix="_r"),
                            keys=[col("region")], aggs=_aggs(["w", "v", "wi", "flag", "f_clean"], SUMS) + [
                                alias(fn("sum", binary("mul", col("f_clean"), col("v"))), "fv"),
                                alias(fn("mean", binary("mul", col("w"), col("f_zero"))), "wz"),
                                alias(fn("count", col("region")), "regions")]),
        "join_by_float_key": op("group_by", input=joined, keys=[col("w")], aggs=_aggs(["f_clean"], SUMS)),
        "join_filtered_side": op("group_by", input=op(
            "join", left=t, right=op("filter", input=dim, predicate=binary("gt", col("w"), lit(0.4))), how="inner",
            left_on=[col("k")], right_on=[col("k")], suffix="_r"), keys=[col("region")],
            aggs=_aggs(["f_clean", "w"], SUMS)),
    })
    return plans


PLANS = _plans()


def _reply(plan, catalog, cache) -> tuple:
    """Everything the scientist and the owner get back, in a comparable form (tables sorted)."""
    try:
        result = executor.evaluate(plan, catalog, "alice", cache=cache)
    except BastionError as error:
        return ("error", error.ename, error.evalue, error.details, error.owner_details())
    table = result.table
    table = table.sort(table.columns, nulls_last=True) if table.width else table
    return (type(result).__name__, table, result.decision, result.notes)


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0], (a, b)
    if a[0] == "error":
        assert a == b
        return
    assert_frame_equal(a[1], b[1])
    assert a[2:] == b[2:]


@pytest.fixture(scope="module")
def caches():
    return {"facts": engine.DatasetCache(), "without": engine.DatasetCache(facts=False)}


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_the_reply_is_the_same_with_and_without_facts(files, caches, plan_name, policy_name):
    catalog = {name: Dataset(name, path, "parquet", POLICIES[policy_name]) for name, path in files.items()}
    with_facts = _reply(PLANS[plan_name], catalog, caches["facts"])
    without = _reply(PLANS[plan_name], catalog, caches["without"])
    _same(with_facts, without)


def _accounted_table(plan, catalog, cache) -> pl.DataFrame:
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    accounted = policy.account(checked, unique_keys=lambda name, keys: cache.unique_keys(catalog[name], keys))
    table = engine.run(accounted.plan, catalog, cache)
    keys = [c for c in accounted.columns if not c.startswith("__")][:2]
    return table.sort(table.columns if not keys else keys + [c for c in table.columns if c not in keys],
                      nulls_last=True)


@pytest.mark.parametrize("polars_engine", ["in-memory", "streaming"])
@pytest.mark.parametrize("policy_name", ["k10", "people", "share"])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_every_accounting_column_is_the_same_with_and_without_facts(files, caches, plan_name, policy_name,
                                                                     polars_engine, monkeypatch):
    # Stronger than the reply: each count and flag the decision reads, value for value, on either engine.
    from owner_console.engine import polars_engine as engine_module

    monkeypatch.setattr(engine_module, "IN_MEMORY_MAX_ROWS", 10 ** 9 if polars_engine == "in-memory" else 0)
    catalog = {name: Dataset(name, path, "parquet", POLICIES[policy_name]) for name, path in files.items()}
    if policy_name == "people" and ("dim" in str(PLANS[plan_name]) or "odd" in str(PLANS[plan_name])):
        pytest.skip("the dimension table has no person column (refused alike with and without facts)")
    assert_frame_equal(_accounted_table(PLANS[plan_name], catalog, caches["facts"]),
                       _accounted_table(PLANS[plan_name], catalog, caches["without"]))


def _query_text(plan, catalog, cache, unique: bool = False) -> str:
    checked = validate.validate(plan, catalog, dataset_columns=cache.columns)
    accounted = policy.account(checked, unique_keys=lambda name, keys: cache.unique_keys(catalog[name], keys)) \
        if unique else policy.account(checked)
    return engine.compile_plan(accounted.plan, catalog, cache).explain()


def test_facts_are_in_use_where_they_prove_something(files, caches):
    catalog = {name: Dataset(name, path, "parquet", POLICIES["k10"]) for name, path in files.items()}
    # A group-by of the whole table by a plain key reads its checks from per-key statistics...
    assert "__bastion_stat_" in _query_text(PLANS["by_k_f_clean"], catalog, caches["facts"])
    assert "__bastion_stat_" not in _query_text(PLANS["by_k_f_clean"], catalog, caches["without"])
    # ... not once rows are filtered, nor by a float key; there the facts still prove the aggregates finite
    # (no aggregate kept for a finiteness test after the aggregation).
    for name in ("filtered", "by_float_key"):
        text = _query_text(PLANS[name], catalog, caches["facts"])
        assert "__bastion_stat_" not in text
        assert "__value" not in text and "__approximate" not in text
        assert "__value" in _query_text(PLANS[name], catalog, caches["without"])
    # A column with NaN proves nothing: its finiteness is tested.
    assert "__value" in _query_text(PLANS["by_k_f_nan"], catalog, caches["facts"])
    # Over a join with a small side of unique keys, no check is computed on the joined rows: the small side's
    # contributors are not counted in bit words, nor the table's rows by their values.
    for name in ("join_left_columns", "join_by_key"):
        text = _query_text(PLANS[name], catalog, caches["facts"], unique=True)
        assert "__bastion_stat_" in text and "bits0" not in text and "__var" not in text, name
        assert "__bastion_stat_" not in _query_text(PLANS[name], catalog, caches["without"], unique=True)


def test_facts_follow_a_replaced_file(tmp_path):
    # Facts are kept per file version: a file replaced with one whose column has zeros and nulls gets new ones.
    path = tmp_path / "v.parquet"
    catalog = {"v": Dataset("v", path, "parquet", Policy(min_group_size=3, unsafe="review"))}
    plan = op("group_by", input=P.scan("v"), keys=[col("g")], aggs=[alias(fn("sum", col("x")), "x")])
    cache, without = engine.DatasetCache(), engine.DatasetCache(facts=False)
    pl.DataFrame({"g": [1] * 6 + [2] * 6, "x": [1.0] * 12}).write_parquet(path)
    first = _reply(plan, catalog, cache)
    assert first[0] == "Released"
    pl.DataFrame({"g": [1] * 6 + [2] * 6, "x": [1.0, 0.0, 0.0, 0.0, None, 0.0] + [2.0] * 6}).write_parquet(path)
    second = _reply(plan, catalog, cache)
    assert second[0] == "Held"  # group 1 now has one contributor
    _same(second, _reply(plan, catalog, without))
    assert isinstance(executor.evaluate(plan, catalog, "alice", cache=cache), Held)


def test_join_statistics_follow_a_replaced_small_side(tmp_path, files):
    # The statistics of a join are kept per version of both tables: a small side rewritten so that only one of
    # its rows contributes to region "n" holds that group.
    dim = tmp_path / "dim.parquet"
    pair = Policy(min_group_size=2, unsafe="review")
    catalog = {"t": Dataset("t", files["t"], "parquet", pair), "dim": Dataset("dim", dim, "parquet", pair)}
    plan = op("group_by", input=op("join", left=P.scan("t"), right=P.scan("dim"), how="inner", left_on=[col("k")],
                                   right_on=[col("k")], suffix="_r"),
              keys=[col("region")], aggs=[alias(fn("sum", col("w")), "w"), alias(length(), "n")])
    cache, without = engine.DatasetCache(), engine.DatasetCache(facts=False)
    pl.DataFrame({"k": [0, 1, 2, 3], "w": [1.0, 1.0, 2.0, 2.0], "region": ["n", "n", "s", "s"]}).write_parquet(dim)
    assert "__bastion_stat_" in _query_text(plan, catalog, cache, unique=True)
    first = _reply(plan, catalog, cache)
    assert first[0] == "Released"
    pl.DataFrame({"k": [0, 1, 2, 3], "w": [0.0, 1.0, 2.0, 2.0], "region": ["n", "n", "s", "s"]}).write_parquet(dim)
    second = _reply(plan, catalog, cache)
    assert second[0] == "Held"  # region n's sum of w now comes from one row of the small side
    _same(second, _reply(plan, catalog, without))
    assert_frame_equal(_accounted_table(plan, catalog, cache), _accounted_table(plan, catalog, without))


def test_a_share_the_facts_range_leaves_unsure_is_measured_again_with_each_groups_range(tmp_path):
    # "tail" spans 0..1e9 over the table (one outlier, in group 0) while the other groups span 0..1: the facts'
    # range cannot clear them, each group's own range can.  "c" is ordinary everywhere.
    from owner_console.engine.compile import Compiler

    path = tmp_path / "tail.parquet"
    rows = pl.select(pl.int_range(0, 2000, dtype=pl.Int64).alias("id")).with_columns(
        (pl.col("id") % 5).alias("g"), ((pl.col("id").hash(1) % 1000) / 1000 + 0.5).alias("c"),
        pl.when(pl.col("id") == 0).then(1e9).otherwise((pl.col("id").hash(2) % 1000) / 1000).alias("tail"))
    rows.write_parquet(path)
    catalog = {"t": Dataset("t", path, "parquet", Policy(min_group_size=10, unsafe="review"))}
    plan = op("group_by", input=op("filter", input=P.scan("t"), predicate=binary("ge", col("c"), lit(0.0))),
              keys=[col("g")], aggs=[alias(fn("sum", col("tail")), "t"), alias(fn("sum", col("c")), "c")])
    cache = engine.DatasetCache()
    accounted = policy.account(validate.validate(plan, catalog, dataset_columns=cache.columns))
    first = Compiler(catalog, cache)
    first.frame(accounted.plan)
    assert len(first.ranged_shares) == 2  # both sums' bounds use the facts' ranges at first
    reply = _reply(plan, catalog, cache)
    assert reply[0] == "Held"  # group 0 is dominated by its outlier
    _same(reply, _reply(plan, catalog, engine.DatasetCache(facts=False)))
    assert len(cache.range_misses) == 1  # tail's range did not clear the other groups: remembered
    again = Compiler(catalog, cache)
    again.frame(accounted.plan)
    assert len(again.ranged_shares) == 1  # c's still does


def test_processes_sharing_a_directory_measure_facts_once_per_version(tmp_path, monkeypatch):
    # Query worker processes share one directory: facts and per-key statistics are kept there per file version.
    monkeypatch.setattr(engine.cache, "KEY_STATS_MIN_ROWS", 0)
    path, shared = tmp_path / "v.parquet", tmp_path / "shared"
    dataset = Dataset("v", path, "parquet", Policy(min_group_size=2))
    pl.DataFrame({"g": [1, 1, 2, 2], "x": [1.0, 2.0, 0.0, 4.0]}).write_parquet(path)
    first = engine.DatasetCache(shared)
    table = first.frame(dataset)
    facts = first.facts(dataset, table)
    stats = first.key_stats(dataset, table, ("g",), ("x",))
    [kept] = shared.glob("*.facts.json")
    assert len(list(shared.glob("*.stats-*.arrow"))) == 1
    # Another process takes what the first measured (marked here, so that reading is told from measuring).
    kept.write_text(kept.read_text().replace('"rows": 4', '"rows": 5'))
    second = engine.DatasetCache(shared)
    other = second.frame(dataset)
    assert second.facts(dataset, other).rows == 5 and second.facts(dataset, other).columns == facts.columns
    assert_frame_equal(second.key_stats(dataset, other, ("g",), ("x",)), stats)
    # A new version of the file: the old version's copy, facts and statistics are removed with its copy.
    pl.DataFrame({"g": [1, 2], "x": [3.0, 5.0]}).write_parquet(path)
    third = engine.DatasetCache(shared)
    assert third.facts(dataset, third.frame(dataset)).rows == 2
    assert len(list(shared.glob("*.facts.json"))) == 1 and not list(shared.glob("*.stats-*.arrow"))
