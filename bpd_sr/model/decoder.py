"""The decoder's layers as one function: the only implementation of the decoder.

Every pass of the decoder runs ``decoder_layers``: the teacher-forced training pass (all
positions at once, ``local_attention``), every incremental decoding step on the key/value
cache (``bpd_sr.decoding.session``) and the compiled step (``bpd_sr.decoding.compiled``).
They differ only in how a layer's self-attention finds its keys and values, which each
passes in as ``self_attention``. The weights are read from the parameters as plain tuples
(``DecoderWeights``): at batch 1 a decoding step is mostly per-operation overhead, and
``nn.Module.__call__`` per layer and sublayer would be a large share of it.

Layer structure (Parmar et al. 2018, arXiv 1802.05751, section 3; pre-norm): x + masked
local self-attention(ln1 x), + attention to the encoder memory(ln2 x), + MLP(ln3 x); a final
layer norm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

# self_attention(layer, q, kv) -> y: q (b, H, T, hd) the new tokens' queries, kv (2, b, H, T, hd)
# their keys and values; y (b, H, T, hd)
SelfAttention = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class LayerWeights(NamedTuple):
    """The parameters of one decoder layer (weight, bias), in the order the layer uses them."""

    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor]
    attn_proj: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    cross_q: tuple[torch.Tensor, torch.Tensor]
    cross_proj: tuple[torch.Tensor, torch.Tensor]
    ln3: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    mlp_proj: tuple[torch.Tensor, torch.Tensor]


class DecoderWeights(NamedTuple):
    """References to the decoder's parameters (no copies: in-place updates stay visible)."""

    layers: tuple[LayerWeights, ...]
    ln: tuple[torch.Tensor, torch.Tensor]
    eps: float
    n_head: int
    attn_block: int


def _wb(m) -> tuple[torch.Tensor, torch.Tensor]:
    return m.weight, m.bias


def decoder_weights(model) -> DecoderWeights:
    """The decoder's parameters of ``model`` (an ``ImageTransformer``), read through its
    modules: the Parameter objects themselves, so that autograd and ``torch.compile`` see
    parameters."""
    layers = tuple(
        LayerWeights(_wb(m.ln1), _wb(m.self_attn.qkv), _wb(m.self_attn.proj), _wb(m.ln2),
                     _wb(m.cross_attn.q), _wb(m.cross_attn.proj), _wb(m.ln3), _wb(m.mlp.fc),
                     _wb(m.mlp.proj))
        for m in model.dec_layers)
    return DecoderWeights(layers, _wb(model.dec_ln), model.dec_ln.eps, model.cfg.n_head,
                          model.cfg.attn_block)


def decoder_layers(
    w: DecoderWeights, x: torch.Tensor, cross_kv, self_attention: SelfAttention,
    attention=F.scaled_dot_product_attention, dropout: float = 0.0,
) -> torch.Tensor:
    """The decoder layers over x (b, T, d) -> (b, T, d), final norm included.

    cross_kv: per layer, the encoder memory's keys and values, each (b, H, 192, hd).
    self_attention: how a layer's queries meet their keys (``SelfAttention``): over all T
        tokens at once (``local_attention``) or over a cached window.
    attention(q, k, v): the attention to the encoder memory (the compiled step passes one
        that Inductor fuses). dropout: residual dropout, and attention dropout inside the
        cross-attention (training only; 0 when decoding)."""
    b, t, d = x.shape
    h, hd, eps = w.n_head, d // w.n_head, w.eps

    def drop(y):
        return F.dropout(y, dropout) if dropout else y

    for i, lw in enumerate(w.layers):
        qkv = F.linear(F.layer_norm(x, (d,), *lw.ln1, eps), *lw.qkv).view(b, t, 3, h, hd)
        y = self_attention(i, qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1:].permute(2, 0, 3, 1, 4))
        x = x + drop(F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.attn_proj))
        q = F.linear(F.layer_norm(x, (d,), *lw.ln2, eps), *lw.cross_q).view(b, t, h, hd)
        y = (attention(q.transpose(1, 2), *cross_kv[i], dropout_p=dropout) if dropout
             else attention(q.transpose(1, 2), *cross_kv[i]))
        x = x + drop(F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.cross_proj))
        ff = F.relu(F.linear(F.layer_norm(x, (d,), *lw.ln3, eps), *lw.fc))
        x = x + drop(F.linear(ff, *lw.mlp_proj))
    return F.layer_norm(x, (d,), *w.ln, eps)


@functools.lru_cache(maxsize=16)
def local_block_mask(attn_block: int, n_blocks: int, device=None) -> torch.Tensor:
    """bool (1, n_blocks, attn_block, 2*attn_block): query i of block j may see key l of
    [block j-1 | block j]: all of the previous block (none for j = 0), its own up to itself.

    Made once per shape and device. Four dimensions, because the CPU's fused (flash)
    attention takes a 4-D mask and falls back to the unfused math path for a 3-D one."""
    i = torch.arange(attn_block, device=device)[:, None]
    m = torch.arange(2 * attn_block, device=device)[None, :]
    mask = (m <= i + attn_block).expand(n_blocks, attn_block, 2 * attn_block).clone()
    mask[0, :, :attn_block] = False
    return mask[None]


def local_attention(q: torch.Tensor, kv: torch.Tensor, attn_block: int,
                    dropout: float = 0.0) -> torch.Tensor:
    """Masked local-1D self-attention over all positions at once (Parmar et al. 2018,
    section 3.2): query q sees keys [start(q) - attn_block, q], start(q) the first position
    of q's block; computed block by block.

    q (b, H, T, hd), kv (2, b, H, T, hd), T a multiple of attn_block -> (b, H, T, hd)."""
    b, h, t, hd = q.shape
    nb = t // attn_block

    def blocks(x):  # (b, H, T, hd) -> (b*H, nb, blk, hd): 4-D, so fused kernels apply
        return x.reshape(b * h, nb, attn_block, hd)

    def with_previous(x):  # -> (b*H, nb, 2*blk, hd): keys of [previous block | own block]
        return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2)

    y = F.scaled_dot_product_attention(
        blocks(q), with_previous(blocks(kv[0])), with_previous(blocks(kv[1])),
        attn_mask=local_block_mask(attn_block, nb, q.device), dropout_p=dropout)
    return y.reshape(b, h, t, hd)
