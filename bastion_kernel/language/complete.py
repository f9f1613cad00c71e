"""Completion, inspection and is-complete checks: pure functions over the cell text.

They read the interpreter's variables and ask the session only for metadata
(dataset descriptions and schemas), never for data values.  A receiver such
as ``df.filter(col("a") > 1).`` is evaluated with the interpreter in *pure*
mode, where fetch, save and request are refused.
"""
from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

from bastion_kernel.contract.plan import canonical_json
from bastion_kernel.contract.plan_text import plan_tree

from .errors import BastionError
from .expr import DType, Expr, render_expr
from .frame import GroupBy, RemoteFrame
from .namespaces import PolarsModule, polars_attribute, polars_attribute_names
from .plot import hidden_columns
from .registry import BoundOperation, Context, Operation, attribute_names, methods_of, properties_of
from .values import FetchedTable

_IDENT_TAIL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$|$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_]")
# Frame methods whose string arguments are column names.
COLUMN_METHODS = {"select", "with_columns", "group_by", "agg", "sort", "drop", "drop_nulls", "unique",
                  "join", "filter", "rename", "count"}
COLUMN_FUNCTIONS = {"col"}
DATASET_FUNCTIONS = {"dataset"}
# Frame methods where a hidden column may appear: as a join key, or passed
# through unchanged.  Elsewhere the executor refuses it, so it is not offered.
HIDDEN_COLUMN_METHODS = {"select", "with_columns", "join", "drop", "rename"}


class InterpreterView(Protocol):
    """What completion and inspection read from the interpreter, which passes itself in.

    A protocol rather than an import: the interpreter calls this module, so
    this module must not import the interpreter.
    """

    ctx: Context
    variables: dict[str, Any]
    builtins: dict[str, Any]

    def evaluate_pure(self, text: str) -> Any:
        """Evaluate an expression with effects refused (fetch, save, request)."""

    def known_names(self) -> list[str]:
        """The variable and builtin names a cell can use."""


@dataclass
class Completion:
    """Matches for the text between ``cursor_start`` and ``cursor_end``."""

    matches: list[str] = field(default_factory=list)
    cursor_start: int = 0
    cursor_end: int = 0


# --------------------------------------------------------------------------
# A small scanner: where the cursor is (inside a string? inside which call?).

@dataclass
class _Open:
    bracket: str
    position: int
    callee: str  # the text of the expression before "(" (empty when not a call)


@dataclass
class _ScanState:
    stack: list[_Open]
    string_start: int | None  # index of the first character inside the open string
    string_quote: str = ""


def _scan(text: str) -> _ScanState:
    stack: list[_Open] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            newline = text.find("\n", i)
            if newline < 0:
                return _ScanState(stack, None)
            i = newline + 1
            continue
        if c in "\"'":
            # Skip a string prefix like f, r, b (letters right before the quote were read as identifier).
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") else c
            start = i + len(quote)
            j = start
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text.startswith(quote, j):
                    break
                if len(quote) == 1 and text[j] == "\n":
                    break
                j += 1
            if j >= n:
                return _ScanState(stack, start, quote)
            i = j + len(quote)
            continue
        if c in "([{":
            callee = receiver_text(text, i) if c == "(" else ""
            stack.append(_Open(c, i, callee))
        elif c in ")]}" and stack:
            stack.pop()
        i += 1
    return _ScanState(stack, None)


def receiver_text(text: str, end: int) -> str:
    """The primary expression that ends at ``end`` (e.g. ``df.filter(x)`` before ``.sel``)."""
    i = end
    while True:
        j = _before_spaces(text, i)
        if j == 0:
            break
        c = text[j - 1]
        if c in ")]\"'":
            opening = _matching_open(text, j - 1) if c in ")]" else _string_start(text, j - 1)
            if opening is None:
                break
            i = opening
            if c in ")]":
                continue  # a call or subscript: what it applies to comes before
            break  # a string literal starts the expression
        if _IDENT_CHAR.match(c):
            k = j
            while k > 0 and _IDENT_CHAR.match(text[k - 1]):
                k -= 1
            i = k
            m = _before_spaces(text, k)
            if m > 0 and text[m - 1] == ".":
                i = m - 1
                continue
            break
        break
    return text[i:end].strip()


def _before_spaces(text: str, i: int) -> int:
    """Where the spaces, tabs and newlines just before ``i`` start (``i`` when there are none)."""
    while i > 0 and text[i - 1] in " \t\n":
        i -= 1
    return i


