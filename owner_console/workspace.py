"""The owner's directory: configuration, keys, registered datasets and scientists.

Layout of a workspace ``DIR``::

    DIR/config.toml                  [server] bind = "tcp://127.0.0.1:5555"; approval_ttl_seconds,
                                     approval_reuse ("until_expiry" or "once") and the
                                     limits of owner_console.limits (query_timeout_seconds,
                                     max_rows_released, max_refusals_per_minute); [spark] master or
                                     remote and [spark.conf] (owner_console.engine.spark.session)
    DIR/keys/server.key              the executor's CURVE public key (give it to scientists)
    DIR/keys/server.key_secret       the executor's CURVE secret key
    DIR/keys/audit_ed25519           the audit log's Ed25519 signing key (PKCS#8 PEM, mode 0600)
    DIR/keys/audit_ed25519.pub       its public key (SubjectPublicKeyInfo PEM), for ``audit verify``
    DIR/datasets/NAME.toml           one registered dataset: file, format and policy (a Spark dataset
                                     also its engine and source kind: owner_console.engine.spark.sources)
    DIR/scientists/NAME.toml         one allow-listed scientist: their CURVE public key
    DIR/mocks/NAME.toml, NAME.parquet  the published mock of dataset NAME (owner_console.mock)
    DIR/approvals.sqlite             held requests (:mod:`owner_console.approvals`)
    DIR/audit.jsonl                  the audit log (:mod:`owner_console.audit`)
    DIR/results/                     held results waiting for a decision (Arrow IPC)

Everything is re-read from disk on use, so ``bastion-owner dataset add`` and
``scientist add`` take effect in a running executor without a restart.  The
allow-list is read through :class:`AllowList`, which re-reads the scientists
directory whenever it changed: a running executor checks every message's key
against it, so ``scientist remove`` (or a rotation, ``scientist add`` with a
new key) refuses the old key on its next message, open connection or not.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import re
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable

import tomli_w
import zmq
import zmq.auth
from zmq.utils import z85
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from owner_console.model import UNSAFE_MODES, Dataset, Policy

DEFAULT_BIND = "tcp://127.0.0.1:5555"
# How long an approved result waits for its scientist before it expires.
DEFAULT_APPROVAL_TTL_SECONDS = 7 * 24 * 3600
# Whether an approval serves re-runs of its query until it expires, or one release.
DEFAULT_APPROVAL_REUSE = "until_expiry"
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# File suffixes the executor can scan, and the format name stored for each.
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# The engines a dataset may name (owner_console.engine.ENGINES runs them; "spark" needs the spark extra).
ENGINE_NAMES = ("polars", "spark")
# Privacy spending is charged to a file's content (owner_console.dp.ledger): a DP dataset is one file.
SPARK_DP_NEEDS_A_FILE = ("differential privacy on the Spark engine needs one CSV or Parquet file: privacy spending "
                         "is charged to the file's content, and a directory or a table has none to hash")


class WorkspaceError(Exception):
    """A problem the owner can fix: a bad name, a missing file, a malformed TOML file."""


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a valid dataset or scientist name, else raise WorkspaceError.

    Names become file names, so only ``[A-Za-z_][A-Za-z0-9_-]{0,63}`` is accepted.
    """
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise WorkspaceError(f"invalid {what} name {name!r}: use letters, digits, '_' or '-', "
                             "starting with a letter or '_', at most 64 characters")
    return name


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    Writes a temporary file in the same directory, fsyncs it, renames it over
    ``path`` and fsyncs the directory, so a crash never leaves a half file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Workspace:
    """The owner's directory (see the module docstring for its layout).

    Parameters
    ----------
    path : str or Path
        The workspace directory; :meth:`init` creates it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().absolute()

    # -- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def server_public_key_path(self) -> Path:
        return self.keys_dir / "server.key"

    @property
    def server_secret_key_path(self) -> Path:
        return self.keys_dir / "server.key_secret"

    @property
    def audit_private_key_path(self) -> Path:
        return self.keys_dir / "audit_ed25519"

    @property
    def audit_public_key_path(self) -> Path:
        return self.keys_dir / "audit_ed25519.pub"

    @property
    def datasets_dir(self) -> Path:
        return self.path / "datasets"

    @property
    def scientists_dir(self) -> Path:
        return self.path / "scientists"

    @property
    def results_dir(self) -> Path:
        return self.path / "results"

    @property
    def mocks_dir(self) -> Path:
        """The published mocks of datasets (:mod:`owner_console.mock`)."""
        return self.path / "mocks"

    @property
    def approvals_path(self) -> Path:
        return self.path / "approvals.sqlite"

    @property
    def audit_path(self) -> Path:
        return self.path / "audit.jsonl"

    @property
    def dp_ledger_path(self) -> Path:
        """The differential privacy odometer (:class:`owner_console.dp.BudgetLedger`)."""
        return self.path / "dp_budget.sqlite"

    @property
    def dataset_cache_dir(self) -> Path:
        """Memory-mapped Arrow IPC copies of the datasets, shared by the query workers (derived; safe to delete)."""
        return self.path / "cache" / "datasets"

    def result_path(self, request_id: int) -> Path:
        """Where the held table of request ``request_id`` is kept (Arrow IPC file)."""
        return self.results_dir / f"{int(request_id)}.arrow"

    # -- creation ----------------------------------------------------------
    def init(self, bind: str = DEFAULT_BIND, approval_ttl_seconds: int = DEFAULT_APPROVAL_TTL_SECONDS,
             approval_reuse: str = DEFAULT_APPROVAL_REUSE) -> None:
        """Create the workspace: config, server CURVE keys, audit signing key, empty stores.

        ``approval_ttl_seconds`` (written to ``config.toml``) is how long an
        approval serves its scientist: the approved result waits that long to
        be fetched, and re-runs of the same query on the same data get it
        again until then.  ``approval_reuse = "once"`` makes every approval
        serve one release instead.

        Refuses a directory that already holds a workspace, so keys are never
        silently replaced.
        """
        if isinstance(approval_ttl_seconds, bool) or not isinstance(approval_ttl_seconds, int) \
                or approval_ttl_seconds < 1:
            raise WorkspaceError(f"approval_ttl_seconds must be a whole number >= 1, got {approval_ttl_seconds!r}")
        _check_reuse(approval_reuse, "approval_reuse")
        if self.config_path.exists():
            raise WorkspaceError(f"{self.path} is already a Bastion workspace")
        if self.path.exists() and not self.path.is_dir():
            raise WorkspaceError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for directory in (self.keys_dir, self.datasets_dir, self.scientists_dir, self.results_dir):
            directory.mkdir(exist_ok=True)
        # Keys and held (not yet released) results are for the owner's eyes only.
        os.chmod(self.keys_dir, 0o700)
        os.chmod(self.results_dir, 0o700)
        zmq.auth.create_certificates(self.keys_dir, "server")
        os.chmod(self.server_secret_key_path, 0o600)

        signing_key = Ed25519PrivateKey.generate()
        atomic_write(self.audit_private_key_path, signing_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
        atomic_write(self.audit_public_key_path, signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

        # Imported here: the stores import this module for its paths.
        from owner_console.approvals import ApprovalStore
        ApprovalStore(self.approvals_path).close()
        self.audit_path.touch()
        # Written last: its presence marks a complete workspace.
        atomic_write(self.config_path, tomli_w.dumps({"approval_ttl_seconds": approval_ttl_seconds,
                                                      "approval_reuse": approval_reuse,
                                                      "server": {"bind": bind}}).encode())

    def require(self) -> "Workspace":
        """Return self if this is an initialised workspace, else raise WorkspaceError."""
        if not self.config_path.is_file():
            raise WorkspaceError(f"{self.path} is not a Bastion workspace "
                                 "(run: bastion-owner init --workspace DIR)")
        return self

    # -- stores ------------------------------------------------------------
    def approvals(self):
        """An :class:`owner_console.approvals.ApprovalStore` on this workspace's queue."""
        from owner_console.approvals import ApprovalStore
        return ApprovalStore(self.require().approvals_path)

    def audit_log(self):
        """An :class:`owner_console.audit.AuditLog` that appends to this workspace's log."""
        from owner_console.audit import AuditLog
        return AuditLog(self.require().audit_path, self.audit_private_key_path)

    # -- configuration -----------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.toml``; ``config["server"]["bind"]`` is always present."""
        data = _read_toml(self.require().config_path)
        server = data.setdefault("server", {})
        if not isinstance(server, dict):
            raise WorkspaceError(f"{self.config_path}: [server] must be a table")
        bind = server.setdefault("bind", DEFAULT_BIND)
        if not isinstance(bind, str):
            raise WorkspaceError(f"{self.config_path}: server.bind must be a string")
        return data

    @property
    def approval_ttl_seconds(self) -> int:
        """Seconds an approval stays valid (``approval_ttl_seconds`` in ``config.toml``; default 7 days)."""
        ttl = self.config.get("approval_ttl_seconds", DEFAULT_APPROVAL_TTL_SECONDS)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise WorkspaceError(f"{self.config_path}: approval_ttl_seconds must be a whole number >= 1")
        return ttl

    @property
    def approval_reuse(self) -> str:
        """``"until_expiry"`` (re-runs of an approved query get its result until the approval expires) or
        ``"once"`` (an approval serves one release); ``approval_reuse`` in ``config.toml``."""
        return _check_reuse(self.config.get("approval_reuse", DEFAULT_APPROVAL_REUSE),
                            f"{self.config_path}: approval_reuse")

    @property
    def bind(self) -> str:
        """The endpoint the executor binds by default."""
        return self.config["server"]["bind"]

    def server_keys(self) -> tuple[bytes, bytes]:
        """The executor's CURVE key pair ``(public, secret)``, Z85-encoded."""
        public, secret = zmq.auth.load_certificate(self.require().server_secret_key_path)
        if not secret:
            raise WorkspaceError(f"{self.server_secret_key_path} holds no secret key")
        return public, secret

    # -- datasets ----------------------------------------------------------
    def add_dataset(self, name: str, file: str | os.PathLike, *, min_group_size: int = 10,
                    hidden: Iterable[str] = (), unsafe: str = "review", allow_save: bool = True,
                    replace: bool = False, dp: Any = None, engine: str = "polars", **settings: Any) -> Dataset:
        """Register a CSV or Parquet file (or, on Spark, another source) under ``name`` with its policy.

        Checks that the source reads and that every hidden column exists, then
        writes ``datasets/NAME.toml``.

        Parameters
        ----------
        name : str
            Dataset name the scientist types in ``dataset(NAME)``.
        file : path or str
            A ``.csv`` or ``.parquet`` file; stored as an absolute path.  With
            ``engine="spark"`` also a directory of such files, a Delta table's
            directory or ``table:NAME``, a table of the Spark catalog (see
            :func:`owner_console.engine.spark.sources.resolve_source`).
        min_group_size, hidden, unsafe, allow_save
            The :class:`owner_console.model.Policy` fields.
        **settings
            Optional policy settings: ``person_id``, ``dominance``, ``max_share``,
            ``suppress_small_groups``, ``aggregates_only``, ``max_rows_released``,
            ``max_join_rows``, ``query_timeout_seconds``, ``bounds``, ``scientists``.
        replace : bool
            Overwrite an existing registration of ``name``.
        dp : DPPolicy or dict, optional
            A differential privacy policy (:class:`owner_console.dp.DPPolicy`,
            or its ``[dp]`` table): the dataset then releases only DP aggregates.
        engine : str
            ``"polars"`` (the default: the executor reads the file) or
            ``"spark"`` (the workspace's ``[spark]`` runs its queries).

        Returns
        -------
        Dataset
        """
        self.require()
        check_name(name, "dataset")
        target = self.datasets_dir / f"{name}.toml"
        if target.exists() and not replace:
            raise WorkspaceError(f"dataset {name!r} is already registered ({target})")
        if engine not in ENGINE_NAMES:
            raise WorkspaceError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
        if engine == "spark":
            return self._add_spark_dataset(name, str(file), target, min_group_size=min_group_size, hidden=hidden,
                                           unsafe=unsafe, allow_save=allow_save, dp=dp, **settings)
        path = Path(file).expanduser().absolute()
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise WorkspaceError(f"{path}: unsupported file type {path.suffix!r}; "
                                 f"expected one of {', '.join(sorted(FORMATS))}")
        if not path.is_file():
            raise WorkspaceError(f"{path}: no such file")
        policy = _new_policy(min_group_size, unsafe, hidden, allow_save, settings)
        columns = read_columns(path, fmt)
        _check_policy_columns(policy, columns, path.name)
        dp_policy = _new_dp_policy(dp, columns, path.name)
        record = {"name": name, "path": str(path), "format": fmt, "policy": policy.to_dict()}
        if dp_policy is not None:
            record["dp"] = dp_policy.to_dict()
        # Per-scientist overrides live in their own [scientists.NAME] tables.
        scientists = record["policy"].pop("scientists", None)
        if scientists:
            record["scientists"] = scientists
        atomic_write(target, tomli_w.dumps(record).encode())
        if dp_policy is not None:
            dp_policy = dataclasses.replace(dp_policy, ledger=self.dp_ledger_path)
        return Dataset(name=name, path=path, format=fmt, policy=policy, dp=dp_policy)

    def _add_spark_dataset(self, name: str, source: str, target: Path, *, min_group_size: int, hidden: Iterable[str],
                           unsafe: str, allow_save: bool, dp: Any = None, **settings: Any) -> Dataset:
        """:meth:`add_dataset` for the Spark engine: a file, directory, Delta path or ``table:NAME``.

        The columns of a file or directory are read with polars (its header or
        footer; no Spark starts); those of a Delta table or a catalog table
        through the workspace's Spark (``[spark]``), which must be reachable.
        """
        from owner_console.engine.spark import sources

        policy = _new_policy(min_group_size, unsafe, hidden, allow_save, settings)
        found = sources.resolve_source(source)
        dataset = Dataset(name=name, path=None if found["path"] is None else Path(found["path"]),
                          format=found["format"], policy=policy, engine="spark",
                          source_kind=found["source_kind"], table=found["table"])
        if dp is not None and dataset.source_kind != "file":
            raise WorkspaceError(SPARK_DP_NEEDS_A_FILE)
        columns = self._spark_source_columns(dataset)
        _check_policy_columns(policy, columns, dataset.source)
        dp_policy = _new_dp_policy(dp, columns, dataset.source)
        if dp_policy is not None:
            dataset = dataclasses.replace(dataset, dp=dataclasses.replace(dp_policy, ledger=self.dp_ledger_path))
        record = {"name": name, "engine": "spark", "source_kind": dataset.source_kind, "format": dataset.format,
                  **({"table": dataset.table} if dataset.source_kind == "table" else {"path": str(dataset.path)}),
                  "policy": policy.to_dict(), **({"dp": dp_policy.to_dict()} if dp_policy is not None else {})}
        scientists = record["policy"].pop("scientists", None)
        if scientists:
            record["scientists"] = scientists
        atomic_write(target, tomli_w.dumps(record).encode())
        return dataset

    def _spark_source_columns(self, dataset: Dataset) -> list[str]:
        """The columns of a Spark dataset's source: polars for files and directories, Spark for the others."""
        if dataset.source_kind in ("file", "directory"):
            from owner_console.engine.spark.sources import data_files

            path = dataset.path
            first = path if dataset.source_kind == "file" else path / data_files(path)[0][0]
            return read_columns(first, dataset.format)
        from bastion_kernel.contract.protocol import BastionError
        from owner_console.engine.spark import session
        from owner_console.engine.spark.engine import SparkEngine

        session.configure(session.settings_of(self))
        session.session()  # a Spark that does not start says why here, as a WorkspaceError
        try:
            return list(SparkEngine().columns(dataset))
        except BastionError as exc:
            if dataset.format == "delta" and exc.details.get("spark_condition", "").startswith("DATA_SOURCE_NOT_FOUND"):
                raise WorkspaceError(f"{dataset.source}: this Spark cannot read Delta tables; add Delta Lake to it "
                                     "(docs/scale-out.md)") from None
            raise WorkspaceError(f"{dataset.source}: {exc.evalue}"
                                 f"{'; ' + exc.details['spark_condition'] if 'spark_condition' in exc.details else ''}"
                                 ) from None

    def load_dataset(self, toml_path: Path) -> Dataset:
        """Read one ``datasets/NAME.toml``; raises WorkspaceError naming the file if malformed."""
        data = _read_toml(toml_path)
        try:
            name = check_name(data.get("name"), "dataset")
            if name != toml_path.stem:
                raise WorkspaceError(f"name {name!r} does not match the file name")
            fmt = data.get("format")
            path = data.get("path")
            engine = data.get("engine", "polars")
            if engine not in ENGINE_NAMES:
                raise WorkspaceError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {engine!r}")
            source_kind, table = data.get("source_kind", "file"), data.get("table")
            if engine == "spark":
                from owner_console.engine.spark.sources import check_record
                check_record(source_kind, fmt, path, table)
            else:
                if fmt not in set(FORMATS.values()):
                    raise WorkspaceError(f"format must be csv or parquet, got {fmt!r}")
                if not isinstance(path, str) or not os.path.isabs(path):
                    raise WorkspaceError("path must be an absolute path")
                if source_kind != "file" or table is not None:
                    raise WorkspaceError("a polars dataset is one file: source_kind and table are for Spark")
            policy_data = data.get("policy", {})
            if not isinstance(policy_data, dict):
                raise WorkspaceError("[policy] must be a table")
            scientists = data.get("scientists", {})
            if not isinstance(scientists, dict):
                raise WorkspaceError("[scientists] must hold one table per scientist, [scientists.NAME]")
            if scientists:
                policy_data = {**policy_data, "scientists": {**policy_data.get("scientists", {}), **scientists}}
            policy = Policy.from_dict(policy_data)
            dp_policy = None
            if "dp" in data:
                from owner_console.dp import DPPolicy  # only DP datasets need it
                dp_policy = DPPolicy.from_dict(data["dp"], ledger=self.dp_ledger_path)
            if dp_policy is not None and source_kind != "file":
                raise WorkspaceError(SPARK_DP_NEEDS_A_FILE)
            extra = set(data) - {"name", "path", "format", "policy", "scientists", "dp", "engine", "source_kind",
                                 "table"}
            if extra:
                raise WorkspaceError(f"unknown setting {sorted(extra)[0]!r}")
        except (WorkspaceError, ValueError, TypeError) as exc:
            raise WorkspaceError(f"{toml_path}: {exc}") from None
        return Dataset(name=name, path=None if path is None else Path(path), format=fmt, policy=policy, dp=dp_policy,
                       engine=engine, source_kind=source_kind, table=table)

    def catalog_with_errors(self) -> tuple[dict[str, Dataset], list[WorkspaceError]]:
        """All registered datasets, plus one error per malformed file (which is skipped)."""
        catalog: dict[str, Dataset] = {}
        errors: list[WorkspaceError] = []
        for toml_path in sorted(self.require().datasets_dir.glob("*.toml")):
            try:
                dataset = self.load_dataset(toml_path)
            except WorkspaceError as exc:
                errors.append(exc)
                continue
            catalog[dataset.name] = dataset
        return catalog, errors

    def catalog(self) -> dict[str, Dataset]:
        """All registered datasets by name; raises WorkspaceError on the first malformed file."""
        catalog, errors = self.catalog_with_errors()
        if errors:
            raise errors[0]
        return catalog

    # -- mocks -------------------------------------------------------------
    def add_mock(self, name: str, *, rows: int | None = None, from_file: str | os.PathLike | None = None,
                 categories: Iterable[str] = (), seed: int = 0) -> dict[str, Any]:
        """Publish (or replace) the mock of dataset ``name``: ``mocks/NAME.parquet`` and ``mocks/NAME.toml``.

        Generated from the dataset's schema and the owner's public facts
        (policy bounds, DP public keys, ``categories``), never from its rows;
        or read from ``from_file``, which must have the same schema (see
        :mod:`owner_console.mock`).

        Parameters
        ----------
        name : str
            A registered dataset.
        rows : int, optional
            Rows to generate (default :data:`owner_console.mock.DEFAULT_ROWS`); not with ``from_file``.
        from_file : path, optional
            The owner's own mock table (CSV or Parquet).
        categories : iterable of str
            ``COL=a,b,c`` items: public values of a column, kept in ``mocks/NAME.toml``.
        seed : int
            Seed of the generator (the same facts and seed make the same mock).

        Returns
        -------
        dict
            The mock's description, as written to ``mocks/NAME.toml``.
        """
        import io

        from owner_console import mock
        from owner_console.engine import source_schema

        self.require()
        check_name(name, "dataset")
        dataset = self.catalog_with_errors()[0].get(name)
        if dataset is None:
            raise WorkspaceError(f"no dataset {name!r} in {self.path} (bastion-owner dataset add registers one)")
        from bastion_kernel.contract.protocol import BastionError
        try:
            schema = source_schema(dataset)
        except BastionError as exc:
            raise WorkspaceError(f"{dataset.path}: {exc.evalue}") from None
        try:
            declared = mock.parse_categories(categories, schema)
            if from_file is not None:
                if rows is not None or declared:
                    raise mock.MockError("--rows and --categories describe a generated mock; not with --from")
                table = mock.from_file(Path(from_file), schema, dataset.path)
            else:
                bounds, known = mock.public_facts(dataset)
                table = mock.generate(schema, mock.DEFAULT_ROWS if rows is None else rows, bounds=bounds,
                                      categories={**known, **declared}, seed=seed)
        except mock.MockError as exc:
            raise WorkspaceError(str(exc)) from None
        self.mocks_dir.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        table.write_parquet(buffer)
        data = buffer.getvalue()
        target = self.mocks_dir / f"{name}.parquet"
        atomic_write(target, data)
        record: dict[str, Any] = {"name": name, "path": str(target), "rows": table.height,
                                  "origin": "file" if from_file is not None else "generated",
                                  "sha256": hashlib.sha256(data).hexdigest(),
                                  "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        if from_file is not None:
            record["from"] = str(Path(from_file).expanduser().absolute())
        else:
            record["seed"] = seed
            if declared:
                record["categories"] = {column: list(values) for column, values in declared.items()}
        atomic_write(self.mocks_dir / f"{name}.toml", tomli_w.dumps(record).encode())
        return record

    def mocks(self) -> dict[str, dict[str, Any]]:
        """The published mocks, ``{dataset name: description}``; malformed or file-less entries are skipped."""
        found: dict[str, dict[str, Any]] = {}
        if not self.require().mocks_dir.is_dir():
            return found
        for toml_path in sorted(self.mocks_dir.glob("*.toml")):
            try:
                record = _read_toml(toml_path)
                name = check_name(record.get("name"), "dataset")
            except WorkspaceError:
                continue  # a broken entry publishes nothing
            path = self.mocks_dir / f"{name}.parquet"
            if name == toml_path.stem and path.is_file():
                found[name] = {**record, "path": str(path)}
        return found

    # -- scientists --------------------------------------------------------
    def add_scientist(self, name: str, key_file: str | os.PathLike, replace: bool = False) -> bytes:
        """Allow-list the CURVE public key in ``key_file`` under ``name``.

        ``key_file`` is a certificate written by ``zmq.auth.create_certificates``
        (the ``.key`` file; only its public key is kept).  Returns the Z85 key.
        """
        self.require()
        check_name(name, "scientist")
        target = self.scientists_dir / f"{name}.toml"
        if target.exists() and not replace:
            raise WorkspaceError(f"scientist {name!r} is already registered ({target})")
        public = read_public_key(key_file)
        for key, other in self.scientists().items():
            if key == public and other != name:
                raise WorkspaceError(f"this key is already registered for scientist {other!r}")
        record = {"name": name, "public_key": public.decode("ascii"),
                  "added_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write(target, tomli_w.dumps(record).encode())
        return public

    def scientist_key(self, name: str) -> bytes | None:
        """The Z85 public key allowed under ``name`` (None if no valid entry has that name)."""
        for key, other in self.scientists().items():
            if other == name:
                return key
        return None

    def remove_scientist(self, name: str) -> bytes | None:
        """Take ``name`` off the allow-list; returns the key it had (None if its file held no valid key).

        Raises WorkspaceError if ``name`` is not registered.  The file is
        unlinked and the directory fsynced, so the removal survives a crash.
        """
        self.require()
        check_name(name, "scientist")
        target = self.scientists_dir / f"{name}.toml"
        if not target.is_file():
            raise WorkspaceError(f"no scientist {name!r} in {self.path}")
        key = self.scientist_key(name)
        target.unlink()
        dir_fd = os.open(self.scientists_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key

    def scientists(self) -> dict[bytes, str]:
        """The allow-list: ``{Z85 public key: scientist name}``; malformed files are skipped."""
        allowed: dict[bytes, str] = {}
        for toml_path in sorted(self.require().scientists_dir.glob("*.toml")):
            try:
                data = _read_toml(toml_path)
                name = check_name(data.get("name"), "scientist")
                key = _check_z85_key(str(data.get("public_key", "")).encode("ascii", "replace"),
                                     str(toml_path))
            except WorkspaceError:
                continue  # a broken entry grants nothing
            allowed[key] = name
        return allowed


class AllowList:
    """The workspace's allow-list as the executor checks it: on every message, cheaply.

    The scientists directory is re-read only when it changed: its
    modification time and inode are compared on each lookup (one ``stat``).
    ``scientist add``, ``scientist remove`` and a rotation replace or delete a
    file in that directory, which changes its modification time.  A time
    within :data:`RACY_SECONDS` of the last read could hide a second change
    in the same clock tick, so until the directory is that old it is re-read
    on every lookup.  (An edit that rewrites a file in place leaves the
    directory unchanged: use the command line.)  Safe to share between
    threads.

    Parameters
    ----------
    workspace : Workspace
    """

    RACY_SECONDS = 2.0

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._read_at = 0.0
        self._names: dict[bytes, str] = {}

    def names(self) -> dict[bytes, str]:
        """``{Z85 public key: scientist name}`` as the directory holds it now."""
        directory = self.workspace.scientists_dir
        stat = os.stat(directory)
        stamp = (stat.st_mtime_ns, stat.st_ino)
        with self._lock:
            if stamp != self._stamp or self._read_at - stat.st_mtime_ns / 1e9 < self.RACY_SECONDS:
                read_at = time.time()
                self._names = self.workspace.scientists()
                self._stamp, self._read_at = stamp, read_at
            return self._names

    def name_of(self, key: bytes | str) -> str | None:
        """The scientist allowed with this Z85 public key now, or None."""
        return self.names().get(key.encode("ascii", "replace") if isinstance(key, str) else bytes(key))


def read_public_key(key_file: str | os.PathLike) -> bytes:
    """The Z85 CURVE public key in a certificate file (``.key`` or ``.key_secret``); raises WorkspaceError."""
    key_path = Path(key_file).expanduser()
    if not key_path.is_file():
        raise WorkspaceError(f"{key_path}: no such file")
    try:
        public, _secret = zmq.auth.load_certificate(key_path)
    except Exception as exc:  # pyzmq raises ValueError/OSError/IndexError on bad files
        raise WorkspaceError(f"{key_path}: not a CURVE certificate ({exc})") from None
    return _check_z85_key(public, str(key_path))


def _new_policy(min_group_size: int, unsafe: str, hidden: Iterable[str], allow_save: bool,
                settings: dict[str, Any]) -> Policy:
    """A dataset's policy from ``dataset add``'s options, or a WorkspaceError naming what is wrong."""
    if unsafe not in UNSAFE_MODES:
        raise WorkspaceError(f"unsafe must be one of {', '.join(UNSAFE_MODES)}, got {unsafe!r}")
    try:
        return Policy(min_group_size=min_group_size, unsafe=unsafe, hidden=frozenset(hidden), allow_save=allow_save,
                      **settings)
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(str(exc)) from None


def _new_dp_policy(dp: Any, columns: Iterable[str], source: str) -> Any:
    """A dataset's DP policy (a DPPolicy or its dict) checked against its columns; None without one."""
    if dp is None:
        return None
    from owner_console.dp import DPPolicy, check_columns
    try:
        dp_policy = dp if isinstance(dp, DPPolicy) else DPPolicy.from_dict(dp)
        check_columns(dp_policy, columns, source)
    except (ValueError, TypeError) as exc:
        raise WorkspaceError(str(exc)) from None
    return dp_policy


def _check_policy_columns(policy: Policy, columns: list[str], where: str) -> None:
    """Refuse a policy that names a column the source does not have (hidden, bounds, person id)."""
    missing = sorted(policy.hidden - set(columns))
    if missing:
        raise WorkspaceError(f"hidden column {missing[0]!r} is not in {where} (columns: {', '.join(columns)})")
    unknown_bounds = sorted(set(policy.bounds) - set(columns))
    if unknown_bounds:
        raise WorkspaceError(f"bounds column {unknown_bounds[0]!r} is not in {where} "
                             f"(columns: {', '.join(columns)})")
    if policy.person_id is not None and policy.person_id not in columns:
        raise WorkspaceError(f"person id column {policy.person_id!r} is not in {where} "
                             f"(columns: {', '.join(columns)})")


def read_columns(path: Path, fmt: str) -> list[str]:
    """The column names of a data file; raises WorkspaceError if polars cannot read it."""
    import polars as pl  # only for reading headers; the engine owns execution
    try:
        if fmt == "csv":
            schema = pl.scan_csv(path).collect_schema()
        else:
            schema = pl.read_parquet_schema(path)
    except Exception as exc:  # polars raises many error types for unreadable files
        raise WorkspaceError(f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0][:200]}") from None
    return list(schema)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise WorkspaceError(f"{path}: malformed TOML: {exc}") from None
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read: {exc.strerror}") from None


def _check_reuse(value: Any, what: str) -> str:
    from owner_console.approvals import REUSE_MODES
    if value not in REUSE_MODES:
        raise WorkspaceError(f"{what} must be one of {', '.join(REUSE_MODES)}, got {value!r}")
    return value


def _check_z85_key(key: bytes, where: str) -> bytes:
    try:
        raw = z85.decode(key) if len(key) == 40 else b""
    except Exception:
        raw = b""
    if len(raw) != 32:
        raise WorkspaceError(f"{where}: no valid CURVE public key")
    return bytes(key)
