"""Numeric edge literals in every operation of the language, sent raw to a real executor.

Property-based (hypothesis): a registered scientist (alice, a raw ZeroMQ
client, not the kernel) sends plans whose literals and numeric arguments are
written as raw JSON number tokens, so they can be what Python's own JSON
writer never produces: ``1e400`` and ``-1e400`` (no 64-bit float holds
them), ``1e-400``, integers past 64 bits and past 4300 digits, huge
exponents, ``-0.0``, long decimals, and the non-JSON constants ``NaN`` and
``Infinity``.  Each goes into every operation of the language (every binary
and unary operator, every expression function and each of its numeric
arguments, every frame operation with a number in it, casts to every dtype,
``when``) inside a ``select``, a ``group_by`` aggregation, a ``filter`` or a
``with_columns``.

Every plan the validator accepts must run or fail with a typed error that
names what failed: every reply is a result, a pending review or a documented
error, never an internal ``ExecutionError`` (the one with a reference to the
owner's log) nor a worker process that died under the query; at the end the
executor's log holds no traceback.
"""
from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import protocol

REPLY_SECONDS = 60
SLOT = "@@NUMBER@@"  # where the raw number token goes in the plan's JSON

# Numbers at the edges, as the JSON text a hostile client can write.
EDGE_NUMBERS = [
    "1e400", "-1e400", "1e-400", "-1e-400", "1E+309", "2e308", "1.7976931348623157e308", "-1.7976931348623157e308",
    "5e-324", "2.2250738585072014e-308", "-0.0", "0", "0.0", "1", "-1", "0.1", "0.30000000000000004", "1.5",
    "2.5e-10", "1e15", "1e16", "1e19", "1e300", "255", "256", "-129", "65535", "65536", "2147483647", "2147483648",
    "4294967295", "4294967296", "9223372036854775807", "-9223372036854775808", "9223372036854775808",
    "-9223372036854775809", "18446744073709551615", "18446744073709551616", "123456789012345678901234567890",
    "985", "-985", "1000000", "1e6", "38", "39", "-39", "99999999999999999999.999999999999999999",
    "0.000000000000000000000000000000000000001", "7" * 4400, "NaN", "Infinity", "-Infinity",
]
numbers = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.integers(min_value=-2**80, max_value=2**80).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: str(d).replace("E", "e")),
)

NUMERIC = ["age", "cost", "length_of_stay"]
COLUMNS = NUMERIC + ["sex", "smoker", "admission_date"]
NUMBER_PARAMS = ("int", "number", "optional_number")
FILLERS = {"expr": P.col("age"), "exprs": [P.col("sex")], "str": "%Y", "bool": False, "dtype": "Float64",
           "literal_list": [1], "optional_str": None, "interval": "1d", "closed": "both", "int": 2, "number": 0.5,
           "optional_number": None}


def lit_slot() -> dict:
    return P.lit(SLOT)


def function_calls(name: str, column: str) -> list[dict]:
    """``name`` applied with the slot in each place a number can go: its input, each numeric argument."""
    spec = P.EXPR_FUNCTIONS[name]
    base = {param: FILLERS[ptype] for param, ptype in spec.params}
    calls = [{"expr": "fn", "name": name, "input": lit_slot(), "args": dict(base)}]
    for param, ptype in spec.params:
        args = dict(base)
        if ptype in NUMBER_PARAMS:
            args[param] = SLOT
        elif ptype == "expr":
            args[param] = lit_slot()
        elif ptype == "exprs":
            args[param] = [lit_slot()]
        elif ptype == "literal_list":
            args[param] = [SLOT, 1]
        else:
            continue
        calls.append({"expr": "fn", "name": name, "input": P.col(column), "args": args})
    return calls


