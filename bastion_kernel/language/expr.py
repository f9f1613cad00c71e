"""Expressions of the language: ``col``, ``lit``, ``len``, ``when`` and their methods.

An :class:`Expr` wraps expression dicts of :mod:`bastion_kernel.contract.plan` (one,
or several for ``col("a", "b")``, which polars expands in a frame context).
Every expression function of :data:`bastion_kernel.contract.plan.EXPR_FUNCTIONS` is a
method here, generated from the spec table plus a documentation table, so the
plan format stays the single source of what exists.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from bastion_kernel.contract import plan as P
from bastion_kernel.contract.plan_text import text_of as render_expr

from .errors import LimitExceeded, SchemaError, UnsupportedOperation
from .registry import Context, documented_like, function, method

SCALAR_TYPES = (str, int, float, bool, type(None))


class DType:
    """A cast target: ``pl.Int64``, ``pl.String``... or ``int``/``float``/``str``/``bool``."""

    type_name = "DataType"

    def __init__(self, name: str, spelled: str | None = None) -> None:
        self.name = name
        self.spelled = spelled or f"pl.{name}"

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


DTYPE_VALUES: dict[str, DType] = {name: DType(name) for name in P.DTYPES}
# Python's type names, as polars accepts them for cast().
PYTHON_TYPE_TARGETS: dict[str, DType] = {
    "int": DType("Int64", "int"), "float": DType("Float64", "float"),
    "str": DType("String", "str"), "bool": DType("Boolean", "bool"),
}


def check_plan_size(node: dict) -> dict:
    """Refuse an expression or frame tree larger than the executor accepts.

    Walks at most ``MAX_PLAN_NODES`` nodes, so a tree built by doubling
    (``e = e + e`` repeated) is refused quickly instead of exploding later.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if "op" in item or "expr" in item:
                count += 1
                if count > P.MAX_PLAN_NODES:
                    raise LimitExceeded(f"the query has more than {P.MAX_PLAN_NODES} plan nodes")
                if depth > P.MAX_PLAN_DEPTH:
                    raise LimitExceeded(f"the query nests deeper than {P.MAX_PLAN_DEPTH} levels")
                depth += 1
            stack.extend((v, depth) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth) for v in item if isinstance(v, (dict, list)))
    return node


class Expr:
    """A lazy column expression (polars-shaped); ``nodes`` holds its plan dicts."""

    type_name = "Expr"

    def __init__(self, node: dict) -> None:
        self.nodes: tuple[dict, ...] = (check_plan_size(node),)

    @classmethod
    def several(cls, nodes: list[dict]) -> "Expr":
        if len(nodes) == 1:
            return cls(nodes[0])
        made = cls.__new__(cls)
        made.nodes = tuple(check_plan_size(n) for n in nodes)
        return made

    @property
    def node(self) -> dict:
        """The one expression dict; refused for a multi-column expression."""
        if len(self.nodes) != 1:
            names = ", ".join(render_expr(n) for n in self.nodes)
            raise SchemaError(f"this expression stands for several columns ({names}); "
                              "only a single-column expression fits here")
        return self.nodes[0]

    def map(self, build: Callable[[dict], dict]) -> "Expr":
        """Apply a node builder to each column (what polars does for ``col("a", "b")``)."""
        return Expr.several([build(n) for n in self.nodes])

    def __repr__(self) -> str:
        return f"<Expr {', '.join(render_expr(n) for n in self.nodes)}>"


class ExprNamespace:
    """Base of ``expr.str`` and ``expr.dt``: methods that apply to ``self.expr``."""

    type_name = "Namespace"

    def __init__(self, expr: Expr) -> None:
        self.expr = expr


class When:
    """``when(condition)`` waiting for its ``.then(value)``."""

    type_name = "When"

    def __init__(self, branches: list[tuple[dict, dict]], condition: dict) -> None:
        self.branches = branches
        self.condition = condition

    def __repr__(self) -> str:
        done = "".join(f".when({render_expr(c)}).then({render_expr(t)})" for c, t in self.branches)
        start = done[1:] if done else ""
        head = f"{start}.when" if start else "when"
        return f"<When {head}({render_expr(self.condition)}) waiting for .then(...)>"


class Then(Expr):
    """``when(...).then(...)``: an expression (null otherwise) that may chain on."""

    type_name = "Then"

    def __init__(self, branches: list[tuple[dict, dict]]) -> None:
        super().__init__(P.when(branches, None))
        self.branches = branches


