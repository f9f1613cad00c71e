"""A slow reply shows progress: the client reports "running" while it waits, then "done".

The executor's side here is a plain CURVE ROUTER on 127.0.0.1 that answers
only once the client has reported progress, so the test depends on an order
of events, never on how long anything takes.
"""
from __future__ import annotations

import threading

import zmq

from bastion_kernel import display
from bastion_kernel.client import ExecutorClient
from bastion_kernel.contract.protocol import REQUEST_KINDS, decode, encode


class SlowExecutor(threading.Thread):
    """Answers one ``datasets`` request after ``release`` is set."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.public, secret = zmq.curve_keypair()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.curve_server = True
        self.socket.curve_secretkey = secret
        self.socket.curve_publickey = self.public
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.release = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            if not self.socket.poll(30_000):
                raise AssertionError("no request arrived")
            identity, envelope = self.socket.recv_multipart()
            kind, msg_id, _ = decode(envelope, REQUEST_KINDS)
            assert kind == "datasets"
            assert self.release.wait(30), "the client never reported progress"
            self.socket.send_multipart([identity, encode("ok", {"datasets": []}, msg_id)])
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


def test_a_slow_reply_reports_running_then_done():
    server = SlowExecutor()
    server.start()
    public, secret = zmq.curve_keypair()
    client = ExecutorClient(server.endpoint, server.public, public, secret, timeout=30)
    client.progress_after = 0.0
    stages: list[tuple[str, float]] = []

    def on_progress(stage: str, elapsed: float) -> None:
        stages.append((stage, elapsed))
        server.release.set()

    client.on_progress = on_progress
    try:
        assert client.datasets() == []
    finally:
        client.close()
        server.join(30)
        server.close()
    assert server.failure is None, server.failure
    assert stages[0][0] == "running" and stages[-1][0] == "done"
    assert [stage for stage, _ in stages[:-1]] == ["running"] * (len(stages) - 1)
    assert all(later >= earlier for (_, earlier), (_, later) in zip(stages, stages[1:]))


def test_progress_texts_say_where_the_query_is():
    assert display.progress_bundle("running", 3.7)["text/plain"] == "running on the owner's executor — 3 s"
    assert display.progress_ended_bundle("done", 12.2)["text/plain"] == \
        "query done after 12 s on the owner's executor"
