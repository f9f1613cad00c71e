"""Attacks on the release rule, sent straight to a running executor.

Each test is one attempt by a hostile scientist to get a row, one person's
value or a hidden column out of the executor, with the plan written inline as
the scientist would send it on the wire (skipping the kernel).  Every attempt
must be refused (``PolicyViolation`` on a dataset whose owner says ``reject``;
held for review where the owner reviews) or wiped (hidden values as ``*``).
Honest aggregate queries must still work, with the values plain polars gives.

Datasets of this module's workspace (all over the synthetic patients table):

=================  ==========================================================
``patients``        K=10, ``name`` hidden, unsafe ``review`` (conftest)
``patients_strict`` K=10, ``name`` hidden, unsafe ``reject`` (conftest)
``patients_open``   K=10, ``name`` hidden, unsafe ``log`` (conftest): row-level
                    results are released (and logged), so wiping can be seen
``visits``          one row per visit, ``person_id = patient_id``, K=10, reject
``dominance``       K=10, reject, ``max_share = 0.5``
``suppressed``      K=10, reject, ``suppress_small_groups``
``tiered``          K=10, review; alice: ``min_group_size = 3``;
                    bob: ``aggregates_only = true``
``limited``         K=1, log, ``max_rows_released = 100``
=================  ==========================================================
"""
from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P

from wire import fetch, refused, released

pytestmark = pytest.mark.timeout(300)

col, lit, fn, binary, alias, length, when = P.col, P.lit, P.fn, P.binary, P.alias, P.length, P.when
op, scan = P.frame_op, P.scan
STRICT = scan("patients_strict")
OPEN = scan("patients_open")
TARGET = 1  # the patient_id of the person every attack aims at


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bastion(executor, owner_workspace, raw, tmp_path_factory):
    """The module's executor, with the extra datasets of the module docstring registered."""
    data = tmp_path_factory.mktemp("attack_data")
    visits = raw.select("patient_id", "zip", "sex", "cost").join(
        pl.DataFrame({"visit": [1, 2, 3]}), how="cross").filter(pl.col("visit") <= pl.col("patient_id") % 3 + 1)
    visits.write_csv(data / "visits.csv")
    workspace, csv = owner_workspace.workspace, owner_workspace.data_file
    workspace.add_dataset("visits", data / "visits.csv", min_group_size=10, unsafe="reject", person_id="patient_id")
    workspace.add_dataset("dominance", csv, min_group_size=10, unsafe="reject", hidden=["name"], max_share=0.5)
    workspace.add_dataset("suppressed", csv, min_group_size=10, unsafe="reject", hidden=["name"],
                          suppress_small_groups=True)
    workspace.add_dataset("tiered", csv, min_group_size=10, unsafe="review", hidden=["name"],
                          scientists={"alice": {"min_group_size": 3}, "bob": {"aggregates_only": True}})
    workspace.add_dataset("limited", csv, min_group_size=1, unsafe="log", max_rows_released=100)
    return executor


def wiped(reply, *columns: str) -> pl.DataFrame:
    """The result was released, and every value of ``columns`` is ``*``."""
    table, _ = released(reply)
    assert table.height > 0
    for column in columns:
        assert table.get_column(column).to_list() == ["*"] * table.height, column
    return table


def is_target(column: str = "patient_id") -> dict:
    return binary("eq", col(column), lit(TARGET))


def indicator(value: dict, otherwise=lit(0)) -> dict:
    return when([(is_target(), value)], otherwise)


def total(frame: dict, expr: dict) -> dict:
    return op("select", input=frame, exprs=[expr])


# ------------------------------------------------------------------ row-level extraction
def test_row_dump(bastion):
    refused(fetch(bastion, op("head", input=STRICT, n=5)))


def test_select_every_row_without_head(bastion):
    refused(fetch(bastion, op("select", input=STRICT, exprs=[col("age"), col("cost")])))


def test_filter_on_a_unique_id_then_read_the_row(bastion):
    refused(fetch(bastion, op("select", input=op("filter", input=STRICT, predicate=is_target()),
                              exprs=[col("cost")])))


def test_filter_on_a_unique_id_then_aggregate_a_group_of_one(bastion):
    refused(fetch(bastion, total(op("filter", input=STRICT, predicate=is_target()), fn("mean", col("cost")))))


def test_max_of_a_group_of_one(bastion):
    refused(fetch(bastion, total(op("filter", input=STRICT, predicate=is_target()), fn("max", col("age")))))


def test_min_of_groups_of_one(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("patient_id")], aggs=[fn("min", col("cost"))])))


