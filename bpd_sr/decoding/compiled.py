"""An opt-in compiled decoder step (``torch.compile``, Inductor, CPU or GPU).

``DecodingSession.compile()`` makes every decode run with that session (sequential,
blockwise, sampling) run the steps whose rows share positions (``bpd_sr.decoding.cache``) through one compiled graph per
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

from bpd_sr.decoding.cache import KVCache, StepPlan
from bpd_sr.model.decoder import decoder_layers, decoder_weights

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
    """The decoder layers over T new tokens whose keys join a window of cached ones: the
    decoder's one implementation (``bpd_sr.model.decoder.decoder_layers``) with a
    self-attention that appends the new keys to the window instead of writing the cache."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, cross_kv, windows, mask):
        """x (b, T, d); cross_kv (n_layer, 2, b, H, 192, hd) of the encoder memory; windows
        (n_layer, 2, b, H, W, hd) of cached keys and values; mask: additive (T, W + T).
        Returns h (b, T, d) and the new keys and values (n_layer, 2, b, H, T, hd). (Few,
        stacked inputs: every input tensor costs a guard check per call.)"""
        new = []

        def window_attention(i, q, kv):
            new.append(kv)
            return _attention(q, torch.cat([windows[i][0], kv[0]], dim=2),
                              torch.cat([windows[i][1], kv[1]], dim=2), mask)

        # read through the modules inside the graph, so that Inductor sees parameters
        h = decoder_layers(decoder_weights(self.model), x, cross_kv, window_attention,
                           attention=_attention)
        return h, torch.stack(new)


class _Logits(nn.Module):
    """Output layer of the first n_slots proposal slots at one position per row."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, h, cond, n_slots: int):
        """h (b, 1, d), cond (b, 1, n_slots, 256) -> (b, 1, n_slots, 256)."""
        return self.model.slot_outputs(h, n_slots) + cond


class CompiledStep:
    """The compiled graphs of one model and the masks they use."""

    def __init__(self, model, options: dict | None = None, backend: str = "inductor") -> None:
        """options: Inductor's options (default ``OPTIONS``). backend: torch.compile's;
        another than Inductor (``"aot_eager"``: traced, not code-generated) takes no options."""
        kwargs: dict = {"dynamic": False, "backend": backend}
        if backend == "inductor":
            opts = dict(OPTIONS if options is None else options)
            # Inductor decides on freezing before it applies per-call options: set it in its
            # config (it only ever applies to graphs compiled without gradients)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = bool(opts.pop("freezing", False)) or inductor_config.freezing
            kwargs["options"] = opts
        self.layers = torch.compile(_Layers(model), **kwargs)
        self.logits = torch.compile(_Logits(model), **kwargs)
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


@torch.inference_mode()
def warm_up(session, batch: int, ks=(1,)) -> float:
    """Compile (or load from Inductor's cache) the graphs a decode of this
    ``DecodingSession`` at this batch size with these k will run: a step over 1 token and
    over each k, the base logits and the k proposal slots. Returns the seconds it took."""
    from bpd_sr.model.tokens import BOS

    t0 = time.perf_counter()
    model = session.model
    dev = next(model.parameters()).device
    lr = torch.zeros(batch, 8, 8, 3, dtype=torch.uint8, device=dev)
    ctx, cache = model.encode(lr), session.new_cache(batch)  # a decode's cache: same strides
    rows = torch.arange(batch, device=dev)
    for t in sorted({1, *ks}):
        pos = torch.arange(130, 130 + t, device=dev).expand(batch, -1)
        h = session.decoder_hidden(ctx, torch.full_like(pos, BOS), pos, cache, rows)
        session.logits(ctx, h[:, :1], pos[:, :1], 1)
        session.logits(ctx, h[:, -1:], pos[:, -1:], max(ks))
    return time.perf_counter() - t0
