"""The package as a whole: one-way dependencies, no dead code, declared dependencies."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "bpd_sr").glob("*.py"))
COMMAND_LINE = {"cli.py", "__main__.py"}  # the only modules that may know about click


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports ("." prefix for relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("." + (node.module or "").split(".")[0])
            else:
                found.add(node.module.split(".")[0])
    return found


def test_the_library_never_imports_the_command_line():
    """cli imports the library, never the other way round: `python -m bpd_sr.train` used to
    import cli, which imported train again, and the library needed click through it."""
    for path in LIBRARY:
        if path.name in COMMAND_LINE:
            continue
        bad = _imports(path) & {"click", ".cli", ".__main__"}
        assert not bad, f"{path.name} imports {bad}"


def _referenced_names() -> tuple[dict[Path, set[str]], str]:
    """Names each library module reads (Name and Attribute nodes, not its imports), and the
    text of the notebook and the README, where the public API is used."""
    refs = {}
    for path in LIBRARY:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
        refs[path] = names
    text = (ROOT / "notebooks" / "make_notebook.py").read_text() + (ROOT / "README.md").read_text()
    return refs, text


def _definitions(path: Path):
    """(name, node) of every top-level function, class and constant of a module."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name, node
        elif isinstance(node, ast.Assign):
            yield from ((t.id, node) for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node


def test_every_definition_is_used():
    """No dead code: every top-level definition of the library is read by the library
    itself, the notebook or the README (tests alone do not count: they would keep dead code
    alive). Click commands count as used: their decorator registers them."""
    refs, text = _referenced_names()
    unused = []
    for path in LIBRARY:
        for name, node in _definitions(path):
            if name.startswith("__") or any(
                    "command" in ast.unparse(d) for d in getattr(node, "decorator_list", [])):
                continue
            # its own module: any reference beyond the definition itself
            own = sum(1 for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load))
            others = any(name in names for p, names in refs.items() if p != path)
            if not (own or others or re.search(rf"\b{re.escape(name)}\b", text)):
                unused.append(f"{path.name}:{name}")
    assert not unused, f"defined but never used: {unused}"


def test_one_atomic_writer():
    """Every file is written by bpd_sr.atomic: no module renames temporary files itself."""
    for path in LIBRARY:
        if path.name == "atomic.py":
            continue
        text = path.read_text()
        for call in ("os.replace(", "mkstemp(", ".write_text(", ".write_bytes(", "savefig(path"):
            assert call not in text, f"{path.name} writes with {call}"


def test_the_project_stands_alone():
    """The code cites docs/ in this repository, never a guide that is not in it, and every
    docs/ file it cites exists."""
    texts = [*LIBRARY, *ROOT.glob("tests/*.py"), ROOT / "notebooks" / "make_notebook.py",
             ROOT / "README.md"]
    guide = "GUI" + "DE"  # spelt apart, so that this file does not cite it either
    for path in texts:
        text = path.read_text()
        assert guide not in text, f"{path.name} cites a design guide outside the repository"
        for cited in re.findall(r"docs/[\w./-]+\.md", text):
            assert (ROOT / cited).is_file(), f"{path.name} cites {cited}, which is missing"


# pip name -> import name, where they differ
_IMPORT_NAME = {"pillow": "PIL", "scikit-image": "skimage"}


def _declared() -> tuple[set[str], set[str]]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        out = set()
        for r in reqs:
            pip = re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
            out.add(_IMPORT_NAME.get(pip, pip))
        return out

    return names(project["dependencies"]), names(project["optional-dependencies"]["dev"])


def _third_party(paths) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for p in paths:
        found |= {m for m in _imports(p) if not m.startswith(".") and m not in stdlib}
    return found - {"bpd_sr", "tests"}


def test_dependencies_are_declared_and_used():
    core, dev = _declared()
    used_by_library = _third_party(LIBRARY)
    used_by_tests = _third_party([*ROOT.glob("tests/*.py"), ROOT / "notebooks" / "make_notebook.py"])
    assert used_by_library <= core, f"imported but not declared: {used_by_library - core}"
    assert core <= used_by_library, f"declared but never imported: {core - used_by_library}"
    tools = {"pytest", "ruff", "nbmake", "ipykernel", "pytest-xdist"}  # run, not imported
    assert used_by_tests <= core | dev, f"tests import undeclared {used_by_tests - core - dev}"
    assert dev - tools <= used_by_tests, f"dev extra never used: {dev - tools - used_by_tests}"
