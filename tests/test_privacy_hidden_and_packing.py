"""Hidden columns are join keys only; row order and exponents cannot pack people into one number.

Each attack is the arithmetic a hostile scientist did, sent straight to a
running executor (no kernel): a hidden name rebuilt letter by letter from
released counts, a hidden column used as a group key, a sort key, a count or
a condition; 53 people's flags packed into one released sum by weighting each
row with a power of two of its row index.  Every one is refused (or held),
and twin queries or twin datasets that differ by one person get identical
replies (the request id aside), so the arithmetic recovers nothing.  Honest
uses keep working: an equality join on a hidden key, aggregates of the row
index alone, a literal exponent.

Datasets of this module (over the synthetic patients table of conftest):

=====================  =====================================================
``patients_strict``    K=10, ``name`` hidden, reject (conftest)
``patients``           K=10, ``name`` hidden, review (conftest)
``packed`` / ``packed_twin``   K=10, reject; the twin differs by one
                       person's ``smoker`` flag among the first 53 rows
``per_scientist``      K=10, review, ``name`` hidden; bob also hides ``zip``
``tagged``             K=1, log, a hidden list column ``tags``
=====================  =====================================================
"""
from __future__ import annotations

import json
import math

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bastion_kernel.contract import plan as P
from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.language.sql import sql_to_plan
from bastion_kernel.contract.protocol import BastionError

from wire import fetch, released, send

pytestmark = pytest.mark.timeout(300)

col, lit, fn, binary, alias, length, when = P.col, P.lit, P.fn, P.binary, P.alias, P.length, P.when
op, scan = P.frame_op, P.scan
STRICT = scan("patients_strict")
REVIEW = scan("patients")
PACKED_PEOPLE = 53  # bits of a float64 mantissa: one released sum holds one flag per person
FLIPPED_ROW = 5


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bastion(executor, owner_workspace, raw, tmp_path_factory):
    """The module's executor, with the extra datasets of the module docstring registered."""
    data = tmp_path_factory.mktemp("hidden_packing")
    workspace, csv = owner_workspace.workspace, owner_workspace.data_file
    twin = raw.with_columns(pl.when(pl.int_range(pl.len()) == FLIPPED_ROW).then(~pl.col("smoker"))
                            .otherwise(pl.col("smoker")).alias("smoker"))
    twin.write_csv(data / "twin.csv")
    workspace.add_dataset("packed", csv, min_group_size=10, unsafe="reject")
    workspace.add_dataset("packed_twin", data / "twin.csv", min_group_size=10, unsafe="reject")
    workspace.add_dataset("per_scientist", csv, min_group_size=10, unsafe="review", hidden=["name"],
                          scientists={"bob": {"hidden": ["name", "zip"]}})
    raw.select("patient_id", "sex", tags=pl.concat_list(pl.col("diagnosis"), pl.col("sex"))) \
        .write_parquet(data / "tagged.parquet")
    workspace.add_dataset("tagged", data / "tagged.parquet", min_group_size=1, unsafe="log", hidden=["tags"])
    return executor


def comparable(reply) -> str:
    """A reply as the scientist reads it, with the request id (a counter) taken out."""
    kind, body, frames = reply
    body = {k: v for k, v in body.items() if k != "request_id"}
    if isinstance(body.get("details"), dict):
        body["details"] = {k: v for k, v in body["details"].items() if k != "request_id"}
    return json.dumps([kind, body, [bytes(f).hex() for f in frames]], sort_keys=True)


def identical(replies: list, same_names: tuple[str, str] = ("packed_twin", "packed")) -> None:
    """Every reply reads the same (twin datasets' names, a plan fact, taken as one)."""
    readings = {comparable(r).replace(*same_names) for r in replies}
    assert len(readings) == 1, "\n".join(sorted(readings))


def hidden_refused(reply, column: str, use: str) -> dict:
    """A PolicyViolation, before anything ran, naming the hidden column and its use; no table."""
    kind, body, frames = reply
    assert kind == "error" and body["ename"] == "PolicyViolation", (kind, body)
    assert frames == []
    assert f"column {column!r}" in body["evalue"] and use in body["evalue"], body["evalue"]
    assert "hidden columns can only be equality join keys" in body["evalue"]
    assert body["details"]["column"] == column
    return body


