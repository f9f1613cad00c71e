"""Load: 50 concurrent clients on loopback against one real executor, for a bounded time.

Each client is a thread with its own DEALER and one of five registered
scientists.  Each request asks for an aggregate no other request asks for (a
column named after the client and the request's sequence number, holding the
row count plus a number unique to the request), so a reply can be checked
against its own request: the envelope id, the column name and the value.
``hello`` replies name the scientist who asked.  Nothing may be lost (every
request gets its reply) or crossed (a reply meant for another client or
another scientist).  Across the run the executor's open file descriptors
return to where they were and its resident memory grows by less than a small
bound (both read from ``/proc/PID``).
"""
from __future__ import annotations

import io
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from bastion_kernel.contract import plan as P
from bastion_kernel.contract import protocol
from conftest import make_keys, make_workspace, start_executor
from owner_console.sample_data import write_patients
from wire import RawClient

pytestmark = pytest.mark.slow  # starts services or takes seconds: not in the fast tier

CLIENTS = 50
SCIENTISTS = ("sci0", "sci1", "sci2", "sci3", "sci4")
LOAD_SECONDS = 8.0
WARMUP_SECONDS = 2.0
REPLY_SECONDS = 60.0
# Memory the executor may gain across the measured run (allocator slack, audit
# buffers): a leak of one reply per request would exceed it by far.
RSS_GROWTH_BOUND_BYTES = 64 * 1024 * 1024
FD_SETTLE_SECONDS = 15.0


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture(scope="module")
def load_executor(tmp_path_factory):
    data = write_patients(tmp_path_factory.mktemp("data") / "patients.csv")
    owner = make_workspace(tmp_path_factory.mktemp("owner") / "workspace", data)
    keys_dir = tmp_path_factory.mktemp("keys")
    keys = {name: make_keys(keys_dir / name, name) for name in SCIENTISTS}
    for name in SCIENTISTS:
        owner.workspace.add_scientist(name, keys[name].public_file)
    running = start_executor(owner.path, keys, ready_as=SCIENTISTS[0])
    try:
        yield running, pl.read_csv(data, try_parse_dates=True).height
    finally:
        running.stop()


class LoadClient(threading.Thread):
    """One client: sends a request, checks its reply, repeats until told to stop."""

    def __init__(self, index: int, scientist: str, running, source_rows: int, stop: threading.Event):
        super().__init__(name=f"load-client-{index}", daemon=True)
        self.index, self.scientist, self.running = index, scientist, running
        self.source_rows, self.stop_event = source_rows, stop
        self.sent = self.answered = 0
        self.problems: list[str] = []

    def run(self) -> None:
        keys = self.running.keys[self.scientist]
        client = RawClient(self.running.endpoint, self.running.server_public_key, keys.public, keys.secret)
        try:
            sequence = 0
            while not self.stop_event.is_set() and not self.problems:
                sequence += 1
                if sequence % 4 == 0:
                    self._hello(client)
                else:
                    self._aggregate(client, sequence)
        except Exception as exc:  # noqa: BLE001 - reported by the test, with the client's name
            self.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    def _exchange(self, client: RawClient, kind: str, body: dict) -> tuple[str, dict, list[bytes]]:
        msg_id = f"{self.index}-{uuid.uuid4().hex}"
        client.send(kind, body, msg_id=msg_id)
        self.sent += 1
        frames = client.recv(REPLY_SECONDS)
        if frames is None:
            raise AssertionError(f"client {self.index}: request {msg_id} lost (no reply in {REPLY_SECONDS} s)")
        reply_kind, reply_id, reply_body = protocol.decode(frames[0], protocol.REPLY_KINDS)
        if reply_id != msg_id:
            raise AssertionError(f"client {self.index}: sent {msg_id}, got the reply to {reply_id}")
        self.answered += 1
        return reply_kind, reply_body, frames[1:]

    def _hello(self, client: RawClient) -> None:
        kind, body, _ = self._exchange(client, "hello", {})
        if (kind, body.get("scientist")) != ("ok", self.scientist):
            self.problems.append(f"client {self.index} ({self.scientist}) got hello {kind} {body}")

    def _aggregate(self, client: RawClient, sequence: int) -> None:
        # len() + a number only this request uses, under a name only this request uses.
        name, offset = f"c{self.index}_{sequence}", self.index * 1_000_000 + sequence
        plan = P.frame_op("select", input=P.scan("patients"),
                          exprs=[P.alias(P.binary("add", P.length(), P.lit(offset)), name)])
        kind, body, extra = self._exchange(client, "fetch", {"plan": plan, "text": name})
        if kind != "result":
            self.problems.append(f"client {self.index}: {kind} {body}")
            return
        table = pl.read_ipc(io.BytesIO(extra[0]))
        if table.columns != [name] or table[name].to_list() != [self.source_rows + offset]:
            self.problems.append(f"client {self.index}: asked for {name}={self.source_rows + offset}, "
                                 f"got {table.to_dicts()}")


def run_load(running, source_rows: int, seconds: float) -> list[LoadClient]:
    stop = threading.Event()
    clients = [LoadClient(i, SCIENTISTS[i % len(SCIENTISTS)], running, source_rows, stop) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    time.sleep(seconds)
    stop.set()
    for client in clients:
        client.join(REPLY_SECONDS + 10)
        assert not client.is_alive(), f"{client.name} is stuck"
    return clients


def settled_fds(pid: int, baseline: int) -> int:
    """Open descriptors, once closed connections have been reaped (or the bound ran out)."""
    deadline = time.monotonic() + FD_SETTLE_SECONDS
    count = open_fds(pid)
    while count > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        count = open_fds(pid)
    return count


def test_fifty_clients_get_only_their_own_replies_without_fd_or_memory_growth(load_executor):
    running, source_rows = load_executor
    pid = running.process.pid

    # Warm-up: caches, thread pools, per-thread sockets, the audit log file.
    warm = run_load(running, source_rows, WARMUP_SECONDS)
    assert all(not c.problems for c in warm), [c.problems for c in warm if c.problems]
    fds_before = settled_fds(pid, open_fds(pid))
    rss_before = proc_status(pid, "VmRSS")

    clients = run_load(running, source_rows, LOAD_SECONDS)

    problems = [p for c in clients for p in c.problems]
    assert not problems, problems[:10]
    assert all(c.answered == c.sent and c.sent > 0 for c in clients), \
        [(c.index, c.sent, c.answered) for c in clients if c.answered != c.sent or not c.sent]
    assert running.process.poll() is None
    fds_after = settled_fds(pid, fds_before)
    assert fds_after <= fds_before, f"open descriptors grew from {fds_before} to {fds_after}"
    rss_after = proc_status(pid, "VmRSS")
    print(f"load: {sum(c.answered for c in clients)} replies to {CLIENTS} clients in {LOAD_SECONDS} s; "
          f"fds {fds_before} -> {fds_after}; VmRSS {rss_before >> 20} -> {rss_after >> 20} MiB")
    assert rss_after - rss_before < RSS_GROWTH_BOUND_BYTES, (rss_before, rss_after)
    # The executor still answers a newcomer.
    keys = running.keys[SCIENTISTS[0]]
    with RawClient(running.endpoint, running.server_public_key, keys.public, keys.secret) as probe:
        kind, body, _ = probe.request("hello", {}, timeout=REPLY_SECONDS)
        assert (kind, body["scientist"]) == ("ok", SCIENTISTS[0])
