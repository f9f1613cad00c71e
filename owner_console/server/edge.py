"""The edge: what every message is checked for before it reaches a handler, a store or a log.

The envelope (one frame, :func:`bastion_kernel.contract.protocol.decode`),
its id (1 to 128 printable ASCII characters: it is logged and audited), the
body's fields (:data:`BODY_FIELDS`), every string in it (no lone UTF-16
surrogate: valid JSON, not Unicode text), every number in a plan (finite:
JSON's ``1e400`` is no 64-bit float) and the plan's size (at most
:data:`bastion_kernel.contract.plan.MAX_PLAN_BYTES` of canonical JSON).
Each failure is a typed error naming where it is, answered and audited like
any refusal (:mod:`.dispatch`).
"""
from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from bastion_kernel.contract import protocol
from bastion_kernel.contract.plan import MAX_PLAN_BYTES, canonical_json
from bastion_kernel.contract.protocol import BastionError, ProtocolError

# A message a little over the envelope limit still reaches protocol.decode,
# which answers with a typed error; a much larger one is cut off by ZeroMQ
# (the connection is dropped) before it is ever buffered whole.
MAX_MESSAGE_BYTES = protocol.MAX_ENVELOPE_BYTES + 64 * 1024
MAX_TEXT_CHARS = 100_000
# The reply id for a request whose own id cannot be read (an envelope needs one).
UNREADABLE_ID = "?"
# An envelope id the executor takes: it goes to the log and the audit as it is.
ID_PATTERN = re.compile(r"[\x20-\x7e]{1,128}")

# The body fields each request kind takes: name -> (JSON type, required).
# Anything else in a body is refused, so a body cannot smuggle in, say, a
# "scientist" field that some later code might trust.
BODY_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {},
    "datasets": {},
    "schema": {"plan": (dict, True)},
    "fetch": {"plan": (dict, True), "text": (str, False)},
    "request_status": {"request_id": (int, True)},
    "save": {"plan": (dict, True), "name": (str, True), "text": (str, False)},
    "cancel": {"target": (str, True)},
    "dp_preview": {"plan": (dict, True)},
    "budget": {},
}


class Incoming:
    """One decoded request, who sent it (``key``, and the ``scientist`` the allow-list names), and what the
    edge already knows: ``first`` message of its connection, a ``refusal`` decided there, messages of its key
    ``throttled`` (dropped) before it, whether it ``holds_slot`` of the in-flight limit, audit ``notes``."""

    __slots__ = ("identity", "key", "scientist", "kind", "msg_id", "body", "cancel", "first", "refusal",
                 "throttled", "holds_slot", "notes", "plan_checked")

    def __init__(self, identity: bytes, key: str, scientist: str, kind: str, msg_id: str, body: dict, *,
                 first: bool = False, refusal: BastionError | None = None, throttled: dict | None = None,
                 holds_slot: bool = True, notes: dict | None = None):
        self.identity, self.key, self.scientist = identity, key, scientist
        self.kind, self.msg_id, self.body = kind, msg_id, body
        # Set by the scientist's ``cancel``; the query's worker stops waiting for polars.
        self.cancel = threading.Event()
        self.first, self.refusal, self.throttled = first, refusal, throttled
        self.holds_slot, self.notes = holds_slot, notes or {}
        # True once the body passed check_content: its plan can be hashed, stored and audited.
        self.plan_checked = False


class EdgeRefusal(Exception):
    """A message refused at the edge: the id to answer, the error, the request kind (``"?"``: unknown) and
    audit ``notes``."""

    def __init__(self, msg_id: str, error: BastionError, kind: str = "?", **notes: Any):
        super().__init__(error.evalue)
        self.msg_id, self.error, self.kind, self.notes = msg_id, error, kind, notes


