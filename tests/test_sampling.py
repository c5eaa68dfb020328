"""Exact sampling accelerated by the proposal heads (speculative sampling, issue: beyond the
paper). The distribution of blockwise samples must equal the base model's tempered
distribution, which a tiny model lets us compute exactly by enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chi2

import bpd_sr.decoding.acceptors as acceptors
from bpd_sr import blockwise_parallel_decode, sample_decode, sequential_decode
from bpd_sr.model.tokens import image_to_tokens, shift_right
from tests.conftest import random_lr, tiny_model

SUPPORT = torch.tensor([10, 20, 30, 40])  # the only intensities the test model can emit
M = 3  # tokens whose joint distribution is enumerated: 4**3 = 64 outcomes
T = 0.9
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def small_vocab_model():
    """A tiny model whose outputs live on 4 intensities, so short prefixes can be enumerated.
    Its proposal heads are random, so their distributions q differ from the base's p."""
    model = tiny_model(k=4, seed=5, dtype=torch.float32)
    with torch.no_grad():
        mask = torch.full((256,), -1e4)
        mask[SUPPORT] = 0.0
        model.out_proj.bias.copy_(mask)
        model.out_proj.weight.mul_(0.1)  # 20x from tiny_model: logits of a few units
    return model


def exact_distribution(model, lr) -> dict[tuple[int, ...], float]:
    """p(y0, y1, y2) at temperature T by enumeration, from the uncached full pass (no cache, no
    step: independent of the decoding loops under test) run on the first M positions
    only, which causal attention makes the same as the whole image's first M."""
    seqs = list(itertools.product(SUPPORT.tolist(), repeat=M))
    y = torch.tensor(seqs)  # (S, M)
    pos = torch.arange(M).expand(len(seqs), -1)
    with torch.no_grad():
        ctx = model.encode(lr.expand(len(seqs), -1, -1, -1))
        h = model.decoder_hidden(ctx, shift_right(y))  # (S, M, d)
        logits = model.logits(ctx, h, pos)[:, :, 0]  # (S, M, 256)
    logp = torch.log_softmax(logits.double() / T, -1)
    joint = logp.gather(-1, y[..., None])[..., 0].sum(-1).exp()
    return {s: float(p) for s, p in zip(seqs, joint, strict=True)}


def chi_square(samples: np.ndarray, probs: dict) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling outcomes expected < 5 times."""
    n = len(samples)
    counts: dict = {}
    for s in map(tuple, samples):
        counts[s] = counts.get(s, 0) + 1
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for s, p in probs.items():
        if n * p < 5:
            pool_o += counts.get(s, 0)
            pool_e += n * p
        else:
            obs.append(counts.get(s, 0))
            exp.append(n * p)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    obs_a, exp_a = np.array(obs, float), np.array(exp, float)
    return float(((obs_a - exp_a) ** 2 / exp_a).sum()), len(obs) - 1


def draw(model, lr, k, n=2400, chunk=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // chunk):
        res = blockwise_parallel_decode(model, lr.expand(chunk, -1, -1, -1), k=k,
                                        temperature=T, generator=g, n_tokens=M)
        out.append(image_to_tokens(res.images)[:, :M])
    return torch.cat(out).numpy()


@pytest.mark.parametrize("k", [2, 4])
def test_blockwise_samples_follow_the_base_distribution(small_vocab_model, k):
    lr = random_lr(1, seed=2)
    probs = exact_distribution(small_vocab_model, lr)
    samples = draw(small_vocab_model, lr, k)
    stat, df = chi_square(samples, probs)
    assert stat < chi2.ppf(1 - SIGNIFICANCE, df), (stat, df)


def test_a_batch_of_different_faces_finishing_at_different_steps(small_vocab_model):
    """Two inputs interleaved in one batch: rows accept different lengths and finish at
    different steps, and each input's samples still follow its own base distribution."""
    lrs = torch.cat([random_lr(1, seed=2), random_lr(1, seed=9)])
    g = torch.Generator().manual_seed(3)
    samples, steps = [], []
    for _ in range(6):
        res = blockwise_parallel_decode(small_vocab_model, lrs.repeat(200, 1, 1, 1), k=4,
                                        temperature=T, generator=g, n_tokens=M)
        samples.append(image_to_tokens(res.images)[:, :M])
        steps += [len(a) for a in res.accepted]
        assert all(int(a.sum()) == M for a in res.accepted)
    assert len(set(steps)) > 1  # a ragged batch: some rows finished while others went on
    samples = torch.cat(samples).numpy()
    for row in range(2):
        probs = exact_distribution(small_vocab_model, lrs[row : row + 1])
        stat, df = chi_square(samples[row::2], probs)
        assert stat < chi2.ppf(1 - SIGNIFICANCE, df), (row, stat, df)


def test_always_accepting_fails_the_same_test(small_vocab_model, monkeypatch):
    """The test has teeth: accepting every proposal samples from the heads, not the base."""
    lr = random_lr(1, seed=2)
    probs = exact_distribution(small_vocab_model, lr)
    monkeypatch.setattr(acceptors, "speculative_accept",
                        lambda props, p, q, u: torch.ones_like(props, dtype=torch.bool))
    samples = draw(small_vocab_model, lr, k=4)
    stat, df = chi_square(samples, probs)
    assert stat > chi2.ppf(1 - SIGNIFICANCE, df), (stat, df)


def test_plain_sampling_follows_the_base_distribution(small_vocab_model):
    lr = random_lr(1, seed=2)
    probs = exact_distribution(small_vocab_model, lr)
    g = torch.Generator().manual_seed(1)
    res = sample_decode(small_vocab_model, lr.expand(2400, -1, -1, -1), T, g, n_tokens=M)
    stat, df = chi_square(image_to_tokens(res.images)[:, :M].numpy(), probs)
    assert stat < chi2.ppf(1 - SIGNIFICANCE, df), (stat, df)


def test_temperature_zero_is_greedy_and_seeds_reproduce():
    model = tiny_model(k=4, seed=3, dtype=torch.float32)
    lr = random_lr(2, seed=4)
    n = 500  # a prefix: the claims hold token by token, and 3072 only costs time
    ref = sequential_decode(model, lr, n_tokens=n)
    res = blockwise_parallel_decode(model, lr, k=4, temperature=0.0, n_tokens=n)
    assert torch.equal(res.images, ref.images)

    def sample(seed):
        return blockwise_parallel_decode(model, lr, k=4, temperature=0.9, n_tokens=n,
                                         generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    for acc in a.accepted:
        assert int(acc.sum()) == n
    assert a.model_calls == max(a.steps) + 1
    with pytest.raises(ValueError):
        blockwise_parallel_decode(model, lr, k=4, temperature=0.9, epsilon=2)
