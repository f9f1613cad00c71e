"""Charts: ``frame.plot.<kind>(...)``, computed as aggregates on the owner's side.

Each chart method builds ordinary aggregate plans (a ``group_by`` over bin or
category keys) and fetches them through the session: the same validation,
policy and audit path as any ``.fetch()``, so a chart draws only what the
owner's policy releases.  Histograms and heatmaps place their bin edges from
public facts only: the ``range=`` the scientist gives, else the owner's
declared public bounds of the column (``--bounds COL=LO:HI``, read from the
``datasets`` reply); never from the data's min and max, which are one
person's values.  Without either the chart is refused here.  Bins are
computed with plan arithmetic the executor already knows: ``(x - low) //
width``, clipped to the last bin and cast to an integer bin index.

Box plots and ``agg="min"/"max"/"median"`` release order statistics: the
executor releases one only where at least K people share its value, else
holds the chart for review or refuses it; the chart says so.

A method returns a :class:`~bastion_kernel.language.values.Chart`: a Vega-Lite
v5 spec without data and the released rows; :mod:`bastion_kernel.display`
inlines the rows and renders it.  Nothing here imports polars: released
tables are read through their own ``columns``, ``schema`` and ``iter_rows``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.protocol import BastionError

from .errors import SchemaError, UnsupportedOperation, suggest
from .expr import describe_value, is_number, to_node
from .frame import RemoteFrame, fetch_plan
from .registry import Context, extend_doc, method, prop
from .values import Chart, FetchedTable, RequestStatus

MAX_BINS = 200
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"
# agg= names a chart accepts -> the plan function that computes them ("count" counts rows).
AGGREGATIONS = ("mean", "sum", "median", "min", "max", "std", "var", "count", "n_unique")
BOX_STATS = (("min", "min", None), ("q1", "quantile", 0.25), ("median", "quantile", 0.5),
             ("q3", "quantile", 0.75), ("max", "max", None))
BOX_INTERPOLATION = "linear"
# agg= names whose value is one row's value (the executor's order-statistic rule applies).
ORDER_AGGREGATIONS = ("median", "min", "max")
ORDER_STATISTICS_RULE = ("order statistics: the owner's executor releases one at once only where at least K "
                         "people share its value; otherwise the policy holds it for review or refuses it")
_NUMERIC = ("Int8", "Int16", "Int32", "Int64", "Int128", "UInt8", "UInt16", "UInt32", "UInt64",
            "Float32", "Float64", "Decimal")
_TEMPORAL = ("Date", "Datetime")


class PlotNamespace:
    """Chart methods of a remote frame (``frame.plot``)."""

    type_name = "RemoteFrame.plot"

    def __init__(self, frame: RemoteFrame) -> None:
        self.frame = frame

    def __repr__(self) -> str:
        return (f"<chart methods of a frame over {', '.join(self.frame.sources()) or 'no dataset'}: "
                "bar, box, heatmap, hist, line>")


@prop(RemoteFrame, "plot")
def frame_plot(ctx: Context, frame: RemoteFrame) -> PlotNamespace:
    """Charts of the frame, computed as aggregates by the owner's executor.

    Returns
    -------
    PlotNamespace
        Its methods (``hist``, ``bar``, ``line``, ``box``, ``heatmap``) fetch
        the aggregates through the owner's policy and return a chart.

    Examples
    --------
    >>> patients.plot.hist("age", bins=20)
    """
    return PlotNamespace(frame)


# --------------------------------------------------------------------------
# Building blocks.

def vega_lite_type(dtype: str) -> str:
    """The Vega-Lite field type of a polars dtype name."""
    base = str(dtype).split("(", 1)[0].split("[", 1)[0]
    if base in _NUMERIC:
        return "quantitative"
    if base in _TEMPORAL:
        return "temporal"
    return "nominal"


def _key(value: Any, what: str) -> tuple[dict, str]:
    """An expression node for a chart axis and the column name it produces."""
    node = to_node(value, what, str_as="col")
    name = P.output_name(node)
    if name is None or (node.get("expr") == "lit"):
        raise SchemaError(f"{what} takes a column name or an expression over a column, not a literal")
    return node, name


def _optional_key(value: Any, what: str) -> tuple[dict, str] | None:
    return None if value is None else _key(value, what)


def _distinct(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SchemaError(f"{what}: the column {name!r} is used twice; give the expressions "
                              "different names with .alias(...)")
        seen.add(name)


def _aggregation(agg: Any, value: dict | None, value_name: str | None, what: str) -> tuple[dict, str]:
    """The aggregate expression for ``agg=`` over ``value`` (rows counted when there is no value)."""
    if not isinstance(agg, str) or agg not in AGGREGATIONS:
        raise UnsupportedOperation(f"{what}: agg must be one of {', '.join(AGGREGATIONS)}, not "
                                   f"{describe_value(agg)}{suggest(str(agg), AGGREGATIONS)}")
    if value is None:
        if agg != "count":
            raise SchemaError(f"{what}: agg={agg!r} needs a value column (y); without one the chart counts rows")
        return P.alias(P.length(), "count"), "count"
    name = f"{agg}_{value_name}"
    return P.alias(P.fn(agg, value), name), name


def _bin_count(value: Any, what: str, limit: int = MAX_BINS) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit:
        return value
    raise SchemaError(f"{what}: bins must be a whole number from 1 to {limit}, not {describe_value(value)}")


def _range(value: Any, what: str) -> tuple[float, float]:
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(v) for v in value)
            and all(math.isfinite(v) for v in value) and value[0] < value[1]):
        return float(value[0]), float(value[1])
    raise SchemaError(f"{what}: range must be (low, high) with low < high, not {describe_value(value)}")


class _Fetcher:
    """Fetches a chart's plans through the session and gathers their notes and approvals.

    ``order_statistics`` names the chart's order statistics (``"min, quartiles
    and max"``), if it has any: a refusal or an approval then says that the
    order-statistic rule applies to them.
    """

    def __init__(self, ctx: Context, what: str, order_statistics: str | None = None, wait: bool = True) -> None:
        ctx.require_effects(what)
        if not isinstance(wait, bool):
            raise SchemaError(f"{what}: wait takes True or False, not {describe_value(wait)}")
        self.ctx = ctx
        self.what = what
        self.order_statistics = order_statistics
        self.wait = wait
        self.notes: list[str] = []
        self.request_ids: list[int] = []
        self.mock = False

    def rows(self, plan: dict) -> tuple[list[dict], dict[str, str]]:
        """The released rows of ``plan`` as dicts, and its ``{column: dtype}``."""
        try:
            fetched = fetch_plan(self.ctx.session, plan, self.ctx.cell_text, self.wait)
        except BastionError as exc:
            if self.order_statistics is None or exc.ename != "PolicyViolation":
                raise
            raise BastionError(exc.ename, f"{exc.evalue} ({self.what}: {self.order_statistics} are "
                                          f"{ORDER_STATISTICS_RULE})", **exc.details) from None
        if isinstance(fetched, RequestStatus):
            raise _NotWaited(fetched)
        self.mock = self.mock or (isinstance(fetched, FetchedTable) and fetched.mock)
        for note in fetched.notes:
            if note not in self.notes:
                self.notes.append(note)
        if fetched.request_id is not None:
            self.request_ids.append(fetched.request_id)
            if self.order_statistics is not None:
                self.notes.append(f"released after the owner's review: {self.order_statistics} are "
                                  f"{ORDER_STATISTICS_RULE}")
        frame = fetched.frame
        if frame is None:
            return [], {}
        schema = {name: str(dtype) for name, dtype in frame.schema.items()}
        return list(frame.iter_rows(named=True)), schema

    def chart(self, kind: str, spec: dict, columns: list[str], rows: list[dict]) -> Chart:
        return Chart(kind=kind, spec=spec, columns=columns, rows=rows, notes=self.notes,
                     request_ids=self.request_ids, mock=self.mock)


class _NotWaited(Exception):
    """A chart's fetch held for review that ``wait=False`` does not wait for (carries its status)."""

    def __init__(self, status: RequestStatus) -> None:
        super().__init__(status.request_id)
        self.status = status


