"""Saved results: tables a scientist kept on the owner's side with ``save(name)``.

Layout, inside the workspace ``DIR``::

    DIR/saved/<scientist>/<name>.json              the sidecar: policy, lineage, file, hashes
    DIR/saved/<scientist>/<name>.<version>.parquet the table (real values; hidden by the policy)

The sidecar names the Parquet file of its version, and is replaced
atomically after that file is written: a reader sees either the old table
with the old policy or the new table with the new policy, never a mix (a
saved result replaced by one with more hidden columns must never be read
under the old policy).  Directories and files are for the owner's eyes only.

A saved result is read back as a :class:`owner_console.model.Dataset` in the
catalog of the scientist who saved it, and of no one else: the executor
builds each scientist's catalog from the owner's datasets plus
:meth:`SavedResults.catalog` of that scientist.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Iterable

from bastion_kernel.contract.protocol import BastionError
from owner_console.model import Dataset, Policy
from owner_console.workspace import NAME_PATTERN, atomic_write

log = logging.getLogger("bastion.saved")

SIDECAR_FIELDS = ("name", "scientist", "file", "policy", "sources", "plan_hash", "text", "saved_at",
                  "rows", "columns", "sha256")


def check_saved_name(name: Any) -> str:
    """Return ``name`` if it may name a saved result (it becomes a file name), else raise ``SchemaError``."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise BastionError("SchemaError", f"invalid name {shown!r} for a saved result: use letters, digits, "
                                          "'_' or '-', starting with a letter or '_', at most 64 characters")
    return name


class SavedResults:
    """The saved results of every scientist of one workspace.

    Parameters
    ----------
    root : Path
        The ``saved`` directory of the workspace (created on first save).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, scientist: str) -> Path:
        # Scientist names come from the allow-list, which holds only valid names;
        # checked again because they become a directory name.
        if NAME_PATTERN.fullmatch(scientist) is None:
            raise ValueError(f"invalid scientist name {scientist!r}")
        return self.root / scientist

    def save(self, scientist: str, name: str, table: Any, policy: Policy, *, sources: Iterable[str],
             plan_hash: str, text: str = "") -> tuple[Dataset, dict]:
        """Keep ``table`` under ``name`` for ``scientist``, replacing an earlier result of that name.

        Parameters
        ----------
        scientist : str
            The authenticated owner of the result.
        name : str
            Checked with :func:`check_saved_name`.
        table : polars.DataFrame
            The scientist's columns, real values (from ``executor.prepare_save``).
        policy : Policy
            The inherited policy.
        sources : iterable of str
            The owner's datasets the result was derived from (its lineage).
        plan_hash, text : str
            The plan's hash and the cell text, kept for the owner.

        Returns
        -------
        (Dataset, dict)
            The result as a dataset, and its sidecar record.
        """
        check_saved_name(name)
        directory = self._dir(scientist)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        buffer = io.BytesIO()
        table.write_parquet(buffer)
        data = buffer.getvalue()
        data_path = directory / f"{name}.{uuid.uuid4().hex}.parquet"
        atomic_write(data_path, data, mode=0o600)
        sidecar_path = directory / f"{name}.json"
        previous = self._record(sidecar_path)
        record = {
            "name": name, "scientist": scientist, "file": data_path.name, "policy": policy.to_dict(),
            "sources": sorted(set(sources)), "plan_hash": plan_hash, "text": text[:10_000],
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": table.height, "columns": [[c, str(t)] for c, t in table.schema.items()],
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write(sidecar_path, json.dumps(record, indent=1).encode(), mode=0o600)
        if previous is not None and previous.get("file") != data_path.name:
            # The old version is unreachable now; a query that already opened it has it in memory.
            (directory / previous["file"]).unlink(missing_ok=True)
        return self._dataset(directory, record), record

    def catalog(self, scientist: str) -> dict[str, Dataset]:
        """``{name: Dataset}`` of the results ``scientist`` saved; malformed entries are skipped (and logged)."""
        directory = self._dir(scientist)
        if not directory.is_dir():
            return {}
        found: dict[str, Dataset] = {}
        for sidecar in sorted(directory.glob("*.json")):
            record = self._record(sidecar)
            if record is None:
                continue
            try:
                found[record["name"]] = self._dataset(directory, record)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("skipping saved result %s: %s", sidecar, exc)
        return found

    def record(self, scientist: str, name: str) -> dict | None:
        """The sidecar of one saved result, or None."""
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            return None
        return self._record(self._dir(scientist) / f"{name}.json")

    @staticmethod
    def _record(sidecar: Path) -> dict | None:
        try:
            record = json.loads(sidecar.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("unreadable saved result %s: %s", sidecar, exc)
            return None
        if not isinstance(record, dict) or set(record) != set(SIDECAR_FIELDS) \
                or record.get("name") != sidecar.stem or not isinstance(record.get("file"), str):
            log.error("malformed saved result %s", sidecar)
            return None
        return record

    @staticmethod
    def _dataset(directory: Path, record: dict) -> Dataset:
        file = record["file"]
        # The file must be this result's own Parquet file in the same directory.
        if Path(file).name != file or not file.startswith(f"{record['name']}.") or not file.endswith(".parquet"):
            raise ValueError(f"unexpected data file {file!r}")
        return Dataset(name=record["name"], path=directory / file, format="parquet",
                       policy=Policy.from_dict(record["policy"]))