def hidden_refused_in_sql(reply, column: str, use: str) -> dict:
    """As :func:`hidden_refused`; the column the plan uses may be one the SQL translation named."""
    kind, body, frames = reply
    assert kind == "error" and body["ename"] == "PolicyViolation" and frames == [], (kind, body)
    assert f"{column!r} of 'patients_strict'" in body["evalue"] and use in body["evalue"], body["evalue"]
    assert "hidden columns can only be equality join keys" in body["evalue"]
    return body


def pending_requests(bastion, text: str) -> list[dict]:
    """The owner's pending requests whose cell text is ``text``."""
    listed = bastion.owner("requests", "--json")
    assert listed.returncode == 0, listed.stderr
    return [r for r in json.loads(listed.stdout) if r["query_text"] == text]


def count_where(frame: dict, predicate: dict) -> dict:
    return op("select", input=op("filter", input=frame, predicate=predicate), exprs=[length()])


def sql(bastion, query: str, who: str = "alice") -> dict:
    """The plan the kernel makes of a %%sql cell, with the schemas the executor reports."""
    kind, body, _ = send(bastion, "datasets", {}, who)
    assert kind == "ok", body
    return sql_to_plan(query, {d["name"]: d["schema"] for d in body["datasets"]})


# ------------------------------------------------------------------ hidden columns: the attacks
@pytest.mark.parametrize("dataset", ["patients_strict", "patients"], ids=["reject", "review"])
def test_rebuilding_a_hidden_name_letter_by_letter_is_refused_alike_for_every_letter(bastion, raw, dataset):
    # 237 released counts rebuilt a name: now every prefix gets the same refusal, whatever matches.
    name = raw.filter(pl.col("patient_id") == 1)["name"].item()
    prefixes = [name[:1], name[:3], name, "Ω", "Zq"]
    text = f"letters of a name in {dataset}"
    replies = [fetch(bastion, count_where(scan(dataset), fn("str.starts_with", col("name"), prefix=prefix)),
                     text=text) for prefix in prefixes]
    identical(replies)
    hidden_refused(replies[0], "name", "str.starts_with() in a filter predicate")
    assert pending_requests(bastion, text) == []  # refused before running: nothing waits for the owner either


@pytest.mark.parametrize("predicate", [
    fn("str.contains", col("name"), pattern="^Ada"),
    binary("eq", fn("str.slice", col("name"), offset=0, length=1), lit("A")),
    binary("lt", col("name"), lit("B")),
    fn("is_in", col("name"), values=["Ada Adams"]),
], ids=["contains", "slice", "compare", "is_in"])
def test_any_predicate_on_a_hidden_column_is_refused(bastion, predicate):
    hidden_refused(fetch(bastion, count_where(STRICT, predicate)), "name", "in a filter predicate")


def test_group_by_a_hidden_column_is_refused(bastion):
    plan = op("group_by", input=STRICT, keys=[col("name")], aggs=[length()])
    hidden_refused(fetch(bastion, plan), "name", "a group_by key")


def test_sort_by_a_hidden_column_then_row_index_then_filter_is_refused(bastion):
    # The row index after a sort by name would be each name's rank.
    ranked = op("with_row_index", input=op("sort", input=STRICT, by=[col("name")], descending=[False],
                                           nulls_last=False), name="rank")
    plan = count_where(ranked, binary("lt", col("rank"), lit(100)))
    hidden_refused(fetch(bastion, plan), "name", "a sort key")


