"""Python and pandas habits: what they mean in Bastion, and the Bastion way when they do not apply.

A new user types what works in a Python notebook: ``import polars as pl``,
``print(df)``, ``len(df)``, ``df.shape``, ``df.groupby(...)``.  The ones
that fit the language work (``import polars``, ``print``, ``display``;
``len`` and ``shape`` live with the frames); for the others, the refusal
gives the Bastion way from the curated tables here, before any edit-distance
guess (which would answer ``df.iloc`` with something merely spelled alike).
"""
from __future__ import annotations

import ast
from typing import Any

from .errors import SchemaError, UnsupportedOperation
from .namespaces import POLARS_MODULE, polars_attribute
from .registry import Context, function
from .values import Printed

# Modules an import statement may name: each binds the language's own value.
IMPORTABLE: dict[str, Any] = {"polars": POLARS_MODULE}

MODULE_HINTS: dict[str, str] = {
    "pandas": "a fetched result has .to_pandas(), and .write_csv(...) / .write_parquet(...) save it for pandas",
    "numpy": "compute with expressions instead: col(\"x\").log(), .sqrt(), .round(2), .clip(0, 10)",
    "polars.selectors": "name the columns: select(\"a\", \"b\") or col(\"a\", \"b\")",
    "matplotlib": "charts are frame.plot.bar(...), .hist(...), .line(...), .box(...), .heatmap(...)",
    "seaborn": "charts are frame.plot.bar(...), .hist(...), .line(...), .box(...), .heatmap(...)",
    "plotly": "charts are frame.plot.bar(...), .hist(...), .line(...), .box(...), .heatmap(...)",
    "IPython": "display(x) and print(x) are built in",
}

# Unknown names: the Python habit -> the Bastion way.
NAME_HINTS: dict[str, str] = {
    "type": "x? shows what x is (a frame's schema and policy, an expression's plan)",
    "dir": "type x. and press Tab to list what x offers, or x? for its help",
    "help": "x? (or Shift+Tab on x) shows its help; x?? shows more",
    "list": "frame.columns is already a list of names; rows come back with .fetch()",
    "pd": "pandas is not part of the language; a fetched result has .to_pandas()",
    "np": "numpy is not part of the language; use expressions: col(\"x\").log(), .sqrt(), .round(2)",
    "plt": "charts are frame.plot.bar(...), .hist(...), .line(...), .box(...), .heatmap(...)",
    "range": "there are no loops; a frame operation works on every row at once",
    "sum": "col(\"x\").sum() inside select(...) or group_by(...).agg(...)",
    "min": "col(\"x\").min() inside select(...) or group_by(...).agg(...)",
    "max": "col(\"x\").max() inside select(...) or group_by(...).agg(...)",
    "round": "col(\"x\").round(2)",
    "abs": "col(\"x\").abs()",
    "sorted": "frame.sort(\"x\")",
    "open": "a fetched result is written with .write_csv(\"file.csv\") or .write_parquet(\"file.parquet\")",
    "exec": "cells run no Python; they are polars-shaped queries",
    "eval": "cells run no Python; they are polars-shaped queries",
    "input": "cells take no input; assign values to names (n = 10)",
    "isinstance": "x? shows what x is",
    "DataFrame": "tables come from dataset(\"NAME\") (remote) or from .fetch() (a local DataFrame)",
}

_PYTHON_FUNCTIONS = "no Python function runs on the owner's data; write it as an expression (col(...) * 2, " \
                    ".str..., when(...).then(...).otherwise(...))"
_FETCH_FIRST = "fetch the result first: frame.fetch().{name}(...) works on the released table"

