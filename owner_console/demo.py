"""The demo orchestrator: ``python -m owner_console.demo`` (what ``scripts/demo.sh`` runs).

It plays both parts on one machine, with the same commands a real owner and a
real scientist type, so the demo shows exactly what the README says:

* the owner: ``bastion-owner init``, ``dataset add`` (the synthetic patients
  table, K=10, ``name`` hidden, public bounds of its numeric columns for the
  charts), ``scientist add alice``, ``serve``;
* the scientist: ``bastion-kernel keygen``, ``connect``, ``install``, then
  JupyterLab with ``examples/scientist.ipynb`` on the Bastion kernel.

Everything lives in ``demo/`` (git-ignored) and is reused by the next run.
Both servers listen on 127.0.0.1 only.  Ctrl-C stops JupyterLab and the
executor cleanly.

Options: ``--setup-only`` prepares everything and starts nothing (for tests);
``--no-lab`` starts the executor only.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from owner_console.sample_data import DIAGNOSES, write_patients
from owner_console.workspace import Workspace

LISTENING_LINE = "bastion executor listening on"
DEFAULT_EXECUTOR_PORT = 5555
DEFAULT_LAB_PORT = 8888
DATASET = "patients"
SCIENTIST = "alice"
MIN_GROUP_SIZE = 10
HIDDEN_COLUMNS = ("name",)
# Public facts the owner declares (never read from the data): charts take their ranges and bins from them.
PUBLIC_BOUNDS = ("--bounds", "age=0:100", "--bounds", "length_of_stay=0:60", "--bounds", "cost=0:200000")
# The same table under differential privacy (examples/dp.ipynb): only noisy aggregates, a budget per scientist.
DP_DATASET = "patients_dp"
DP_OPTIONS = ("--privacy", "dp", "--epsilon", "5", "--epsilon-per-query", "0.5", "--hide", "name",
              "--bounds", "age=0:100", "--bounds", "cost=0:50000", "--bounds", "length_of_stay=0:60",
              "--public-keys", "sex=F,M",
              "--public-keys", "diagnosis=" + ",".join(name for name, _, _ in DIAGNOSES))
SCIENTIST_NOTEBOOK = "examples/scientist.ipynb"
OWNER_NOTEBOOK = "examples/owner.ipynb"


class DemoError(Exception):
    """A step of the demo failed; the message says which and where to look."""


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo keeps its files.

    Parameters
    ----------
    root : Path
        The repository (JupyterLab's root directory; holds ``examples/``).
    demo : Path
        The demo directory, ``ROOT/demo`` by default.
    """

    root: Path
    demo: Path

    @property
    def workspace(self) -> Path:
        return self.demo / "workspace"

    @property
    def data_file(self) -> Path:
        return self.demo / "data" / "patients.csv"

    @property
    def scientist_dir(self) -> Path:
        return self.demo / "scientist"

    @property
    def config(self) -> Path:
        return self.scientist_dir / "config.toml"

    @property
    def logs(self) -> Path:
        return self.demo / "logs"

    @property
    def server_key(self) -> Path:
        return Workspace(self.workspace).server_public_key_path


