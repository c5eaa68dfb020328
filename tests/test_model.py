"""The model: cached incremental forward == full forward, causality, proposal heads."""

from __future__ import annotations

import pytest
import torch

from bpd_sr import ImageTransformer, ModelConfig
from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.model.tokens import (
    BOS,
    downsample,
    image_to_tokens,
    previous_token_inputs,
    shift_right,
    tokens_to_image,
)
from tests.conftest import random_lr, tiny_model


def full_logits(model, lr, targets):
    with torch.no_grad():
        logits, _ = model(lr, targets)
    return logits  # (B, 3072, k, 256)


def incremental_logits(model, lr, targets, chunk_sizes):
    """Feed the targets through the cache in chunks, all rows at the same positions."""
    session = DecodingSession(model)
    b = lr.shape[0]
    ctx = model.encode(lr)
    cache = session.new_cache(b)
    rows = torch.arange(b)
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.long), targets], dim=1)
    outs, p = [], 0
    for t in chunk_sizes:
        pos = torch.arange(p, p + t).expand(b, -1)
        h = session.decoder_hidden(ctx, previous_token_inputs(prev[:, p : p + t], pos), pos, cache,
                                   rows)
        outs.append(session.logits(ctx, h, pos, model.cfg.k))
        p += t
    return torch.cat(outs, dim=1)


def random_chunks(seed: int, max_chunk: int = 11) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    chunks, total = [], 0
    while total < N_HR_TOKENS:
        t = min(int(torch.randint(1, max_chunk + 1, (1,), generator=g)), N_HR_TOKENS - total)
        chunks.append(t)
        total += t
    return chunks


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_incremental_forward_equals_full_forward(seed):
    model = tiny_model(k=3, seed=seed)
    lr = random_lr(2, seed)
    targets = torch.randint(0, 256, (2, N_HR_TOKENS), generator=torch.Generator().manual_seed(seed))
    full = full_logits(model, lr, targets)
    with torch.no_grad():
        inc = incremental_logits(model, lr, targets, random_chunks(seed))
    torch.testing.assert_close(inc, full, rtol=1e-9, atol=1e-9)


def test_cached_forward_float32_matches_to_float_tolerance():
    model = tiny_model(k=2, dtype=torch.float32)
    lr = random_lr(1)
    targets = torch.randint(0, 256, (1, N_HR_TOKENS))
    with torch.no_grad():
        inc = incremental_logits(model, lr, targets, random_chunks(3, max_chunk=8))
    torch.testing.assert_close(inc, full_logits(model, lr, targets), rtol=1e-4, atol=1e-4)


def test_rows_at_different_positions_share_one_call():
    """Two images at different positions in one incremental call give each image's own logits."""
    model = tiny_model(k=2)
    lr = random_lr(2)
    targets = torch.randint(0, 256, (2, N_HR_TOKENS))
    full = full_logits(model, lr, targets)
    session = DecodingSession(model)
    ctx, cache, rows = model.encode(lr), session.new_cache(2), torch.arange(2)
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.long), targets], dim=1)
    with torch.no_grad():
        # row 0 fills positions 0..299, row 1 fills 0..699 (row 0's later slots stay stale)
        for p in range(0, 700, 50):
            pos = torch.arange(p, p + 50).expand(2, -1)
            session.decoder_hidden(ctx, previous_token_inputs(prev[:, p : p + 50], pos), pos, cache,
                                   rows)
        pos = torch.tensor([[300, 301, 302], [700, 701, 702]])
        inputs = previous_token_inputs(torch.stack([prev[0, 300:303], prev[1, 700:703]]), pos)
        h = session.decoder_hidden(ctx, inputs, pos, cache, rows)
        out = session.logits(ctx, h, pos, 2)
    torch.testing.assert_close(out[0], full[0, 300:303], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1], full[1, 700:703], rtol=1e-9, atol=1e-9)


def test_causality_later_tokens_never_change_earlier_logits():
    model = tiny_model(k=3)
    lr = random_lr(1)
    a = torch.randint(0, 256, (1, N_HR_TOKENS))
    b = a.clone()
    cut = 1500
    b[:, cut:] = torch.randint(0, 256, (1, N_HR_TOKENS - cut))
    la, lb = full_logits(model, lr, a), full_logits(model, lr, b)
    # position p reads targets < p, so logits up to and including position `cut` agree
    torch.testing.assert_close(la[:, : cut + 1], lb[:, : cut + 1], rtol=0, atol=0)
    assert not torch.allclose(la[:, cut + 1 :], lb[:, cut + 1 :])


