"""Hypothesis strategies shared by the bounded fuzz tests and ``scripts/fuzz.py``.

Two families:

- **cells**: Python source built from a small grammar of syntax trees
  (:func:`cell_sources`), mixing what the Bastion language allows (datasets,
  ``col``/``pl.*``, frame methods, literals) with what it must refuse
  (dunders, imports, lambdas, comprehensions, attribute chains on builtins,
  ``def``/``class``/``with``...), plus raw random text and mutations of valid
  cells.  Several of the refused forms would leave a trace if they ever ran
  (a file at :data:`CANARY_FILE_TOKEN`, an attribute on ``builtins``, an
  environment variable): the tests replace the token with a real path and
  check that nothing happened.
- **wire messages**: random and mutated envelopes (:func:`wire_messages`):
  frames, sizes, encodings, kinds, bodies and plans.

Every strategy is pure data; nothing here talks to a process.
"""
from __future__ import annotations

import ast
import json

from hypothesis import strategies as st

CANARY_FILE_TOKEN = "@@CANARY_FILE@@"
CANARY_ATTRIBUTE = "BASTION_FUZZ_CANARY"
CANARY_ENV = "BASTION_FUZZ_CANARY"

# -- cells ----------------------------------------------------------------------

# Names the language knows, names it must refuse, and dunders.
ALLOWED_NAMES = ["patients", "visits", "dataset", "datasets", "col", "lit", "pl", "len", "when",
                 "request", "True", "None", "x", "frame"]
REFUSED_NAMES = ["__import__", "open", "eval", "exec", "compile", "getattr", "setattr", "globals",
                 "locals", "vars", "type", "object", "os", "sys", "builtins", "print", "input",
                 "breakpoint", "help", "__builtins__", "__loader__", "__spec__", "memoryview"]
ALLOWED_METHODS = ["filter", "select", "with_columns", "group_by", "agg", "sort", "head", "join",
                   "fetch", "collect", "mean", "sum", "min", "max", "count", "alias", "is_null",
                   "cast", "str", "dt", "year", "contains", "len", "n_unique", "unique", "drop",
                   "rename", "over", "schema", "columns", "explain", "lazy", "map_elements", "pipe"]
DUNDER_ATTRIBUTES = ["__class__", "__globals__", "__subclasses__", "__mro__", "__bases__", "__dict__",
                     "__code__", "__builtins__", "__init__", "__reduce__", "__getattribute__",
                     "__import__", "_session", "session", "ctx", "_frame", "plan", "func_globals"]
COLUMNS = ["age", "sex", "cost", "name", "diagnosis", "zip", "patient_id", "ward", "nope"]

# Statements that would leave a trace if they were ever executed.
CANARY_STATEMENTS = [
    f'open("{CANARY_FILE_TOKEN}", "w").write("x")',
    f'__import__("os").system("touch {CANARY_FILE_TOKEN}")',
    f'__import__("pathlib").Path("{CANARY_FILE_TOKEN}").touch()',
    f'import os\nos.system("touch {CANARY_FILE_TOKEN}")',
    f'from pathlib import Path\nPath("{CANARY_FILE_TOKEN}").write_text("x")',
    f'import builtins\nbuiltins.{CANARY_ATTRIBUTE} = 1',
    f'setattr(__import__("builtins"), "{CANARY_ATTRIBUTE}", 1)',
    f'__builtins__["{CANARY_ATTRIBUTE}"] = 1',
    f'__import__("os").environ["{CANARY_ENV}"] = "1"',
    f'global {CANARY_ATTRIBUTE}\n{CANARY_ATTRIBUTE} = 1',
    f'exec("open(\'{CANARY_FILE_TOKEN}\', \'w\')")',
    f'eval(compile("open(\'{CANARY_FILE_TOKEN}\', \'w\')", "x", "exec"))',
    f'(lambda: open("{CANARY_FILE_TOKEN}", "w"))()',
    f'[open("{CANARY_FILE_TOKEN}", "w") for _ in range(1)]',
    f'col("age").__class__.__init__.__globals__["__builtins__"]["open"]("{CANARY_FILE_TOKEN}", "w")',
    f'().__class__.__bases__[0].__subclasses__()',
    f'patients.__class__.__init__.__globals__["os"].system("touch {CANARY_FILE_TOKEN}")',
    f'pl.col("age").map_elements(lambda v: open("{CANARY_FILE_TOKEN}", "w"))',
    f'def f():\n    open("{CANARY_FILE_TOKEN}", "w")\nf()',
    f'class C:\n    open("{CANARY_FILE_TOKEN}", "w")',
    f'with open("{CANARY_FILE_TOKEN}", "w") as f:\n    pass',
    f'try:\n    open("{CANARY_FILE_TOKEN}", "w")\nexcept Exception:\n    pass',
    f'x = f"{{open(\'{CANARY_FILE_TOKEN}\', \'w\')}}"',
    f'patients.filter(col("age") > 1).pipe(lambda d: open("{CANARY_FILE_TOKEN}", "w"))',
    f'%%sql\nSELECT * FROM patients; COPY patients TO \'{CANARY_FILE_TOKEN}\'',
]

