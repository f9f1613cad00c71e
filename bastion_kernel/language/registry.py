"""The language's whitelist: which names, methods and properties exist.

Every operation a scientist can call is an :class:`Operation` in one of the
tables here, keyed by the Python class of the value it applies to (our own
value classes only) and the name the scientist types.  The interpreter never
looks a user-chosen name up anywhere else: an attribute is a key of these
dicts or it is refused.

Handlers are plain functions whose first parameter is the :class:`Context`
(the session and the cell being run) and, for methods and properties, whose
second is the receiver.  Their numpydoc docstrings are the language's
documentation (``inspect`` shows them;
:func:`bastion_kernel.language.operations.documented_operations` lists them).
Modules register their handlers here when imported; this module imports none
of them (:mod:`.operations` imports them all).
"""
from __future__ import annotations

import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from bastion_kernel.contract.plan import plan_hash

from .errors import UnsupportedOperation, suggest


class Context:
    """What an operation handler may use: the session, the cell's text, caches.

    ``pure`` is set while completing or inspecting: then nothing that changes
    state or moves data (fetch, save, request) may run.

    ``on_output(kind, value)`` receives what ``print`` (``"stream"``) and
    ``display`` (``"display"``) show while a cell runs; the kernel sends it to
    the notebook at once.  Without one, :attr:`outputs` collects it.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.cell_text = ""
        self.pure = False
        self.on_output: Callable[[str, Any], None] | None = None
        self.outputs: list[tuple[str, Any]] = []
        self._schemas: dict[str, list[list[str]]] = {}
        self._datasets: list[dict] | None = None

    def emit(self, kind: str, value: Any) -> None:
        """Show ``value`` in the notebook now (``kind``: ``"stream"`` or ``"display"``)."""
        self.require_effects("print() and display()")
        if self.on_output is None:
            self.outputs.append((kind, value))
        else:
            self.on_output(kind, value)

    def schema(self, plan: dict) -> list[list[str]]:
        """The output schema of a plan, asked once per distinct plan."""
        key = plan_hash(plan)
        if key not in self._schemas:
            self._schemas[key] = [list(pair) for pair in self.session.schema(plan)]
        return self._schemas[key]

    def datasets(self, refresh: bool = False) -> list[dict]:
        """The executor's dataset descriptions, cached until ``refresh``."""
        if self._datasets is None or refresh:
            self._datasets = list(self.session.datasets())
        return self._datasets

    def cached_datasets(self) -> list[dict] | None:
        """The dataset list if it was already fetched (never asks the session)."""
        return self._datasets

    def forget_remote_state(self) -> None:
        """Drop cached schemas and the dataset list (after ``save`` changed what the executor holds)."""
        self._schemas.clear()
        self._datasets = None

    def require_effects(self, what: str) -> None:
        """Refuse an operation with effects while completing or inspecting."""
        if self.pure:
            raise UnsupportedOperation(f"{what} is not run while completing or inspecting")


@dataclass(frozen=True)
class Operation:
    """One whitelisted operation.

    ``kind`` is ``"method"`` (called on a receiver), ``"property"`` (read on
    a receiver, no call) or ``"function"`` (a builtin name such as ``col``).
    """

    name: str
    kind: str
    handler: Callable[..., Any]
    receiver: type | None = None

    @property
    def qualified_name(self) -> str:
        if self.receiver is None:
            return self.name
        return f"{type_name(self.receiver)}.{self.name}"

    # Cached: every call of the operation binds against it, and building a
    # Signature costs more than the rest of a call (the handler never changes).
    @functools.cached_property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.handler)

    @functools.cached_property
    def _keywords(self) -> tuple[frozenset[str], bool]:
        # (names accepted as keywords, whether **kwargs takes any other)
        params = self.visible_parameters()
        named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        return named, any(p.kind is p.VAR_KEYWORD for p in params)

    def visible_parameters(self) -> list[inspect.Parameter]:
        """Parameters the scientist passes (without the context and receiver)."""
        hidden = 1 if self.receiver is None else 2
        return list(self.signature.parameters.values())[hidden:]

    def display_signature(self) -> str:
        parts = []
        for p in self.visible_parameters():
            if p.kind is p.VAR_POSITIONAL:
                parts.append(f"*{p.name}")
            elif p.kind is p.VAR_KEYWORD:
                parts.append(f"**{p.name}")
            elif p.default is p.empty:
                parts.append(p.name)
            else:
                parts.append(f"{p.name}={p.default!r}")
        return f"{self.qualified_name}({', '.join(parts)})"

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.handler) or ""

    def call(self, ctx: Context, receiver: Any, args: list, kwargs: dict) -> Any:
        """Bind the scientist's arguments to the handler and run it."""
        named, takes_any_keyword = self._keywords
        for key in kwargs:
            if key not in named and not takes_any_keyword:
                hint = suggest(key, named) or (f"; its parameters are {', '.join(sorted(named))}" if named
                                               else "; it takes no keyword arguments")
                raise UnsupportedOperation(f"{self.qualified_name}() has no parameter {key!r}{hint}")
        leading = (ctx,) if self.receiver is None else (ctx, receiver)
        try:
            bound = self.signature.bind(*leading, *args, **kwargs)
        except TypeError as exc:
            raise UnsupportedOperation(f"{self.qualified_name}(): {exc}; expected {self.display_signature()}") from None
        bound.apply_defaults()
        return self.handler(*bound.args, **bound.kwargs)


