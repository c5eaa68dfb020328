"""Back-projection: make a decoded image agree with its input (Irani and Peleg 1991).

The 8x8 input is the 4x4 area mean of the 32x32 truth (``bpd_sr.model.tokens.downsample``),
so the truth lies in the set of images whose block means equal the input. That set is affine
and holds the truth; the orthogonal projection onto it (adding each block's shortfall
``input - block mean`` to every pixel of the block) therefore brings any image nearer to the
truth, never further, whatever the image was: a decode can only gain from it. Clipping to
0 .. 255 (a projection onto a box that also holds the truth) and rounding to levels come
after; the input's own rounding (to half a level) is the only slack.

A post-step of the package's outputs (``bpd-sr upscale``, ``bpd-sr evaluate``), not part of
blockwise decoding: the decoding functions return the model's own decode, untouched, so that
their parity with sequential decoding stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpd_sr.config import SCALE
from bpd_sr.model.tokens import levels_to_image


def back_project(images: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """images uint8 (B, 32, 32, 3), lr uint8 (B, 8, 8, 3) their inputs -> uint8 (B, 32, 32,
    3): each 4x4 block moved by one constant so that its mean is its input pixel, then
    clipped and rounded (module docstring)."""
    return levels_to_image(block_shift(images.permute(0, 3, 1, 2).double(), lr))


def block_shift(x: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """The projection before clipping and rounding, differentiable: x float (B, 3, 32, 32)
    in levels, lr uint8 (B, 8, 8, 3) -> (B, 3, 32, 32) in x's dtype, each 4x4 block moved
    by its shortfall input - block mean (what ``fit-cond --back-projected`` trains through)."""
    shortfall = lr.permute(0, 3, 1, 2).to(x.dtype) - F.avg_pool2d(x, SCALE)  # (B, 3, 8, 8)
    return x + shortfall.repeat_interleave(SCALE, 2).repeat_interleave(SCALE, 3)


__all__ = ["back_project", "block_shift"]
