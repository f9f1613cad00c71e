"""Remote frames: lazy, polars-shaped, and nothing but a plan.

A :class:`RemoteFrame` holds a plan dict of :mod:`bastion_kernel.contract.plan`.  Its
methods build new plans with :func:`bastion_kernel.contract.plan.frame_op`; only
``fetch``, ``save``, ``request`` and the schema properties talk to the
session (the executor), and no row ever lives on this side except in a
:class:`FetchedTable` the executor released.
"""
from __future__ import annotations

from typing import Any

from bastion_kernel.contract import plan as P

from .errors import SchemaError, UnsupportedOperation, suggest
from bastion_kernel.contract.plan_text import plan_to_polars_text, text_of
from bastion_kernel.contract.walk import walk_frames

from .expr import (LENGTHS, Expr, check_name, check_plan_size, combine_predicates, describe_value, to_node,
                   to_nodes)
from .registry import Context, documented_like, function, method, prop
from .values import DatasetList, FetchedTable, RequestStatus


class RemoteFrame:
    """A lazy frame on the owner's side: a plan, never rows."""

    type_name = "RemoteFrame"

    def __init__(self, plan: dict) -> None:
        self.plan = check_plan_size(plan)

    def sources(self) -> list[str]:
        """The datasets (and saved results) this frame reads, in plan order."""
        found = [node["dataset"] if node["op"] == "scan" else f"saved:{node['name']}"
                 for node in walk_frames(self.plan) if node["op"] in ("scan", "saved")]
        return list(dict.fromkeys(found))

    def summary(self) -> str:
        """A short readable summary: the sources and the plan as polars-like text (the repr).

        Not the language's ``describe()``, which computes statistics on the executor.
        """
        return (f"RemoteFrame (lazy; nothing fetched) over {', '.join(self.sources()) or 'no dataset'}:\n"
                f"  {plan_to_polars_text(self.plan)}\n"
                "Use .fetch() to run it through the owner's policy.")

    def __repr__(self) -> str:
        return self.summary()


class GroupBy:
    """``frame.group_by(...)`` waiting for ``.agg(...)``."""

    type_name = "GroupBy"

    def __init__(self, frame: RemoteFrame, keys: list[dict]) -> None:
        self.frame = frame
        self.keys = keys

    def __repr__(self) -> str:
        keys = ", ".join(text_of(k) for k in self.keys)
        return (f"GroupBy over {', '.join(self.frame.sources())} (pending: call .agg(...)):\n"
                f"  {plan_to_polars_text(self.frame.plan)}.group_by({keys})")


def _frame(value: Any, what: str) -> RemoteFrame:
    if not isinstance(value, RemoteFrame):
        raise SchemaError(f"{what} takes a frame (from dataset(...)), not {describe_value(value)}")
    return value


def _names(values: Any, what: str) -> list[str]:
    """Column names from strings, lists of them, or plain ``col(...)`` expressions."""
    out: list[str] = []
    items = values if isinstance(values, (list, tuple)) else [values]
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_names(item, what))
        elif isinstance(item, Expr) and all(n.get("expr") == "col" for n in item.nodes):
            out.extend(n["name"] for n in item.nodes)
        else:
            out.append(check_name(item, what))
    return out