VALID_CELLS = [
    'patients = dataset("patients")',
    'dataset("patients").group_by("sex").agg(col("age").mean(), pl.len())',
    'dataset("patients").filter(col("age") >= 18).select(col("cost").sum())',
    'p = dataset("patients")\np.filter((col("age") > 30) & (col("sex") == "F")).head(5)',
    'dataset("patients").with_columns((col("cost") * 2).alias("c2")).group_by("diagnosis").agg(pl.col("c2").max())',
    'dataset("patients").join(dataset("visits"), on="patient_id").group_by("ward").agg(pl.len())',
    'pl.when(col("age") > 50).then(lit("old")).otherwise(lit("young"))',
    'datasets()',
    '%%sql\nSELECT sex, AVG(age) FROM patients GROUP BY sex',
    'x = [1, 2, 3]\nx',
    '{"a": 1, "b": (2, 3)}',
]

_names = st.sampled_from(ALLOWED_NAMES + REFUSED_NAMES)
_literals = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(COLUMNS + [CANARY_FILE_TOKEN]), st.booleans(), st.none(),
    st.binary(max_size=6),
)


def _constant(value) -> ast.expr:
    if isinstance(value, float) and value != value:  # NaN has no literal: spell it float("nan")
        return ast.Call(ast.Name("float", ast.Load()), [ast.Constant("nan")], [])
    return ast.Constant(value)


def _exprs(children: st.SearchStrategy) -> st.SearchStrategy:
    """One level of expression syntax over ``children``."""
    attr_names = st.sampled_from(ALLOWED_METHODS + DUNDER_ATTRIBUTES)
    ops = st.sampled_from([ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
                           ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.MatMult])
    cmps = st.sampled_from([ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.Is])
    args = st.lists(children, max_size=3)
    kwargs = st.lists(st.builds(ast.keyword, st.sampled_from(["on", "how", "by", "n", "descending", "x",
                                                              "__class__", None]), children), max_size=2)
    arg_names = st.builds(ast.arguments, posonlyargs=st.just([]),
                          args=st.lists(st.builds(ast.arg, st.sampled_from(["a", "b", "d"])), max_size=2,
                                        unique_by=lambda a: a.arg),
                          kwonlyargs=st.just([]), kw_defaults=st.just([]), defaults=st.just([]))
    comprehension = st.builds(ast.comprehension, target=st.builds(ast.Name, st.just("v"), st.just(ast.Store())),
                              iter=children, ifs=st.lists(children, max_size=1), is_async=st.just(0))
    return st.one_of(
        st.builds(ast.Attribute, children, attr_names, st.just(ast.Load())),
        st.builds(ast.Call, children, args, kwargs),
        st.builds(lambda f, a: ast.Call(ast.Name(f, ast.Load()), a, []),
                  st.sampled_from(["col", "lit", "dataset", "pl.col", "getattr", "__import__", "open",
                                   "type", "len", "when"]), args),
        st.builds(ast.BinOp, children, st.builds(lambda o: o(), ops), children),
        st.builds(ast.UnaryOp, st.sampled_from([ast.Not(), ast.USub(), ast.Invert(), ast.UAdd()]), children),
        st.builds(lambda o, l, r: ast.Compare(l, [o()], [r]), cmps, children, children),
        st.builds(ast.BoolOp, st.sampled_from([ast.And(), ast.Or()]), st.lists(children, min_size=2, max_size=3)),
        st.builds(ast.Subscript, children, children, st.just(ast.Load())),
        st.builds(ast.List, st.lists(children, max_size=3), st.just(ast.Load())),
        st.builds(ast.Tuple, st.lists(children, max_size=3), st.just(ast.Load())),
        st.builds(ast.Dict, st.lists(children, min_size=1, max_size=2).map(lambda ks: ks),
                  st.lists(children, min_size=2, max_size=2)).map(
            lambda d: ast.Dict(d.keys[:len(d.values)], d.values[:len(d.keys)])),
        st.builds(ast.Lambda, arg_names, children),
        st.builds(ast.ListComp, children, st.lists(comprehension, min_size=1, max_size=1)),
        st.builds(ast.GeneratorExp, children, st.lists(comprehension, min_size=1, max_size=1)),
        st.builds(ast.IfExp, children, children, children),
        st.builds(ast.Starred, children, st.just(ast.Load())).map(lambda s: ast.List([s], ast.Load())),
        st.builds(lambda e: ast.JoinedStr([ast.FormattedValue(e, -1, None)]), children),
        st.builds(ast.NamedExpr, st.builds(ast.Name, st.sampled_from(["y", "__builtins__"]), st.just(ast.Store())),
                  children),
        st.builds(ast.Await, children),
        st.builds(ast.Yield, children),
    )


