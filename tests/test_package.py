"""The package as a whole: one-way dependencies, no dead code, declared dependencies."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "bpd_sr").rglob("*.py"))
PACKAGE = ROOT / "bpd_sr"


def _is_command_line(path: Path) -> bool:
    """bpd_sr/cli/ and __main__.py: the only modules that may know about click."""
    return path.name == "__main__.py" or "cli" in path.relative_to(PACKAGE).parts[:-1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _bpd_imports(path: Path) -> set[str]:
    """The bpd_sr modules a module imports anywhere in it (functions included), as dotted
    names; ``from bpd_sr.x import y`` counts y when bpd_sr.x.y is a module."""
    modules = {_module_name(p) for p in LIBRARY}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


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
    """cli imports the library, never the other way round: `python -m bpd_sr.training.train` used to
    import cli, which imported train again, and the library needed click through it."""
    for path in LIBRARY:
        if _is_command_line(path):
            continue
        bad = (_imports(path) & {"click"}) | {m for m in _bpd_imports(path)
                                              if m.startswith(("bpd_sr.cli", "bpd_sr.__main__"))}
        assert not bad, f"{path.name} imports {bad}"


def test_no_import_cycles():
    """Module A imports B (anywhere in it, lazily too) and B imports A, or a longer loop: a
    cycle hides which layer depends on which. Package __init__ files that only re-export are
    followed like any module."""
    graph = {_module_name(p): _bpd_imports(p) - {_module_name(p)} for p in LIBRARY}
    # a module imports its package's __init__ implicitly; that is not a dependency of its own
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_package_shows_its_layers():
    """Subpackages, each with one job, and no module over 400 lines."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"model", "decoding", "training", "io", "evaluation", "cli"} <= subpackages
    long = {str(p.relative_to(PACKAGE)): n for p in LIBRARY
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"


def test_no_function_over_60_lines():
    """A function that does not fit on a screen does more than one thing (docstring included)."""
    long = {}
    for p in LIBRARY:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > 60:
                    long[f"{p.relative_to(PACKAGE)}:{node.name}"] = n
    assert not long, f"functions over 60 lines: {long}"


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


def _exported(path: Path) -> set[str]:
    """The names a module lists in ``__all__`` (its public API)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return set()


def _unused(paths: list[Path], refs: dict[Path, set[str]], text: str) -> list[str]:
    """Top-level definitions of ``paths`` that nothing reads: not their own module outside
    the definition itself, not another module, and (for names in an ``__all__``) not the
    user-facing text."""
    public = set().union(*(_exported(p) for p in paths))
    unused = []
    for path in paths:
        tree = ast.parse(path.read_text())
        for name, node in _definitions(path):
            if name.startswith("__") or any(
                    "command" in ast.unparse(d) for d in getattr(node, "decorator_list", [])):
                continue
            own = any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
                      and not node.lineno <= n.lineno <= node.end_lineno for n in ast.walk(tree))
            others = any(name in names for p, names in refs.items() if p != path)
            documented = name in public and re.search(rf"\b{re.escape(name)}\b", text)
            if not (own or others or documented):
                unused.append(f"{path.name}:{name}")
    return unused


def test_every_definition_is_used():
    """No dead code: every top-level definition of the library is read by the library
    itself, or is public API the notebook or the README uses (tests alone do not count:
    they would keep dead code alive). Click commands count as used: their decorator
    registers them."""
    refs, text = _referenced_names()
    unused = _unused(LIBRARY, refs, text)
    assert not unused, f"defined but never used: {unused}"


def test_the_dead_code_check_finds_dead_code(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("__all__ = ['shown']\n\ndef used():\n    return 1\n\n"
                      "def dead(n):\n    return dead(n - 1) if n else used()\n\n"
                      "def shown():\n    pass\n\ndef hidden():\n    pass\n\nX = used()\n")
    text = "shown() and hidden() in the README"
    assert _unused([module], {module: set()}, text) == ["m.py:dead", "m.py:hidden", "m.py:X"]


def test_one_atomic_writer():
    """Every file is written by bpd_sr.io.atomic: no module renames temporary files itself."""
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


def test_the_command_line_starts_without_torch():
    # `bpd-sr --help` and the option checks run before any model is needed: importing torch
    # (seconds) is left to the commands that decode or train, and the package's torch API
    # is imported on first use
    import subprocess

    code = ("import sys, bpd_sr, bpd_sr.cli; assert 'torch' not in sys.modules, 'torch'; "
            "from bpd_sr import blockwise_parallel_decode, ImageTransformer; "
            "assert 'torch' in sys.modules; print(blockwise_parallel_decode.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "blockwise_parallel_decode"
    import bpd_sr

    assert set(bpd_sr.__all__) <= set(dir(bpd_sr))
    with pytest.raises(AttributeError):
        bpd_sr.no_such_name  # noqa: B018