def test_median_of_a_group_of_one(bastion):
    refused(fetch(bastion, total(op("filter", input=STRICT, predicate=is_target()), fn("median", col("cost")))))


def test_small_groups_from_quasi_identifiers(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("zip"), col("age"), col("sex")],
                              aggs=[fn("mean", col("cost"))])))


def test_filter_on_a_hidden_name_then_aggregate(bastion, raw):
    row = raw.filter(pl.col("patient_id") == TARGET)
    condition = binary("and", binary("eq", col("name"), lit(row["name"].item())),
                       binary("eq", col("age"), lit(row["age"].item())))
    plan = total(op("filter", input=STRICT, predicate=condition), fn("sum", col("cost")))
    assert "column 'name' of 'patients_strict' is hidden" in refused(fetch(bastion, plan))["evalue"]


def test_sort_then_head_one(bastion):
    plan = op("head", input=op("sort", input=STRICT, by=[col("cost")], descending=[True], nulls_last=True), n=1)
    refused(fetch(bastion, op("select", input=plan, exprs=[col("cost")])))


def test_sort_then_head_one_then_mean(bastion):
    plan = op("head", input=op("sort", input=STRICT, by=[col("cost")], descending=[True], nulls_last=True), n=1)
    refused(fetch(bastion, total(plan, fn("mean", col("cost")))))


def test_unique_then_rows(bastion):
    refused(fetch(bastion, op("unique", input=op("select", input=STRICT, exprs=[col("zip"), col("cost")]),
                              subset=["zip"])))


def test_unique_of_a_group_of_one_then_count(bastion):
    plan = op("unique", input=op("filter", input=STRICT, predicate=is_target()), subset=None)
    refused(fetch(bastion, total(plan, fn("sum", col("cost")))))


def test_with_row_index_picks_one_row(bastion):
    plan = op("filter", input=op("with_row_index", input=STRICT, name="i"), predicate=binary("eq", col("i"), lit(0)))
    refused(fetch(bastion, total(plan, fn("mean", col("cost")))))


def test_first_inside_an_aggregation(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("first", col("cost"))])))


def test_last_inside_an_aggregation(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("last", col("cost"))])))


def test_mode_inside_an_aggregation(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("mode", col("age"))])))


def test_implicit_list_aggregation(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[col("cost")])))


def test_global_first_value(bastion):
    refused(fetch(bastion, total(STRICT, fn("first", col("cost")))))


# ------------------------------------------------------------------ indicators: one value inside a big aggregate
def test_indicator_sum_when_then_otherwise_zero(bastion):
    refused(fetch(bastion, total(STRICT, fn("sum", indicator(col("cost"))))))


def test_indicator_sum_cast_times_value(bastion):
    flag = fn("cast", is_target(), dtype="Int64")
    refused(fetch(bastion, total(STRICT, fn("sum", binary("mul", flag, col("cost"))))))


def test_indicator_mean_times_row_count(bastion):
    refused(fetch(bastion, total(STRICT, fn("mean", indicator(col("cost"))))))


def test_indicator_max(bastion):
    refused(fetch(bastion, total(STRICT, fn("max", indicator(col("cost"))))))


def test_indicator_std(bastion):
    refused(fetch(bastion, total(STRICT, fn("std", indicator(col("cost"))))))


def test_indicator_quantile_one(bastion):
    refused(fetch(bastion, total(STRICT, fn("quantile", indicator(col("cost")), quantile=1.0))))


def test_indicator_without_otherwise_counted(bastion):
    refused(fetch(bastion, total(STRICT, fn("count", when([(is_target(), col("cost"))], None)))))


def test_indicator_padded_with_a_nonzero_constant(bastion):
    refused(fetch(bastion, total(STRICT, fn("sum", indicator(col("cost"), otherwise=lit(1))))))


def test_indicator_padded_with_a_negative_constant_under_max(bastion):
    refused(fetch(bastion, total(STRICT, fn("max", indicator(col("cost"), otherwise=lit(-1))))))


def test_indicator_complement_counted(bastion):
    # count of everyone but the target, next to len: the difference is the target.
    refused(fetch(bastion, total(STRICT, fn("count", when([(is_target(), lit(None))], lit(1))))))


def test_indicator_null_count(bastion):
    refused(fetch(bastion, total(STRICT, fn("null_count", when([(is_target(), lit(1))], None)))))


def test_indicator_n_unique(bastion):
    refused(fetch(bastion, total(STRICT, fn("n_unique", indicator(lit(1))))))


