"""Plan -> the DP query: which plans are differentially private, the subset OpenDP releases, its refusals.

A plan that reads a dataset with a ``[dp]`` policy is routed here (see
:func:`touches_dp`); :func:`translate` accepts only
``scan(DP dataset) -> filter* -> group_by(public keys, aggs)`` or
``-> select(aggs)``, each aggregate ``len`` or a ``dp.*`` function of a
numeric column, and describes it as a :class:`DPQuery`.  Anything that would
release more than DP aggregates is refused here, before any budget is charged.
Clipping bounds from the plan are accepted only inside the owner's bounds for
that column (OpenDP calibrates the noise to whichever bounds are used, so
they cannot weaken the guarantee, but the owner decides how much a single row
may move a sum).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

from bastion_kernel.contract import plan as P, walk
from bastion_kernel.contract.protocol import BastionError

from ..model import Dataset
from .policy import MAX_KEY_COMBINATIONS, DPPolicy, is_finite

DP_FUNCTIONS = ("dp.sum", "dp.mean", "dp.quantile")
MAX_CANDIDATES = 1000             # quantile candidates in one plan
DEFAULT_CANDIDATES = 101          # evenly spaced over the bounds when the plan gives none
_NUMERIC_PREFIXES = ("Int", "UInt", "Float")


# ----------------------------------------------------------------- routing
def dp_datasets(plan: Any, catalog: Mapping[str, Dataset]) -> list[str]:
    """Names of the DP datasets a (not yet validated) plan scans, anywhere in it.

    Walks every JSON object of the plan, not only the fields the validator
    knows, so that no shape of plan can reach a DP dataset past this check.
    """
    return sorted(name for name in walk.source_names(plan)
                  if name in catalog and getattr(catalog[name], "dp", None) is not None)


def touches_dp(plan: Any, catalog: Mapping[str, Dataset]) -> bool:
    """True when the plan reads any dataset with a differential privacy policy."""
    return bool(dp_datasets(plan, catalog))


def is_dp_aggregation(plan: Any) -> bool:
    """True when the plan's root aggregates (the shape :func:`translate` handles)."""
    return isinstance(plan, dict) and plan.get("op") in ("group_by", "select")

# ----------------------------------------------------------------- translation
@dataclass
class Aggregate:
    """One released column of a DP query."""

    name: str          # output column
    function: str      # "len", "dp.sum", "dp.mean", "dp.quantile"
    column: str | None
    args: dict         # checked: lower, upper (and quantile, candidates)


@dataclass(frozen=True)
class ExactPart:
    """One exact value OpenDP's polars measurement adds noise to, per public key (see :meth:`DPQuery.exact_parts`).

    ``kind`` is ``"len"`` (the group's rows, nulls included) or ``"sum"``
    (the sum of ``column`` with each value clamped to ``[lower, upper]`` and
    a null or NaN counted as ``fill``, the bounds' midpoint).  The bounds are
    in the column's type as OpenDP casts them: truncated toward zero for a
    whole-number column, with the midpoint's division truncated too.
    """

    name: str
    aggregate: Aggregate
    kind: str
    column: str | None = None
    lower: int | float | None = None
    upper: int | float | None = None
    fill: int | float | None = None


@dataclass
class DPQuery:
    """A plan in the DP subset, as the OpenDP mechanism needs it (:func:`translate`).

    ``engine`` is the :class:`~owner_console.engine.interface.Engine` that
    reads the dataset (its schema, and the exact values on an engine without
    OpenDP's end-to-end lazyframe).
    """

    dataset: Dataset
    predicates: list[dict]  # validated filter predicates over the scan, innermost first
    keys: list[str]
    aggregates: list[Aggregate]
    key_dtypes: dict[str, str]
    column_dtypes: dict[str, str]
    engine: Any = field(default=None, compare=False, repr=False)

    def exact_parts(self) -> list[ExactPart]:
        """The exact values the noise is added to, one or two per aggregate, in the aggregates' order.

        What OpenDP 0.16's polars plugins compute before their noise (found
        by running them): ``pl.len()`` is the group's rows; ``dp.sum`` the
        sum of the clamped column, a null or NaN imputed with the midpoint of
        the bounds; ``dp.mean`` that sum and the group's rows (nulls
        included), divided after their noise.  ``dp.quantile`` has no part
        here: its noise is on scores over candidates (see docs/dp.md).
        """
        parts = []
        for index, aggregate in enumerate(self.aggregates):
            if aggregate.function in ("dp.sum", "dp.mean"):
                lower, upper, fill = _opendp_bounds(aggregate.args["lower"], aggregate.args["upper"],
                                                    self.column_dtypes[aggregate.column])
                parts.append(ExactPart(f"__dp_{index}_sum", aggregate, "sum", aggregate.column, lower, upper, fill))
            if aggregate.function in ("len", "dp.mean"):
                parts.append(ExactPart(f"__dp_{index}_len", aggregate, "len"))
        return parts

    def key_frame(self):
        """Every combination of the keys' public values (the owner's), in the keys' column types (polars).

        Raises
        ------
        BastionError
            ``ExecutionError`` when a public value does not fit its column.
        """
        from .mechanism import key_set
        return key_set(self).collect()