_FRAME_HINTS: dict[str, str] = {
    "iloc": "rows by position: .head(n), .slice(offset, n); columns: .select(\"a\", \"b\")",
    "loc": "rows by condition: .filter(col(\"x\") > 1); columns: .select(\"a\", \"b\")",
    "groupby": ".group_by(\"x\").agg(...) (polars' spelling)",
    "apply": _PYTHON_FUNCTIONS, "applymap": _PYTHON_FUNCTIONS, "map": _PYTHON_FUNCTIONS,
    "map_elements": _PYTHON_FUNCTIONS, "map_rows": _PYTHON_FUNCTIONS, "map_batches": _PYTHON_FUNCTIONS,
    "pipe": _PYTHON_FUNCTIONS, "transform": _PYTHON_FUNCTIONS,
    "value_counts": ".group_by(\"x\").agg(pl.len()) counts the rows of each value",
    "merge": ".join(other, on=\"key\", how=\"left\")",
    "sort_values": ".sort(\"x\", descending=True)",
    "dropna": ".drop_nulls()", "fillna": ".fill_null(value)", "drop_duplicates": ".unique()",
    "nunique": ".select(col(\"x\").n_unique())",
    "isnull": ".select(col(\"x\").is_null())", "isna": ".select(col(\"x\").is_null())",
    "null_count": ".select(col(\"x\").null_count())",
    "query": ".filter(col(\"x\") > 1)", "assign": ".with_columns(name=expression)",
    "agg": ".select(col(\"x\").mean(), ...) for the whole frame, or .group_by(...).agg(...)",
    "mean": ".select(col(\"x\").mean()) (or col(\"a\", \"b\").mean() for several columns)",
    "sum": ".select(col(\"x\").sum())", "min": ".select(col(\"x\").min())", "max": ".select(col(\"x\").max())",
    "median": ".select(col(\"x\").median())", "std": ".select(col(\"x\").std())", "var": ".select(col(\"x\").var())",
    "reset_index": "frames have no index; .with_row_index(\"index\") adds a row number",
    "set_index": "frames have no index; .with_row_index(\"index\") adds a row number",
    "index": "frames have no index; .with_row_index(\"index\") adds a row number",
    "info": ".schema lists the columns and their types",
    "T": "transposing turns values into column names, which the language does not do",
    "transpose": "transposing turns values into column names, which the language does not do",
    "pivot": "pivoting turns values into column names; group_by(\"a\", \"b\").agg(...) gives the same numbers",
    "len": "len(frame)",
    "size": "frame.shape is (rows, columns)",
}

ATTRIBUTE_HINTS: dict[str, dict[str, str]] = {
    "RemoteFrame": {
        **_FRAME_HINTS,
        "height": "len(frame) counts the rows through the owner's policy",
        "tail": ".slice(-n) takes the last rows; or fetch first and call .tail(n) on the result",
        "show": "end the cell with frame.fetch(), or display(frame.fetch())",
        **{name: _FETCH_FIRST.format(name=name) for name in (
            "to_pandas", "write_csv", "write_parquet", "item", "to_dicts", "rows", "to_numpy", "to_arrow")},
        "to_csv": "fetch the result first: frame.fetch().write_csv(\"file.csv\")",
        "to_parquet": "fetch the result first: frame.fetch().write_parquet(\"file.parquet\")",
        "to_excel": "fetch the result first: frame.fetch().write_csv(\"file.csv\")",
    },
    "DataFrame": {
        **_FRAME_HINTS,
        "to_csv": ".write_csv(\"file.csv\") (into the notebook's folder)",
        "to_parquet": ".write_parquet(\"file.parquet\") (into the notebook's folder)",
        "to_excel": ".write_csv(\"file.csv\") (into the notebook's folder)",
        "fetch": "this is already a fetched result (a local DataFrame)",
        "collect": "this is already a fetched result (a local DataFrame)",
        "lazy": "this is already a fetched result (a local DataFrame); its operations run at once",
        "save": "save(name) keeps a remote frame on the owner's side; write a fetched result with .write_csv(...)",
        "plot": "charts are computed by the owner's executor: dataset(\"NAME\").plot.bar(...)",
        "describe": "describe() runs on a remote frame, by the owner's executor: dataset(\"NAME\").describe()",
        "iloc": "rows by position: .head(n), .tail(n), .slice(offset, n); columns: .select(\"a\", \"b\")",
    },
    "GroupBy": {
        "mean": ".agg(col(\"x\").mean())", "sum": ".agg(col(\"x\").sum())", "count": ".agg(pl.len())",
        "size": ".len() or .agg(pl.len())", "apply": _PYTHON_FUNCTIONS, "aggregate": ".agg(...)",
    },
    "LocalGroupBy": {
        "mean": ".agg(col(\"x\").mean())", "sum": ".agg(col(\"x\").sum())", "count": ".agg(pl.len())",
        "size": ".len() or .agg(pl.len())", "apply": _PYTHON_FUNCTIONS, "aggregate": ".agg(...)",
    },
    "Expr": {
        "isnull": ".is_null()", "isna": ".is_null()", "notnull": ".is_not_null()", "notna": ".is_not_null()",
        "isin": ".is_in([...])", "astype": ".cast(pl.Int64) (or int, float, str, bool)",
        "between": ".is_between(low, high)", "nunique": ".n_unique()", "fillna": ".fill_null(value)",
        "value_counts": "frame.group_by(\"x\").agg(pl.len()) counts the rows of each value",
        "apply": _PYTHON_FUNCTIONS, "map": _PYTHON_FUNCTIONS, "map_elements": _PYTHON_FUNCTIONS,
        "map_batches": _PYTHON_FUNCTIONS,
        "lower": ".str.to_lowercase()", "upper": ".str.to_uppercase()", "contains": ".str.contains(\"text\")",
        "startswith": ".str.starts_with(\"text\")", "endswith": ".str.ends_with(\"text\")",
        "year": ".dt.year()", "month": ".dt.month()", "day": ".dt.day()",
        "name": ".alias(\"new_name\")", "rename": ".alias(\"new_name\")",
    },
    "Expr.str": {
        "lower": ".to_lowercase()", "upper": ".to_uppercase()", "len": ".len_chars()",
        "strip": ".strip_chars()", "startswith": ".starts_with(\"text\")", "endswith": ".ends_with(\"text\")",
        "lengths": ".len_chars()", "n_chars": ".len_chars()",
    },
    "Expr.dt": {"dayofweek": ".weekday()", "day_of_week": ".weekday()", "date": ".truncate(\"1d\")"},
    "pl": {
        "DataFrame": NAME_HINTS["DataFrame"], "LazyFrame": NAME_HINTS["DataFrame"],
        "read_csv": "the owner publishes datasets: dataset(\"NAME\")", "scan_csv": "the owner publishes datasets: dataset(\"NAME\")",
        "read_parquet": "the owner publishes datasets: dataset(\"NAME\")",
        "scan_parquet": "the owner publishes datasets: dataset(\"NAME\")",
        "all": "name the columns: col(\"a\", \"b\")", "exclude": "name the columns, or .drop(\"x\")",
        "count": "pl.len() counts rows", "Utf8": "pl.String",
    },
}


