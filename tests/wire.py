"""A raw test client for the executor: a CURVE DEALER that sends whatever it is told.

Unlike :class:`bastion_kernel.client.ExecutorClient`, it checks nothing and
hides nothing, so tests can send malformed or hostile frames and look at the
exact reply.  The functions below read the replies of the attack tests, which
send their plans straight to a real executor.
"""
from __future__ import annotations

import io
import uuid

import polars as pl
import zmq

from bastion_kernel.contract import protocol


class RawClient:
    """One DEALER connection to the executor with a scientist's CURVE keys.

    Parameters
    ----------
    endpoint : str
        The executor's endpoint, ``tcp://127.0.0.1:PORT``.
    server_public_key, public_key, secret_key : bytes
        Z85 CURVE keys.
    """

    def __init__(self, endpoint: str, server_public_key: bytes, public_key: bytes, secret_key: bytes):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.curve_serverkey = server_public_key
        self.socket.curve_publickey = public_key
        self.socket.curve_secretkey = secret_key
        self.socket.connect(endpoint)

    def send_frames(self, frames: list[bytes]) -> None:
        """Send one multipart message exactly as given."""
        self.socket.send_multipart(frames)

    def recv(self, timeout: float = 10.0) -> list[bytes] | None:
        """The next message's frames, or None if nothing arrives within ``timeout`` seconds."""
        if not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return self.socket.recv_multipart()

    def send(self, kind: str, body: dict, msg_id: str | None = None) -> str:
        """Send a well-formed envelope; returns its id."""
        msg_id = msg_id or uuid.uuid4().hex
        self.send_frames([protocol.encode(kind, body, msg_id)])
        return msg_id

    def reply(self, msg_id: str | None = None, timeout: float = 30.0) -> tuple[str, dict, list[bytes]]:
        """Wait for a reply (to ``msg_id`` if given): ``(kind, body, extra_frames)``.

        Raises TimeoutError if none comes within ``timeout`` seconds.
        """
        while True:
            frames = self.recv(timeout)
            if frames is None:
                raise TimeoutError(f"no reply within {timeout} s")
            kind, reply_id, body = protocol.decode(frames[0], protocol.REPLY_KINDS)
            if msg_id is None or reply_id == msg_id:
                return kind, body, frames[1:]

    def request(self, kind: str, body: dict, timeout: float = 30.0) -> tuple[str, dict, list[bytes]]:
        """Send one request and return its reply ``(kind, body, extra_frames)``."""
        return self.reply(self.send(kind, body), timeout)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send(executor, kind: str, body: dict, who: str = "alice", timeout: float = 120) -> tuple[str, dict, list[bytes]]:
    """One request of scientist ``who`` to a running executor (conftest's ``ExecutorProcess``): its reply."""
    return executor.client(who).request(kind, body, timeout=timeout)


def fetch(executor, plan: dict, who: str = "alice", text: str = "attack") -> tuple[str, dict, list[bytes]]:
    """``fetch`` a plan as scientist ``who``: the reply ``(kind, body, frames)``."""
    return send(executor, "fetch", {"plan": plan, "text": text}, who)


def refused(reply) -> dict:
    """The reply is a refusal: a PolicyViolation error that carries no table."""
    kind, body, frames = reply
    assert kind == "error", (kind, body)
    assert body["ename"] == "PolicyViolation", body
    assert frames == []
    return body


def released(reply) -> tuple[pl.DataFrame, dict]:
    """The reply is a result: its table and its body."""
    kind, body, frames = reply
    assert kind == "result", (kind, body)
    return pl.read_ipc(io.BytesIO(frames[0])), body