def _chart_method(fallback: str) -> Callable[[Callable[..., Chart]], Callable[..., Chart | RequestStatus]]:
    """A chart method that, with ``wait=False``, returns a held request's status instead of waiting.

    Its docstring gains the entry of its last parameter, ``wait``, and its
    Returns section: a chart with a text table of ``fallback``.
    """
    def wrap(chart_method: Callable[..., Chart]) -> Callable[..., Chart | RequestStatus]:
        @functools.wraps(chart_method)
        def run(*args: Any, **kwargs: Any) -> Chart | RequestStatus:
            try:
                return chart_method(*args, **kwargs)
            except _NotWaited as held:
                return held.status
        extend_doc(run, parameters="""
            wait : bool, default True
                False: when the owner must review the chart's numbers, the request's
                id and status come back at once instead (``request(id)`` fetches
                the numbers; running the cell again once approved draws the chart).
            """, returns=f"""
            Chart
                Drawn as Vega-Lite, with a text table of {fallback}.
            """)
        return run
    return wrap


def _plotted(rows: list[dict], values: list[str], fetcher: _Fetcher, unit: str) -> list[dict]:
    """The rows whose values can be drawn; a note says how many were left out and why."""
    kept = [row for row in rows if all(is_number(row.get(v)) for v in values)]
    hidden = [row for row in rows if any(row.get(v) == "*" for v in values)]
    left_out = len(rows) - len(kept)
    if hidden:
        fetcher.notes.append(f"{len(hidden)} {unit}(s) not drawn: their values are hidden (*) by the "
                             "owner's policy")
    elif left_out:
        fetcher.notes.append(f"{left_out} {unit}(s) not drawn: no value (null, or withheld by the owner's policy)")
    return kept


