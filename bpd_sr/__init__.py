"""bpd-sr: 8x8 -> 32x32 face super-resolution with an Image Transformer, made fast by
blockwise parallel decoding (Stern, Shazeer and Uszkoreit, NeurIPS 2018, arXiv 1811.03115)."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# The same image whatever the thread count (README, "The same image every time"): Intel MKL's
# small matrix products (a verify step's few rows) split their sums by thread count unless its
# strict conditional-numerical-reproducibility mode is on. MKL reads this on its first call,
# so it is set before any; a value the user set is kept. No effect where MKL is not used.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE, RULES, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from bpd_sr.decoding.consistency import back_project
    from bpd_sr.decoding.loop import (
        DecodeResult,
        blockwise_parallel_decode,
        greedy_decode,
        sample_decode,
        sequential_decode,
    )
    from bpd_sr.decoding.rules import apply_rule
    from bpd_sr.model.transformer import ImageTransformer

# The API that needs torch, imported on first use: `bpd-sr --help` and the command line's
# option checks then start without loading torch (PEP 562).
_LAZY = {
    "back_project": "bpd_sr.decoding.consistency",
    "DecodeResult": "bpd_sr.decoding.loop",
    "blockwise_parallel_decode": "bpd_sr.decoding.loop",
    "greedy_decode": "bpd_sr.decoding.loop",
    "sample_decode": "bpd_sr.decoding.loop",
    "sequential_decode": "bpd_sr.decoding.loop",
    "apply_rule": "bpd_sr.decoding.rules",
    "ImageTransformer": "bpd_sr.model.transformer",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'bpd_sr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_K",
    "DEFAULT_RULE",
    "DecodeResult",
    "ImageTransformer",
    "ModelConfig",
    "RULES",
    "TrainConfig",
    "apply_rule",
    "back_project",
    "blockwise_parallel_decode",
    "greedy_decode",
    "load_pretrained",
    "sample_decode",
    "sequential_decode",
]


def load_pretrained(*args, **kwargs):
    """The shipped default model (see ``bpd_sr.io.pretrained.load_pretrained``)."""
    from bpd_sr.io.pretrained import load_pretrained as _load

    return _load(*args, **kwargs)
