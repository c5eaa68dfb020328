"""Sequence-level distillation targets (Kim and Rush 2016; Stern et al. 2018, section 6): the
base model's own sequential decodes of the training inputs, made once and cached on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bpd_sr.config import DEFAULT_RULE
from bpd_sr.io.data import write_npz_atomic
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import ImageTransformer


# ---- distillation targets -------------------------------------------------------------
def distill_targets(
    base: ImageTransformer, images: torch.Tensor, cache_path: Path, batch_size: int = 64,
    progress: bool = True, rule: str = DEFAULT_RULE,
) -> torch.Tensor:
    """The base model's sequential decodes (under ``rule``) of every training input, uint8
    (N, 32, 32, 3), made once and cached (atomically) at cache_path.

    Decoding is slow on a CPU, so the decodes made so far are saved after every batch
    (``<cache>.partial.npz``, atomically) and a killed run continues where it stopped.
    """
    from bpd_sr.decoding.loop import sequential_decode

    def load(path: Path) -> torch.Tensor | None:
        """Cached decodes made with this rule (older caches without one were argmax)."""
        with np.load(path) as f:
            made_with = str(f["rule"]) if "rule" in f else "argmax"
            return torch.as_tensor(f["images"]) if made_with == rule else None

    if cache_path.exists():
        cached = load(cache_path)
        if cached is not None and cached.shape == images.shape:
            return cached
    partial = cache_path.with_name(cache_path.name + ".partial.npz")
    done: list[torch.Tensor] = []
    if partial.exists():
        saved = load(partial)
        if saved is not None and len(saved) <= len(images):
            done = [saved]
    start = sum(len(d) for d in done)
    base.eval()
    lr_all = downsample(images)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    for s in tqdm(range(start, len(images), batch_size), desc="distillation decodes",
                  disable=not progress, initial=start // batch_size,
                  total=-(-len(images) // batch_size)):
        done.append(sequential_decode(base, lr_all[s : s + batch_size], rule=rule).images)
        write_npz_atomic(partial, images=torch.cat(done).numpy(), rule=np.array(rule))
    decoded = torch.cat(done) if done else images[:0].clone()
    write_npz_atomic(cache_path, images=decoded.numpy(), rule=np.array(rule))
    partial.unlink(missing_ok=True)
    return decoded
