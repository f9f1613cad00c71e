"""The Bastion Jupyter kernel: Jupyter messages in, the language and the display out.

Thin on purpose: each ``do_*`` hands the cell to the interpreter
(:mod:`bastion_kernel.language`), which talks to the executor through a
``Session`` (:mod:`bastion_kernel.client`), and renders values with
:mod:`bastion_kernel.display`.  The kernel never executes cell text as
Python, registers no comm targets and offers no debugger or subshells.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import logging
import threading
import traceback
import uuid
from dataclasses import dataclass
from importlib import metadata

from ipykernel.iostream import OutStream
from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel
from traitlets import DottedObjectName, Float

from . import display
from .client import ConfiguredSession, review_pending
from .config import ConfigError
from .language.interpreter import Interpreter
from .language.values import HelpText
from .contract.protocol import BastionError

HISTORY_SESSION = 1  # one in-memory history session per kernel process


def _version() -> str:
    try:
        return metadata.version("bastion")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass
class _Wait:
    """The in-place display of one result waiting for the owner."""

    request_id: int
    display_id: str
    elapsed: float
    shown_second: int
    reason: str = ""


@dataclass
class _Running:
    """The in-place display of a query the executor has not answered yet (shown after a second)."""

    display_id: str
    elapsed: float
    shown_second: int


class BastionKernel(Kernel):
    """Jupyter kernel for the Bastion language."""

    implementation = "bastion"
    implementation_version = _version()
    banner = ("Bastion: a polars-shaped query language. Queries run on the data owner's executor, "
              "under the owner's privacy policy; this kernel runs no Python.\n"
              "Start with datasets() and dataset(\"NAME\").")
    language_info = {
        "name": "bastion",
        "version": _version(),
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "python3",
        "codemirror_mode": {"name": "ipython", "version": 3},
    }
    help_links = [{"text": "polars expressions", "url": "https://docs.pola.rs/api/python/stable/reference/"}]
    # ipykernel sleeps this long (0.5 ms by default) after every cell, before the reply, so that
    # output a Python cell printed reaches IOPub first.  A Bastion cell prints nothing and the
    # streams are still flushed before the reply, so the sleep only delays the cell's end.
    _execute_sleep = Float(0.0).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.executor_session = ConfiguredSession()
        self.executor_session.on_wait = self._on_wait
        self.executor_session.on_progress = self._on_progress
        self.interpreter = Interpreter(self.executor_session)
        self.interpreter.ctx.on_output = self._on_output
        self._history: list[list] = []  # [line, input, output text or None]
        self._silent = False
        self._wait: _Wait | None = None
        self._running: _Running | None = None

    @property
    def kernel_info(self):
        info = super().kernel_info
        # No debugger (there is no Python to debug) and no subshells (one cell at a time).
        info["supported_features"] = []
        return info

    # -- execute ---------------------------------------------------------------

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, *, cell_meta=None, cell_id=None):
        self._silent = silent
        self._wait = None
        self._running = None
        # Front ends a person watches (JupyterLab, Notebook, console) send allow_stdin: true; batch
        # runners (nbconvert, papermill: nbclient) send false, and a held result then ends the cell at
        # once with ReviewPending instead of waiting for the owner.
        self.executor_session.wait_for_review = bool(allow_stdin)
        entry = [self.execution_count, code, None]
        if store_history and not silent:
            self._history.append(entry)
        try:
            result = self.interpreter.run_cell(code)
            value = getattr(result, "value", None)
            bundle = display.mime_bundle(value) if value is not None else None
        except KeyboardInterrupt:
            self._end_running("interrupted")
            return self._interrupted_reply()
        except (BastionError, ConfigError) as exc:
            self._end_running(f"ended ({exc.ename})")
            self._end_wait("rejected by the owner" if exc.ename == "ReviewRejected" else f"ended ({exc.ename})")
            return self._error_reply(exc.ename, exc.evalue,
                                     display.error_traceback(exc.ename, exc.evalue, exc.details, code))
        except Exception as exc:  # noqa: BLE001 - a bug in the kernel must not end the session
            self._end_running(f"ended ({type(exc).__name__})")
            self._end_wait(f"ended ({type(exc).__name__})")
            self.log.error("internal error in a cell", exc_info=True)
            lines = traceback.format_exception(exc)
            return self._error_reply("InternalError", f"{type(exc).__name__}: {exc}",
                                     ["".join(lines).rstrip(), f"InternalError: {type(exc).__name__}: {exc}"])
        self._end_wait("approved by the owner")
        payload = []
        if isinstance(value, HelpText):
            # As IPython answers x?: a "page" payload (shown under the cell, or in a pager), not a result.
            payload.append({"source": "page", "data": bundle, "start": 0})
        elif bundle is not None:
            entry[2] = bundle.get("text/plain")
            if not silent:
                self.send_response(self.iopub_socket, "execute_result", {
                    "execution_count": self.execution_count, "data": bundle, "metadata": {}})
                self._wait_until_published()
        return {"status": "ok", "execution_count": self.execution_count,
                "payload": payload, "user_expressions": {}}

    def _wait_until_published(self, timeout: float = 1.0) -> None:
        """Wait until ipykernel's IO thread has handed what this cell published to the IOPub socket.

        IOPub messages are sent from a thread of their own, which needs the
        interpreter lock: left alone it would send the cell's result only
        once this thread blocks again, after the reply and the status
        messages are made.  Waiting here hands it over at once, so the result
        is shown first.
        """
        io_thread = getattr(self.iopub_socket, "io_thread", None)
        thread = getattr(io_thread, "thread", None)
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        sent = threading.Event()
        io_thread.schedule(sent.set)
        sent.wait(timeout)

    def _error_reply(self, ename: str, evalue: str, traceback_lines: list[str]) -> dict:
        content = {"ename": ename, "evalue": evalue, "traceback": traceback_lines}
        if not self._silent:
            self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def _interrupted_reply(self) -> dict:
        wait = self._wait
        if wait is None:
            evalue = "the cell was interrupted"
            return self._error_reply("KeyboardInterrupt", evalue, [f"KeyboardInterrupt: {evalue}"])
        # An interrupted wait ends as a batch run's held cell does: the request stays pending.
        error = review_pending(wait.request_id, wait.reason, "the wait was interrupted")
        self._end_wait(f"still pending; request({wait.request_id}) fetches it later")
        return self._error_reply(error.ename, error.evalue, [f"{error.ename}: {error.evalue}"])

    def _on_output(self, kind: str, value: object) -> None:
        """What ``print`` (``"stream"``) and ``display`` (``"display"``) show while the cell runs."""
        if self._silent:
            return
        if kind == "stream":
            self.send_response(self.iopub_socket, "stream",
                               {"name": "stdout", "text": display.printed_text(value)})
        else:
            self.send_response(self.iopub_socket, "display_data",
                               {"data": display.mime_bundle(value), "metadata": {}})

    # -- waiting for the owner -----------------------------------------------------

    def _on_wait(self, request_id: int, status: str, reason: str, elapsed: float) -> None:
        """Called by the client while a result waits for review: show and update the status."""
        wait = self._wait
        if wait is not None and wait.request_id != request_id:
            self._end_wait("approved by the owner")
            wait = None
        bundle = display.waiting_bundle(request_id, status, reason, elapsed)
        if wait is None:
            self._wait = _Wait(request_id, f"bastion-wait-{uuid.uuid4().hex}", elapsed, int(elapsed), reason)
        self._show_in_place(self._wait, wait is None, elapsed, bundle)

    def _on_progress(self, stage: str, elapsed: float) -> None:
        """Called by the client while a reply is slow (``"running"``) and when it arrives (``"done"``)."""
        running = self._running
        if stage == "done":
            self._end_running("done")
            return
        bundle = display.progress_bundle(stage, elapsed)
        if running is None:
            self._running = _Running(f"bastion-run-{uuid.uuid4().hex}", elapsed, int(elapsed))
        self._show_in_place(self._running, running is None, elapsed, bundle)

    def _show_in_place(self, shown: _Wait | _Running, new: bool, elapsed: float, bundle: dict) -> None:
        """Show a new in-place display, or update one, at most once a second."""
        if new:
            self._send_display("display_data", shown.display_id, bundle)
            return
        shown.elapsed = elapsed
        if int(elapsed) != shown.shown_second:
            shown.shown_second = int(elapsed)
            self._send_display("update_display_data", shown.display_id, bundle)

    def _end_running(self, outcome: str) -> None:
        running, self._running = self._running, None
        if running is not None:
            self._send_display("update_display_data", running.display_id,
                               display.progress_ended_bundle(outcome, running.elapsed))

    def _end_wait(self, outcome: str) -> None:
        wait, self._wait = self._wait, None
        if wait is not None:
            self._send_display("update_display_data", wait.display_id,
                               display.wait_ended_bundle(wait.request_id, outcome, wait.elapsed))

    def _send_display(self, msg_type: str, display_id: str, bundle: dict) -> None:
        if not self._silent:
            self.send_response(self.iopub_socket, msg_type,
                               {"data": bundle, "metadata": {}, "transient": {"display_id": display_id}})

    # -- completion, inspection, is_complete ------------------------------------------

    async def do_complete(self, code, cursor_pos):
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        try:
            completion = self.interpreter.complete(code, cursor_pos)
        except Exception:  # noqa: BLE001 - a failed completion is an empty one
            self.log.debug("completion failed", exc_info=True)
            return {"status": "ok", "matches": [], "cursor_start": cursor_pos,
                    "cursor_end": cursor_pos, "metadata": {}}
        return {"status": "ok", "matches": list(completion.matches),
                "cursor_start": completion.cursor_start, "cursor_end": completion.cursor_end,
                "metadata": {}}

    async def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        try:
            text = self.interpreter.inspect(code, cursor_pos, detail_level)
        except Exception:  # noqa: BLE001 - nothing to show is not an error
            self.log.debug("inspection failed", exc_info=True)
            text = None
        if not text:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}

    async def do_is_complete(self, code):
        try:
            status, indent = self.interpreter.is_complete(code)
        except Exception:  # noqa: BLE001
            self.log.debug("is_complete failed", exc_info=True)
            return {"status": "unknown"}
        reply = {"status": status}
        if status == "incomplete":
            reply["indent"] = indent or ""
        return reply

    # -- history ------------------------------------------------------------------

    async def do_history(self, hist_access_type, output, raw, session=None, start=None, stop=None,
                         n=None, pattern=None, unique=False):
        entries = self._history
        if hist_access_type == "tail":
            entries = entries[-n:] if n else entries
        elif hist_access_type == "range":
            first = start or 0
            entries = [e for e in entries if e[0] >= first and (stop is None or e[0] < stop)]
        elif hist_access_type == "search":
            entries = [e for e in entries if fnmatch.fnmatchcase(e[1], pattern or "*")]
            if unique:
                last_of = {e[1]: e for e in entries}
                entries = [e for e in entries if last_of[e[1]] is e]
            entries = entries[-n:] if n else entries
        else:
            entries = []
        history = [(HISTORY_SESSION, line, (code, out) if output else code) for line, code, out in entries]
        return {"status": "ok", "history": history}

    # -- what this kernel does not offer ---------------------------------------------

    async def do_debug_request(self, msg):
        return {}

    async def create_subshell_request(self, socket, ident, parent) -> None:
        self.session.send(socket, "create_subshell_reply",
                          {"status": "error", "ename": "UnsupportedOperation",
                           "evalue": "the Bastion kernel runs one cell at a time and has no subshells",
                           "traceback": []}, parent, ident)

    async def do_shutdown(self, restart):
        self.executor_session.close()
        return {"status": "ok", "restart": restart}


_UNENCRYPTED_WARNING = "Kernel is running over TCP without encryption"


class _DropUnencryptedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_UNENCRYPTED_WARNING)


class QuietOutStream(OutStream):
    """ipykernel's ``sys.stdout``/``sys.stderr``, whose ``flush`` is free when nothing was written since the last.

    ipykernel flushes both streams after every cell, and each flush waits for
    a round trip through its IO thread.  A Bastion cell prints through
    IOPub messages (:meth:`BastionKernel._on_output`), not through these
    streams, so those round trips would only cost every cell two thread
    switches each.  Whatever is written (a library's warning, output of the
    process's file descriptors) is flushed as before.
    """

    _written = False

    def write(self, string: str) -> int | None:
        written = super().write(string)
        self._written = True  # (after the text is buffered: a flush that sees the flag sends it)
        return written

    def flush(self) -> None:
        if self._written:
            self._written = False
            super().flush()


class BastionKernelApp(IPKernelApp):
    """ipykernel's application, with its warning about unencrypted TCP explained where it does not apply.

    The warning concerns the sockets between Jupyter and this kernel.  When
    they listen on a loopback address (the usual set-up: JupyterLab starts
    the kernel on the same machine) nothing leaves the machine, and the
    scientist's queries to the owner's executor travel on a separate
    connection that is always CURVE-encrypted and authenticated.  The kernel
    then logs that fact instead; on any other address ipykernel's warning
    stays, because it is true there.
    """

    outstream_class = DottedObjectName("bastion_kernel.kernel.QuietOutStream", allow_none=True,
                                       help="The importstring for the OutStream factory").tag(config=True)

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        self._log_only_what_is_shown()

    def _log_only_what_is_shown(self) -> None:
        """Make the logger drop what its handlers would drop.

        traitlets leaves the application's logger at DEBUG and filters in its
        handlers, so ipykernel's debug lines (several per message, each with
        the message's content) were made into records on every cell and then
        thrown away.
        """
        levels = [handler.level for handler in self.log.handlers]
        if levels and not self.log.propagate and self.log.level < min(levels):
            self.log.setLevel(min(levels))

    def init_sockets(self) -> None:
        if self.transport != "tcp" or self.curve_secretkey is not None or not _is_loopback(self.ip):
            super().init_sockets()
        else:
            quiet = _DropUnencryptedWarning()
            self.log.addFilter(quiet)
            try:
                super().init_sockets()
            finally:
                self.log.removeFilter(quiet)
            self.log.info("Jupyter talks to this kernel over local TCP on %s (loopback: nothing leaves this machine); "
                          "queries to the data owner's executor use their own CURVE-encrypted connection", self.ip)
        self._drop_shell_channel_thread()

    def _drop_shell_channel_thread(self) -> None:
        """Read shell messages on the main thread, as a kernel without subshells does.

        ipykernel 7 receives every shell message on a thread of its own and
        hands it to the main thread over an inproc socket, so that subshells can
        run beside it.  This kernel runs one cell at a time and has no subshells
        (``create_subshell_request`` refuses), so that hop would only add a
        thread switch to every cell; ipykernel serves the shell socket from the
        main thread when there is no such thread.
        """
        thread = getattr(self, "shell_channel_thread", None)
        if thread is not None and not thread.is_alive():
            self.shell_channel_thread = None
            thread.io_loop.close(all_fds=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
