"""What a Spark-backed dataset reads: its kind of source, its DataFrame and its data version.

A Spark dataset's source is one of (``Dataset.source_kind``):

``file``
    A CSV or Parquet file.
``directory``
    A directory of CSV or Parquet files (all of one format, searched
    recursively; names starting with ``.`` or ``_`` are not data), read as one table.
``delta``
    A Delta table's directory (it holds ``_delta_log``); reading it needs
    Delta Lake on the Spark side (see ``docs/scale-out.md``).
``table``
    A table of the Spark catalog, ``Dataset.table`` (``db.name`` or
    ``catalog.db.name``); it has no path.

Paths are local to the executor and, for a cluster, the same on its nodes (a
shared file system): the executor lists the files itself for the data
version.  Data in object stores is registered as a catalog table.

Row order.  :func:`read` adds three reserved columns that make the source's
row order stable, whatever the split size, core count or filter placement:
sort by :data:`ORDER_COLUMNS` (ascending) to get the rows in file order.
``__bastion_file`` is the file's path, ``__bastion_block`` the byte offset
of the split the row was read from and ``__bastion_row`` the row's index in
its file (Parquet, and tables over Parquet files) or an increasing id within
its split (CSV, which has no row index; the id is computed at the scan, so it
keeps the file's order within a split).  ``monotonically_increasing_id``
alone is never a row's identity: its values change with the splits.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any

from bastion_kernel.contract.protocol import BastionError

from ...model import Dataset
from ...workspace import WorkspaceError

ROW_FILE = "__bastion_file"
ROW_BLOCK = "__bastion_block"
ROW_INDEX = "__bastion_row"
ORDER_COLUMNS = (ROW_FILE, ROW_BLOCK, ROW_INDEX)

SOURCE_KINDS = ("file", "directory", "delta", "table")
# The formats a Spark dataset may have, by source kind.
FORMATS_BY_KIND = {"file": ("csv", "parquet"), "directory": ("csv", "parquet"), "delta": ("delta",),
                   "table": ("table",)}
TABLE_PREFIX = "table:"
# A catalog table's name: one to three plain identifiers (catalog.db.table).  Anything else is refused at
# registration, so the name can be quoted into the few catalog statements that have no DataFrame call.
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}(\.[A-Za-z_][A-Za-z0-9_]{0,127}){0,2}")
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


# ---------------------------------------------------------------- registration
def resolve_source(source: str) -> dict[str, Any]:
    """What a ``dataset add --engine spark`` SOURCE names, before Spark reads it.

    ``table:NAME`` is a catalog table; anything else a path (made absolute): a
    directory holding ``_delta_log`` is a Delta table, another directory one
    of CSV or Parquet files, a file a CSV or Parquet file.

    Returns
    -------
    dict
        ``{"source_kind", "format", "path" (str or None), "table" (str or None)}``.

    Raises
    ------
    WorkspaceError
        A malformed table name, a missing path, a directory with no data
        files or with both CSV and Parquet files, an unsupported file type.
    """
    if source.startswith(TABLE_PREFIX):
        name = source[len(TABLE_PREFIX):]
        if TABLE_NAME.fullmatch(name) is None:
            raise WorkspaceError(f"{source!r}: a catalog table is table:NAME with NAME one to three identifiers "
                                 "separated by dots (letters, digits, '_'), e.g. table:sales.orders")
        return {"source_kind": "table", "format": "table", "path": None, "table": name}
    path = Path(source).expanduser().absolute()
    if path.is_dir():
        if (path / "_delta_log").is_dir():
            return {"source_kind": "delta", "format": "delta", "path": str(path), "table": None}
        names = [name for name, _, _ in data_files(path)]
        if not names:
            raise WorkspaceError(f"{path}: the directory holds no .csv or .parquet file")
        other = [name for name in names if Path(name).suffix.lower() not in _SUFFIXES]
        if other:
            raise WorkspaceError(f"{path}: {other[0]} is not a .csv or .parquet file; Spark reads every file of the "
                                 "directory but those whose names start with '.' or '_'")
        formats = {_SUFFIXES[Path(name).suffix.lower()] for name in names}
        if len(formats) > 1:
            raise WorkspaceError(f"{path}: the directory must hold files of one format, all .csv or all .parquet")
        return {"source_kind": "directory", "format": formats.pop(), "path": str(path), "table": None}
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise WorkspaceError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                             f"{', '.join(sorted(_SUFFIXES))}, a directory of them, a Delta table's directory "
                             "or table:NAME")
    if not path.is_file():
        raise WorkspaceError(f"{path}: no such file or directory")
    return {"source_kind": "file", "format": fmt, "path": str(path), "table": None}


def check_record(source_kind: Any, fmt: Any, path: Any, table: Any) -> None:
    """Check a Spark dataset's stored source fields (``datasets/NAME.toml``); raises ValueError naming the field."""
    if source_kind not in SOURCE_KINDS:
        raise ValueError(f"source_kind must be one of {', '.join(SOURCE_KINDS)}, got {source_kind!r}")
    if fmt not in FORMATS_BY_KIND[source_kind]:
        raise ValueError(f"format of a {source_kind} source must be {' or '.join(FORMATS_BY_KIND[source_kind])}, "
                         f"got {fmt!r}")
    if source_kind == "table":
        if not isinstance(table, str) or TABLE_NAME.fullmatch(table) is None:
            raise ValueError(f"table must be a catalog table name such as sales.orders, got {table!r}")
        if path is not None:
            raise ValueError("a table source has no path")
    else:
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError("path must be an absolute path")
        if table is not None:
            raise ValueError(f"a {source_kind} source has no table")


