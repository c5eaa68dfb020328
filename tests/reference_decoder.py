"""An independent oracle of the decoder, for tests only.

It reads the model's parameters and computes the decoder's hidden states the plainest way:
every layer over the whole sequence, attention written out as softmax(q k^T / sqrt(hd) +
mask) v with one (T, T) mask built from the definition of masked local-1D attention (Parmar
et al. 2018, section 3.2: query q sees keys from the start of the block before its own up
to itself). It shares no code with ``bpd_sr.model.decoder`` (no blocking, no cache, no
fused attention), so the library's full pass and its cached step can both be checked
against it.
"""

from __future__ import annotations

import math

import torch

from bpd_sr.model.tokens import shift_right


def _norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _lin(x, m, rows=None):
    w, b = (m.weight, m.bias) if rows is None else (m.weight[rows], m.bias[rows])
    return x @ w.T + b


def _attend(q, k, v, allowed):
    """q (B, H, T, hd), k/v (B, H, S, hd), allowed bool (T, S) or None."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def local_mask(t: int, block: int) -> torch.Tensor:
    q = torch.arange(t)[:, None]
    key = torch.arange(t)[None, :]
    return (key <= q) & (key >= (q // block) * block - block)


def heads(x, n_head):  # (B, T, d) -> (B, H, T, hd)
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


def merge(y):  # (B, H, T, hd) -> (B, T, d)
    b, h, t, hd = y.shape
    return y.transpose(1, 2).reshape(b, t, h * hd)


@torch.no_grad()
def oracle_hidden(model, lr: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, T, d) for positions 0..T-1 of targets long (B, T), model in eval."""
    cfg = model.cfg
    ctx = model.encode(lr)
    t, d, nh = targets.shape[1], cfg.d_model, cfg.n_head
    x = model.dec_tok.weight[shift_right(targets)] + ctx.dec_pos[:, :t]
    allowed = local_mask(t, cfg.attn_block)
    for i, layer in enumerate(model.dec_layers):
        a = _norm(x, layer.ln1)
        q, k, v = (_lin(a, layer.self_attn.qkv, slice(j * d, (j + 1) * d)) for j in range(3))
        x = x + _lin(merge(_attend(heads(q, nh), heads(k, nh), heads(v, nh), allowed)),
                     layer.self_attn.proj)
        q = heads(_lin(_norm(x, layer.ln2), layer.cross_attn.q), nh)
        mk, mv = ctx.cross_kv[i]
        x = x + _lin(merge(_attend(q, mk, mv, None)), layer.cross_attn.proj)
        ff = torch.relu(_lin(_norm(x, layer.ln3), layer.mlp.fc))
        x = x + _lin(ff, layer.mlp.proj)
    return _norm(x, model.dec_ln)
