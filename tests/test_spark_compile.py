"""The Spark compiler against the polars engine: same plans, same answers, same accounting.

Every test runs a plan twice, for real: on the polars engine
(``owner_console.engine.run``) and compiled by
``owner_console.engine.spark.compile`` onto the session-wide ``local[2]``
SparkSession, its sources read by the Spark engine's own reader
(``sources.read``).  The results must have the same columns in the same
order, the same polars dtypes, and the same values (floats to 1e-9 relative);
rows in the same order wherever the plan defines one.  Plans with accounting
are the policy's own (``validate`` then ``account``); accounting columns must
match exactly, row ids compared as what they mean (a row, no partner, not
from this source: the ids themselves are numbers of each engine's choosing).

The data are small, and many expressions share one query, so that the whole
module is a few dozen Spark jobs.
"""
from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract.plan import alias, binary, col, fn, frame_op, length, lit, scan, unary, when
from bastion_kernel.contract.protocol import BastionError
from owner_console import engine as polars_engine
from owner_console.model import Dataset, Policy
from owner_console.policy import account
from owner_console.sample_data import generate_patients
from owner_console.validate import validate

pytestmark = [pytest.mark.spark, pytest.mark.slow]

OPEN = Policy(min_group_size=1, dominance=False)
STRICT = Policy(min_group_size=5)
PEOPLE = Policy(min_group_size=3, person_id="patient_id")
HIDDEN = Policy(min_group_size=4, hidden=frozenset({"name"}))
SHARE = Policy(min_group_size=3, max_share=0.5)

EDGE = pl.DataFrame({
    "g": ["a", "a", "a", "b", "b", None, "c", "c"],
    "i": pl.Series([1, -7, None, 200, 3, 0, 2**40, -1], dtype=pl.Int64),
    "i32": pl.Series([1, -7, None, 200, 3, 0, 5, -1], dtype=pl.Int32),
    "f": [1.5, float("nan"), None, -2.5, float("inf"), 0.0, 1e20, -0.5],
    "s": ["Hello", " wörld\t", None, "ab.c", "xyz", "", "Ünï", "a\nb"],
    "b": [True, None, False, True, True, False, None, False],
    "d": [dt.date(2024, 3, 14), dt.date(1969, 12, 30), None, dt.date(2023, 1, 1), dt.date(2024, 12, 31),
          dt.date(2000, 2, 29), dt.date(2024, 1, 1), dt.date(1970, 1, 1)],
    "t": [dt.datetime(2024, 3, 14, 13, 47, 59, 123456), None, dt.datetime(1969, 12, 30, 1, 2, 3),
          dt.datetime(2023, 1, 1, 23, 59, 59), dt.datetime(2024, 2, 29), dt.datetime(2024, 5, 5, 5, 5, 5, 5),
          dt.datetime(2001, 1, 1), dt.datetime(2030, 6, 1, 12)],
})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("spark-compile")
    patients = generate_patients(400)
    patients.write_parquet(directory / "patients.parquet")
    pl.DataFrame({"zip": [f"750{n:02d}" for n in range(1, 21)], "region": [f"R{n % 4}" for n in range(1, 21)],
                  "pop": [1000 * n for n in range(1, 21)]}).write_parquet(directory / "zips.parquet")
    EDGE.write_parquet(directory / "edge.parquet")
    parts = directory / "parts"
    parts.mkdir()
    # Named out of row order: the directory's row order is its files' names, then each file's rows.
    patients.slice(0, 150).write_parquet(parts / "part-b.parquet")
    patients.slice(150, 100).write_parquet(parts / "part-a.parquet")
    patients.slice(250).write_parquet(parts / "part-c.parquet")
    patients.write_csv(directory / "patients.csv")
    return directory


def _datasets(data_dir: Path, policies: dict[str, Policy] | None = None) -> tuple[dict, dict]:
    """The same files as a polars catalog and a Spark catalog."""
    policies = policies or {}
    names = ("patients", "zips", "edge")
    on_polars = {n: Dataset(n, data_dir / f"{n}.parquet", "parquet", policies.get(n, OPEN)) for n in names}
    on_spark = {n: Dataset(n, data_dir / f"{n}.parquet", "parquet", policies.get(n, OPEN), engine="spark")
                for n in names}
    return on_polars, on_spark


def _compile(spark, accounted: dict, catalog: dict):
    from owner_console.engine.spark import sources
    from owner_console.engine.spark.compile import compile_result

    return compile_result(accounted, catalog, spark, lambda dataset: sources.read(spark, dataset))


def _run_spark(spark, accounted: dict, catalog: dict) -> pl.DataFrame:
    from owner_console.engine.spark.compile import to_polars

    compiled = _compile(spark, accounted, catalog)
    return to_polars(compiled.frame.toArrow(), compiled.schema)


