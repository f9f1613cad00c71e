"""owner_console.dp uses OpenDP through its public API only.

OpenDP's private names (a leading underscore: ``Query._chain``,
``LazyFrameQuery._query``, ``opendp._data``...) change between releases
without notice; the DP path must not reach them.  The check reads the
package's source with :mod:`ast`: an underscore attribute is allowed only on
``self`` (the package's own objects; a frozen dataclass sets its fields with
``object.__setattr__(self, ...)``) and for a name (``type(exc).__name__``),
and nothing may go around attribute lookup (``object.__getattribute__``,
``__dict__``, ``getattr`` of an underscore name) or import a private OpenDP
module or name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "owner_console" / "dp"
LOOKUP_BUILTINS = {"getattr", "setattr", "hasattr", "delattr", "vars"}
NAME_ATTRIBUTES = {"__name__", "__qualname__"}


def _own_field_set(node: ast.AST) -> bool:
    """``object.__setattr__(self, ...)``: a frozen dataclass setting its own field."""
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        and node.func.attr == "__setattr__" and isinstance(node.func.value, ast.Name) \
        and node.func.value.id == "object" and bool(node.args) \
        and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"


def private_uses(source: str) -> list[str]:
    """Every place ``source`` reaches past a public API, as ``line: what``."""
    tree = ast.parse(source)
    allowed = {id(node.func) for node in ast.walk(tree) if _own_field_set(node)}
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and id(node) not in allowed \
                and node.attr not in NAME_ATTRIBUTES \
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in LOOKUP_BUILTINS:
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if node.func.id == "vars" or any(name.startswith("_") for name in names):
                found.append(f"{line}: {node.func.id}({', '.join(map(repr, names))})")
        elif isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "opendp" and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "opendp":
            parts = node.module.split(".") + [a.name for a in node.names]
            if any(p.startswith("_") for p in parts):
                found.append(f"{line}: from {node.module} import {', '.join(a.name for a in node.names)}")
    return found


def test_the_dp_package_uses_only_opendps_public_api():
    sources = {path.name: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.glob("*.py"))}
    assert "mechanism.py" in sources and "make_private_lazyframe" in sources["mechanism.py"]
    found = {name: uses for name, source in sources.items() if (uses := private_uses(source))}
    assert found == {}


@pytest.mark.parametrize("source", [
    'query = object.__getattribute__(opendp_query, "_query")',
    "input_domain, input_metric = query._chain",
    "d_in, d_out = query._d_in, query._d_out",
    "table = query._context(measurement).collect()",
    'd_out = getattr(query, "_d_out")',
    "fields = vars(query)",
    "from opendp.domains import _lazyframe_from_domain",
    "from opendp._data import onceframe_collect",
    "import opendp._lib",
    'object.__setattr__(query, "_d_out", 1.0)',
    "query.__dict__",
])
def test_the_check_finds_each_way_of_reaching_a_private_name(source):
    assert private_uses(source) != []


def test_the_check_allows_the_public_calls_and_the_packages_own_privates():
    source = ("context = dp.Context.compositor(data=data, privacy_unit=unit, privacy_loss=loss)\n"
              "plan = context.query(epsilon=1.0).select(exprs).polars_plan\n"
              "m = dp.m.make_private_lazyframe(context.accountant.input_domain, metric, measure, plan, 1.0)\n"
              "conn = self._connect()\n"
              "object.__setattr__(self, 'epsilon', 1.0)\n"
              "name = type(exc).__name__\n"
              "from opendp.extras.polars import Margin\n")
    assert private_uses(source) == []