def expressions(operation: str, column: str) -> list[dict]:
    """Expressions that put the slot into ``operation`` (a binary or unary operator, a function, a cast)."""
    kind, _, name = operation.partition(":")
    if kind == "binary":
        return [P.binary(name, P.col(column), lit_slot()), P.binary(name, lit_slot(), P.col(column)),
                P.binary(name, lit_slot(), lit_slot())]
    if kind == "unary":
        return [P.unary(name, lit_slot())]
    if kind == "fn":
        return function_calls(name, column)
    if kind == "cast":
        return [P.fn("cast", lit_slot(), dtype=name, strict=True)]
    if kind == "when":
        return [P.when([(P.binary("gt", P.col(column), lit_slot()), lit_slot())], lit_slot())]
    if kind == "lit":
        return [lit_slot()]
    raise AssertionError(operation)


def in_context(expr: dict, context: str, dataset: str = "patients_open") -> dict:
    """An expression in a plan: selected, aggregated per group, as a filter, or as a new column."""
    source = P.scan(dataset)
    if context == "select":
        return P.frame_op("select", input=source, exprs=[P.alias(expr, "x")])
    if context == "group_by":
        return P.frame_op("group_by", input=source, keys=[P.col("sex")],
                          aggs=[P.alias(P.fn("sum", expr), "x"), P.alias(P.fn("max", expr), "y"), P.length()])
    if context == "filter":
        return P.frame_op("group_by", input=P.frame_op("filter", input=source, predicate=P.binary("eq", expr, expr)),
                          keys=[P.col("sex")], aggs=[P.length()])
    if context == "with_columns":
        return P.frame_op("group_by", input=P.frame_op("with_columns", input=source, exprs=[P.alias(expr, "x")]),
                          keys=[P.col("sex")], aggs=[P.alias(P.fn("mean", P.col("x")), "m"), P.length()])
    raise AssertionError(context)


def frame_plans(operation: str) -> list[dict]:
    """Frame operations with the slot in each numeric place they have."""
    source = P.scan("patients_open")
    counted = {
        "head": [P.frame_op("head", input=source, n=SLOT)],
        "slice": [P.frame_op("slice", input=source, offset=SLOT, length=3),
                  P.frame_op("slice", input=source, offset=0, length=SLOT)],
        "fill_null": [P.frame_op("fill_null", input=source, value=lit_slot())],
        "sort": [P.frame_op("sort", input=source, by=[lit_slot()], descending=[False], nulls_last=False)],
        "group_by": [P.frame_op("group_by", input=source, keys=[lit_slot()], aggs=[P.length()])],
        "join": [P.frame_op("join", left=source, right=P.scan("patients_open"), how="inner", left_on=[lit_slot()],
                            right_on=[P.col("age")], suffix="_r")],
        "with_row_index": [P.frame_op("filter", input=P.frame_op("with_row_index", input=source, name="i"),
                                      predicate=P.binary("lt", P.col("i"), lit_slot()))],
    }[operation]
    return [P.frame_op("group_by", input=plan, keys=[P.col("sex")], aggs=[P.length()]) for plan in counted]


EXPRESSION_OPERATIONS = ([f"binary:{op}" for op in P.BINARY_OPS] + [f"unary:{op}" for op in P.UNARY_OPS]
                         + [f"fn:{name}" for name in P.EXPR_FUNCTIONS] + [f"cast:{dtype}" for dtype in P.DTYPES]
                         + ["when:", "lit:"])
FRAME_OPERATIONS = ["head", "slice", "fill_null", "sort", "group_by", "join", "with_row_index"]
CONTEXTS = ["select", "group_by", "filter", "with_columns"]


def raw_fetch(plan: dict, token: str) -> tuple[bytes, str]:
    msg_id = uuid.uuid4().hex
    text = json.dumps(plan).replace(json.dumps(SLOT), token)
    return f'{{"v":1,"id":"{msg_id}","kind":"fetch","body":{{"plan":{text},"text":"edge"}}}}'.encode(), msg_id


