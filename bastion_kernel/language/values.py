"""Values a cell can produce that are not frames or expressions.

The kernel's display layer renders these; they hold already-released data
only (the executor decided what is in them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FetchedTable:
    """A result the executor released: a decoded ``polars.DataFrame``.

    ``notes`` are the executor's remarks on the release (for example which
    columns were wiped to ``*``); ``request_id`` is set when the result was
    approved by the owner after review.  The language calls it a
    ``DataFrame``: it is the scientist's, and its methods
    (:mod:`bastion_kernel.language.results`) run locally, never on the
    executor; a table they make is a ``FetchedTable`` without notes.
    ``mock`` is True for an answer from the owner's mock data
    (``dataset(name, mock=True)``), and for every table made from one.
    """

    type_name = "DataFrame"

    frame: Any
    notes: list[str] = field(default_factory=list)
    request_id: int | None = None
    mock: bool = False


@dataclass
class RequestStatus:
    """Where a held request stands: ``pending``, ``approved``, ``rejected``, ``released``, ``expired``."""

    request_id: int
    status: str
    reason: str = ""


@dataclass
class Printed:
    """What ``print(...)`` asked to show: values written as text, as Python's ``print`` would."""

    values: list
    sep: str = " "
    end: str = "\n"


@dataclass
class HelpText:
    """Help on a name or an expression (``x?``, ``?x``, ``x??``), shown as plain text."""

    text: str


@dataclass
class DatasetList:
    """What ``datasets()`` returns: the executor's dataset descriptions."""

    datasets: list[dict]


@dataclass
class Chart:
    """A chart of released aggregates: a Vega-Lite v5 spec and the rows it draws.

    ``spec`` is the spec without its data; ``rows`` are the released
    aggregates as JSON-ready dicts (one per mark, columns in ``columns``
    order), inlined into the spec by the display layer as ``data.values`` and
    shown as the text fallback.  ``notes`` are the executor's remarks on every
    fetch the chart needed plus the chart's own (bins left out, values
    hidden); ``request_ids`` are the owner's approvals it used; ``mock`` is
    True when it draws the owner's mock data.
    """

    kind: str
    spec: dict
    columns: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    request_ids: list[int] = field(default_factory=list)
    mock: bool = False