def name_hint(name: str) -> str:
    """``"; the Bastion way"`` for a Python habit used as a name, or ``""``."""
    hint = NAME_HINTS.get(name)
    return f"; in Bastion: {hint}" if hint else ""


def attribute_hint(type_name: str, name: str) -> str:
    """``"; the Bastion way"`` for a pandas/polars habit used as an attribute of ``type_name``, or ``""``."""
    hint = ATTRIBUTE_HINTS.get(type_name, {}).get(name)
    return f"; in Bastion: {hint}" if hint else ""


# --------------------------------------------------------------------------
# import statements.

def import_bindings(node: ast.Import | ast.ImportFrom) -> list[tuple[str, Any]]:
    """The ``(name, value)`` pairs an import statement binds; only ``polars`` may be imported.

    ``import polars as pl`` and ``import polars`` bind the language's own
    ``pl``; ``from polars import col, lit`` binds those functions.  Any other
    module is refused, naming it.

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` naming the module (or the name) refused.
    """
    if isinstance(node, ast.Import):
        bindings = []
        for alias in node.names:
            bindings.append((alias.asname or alias.name.partition(".")[0], _module(alias.name)))
        return bindings
    module = "." * (node.level or 0) + (node.module or "")
    _module(module)
    bindings = []
    for alias in node.names:
        if alias.name == "*":
            raise UnsupportedOperation(f"from {module} import * is not available; import the names you use "
                                       "(from polars import col, lit) or write pl.col(...)")
        bindings.append((alias.asname or alias.name, polars_attribute(alias.name)))
    return bindings


def _module(name: str) -> Any:
    if name in IMPORTABLE:
        return IMPORTABLE[name]
    top = name.partition(".")[0]
    hint = MODULE_HINTS.get(name) or MODULE_HINTS.get(top)
    raise UnsupportedOperation(f"import {name}: Bastion cells run no Python modules; only `import polars as pl` "
                               "is accepted (it names the language's own pl)"
                               + (f"; in Bastion: {hint}" if hint else ""), name=name)


# --------------------------------------------------------------------------
# print and display.

@function("print")
def fn_print(ctx: Context, *values: Any, sep: str = " ", end: str = "\n") -> None:
    """Show values as text in the cell's output, as Python's ``print`` does.

    A fetched result is shown as polars prints it; a remote frame as its
    plan (nothing is fetched).

    Parameters
    ----------
    *values : any
        What to show.
    sep : str, default " "
        Written between the values.
    end : str, default "\\n"
        Written after the last value.

    Returns
    -------
    None
        The text goes to the cell's output at once.

    Examples
    --------
    >>> print(patients.columns)
    """
    if not isinstance(sep, str) or not isinstance(end, str):
        raise SchemaError("print(): sep and end must be strings")
    ctx.emit("stream", Printed(list(values), sep, end))


@function("display")
def fn_display(ctx: Context, *values: Any) -> None:
    """Show values in the cell's output as the cell's result would be shown (tables as tables).

    Parameters
    ----------
    *values : any
        What to show, each as its own output.

    Returns
    -------
    None
        The values go to the cell's output at once.

    Examples
    --------
    >>> display(datasets())
    """
    for value in values:
        ctx.emit("display", value)


__all__ = ["IMPORTABLE", "NAME_HINTS", "ATTRIBUTE_HINTS", "name_hint", "attribute_hint", "import_bindings"]
