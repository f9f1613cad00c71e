"""What the interpreter needs from the outside world, and nothing more.

The interpreter calls a :class:`Session` for everything remote; the kernel
passes :class:`bastion_kernel.client.ExecutorClient`, and language tests may
pass an in-memory one.  This module imports neither ipykernel nor zmq.
"""
from __future__ import annotations

from typing import Protocol

from .values import FetchedTable, RequestStatus


class Session(Protocol):
    def datasets(self) -> list[dict]:
        """``[{"name", "schema": [[column, dtype], ...], "policy": {...}}]``."""

    def schema(self, plan: dict) -> list[list[str]]:
        """The output schema of a plan, ``[[column, dtype], ...]``, computed by the executor."""

    def fetch(self, plan: dict, text: str, wait: bool = True) -> FetchedTable | RequestStatus:
        """Run a plan through the policy; block while the owner reviews it.

        With ``wait=False`` a result held for review is not waited for: its
        :class:`RequestStatus` (``pending``) is returned at once, and
        ``request(id)`` fetches it later.

        Raises ``BastionError`` (``PolicyViolation``, ``ReviewRejected``,
        ``ReviewPending`` when a batch run does not wait, ...) or
        ``KeyboardInterrupt`` when the wait is interrupted (the request then
        stays pending on the executor).
        """

    def request(self, request_id: int) -> FetchedTable | RequestStatus:
        """The state of an earlier request; an approved one is fetched (again, while the approval lasts)."""

    def save(self, plan: dict, name: str, text: str) -> None:
        """Keep a result on the owner's side under ``name``."""

    def dp_preview(self, plan: dict) -> FetchedTable:
        """What a differentially private query would cost and its expected error, as a table."""

    def budget(self) -> FetchedTable:
        """The scientist's privacy budget on each differentially private dataset, as a table."""