expressions = st.recursive(st.one_of(st.builds(ast.Name, _names, st.just(ast.Load())), _literals.map(_constant)),
                           _exprs, max_leaves=12)


def _statement(expr: st.SearchStrategy) -> st.SearchStrategy:
    target = st.one_of(st.builds(ast.Name, st.sampled_from(["x", "frame", "pl", "col", "__builtins__",
                                                            CANARY_ATTRIBUTE]), st.just(ast.Store())),
                       st.builds(lambda e, a: ast.Attribute(e, a, ast.Store()), expr,
                                 st.sampled_from(["__class__", "plan", "x"])),
                       st.builds(lambda e, k: ast.Subscript(e, k, ast.Store()), expr, expr))
    body = st.just([ast.Pass()])
    return st.one_of(
        st.builds(ast.Expr, expr),
        st.builds(lambda t, v: ast.Assign([t], v, lineno=1), target, expr),
        st.builds(ast.AugAssign, target, st.sampled_from([ast.Add(), ast.Mult()]), expr),
        st.builds(lambda n: ast.Import([ast.alias(n)]), st.sampled_from(["os", "sys", "polars", "builtins", "io"])),
        st.builds(lambda n: ast.ImportFrom(n, [ast.alias("*")], 0), st.sampled_from(["os", "polars", "subprocess"])),
        st.builds(lambda e, b: ast.FunctionDef("f", ast.arguments([], [], None, [], [], None, []), b, [e], None,
                                               lineno=1), expr, body),
        st.builds(lambda b: ast.ClassDef("C", [], [], b, []), body),
        st.builds(lambda e, b: ast.For(ast.Name("v", ast.Store()), e, b, [], lineno=1), expr, body),
        st.builds(lambda e, b: ast.While(e, b, []), expr, body),
        st.builds(lambda e, b: ast.If(e, b, []), expr, body),
        st.builds(lambda e, b: ast.With([ast.withitem(e, None)], b, lineno=1), expr, body),
        st.builds(lambda b: ast.Try(b, [ast.ExceptHandler(None, None, b)], [], []), body),
        st.builds(ast.Raise, expr, st.none()),
        st.builds(ast.Assert, expr, st.none()),
        st.builds(lambda t: ast.Delete([t]), st.builds(ast.Name, st.sampled_from(["x", "pl"]), st.just(ast.Del()))),
        st.builds(lambda n: ast.Global([n]), st.sampled_from([CANARY_ATTRIBUTE, "x"])),
        st.builds(ast.Return, expr),
    )


def _unparse(statements: list[ast.stmt]) -> str | None:
    module = ast.fix_missing_locations(ast.Module(statements, []))
    try:
        return ast.unparse(module)
    except Exception:  # some random trees have no source form; such cases are skipped
        return None


