"""What the scientist is told depends on the plan and the policy, never on the rows.

Each attack here is the arithmetic a hostile scientist did on the texts of
refusals and holds, sent straight to a running executor (no kernel): twin
queries whose rows differ by one person's value.  Both twins must get
byte-identical replies (the request id aside), so the arithmetic that
recovered the value recovers nothing.  The owner still sees the counts: in the
audit log, the approval store and the console.
"""
from __future__ import annotations

import inspect
import json
import string

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import ERROR_CLASSES, ERROR_NAMES, BastionError
from owner_console import decide
from owner_console.audit import read_entries

pytestmark = pytest.mark.timeout(300)

col, lit, fn, binary, alias, length = P.col, P.lit, P.fn, P.binary, P.alias, P.length
op, scan = P.frame_op, P.scan
TARGET = 1


@pytest.fixture(scope="module")
def bastion(executor, owner_workspace):
    workspace, csv = owner_workspace.workspace, owner_workspace.data_file
    workspace.add_dataset("replies_suppressed", csv, min_group_size=10, unsafe="reject", hidden=["name"],
                          suppress_small_groups=True)
    workspace.add_dataset("replies_limited", csv, min_group_size=10, unsafe="reject", hidden=["name"],
                          max_rows_released=3)
    return executor


def send(bastion, kind: str, body: dict, who: str = "alice"):
    return bastion.client(who).request(kind, body, timeout=120)


def comparable(reply) -> str:
    """A reply as the scientist reads it, with the request id (a counter) taken out."""
    kind, body, frames = reply
    body = dict(body)
    body.pop("request_id", None)
    if isinstance(body.get("details"), dict):
        body["details"] = {k: v for k, v in body["details"].items() if k != "request_id"}
    return json.dumps([kind, body, [bytes(f).hex() for f in frames]], sort_keys=True)


def twins(bastion, make_plan, values, kind="fetch", **extra) -> list:
    """Send ``make_plan(v)`` for each value; assert every reply reads the same; return the replies."""
    replies = [send(bastion, kind, {"plan": make_plan(v), "text": "twin", **extra}) for v in values]
    readings = {comparable(r) for r in replies}
    assert len(readings) == 1, "\n".join(sorted(readings))
    return replies


def target(raw: pl.DataFrame, column: str):
    return raw.filter(pl.col("patient_id") == TARGET)[column].item()


def is_target() -> dict:
    return binary("eq", col("patient_id"), lit(TARGET))


def and_(left: dict, right: dict) -> dict:
    return binary("and", left, right)


@pytest.mark.parametrize("dataset", ["patients_strict", "patients"], ids=["reject", "review"])
def test_smallest_count_oracle_on_one_persons_attribute(bastion, raw, dataset):
    # "(smallest: 1)" against "(smallest: 0)" said whether the target has the attribute.
    sex = target(raw, "sex")
    other = "F" if sex == "M" else "M"

    def plan(value):
        return op("group_by", input=op("filter", input=scan(dataset),
                                       predicate=and_(is_target(), binary("eq", col("sex"), lit(value)))),
                  keys=[col("zip")], aggs=[length()])
    replies = twins(bastion, plan, [sex, other])
    kind, body, _ = replies[0]
    assert kind == ("error" if dataset == "patients_strict" else "pending"), body


def test_binary_search_on_age_through_empty_or_row_level(bastion, raw):
    # "the result is empty" against "the result is row-level" turned age > t into a binary search.
    age = target(raw, "age")

    def rows(threshold):
        return op("select", input=op("filter", input=scan("patients_strict"),
                                     predicate=and_(is_target(), binary("gt", col("age"), lit(threshold)))),
                  exprs=[col("age")])

    def count(threshold):
        return op("select", input=op("filter", input=scan("patients_strict"),
                                     predicate=and_(is_target(), binary("gt", col("age"), lit(threshold)))),
                  exprs=[alias(length(), "n")])
    twins(bastion, rows, [age - 1, age])
    twins(bastion, count, [age - 1, age])


def test_k_of_n_groups_oracle(bastion, raw):
    # "1 of 40 groups" against "2 of 40 groups": one more person in a small cell changed the tally.
    zip_code, sex = target(raw, "zip"), target(raw, "sex")
    other = raw.filter((pl.col("zip") == zip_code) & (pl.col("sex") != sex))["patient_id"][0]

    def plan(kept):
        keep = binary("or", binary("ne", col("zip"), lit(zip_code)), fn("is_in", col("patient_id"), values=kept))
        return op("group_by", input=op("filter", input=scan("patients_strict"), predicate=keep),
                  keys=[col("zip"), col("sex")], aggs=[length(), fn("mean", col("cost"))])
    twins(bastion, plan, [[TARGET], [TARGET, other]])


