"""One incremental decoder step in plain functional code: the step every decode runs.

``ImageTransformer.decoder_hidden`` (with a ``KVCache``) and ``ImageTransformer.logits``
call these. They compute exactly what the module path computes (``LocalSelfAttention`` and
friends on a ``FlatKVCache``: the same operations on the same values, bit for bit in
float64; tested), with far fewer operations per step, because at batch 1 a step of this
model is mostly per-operation overhead:

- the weights are read straight from the parameters (``DecoderWeights``, gathered once per
  model), with no ``nn.Module.__call__``, hooks or dropout layers per step;
- the head-major ``KVCache`` hands the attention its window as a view where the rows share
  positions, with a mask made once and reused (see ``bpd_sr.model.cache``);
- the position embeddings and conditioning logits of rows that share positions are slices
  of the encoder context instead of flat gathers.

Decoding is inference: dropout is off (``model.eval()``; a model in training mode with
dropout is refused rather than decoded differently from the module path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from bpd_sr.model.cache import GATHERED, KVCache, Layout, StepPlan


class LayerWeights(NamedTuple):
    """The parameters of one decoder layer, in the order the step uses them."""

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


def layer_weights(layer) -> LayerWeights:
    """The parameters of one ``DecoderLayer``."""
    return LayerWeights(
        _wb(layer.ln1), _wb(layer.self_attn.qkv), _wb(layer.self_attn.proj), _wb(layer.ln2),
        _wb(layer.cross_attn.q), _wb(layer.cross_attn.proj), _wb(layer.ln3),
        _wb(layer.mlp.fc), _wb(layer.mlp.proj),
    )


def decoder_weights(model, cached: bool = True) -> DecoderWeights:
    """The decoder's parameters as plain tuples, gathered once per model and kept on it.

    They are the Parameter objects themselves, so training, ``load_state_dict`` and ``.to()``
    (which all update parameters in place) stay visible; a replaced submodule is noticed by
    comparing the first layer's qkv weight. cached=False gathers them afresh, through the
    modules (what ``torch.compile`` must see to treat them as parameters and freeze them)."""
    known = getattr(model, "_decoder_weights", None) if cached else None
    if known is not None and known.layers[0].qkv[0] is model.dec_layers[0].self_attn.qkv.weight:
        return known
    w = DecoderWeights(tuple(layer_weights(layer) for layer in model.dec_layers),
                       _wb(model.dec_ln), model.dec_ln.eps, model.cfg.n_head, model.cfg.attn_block)
    if cached:
        model._decoder_weights = w
    return w


def _shared_rows(pos: torch.Tensor) -> int | None:
    """The position of column 0 when every row has the same one, else None. pos: (b, T)."""
    p = pos[:, 0].tolist()
    return p[0] if all(x == p[0] for x in p) else None


def input_embeddings(model, ctx, inputs: torch.Tensor, pos: torch.Tensor, p0: int | None):
    """The decoder input of the new tokens: (B, T, d). Positions past the context's last one
    (3071, or n - 1 for a decode of the first n tokens: look-ahead fed near the end) reuse its
    embedding; causal attention keeps their outputs out of every token that is kept."""
    b, t = inputs.shape
    n_pos = ctx.dec_pos.shape[1]
    tok = F.embedding(inputs, model.dec_tok.weight)
    if p0 is not None and p0 + t <= n_pos and ctx.rows is None:
        return tok + ctx.dec_pos[:, p0 : p0 + t]
    return tok + ctx.position_embeddings(pos)


def decoder_layers(
    w: DecoderWeights, x: torch.Tensor, cross_kv, cache: KVCache, plan: StepPlan
) -> torch.Tensor:
    """The decoder layers over the new tokens x (b, T, d) -> (b, T, d), final norm included.

    Each layer: x + self-attention(ln1 x) over the cached window, + cross-attention(ln2 x)
    over the encoder memory, + MLP(ln3 x): the module path's operations in its order."""
    b, t, d = x.shape
    h, hd, eps = w.n_head, d // w.n_head, w.eps
    for i, lw in enumerate(w.layers):
        qkv = F.linear(F.layer_norm(x, (d,), *lw.ln1, eps), *lw.qkv).view(b, t, 3, h, hd)
        k, v = cache.update(i, plan, qkv[:, :, 1:].permute(2, 0, 3, 1, 4))  # (2, b, H, T, hd)
        y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k, v, attn_mask=plan.mask)
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.attn_proj)
        q = F.linear(F.layer_norm(x, (d,), *lw.ln2, eps), *lw.cross_q).view(b, t, h, hd)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), *cross_kv[i])
        x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.cross_proj)
        ff = F.relu(F.linear(F.layer_norm(x, (d,), *lw.ln3, eps), *lw.fc))
        x = x + F.linear(ff, *lw.mlp_proj)
    return F.layer_norm(x, (d,), *w.ln, eps)