def _sorted(rows: list[dict], keys: list[str]) -> list[dict]:
    # Released keys may mix types (a hidden key is "*"), so sort on a type-tagged form.
    def order(row: dict) -> tuple:
        return tuple((row.get(k) is None, type(row.get(k)).__name__, row.get(k) if row.get(k) is not None else 0)
                     for k in keys)
    try:
        return sorted(rows, key=order)
    except TypeError:
        return rows


def _source_descriptions(ctx: Context, frame: RemoteFrame) -> list[dict]:
    """The executor's ``datasets`` entry of each dataset or saved result the frame reads."""
    described = {d.get("name"): d for d in ctx.datasets() if isinstance(d, dict)}
    names = [source.removeprefix("saved:") for source in frame.sources()]
    return [described[name] for name in names if name in described]


def public_bounds(ctx: Context, frame: RemoteFrame, column: str) -> tuple[float, float] | None:
    """The owner's declared public bounds of ``column`` in the frame's sources, or None.

    Read from each source's policy (``bounds``, any privacy mode) and DP
    policy (``dp.bounds``), as the ``datasets`` reply sends them; several
    sources' bounds are joined (the lowest low, the highest high).  They are
    facts the owner declared, never computed from the data.
    """
    pairs = []
    for entry in _source_descriptions(ctx, frame):
        for table in ((entry.get("policy") or {}).get("bounds"), (entry.get("dp") or {}).get("bounds")):
            pair = table.get(column) if isinstance(table, dict) else None
            if (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_number(v) for v in pair)
                    and all(math.isfinite(v) for v in pair) and pair[0] < pair[1]):
                pairs.append((float(pair[0]), float(pair[1])))
    if not pairs:
        return None
    return min(low for low, _ in pairs), max(high for _, high in pairs)