def _opendp_bounds(lower: Any, upper: Any, dtype: str) -> tuple[Any, Any, Any]:
    """Clamping bounds and the null imputation of a sum as OpenDP applies them to a column of ``dtype``."""
    if dtype.startswith(("Int", "UInt")):
        low, high = int(lower), int(upper)  # int() truncates toward zero, as OpenDP's cast does
        total = low + high
        return low, high, total // 2 if total >= 0 else -((-total) // 2)
    low, high = float(lower), float(upper)
    if dtype == "Float32":
        low, high = _float32(low), _float32(high)
        return low, high, _float32((low + high) / 2)
    return low, high, (low + high) / 2


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def _refuse_shape(dataset: str, what: str) -> BastionError:
    return BastionError("PolicyViolation",
                        f"dataset {dataset!r} is differentially private: it only releases DP aggregates "
                        f"({what}). Write dataset(...).filter(...).group_by(public keys).agg(pl.len(), "
                        "col(x).dp.sum(bounds=(lo, hi)), col(x).dp.mean(...), col(x).dp.quantile(q)) or "
                        ".select(...) of such aggregates", dataset=dataset)


def translate(plan: Any, catalog: Mapping[str, Dataset], cache: Any = None) -> DPQuery:
    """Check that a plan is in the DP subset and describe it for OpenDP.

    The subset: ``scan(DP dataset) -> filter* -> group_by(public keys, aggs)``
    or ``-> select(aggs)``, where every aggregate is ``len`` or a ``dp.*``
    function of a numeric column (optionally aliased).

    Raises
    ------
    BastionError
        ``PolicyViolation`` for anything that would release more than DP
        aggregates (row-level frames, plain aggregates, joins, private keys),
        ``SchemaError`` / ``UnsupportedOperation`` for malformed parts.
    """
    from .. import engine, validate

    names = dp_datasets(plan, catalog)
    if len(names) > 1:
        raise BastionError("PolicyViolation", f"a query may read only one differentially private dataset; "
                                              f"this one reads {', '.join(names)}")
    name = names[0]
    dataset = catalog[name]
    policy: DPPolicy = dataset.dp
    if not is_dp_aggregation(plan):
        shown = plan.get("op") if isinstance(plan, dict) and isinstance(plan.get("op"), str) else "this query"
        raise _refuse_shape(name, f"the query ends in {str(shown)[:32]!r}, not in an aggregation")
    runner = engine.engine_for([dataset], cache)
    checked = validate.validate(plan.get("input"), catalog, dataset_columns=runner.columns)
    # The rows part: only filters over the scan (a filter has one input, so the frames form a chain).
    frames = list(walk.walk_frames(checked.root))
    source = next(node for node in frames if node["op"] != "filter")
    if source is not frames[-1] or source["op"] != "scan" or source["dataset"] != name:
        raise _refuse_shape(name, f"{source['op']!r} before the aggregation is not supported; "
                                  "a join or any other combination with a DP dataset is refused")
    predicates = [node["predicate"] for node in reversed(frames[:-1])]
    schema = dict(runner.schema(dataset))
    hidden = dataset.policy.hidden
    if plan["op"] == "group_by":
        fields = {"op", "input", "keys", "aggs"}
        key_nodes, agg_nodes = plan.get("keys"), plan.get("aggs")
    else:
        fields = {"op", "input", "exprs"}
        key_nodes, agg_nodes = [], plan.get("exprs")
    if set(plan) != fields or not isinstance(key_nodes, list) or not isinstance(agg_nodes, list) or not agg_nodes:
        raise BastionError("UnsupportedOperation", f"malformed {plan['op']} node in a DP query")
    keys = []
    for key in key_nodes:
        column = key.get("name") if isinstance(key, dict) and key.get("expr") == "col" and set(key) == {"expr", "name"} \
            else None
        if not isinstance(column, str) or column not in policy.public_keys:
            public = ", ".join(policy.public_keys) or "none"
            raise BastionError("PolicyViolation", f"dataset {name!r} is differentially private: group_by keys "
                                                  f"must be plain columns with public values ({public})",
                               dataset=name)
        keys.append(column)
    if len(set(keys)) != len(keys):
        raise BastionError("SchemaError", "a group_by key is repeated")
    combinations = math.prod(len(policy.public_keys[k]) for k in keys)
    if combinations > MAX_KEY_COMBINATIONS:
        raise BastionError("LimitExceeded", f"these keys have {combinations} combinations; at most "
                                            f"{MAX_KEY_COMBINATIONS} are released at once")
    aggregates = [_aggregate(node, i, name, policy, schema, hidden) for i, node in enumerate(agg_nodes)]
    out = keys + [a.name for a in aggregates]
    if len(set(out)) != len(out):
        raise BastionError("SchemaError", "two output columns have the same name; give one of them another "
                                          "name with .alias()")
    return DPQuery(dataset, predicates, keys, aggregates, {k: schema[k] for k in keys}, schema, runner)


