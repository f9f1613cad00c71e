"""The Bastion interpreter: cell text -> values and plans, by whitelist only.

A cell is parsed with ``ast.parse`` (never compiled or executed) and walked
by :class:`Interpreter`, whose dispatch table maps each allowed AST node type
to a handler; any other node is refused with an ``UnsupportedOperation``
naming it.  Names resolve through the cell's variables and then the builtin
table; attributes and calls resolve only through the registries of
:mod:`bastion_kernel.language.registry`, keyed by our own value classes.
"""
from __future__ import annotations

import ast
import builtins
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from bastion_kernel.contract import plan as P

from . import complete as completion
from .errors import (BastionError, ExecutionError, LimitExceeded, ParseError, SchemaError, UnsupportedOperation,
                     attach_position, position_of, suggest)
from .expr import PYTHON_TYPE_TARGETS, SCALAR_TYPES, DType, Expr, describe_value, to_node
from .frame import RemoteFrame, fetch_plan, sql_plan
from .namespaces import POLARS_MODULE, PolarsModule, polars_attribute, polars_attribute_names
from .habits import attribute_hint, import_bindings, name_hint
# FUNCTIONS from .operations: the table once every module has registered its functions.
from .operations import FUNCTIONS
from .registry import BoundOperation, Context, Operation, attribute_names, methods_of, properties_of
from .session import Session
from .values import HelpText

MAX_CELL_BYTES = 100_000
MAX_AST_DEPTH = 100
MAX_AST_NODES = 20_000
# Literal arithmetic stays small: the language computes plans, not numbers.
MAX_LITERAL_INT_BITS = 4096
MAX_LITERAL_STR = 100_000

Completion = completion.Completion


@dataclass
class CellResult:
    """What a cell produced: the value of its final expression statement (or None)."""

    value: object | None


# The cell-level names that are not variables.
def _builtin_names() -> dict[str, Any]:
    names: dict[str, Any] = dict(FUNCTIONS)
    names["pl"] = POLARS_MODULE
    names.update(PYTHON_TYPE_TARGETS)
    return names


BINARY_OPERATORS: dict[type, str] = {
    ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
    ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "and", ast.BitOr: "or", ast.BitXor: "xor",
}
COMPARE_OPERATORS: dict[type, str] = {
    ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge",
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
           "and": "&", "or": "|", "xor": "^", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}

# What a refused node is called in messages, and how to do it instead.
REFUSED_NODES: dict[type, str] = {
    ast.Lambda: "lambda functions", ast.FunctionDef: "function definitions (def)",
    ast.AsyncFunctionDef: "function definitions (async def)", ast.ClassDef: "class definitions",
    ast.For: "for loops", ast.AsyncFor: "for loops", ast.While: "while loops", ast.If: "if statements",
    ast.With: "with statements", ast.AsyncWith: "with statements", ast.Try: "try statements",
    ast.Raise: "raise statements", ast.Assert: "assert statements", ast.Delete: "del statements",
    ast.Global: "global statements", ast.Nonlocal: "nonlocal statements", ast.Return: "return statements",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.Await: "await",
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions", ast.NamedExpr: "the walrus operator (:=)",
    ast.Starred: "star-arguments (*args)", ast.Set: "set literals", ast.AnnAssign: "annotated assignments",
    ast.IfExp: "conditional expressions (x if c else y)", ast.Slice: "slices",
    ast.FormattedValue: "f-strings with expressions", ast.Break: "break", ast.Continue: "continue",
    ast.Match: "match statements",
}
REFUSAL_HINTS: dict[type, str] = {
    ast.IfExp: "; use when(...).then(...).otherwise(...)",
    ast.If: "; use when(...).then(...).otherwise(...) or filter(...)",
    ast.ListComp: "; list the expressions, or use col('a', 'b') for several columns",
    ast.FunctionDef: "; the language is polars-shaped expressions only",
    ast.Lambda: "; write the computation as an expression (col(...) * 2, .str..., when(...))",
}
if hasattr(ast, "TryStar"):
    REFUSED_NODES[ast.TryStar] = "try statements"

_PYTHON_BUILTINS = frozenset(dir(builtins))
# Nodes that only give shape to allowed ones (contexts, operators, keywords);
# their meaning is checked where they are used.
_STRUCTURAL_NODES = (ast.Module, ast.Expression, ast.Load, ast.Store, ast.keyword, ast.Slice,
                     ast.unaryop, ast.cmpop, ast.boolop, ast.alias)