# ---------------------------------------------------------------- reading
# Inferred schemas of file and directory sources, by (URI, format, data version).
_schemas: dict[tuple[str, str, str], Any] = {}
_schemas_lock = threading.Lock()


def read(spark: Any, dataset: Dataset, version: str | None = None, ordered: bool = True) -> Any:
    """The dataset as a DataFrame: its columns, then :data:`ORDER_COLUMNS` (see the module docstring).

    Parameters
    ----------
    spark : SparkSession
        Classic or Spark Connect.
    dataset : Dataset
        A Spark dataset, or a saved result (a Parquet file on the owner's side).
    version : str, optional
        The dataset's :func:`data_version` when the caller has it: a file or
        directory source's schema is kept per version, so that Spark infers
        it once (a job: a Parquet footer, a pass over CSV data), not at every
        query.
    ordered : bool
        False when nothing reads the rows' order or identity (the compiler's
        ``ordered_sources``): the row-order columns are left out, since
        Spark reads every file's metadata as soon as ``_metadata`` is
        referenced (about a fifth of a scan).
    """
    from pyspark.sql import functions as F

    if getattr(dataset, "engine", "spark") != "spark":
        return _read_owner_file(spark, dataset)
    frame = _source_frame(spark, dataset, version)
    if not ordered:
        return frame
    metadata = frame.metadataColumn("_metadata")
    if dataset.format == "csv":
        block, row = metadata.getField("file_block_start"), F.monotonically_increasing_id()
    else:
        block, row = F.lit(0).cast("long"), metadata.getField("row_index")
    return frame.select("*", metadata.getField("file_path").alias(ROW_FILE), block.alias(ROW_BLOCK),
                        row.alias(ROW_INDEX))


def _source_frame(spark: Any, dataset: Dataset, version: str | None) -> Any:
    """A Spark dataset's own columns, as its source gives them."""
    kind = source_kind(dataset)
    if kind == "table":
        frame = spark.read.table(_quoted_table(dataset.table))
    elif dataset.format == "delta":
        frame = spark.read.format("delta").load(_uri(dataset.path))
    elif dataset.format in ("parquet", "csv"):
        frame = _read_files(spark, dataset, version)
    else:
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} has a format the Spark engine cannot read")
    return frame


