"""Fuzzing the language: random cells and random syntax trees through the Interpreter.

Every cell must end in a value or a typed :class:`BastionError` (one of the
documented names), never another exception, and nothing in it may run: cells
that would create a file, set an attribute on ``builtins``, or set an
environment variable if Python executed them leave no trace.  The session is
the in-memory :class:`FakeSession` (the language's seam), so this exercises
the interpreter alone; ``scripts/fuzz.py`` runs the same strategies longer.
"""
from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion_kernel.language.interpreter import Interpreter
from bastion_kernel.contract.protocol import ERROR_NAMES, BastionError
from fuzz_strategies import (CANARY_ATTRIBUTE, CANARY_ENV, CANARY_FILE_TOKEN, CANARY_STATEMENTS, ast_cells,
                             cell_sources)
from language_fake_session import FakeSession

FUZZ_SETTINGS = settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def run_untrusted_cell(interpreter: Interpreter, source: str, canary_file: Path) -> object:
    """Run one cell; return its value or the BastionError it raised (anything else fails the test).

    ``CANARY_FILE_TOKEN`` in the cell is replaced with ``canary_file``; the
    canaries are checked afterwards.
    """
    modules_before = set(sys.modules)
    cell = source.replace(CANARY_FILE_TOKEN, str(canary_file))
    try:
        outcome = interpreter.run_cell(cell).value
    except BastionError as exc:
        assert exc.ename in ERROR_NAMES, exc.ename
        assert isinstance(exc.evalue, str) and exc.evalue
        assert isinstance(exc.details, dict)
        outcome = exc
    assert_nothing_ran(canary_file)
    # No module a cell names gets imported; the language's own lazy imports
    # (SQL, charts...) come from its own packages only.
    new = {m for m in set(sys.modules) - modules_before if m.split(".")[0] not in LANGUAGE_PACKAGES}
    assert not new, new
    return outcome


# Packages the language may import lazily on first use of a feature (never a name a cell chose).
LANGUAGE_PACKAGES = {"bastion_kernel", "sqlglot", "polars", "encodings", "unicodedata"}


def assert_nothing_ran(canary_file: Path) -> None:
    """The traces an executed canary would leave are absent."""
    assert not canary_file.exists(), "a cell created a file"
    assert not hasattr(builtins, CANARY_ATTRIBUTE), "a cell set an attribute on builtins"
    assert CANARY_ENV not in os.environ, "a cell changed the environment"
    assert CANARY_ATTRIBUTE not in globals(), "a cell set a global"


@pytest.fixture(scope="module")
def canary_file(tmp_path_factory) -> Path:
    # The canary's directory exists, so an executed cell could create the file.
    return tmp_path_factory.mktemp("canary") / "executed"


def fresh_interpreter() -> Interpreter:
    interpreter = Interpreter(FakeSession())
    interpreter.run_cell('patients = dataset("patients")\nvisits = dataset("visits")')
    return interpreter


@pytest.mark.parametrize("statement", CANARY_STATEMENTS)
def test_canary_cells_are_refused_and_leave_no_trace(statement, canary_file):
    outcome = run_untrusted_cell(fresh_interpreter(), statement, canary_file)
    assert isinstance(outcome, BastionError), f"a canary cell was accepted: {statement!r} -> {outcome!r}"


@FUZZ_SETTINGS
@given(cells=st.lists(cell_sources, min_size=1, max_size=3))
def test_random_cells_give_a_value_or_a_typed_error(cells, canary_file):
    # Several cells on one interpreter: a refused cell must leave it usable.
    interpreter = fresh_interpreter()
    for cell in cells:
        run_untrusted_cell(interpreter, cell, canary_file)
    value = interpreter.run_cell('patients.group_by("sex").agg(col("age").mean())').value
    assert value.plan["op"] == "group_by"


@FUZZ_SETTINGS
@given(cell=ast_cells)
def test_random_syntax_trees_give_a_value_or_a_typed_error(cell, canary_file):
    run_untrusted_cell(fresh_interpreter(), cell, canary_file)


@FUZZ_SETTINGS
@given(prefix=st.sampled_from(["", "x = ", "patients."]), cell=cell_sources)
def test_random_cells_after_a_prefix(prefix, cell, canary_file):
    run_untrusted_cell(fresh_interpreter(), prefix + cell, canary_file)