def _string_start(text: str, closing: int) -> int | None:
    quote = text[closing]
    k = closing - 1
    while k >= 0:
        if text[k] == quote and (k == 0 or text[k - 1] != "\\"):
            return k
        k -= 1
    return None


def _matching_open(text: str, close_index: int) -> int | None:
    pairs = {")": "(", "]": "["}
    depth = 0
    k = close_index
    quote = None
    while k >= 0:
        c = text[k]
        if quote:
            if c == quote and (k == 0 or text[k - 1] != "\\"):
                quote = None
        elif c in "\"'":
            quote = c
        elif c in ")]}":
            depth += 1
        elif c in "([{":
            depth -= 1
            if depth == 0:
                return k if pairs.get(text[close_index]) == c else None
        k -= 1
    return None


def _split_callee(callee: str) -> tuple[str, str]:
    """``("df.filter(x)", "select")`` from ``"df.filter(x).select"``; the receiver may be empty."""
    m = re.search(r"[A-Za-z_][A-Za-z0-9_]*$", callee)
    if not m:
        return "", ""
    rest = callee[:m.start()].rstrip()
    receiver = rest[:-1].rstrip() if rest.endswith(".") else ""
    return receiver, m.group(0)


# --------------------------------------------------------------------------
# Completion.

def complete(interp: InterpreterView, code: str, cursor_pos: int) -> Completion:
    """Completion matches at the cursor (see the module docstring)."""
    cursor_pos = max(0, min(cursor_pos, len(code)))
    before = code[:cursor_pos]
    try:
        if code.lstrip().startswith("%%sql"):
            return _complete_sql(interp, before, cursor_pos)
        state = _scan(before)
        if state.string_start is not None:
            return _complete_in_string(interp, before, state, cursor_pos)
        return _complete_name(interp, before, cursor_pos)
    except (BastionError, RecursionError):
        return Completion([], cursor_pos, cursor_pos)
    except Exception:  # the session failed (not connected...): completion just offers nothing
        return Completion([], cursor_pos, cursor_pos)


def _filter(prefix: str, names: list[str]) -> list[str]:
    return sorted({n for n in names if n.startswith(prefix) and not n.startswith("_")})


def _complete_name(interp: InterpreterView, before: str, cursor_pos: int) -> Completion:
    prefix = _IDENT_TAIL.search(before).group(0)
    start = cursor_pos - len(prefix)
    head = before[:start].rstrip(" \t")
    if head.endswith("."):
        receiver = receiver_text(head, len(head) - 1)
        if not receiver:
            return Completion([], start, cursor_pos)
        value = _resolve(interp, receiver)
        if value is None:
            return Completion([], start, cursor_pos)
        return Completion(_filter(prefix, attribute_names_of(value)), start, cursor_pos)
    if head.endswith(tuple("0123456789")) and not prefix:
        return Completion([], start, cursor_pos)
    return Completion(_filter(prefix, interp.known_names()), start, cursor_pos)


def attribute_names_of(value: Any) -> list[str]:
    """What may follow ``value.``."""
    if isinstance(value, PolarsModule):
        return polars_attribute_names()
    return attribute_names(type(value))


def _resolve(interp: InterpreterView, text: str) -> Any:
    """The value of a receiver's text, evaluated without effects (None if it fails)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) and text in interp.variables:
        return interp.variables[text]
    try:
        return interp.evaluate_pure(text)
    except (BastionError, RecursionError):
        return None


def _complete_in_string(interp: InterpreterView, before: str, state: _ScanState, cursor_pos: int) -> Completion:
    start = state.string_start
    prefix = before[start:]
    empty = Completion([], start, cursor_pos)
    if not state.stack or state.stack[-1].bracket not in "([":
        return empty
    # A string right inside "(" or inside a list that is itself an argument.
    call = state.stack[-1] if state.stack[-1].bracket == "(" else \
        (state.stack[-2] if len(state.stack) > 1 and state.stack[-2].bracket == "(" else None)
    if call is None:
        return empty
    receiver, name = _split_callee(call.callee)
    if name in DATASET_FUNCTIONS and receiver in ("", "pl"):
        names = [d.get("name") for d in interp.ctx.datasets()]
        return Completion(_filter(prefix, [n for n in names if isinstance(n, str)]), start, cursor_pos)
    if name in COLUMN_FUNCTIONS and receiver in ("", "pl"):
        frame, method = _enclosing_frame(interp, state.stack[:-1])
        return Completion(_filter(prefix, _columns(interp, frame, method)), start, cursor_pos)
    if name in COLUMN_METHODS and receiver:
        value = _resolve(interp, receiver)
        frame = value.frame if isinstance(value, GroupBy) else value
        if isinstance(frame, RemoteFrame):
            return Completion(_filter(prefix, _columns(interp, frame, name)), start, cursor_pos)
    return empty


def _enclosing_frame(interp: InterpreterView, stack: list[_Open]) -> tuple[RemoteFrame | None, str]:
    """The frame whose column method encloses the cursor, and that method's name."""
    for opened in reversed(stack):
        if opened.bracket != "(":
            continue
        receiver, name = _split_callee(opened.callee)
        if name in COLUMN_METHODS and receiver:
            value = _resolve(interp, receiver)
            if isinstance(value, GroupBy):
                return value.frame, name
            if isinstance(value, RemoteFrame):
                return value, name
    return None, ""