def test_suppression_count_oracle(bastion, raw):
    # "4 group(s) were left out" told how many small groups the target's filter made.
    def plan(age_limit):
        return op("group_by", input=op("filter", input=scan("replies_suppressed"),
                                       predicate=binary("lt", col("age"), lit(age_limit))),
                  keys=[col("zip")], aggs=[alias(length(), "n")])
    ages = sorted(raw["age"].unique().to_list())
    # Two cut-offs that suppress different numbers of groups but release the same big groups.
    low, high = ages[len(ages) // 2], ages[len(ages) // 2] + 1
    kinds = [send(bastion, "fetch", {"plan": plan(a), "text": "twin"}) for a in (low, high)]
    for kind, body, _ in kinds:
        assert kind == "result", body
        assert body["notes"] == [decide.PUBLIC_TEXTS["suppressed"]]
        assert body["decision"] == kinds[0][1]["decision"]


def test_rows_limit_refusal_names_no_size(bastion):
    def plan(limit):
        return op("group_by", input=op("filter", input=scan("replies_limited"),
                                       predicate=binary("lt", col("age"), lit(limit))),
                  keys=[col("sex")], aggs=[length()])
    kind, body, _ = send(bastion, "fetch", {"plan": plan(200), "text": ""})
    assert kind == "result", body  # two groups: within the limit of 3
    zips = op("group_by", input=scan("replies_limited"), keys=[col("zip")], aggs=[length()])
    big = op("group_by", input=scan("replies_limited"), keys=[col("zip"), col("sex")], aggs=[length()])
    first, second = send(bastion, "fetch", {"plan": zips, "text": ""}), send(bastion, "fetch", {"plan": big,
                                                                                               "text": ""})
    for kind, body, _ in (first, second):
        assert kind == "error" and body["ename"] == "PolicyViolation", body
        assert "at most 3 rows" in body["evalue"]
    assert first[1]["evalue"] == second[1]["evalue"]


def test_a_failure_reads_as_the_refusal_the_plan_would_get(bastion, raw):
    # The conversion fails only when the target's row is selected: failing and empty must read the same.
    age = target(raw, "age")

    def plan(threshold):
        chosen = op("filter", input=scan("patients_strict"),
                    predicate=and_(is_target(), binary("gt", col("age"), lit(threshold))))
        return op("group_by", input=chosen, keys=[col("sex")],
                  aggs=[alias(fn("count", fn("str.to_date", fn("cast", col("age"), dtype="String"),
                                             format="%d/%m")), "n")])
    twins(bastion, plan, [age - 1, age])


def mismatched_explode(frame: dict) -> dict:
    """Two list columns whose lengths differ on the target's row only: polars would fail on that row."""
    twice_for_target = P.when([(is_target(), lit(2))], lit(1))
    lists = op("with_columns", input=frame, exprs=[alias(fn("repeat_by", col("age"), by=lit(1)), "a"),
                                                   alias(fn("repeat_by", col("cost"), by=twice_for_target), "b")])
    return op("explode", input=lists, columns=["a", "b"])


@pytest.mark.parametrize("kind", ["fetch", "save"])
def test_a_run_time_failure_on_one_row_is_no_oracle(bastion, raw, kind):
    # Exploding lists of different lengths failed only when the target's row was selected.
    age = target(raw, "age")

    def plan(threshold):
        chosen = op("filter", input=scan("patients_strict"), predicate=binary("gt", col("age"), lit(threshold)))
        return op("group_by", input=mismatched_explode(chosen), keys=[col("sex")], aggs=[fn("sum", col("b"))])
    replies = twins(bastion, plan, [age - 1, age], kind=kind, **({"name": "twin_save"} if kind == "save" else {}))
    kind_, body, _ = replies[0]
    assert kind_ == "error" and body["ename"] == "UnsupportedOperation" and "one column at a time" in body["evalue"]


# ------------------------------------------------------------------ the texts themselves
def test_public_texts_have_no_placeholder_that_can_hold_data():
    for key, text in decide.PUBLIC_TEXTS.items():
        names = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        assert names <= decide.PUBLIC_PLACEHOLDERS, (key, names)
    # The public reason is computed without the result: it cannot see a row.
    assert list(inspect.signature(decide.public_reason).parameters) == ["accounted", "action"]
    assert list(inspect.signature(decide.public_notes).parameters) == ["accounted"]


# Detail names that carry counts or facts about rows; none may be public.
DATA_DETAILS = {"rows", "smallest_count", "failing_rows", "suppressed_groups", "suppressed", "error_class",
                "detail", "error", "failed_rows", "count", "value"}


def test_every_error_is_a_typed_class_whose_public_fields_carry_no_data():
    assert set(ERROR_CLASSES) == set(ERROR_NAMES)
    for name, cls in ERROR_CLASSES.items():
        assert issubclass(cls, BastionError) and cls.ename == name
        assert not cls.PUBLIC_FIELDS & DATA_DETAILS, name
        error = BastionError(name, "text", rows=5, smallest_count=1, **{f: "x" for f in cls.PUBLIC_FIELDS})
        assert type(error) is cls
        assert set(error.body()["details"]) == set(cls.PUBLIC_FIELDS)
        assert error.owner_details() == {"rows": 5, "smallest_count": 1}


def test_the_owner_sees_what_the_scientist_does_not(bastion, owner_workspace, raw):
    plan = op("group_by", input=op("filter", input=scan("patients"), predicate=is_target()),
              keys=[col("sex")], aggs=[length()])
    kind, body, _ = send(bastion, "fetch", {"plan": plan, "text": "owner sees"})
    assert kind == "pending", body
    record = owner_workspace.workspace.approvals().get(body["request_id"])
    assert record.reason == body["reason"]
    assert "(smallest: 1)" in record.detail and "smallest" not in record.reason
    entries = [e for e in read_entries(owner_workspace.workspace.audit_path) if e.get("event") == "decision"]
    assert any("(smallest: 1)" in e.get("detail", "") for e in entries)
