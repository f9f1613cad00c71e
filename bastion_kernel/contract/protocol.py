"""The wire between the kernel and the executor: a versioned JSON envelope.

Every message is a ZeroMQ multipart message.  Its first frame is a UTF-8
JSON object, the *envelope*::

    {"v": 1, "id": "<client-chosen id>", "kind": "<kind>", "body": {...}}

A reply carries the ``id`` of its request.  A ``result`` reply has a second
frame: the table as Arrow IPC (file format).  No other frame is ever read, and
nothing but JSON and Arrow IPC is ever deserialized from the wire.

Request kinds (scientist -> executor)
-------------------------------------
``hello``           ``{}`` -> ``ok`` ``{"scientist", "server_version", "plan_version"}``
``datasets``        ``{}`` -> ``ok`` ``{"datasets": [{"name", "schema", "policy"}]}``
``schema``          ``{"plan"}`` -> ``ok`` ``{"schema": [[name, dtype], ...]}``
``fetch``           ``{"plan", "text"}`` -> ``result`` | ``pending`` | ``error``
``request_status``  ``{"request_id"}`` -> ``result`` | ``pending`` | ``error``
``save``            ``{"plan", "name", "text"}`` -> ``ok`` ``{"name"}`` | ``error``
``cancel``          ``{"target"}`` (the id of an earlier ``fetch`` or ``save`` envelope of the
                    same scientist) -> ``ok`` ``{"target", "cancelled": true}`` | ``error``
                    ``NotFound``; the cancelled request is answered ``error`` ``ExecutionError``
                    with ``details["cancelled"]``
``dp_preview``      ``{"plan"}`` -> ``ok`` ``{"dataset", "epsilon", "delta", "alpha", "columns": [{"name",
                    "aggregate", "distribution", "scale", "accuracy"}], "budget"}``: what a
                    differentially private query would cost and its expected error; spends nothing
``budget``          ``{}`` -> ``ok`` ``{"datasets": [{"name", "epsilon_total", "epsilon_spent",
                    "epsilon_remaining", "epsilon_per_query", "delta_total", "delta_spent",
                    "shared_epsilon_total", "shared_epsilon_remaining", "queries_left"}]}``: the
                    scientist's privacy budget on each DP dataset (``epsilon_total``: the
                    per-scientist bound; ``shared_*``: the bound on all scientists together, null
                    when the owner set none)

Reply kinds (executor -> scientist)
-----------------------------------
``ok``       a body as listed above.
``result``   ``{"schema", "rows", "notes": [str], "request_id": int | null, "mock": bool}``
             plus the Arrow IPC frame.  ``request_id`` names the owner's approval that
             released it (again, for a re-run of an approved query); ``mock`` is true for
             an answer from the owner's mock data (``{"op": "scan", ..., "mock": true}``).
``pending``  ``{"request_id", "status", "reason"}``: held for the owner.
``error``    the one error shape, :func:`error_body`.

The scientist's identity is never in the envelope: the executor takes it from
the authenticated CURVE key.
"""
from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = 1 << 20  # 1 MiB: a plan is small; a larger request is refused

REQUEST_KINDS = ("hello", "datasets", "schema", "fetch", "request_status", "save", "cancel", "dp_preview", "budget")
REPLY_KINDS = ("ok", "result", "pending", "error")

# The documented set of error names a client can rely on (the design's
# "small, documented set"); ``error_body`` refuses any other.
ERROR_NAMES = {
    "ProtocolError": "the message is not a valid Bastion envelope",
    "AuthenticationError": "the key is not allowed, or the caller may not do this",
    "UnsupportedOperation": "an operation, function or syntax outside the whitelist",
    "SchemaError": "an unknown dataset, column or a type that does not fit",
    "PolicyViolation": "the owner's policy does not allow releasing this result",
    "ReviewRejected": "the owner rejected the request",
    "ReviewPending": "the result waits for the owner's review and this run does not wait for it",
    "NotFound": "no such request or saved result for this scientist",
    "LimitExceeded": "a size, depth, row or time limit was exceeded",
    "ExecutionError": "the query failed while running",
    "ParseError": "the cell is not valid Bastion syntax",
}


class ProtocolError(ValueError):
    """A message that is not a valid envelope."""


class BastionError(Exception):
    """An error with one of the documented names; travels as :func:`error_body`.

    ``BastionError(ename, evalue, **details)`` makes an instance of the typed
    class for ``ename`` (:class:`PolicyViolation`, ...).  Each class declares
    the detail fields a scientist may see (``PUBLIC_FIELDS``): facts of the
    plan, the request and the owner's policy.  Any other detail (a row count,
    which check failed, a polars error class) is the owner's: it stays in
    :attr:`details` for the audit log and never reaches :meth:`body`.
    """

    ename: str = ""
    PUBLIC_FIELDS: frozenset[str] = frozenset()

    def __new__(cls, ename: str = "", evalue: str = "", **details: Any):
        typed = ERROR_CLASSES.get(ename, cls) if cls is BastionError else cls
        return super().__new__(typed)

    def __init__(self, ename: str, evalue: str, **details: Any):
        if ename not in ERROR_NAMES:
            raise ValueError(f"undocumented error name {ename!r}")
        super().__init__(evalue)
        self.ename = ename
        self.evalue = evalue
        self.details = details

    def __reduce__(self):
        return _rebuild_error, (self.ename, self.evalue, self.details)

    def public_details(self) -> dict:
        """The details the scientist may see: only this class's declared public fields."""
        return {k: v for k, v in self.details.items() if k in self.PUBLIC_FIELDS}

    def owner_details(self) -> dict:
        """The details for the owner only (audit, executor log)."""
        return {k: v for k, v in self.details.items() if k not in self.PUBLIC_FIELDS}

    def body(self) -> dict:
        """The error as it goes on the wire to the scientist: public details only."""
        return error_body(self.ename, self.evalue, **self.public_details())

    def internal_body(self) -> dict:
        """The error with every detail, for the owner's side (a query worker's pipe to the executor)."""
        return error_body(self.ename, self.evalue, **self.details)

    @classmethod
    def from_body(cls, body: dict) -> "BastionError":
        ename = body.get("ename") if isinstance(body, dict) else None
        evalue = body.get("evalue") if isinstance(body, dict) else None
        if ename not in ERROR_NAMES or not isinstance(evalue, str):
            return BastionError("ProtocolError", f"malformed error reply: {body!r:.200}")
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        return BastionError(ename, evalue, **details)