def default_root() -> Path:
    """The repository this module sits in, else the current directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "examples").is_dir() else Path.cwd()


def tool(name: str) -> str:
    """The path of a console script installed beside this Python (the venv's ``bin/``).

    Raises
    ------
    DemoError
        If the script is not installed.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"{name} is not installed: run `bash scripts/demo.sh`, which installs it")
    return found


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a free port the system picks."""
    if port_is_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_step(args: Sequence[str], what: str, log: Callable[[str], None] = print) -> None:
    """Run one command of the set-up, show it, and raise DemoError with its output if it fails."""
    shown = " ".join([Path(args[0]).name, *map(str, args[1:])])
    log(f"  $ {shown}")
    done = subprocess.run(list(map(str, args)), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise DemoError(f"{what} failed (exit status {done.returncode}): {shown}\n{output}")


def set_up(paths: DemoPaths, executor_port: int, log: Callable[[str], None] = print) -> str:
    """Prepare (or reuse) the owner's workspace and the scientist's side; start nothing.

    Each step is skipped when its result is already there, so a second run
    reuses the workspace, the keys and the approvals of the first.

    Parameters
    ----------
    paths : DemoPaths
        Where to put everything.
    executor_port : int
        The executor's port on 127.0.0.1, written into the scientist's configuration.
    log : callable
        Receives one line per step.

    Returns
    -------
    str
        The executor's endpoint, ``tcp://127.0.0.1:PORT``.
    """
    owner, kernel = tool("bastion-owner"), tool("bastion-kernel")
    workspace = Workspace(paths.workspace)
    endpoint = f"tcp://127.0.0.1:{executor_port}"
    paths.logs.mkdir(parents=True, exist_ok=True)

    log("The data owner:")
    if workspace.config_path.is_file():
        log(f"  reusing the workspace {paths.workspace}")
    else:
        run_step([owner, "init", "--workspace", paths.workspace], "creating the owner's workspace", log)
    if not paths.data_file.is_file():
        log(f"  writing the synthetic patients table to {paths.data_file}")
        write_patients(paths.data_file)
    if (workspace.datasets_dir / f"{DATASET}.toml").is_file():
        log(f"  dataset {DATASET!r} is already registered")
    else:
        hide = [arg for column in HIDDEN_COLUMNS for arg in ("--hide", column)]
        run_step([owner, "dataset", "add", "--workspace", paths.workspace, DATASET, paths.data_file,
                  "--min-group-size", str(MIN_GROUP_SIZE), *hide, *PUBLIC_BOUNDS], "registering the dataset", log)
    if not (workspace.datasets_dir / f"{DP_DATASET}.toml").is_file():
        run_step([owner, "dataset", "add", "--workspace", paths.workspace, DP_DATASET, paths.data_file,
                  *DP_OPTIONS], "registering the differentially private dataset", log)

    log("The scientist:")
    public_key = paths.scientist_dir / "scientist.key"
    if public_key.is_file():
        log(f"  reusing the key pair in {paths.scientist_dir}")
    else:
        run_step([kernel, "keygen", "--dir", paths.scientist_dir], "creating the scientist's keys", log)
    if (workspace.scientists_dir / f"{SCIENTIST}.toml").is_file():
        log(f"  scientist {SCIENTIST!r} is already allow-listed")
    else:
        log("  (the owner allow-lists the scientist's public key)")
        run_step([owner, "scientist", "add", "--workspace", paths.workspace, SCIENTIST, public_key],
                 "registering the scientist", log)
    # Always rewritten: the executor's port may differ from the last run.
    run_step([kernel, "connect", "--endpoint", endpoint, "--server-key", paths.server_key,
              "--key-dir", paths.scientist_dir, "--config", paths.config],
             "writing the scientist's configuration", log)
    run_step([kernel, "install", "--sys-prefix"], "installing the Bastion kernelspec", log)
    return endpoint


class Executor:
    """``bastion-owner serve`` in the background, its output in ``demo/logs/executor.log``."""

    def __init__(self, paths: DemoPaths, endpoint: str):
        self.log_path = paths.logs / "executor.log"
        self.endpoint = endpoint
        self._ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Its own session: the terminal's Ctrl-C reaches the demo only, which
        # then stops the children in order.
        self.process = subprocess.Popen(
            [tool("bastion-owner"), "serve", "--workspace", str(paths.workspace), "--bind", endpoint],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._copy_output, daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                if LISTENING_LINE in line:
                    self._ready.set()

    def wait_ready(self, timeout: float) -> None:
        """Block until the executor prints its listening line; raise DemoError if it dies or is slow."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._reader.join(timeout=1)
                why = ("exited with status %s" % self.process.returncode
                       if self.process.returncode is not None else f"did not start within {timeout:.0f} s")
                raise DemoError(f"the executor {why}; its output:\n{tail(self.log_path)}")


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 with the scientist's configuration in its environment."""

    def __init__(self, paths: DemoPaths, port: int, open_browser: bool):
        self.port = port
        self.token = secrets.token_hex(24)
        self.log_path = paths.logs / "jupyterlab.log"
        # The kernel reads BASTION_CONFIG; the owner notebook reads BASTION_WORKSPACE.
        # The token goes through the environment, not argv, so `ps` does not show it.
        env = dict(os.environ, BASTION_CONFIG=str(paths.config), BASTION_WORKSPACE=str(paths.workspace),
                   JUPYTER_TOKEN=self.token, PYTHONUNBUFFERED="1")
        args = [sys.executable, "-m", "jupyterlab", SCIENTIST_NOTEBOOK,
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                f"--ServerApp.root_dir={paths.root}"]
        if not open_browser:
            args.append("--no-browser")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-root")  # containers and CI machines often run as root
        self._log = open(self.log_path, "a", encoding="utf-8")
        self.process = subprocess.Popen(args, cwd=paths.root, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def close_log(self) -> None:
        """Close the log file once the process is gone."""
        self._log.close()

    @property
    def url(self) -> str:
        """The address that opens the scientist's notebook, token included."""
        return f"http://127.0.0.1:{self.port}/lab/tree/{SCIENTIST_NOTEBOOK}?token={self.token}"

    def wait_ready(self, timeout: float) -> None:
        """Block until JupyterLab answers its API; raise DemoError if it dies or is slow."""
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/status",
                                         headers={"Authorization": f"token {self.token}"})
        while True:
            if self.process.poll() is not None:
                raise DemoError(f"JupyterLab exited with status {self.process.returncode}; "
                                f"its output:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(request, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"JupyterLab did not answer within {timeout:.0f} s; "
                                f"its output:\n{tail(self.log_path)}")
            time.sleep(0.3)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def stop(process: subprocess.Popen | None, name: str, first_signal: int, timeout: float = 15) -> None:
    """Stop a child politely (``first_signal``), then firmly; never leave it running."""
    if process is None or process.poll() is not None:
        return
    for sig, wait in ((first_signal, timeout), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            if sig == signal.SIGKILL:
                os.killpg(process.pid, sig)  # also any kernel it left behind
            else:
                process.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(wait)
            print(f"stopped {name}")
            return
        except subprocess.TimeoutExpired:
            continue


def has_display() -> bool:
    """Whether a browser can be opened: not in CI, and a desktop session is there."""
    if os.environ.get("CI"):
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def shown(path: Path) -> str:
    """``path`` as printed in the instructions: absolute, so it works from any folder.

    The kernel runs in the notebook's folder (``examples/``), not where the
    demo was started: a relative ``BASTION_CONFIG`` would point nowhere there.
    """
    return str(Path(path).absolute())


def instructions(paths: DemoPaths, endpoint: str, lab: JupyterLab | None) -> str:
    """What to open, what to try and how to approve, for the terminal."""
    owner = shown(Path(tool("bastion-owner")))
    workspace = shown(paths.workspace)
    lines = ["", "=" * 78, "Bastion demo is running (Ctrl-C stops it).", ""]
    if lab is not None:
        lines += [f"  The scientist's JupyterLab:  {lab.url}",
                  f"  (log: {shown(lab.log_path)})", "",
                  f"Open {SCIENTIST_NOTEBOOK} (Bastion kernel) and run its cells:",
                  "  - aggregates over groups of at least 10 patients come back at once;",
                  "  - row-level queries wait for the owner's approval (the cell shows its request id);",
                  "  - the hidden column `name` always comes back as *;",
                  "  - Python (`import os`) is refused: the kernel runs no Python."]
    else:
        lines += ["JupyterLab was not started (--no-lab). To use the Bastion kernel yourself:",
                  f"  BASTION_CONFIG={shown(paths.config)} {shown(Path(sys.executable).parent / 'jupyter')} "
                  f"lab {SCIENTIST_NOTEBOOK}"]
    lines += ["", f"  The owner's executor:        {endpoint}  (log: {shown(paths.logs / 'executor.log')})",
              "", "Approve or reject held queries as the owner, either in "
              f"{OWNER_NOTEBOOK} (Python 3 kernel)", "or in another terminal:",
              f"  {owner} requests --workspace {workspace}",
              f"  {owner} approve  --workspace {workspace} ID",
              f"  {owner} reject   --workspace {workspace} ID --reason 'too detailed'",
              f"  {owner} audit verify --workspace {workspace}", "=" * 78]
    return "\n".join(lines)


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def serve(paths: DemoPaths, endpoint: str, lab_port: int | None, open_browser: bool,
          ready_timeout: float) -> int:
    """Start the executor (and JupyterLab unless ``lab_port`` is None); run until Ctrl-C."""
    # Installed explicitly: a shell's background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    executor = lab = None
    try:
        print(f"Starting the executor on {endpoint} ...")
        executor = Executor(paths, endpoint)
        executor.wait_ready(ready_timeout)
        if lab_port is not None:
            print(f"Starting JupyterLab on http://127.0.0.1:{lab_port} ...")
            lab = JupyterLab(paths, lab_port, open_browser)
            lab.wait_ready(ready_timeout * 4)
        print(instructions(paths, endpoint, lab), flush=True)
        while True:
            for name, child in (("the executor", executor), ("JupyterLab", lab)):
                if child is not None and child.process.poll() is not None:
                    raise DemoError(f"{name} stopped unexpectedly (exit status {child.process.returncode});"
                                    f" see {shown(child.log_path)}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nStopping the demo ...")
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short (each stop is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # JupyterLab first: it shuts its kernels down while the executor still answers.
        stop(lab.process if lab else None, "JupyterLab", signal.SIGTERM)
        if lab is not None:
            lab.close_log()
        # SIGINT lets the executor run its clean-up (close sockets, flush the audit log).
        stop(executor.process if executor else None, "the executor", signal.SIGINT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m owner_console.demo",
                                     description="Run the Bastion demo: owner workspace, executor, JupyterLab.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--setup-only", action="store_true", help="prepare everything, start nothing")
    mode.add_argument("--no-lab", action="store_true", help="start the executor only")
    parser.add_argument("--demo-dir", type=Path, help="where to keep the demo's files (default: ROOT/demo)")
    parser.add_argument("--root", type=Path, help="the repository (default: the one this module is in)")
    parser.add_argument("--port", type=int, default=DEFAULT_EXECUTOR_PORT,
                        help=f"the executor's port on 127.0.0.1 (default {DEFAULT_EXECUTOR_PORT}, "
                             "or a free one if taken)")
    parser.add_argument("--lab-port", type=int, default=DEFAULT_LAB_PORT,
                        help=f"JupyterLab's port on 127.0.0.1 (default {DEFAULT_LAB_PORT}, or a free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--ready-timeout", type=float, default=30.0,
                        help="seconds to wait for the executor to listen (JupyterLab gets 4 times that)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m owner_console.demo``; returns the exit status."""
    args = parse_args(argv)
    root = (args.root or default_root()).resolve()
    paths = DemoPaths(root=root, demo=(args.demo_dir or root / "demo").resolve())
    try:
        executor_port = pick_port(args.port)
        endpoint = set_up(paths, executor_port)
        if args.setup_only:
            print(f"\nSet-up done in {shown(paths.demo)}: the executor would listen on {endpoint}.")
            print("Start the demo with: python -m owner_console.demo  (or: bash scripts/demo.sh)")
            return 0
        lab_port = None if args.no_lab else pick_port(args.lab_port)
        return serve(paths, endpoint, lab_port, has_display() and not args.no_browser, args.ready_timeout)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
