"""Per-request limits the owner sets in the workspace's ``config.toml``.

::

    query_timeout_seconds = 300      # a query running longer is cancelled (LimitExceeded)
    max_rows_released = 1000000      # a result with more rows is not sent (LimitExceeded)
    max_refusals_per_minute = 600    # refused requests one key may make (see below)

(top-level keys, next to ``approval_ttl_seconds``).

All are optional; the defaults are above.

``max_refusals_per_minute`` bounds what a key can make the executor do, and
the audit log grow, with requests it refuses (malformed messages, refused
plans, a revoked key's messages, requests over the in-flight limit): each
refusal takes one from the key's allowance, which refills at that many a
minute up to that many.  A key with none left gets one ``LimitExceeded``
answer (audited), then its messages are dropped unanswered and unprocessed
until the allowance refills; one ``throttled`` audit entry then says how
many were dropped.  So one key adds at most about that many entries (of at
most :data:`owner_console.audit.MAX_ENTRY_BYTES` each, a few hundred bytes in
practice) to the audit log a minute.  A dataset's policy may set its
own, smaller ``query_timeout_seconds`` (see
:func:`owner_console.executor.query_timeout`).  The other limits are fixed:
the envelope size (:data:`bastion_kernel.contract.protocol.MAX_ENVELOPE_BYTES`), the
text fields (:data:`owner_console.server.MAX_TEXT_CHARS`), the plan's depth
and node count (:mod:`bastion_kernel.contract.plan`) and the cell size (the language).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_QUERY_TIMEOUT_SECONDS = 300.0
DEFAULT_MAX_ROWS_RELEASED = 1_000_000
DEFAULT_MAX_REFUSALS_PER_MINUTE = 600


@dataclass(frozen=True)
class Limits:
    """The workspace's per-request limits."""

    query_timeout_seconds: float = DEFAULT_QUERY_TIMEOUT_SECONDS
    max_rows_released: int = DEFAULT_MAX_ROWS_RELEASED
    max_refusals_per_minute: int = DEFAULT_MAX_REFUSALS_PER_MINUTE


def limits_from_config(config: dict[str, Any]) -> Limits:
    """Read the limits from a parsed ``config.toml`` (top-level keys; defaults when absent).

    Raises
    ------
    ValueError
        A value that is not a positive number.
    """
    timeout = config.get("query_timeout_seconds", DEFAULT_QUERY_TIMEOUT_SECONDS)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 10**7:
        raise ValueError("query_timeout_seconds must be a positive number of seconds")
    rows = config.get("max_rows_released", DEFAULT_MAX_ROWS_RELEASED)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError("max_rows_released must be a whole number >= 1")
    refusals = config.get("max_refusals_per_minute", DEFAULT_MAX_REFUSALS_PER_MINUTE)
    if not isinstance(refusals, int) or isinstance(refusals, bool) or refusals < 1:
        raise ValueError("max_refusals_per_minute must be a whole number >= 1")
    return Limits(query_timeout_seconds=float(timeout), max_rows_released=rows, max_refusals_per_minute=refusals)
