"""Types between the two engines: polars dtypes <-> Spark types, and the polars compiler as the type oracle.

The Spark engine answers with the polars engine's types: a plan's output
schema, and the dtype of every expression the Spark compiler makes
type-dependent choices on (integer or float division, a bitwise or a logical
``and``, the width an integer result wraps at), are what the polars compiler
gives for the same plan over *empty* tables of the same columns.  No data is
read for it, and a plan polars refuses for its types is refused with the
polars engine's own ``SchemaError``.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import polars as pl

from bastion_kernel.contract import local, walk
from bastion_kernel.contract.protocol import BastionError

from ...model import Dataset

# Frame operations' expression fields that are read against another frame than their own input.
_OWN_FRAMES = {"join": ("left", "right")}
# Accounting expressions: the fields that hold the scientist's expressions (typed like any other).
_ACCOUNT_EXPR_FIELDS = ("input", "call", "kept")


def spark_type(dtype: pl.DataType, what: str = "a value") -> Any:
    """The Spark type that holds a polars dtype's values (unsigned and durations in a wider signed type).

    Raises
    ------
    BastionError
        ``UnsupportedOperation`` for a dtype Spark cannot hold (``UInt64``, objects).
    """
    from pyspark.sql import types as T

    simple = {pl.Int8: T.ByteType, pl.Int16: T.ShortType, pl.Int32: T.IntegerType, pl.Int64: T.LongType,
              pl.UInt8: T.ShortType, pl.UInt16: T.IntegerType, pl.UInt32: T.LongType,
              pl.Float32: T.FloatType, pl.Float64: T.DoubleType, pl.String: T.StringType,
              pl.Boolean: T.BooleanType, pl.Date: T.DateType, pl.Null: T.NullType, pl.Binary: T.BinaryType,
              pl.Duration: T.LongType}
    for base, made in simple.items():
        if dtype == base or (base is pl.Duration and isinstance(dtype, pl.Duration)):
            return made()
    if isinstance(dtype, pl.Datetime):
        return T.TimestampType() if dtype.time_zone else T.TimestampNTZType()
    if isinstance(dtype, pl.List):
        return T.ArrayType(spark_type(dtype.inner, what), True)
    if isinstance(dtype, pl.Decimal):
        return T.DecimalType(dtype.precision or 38, dtype.scale or 0)
    if isinstance(dtype, pl.Struct):
        return T.StructType([T.StructField(f.name, spark_type(f.dtype, what), True) for f in dtype.fields])
    raise BastionError("UnsupportedOperation", f"{what} of type {dtype} has no Spark type on the Spark engine",
                       dtype=str(dtype))


def polars_dtype(dtype: Any, column: str = "") -> pl.DataType:
    """The polars dtype a Spark type's values arrive with through Arrow (``toArrow``)."""
    from pyspark.sql import types as T

    simple = [(T.ByteType, pl.Int8), (T.ShortType, pl.Int16), (T.IntegerType, pl.Int32), (T.LongType, pl.Int64),
              (T.FloatType, pl.Float32), (T.DoubleType, pl.Float64), (T.StringType, pl.String),
              (T.BooleanType, pl.Boolean), (T.DateType, pl.Date), (T.NullType, pl.Null), (T.BinaryType, pl.Binary)]
    for spark, polars in simple:
        if isinstance(dtype, spark):
            return polars
    if isinstance(dtype, T.TimestampNTZType):
        return pl.Datetime("us")
    if isinstance(dtype, T.TimestampType):
        return pl.Datetime("us", "UTC")
    if isinstance(dtype, T.DecimalType):
        return pl.Decimal(dtype.precision, dtype.scale)
    if isinstance(dtype, T.ArrayType):
        return pl.List(polars_dtype(dtype.elementType, column))
    if isinstance(dtype, T.StructType):
        return pl.Struct({f.name: polars_dtype(f.dataType, column) for f in dtype.fields})
    raise BastionError("UnsupportedOperation", f"column {column!r} has the Spark type {dtype.simpleString()}, "
                                               "which the Spark engine does not read", column=column)


def polars_schema(struct: Any, skip: tuple[str, ...] = ()) -> pl.Schema:
    """A Spark schema as the polars schema of the same columns (``skip``: columns left out)."""
    return pl.Schema([(f.name, polars_dtype(f.dataType, f.name)) for f in struct.fields if f.name not in skip])