class Interpreter:
    """Runs Bastion cells against a :class:`Session`; keeps the cell namespace.

    Parameters
    ----------
    session : Session
        The seam to the executor (datasets, schema, fetch, request, save).
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.variables: dict[str, object] = {}
        self.positions = PlanPositions()
        self.ctx = Context(PositionedSession(session, self.positions))
        self.builtins = _builtin_names()
        self._handlers: dict[type, Callable[[Any], Any]] = {
            ast.Constant: self._constant, ast.Name: self._name, ast.Attribute: self._attribute,
            ast.Call: self._call, ast.BinOp: self._binop, ast.UnaryOp: self._unaryop,
            ast.Compare: self._compare, ast.BoolOp: self._boolop, ast.List: self._list,
            ast.Tuple: self._tuple, ast.Dict: self._dict, ast.Subscript: self._subscript,
            ast.JoinedStr: self._joined_str,
        }
        self._statements: dict[type, Callable[[Any], Any]] = {
            ast.Expr: self._stmt_expr, ast.Assign: self._stmt_assign, ast.AugAssign: self._stmt_augassign,
            ast.Pass: lambda node: None, ast.Import: self._stmt_import, ast.ImportFrom: self._stmt_import,
        }
        self._line_offset = 0

    # ------------------------------------------------------------------
    # Public API (the kernel calls these).

    def run_cell(self, code: str) -> CellResult:
        """Run one cell; the value of its final expression statement is the result.

        Raises
        ------
        BastionError
            ``ParseError``, ``UnsupportedOperation``, ``SchemaError``,
            ``LimitExceeded`` or whatever the session raised.
        """
        self.ctx.cell_text = code
        self.ctx.pure = False
        self._line_offset = 0
        self.positions.clear()
        sql_cell = _sql_cell_query(code)
        if sql_cell is not None:
            return CellResult(self._run_sql_cell(code, *sql_cell))
        asked = help_request(code)
        if asked is not None:
            return CellResult(self._help(*asked))
        tree = self.parse(code)
        value = None
        for index, statement in enumerate(tree.body):
            result = self._statement(statement)
            if index == len(tree.body) - 1 and isinstance(statement, ast.Expr):
                value = result
        return CellResult(value)

    def complete(self, code: str, cursor_pos: int) -> Completion:
        """Completion matches at ``cursor_pos`` (names, methods, datasets, columns; never data)."""
        return completion.complete(self, code, cursor_pos)

    def inspect(self, code: str, cursor_pos: int, detail_level: int = 0) -> str | None:
        """Plain-text help for what is under the cursor, or None."""
        return completion.inspect(self, code, cursor_pos, detail_level)

    def is_complete(self, code: str) -> tuple[str, str]:
        """``("complete" | "incomplete" | "invalid", indent)`` for a console."""
        return completion.is_complete(code)

    # ------------------------------------------------------------------
    # Parsing and limits.

    def parse(self, code: str, mode: str = "exec") -> ast.AST:
        """``ast.parse`` with the language's size limits; magics get a clear refusal."""
        if len(code.encode("utf-8", "surrogatepass")) > MAX_CELL_BYTES:
            raise LimitExceeded(f"the cell is larger than {MAX_CELL_BYTES // 1000} KB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarnings of odd literals are not the user's concern
                tree = ast.parse(code, mode=mode)
        except SyntaxError as exc:
            magic = _magic_line(code)
            if magic is not None:
                line, text = magic
                raise UnsupportedOperation(
                    f"shell escapes and magics other than %%sql are not available: {text.strip()[:80]}",
                    line=line, col=0) from None
            for number, line_text in enumerate(code.splitlines(), start=1):
                if _HELP_LINE.fullmatch(line_text.strip()):
                    raise ParseError("help (x?, ?x, x??) works on a line of its own: put it in a cell by itself",
                                     line=number, col=0) from None
            message = exc.msg if "invalid syntax" in exc.msg else f"invalid syntax: {exc.msg}"
            raise ParseError(message, line=exc.lineno or 1, col=max(0, (exc.offset or 1) - 1)) from None
        except (RecursionError, MemoryError):
            raise LimitExceeded("the cell nests too deeply to parse") from None
        except ValueError as exc:  # e.g. a NUL character in the source
            raise ParseError(f"invalid source text: {exc}", line=1, col=0) from None
        _check_tree_size(tree)
        self._check_node_types(tree)
        return tree

    def _check_node_types(self, tree: ast.AST) -> None:
        """Refuse syntax outside the language before anything in the cell runs."""
        for node in ast.walk(tree):
            kind = type(node)
            if isinstance(node, ast.keyword) and node.arg is None:
                raise UnsupportedOperation("keyword unpacking (**kwargs) is not part of the Bastion language",
                                           **_pos(node.value))
            if isinstance(node, ast.Dict) and any(key is None for key in node.keys):
                raise UnsupportedOperation("dict unpacking (**d) is not part of the Bastion language", **_pos(node))
            if isinstance(node, ast.operator):
                continue  # checked on its BinOp / AugAssign, which has a position
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                try:
                    import_bindings(node)  # refuses any module but polars before anything in the cell runs
                except BastionError as exc:
                    raise attach_position(exc, node) from None
                continue
            if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) not in BINARY_OPERATORS:
                raise UnsupportedOperation(f"the operator {type(node.op).__name__} is not part of the Bastion "
                                           "language", **_pos(node))
            if kind in self._handlers or kind in self._statements or isinstance(node, _STRUCTURAL_NODES):
                continue
            raise _refusal(node)

    # ------------------------------------------------------------------
    # Statements.

    def _statement(self, node: ast.stmt) -> Any:
        handler = self._statements.get(type(node))
        if handler is None:
            raise _refusal(node)
        try:
            return handler(node)
        except BastionError as exc:
            raise attach_position(exc, node, self._line_offset)

    def _stmt_expr(self, node: ast.Expr) -> Any:
        return self.evaluate(node.value)

    def _stmt_assign(self, node: ast.Assign) -> None:
        value = self.evaluate(node.value)
        for target in node.targets:
            self._assign(target, value)

    def _stmt_import(self, node: ast.Import | ast.ImportFrom) -> None:
        for name, value in import_bindings(node):
            self.variables[name] = value

    def _stmt_augassign(self, node: ast.AugAssign) -> None:
        if not isinstance(node.target, ast.Name):
            raise UnsupportedOperation("augmented assignment works on a plain name only", **_pos(node.target))
        current = self._name(ast.Name(id=node.target.id, ctx=ast.Load(), lineno=node.lineno,
                                      col_offset=node.col_offset))
        operator = BINARY_OPERATORS.get(type(node.op))
        if operator is None:
            raise UnsupportedOperation(f"the operator {type(node.op).__name__} is not part of the Bastion language")
        value = self._apply_binary(operator, current, self.evaluate(node.value))
        self._assign(node.target, value)

    def _assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            if target.id.startswith("__"):
                raise UnsupportedOperation(f"names starting with '__' are not available: {target.id!r}",
                                           **_pos(target))
            self.variables[target.id] = value
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            if any(isinstance(t, ast.Starred) for t in target.elts):
                raise UnsupportedOperation("starred assignment (a, *b = ...) is not part of the Bastion language",
                                           **_pos(target))
            if not isinstance(value, (list, tuple)) or len(value) != len(target.elts):
                raise SchemaError(f"cannot unpack {describe_value(value)} into {len(target.elts)} names",
                                  **_pos(target))
            for sub_target, sub_value in zip(target.elts, value):
                self._assign(sub_target, sub_value)
            return
        what = "attributes" if isinstance(target, ast.Attribute) else \
            "subscripts" if isinstance(target, ast.Subscript) else type(target).__name__
        raise UnsupportedOperation(f"assigning to {what} is not part of the Bastion language; assign to a name",
                                   **_pos(target))

    # ------------------------------------------------------------------
    # Expressions.

    def evaluate(self, node: ast.AST) -> Any:
        """Evaluate one expression node through the dispatch table."""
        handler = self._handlers.get(type(node))
        if handler is None:
            raise _refusal(node, self._line_offset)
        try:
            value = handler(node)
        except BastionError as exc:
            raise attach_position(exc, node, self._line_offset)
        if not self.ctx.pure:
            self._note_plan_position(node, value)
        return value

    def _note_plan_position(self, node: ast.AST, value: Any) -> None:
        """Remember where in the cell a plan node was made, to place the executor's errors there."""
        if isinstance(value, RemoteFrame):
            self.positions.note(value.plan, _span(node, self._line_offset))
        elif isinstance(value, Expr):
            where = _span(node, self._line_offset)
            for expr_node in value.nodes:
                self.positions.note(expr_node, where)

    def _constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, SCALAR_TYPES):
            return node.value
        kind = {bytes: "bytes literals", complex: "complex numbers"}.get(type(node.value), "this literal")
        raise UnsupportedOperation(f"{kind} are not part of the Bastion language")

    def _joined_str(self, node: ast.JoinedStr) -> str:
        # An f-string without placeholders is just a string; with them it is refused.
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                parts.append(value.value)
            else:
                raise UnsupportedOperation("f-strings with expressions are not part of the Bastion language; "
                                           "write the string out", **_pos(value, self._line_offset))
        return "".join(parts)

    def _name(self, node: ast.Name) -> Any:
        name = node.id
        if name.startswith("__"):
            raise UnsupportedOperation(f"names starting with '__' are not available: {name!r}")
        if name in self.variables:
            return self.variables[name]
        if name in self.builtins:
            return self.builtins[name]
        known = list(self.variables) + list(self.builtins)
        hint = name_hint(name) or suggest(name, known)
        if name in _PYTHON_BUILTINS:
            raise UnsupportedOperation(f"{name!r} is a Python built-in; Bastion cells run no Python, only the "
                                       f"polars-shaped query language{hint}")
        raise UnsupportedOperation(f"unknown name {name!r}{hint}")

    def _attribute(self, node: ast.Attribute) -> Any:
        receiver = self.evaluate(node.value)
        try:
            return self.get_attribute(receiver, node.attr)
        except BastionError as exc:
            raise attach_position(exc, node, self._line_offset)

    def get_attribute(self, receiver: Any, name: str) -> Any:
        """``receiver.name`` through the registries only (never Python's getattr)."""
        if name.startswith("_"):
            raise UnsupportedOperation(f"attribute {name!r} is not available: names starting with '_' "
                                       "are never resolved")
        if isinstance(receiver, PolarsModule):
            hint = attribute_hint(PolarsModule.type_name, name)
            if hint and name not in polars_attribute_names():
                raise UnsupportedOperation(f"pl.{name} is not part of the Bastion language{hint}")
            return polars_attribute(name)
        cls = type(receiver)
        methods = methods_of(cls)
        if name in methods:
            return BoundOperation(methods[name], receiver)
        properties = properties_of(cls)
        if name in properties:
            return properties[name].handler(self.ctx, receiver)
        offered = attribute_names(cls)
        if not offered:
            raise UnsupportedOperation(f"{describe_value(receiver)} has no attributes in the Bastion language "
                                       f"(asked for {name!r})")
        owner = getattr(cls, "type_name", cls.__name__)
        hint = attribute_hint(owner, name) or suggest(name, offered)
        raise UnsupportedOperation(f"{owner} has no method or property {name!r}{hint}")

    def _call(self, node: ast.Call) -> Any:
        callee = self.evaluate(node.func)
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise UnsupportedOperation("star-arguments (*args) are not part of the Bastion language",
                                           **_pos(arg, self._line_offset))
            args.append(self.evaluate(arg))
        kwargs: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise UnsupportedOperation("keyword unpacking (**kwargs) is not part of the Bastion language",
                                           **_pos(keyword.value, self._line_offset))
            kwargs[keyword.arg] = self.evaluate(keyword.value)
        site = node.func
        try:
            return self.call(callee, args, kwargs)
        except BastionError as exc:
            raise attach_position(exc, site, self._line_offset)

    def call(self, callee: Any, args: list, kwargs: dict) -> Any:
        """Call a registry operation (a builtin function or a bound method); nothing else is callable."""
        if isinstance(callee, BoundOperation):
            return callee.operation.call(self.ctx, callee.receiver, args, kwargs)
        if isinstance(callee, Operation) and callee.receiver is None:
            return callee.call(self.ctx, None, args, kwargs)
        if isinstance(callee, DType):
            raise UnsupportedOperation(f"{callee.spelled} is a cast target, not a function; "
                                       f"write col(...).cast({callee.spelled})")
        raise UnsupportedOperation(f"{describe_value(callee)} is not callable")

    def _binop(self, node: ast.BinOp) -> Any:
        operator = BINARY_OPERATORS.get(type(node.op))
        if operator is None:
            raise UnsupportedOperation(f"the operator {type(node.op).__name__} is not part of the Bastion language")
        return self._apply_binary(operator, self.evaluate(node.left), self.evaluate(node.right))

    def _apply_binary(self, operator: str, left: Any, right: Any) -> Any:
        if isinstance(left, Expr) or isinstance(right, Expr):
            return _expr_binary(operator, left, right)
        return _literal_binary(operator, left, right)

    def _unaryop(self, node: ast.UnaryOp) -> Any:
        operand = self.evaluate(node.operand)
        if isinstance(node.op, ast.Not):
            if isinstance(operand, Expr):
                raise UnsupportedOperation("'not' does not apply to expressions; use ~expr (or expr.not_())")
            if isinstance(operand, SCALAR_TYPES):
                return not operand
            raise UnsupportedOperation(f"'not' does not apply to {describe_value(operand)}")
        if isinstance(operand, Expr):
            if isinstance(node.op, ast.UAdd):
                return operand
            op = "not" if isinstance(node.op, ast.Invert) else "neg"
            return operand.map(lambda n: P.unary(op, n))
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            if isinstance(node.op, ast.USub):
                return -operand
            if isinstance(node.op, ast.UAdd):
                return operand
            if isinstance(node.op, ast.Invert) and isinstance(operand, int):
                return ~operand
        symbol = {ast.Invert: "~", ast.USub: "-", ast.UAdd: "+"}[type(node.op)]
        raise UnsupportedOperation(f"the operator {symbol} does not apply to {describe_value(operand)}")

    def _compare(self, node: ast.Compare) -> Any:
        if len(node.ops) != 1:
            raise UnsupportedOperation("chained comparisons (a < b < c) are not available; "
                                       "use col(...).is_between(a, c) or combine comparisons with &")
        op_type = type(node.ops[0])
        if op_type in (ast.In, ast.NotIn):
            raise UnsupportedOperation("the 'in' operator is not available; use col(...).is_in([...])")
        if op_type in (ast.Is, ast.IsNot):
            raise UnsupportedOperation("'is' comparisons are not available; use col(...).is_null() "
                                       "or .is_not_null()")
        operator = COMPARE_OPERATORS[op_type]
        left, right = self.evaluate(node.left), self.evaluate(node.comparators[0])
        if isinstance(left, Expr) or isinstance(right, Expr):
            return _expr_binary(operator, left, right)
        return _literal_compare(operator, left, right)

    def _boolop(self, node: ast.BoolOp) -> Any:
        word = "and" if isinstance(node.op, ast.And) else "or"
        symbol = "&" if word == "and" else "|"
        values = [self.evaluate(v) for v in node.values]
        if any(isinstance(v, Expr) for v in values):
            raise UnsupportedOperation(f"'{word}' does not combine expressions; use {symbol} with parentheses, "
                                       f"e.g. (col('a') > 1) {symbol} (col('b') < 2)")
        if not all(isinstance(v, SCALAR_TYPES) for v in values):
            raise UnsupportedOperation(f"'{word}' applies to plain literals only")
        result = values[0]
        for value in values[1:]:
            result = (result and value) if word == "and" else (result or value)
        return result

    def _list(self, node: ast.List) -> list:
        return [self._element(e) for e in node.elts]

    def _tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self._element(e) for e in node.elts)

    def _element(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Starred):
            raise UnsupportedOperation("star-unpacking (*x) is not part of the Bastion language",
                                       **_pos(node, self._line_offset))
        return self.evaluate(node)

    def _dict(self, node: ast.Dict) -> dict:
        out: dict = {}
        for key_node, value_node in zip(node.keys, node.values):
            if key_node is None:
                raise UnsupportedOperation("dict unpacking (**d) is not part of the Bastion language",
                                           **_pos(value_node, self._line_offset))
            key = self.evaluate(key_node)
            if not isinstance(key, SCALAR_TYPES):
                raise SchemaError(f"a dict key must be a literal, not {describe_value(key)}",
                                  **_pos(key_node, self._line_offset))
            out[key] = self.evaluate(value_node)
        return out

    def _subscript(self, node: ast.Subscript) -> Any:
        container = self.evaluate(node.value)
        if isinstance(node.slice, ast.Slice):
            if not isinstance(container, (list, tuple, str)):
                raise UnsupportedOperation(f"slicing {describe_value(container)} is not available")
            bounds = [None if part is None else self.evaluate(part)
                      for part in (node.slice.lower, node.slice.upper, node.slice.step)]
            if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
                raise SchemaError("slice bounds must be whole numbers")
            if bounds[2] == 0:
                raise SchemaError("a slice step cannot be zero")
            return container[slice(*bounds)]
        key = self.evaluate(node.slice)
        if isinstance(container, RemoteFrame):
            if isinstance(key, str):
                raise UnsupportedOperation(f"frame[{key!r}] is not available on a remote frame; "
                                           f"use col({key!r}) in an expression or .select({key!r})")
            raise UnsupportedOperation("indexing a remote frame is not available; use .select(...) / .head(n)")
        if isinstance(container, dict):
            if isinstance(key, SCALAR_TYPES) and key in container:
                return container[key]
            raise SchemaError(f"no key {key!r:.60}{suggest(str(key), [str(k) for k in container])}")
        if isinstance(container, (list, tuple, str)):
            if isinstance(key, int) and not isinstance(key, bool):
                if -len(container) <= key < len(container):
                    return container[key]
                raise SchemaError(f"index {key} is out of range for a sequence of {len(container)} items")
            raise SchemaError(f"an index must be a whole number, not {describe_value(key)}")
        raise UnsupportedOperation(f"subscripts on {describe_value(container)} are not available")

    # ------------------------------------------------------------------
    # Help: x?, ?x, x?? (IPython's syntax, on a line of its own).

    def _help(self, text: str, detail_level: int, line: int, col: int) -> HelpText:
        found = self.inspect(text, len(text), detail_level)
        if found:
            return HelpText(found)
        try:
            value = self.evaluate_pure(text)  # an unknown name gets the language's own error and hint
        except BastionError as exc:
            if isinstance(exc.details.get("line"), int):
                exc.details["col"] = exc.details.get("col", 0) + (col if exc.details["line"] == 2 else 0)
                exc.details["line"] = line + exc.details["line"] - 2  # evaluate_pure puts the text on line 2
            raise
        return HelpText(completion.describe_value(self, value, detail_level, label=text))

    # ------------------------------------------------------------------
    # SQL cells.

    def _run_sql_cell(self, code: str, query: str, wait: bool = True) -> Any:
        self._line_offset = 1
        if not query.strip():
            raise ParseError("the %%sql cell has no query", line=2, col=0)
        try:
            plan = sql_plan(self.ctx, query)
        except BastionError as exc:
            if isinstance(exc.details.get("line"), int):
                exc.details["line"] += 1  # the query starts on the cell's second line
            raise
        frame = RemoteFrame(plan)
        self.ctx.require_effects("fetch()")
        return fetch_plan(self.session, frame.plan, code, wait)

    # ------------------------------------------------------------------
    # Evaluation without effects, for completion and inspection.

    def evaluate_pure(self, text: str) -> Any:
        """Evaluate an expression's text with no fetch/save/request; for completion and inspection."""
        tree = self.parse(f"(\n{text}\n)", mode="eval")
        saved_pure, saved_offset = self.ctx.pure, self._line_offset
        self.ctx.pure, self._line_offset = True, 0
        try:
            return self.evaluate(tree.body)
        finally:
            self.ctx.pure, self._line_offset = saved_pure, saved_offset

    def known_names(self) -> list[str]:
        """Variables and builtin names (for completion)."""
        return sorted(set(self.variables) | set(self.builtins))