def hidden_columns(ctx: Context, frame: RemoteFrame) -> set[str]:
    """The columns that the policy of one of the frame's sources hides from this scientist."""
    return {name for entry in _source_descriptions(ctx, frame)
            for name in (entry.get("policy") or {}).get("hidden") or [] if isinstance(name, str)}


def _check_binnable(ctx: Context, frame: RemoteFrame, keys: list[tuple[dict, str]], what: str) -> None:
    """Refuse binning a hidden column or a value that is not a number (from the plan's schema only)."""
    hidden = hidden_columns(ctx, frame)
    for node, name in keys:
        if node.get("expr") == "col" and name in hidden:
            raise BastionError("PolicyViolation", f"{what}: the column {name!r} is hidden by the owner's policy; "
                                                  "its values cannot be binned")
    schema = dict(ctx.schema(P.frame_op("select", input=frame.plan, exprs=[node for node, _ in keys])))
    for _, name in keys:
        kind = vega_lite_type(schema.get(name, ""))
        if kind == "temporal":
            raise SchemaError(f"{what} bins numbers; {name!r} holds dates. For dates, use "
                              f"plot.bar or plot.line over col({name!r}).dt.truncate('1mo')")
        if kind != "quantitative":
            dtype = schema.get(name, "not a number")
            hint = " (a value computed from a hidden column is reported as text)" if dtype == "String" else ""
            raise SchemaError(f"{what} bins numbers; {name!r} is {dtype}{hint}")


def _bin_range(ctx: Context, frame: RemoteFrame, key: tuple[dict, str], given: Any, what: str,
               notes: list[str], argument: str = "range=(low, high)") -> tuple[float, float]:
    """The ``(low, high)`` of a chart's bins: ``given``, else the owner's public bounds of a plain column.

    Raises
    ------
    BastionError
        ``SchemaError`` when neither is there: bins are never placed from the data.
    """
    if given is not None:
        return _range(given, what)
    node, name = key
    bounds = public_bounds(ctx, frame, name) if node.get("expr") == "col" else None
    if bounds is None:
        raise SchemaError(f"{what}: no public range for {name!r}: pass {argument}, or ask the data owner to "
                          f"declare public bounds for it (bastion-owner dataset add ... --bounds {name}=LO:HI). "
                          "Bins are never placed from the data's own min and max: they are one person's values")
    notes.append(f"bins of {name!r} span {bounds[0]:g} to {bounds[1]:g}, the owner's public bounds; "
                 "values outside them are not counted")
    return bounds


def _bin_index(node: dict, low: float, high: float, bins: int) -> tuple[dict, dict, float]:
    """The filter keeping values in ``[low, high]`` and the bin index expression, and the bin width."""
    width = (high - low) / bins
    index = P.fn("cast", P.fn("clip", P.binary("floordiv", P.binary("sub", node, P.lit(low)), P.lit(width)),
                              lower=0, upper=bins - 1), dtype="Int64")
    inside = P.fn("is_between", node, lower=P.lit(low), upper=P.lit(high), closed="both")
    return inside, index, width


def _color(by: tuple[dict, str] | None) -> dict:
    if by is None:
        return {}
    return {"color": {"field": by[1], "type": "nominal", "title": by[1]}}


def _spec(mark: Any, encoding: dict, title: str, **extra: Any) -> dict:
    return {"$schema": VEGA_LITE_SCHEMA, "title": title, "mark": mark, "encoding": encoding, **extra}


# --------------------------------------------------------------------------
# The chart methods.