@dataclass(frozen=True)
class BoundOperation:
    """A method looked up on a value, waiting to be called."""

    operation: Operation
    receiver: Any

    def __repr__(self) -> str:
        return f"<method {self.operation.display_signature()}>"


METHODS: dict[type, dict[str, Operation]] = {}
PROPERTIES: dict[type, dict[str, Operation]] = {}
FUNCTIONS: dict[str, Operation] = {}


def type_name(cls: type) -> str:
    """How the language names one of its value types in messages and docs."""
    return getattr(cls, "type_name", cls.__name__)


def method(receiver: type, name: str) -> Callable:
    """Register ``handler(ctx, receiver, ...)`` as the method ``name`` of ``receiver``."""
    def register(handler: Callable) -> Callable:
        METHODS.setdefault(receiver, {})[name] = Operation(name, "method", handler, receiver)
        return handler
    return register


def prop(receiver: type, name: str) -> Callable:
    """Register ``handler(ctx, receiver)`` as the property ``name`` of ``receiver``."""
    def register(handler: Callable) -> Callable:
        PROPERTIES.setdefault(receiver, {})[name] = Operation(name, "property", handler, receiver)
        return handler
    return register


def function(name: str) -> Callable:
    """Register ``handler(ctx, ...)`` as the builtin function ``name``."""
    def register(handler: Callable) -> Callable:
        FUNCTIONS[name] = Operation(name, "function", handler, None)
        return handler
    return register


# numpydoc's order of the sections an operation's docstring may have.
_SECTION_ORDER = ("Parameters", "Returns", "Raises", "Notes", "Examples")


def _doc_sections(doc: str) -> tuple[str, dict[str, str]]:
    """A numpydoc docstring as its text before the first section and ``{title: section}``, in order."""
    lines = inspect.cleandoc(doc).splitlines()
    starts = [i for i in range(len(lines) - 1)
              if lines[i] in _SECTION_ORDER and set(lines[i + 1]) == {"-"} and len(lines[i + 1]) >= 3]
    intro = "\n".join(lines[:starts[0]] if starts else lines).strip()
    bounds = zip(starts, starts[1:] + [len(lines)])
    return intro, {lines[start]: "\n".join(lines[start:end]).strip() for start, end in bounds}


def _compose_doc(intro: str, sections: dict[str, str]) -> str:
    return "\n\n".join([intro, *(sections[title] for title in _SECTION_ORDER if title in sections)])


def _parameter_entries(section: str) -> dict[str, str]:
    """The entries of a Parameters section, in order, keyed by what they name (``n``, ``left_on, right_on``)."""
    entries: dict[str, list[str]] = {}
    for line in section.splitlines()[2:]:
        if line and not line[0].isspace():
            entries[line.split(" : ", 1)[0]] = [line]
        elif entries:
            entries[next(reversed(entries))].append(line)
    return {name: "\n".join(lines) for name, lines in entries.items()}


def documented_like(source: Callable, *titles: str) -> Callable:
    """Give a handler the sections ``titles`` of ``source``'s docstring, so that they are written once.

    For operations of two receivers that take the same parameters with the
    same meaning (a fetched result's ``select`` and a remote frame's), or
    return the same thing; the handler's own docstring holds the rest.  A
    parameter the handler documents itself keeps its own entry, in
    ``source``'s order.
    """
    _, shared = _doc_sections(source.__doc__ or "")

    def document(handler: Callable) -> Callable:
        intro, sections = _doc_sections(handler.__doc__ or "")
        for title in titles:
            if title == "Parameters" and title in sections:
                own = _parameter_entries(sections[title])
                entries = {**_parameter_entries(shared[title]), **own}
                sections[title] = "\n".join(["Parameters", "----------", *entries.values()])
            else:
                sections[title] = shared[title]
        handler.__doc__ = _compose_doc(intro, sections)
        return handler
    return document


def extend_doc(handler: Callable, *, parameters: str = "", returns: str = "") -> None:
    """Complete ``handler``'s docstring with text written once for several handlers.

    Parameters
    ----------
    handler : callable
        The handler whose ``__doc__`` is changed.
    parameters : str, optional
        Entries appended to its Parameters section (numpydoc text, indented as in a docstring).
    returns : str, optional
        The body of its Returns section (numpydoc text, indented as in a docstring).
    """
    intro, sections = _doc_sections(handler.__doc__ or "")
    if parameters:
        sections["Parameters"] += "\n" + textwrap.dedent(parameters).strip("\n")
    if returns:
        sections["Returns"] = "Returns\n-------\n" + textwrap.dedent(returns).strip("\n")
    handler.__doc__ = _compose_doc(intro, sections)


def _registered_bases(cls: type) -> list[type]:
    # Our value classes only: a subclass (Then) inherits its base's (Expr) methods.
    return [c for c in cls.__mro__ if c in METHODS or c in PROPERTIES]


def _inherited(cls: type, table: dict[type, dict[str, Operation]]) -> dict[str, Operation]:
    found: dict[str, Operation] = {}
    for base in _registered_bases(cls):
        for name, op in table.get(base, {}).items():
            found.setdefault(name, op)
    return found


def methods_of(cls: type) -> dict[str, Operation]:
    """Every method a value of ``cls`` has (its own first, then its bases')."""
    return _inherited(cls, METHODS)


def properties_of(cls: type) -> dict[str, Operation]:
    """Every property a value of ``cls`` has."""
    return _inherited(cls, PROPERTIES)


def attribute_names(cls: type) -> list[str]:
    """Methods and properties of a value type, sorted (for completion and suggestions)."""
    return sorted(set(methods_of(cls)) | set(properties_of(cls)))
