"""Every relative link in the docs points at something that exists.

The threat model names, for each mitigation, the test that proves it, as a
relative link ``../tests/test_x.py::test_name``.  This test parses the
markdown links of ``docs/*.md`` and ``README.md``: each relative target file
must exist, and each ``::name`` must be a function (or class) defined at the
top level of that Python file, so a renamed or deleted test breaks the build
instead of leaving a claim without proof.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
# [text](target): the target up to the closing parenthesis, without spaces.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def relative_links(document: Path) -> list[str]:
    text = document.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold examples, not links
    return [target for target in LINK.findall(text) if not target.startswith(EXTERNAL)]


def defined_names(python_file: Path) -> set[str]:
    tree = ast.parse(python_file.read_text(encoding="utf-8"), str(python_file))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def broken_links(document: Path) -> list[str]:
    broken = []
    for target in relative_links(document):
        path_part, _, test_name = target.partition("::")
        path_part = path_part.split("#", 1)[0]
        resolved = (document.parent / path_part).resolve()
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
            continue
        if test_name:
            name = test_name.split("[", 1)[0]  # a parametrized id names the same function
            if resolved.suffix != ".py" or name not in defined_names(resolved):
                broken.append(f"{target}: {resolved.name} defines no {name!r}")
    return broken


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if d.exists()], ids=lambda d: d.name)
def test_relative_links_in_docs_resolve(document):
    assert broken_links(document) == []


def test_the_threat_model_links_a_test_to_every_mitigation():
    links = relative_links(REPO / "docs" / "threat-model.md")
    tests = [link for link in links if "::test_" in link]
    assert len(tests) >= 20, tests
    assert {link.partition("::")[0] for link in tests} >= {"../tests/test_threat_mitigations.py",
                                                           "../tests/test_fuzz_wire.py",
                                                           "../tests/test_load.py"}


def test_a_broken_link_is_caught(tmp_path):
    # The checker itself can fail: a missing file and a missing test name are both reported.
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_here():\n    pass\n")
    doc = tmp_path / "docs.md"
    doc.write_text("[ok](tests/test_a.py::test_here) [gone](tests/test_b.py) [renamed](tests/test_a.py::test_gone)\n"
                   "```\n[example](not/checked.py)\n```\n[web](https://example.org)\n")
    assert [b.split(":")[0] for b in broken_links(doc)] == ["tests/test_b.py", "tests/test_a.py"]