@method(PlotNamespace, "hist")
@_chart_method("the counts as fallback")
def plot_hist(ctx: Context, plot: PlotNamespace, column: Any, bins: int = 10, by: Any = None,
              range: Any = None, wait: bool = True) -> Chart:  # noqa: A002 - polars' and numpy's name for it
    """A histogram: row counts in equal-width bins of a numeric column.

    The bins are counted on the owner's side; a bin with fewer rows than the
    owner's K is held for review, refused or left out, as the policy says.
    The bins span ``range``, else the owner's public bounds of the column;
    never the data's min and max (one person's values).  Values outside the
    range are not counted.

    Parameters
    ----------
    column : str or Expr
        The numeric column to bin.
    bins : int, default 10
        Number of bins (1 to 200).
    by : str or Expr, optional
        A column whose values split each bin (stacked, one colour each).
    range : tuple of float, optional
        ``(low, high)`` of the bins; by default the owner's public bounds of
        the column (``--bounds``).  Without either, the chart is refused.

    Examples
    --------
    >>> patients.plot.hist("age", bins=20)
    >>> patients.plot.hist("cost", bins=30, by="sex", range=(0, 20000))
    """
    what = "plot.hist()"
    key = _key(column, what)
    group = _optional_key(by, what)
    count = _bin_count(bins, what)
    _distinct(["bin", "count"] + ([group[1]] if group else []), what)
    fetcher = _Fetcher(ctx, what, wait=wait)
    _check_binnable(ctx, plot.frame, [key], what)
    low, high = _bin_range(ctx, plot.frame, key, range, what, fetcher.notes)
    columns = ["bin_start", "bin_end", "count"] + ([group[1]] if group else [])
    encoding = {
        "x": {"field": "bin_start", "type": "quantitative", "bin": {"binned": True}, "title": key[1]},
        "x2": {"field": "bin_end"},
        "y": {"field": "count", "type": "quantitative", "title": "count", "stack": True},
        **_color(group),
    }
    spec = _spec("bar", encoding, f"{key[1]}: counts in {count} bins")
    inside, index, width = _bin_index(key[0], low, high, count)
    keys = [P.alias(index, "bin")] + ([group[0]] if group else [])
    plan = P.frame_op("group_by", input=P.frame_op("filter", input=plot.frame.plan, predicate=inside),
                      keys=keys, aggs=[P.alias(P.length(), "count")])
    rows, _ = fetcher.rows(plan)
    drawn = []
    for row in _plotted(rows, ["count", "bin"], fetcher, "bin"):
        out = {"bin_start": low + row["bin"] * width, "bin_end": low + (row["bin"] + 1) * width,
               "count": row["count"]}
        if group:
            out[group[1]] = row.get(group[1])
        drawn.append(out)
    return fetcher.chart("hist", spec, columns, _sorted(drawn, ["bin_start"] + ([group[1]] if group else [])))


def _grouped_chart(ctx: Context, plot: PlotNamespace, kind: str, x: Any, y: Any, agg: Any, by: Any,
                   wait: bool = True) -> Chart:
    what = f"plot.{kind}()"
    key = _key(x, what)
    value = _optional_key(y, what)
    group = _optional_key(by, what)
    aggregate, value_name = _aggregation(agg, value[0] if value else None, value[1] if value else None, what)
    names = [key[1]] + ([group[1]] if group else [])
    _distinct(names + [value_name], what)
    fetcher = _Fetcher(ctx, what, f"agg={agg!r} values" if agg in ORDER_AGGREGATIONS else None, wait=wait)
    plan = P.frame_op("group_by", input=plot.frame.plan, keys=[key[0]] + ([group[0]] if group else []),
                      aggs=[aggregate])
    rows, schema = fetcher.rows(plan)
    unit = "bar" if kind == "bar" else "point"
    drawn = _sorted([{n: row.get(n) for n in names + [value_name]}
                     for row in _plotted(rows, [value_name], fetcher, unit)], names)
    x_type = vega_lite_type(schema.get(key[1], "String"))
    title = f"{agg} of {value[1]} by {key[1]}" if value else f"rows by {key[1]}"
    y_encoding = {"field": value_name, "type": "quantitative", "title": value_name}
    if kind == "bar":
        encoding = {"x": {"field": key[1], "type": "nominal" if x_type == "quantitative" else x_type,
                          "title": key[1]},
                    "y": y_encoding, **_color(group)}
        if group:
            encoding["xOffset"] = {"field": group[1], "type": "nominal"}
        spec = _spec("bar", encoding, title)
    else:
        encoding = {"x": {"field": key[1], "type": "ordinal" if x_type == "nominal" else x_type, "title": key[1]},
                    "y": y_encoding, **_color(group)}
        spec = _spec({"type": "line", "point": True}, encoding, title)
    return fetcher.chart(kind, spec, names + [value_name], drawn)


