"""The one plan walker: which fields of a node are child frames and expressions.

Every pass over a plan (validation, accounting, compilation on each engine,
the DP translation, the owner's text form) finds a node's children here,
read off the field-type tables of :mod:`.plan` (``FRAME_OPS``,
``EXPR_KINDS`` and each function's ``params``), so a new operation or
parameter is walked everywhere the moment it is in the tables.

Two families:

- :func:`frame_inputs`, :func:`frame_exprs`, :func:`expr_children`,
  :func:`walk_frames`, :func:`walk_exprs`, :func:`walk`: for a validated plan
  (the shape is trusted; a missing field is a bug, not the scientist's).
- :func:`json_objects`, :func:`source_names`: for JSON that has not been
  validated yet (what the executor must know before it validates, such as
  which datasets a request names); they accept any JSON and never fail.

Examples
--------
>>> from bastion_kernel.contract import plan as P
>>> node = P.frame_op("filter", input=P.scan("patients"),
...                   predicate=P.binary("ge", P.col("age"), P.lit(18)))
>>> [n.get("expr") or n["op"] for n in walk(node)]
['filter', 'binary', 'col', 'lit', 'scan']
>>> sorted(source_names(node))
['patients']
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .plan import EXPR_FUNCTIONS, EXPR_KINDS, FRAME_OPS

__all__ = ["frame_inputs", "frame_exprs", "expr_children", "walk_frames", "walk_exprs", "walk",
           "json_objects", "source_name", "source_names"]

# Field names by their type, per frame operation and expression kind, read once from the tables.
_FRAME_FIELDS = {op: ([f for f, t in fields.items() if t in ("frame", "frames")],
                      [f for f, t in fields.items() if t in ("expr", "exprs")])
                 for op, fields in FRAME_OPS.items()}
_EXPR_FIELDS = {kind: [f for f, t in fields.items() if t in ("expr", "optional_expr", "branches")]
                for kind, fields in EXPR_KINDS.items()}
_FUNCTION_EXPR_PARAMS = {name: [p for p, t in spec.params if t in ("expr", "exprs")]
                         for name, spec in EXPR_FUNCTIONS.items()}


def _flatten(value: Any) -> list[dict]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def frame_inputs(node: dict) -> list[dict]:
    """The frames a validated frame node reads, in field order (``join``: left then right).

    Examples
    --------
    >>> from bastion_kernel.contract import plan as P
    >>> frame_inputs(P.frame_op("concat", inputs=[P.scan("a"), P.scan("b")]))
    [{'op': 'scan', 'dataset': 'a'}, {'op': 'scan', 'dataset': 'b'}]
    """
    return [child for field in _FRAME_FIELDS[node["op"]][0] for child in _flatten(node[field])]


def frame_exprs(node: dict) -> list[dict]:
    """The top-level expressions of a validated frame node (a filter's predicate, a select's exprs...)."""
    return [e for field in _FRAME_FIELDS[node["op"]][1] for e in _flatten(node[field])]


def expr_children(expr: dict) -> list[dict]:
    """The sub-expressions of a validated expression, including a function's expression arguments.

    Examples
    --------
    >>> from bastion_kernel.contract import plan as P
    >>> [c["name"] for c in expr_children(P.fn("fill_null", P.col("a"), value=P.col("b")))]
    ['a', 'b']
    """
    kind = expr["expr"]
    found: list[dict] = []
    for field in _EXPR_FIELDS[kind]:
        value = expr.get(field)
        if field == "branches":
            found.extend(part for branch in value for part in (branch["when"], branch["then"]))
        else:
            found.extend(_flatten(value))
    if kind == "fn":
        args = expr.get("args") or {}
        for param in _FUNCTION_EXPR_PARAMS[expr["name"]]:
            found.extend(_flatten(args.get(param)))
    return found


def _depth_first(root: dict, children: Callable[[dict], list[dict]]) -> Iterator[dict]:
    # Iterative, so that a plan's depth is no limit.
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def walk_frames(plan: dict) -> Iterator[dict]:
    """Every frame node of a validated plan, parents before children (iterative: depth is no limit)."""
    return _depth_first(plan, frame_inputs)


def walk_exprs(expr: dict) -> Iterator[dict]:
    """Every node of a validated expression tree, parents before children."""
    return _depth_first(expr, expr_children)


def walk(plan: dict) -> Iterator[dict]:
    """Every node of a validated plan: each frame node, then its expressions, then its inputs."""
    for node in walk_frames(plan):
        yield node
        for expr in frame_exprs(node):
            yield from walk_exprs(expr)


def json_objects(value: Any) -> Iterator[dict]:
    """Every JSON object inside any JSON value (unvalidated: any shape, never fails; iterative)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(item)


def source_name(node: dict) -> str | None:
    """The dataset or saved-result name a ``scan`` or ``saved`` node reads, else None (any JSON object)."""
    op = node.get("op")
    name = node.get("dataset") if op == "scan" else node.get("name") if op == "saved" else None
    return name if isinstance(name, str) else None


def source_names(plan: Any) -> set[str]:
    """The dataset and saved-result names a plan's ``scan`` and ``saved`` nodes read (unvalidated JSON)."""
    return {name for node in json_objects(plan) if (name := source_name(node)) is not None}
