"""A static, preallocated key/value cache for the decoder's local self-attention.

As in gpt-fast's ``KVCache``: keys and values of every decoder layer are written at their
absolute positions (``input_pos``). Nothing is ever deleted. Blockwise parallel decoding
writes the keys of k proposed tokens; when some are rejected, the decoding loop simply does
not advance its pointer past them, the attention mask (key position <= query position) hides
the stale entries, and the next step overwrites them. Rollback costs nothing.

Each image of a batch owns one cache row and advances at its own pace. The storage of a
layer is one flat (B * max_len, d_model) matrix, so that writing and reading windows of
many rows at different positions is a single ``index_copy_`` / ``index_select`` (an order
of magnitude cheaper on CPU than advanced indexing of a 4-D tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionWindow:
    """Where one incremental decoder call writes and reads, shared by all layers.

    write_idx: long (b*T,) flat cache slots of the T new tokens of each of b rows.
    read_idx: long (b*L,) flat cache slots of the L keys each row's queries may see.
    mask: bool (b, 1, T, L), True where query t may attend to key l.
    """

    write_idx: torch.Tensor
    read_idx: torch.Tensor
    mask: torch.Tensor
    width: int


class KVCache:
    """Keys and values of ``n_layer`` layers, each stored as (batch * max_len, d_model)."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_len: int,
        d_model: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch * max_len, d_model)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    def window(self, rows: torch.Tensor, pos: torch.Tensor, attn_block: int) -> AttentionWindow:
        """The masked local-1D window (Parmar et al. 2018, section 3.2) of new tokens.

        rows: long (b,) cache rows; pos: long (b, T) contiguous positions of each row.
        Query q sees keys [start(q) - attn_block, q], start(q) the first position of q's block.
        """
        b, t = pos.shape
        base = (rows * self.max_len)[:, None]
        start = (pos[:, :1] // attn_block) * attn_block - attn_block  # (b, 1), may be < 0
        width = 2 * attn_block + t - 1  # covers every key of every query in the row
        key_pos = start + torch.arange(width, device=pos.device)  # (b, L)
        qp = pos[:, :, None]
        kp = key_pos[:, None, :]
        mask = (kp >= (qp // attn_block) * attn_block - attn_block) & (kp <= qp) & (kp >= 0)
        read = base + key_pos.clamp(0, self.max_len - 1)  # clamped slots are masked (kp > qp)
        return AttentionWindow((base + pos).reshape(-1), read.reshape(-1), mask[:, None], width)

    def update(
        self, layer: int, win: AttentionWindow, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, T, d) at the window's new positions; return the window's keys and
        values, each (b, L, d)."""
        b, t, d = k.shape
        ck, cv = self.k[layer], self.v[layer]
        ck.index_copy_(0, win.write_idx, k.reshape(b * t, d).to(ck.dtype))
        cv.index_copy_(0, win.write_idx, v.reshape(b * t, d).to(cv.dtype))
        kw = ck.index_select(0, win.read_idx).view(b, win.width, d)
        vw = cv.index_select(0, win.read_idx).view(b, win.width, d)
        return kw, vw