@method(PlotNamespace, "bar")
@_chart_method("the aggregates as fallback")
def plot_bar(ctx: Context, plot: PlotNamespace, x: Any, y: Any = None, agg: str | None = None,
             by: Any = None, wait: bool = True) -> Chart:
    """A bar chart: one aggregate of ``y`` per category of ``x``.

    Each bar is a group of the owner's data; a group with fewer rows than
    the owner's K is held for review, refused or left out, as the policy says.
    ``agg="min"``, ``"max"`` and ``"median"`` are order statistics (one
    person's value): released at once only where at least K people share it.

    Parameters
    ----------
    x : str or Expr
        The categories (one bar each).
    y : str or Expr, optional
        The value to aggregate; without it each bar counts the rows of its category.
    agg : str, optional
        "mean", "sum", "median", "min", "max", "std", "var", "count" or
        "n_unique"; by default "mean" of ``y``, or "count" without ``y``.
    by : str or Expr, optional
        A column whose values split each bar (side by side, one colour each).

    Examples
    --------
    >>> patients.plot.bar("sex", "cost", agg="mean")
    >>> patients.plot.bar("diagnosis", by="sex")
    """
    return _grouped_chart(ctx, plot, "bar", x, y, _default_agg(agg, y, "mean"), by, wait)


@method(PlotNamespace, "line")
@_chart_method("the aggregates as fallback")
def plot_line(ctx: Context, plot: PlotNamespace, x: Any, y: Any = None, agg: str | None = None,
              by: Any = None, wait: bool = True) -> Chart:
    """A line chart: one aggregate of ``y`` per value of ``x``, in order of ``x``.

    Parameters
    ----------
    x : str or Expr
        The ordered axis: a date, a number or a category (for example
        ``col("admission_date").dt.truncate("1mo")``).
    y : str or Expr, optional
        The value to aggregate; without it the line counts the rows of each ``x``.
    agg : str, optional
        "mean", "sum", "median", "min", "max", "std", "var", "count" or "n_unique";
        by default "sum" of ``y``, or "count" without ``y``.  "min", "max" and
        "median" are order statistics, released at once only where at least K
        people share the value.
    by : str or Expr, optional
        A column whose values make one line each.

    Examples
    --------
    >>> patients.plot.line(col("admission_date").dt.truncate("1mo").alias("month"), "cost", agg="sum")
    >>> patients.plot.line(col("admission_date").dt.year().alias("year"), agg="count", by="sex")
    """
    return _grouped_chart(ctx, plot, "line", x, y, _default_agg(agg, y, "sum"), by, wait)


def _default_agg(agg: Any, y: Any, with_value: str) -> Any:
    """``agg`` as given, else ``with_value`` when there is a value column and ``"count"`` when there is not."""
    if agg is not None:
        return agg
    return with_value if y is not None else "count"


