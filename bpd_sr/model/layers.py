"""The Image Transformer's layers (Parmar et al. 2018): attention (global, cross, masked
local 1D), the encoder and decoder layers, and the proposal heads of blockwise parallel
decoding (Stern et al. 2018, section 6)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from bpd_sr.config import ModelConfig
from bpd_sr.model.cache import AttentionWindow, FlatKVCache


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d_ff)
        self.proj = nn.Linear(d_ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.relu(self.fc(x))))


class GlobalSelfAttention(nn.Module):
    """Unmasked self-attention (the encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3)
        q, k, v = qkv.unbind(2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """Decoder queries attend to the whole encoder memory (keys/values computed once)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 192, d) -> keys, values, each (B, n_head, 192, head_dim)."""
        b, s, d = memory.shape
        kv = self.kv(memory).view(b, s, 2, self.n_head, d // self.n_head).transpose(1, 3)
        k, v = kv.unbind(2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, kv[0], kv[1], dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


@functools.lru_cache(maxsize=16)
def local_block_mask(attn_block: int, n_blocks: int, device=None) -> torch.Tensor:
    """bool (1, n_blocks, attn_block, 2*attn_block): query i of block j may see key l of
    [block j-1 | block j]: all of the previous block (none for j = 0), its own up to itself.

    Made once per shape and device (cached): the full pass used to rebuild it every call.
    Four dimensions, because the CPU's fused (flash) attention takes a 4-D mask and falls
    back to the unfused math path for a 3-D one (twice the time, forward and backward)."""
    i = torch.arange(attn_block, device=device)[:, None]
    m = torch.arange(2 * attn_block, device=device)[None, :]
    mask = (m <= i + attn_block).expand(n_blocks, attn_block, 2 * attn_block).clone()
    mask[0, :, :attn_block] = False
    return mask[None]


class LocalSelfAttention(nn.Module):
    """Masked local-1D self-attention (Parmar et al. 2018, section 3.2).

    The key set of query position q is [start(q) - attn_block, q], where start(q) is the first
    position of q's block. The full pass computes it block by block; the cached pass reads the
    same window from the cache (``KVCache.window``), so both compute the same function.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.block = cfg.attn_block
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cache: FlatKVCache | None = None,
        layer: int = 0,
        win: AttentionWindow | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d). Without a cache, x holds positions 0..T-1 (T a multiple of the block);
        with one, ``win`` says where the new tokens go and which keys they see."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)  # (B,T,H,hd)
        y = self._full(q, k, v) if cache is None else self._cached(q, k, v, cache, layer, win)
        return self.proj(y.reshape(b, t, d))

    def _full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, h, hd = q.shape
        blk = self.block
        nb = t // blk

        # 4-D (B*H, nb, blk, hd) so that fused attention kernels apply (CPU and CUDA)
        def blocks(x):  # (B, T, H, hd) -> (B*H, nb, blk, hd)
            return x.transpose(1, 2).reshape(b * h, nb, blk, hd)

        def with_previous(x):  # -> (B*H, nb, 2*blk, hd): keys of [previous block | own block]
            return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2)

        y = F.scaled_dot_product_attention(
            blocks(q), with_previous(blocks(k)), with_previous(blocks(v)),
            attn_mask=local_block_mask(blk, nb, q.device),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return y.reshape(b, h, t, hd).transpose(1, 2)  # (B, T, H, hd)

    def _cached(self, q, k, v, cache: FlatKVCache, layer: int, win: AttentionWindow) -> torch.Tensor:
        b, t, h, hd = q.shape
        kw, vw = cache.update(layer, win, k.reshape(b, t, h * hd), v.reshape(b, t, h * hd))
        kw = kw.view(b, win.width, h, hd).transpose(1, 2)  # (b, H, L, hd)
        vw = vw.view(b, win.width, h, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kw, vw, attn_mask=win.mask)
        return y.transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = GlobalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = LocalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = CrossAttention(cfg)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cross_kv, cache=None, layer=0, win=None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), cache, layer, win))
        x = x + self.drop(self.cross_attn(self.ln2(x), cross_kv))
        return x + self.mlp(self.ln3(x))


class ProposalHeads(nn.Module):
    """Stern et al. 2018, section 6: h (..., d) -> per-slot hidden states (..., n_slots, d).

    One feed-forward layer, hidden n_ff*head_d_ff, output n_ff*d_model, plus a residual from h
    into every slot. With ``identity_first_slot`` slot 0 is h itself (n_ff = k - 1).
    The output layer starts at zero (``reset_parameters``), so new heads start as the
    identity: every slot repeats the base model's prediction until training moves it
    (Medusa initialises its heads the same way), instead of random proposals that a frozen
    or warm-started base would first have to unlearn.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.identity_first_slot = cfg.identity_first_slot
        self.n_ff_slots = cfg.k - 1 if cfg.identity_first_slot else cfg.k
        if self.n_ff_slots > 0:
            self.fc = nn.Linear(cfg.d_model, self.n_ff_slots * cfg.head_d_ff)
            self.proj = nn.Linear(self.n_ff_slots * cfg.head_d_ff, self.n_ff_slots * cfg.d_model)

    def reset_parameters(self) -> None:
        """Zero the output layer: each slot's hidden state is then h, the identity."""
        if self.n_ff_slots > 0:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, n_slots: int) -> torch.Tensor:
        if self.identity_first_slot and n_slots == 1:
            return h.unsqueeze(-2)
        ff = self.proj(F.relu(self.fc(h))).unflatten(-1, (self.n_ff_slots, h.shape[-1]))
        slots = h.unsqueeze(-2) + ff
        if self.identity_first_slot:
            slots = torch.cat([h.unsqueeze(-2), slots], dim=-2)
        return slots[..., :n_slots, :]