# --------------------------------------------------------------------------
# Helpers.

def _span(node: ast.AST, line_offset: int = 0) -> dict:
    """Where a node is in the cell; a method call spans from the method's name to its closing bracket."""
    start = position_of(node.func) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        else {"line": getattr(node, "lineno", 1), "col": getattr(node, "col_offset", 0)}
    where = {"line": start["line"] + line_offset, "col": start["col"]}
    if getattr(node, "end_lineno", None) is not None:
        where.update(end_line=node.end_lineno + line_offset, end_col=node.end_col_offset)
    return where


class PlanPositions:
    """Where in the cell each plan node was made (by identity), for placing the executor's errors.

    The executor names the place it refused as a path into the plan it got
    (``details["at"]``, such as ``plan.input.predicate.left``); the scientist
    sees the sub-expression of the cell that made that node instead.  The
    entries hold their nodes, so an ``id`` is never reused while it is noted.
    """

    _STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, dict]] = {}

    def clear(self) -> None:
        """Forget the previous cell's nodes."""
        self._by_id.clear()

    def note(self, node: Any, where: dict) -> None:
        """``node`` was made at ``where``; the first (innermost) place noted is kept."""
        self._by_id.setdefault(id(node), (node, where))

    def _where(self, node: Any) -> dict | None:
        entry = self._by_id.get(id(node))
        return entry[1] if entry is not None and entry[0] is node else None

    def locate(self, plan: Any, path: str) -> dict | None:
        """The cell position of the deepest noted node on ``path`` (``plan.input.exprs[0]...``), or None."""
        if not path.startswith("plan"):
            return None
        node, found, rest = plan, self._where(plan), path[len("plan"):]
        for step in self._STEP.finditer(rest):
            key, index = step.group(1), step.group(2)
            if key is not None:
                node = node.get(key) if isinstance(node, dict) else None
            else:
                node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
            if node is None:
                break
            found = self._where(node) or found
        return dict(found) if found else None