def test_indicator_inside_group_by(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")],
                              aggs=[alias(fn("sum", indicator(col("cost"))), "s"), alias(length(), "n")])))


def test_indicator_on_a_boolean_attribute(bastion, raw):
    # "is the target a smoker?": the sum of the smoker flag of one person.
    flag = binary("and", is_target(), col("smoker"))
    refused(fetch(bastion, total(STRICT, fn("sum", fn("cast", flag, dtype="Int64")))))


def test_clip_singles_out_the_largest_value(bastion, raw):
    second = raw["cost"].drop_nulls().sort(descending=True)[1]
    refused(fetch(bastion, total(STRICT, fn("sum", fn("clip", col("cost"), lower=second)))))


def test_indicator_total_broadcast_then_used_as_group_key(bastion):
    plan = op("with_columns", input=STRICT, exprs=[alias(fn("sum", indicator(col("cost"))), "secret")])
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("secret")], aggs=[length()])))


def test_indicator_total_in_a_filter_predicate(bastion):
    # Keep everything or nothing depending on the target's cost: one bit per query.
    plan = op("filter", input=STRICT, predicate=binary("gt", fn("sum", indicator(col("cost"))), lit(5000)))
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("sex")], aggs=[length()])))


def test_indicator_total_used_to_fill_nulls_of_an_honest_mean(bastion):
    plan = op("fill_null", input=op("select", input=STRICT, exprs=[col("sex"), col("cost"), col("patient_id"),
                                                                col("age")]),
              value=fn("sum", indicator(col("age"))))
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("sex")], aggs=[fn("mean", col("cost"))])))


def test_indicator_total_nested_inside_an_honest_aggregate(bastion):
    filled = fn("fill_null", col("cost"), value=fn("max", indicator(col("age"))))
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("mean", filled)])))


def test_value_of_the_most_expensive_patient_via_a_comparison_with_max(bastion):
    top = when([(binary("eq", col("cost"), fn("max", col("cost"))), col("age"))], None)
    refused(fetch(bastion, total(STRICT, fn("mean", top))))


def test_nested_indicator_summed_over_groups(bastion):
    inner = op("group_by", input=STRICT, keys=[col("zip")], aggs=[alias(fn("sum", indicator(col("cost"))), "s")])
    refused(fetch(bastion, total(inner, fn("sum", col("s")))))


def test_nested_indicator_filtered_then_counted(bastion):
    inner = op("group_by", input=STRICT, keys=[col("zip")], aggs=[alias(fn("sum", indicator(col("cost"))), "s")])
    plan = op("filter", input=inner, predicate=binary("gt", col("s"), lit(0)))
    refused(fetch(bastion, total(plan, length())))


def test_amplified_value_dominates_the_sum(bastion):
    # Multiplying one row by 1e9 hides the others in the rounding: only dominance catches it.
    amplified = binary("mul", col("cost"), indicator(lit(1_000_000_000), otherwise=lit(1)))
    refused(fetch(bastion, total(scan("dominance"), fn("sum", amplified))))


def test_one_large_value_dominates_a_small_group_sum(bastion, raw):
    top = raw.sort("cost", descending=True, nulls_last=True)["patient_id"][0]
    plan = op("filter", input=scan("dominance"), predicate=binary("or", binary("eq", col("patient_id"), lit(top)),
                                                                binary("le", col("patient_id"), lit(20))))
    refused(fetch(bastion, total(plan, fn("sum", col("cost")))))


# ------------------------------------------------------------------ joins, concat: one row counted many times
def test_self_join_fan_out_on_a_shared_key(bastion):
    one = op("filter", input=STRICT, predicate=is_target())
    joined = op("join", left=one, right=STRICT, how="inner", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    refused(fetch(bastion, op("group_by", input=joined, keys=[col("sex")], aggs=[fn("mean", col("cost"))])))


def test_cross_join_multiplies_one_row(bastion):
    one = op("select", input=op("filter", input=STRICT, predicate=is_target()), exprs=[alias(col("cost"), "c")])
    joined = op("join", left=STRICT, right=one, how="cross", left_on=[], right_on=[], suffix="_b")
    refused(fetch(bastion, op("group_by", input=joined, keys=[col("sex")], aggs=[fn("mean", col("c"))])))


def test_semi_join_reveals_the_targets_zip(bastion):
    one = op("filter", input=STRICT, predicate=is_target())
    plan = op("join", left=STRICT, right=one, how="semi", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("zip")], aggs=[length()])))


