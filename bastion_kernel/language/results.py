"""Fetched results: local polars frames the scientist keeps working with.

What the executor released belongs to the scientist.  A fetched result (a
:class:`~bastion_kernel.language.values.FetchedTable`, called ``DataFrame``
in the language) has the read-only polars operations people use on results;
each builds the same plan node a remote frame would and runs it in the kernel
with :mod:`bastion_kernel.contract.local`, on the released table only.  Nothing here
talks to the executor: no policy applies, nothing is audited, and the owner's
rows are never involved.

Files are written only into the notebook's working directory (the kernel's
current directory), under a relative name.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path, PurePath
from typing import Any

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.plan_text import text_of

from .errors import ExecutionError, SchemaError, UnsupportedOperation
from .expr import LENGTHS, check_name, combine_predicates, describe_value, to_node
from .frame import (RemoteFrame, _count, _exprs_with_names, _names, count_aggs, drop_columns, frame_columns,
                    frame_drop, frame_drop_nulls, frame_dtypes, frame_fill_null, frame_filter, frame_group_by,
                    frame_head, frame_join, frame_rename, frame_schema, frame_select, frame_shape, frame_slice,
                    frame_sort, frame_unique, frame_width, frame_with_columns, frame_with_row_index, group_by_len,
                    group_keys, join_fields, rename_mapping, slice_fields, sort_fields)
from .registry import Context, documented_like, method, prop
from .values import FetchedTable

# The scan names of local plans: the receiver, and the right-hand side of a join.
_THIS, _OTHER = "this", "other"


class LocalGroupBy:
    """``result.group_by(...)`` on a fetched result, waiting for ``.agg(...)``."""

    type_name = "LocalGroupBy"

    def __init__(self, table: FetchedTable, keys: list[dict]) -> None:
        self.table = table
        self.keys = keys

    def __repr__(self) -> str:
        return (f"LocalGroupBy over a fetched result (pending: call .agg(...)): "
                f"group_by({', '.join(text_of(k) for k in self.keys)})")


def released_frame(table: FetchedTable) -> Any:
    """The polars frame of a fetched result (refused when the reply carried no table)."""
    if table.frame is None:
        raise SchemaError("this result holds no table")
    return table.frame


def _run(table: FetchedTable, op: str, **fields: Any) -> FetchedTable:
    """Run one plan node over the fetched table, in the kernel."""
    from bastion_kernel.contract import local  # polars is imported when a local operation runs, not with the language
    plan = P.frame_op(op, input=P.scan(_THIS), **fields)
    return FetchedTable(frame=local.run(plan, {_THIS: released_frame(table)}), mock=table.mock)


def _fetched(value: Any, what: str) -> FetchedTable:
    if isinstance(value, FetchedTable):
        return value
    if isinstance(value, RemoteFrame):
        raise SchemaError(f"{what} on a fetched result takes another fetched result, not a remote frame; "
                          "fetch it first, or join the remote frames before fetching")
    raise SchemaError(f"{what} takes a fetched result (a DataFrame), not {describe_value(value)}")


LENGTHS[FetchedTable] = lambda ctx, table: released_frame(table).height


# --------------------------------------------------------------------------
# Operations that make a new local table.

@method(FetchedTable, "select")
@documented_like(frame_select, "Parameters")
def result_select(ctx: Context, table: FetchedTable, *exprs: Any, **named_exprs: Any) -> FetchedTable:
    """Choose or compute the output columns of a fetched result (in the kernel).

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("sex").agg(mean_cost=col("cost").mean()).fetch().select("sex", thousands=col("mean_cost") / 1000)
    """
    return _run(table, "select", exprs=_exprs_with_names(exprs, named_exprs, "select()"))


@method(FetchedTable, "with_columns")
@documented_like(frame_with_columns, "Parameters")
def result_with_columns(ctx: Context, table: FetchedTable, *exprs: Any, **named_exprs: Any) -> FetchedTable:
    """Add or replace columns of a fetched result, keeping the others (in the kernel).

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().with_columns(share=col("len") / col("len").sum())
    """
    return _run(table, "with_columns", exprs=_exprs_with_names(exprs, named_exprs, "with_columns()"))


@method(FetchedTable, "filter")
@documented_like(frame_filter, "Parameters")
def result_filter(ctx: Context, table: FetchedTable, *predicates: Any, **constraints: Any) -> FetchedTable:
    """Keep the rows of a fetched result where every condition holds (in the kernel).

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().filter(col("len") > 20)
    """
    return _run(table, "filter", predicate=combine_predicates(predicates, constraints, "filter()"))


@method(FetchedTable, "sort")
@documented_like(frame_sort, "Parameters")
def result_sort(ctx: Context, table: FetchedTable, by: Any, *more_by: Any,
                descending: bool | list = False, nulls_last: bool = False) -> FetchedTable:
    """Sort the rows of a fetched result (in the kernel).

    Returns
    -------
    DataFrame
        A new local table (rows that tie keep their order).

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().sort("len", descending=True)
    """
    return _run(table, "sort", **sort_fields(by, more_by, descending, nulls_last))


@method(FetchedTable, "head")
@documented_like(frame_head, "Parameters")
def result_head(ctx: Context, table: FetchedTable, n: int = 5) -> FetchedTable:
    """The first ``n`` rows of a fetched result.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().sort("len").head(3)
    """
    return _run(table, "head", n=_count(n, "head()"))


@method(FetchedTable, "tail")
@documented_like(frame_head, "Parameters")
def result_tail(ctx: Context, table: FetchedTable, n: int = 5) -> FetchedTable:
    """The last ``n`` rows of a fetched result.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().sort("len").tail(3)
    """
    count = _count(n, "tail()")
    return _run(table, "slice", offset=-count, length=count)


@method(FetchedTable, "limit")
@documented_like(frame_head, "Parameters")
def result_limit(ctx: Context, table: FetchedTable, n: int = 5) -> FetchedTable:
    """The first ``n`` rows of a fetched result (the same as ``head``).

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().limit(2)
    """
    return _run(table, "head", n=_count(n, "limit()"))


@method(FetchedTable, "slice")
@documented_like(frame_slice, "Parameters")
def result_slice(ctx: Context, table: FetchedTable, offset: int, length: int | None = None) -> FetchedTable:
    """The rows of a fetched result from ``offset`` on (negative: from the end), at most ``length`` of them.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().sort("len").slice(1, 2)
    """
    return _run(table, "slice", **slice_fields(offset, length))


@method(FetchedTable, "unique")
@documented_like(frame_unique, "Parameters")
def result_unique(ctx: Context, table: FetchedTable, subset: Any = None) -> FetchedTable:
    """Keep one row of a fetched result per distinct combination of values (the first one).

    Returns
    -------
    DataFrame
        A new local table, in the order of the rows kept.

    Examples
    --------
    >>> patients.group_by("sex", "diagnosis").agg(len()).fetch().unique("sex")
    """
    return _run(table, "unique", subset=None if subset is None else _names(subset, "unique()"))


@method(FetchedTable, "drop_nulls")
@documented_like(frame_drop_nulls, "Parameters")
def result_drop_nulls(ctx: Context, table: FetchedTable, subset: Any = None) -> FetchedTable:
    """Remove the rows of a fetched result that have a null value.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(col("cost").mean()).fetch().drop_nulls("cost")
    """
    return _run(table, "drop_nulls", subset=None if subset is None else _names(subset, "drop_nulls()"))


@method(FetchedTable, "fill_null")
@documented_like(frame_fill_null, "Parameters")
def result_fill_null(ctx: Context, table: FetchedTable, value: Any) -> FetchedTable:
    """Replace the nulls of a fetched result with a value (in the columns it fits, as polars does).

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(col("cost").mean()).fetch().fill_null(0.0)
    """
    return _run(table, "fill_null", value=to_node(value, "fill_null()"))


@method(FetchedTable, "with_row_index")
@documented_like(frame_with_row_index, "Parameters")
def result_with_row_index(ctx: Context, table: FetchedTable, name: str = "index") -> FetchedTable:
    """Add a column numbering the rows of a fetched result from 0.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().sort("len").with_row_index("rank")
    """
    return _run(table, "with_row_index", name=check_name(name, "with_row_index()"))


@method(FetchedTable, "rename")
@documented_like(frame_rename, "Parameters")
def result_rename(ctx: Context, table: FetchedTable, mapping: dict) -> FetchedTable:
    """Rename columns of a fetched result.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().rename({"len": "patients"})
    """
    return _run(table, "rename", mapping=rename_mapping(mapping))


@method(FetchedTable, "drop")
@documented_like(frame_drop, "Parameters")
def result_drop(ctx: Context, table: FetchedTable, *columns: Any) -> FetchedTable:
    """Remove columns of a fetched result.

    Returns
    -------
    DataFrame
        A new local table.

    Examples
    --------
    >>> patients.group_by("sex", "smoker").agg(len()).fetch().drop("smoker")
    """
    return _run(table, "drop", columns=drop_columns(columns))


@method(FetchedTable, "join")
@documented_like(frame_join, "Parameters")
def result_join(ctx: Context, table: FetchedTable, other: Any, on: Any = None, how: str = "inner",
                left_on: Any = None, right_on: Any = None, suffix: str = "_right") -> FetchedTable:
    """Join with another fetched result (in the kernel).

    Parameters
    ----------
    other : DataFrame
        The right-hand fetched result.

    Returns
    -------
    DataFrame
        A new local table; rows keep the order of the left side.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().join(patients.group_by("sex").agg(col("cost").mean()).fetch(), on="sex")
    """
    right = _fetched(other, "join()")
    from bastion_kernel.contract import local
    plan = P.frame_op("join", left=P.scan(_THIS), right=P.scan(_OTHER),
                      **join_fields(on, how, left_on, right_on, suffix))
    return FetchedTable(frame=local.run(plan, {_THIS: released_frame(table), _OTHER: released_frame(right)}),
                        mock=table.mock or right.mock)


@method(FetchedTable, "group_by")
@documented_like(frame_group_by, "Parameters")
def result_group_by(ctx: Context, table: FetchedTable, *by: Any, maintain_order: bool = False) -> LocalGroupBy:
    """Group the rows of a fetched result by keys; aggregate each group with ``.agg(...)`` (in the kernel).

    Parameters
    ----------
    maintain_order : bool, default False
        Accepted for polars code; the groups always come out in the order
        they first appear, so the same cell gives the same table.

    Returns
    -------
    LocalGroupBy
        Waiting for ``.agg(...)``.

    Examples
    --------
    >>> patients.group_by("sex", "diagnosis").agg(len()).fetch().group_by("sex").agg(col("len").sum())
    """
    if not isinstance(maintain_order, bool):
        raise SchemaError("group_by(): maintain_order must be True or False")
    return LocalGroupBy(table, group_keys(by))


@method(LocalGroupBy, "agg")
def local_group_by_agg(ctx: Context, grouped: LocalGroupBy, *aggs: Any, **named_aggs: Any) -> FetchedTable:
    """Aggregate each group of a fetched result (in the kernel).

    Parameters
    ----------
    *aggs : Expr or list of them
        Aggregations (``col("x").sum()``, ``len()``...).
    **named_aggs : Expr
        ``name=aggregation``.

    Returns
    -------
    DataFrame
        One row per group, in the order the groups first appear.

    Examples
    --------
    >>> patients.group_by("sex", "diagnosis").agg(len()).fetch().group_by("diagnosis").agg(total=col("len").sum())
    """
    return _run(grouped.table, "group_by", keys=grouped.keys,
                aggs=_exprs_with_names(aggs, named_aggs, "agg()"))


@method(LocalGroupBy, "len")
@documented_like(group_by_len, "Parameters")
def local_group_by_len(ctx: Context, grouped: LocalGroupBy, name: str | None = None) -> FetchedTable:
    """The number of rows in each group of a fetched result.

    Returns
    -------
    DataFrame
        One row per group.

    Examples
    --------
    >>> patients.group_by("sex", "diagnosis").agg(len()).fetch().group_by("sex").len()
    """
    return _run(grouped.table, "group_by", keys=grouped.keys, aggs=count_aggs(name))


# --------------------------------------------------------------------------
# Leaving the language: pandas and files.

@method(FetchedTable, "to_pandas")
def result_to_pandas(ctx: Context, table: FetchedTable) -> Any:
    """The fetched result as a pandas DataFrame (needs pandas in the kernel's environment).

    Returns
    -------
    pandas.DataFrame
        A copy of the table; without pandas installed, an error says so.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().to_pandas()
    """
    frame = released_frame(table)
    if importlib.util.find_spec("pandas") is None:
        raise UnsupportedOperation("to_pandas() needs pandas, which is not installed in the kernel's Python "
                                   "environment; install it there, or write the table with "
                                   "write_csv(...)/write_parquet(...) and read that file with pandas")
    return frame.to_pandas()


def notebook_file(file: Any, what: str) -> Path:
    """The path a fetched result may be written to: a relative name inside the working directory.

    Parameters
    ----------
    file : str
        What the scientist wrote, such as ``"counts.csv"`` or ``"out/counts.csv"``.
    what : str
        The operation, for messages.

    Returns
    -------
    pathlib.Path
        The resolved path, inside the kernel's current directory (the
        notebook's folder), in a folder that exists.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` for an absolute path, ``..``, a home
        directory (``~``) or any path that resolves outside the folder (a
        symbolic link pointing out of it, too); ``SchemaError`` for a name
        that is not a usable file name.
    """
    if not isinstance(file, str) or not file.strip():
        raise SchemaError(f"{what} takes a file name (a string), not {describe_value(file)}")
    if "\x00" in file or len(file) > 1024:
        raise SchemaError(f"{what}: not a usable file name")
    relative = PurePath(file)
    if relative.is_absolute() or file.startswith("~"):
        raise UnsupportedOperation(f"{what} writes into the notebook's folder only; give a relative file name "
                                   f"such as 'result.csv', not {file!r:.200}")
    if ".." in relative.parts:
        raise UnsupportedOperation(f"{what} writes into the notebook's folder only; '..' is not allowed in "
                                   f"{file!r:.200}")
    folder = Path.cwd().resolve()
    target = (folder / relative).resolve()
    if target == folder or not target.is_relative_to(folder):
        raise UnsupportedOperation(f"{what} writes into the notebook's folder only; {file!r:.200} leads out of it")
    if target.is_dir():
        raise SchemaError(f"{what}: {file!r:.200} is a folder; give a file name")
    if not target.parent.is_dir():
        raise SchemaError(f"{what}: the folder of {file!r:.200} does not exist")
    return target


def _write(ctx: Context, table: FetchedTable, file: Any, what: str, kind: str) -> None:
    ctx.require_effects(what)
    frame = released_frame(table)
    target = notebook_file(file, what)
    try:
        if kind == "csv":
            frame.write_csv(target)
        else:
            frame.write_parquet(target)
    except OSError as exc:
        raise ExecutionError(f"{what}: could not write {file!r:.200}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - polars' own errors, e.g. a type CSV cannot hold
        raise ExecutionError(f"{what}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc!r}") \
            from None


@method(FetchedTable, "write_csv")
def result_write_csv(ctx: Context, table: FetchedTable, file: str) -> None:
    """Write the fetched result to a CSV file in the notebook's folder.

    Parameters
    ----------
    file : str
        A relative file name inside the notebook's folder (an absolute path,
        ``..`` or a link leading out of the folder is refused).

    Returns
    -------
    None
        The file is written (and replaced if it existed).

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().write_csv("counts_by_sex.csv")
    """
    _write(ctx, table, file, "write_csv()", "csv")


@method(FetchedTable, "write_parquet")
@documented_like(result_write_csv, "Parameters", "Returns")
def result_write_parquet(ctx: Context, table: FetchedTable, file: str) -> None:
    """Write the fetched result to a Parquet file in the notebook's folder.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().write_parquet("counts_by_sex.parquet")
    """
    _write(ctx, table, file, "write_parquet()", "parquet")


# --------------------------------------------------------------------------
# Properties.

@prop(FetchedTable, "shape")
@documented_like(frame_shape, "Returns")
def result_shape(ctx: Context, table: FetchedTable) -> tuple:
    """The number of rows and columns of the fetched result.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().shape
    """
    return tuple(released_frame(table).shape)


@prop(FetchedTable, "height")
def result_height(ctx: Context, table: FetchedTable) -> int:
    """The number of rows of the fetched result (the same as ``len(result)``).

    Returns
    -------
    int
        How many rows the table has.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len()).fetch().height
    """
    return released_frame(table).height


@prop(FetchedTable, "width")
@documented_like(frame_width, "Returns")
def result_width(ctx: Context, table: FetchedTable) -> int:
    """The number of columns of the fetched result.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().width
    """
    return released_frame(table).width


@prop(FetchedTable, "columns")
@documented_like(frame_columns, "Returns")
def result_columns(ctx: Context, table: FetchedTable) -> list[str]:
    """The column names of the fetched result.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().columns
    """
    return list(released_frame(table).columns)


@prop(FetchedTable, "schema")
@documented_like(frame_schema, "Returns")
def result_schema(ctx: Context, table: FetchedTable) -> dict[str, str]:
    """The column names and data types of the fetched result.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().schema
    """
    return {name: str(dtype) for name, dtype in released_frame(table).schema.items()}


@prop(FetchedTable, "dtypes")
@documented_like(frame_dtypes, "Returns")
def result_dtypes(ctx: Context, table: FetchedTable) -> list[str]:
    """The data types of the columns of the fetched result.

    Examples
    --------
    >>> patients.group_by("sex").agg(len()).fetch().dtypes
    """
    return [str(dtype) for dtype in released_frame(table).dtypes]


@method(FetchedTable, "item")
def result_item(ctx: Context, table: FetchedTable) -> Any:
    """The one value of a fetched result with one row and one column.

    Returns
    -------
    int, float, str, bool or None
        The value.

    Examples
    --------
    >>> patients.select(pl.len()).fetch().item()
    """
    frame = released_frame(table)
    if tuple(frame.shape) != (1, 1):
        raise SchemaError(f"item() needs a table of one row and one column; this one has shape {frame.shape}")
    value = frame.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SchemaError(f"item(): the value is {type(value).__name__}, which the language has no literal for; "
                      "cast the column to a number or a string first")
