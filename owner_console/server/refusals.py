"""Each key's allowance of refused requests (``max_refusals_per_minute``): a refused key cannot grow the audit log
faster than that."""
from __future__ import annotations

import threading
import time

from ..approvals import utc_now


class RefusalBudget:
    """Each key's allowance of refused requests: a token bucket of ``limit`` tokens, refilled at
    ``limit`` a minute (``max_refusals_per_minute``, :mod:`owner_console.limits`).  Thread-safe.

    :meth:`check` says what to do with a key's next message: ``"serve"`` it, ``"refuse"`` it (the first
    message after the allowance ran out: answered ``LimitExceeded``, audited) or ``"drop"`` it (unanswered,
    unprocessed, counted).  With ``"serve"`` comes, once, the count of messages dropped before, for the
    ``throttled`` audit entry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [tokens, refilled at (monotonic), refused since empty, dropped, first and last drop (UTC)]
        self._keys: dict[str, list] = {}

    def _state(self, key: str, limit: int, now: float) -> list:
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= 10_000:  # forget keys that are back to a full allowance
                self._keys = {k: s for k, s in self._keys.items() if s[0] < limit or s[3]}
            state = self._keys[key] = [float(limit), now, False, 0, None, None]
        state[0] = min(float(limit), state[0] + (now - state[1]) * limit / 60.0)
        state[1] = now
        return state

    def check(self, key: str, limit: int) -> tuple[str, dict | None]:
        with self._lock:
            state = self._state(key, limit, time.monotonic())
            if state[0] >= 1.0:
                state[2] = False
                return "serve", self._take_dropped(state, limit)
            if not state[2]:
                state[2] = True
                return "refuse", None
            moment = utc_now()
            state[3] += 1
            state[4] = state[4] or moment
            state[5] = moment
            return "drop", None

    def spend(self, key: str, limit: int) -> None:
        """One refusal of ``key``."""
        with self._lock:
            state = self._state(key, limit, time.monotonic())
            state[0] = max(0.0, state[0] - 1.0)

    def drain(self, limit: int) -> dict[str, dict]:
        """Every key's count of dropped messages not yet reported (at shutdown)."""
        with self._lock:
            found = {key: self._take_dropped(state, limit) for key, state in self._keys.items()}
        return {key: dropped for key, dropped in found.items() if dropped}

    @staticmethod
    def _take_dropped(state: list, limit: int) -> dict | None:
        if not state[3]:
            return None
        dropped = {"dropped": state[3], "first_dropped_at": state[4], "last_dropped_at": state[5],
                   "limit": "max_refusals_per_minute", "max_refusals_per_minute": limit}
        state[3], state[4], state[5] = 0, None, None
        return dropped
