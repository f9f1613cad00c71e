"""The audit log: append-only JSON lines, hash-chained and signed with Ed25519.

Each line is one entry::

    {"seq": 7, "time": "2026-01-01T12:00:00.000000+00:00", "event": "release",
     "scientist": "alice", ...event fields...,
     "prev": "<hash of entry 6>", "hash": "<sha256>", "sig": "<base64 Ed25519 signature>"}

``hash`` is the SHA-256 (hex) of the canonical JSON (sorted keys, no spaces)
of the entry without ``hash`` and ``sig``; ``prev`` is the previous entry's
``hash`` (``"0" * 64`` for the first); ``sig`` signs the ``hash`` text with the
workspace's audit key.  An edited line changes its hash; a recomputed hash
lacks a valid signature; a deleted, inserted or moved line breaks ``seq`` and
``prev``.  Removing entries from the *end* of the log cannot be seen from the
log alone: keep a copy of the last ``hash`` that ``audit verify`` prints if
that matters.

Several processes append (the executor and the owner's command line): each
append takes an exclusive ``fcntl.flock`` on the file, reads the last entry's
hash under the lock, then writes, flushes and fsyncs the new line.  An
append may leave its fsync to the next one (``sync=False``: the executor's
``query`` entry, written while the query runs, is made durable by the fsync
of that request's decision, refusal or error, or by :meth:`AuditLog.sync`,
before anything is answered): one fsync per request.

Torn lines.  A crash in the middle of a write can leave a last line without
its newline (every complete line was fsynced before the lock was released, so
only the very end of the file can be torn, and only by a writer that died
holding the lock).  The next writer, under the lock, cuts that fragment off
and appends a ``recovered`` entry that records it (its length, SHA-256 and
text), then carries on; opening an :class:`AuditLog` does the same at once.
So the log verifies again after a crash at any moment, and the evidence of
the crash is itself a signed, chained entry.  Only an incomplete *final* line
is treated so: anything else (a bad line in the middle, a complete but
altered last line) is left for ``verify`` to report.

Events: ``connection``, ``query``, ``decision``, ``release``, ``rerelease``
(an approved result sent again to a re-run of its query), ``held``,
``refusal``, ``error``, ``approval``, ``rejection``, ``expiry`` (an approval
not fetched in time), ``budget_reset`` (the owner cleared differential
privacy spending), ``recovered`` (a torn last line cut off, see above),
``save``, ``cancel``, ``plan`` and ``text`` (below), ``access`` (the owner
granted, rotated or revoked a scientist's key) and ``throttled`` (how many
messages of a key were dropped unanswered while it was over its refusal rate
limit, see :mod:`owner_console.limits`).

Plans and long texts, once.  An entry never holds a whole plan: ``append``
replaces a ``plan`` field by its ``plan_hash`` (SHA-256 of the plan's
canonical JSON, :func:`bastion_kernel.contract.plan.plan_hash`) and, the first time
the log meets that plan, writes a ``plan`` entry holding it (under the
scientist who first sent it), in the same locked write just before the
entry that refers to it.  A cell ``text``
longer than :data:`INLINE_TEXT_CHARS` is kept the same way (a ``text``
entry, and ``text_sha256`` in the entry).  A scientist who sends the same
large plan a thousand times costs the log one copy of it and a thousand
small entries.  ``verify`` checks that every stored plan and text matches
its hash and that the plan of every ``query`` and ``refusal`` entry is held
earlier in the log (older logs kept it inline in ``query`` entries; those
are checked the same way).

Bounded entries, whatever they hold.  Field values are made safe to write
before they are hashed: a lone UTF-16 surrogate in a string (valid JSON,
``"\ud800"``, but not UTF-8) becomes U+FFFD, a non-finite number or an
integer past 64 bits is written as text, any other value as its ``str``; a
string longer than :data:`MAX_FIELD_CHARS` keeps its head and its SHA-256;
an entry still larger than :data:`MAX_ENTRY_BYTES` has its largest fields
replaced by their SHA-256 and size.  So an append never fails because of
what a scientist sent, and every entry but a ``plan`` or ``text`` entry
(bounded by the wire's limits, :data:`bastion_kernel.contract.plan.MAX_PLAN_BYTES`
and ``owner_console.server.MAX_TEXT_CHARS``) is at most
:data:`MAX_ENTRY_BYTES` long.
"""
from __future__ import annotations