ast_cells = st.lists(_statement(expressions), min_size=1, max_size=4).map(_unparse).filter(lambda s: s is not None)


@st.composite
def mutated_cells(draw) -> str:
    """A valid or canary cell with a few characters inserted, deleted or replaced."""
    text = draw(st.sampled_from(VALID_CELLS + CANARY_STATEMENTS))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(["(", ")", ".", "__class__", "_", "\n", "\\", '"', "lambda:", "[", "]", "*",
                                      "import os;", ",", "=", "%%sql\n", "\x00", "\udcff", "é", " " * 4, "#"]))
        if action == "insert":
            text = text[:position] + piece + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + len(piece):]
        else:
            text = text[:position] + piece + text[position + 1:]
    return text


cell_sources = st.one_of(
    ast_cells,
    mutated_cells(),
    st.sampled_from(CANARY_STATEMENTS + VALID_CELLS),
    st.text(max_size=200),
    st.lists(st.sampled_from(["(", ")", "[", "]", "{", "}", ".", ",", ":", "=", "\n", " ", "lambda", "col",
                              "dataset", '"age"', "1", "__class__", "for", "in", "if", "import", "*", "**",
                              "pl", ".fetch()", "%%sql", "SELECT", "FROM", "patients", "\t", "'"]),
             max_size=40).map("".join),
)


# -- wire messages ---------------------------------------------------------------

REQUEST_KINDS = ["hello", "datasets", "schema", "fetch", "request_status", "save"]
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(_json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                              st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=16)

_DATASETS = ["patients", "patients_strict", "patients_open", "nope", "../../etc/passwd", "", "__bastion_r0"]
_FRAME_OPS = ["scan", "filter", "select", "with_columns", "group_by", "sort", "head", "join", "concat",
              "drop", "rename", "unique", "saved", "acct_row_id", "acct_columns", "read_csv", "python", ""]
_EXPR_KINDS = ["col", "lit", "len", "binary", "unary", "alias", "fn", "when", "acct_len", "acct_col",
               "python", "map_elements"]


def _expr_nodes(children):
    return st.one_of(
        st.fixed_dictionaries({"expr": st.just("col"), "name": st.sampled_from(COLUMNS + ["__bastion_r0", ""])}),
        st.fixed_dictionaries({"expr": st.just("lit"), "value": _json_scalars}),
        st.fixed_dictionaries({"expr": st.just("binary"), "op": st.sampled_from(["add", "mul", "pow", "eq", "__add__"]),
                               "left": children, "right": children}),
        st.fixed_dictionaries({"expr": st.just("fn"), "name": st.sampled_from(["mean", "sum", "cast", "eval",
                                                                              "str.contains", "pow"]),
                               "input": children, "args": st.dictionaries(st.sampled_from(["dtype", "pattern",
                                                                                           "literal", "x"]),
                                                                          json_values, max_size=2)}),
        st.fixed_dictionaries({"expr": st.just("alias"), "input": children, "name": st.text(max_size=10)}),
        st.fixed_dictionaries({"expr": st.sampled_from(_EXPR_KINDS)}, optional={"name": st.text(max_size=5),
                                                                               "input": children}),
    )


expr_nodes = st.recursive(st.fixed_dictionaries({"expr": st.just("col"), "name": st.sampled_from(COLUMNS)}),
                          _expr_nodes, max_leaves=6)


def _frame_nodes(children):
    exprs = st.lists(expr_nodes, max_size=3)
    return st.one_of(
        st.fixed_dictionaries({"op": st.just("filter"), "input": children, "predicate": expr_nodes}),
        st.fixed_dictionaries({"op": st.just("select"), "input": children, "exprs": exprs}),
        st.fixed_dictionaries({"op": st.just("group_by"), "input": children, "keys": exprs, "aggs": exprs}),
        st.fixed_dictionaries({"op": st.just("head"), "input": children, "n": _json_scalars}),
        st.fixed_dictionaries({"op": st.just("join"), "left": children, "right": children,
                               "how": st.sampled_from(["inner", "left", "cross", "semi", "anti", "outer", "x"]),
                               "left_on": exprs, "right_on": exprs, "suffix": st.text(max_size=4)}),
        st.fixed_dictionaries({"op": st.just("concat"), "inputs": st.lists(children, max_size=3)}),
        st.fixed_dictionaries({"op": st.sampled_from(_FRAME_OPS)},
                              optional={"input": children, "dataset": st.sampled_from(_DATASETS),
                                        "path": st.just("/etc/passwd")}),
    )