@method(PlotNamespace, "box")
@_chart_method("min, q1, median, q3, max and count")
def plot_box(ctx: Context, plot: PlotNamespace, x: Any, y: Any, by: Any = None, wait: bool = True) -> Chart:
    """A box plot: min, quartiles and max of ``y`` per category of ``x``.

    Only aggregates are drawn: the whiskers span min to max and no
    individual (outlier) point leaves the owner's side.  min, the quartiles
    and max are order statistics, each one person's value unless several
    share it: the owner's executor releases them at once only where at least
    K people share each value; otherwise the chart waits for the owner's
    review or is refused, as the policy says (and the chart says so).  Nothing
    else computes extremes: the spec draws the released numbers as they are.

    Parameters
    ----------
    x : str or Expr
        The categories (one box each).
    y : str or Expr
        The numeric value summarized.
    by : str or Expr, optional
        A column whose values split each category (side by side, one colour each).

    Examples
    --------
    >>> patients.plot.box("diagnosis", "cost")
    >>> patients.plot.box("sex", "length_of_stay", by="smoker")
    """
    what = "plot.box()"
    key = _key(x, what)
    value = _key(y, what)
    group = _optional_key(by, what)
    names = [key[1]] + ([group[1]] if group else [])
    stats = [name for name, _, _ in BOX_STATS]
    _distinct(names + stats + ["count"], what)
    aggs = []
    for name, function, quantile in BOX_STATS:
        node = (P.fn(function, value[0]) if quantile is None else
                P.fn(function, value[0], quantile=quantile, interpolation=BOX_INTERPOLATION))
        aggs.append(P.alias(node, name))
    aggs.append(P.alias(P.length(), "count"))
    fetcher = _Fetcher(ctx, what, "min, quartiles and max", wait=wait)
    rows, schema = fetcher.rows(P.frame_op("group_by", input=plot.frame.plan,
                                           keys=[key[0]] + ([group[0]] if group else []), aggs=aggs))
    columns = names + stats + ["count"]
    drawn = _sorted([{n: row.get(n) for n in columns} for row in _plotted(rows, stats, fetcher, "box")], names)
    x_type = vega_lite_type(schema.get(key[1], "String"))
    x = {"field": key[1], "type": "nominal" if x_type == "quantitative" else x_type, "title": key[1]}
    common = {"x": x, **_color(group)}
    if group:
        common["xOffset"] = {"field": group[1], "type": "nominal"}
    layers = [
        {"mark": {"type": "rule"}, "encoding": {**common, "y": {"field": "min", "type": "quantitative",
                                                                 "title": value[1]}, "y2": {"field": "max"}}},
        {"mark": {"type": "bar", "size": 14}, "encoding": {**common, "y": {"field": "q1", "type": "quantitative"},
                                                           "y2": {"field": "q3"}}},
        {"mark": {"type": "tick", "color": "white", "size": 14},
         "encoding": {"x": x, **({"xOffset": common["xOffset"]} if group else {}),
                      "y": {"field": "median", "type": "quantitative"}}},
    ]
    spec = {"$schema": VEGA_LITE_SCHEMA, "title": f"{value[1]} by {key[1]} (min, quartiles, max)", "layer": layers}
    return fetcher.chart("box", spec, columns, drawn)