def _columns(interp: InterpreterView, frame: RemoteFrame | None, method: str = "") -> list[str]:
    """Column names of a frame (without its hidden ones where ``method`` cannot use them), or of every dataset."""
    if frame is not None:
        names = [name for name, _ in interp.ctx.schema(frame.plan)]
        if method in HIDDEN_COLUMN_METHODS:
            return names
        hidden = hidden_columns(interp.ctx, frame)
        return [name for name in names if name not in hidden]
    names: list[str] = []
    for description in interp.ctx.datasets():
        names.extend(str(column[0]) for column in description.get("schema", []) if column)
    return names


SQL_KEYWORDS = ("SELECT", "FROM", "WHERE", "GROUP BY", "ORDER BY", "HAVING", "LIMIT", "JOIN", "LEFT JOIN",
                "ON", "AS", "AND", "OR", "NOT", "COUNT", "SUM", "AVG", "MIN", "MAX", "DISTINCT", "DESC", "ASC")


def _complete_sql(interp: InterpreterView, before: str, cursor_pos: int) -> Completion:
    prefix = _IDENT_TAIL.search(before).group(0)
    start = cursor_pos - len(prefix)
    if "\n" not in before:  # still on the %%sql line
        return Completion([], start, cursor_pos)
    names: list[str] = []
    for description in interp.ctx.datasets():
        if isinstance(description.get("name"), str):
            names.append(description["name"])
        names.extend(str(column[0]) for column in description.get("schema", []) if column)
    matches = _filter(prefix, names)
    if prefix:
        matches += [k for k in SQL_KEYWORDS if k.startswith(prefix.upper()) and k not in matches]
    return Completion(matches, start, cursor_pos)


# --------------------------------------------------------------------------
# Inspection.

def inspect(interp: InterpreterView, code: str, cursor_pos: int, detail_level: int = 0) -> str | None:
    """Help for what is under the cursor: an operation's docstring or a variable's schema."""
    cursor_pos = max(0, min(cursor_pos, len(code)))
    try:
        if code.lstrip().startswith("%%sql"):
            return None
        start, end = cursor_pos, cursor_pos
        while start > 0 and _IDENT_CHAR.match(code[start - 1]):
            start -= 1
        while end < len(code) and _IDENT_CHAR.match(code[end]):
            end += 1
        word = code[start:end]
        head = code[:start].rstrip(" \t")
        if not word or word[0].isdigit():
            # Inside a call's parentheses: describe the function being called.
            state = _scan(code[:cursor_pos])
            calls = [o for o in state.stack if o.bracket == "("]
            if not calls:
                return None
            receiver, word = _split_callee(calls[-1].callee)
            return _describe_attribute(interp, receiver, word, detail_level) if receiver \
                else _describe_name(interp, word, detail_level)
        if head.endswith("."):
            receiver = receiver_text(head, len(head) - 1)
            return _describe_attribute(interp, receiver, word, detail_level)
        return _describe_name(interp, word, detail_level)
    except (BastionError, RecursionError):
        return None
    except Exception:  # the session failed: no help rather than a crash
        return None


def _describe_attribute(interp: InterpreterView, receiver_src: str, name: str, detail_level: int) -> str | None:
    receiver = _resolve(interp, receiver_src)
    if receiver is None:
        return None
    if isinstance(receiver, PolarsModule):
        try:
            return describe_value(interp, polars_attribute(name), detail_level, label=f"pl.{name}")
        except BastionError:
            return None
    op = methods_of(type(receiver)).get(name) or properties_of(type(receiver)).get(name)
    return operation_help(op) if op else None


