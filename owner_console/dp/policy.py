"""The owner's differential privacy policy of one dataset: the ``[dp]`` table and its command-line options.

What the owner writes (all in ``datasets/NAME.toml``'s ``[dp]``)::

    epsilon = 1.0                 # total budget of each scientist on this data
    epsilon_per_query = 0.1       # what one released query costs (default epsilon / 10)
    epsilon_total = 3.0           # optional: what all scientists together may spend on this data
    delta = 0.0                   # total delta (0: pure DP); delta_per_query likewise
    max_rows = 100000             # a public upper bound on the number of rows
    privacy_unit_column = "patient_id"   # optional: rows of one person share this id
    max_contributions = 1         # rows one person may contribute (kept per id)
    [dp.bounds]                   # optional clipping bounds, per column
    age = [0, 100]
    [dp.public_keys]              # group-by keys and their public values
    sex = ["F", "M"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

MAX_KEY_COMBINATIONS = 10_000     # rows of the public key set of one group_by


@dataclass(frozen=True)
class DPPolicy:
    """The owner's differential privacy settings of one dataset (the ``[dp]`` table).

    ``ledger`` is where the workspace keeps the odometer; it is set by the
    workspace when it reads the dataset, never by a scientist.
    """

    epsilon: float
    max_rows: int
    epsilon_per_query: float | None = None
    epsilon_total: float | None = None
    delta: float = 0.0
    delta_per_query: float | None = None
    privacy_unit_column: str | None = None
    max_contributions: int = 1
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    public_keys: Mapping[str, tuple] = field(default_factory=dict, hash=False)
    ledger: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not is_number(self.epsilon) or not self.epsilon > 0:
            raise ValueError(f"dp.epsilon must be a number > 0, got {self.epsilon!r}")
        per_query = self.epsilon / 10 if self.epsilon_per_query is None else self.epsilon_per_query
        if not is_number(per_query) or not 0 < per_query <= self.epsilon:
            raise ValueError(f"dp.epsilon_per_query must be a number in (0, epsilon], got {per_query!r}")
        object.__setattr__(self, "epsilon_per_query", float(per_query))
        object.__setattr__(self, "epsilon", float(self.epsilon))
        if self.epsilon_total is not None:
            if not is_finite(self.epsilon_total) or not self.epsilon_total >= per_query:
                raise ValueError(f"dp.epsilon_total must be a number >= epsilon_per_query ({per_query:g}), "
                                 f"got {self.epsilon_total!r}")
            object.__setattr__(self, "epsilon_total", float(self.epsilon_total))
        if not is_number(self.delta) or not 0 <= self.delta < 1:
            raise ValueError(f"dp.delta must be a number in [0, 1), got {self.delta!r}")
        delta_per_query = self.delta / 10 if self.delta_per_query is None else self.delta_per_query
        if not is_number(delta_per_query) or not 0 <= delta_per_query <= self.delta:
            raise ValueError(f"dp.delta_per_query must be a number in [0, delta], got {delta_per_query!r}")
        object.__setattr__(self, "delta_per_query", float(delta_per_query))
        object.__setattr__(self, "delta", float(self.delta))
        if not is_whole(self.max_rows) or self.max_rows < 1:
            raise ValueError(f"dp.max_rows must be a whole number >= 1, got {self.max_rows!r}")
        if self.privacy_unit_column is not None and (not isinstance(self.privacy_unit_column, str)
                                                     or not self.privacy_unit_column):
            raise ValueError(f"dp.privacy_unit_column must be a column name, got {self.privacy_unit_column!r}")
        if not is_whole(self.max_contributions) or not 1 <= self.max_contributions <= 10_000:
            raise ValueError(f"dp.max_contributions must be a whole number from 1 to 10000, "
                             f"got {self.max_contributions!r}")
        if not isinstance(self.bounds, Mapping):
            raise ValueError("dp.bounds must be a table of column = [lower, upper]")
        bounds = {}
        for column, pair in self.bounds.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(is_finite(v) for v in pair) \
                    or not pair[0] < pair[1]:
                raise ValueError(f"dp.bounds.{column} must be [lower, upper] with finite numbers, lower < upper")
            bounds[str(column)] = (pair[0], pair[1])
        object.__setattr__(self, "bounds", bounds)
        if not isinstance(self.public_keys, Mapping):
            raise ValueError("dp.public_keys must be a table of column = [value, ...]")
        keys = {}
        for column, values in self.public_keys.items():
            if not isinstance(values, (list, tuple)) or not values or len(values) > MAX_KEY_COMBINATIONS \
                    or not all(isinstance(v, (str, int, float, bool)) for v in values) \
                    or len(set(values)) != len(values):
                raise ValueError(f"dp.public_keys.{column} must be a non-empty list of distinct values "
                                 f"(at most {MAX_KEY_COMBINATIONS})")
            keys[str(column)] = tuple(values)
        object.__setattr__(self, "public_keys", keys)

    @property
    def columns(self) -> set[str]:
        """The columns this policy names (they must exist in the data)."""
        named = set(self.bounds) | set(self.public_keys)
        if self.privacy_unit_column:
            named.add(self.privacy_unit_column)
        return named

    def to_dict(self) -> dict[str, Any]:
        """The ``[dp]`` table as written to ``datasets/NAME.toml``."""
        data: dict[str, Any] = {"epsilon": self.epsilon, "epsilon_per_query": self.epsilon_per_query,
                                "delta": self.delta, "delta_per_query": self.delta_per_query,
                                "max_rows": self.max_rows, "max_contributions": self.max_contributions}
        if self.epsilon_total is not None:
            data["epsilon_total"] = self.epsilon_total
        if self.privacy_unit_column:
            data["privacy_unit_column"] = self.privacy_unit_column
        if self.bounds:
            data["bounds"] = {c: list(b) for c, b in self.bounds.items()}
        if self.public_keys:
            data["public_keys"] = {c: list(v) for c, v in self.public_keys.items()}
        return data

    def describe(self) -> dict[str, Any]:
        """What a scientist may know of the policy (``datasets`` shows it)."""
        data = self.to_dict()
        data.pop("max_rows")
        return data

    @classmethod
    def from_dict(cls, data: Any, ledger: Path | None = None) -> "DPPolicy":
        """Parse a ``[dp]`` table; raises ValueError naming the key (``dp.KEY: ...``)."""
        if not isinstance(data, Mapping):
            raise ValueError("[dp] must be a table")
        known = {"epsilon", "epsilon_per_query", "epsilon_total", "delta", "delta_per_query", "max_rows",
                 "privacy_unit_column", "max_contributions", "bounds", "public_keys"}
        extra = set(data) - known
        if extra:
            raise ValueError(f"dp.{sorted(extra)[0]}: unknown setting; known: {', '.join(sorted(known))}")
        for required in ("epsilon", "max_rows"):
            if required not in data:
                raise ValueError(f"dp.{required}: missing (a [dp] table needs epsilon and max_rows)")
        return cls(ledger=ledger, **dict(data))


def check_columns(policy: DPPolicy, columns: Iterable[str], where: str) -> None:
    """Refuse a policy naming a column the data does not have (ValueError naming ``where``)."""
    available = list(columns)
    for column in sorted(policy.columns):
        if column not in available:
            raise ValueError(f"{where}: the [dp] policy names the column {column!r}, which is not in the data "
                             f"(columns: {', '.join(available)})")


def is_number(value: Any) -> bool:
    """True for an int or a float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """True for a finite int or float."""
    return is_number(value) and math.isfinite(value)


