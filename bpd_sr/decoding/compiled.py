"""An opt-in compiled decoder step (``torch.compile``, Inductor, CPU or GPU).

``compile_decoder(model)`` makes every decode of ``model`` (sequential, blockwise, sampling)
run the steps whose rows share positions (see ``bpd_sr.model.cache``) through one compiled graph per
(batch, tokens) shape: the decoder layers, and the output layer with the proposal heads.
Inductor freezes the weights (prepacked matrix products) and, with ``max_autotune``, picks
its own matrix-product kernels, which is what makes a step over k tokens cost little more than
one at small batch on a CPU. Its results equal the eager step's to float32 rounding, not bit
for bit (other kernels sum in another order). Steps of rows at different positions (blockwise
decoding of a batch) stay eager.

Compiling takes tens of seconds per shape on a CPU the first time; Inductor keeps what it
compiled in its on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default a ``torchinductor_<user>``
folder in the temporary directory), so later processes load it in seconds. ``warm_up``
compiles the shapes a decode will need and says how long that took. Nothing compiles unless
asked: the default ``bpd-sr upscale`` never waits for a compiler.

The graph reads no cache in place: it gets each layer's window of cached keys and values
(a view of fixed width, so shapes never change) and returns the new keys and values, which
the caller writes into the cache.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from bpd_sr.model.cache import KVCache, StepPlan
from bpd_sr.model.step import decoder_weights

OPTIONS = {"freezing": True, "max_autotune": True, "triton.cudagraphs": False}


def _attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(hd) + mask) v. For one query it is written out, so that Inductor
    fuses it into its own kernels (cheaper than the fused attention kernel's fixed cost, as
    measured on a CPU); more queries go to the fused kernel."""
    if q.shape[-2] > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


class _Layers(nn.Module):
    """The decoder layers over T new tokens whose keys join a window of cached ones."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, cross_kv, windows, mask):
        """x (b, T, d); cross_kv (n_layer, 2, b, H, 192, hd) of the encoder memory; windows
        (n_layer, 2, b, H, W, hd) of cached keys and values; mask: additive (T, W + T).
        Returns h (b, T, d) and the new keys and values (n_layer, 2, b, H, T, hd). (Few,
        stacked inputs: every input tensor costs a guard check per call.)"""
        w = decoder_weights(self.model, cached=False)
        b, t, d = x.shape
        h, hd, eps = w.n_head, d // w.n_head, w.eps
        new = []
        for i, lw in enumerate(w.layers):
            qkv = F.linear(F.layer_norm(x, (d,), *lw.ln1, eps), *lw.qkv).view(b, t, 3, h, hd)
            kv = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)  # (2, b, H, T, hd)
            new.append(kv)
            k = torch.cat([windows[i][0], kv[0]], dim=2)
            v = torch.cat([windows[i][1], kv[1]], dim=2)
            y = _attention(qkv[:, :, 0].transpose(1, 2), k, v, mask)
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.attn_proj)
            q = F.linear(F.layer_norm(x, (d,), *lw.ln2, eps), *lw.cross_q).view(b, t, h, hd)
            y = _attention(q.transpose(1, 2), cross_kv[i][0], cross_kv[i][1])
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), *lw.cross_proj)
            ff = F.relu(F.linear(F.layer_norm(x, (d,), *lw.ln3, eps), *lw.fc))
            x = x + F.linear(ff, *lw.mlp_proj)
        return F.layer_norm(x, (d,), *w.ln, eps), torch.stack(new)


class _Logits(nn.Module):
    """Output layer of the first n_slots proposal slots at one position per row."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, h, cond, n_slots: int):
        """h (b, 1, d), cond (b, 1, n_slots, 256) -> (b, 1, n_slots, 256)."""
        m = self.model
        heads, d = m.heads, h.shape[-1]
        if heads.identity_first_slot and n_slots == 1:
            slots = h.unsqueeze(-2)
        else:  # only the rows of the heads' projection that the slots asked for
            n_ff = n_slots - 1 if heads.identity_first_slot else n_slots
            hidden = F.relu(F.linear(h, heads.fc.weight, heads.fc.bias))
            ff = F.linear(hidden, heads.proj.weight[: n_ff * d], heads.proj.bias[: n_ff * d])
            slots = h.unsqueeze(-2) + ff.unflatten(-1, (n_ff, d))
            if heads.identity_first_slot:
                slots = torch.cat([h.unsqueeze(-2), slots], dim=-2)
        return F.linear(slots, m.out_proj.weight, m.out_proj.bias) + cond


