"""The one plan walker reaches every child the plan tables declare, for every operation and function."""

import doctest
from typing import Any

import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import walk


def test_doctests_of_the_walker_pass():
    failed, attempted = doctest.testmod(walk)
    assert attempted > 0 and failed == 0


def _marker(i: int) -> dict:
    return P.col(f"c{i}")


def _expr_field(kind: str, i: int) -> tuple[Any, list[dict]]:
    """A value for a field or argument of type ``kind``, and the expressions in it (none for other types)."""
    if kind == "expr":
        marker = _marker(i)
        return marker, [marker]
    if kind == "exprs":
        markers = [_marker(i), _marker(i + 100)]
        return markers, markers
    return None, []


@pytest.mark.parametrize("op", sorted(P.FRAME_OPS))
def test_every_frame_field_of_frame_or_expr_type_is_walked(op):
    node, frames, exprs, n = {"op": op}, [], [], 0
    for field, ftype in P.FRAME_OPS[op].items():
        n += 1
        if ftype == "frame":
            node[field] = P.scan(f"d{n}")
            frames.append(node[field])
        elif ftype == "frames":
            node[field] = [P.scan(f"d{n}"), P.scan(f"e{n}")]
            frames.extend(node[field])
        else:
            node[field], found = _expr_field(ftype, n)
            exprs.extend(found)
    assert walk.frame_inputs(node) == frames
    assert walk.frame_exprs(node) == exprs
    walked = list(walk.walk(node))
    assert walked[0] is node
    assert all(any(w is x for w in walked) for x in frames + exprs)


@pytest.mark.parametrize("name", sorted(P.EXPR_FUNCTIONS))
def test_every_expression_argument_of_a_function_is_walked(name):
    spec = P.EXPR_FUNCTIONS[name]
    args, expected = {}, [P.col("input")]
    for i, (param, ptype) in enumerate(spec.params):
        value, found = _expr_field(ptype, i)
        args[param] = value if found else spec.defaults.get(param)
        expected.extend(found)
    node = {"expr": "fn", "name": name, "input": expected[0], "args": args}
    assert walk.expr_children(node) == expected


def test_when_branches_and_otherwise_are_walked_in_order():
    node = P.when([(P.col("a"), P.col("b")), (P.col("c"), P.col("d"))], P.col("e"))
    assert [c["name"] for c in walk.expr_children(node)] == ["a", "b", "c", "d", "e"]
    assert [c["name"] for c in walk.expr_children(P.when([(P.col("a"), P.col("b"))], None))] == ["a", "b"]


def test_a_deep_plan_is_walked_without_recursion():
    node = P.scan("patients")
    for _ in range(5000):
        node = P.frame_op("head", input=node, n=1)
    assert sum(1 for _ in walk.walk_frames(node)) == 5001


@pytest.mark.parametrize("value", [None, 3, "x", [], [1, {"op": "scan"}], {"op": "scan", "dataset": 7},
                                   {"op": "saved", "name": ["x"]}, {"a": [[{"op": "scan", "dataset": "p"}]]}])
def test_unvalidated_json_never_fails_and_finds_only_named_sources(value):
    names = walk.source_names(value)
    assert names == ({"p"} if value == {"a": [[{"op": "scan", "dataset": "p"}]]} else set())
