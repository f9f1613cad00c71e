"""The OpenDP measurement of a DP query, built from the owner's policy and calibrated once.

Only OpenDP's public API is used (pinned OpenDP 0.16)::

    context     = dp.Context.compositor(data, unit_of(...), loss_of(...), margins=[Margin(max_length)])
    lazyframe   = context.query(...).filter(...).group_by(keys).agg(...).with_keys(...).polars_plan
    measurement = dp.m.make_private_lazyframe(accountant's input domain, metric, measure, lazyframe, scale)
    measurement.check(d_in, d_out)                # the guarantee, verified by OpenDP
    table       = context(measurement).collect()  # the context's filter admits only this loss

The context, its privacy unit, its loss and its margins come from the policy
only; a plan contributes nothing but which aggregates to compute, over which
public keys, after which row filters.  The context bounds the loss of this
one query (the scientist's total is the odometer's job).

On an engine that cannot run OpenDP's lazyframe end to end (Spark: the data
is not a polars LazyFrame), the same measurement is built and calibrated over
an empty LazyFrame of the dataset's schema (OpenDP reads only the schema to
build it), so the noise scales are the polars engine's.  The engine computes
the exact values the measurement adds noise to
(:meth:`~owner_console.engine.interface.Engine.dp_exact`), and
:meth:`Mechanism.release_exact` adds the noise with OpenDP's public
measurements (``make_laplace``, integer or float as the measurement's own
summary says) at the measurement's scale of each part::

    noise = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=...)), dp.l1_distance(T=...), scale)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bastion_kernel.contract import walk
from bastion_kernel.contract.protocol import BastionError

from .policy import DPPolicy
from .translate import Aggregate, DPQuery

_SCALE_NUDGES = 64                # attempts to round the calibrated scale up to a verified one


@dataclass(frozen=True)
class Mechanism:
    """A DP query as an OpenDP measurement calibrated to the policy's loss per query, and where it runs.

    Attributes
    ----------
    context : opendp.context.Context
        The owner's data under the policy's privacy unit and margins, behind
        a privacy filter that admits the loss of one query.
    measurement : opendp.mod.Measurement
        The query with its noise calibrated to the policy's
        ``(epsilon_per_query, delta_per_query)``, verified by OpenDP's ``check``.
    """

    context: Any
    measurement: Any
    noise: Mapping[str, tuple[str, Any]] | None = None  # exact part -> (its polars dtype, OpenDP's noise on it)

    def release(self):
        """Run the measurement once on the data, through the context (its filter checks the loss again)."""
        return refusing_opendp_errors(lambda: self.context(self.measurement).collect(), "release")

    def summary(self, alpha: float) -> list[dict]:
        """OpenDP's description of each noisy part: ``{"column", "aggregate", "distribution", "scale", "accuracy"}``.

        ``accuracy`` is the half-width of the ``(1 - alpha)`` interval (null for quantiles).
        """
        summary = refusing_opendp_errors(lambda: opendp().summarize_polars_measurement(self.measurement, alpha),
                                         "analyse")
        return summary.to_dicts()

    def release_exact(self, exact: Any, query: DPQuery):
        """The released table from an engine's exact values (:meth:`Engine.dp_exact`), OpenDP's noise on each part.

        A count and a sum are their part with noise; a mean is its noisy sum
        over its noisy row count, as OpenDP's ``dp.mean`` releases it.
        """
        import polars as pl

        if self.noise is None:
            raise BastionError("UnsupportedOperation", "this measurement releases through OpenDP's lazyframe only")
        noisy: dict[int, dict[str, Any]] = {}  # aggregate (by identity) -> its parts ("len", "sum") with noise
        for part in query.exact_parts():
            dtype, measurement = self.noise[part.name]
            values = exact.get_column(part.name).to_list()
            noisy.setdefault(id(part.aggregate), {})[part.kind] = pl.Series(
                part.name, refusing_opendp_errors(lambda: measurement(values), "release"), dtype=_dtype(dtype))
        columns = [exact.get_column(k) for k in query.keys]
        for aggregate in query.aggregates:
            parts = noisy[id(aggregate)]
            if aggregate.function == "dp.mean":
                value = parts["sum"].cast(pl.Float64) / parts["len"].cast(pl.Float64)
            else:
                value = parts["len" if aggregate.function == "len" else "sum"]
            columns.append(value.alias(aggregate.name))
        return pl.DataFrame(columns)


def opendp():
    """The OpenDP prelude with the ``contrib`` features the polars measurements need."""
    import opendp.prelude as dp
    dp.enable_features("contrib")
    return dp


def build(query: DPQuery, cache: Any) -> Mechanism:
    """The calibrated measurement of a translated query, on a context built from the owner's policy only.

    Raises
    ------
    BastionError
        ``ExecutionError`` when the owner's public keys do not fit their
        column; ``UnsupportedOperation`` for a part OpenDP cannot build or
        analyse, or when no noise scale meets the policy's loss.
    """
    dp = opendp()
    context, lazyframe, d_in, d_out = refusing_opendp_errors(lambda: _lazyframe(query, cache, dp), "build")

    def make(scale: float):
        space = context.accountant  # the measurements the context admits: its input domain, metric and measure
        return dp.m.make_private_lazyframe(input_domain=space.input_domain, input_metric=space.input_metric,
                                           output_measure=space.output_measure, lazyframe=lazyframe,
                                           global_scale=scale)

    measurement = refusing_opendp_errors(lambda: calibrate(make, d_in, d_out), "analyse")
    if _runs_lazyframe(query):
        return Mechanism(context, measurement)
    return Mechanism(context, measurement, _exact_noise(query, measurement, dp))


def _runs_lazyframe(query: DPQuery) -> bool:
    """True when the query's engine runs OpenDP's lazyframe end to end (no engine given: the polars cache)."""
    return query.engine is None or query.engine.opendp_lazyframe


# The OpenDP atom type of each polars type whose sums and counts OpenDP's polars plugins noise.
_OPENDP_TYPES = {"Int32": "i32", "Int64": "i64", "UInt32": "u32", "UInt64": "u64", "Float32": "f32",
                 "Float64": "f64"}
# What OpenDP's summary calls each exact part (lowercased): a count alone, a sum, a mean's count.
_SUMMARY_NAMES = {("len", "len"): "frame length", ("dp.sum", "sum"): "sum", ("dp.mean", "sum"): "sum",
                  ("dp.mean", "len"): "length"}


def _exact_noise(query: DPQuery, measurement: Any, dp: Any) -> dict[str, tuple[str, Any]]:
    """OpenDP's public noise measurement of each exact part, at the calibrated measurement's scale of that part.

    The scale and the distribution (integer or float Laplace, or Gaussian)
    are read from ``summarize_polars_measurement`` of the calibrated
    measurement, the part's type is the polars type OpenDP's plugin noises
    (a count: UInt32; a sum: its column's type).

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` for ``dp.quantile`` (its noise is on scores
        of candidates that OpenDP computes inside its measurement) and for a
        part OpenDP's summary does not describe as expected.
    """
    for aggregate in query.aggregates:
        if aggregate.function == "dp.quantile":
            raise BastionError("UnsupportedOperation", f"dp.quantile ({aggregate.name!r}) is not available on the "
                                                       f"{query.engine.name} engine: OpenDP selects a quantile "
                                                       "inside its own measurement, from scores it computes over "
                                                       "the rows; use dp.sum, dp.mean or pl.len() here",
                               function="dp.quantile", engine=query.engine.name)
    rows = refusing_opendp_errors(lambda: dp.summarize_polars_measurement(measurement, 0.05).to_dicts(), "analyse")
    described = {(row["column"], str(row["aggregate"]).lower()): row for row in rows}
    noise = {}
    for part in query.exact_parts():
        dtype = "UInt32" if part.kind == "len" else query.column_dtypes[part.column]
        row = described.get((part.aggregate.name, _SUMMARY_NAMES[(part.aggregate.function, part.kind)]))
        kind = _OPENDP_TYPES.get(dtype)
        if row is None or kind is None:
            raise BastionError("UnsupportedOperation", f"{part.aggregate.function} of {dtype} values is not "
                                                       f"available on the {query.engine.name} engine")
        distribution, scale = str(row["distribution"]), float(row["scale"])
        floating = kind.startswith("f")
        if distribution.startswith("Float") != floating or not distribution.endswith(("Laplace", "Gaussian")):
            raise BastionError("UnsupportedOperation", f"OpenDP's {distribution} noise of {part.aggregate.name!r} "
                                                       f"is not available on the {query.engine.name} engine")
        domain = dp.vector_domain(dp.atom_domain(T=kind, nan=False) if floating else dp.atom_domain(T=kind))
        if distribution.endswith("Laplace"):
            make = lambda: dp.m.make_laplace(domain, dp.l1_distance(T=kind), scale)  # noqa: E731
        else:
            make = lambda: dp.m.make_gaussian(domain, dp.l2_distance(T=kind), scale)  # noqa: E731
        noise[part.name] = (dtype, refusing_opendp_errors(make, "analyse"))
    return noise


def _lazyframe(query: DPQuery, cache: Any, dp: Any) -> tuple[Any, Any, Any, Any]:
    """The policy's context, the query's polars plan written in it, the unit's distance and the loss per query."""
    import polars as pl

    from .. import engine

    policy: DPPolicy = query.dataset.dp
    if _runs_lazyframe(query):
        data = (cache or engine.DEFAULT_CACHE).frame(query.dataset).lazy()
    else:
        # Building and calibrating read only the schema: an empty frame of the dataset's columns and polars types.
        name = query.dataset.name
        data = query.engine.empty_result({"op": "scan", "dataset": name}, {name: query.dataset}).lazy()
    if policy.privacy_unit_column:
        unit = dp.unit_of(contributions=1, identifier=pl.col(policy.privacy_unit_column))
    else:
        unit = dp.unit_of(contributions=policy.max_contributions)
    loss = {"epsilon": policy.epsilon_per_query}
    if policy.delta_per_query > 0:
        loss["delta"] = policy.delta_per_query
    privacy_loss = dp.loss_of(**loss)
    # A privacy filter bounded by this one query's loss: OpenDP refuses to release more than it.
    context = dp.Context.compositor(data=data, privacy_unit=unit, privacy_loss=privacy_loss,
                                    margins=[dp.polars.Margin(by=[], max_length=policy.max_rows)])
    frame = context.query(**loss)
    if policy.privacy_unit_column:
        frame = frame.truncate_per_group(policy.max_contributions)
    for predicate in query.predicates:
        frame = frame.filter(_predicate(predicate))
    exprs = [_aggregate(a) for a in query.aggregates]
    frame = frame.group_by(query.keys).agg(exprs).with_keys(key_set(query)) if query.keys else frame.select(exprs)
    return context, frame.polars_plan, unit[1], privacy_loss[1]


def calibrate(make: Callable[[float], Any], d_in: Any, d_out: Any):
    """The measurement ``make(scale)`` at the scale one privacy map gives, verified by OpenDP within ``d_out``.

    With one global scale every mechanism used here (Laplace counts and sums,
    the exponential mechanism of quantiles) has an epsilon proportional to
    1/scale and no delta, so the scale follows from one privacy map at scale
    1, where OpenDP's own search (``LazyFrameQuery.resolve()``) builds the
    measurement over a thousand times (1.3 s to 4 s for a query on the sample
    data).  Rounding may leave the scale a hair short: it is nudged up until
    the loss is within ``d_out`` in every component, then
    ``measurement.check`` verifies the guarantee (``check`` alone cannot judge
    a loss ``(epsilon, 0)`` against ``(epsilon', delta)`` with epsilon >
    epsilon': OpenDP does not order the two, and raises).

    Parameters
    ----------
    make : callable
        ``scale -> Measurement``.
    d_in : Any
        The privacy unit's distance (``dp.unit_of(...)[1]``).
    d_out : float or tuple of float
        The loss per query: epsilon, or ``(epsilon, delta)``.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` when no scale meets ``d_out``.
    """
    budget = d_out if isinstance(d_out, tuple) else (d_out,)
    epsilon_at_one = _components(make(1.0).map(d_in))[0]
    scale = max(float(epsilon_at_one) / float(budget[0]), 1e-12)
    for attempt in range(_SCALE_NUDGES):
        measurement = make(scale)
        spent = _components(measurement.map(d_in))
        if all(float(s) <= float(b) for s, b in zip(spent, budget)) and measurement.check(d_in, d_out):
            return measurement
        scale *= 1 + 1e-12 * 4 ** attempt
    raise BastionError("UnsupportedOperation", "OpenDP could not calibrate the noise of this query")


def _components(loss: Any) -> tuple:
    return loss if isinstance(loss, tuple) else (loss,)


def refusing_opendp_errors(call: Callable[[], Any], what: str):
    """Run an OpenDP step; its refusals become typed errors (no data is in its messages)."""
    try:
        return call()
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 - OpenDPException and the value errors of its builders
        message = str(exc).strip()
        for marker in ('MakeMeasurement("', 'MakeTransformation("', 'FailedFunction("'):
            if marker in message:
                message = message.split(marker, 1)[1].split('")', 1)[0]
                break
        message = message.splitlines()[0] if message else type(exc).__name__
        raise BastionError("UnsupportedOperation", f"OpenDP cannot {what} this query: {message[:300]}") from None


def key_set(query: DPQuery):
    """Every combination of the keys' public values (the owner's), in the keys' column types."""
    import polars as pl

    policy: DPPolicy = query.dataset.dp
    keys = None
    for key in query.keys:
        values = pl.DataFrame({key: pl.Series(list(policy.public_keys[key]))})
        try:
            values = values.cast({key: _dtype(query.key_dtypes[key])})
        except Exception:  # noqa: BLE001 - a public value of the wrong type is the owner's mistake
            raise BastionError("ExecutionError", f"the public keys of {key!r} do not fit its type "
                                                 f"{query.key_dtypes[key]}; ask the owner") from None
        keys = values if keys is None else keys.join(values, how="cross")
    return keys.lazy()


