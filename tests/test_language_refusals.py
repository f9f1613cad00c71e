"""What the language refuses: each refusal has its documented ename, a position and a reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from bastion_kernel.language.interpreter import MAX_AST_DEPTH, MAX_CELL_BYTES, Interpreter
from bastion_kernel.contract.protocol import ERROR_NAMES, BastionError
from language_fake_session import FakeSession, refusal

# (cell, ename, (line, col), a fragment of the message)
REFUSALS = [
    ("import os", "UnsupportedOperation", (1, 0), "import os: Bastion cells run no Python modules"),
    ("x = 1\nfrom os import path", "UnsupportedOperation", (2, 0), "import os: Bastion cells run no Python modules"),
    ("df.__class__", "UnsupportedOperation", (1, 3), "'__class__'"),
    ("df._plan", "UnsupportedOperation", (1, 3), "'_plan'"),
    ("col('a').__init__.__globals__", "UnsupportedOperation", (1, 9), "'__init__'"),
    ("__builtins__", "UnsupportedOperation", (1, 0), "'__'"),
    ("f = lambda x: x", "UnsupportedOperation", (1, 4), "lambda"),
    ("df.filter(lambda r: r)", "UnsupportedOperation", (1, 10), "lambda"),
    ('open("x")', "UnsupportedOperation", (1, 0), "Python built-in"),
    ('eval("1")', "UnsupportedOperation", (1, 0), "Python built-in"),
    ('exec("x = 1")', "UnsupportedOperation", (1, 0), "Python built-in"),
    ("getattr(df, 'plan')", "UnsupportedOperation", (1, 0), "Python built-in"),
    ("__import__('os')", "UnsupportedOperation", (1, 0), "'__'"),
    ("col.__doc__", "UnsupportedOperation", (1, 4), "'__doc__'"),
    ("col.name", "UnsupportedOperation", (1, 4), "no attributes"),
    ("pl.read_csv('x.csv')", "UnsupportedOperation", (1, 3), "pl.read_csv"),
    ("pl.DataFrame", "UnsupportedOperation", (1, 3), "pl.DataFrame"),
    ("'abc'.upper()", "UnsupportedOperation", (1, 6), "no attributes"),
    ("[x for x in [1, 2]]", "UnsupportedOperation", (1, 0), "comprehensions"),
    ("{k: 1 for k in 'ab'}", "UnsupportedOperation", (1, 0), "comprehensions"),
    ("(x for x in [1])", "UnsupportedOperation", (1, 0), "generator expressions"),
    ('f"{df}"', "UnsupportedOperation", (1, 0), "f-strings"),
    ("col('a') and col('b')", "UnsupportedOperation", (1, 0), "use &"),
    ("col('a') or col('b')", "UnsupportedOperation", (1, 0), "use |"),
    ("not col('a')", "UnsupportedOperation", (1, 0), "~"),
    ("1 < col('a') < 3", "UnsupportedOperation", (1, 0), "is_between"),
    ("col('a') in [1, 2]", "UnsupportedOperation", (1, 0), "is_in"),
    ("col('a') is None", "UnsupportedOperation", (1, 0), "is_null"),
    ("(y := 3)", "UnsupportedOperation", (1, 1), "walrus"),
    # Arguments are bound against the handler's signature, after the whitelist lookup.
    ("df.sort('age', descendin=True)", "UnsupportedOperation", (1, 3), "did you mean 'descending'?"),
    ("col('a').mean(x=1)", "UnsupportedOperation", (1, 9), "Expr.mean() has no parameter 'x'; it takes no keyword"),
    ("col('a', bogus=1)", "UnsupportedOperation", (1, 0), "col() has no parameter 'bogus'; its parameters are name"),
    ("df.head(1, 2, 3)", "UnsupportedOperation", (1, 3), "positional arguments; expected RemoteFrame.head(n=5)"),
    ("df.select(*cols)", "UnsupportedOperation", (1, 10), "star-arguments"),
    ("df.select(**named)", "UnsupportedOperation", (1, 12), "**kwargs"),
    ("[*cols]", "UnsupportedOperation", (1, 1), "star"),
    ("@decorator\ndef f():\n    pass", "UnsupportedOperation", (2, 0), "function definitions"),
    ("def f():\n    return 1", "UnsupportedOperation", (1, 0), "function definitions"),
    ("class A:\n    pass", "UnsupportedOperation", (1, 0), "class definitions"),
    ("for i in [1]:\n    pass", "UnsupportedOperation", (1, 0), "for loops"),
    ("while True:\n    pass", "UnsupportedOperation", (1, 0), "while loops"),
    ("if True:\n    x = 1", "UnsupportedOperation", (1, 0), "if statements"),
    ("with x:\n    pass", "UnsupportedOperation", (1, 0), "with statements"),
    ("try:\n    x = 1\nexcept Exception:\n    pass", "UnsupportedOperation", (1, 0), "try statements"),
    ("del df", "UnsupportedOperation", (1, 0), "del statements"),
    ("global x", "UnsupportedOperation", (1, 0), "global"),
    ("assert True", "UnsupportedOperation", (1, 0), "assert"),
    ("raise ValueError", "UnsupportedOperation", (1, 0), "raise"),
    ("x: int = 1", "UnsupportedOperation", (1, 0), "annotated"),
    ("1 if True else 2", "UnsupportedOperation", (1, 0), "when(...)"),
    ("{1, 2}", "UnsupportedOperation", (1, 0), "set literals"),
    ("b'bytes'", "UnsupportedOperation", (1, 0), "bytes"),
    ("1j", "UnsupportedOperation", (1, 0), "complex"),
    ("...", "UnsupportedOperation", (1, 0), "literal"),
    ("col('a') @ col('b')", "UnsupportedOperation", (1, 0), "MatMult"),
    ("col('a') << 1", "UnsupportedOperation", (1, 0), "LShift"),
    ("df.x = 1", "UnsupportedOperation", (1, 0), "assigning to attributes"),
    ("df['age']", "UnsupportedOperation", (1, 0), "col('age')"),
    ("df[0]", "UnsupportedOperation", (1, 0), "indexing a remote frame"),
    ("col('a')[0]", "UnsupportedOperation", (1, 0), "subscripts"),
    ("unknown_thing[0]", "UnsupportedOperation", (1, 0), "unknown name"),
    ("col[0]", "UnsupportedOperation", (1, 0), "subscripts"),
    ("!ls", "UnsupportedOperation", (1, 0), "shell escapes and magics"),
    ("x = 1\n!rm -rf /", "UnsupportedOperation", (2, 0), "shell escapes and magics"),
    ("%time df.fetch()", "UnsupportedOperation", (1, 0), "%time"),
    ("%%time\ndf.fetch()", "UnsupportedOperation", (1, 0), "%%time"),
    ("%%sql --verbose\nSELECT 1", "UnsupportedOperation", (1, 0), "%%sql takes no option '--verbose'; it takes --no-wait"),
    ("await x", "UnsupportedOperation", (1, 0), "await"),
    ("x = (yield)", "UnsupportedOperation", (1, 5), "yield"),
    ("1 +", "ParseError", (1, 3), "invalid syntax"),
    ("df.filter(\n  col('a') >", "ParseError", (1, 9), "never closed"),
    ("a b", "ParseError", (1, 2), "invalid syntax"),
    ("df.fetch()\nimport os", "UnsupportedOperation", (2, 0), "import"),
]


@pytest.fixture
def interp():
    interpreter = Interpreter(FakeSession())
    interpreter.run_cell('df = dataset("patients")')
    return interpreter


@pytest.mark.parametrize("code,ename,position,fragment", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(interp, code, ename, position, fragment):
    error = refusal(interp, code)
    assert error.ename == ename and error.ename in ERROR_NAMES
    assert fragment in error.evalue, error.evalue
    assert (error.details["line"], error.details["col"]) == position, error.evalue


def test_refusals_have_no_side_effects(interp):
    session = interp.session
    before = dict(interp.variables)
    for code, *_ in REFUSALS:
        with pytest.raises(BastionError):
            interp.run_cell(code)
    assert not session.fetched and not session.saved
    assert interp.variables.keys() == before.keys()


TYPOS = [
    ("df.gruop_by('sex')", "did you mean 'group_by'?"),
    ("df.filtr(col('a') > 1)", "did you mean 'filter'?"),
    ("df.with_column(col('a'))", "did you mean 'with_columns'?"),
    ("df.colums", "did you mean 'columns'?"),
    ("colm('a')", "did you mean 'col'?"),
    ("col('a').meen()", "did you mean 'mean'?"),
    ("col('a').str.contain('x')", "did you mean 'contains'?"),
    ("col('a').dt.yaer()", "did you mean 'year'?"),
    ("pl.Flot64", "did you mean 'Float64'?"),
    ("datasett('patients')", "did you mean 'dataset'?"),
    ("dff.head()", "did you mean 'df'?"),
    ("Col('a')", "did you mean 'col'?"),
    ("df.group_by('a').agg(col('b').sum()).sortt('b')", "did you mean 'sort'?"),
    ("df.group_by('a').agr(col('b').sum())", "did you mean 'agg'?"),
]


@pytest.mark.parametrize("code,suggestion", TYPOS, ids=[t[0] for t in TYPOS])
def test_typo_suggestions(interp, code, suggestion):
    error = refusal(interp, code)
    assert error.ename == "UnsupportedOperation"
    assert suggestion in error.evalue


def test_typo_points_at_the_misspelled_name(interp):
    error = refusal(interp, "x = 1\nresult = df.filter(col('age') > 1).gruop_by('sex')")
    assert error.details == {"line": 2, "col": len("result = df.filter(col('age') > 1).")}


def test_cell_size_limit(interp):
    error = refusal(interp, "x = 1\n" * (MAX_CELL_BYTES // 6 + 1))
    assert error.ename == "LimitExceeded"


def test_ast_depth_limit(interp):
    deep = "-" * (MAX_AST_DEPTH + 5) + "1"
    error = refusal(interp, deep)
    assert error.ename == "LimitExceeded"
    very_deep = "(" * 5000 + "1" + ")" * 5000
    error = refusal(interp, very_deep)
    assert error.ename in ("LimitExceeded", "ParseError")


def test_node_budget(interp):
    wide = "x = [" + ", ".join(["1"] * 30000) + "]"
    error = refusal(interp, wide)
    assert error.ename == "LimitExceeded"


def test_nul_character_is_a_parse_error(interp):
    error = refusal(interp, "x = 1\x00")
    assert error.ename == "ParseError"


def test_language_never_touches_python_attributes(interp):
    # Registered handlers are reached by name only; a name that is a Python
    # attribute of the value (not in a registry) is refused.
    for code in ("df.plan", "df.sources()", "df.summary", "col('a').nodes", "col('a').map",
                 "col('a').node", "df.group_by('a').frame", "datasets().datasets"):
        error = refusal(interp, code)
        assert error.ename == "UnsupportedOperation", code


@pytest.mark.parametrize("every,accepted", [("1mo", True), ("2w6h", True), ("999999d", True), ("0d", False),
                                            ("1000000d", False), ("1 fortnight", False), ("d", False)])
def test_intervals_follow_the_contracts_one_rule(interp, every, accepted):
    # The kernel refuses exactly the intervals the executor's validator refuses (one rule, in the contract).
    from bastion_kernel.contract import plan as P
    from owner_console import validate
    from owner_console.model import Dataset, Policy
    assert bool(P.INTERVAL.match(every)) is accepted
    cell = f'x = col("admission_date").dt.truncate("{every}")'
    if accepted:
        interp.run_cell(cell)
    else:
        with pytest.raises(BastionError) as refused:
            interp.run_cell(cell)
        assert refused.value.ename == "SchemaError"
    plan = P.frame_op("select", input=P.scan("patients"), exprs=[P.fn("dt.truncate", P.col("admission_date"),
                                                                       every=every)])
    catalog = {"patients": Dataset("patients", Path("patients.csv"), "csv", Policy())}
    if accepted:
        validate.validate(plan, catalog, dataset_columns=lambda dataset: ["admission_date"])
    else:
        with pytest.raises(BastionError) as refused:
            validate.validate(plan, catalog, dataset_columns=lambda dataset: ["admission_date"])
        assert refused.value.ename == "SchemaError"