# Row counts of Parquet sources, by (path, data version).
_row_counts: dict[tuple[str, str], int | None] = {}


def row_count(dataset: Dataset, version: str | None) -> int | None:
    """The rows a Parquet file or directory source holds, from its files' footers (read by the executor, no
    Spark job), kept per data version; None for any other source, without a version, or unreadable."""
    if getattr(dataset, "engine", "spark") != "spark" or dataset.format != "parquet" or not version \
            or source_kind(dataset) not in ("file", "directory"):
        return None
    key = (str(dataset.path), version)
    with _schemas_lock:
        if key in _row_counts:
            return _row_counts[key]
    import pyarrow.parquet as pq

    path = Path(dataset.path)
    try:
        files = [path / name for name, _, _ in data_files(path)] if path.is_dir() else [path]
        rows = sum(pq.ParquetFile(file).metadata.num_rows for file in files)
    except Exception:  # noqa: BLE001 - a footer pyarrow cannot read: Spark will say so when it reads the file
        rows = None
    with _schemas_lock:
        for stale in [k for k in _row_counts if k[0] == key[0]]:
            del _row_counts[stale]
        _row_counts[key] = rows
    return rows


def _read_owner_file(spark: Any, dataset: Dataset) -> Any:
    """A saved result (a Parquet file on the owner's side) with its order columns.

    A local Spark reads the file where it is; a cluster or a Spark Connect
    server cannot see the executor's disk, so the table is sent to it.
    """
    from pyspark.sql import functions as F

    if dataset.format != "parquet":
        raise BastionError("ExecutionError", f"dataset {dataset.name!r} has a format the Spark engine cannot read")
    if is_local(spark):
        frame = spark.read.parquet(_uri(dataset.path))
        metadata = frame.metadataColumn("_metadata")
        return frame.select("*", metadata.getField("file_path").alias(ROW_FILE), F.lit(0).cast("long").alias(ROW_BLOCK),
                            metadata.getField("row_index").alias(ROW_INDEX))
    import polars as pl
    from pyspark.sql.pandas.types import from_arrow_schema

    table = pl.read_parquet(dataset.path).with_columns(
        pl.lit(_uri(dataset.path)).alias(ROW_FILE), pl.lit(0, dtype=pl.Int64).alias(ROW_BLOCK),
        pl.int_range(pl.len(), dtype=pl.Int64).alias(ROW_INDEX)).to_arrow()
    return spark.createDataFrame(table, schema=from_arrow_schema(table.schema, prefer_timestamp_ntz=True))


def is_local(spark: Any) -> bool:
    """True for a classic session whose master is local: its tasks read the executor's own disk."""
    from .session import is_connect

    return not is_connect(spark) and str(spark.sparkContext.master).startswith("local")


def source_kind(dataset: Dataset) -> str:
    """The dataset's kind of source (``file`` for a dataset that predates the field)."""
    return getattr(dataset, "source_kind", "file") or "file"


def _read_files(spark: Any, dataset: Dataset, version: str | None) -> Any:
    """A file or directory source, read with its schema given (inferred once per data version).

    Spark infers a schema with a job (a Parquet footer; a pass over the whole
    CSV data).  A CSV source gets the types polars gives the same file:
    whole numbers Int64, timestamps without a time zone.
    """
    uri = _uri(dataset.path)

    def reader() -> Any:  # a reader's options stay set on it: one per use
        made = spark.read.format(dataset.format)
        return made.option("header", "true") if dataset.format == "csv" else made

    key = (uri, dataset.format, version) if version else None
    with _schemas_lock:
        schema = _schemas.get(key) if key else None
    if schema is None:
        if dataset.format == "csv":
            schema = _polars_like_csv_schema(reader().option("inferSchema", "true").load(uri).schema)
        else:
            schema = reader().load(uri).schema
        if key is not None:
            with _schemas_lock:
                for stale in [k for k in _schemas if k[:2] == key[:2]]:
                    del _schemas[stale]
                _schemas[key] = schema
    return reader().schema(schema).load(uri)


