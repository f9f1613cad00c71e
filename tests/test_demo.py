"""The demo and the example notebooks, for real.

``python -m owner_console.demo`` is run as a separate process in a temporary
demo directory (never the repository's ``demo/``), with its executor and
JupyterLab on free 127.0.0.1 ports.  The scientist's notebook is executed
by nbclient (a batch run: a held cell ends at once with ``ReviewPending``) on
the real Bastion kernel against the demo's executor, while an "owner" thread
approves what the executor holds; run again, as after Restart & Run All, every
approved query is answered at once and no new request is filed.  Its answers
are compared with plain polars on the same CSV.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nbformat
import polars as pl
import pytest

from bastion_kernel.config import load_config
from owner_console.approvals import ApprovalStore
from owner_console.workspace import Workspace

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STARTUP_SECONDS = 120
DATARESOURCE = "application/vnd.dataresource+json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_demo(demo_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owner_console.demo", "--demo-dir", str(demo_dir), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          cwd=ROOT, env=dict(os.environ, CI="true"))


class DemoProcess:
    """``python -m owner_console.demo`` in the background, its output collected line by line."""

    def __init__(self, demo_dir: Path, *args: str):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "owner_console.demo", "--demo-dir", str(demo_dir), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=ROOT, env=dict(os.environ, CI="true"))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = STARTUP_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the demo never printed {text!r}:\n{self.output()}")
            time.sleep(0.1)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C, as a person would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self._reader.join(5)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# -- the example notebooks as files ------------------------------------------------------

@pytest.mark.parametrize("name", ["scientist.ipynb", "owner.ipynb"])
def test_example_notebooks_are_valid_nbformat_4(name):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert any(cell.cell_type == "code" for cell in notebook.cells)


def test_scientist_notebook_uses_the_bastion_kernel_and_parses_as_the_language():
    notebook = nbformat.read(EXAMPLES / "scientist.ipynb", as_version=4)
    assert notebook.metadata.kernelspec == {"name": "bastion", "display_name": "Bastion", "language": "bastion"}
    for cell in notebook.cells:
        if cell.cell_type == "code" and not cell.source.startswith("%%"):
            ast.parse(cell.source)  # the kernel reads cells with Python's grammar


def test_owner_notebook_uses_python3():
    notebook = nbformat.read(EXAMPLES / "owner.ipynb", as_version=4)
    assert notebook.metadata.kernelspec.name == "python3"


# -- set-up --------------------------------------------------------------------------------

def test_setup_only_builds_the_demo_and_a_second_run_reuses_it(tmp_path):
    demo_dir = tmp_path / "demo"
    port = free_port()
    first = run_demo(demo_dir, "--setup-only", "--port", str(port))
    assert first.returncode == 0, first.stdout + first.stderr

    workspace = Workspace(demo_dir / "workspace").require()
    dataset = workspace.catalog()["patients"]
    assert dataset.policy.min_group_size == 10
    assert dataset.policy.hidden == frozenset({"name"})
    assert pl.read_csv(dataset.path).height == 5000
    config = load_config(demo_dir / "scientist" / "config.toml")
    assert config.endpoint == f"tcp://127.0.0.1:{port}"
    assert config.server_public_key == workspace.server_keys()[0]
    assert workspace.scientists() == {config.public_key: "alice"}

    kernels = subprocess.run([sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
                             capture_output=True, text=True, timeout=60)
    assert kernels.returncode == 0, kernels.stderr
    assert json.loads(kernels.stdout)["kernelspecs"]["bastion"]["spec"]["display_name"] == "Bastion"

    server_key = workspace.server_public_key_path.read_bytes()
    data = dataset.path.read_bytes()
    second = run_demo(demo_dir, "--setup-only", "--port", str(port))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing the workspace" in second.stdout
    assert workspace.server_public_key_path.read_bytes() == server_key
    assert dataset.path.read_bytes() == data
    assert load_config(demo_dir / "scientist" / "config.toml").public_key == config.public_key


def test_the_no_lab_instructions_give_absolute_paths(tmp_path, monkeypatch):
    from owner_console.demo import DemoPaths, instructions

    monkeypatch.chdir(tmp_path)
    text = instructions(DemoPaths(root=Path("."), demo=Path("demo")), "tcp://127.0.0.1:5555", None)
    [config] = re.findall(r"BASTION_CONFIG=(\S+)", text)
    assert Path(config).is_absolute() and Path(config) == tmp_path / "demo" / "scientist" / "config.toml"
    workspace = re.findall(r"--workspace (\S+)", text)
    assert workspace and all(Path(path) == tmp_path / "demo" / "workspace" for path in workspace)


# -- the full demo: executor + JupyterLab, then Ctrl-C -------------------------------------------

def test_demo_serves_jupyterlab_and_the_executor_and_stops_on_ctrl_c(tmp_path):
    port, lab_port = free_port(), free_port()
    demo = DemoProcess(tmp_path / "demo", "--port", str(port), "--lab-port", str(lab_port))
    try:
        demo.wait_for("Bastion demo is running")
        urls = re.findall(r"http://127\.0\.0\.1:\d+/lab/tree/examples/scientist\.ipynb\?token=\w+", demo.output())
        assert urls, demo.output()
        token = urls[0].rsplit("=", 1)[1]
        request = urllib.request.Request(f"http://127.0.0.1:{lab_port}/api/kernelspecs",
                                         headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            specs = json.load(answer)
        assert specs["kernelspecs"]["bastion"]["spec"]["display_name"] == "Bastion"
        assert listening(port) and listening(lab_port)
    finally:
        status = demo.interrupt()
    assert status == 0, demo.output()
    assert not listening(port) and not listening(lab_port)


# -- the scientist's notebook, run on the real kernel against the demo's executor -----------------

class Approver(threading.Thread):
    """The owner: approves every request the executor holds, with the real ``bastion-owner``."""

    def __init__(self, workspace: Path):
        super().__init__(daemon=True)
        self.workspace = Workspace(workspace)
        self.approved: list[int] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        store = ApprovalStore(self.workspace.approvals_path)
        try:
            while not self.done.wait(0.2):
                for request in store.list("pending"):
                    result = subprocess.run(
                        [sys.executable, "-m", "owner_console.cli", "approve", str(request.id),
                         "--workspace", str(self.workspace.path)],
                        capture_output=True, text=True, timeout=60)
                    if result.returncode == 0:
                        self.approved.append(request.id)
                    else:
                        self.failures.append(result.stderr)
        finally:
            store.close()


def data_of(output: dict) -> pl.DataFrame:
    resource = output["data"][DATARESOURCE]
    return pl.DataFrame(resource["data"])


def tables(cell) -> list[pl.DataFrame]:
    return [data_of(output) for output in cell.outputs
            if output.get("output_type") in ("display_data", "execute_result")
            and DATARESOURCE in output.get("data", {})]


def test_scientist_and_owner_notebooks_run_against_the_demo(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    demo_dir = tmp_path / "demo"
    port = free_port()
    demo = DemoProcess(demo_dir, "--no-lab", "--port", str(port))
    approver = Approver(demo_dir / "workspace")
    try:
        demo.wait_for("Bastion demo is running")
        approver.start()
        monkeypatch.setenv("BASTION_CONFIG", str(demo_dir / "scientist" / "config.toml"))
        monkeypatch.setenv("BASTION_WORKSPACE", str(demo_dir / "workspace"))

        # First run, unattended: held cells end at once with ReviewPending (naming their request); the owner
        # thread approves them meanwhile.
        first = nbformat.read(EXAMPLES / "scientist.ipynb", as_version=4)
        NotebookClient(first, timeout=180, kernel_name="bastion", allow_errors=True,
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        held = [output for cell in first.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
                if output.output_type == "error" and output.ename == "ReviewPending"]
        assert held and all(re.search(r"request #\d+ waits", output.evalue) for output in held)
        store = ApprovalStore(Workspace(demo_dir / "workspace").approvals_path)
        deadline = time.monotonic() + STARTUP_SECONDS
        while store.list("pending"):
            assert time.monotonic() < deadline, "the owner thread did not approve every held request"
            time.sleep(0.2)
        approver.done.set()
        approver.join(30)
        assert not approver.failures, approver.failures
        assert len(approver.approved) >= 2  # the row-level cell and the hidden-column cell
        filed = len(store.list())

        # Run again (Restart & Run All): every approved query comes back at once, nothing new is filed.
        scientist = nbformat.read(EXAMPLES / "scientist.ipynb", as_version=4)
        NotebookClient(scientist, timeout=180, kernel_name="bastion",
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        assert len(store.list()) == filed and not store.list("pending")
        store.close()

        code = {cell.source: cell for cell in scientist.cells if cell.cell_type == "code"}
        patients = pl.read_csv(demo_dir / "data" / "patients.csv")

        by_diagnosis = next(cell for source, cell in code.items() if 'group_by("diagnosis")' in source)
        got = tables(by_diagnosis)[0].sort("diagnosis")
        want = (patients.group_by("diagnosis").agg(pl.len(), pl.col("cost").mean().alias("mean_cost"))
                .sort("diagnosis"))
        assert got["diagnosis"].to_list() == want["diagnosis"].to_list()
        assert got["len"].to_list() == want["len"].to_list()
        assert got["mean_cost"].to_list() == pytest.approx(want["mean_cost"].to_list())

        sql = next(cell for source, cell in code.items() if source.startswith("%%sql"))
        got = tables(sql)[0].sort("sex")
        want = patients.group_by("sex").agg(pl.len().alias("n")).sort("sex")
        assert got["n"].to_list() == want["n"].to_list()

        rows = next(cell for source, cell in code.items() if 'select(col("age"), col("zip"))' in source)
        assert tables(rows)[0].to_dicts() == patients.select("age", "zip").head(5).to_dicts()

        names = next(cell for source, cell in code.items() if 'select(col("name"))' in source)
        assert set(tables(names)[0]["name"].to_list()) == {"*"}

        charts = [cell for source, cell in code.items() if ".plot." in source]
        assert len(charts) == 5
        for cell in charts:  # each chart cell ends with a Vega-Lite chart (the heatmap after the owner's approval)
            results = [o for o in cell.outputs if o.get("output_type") == "execute_result"]
            assert results and "application/vnd.vegalite.v5+json" in results[0]["data"], cell.source
        described = tables(next(cell for source, cell in code.items() if "describe()" in source))[0]
        assert described["statistic"].to_list()[:2] == ["count", "null_count"]

        refused = code["import os"]
        errors = [output for output in refused.outputs if output.output_type == "error"]
        assert errors and "import" in errors[0].evalue.lower()

        # A row-level query left held by an unattended run: the owner's notebook shows it and approves it,
        # and the next run gets it at once.
        def waiting_notebook():
            return nbformat.v4.new_notebook(metadata=scientist.metadata, cells=[
                nbformat.v4.new_code_cell('dataset("patients").select(col("sex")).head(2).fetch()')])

        held_run = waiting_notebook()
        NotebookClient(held_run, timeout=180, kernel_name="bastion", allow_errors=True,
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        [error] = [o for o in held_run.cells[0].outputs if o.output_type == "error"]
        store = ApprovalStore(Workspace(demo_dir / "workspace").approvals_path)
        [pending] = store.list("pending")
        store.close()
        assert error.ename == "ReviewPending" and f"request #{pending.id}" in error.evalue

        owner = nbformat.read(EXAMPLES / "owner.ipynb", as_version=4)
        NotebookClient(owner, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        waiting = waiting_notebook()
        NotebookClient(waiting, timeout=180, kernel_name="bastion",
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute()
        assert tables(waiting.cells[0])[0].to_dicts() == patients.select("sex").head(2).to_dicts()

        owner_code = [cell for cell in owner.cells if cell.cell_type == "code"]
        held = next(cell for cell in owner_code if "read_ipc" in cell.source)
        shown = "".join(output.get("data", {}).get("text/plain", "") for output in held.outputs)
        assert "shape: (2, 1)" in shown and "sex" in shown
        printed = "".join(output.get("text", "") for cell in owner_code for output in cell.outputs)
        assert "audit log verifies" in printed
        assert not any(output.output_type == "error" for cell in owner_code for output in cell.outputs)
    finally:
        approver.done.set()
        status = demo.interrupt()
    assert status == 0, demo.output()
