"""The version of the data a plan reads: what a held request and its approval are bound to."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bastion_kernel.contract import walk
from bastion_kernel.contract.plan import canonical_json


def data_version(plan: Any, catalog: dict, scientist: str) -> str:
    """The identity of the data a plan reads: each source's file version and policy, hashed ("" if unknown).

    A source's version is its resolved path, size and modification time (as
    :class:`owner_console.engine.DatasetCache` keys its copies), with the
    policy (and DP policy) that applies to ``scientist``: a replaced file or
    a changed policy is a new version, and an approval of the old one does
    not answer the query on the new one.
    """
    parts = []
    for name in sorted(walk.source_names(plan)):
        dataset = catalog.get(name)
        if dataset is None:
            return ""
        if getattr(dataset, "engine", "polars") != "polars":
            # A directory, a Delta table or a catalog table: its engine knows its version.
            from owner_console.engine import engine_for
            source = engine_for([dataset]).data_version(dataset)
            if not source:
                return ""
            parts.append([name, source, dataset.policy.for_scientist(scientist).to_dict(), None])
            continue
        try:
            path = Path(dataset.path).resolve()
            stat = path.stat()
        except OSError:
            return ""
        # (for_scientist drops the overrides table; a policy without one is already as it applies)
        policy = dataset.policy.for_scientist(scientist) if dataset.policy.scientists else dataset.policy
        parts.append([name, str(path), stat.st_size, stat.st_mtime_ns, policy.to_dict(),
                      dataset.dp.to_dict() if getattr(dataset, "dp", None) is not None else None])
    return hashlib.sha256(canonical_json(parts)).hexdigest() if parts else ""