plans = st.one_of(
    st.recursive(st.fixed_dictionaries({"op": st.just("scan"), "dataset": st.sampled_from(_DATASETS)}),
                 _frame_nodes, max_leaves=6),
    json_values,
)


def _body(kind: str) -> st.SearchStrategy:
    bodies = {
        "hello": st.just({}),
        "datasets": st.just({}),
        "schema": st.fixed_dictionaries({"plan": plans}),
        "fetch": st.fixed_dictionaries({"plan": plans}, optional={"text": st.text(max_size=50)}),
        "request_status": st.fixed_dictionaries({"request_id": st.one_of(st.integers(-(2**70), 2**70),
                                                                         json_values)}),
        "save": st.fixed_dictionaries({"plan": plans, "name": st.text(max_size=20)},
                                      optional={"text": st.text(max_size=20)}),
    }
    known = bodies.get(kind, st.just({}))
    return st.one_of(known, known, known, st.dictionaries(st.text(max_size=10), json_values, max_size=3))


@st.composite
def envelopes(draw) -> dict:
    """An envelope object: mostly well-formed in shape (so bodies and plans reach the
    executor's checks), sometimes with a random version, id, kind, field or body."""
    well_formed = draw(st.integers(0, 9)) < 7
    kind = draw(st.sampled_from(REQUEST_KINDS) if well_formed else
                st.one_of(st.sampled_from(REQUEST_KINDS + ["ok", "result", "error", "pending"]),
                          st.text(max_size=10)))
    message = {
        "v": 1 if well_formed else draw(json_values),
        "id": draw(st.text(min_size=1, max_size=20)) if well_formed else
        draw(st.one_of(st.text(min_size=129, max_size=140), json_values)),
        "kind": kind,
        "body": draw(_body(kind) if isinstance(kind, str) else json_values),
    }
    if not well_formed:
        for field in draw(st.lists(st.sampled_from(["v", "id", "kind", "body"]), max_size=1)):
            del message[field]
        if draw(st.booleans()):
            message[draw(st.sampled_from(["user", "scientist", "__proto__"]))] = draw(json_values)
    return message


def _encode(message, encoding: str) -> bytes:
    text = json.dumps(message, ensure_ascii=encoding == "ascii", allow_nan=True)
    return text.encode({"ascii": "ascii", "utf-8": "utf-8", "utf-16": "utf-16", "latin-1": "latin-1"}[encoding],
                       "surrogatepass" if encoding != "latin-1" else "replace")


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, truncated or duplicated."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "truncate", "duplicate"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "truncate":
            del data[position:]
        else:
            data[position:position] = data[position:position + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def first_frames(draw) -> bytes:
    """The first frame of a request: encoded envelopes (well-formed or mutated), or raw bytes."""
    how = draw(st.sampled_from(["envelope"] * 6 + ["mutated", "mutated", "raw", "padded", "json"]))
    if how == "raw":
        return draw(st.binary(max_size=300))
    if how == "json":
        return _encode(draw(json_values), "utf-8")
    encoded = _encode(draw(envelopes()), draw(st.sampled_from(["utf-8"] * 4 + ["ascii", "utf-16", "latin-1"])))
    if how == "mutated":
        return draw(mutated_bytes(encoded))
    if how == "padded":
        # Around the envelope limit (1 MiB), below the frame size at which ZeroMQ drops the connection.
        size = draw(st.sampled_from([(1 << 20) - 10, (1 << 20) + 1, (1 << 20) + 30_000]))
        return encoded + b" " * max(0, size - len(encoded))
    return encoded


@st.composite
def wire_messages(draw) -> list[bytes]:
    """A multipart message: usually one frame, sometimes more (or an empty first frame)."""
    frames = [draw(first_frames())]
    if draw(st.integers(0, 9)) == 0:
        frames += draw(st.lists(st.binary(max_size=64), min_size=1, max_size=2))
    return frames