def test_anti_join_reveals_by_absence(bastion):
    one = op("filter", input=STRICT, predicate=is_target())
    plan = op("join", left=STRICT, right=one, how="anti", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("sex")], aggs=[length()])))


def test_left_join_unmatched_rows(bastion):
    one = op("select", input=op("filter", input=STRICT, predicate=is_target()), exprs=[col("zip"), alias(col("age"), "a")])
    plan = op("join", left=STRICT, right=one, how="left", left_on=[col("zip")], right_on=[col("zip")], suffix="_b")
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("sex")], aggs=[fn("mean", col("a"))])))


def test_concat_duplicates_one_row_ten_times(bastion):
    one = op("filter", input=STRICT, predicate=is_target())
    refused(fetch(bastion, total(op("concat", inputs=[one] * 12), fn("mean", col("cost")))))


def test_concat_of_one_row_with_a_big_group(bastion):
    one = op("filter", input=STRICT, predicate=is_target())
    others = op("filter", input=STRICT, predicate=binary("eq", col("sex"), lit("M")))
    plan = op("concat", inputs=[one, others])
    # grouped by a key only the target's copy has: a group of one row.
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("patient_id")], aggs=[fn("sum", col("cost"))])))


# ------------------------------------------------------------------ one person, many rows
def test_person_with_many_visits_forms_a_large_group(bastion):
    # patient 2 has 3 visits: ten copies of them are still one person.
    plan = op("filter", input=scan("visits"), predicate=binary("le", col("patient_id"), lit(5)))
    refused(fetch(bastion, op("group_by", input=plan, keys=[col("sex")], aggs=[length()])))


def test_visits_indicator_counts_people_not_visits(bastion):
    plan = op("filter", input=scan("visits"), predicate=binary("le", col("patient_id"), lit(12)))
    flag = when([(binary("eq", col("patient_id"), lit(2)), col("cost"))], lit(0))
    refused(fetch(bastion, total(plan, fn("sum", flag))))


# ------------------------------------------------------------------ hidden columns, whatever the path
def test_hidden_column_selected(bastion):
    wiped(fetch(bastion, op("head", input=op("select", input=OPEN, exprs=[col("name")]), n=3)), "name")


def test_hidden_column_via_alias(bastion):
    wiped(fetch(bastion, op("head", input=op("select", input=OPEN, exprs=[alias(col("name"), "who")]), n=3)), "who")


def test_hidden_column_via_rename(bastion):
    wiped(fetch(bastion, op("head", input=op("rename", input=OPEN, mapping={"name": "who"}), n=3)), "who")


def hidden_refused(reply, column: str = "name", use: str = "") -> dict:
    """The reply refuses a use of a hidden column, naming it and the use, before anything ran."""
    body = refused(reply)
    assert f"column {column!r}" in body["evalue"] and use in body["evalue"], body
    assert "hidden columns can only be equality join keys" in body["evalue"], body
    assert body["details"]["column"] == column
    return body


HIDDEN_COMPUTATIONS = [
    ("string_functions", alias(fn("str.to_uppercase", fn("str.slice", col("name"), offset=0, length=3)), "u"),
     "str.slice() in a select() expression"),
    ("length", fn("str.len_chars", col("name")), "str.len_chars()"),
    ("string_concatenation", alias(binary("add", col("name"), col("sex")), "tag"), "add()"),
    ("cast", fn("cast", col("name"), dtype="Int64"), "cast()"),
    ("when_then", alias(when([(binary("eq", col("name"), lit("Ada Adams")), lit("yes"))], lit("no")), "guess"),
     "eq()"),
    ("is_in", alias(fn("is_in", col("name"), values=["Ada Adams", "Bo Berg"]), "guess"), "is_in()"),
    ("is_null", alias(fn("is_null", col("name")), "missing"), "is_null()"),
]


@pytest.mark.parametrize("case_id,expr,use", HIDDEN_COMPUTATIONS, ids=[c[0] for c in HIDDEN_COMPUTATIONS])
def test_hidden_column_in_a_computation_is_refused_even_where_rows_are_released(bastion, case_id, expr, use):
    # patients_open releases row-level results (logged): the value would have come back as *, but the
    # computation itself is refused, so nothing computed from the hidden column reaches a reply.
    hidden_refused(fetch(bastion, op("head", input=op("select", input=OPEN, exprs=[expr]), n=3)), use=use)


def test_hidden_column_via_min(bastion):
    hidden_refused(fetch(bastion, op("group_by", input=OPEN, keys=[col("sex")], aggs=[fn("min", col("name"))])),
                   use="min() in an aggregation")