import base64
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion_kernel.contract.plan import canonical_json

GENESIS = "0" * 64
EVENTS = ("connection", "query", "decision", "release", "held", "refusal", "error",
          "rerelease",  # an approved result sent again to a re-run of its query (owner_console.server)
          "approval", "rejection", "expiry", "recovered",
          "save", "cancel",  # a result kept with save/collect; a scientist's cancel of a running query
          "budget_reset",  # the owner's reset of differential privacy spending (bastion-owner dp reset)
          "plan", "text",  # a plan or a long cell text, kept once by its hash
          "access", "throttled")  # a key granted, rotated or revoked; messages dropped over the rate limit
# Written by the log itself, never by a caller.
CONTENT_EVENTS = ("plan", "text")
# Entries whose plan (by ``plan_hash``) the log must hold earlier: ``verify`` checks it.
PLAN_HOLDING_EVENTS = ("query", "refusal")
RESERVED = ("seq", "time", "event", "scientist", "prev", "hash", "sig")
# A cell text up to this long stays in its entry; a longer one is kept once, by its hash.
INLINE_TEXT_CHARS = 1000
# A string field longer than this keeps its head and its SHA-256.
MAX_FIELD_CHARS = 4000
# An entry's canonical JSON (``plan`` and ``text`` entries aside) is at most this long.
MAX_ENTRY_BYTES = 64 * 1024
_INT64 = 1 << 63
_NO_PLAN = object()
# How a content entry reads in the log: canonical JSON writes ``"event":"plan"`` exactly so, and a
# string value cannot hold an unescaped quote, so this never matches inside another field.  (The last
# marker finds the plans that older logs kept inline.)
_CONTENT_MARKERS = tuple(f'"event":"{event}"'.encode() for event in CONTENT_EVENTS) + (b'"plan":{',)
_TAIL_CHUNK = 64 * 1024
# How much of a torn fragment a ``recovered`` entry keeps as text (all of it is hashed).
_FRAGMENT_KEPT = 4096


# One encoder for every canonical form (json.dumps would build one per call, with these options).
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(entry: dict) -> bytes:
    """The byte form that is hashed (and written): sorted keys, no spaces, UTF-8."""
    return _CANONICAL_ENCODER.encode(entry).encode("utf-8")