def _polars_like_csv_schema(schema: Any) -> Any:
    from pyspark.sql import types as T

    fields = []
    for field in schema.fields:
        dtype = field.dataType
        if isinstance(dtype, (T.ByteType, T.ShortType, T.IntegerType)):
            dtype = T.LongType()
        elif isinstance(dtype, T.TimestampType):
            dtype = T.TimestampNTZType()
        fields.append(T.StructField(field.name, dtype, True))
    return T.StructType(fields)


def _uri(path: Any) -> str:
    """A local path as a ``file:`` URI: on a cluster whose default file system is HDFS, a bare path would name
    a file there."""
    return Path(path).absolute().as_uri()


def _quoted_table(name: str | None) -> str:
    """A checked table name with each part in backquotes (:data:`TABLE_NAME` admits no backquote)."""
    if not isinstance(name, str) or TABLE_NAME.fullmatch(name) is None:
        raise BastionError("ExecutionError", "a dataset names a catalog table that is not a valid table name")
    return ".".join(f"`{part}`" for part in name.split("."))


# ---------------------------------------------------------------- data versions
def data_version(spark_session: Any, dataset: Dataset) -> str:
    """A string that changes whenever the data a Spark dataset reads changes.

    Paths: every data file's path, size and modification time (listed by the
    executor; a Delta table's log files included, so every commit is a new
    version).  A catalog table: its Delta version when the table is Delta,
    plus its description (``DESCRIBE TABLE EXTENDED``: location, provider,
    properties, statistics) and its current files, hashed.  A table whose
    files are rewritten in place under the same names, with no change to its
    properties, keeps its version: Spark and Delta never do that, but a
    process writing an external table's files by hand could.

    Parameters
    ----------
    spark_session : callable
        Returns the SparkSession; called only for a catalog table.
    """
    kind = source_kind(dataset)
    if kind == "table":
        return _table_version(spark_session(), dataset)
    path = Path(dataset.path)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for name, size, mtime in data_files(path, keep_delta_log=kind == "delta"):
                digest.update(f"{name}\0{size}\0{mtime}\n".encode())
        else:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    except OSError:
        return ""
    return f"{kind}:{digest.hexdigest()}"


def data_files(root: Path, keep_delta_log: bool = False) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every data file under ``root``, sorted; hidden and ``_`` names
    skipped (Spark's own rule), but for a Delta table's ``_delta_log``."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        subdirectories[:] = sorted(d for d in subdirectories
                                   if not d.startswith((".", "_")) or (keep_delta_log and d == "_delta_log"
                                                                       and directory == str(root)))
        for name in files:
            if name.startswith((".", "_")) and not (keep_delta_log and relative.parts[:1] == ("_delta_log",)):
                continue
            stat = os.stat(os.path.join(directory, name))
            found.append((str(relative / name), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def _table_version(spark: Any, dataset: Dataset) -> str:
    """See :func:`data_version`.  Statements are built from the checked table name only (:func:`_quoted_table`)."""
    name = _quoted_table(dataset.table)
    spark.catalog.refreshTable(name)  # another session may have written it: list its files again
    description = [tuple(row) for row in spark.sql(f"DESCRIBE TABLE EXTENDED {name}").collect()]
    # Rows that change without the data changing.
    description = [row for row in description if row and row[0] not in ("Last Access",)]
    provider = next((str(row[1]).lower() for row in description if row[0] == "Provider"), "")
    parts = [repr(description)]
    if provider == "delta":
        history = spark.sql(f"DESCRIBE HISTORY {name} LIMIT 1").select("version").collect()
        parts.append(f"delta version {history[0][0] if history else ''}")
    parts.extend(sorted(spark.read.table(name).inputFiles()))
    return "table:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