@method(PlotNamespace, "heatmap")
@_chart_method("the counts as fallback")
def plot_heatmap(ctx: Context, plot: PlotNamespace, x: Any, y: Any, bins: Any = (20, 20), by: Any = None,
                 range: Any = None, wait: bool = True) -> Chart:  # noqa: A002
    """A 2-D histogram: row counts in a grid of bins of two numeric columns.

    In place of a scatter plot (which would release every row), the grid's
    cells are counted on the owner's side; a cell with fewer rows than the
    owner's K is held for review, refused or left out, as the policy says.
    Each axis spans its ``range``, else the owner's public bounds of the
    column; never the data's min and max.  Values outside are not counted.

    Parameters
    ----------
    x, y : str or Expr
        The two numeric columns.
    bins : int or tuple of int, default (20, 20)
        Number of bins along x and y (1 to 200 each).
    by : str or Expr, optional
        A column whose values get one grid each, side by side.
    range : tuple, optional
        ``((x_low, x_high), (y_low, y_high))``; an axis given as ``None``
        (or the whole range left out) takes the owner's public bounds of its
        column (``--bounds``).  An axis with neither is refused.

    Examples
    --------
    >>> patients.plot.heatmap("age", "cost", bins=(20, 20))
    >>> patients.plot.heatmap("age", "length_of_stay", bins=10, by="sex")
    """
    what = "plot.heatmap()"
    keys = [_key(x, what), _key(y, what)]
    group = _optional_key(by, what)
    counts = [bins, bins] if isinstance(bins, int) and not isinstance(bins, bool) else bins
    if not isinstance(counts, (list, tuple)) or len(counts) != 2:
        raise SchemaError(f"{what}: bins must be a whole number or a pair of them, not {describe_value(bins)}")
    counts = [_bin_count(c, what) for c in counts]
    fetcher = _Fetcher(ctx, what, wait=wait)
    ranges = (None, None) if range is None else range
    if not isinstance(ranges, (list, tuple)) or len(ranges) != 2:
        raise SchemaError(f"{what}: range must be ((x_low, x_high), (y_low, y_high))")
    _check_binnable(ctx, plot.frame, keys, what)
    extents = [_bin_range(ctx, plot.frame, key, given, what, fetcher.notes,
                          "range=((x_low, x_high), (y_low, y_high)) (None for an axis with public bounds)")
               for key, given in zip(keys, ranges)]
    axes = ["x", "y"]
    columns = [f"{keys[0][1]}_start", f"{keys[0][1]}_end", f"{keys[1][1]}_start", f"{keys[1][1]}_end", "count"]
    columns += [group[1]] if group else []
    _distinct(columns + ["bin_x", "bin_y"], what)
    encoding: dict = {
        "x": {"field": columns[0], "type": "quantitative", "bin": {"binned": True}, "title": keys[0][1]},
        "x2": {"field": columns[1]},
        "y": {"field": columns[2], "type": "quantitative", "bin": {"binned": True}, "title": keys[1][1]},
        "y2": {"field": columns[3]},
        "color": {"field": "count", "type": "quantitative", "title": "count"},
    }
    if group:
        encoding["column"] = {"field": group[1], "type": "nominal", "title": group[1]}
    spec = _spec("rect", encoding, f"{keys[1][1]} against {keys[0][1]}: counts in {counts[0]}×{counts[1]} bins")
    predicate, bin_keys, widths = None, [], []
    for (node, _), (low, high), count, axis in zip(keys, extents, counts, axes):
        inside, index, width = _bin_index(node, low, high, count)
        predicate = inside if predicate is None else P.binary("and", predicate, inside)
        bin_keys.append(P.alias(index, f"bin_{axis}"))
        widths.append(width)
    plan = P.frame_op("group_by", input=P.frame_op("filter", input=plot.frame.plan, predicate=predicate),
                      keys=bin_keys + ([group[0]] if group else []), aggs=[P.alias(P.length(), "count")])
    rows, _ = fetcher.rows(plan)
    drawn = []
    for row in _plotted(rows, ["count", "bin_x", "bin_y"], fetcher, "cell"):
        (x_low, _), (y_low, _) = extents
        out = {columns[0]: x_low + row["bin_x"] * widths[0], columns[1]: x_low + (row["bin_x"] + 1) * widths[0],
               columns[2]: y_low + row["bin_y"] * widths[1], columns[3]: y_low + (row["bin_y"] + 1) * widths[1],
               "count": row["count"]}
        if group:
            out[group[1]] = row.get(group[1])
        drawn.append(out)
    return fetcher.chart("heatmap", spec, columns, _sorted(drawn, columns[:1] + columns[2:3]))


__all__ = ["PlotNamespace", "AGGREGATIONS", "MAX_BINS", "hidden_columns", "public_bounds", "vega_lite_type"]