def entry_hash(entry: dict) -> str:
    """SHA-256 (hex) of an entry's canonical JSON, without its ``hash`` and ``sig``."""
    body = {key: value for key, value in entry.items() if key not in ("hash", "sig")}
    return hashlib.sha256(canonical(body)).hexdigest()


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read the audit signing key (PKCS#8 PEM) written by ``Workspace.init``."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_verify_key(path: str | Path) -> Ed25519PublicKey:
    """Read the audit public key (PEM) written by ``Workspace.init``."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


class AuditLog:
    """Appends signed, chained entries to the log at ``path``.

    Parameters
    ----------
    path : str or Path
        The JSON lines file (created if missing).
    signing_key : Ed25519PrivateKey or path
        The workspace's audit key, or the path of its PEM file.
    """

    def __init__(self, path: str | Path, signing_key: Ed25519PrivateKey | str | Path):
        self.path = Path(path)
        self._key = signing_key if isinstance(signing_key, Ed25519PrivateKey) else load_signing_key(signing_key)
        self._lock = threading.Lock()
        # (device, inode, size) after our last write, with that entry's hash and seq:
        # lets an append skip re-reading the tail when no one else wrote since.
        self._tail_cache: tuple[tuple[int, int, int], str, int] | None = None
        # The plans and texts the file holds, as ("plan" | "text", sha256): (device, inode), the offset
        # read up to, and the set; read from the file on first use, then kept up with its growth.
        self._contents: tuple[tuple[int, int], int, set[tuple[str, str]]] | None = None
        # True while entries written with ``sync=False`` wait for an fsync (see :meth:`sync`).
        self._unsynced = False
        if self.path.exists() and self.path.stat().st_size > 0:
            self.recover()

    def recover(self) -> dict | None:
        """Cut off a torn last line left by a crash; returns the ``recovered`` entry, or None.

        Safe to call at any time: under the file lock, a torn line can only be
        the remains of a writer that died.
        """
        with self._lock, open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                stat = os.fstat(handle.fileno())
                prev, last_seq, torn = self._tail(handle, stat)
                if not torn:
                    return None
                recovered, line = self._cut_torn_tail(handle, stat, prev, last_seq)
                self._write(handle, line, recovered)
                return recovered
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _entry(self, seq: int, prev: str, event: str, scientist: str | None, fields: dict) -> dict:
        entry = {"seq": seq,
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                 "event": event, "scientist": scientist, **fields, "prev": prev}
        entry["hash"] = entry_hash(entry)
        entry["sig"] = base64.b64encode(self._key.sign(entry["hash"].encode("ascii"))).decode("ascii")
        return entry

    def _cut_torn_tail(self, handle, stat: os.stat_result, prev: str, last_seq: int) -> tuple[dict, bytes]:
        """Truncate the file after its last complete line; the ``recovered`` entry and its line."""
        end = _last_newline_end(handle, stat.st_size)
        handle.seek(end)
        fragment = handle.read(stat.st_size - end)
        handle.truncate(end)
        recovered = self._entry(last_seq + 1, prev, "recovered", None, {
            "fragment_bytes": len(fragment), "fragment_sha256": hashlib.sha256(fragment).hexdigest(),
            "fragment": fragment[:_FRAGMENT_KEPT].decode("utf-8", "replace"),
            "reason": "an incomplete last line (a write torn by a crash) was cut off"})
        return recovered, canonical(recovered) + b"\n"

    def _write(self, handle, data: bytes, last: dict, sync: bool = True) -> None:
        handle.write(data)
        handle.flush()
        stat = os.fstat(handle.fileno())
        if sync:
            os.fsync(handle.fileno())  # every earlier write to the file too: nothing is left unsynced
            self._unsynced = False
        else:
            self._unsynced = True
        self._tail_cache = ((stat.st_dev, stat.st_ino, stat.st_size), last["hash"], last["seq"])

    def sync(self) -> None:
        """Make every entry this log wrote without ``sync`` durable (one fsync; nothing if none is pending)."""
        with self._lock:
            if not self._unsynced:
                return
            with open(self.path, "rb") as handle:
                os.fsync(handle.fileno())
            self._unsynced = False

    def append(self, event: str, scientist: str | None = None, **fields: Any) -> dict:
        """Append one entry and return it (with ``seq``, ``hash`` and ``sig``).

        ``fields`` must not use the reserved keys; values are made safe to
        write (see the module docstring).  A ``plan`` field is kept once by
        its hash: the entry holds ``plan_hash``, and a ``plan`` entry is
        written before it if the log does not hold that plan yet.
        """
        return self.append_many([(event, scientist, fields)])[0]

    def append_many(self, entries: Iterable[tuple[str, str | None, Mapping[str, Any]]], *,
                    sync: bool = True) -> list[dict]:
        """Append several entries, chained in order, in one locked write (one fsync).

        Parameters
        ----------
        entries : iterable of (event, scientist, fields)
            As the arguments of :meth:`append`.  Entries that
            belong together (a ``decision`` and its ``release``) cost one
            fsync instead of one each; all are on disk when this returns.
        sync : bool
            False: written (a crash of the process loses nothing) but not
            fsynced; the next synced append, or :meth:`sync`, makes it
            durable.  For an entry that must be on disk only before something
            that depends on it is answered: the caller syncs before it answers.

        Returns
        -------
        list of dict
            The entries written (with ``seq``, ``hash`` and ``sig``), without
            the ``plan`` and ``text`` entries written for them.
        """
        prepared = []
        # (event, sha256) -> (who sent it first, the content entry's fields)
        contents: dict[tuple[str, str], tuple[str | None, dict]] = {}
        for event, scientist, fields in entries:
            if event not in EVENTS or event in CONTENT_EVENTS:
                raise ValueError(f"unknown audit event {event!r}")
            clash = set(fields) & set(RESERVED)
            if clash:
                raise ValueError(f"audit field {sorted(clash)[0]!r} is reserved")
            fields = dict(fields)
            plan = fields.pop("plan", _NO_PLAN)
            fields = _safe(fields)
            if plan is not _NO_PLAN:
                content = _plan_content(plan)
                fields["plan_hash"] = content["plan_hash"]
                contents.setdefault(("plan", content["plan_hash"]), (_safe(scientist), content))
            text = fields.get("text")
            if isinstance(text, str) and len(text) > INLINE_TEXT_CHARS:
                content = {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "text": fields.pop("text")}
                fields["text_sha256"] = content["text_sha256"]
                contents.setdefault(("text", content["text_sha256"]), (_safe(scientist), content))
            prepared.append((event, _safe(scientist), _bounded(fields)))
        if not prepared:
            return []
        written: list[dict] = []
        with self._lock, open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                stat = os.fstat(handle.fileno())
                prev, last_seq, torn = self._tail(handle, stat)
                data = b""
                if torn:
                    recovered, data = self._cut_torn_tail(handle, stat, prev, last_seq)
                    prev, last_seq = recovered["hash"], recovered["seq"]
                held = self._held_contents(handle, os.fstat(handle.fileno())) if contents else set()
                new_contents = [key for key in contents if key not in held]
                for key in new_contents:
                    entry = self._entry(last_seq + 1, prev, key[0], *contents[key])
                    data += canonical(entry) + b"\n"
                    prev, last_seq = entry["hash"], entry["seq"]
                for event, scientist, fields in prepared:
                    entry = self._entry(last_seq + 1, prev, event, scientist, fields)
                    written.append(entry)
                    data += canonical(entry) + b"\n"
                    prev, last_seq = entry["hash"], entry["seq"]
                # One write: the recovery record, the plans and the entries land together.
                self._write(handle, data, written[-1], sync=sync or torn)
                if contents and self._contents is not None:
                    # Read up to the end just before this write: what was written is known.
                    held.update(new_contents)
                    self._contents = (self._contents[0], os.fstat(handle.fileno()).st_size, held)
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return written

    def _held_contents(self, handle, stat: os.stat_result) -> set[tuple[str, str]]:
        """The ``(event, sha256)`` of every plan and text entry in the file (read under the caller's lock).

        Read whole the first time, then only what other writers appended since; a file that was
        replaced or cut shorter is read again from its start.
        """
        identity = (stat.st_dev, stat.st_ino)
        if self._contents is None or self._contents[0] != identity or self._contents[1] > stat.st_size:
            self._contents = (identity, 0, set())
        _, offset, held = self._contents
        if offset < stat.st_size:
            handle.seek(offset)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # (a torn line is cut off before this is called)
                offset += len(raw)
                if any(marker in raw for marker in _CONTENT_MARKERS):
                    entry = _parse_entry(raw)
                    key = _content_key(entry) if entry is not None else None
                    if key is not None:
                        held.add(key)
            self._contents = (identity, offset, held)
        return held

    def _tail(self, handle, stat: os.stat_result) -> tuple[str, int, bool]:
        """``(hash, seq, torn)`` of the last complete entry; ``torn`` if the file ends mid-line."""
        if stat.st_size == 0:
            return GENESIS, 0, False
        cache = self._tail_cache
        if cache is not None and cache[0] == (stat.st_dev, stat.st_ino, stat.st_size):
            return cache[1], cache[2], False
        handle.seek(stat.st_size - 1)
        torn = handle.read(1) != b"\n"
        position, data, chunk = stat.st_size, b"", _TAIL_CHUNK
        while True:
            step = min(chunk, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
            complete = data[:data.rfind(b"\n") + 1]  # drop a torn fragment at the end
            lines = complete.split(b"\n")[:-1]
            if position > 0:
                lines = lines[1:]  # the first piece may start mid-line
            for raw in reversed(lines):
                entry = _parse_entry(raw)
                if entry is not None:
                    return entry["hash"], entry["seq"], torn
            if position == 0:
                return GENESIS, 0, torn
            chunk *= 2


def _safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON that can always be written: see "Bounded entries" in the module docstring."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if not value.isascii():
            # A lone surrogate cannot be encoded as UTF-8; "surrogatepass" then "replace" turns it into U+FFFD.
            value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 32:
        if type(value) is dict or isinstance(value, Mapping):  # (a plain dict skips the slower abstract check)
            return {_safe(str(key)): _safe(item, depth + 1) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [_safe(item, depth + 1) for item in value]
    return _safe(str(value))


def _bounded(fields: dict) -> dict:
    """``fields`` with long strings cut (head and SHA-256) and, while the entry is over
    :data:`MAX_ENTRY_BYTES`, its largest field replaced by its SHA-256 and size."""
    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
            return f"{value[:MAX_FIELD_CHARS]}... [{len(value):,} characters, sha256 {digest}]"
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        if isinstance(value, list):
            return [cut(item) for item in value]
        return value

    fields = {key: cut(value) for key, value in fields.items()}
    if len(canonical(fields)) <= MAX_ENTRY_BYTES - 1024:
        return fields  # (the whole is at least the sum of its values: nothing to replace)
    sizes = {key: len(canonical(value)) for key, value in fields.items()}
    while sum(sizes.values()) > MAX_ENTRY_BYTES - 1024:  # room for seq, time, hashes and signature
        largest = max(sizes, key=sizes.__getitem__)
        data = canonical(fields[largest])
        fields[largest] = {"omitted_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        sizes[largest] = len(canonical(fields[largest]))
    return fields


def _plan_content(plan: Any) -> dict:
    """The fields of a ``plan`` entry: the plan and the SHA-256 of its canonical JSON (the plan's hash)."""
    try:
        data = canonical_json(plan)
    except (TypeError, ValueError, RecursionError):  # not plain JSON: written as made safe, hashed as written
        plan = _safe(plan)
        data = canonical_json(plan)
    return {"plan_hash": hashlib.sha256(data).hexdigest(), "plan": plan}


def _content_key(entry: dict) -> tuple[str, str] | None:
    """``(event, sha256)`` of a ``plan`` or ``text`` entry whose content matches its hash, else None."""
    try:
        if "plan" in entry and isinstance(entry.get("plan_hash"), str):  # a plan entry, or a plan held inline
            digest = hashlib.sha256(canonical_json(entry["plan"])).hexdigest()
            return ("plan", digest) if digest == entry["plan_hash"] else None
        if entry.get("event") == "text" and isinstance(entry.get("text"), str):
            digest = hashlib.sha256(entry["text"].encode("utf-8")).hexdigest()
            return ("text", digest) if digest == entry.get("text_sha256") else None
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _contents_problem(entry: dict, held: set[tuple[str, str]]) -> str:
    """What is wrong with an entry's plan or text (``""`` if nothing); adds the ones it holds to ``held``."""
    event = entry.get("event")
    if event in CONTENT_EVENTS:
        key = _content_key(entry)
        if key is None:
            return f"the {event} does not match its hash (the {event} was edited)"
        held.add(key)
        return ""
    if "plan" in entry and isinstance(entry.get("plan_hash"), str):  # a log written before plans were kept once
        try:
            digest = hashlib.sha256(canonical_json(entry["plan"])).hexdigest()
        except (TypeError, ValueError):
            digest = ""
        if digest != entry["plan_hash"]:
            return "the plan does not match its hash (the plan was edited)"
        held.add(("plan", digest))
    if event in PLAN_HOLDING_EVENTS and "plan_hash" in entry and ("plan", entry["plan_hash"]) not in held:
        return f"its plan {str(entry['plan_hash'])[:16]}... is not held earlier in the log (a plan entry was removed)"
    if "text_sha256" in entry and ("text", entry["text_sha256"]) not in held:
        return "its text is not held earlier in the log (a text entry was removed)"
    return ""


def _last_newline_end(handle, size: int) -> int:
    """The offset just after the file's last newline (0 if it has none)."""
    position = size
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        found = handle.read(step).rfind(b"\n")
        if found >= 0:
            return position + found + 1
    return 0


def _parse_entry(raw: bytes) -> dict | None:
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str) \
            or isinstance(entry.get("seq"), bool) or not isinstance(entry.get("seq"), int):
        return None
    return entry


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found.

    ``entries`` counts the lines read; ``first_bad`` is the 1-based line
    number of the first problem (None if ``ok``); ``problem`` says what is
    wrong with it; ``last_hash`` is the hash of the last good entry.
    """

    ok: bool
    entries: int
    first_bad: int | None = None
    problem: str = ""
    last_hash: str = GENESIS


def verify(path: str | Path, public_key: Ed25519PublicKey | str | Path) -> VerifyReport:
    """Check every line of the log: hash, signature, sequence and chain.

    Parameters
    ----------
    path : str or Path
        The audit log.
    public_key : Ed25519PublicKey or path
        The workspace's audit public key, or the path of its PEM file.

    Returns
    -------
    VerifyReport
        ``ok`` only if every line is a complete entry whose hash matches its
        content, whose signature is valid, whose ``seq`` follows the previous
        one and whose ``prev`` is the previous entry's hash; every ``plan``
        and ``text`` entry matches its hash, and the plan of every ``query``
        and ``refusal`` entry (and the text of every entry with
        ``text_sha256``) is held earlier in the log.
    """
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_verify_key(public_key)
    prev, expected_seq, count = GENESIS, 1, 0
    held: set[tuple[str, str]] = set()

    def bad(line_no: int, problem: str) -> VerifyReport:
        return VerifyReport(False, count, line_no, problem, prev)

    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            count = line_no
            if not raw.endswith(b"\n"):
                return bad(line_no, "incomplete last line (a write torn by a crash, or a truncation)")
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):
                return bad(line_no, "not a valid JSON entry (a torn write or an edit)")
            if not isinstance(entry, dict) or any(k not in entry for k in RESERVED):
                return bad(line_no, "not an audit entry (missing fields)")
            if entry_hash(entry) != entry["hash"]:
                return bad(line_no, "content does not match its hash (the entry was edited)")
            try:
                key.verify(base64.b64decode(str(entry["sig"]), validate=True), str(entry["hash"]).encode("ascii"))
            except (InvalidSignature, ValueError):
                return bad(line_no, "bad signature (the entry was not written with the audit key)")
            if entry["seq"] != expected_seq:
                return bad(line_no, f"sequence number {entry['seq']!r}, expected {expected_seq} "
                                    "(an entry was deleted, inserted or moved)")
            if entry["prev"] != prev:
                return bad(line_no, "does not chain to the previous entry "
                                    "(an entry was deleted, inserted or moved)")
            problem = _contents_problem(entry, held)
            if problem:
                return bad(line_no, problem)
            prev, expected_seq = entry["hash"], expected_seq + 1
    return VerifyReport(True, count, None, "", prev)


def read_entries(path: str | Path) -> Iterator[dict]:
    """The log's entries in order, skipping lines that do not parse (``verify`` reports those)."""
    with open(path, "rb") as handle:
        for raw in handle:
            entry = _parse_entry(raw.rstrip(b"\n"))
            if entry is not None:
                yield entry