def read_request(data: bytes) -> tuple[str, str, dict]:
    """A request envelope's ``(kind, id, body)``, its id and body fields checked.

    Raises
    ------
    EdgeRefusal
        A ``ProtocolError`` for an envelope that does not decode (answered
        under its salvaged id), an unreadable id or a wrong body field.
    """
    try:
        kind, msg_id, body = protocol.decode(data, protocol.REQUEST_KINDS)
    except ProtocolError as exc:
        raise EdgeRefusal(salvage_id(data), BastionError("ProtocolError", str(exc))) from None
    if ID_PATTERN.fullmatch(msg_id) is None:
        raise EdgeRefusal(UNREADABLE_ID, BastionError("ProtocolError", "envelope id must be 1 to 128 printable "
                                                                       "ASCII characters"),
                          kind, id_sent=ascii(msg_id)[:300])
    try:
        check_body(kind, body)
    except ProtocolError as exc:
        raise EdgeRefusal(msg_id, BastionError("ProtocolError", str(exc)), kind) from None
    return kind, msg_id, body


def check_content(request: Incoming) -> None:
    """Every string in the body is Unicode text, every number in it is finite, the plan is not too large.

    Raises ``ProtocolError`` (a lone UTF-16 surrogate) or ``LimitExceeded`` (a number such as ``1e400``
    that no 64-bit float holds; a plan over :data:`MAX_PLAN_BYTES`), naming where.
    """
    try:
        json.dumps(request.body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise content_error(request.body) from None
    plan = request.body.get("plan")
    if plan is not None:
        size = len(canonical_json(plan))
        if size > MAX_PLAN_BYTES:
            request.notes["plan_bytes"] = size
            raise BastionError("LimitExceeded", f"the plan is {size:,} bytes of JSON; the executor takes plans "
                                                f"of at most {MAX_PLAN_BYTES:,} bytes",
                               limit="max_plan_bytes", max_bytes=MAX_PLAN_BYTES)
        request.plan_checked = True


def check_body(kind: str, body: dict) -> None:
    """Refuse unknown, missing or mistyped body fields (raises ProtocolError)."""
    fields = BODY_FIELDS[kind]
    for name in body:
        if name not in fields:
            raise ProtocolError(f"{kind} takes no field {str(name)[:64]!r}"
                                + (f"; it takes {', '.join(sorted(fields))}" if fields else ""))
    for name, (expected, required) in fields.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{kind} needs the field {name!r}")
            continue
        value = body[name]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ProtocolError(f"{kind} field {name!r} must be a JSON {_JSON_TYPE_NAMES[expected]}")
        if expected is str and len(value) > MAX_TEXT_CHARS:
            raise ProtocolError(f"{kind} field {name!r} is longer than {MAX_TEXT_CHARS} characters")


_JSON_TYPE_NAMES = {dict: "object", str: "string", int: "integer"}


def content_error(body: dict) -> BastionError:
    """The typed error for the first string or number in ``body`` that cannot be stored (see check_content).

    Walks the body iteratively (its nesting is bounded only by the envelope's size), keys and values alike.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not is_text(value):
                return BastionError("ProtocolError", "strings must be Unicode text; this one holds a lone UTF-16 "
                                                     f"surrogate, a \\ud800-\\udfff escape without its pair (at {where})")
        elif isinstance(value, float) and not math.isfinite(value):
            return BastionError("LimitExceeded", "numbers must fit in a 64-bit float (at most about 1.8e308 in "
                                                 f"size); this one does not (at {where})", limit="number_range")
        elif isinstance(value, dict):
            for name, item in reversed(list(value.items())):
                if not is_text(name):
                    return BastionError("ProtocolError", "field names must be Unicode text; one holds a lone "
                                                         f"UTF-16 surrogate (at {where or 'body'})")
                stack.append((f"{where}.{name}".lstrip(".") if len(where) < 200 else where, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]" if len(where) < 200 else where, item)
                         for i, item in reversed(list(enumerate(value))))
    return BastionError("LimitExceeded", "the request is nested too deeply", limit="nesting")


def is_text(value: str) -> bool:
    """True when ``value`` is Unicode text (no lone UTF-16 surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def salvage_id(data: bytes) -> str:
    """The id of an envelope that failed to decode, when one can be read; else :data:`UNREADABLE_ID`."""
    if len(data) > protocol.MAX_ENVELOPE_BYTES:
        return UNREADABLE_ID
    try:
        message = json.loads(data)
    except Exception:  # whatever is wrong with it, decode() already said so
        return UNREADABLE_ID
    msg_id = message.get("id") if isinstance(message, dict) else None
    return msg_id if isinstance(msg_id, str) and ID_PATTERN.fullmatch(msg_id) else UNREADABLE_ID
