"""The executor reads its datasets' files again only when one changed (a stat per file decides)."""
from __future__ import annotations

import os
import time

from owner_console.sample_data import write_patients
from owner_console.server import ExecutorServer
from owner_console.workspace import AllowList, Workspace


def _age(path, seconds: float) -> None:
    """Set a file's modification time ``seconds`` in the past (out of the racy window)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_catalog_is_read_again_exactly_when_a_dataset_file_changes(tmp_path):
    data = write_patients(tmp_path / "patients.csv", rows=200)
    workspace = Workspace(tmp_path / "workspace")
    workspace.init()
    workspace.add_dataset("patients", data, min_group_size=10, hidden=["name"])
    server = ExecutorServer(workspace, bind="tcp://127.0.0.1:*")
    try:
        settled = AllowList.RACY_SECONDS + 5
        _age(workspace.datasets_dir / "patients.toml", settled)
        _age(workspace.datasets_dir, settled)
        first = server._catalog()["patients"]
        assert server._catalog()["patients"] is first  # unchanged files: not parsed again

        # The owner changes the policy: the next request sees it.
        workspace.add_dataset("patients", data, min_group_size=12, hidden=["name"], replace=True)
        changed = server._catalog()["patients"]
        assert changed.policy.min_group_size == 12

        # Edited in place within the racy window (same size, same second): read again on every request.
        toml = workspace.datasets_dir / "patients.toml"
        toml.write_text(toml.read_text().replace("min_group_size = 12", "min_group_size = 13"))
        assert server._catalog()["patients"].policy.min_group_size == 13

        # A new, malformed dataset file is skipped (and logged once); the others are still served.
        (workspace.datasets_dir / "broken.toml").write_text("name = \n")
        catalog = server._catalog()
        assert set(catalog) == {"patients"} and catalog["patients"].policy.min_group_size == 13
        (workspace.datasets_dir / "broken.toml").unlink()
        assert set(server._catalog()) == {"patients"}
    finally:
        server._close()