def is_whole(value: Any) -> bool:
    """True for an int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def policy_from_options(file: str | Path, *, epsilon: float | None, epsilon_per_query: float | None = None,
                        epsilon_total: float | None = None, delta: float = 0.0, max_rows: int | None = None,
                        privacy_unit_column: str | None = None,
                        max_contributions: int = 1, bounds: Iterable[str] = (),
                        public_keys: Iterable[str] = ()) -> DPPolicy:
    """A :class:`DPPolicy` from ``bastion-owner dataset add --privacy dp`` options.

    ``bounds`` items are ``COL=LO:HI``; ``public_keys`` items ``COL=v1,v2,...``
    (values converted to the column's type).  ``max_rows`` defaults to ten
    times the file's row count, rounded up to a power of ten (a loose public
    bound that does not reveal the count).

    Raises
    ------
    ValueError
        Naming the option that is wrong.
    """
    import polars as pl

    if epsilon is None:
        raise ValueError("--privacy dp needs --epsilon (the total budget of each scientist)")
    path = Path(file)
    frame = pl.scan_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pl.scan_csv(path)
    schema = frame.collect_schema()
    if max_rows is None:
        rows = frame.select(pl.len()).collect().item()
        max_rows = 10 ** max(1, math.ceil(math.log10(max(rows, 1) * 10)))
    parsed_bounds = parse_bounds(bounds)
    keys = {}
    for item in public_keys:
        column, sep, rest = str(item).partition("=")
        if not sep or not column or not rest:
            raise ValueError(f"--public-keys {item!r}: expected COL=v1,v2,..., for example sex=F,M")
        if column not in schema:
            raise ValueError(f"--public-keys {item!r}: no column {column!r} in {path.name}")
        keys[column] = [_key_value(v, schema[column], item) for v in rest.split(",")]
    return DPPolicy(epsilon=epsilon, epsilon_per_query=epsilon_per_query, epsilon_total=epsilon_total, delta=delta,
                    delta_per_query=delta / 10 if delta else 0.0, max_rows=max_rows,
                    privacy_unit_column=privacy_unit_column, max_contributions=max_contributions,
                    bounds=parsed_bounds, public_keys=keys)


def parse_bounds(items: Iterable[str]) -> dict[str, list[int | float]]:
    """``--bounds COL=LO:HI`` options as ``{column: [low, high]}``.

    Raises
    ------
    ValueError
        Naming the option that is not ``COL=LO:HI`` with finite numbers.
    """
    parsed = {}
    for item in items:
        column, sep, rest = str(item).partition("=")
        low, colon, high = rest.rpartition(":") if rest.count(":") == 1 else ("", "", "")
        try:
            parsed[column] = [_number(low), _number(high)]
        except ValueError:
            raise ValueError(f"--bounds {item!r}: expected COL=LO:HI, for example age=0:100") from None
        if not sep or not colon or not column:
            raise ValueError(f"--bounds {item!r}: expected COL=LO:HI, for example age=0:100")
    return parsed


def _number(text: str) -> int | float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _key_value(text: str, dtype: Any, item: str) -> Any:
    if dtype.is_integer():
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--public-keys {item!r}: {text!r} is not a whole number") from None
    if dtype.is_float():
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--public-keys {item!r}: {text!r} is not a number") from None
    if str(dtype) == "Boolean":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--public-keys {item!r}: {text!r} is not true or false")
        return text.lower() == "true"
    return text
