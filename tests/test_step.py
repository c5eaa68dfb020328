"""The decoder's one implementation (``bpd_sr.model.decoder``), run all at once (the training
pass) and step by step on the key/value cache (``bpd_sr.decoding.session``), against an
independent oracle (``tests/reference_decoder.py``) and against each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bpd_sr import load_pretrained, sequential_decode
from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding.rules import apply_rule
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.model.tokens import image_to_tokens, previous_token_inputs, shift_right
from tests.conftest import random_lr, tiny_model
from tests.reference_decoder import oracle_hidden
from tests.test_model import random_chunks


def chunked_logits(session, lr, targets, chunks):
    """Feed targets through a cache in chunks; return (hidden, logits of every slot count
    1..k, base logits at each chunk's last token)."""
    model = session.model
    b = lr.shape[0]
    ctx, cache, rows = model.encode(lr), session.new_cache(b), torch.arange(b)
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), targets], dim=1)
    hs, slots, base, p = [], [], [], 0
    for t in chunks:
        pos = torch.arange(p, p + t).expand(b, -1)
        h = session.decoder_hidden(ctx, previous_token_inputs(prev[:, p : p + t], pos), pos, cache,
                                   rows)
        hs.append(h)
        slots.append(torch.cat([session.logits(ctx, h, pos, n)
                                for n in range(1, model.cfg.k + 1)], 2))
        base.append(session.logits(ctx, h[:, -1:], pos[:, -1:], 1))
        p += t
    return torch.cat(hs, 1), torch.cat(slots, 1), torch.cat(base, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_pass_and_cached_steps_equal_the_oracle_float64(seed):
    model = tiny_model(k=3, seed=seed)
    lr = random_lr(2, seed)
    n = 1000  # many attention blocks; the oracle's (T, T) attention makes the whole image slow
    targets = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))
    oracle = oracle_hidden(model, lr, targets)
    chunks, fed = [], 0
    for t in random_chunks(seed):
        if fed + t >= n:
            chunks.append(n - fed)
            break
        chunks.append(t)
        fed += t
    with torch.no_grad():
        full = model.decoder_hidden(model.encode(lr), shift_right(targets))
        stepped = chunked_logits(DecodingSession(model), lr, targets, chunks)[0]
    torch.testing.assert_close(full, oracle, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stepped, oracle, rtol=1e-10, atol=1e-10)