def test_local_attention_does_not_see_beyond_previous_block():
    """Each layer looks back one block at most. Changing targets 0..blk-1 changes the inputs at
    positions 1..blk (inputs are shifted right), i.e. blocks 0 and 1; the tiny model's 2 layers
    carry that to blocks 2 and 3, and no further."""
    model = tiny_model(k=1)
    blk = model.cfg.attn_block
    lr = random_lr(1)
    a = torch.randint(0, 256, (1, N_HR_TOKENS))
    b = a.clone()
    b[:, :blk] = (b[:, :blk] + 1) % 256  # change block 0 only
    la, lb = full_logits(model, lr, a), full_logits(model, lr, b)
    far = 4 * blk
    torch.testing.assert_close(la[:, far:], lb[:, far:], rtol=0, atol=0)
    assert not torch.allclose(la[:, 1 : blk + 1], lb[:, 1 : blk + 1])


def test_identity_first_slot_keeps_base_predictions():
    base = tiny_model(k=1, seed=0)
    with_heads = ImageTransformer(ModelConfig.preset("tiny", k=5)).double().eval()
    missing, unexpected = with_heads.load_state_dict(base.state_dict(), strict=False)
    assert all(m.startswith("heads.") for m in missing) and not unexpected
    lr, y = random_lr(1), torch.randint(0, 256, (1, N_HR_TOKENS))
    torch.testing.assert_close(full_logits(with_heads, lr, y)[:, :, 0], full_logits(base, lr, y)[:, :, 0])


@pytest.mark.parametrize("identity_first_slot", [True, False])
def test_new_heads_start_as_the_identity(identity_first_slot):
    """Every slot of a new model carries the decoder output itself (the output layer of the
    heads starts at zero), so slot i at p differs from slot 0 at p only by the conditioning
    logits of p + i, whatever the trunk's weights."""
    model = ImageTransformer(
        ModelConfig.preset("tiny", k=4, identity_first_slot=identity_first_slot)).double().eval()
    h = torch.randn(2, 5, model.cfg.d_model, dtype=torch.float64)
    slots = model.heads(h, 4)  # (2, 5, 4, d)
    torch.testing.assert_close(slots, h.unsqueeze(-2).expand_as(slots), rtol=0, atol=0)


def test_slot_i_gets_conditioning_logits_of_position_p_plus_i():
    model = tiny_model(k=3)
    with torch.no_grad():
        model.out_proj.weight.zero_()
        model.out_proj.bias.zero_()
    lr, y = random_lr(1), torch.randint(0, 256, (1, N_HR_TOKENS))
    logits, cond = full_logits(model, lr, y), model.encode(lr).cond_logits
    for i in range(3):
        torch.testing.assert_close(logits[0, : N_HR_TOKENS - i, i], cond[0, i:N_HR_TOKENS])


def test_tokens_roundtrip_and_downsample():
    img = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(tokens_to_image(image_to_tokens(img)), img)
    assert image_to_tokens(img)[0, 5].item() == img[0, 0, 1, 2].item()  # raster: row, col, channel
    flat = torch.full((1, 32, 32, 3), 7, dtype=torch.uint8)
    flat[0, :4, :4, 0] = torch.tensor([[0, 0, 0, 1]] * 4, dtype=torch.uint8)  # mean 0.25 -> 0
    lr = downsample(flat)
    assert lr.shape == (1, 8, 8, 3) and lr[0, 0, 0, 0] == 0 and lr[0, 1, 1, 1] == 7
    ins = shift_right(image_to_tokens(img))
    assert ins[0, 0] == BOS and ins[0, 1] == img[0, 0, 0, 0] and ins[0, 2] == 256 + int(img[0, 0, 0, 1])


def test_presets_and_config_checks():
    paper = ModelConfig.preset("paper")
    assert (paper.d_model, paper.d_ff, paper.n_head, paper.n_enc_layer, paper.n_dec_layer,
            paper.attn_block) == (512, 2048, 8, 4, 8, 128)
    assert ModelConfig.preset("small", k=10).k == 10
    assert ModelConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**paper.to_dict(), "block_size": 4})
    with pytest.raises(ValueError):
        ModelConfig(k=0)


@pytest.mark.parametrize("head", ["logits", "gaussian"])
def test_conditioning_logits_of_a_prefix_are_those_of_the_whole_image(head):
    """encode(lr, n_positions=n) computes the conditioning logits and position embeddings of
    the first n targets only (the conditioning net's output layer runs on the rows that hold
    them) and pads k zero rows of logits after them."""
    model = tiny_model(k=4, cond_head=head)
    with torch.no_grad():  # the Gaussian head starts at zero: give it something to compute
        torch.nn.init.normal_(model.cond.out.weight, std=0.3)
    lr = random_lr(2, seed=3)
    full = model.encode(lr)  # cond_logits (2, 3072 + 4, 256), dec_pos (2, 3072, d)
    for n in (1, 95, 96, 97, 1000, N_HR_TOKENS):
        part = model.encode(lr, n_positions=n)
        assert part.cond_logits.shape == (2, n + 4, 256)
        torch.testing.assert_close(part.cond_logits[:, :n], full.cond_logits[:, :n], rtol=0, atol=1e-10)
        assert torch.all(part.cond_logits[:, n:] == 0)
        assert torch.equal(part.dec_pos, full.dec_pos[:, :n])


