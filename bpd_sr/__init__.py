"""bpd-sr: 8x8 -> 32x32 face super-resolution with an Image Transformer, made fast by
blockwise parallel decoding (Stern, Shazeer and Uszkoreit, NeurIPS 2018, arXiv 1811.03115)."""

from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_K, ModelConfig, TrainConfig
from bpd_sr.decoding.consistency import back_project
from bpd_sr.decoding.loop import (
    DecodeResult,
    blockwise_parallel_decode,
    greedy_decode,
    sample_decode,
    sequential_decode,
)
from bpd_sr.decoding.rules import DEFAULT_RULE, RULES, apply_rule
from bpd_sr.model.transformer import ImageTransformer

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