def decoder_step(model, ctx, inputs: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                 rows: torch.Tensor, layout: Layout = None) -> torch.Tensor:
    """Decoder output h (b, T, d) of T new tokens per row, writing their keys and values.

    inputs: long (b, T) vocabulary ids of the token before each position; pos: long (b, T)
    contiguous positions of each row; rows: long (b,) the cache row of each batch row;
    layout: what the caller knows of rows and pos on the host (``bpd_sr.model.cache.Layout``)."""
    if model.training and model.cfg.dropout > 0:
        raise RuntimeError("incremental decoding runs without dropout: call model.eval() first")
    w = decoder_weights(model)
    plan = cache.plan(rows, pos, layout)
    x = input_embeddings(model, ctx, inputs, pos, plan.p0 if plan.shared else None)
    compiled = model.__dict__.get("_compiled_step")  # bpd_sr.decoding.compiled.compile_decoder
    if compiled is not None and plan.shared:
        return compiled.decoder(x, ctx.cross_kv, cache, plan)
    return decoder_layers(w, x, ctx.cross_kv, cache, plan)


def slot_logits(model, ctx, h: torch.Tensor, pos: torch.Tensor, n_slots: int,
                layout: Layout = None) -> torch.Tensor:
    """Logits of the first n_slots proposal slots: h (b, T, d), pos long (b, T) (any
    positions) -> (b, T, n_slots, 256). Slot i at position p gets the conditioning logits of
    p + i: a slice of the context when every row asks for the same single position.
    layout: as in ``decoder_step`` (None: read pos to find out, a host sync)."""
    b, t = pos.shape
    cond_all = ctx.cond_logits
    if t != 1 or layout == GATHERED:
        p0 = None
    else:
        p0 = _shared_rows(pos) if layout is None else layout[1]
    shared = p0 is not None and p0 + n_slots <= cond_all.shape[1] and ctx.rows is None
    compiled = model.__dict__.get("_compiled_step")  # bpd_sr.decoding.compiled.compile_decoder
    if shared and compiled is not None:
        # h copied to fresh strides: the compiled graph is specialised on them
        h = torch.empty((b, 1, h.shape[-1]), dtype=h.dtype, device=h.device).copy_(h)
        return compiled.logits(h, cond_all[:, None, p0 : p0 + n_slots], n_slots)
    # all proposal slots, then the first n_slots: computing only those would read less of the
    # heads' 4 MB projection, but BLAS picks other kernels for other matrix widths (measured:
    # float64 results change in the last bit), and the module path is the reference
    heads = model.heads
    slots = h.unsqueeze(-2) if heads.identity_first_slot and n_slots == 1 else heads(h, n_slots)
    out = F.linear(slots, model.out_proj.weight, model.out_proj.bias)  # (b, T, n_slots, 256)
    # the sum takes the wider of the two dtypes: under bf16 autocast the conditioning logits
    # stay float32 (ConditioningNet) and so does what the loss reads
    if shared:
        return out + cond_all[:, None, p0 : p0 + n_slots]  # a view: (b, 1, S, 256)
    return out + ctx.slot_conditioning(pos, n_slots)
