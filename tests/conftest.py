"""Shared fixtures: an owner's workspace, scientists' keys and a running executor.

Everything is real: the workspace is made with :class:`owner_console.workspace.Workspace`,
keys with ``zmq.auth.create_certificates``, and the executor is a separate
``bastion-owner serve`` process on ``127.0.0.1`` (a free port), stopped at
teardown.  The heavy fixtures are module-scoped, so one test module shares one
workspace and one executor; a test that must change either (stop it, break its
files) builds its own with :func:`make_workspace` and :func:`start_executor`.

Fixtures
--------
``patients_csv``      path of the synthetic patients table (5000 rows, CSV).
``raw``               that table as plain polars reads it (a module that overrides
                      ``patients_csv`` gets its own table).
``owner_workspace``   an :class:`OwnerWorkspace` with three datasets over that CSV:
                      ``patients`` (K=10, ``name`` hidden, unsafe ``review``),
                      ``patients_strict`` (same, unsafe ``reject``) and
                      ``patients_open`` (same, unsafe ``log``).
``scientist_keys``    ``{"alice", "bob", "mallory"}`` -> :class:`KeyPair`; alice and
                      bob are registered in ``owner_workspace``, mallory is not.
``executor``          an :class:`ExecutorProcess` serving ``owner_workspace``; its
                      ``client(name)`` gives a :class:`wire.RawClient`, its
                      ``kernel_client(name)`` the kernel's ``ExecutorClient``, its
                      ``owner(*args)`` runs ``bastion-owner`` on its workspace.
``spark``             this process's one SparkSession for the whole run (``local[2]``,
                      two shuffle partitions, no UI: the executor's defaults), also the
                      session the Spark engine uses in this process; skipped, with the
                      reason, without PySpark or a Java 17 or 21 (:func:`spark_unavailable`).
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import polars as pl
import pytest
import zmq.auth

from owner_console.sample_data import write_patients
from owner_console.workspace import Workspace
from wire import RawClient

READY_PREFIX = "bastion executor listening on "
STARTUP_SECONDS = 60


@dataclass(frozen=True)
class KeyPair:
    """A scientist's CURVE key pair, as files and as Z85 bytes."""

    name: str
    public_file: Path
    secret_file: Path
    public: bytes
    secret: bytes


def make_keys(directory: Path, name: str) -> KeyPair:
    """Create ``directory/NAME.key`` and ``NAME.key_secret`` with ``zmq.auth.create_certificates``."""
    directory.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    public, secret = zmq.auth.load_certificate(secret_file)
    return KeyPair(name, Path(public_file), Path(secret_file), public, secret)


def run_owner(workspace: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``bastion-owner ARGS... --workspace WORKSPACE`` in a new process; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "owner_console.cli", *map(str, args),
                           "--workspace", str(workspace)],
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class OwnerWorkspace:
    """An initialised workspace: ``path``, its :class:`Workspace`, and the data file behind it."""

    path: Path
    workspace: Workspace
    data_file: Path

    def owner(self, *args: str) -> subprocess.CompletedProcess:
        """Run a ``bastion-owner`` command on this workspace."""
        return run_owner(self.path, *args)


def make_workspace(directory: Path, data_file: Path) -> OwnerWorkspace:
    """A new workspace in ``directory`` with the three patients datasets (see the module doc)."""
    workspace = Workspace(directory)
    workspace.init()
    workspace.add_dataset("patients", data_file, min_group_size=10, hidden=["name"], unsafe="review")
    workspace.add_dataset("patients_strict", data_file, min_group_size=10, hidden=["name"], unsafe="reject")
    workspace.add_dataset("patients_open", data_file, min_group_size=10, hidden=["name"], unsafe="log")
    return OwnerWorkspace(workspace.path, workspace, data_file)