def _both(spark, data_dir: Path, plan: dict, policies: dict[str, Policy] | None = None, *,
          unique: bool = False, exact: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The accounted plan's result on polars and on Spark."""
    on_polars, on_spark = _datasets(data_dir, policies)
    checked = validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)
    unique_keys = (lambda name, keys: polars_engine.DEFAULT_CACHE.unique_keys(on_polars[name], keys)) \
        if unique else None
    accounted = account(checked, unique_keys=unique_keys, exact_dominance=exact).plan
    return polars_engine.run(accounted, on_polars), _run_spark(spark, accounted, on_spark)


def _assert_same(want: pl.DataFrame, got: pl.DataFrame, ordered: bool, unordered_lists: bool = False) -> None:
    # The polars engine's result may carry helper columns of its own (bit words of row ids).
    assert got.columns == [c for c in want.columns if "__bits" not in c]
    want = want.select(got.columns)
    assert got.schema == want.schema
    row_ids = [c for c in got.columns if c.startswith("__bastion_r")]
    if row_ids:  # a row id stands for one row: compare what the policy reads of it (present, 0, null)
        want = want.with_columns((pl.col(row_ids) > 0).cast(pl.Int64))
        got = got.with_columns((pl.col(row_ids) > 0).cast(pl.Int64))
    if unordered_lists:  # polars leaves the order of mode() and unique() values open
        lists = [c for c, t in got.schema.items() if isinstance(t, pl.List)]
        want = want.with_columns(pl.col(lists).list.sort(nulls_last=True))
        got = got.with_columns(pl.col(lists).list.sort(nulls_last=True))
    if not ordered:
        keys = [c for c, t in got.schema.items() if not isinstance(t, (pl.List, pl.Struct, pl.Null))]
        want, got = want.sort(keys, nulls_last=True), got.sort(keys, nulls_last=True)
    assert_frame_equal(want, got, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


# ---------------------------------------------------------------- expressions, row by row
ELEMENTWISE = {
    "div": binary("truediv", col("i"), col("i32")), "floordiv": binary("floordiv", col("i"), col("i32")),
    "mod": binary("mod", col("i"), lit(3)), "fmod": binary("mod", col("f"), lit(2.0)),
    "ffloordiv0": binary("floordiv", col("f"), lit(0.0)), "fdiv0": binary("truediv", col("f"), lit(0)),
    "add32": binary("add", col("i32"), col("i32")), "mul": binary("mul", col("i32"), lit(3)),
    "pow": binary("pow", col("i32"), lit(3)), "powf": binary("pow", col("f"), lit(0.5)),
    "concat": binary("add", col("s"), lit("!")), "lt": binary("lt", col("f"), col("i")),
    "eq": binary("eq", col("s"), lit("xyz")), "and": binary("and", col("b"), binary("gt", col("i"), lit(0))),
    "xor": binary("xor", col("b"), lit(True)), "bitand": binary("and", col("i32"), lit(6)),
    "bitor": binary("or", col("i32"), lit(8)), "neg": unary("neg", col("i32")), "not": unary("not", col("b")),
    "bitnot": unary("not", col("i32")),
    "sqrt": fn("sqrt", col("f")), "exp": fn("exp", col("f")), "abs": fn("abs", col("i")),
    "is_null": fn("is_null", col("s")), "is_not_null": fn("is_not_null", col("f")),
    "log2": fn("log", col("f"), base=2), "ln": fn("log", col("i")), "round": fn("round", col("f"), decimals=2),
    "clip": fn("clip", col("f"), lower=-1, upper=1), "clip_int": fn("clip", col("i"), lower=0.5, upper=10.5),
    "is_in": fn("is_in", col("i"), values=[1, 3, None]), "is_in_str": fn("is_in", col("s"), values=["xyz", "Hello"]),
    "is_between": fn("is_between", col("f"), lower=lit(0), upper=lit(2), closed="none"),
    "fill_lit": fn("fill_null", col("f"), value=lit(9)), "fill_col": fn("fill_null", col("i"), value=col("i32")),
    "int8": fn("cast", col("i"), dtype="Int8"), "uint16": fn("cast", col("i"), dtype="UInt16"),
    "float32": fn("cast", col("f"), dtype="Float32"), "float_int": fn("cast", col("f"), dtype="Int64"),
    "bool_str": fn("cast", col("b"), dtype="String"), "date_str": fn("cast", col("d"), dtype="String"),
    "datetime_str": fn("cast", col("t"), dtype="String"), "datetime_date": fn("cast", col("t"), dtype="Date"),
    "date_int": fn("cast", col("d"), dtype="Int32"), "datetime_int": fn("cast", col("t"), dtype="Int64"),
    "int_bool": fn("cast", col("i"), dtype="Boolean"), "int_date": fn("cast", col("i32"), dtype="Date"),
    "str_int": fn("cast", col("s"), dtype="Int64"), "str_float": fn("cast", col("s"), dtype="Float64"),
    "float_bool": fn("cast", col("f"), dtype="Boolean"), "date_datetime": fn("cast", col("d"), dtype="Datetime"),
    "len_chars": fn("str.len_chars", col("s")), "lower": fn("str.to_lowercase", col("s")),
    "upper": fn("str.to_uppercase", col("s")), "slice": fn("str.slice", col("s"), offset=1, length=2),
    "slice_back": fn("str.slice", col("s"), offset=-10, length=2), "slice_end": fn("str.slice", col("s"), offset=-2),
    "strip": fn("str.strip_chars", col("s")), "strip_set": fn("str.strip_chars", col("s"), characters="Hxc"),
    "replace_re": fn("str.replace", col("s"), pattern="l+", value="L"),
    "replace_group": fn("str.replace", col("s"), pattern="([a-z])([a-z])", value="$2$1"),
    "replace_lit": fn("str.replace", col("s"), pattern=".", value="$$", literal=True),
    "contains_end": fn("str.contains", col("s"), pattern="b$"), "contains_word": fn("str.contains", col("s"), pattern=r"\w+ö"),
    "contains_lit": fn("str.contains", col("s"), pattern=".", literal=True),
    "starts": fn("str.starts_with", col("s"), prefix="a"), "ends": fn("str.ends_with", col("s"), suffix="z"),
    "to_datetime": fn("str.to_datetime", fn("dt.strftime", col("t"), format="%Y-%m-%d %H:%M:%S"),
                      format="%Y-%m-%d %H:%M:%S"),
    "to_date": fn("str.to_date", fn("dt.strftime", col("d"), format="%d/%m/%Y"), format="%d/%m/%Y"),
    "year": fn("dt.year", col("t")), "month": fn("dt.month", col("d")), "day": fn("dt.day", col("t")),
    "weekday": fn("dt.weekday", col("t")), "hour": fn("dt.hour", col("t")),
    "trunc_month": fn("dt.truncate", col("t"), every="1mo"), "trunc_15m": fn("dt.truncate", col("t"), every="15m"),
    "trunc_date_5h": fn("dt.truncate", col("d"), every="5h"), "trunc_2y": fn("dt.truncate", col("d"), every="2y"),
    "trunc_3d": fn("dt.truncate", col("t"), every="3d"), "trunc_q": fn("dt.truncate", col("t"), every="1q"),
    "trunc_2w": fn("dt.truncate", col("d"), every="2w"),
    "strftime": fn("dt.strftime", col("t"), format="%d.%m.%Y %H:%M:%S%.f"),
    "strftime_names": fn("dt.strftime", col("d"), format="%B %e, %Y (%a) %j"),
    "when": when([(binary("gt", col("f"), lit(0)), col("i")), (fn("is_null", col("f")), lit(-1))], col("i32")),
    "when_no_otherwise": when([(col("b"), lit("yes"))], None),
    "repeat_by": fn("repeat_by", col("g"), by=col("i32")),
    "minus_mean": binary("sub", col("i"), fn("mean", col("i"))),
    "over": fn("over", fn("max", col("f")), partition_by=[col("g")]),
    "over_first": fn("over", fn("first", col("s")), partition_by=[col("b")]),
    "over_rows": fn("over", binary("mul", col("i"), lit(2)), partition_by=[col("g")]),
    "date_diff": binary("sub", col("d"), fn("min", col("d"))),
    "q_over": fn("over", fn("quantile", col("f"), quantile=0.3, interpolation="nearest"), partition_by=[col("g")]),
    "minus_q": binary("sub", col("i"), fn("quantile", col("i"), quantile=0.5, interpolation="lower")),
    "q_d_over": fn("over", fn("quantile", col("d"), quantile=0.5, interpolation="midpoint"), partition_by=[col("b")]),
    "mean_t_over": fn("over", fn("mean", col("t")), partition_by=[col("b")]),
}


def test_every_elementwise_function_matches_polars_row_by_row(spark, data_dir):
    plan = frame_op("select", input=scan("edge"), exprs=[alias(e, name) for name, e in ELEMENTWISE.items()])
    want, got = _both(spark, data_dir, plan)
    _assert_same(want, got, ordered=True)


# ---------------------------------------------------------------- aggregations
AGGREGATIONS = {
    "sum_i": fn("sum", col("i")), "sum_i32": fn("sum", col("i32")), "sum_b": fn("sum", col("b")),
    "sum_f": fn("sum", col("f")), "mean_b": fn("mean", col("b")), "mean_f": fn("mean", col("f")),
    "median_f": fn("median", col("f")), "median_b": fn("median", col("b")), "min_f": fn("min", col("f")),
    "max_f": fn("max", col("f")), "max_s": fn("max", col("s")), "min_b": fn("min", col("b")),
    "max_t": fn("max", col("t")), "std_f": fn("std", col("f")), "var_i": fn("var", col("i"), ddof=2),
    # Of dates and times, polars answers a Datetime (describe() asks for these).
    "mean_d": fn("mean", col("d")), "median_d": fn("median", col("d")), "mean_t": fn("mean", col("t")),
    "median_t": fn("median", col("t")), "q_d": fn("quantile", col("d"), quantile=0.25, interpolation="nearest"),
    "q_t": fn("quantile", col("t"), quantile=0.3, interpolation="linear"),
    "mean_dur": fn("mean", binary("sub", col("d"), fn("min", col("d")))),
    "median_dur": fn("median", binary("sub", col("t"), fn("min", col("t")))),
    "std_0": fn("std", col("i32"), ddof=0),
    **{f"q_{m}": fn("quantile", col("i"), quantile=0.3, interpolation=m)
       for m in ("nearest", "higher", "lower", "midpoint", "linear")},
    "q_f": fn("quantile", col("f"), quantile=0.7, interpolation="linear"),
    "count": fn("count", col("f")), "len": fn("len", col("f")), "n_unique": fn("n_unique", col("b")),
    "null_count": fn("null_count", col("s")), "first": fn("first", col("s")), "last": fn("last", col("t")),
    "implode": fn("implode", col("i")), "head": fn("head", col("s"), n=2), "tail": fn("tail", col("s"), n=2),
    "sort_by": fn("sort_by", col("i"), by=col("f"), descending=True), "filter": fn("filter", col("i"), predicate=col("b")),
    "implicit_list": binary("mul", col("i32"), lit(2)),
    "filtered_sum": fn("sum", fn("filter", col("f"), predicate=binary("gt", col("i"), lit(0)))),
    "head_sum": fn("sum", fn("head", col("i"), n=2)), "sorted_first": fn("first", fn("sort_by", col("s"), by=col("i"))),
    "tail_last": fn("last", fn("tail", col("i"), n=2)),
    "max_deviation": fn("max", binary("sub", col("i"), fn("mean", col("i")))),
    "unique_len": fn("len", fn("unique", col("g"))), "filtered_len": fn("len", fn("filter", col("s"), predicate=col("b"))),
    "filtered_n_unique": fn("n_unique", fn("filter", col("b"), predicate=binary("gt", col("i"), lit(0)))),
    "mode": fn("mode", col("b")), "unique": fn("unique", col("i32")),
    "sum_of_literal": fn("sum", lit(5)), "literal": lit(7), "len_sum": fn("sum", length()),
    "max_of_sum": fn("max", fn("sum", col("i32"))), "std_of_literal": fn("std", lit(1.0)),
    "ratio": binary("truediv", fn("sum", col("i")), fn("count", col("i"))), "rows": length(),
}


# Lists of a group's values (a select of them is row-level: the policy refuses it), and what polars answers
# with several rows in a select (test_mode_outside_an_aggregation_is_refused).
_LISTS = ("head", "tail", "sort_by", "filter", "implicit_list", "mode", "unique")


@pytest.mark.parametrize("grouped", [True, False], ids=["group_by", "select"])
def test_every_aggregation_matches_polars(spark, data_dir, grouped):
    aggs = [alias(e, name) for name, e in AGGREGATIONS.items() if grouped or name not in _LISTS]
    plan = frame_op("group_by", input=scan("edge"), keys=[col("g")], aggs=aggs) if grouped else \
        frame_op("select", input=scan("edge"), exprs=aggs)
    want, got = _both(spark, data_dir, plan)
    _assert_same(want, got, ordered=not grouped, unordered_lists=True)


# ---------------------------------------------------------------- frame operations
PATIENTS, ZIPS = scan("patients"), scan("zips")


def _join(how: str, left: dict = PATIENTS, right: dict = ZIPS, key: str = "zip") -> dict:
    keys = [] if how == "cross" else [col(key)]
    return frame_op("join", left=left, right=right, how=how, left_on=keys, right_on=keys, suffix="_r")


def _filter(predicate: dict, frame: dict = PATIENTS) -> dict:
    return frame_op("filter", input=frame, predicate=predicate)


def _sort(by: list[dict], descending: list[bool], nulls_last: bool = False, frame: dict = PATIENTS) -> dict:
    return frame_op("sort", input=frame, by=by, descending=descending, nulls_last=nulls_last)


REGION_R1 = _filter(binary("eq", col("region"), lit("R1")), ZIPS)
YOUNG, OLD = _filter(binary("lt", col("age"), lit(30))), _filter(binary("gt", col("age"), lit(60)))
FRAME_PLANS: dict[str, tuple[dict, bool]] = {  # name: (plan, rows in a defined order)
    "sort_head": (frame_op("head", input=_sort([col("age"), col("patient_id")], [True, False]), n=17), True),
    "sort_nulls_last": (frame_op("head", input=_sort([col("smoker"), col("cost"), col("patient_id")],
                                                     [False, True, False], True), n=40), True),
    "slice_from_end": (frame_op("slice", input=_sort([col("cost"), col("patient_id")], [False, False]),
                                offset=-20, length=7), True),
    "slice_past_start": (frame_op("slice", input=PATIENTS, offset=-500, length=103), True),
    "slice_open": (frame_op("slice", input=PATIENTS, offset=5, length=None), True),
    "with_row_index": (frame_op("with_row_index", input=YOUNG, name="ix"), True),
    "explode": (frame_op("explode", input=frame_op("group_by", input=PATIENTS, keys=[col("zip")],
                                                   aggs=[alias(fn("head", col("age"), n=3), "ages")]),
                         columns=["ages"]), False),
    "drop_rename": (frame_op("rename", input=frame_op("drop", input=PATIENTS, columns=["name", "cost"]),
                             mapping={"age": "years", "zip": "code"}), True),
    "drop_nulls": (frame_op("drop_nulls", input=PATIENTS, subset=None), True),
    "drop_nulls_subset": (frame_op("drop_nulls", input=PATIENTS, subset=["cost"]), True),
    "fill_null_int": (frame_op("fill_null", input=PATIENTS, value=lit(0)), True),
    "fill_null_text": (frame_op("fill_null", input=PATIENTS, value=lit("?")), True),
    "fill_null_bool": (frame_op("fill_null", input=PATIENTS, value=lit(False)), True),
    "unique": (frame_op("unique", input=frame_op("select", input=PATIENTS, exprs=[col("zip"), col("sex")]),
                        subset=None), False),
    "unique_subset": (frame_op("select", input=frame_op("unique", input=PATIENTS, subset=["zip", "sex"]),
                               exprs=[col("zip"), col("sex")]), False),
    "inner": (_join("inner"), True),
    "left": (_join("left", right=_filter(binary("ne", col("region"), lit("R1")), ZIPS)), True),
    "full": (_join("full", left=YOUNG, right=REGION_R1), True),
    "semi": (_join("semi", right=REGION_R1), True),
    "anti": (_join("anti", right=REGION_R1), True),
    "cross": (_join("cross", left=frame_op("head", input=PATIENTS, n=5), right=frame_op("head", input=ZIPS, n=4)),
              True),
    "self_join": (_join("inner", left=frame_op("select", input=PATIENTS, exprs=[col("zip"), col("age")]),
                        right=frame_op("select", input=PATIENTS, exprs=[col("zip"), col("cost")])), True),
    "concat": (frame_op("concat", inputs=[frame_op("head", input=PATIENTS, n=5),
                                          frame_op("slice", input=PATIENTS, offset=-3, length=None)]), True),
    "window_columns": (frame_op("with_columns", input=PATIENTS, exprs=[
        alias(binary("sub", col("cost"), fn("mean", col("cost"))), "deviation"),
        alias(fn("over", fn("mean", col("age")), partition_by=[col("zip")]), "zip_age"),
        alias(fn("over", fn("first", col("name")), partition_by=[col("sex")]), "first_name")]), True),
}


@pytest.mark.parametrize("name", list(FRAME_PLANS))
def test_every_frame_operation_matches_polars(spark, data_dir, name):
    plan, ordered = FRAME_PLANS[name]
    want, got = _both(spark, data_dir, plan)
    _assert_same(want, got, ordered=ordered)


# ---------------------------------------------------------------- accounted plans under policies
def _group(keys: list[str], aggs: list[dict], frame: dict = PATIENTS) -> dict:
    return frame_op("group_by", input=frame, keys=[col(k) for k in keys], aggs=aggs)


AGGS = [alias(length(), "n"), alias(fn("sum", col("cost")), "cost"), alias(fn("mean", col("age")), "age"),
        alias(fn("max", col("length_of_stay")), "longest"), alias(fn("median", col("cost")), "median_cost"),
        alias(fn("n_unique", col("zip")), "zips"), alias(fn("std", col("age")), "sd")]
ACCOUNTED: dict[str, tuple[dict, dict[str, Policy], dict[str, bool]]] = {
    "group_by": (_group(["diagnosis"], AGGS), {"patients": STRICT}, {}),
    "group_by_exact_dominance": (_group(["diagnosis"], AGGS), {"patients": STRICT}, {"exact": True}),
    "select": (frame_op("select", input=PATIENTS, exprs=AGGS), {"patients": STRICT}, {"exact": True}),
    "people": (_group(["sex"], AGGS), {"patients": PEOPLE}, {}),
    "people_n_unique_filtered": (_group(["sex"], [alias(fn("n_unique", fn("filter", col("zip"), predicate=binary(
        "gt", col("age"), lit(30)))), "zips")]), {"patients": PEOPLE}, {}),
    "hidden": (_group(["zip"], [alias(length(), "n"), alias(fn("sum", col("cost")), "cost")]),
               {"patients": HIDDEN}, {}),
    "max_share": (_group(["diagnosis"], [alias(fn("sum", col("cost")), "cost"), alias(fn("std", col("age")), "sd")]),
                  {"patients": SHARE}, {}),
    "join_unique_key": (_group(["region"], AGGS, _join("inner")), {"patients": STRICT, "zips": STRICT},
                        {"unique": True}),
    "join_row_ids": (_group(["region"], AGGS, _join("left")), {"patients": STRICT, "zips": STRICT}, {}),
    "join_people": (_group(["region"], AGGS, _join("inner")), {"patients": PEOPLE}, {"unique": True}),
    "full_join": (_group(["region"], [alias(length(), "n"), alias(fn("sum", col("cost")), "cost")],
                         _join("full", right=REGION_R1)), {"patients": STRICT, "zips": STRICT}, {}),
    "semi_join": (_group(["sex"], [alias(length(), "n")], _join("semi", right=REGION_R1)),
                  {"patients": STRICT, "zips": STRICT}, {}),
    "self_join_people": (_group(["sex"], [alias(length(), "n"), alias(fn("mean", col("age_r")), "age")],
                                _join("inner", right=PATIENTS)), {"patients": PEOPLE}, {}),
    "concat": (_group(["sex"], [alias(length(), "n"), alias(fn("sum", col("cost")), "cost")],
                      frame_op("concat", inputs=[YOUNG, OLD])), {"patients": STRICT}, {}),
    "filter_on_aggregate": (_filter(binary("gt", col("cost"), fn("mean", col("cost")))), {"patients": STRICT}, {}),
    "broadcast_aggregate": (frame_op("with_columns", input=PATIENTS, exprs=[alias(fn("var", col("cost")), "v")]),
                            {"patients": STRICT}, {"exact": True}),
    "row_index_weights": (_group(["sex"], [alias(fn("mean", col("ix")), "mean_ix")],
                                 frame_op("with_row_index", input=PATIENTS, name="ix")), {"patients": STRICT}, {}),
    "rows": (frame_op("select", input=PATIENTS, exprs=[col("zip"), alias(binary("mul", col("cost"), lit(2)), "c2")]),
             {"patients": STRICT}, {}),
    "two_levels": (_group(["sex"], [alias(fn("sum", col("n")), "n"), alias(fn("max", col("cost")), "most")],
                          _group(["sex", "zip"], [alias(length(), "n"), alias(fn("sum", col("cost")), "cost")])),
                   {"patients": STRICT}, {}),
    "individual_values": (_group(["zip"], [alias(fn("first", col("name")), "first"),
                                           alias(fn("implode", col("age")), "ages")]), {"patients": STRICT}, {}),
}


@pytest.mark.parametrize("name", list(ACCOUNTED))
def test_accounted_plans_match_polars_accounting_included(spark, data_dir, name):
    plan, policies, options = ACCOUNTED[name]
    want, got = _both(spark, data_dir, plan, policies, **options)
    ordered = plan["op"] in ("filter", "with_columns", "select") and name != "select"
    _assert_same(want, got, ordered=ordered)


# ---------------------------------------------------------------- row order
def _spark_catalog(source: Path, kind: str, fmt: str, policy: Policy = STRICT) -> dict[str, Dataset]:
    return {"patients": Dataset("patients", source, fmt, policy, engine="spark", source_kind=kind)}


def _accounted(plan: dict, catalog: dict[str, Dataset], data_dir: Path) -> dict:
    on_polars = {name: Dataset(name, data_dir / "patients.parquet", "parquet", d.policy)
                 for name, d in catalog.items()}
    return account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan


ORDERED = frame_op("head", input=frame_op("with_row_index", input=_filter(binary("gt", col("age"), lit(40))),
                                          name="ix"), n=60)
ROW_IDS = _group(["sex"], [alias(length(), "n"), alias(fn("first", col("patient_id")), "first_id"),
                           alias(fn("last", col("patient_id")), "last_id")],
                 _join("inner", right=frame_op("select", input=PATIENTS, exprs=[col("zip"), col("age")])))


@pytest.mark.parametrize("kind, fmt, name", [("directory", "parquet", "parts"), ("file", "csv", "patients.csv")])
def test_row_order_is_the_files_and_does_not_change_with_split_size(spark, data_dir, kind, fmt, name):
    catalog = _spark_catalog(data_dir / name, kind, fmt)
    answers = []
    try:
        for split_bytes in (None, "4096"):  # one split per file, then many small splits read by both cores
            if split_bytes is not None:
                spark.conf.set("spark.sql.files.maxPartitionBytes", split_bytes)
                spark.conf.set("spark.sql.files.openCostInBytes", "0")
            answers.append([_run_spark(spark, _accounted(plan, catalog, data_dir), catalog)
                            for plan in (ORDERED, ROW_IDS)])
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
        spark.conf.unset("spark.sql.files.openCostInBytes")
    for first, second in zip(*answers):
        assert_frame_equal(first, second)
    rows, grouped = answers[0]
    # The stable order is the files' names, then each file's rows: part-a's rows come first.
    files = sorted(p for p in (data_dir / name).glob("*.parquet")) if kind == "directory" else []
    source = pl.concat([pl.read_parquet(p) for p in files]) if files else pl.read_parquet(data_dir / "patients.parquet")
    expected = source.filter(pl.col("age") > 40).head(60)
    assert rows["ix"].to_list() == list(range(60))
    assert rows["patient_id"].to_list() == expected["patient_id"].to_list()
    # Every joined row is counted once per source row: the join's counts equal the polars engine's.
    want = polars_engine.run(_accounted(ROW_IDS, catalog, data_dir),
                             {"patients": Dataset("patients", data_dir / "patients.parquet", "parquet", STRICT)})
    counts = [c for c in grouped.columns if c.startswith("__bastion_n")]
    assert_frame_equal(want.select("sex", "n", *counts).sort("sex"), grouped.select("sex", "n", *counts).sort("sex"))


def test_the_same_plan_twice_gives_the_same_rows_in_the_same_order(spark, data_dir):
    plan = frame_op("head", input=_sort([col("zip")], [True], frame=_join("inner")), n=80)  # ties in zip
    on_polars, on_spark = _datasets(data_dir)
    accounted = account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan
    first, second = _run_spark(spark, accounted, on_spark), _run_spark(spark, accounted, on_spark)
    assert_frame_equal(first, second)
    # Ties keep the rows' order before the sort (the join's: the patients' file order).
    ids = first.filter(pl.col("zip") == first["zip"][0])["patient_id"].to_list()
    assert ids == sorted(ids)


@pytest.mark.parametrize("aggregation, ordered", [(fn("sum", col("cost")), False), (fn("first", col("cost")), True)])
def test_a_source_whose_row_order_nothing_reads_is_read_without_it(spark, data_dir, aggregation, ordered):
    from owner_console.engine.spark import sources

    asked = []

    def read(dataset: Dataset, ordered: bool = True):
        asked.append(ordered)
        # Without its row order a source needs no file metadata (about a fifth of a scan).
        return sources.read(spark, dataset) if ordered else spark.read.parquet(str(dataset.path))

    plan = _group(["zip"], [alias(aggregation, "x"), alias(length(), "n")])
    on_polars, on_spark = _datasets(data_dir, {"patients": STRICT})
    accounted = account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan
    from owner_console.engine.spark.compile import compile_result, to_polars

    compiled = compile_result(accounted, on_spark, spark, read)
    assert set(asked) == {ordered}
    _assert_same(polars_engine.run(accounted, on_polars), to_polars(compiled.frame.toArrow(), compiled.schema),
                 ordered=False)


# ---------------------------------------------------------------- refusals and errors
@pytest.mark.parametrize("expr, function", [
    (fn("cast", col("f"), dtype="String"), "cast"),
    (fn("cast", col("i"), dtype="UInt64"), "cast"),
    (fn("str.contains", col("s"), pattern="[[:alpha:]]+"), "str.contains"),
    (fn("dt.truncate", col("t"), every="1mo6h"), "dt.truncate"),
    (fn("dt.strftime", col("t"), format="%Y %U"), "dt.strftime"),
    (binary("add", binary("sub", col("d"), col("d")), col("d")), "add"),
])
def test_what_spark_cannot_do_faithfully_is_refused_naming_it(spark, data_dir, expr, function):
    plan = frame_op("select", input=scan("edge"), exprs=[alias(expr, "x")])
    on_polars, on_spark = _datasets(data_dir)
    accounted = account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan
    with pytest.raises(BastionError) as refused:
        _compile(spark, accounted, on_spark)
    assert refused.value.ename == "UnsupportedOperation"
    assert refused.value.details["function"] == function
    assert f"{function} is not supported on the Spark engine" in refused.value.evalue


@pytest.mark.parametrize("function", ["head", "mode"])
def test_a_sequence_outside_an_aggregation_is_refused_naming_it(spark, data_dir, function):
    # polars answers a select of these with several rows: a shape the Spark engine does not build.
    expr = fn("head", col("i"), n=2) if function == "head" else fn("mode", col("i"))
    plan = frame_op("select", input=scan("edge"), exprs=[alias(expr, "x")])
    on_polars, on_spark = _datasets(data_dir)
    with pytest.raises(BastionError) as refused:
        _compile(spark, account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan, on_spark)
    assert refused.value.ename == "UnsupportedOperation" and refused.value.details["function"] == function


@pytest.mark.parametrize("expr", [
    fn("str.slice", col("i"), offset=0, length=2), fn("str.to_date", col("i32"), format="%Y", strict=False),
    fn("str.to_lowercase", col("d")), fn("dt.year", col("s")), fn("dt.hour", col("d")),
    fn("dt.truncate", col("f"), every="1mo"),
], ids=["slice_int", "to_date_int", "lower_date", "year_str", "hour_date", "truncate_float"])
def test_a_function_on_values_polars_does_not_run_it_on_fails_the_query_on_both(spark, data_dir, expr):
    # polars' schema takes these, and its query fails while running; Spark would cast the input and answer.
    from owner_console.engine.spark.engine import SparkEngine

    plan = frame_op("select", input=scan("edge"), exprs=[alias(expr, "x")])
    on_polars, on_spark = _datasets(data_dir)
    accounted = account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan
    failures = []
    for run, catalog in ((polars_engine.run, on_polars), (SparkEngine().run, on_spark)):
        with pytest.raises(BastionError) as failed:
            run(accounted, catalog)
        failures.append((failed.value.ename, failed.value.evalue))
    assert failures[0] == failures[1] and failures[0][0] == "ExecutionError"


def test_a_type_error_is_the_polars_engines_schema_error(spark, data_dir):
    plan = frame_op("select", input=scan("edge"), exprs=[alias(binary("add", col("s"), lit(1)), "y")])
    on_polars, on_spark = _datasets(data_dir)
    accounted = account(validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)).plan
    with pytest.raises(BastionError) as on_polars_error:
        polars_engine.run(accounted, on_polars)
    with pytest.raises(BastionError) as on_spark_error:
        _compile(spark, accounted, on_spark)
    assert on_spark_error.value.ename == on_polars_error.value.ename == "SchemaError"
    assert on_spark_error.value.evalue == on_polars_error.value.evalue


