"""One decoding step, ready to time: the harness that auto-k (``bpd_sr.decoding.autok``) and
the speed benchmarks (``bpd_sr.evaluation.speed``) both run.

A step over k tokens is what blockwise decoding runs each step: the decoder over k new
tokens on a cache of a whole decode's size (a small one stays in the CPU's caches and
flatters large batches), the base logits at each token and (k > 1) the proposal slots at the
last one. k = 1 is a sequential step. The loop's own bookkeeping is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bpd_sr.decoding.session import DecodingSession
from bpd_sr.model.tokens import previous_token_inputs


def step_function(session: DecodingSession, batch: int, k: int, position: int = 1500,
                  spread: bool = False, n_slots: int | None = None,
                  lr: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """A zero-argument function that runs one decoding step of ``session`` at this batch size
    over k tokens and returns the base logits (batch, k, 1, 256).

    spread: rows of a blockwise decode of several images soon sit at different positions
    (their images accept different lengths), which costs a gather instead of a view; True
    puts the rows at different positions (when k > 1). n_slots: proposal slots read at the
    last token (default: all the model has). lr: uint8 (batch, 8, 8, 3) inputs (default grey)."""
    model = session.model
    dev = next(model.parameters()).device
    if lr is None:
        lr = torch.full((batch, 8, 8, 3), 128, dtype=torch.uint8)
    ctx, cache = model.encode(lr.to(dev)), session.new_cache(batch)
    rows = torch.arange(batch, device=dev)
    offset = (rows * 7) % 64 if spread and k > 1 else torch.zeros_like(rows)
    pos = position + offset[:, None] + torch.arange(k, device=dev)  # (batch, k)
    inputs = previous_token_inputs(torch.full_like(pos, 7), pos)
    n_slots = model.cfg.k if n_slots is None else n_slots

    def step() -> torch.Tensor:
        h = session.decoder_hidden(ctx, inputs, pos, cache, rows)
        base = session.logits(ctx, h, pos, 1)
        if k > 1:
            session.logits(ctx, h[:, -1:], pos[:, -1:], n_slots)
        return base

    return step