def test_hidden_lineage_survives_rename_join_and_concat(bastion):
    renamed = op("rename", input=STRICT, mapping={"name": "who"})
    hidden_refused(fetch(bastion, count_where(renamed, fn("is_null", col("who")))), "who", "is_null()")
    right = op("select", input=STRICT, exprs=[alias(col("patient_id"), "pid"), col("name")])
    joined = op("join", left=op("select", input=STRICT, exprs=[col("patient_id"), col("name")]), right=right,
                how="inner", left_on=[col("patient_id")], right_on=[col("pid")], suffix="_other")
    hidden_refused(fetch(bastion, count_where(joined, fn("str.starts_with", col("name_other"), prefix="A"))),
                   "name_other", "str.starts_with()")
    mixed = op("concat", inputs=[op("select", input=STRICT, exprs=[alias(col("sex"), "x")]),
                                 op("select", input=STRICT, exprs=[alias(col("name"), "x")])])
    hidden_refused(fetch(bastion, op("group_by", input=mixed, keys=[col("x")], aggs=[length()])), "x",
                   "a group_by key")


@pytest.mark.parametrize("counting,use", [
    (fn("count", col("name")), "count()"),
    (fn("n_unique", col("name")), "n_unique()"),
    (fn("null_count", col("name")), "null_count()"),
    (fn("sum", fn("is_null", col("name"))), "is_null()"),
    (fn("sum", fn("str.len_chars", col("name"))), "str.len_chars()"),
], ids=["count", "n_unique", "null_count", "is_null", "len_chars"])
def test_counts_of_a_hidden_column_are_refused(bastion, counting, use):
    plan = op("group_by", input=STRICT, keys=[col("sex")], aggs=[alias(counting, "n")])
    hidden_refused(fetch(bastion, plan), "name", f"{use} in an aggregation")


def test_a_hidden_column_in_when_then_is_refused_whatever_the_guess(bastion, raw):
    name = raw.filter(pl.col("patient_id") == 1)["name"].item()
    replies = []
    for guess in (name, "Nobody Atall"):
        indicator = when([(binary("eq", col("name"), lit(guess)), col("cost"))], lit(0.0))
        replies.append(fetch(bastion, op("select", input=STRICT, exprs=[fn("sum", indicator)])))
    identical(replies)
    hidden_refused(replies[0], "name", "eq() in a select() expression")


def test_a_hidden_column_in_a_window_partition_is_refused(bastion):
    windowed = alias(fn("over", fn("mean", col("cost")), partition_by=[col("name")]), "m")
    hidden_refused(fetch(bastion, op("select", input=REVIEW, exprs=[col("sex"), windowed])), "name", "over()")


def test_unique_and_drop_nulls_over_every_column_read_the_hidden_one(bastion):
    # unique() compares every column (the number of distinct names), drop_nulls() tests each for nulls.
    for kind in ("unique", "drop_nulls"):
        plan = op("select", input=op(kind, input=STRICT, subset=None), exprs=[length()])
        hidden_refused(fetch(bastion, plan), "name", f"{kind}() without a subset")
        plan = op("select", input=op(kind, input=STRICT, subset=["name"]), exprs=[length()])
        hidden_refused(fetch(bastion, plan), "name", f"the subset of {kind}()")
    # Naming the other columns, or dropping the hidden one first, is the honest way.
    plan = op("group_by", input=op("drop_nulls", input=op("drop", input=STRICT, columns=["name"]), subset=None),
              keys=[col("sex")], aggs=[length()])
    assert released(fetch(bastion, plan))[1]["decision"]["action"] == "allow"


def test_exploding_a_hidden_list_column_is_refused(bastion):
    # Exploding would make the row count tell each list's length.
    plan = op("group_by", input=op("explode", input=scan("tagged"), columns=["tags"]), keys=[col("sex")],
              aggs=[length()])
    hidden_refused(fetch(bastion, plan), "tags", "explode()")


@pytest.mark.parametrize("query,use", [
    ("SELECT COUNT(*) AS n FROM patients_strict WHERE name LIKE 'A%'", "in a filter predicate"),
    ("SELECT COUNT(*) AS n FROM patients_strict WHERE name = 'Ada Adams'", "in a filter predicate"),
    ("SELECT name, COUNT(*) AS n FROM patients_strict GROUP BY name", "a group_by key"),
    ("SELECT COUNT(DISTINCT name) AS n FROM patients_strict", "in a select() expression"),
    ("SELECT sex FROM patients_strict ORDER BY name LIMIT 5", "a sort key"),
    ("SELECT DISTINCT name FROM patients_strict", "unique() without a subset"),
], ids=["like", "equals", "group_by", "count_distinct", "order_by", "distinct"])
def test_sql_on_a_hidden_column_is_refused_like_the_dataframe_language(bastion, query, use):
    hidden_refused_in_sql(fetch(bastion, sql(bastion, query)), "name", use)