def place_executor_error(error: BastionError, plan: Any, positions: PlanPositions) -> None:
    """Replace the executor's plan path in ``error`` by the cell position of that sub-expression.

    The path leaves the message; when the node it names was made by this
    cell, ``line``/``col`` (and the end) point at it.  Without a position the
    error keeps none, and the kernel places it at the call that sent the plan.
    """
    path = error.details.get("at")
    if not isinstance(path, str):
        return
    suffix = f" (at {path})"
    if error.evalue.endswith(suffix):
        error.evalue = error.evalue[:-len(suffix)]
        error.args = (error.evalue,)
    if "line" not in error.details:
        where = positions.locate(plan, path)
        if where is not None:
            error.details.update(where)


class PositionedSession:
    """The session the language's operations call: the kernel's, with executor errors placed in the cell.

    Every call that sends a plan (``schema``, ``fetch``, ``save``,
    ``dp_preview``) goes through :func:`place_executor_error`; anything else
    is the session's own attribute.
    """

    def __init__(self, session: Any, positions: PlanPositions) -> None:
        self._session = session
        self._positions = positions

    def _placed(self, plan: Any, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except BastionError as exc:
            place_executor_error(exc, plan, self._positions)
            raise

    def schema(self, plan: dict, *args: Any, **kwargs: Any) -> Any:
        return self._placed(plan, lambda: self._session.schema(plan, *args, **kwargs))

    def fetch(self, plan: dict, *args: Any, **kwargs: Any) -> Any:
        return self._placed(plan, lambda: self._session.fetch(plan, *args, **kwargs))

    def save(self, plan: dict, *args: Any, **kwargs: Any) -> Any:
        return self._placed(plan, lambda: self._session.save(plan, *args, **kwargs))

    def dp_preview(self, plan: dict, *args: Any, **kwargs: Any) -> Any:
        return self._placed(plan, lambda: self._session.dp_preview(plan, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        # Our own code's names only (datasets, request, budget...): the session's methods as they are.
        return getattr(self._session, name)


def _pos(node: ast.AST, line_offset: int = 0) -> dict:
    return {"line": getattr(node, "lineno", 1) + line_offset, "col": getattr(node, "col_offset", 0)}


def _refusal(node: ast.AST, line_offset: int = 0) -> BastionError:
    what = REFUSED_NODES.get(type(node))
    if what is None:
        what = f"the syntax {type(node).__name__}"
    hint = REFUSAL_HINTS.get(type(node), "")
    return UnsupportedOperation(f"{what} are not part of the Bastion language{hint}"
                                if what.endswith("s") else f"{what} is not part of the Bastion language{hint}",
                                **_pos(node, line_offset))


def _check_tree_size(tree: ast.AST) -> None:
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_AST_NODES:
            raise LimitExceeded(f"the cell has more than {MAX_AST_NODES} syntax nodes")
        if depth > MAX_AST_DEPTH:
            raise LimitExceeded(f"the cell nests deeper than {MAX_AST_DEPTH} levels", **_pos(node))
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


# The options a %%sql line takes, and whether the cell then waits for the owner's review.
SQL_CELL_OPTIONS = {"--no-wait": False}


def _sql_cell_query(code: str) -> tuple[str, bool] | None:
    """``(query, wait)`` of a ``%%sql`` cell (None for other cells).

    ``%%sql --no-wait`` does not wait for a result held for review: the
    request's id and status come back at once, as ``.fetch(wait=False)``.
    """
    stripped = code.lstrip()
    first, _, rest = stripped.partition("\n")
    words = first.split()
    if not words or words[0] != "%%sql":
        return None
    for option in words[1:]:
        if option not in SQL_CELL_OPTIONS:
            raise UnsupportedOperation(f"%%sql takes no option {option!r}{suggest(option, SQL_CELL_OPTIONS)}; it "
                                       f"takes {', '.join(SQL_CELL_OPTIONS)}; put the query on the following lines",
                                       line=1, col=0)
    return rest, all(SQL_CELL_OPTIONS[option] for option in words[1:])


# IPython's help syntax: ?x, ??x, x?, x?? (x an expression without question marks).
_HELP_LINE = re.compile(r"(\?\??)\s*([^?\s][^?]*?)|([^?\s][^?]*?)\s*(\?\??)")


def help_request(code: str) -> tuple[str, int, int, int] | None:
    """``(expression text, detail level, line, column)`` when the cell is one IPython help line, else None.

    ``x?`` and ``?x`` ask for help (detail 0), ``x??`` and ``??x`` for more
    (detail 1).  Only a whole line counts, alone in the cell but for blank
    lines and comments, and only when the cell is not valid Python as it is.
    """
    lines = [(number, text) for number, text in enumerate(code.splitlines(), start=1)
             if text.strip() and not text.strip().startswith("#")]
    if len(lines) != 1:
        return None
    number, text = lines[0]
    match = _HELP_LINE.fullmatch(text.strip())
    if match is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
        return None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        pass
    marks, expression = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
    return expression.strip(), len(marks) - 1, number, text.index(expression)


def _magic_line(code: str) -> tuple[int, str] | None:
    """The first line that is an IPython magic or shell escape, if any."""
    for number, line in enumerate(code.splitlines(), start=1):
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")) and not stripped.startswith("!="):
            return number, stripped
    return None


def _expr_binary(operator: str, left: Any, right: Any) -> Expr:
    symbol = _SYMBOL[operator]
    for side in (left, right):
        if not isinstance(side, (Expr,) + SCALAR_TYPES):
            raise UnsupportedOperation(f"the operator {symbol} does not combine an expression with "
                                       f"{describe_value(side)}")
    if isinstance(left, Expr) and isinstance(right, Expr):
        if len(left.nodes) > 1 and len(right.nodes) > 1:
            raise SchemaError(f"the operator {symbol} cannot combine two multi-column expressions")
        if len(left.nodes) > 1:
            return left.map(lambda n: P.binary(operator, n, right.node))
        return right.map(lambda n: P.binary(operator, left.node, n))
    if isinstance(left, Expr):
        literal = to_node(right, f"the operator {symbol}")
        return left.map(lambda n: P.binary(operator, n, literal))
    literal = to_node(left, f"the operator {symbol}")
    return right.map(lambda n: P.binary(operator, literal, n))


def _literal_binary(operator: str, left: Any, right: Any) -> Any:
    symbol = _SYMBOL[operator]
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    if operator == "add" and isinstance(left, str) and isinstance(right, str):
        if len(left) + len(right) > MAX_LITERAL_STR:
            raise LimitExceeded("the string is too long")
        return left + right
    if not numbers:
        raise UnsupportedOperation(f"the operator {symbol} does not apply to {describe_value(left)} and "
                                   f"{describe_value(right)}")
    if operator in ("and", "or", "xor"):
        if not all(isinstance(v, int) for v in (left, right)):
            raise UnsupportedOperation(f"the operator {symbol} applies to whole numbers or expressions")
        return {"and": left & right, "or": left | right, "xor": left ^ right}[operator]
    if operator == "pow" and isinstance(left, int) and isinstance(right, int) and right > 0 \
            and max(1, abs(left).bit_length()) * right > MAX_LITERAL_INT_BITS:
        raise LimitExceeded(f"the number {left} ** {right} is too large")
    if operator == "mul" and isinstance(left, int) and isinstance(right, int) \
            and abs(left).bit_length() + abs(right).bit_length() > MAX_LITERAL_INT_BITS:
        raise LimitExceeded("the product is too large")
    try:
        result = {"add": lambda: left + right, "sub": lambda: left - right, "mul": lambda: left * right,
                  "truediv": lambda: left / right, "floordiv": lambda: left // right,
                  "mod": lambda: left % right, "pow": lambda: left ** right}[operator]()
    except ZeroDivisionError:
        raise ExecutionError("division by zero") from None
    except OverflowError:
        raise LimitExceeded("the number is too large") from None
    if isinstance(result, complex):
        raise UnsupportedOperation("complex numbers are not part of the Bastion language")
    if isinstance(result, int) and result.bit_length() > MAX_LITERAL_INT_BITS:
        raise LimitExceeded("the number is too large")
    if isinstance(result, float) and not math.isfinite(result):
        raise LimitExceeded("the number is too large")
    return result


def _literal_compare(operator: str, left: Any, right: Any) -> bool:
    if operator in ("eq", "ne"):
        if not all(isinstance(v, SCALAR_TYPES + (list, tuple, dict)) for v in (left, right)):
            raise UnsupportedOperation(f"comparing {describe_value(left)} and {describe_value(right)} is not available")
        return (left == right) if operator == "eq" else (left != right)
    comparable = (all(isinstance(v, (int, float)) for v in (left, right))
                  or all(isinstance(v, str) for v in (left, right)))
    if not comparable:
        raise UnsupportedOperation(f"the operator {_SYMBOL[operator]} does not apply to {describe_value(left)} "
                                   f"and {describe_value(right)}")
    return {"lt": left < right, "le": left <= right, "gt": left > right, "ge": left >= right}[operator]


__all__ = ["Interpreter", "CellResult", "Completion", "MAX_CELL_BYTES", "MAX_AST_DEPTH", "MAX_AST_NODES"]
