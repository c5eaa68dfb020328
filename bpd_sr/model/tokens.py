"""Images <-> token sequences (docs/method.md, "Tokens").

A 32x32x3 image is 3072 tokens in raster order: row, then column, then R, G, B. Each token
is a channel intensity 0..255. The 8x8x3 input is 192 tokens in the same order.

The decoder reads, at target position p, the token *before* p (``shift_right``), so its output
at p predicts token p: position 0 reads a start token ``BOS``.
"""

from __future__ import annotations

import torch

from bpd_sr.config import CHANNELS, HR_SIZE, LR_SIZE, N_HR_TOKENS, N_INTENSITIES, SCALE

# The decoder's input vocabulary: intensity v of channel c is c*256 + v; BOS follows them.
BOS = CHANNELS * N_INTENSITIES  # 768


def image_to_tokens(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> long (B, H*W*3) in raster order."""
    return images.reshape(images.shape[0], -1).long()


def tokens_to_image(tokens: torch.Tensor, size: int = HR_SIZE) -> torch.Tensor:
    """long (B, size*size*3) -> uint8 (B, size, size, 3)."""
    return tokens.reshape(tokens.shape[0], size, size, CHANNELS).to(torch.uint8)


def levels_to_image(levels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) intensities in levels, any range -> uint8 (B, H, W, 3) on the CPU,
    clipped to 0 .. 255 and rounded."""
    return levels.cpu().clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def downsample(hr: torch.Tensor) -> torch.Tensor:
    """The model's input: the 4x4 area mean of a 32x32 image, rounded half up.

    uint8 (B, 32, 32, 3) -> uint8 (B, 8, 8, 3).
    """
    b = hr.shape[0]
    blocks = hr.reshape(b, LR_SIZE, SCALE, LR_SIZE, SCALE, CHANNELS).to(torch.int32)
    total = blocks.sum(dim=(2, 4))
    n = SCALE * SCALE
    return ((total + n // 2) // n).to(torch.uint8)


def channel_offset(tokens: torch.Tensor) -> torch.Tensor:
    """Give each intensity its channel's own embedding row: c*256 + v.

    tokens: long (..., T) of intensities at positions 0..T-1 (raster order, so position p
    is of channel p % 3).
    """
    pos = torch.arange(tokens.shape[-1], device=tokens.device)
    return tokens + (pos % CHANNELS) * N_INTENSITIES


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: (B, T) targets -> (B, T) channel-offset inputs.

    Input at position p is target p-1 (with its channel's offset); position 0 reads BOS.
    """
    prev = channel_offset(targets[:, :-1])
    bos = torch.full_like(targets[:, :1], BOS)
    return torch.cat([bos, prev], dim=1)


def previous_token_inputs(prev_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for incremental decoding.

    prev_tokens: long (B, T), the intensity of target p-1 for each position p in positions
    (ignored where p == 0); positions: long (B, T). Returns long (B, T) vocabulary ids.
    """
    ids = prev_tokens + ((positions - 1) % CHANNELS) * N_INTENSITIES
    return torch.where(positions == 0, torch.full_like(ids, BOS), ids)


def hr_position_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of the 3072 target positions: its row, column, channel, and the index of the
    low-res token (in the 192-token input) that it lies under. Each long (3072,)."""
    p = torch.arange(N_HR_TOKENS)
    chan = p % CHANNELS
    col = (p // CHANNELS) % HR_SIZE
    row = p // (CHANNELS * HR_SIZE)
    lr_index = ((row // SCALE) * LR_SIZE + col // SCALE) * CHANNELS + chan
    return row, col, chan, lr_index