def _aggregate(node: Any, index: int, dataset: str, policy: DPPolicy, schema: dict[str, str],
               hidden: frozenset[str]) -> Aggregate:
    at = f"aggregate {index + 1}"
    alias = None
    if isinstance(node, dict) and node.get("expr") == "alias" and set(node) == {"expr", "input", "name"}:
        alias = node["name"]
        if not isinstance(alias, str) or not alias or len(alias) > P.MAX_NAME_LENGTH or alias.startswith("__"):
            raise BastionError("SchemaError", f"{at}: invalid column name")
        node = node["input"]
    if isinstance(node, dict) and node == {"expr": "len"}:
        return Aggregate(alias or "len", "len", None, {})
    if not (isinstance(node, dict) and node.get("expr") == "fn" and node.get("name") in DP_FUNCTIONS
            and set(node) == {"expr", "name", "input", "args"}):
        raise BastionError("PolicyViolation",
                           f"dataset {dataset!r} is differentially private: {at} is not a DP aggregate; "
                           "use pl.len(), col(x).dp.sum(bounds=(lo, hi)), col(x).dp.mean(bounds=(lo, hi)) "
                           "or col(x).dp.quantile(q)", dataset=dataset)
    function = node["name"]
    source = node["input"]
    column = source.get("name") if isinstance(source, dict) and source.get("expr") == "col" \
        and set(source) == {"expr", "name"} else None
    if not isinstance(column, str):
        raise BastionError("UnsupportedOperation", f"{at}: {function} applies to a plain column, col(\"name\")")
    if column not in schema:
        raise BastionError("SchemaError", f"{at}: unknown column {column!r}; available columns: "
                                          f"{', '.join(repr(c) for c in schema)}", column=column)
    if column in hidden or column == policy.privacy_unit_column:
        raise BastionError("PolicyViolation", f"{at}: column {column!r} is hidden by the owner's policy")
    if not schema[column].startswith(_NUMERIC_PREFIXES):
        raise BastionError("SchemaError", f"{at}: {function} needs a numeric column; {column!r} is "
                                          f"{schema[column]}")
    args = node["args"]
    spec = P.EXPR_FUNCTIONS[function]
    if not isinstance(args, dict) or set(args) != {p for p, _ in spec.params}:
        raise BastionError("UnsupportedOperation", f"{at}: {function} takes the arguments "
                                                   f"{', '.join(p for p, _ in spec.params)}")
    lower, upper = _bounds(args["lower"], args["upper"], column, policy, at)
    checked: dict[str, Any] = {"lower": lower, "upper": upper}
    if function == "dp.quantile":
        q = args["quantile"]
        if not is_finite(q) or not 0 <= q <= 1:
            raise BastionError("SchemaError", f"{at}: the quantile must be a number between 0 and 1")
        candidates = args["candidates"]
        if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES \
                or not all(is_finite(c) for c in candidates):
            raise BastionError("SchemaError", f"{at}: candidates must be a list of at most {MAX_CANDIDATES} "
                                              "numbers")
        if not candidates:
            step = (upper - lower) / (DEFAULT_CANDIDATES - 1)
            candidates = [lower + i * step for i in range(DEFAULT_CANDIDATES)]
            if schema[column].startswith(("Int", "UInt")):
                candidates = sorted({round(c) for c in candidates})
        if any(b <= a for a, b in zip(candidates, candidates[1:])):
            raise BastionError("SchemaError", f"{at}: candidates must be strictly increasing")
        if schema[column].startswith(("Int", "UInt")) and not all(float(c).is_integer() for c in candidates):
            raise BastionError("SchemaError", f"{at}: {column!r} holds whole numbers; give whole-number candidates")
        if schema[column].startswith(("Int", "UInt")):
            candidates = [int(c) for c in candidates]
        checked.update(quantile=q, candidates=candidates)
    return Aggregate(alias or column, function, column, checked)


def _bounds(lower: Any, upper: Any, column: str, policy: DPPolicy, at: str) -> tuple[Any, Any]:
    owner = policy.bounds.get(column)
    if lower is None and upper is None:
        if owner is None:
            raise BastionError("SchemaError", f"{at}: give clipping bounds for {column!r}, for example "
                                              "bounds=(0, 100); the owner set none for this column")
        return owner
    if not (is_finite(lower) and is_finite(upper)) or not lower < upper:
        raise BastionError("SchemaError", f"{at}: bounds must be two finite numbers, lower < upper")
    if owner is not None and not owner[0] <= lower < upper <= owner[1]:
        raise BastionError("PolicyViolation", f"{at}: bounds for {column!r} must lie within the owner's "
                                              f"({owner[0]}, {owner[1]})")
    return lower, upper
