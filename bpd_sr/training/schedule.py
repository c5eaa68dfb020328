"""The one learning-rate schedule of every training command: a linear warm-up, then a cosine
from the peak down to a floor (a fraction of the peak)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, progress: float, floor: float) -> float:
    """The multiplier of the peak learning rate at ``step``: (step + 1) / warmup_steps during
    the warm-up, then floor + (1 - floor) * (1 + cos(pi * progress)) / 2, where progress runs
    from 0 (the end of the warm-up) to 1 (the end of the run) and is clipped to [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(1.0, max(0.0, progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def step_progress(step: int, warmup_steps: int, steps: int) -> float:
    """How far a run of ``steps`` steps is past its warm-up: 0 .. 1."""
    return (step - warmup_steps) / max(1, steps - warmup_steps)


__all__ = ["step_progress", "warmup_cosine"]