def test_hidden_column_via_first(bastion):
    hidden_refused(fetch(bastion, op("group_by", input=OPEN, keys=[col("sex")], aggs=[fn("first", col("name"))])),
                   use="first() in an aggregation")


def test_hidden_column_as_a_derived_group_key(bastion):
    key = alias(fn("str.slice", col("name"), offset=0, length=1), "initial")
    hidden_refused(fetch(bastion, op("group_by", input=OPEN, keys=[key], aggs=[length()])),
                   use="str.slice() in a group_by key")


def test_hidden_column_as_a_join_key(bastion):
    right = op("select", input=OPEN, exprs=[alias(col("name"), "n2"), alias(col("age"), "age2")])
    plan = op("join", left=OPEN, right=right, how="inner", left_on=[col("name")], right_on=[col("n2")], suffix="_b")
    wiped(fetch(bastion, op("head", input=op("select", input=plan, exprs=[col("name"), col("age2")]), n=3)), "name")


def test_hidden_column_written_over_another(bastion):
    plan = op("with_columns", input=OPEN, exprs=[alias(col("name"), "age")])
    wiped(fetch(bastion, op("head", input=plan, n=3)), "name", "age")


def test_hidden_column_as_a_fill_value(bastion):
    plan = op("fill_null", input=op("select", input=OPEN, exprs=[col("cost"), col("name")]), value=col("name"))
    hidden_refused(fetch(bastion, op("head", input=plan, n=3)), use="a fill_null value")


def test_hidden_column_through_concat(bastion):
    plan = op("concat", inputs=[op("select", input=OPEN, exprs=[alias(col("name"), "x")]),
                                op("select", input=OPEN, exprs=[alias(col("sex"), "x")])])
    wiped(fetch(bastion, op("head", input=plan, n=3)), "x")


# ------------------------------------------------------------------ oracles: errors and empty results
def test_error_oracle_with_a_format_that_fails_only_on_values(bastion, raw):
    # The format fails only if some row is selected: both must get the same answer.
    replies = []
    for guess in (TARGET, -1):
        plan = total(op("filter", input=STRICT, predicate=binary("eq", col("patient_id"), lit(guess))),
                     fn("count", fn("dt.strftime", col("admission_date"), format="%H")))
        kind, body, frames = fetch(bastion, plan)
        replies.append((kind, body.get("ename"), body.get("evalue")))
    assert replies[0] == replies[1]
    assert replies[0][1] == "SchemaError"


def test_error_oracle_on_a_row_level_query_looks_like_the_refusal(bastion):
    failing = op("select", input=op("filter", input=STRICT, predicate=is_target()),
                 exprs=[fn("str.to_date", fn("cast", col("age"), dtype="String"), format="%Y")])
    plain = op("select", input=op("filter", input=STRICT, predicate=is_target()), exprs=[col("age")])
    assert refused(fetch(bastion, failing))["evalue"] == refused(fetch(bastion, plain))["evalue"]


def test_empty_result_oracle(bastion, raw):
    # "is patient 1 47 years old?": an empty answer and a small one are both refused.
    age = raw.filter(pl.col("patient_id") == TARGET)["age"].item()
    for guess in (age, age + 1):
        condition = binary("and", is_target(), binary("eq", col("age"), lit(guess)))
        refused(fetch(bastion, op("group_by", input=op("filter", input=STRICT, predicate=condition),
                                  keys=[col("sex")], aggs=[length()])))


# ------------------------------------------------------------------ outside the whitelist
@pytest.mark.parametrize("payload", [
    {"expr": "fn", "name": "explode", "input": {"expr": "col", "name": "cost"}, "args": {}},
    {"expr": "acct_const", "value": 100, "name": "__bastion_n0"},
], ids=["explode_expression", "accounting_injection"])
def test_operations_outside_the_whitelist_that_would_inflate_or_list_rows(bastion, payload):
    kind, body, frames = fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[payload]))
    assert kind == "error" and body["ename"] == "UnsupportedOperation", body


# ------------------------------------------------------------------ explode, repeat_by, slice, over, list aggregations
def explode_repeated(frame: dict, column: str, times: int) -> dict:
    return op("explode", input=op("with_columns", input=frame,
                                  exprs=[fn("repeat_by", col(column), by=lit(times))]), columns=[column])


