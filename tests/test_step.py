"""The fast decoder step (``bpd_sr.model.step`` on the head-major ``KVCache``) computes exactly what
the module path on the reference ``FlatKVCache`` computes: bit for bit in float64, and in
float32 with the shipped weights on the example face."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained, sequential_decode
from bpd_sr.config import N_HR_TOKENS
from bpd_sr.model.cache import FlatKVCache, KVCache
from bpd_sr.model.tokens import previous_token_inputs
from tests.conftest import random_lr, tiny_model
from tests.test_model import random_chunks


def chunked_logits(model, lr, targets, chunks, reference: bool, offsets=None):
    """Feed targets through a cache in chunks; return (hidden, logits of every slot, base
    logits). offsets: per-row start positions, so that rows sit at different positions."""
    b = lr.shape[0]
    ctx = model.encode(lr)
    cache = model.new_cache(b, reference=reference)
    assert isinstance(cache, FlatKVCache if reference else KVCache)
    logits = model.reference_logits if reference else model.logits
    rows = torch.arange(b)
    off = torch.zeros(b, dtype=torch.long) if offsets is None else torch.tensor(offsets)
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), targets], dim=1)
    hs, slots, base, p = [], [], [], 0
    for t in chunks:
        pos = off[:, None] + torch.arange(p, p + t)  # (b, T)
        inputs = previous_token_inputs(prev.gather(1, pos.clamp(max=N_HR_TOKENS)), pos)
        h = model.decoder_hidden(ctx, inputs, pos, cache, rows)
        hs.append(h)
        slots.append(torch.cat([logits(ctx, h, pos, n) for n in range(1, model.cfg.k + 1)], 2))
        base.append(logits(ctx, h[:, -1:], pos[:, -1:], 1))
        p += t
    return torch.cat(hs, 1), torch.cat(slots, 1), torch.cat(base, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_step_equals_module_path_bit_for_bit_float64(seed):
    model = tiny_model(k=3, seed=seed)
    lr = random_lr(2, seed)
    targets = torch.randint(0, 256, (2, N_HR_TOKENS), generator=torch.Generator().manual_seed(seed))
    chunks = random_chunks(seed)
    with torch.no_grad():
        ref = chunked_logits(model, lr, targets, chunks, reference=True)
        new = chunked_logits(model, lr, targets, chunks, reference=False)
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)


def test_rows_at_different_positions_equal_module_path_bit_for_bit():
    """The gathered path (rows at different positions, as in blockwise decoding of a batch)."""
    model = tiny_model(k=4, seed=2)
    lr = random_lr(3, seed=2)
    targets = torch.randint(0, 256, (3, N_HR_TOKENS))
    chunks = [1, 4, 3, 4, 1, 2, 4] * 60  # crosses several attention blocks
    with torch.no_grad():
        ref = chunked_logits(model, lr, targets, chunks, True, offsets=[0, 61, 130])
        new = chunked_logits(model, lr, targets, chunks, False, offsets=[0, 61, 130])
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("subset", [(2, 0), (1, 2)])
def test_cache_rows_subset_and_out_of_order(subset):
    """rows need not be 0..b-1: a subset of the cache's rows, in any order, at one position
    (a contiguous subset is read as a view, another one gathered)."""
    model = tiny_model(k=2, seed=3)
    lr = random_lr(3, seed=3)
    targets = torch.randint(0, 256, (3, 400))
    prev = torch.cat([torch.zeros(3, 1, dtype=torch.long), targets], dim=1)
    outs = {}
    with torch.no_grad():
        for reference in (True, False):
            ctx, cache = model.encode(lr), model.new_cache(3, reference=reference)
            for p in range(0, 300, 3):  # all three rows together
                pos = torch.arange(p, p + 3).expand(3, -1)
                model.decoder_hidden(ctx, previous_token_inputs(prev[:, p : p + 3], pos), pos,
                                     cache, torch.arange(3))
            rows, hs = torch.tensor(subset), []
            sub = ctx.select(rows)
            for p in range(300, 340):  # then rows 2 and 0 only, one token at a time
                pos = torch.full((2, 1), p)
                inputs = previous_token_inputs(prev[rows, p : p + 1], pos)
                hs.append(model.decoder_hidden(sub, inputs, pos, cache, rows))
            outs[reference] = torch.cat(hs, 1)
    assert torch.equal(outs[True], outs[False])


def _reference_decoding(model, monkeypatch):
    """Make the decoding functions run the module path (reference cache and logits)."""
    monkeypatch.setattr(model, "new_cache", functools.partial(model.new_cache, reference=True))
    monkeypatch.setattr(model, "logits", model.reference_logits)


@pytest.mark.parametrize("batch", [1, 3])
def test_decodes_equal_the_module_path_bit_for_bit(batch, monkeypatch):
    model = tiny_model(k=4, seed=5)
    lr = random_lr(batch, seed=5)
    with torch.inference_mode():
        fast = [sequential_decode(model, lr, n_tokens=700),
                blockwise_parallel_decode(model, lr, k=4, epsilon=2, n_tokens=700)]
        _reference_decoding(model, monkeypatch)
        ref = [sequential_decode(model, lr, n_tokens=700),
               blockwise_parallel_decode(model, lr, k=4, epsilon=2, n_tokens=700)]
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.accepted, b.accepted, strict=True))


def test_shipped_weights_float32_identical_on_the_example_face():
    """float32, the shipped model, the example face's own 8x8: every logit of 400 positions,
    fed one token and k tokens at a time, is identical on both paths."""
    from pathlib import Path

    from bpd_sr.io.imageio import read_image, to_model_input

    img = read_image(Path(__file__).parent.parent / "data" / "examples" / "astronaut.png")
    lr = torch.from_numpy(np.ascontiguousarray(to_model_input(img)[0]))[None]
    model = load_pretrained()
    targets = torch.randint(0, 256, (1, N_HR_TOKENS), generator=torch.Generator().manual_seed(0))
    chunks = [1] * 150 + [model.cfg.k] * 25
    with torch.inference_mode():
        ref = chunked_logits(model, lr, targets, chunks, reference=True)
        new = chunked_logits(model, lr, targets, chunks, reference=False)
    assert ref[1].dtype == torch.float32
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)


def test_step_refuses_dropout_in_training_mode():
    model = tiny_model(k=2, dropout=0.1).train()
    lr = random_lr(1)
    pos = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="eval"):
        model.decoder_hidden(model.encode(lr), pos, pos, model.new_cache(1), torch.zeros(1, dtype=torch.long))


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step():
    """torch.compile'd steps (bpd_sr.decoding.compiled) give the eager step's logits to float32
    rounding, one token and several at a time (compiles for a minute or so: marked slow)."""
    from bpd_sr.decoding.compiled import compile_decoder, uncompile_decoder

    model = tiny_model(k=3, seed=4, dtype=torch.float32)
    lr = random_lr(1, seed=4)
    targets = torch.randint(0, 256, (1, N_HR_TOKENS), generator=torch.Generator().manual_seed(4))
    chunks = [1] * 70 + [3] * 30
    with torch.inference_mode():
        eager = chunked_logits(model, lr, targets, chunks, reference=False)
        compile_decoder(model, options={"freezing": True})
        try:
            compiled = chunked_logits(model, lr, targets, chunks, reference=False)
        finally:
            uncompile_decoder(model)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
