"""The kernel's stdout/stderr stream: what is written still reaches IOPub; a flush with nothing written is free."""
from __future__ import annotations

import time

import zmq
from ipykernel.iostream import IOPubThread
from jupyter_client.session import Session

from bastion_kernel.kernel import BastionKernelApp, QuietOutStream


def test_written_text_is_flushed_to_iopub_and_an_empty_flush_sends_nothing():
    context = zmq.Context()
    publisher, subscriber = context.socket(zmq.PUB), context.socket(zmq.SUB)
    port = publisher.bind_to_random_port("tcp://127.0.0.1")
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.2)  # (a PUB drops what it sends before the SUB is connected)
    session = Session(key=b"")
    thread = IOPubThread(publisher)
    thread.start()
    stream = QuietOutStream(session, thread, "stderr", watchfd=False)
    scheduled: list[object] = []
    schedule = thread.schedule
    thread.schedule = lambda f: (scheduled.append(f), schedule(f))[1]
    try:
        stream.flush()
        assert scheduled == []  # nothing written: no round trip through the IO thread
        stream.write("a library's warning\n")
        stream.flush()
        assert subscriber.poll(5000), "the written text never reached IOPub"
        message = session.deserialize(session.feed_identities(subscriber.recv_multipart())[1])
        assert message["msg_type"] == "stream"
        assert message["content"] == {"name": "stderr", "text": "a library's warning\n"}
        scheduled.clear()
        stream.flush()
        assert scheduled == []
    finally:
        thread.schedule = schedule
        stream.close()
        thread.stop()
        thread.close()
        subscriber.close(linger=0)
        context.term()


def test_the_kernel_app_uses_the_quiet_stream():
    assert BastionKernelApp.outstream_class.default_value == "bastion_kernel.kernel.QuietOutStream"
