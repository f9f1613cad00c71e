"""Errors the language raises: typed, positioned, and helpful.

Every error is a :class:`bastion_kernel.contract.protocol.BastionError` so the kernel
shows language refusals and executor refusals the same way.  ``details``
carries ``{"line", "col"}`` (1-based line, 0-based column, as in Python's
``ast``) when the offending part of the cell is known.

Which name the language uses:

- ``ParseError``: the text is not Python-shaped (a ``SyntaxError``).
- ``UnsupportedOperation``: syntax, a name, a method or an argument that is
  not part of the Bastion language (the whitelist said no).
- ``SchemaError``: a value of the wrong type for a parameter (a string where
  a number is needed, an expression where a literal list is needed...).
- ``LimitExceeded``: the cell, its syntax tree or a plan is too large.
- ``ExecutionError``: plain arithmetic on literals failed (division by zero).
"""
from __future__ import annotations

import ast
import difflib
from typing import Iterable

from bastion_kernel.contract.protocol import BastionError

__all__ = ["BastionError", "ParseError", "UnsupportedOperation", "SchemaError", "LimitExceeded",
           "ExecutionError", "suggest", "position_of", "attach_position"]


def ParseError(message: str, **details) -> BastionError:  # noqa: N802 - reads like a class at raise sites
    """A ``ParseError`` BastionError."""
    return BastionError("ParseError", message, **details)


def UnsupportedOperation(message: str, **details) -> BastionError:  # noqa: N802
    """An ``UnsupportedOperation`` BastionError."""
    return BastionError("UnsupportedOperation", message, **details)


def SchemaError(message: str, **details) -> BastionError:  # noqa: N802
    """A ``SchemaError`` BastionError."""
    return BastionError("SchemaError", message, **details)


def LimitExceeded(message: str, **details) -> BastionError:  # noqa: N802
    """A ``LimitExceeded`` BastionError."""
    return BastionError("LimitExceeded", message, **details)


def ExecutionError(message: str, **details) -> BastionError:  # noqa: N802
    """An ``ExecutionError`` BastionError."""
    return BastionError("ExecutionError", message, **details)


def suggest(name: str, candidates: Iterable[str]) -> str:
    """A ``" did you mean 'x'?"`` suffix for the nearest allowed name, or ``""``.

    Parameters
    ----------
    name : str
        What the user typed.
    candidates : iterable of str
        The allowed names at that place.

    Returns
    -------
    str
        Text to append to an error message (empty when nothing is close).
    """
    pool = sorted(set(candidates))
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if not close:
        # A case slip ("Col", "GROUP_BY") is the most common typo of all.
        lowered = {c.lower(): c for c in pool}
        if name.lower() in lowered:
            close = [lowered[name.lower()]]
    return f"; did you mean '{close[0]}'?" if close else ""


def position_of(node: ast.AST) -> dict:
    """``{"line", "col"}`` of a node; for an attribute, where its name starts."""
    if isinstance(node, ast.Attribute) and getattr(node, "end_lineno", None) is not None:
        # Point at ".name", not at the start of the whole chain.
        return {"line": node.end_lineno, "col": max(0, node.end_col_offset - len(node.attr))}
    return {"line": getattr(node, "lineno", 1), "col": getattr(node, "col_offset", 0)}


def attach_position(error: BastionError, node: ast.AST, line_offset: int = 0) -> BastionError:
    """Give an error the position of ``node`` unless it already has one."""
    if "line" not in error.details:
        pos = position_of(node)
        error.details["line"] = pos["line"] + line_offset
        error.details["col"] = pos["col"]
    return error