class _EmptyTables:
    """A dataset cache for the polars compiler whose tables are empty, with given schemas.

    Duck-types :class:`owner_console.engine.cache.DatasetCache` for the
    methods the compiler calls.  ``unique_keys`` says yes: the check it stands
    for runs in the Spark job itself (``acct_unique``).
    """

    use_facts = False

    def __init__(self, schemas: Mapping[str, pl.Schema]):
        self._frames = {name: pl.DataFrame(schema=schema) for name, schema in schemas.items()}

    def frame(self, dataset: Dataset) -> pl.DataFrame:
        return self._frames[dataset.name]

    def lazy(self, dataset: Dataset) -> pl.LazyFrame:
        return self._frames[dataset.name].lazy()

    def unique_keys(self, dataset: Dataset, columns: tuple[str, ...], table: Any = None) -> bool:
        return True

    # Facts about the data let the polars compiler skip checks that cannot fail; none are known here, so
    # every check is compiled in full (what the Spark compiler mirrors).
    def facts(self, *args: Any, **kwargs: Any) -> None:
        return None

    def key_stats(self, *args: Any, **kwargs: Any) -> None:
        return None

    def remembered(self, key: Any, sources: Any, compute: Any) -> Any:
        return compute()  # nothing is kept: computed from the (absent) statistics above


class PolarsTypes:
    """The polars engine's types for a plan's frames and expressions, over empty tables.

    Parameters
    ----------
    catalog : Mapping[str, Dataset]
        The plan's datasets by name.
    schemas : Mapping[str, pl.Schema]
        Each source's columns as polars reads them (from its Spark schema).
    """

    def __init__(self, catalog: Mapping[str, Dataset], schemas: Mapping[str, pl.Schema]):
        self.catalog = catalog
        self.cache = _EmptyTables(schemas)
        self._frames: dict[int, pl.LazyFrame] = {}
        self._exprs: dict[int, pl.DataType | None] = {}

    def frame(self, node: dict) -> pl.LazyFrame:
        """The polars query of a frame node (its schema resolved: polars' ``SchemaError`` if it does not fit)."""
        found = self._frames.get(id(node))
        if found is None:
            from ..compile import Compiler  # a fresh compiler per subtree: its state is per plan

            found = self._frames[id(node)] = Compiler(self.catalog, self.cache).frame(node)
        return found

    def schema(self, node: dict) -> pl.Schema:
        return self.frame(node).collect_schema()

    def prepare(self, frame_node: dict, exprs: list[dict]) -> None:
        """Type every expression of ``exprs`` (and their parts) over ``frame_node``'s output, in one pass."""
        nodes = [n for n in _user_exprs(exprs) if id(n) not in self._exprs]
        if not nodes:
            return
        scope = self.frame(frame_node)
        compiled = []
        for node in nodes:
            try:
                compiled.append((node, local.compile_expr(node)))
            except Exception:  # noqa: BLE001 - a part polars has no expression for alone (none today)
                self._exprs[id(node)] = None
        try:
            schema = scope.select([e.alias(f"e{i}") for i, (_, e) in enumerate(compiled)]).collect_schema()
            for i, (node, _) in enumerate(compiled):
                self._exprs[id(node)] = schema[f"e{i}"]
        except Exception:  # noqa: BLE001 - one part that does not fit alone: type them one by one
            for node, expr in compiled:
                try:
                    self._exprs[id(node)] = scope.select(expr.alias("e")).collect_schema()["e"]
                except Exception:  # noqa: BLE001
                    self._exprs[id(node)] = None

    def dtype(self, node: dict) -> pl.DataType | None:
        """The dtype of an expression :meth:`prepare` typed (None: unknown)."""
        return self._exprs.get(id(node))


def _user_exprs(exprs: list[dict]) -> Iterator[dict]:
    """Every scientist's expression node in ``exprs``, looking inside the accounting expressions."""
    stack = list(exprs)
    while stack:
        node = stack.pop()
        kind = node.get("expr", "")
        if kind.startswith("acct_"):
            stack.extend(node[f] for f in _ACCOUNT_EXPR_FIELDS if isinstance(node.get(f), dict))
            continue
        yield node
        stack.extend(walk.expr_children(node))