class CompiledStep:
    """The compiled graphs of one model and the masks they use."""

    def __init__(self, model, options: dict | None = None) -> None:
        opts = dict(OPTIONS if options is None else options)
        # Inductor decides on freezing before it applies per-call options: set it in its config
        # (it only ever applies to graphs compiled without gradients)
        import torch._inductor.config as inductor_config

        inductor_config.freezing = bool(opts.pop("freezing", False)) or inductor_config.freezing
        self.layers = torch.compile(_Layers(model), dynamic=False, options=opts)
        self.logits = torch.compile(_Logits(model), dynamic=False, options=opts)
        self._masks: dict[tuple, torch.Tensor] = {}
        self._cross: tuple[list, torch.Tensor] | None = None  # (ctx.cross_kv, stacked)

    def _mask(self, cache: KVCache, plan: StepPlan) -> torch.Tensor:
        """The plan's mask with the window's own copies of the new positions hidden (they
        are stale: the new keys come in as the last T columns), plus causal new columns."""
        blk = cache.attn_block
        offset = plan.p0 + blk - plan.lo  # column of position p0 in the window
        key = (offset, plan.t, plan.mask.data_ptr())
        mask = self._masks.get(key)
        if mask is None:
            old = plan.mask.clone()
            old[:, offset:] = float("-inf")
            causal = torch.ones(plan.t, plan.t, dtype=torch.bool, device=old.device).tril()
            new = torch.zeros(plan.t, plan.t, dtype=old.dtype, device=old.device)
            new.masked_fill_(~causal, float("-inf"))
            mask = self._masks[key] = torch.cat([old, new], dim=1)
        return mask

    def _stacked_cross(self, cross_kv) -> torch.Tensor:
        """The encoder memory's keys and values as one tensor, stacked once per context."""
        if self._cross is None or self._cross[0] is not cross_kv:
            self._cross = (cross_kv, torch.stack([torch.stack(kv) for kv in cross_kv]))
        return self._cross[1]

    def decoder(self, x: torch.Tensor, cross_kv, cache: KVCache, plan: StepPlan) -> torch.Tensor:
        """h (b, T, d) of a shared-position step, writing the new keys and values."""
        rows = slice(plan.r0, plan.r1)
        windows = cache.data[:, :, rows, :, plan.lo : plan.lo + plan.width]
        h, new = self.layers(x, self._stacked_cross(cross_kv), windows, self._mask(cache, plan))
        at = plan.p0 + cache.attn_block
        cache.data[:, :, rows, :, at : at + plan.t].copy_(new)
        return h


def compile_decoder(model, options: dict | None = None) -> CompiledStep:
    """Route ``model``'s shared-position decoder steps through ``torch.compile`` from now on
    (``uncompile_decoder`` undoes it). options: Inductor options (default ``OPTIONS``)."""
    compiled = CompiledStep(model, options)
    model._compiled_step = compiled
    return compiled


def uncompile_decoder(model) -> None:
    model.__dict__.pop("_compiled_step", None)


@torch.inference_mode()
def warm_up(model, batch: int, ks=(1,)) -> float:
    """Compile (or load from Inductor's cache) the graphs a decode at this batch size with
    these k will run: a step over 1 token and over each k, the base logits and the k proposal
    slots. Returns the seconds it took."""
    from bpd_sr.model.tokens import BOS

    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    lr = torch.zeros(batch, 8, 8, 3, dtype=torch.uint8, device=dev)
    ctx, cache = model.encode(lr), model.new_cache(batch)  # a decode's cache: same strides
    rows = torch.arange(batch, device=dev)
    for t in sorted({1, *ks}):
        pos = torch.arange(130, 130 + t, device=dev).expand(batch, -1)
        h = model.decoder_hidden(ctx, torch.full_like(pos, BOS), pos, cache, rows)
        model.logits(ctx, h[:, :1], pos[:, :1], 1)
        model.logits(ctx, h[:, -1:], pos[:, -1:], max(ks))
    return time.perf_counter() - t0
