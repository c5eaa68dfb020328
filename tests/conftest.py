"""Shared fixtures: tiny models and synthetic low-res inputs (no shared data needed).

Parity tests run in float64: exact acceptance equals greedy decoding as an algorithm, and
float64 keeps argmax near-ties (which float32 breaks differently for different matrix
shapes) out of the way, so a failure means a bug, not rounding.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest
import torch

from bpd_sr import ImageTransformer, ModelConfig


def pytest_configure(config):
    """One thread per test process. The suite runs on two pytest-xdist workers (pyproject's
    addopts), one per core of the 2-core machines it is timed on; two processes with two
    threads each on two cores ran 35x slower there. The tests' subprocesses (training runs,
    torchrun, the GPU script) inherit OMP_NUM_THREADS=1."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


# The files that take most of the run, longest first. pytest-xdist (--dist loadfile) hands a
# worker the next file in collection order when its current one is nearly done; a long file
# collected last (alphabetically, test_train.py) would leave the other worker idle at the end.
LONGEST_FIRST = ("test_cli.py", "test_train.py", "test_decoding.py",
                 "accepted_block_heatmaps.ipynb", "test_headfit.py", "test_sampling.py")


def pytest_collection_modifyitems(items):
    """Collect the longest files first (a stable sort: each file keeps its own order)."""
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def tiny_model(k: int = 4, seed: int = 0, dtype=torch.float64, **overrides) -> ImageTransformer:
    torch.manual_seed(seed)
    model = ImageTransformer(ModelConfig.preset("tiny", k=k, **overrides)).to(dtype).eval()
    # random init leaves logits nearly flat; sharpen them so decodes are not all one value
    with torch.no_grad():
        model.out_proj.weight.mul_(20.0)
        # new heads start as the identity (all slots repeat the base); parity tests want
        # heads that propose something else, as trained heads do
        if model.heads.n_ff_slots:
            torch.nn.init.normal_(model.heads.proj.weight, std=0.02)
    return model


def random_lr(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 8, 8, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """k="auto" keeps what it measured in the user's cache folder: never the real one here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture
def model4() -> ImageTransformer:
    return tiny_model(k=4)


class WriteWatcher:
    """Watches the file system during a test: which visible paths were opened for writing
    directly, and which arrived by ``os.replace`` (PIL, torch.save, numpy, matplotlib and
    json all write through builtins.open or os.open). ``check(folder)``: every file under
    folder arrived by os.replace of a hidden temporary file, and none was written in place."""

    def __init__(self, monkeypatch):
        self.direct: list[str] = []
        self.replaced: set[str] = set()
        real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

        def watch(path):  # a visible file (a folder is opened only to probe that it is writable)
            if isinstance(path, (str, os.PathLike)) and not (
                    os.path.basename(path).startswith(".") or os.path.isdir(path)):
                self.direct.append(os.path.abspath(path))

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                watch(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                watch(path)
            return real_os_open(path, flags, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            self.replaced.add(os.path.abspath(dst))
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "replace", replace)

    def check(self, *paths: Path) -> None:
        """Each path: a file, or a folder standing for every file under it."""
        files = set()
        for p in map(Path, paths):
            files |= {str(f.absolute()) for f in p.rglob("*") if f.is_file()} if p.is_dir() \
                else {str(p.absolute())}
        assert files and all(os.path.isfile(f) for f in files), files
        direct = [p for p in self.direct if p in files]
        assert not direct, f"opened for writing in place: {direct}"
        assert files <= self.replaced, f"not written by os.replace: {files - self.replaced}"


@pytest.fixture
def write_watcher(monkeypatch) -> WriteWatcher:
    return WriteWatcher(monkeypatch)