def test_a_save_that_computes_on_a_hidden_column_is_refused(bastion):
    plan = op("select", input=STRICT, exprs=[alias(fn("str.to_uppercase", col("name")), "upper")])
    reply = send(bastion, "save", {"plan": plan, "name": "upper_names", "text": "attack"})
    hidden_refused(reply, "name", "str.to_uppercase()")


# ------------------------------------------------------------------ hidden columns: honest uses
def test_an_equality_join_on_a_hidden_key_still_works(bastion, raw):
    right = op("select", input=STRICT, exprs=[alias(col("name"), "other_name"), alias(col("cost"), "other_cost")])
    joined = op("join", left=STRICT, right=right, how="inner", left_on=[col("name")], right_on=[col("other_name")],
                suffix="_b")
    table, body = released(fetch(bastion, op("group_by", input=joined, keys=[col("sex")], aggs=[length()])))
    expected = raw.join(raw.select(pl.col("name"), pl.col("cost").alias("other_cost")), on="name") \
        .group_by("sex").agg(pl.len())
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)
    assert body["decision"]["action"] == "allow"
    # The key itself passes through: a row-level result, held for the owner (the scientist would see *).
    right = op("select", input=REVIEW, exprs=[alias(col("name"), "other_name"), alias(col("cost"), "other_cost")])
    joined = op("join", left=REVIEW, right=right, how="inner", left_on=[col("name")], right_on=[col("other_name")],
                suffix="_b")
    kind, body, frames = fetch(bastion, op("head", input=op("select", input=joined, exprs=[col("name"), col("sex")]),
                                           n=3))
    assert kind == "pending" and frames == [], body


def test_sql_join_on_a_hidden_key_still_works(bastion, raw):
    plan = sql(bastion, "SELECT a.sex, COUNT(*) AS n FROM patients_strict a JOIN patients_strict b "
                        "ON a.name = b.name GROUP BY a.sex")
    table, _ = released(fetch(bastion, plan))
    expected = raw.join(raw.select("name"), on="name").group_by("sex").agg(pl.len().alias("n"))
    assert_frame_equal(table.sort("sex"), expected.sort("sex"), check_dtypes=False)


# ------------------------------------------------------------------ per-scientist hidden columns
def test_schema_and_datasets_honour_a_per_scientist_hidden_override(bastion):
    for who, zip_type in (("alice", "Int64"), ("bob", "String")):
        kind, body, _ = send(bastion, "schema", {"plan": scan("per_scientist")}, who)
        assert kind == "ok" and dict(map(tuple, body["schema"]))["zip"] == zip_type, (who, body)
        kind, body, _ = send(bastion, "datasets", {}, who)
        entry = next(d for d in body["datasets"] if d["name"] == "per_scientist")
        assert dict(map(tuple, entry["schema"]))["zip"] == zip_type
        assert ("zip" in entry["policy"]["hidden"]) == (who == "bob")


def test_a_per_scientist_hidden_column_is_refused_in_evaluate_and_save(bastion, raw):
    by_zip = op("group_by", input=scan("per_scientist"), keys=[col("zip")], aggs=[length()])
    hidden_refused(fetch(bastion, by_zip, "bob"), "zip", "a group_by key")
    table, _ = released(fetch(bastion, by_zip, "alice"))
    assert table.height == raw["zip"].n_unique()
    derived = op("select", input=scan("per_scientist"), exprs=[alias(binary("add", col("zip"), lit(1)), "z")])
    hidden_refused(send(bastion, "save", {"plan": derived, "name": "zips_plus_one", "text": "attack"}, "bob"),
                   "zip", "add()")