def _aggregate(aggregate: Aggregate):
    import polars as pl

    if aggregate.function == "len":
        return pl.len().dp.noise().alias(aggregate.name)
    column = pl.col(aggregate.column)
    bounds = (aggregate.args["lower"], aggregate.args["upper"])
    if aggregate.function == "dp.sum":
        expr = column.dp.sum(bounds)
    elif aggregate.function == "dp.mean":
        expr = column.dp.mean(bounds)
    else:
        expr = column.dp.quantile(aggregate.args["quantile"], aggregate.args["candidates"])
    return expr.alias(aggregate.name)


def _dtype(name: str):
    import polars as pl
    dtypes = {"Int8": pl.Int8, "Int16": pl.Int16, "Int32": pl.Int32, "Int64": pl.Int64, "UInt8": pl.UInt8,
              "UInt16": pl.UInt16, "UInt32": pl.UInt32, "UInt64": pl.UInt64, "Float32": pl.Float32,
              "Float64": pl.Float64, "String": pl.String, "Boolean": pl.Boolean}
    if name not in dtypes:
        raise BastionError("UnsupportedOperation", f"public keys of type {name} are not supported")
    return dtypes[name]


_BINARY = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "and": lambda a, b: a & b, "or": lambda a, b: a | b,
}
_NULL_TESTS = {"is_null": lambda e: e.is_null(), "is_not_null": lambda e: e.is_not_null()}


def _predicate(node: dict):
    """A validated filter predicate as a polars expression (the subset OpenDP can analyse)."""
    import polars as pl

    kind = node["expr"]
    if kind == "col":
        return pl.col(node["name"])
    if kind == "lit":
        return pl.lit(node["value"])
    if kind == "binary" and node["op"] in _BINARY:
        return _BINARY[node["op"]](*(_predicate(child) for child in walk.expr_children(node)))
    if kind == "unary" and node["op"] == "not":
        [operand] = walk.expr_children(node)
        return ~_predicate(operand)
    if kind == "fn" and node["name"] in _NULL_TESTS:
        [operand] = walk.expr_children(node)
        return _NULL_TESTS[node["name"]](_predicate(operand))
    shown = node.get("name") if kind == "fn" else node.get("op", kind)
    raise BastionError("UnsupportedOperation", f"a filter on a differentially private dataset may use "
                                               f"columns, literals, comparisons, &, |, ~ and is_null; "
                                               f"{str(shown)[:32]!r} is not supported")
