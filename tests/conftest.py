"""Shared fixtures: tiny models and synthetic low-res inputs (no shared data needed).

Parity tests run in float64: exact acceptance equals greedy decoding as an algorithm, and
float64 keeps argmax near-ties (which float32 breaks differently for different matrix
shapes) out of the way, so a failure means a bug, not rounding.
"""

from __future__ import annotations

import os

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