def test_a_short_decode_reads_no_conditioning_logits_past_its_end(monkeypatch):
    """Decoding the first n tokens with the conditioning table cut at n gives the same tokens
    as with the whole table: no slot that is kept reads past n."""
    from bpd_sr import blockwise_parallel_decode, sequential_decode

    model, lr = tiny_model(k=4), random_lr(2, seed=4)

    def decodes():
        return [sequential_decode(model, lr, n_tokens=97).images,
                blockwise_parallel_decode(model, lr, k=4, n_tokens=97).images,
                blockwise_parallel_decode(model, lr, k=4, epsilon=3, n_tokens=97).images]

    cut = decodes()
    whole_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda lr, n_positions=N_HR_TOKENS: whole_encode(lr))
    for a, b in zip(cut, decodes(), strict=True):
        assert torch.equal(a, b)


def test_a_subset_of_the_context_reads_its_own_rows_without_copying_them():
    """Images that finish leave a batch decode (EncoderContext.select): the subset keeps
    reading the batch's conditioning logits and position embeddings through its row map."""
    model, lr = tiny_model(k=4), random_lr(4, seed=6)
    ctx = model.encode(lr)
    sub = ctx.select(torch.tensor([3, 1, 2])).select(torch.tensor([2, 0]))  # images 2 and 3
    assert sub.cond_logits.data_ptr() == ctx.cond_logits.data_ptr()  # not copied
    assert sub.rows.tolist() == [2, 3]
    alone = model.encode(lr[[2, 3]])
    pos = torch.tensor([[5, 6], [700, 701]])
    inputs = torch.tensor([[7, 300], [9, 600]])
    rows = torch.arange(2)
    session = DecodingSession(model)
    with torch.no_grad():  # as decoding runs
        h_sub = session.decoder_hidden(sub, inputs, pos, session.new_cache(2), rows)
        h_alone = session.decoder_hidden(alone, inputs, pos, session.new_cache(2), rows)
        torch.testing.assert_close(h_sub, h_alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(session.logits(sub, h_alone, pos, 4),
                                   session.logits(alone, h_alone, pos, 4), rtol=0, atol=1e-12)


def _sharp_gaussian_model() -> ImageTransformer:
    """A tiny model whose Gaussian conditioning head has sharp, varied distributions (the
    fitted net's sigma reaches 0.5 levels), so that rounding its inputs shows."""
    model = ImageTransformer(ModelConfig.preset("tiny", cond_head="gaussian", cond_channels=16))
    torch.manual_seed(0)
    out = model.cond.out
    torch.nn.init.normal_(out.weight, std=0.3)
    with torch.no_grad():
        out.bias[3:] = -2.5  # sigma ~ 8 exp(-2.5) ~ 0.66 levels
    return model.eval()


@pytest.mark.parametrize("head", ["gaussian", "logits"])
def test_conditioning_logits_under_bf16_autocast_are_the_float32_ones(head):
    """Training on a GPU runs under bf16 autocast. The conditioning logits must not change
    there: the Gaussian head squares levels (bf16 rounds i^2 to multiples of 256) and a
    bf16 mu shifts a sharp distribution's top logits by whole units."""
    model = _sharp_gaussian_model() if head == "gaussian" else tiny_model(k=2, dtype=torch.float32)
    lr = random_lr(4, 3)
    with torch.no_grad():
        ref = model.conditioning_logits(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.conditioning_logits(lr)
            logits, cond = model(lr, torch.randint(0, 256, (4, N_HR_TOKENS)))
    assert low.dtype == torch.float32 and cond.dtype == torch.float32
    tv = 0.5 * (ref.softmax(-1) - low.softmax(-1)).abs().sum(-1)
    assert float(tv.max()) <= 1e-3
    top = ref.topk(16, dim=-1).indices
    assert float((ref.gather(-1, top) - low.gather(-1, top)).abs().max()) <= 1e-3
    # what the loss reads: decoder logits (bf16 products) plus the float32 conditioning
    assert logits.dtype == torch.float32


def test_expected_intensity_under_autocast_is_not_rounded():
    from bpd_sr.decoding.rules import expected_intensity

    logits = torch.randn(64, 256) * 3
    ref = expected_intensity(logits, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = expected_intensity(logits, torch.float32)
    torch.testing.assert_close(low, ref)