def send_and_check(executor, client, plan: dict, token: str) -> None:
    """One reply: a result, a pending review or a documented error; never an internal error."""
    envelope, msg_id = raw_fetch(plan, token)
    client.send_frames([envelope])
    frames = client.recv(REPLY_SECONDS)
    assert frames is not None, f"no reply to {token} in {json.dumps(plan)[:300]}"
    kind, reply_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
    assert kind in ("result", "pending", "error"), kind
    if kind == "error":
        assert reply_id in (msg_id, "?"), reply_id
        assert body["ename"] in protocol.ERROR_NAMES, body
        assert not (body["ename"] == "ExecutionError" and "reference" in body["details"]), (token, plan, body)
        assert body["details"].get("limit") != "worker_memory", (token, plan, body)
    else:
        assert reply_id == msg_id
    event(f"{kind} {body.get('ename', '')}")  # pytest --hypothesis-show-statistics shows the mix
    assert executor.process.poll() is None, "the executor died"


EDGE_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def alice(executor):
    return executor.client("alice")


@settings(max_examples=150, **EDGE_SETTINGS)
@given(token=numbers, operation=st.sampled_from(EXPRESSION_OPERATIONS), column=st.sampled_from(COLUMNS),
       context=st.sampled_from(CONTEXTS), data=st.data())
def test_numeric_edge_literals_anywhere_give_a_result_or_a_typed_error(executor, alice, token, operation, column,
                                                                        context, data):
    expr = data.draw(st.sampled_from(expressions(operation, column)))
    send_and_check(executor, alice, in_context(expr, context), token)


@pytest.mark.parametrize("operation", EXPRESSION_OPERATIONS + [f"frame:{op}" for op in FRAME_OPERATIONS])
@settings(max_examples=4, **EDGE_SETTINGS)
@given(token=st.sampled_from(EDGE_NUMBERS), column=st.sampled_from(NUMERIC), context=st.sampled_from(CONTEXTS),
       data=st.data())
def test_every_operation_with_edge_numbers_gives_a_result_or_a_typed_error(executor, alice, operation, token, column,
                                                                          context, data):
    if operation.startswith("frame:"):
        plan = data.draw(st.sampled_from(frame_plans(operation.removeprefix("frame:"))))
    else:
        plan = in_context(data.draw(st.sampled_from(expressions(operation, column))), context)
    send_and_check(executor, alice, plan, token)


def test_the_issue_literals_each_get_a_typed_error_naming_what_failed(executor, alice):
    # The literals the attack report named, one by one, and what the scientist is told.
    for token, ename, named in (("1e400", "LimitExceeded", "64-bit float"), ("-1e400", "LimitExceeded", "64-bit float"),
                                ("123456789012345678901234567890", "LimitExceeded", "64 bits")):
        envelope, msg_id = raw_fetch(in_context(P.binary("add", P.col("age"), lit_slot()), "select"), token)
        alice.send_frames([envelope])
        kind, _, body = protocol.decode(alice.recv(REPLY_SECONDS)[0], protocol.REPLY_KINDS)
        assert (kind, body["ename"]) == ("error", ename), (token, body)
        assert named in body["evalue"] and "plan.exprs[0]" in body["evalue"], body
    # pow with a huge exponent, and a literal aggregated per group (which crashed polars): they run.
    for expr in (P.fn("pow", P.col("age"), exponent=P.lit(985)), P.fn("pow", P.lit(2), exponent=P.lit(985)),
                 P.binary("pow", P.col("cost"), P.lit(985)), P.binary("add", P.lit(1.5), P.lit(1.5))):
        envelope, msg_id = raw_fetch(in_context(expr, "group_by"), "0")
        alice.send_frames([envelope])
        kind, _, body = protocol.decode(alice.recv(REPLY_SECONDS)[0], protocol.REPLY_KINDS)
        assert kind == "result", (expr, body)


def test_no_traceback_and_no_worker_died_in_the_executor_log(executor, alice):
    # Runs after the properties above (same module and executor).
    kind, body, _ = alice.request("hello", {})
    assert (kind, body["scientist"]) == ("ok", "alice")
    log = executor.log()
    assert "Traceback" not in log, log[-3000:]
    assert "a query worker ended" not in log, log[-3000:]
    assert "cannot write the audit log" not in log
    assert executor.owner("audit", "verify").returncode == 0
