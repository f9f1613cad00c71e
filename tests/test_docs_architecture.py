"""docs/architecture.md names only modules that exist, and names every module there is.

The module map is the fenced ``tree`` blocks of the document: one entry per
line, indented two spaces per level, a folder ending in ``/``, a module in
``.py``, then its one job.  Prose may name modules as paths (``a/b.py``) or
dotted names (``owner_console.engine.cache``, ``engine.STREAM_EVERY_QUERY``
relative to a package); each must resolve to a file, or to a name defined at
the top level of one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("bastion_kernel", "owner_console")
TREE_BLOCK = re.compile(r"```tree\n(.*?)```", re.S)
ENTRY = re.compile(r"^( *)(\S+)")


def tree_paths(text: str) -> list[str]:
    """Every folder and module of the ``tree`` blocks, as paths from the repository root."""
    paths = []
    for block in TREE_BLOCK.findall(text):
        stack: list[tuple[int, str]] = []
        for line in block.splitlines():
            if not line.strip():
                continue
            indent, name = ENTRY.match(line).groups()
            depth = len(indent) // 2
            stack = stack[:depth]
            stack.append((depth, name))
            paths.append("".join(part for _, part in stack))
    return paths


def modules_on_disk() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                found.add(path.relative_to(REPO).as_posix())
    return found


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def resolves(dotted: str) -> bool:
    """``pkg.mod.NAME``, or a name relative to one of the packages (``engine.cache``)."""
    for prefix in ("", *(p + "." for p in PACKAGES)):
        parts = (prefix + dotted).split(".")
        for cut in range(len(parts), 0, -1):
            base = REPO.joinpath(*parts[:cut])
            module = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
            if not module.exists():
                continue
            rest = parts[cut:]
            if not rest or rest[0] in top_level_names(module):
                return True
            break
    return False


def names_a_module(first: str) -> bool:
    """True for a package name, or a module or subpackage of one (``workers``, ``engine``)."""
    if first in PACKAGES:
        return True
    return any((REPO / p / f"{first}.py").exists() or (REPO / p / first).is_dir() for p in PACKAGES)


def test_the_module_map_names_only_modules_that_exist():
    paths = tree_paths(DOC.read_text(encoding="utf-8"))
    assert paths, "docs/architecture.md has no tree block"
    assert [p for p in paths if not (REPO / p).exists()] == []


def test_the_module_map_names_every_module():
    named = set(tree_paths(DOC.read_text(encoding="utf-8")))
    assert sorted(modules_on_disk() - named) == []


def test_every_module_named_in_the_prose_exists():
    text = TREE_BLOCK.sub("", DOC.read_text(encoding="utf-8"))
    spans = re.findall(r"`([^`\s]+)`", text)
    missing = [s for s in spans if s.endswith(".py") and "/" in s and not (REPO / s).exists()]
    dotted = [s for s in spans if re.fullmatch(r"\w+(?:\.\w+)+", s) and names_a_module(s.split(".")[0])]
    missing += [s for s in dotted if not resolves(s)]
    assert missing == []