def test_the_oracle_notices_a_wrong_attention_window(monkeypatch):
    """The comparison above can fail: a full pass whose local attention sees one block less
    differs from the oracle."""
    import bpd_sr.model.decoder as decoder

    model = tiny_model(k=2, seed=3)
    lr, targets = random_lr(1, 3), torch.randint(0, 256, (1, 256))
    oracle = oracle_hidden(model, lr, targets)
    own_block_only = decoder.local_block_mask(model.cfg.attn_block, 256 // model.cfg.attn_block).clone()
    own_block_only[..., : model.cfg.attn_block] = False
    monkeypatch.setattr(decoder, "local_block_mask", lambda *args: own_block_only)
    with torch.no_grad():
        wrong = model.decoder_hidden(model.encode(lr), shift_right(targets))
    assert not torch.allclose(wrong, oracle, atol=1e-6)


@pytest.mark.parametrize("subset", [(2, 0), (1, 2)])
def test_cache_rows_subset_and_out_of_order(subset):
    """rows need not be 0..b-1: a subset of the cache's rows, in any order, at one position
    (a contiguous subset is read as a view, another one gathered)."""
    model = tiny_model(k=2, seed=3)
    session = DecodingSession(model)
    lr = random_lr(3, seed=3)
    targets = torch.randint(0, 256, (3, 400))
    prev = torch.cat([torch.zeros(3, 1, dtype=torch.long), targets], dim=1)
    with torch.no_grad():
        ctx, cache = model.encode(lr), session.new_cache(3)
        for p in range(0, 300, 3):  # all three rows together
            pos = torch.arange(p, p + 3).expand(3, -1)
            session.decoder_hidden(ctx, previous_token_inputs(prev[:, p : p + 3], pos), pos,
                                   cache, torch.arange(3))
        rows, hs = torch.tensor(subset), []
        sub = ctx.select(rows)
        for p in range(300, 340):  # then two rows only, one token at a time
            pos = torch.full((2, 1), p)
            inputs = previous_token_inputs(prev[rows, p : p + 1], pos)
            hs.append(session.decoder_hidden(sub, inputs, pos, cache, rows))
        full = model.decoder_hidden(ctx, shift_right(targets))
    torch.testing.assert_close(torch.cat(hs, 1), full[rows, 300:340], rtol=1e-10, atol=1e-10)


def naive_sequential(model, lr, n_tokens: int) -> torch.Tensor:
    """Sequential decoding the slow way: the oracle over the whole prefix for every token."""
    b = lr.shape[0]
    tokens = torch.zeros(b, N_HR_TOKENS, dtype=torch.long)
    cond = model.encode(lr).cond_logits
    for p in range(n_tokens):
        h = oracle_hidden(model, lr, tokens[:, : p + 1])[:, p]
        logits = torch.nn.functional.linear(h, model.out_proj.weight, model.out_proj.bias)
        tokens[:, p] = apply_rule(logits + cond[:, p], "mean")
    return tokens


@pytest.mark.parametrize("batch", [1, 2])
def test_sequential_decoding_equals_the_oracle_decode(batch):
    model = tiny_model(k=4, seed=5)
    lr = random_lr(batch, seed=5)
    n = 70  # across two attention blocks
    with torch.inference_mode():
        fast = sequential_decode(model, lr, n_tokens=n, rule="mean")
    assert torch.equal(image_to_tokens(fast.images)[:, :n], naive_sequential(model, lr, n)[:, :n])


def test_shipped_weights_float32_steps_match_the_full_pass():
    """float32, the shipped model, the example face's own 8x8: every logit of 400 positions,
    fed one token and k tokens at a time, is the full pass's to float32 rounding."""
    from bpd_sr.io.imageio import read_image, to_model_input

    img = read_image(Path(__file__).parent.parent / "data" / "examples" / "astronaut.png")
    lr = torch.from_numpy(np.ascontiguousarray(to_model_input(img)[0]))[None]
    model = load_pretrained()
    targets = torch.randint(0, 256, (1, N_HR_TOKENS), generator=torch.Generator().manual_seed(0))
    chunks = [1] * 150 + [model.cfg.k] * 25
    with torch.inference_mode():
        _, slots, _ = chunked_logits(DecodingSession(model), lr, targets, chunks)
        full, _ = model(lr, targets)
    assert slots.dtype == torch.float32
    n = slots.shape[1]
    k = model.cfg.k
    torch.testing.assert_close(slots[:, :, -k:], full[:, :n], rtol=1e-4, atol=2e-3)


def test_step_refuses_dropout_in_training_mode():
    model = tiny_model(k=2, dropout=0.1).train()
    lr = random_lr(1)
    pos = torch.zeros(1, 1, dtype=torch.long)
    session = DecodingSession(model)
    with pytest.raises(RuntimeError, match="eval"):
        session.decoder_hidden(model.encode(lr), pos, pos, session.new_cache(1),
                               torch.zeros(1, dtype=torch.long))


def _compiled_against_eager(backend: str, dtype: torch.dtype, tol: float) -> None:
    model = tiny_model(k=3, seed=4, dtype=dtype)
    lr = random_lr(1, seed=4)
    targets = torch.randint(0, 256, (1, N_HR_TOKENS), generator=torch.Generator().manual_seed(4))
    chunks = [1] * 70 + [3] * 30
    compiled_session = DecodingSession(model)
    with torch.inference_mode():
        eager = chunked_logits(DecodingSession(model), lr, targets, chunks)
        compiled_session.compile(backend=backend)
        compiled = chunked_logits(compiled_session, lr, targets, chunks)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_compiled_step_graph_equals_the_eager_step():
    """The compiled step's graph (window + new keys, its own mask, the keys written back)
    traced by torch.compile without Inductor's code generation (backend aot_eager: seconds,
    not minutes), in float64: the eager step's numbers."""
    torch._dynamo.reset()
    _compiled_against_eager("aot_eager", torch.float64, 1e-10)


@pytest.mark.slow
def test_compiled_step_matches_the_eager_step():
    """Inductor's compiled steps give the eager step's logits to float32 rounding, one token
    and several at a time (compiles for a minute or so: marked slow)."""
    torch._dynamo.reset()
    _compiled_against_eager("inductor", torch.float32, 1e-4)