def test_repeat_by_explode_inflates_one_person_into_a_group(bastion):
    # One patient repeated 100 times: polars would count a group of 100.
    one = op("filter", input=STRICT, predicate=is_target())
    body = refused(fetch(bastion, op("group_by", input=explode_repeated(one, "age", 100), keys=[col("sex")],
                                     aggs=[fn("mean", col("cost")), length()])))
    # The refusal tells the rule, never the count that failed it.
    assert "smallest" not in body["evalue"] and set(body["details"]) == {"sources", "min_group_size", "action"}


def test_repeat_by_explode_inflates_a_person_with_visits(bastion):
    one = op("filter", input=scan("visits"), predicate=is_target())
    refused(fetch(bastion, total(explode_repeated(one, "cost", 50), fn("sum", col("cost")))))


def test_repeat_by_explode_inflates_an_indicator_contribution(bastion):
    # Everyone is in the group, but only the target contributes: 100 copies are still one contributor.
    target_cost = op("select", input=STRICT, exprs=[alias(indicator(col("cost")), "x")])
    refused(fetch(bastion, total(explode_repeated(target_cost, "x", 100), fn("sum", col("x")))))


def test_repeat_by_with_a_negative_count_is_no_oracle(bastion):
    # polars fails on a negative count; here it gives an empty list for every row, whatever the data.
    signed = binary("sub", col("age"), lit(50))
    plan = op("select", input=STRICT, exprs=[alias(fn("repeat_by", col("age"), by=signed), "r")])
    failing = op("select", input=STRICT, exprs=[alias(fn("repeat_by", col("age"), by=lit(1)), "r")])
    assert refused(fetch(bastion, plan))["evalue"] == refused(fetch(bastion, failing))["evalue"]


def test_slice_picks_one_row(bastion):
    by_id = op("sort", input=STRICT, by=[col("patient_id")], descending=[False], nulls_last=False)
    refused(fetch(bastion, op("slice", input=by_id, offset=TARGET - 1, length=1)))


def test_slice_then_aggregate_a_group_of_one(bastion):
    by_id = op("sort", input=STRICT, by=[col("patient_id")], descending=[False], nulls_last=False)
    refused(fetch(bastion, total(op("slice", input=by_id, offset=-1, length=1), fn("max", col("cost")))))


def test_window_mean_of_a_partition_of_one_onto_rows(bastion):
    windowed = fn("over", fn("mean", col("cost")), partition_by=[col("patient_id")])
    refused(fetch(bastion, op("select", input=STRICT, exprs=[col("sex"), alias(windowed, "m")])))


def test_window_mean_of_a_small_partition_carried_into_a_group_by(bastion):
    # Each row carries its own patient's cost; the max over a big group is the largest person's value.
    windowed = op("with_columns", input=STRICT,
                  exprs=[alias(fn("over", fn("mean", col("cost")), partition_by=[col("patient_id")]), "m")])
    body = refused(fetch(bastion, op("group_by", input=windowed, keys=[col("sex")], aggs=[fn("max", col("m"))])))
    assert "individual values" in body["evalue"]


def test_window_value_used_as_a_group_key(bastion):
    key = alias(fn("over", fn("max", col("age")), partition_by=[col("zip")]), "oldest_in_zip")
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[key], aggs=[length()])))


def test_window_value_in_a_filter_then_count(bastion):
    windowed = fn("over", fn("max", col("cost")), partition_by=[col("zip")])
    plan = op("filter", input=STRICT, predicate=binary("eq", col("cost"), windowed))
    refused(fetch(bastion, total(plan, length())))


def test_implode_a_group_to_get_its_rows(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("implode", col("age"))])))


def test_implode_then_explode_back_into_rows(bastion):
    listed = op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("implode", col("age"))])
    refused(fetch(bastion, total(op("explode", input=listed, columns=["age"]), fn("max", col("age")))))


def test_head_in_agg(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("head", col("age"), n=1)])))


def test_tail_in_agg(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("tail", col("cost"), n=1)])))


def test_unique_as_a_list(bastion):
    refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[fn("unique", col("zip"))])))


def test_sort_by_first_picks_the_max_persons_zip(bastion):
    richest = fn("first", fn("sort_by", col("zip"), by=col("cost"), descending=True))
    body = refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[alias(richest, "where")])))
    assert "individual values" in body["evalue"]


def test_sort_by_first_of_a_hidden_name_is_refused_even_under_log(bastion):
    richest = fn("first", fn("sort_by", col("name"), by=col("cost"), descending=True))
    hidden_refused(fetch(bastion, op("group_by", input=OPEN, keys=[col("sex")], aggs=[alias(richest, "who")])),
                   use="sort_by() in an aggregation")


