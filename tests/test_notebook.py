"""The notebook is committed with its outputs (a reader sees the figures on the repository
page) and is the one make_notebook.py builds; CI runs it again under nbmake."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "accepted_block_heatmaps.ipynb"


def _builder():
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "notebooks" / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_notebook_is_the_one_the_script_builds():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    built = _builder().build()
    assert [c.source for c in committed.cells] == [c.source for c in built.cells]


def test_the_committed_notebook_has_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run it: python notebooks/make_notebook.py --execute"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # comparison, heatmaps, histogram, block size against k, samples
    printed = "".join(o.get("text", "") for o in outputs)
    assert "exact blockwise == sequential" in printed


def test_the_notebook_asserts_what_it_shows():
    """The notebook does not only print that exact blockwise decoding equals sequential
    decoding: it asserts it (nbmake runs it in CI), on the tokens of both decodes."""
    import ast

    source = "\n".join(c.source for c in _builder().build().cells if c.cell_type == "code")
    tree = ast.parse(source)
    checks = [n.test for n in ast.walk(tree) if isinstance(n, ast.Assert)
              and isinstance(n.test, ast.Call) and ast.unparse(n.test.func) == "torch.equal"]
    compared = {ast.unparse(a) for c in checks for a in c.args}
    assert {"seq_tokens", "blk_tokens"} <= compared
    made = {ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign)
            for t in n.targets if "seq_tokens" in ast.unparse(t)}
    assert made, "seq_tokens and blk_tokens are assigned from the decodes"
