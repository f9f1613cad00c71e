"""Plain types shared by the executor's layers: policies, datasets, decisions, outcomes.

The layers (validate -> policy accounting -> engine -> decide -> server/stores)
exchange only these, so each can be read and tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNSAFE_MODES = ("review", "reject", "log")
# Strictest first: combining policies takes the earliest mode present.
_STRICTNESS = {"reject": 0, "review": 1, "log": 2}


@dataclass(frozen=True)
class Policy:
    """A dataset's privacy policy, as the owner wrote it (``datasets/NAME.toml``)."""

    min_group_size: int = 10
    unsafe: str = "review"
    hidden: frozenset[str] = frozenset()
    allow_save: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.min_group_size, int) or isinstance(self.min_group_size, bool) \
                or self.min_group_size < 1:
            raise ValueError(f"min_group_size must be a whole number >= 1, got {self.min_group_size!r}")
        if self.unsafe not in UNSAFE_MODES:
            raise ValueError(f"unsafe must be one of {', '.join(UNSAFE_MODES)}, got {self.unsafe!r}")
        object.__setattr__(self, "hidden", frozenset(self.hidden))

    def to_dict(self) -> dict[str, Any]:
        return {"min_group_size": self.min_group_size, "unsafe": self.unsafe,
                "hidden": sorted(self.hidden), "allow_save": self.allow_save}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        known = {"min_group_size", "unsafe", "hidden", "allow_save"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown policy setting {sorted(extra)[0]!r}")
        hidden = data.get("hidden", [])
        if not isinstance(hidden, list) or not all(isinstance(h, str) for h in hidden):
            raise ValueError("hidden must be a list of column names")
        allow_save = data.get("allow_save", True)
        if not isinstance(allow_save, bool):
            raise ValueError("allow_save must be true or false")
        return cls(min_group_size=data.get("min_group_size", 10), unsafe=data.get("unsafe", "review"),
                   hidden=frozenset(hidden), allow_save=allow_save)


def strictest_unsafe(modes: list[str]) -> str:
    """The strictest handling among several sources' modes (reject > review > log)."""
    return min(modes, key=_STRICTNESS.__getitem__) if modes else "review"


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: where its file is and the policy that guards it."""

    name: str
    path: Path
    format: str  # "csv" or "parquet"
    policy: Policy


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one result, and why.

    ``action`` is ``"allow"`` (every released row fed by >= K rows of each
    protected source), or the unsafe handling that applied: ``"review"``,
    ``"reject"`` or ``"log"``.  ``reason`` is a sentence for the scientist,
    the owner's console and the audit log alike.
    """

    action: str
    reason: str
    sources: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Released:
    """A result the policy lets out now (``allow`` or ``log``)."""

    table: Any  # polars.DataFrame, hidden values already wiped
    decision: Decision
    notes: list[str] = field(default_factory=list)


@dataclass
class Held:
    """A result that waits for the owner (``review``); ``table`` is what would be released."""

    table: Any  # polars.DataFrame, hidden values already wiped
    decision: Decision
    notes: list[str] = field(default_factory=list)
