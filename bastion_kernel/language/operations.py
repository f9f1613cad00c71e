"""Every operation of the language, registered: the one module that imports all the registering modules.

Handlers register themselves in :mod:`.registry`'s tables when the module
defining them is imported; the registry imports none of them, so the
language has no import cycle.  Importing this module loads them all, in
dependency order, and :func:`documented_operations` lists the result.
"""
from __future__ import annotations

from . import describe, dp, expr, frame, habits, namespaces, plot, results
from .registry import FUNCTIONS, METHODS, PROPERTIES, Operation

# Importing a module registers its operations; dependencies first.
REGISTERING_MODULES = (expr, frame, namespaces, habits, plot, describe, results, dp)


def documented_operations() -> list[Operation]:
    """Every public operation of the language, for the doc index and its test.

    Returns
    -------
    list of Operation
        Builtin functions, methods and properties, sorted by qualified name.
    """
    ops: list[Operation] = list(FUNCTIONS.values())
    for table in (METHODS, PROPERTIES):
        for entries in table.values():
            ops.extend(entries.values())
    return sorted(ops, key=lambda op: op.qualified_name)


def doc_index() -> dict[str, str]:
    """``{qualified name: docstring}`` for every documented operation."""
    return {op.qualified_name: op.doc for op in documented_operations()}