def test_sort_by_last_picks_the_oldest_persons_cost(bastion):
    refused(fetch(bastion, total(STRICT, fn("last", fn("sort_by", col("cost"), by=col("age"))))))


def test_filter_inside_agg_on_a_unique_id(bastion):
    body = refused(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")],
                                     aggs=[fn("sum", fn("filter", col("cost"), predicate=is_target()))])))
    assert "needs at least 10 contributors" in body["evalue"]


def test_filter_inside_agg_on_a_hidden_name(bastion, raw):
    name = raw.filter(pl.col("patient_id") == TARGET)["name"].item()
    refused(fetch(bastion, total(STRICT, fn("mean", fn("filter", col("age"),
                                                       predicate=binary("eq", col("name"), lit(name)))))))


def test_filter_outside_an_aggregation_to_misalign_rows(bastion):
    kind, body, _ = fetch(bastion, op("with_columns", input=STRICT,
                                      exprs=[alias(fn("filter", col("cost"), predicate=is_target()), "c")]))
    assert kind == "error" and body["ename"] == "UnsupportedOperation", body


def test_sort_by_outside_an_aggregation_to_move_values_between_people(bastion):
    moved = alias(fn("sort_by", col("cost"), by=col("visit")), "cost")
    kind, body, _ = fetch(bastion, op("with_columns", input=scan("visits"), exprs=[moved]))
    assert kind == "error" and body["ename"] == "UnsupportedOperation", body


def test_reading_the_accounting_columns(bastion):
    kind, body, _ = fetch(bastion, op("select", input=STRICT, exprs=[col("__bastion_n0")]))
    assert kind == "error" and body["ename"] == "SchemaError"


# ------------------------------------------------------------------ honest queries still work
def test_honest_filtered_mean_inside_agg(bastion, raw):
    plan = op("group_by", input=STRICT, keys=[col("sex")],
              aggs=[alias(fn("mean", fn("filter", col("cost"), predicate=col("smoker"))), "smoker_cost")])
    table, body = released(fetch(bastion, plan))
    expected = raw.group_by("sex").agg(pl.col("cost").filter(pl.col("smoker")).mean().alias("smoker_cost"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))
    assert body["decision"]["action"] == "allow"


def test_honest_count_after_repeat_by_explode(bastion, raw):
    plan = op("group_by", input=explode_repeated(STRICT, "age", 2), keys=[col("sex")], aggs=[length()])
    table, body = released(fetch(bastion, plan))
    expected = raw.group_by("sex").agg((pl.len() * 2).alias("len"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


def test_honest_window_mean_reviewed_by_the_owner(bastion):
    windowed = fn("over", fn("mean", col("cost")), partition_by=[col("diagnosis")])
    kind, body, _ = fetch(bastion, op("select", input=scan("patients"), exprs=[col("diagnosis"),
                                                                               alias(windowed, "m")]))
    assert kind == "pending", body


def test_honest_group_by_mean_and_count(bastion, raw):
    table, body = released(fetch(bastion, op("group_by", input=STRICT, keys=[col("diagnosis")],
                                             aggs=[fn("mean", col("cost")), length()])))
    expected = raw.group_by("diagnosis").agg(pl.col("cost").mean(), pl.len())
    assert_frame_equal(table.sort("diagnosis"), expected.sort("diagnosis"))
    assert body["decision"] == {"action": "allow",
                                "reason": "the result meets the owner's release rule for 'patients_strict'"}


def test_honest_share_of_smokers(bastion, raw):
    share = fn("mean", fn("cast", col("smoker"), dtype="Float64"))
    table, _ = released(fetch(bastion, op("group_by", input=STRICT, keys=[col("sex")], aggs=[share])))
    expected = raw.group_by("sex").agg(pl.col("smoker").cast(pl.Float64).mean())
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))


@pytest.mark.parametrize("counting", ["n_unique", "count", "null_count"])
def test_counts_of_a_hidden_column_are_refused(bastion, counting):
    # How many distinct names, or how many are missing, is learned from the hidden column too.
    plan = op("group_by", input=STRICT, keys=[col("sex")], aggs=[alias(fn(counting, col("name")), "names")])
    hidden_refused(fetch(bastion, plan), use=f"{counting}() in an aggregation")


def test_filter_on_a_hidden_column_then_count_is_refused(bastion):
    plan = op("group_by", input=op("filter", input=STRICT, predicate=fn("str.starts_with", col("name"), prefix="A")),
              keys=[col("sex")], aggs=[length()])
    hidden_refused(fetch(bastion, plan), use="str.starts_with() in a filter predicate")