def test_completion_and_inspection_follow_the_executors_hidden_columns_for_each_scientist(bastion):
    for who in ("alice", "bob"):
        interp = Interpreter(bastion.kernel_client(who))
        interp.run_cell('t = dataset("per_scientist")')
        hidden = {"name", "zip"} if who == "bob" else {"name"}
        in_filter = set(interp.complete('t.filter(col("', len('t.filter(col("')).matches)
        in_join = set(interp.complete('t.join(t, left_on="', len('t.join(t, left_on="')).matches)
        assert hidden.isdisjoint(in_filter) and {"age", "sex"} <= in_filter, (who, in_filter)
        assert hidden <= in_join, (who, in_join)
        text = interp.inspect("t", 1)
        for column in ("name", "zip"):
            marked = f"{column}: String  (hidden: a join key only" in text
            assert marked == (column in hidden), (who, column, text)
    with pytest.raises(BastionError) as caught:  # through the kernel, the executor's refusal as it is
        interp.run_cell('t.group_by("zip").agg(pl.len()).fetch()')
    assert caught.value.ename == "PolicyViolation" and "column 'zip'" in caught.value.evalue


# ------------------------------------------------------------------ packing through row order
def weights_from_the_row_index(power_of: float) -> dict:
    """``exp(index * ln(power_of))``: each row's weight is power_of ** its position (no pow needed)."""
    return fn("exp", binary("mul", col("index"), lit(math.log(power_of))))


def first_people(dataset: str) -> dict:
    indexed = op("with_row_index", input=scan(dataset), name="index")
    return op("filter", input=indexed, predicate=binary("lt", col("index"), lit(PACKED_PEOPLE)))


def flag() -> dict:
    return fn("cast", col("smoker"), dtype="Float64")


PACKINGS = {
    # sum(smoker * 2.0 ** index): one bit per person in one released float
    "exp_weights": lambda ds: op("select", input=first_people(ds),
                                 exprs=[alias(fn("sum", binary("mul", flag(), weights_from_the_row_index(2.0))),
                                              "packed")]),
    # the weight computed first, renamed, then summed at the next step
    "weight_column": lambda ds: op("select", input=op("rename", input=op("with_columns", input=first_people(ds),
                                                                         exprs=[alias(weights_from_the_row_index(2.0),
                                                                                      "w")]),
                                                      mapping={"w": "weight"}),
                                   exprs=[fn("sum", binary("mul", flag(), col("weight")))]),
    # integer packing of ages, 7 bits each, with a when/then table of weights instead of exponents
    "integer_ages": lambda ds: op("select", input=first_people(ds), exprs=[fn("sum", binary(
        "mul", col("age"), when([(binary("eq", col("index"), lit(i)), lit(128 ** i)) for i in range(8)],
                                lit(0))))]),
    # the weights on one side of a join, the flags on the other
    "joined": lambda ds: op("select", input=op(
        "join", left=op("select", input=first_people(ds),
                        exprs=[col("patient_id"), alias(weights_from_the_row_index(2.0), "w")]),
        right=op("select", input=scan(ds), exprs=[alias(col("patient_id"), "pid"), alias(flag(), "f")]),
        how="inner", left_on=[col("patient_id")], right_on=[col("pid")], suffix="_r"),
        exprs=[fn("sum", binary("mul", col("f"), col("w")))]),
    # inside a group_by, weighted per group
    "grouped": lambda ds: op("group_by", input=first_people(ds), keys=[col("sex")],
                             aggs=[fn("sum", binary("mul", flag(), weights_from_the_row_index(2.0)))]),
}


@pytest.mark.parametrize("packing", list(PACKINGS), ids=list(PACKINGS))
def test_packing_through_the_row_index_recovers_nothing(bastion, raw, packing):
    make = PACKINGS[packing]
    replies = [fetch(bastion, make(dataset)) for dataset in ("packed", "packed_twin")]
    identical(replies)  # the twins differ by one person's flag: the replies may not
    kind, body, frames = replies[0]
    assert kind == "error" and body["ename"] == "PolicyViolation" and frames == [], body
    assert "value computed with the row order" in body["evalue"], body["evalue"]


