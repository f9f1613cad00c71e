"""The executor's server: CURVE allow-list, identities, the edge, dispatch, replies.

One ROUTER socket, CURVE server, bound on the owner's side, serves one
workspace's datasets to its allow-listed scientists.  Every request is
attributed to the name the allow-list gives its key, never to anything in
the message itself; a held request is served only to the key that asked it.

Modules, one job each:

- :mod:`.auth`: the ZAP allow-list (:class:`AllowListAuthenticator`) and
  the key check of every message (a revoked key is refused on an open
  connection too).
- :mod:`.edge`: what every message is checked for before it reaches a
  handler, a store or a log (envelope, id, body fields, text, numbers, plan size).
- :mod:`.refusals`: each key's allowance of refused requests.
- :mod:`.dispatch`: :class:`ExecutorServer`: the socket loop, the thread
  pools, in-flight limits, and every request's one audited reply.
- :mod:`.handlers`: the handler of each request kind (and mock data).
- :mod:`.releases`: held results, re-runs and releases of approved results.
- :mod:`.versions`: the version of the data a plan reads (:func:`data_version`).

Every request gets exactly one reply: an ``ok``/``result``/``pending``, or the
one error shape.  A handler that fails in an unexpected way answers
``ExecutionError`` with a reference (the details, which may hold data values,
go to the owner's log only) and the loop keeps serving.

Limits.  ZeroMQ drops a connection that sends a frame larger than
:data:`MAX_MESSAGE_BYTES` (a little over the envelope limit, so a slightly too
large envelope still gets a typed error); a scientist may have at most
:data:`MAX_IN_FLIGHT_PER_SCIENTIST` requests queued or running.

Cancellation.  A ``fetch`` or ``save`` is registered under (scientist,
envelope id) from the moment it is accepted; a ``cancel`` from the same
scientist sets its event, and the worker process running the query is
killed at once (:class:`owner_console.workers.QueryWorkers`).  Queries also
stop that way at the workspace's ``query_timeout_seconds``
(:mod:`owner_console.limits`), and a result over ``max_rows_released`` rows
is neither sent nor held.

Saved results.  ``save`` keeps a table per scientist
(:mod:`owner_console.saved`); each request's catalog is the owner's datasets
plus that scientist's own saved results, so another scientist's names fail
exactly like names that do not exist.

Audit.  Each scientist's first message on a connection (``connection``),
each ``fetch`` (``query`` with the plan and the cell text), its ``decision``,
``release`` (SHA-256 of the Arrow bytes sent), ``rerelease`` or ``held``, each refusal of
any request (typed errors, malformed messages, a revoked key, a rate limit),
each ``save`` (name, rows, columns, SHA-256 of the Parquet file, inherited
policy, source datasets), each ``cancel`` (its target and whether it was
found) and each unexpected ``error``.  Plans are kept once each, by their
hash (:mod:`owner_console.audit`).  ``hello``, ``datasets`` and ``schema``
that succeed reveal no data and are not audited; nor are ``dp_preview`` (the
noise of a DP query depends on the owner's policy and the query only) and
``budget`` (the scientist's own spending, which the DP releases'
``decision`` entries already record).
"""
from __future__ import annotations

from .auth import ZAP_DOMAIN, AllowListAuthenticator, Keys
from .dispatch import MAX_IN_FLIGHT, MAX_IN_FLIGHT_PER_SCIENTIST, QUERY_KINDS, ExecutorServer
from .edge import BODY_FIELDS, ID_PATTERN, MAX_MESSAGE_BYTES, MAX_TEXT_CHARS, UNREADABLE_ID
from .handlers import server_version
from .refusals import RefusalBudget
from .versions import data_version

__all__ = ["ExecutorServer", "AllowListAuthenticator", "Keys", "RefusalBudget", "data_version", "server_version",
           "ZAP_DOMAIN", "BODY_FIELDS", "ID_PATTERN", "MAX_MESSAGE_BYTES", "MAX_TEXT_CHARS", "UNREADABLE_ID",
           "MAX_IN_FLIGHT", "MAX_IN_FLIGHT_PER_SCIENTIST", "QUERY_KINDS"]