def test_honest_nested_aggregation(bastion, raw):
    inner = op("group_by", input=STRICT, keys=[col("diagnosis"), col("sex")], aggs=[alias(fn("mean", col("cost")), "m")])
    table, _ = released(fetch(bastion, op("group_by", input=inner, keys=[col("sex")], aggs=[fn("max", col("m"))])))
    expected = raw.group_by("diagnosis", "sex").agg(pl.col("cost").mean().alias("m")).group_by("sex").agg(
        pl.col("m").max())
    assert_frame_equal(table.sort("sex"), expected.sort("sex"))


def test_honest_visits_counted_by_people(bastion, raw):
    table, body = released(fetch(bastion, op("group_by", input=scan("visits"), keys=[col("zip")],
                                             aggs=[alias(fn("n_unique", col("patient_id")), "people"),
                                                   alias(fn("mean", col("cost")), "mean_cost")])))
    assert table.height == raw["zip"].n_unique()
    assert "release rule for 'visits'" in body["decision"]["reason"]


def test_dominance_lets_an_ordinary_sum_through(bastion, raw):
    table, _ = released(fetch(bastion, op("group_by", input=scan("dominance"), keys=[col("diagnosis")],
                                          aggs=[fn("sum", col("cost"))])))
    expected = raw.group_by("diagnosis").agg(pl.col("cost").sum())
    assert_frame_equal(table.sort("diagnosis"), expected.sort("diagnosis"))


# ------------------------------------------------------------------ small-cell suppression
def test_suppression_drops_only_the_small_groups_and_tells_no_count(bastion, raw):
    table, body = released(fetch(bastion, op("group_by", input=scan("suppressed"), keys=[col("diagnosis"), col("zip")],
                                             aggs=[alias(length(), "n")])))
    sizes = raw.group_by("diagnosis", "zip").len()
    small = sizes.filter(pl.col("len") < 10).height
    assert small > 0  # precondition: the query has small groups
    assert_frame_equal(table.sort("diagnosis", "zip"), sizes.filter(pl.col("len") >= 10).rename({"len": "n"})
                       .sort("diagnosis", "zip"), check_dtypes=False)
    assert body["notes"] == ["groups that do not meet the owner's release rule are left out (small-group "
                             "suppression)"]


def test_suppression_does_not_release_row_level_results(bastion):
    refused(fetch(bastion, op("head", input=scan("suppressed"), n=5)))


# ------------------------------------------------------------------ limits
def test_rows_limit_holds_back_a_long_result(bastion):
    kind, body, _ = fetch(bastion, op("select", input=scan("limited"), exprs=[col("age")]))
    assert kind == "result" and body["decision"]["action"] == "log"
    assert "at most 100 rows" in body["decision"]["reason"]


# ------------------------------------------------------------------ policy matrix: rule x scientist x operation
FIVE = op("filter", input=scan("tiered"), predicate=binary("le", col("patient_id"), lit(5)))
OPERATIONS = {
    "aggregate_of_big_groups": op("group_by", input=scan("tiered"), keys=[col("sex")], aggs=[fn("mean", col("age"))]),
    "aggregate_of_five_rows": total(FIVE, fn("mean", col("age"))),
    "row_level": op("select", input=FIVE, exprs=[col("age")]),
    "indicator": total(scan("tiered"), fn("sum", indicator(col("cost")))),
}
EXPECTED = {  # (scientist, operation) -> reply kind
    ("alice", "aggregate_of_big_groups"): "result", ("bob", "aggregate_of_big_groups"): "result",
    ("alice", "aggregate_of_five_rows"): "result", ("bob", "aggregate_of_five_rows"): "error",
    ("alice", "row_level"): "pending", ("bob", "row_level"): "error",
    ("alice", "indicator"): "pending", ("bob", "indicator"): "error",
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("scientist", ["alice", "bob"])
def test_per_scientist_overrides(bastion, scientist, operation):
    kind, body, _ = fetch(bastion, OPERATIONS[operation], who=scientist)
    assert kind == EXPECTED[(scientist, operation)], body
    if kind == "error":
        assert body["ename"] == "PolicyViolation"


def test_a_scientist_sees_only_their_own_policy(bastion):
    for who, expected in (("alice", {"min_group_size": 3}), ("bob", {"aggregates_only": True})):
        kind, body, _ = bastion.client(who).request("datasets", {})
        policy = {d["name"]: d["policy"] for d in body["datasets"]}["tiered"]
        assert "scientists" not in policy
        assert {k: policy.get(k) for k in expected} == expected