def test_packing_is_held_for_review_not_released_automatically(bastion):
    plan = op("select", input=op("with_row_index", input=REVIEW, name="index"),
              exprs=[fn("sum", binary("mul", flag(), weights_from_the_row_index(2.0)))])
    kind, body, frames = fetch(bastion, plan, text="packing for review")
    assert kind == "pending" and frames == [], body
    held = pending_requests(bastion, "packing for review")
    assert len(held) == 1 and "value computed with the row order" in held[0]["reason"], held


def test_an_exponent_from_the_row_index_or_a_column_is_refused_with_a_typed_error(bastion):
    refusals = [
        op("select", input=op("with_row_index", input=STRICT, name="index"),
           exprs=[fn("sum", binary("mul", flag(), binary("pow", lit(2.0), col("index"))))]),
        op("select", input=STRICT, exprs=[fn("sum", fn("pow", lit(2), exponent=col("age")))]),
        op("select", input=STRICT, exprs=[fn("sum", binary("pow", col("cost"), binary("sub", col("age"), lit(1))))]),
        sql(bastion, "SELECT SUM(POWER(2, age)) AS s FROM patients_strict"),
    ]
    for plan in refusals:
        kind, body, frames = fetch(bastion, plan)
        assert kind == "error" and body["ename"] == "PolicyViolation" and frames == [], body
        assert body["evalue"].startswith("pow: the exponent must be a literal number"), body["evalue"]
        assert body["details"]["function"] == "pow" and body["details"]["at"].startswith("plan.")


def test_literal_exponents_and_aggregates_of_the_index_alone_keep_their_accounting(bastion, raw):
    squares = op("group_by", input=STRICT, keys=[col("sex")], aggs=[alias(fn("sum", binary("pow", col("age"), lit(2))),
                                                                          "sq")])
    table, _ = released(fetch(bastion, squares))
    assert_frame_equal(table.sort("sex"), raw.group_by("sex").agg((pl.col("age") ** 2).sum().alias("sq")).sort("sex"),
                       check_dtypes=False)
    table, _ = released(fetch(bastion, sql(bastion, "SELECT sex, SUM(POWER(age, 2)) AS sq FROM patients_strict "
                                                    "GROUP BY sex")))
    assert table.height == 2
    indexed = op("with_row_index", input=STRICT, name="index")
    table, _ = released(fetch(bastion, op("select", input=indexed, exprs=[fn("mean", col("index")), length()])))
    assert table["index"].item() == pytest.approx((raw.height - 1) / 2)
    buckets = op("group_by", input=indexed, keys=[alias(binary("floordiv", col("index"), lit(1000)), "bucket")],
                 aggs=[length()])
    table, _ = released(fetch(bastion, buckets))
    assert sorted(table["len"].to_list()) == sorted(raw.with_row_index().group_by(pl.col("index") // 1000).len()["len"]
                                                    .to_list())
    # A filter on the index picking one row is caught by the group size, as before.
    one = op("select", input=op("filter", input=indexed, predicate=binary("eq", col("index"), lit(7))),
             exprs=[fn("sum", col("cost"))])
    kind, body, _ = fetch(bastion, one)
    assert kind == "error" and body["ename"] == "PolicyViolation", body


def test_the_language_has_no_bit_shifts(bastion):
    interp = Interpreter(bastion.kernel_client("alice"))
    with pytest.raises(BastionError) as caught:
        interp.run_cell('dataset("patients_strict").select((pl.lit(1) << col("age")).sum()).fetch()')
    assert caught.value.ename == "UnsupportedOperation" and "LShift" in caught.value.evalue
    for query in ("SELECT SUM(1 << age) AS s FROM patients_strict",
                  "SELECT SUM(cost * ROW_NUMBER() OVER (ORDER BY age)) AS s FROM patients_strict"):
        with pytest.raises(BastionError) as caught:
            sql(bastion, query)
        assert caught.value.ename == "UnsupportedOperation", caught.value.evalue