def test_a_join_key_found_repeated_fails_the_job_as_a_changed_dataset(spark, data_dir):
    from owner_console.engine.spark.compile import is_changed_error

    # The policy is told the right side's key is unique (as if the file had been replaced since): the job
    # itself checks it and fails, as the polars engine does on the table it reads.
    plan = _group(["sex"], [alias(length(), "n")], _join("inner", key="region", right=ZIPS, left=frame_op(
        "with_columns", input=PATIENTS, exprs=[alias(col("zip"), "region")])))
    on_polars, on_spark = _datasets(data_dir, {"patients": STRICT, "zips": STRICT})
    checked = validate(plan, on_polars, polars_engine.DEFAULT_CACHE.columns)
    accounted = account(checked, unique_keys=lambda name, keys: True).plan
    with pytest.raises(BastionError) as on_polars_error:
        polars_engine.run(accounted, on_polars)
    assert on_polars_error.value.details.get("changed") is True
    compiled = _compile(spark, accounted, on_spark)
    assert compiled.changed_datasets == ("zips",)
    with pytest.raises(Exception) as failed:
        compiled.frame.toArrow()
    assert is_changed_error(failed.value)


def test_the_compiler_builds_no_sql_text():
    """Plans become DataFrame calls only: no SQL string is parsed anywhere in the compiler."""
    import owner_console.engine.spark as package

    forbidden = {"expr", "selectExpr", "sql", "filter_expr"}
    for module in ("compile.py", "expressions.py", "accounting.py", "types.py"):
        tree = ast.parse((Path(package.__file__).parent / module).read_text())
        called = {node.func.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert not called & forbidden, (module, called & forbidden)
        strings_filtered = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                            and isinstance(node.func, ast.Attribute) and node.func.attr in ("filter", "where")
                            and node.args and isinstance(node.args[0], ast.Constant)]
        assert not strings_filtered, module