def _count(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise SchemaError(f"{what} takes a whole number >= 0, not {describe_value(value)}")


def _exprs_with_names(exprs: tuple, named: dict, what: str) -> list[dict]:
    nodes = to_nodes(list(exprs), what, str_as="col")
    nodes += [P.alias(to_node(v, what, str_as="lit"), check_name(k, what)) for k, v in named.items()]
    if not nodes:
        raise SchemaError(f"{what} needs at least one expression")
    return nodes


# --------------------------------------------------------------------------
# Frame methods.

@method(RemoteFrame, "select")
def frame_select(ctx: Context, frame: RemoteFrame, *exprs: Any, **named_exprs: Any) -> RemoteFrame:
    """Choose or compute the output columns.

    Parameters
    ----------
    *exprs : str, Expr or list of them
        Column names or expressions.
    **named_exprs : Expr or literal
        ``name=expression``: the expression, aliased to ``name``.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.select("age", col("cost") / 1000, stay=col("length_of_stay"))
    """
    return RemoteFrame(P.frame_op("select", input=frame.plan, exprs=_exprs_with_names(exprs, named_exprs, "select()")))


@method(RemoteFrame, "with_columns")
def frame_with_columns(ctx: Context, frame: RemoteFrame, *exprs: Any, **named_exprs: Any) -> RemoteFrame:
    """Add or replace columns, keeping the others.

    Parameters
    ----------
    *exprs : Expr or list of them
        Expressions (an expression named like an existing column replaces it).
    **named_exprs : Expr or literal
        ``name=expression``.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.with_columns((col("cost") / col("length_of_stay")).alias("cost_per_day"))
    """
    return RemoteFrame(P.frame_op("with_columns", input=frame.plan,
                                  exprs=_exprs_with_names(exprs, named_exprs, "with_columns()")))


@method(RemoteFrame, "filter")
def frame_filter(ctx: Context, frame: RemoteFrame, *predicates: Any, **constraints: Any) -> RemoteFrame:
    """Keep the rows where every condition holds.

    Parameters
    ----------
    *predicates : Expr
        Boolean expressions, combined with ``&``.
    **constraints : literal
        ``name=value`` equalities, as in polars.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.filter(col("age") >= 18, col("smoker"))
    >>> patients.filter(sex="F")
    """
    predicate = combine_predicates(predicates, constraints, "filter()")
    return RemoteFrame(P.frame_op("filter", input=frame.plan, predicate=predicate))


@method(RemoteFrame, "group_by")
def frame_group_by(ctx: Context, frame: RemoteFrame, *by: Any, maintain_order: bool = False) -> GroupBy:
    """Group rows by keys; aggregate each group with ``.agg(...)``.

    Parameters
    ----------
    *by : str, Expr or list of them
        The grouping keys.
    maintain_order : bool, default False
        Only False: the groups come sorted by their keys (nulls first), not
        in the order they were first seen.

    Returns
    -------
    GroupBy
        Waiting for ``.agg(...)``.

    Examples
    --------
    >>> patients.group_by("diagnosis", "sex").agg(len(), col("cost").mean())
    """
    if maintain_order is not False:
        raise UnsupportedOperation("group_by(maintain_order=True) is not available; "
                                   "sort the result with .sort(...) instead")
    return GroupBy(frame, group_keys(by))


def group_keys(by: tuple) -> list[dict]:
    """The ``keys`` of a group_by node, checked: at least one."""
    keys = to_nodes(list(by), "group_by()", str_as="col")
    if not keys:
        raise SchemaError("group_by() needs at least one key")
    return keys


@method(GroupBy, "agg")
def group_by_agg(ctx: Context, grouped: GroupBy, *aggs: Any, **named_aggs: Any) -> RemoteFrame:
    """Aggregate each group.

    Parameters
    ----------
    *aggs : Expr or list of them
        Aggregations (``col("x").mean()``, ``len()``...); a bare column name
        collects that column's values per group (row-level: reviewed).
    **named_aggs : Expr
        ``name=aggregation``.

    Returns
    -------
    RemoteFrame
        One row per group.

    Examples
    --------
    >>> patients.group_by("sex").agg(len(), mean_cost=col("cost").mean())
    """
    nodes = _exprs_with_names(aggs, named_aggs, "agg()")
    return RemoteFrame(P.frame_op("group_by", input=grouped.frame.plan, keys=grouped.keys, aggs=nodes))


@method(GroupBy, "len")
@documented_like(group_by_agg, "Returns")
def group_by_len(ctx: Context, grouped: GroupBy, name: str | None = None) -> RemoteFrame:
    """The number of rows in each group.

    Parameters
    ----------
    name : str, optional
        Name of the count column (default "len").

    Examples
    --------
    >>> patients.group_by("diagnosis").len()
    """
    return RemoteFrame(P.frame_op("group_by", input=grouped.frame.plan, keys=grouped.keys, aggs=count_aggs(name)))


def count_aggs(name: Any) -> list[dict]:
    """The ``aggs`` of ``group_by(...).len(name)``: the rows of each group, named ``name`` (default "len")."""
    return [P.length() if name is None else P.alias(P.length(), check_name(name, "len()"))]


@method(RemoteFrame, "sort")
def frame_sort(ctx: Context, frame: RemoteFrame, by: Any, *more_by: Any,
               descending: bool | list = False, nulls_last: bool = False) -> RemoteFrame:
    """Sort the rows.

    Parameters
    ----------
    by : str, Expr or list of them
        Sort keys.
    *more_by : str or Expr
        More sort keys.
    descending : bool or list of bool, default False
        One flag for all keys, or one per key.
    nulls_last : bool, default False
        Put nulls at the end.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).sort("len", descending=True)
    """
    return RemoteFrame(P.frame_op("sort", input=frame.plan, **sort_fields(by, more_by, descending, nulls_last)))


def sort_fields(by: Any, more_by: tuple, descending: Any, nulls_last: Any) -> dict:
    """The ``by``, ``descending`` and ``nulls_last`` fields of a sort node, checked."""
    keys = to_nodes([by, *more_by], "sort()", str_as="col")
    if isinstance(descending, bool):
        flags = [descending] * len(keys)
    elif isinstance(descending, (list, tuple)) and all(isinstance(d, bool) for d in descending):
        flags = list(descending)
        if len(flags) != len(keys):
            raise SchemaError(f"sort(): descending has {len(flags)} flags for {len(keys)} keys")
    else:
        raise SchemaError(f"sort(): descending must be True/False or a list of them, not {describe_value(descending)}")
    if not isinstance(nulls_last, bool):
        raise SchemaError("sort(): nulls_last must be True or False")
    return {"by": keys, "descending": flags, "nulls_last": nulls_last}


@method(RemoteFrame, "head")
def frame_head(ctx: Context, frame: RemoteFrame, n: int = 5) -> RemoteFrame:
    """The first ``n`` rows.

    Parameters
    ----------
    n : int, default 5
        Number of rows.

    Returns
    -------
    RemoteFrame
        A new lazy frame (individual rows: the owner reviews them).

    Examples
    --------
    >>> patients.select("age", "diagnosis").head(10)
    """
    return RemoteFrame(P.frame_op("head", input=frame.plan, n=_count(n, "head()")))


@method(RemoteFrame, "limit")
@documented_like(frame_head, "Parameters")
def frame_limit(ctx: Context, frame: RemoteFrame, n: int = 5) -> RemoteFrame:
    """The first ``n`` rows (the same as ``head``).

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.sort("cost", descending=True).limit(3)
    """
    return RemoteFrame(P.frame_op("head", input=frame.plan, n=_count(n, "limit()")))


@method(RemoteFrame, "slice")
@documented_like(frame_head, "Returns")
def frame_slice(ctx: Context, frame: RemoteFrame, offset: int, length: int | None = None) -> RemoteFrame:
    """The rows from ``offset`` on (negative: from the end), at most ``length`` of them.

    Parameters
    ----------
    offset : int
        Index of the first row kept; a negative offset counts from the end.
    length : int or None, default None
        Number of rows kept (None: to the end).

    Examples
    --------
    >>> patients.sort("age").slice(10, 5)
    """
    return RemoteFrame(P.frame_op("slice", input=frame.plan, **slice_fields(offset, length)))


def slice_fields(offset: Any, length: Any) -> dict:
    """The ``offset`` and ``length`` fields of a slice node, checked."""
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise SchemaError(f"slice() takes a whole number offset, not {describe_value(offset)}")
    return {"offset": offset, "length": None if length is None else _count(length, "slice()")}


@method(RemoteFrame, "explode")
def frame_explode(ctx: Context, frame: RemoteFrame, columns: Any, *more_columns: Any) -> RemoteFrame:
    """One row per element of list columns (the other columns are repeated).

    Each new row is still fed by the source rows of the row it came from:
    exploding never makes one person count as several.

    Parameters
    ----------
    columns : str or list of str
        The list column to explode (one: several at once would fail on rows whose lists differ in length).
    *more_columns : str
        More list columns.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.with_columns(col("age").repeat_by(2)).explode("age").group_by("sex").agg(len())
    """
    names = _names([columns, *more_columns], "explode()")
    if not names:
        raise SchemaError("explode() needs at least one column name")
    if len(names) > 1:
        raise UnsupportedOperation("explode() takes one column at a time: exploding several at once fails on "
                                   "rows whose lists differ in length, which would tell about those rows")
    return RemoteFrame(P.frame_op("explode", input=frame.plan, columns=names))


@method(RemoteFrame, "drop")
def frame_drop(ctx: Context, frame: RemoteFrame, *columns: Any) -> RemoteFrame:
    """Remove columns.

    Parameters
    ----------
    *columns : str or list of str
        The columns to remove.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.drop("name", "zip")
    """
    return RemoteFrame(P.frame_op("drop", input=frame.plan, columns=drop_columns(columns)))


def drop_columns(columns: tuple) -> list[str]:
    """The ``columns`` of a drop node, checked: at least one."""
    names = _names(list(columns), "drop()")
    if not names:
        raise SchemaError("drop() needs at least one column name")
    return names


@method(RemoteFrame, "rename")
def frame_rename(ctx: Context, frame: RemoteFrame, mapping: dict) -> RemoteFrame:
    """Rename columns.

    Parameters
    ----------
    mapping : dict
        ``{old name: new name}``.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.rename({"length_of_stay": "stay"})
    """
    return RemoteFrame(P.frame_op("rename", input=frame.plan, mapping=rename_mapping(mapping)))


def rename_mapping(mapping: Any) -> dict[str, str]:
    """The ``mapping`` of a rename node, checked: ``{old name: new name}``, not empty."""
    if not isinstance(mapping, dict) or not mapping:
        raise SchemaError(f"rename() takes a dict {{old: new}}, not {describe_value(mapping)}")
    return {check_name(k, "rename()"): check_name(v, "rename()") for k, v in mapping.items()}


@method(RemoteFrame, "drop_nulls")
def frame_drop_nulls(ctx: Context, frame: RemoteFrame, subset: Any = None) -> RemoteFrame:
    """Remove rows with a null value.

    Parameters
    ----------
    subset : str or list of str, optional
        Only look at these columns (default: all).

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.drop_nulls(["cost", "smoker"])
    """
    names = None if subset is None else _names(subset, "drop_nulls()")
    return RemoteFrame(P.frame_op("drop_nulls", input=frame.plan, subset=names))


@method(RemoteFrame, "fill_null")
def frame_fill_null(ctx: Context, frame: RemoteFrame, value: Any) -> RemoteFrame:
    """Replace nulls in every column with a value.

    Parameters
    ----------
    value : literal or Expr
        The replacement.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.select("cost").fill_null(0.0)
    """
    return RemoteFrame(P.frame_op("fill_null", input=frame.plan, value=to_node(value, "fill_null()")))


@method(RemoteFrame, "unique")
def frame_unique(ctx: Context, frame: RemoteFrame, subset: Any = None) -> RemoteFrame:
    """Keep one row per distinct combination of values.

    Parameters
    ----------
    subset : str or list of str, optional
        Compare only these columns (default: all).

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.select("sex", "diagnosis").unique()
    """
    names = None if subset is None else _names(subset, "unique()")
    return RemoteFrame(P.frame_op("unique", input=frame.plan, subset=names))


@method(RemoteFrame, "join")
def frame_join(ctx: Context, frame: RemoteFrame, other: Any, on: Any = None, how: str = "inner",
               left_on: Any = None, right_on: Any = None, suffix: str = "_right") -> RemoteFrame:
    """Join with another frame.

    Parameters
    ----------
    other : RemoteFrame
        The right-hand frame.
    on : str, Expr or list, optional
        Key columns with the same name on both sides.
    how : str, default "inner"
        "inner", "left", "full", "semi", "anti" or "cross".
    left_on, right_on : str, Expr or list, optional
        Keys that differ between the sides.
    suffix : str, default "_right"
        Added to right-hand column names that clash.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> costs = patients.group_by("diagnosis").agg(col("cost").mean().alias("avg_cost"))
    >>> patients.join(costs, on="diagnosis", how="left")
    """
    right = _frame(other, "join()")
    return RemoteFrame(P.frame_op("join", left=frame.plan, right=right.plan,
                                  **join_fields(on, how, left_on, right_on, suffix)))


def join_fields(on: Any, how: Any, left_on: Any, right_on: Any, suffix: Any) -> dict:
    """The ``how``, ``left_on``, ``right_on`` and ``suffix`` fields of a join node, checked."""
    if how not in P.JOIN_HOWS:
        raise SchemaError(f"join(): how must be one of {', '.join(P.JOIN_HOWS)}, not {how!r}"
                          f"{suggest(str(how), P.JOIN_HOWS)}")
    if how == "cross":
        if on is not None or left_on is not None or right_on is not None:
            raise SchemaError("join(how='cross') takes no keys")
        lkeys: list[dict] = []
        rkeys: list[dict] = []
    elif on is not None:
        if left_on is not None or right_on is not None:
            raise SchemaError("join(): give either on= or left_on=/right_on=, not both")
        lkeys = rkeys = to_nodes(on, "join()", str_as="col")
    else:
        if left_on is None or right_on is None:
            raise SchemaError("join() needs on= (or both left_on= and right_on=)")
        lkeys = to_nodes(left_on, "join()", str_as="col")
        rkeys = to_nodes(right_on, "join()", str_as="col")
        if len(lkeys) != len(rkeys):
            raise SchemaError(f"join(): {len(lkeys)} left keys but {len(rkeys)} right keys")
    return {"how": how, "left_on": lkeys, "right_on": list(rkeys), "suffix": check_name(suffix, "join()")}


@method(RemoteFrame, "with_row_index")
def frame_with_row_index(ctx: Context, frame: RemoteFrame, name: str = "index") -> RemoteFrame:
    """Add a column numbering the rows from 0.

    Parameters
    ----------
    name : str, default "index"
        The column's name.

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> patients.with_row_index("row")
    """
    return RemoteFrame(P.frame_op("with_row_index", input=frame.plan, name=check_name(name, "with_row_index()")))


@method(RemoteFrame, "count")
def frame_count(ctx: Context, frame: RemoteFrame) -> RemoteFrame:
    """The number of non-null values of every column (one row).

    Returns
    -------
    RemoteFrame
        One row, one column per input column.

    Examples
    --------
    >>> patients.count()
    """
    columns = [name for name, _ in ctx.schema(frame.plan)]
    if not columns:
        raise SchemaError("count(): the frame has no columns")
    return RemoteFrame(P.frame_op("select", input=frame.plan, exprs=[P.fn("count", P.col(c)) for c in columns]))


@method(RemoteFrame, "collect")
def frame_collect(ctx: Context, frame: RemoteFrame) -> FetchedTable:
    """Fetch the result, as polars' ``collect()``: the same as ``fetch()``.

    The query runs through the owner's policy and what it releases comes
    back as a local ``DataFrame``.  Nothing is kept on the owner's side; to
    keep a result there, use ``save(name)``.

    Returns
    -------
    DataFrame
        The released table and the executor's notes.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).collect()
    """
    ctx.require_effects("collect()")
    return ctx.session.fetch(frame.plan, ctx.cell_text)


@method(RemoteFrame, "lazy")
def frame_lazy(ctx: Context, frame: RemoteFrame) -> RemoteFrame:
    """The same frame (every remote frame is already lazy; kept for polars code).

    Returns
    -------
    RemoteFrame
        The same frame.

    Examples
    --------
    >>> patients.lazy().select("age")
    """
    return frame


@method(RemoteFrame, "fetch")
def frame_fetch(ctx: Context, frame: RemoteFrame, wait: bool = True) -> FetchedTable | RequestStatus:
    """Run the query through the owner's policy and download what it releases.

    Aggregates over large enough groups come back at once; anything else
    waits for the owner's review (the cell shows the request's status).  A
    query the owner already approved comes back at once from the approved
    result, until the approval expires.

    Parameters
    ----------
    wait : bool, default True
        False: a result held for review is not waited for; the request's id
        and status come back at once, and ``request(id)`` fetches it later.

    Returns
    -------
    DataFrame or RequestStatus
        The released table and the executor's notes; with ``wait=False``,
        where a held request stands.

    Examples
    --------
    >>> patients.group_by("sex").agg(col("cost").mean()).fetch()
    """
    if not isinstance(wait, bool):
        raise SchemaError(f"fetch(wait=...) takes True or False, not {describe_value(wait)}")
    ctx.require_effects("fetch()")
    return fetch_plan(ctx.session, frame.plan, ctx.cell_text, wait)


def fetch_plan(session: Any, plan: dict, text: str, wait: bool = True) -> FetchedTable | RequestStatus:
    """``session.fetch`` of a plan; ``wait`` is passed only when False (a session's ``wait`` defaults to True,
    and sessions that never hold a result may leave it out)."""
    return session.fetch(plan, text) if wait else session.fetch(plan, text, wait=False)


@method(RemoteFrame, "save")
def frame_save(ctx: Context, frame: RemoteFrame, name: str) -> RemoteFrame:
    """Keep the result on the owner's side under a name (the policy is inherited).

    Parameters
    ----------
    name : str
        The name to save under; ``saved(name)`` reads it back.

    Returns
    -------
    RemoteFrame
        A frame reading the saved result.

    Examples
    --------
    >>> patients.filter(col("age") >= 18).save("adults")
    """
    check_name(name, "save()")
    ctx.require_effects("save()")
    ctx.session.save(frame.plan, name, ctx.cell_text)
    ctx.forget_remote_state()
    return RemoteFrame(P.frame_op("saved", name=name))


# --------------------------------------------------------------------------
# Frame properties (the executor computes the schema; nothing else is asked).

@prop(RemoteFrame, "columns")
def frame_columns(ctx: Context, frame: RemoteFrame) -> list[str]:
    """The column names.

    Returns
    -------
    list of str
        In order.

    Examples
    --------
    >>> patients.columns
    """
    return [name for name, _ in ctx.schema(frame.plan)]


@prop(RemoteFrame, "schema")
def frame_schema(ctx: Context, frame: RemoteFrame) -> dict[str, str]:
    """The column names and their data types.

    Returns
    -------
    dict
        ``{name: dtype}``, in order.

    Examples
    --------
    >>> patients.schema
    """
    return {name: dtype for name, dtype in ctx.schema(frame.plan)}


@prop(RemoteFrame, "dtypes")
def frame_dtypes(ctx: Context, frame: RemoteFrame) -> list[str]:
    """The data types of the columns.

    Returns
    -------
    list of str
        In column order.

    Examples
    --------
    >>> patients.dtypes
    """
    return [dtype for _, dtype in ctx.schema(frame.plan)]


@prop(RemoteFrame, "width")
def frame_width(ctx: Context, frame: RemoteFrame) -> int:
    """The number of columns.

    Returns
    -------
    int
        How many columns the frame has.

    Examples
    --------
    >>> patients.width
    """
    return len(ctx.schema(frame.plan))


def count_rows(ctx: Context, frame: RemoteFrame) -> Any:
    """The number of rows of a remote frame: a ``select(pl.len())`` fetched through the owner's policy."""
    ctx.require_effects("counting the rows of a remote frame")
    fetched = ctx.session.fetch(P.frame_op("select", input=frame.plan, exprs=[P.length()]), ctx.cell_text)
    table = fetched.frame if isinstance(fetched, FetchedTable) else None
    if table is None or tuple(table.shape) != (1, 1):
        raise SchemaError("the row count did not come back as one value")
    return table.item()


LENGTHS[RemoteFrame] = count_rows


@prop(RemoteFrame, "shape")
def frame_shape(ctx: Context, frame: RemoteFrame) -> tuple:
    """The number of rows and columns, as ``(rows, columns)``.

    The rows are counted by the owner's executor (a ``select(pl.len())``
    fetch, released as any aggregate, so it may wait for the owner's review);
    the columns come from the schema.

    Returns
    -------
    tuple of int
        ``(rows, columns)``.

    Examples
    --------
    >>> patients.shape
    """
    return (count_rows(ctx, frame), len(ctx.schema(frame.plan)))


# --------------------------------------------------------------------------
# Builtin functions that make frames or talk to the executor.

@function("dataset")
def fn_dataset(ctx: Context, name: str, mock: bool = False) -> RemoteFrame:
    """A dataset the owner opened to you, as a lazy remote frame (no data moves).

    Parameters
    ----------
    name : str
        The dataset's name (``datasets()`` lists them).
    mock : bool, default False
        True: the owner's mock of the dataset instead, made from public facts
        only (the schema, declared bounds and categories), never from the
        rows.  Every query of it comes back at once, row by row, without
        review or budget, and is marked as mock; drop ``mock=True`` to run
        the same code on the real data.

    Returns
    -------
    RemoteFrame
        A lazy frame scanning the dataset (or its mock).

    Examples
    --------
    >>> patients = dataset("patients")
    """
    check_name(name, "dataset()")
    if not isinstance(mock, bool):
        raise SchemaError(f"dataset(mock=...) takes True or False, not {describe_value(mock)}")
    known = [d.get("name") for d in ctx.datasets()]
    if name not in known:
        known = [d.get("name") for d in ctx.datasets(refresh=True)]
    if name not in known:
        raise SchemaError(f"no dataset named {name!r}{suggest(name, [k for k in known if isinstance(k, str)])}; "
                          "datasets() lists them")
    described = next(d for d in ctx.datasets() if d.get("name") == name)
    if mock:
        if not described.get("mock"):
            raise SchemaError(f"the owner published no mock of {name!r}; datasets() marks the datasets that have "
                              "one (the owner makes it with: bastion-owner dataset mock)", dataset=name)
        return RemoteFrame(P.scan(name, mock=True))
    if described.get("saved") is True:
        return RemoteFrame(P.frame_op("saved", name=name))  # one of your saved results
    return RemoteFrame(P.scan(name))


@function("saved")
def fn_saved(ctx: Context, name: str) -> RemoteFrame:
    """A result you kept earlier with ``.save(name)``, as a lazy remote frame.

    Parameters
    ----------
    name : str
        The name it was saved under.

    Returns
    -------
    RemoteFrame
        A lazy frame reading the saved result.

    Examples
    --------
    >>> adults = saved("adults")
    """
    return RemoteFrame(P.frame_op("saved", name=check_name(name, "saved()")))


@function("datasets")
def fn_datasets(ctx: Context) -> DatasetList:
    """The datasets you may query: names, schemas and policies.

    Returns
    -------
    DatasetList
        Shown as a table.

    Examples
    --------
    >>> datasets()
    """
    return DatasetList(ctx.datasets(refresh=not ctx.pure))


@function("concat")
def fn_concat(ctx: Context, items: list, how: str = "vertical") -> RemoteFrame:
    """Stack frames with the same columns on top of each other.

    Parameters
    ----------
    items : list of RemoteFrame
        The frames, in order.
    how : str, default "vertical"
        Only "vertical".

    Returns
    -------
    RemoteFrame
        A new lazy frame.

    Examples
    --------
    >>> concat([patients.filter(sex="F").head(5), patients.filter(sex="M").head(5)])
    """
    if how != "vertical":
        raise UnsupportedOperation(f"concat(how={how!r}) is not available; only how='vertical'")
    if not isinstance(items, (list, tuple)) or not items:
        raise SchemaError(f"concat() takes a non-empty list of frames, not {describe_value(items)}")
    plans = [_frame(item, "concat()").plan for item in items]
    return RemoteFrame(P.frame_op("concat", inputs=plans))


@function("sql")
def fn_sql(ctx: Context, query: str) -> RemoteFrame:
    """A SQL query over the datasets (by name), as a lazy remote frame.

    Parameters
    ----------
    query : str
        A SELECT statement.

    Returns
    -------
    RemoteFrame
        The same plan a DataFrame query would make.

    Examples
    --------
    >>> sql("SELECT diagnosis, COUNT(*) AS n FROM patients GROUP BY diagnosis").fetch()
    """
    if not isinstance(query, str):
        raise SchemaError(f"sql() takes the query as a string, not {describe_value(query)}")
    return RemoteFrame(sql_plan(ctx, query))


def sql_plan(ctx: Context, query: str) -> dict:
    """The plan of a SQL query, with the datasets' schemas as its tables."""
    from .sql import sql_to_plan  # imported when used: the SQL front end is a separate layer
    described = [d for d in ctx.datasets() if isinstance(d.get("name"), str)]
    tables = {d["name"]: d["schema"] for d in described}
    # The executor marks the scientist's own saved results (save/collect) with "saved": true.
    return sql_to_plan(query, tables, saved=[d["name"] for d in described if d.get("saved") is True])


@function("request")
def fn_request(ctx: Context, request_id: int) -> FetchedTable | RequestStatus:
    """An earlier request held for the owner's review: its status, or its result once approved.

    Parameters
    ----------
    request_id : int
        The id shown when the request was held.

    Returns
    -------
    FetchedTable or RequestStatus
        The released table, or where the request stands.

    Examples
    --------
    >>> request(12)
    """
    if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
        raise SchemaError(f"request() takes a request id (a whole number), not {describe_value(request_id)}")
    ctx.require_effects("request()")
    return ctx.session.request(request_id)