def _rebuild_error(ename: str, evalue: str, details: dict) -> BastionError:
    return BastionError(ename, evalue, **details)


def _error_class(name: str, public: tuple[str, ...]) -> type[BastionError]:
    return type(name, (BastionError,), {"ename": name, "PUBLIC_FIELDS": frozenset(public),
                                        "__doc__": f"{ERROR_NAMES[name]} (public details: "
                                                   f"{', '.join(public) or 'none'})."})


# The public detail fields of each error: names of plan, request and policy
# facts only.  A count or value computed from rows has no field here.  (The
# ``ProtocolError`` exception above is the envelope check; its reply is of the
# class ``ERROR_CLASSES["ProtocolError"]``.)
ERROR_CLASSES: dict[str, type[BastionError]] = {}
for _name, _public in {
    "ProtocolError": ("frame", "request_id"),
    "AuthenticationError": (),
    "UnsupportedOperation": ("at", "function", "op", "construct", "frame", "how", "name", "column"),
    "SchemaError": ("at", "op", "column", "columns", "dataset", "bounds", "quantile", "candidates", "schema"),
    "PolicyViolation": ("sources", "dataset", "column", "function", "op", "at", "min_group_size", "action",
                        "bounds", "epsilon", "epsilon_cost", "limit"),
    "ReviewRejected": ("request_id", "reason"),
    "ReviewPending": ("request_id", "status", "reason"),
    "NotFound": ("request_id", "status", "target", "name"),
    "LimitExceeded": ("limit", "max_rows", "seconds", "timeout", "max_bytes"),
    "ExecutionError": ("cancelled", "reference", "changed", "failed"),
    "ParseError": ("line", "col", "end_line", "end_col"),
}.items():
    ERROR_CLASSES[_name] = _error_class(_name, _public)
PolicyViolation = ERROR_CLASSES["PolicyViolation"]
ReviewRejected = ERROR_CLASSES["ReviewRejected"]
ReviewPending = ERROR_CLASSES["ReviewPending"]
UnsupportedOperation = ERROR_CLASSES["UnsupportedOperation"]
SchemaError = ERROR_CLASSES["SchemaError"]
NotFound = ERROR_CLASSES["NotFound"]
LimitExceeded = ERROR_CLASSES["LimitExceeded"]
ExecutionError = ERROR_CLASSES["ExecutionError"]
ParseError = ERROR_CLASSES["ParseError"]
AuthenticationError = ERROR_CLASSES["AuthenticationError"]


def error_body(ename: str, evalue: str, **details: Any) -> dict:
    """The canonical error shape: ``{"ename", "evalue", "details"}``."""
    if ename not in ERROR_NAMES:
        raise ValueError(f"undocumented error name {ename!r}")
    return {"ename": ename, "evalue": evalue, "details": details}


def encode(kind: str, body: dict, msg_id: str) -> bytes:
    """Serialize one envelope (first frame of a message)."""
    if kind not in REQUEST_KINDS and kind not in REPLY_KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    return json.dumps({"v": PROTOCOL_VERSION, "id": msg_id, "kind": kind, "body": body},
                      separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")


def decode(frame: bytes, allowed_kinds: tuple[str, ...]) -> tuple[str, str, dict]:
    """Parse and check an envelope; returns ``(kind, id, body)`` or raises ProtocolError."""
    if len(frame) > MAX_ENVELOPE_BYTES:
        raise ProtocolError(f"envelope of {len(frame)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        text = bytes(frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"envelope is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        message = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"envelope is not JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("envelope must be a JSON object")
    extra = set(message) - {"v", "id", "kind", "body"}
    if extra:
        raise ProtocolError(f"envelope has unknown field {sorted(extra)[0]!r}")
    if message.get("v") != PROTOCOL_VERSION or isinstance(message.get("v"), bool):
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r}; this executor speaks {PROTOCOL_VERSION}")
    msg_id = message.get("id")
    if not isinstance(msg_id, str) or not 0 < len(msg_id) <= 128:
        raise ProtocolError("envelope id must be a string of 1 to 128 characters")
    kind = message.get("kind")
    if kind not in allowed_kinds:
        raise ProtocolError(f"unknown message kind {str(kind)[:64]!r}; expected one of {', '.join(allowed_kinds)}")
    body = message.get("body")
    if not isinstance(body, dict):
        raise ProtocolError("envelope body must be a JSON object")
    return kind, msg_id, body


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
