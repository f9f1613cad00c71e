"""``frame.describe()``: summary statistics per column, as one aggregate on the owner's side.

The statistics of every column are computed by the executor as ONE plan (a
global ``select`` of aggregates), so they go through the policy like any
aggregate: a frame with fewer rows than the owner's K is held for review, and
statistics of hidden columns come back as ``*``.  The one released row is then
laid out here the way ``polars.DataFrame.describe`` does: a ``statistic``
column and one column per input column (``Float64`` for numbers and booleans,
text otherwise).
"""
from __future__ import annotations

from bastion_kernel import plan as P

from .errors import SchemaError
from .expr import is_number
from .frame import RemoteFrame
from .registry import Context, method
from .values import FetchedTable

# polars' describe rows, and how each is computed (None: not for this kind of column).
STATISTICS = ("count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max")
_QUANTILES = {"25%": 0.25, "50%": 0.5, "75%": 0.75}
_NUMERIC = ("Int8", "Int16", "Int32", "Int64", "Int128", "UInt8", "UInt16", "UInt32", "UInt64",
            "Float32", "Float64", "Decimal")
_TEMPORAL = ("Date", "Datetime", "Duration", "Time")
# Which statistics polars computes for each kind of column.
_BY_KIND = {
    "numeric": STATISTICS,
    "bool": ("count", "null_count", "mean", "min", "max"),
    "temporal": ("count", "null_count", "mean", "min", "25%", "50%", "75%", "max"),
    "text": ("count", "null_count", "min", "max"),
    "other": ("count", "null_count"),
}


def column_kind(dtype: str) -> str:
    """``numeric``, ``bool``, ``temporal``, ``text`` or ``other`` for a polars dtype name."""
    base = str(dtype).split("(", 1)[0].split("[", 1)[0]
    if base in _NUMERIC:
        return "numeric"
    if base == "Boolean":
        return "bool"
    if base in _TEMPORAL:
        return "temporal"
    if base in ("String", "Utf8", "Categorical", "Enum"):
        return "text"
    return "other"


def _statistic(stat: str, column: str) -> dict:
    node = P.col(column)
    if stat in _QUANTILES:
        # polars' describe uses the "nearest" interpolation, so the numbers match it.
        return P.fn("quantile", node, quantile=_QUANTILES[stat], interpolation="nearest")
    function = {"count": "count", "null_count": "null_count", "mean": "mean", "std": "std",
                "min": "min", "max": "max"}[stat]
    return P.fn(function, node)


def statistic_name(stat: str, column: str) -> str:
    """The output name of one statistic in the aggregate plan (it appears in the executor's notes)."""
    return f"{stat}({column})"


def describe_plan(frame_plan: dict, schema: list[list[str]]) -> dict:
    """The one aggregate plan computing every statistic of every column."""
    exprs = [P.alias(_statistic(stat, column), statistic_name(stat, column))
             for column, dtype in schema for stat in _BY_KIND[column_kind(dtype)]]
    return P.frame_op("select", input=frame_plan, exprs=exprs)


def describe_layout(row: dict, schema: list[list[str]]) -> dict[str, list]:
    """polars' describe layout ``{"statistic": [...], column: [...]}`` from the released row."""
    layout: dict[str, list] = {"statistic": list(STATISTICS)}
    for column, dtype in schema:
        values = [row.get(statistic_name(stat, column)) for stat in STATISTICS]
        values = [float(v) if isinstance(v, bool) else v for v in values]  # polars shows booleans' min/max as 0/1
        if column_kind(dtype) in ("numeric", "bool") and all(v is None or is_number(v) for v in values):
            layout[column] = [None if v is None else float(v) for v in values]
        else:  # text, dates, or values hidden as "*": shown as text, as polars does
            layout[column] = [None if v is None else str(v) for v in values]
    return layout


@method(RemoteFrame, "describe")
def frame_describe(ctx: Context, frame: RemoteFrame) -> FetchedTable:
    """Summary statistics of every column, computed by the owner's executor.

    count, null_count, mean, std, min, 25%, 50%, 75% and max per column, as
    ``polars.DataFrame.describe`` lays them out.  They are one aggregate over
    the whole frame: released when it has enough rows for the owner's policy
    (else held for review), with hidden columns' statistics shown as ``*``.

    Returns
    -------
    FetchedTable
        A ``statistic`` column and one column per column of the frame.

    Examples
    --------
    >>> patients.describe()
    >>> patients.select("age", "cost").describe()
    """
    ctx.require_effects("describe()")
    schema = ctx.schema(frame.plan)
    if not schema:
        raise SchemaError("describe(): the frame has no columns")
    fetched = ctx.session.fetch(describe_plan(frame.plan, schema), ctx.cell_text)
    rows = [] if fetched.frame is None else list(fetched.frame.iter_rows(named=True))
    layout = describe_layout(rows[0] if rows else {}, schema)
    import polars  # lays out released values only, as the client decodes them; not needed to import the language
    table = polars.DataFrame(layout, schema={
        name: polars.Float64 if name != "statistic" and all(v is None or isinstance(v, float) for v in values)
        else polars.String for name, values in layout.items()})
    return FetchedTable(frame=table, notes=list(fetched.notes), request_id=fetched.request_id)