@dataclass
class ExecutorProcess:
    """A running ``bastion-owner serve`` and the means to talk to it."""

    process: subprocess.Popen
    endpoint: str
    server_public_key: bytes
    workspace: Path
    keys: dict[str, KeyPair]
    log_file: Path
    _clients: list = field(default_factory=list)

    def client(self, name: str) -> RawClient:
        """A raw DEALER connection with scientist ``name``'s keys (closed at teardown)."""
        pair = self.keys[name]
        client = RawClient(self.endpoint, self.server_public_key, pair.public, pair.secret)
        self._clients.append(client)
        return client

    def kernel_client(self, name: str, timeout: float = 60.0, poll_interval: float = 0.2):
        """The kernel's ``ExecutorClient`` with scientist ``name``'s keys (closed at teardown)."""
        from bastion_kernel.client import ExecutorClient
        pair = self.keys[name]
        client = ExecutorClient(self.endpoint, self.server_public_key, pair.public, pair.secret,
                                timeout=timeout, poll_interval=poll_interval)
        self._clients.append(client)
        return client

    def owner(self, *args: str) -> subprocess.CompletedProcess:
        """Run a ``bastion-owner`` command on the executor's workspace."""
        return run_owner(self.workspace, *args)

    def log(self) -> str:
        """What the executor wrote to stderr so far."""
        return self.log_file.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process, wait for it and return its exit status (killed if it hangs)."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def start_executor(workspace: Path, keys: dict[str, KeyPair], ready_as: str | None = "alice") -> ExecutorProcess:
    """Start ``bastion-owner serve`` on a free 127.0.0.1 port and wait until it serves.

    Ready means: it printed its endpoint and, if ``ready_as`` names a
    registered key pair, answered that scientist's ``hello``.
    """
    workspace = Path(workspace)
    out_file, log_file = workspace / "serve.out", workspace / "serve.log"
    with open(out_file, "wb") as out, open(log_file, "wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "owner_console.cli", "serve",
                                    "--workspace", str(workspace), "--bind", "tcp://127.0.0.1:*"],
                                   stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    server_key = zmq.auth.load_certificate(workspace / "keys" / "server.key")[0]
    deadline = time.monotonic() + STARTUP_SECONDS
    endpoint = None
    try:
        while endpoint is None:
            for line in out_file.read_text().splitlines():
                if line.startswith(READY_PREFIX):
                    endpoint = line[len(READY_PREFIX):].strip()
            if endpoint is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the executor did not start:\n{log_file.read_text(errors='replace')}")
                time.sleep(0.05)
        running = ExecutorProcess(process, endpoint, server_key, workspace, keys, log_file)
        if ready_as is not None:
            with RawClient(endpoint, server_key, keys[ready_as].public, keys[ready_as].secret) as probe:
                kind, body, _ = probe.request("hello", {}, timeout=STARTUP_SECONDS)
                assert kind == "ok", body
        return running
    except BaseException:
        process.kill()
        process.wait(10)
        raise


@contextlib.contextmanager
def running_executor(workspace_path: Path, keys: dict[str, KeyPair], **options) -> Iterator[ExecutorProcess]:
    """A real executor serving ``workspace_path`` for as long as the block runs."""
    process = start_executor(workspace_path, keys, **options)
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def serving(tmp_path_factory, data_file: Path, scientists: tuple[str, ...] = ("alice", "bob")
            ) -> Iterator[ExecutorProcess]:
    """A new workspace over ``data_file`` with ``scientists`` registered, served by a real executor."""
    owner = make_workspace(tmp_path_factory.mktemp("owner") / "workspace", data_file)
    keys = register_scientists(owner.workspace, tmp_path_factory.mktemp("keys"), scientists)
    with running_executor(owner.path, keys, ready_as=scientists[0]) as process:
        yield process


@pytest.fixture(scope="module")
def patients_csv(tmp_path_factory) -> Path:
    return write_patients(tmp_path_factory.mktemp("data") / "patients.csv")


@pytest.fixture(scope="module")
def raw(patients_csv) -> pl.DataFrame:
    """The patients table as plain polars reads it: what the executor's answers are compared with."""
    return pl.read_csv(patients_csv, try_parse_dates=True)


@pytest.fixture(scope="module")
def owner_workspace(tmp_path_factory, patients_csv) -> OwnerWorkspace:
    return make_workspace(tmp_path_factory.mktemp("owner") / "workspace", patients_csv)


def register_scientists(workspace: Workspace, directory: Path, names: tuple[str, ...],
                        unregistered: tuple[str, ...] = ()) -> dict[str, KeyPair]:
    """Key pairs for ``names`` (allow-listed in ``workspace``) and ``unregistered`` (not), under ``directory``."""
    keys = {name: make_keys(directory / name, name) for name in names + unregistered}
    for name in names:
        workspace.add_scientist(name, keys[name].public_file)
    return keys


@pytest.fixture(scope="module")
def scientist_keys(tmp_path_factory, owner_workspace) -> dict[str, KeyPair]:
    return register_scientists(owner_workspace.workspace, tmp_path_factory.mktemp("scientists"), ("alice", "bob"),
                               unregistered=("mallory",))


@pytest.fixture(scope="module")
def executor(owner_workspace, scientist_keys):
    with running_executor(owner_workspace.path, scientist_keys) as running:
        yield running


def spark_unavailable() -> str | None:
    """Why Spark cannot run here (PySpark or a Java 17-21 runtime missing), or None when it can."""
    import importlib.util
    import os
    import re
    import shutil

    if importlib.util.find_spec("pyspark") is None:
        return "PySpark is not installed (pip install -e '.[spark]')"
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        return "no Java runtime (install openjdk-17-jre-headless, or set JAVA_HOME to a Java 17 or 21)"
    banner = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    found = re.search(r'version "(?:1\.)?(\d+)', banner)
    if found is None or not 17 <= int(found.group(1)) <= 21:
        return f"Spark 4.0 needs Java 17 or 21, {java} is {found.group(1) if found else 'unknown'}"
    return None


@pytest.fixture(scope="session")
def spark():
    reason = spark_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from owner_console.engine.spark import session

    session.configure(session.SparkSettings(master="local[2]"))
    spark_session = session.session()
    yield spark_session
    session.stop()
