"""Plain types shared by the executor's layers: policies, datasets, decisions, outcomes.

The layers (validate -> policy accounting -> engine -> decide -> server/stores)
exchange only these, so each can be read and tested on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

UNSAFE_MODES = ("review", "reject", "log")
# Strictest first: combining policies takes the earliest mode present.
_STRICTNESS = {"reject": 0, "review": 1, "log": 2}


@dataclass(frozen=True)
class Policy:
    """A dataset's privacy policy, as the owner wrote it (``datasets/NAME.toml``).

    The first four fields are the core rule; the others are optional and,
    but for ``dominance``, off by default (see ``docs/policy.md``):

    ``person_id``
        A column identifying a person (one person may have many rows): K then
        counts distinct people, not rows.
    ``dominance``
        The dominance rule, on unless the owner turns it off: in a released
        sum, mean, std or var, the two largest distances of contributions from
        their group's median make up at most 90% of the total distance, and
        the total minus those two is at least 10% of the largest (ACRO's N-K
        and p-ratio rules).
    ``max_share``
        A stricter dominance rule the owner may add: no single row's distance
        from the group's median makes up more than this share
        (0 < max_share <= 1) of the total distance.
    ``suppress_small_groups``
        Drop the groups under K from an aggregate (and say how many) instead
        of holding the whole result.
    ``aggregates_only``
        Never release a result that fails the rule, not even after review.
    ``max_rows_released``, ``max_join_rows``, ``query_timeout_seconds``
        Limits (None: no limit).
    ``bounds``
        Public bounds of numeric columns, ``{column: (low, high)}``: facts the
        owner declares (not read from the data), which charts use for their
        ranges and bins.
    ``scientists``
        Per-scientist overrides: ``{name: {setting: value}}``, applied by
        :meth:`for_scientist`.
    """

    min_group_size: int = 10
    unsafe: str = "review"
    hidden: frozenset[str] = frozenset()
    allow_save: bool = True
    person_id: str | None = None
    max_share: float | None = None
    suppress_small_groups: bool = False
    aggregates_only: bool = False
    max_rows_released: int | None = None
    max_join_rows: int | None = None
    query_timeout_seconds: float | None = None
    dominance: bool = True
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    scientists: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.min_group_size, int) or isinstance(self.min_group_size, bool) \
                or self.min_group_size < 1:
            raise ValueError(f"min_group_size must be a whole number >= 1, got {self.min_group_size!r}")
        if self.unsafe not in UNSAFE_MODES:
            raise ValueError(f"unsafe must be one of {', '.join(UNSAFE_MODES)}, got {self.unsafe!r}")
        object.__setattr__(self, "hidden", frozenset(self.hidden))
        if not isinstance(self.allow_save, bool):
            raise ValueError("allow_save must be true or false")
        if self.person_id is not None and (not isinstance(self.person_id, str) or not self.person_id):
            raise ValueError(f"person_id must be a column name, got {self.person_id!r}")
        if self.max_share is not None and (isinstance(self.max_share, bool)
                                           or not isinstance(self.max_share, (int, float))
                                           or not 0 < self.max_share <= 1):
            raise ValueError(f"max_share must be a number in (0, 1], got {self.max_share!r}")
        for flag in ("suppress_small_groups", "aggregates_only", "dominance"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false")
        for limit in ("max_rows_released", "max_join_rows"):
            value = getattr(self, limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{limit} must be a whole number >= 1, got {value!r}")
        timeout = self.query_timeout_seconds
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"query_timeout_seconds must be a number > 0, got {timeout!r}")
        object.__setattr__(self, "bounds", checked_bounds(self.bounds))
        checked = {}
        if not isinstance(self.scientists, Mapping):
            raise ValueError("scientists must be a table of per-scientist overrides")
        for name, overrides in self.scientists.items():
            if not isinstance(name, str) or not isinstance(overrides, Mapping):
                raise ValueError(f"scientists.{name}: must be a table of settings")
            extra = set(overrides) - set(OVERRIDABLE)
            if extra:
                raise ValueError(f"scientists.{name}: unknown or not overridable setting {sorted(extra)[0]!r}; "
                                 f"overridable: {', '.join(OVERRIDABLE)}")
            try:
                replace(self, scientists={}, **_override_values(overrides))
            except ValueError as exc:
                raise ValueError(f"scientists.{name}: {exc}") from None
            checked[name] = dict(overrides)
        object.__setattr__(self, "scientists", checked)

    def for_scientist(self, scientist: str | None) -> "Policy":
        """The policy that applies to ``scientist``: this one with their overrides, if any.

        The result carries no overrides table, so it never tells one scientist
        about another.
        """
        overrides = self.scientists.get(scientist, {}) if scientist is not None else {}
        return replace(self, scientists={}, **_override_values(overrides))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"min_group_size": self.min_group_size, "unsafe": self.unsafe,
                                "hidden": sorted(self.hidden), "allow_save": self.allow_save}
        # Optional settings appear only when set, so older files and readers stay valid.
        for name in _OPTIONAL_DEFAULTS:
            value = getattr(self, name)
            if value != _OPTIONAL_DEFAULTS[name]:
                data[name] = value
        if self.bounds:
            data["bounds"] = {column: list(pair) for column, pair in self.bounds.items()}
        if self.scientists:
            data["scientists"] = {n: {k: (sorted(v) if k == "hidden" else v) for k, v in o.items()}
                                  for n, o in self.scientists.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Policy":
        known = {"min_group_size", "unsafe", "hidden", "allow_save", "scientists", *_OPTIONAL_DEFAULTS}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown policy setting {sorted(extra)[0]!r}")
        hidden = data.get("hidden", [])
        if not isinstance(hidden, list) or not all(isinstance(h, str) for h in hidden):
            raise ValueError("hidden must be a list of column names")
        allow_save = data.get("allow_save", True)
        if not isinstance(allow_save, bool):
            raise ValueError("allow_save must be true or false")
        optional = {name: data[name] for name in _OPTIONAL_DEFAULTS if name in data}
        return cls(min_group_size=data.get("min_group_size", 10), unsafe=data.get("unsafe", "review"),
                   hidden=frozenset(hidden), allow_save=allow_save, scientists=data.get("scientists", {}),
                   **optional)


_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "person_id": None, "max_share": None, "suppress_small_groups": False, "aggregates_only": False,
    "max_rows_released": None, "max_join_rows": None, "query_timeout_seconds": None, "bounds": {},
    "dominance": True,
}
# Settings a per-scientist override may change (person_id describes the data, not the reader).
OVERRIDABLE = ("min_group_size", "unsafe", "hidden", "allow_save", "dominance", "max_share", "suppress_small_groups",
               "aggregates_only", "max_rows_released", "max_join_rows", "query_timeout_seconds")


def _override_values(overrides: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(overrides)
    if "hidden" in values:
        hidden = values["hidden"]
        if not isinstance(hidden, (list, tuple, frozenset, set)) or not all(isinstance(h, str) for h in hidden):
            raise ValueError("hidden must be a list of column names")
        values["hidden"] = frozenset(hidden)
    return values


def checked_bounds(bounds: Any) -> dict[str, tuple[float, float]]:
    """Public column bounds as ``{column: (low, high)}``, validated.

    Raises
    ------
    ValueError
        Naming the entry that is not a column name with two finite numbers, low < high.
    """
    if not isinstance(bounds, Mapping):
        raise ValueError("bounds must be a table of column = [low, high]")
    checked = {}
    for column, pair in bounds.items():
        if not isinstance(column, str) or not column:
            raise ValueError(f"bounds: {column!r} is not a column name")
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
                or not pair[0] < pair[1]):
            raise ValueError(f"bounds.{column} must be [low, high] with finite numbers, low < high")
        checked[column] = (pair[0], pair[1])
    return checked


def strictest_unsafe(modes: list[str]) -> str:
    """The strictest handling among several sources' modes (reject > review > log)."""
    return min(modes, key=_STRICTNESS.__getitem__) if modes else "review"


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: where its file is and the policy that guards it."""

    name: str
    path: Path
    format: str  # "csv" or "parquet"; on Spark also "delta" or "table"
    policy: Policy
    # An owner_console.dp.DPPolicy when the dataset releases only differentially private aggregates.
    dp: Any = None
    # The engine that reads it and runs plans over it (owner_console.engine.ENGINES); a plan reads one engine's.
    engine: str = "polars"
    # What the source is (the Spark engine reads more than one file): "file" (a CSV or Parquet file), "directory"
    # (a directory of CSV or Parquet files read as one table), "delta" (a Delta table's directory) or "table" (a
    # catalog table named by ``table``; its ``path`` is None).  See owner_console.engine.spark.sources.
    source_kind: str = "file"
    table: str | None = None

    @property
    def source(self) -> str:
        """Where the data is, as the owner names it: the path, or ``table:NAME`` for a catalog table."""
        return f"table:{self.table}" if self.source_kind == "table" else str(self.path)


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one result, and why.

    ``action`` is ``"allow"`` (every released row fed by >= K rows of each
    protected source), or the unsafe handling that applied: ``"review"``,
    ``"reject"`` or ``"log"``.  ``reason`` is what the scientist is told: a
    function of the plan and the policy only
    (:func:`owner_console.decide.public_reason`).  ``detail`` (which checks
    failed, with their counts) and ``details`` are for the owner only: the
    console, ``bastion-owner requests`` and the audit log.
    """

    action: str
    reason: str
    sources: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


@dataclass
class Released:
    """A result the policy lets out now (``allow`` or ``log``)."""

    table: Any  # polars.DataFrame, hidden values already wiped
    decision: Decision
    notes: list[str] = field(default_factory=list)
    ipc: bytes | None = None  # the table as Arrow IPC, when a query worker already encoded it


@dataclass
class Held:
    """A result that waits for the owner (``review``); ``table`` is what would be released."""

    table: Any  # polars.DataFrame, hidden values already wiped
    decision: Decision
    notes: list[str] = field(default_factory=list)
    ipc: bytes | None = None  # the table as Arrow IPC, when a query worker already encoded it