def _describe_name(interp: InterpreterView, name: str, detail_level: int) -> str | None:
    if name in interp.variables:
        return describe_value(interp, interp.variables[name], detail_level, label=name)
    if name in interp.builtins:
        return describe_value(interp, interp.builtins[name], detail_level, label=name)
    return None


def operation_help(op: Operation) -> str:
    """Signature and docstring of an operation."""
    return f"{op.display_signature()}\n\n{op.doc}"


def describe_value(interp: InterpreterView, value: Any, detail_level: int = 0, label: str = "") -> str:
    """Plain text about a value: a frame's schema and policy, an operation's doc, a repr."""
    if isinstance(value, Operation):
        return operation_help(value)
    if isinstance(value, BoundOperation):
        return operation_help(value.operation)
    if isinstance(value, RemoteFrame):
        return _frame_help(interp, value, detail_level, label)
    if isinstance(value, GroupBy):
        return repr(value) + "\n\nCall .agg(...) to aggregate each group."
    if isinstance(value, Expr):
        return f"{label}: an expression\n" + "\n".join(render_expr(n) for n in value.nodes)
    if isinstance(value, DType):
        return f"{label}: the data type {value.name} (a cast target: col(...).cast({value.spelled}))"
    if isinstance(value, PolarsModule):
        return ("pl: the Bastion language's polars-compatible names\n"
                + ", ".join(polars_attribute_names()))
    if isinstance(value, FetchedTable) and value.frame is not None:
        return (f"{label}: a fetched result (a local DataFrame: its operations run in the kernel, never on "
                f"the executor)\n{repr(value.frame)[:4000]}")
    return f"{label}: {type(value).__name__}\n{repr(value)[:2000]}"


def _frame_help(interp: InterpreterView, frame: RemoteFrame, detail_level: int, label: str) -> str:
    lines = [f"{label}: {frame.summary()}", ""]
    try:
        schema = interp.ctx.schema(frame.plan)
        hidden = hidden_columns(interp.ctx, frame)
        lines.append("Schema:")
        lines.extend(f"  {name}: {dtype}" + ("  (hidden: a join key only, shown as *)" if name in hidden else "")
                     for name, dtype in schema)
    except BastionError as exc:
        lines.append(f"Schema unavailable: {exc.evalue}")
    described = {d.get("name"): d for d in interp.ctx.datasets()}
    policies = [(source, described[source].get("policy")) for source in frame.sources() if source in described]
    if policies:
        lines += ["", "Policy:"]
        for source, policy in policies:
            lines.append(f"  {source}: {_policy_summary(policy)}")
    if detail_level >= 1:
        lines += ["", "Plan tree:", plan_tree(frame.plan),
                  "", "Plan (JSON):", json.dumps(json.loads(canonical_json(frame.plan)), indent=1)]
    return "\n".join(lines)


def _policy_summary(policy: Any) -> str:
    if not isinstance(policy, dict):
        return "unknown"
    parts = [f"groups need >= {policy.get('min_group_size', '?')} rows"]
    hidden = policy.get("hidden") or []
    if hidden:
        parts.append(f"hidden columns (usable only as join keys, shown as *): {', '.join(map(str, hidden))}")
    parts.append(f"anything else: {policy.get('unsafe', 'review')}")
    if policy.get("allow_save") is False:
        parts.append("saving derived results is not allowed")
    return "; ".join(parts)


# --------------------------------------------------------------------------
# Is the cell complete (for a console)?

_INCOMPLETE_MESSAGES = ("was never closed", "unexpected EOF", "unterminated triple-quoted string",
                        "expected an indented block", "incomplete input")


def is_complete(code: str) -> tuple[str, str]:
    """``("complete" | "incomplete" | "invalid", indent)``, decided with ``ast.parse`` only."""
    if code.lstrip().startswith("%%sql") or not code.strip():
        return "complete", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code, mode="exec")
    except SyntaxError as exc:
        message = exc.msg or ""
        last_line = code.rstrip("\n").split("\n")[-1]
        indent = re.match(r"[ \t]*", last_line).group(0)
        if last_line.rstrip().endswith(":"):
            return "incomplete", indent + "    "
        if code.rstrip().endswith("\\") or any(m in message for m in _INCOMPLETE_MESSAGES):
            return "incomplete", indent
        return "invalid", ""
    except (ValueError, RecursionError, MemoryError):
        return "invalid", ""
    return "complete", ""
