"""``frame.describe()``: summary statistics per column, as two aggregates on the owner's side.

The statistics are computed by the executor as two plans (global ``select``s
of aggregates), each going through the policy like any aggregate:

1. the moments: ``count``, ``null_count``, ``mean``, ``std`` of every column,
   fetched as any query (a frame with fewer rows than the owner's K waits for
   review);
2. the order statistics: ``min``, the 25/50/75% percentiles and ``max``.  Each
   is one person's value unless at least K people share it, so the executor
   releases them only then; otherwise they are held for the owner's review or
   refused.  This request is not waited for: when it is held or refused, the
   moments are shown at once with these rows empty and a note saying why (and
   which request to fetch later with ``request(N)``), next to the owner's
   public bounds of the columns when the owner declared any.

Columns that a source's policy hides are not asked about at all (the executor
refuses any computation over them): their statistics show ``*``.  The released rows are then laid out here the way
``polars.DataFrame.describe`` does: a ``statistic`` column and one column per
input column (``Float64`` for numbers and booleans, text otherwise).
"""
from __future__ import annotations

from bastion_kernel.contract import plan as P

from .errors import BastionError, SchemaError
from .expr import is_number
from .frame import RemoteFrame
from .plot import hidden_columns, public_bounds
from .registry import Context, method
from .values import FetchedTable, RequestStatus

# polars' describe rows, and how each is computed (None: not for this kind of column).
STATISTICS = ("count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max")
_QUANTILES = {"25%": 0.25, "50%": 0.5, "75%": 0.75}
# Statistics that are one row's value: asked for in a request of their own (see the module's text).
ORDER_STATISTICS = ("min", "25%", "50%", "75%", "max")
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


def describe_plans(frame_plan: dict, schema: list[list[str]],
                   hidden: frozenset[str] | set[str] = frozenset()) -> tuple[dict, dict | None]:
    """The plan of the moments and the plan of the order statistics (each None when it asks for nothing).

    Columns in ``hidden`` are left out: the executor computes nothing over a hidden column.
    """
    moments, order = [], []
    for column, dtype in schema:
        if column in hidden:
            continue
        for stat in _BY_KIND[column_kind(dtype)]:
            (order if stat in ORDER_STATISTICS else moments).append(
                P.alias(_statistic(stat, column), statistic_name(stat, column)))
    return (P.frame_op("select", input=frame_plan, exprs=moments) if moments else None,
            P.frame_op("select", input=frame_plan, exprs=order) if order else None)


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
    ``polars.DataFrame.describe`` lays them out.  They are two aggregates
    over the whole frame.  count, null_count, mean and std are released when
    the frame has enough rows for the owner's policy (else held for review).
    min, the percentiles and max are order statistics, each one person's
    value unless at least K people share it: they are asked for separately
    and released only where the owner's policy allows; when they are held for
    review or refused, their rows stay empty and a note says why (a held
    request is fetched later with ``request(N)``) and gives the owner's public
    bounds of the columns, if declared.  Hidden columns' statistics show ``*``.

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
    hidden = hidden_columns(ctx, frame) & {column for column, _ in schema}
    moments_plan, order_plan = describe_plans(frame.plan, schema, hidden)
    fetched = FetchedTable(frame=None) if moments_plan is None else ctx.session.fetch(moments_plan, ctx.cell_text)
    row = _released_row(fetched)
    notes = list(fetched.notes)
    for column, dtype in schema:
        if column in hidden:
            row.update({statistic_name(stat, column): "*" for stat in _BY_KIND[column_kind(dtype)]})
    if hidden:
        notes.append(f"hidden by the owner's policy, not described: {', '.join(sorted(hidden))}")
    if order_plan is not None:
        withheld = None
        try:
            ordered = ctx.session.fetch(order_plan, ctx.cell_text, wait=False)
        except BastionError as exc:
            if exc.ename != "PolicyViolation":
                raise
            withheld = f"the owner's policy refused them: {exc.evalue}"
        else:
            if isinstance(ordered, RequestStatus):
                withheld = (f"they wait for the owner's review as request #{ordered.request_id}; "
                            f"request({ordered.request_id}) fetches them")
            else:
                row.update(_released_row(ordered))
                notes += [note for note in ordered.notes if note not in notes]
        if withheld is not None:
            notes.append(f"min, 25%, 50%, 75% and max are not shown: {withheld}. They are order statistics, "
                         "one person's value unless at least K people share it")
            declared = [(column, public_bounds(ctx, frame, column)) for column, _ in schema]
            declared = [f"{column} {low:g} to {high:g}" for column, pair in declared if pair is not None
                        for low, high in [pair]]
            if declared:
                notes.append(f"the owner's public bounds (declared, not computed from the data): {', '.join(declared)}")
    layout = describe_layout(row, schema)
    import polars  # lays out released values only, as the client decodes them; not needed to import the language
    table = polars.DataFrame(layout, schema={
        name: polars.Float64 if name != "statistic" and all(v is None or isinstance(v, float) for v in values)
        else polars.String for name, values in layout.items()})
    return FetchedTable(frame=table, notes=notes, request_id=fetched.request_id, mock=fetched.mock)


def _released_row(fetched: FetchedTable) -> dict:
    """The one row of a released global aggregate ({} when nothing came back)."""
    rows = [] if fetched.frame is None else list(fetched.frame.iter_rows(named=True))
    return dict(rows[0]) if rows else {}
