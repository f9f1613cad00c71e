"""Mitigations of the threat model (docs/threat-model.md) that no other test covered.

- Sniffing: a plain TCP proxy on 127.0.0.1 between a scientist and the
  executor records every byte both ways; neither the plan, the cell text, the
  column names nor the result (its Arrow bytes or its values) appears in
  clear, while the reply the scientist decodes holds all of them.
- Tampering on the wire: the proxy flips one bit of a request in flight; the
  executor never acts on it (no reply, nothing audited) and keeps serving.
- Least privilege: the kernel package never imports the owner's side, and
  the executor reads only registered datasets, whatever name or path a plan
  gives.
"""
from __future__ import annotations

import ast
import io
import selectors
import socket
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from owner_console.audit import read_entries
from owner_console.workspace import Workspace
from wire import RawClient

REPO = Path(__file__).resolve().parent.parent


class RecordingProxy:
    """A TCP relay on 127.0.0.1 that records (and may alter) the bytes it forwards.

    ``upstream`` holds what clients sent, ``downstream`` what the server sent.
    ``tamper(chunk)`` may rewrite each client -> server chunk.
    """

    def __init__(self, target_port: int, tamper: Callable[[bytes], bytes] | None = None):
        self.target_port, self.tamper = target_port, tamper
        self.upstream, self.downstream = bytearray(), bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _relay(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                if key.data is None:
                    client, _ = self._listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.target_port))
                    self._sockets += [client, server]
                    self._selector.register(client, selectors.EVENT_READ, (server, True))
                    self._selector.register(server, selectors.EVENT_READ, (client, False))
                    continue
                peer, from_client = key.data
                try:
                    chunk = key.fileobj.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    for sock in (key.fileobj, peer):
                        try:
                            self._selector.unregister(sock)
                        except (KeyError, ValueError):
                            pass
                        sock.close()
                    continue
                if from_client:
                    if self.tamper is not None:
                        chunk = self.tamper(chunk)
                    self.upstream += chunk
                else:
                    self.downstream += chunk
                try:
                    peer.sendall(chunk)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._sockets:
            sock.close()
        self._selector.close()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def _client(executor, name: str, endpoint: str) -> RawClient:
    pair = executor.keys[name]
    return RawClient(endpoint, executor.server_public_key, pair.public, pair.secret)


def test_wire_traffic_is_encrypted_no_plaintext_plan_or_result_on_the_wire(executor, patients_csv):
    marker = f"sniff_{uuid.uuid4().hex[:12]}"
    plan = P.frame_op("group_by", input=P.scan("patients"), keys=[P.col("diagnosis")],
                      aggs=[P.alias(P.fn("mean", P.col("cost")), f"{marker}_mean"), P.alias(P.length(), "n")])
    proxy = RecordingProxy(_port(executor.endpoint))
    try:
        with _client(executor, "alice", proxy.endpoint) as alice:
            kind, body, frames = alice.request("fetch", {"plan": plan, "text": f"{marker} cell text"})
    finally:
        proxy.close()
    assert kind == "result", body
    table = pl.read_ipc(io.BytesIO(frames[0]))
    expected = pl.read_csv(patients_csv, try_parse_dates=True).group_by("diagnosis").agg(
        pl.col("cost").mean().alias(f"{marker}_mean"), pl.len().alias("n"))
    assert table.sort("diagnosis")["n"].to_list() == expected.sort("diagnosis")["n"].to_list()

    upstream, downstream = bytes(proxy.upstream), bytes(proxy.downstream)
    # The proxy did see the exchange: a ZMTP greeting naming the CURVE mechanism, and
    # at least as many bytes back as the decoded reply holds.
    assert b"CURVE" in upstream[:64] and b"CURVE" in downstream[:64]
    assert len(downstream) > len(frames[0])
    wire = upstream + downstream
    in_clear = [marker.encode(), b"diagnosis", b"patients", b"group_by", b"fetch", b"ARROW1", frames[0][-200:]]
    in_clear += [diagnosis.encode() for diagnosis in table["diagnosis"].to_list()]
    in_clear += [struct.pack("<d", value) for value in table[f"{marker}_mean"].to_list()]
    for secret in in_clear:
        assert secret not in wire, f"{secret[:40]!r} crossed the wire in clear"


@pytest.mark.slow
def test_a_tampered_message_on_the_wire_is_dropped_not_executed(executor):
    marker = f"tamper_{uuid.uuid4().hex[:12]}"
    flipped = []

    def flip_one_bit(chunk: bytes) -> bytes:
        # Handshake commands are a few hundred bytes; the request below is larger.
        if len(chunk) > 4000 and not flipped:
            flipped.append(len(chunk))
            middle = len(chunk) // 2
            return chunk[:middle] + bytes([chunk[middle] ^ 0x01]) + chunk[middle + 1:]
        return chunk

    proxy = RecordingProxy(_port(executor.endpoint), tamper=flip_one_bit)
    try:
        with _client(executor, "alice", proxy.endpoint) as alice:
            kind, body, _ = alice.request("hello", {})  # the handshake and a small message pass untouched
            assert (kind, body["scientist"]) == ("ok", "alice")
            plan = P.frame_op("select", input=P.scan("patients"), exprs=[P.alias(P.length(), "n")])
            alice.send("fetch", {"plan": plan, "text": marker + " " + "x" * 6000})
            assert alice.recv(timeout=3) is None, "a tampered request was answered"
    finally:
        proxy.close()
    assert flipped, "the request never crossed the proxy"
    audited = [e for e in read_entries(Workspace(executor.workspace).audit_path) if marker in str(e)]
    assert audited == [], audited
    with executor.client("bob") as bob:  # everyone else carries on
        kind, body, _ = bob.request("hello", {})
        assert (kind, body["scientist"]) == ("ok", "bob")
    assert executor.process.poll() is None


def test_the_kernel_package_never_imports_the_owner_side():
    imported = []
    for path in sorted((REPO / "bastion_kernel").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            imported += [(path.name, n) for n in names if n.split(".")[0] == "owner_console"]
    assert imported == []
    # And at run time: loading the kernel loads nothing of the owner's side.
    code = ("import sys, bastion_kernel.kernel, bastion_kernel.client, bastion_kernel.language.interpreter; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'owner_console'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["unregistered", "../patients", "patients.csv", "/etc/passwd", "config.toml",
                                  "audit.log", "keys/server.key_secret"])
def test_the_executor_reads_only_registered_datasets(executor, patients_csv, name):
    with executor.client("alice") as alice:
        for candidate in (name, str(patients_csv)):
            kind, body, _ = alice.request("fetch", {"plan": P.scan(candidate), "text": "least privilege"})
            assert (kind, body["ename"]) == ("error", "SchemaError"), body
            assert "/" not in body["evalue"] or candidate in body["evalue"]  # no path of the owner's leaks
        kind, body, _ = alice.request("datasets", {})
    assert kind == "ok"
    assert sorted(d["name"] for d in body["datasets"]) == sorted(executor_registered(executor))


def executor_registered(executor) -> list[str]:
    return list(Workspace(executor.workspace).catalog())