# --------------------------------------------------------------------------
# Converting the scientist's values to expression dicts.

def describe_value(value: Any) -> str:
    """A short name for a value's type in error messages."""
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r:.40}"
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__}"
    if isinstance(value, dict):
        return "a dict"
    name = getattr(type(value), "type_name", type(value).__name__)
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name}"


def literal_node(value: Any) -> dict:
    """``lit`` of a JSON scalar; refuses NaN/infinity and non-scalars."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"the literal {value!r} cannot be sent in a plan")
    if not isinstance(value, SCALAR_TYPES):
        raise SchemaError(f"{describe_value(value)} is not a literal (a number, string, bool or None)")
    return P.lit(value)


def to_node(value: Any, what: str, str_as: str = "lit") -> dict:
    """One expression dict from an Expr or a scalar.

    ``str_as`` says what a bare string means at this place: a literal
    (``"lit"``, polars' rule in comparisons) or a column name (``"col"``,
    polars' rule in ``select``, ``group_by``, ``is_between``...).
    """
    if isinstance(value, Expr):
        return value.node
    if isinstance(value, str) and str_as == "col":
        return P.col(check_name(value, what))
    if isinstance(value, SCALAR_TYPES):
        return literal_node(value)
    raise SchemaError(f"{what} takes an expression or a literal, not {describe_value(value)}")


def to_nodes(values: Any, what: str, str_as: str = "col") -> list[dict]:
    """Expression dicts from several values, flattening lists and multi-column Exprs."""
    out: list[dict] = []
    items = values if isinstance(values, (list, tuple)) else [values]
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(to_nodes(item, what, str_as))
        elif isinstance(item, Expr):
            out.extend(item.nodes)
        else:
            out.append(to_node(item, what, str_as))
    return out


def check_name(value: Any, what: str) -> str:
    """A column or output name: a non-empty string of bounded length."""
    if not isinstance(value, str):
        raise SchemaError(f"{what} takes a name (a string), not {describe_value(value)}")
    if not value or len(value) > P.MAX_NAME_LENGTH:
        raise SchemaError(f"{what}: a name must have 1 to {P.MAX_NAME_LENGTH} characters")
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------
# Parameters of expression functions, by their plan.PARAM_TYPES type.

# Where polars reads a bare string as a column name in an expression argument.
STR_AS_COLUMN = {("is_between", "lower_bound"), ("is_between", "upper_bound"), ("pow", "exponent"),
                 ("sort_by", "by"), ("filter", "predicate"), ("repeat_by", "by"), ("over", "partition_by")}


def check_param(fn_name: str, param: str, ptype: str, value: Any) -> Any:
    """The plan value for one argument, or a SchemaError saying what fits."""
    label = f"{fn_name}() argument {param!r}"
    if ptype == "expr":
        return to_node(value, label, "col" if (fn_name, param) in STR_AS_COLUMN else "lit")
    if ptype == "exprs":
        nodes = to_nodes(value, label, "col")
        if not nodes:
            raise SchemaError(f"{label} needs at least one column or expression")
        return nodes
    if ptype == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SchemaError(f"{label} must be a whole number, not {describe_value(value)}")
    if ptype == "number" or (ptype == "optional_number" and value is not None):
        if is_number(value) and math.isfinite(value):
            return value
        raise SchemaError(f"{label} must be a number, not {describe_value(value)}")
    if ptype == "str" or (ptype == "optional_str" and value is not None):
        if isinstance(value, str):
            return value
        raise SchemaError(f"{label} must be a string, not {describe_value(value)}")
    if ptype in ("optional_str", "optional_number"):
        return None
    if ptype == "bool":
        if isinstance(value, bool):
            return value
        raise SchemaError(f"{label} must be True or False, not {describe_value(value)}")
    if ptype == "dtype":
        if isinstance(value, DType):
            return value.name
        raise SchemaError(f"{label} must be a data type such as pl.Int64, pl.Float64, pl.String "
                          f"or int/float/str/bool, not {describe_value(value)}")
    if ptype == "literal_list":
        if isinstance(value, (list, tuple)):
            return [literal_node(v)["value"] for v in value]
        raise SchemaError(f"{label} must be a list of literal values, not {describe_value(value)}")
    if ptype == "interval":
        if isinstance(value, str) and P.INTERVAL.match(value):
            return value
        raise SchemaError(f"{label} must be an interval such as '1d', '1mo' or '1y', not {describe_value(value)}")
    if ptype == "closed":
        if value in P.CLOSED_VALUES:
            return value
        raise SchemaError(f"{label} must be one of {', '.join(repr(c) for c in P.CLOSED_VALUES)}")
    raise UnsupportedOperation(f"{label} has an unknown type {ptype!r}")  # a plan.py table the language does not know


# --------------------------------------------------------------------------
# Documentation of the expression functions: (summary, {param: text}, example).
# The examples are Bastion-language cells over the demo's patients table.

FUNCTION_DOCS: dict[str, tuple[str, dict[str, str], str]] = {
    "sum": ("Sum of the values in each group.", {}, 'patients.group_by("sex").agg(col("cost").sum())'),
    "mean": ("Mean of the values in each group.", {}, 'patients.group_by("diagnosis").agg(col("cost").mean())'),
    "median": ("Median of the values in each group.", {}, 'patients.select(col("age").median())'),
    "min": ("Smallest value in each group.", {}, 'patients.group_by("sex").agg(col("age").min())'),
    "max": ("Largest value in each group.", {}, 'patients.group_by("sex").agg(col("age").max())'),
    "std": ("Standard deviation in each group.", {"ddof": "Delta degrees of freedom (1: sample)."},
            'patients.group_by("sex").agg(col("cost").std())'),
    "var": ("Variance in each group.", {"ddof": "Delta degrees of freedom (1: sample)."},
            'patients.select(col("cost").var(ddof=0))'),
    "quantile": ("A quantile of the values in each group.",
                 {"quantile": "Between 0.0 and 1.0.",
                  "interpolation": "'nearest', 'higher', 'lower', 'midpoint' or 'linear'."},
                 'patients.select(col("cost").quantile(0.9))'),
    "count": ("Number of non-null values in each group.", {}, 'patients.group_by("sex").agg(col("smoker").count())'),
    "len": ("Number of values (nulls included) in each group.", {}, 'patients.select(col("cost").len())'),
    "n_unique": ("Number of distinct values in each group.", {}, 'patients.select(col("zip").n_unique())'),
    "null_count": ("Number of null values in each group.", {}, 'patients.select(col("cost").null_count())'),
    "first": ("First value of each group (an individual value: reviewed by the owner).", {},
              'patients.group_by("sex").agg(col("age").first())'),
    "last": ("Last value of each group (an individual value: reviewed by the owner).", {},
             'patients.group_by("sex").agg(col("age").last())'),
    "mode": ("Most frequent value(s) of each group (individual values: reviewed by the owner).", {},
             'patients.select(col("diagnosis").mode())'),
    "implode": ("All values of each group as one list (individual values: reviewed by the owner).", {},
                'patients.group_by("zip").agg(col("age").implode())'),
    "head": ("The first n values of each group, as a list (individual values: reviewed by the owner).",
             {"n": "Number of values."}, 'patients.group_by("zip").agg(col("age").head(3))'),
    "tail": ("The last n values of each group, as a list (individual values: reviewed by the owner).",
             {"n": "Number of values."}, 'patients.group_by("zip").agg(col("age").tail(3))'),
    "unique": ("The distinct values of each group, as a list (individual values: reviewed by the owner).", {},
               'patients.group_by("sex").agg(col("diagnosis").unique())'),
    "sort_by": ("The values ordered by another expression; use it inside an aggregation, for example "
                "sort_by(...).first() (an individual value: reviewed by the owner).",
                {"by": "The expression (a bare string is a column) to order by.",
                 "descending": "Largest first."},
                'patients.group_by("zip").agg(col("age").sort_by("cost").first())'),
    "filter": ("Only the values where a condition holds; use it inside an aggregation. Only the rows that pass "
               "count as contributors to the aggregate.", {"predicate": "A boolean expression."},
               'patients.group_by("sex").agg(col("cost").filter(col("smoker")).mean())'),
    "repeat_by": ("Each value repeated n times, as a list (n is capped at 1000; null or negative: none). "
                  "Exploding the list does not make one person count as many.",
                  {"by": "How many times: a whole number or an expression (a bare string is a column)."},
                  'patients.with_columns(col("age").repeat_by(2)).explode("age").group_by("sex").agg(len())'),
    "over": ("A window function: the expression computed within each row's partition and broadcast to its rows. "
             "A result that uses it is row-level (reviewed by the owner), also after a later aggregation.",
             {"partition_by": "The column name(s) or expression(s) that define the partitions."},
             'patients.with_columns(col("cost").mean().over("diagnosis").alias("mean_cost"))'),
    "is_null": ("True where the value is null.", {}, 'patients.filter(col("cost").is_null())'),
    "is_not_null": ("True where the value is not null.", {}, 'patients.filter(col("cost").is_not_null())'),
    "is_in": ("True where the value is one of a list of literals.", {"other": "A list of literal values."},
              'patients.filter(col("diagnosis").is_in(["asthma", "influenza"]))'),
    "is_between": ("True where the value lies between two bounds.",
                   {"lower_bound": "Lower bound: a literal or an expression (a bare string is a column).",
                    "upper_bound": "Upper bound: a literal or an expression (a bare string is a column).",
                    "closed": "Which bounds are included: 'both', 'left', 'right' or 'none'."},
                   'patients.filter(col("age").is_between(18, 65))'),
    "fill_null": ("Replace nulls with a value.", {"value": "A literal or an expression."},
                  'patients.with_columns(col("cost").fill_null(0.0))'),
    "cast": ("Convert to another data type.",
             {"dtype": "pl.Int64, pl.Float64, pl.String, pl.Boolean, pl.Date... or int, float, str, bool.",
              "strict": "Raise on values that do not convert (False: make them null)."},
             'patients.select(col("age").cast(pl.Float64))'),
    "round": ("Round to a number of decimals.", {"decimals": "Number of decimals."},
              'patients.select(col("cost").round(1))'),
    "abs": ("Absolute value.", {}, 'patients.select((col("cost") - 1000).abs())'),
    "clip": ("Limit values to a range.", {"lower_bound": "Smallest value kept (None: no limit).",
                                         "upper_bound": "Largest value kept (None: no limit)."},
             'patients.select(col("age").clip(18, 90))'),
    "log": ("Logarithm.", {"base": "The base (default e)."}, 'patients.select(col("cost").log(10))'),
    "exp": ("Exponential.", {}, 'patients.select(col("length_of_stay").exp())'),
    "sqrt": ("Square root.", {}, 'patients.select(col("cost").sqrt())'),
    "pow": ("Raise to a power.", {"exponent": "A literal number; an exponent computed from a column or the row "
                                              "index is refused (it could pack many people's values)."},
            'patients.select(col("age").pow(2))'),
    "str.len_chars": ("Number of characters of each string.", {}, 'patients.select(col("diagnosis").str.len_chars())'),
    "str.to_lowercase": ("Lowercase each string.", {}, 'patients.select(col("sex").str.to_lowercase())'),
    "str.to_uppercase": ("Uppercase each string.", {}, 'patients.select(col("diagnosis").str.to_uppercase())'),
    "str.contains": ("True where the string matches a pattern.",
                     {"pattern": "A regular expression (or plain text with literal=True).",
                      "literal": "Treat the pattern as plain text."},
                     'patients.filter(col("diagnosis").str.contains("itis"))'),
    "str.starts_with": ("True where the string starts with a prefix.", {"prefix": "The prefix."},
                        'patients.filter(col("zip").str.starts_with("7501"))'),
    "str.ends_with": ("True where the string ends with a suffix.", {"suffix": "The suffix."},
                      'patients.filter(col("diagnosis").str.ends_with("ia"))'),
    "str.slice": ("A substring by offset and length.",
                  {"offset": "Start (negative: from the end).", "length": "Number of characters (None: to the end)."},
                  'patients.group_by(col("zip").str.slice(0, 4)).agg(len())'),
    "str.replace": ("Replace the first match of a pattern.",
                    {"pattern": "A regular expression (or plain text with literal=True).",
                     "value": "The replacement.", "literal": "Treat the pattern as plain text."},
                    'patients.select(col("diagnosis").str.replace(" ", "_"))'),
    "str.strip_chars": ("Remove leading and trailing characters.",
                        {"characters": "The characters to remove (None: whitespace)."},
                        'patients.select(col("diagnosis").str.strip_chars())'),
    "str.to_date": ("Parse strings as dates.", {"format": "A strftime format such as '%Y-%m-%d'.",
                                                "strict": "Raise on strings that do not parse."},
                    'patients.select(col("zip").str.to_date("%Y%m", strict=False))'),
    "str.to_datetime": ("Parse strings as datetimes.", {"format": "A strftime format.",
                                                        "strict": "Raise on strings that do not parse."},
                        'patients.select(col("zip").str.to_datetime("%Y%m", strict=False))'),
    "dt.year": ("The year of a date.", {}, 'patients.group_by(col("admission_date").dt.year()).agg(len())'),
    "dt.month": ("The month (1-12) of a date.", {}, 'patients.group_by(col("admission_date").dt.month()).agg(len())'),
    "dt.day": ("The day of the month of a date.", {}, 'patients.select(col("admission_date").dt.day().max())'),
    "dt.weekday": ("The ISO weekday (Monday 1 ... Sunday 7) of a date.", {},
                   'patients.group_by(col("admission_date").dt.weekday()).agg(len())'),
    "dt.hour": ("The hour of a datetime.", {}, 'patients.select(col("admission_date").cast(pl.Datetime).dt.hour().max())'),
    "dt.truncate": ("Round dates down to an interval.", {"every": "An interval such as '1w', '1mo', '1y'."},
                    'patients.group_by(col("admission_date").dt.truncate("1mo")).agg(len())'),
    "dt.strftime": ("Format dates as strings.", {"format": "A strftime format such as '%Y-%m'."},
                    'patients.group_by(col("admission_date").dt.strftime("%Y-%m")).agg(len())'),
}

# polars' keyword names where the plan's parameter names differ.
POLARS_PARAM_NAMES = {("is_between", "lower"): "lower_bound", ("is_between", "upper"): "upper_bound",
                      ("clip", "lower"): "lower_bound", ("clip", "upper"): "upper_bound",
                      ("is_in", "values"): "other"}

_PY_TYPE_NAMES = {"expr": "Expr or literal", "int": "int", "number": "float", "str": "str", "bool": "bool",
                  "dtype": "DataType", "literal_list": "list", "optional_str": "str or None",
                  "optional_number": "float or None", "interval": "str", "closed": "str",
                  "exprs": "str, Expr or list of them"}


def _function_doc(fn_name: str, params: list[tuple[str, str, str]], spec: P.FunctionSpec) -> str:
    summary, param_docs, example = FUNCTION_DOCS[fn_name]
    lines = [summary, ""]
    if spec.kind == "aggregate":
        lines += ["An aggregation: released when every group has enough rows (the owner's K).", ""]
    if params:
        lines += ["Parameters", "----------"]
        for py_name, plan_name, ptype in params:
            default = f", default {spec.defaults[plan_name]!r}" if plan_name in spec.defaults else ""
            lines += [f"{py_name} : {_PY_TYPE_NAMES[ptype]}{default}", f"    {param_docs.get(py_name, '')}"]
        lines.append("")
    lines += ["Returns", "-------", "Expr", "    A new expression (nothing is computed yet).", "",
              "Examples", "--------", f">>> {example}"]
    return "\n".join(lines)


def make_function_handler(fn_name: str) -> Callable:
    """A method handler for one :data:`EXPR_FUNCTIONS` entry.

    Python arguments map to the spec's parameters by position and by
    (polars') keyword; each is type-checked and defaults come from the spec
    through :func:`bastion_kernel.contract.plan.fn`.
    """
    spec = P.EXPR_FUNCTIONS[fn_name]
    params = [(POLARS_PARAM_NAMES.get((fn_name, name), name), name, ptype) for name, ptype in spec.params]

    def handler(ctx: Context, receiver: Any, *values: Any) -> Expr:
        args = {plan_name: check_param(fn_name.split(".")[-1], py_name, ptype, value)
                for (py_name, plan_name, ptype), value in zip(params, values)}
        target = receiver.expr if isinstance(receiver, ExprNamespace) else receiver
        return target.map(lambda node: P.fn(fn_name, node, **args))

    # Defaults shown to the scientist are the spec's; omitted ones are filled by plan.fn.
    sig_params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_ONLY),
                  inspect.Parameter("receiver", inspect.Parameter.POSITIONAL_ONLY)]
    for py_name, plan_name, _ in params:
        default = spec.defaults.get(plan_name, inspect.Parameter.empty)
        sig_params.append(inspect.Parameter(py_name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    handler.__signature__ = inspect.Signature(sig_params)  # type: ignore[attr-defined]
    handler.__doc__ = _function_doc(fn_name, params, spec)
    handler.__name__ = handler.__qualname__ = "expr_" + fn_name.replace(".", "_")
    return handler


for _name in P.EXPR_FUNCTIONS:
    if "." not in _name:  # str.* and dt.* live on their namespaces (namespaces.py)
        method(Expr, _name)(make_function_handler(_name))


@method(Expr, "over")
def expr_over(ctx: Context, expr: Expr, partition_by: Any, *more_exprs: Any) -> Expr:
    """A window function: compute the expression within each row's partition.

    The value of each row is the expression (usually an aggregation) over
    the rows that share its partition key, broadcast back to the row.  The
    owner cannot tell how many rows fed each value once it sits on a row,
    so a result that uses ``over`` is row-level: the owner reviews it, also
    after a later ``group_by`` or aggregation.

    Parameters
    ----------
    partition_by : str, Expr or list of them
        The column(s) or expression(s) that define the partitions.
    *more_exprs : str or Expr
        More partition columns.

    Returns
    -------
    Expr
        A new expression (nothing is computed yet).

    Examples
    --------
    >>> patients.with_columns(col("cost").mean().over("diagnosis").alias("mean_cost"))
    """
    first = partition_by if isinstance(partition_by, (list, tuple)) else [partition_by]
    keys = check_param("over", "partition_by", "exprs", [*first, *more_exprs])
    return expr.map(lambda node: P.fn("over", node, partition_by=keys))


# --------------------------------------------------------------------------
# Expression methods that are not plan functions.

@method(Expr, "alias")
def expr_alias(ctx: Context, expr: Expr, name: str) -> Expr:
    """Name the output column.

    Parameters
    ----------
    name : str
        The new column name.

    Returns
    -------
    Expr
        The same expression, named.

    Examples
    --------
    >>> patients.select(col("cost").mean().alias("mean_cost"))
    """
    if len(expr.nodes) != 1:
        raise SchemaError("alias() names one column; this expression stands for several")
    return Expr(P.alias(expr.node, check_name(name, "alias()")))


@method(Expr, "not_")
def expr_not(ctx: Context, expr: Expr) -> Expr:
    """Logical negation (the same as ``~expr``).

    Returns
    -------
    Expr
        True where the input is False.

    Examples
    --------
    >>> patients.filter(col("smoker").not_())
    """
    return expr.map(lambda node: P.unary("not", node))


# --------------------------------------------------------------------------
# Builtin functions that make expressions.

@function("col")
def fn_col(ctx: Context, name: str | list, *more_names: str) -> Expr:
    """A column of the frame, by name.

    Parameters
    ----------
    name : str or list of str
        The column name; several names (or a list) make a multi-column
        expression that a frame method expands, as in polars.
    *more_names : str
        More column names.

    Returns
    -------
    Expr
        A column expression.

    Examples
    --------
    >>> patients.select(col("age"), col("cost") * 1.2)
    >>> patients.select(col("age", "cost").mean())
    """
    names = (list(name) if isinstance(name, (list, tuple)) else [name]) + list(more_names)
    if not names:
        raise SchemaError("col() needs at least one column name")
    for n in names:
        if isinstance(n, DType):
            raise UnsupportedOperation("selecting columns by data type (col(pl.Int64)) is not available; "
                                       "name the columns")
        check_name(n, "col()")
        if n == "*" or (n.startswith("^") and n.endswith("$")):
            raise UnsupportedOperation(f"col({n!r}): wildcard and regex selection are not available; "
                                       "name the columns (df.columns lists them)")
    return Expr.several([P.col(n) for n in names])


@function("lit")
def fn_lit(ctx: Context, value: Any, dtype: DType | None = None) -> Expr:
    """A literal value as an expression.

    Parameters
    ----------
    value : int, float, str, bool or None
        The value.
    dtype : DataType, optional
        Cast the literal to this type.

    Returns
    -------
    Expr
        A literal expression (its column is named "literal").

    Examples
    --------
    >>> patients.with_columns(lit(1).alias("one"))
    >>> patients.select(lit(None, pl.Float64).alias("nothing"))
    """
    node = literal_node(value)
    if dtype is not None:
        node = P.fn("cast", node, dtype=check_param("lit", "dtype", "dtype", dtype))
    return Expr(node)


# len(value) for the language's own values: the type -> a handler(ctx, value) giving the length.
# frame.py and results.py register frames here (a remote count goes through the owner's policy).
LENGTHS: dict[type, Callable[[Context, Any], Any]] = {
    list: lambda ctx, value: len(value), tuple: lambda ctx, value: len(value),
    str: lambda ctx, value: len(value), dict: lambda ctx, value: len(value),
}


@function("len")
def fn_len(ctx: Context, obj: Any = None) -> Any:
    """The number of rows (of the frame, or of each group in an ``agg``); ``len(frame)`` counts a frame.

    Without an argument, as polars' ``pl.len()``: an expression.  With a
    frame, as Python's ``len(df)``: the number of rows, counted by the
    owner's executor (a ``select(pl.len())`` fetch, released as any
    aggregate) for a remote frame, locally for a fetched ``DataFrame``.

    Parameters
    ----------
    obj : RemoteFrame, DataFrame, list, tuple, str or dict, optional
        What to count.

    Returns
    -------
    Expr or int
        An aggregation named "len", or the count.

    Examples
    --------
    >>> patients.group_by("diagnosis").agg(len())
    >>> patients.select(pl.len())
    >>> len(patients)
    """
    if obj is None:
        return Expr(P.length())
    for cls in type(obj).__mro__:
        if cls in LENGTHS:
            return LENGTHS[cls](ctx, obj)
    raise SchemaError(f"len() counts a frame, a list, a string or a dict, not {describe_value(obj)}; "
                      "len() alone is the row count expression (pl.len())")


def combine_predicates(predicates: tuple, constraints: dict, what: str) -> dict:
    """One boolean expression from ``*predicates`` and ``name=value`` equalities (polars' rule)."""
    nodes = to_nodes(list(predicates), what, str_as="col")
    nodes += [P.binary("eq", P.col(check_name(k, what)), to_node(v, what)) for k, v in constraints.items()]
    if not nodes:
        raise SchemaError(f"{what} needs at least one condition")
    combined = nodes[0]
    for node in nodes[1:]:
        combined = P.binary("and", combined, node)
    return combined


@function("when")
def fn_when(ctx: Context, *predicates: Any, **constraints: Any) -> When:
    """Start a conditional expression: ``when(c).then(x).otherwise(y)``.

    Parameters
    ----------
    *predicates : Expr
        Conditions, combined with ``&``.
    **constraints : literal
        ``name=value`` equalities, combined with ``&``.

    Returns
    -------
    When
        Waiting for ``.then(value)``.

    Examples
    --------
    >>> patients.with_columns(when(col("age") >= 65).then(lit("senior")).otherwise(lit("adult")).alias("band"))
    """
    return When([], combine_predicates(predicates, constraints, "when()"))


@method(When, "then")
def when_then(ctx: Context, pending: When, value: Any) -> Then:
    """The value where the pending condition holds.

    Parameters
    ----------
    value : Expr or literal
        A bare string is a column name, as in polars; use ``lit("x")`` for text.

    Returns
    -------
    Then
        An expression (null where no condition holds) that may chain
        ``.when(...)`` or end with ``.otherwise(...)``.

    Examples
    --------
    >>> patients.select(when(col("smoker")).then(col("cost")).otherwise(0).alias("smoker_cost"))
    """
    return Then(pending.branches + [(pending.condition, to_node(value, "then()", str_as="col"))])


@method(Then, "when")
@documented_like(fn_when, "Parameters", "Returns")
def then_when(ctx: Context, chain: Then, *predicates: Any, **constraints: Any) -> When:
    """Add another condition to a ``when``/``then`` chain.

    Examples
    --------
    >>> patients.select(when(col("age") < 18).then(lit("child")).when(col("age") < 65).then(lit("adult")).otherwise(lit("senior")))
    """
    return When(chain.branches, combine_predicates(predicates, constraints, "when()"))


@method(Then, "otherwise")
@documented_like(when_then, "Parameters")
def then_otherwise(ctx: Context, chain: Then, value: Any) -> Expr:
    """The value where no condition holds; ends the chain.

    Returns
    -------
    Expr
        The conditional expression.

    Examples
    --------
    >>> patients.select(when(col("cost") > 5000).then(lit("high")).otherwise(lit("low")).alias("cost_band"))
    """
    return Expr(P.when(chain.branches, to_node(value, "otherwise()", str_as="col")))
