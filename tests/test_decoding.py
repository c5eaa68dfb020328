"""Decoding: blockwise parallel decoding with exact acceptance == greedy, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bpd_sr import blockwise_parallel_decode, sequential_decode
from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding.acceptance import acceptance_test
from bpd_sr.decoding.rules import DEFAULT_RULE, RULES, apply_rule
from bpd_sr.model.tokens import image_to_tokens
from bpd_sr.training.loss import sr_loss
from tests.conftest import random_lr, tiny_model

# The sweeps below decode a prefix: parity holds token by token, so 389 tokens (4 rows of the
# image, one pixel and two channels: into the seventh of the tiny model's 64-token attention
# blocks; a prime, so no k divides it; it ends inside a pixel) test what 3072 would, at an eighth
# of the time. Decodes to the last token are tested by
# test_exact_blockwise_equals_greedy_to_the_last_token.
N = 389


@pytest.fixture(scope="module")
def model8():
    return tiny_model(k=8, seed=3)


@pytest.fixture(scope="module", params=RULES)
def greedy_ref(model8, request):
    """Three inputs, the sequential decode of their first N tokens under one decoding rule,
    and the rule."""
    lr = random_lr(3, seed=5)
    return lr, sequential_decode(model8, lr, rule=request.param, n_tokens=N), request.param


def synthetic_faces(n: int, seed: int) -> torch.Tensor:
    """Grey images with a few horizontal bands, which a tiny model learns in a few hundred
    steps: uint8 (n, 32, 32, 3). Runs of equal tokens make long blocks predictable."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(32).view(1, 32, 1, 1)
    base = torch.randint(40, 200, (n, 1, 1, 1), generator=g)
    slope = torch.randint(-8, 9, (n, 1, 1, 1), generator=g)
    return (base + slope * (r // 8)).clamp(0, 255).expand(n, 32, 32, 3).to(torch.uint8)


def train_on_bands(batch: int = 1, steps: int = 60, lr: float = 3e-3):
    """The tiny model with k = 4, base and heads trained jointly on the bands above for
    ``steps`` steps of ``batch`` images; returned in float64 for decoding."""
    from bpd_sr.model.tokens import downsample

    model = tiny_model(k=4, seed=7, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        hr = synthetic_faces(batch, seed=step)
        logits, cond = model(downsample(hr), image_to_tokens(hr))
        loss, _ = sr_loss(logits, cond, image_to_tokens(hr), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


@pytest.fixture(scope="module")
def trained_model():
    """60 steps of one image are enough: exact acceptance then keeps 3.3 tokens per step at
    k = 4, 3.8 without refined proposals (docs/results/refine_strong_heads.json). Batches of
    4 took 5x longer, most of it in the allocator, for 3.9 tokens per step."""
    return train_on_bands(batch=1, steps=60)


def check_bookkeeping(res, k, n=N):
    """The result of a decode of the first n tokens accounts for each of them once."""
    for b, acc in enumerate(res.accepted):
        assert int(acc.sum()) == n
        assert int(acc.min()) >= 1 and int(acc.max()) <= k
        # step_index says which step committed each token: step s committed accepted[s] tokens
        counts = torch.bincount(res.step_index[b].flatten()[:n], minlength=len(acc))
        assert torch.equal(counts, acc)
    assert res.model_calls == max(res.steps) + 1


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_exact_blockwise_equals_greedy_random_heads(model8, greedy_ref, k, batch):
    lr, ref, rule = greedy_ref
    res = blockwise_parallel_decode(model8, lr[:batch], k=k, rule=rule, n_tokens=N)
    assert torch.equal(res.images, ref.images[:batch])
    check_bookkeeping(res, k)


def test_exact_blockwise_equals_greedy_to_the_last_token(model8):
    """The whole image: the last steps propose past position 3071 and images finish at
    different steps and leave the batch."""
    lr = random_lr(3, seed=5)
    ref = sequential_decode(model8, lr)
    res = blockwise_parallel_decode(model8, lr, k=8)
    assert torch.equal(res.images, ref.images)
    check_bookkeeping(res, 8, N_HR_TOKENS)
    assert len({len(a) for a in res.accepted}) > 1  # they did finish at different steps


def test_rules_decode_differently(greedy_ref, model8):
    """The rule reaches the decode: another rule gives another image."""
    lr, ref, rule = greedy_ref
    other = sequential_decode(model8, lr[:1], rule="argmax" if rule != "argmax" else "mean", n_tokens=N)
    assert not torch.equal(other.images, ref.images[:1])


@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize("refine", [None, 4])
def test_refined_proposals_keep_exactness(model8, greedy_ref, k, refine):
    """Proposals taken from the verify pass (always, the default, tested above; or only
    after a near miss) change the speed, never the exact output; None: the paper's heads."""
    lr, ref, rule = greedy_ref
    res = blockwise_parallel_decode(model8, lr, k=k, rule=rule, refine=refine, n_tokens=N)
    assert torch.equal(res.images, ref.images)
    check_bookkeeping(res, k)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_oracle_proposals_accept_k_every_step(model8, greedy_ref, k):
    lr, ref, rule = greedy_ref
    answer = image_to_tokens(ref.images)  # (3, 3072): the first N decoded, zeros after
    padded = torch.cat([answer, torch.zeros(3, k, dtype=torch.long)], dim=1)

    def oracle(rows, next_pos, slot_logits):
        return padded[rows[:, None], next_pos[:, None] + torch.arange(k)]

    res = blockwise_parallel_decode(model8, lr, k=k, proposer=oracle, rule=rule, n_tokens=N)
    assert torch.equal(res.images, ref.images)
    steps = -(-N // k)
    for acc in res.accepted:
        assert len(acc) == steps and bool((acc[:-1] == k).all())
    assert res.model_calls == steps + 1
    check_bookkeeping(res, k)


def test_a_wrong_oracle_is_caught(model8, greedy_ref):
    """Proposals that disagree with the base model are rejected: output stays greedy."""
    lr, ref, rule = greedy_ref
    answer = image_to_tokens(ref.images)
    wrong = torch.cat([answer, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    wrong[:, 1::7] = (wrong[:, 1::7] + 1) % 256

    def oracle(rows, next_pos, slot_logits):
        props = wrong[rows[:, None], next_pos[:, None] + torch.arange(4)]
        props[:, 0] = apply_rule(slot_logits[:, 0], rule)  # slot 0 is the base's own token
        return props

    res = blockwise_parallel_decode(model8, lr, k=4, proposer=oracle, rule=rule, n_tokens=N)
    assert torch.equal(res.images, ref.images)
    assert res.mean_accepted < 4


@pytest.mark.parametrize("k", [2, 4])
def test_exact_blockwise_equals_greedy_trained_heads(trained_model, k):
    from bpd_sr.model.tokens import downsample

    lr = downsample(synthetic_faces(3, seed=999))
    # the heads learnt the data's tokens, which a 60-step model decodes by argmax; its
    # expected intensities sit between bands (parity under every rule is tested above)
    ref = sequential_decode(trained_model, lr, rule="argmax", n_tokens=N)
    res = blockwise_parallel_decode(trained_model, lr, k=k, rule="argmax", n_tokens=N)
    assert torch.equal(res.images, ref.images)
    check_bookkeeping(res, k)
    # trained heads are worth having: well over one token per step
    assert res.mean_accepted > 1.5, res.mean_accepted


def test_batch_equals_each_image_alone(model8):
    lr = random_lr(3, seed=21)
    batch = blockwise_parallel_decode(model8, lr, k=4, epsilon=3, n_tokens=N)
    for i in range(3):
        alone = blockwise_parallel_decode(model8, lr[i : i + 1], k=4, epsilon=3, n_tokens=N)
        assert torch.equal(alone.images[0], batch.images[i])
        assert torch.equal(alone.accepted[0], batch.accepted[i])
        assert torch.equal(alone.step_index[0], batch.step_index[i])


def base_argmax_given(model, lr, images):
    """The uncached forward's base prediction at every position, given the image's own prefix."""
    y = image_to_tokens(images)
    with torch.no_grad():
        logits, _ = model(lr, y)
    return y, logits[:, :, 0]  # (B, 3072), (B, 3072, 256)


@pytest.mark.parametrize("rule", [{"epsilon": 3}, {"top_t": 3}, {"epsilon": 3, "rule": "argmax"},
                                  {"top_t": 3, "refine": 4}, {"top_t": 3, "refine": None}])
def test_every_accepted_token_passes_the_test(model8, rule):
    lr = random_lr(2, seed=31)
    res = blockwise_parallel_decode(model8, lr, k=8, n_tokens=N, **rule)
    y, base = base_argmax_given(model8, lr, res.images)
    y, base = y[:, :N], base[:, :N]  # causal: the prefix's predictions ignore the zeros after it
    assert res.mean_accepted > 1.0
    for b in range(2):
        steps = res.step_index[b].flatten()[:N]
        first = torch.ones(N, dtype=torch.bool)
        first[1:] = steps[1:] != steps[:-1]
        # the first token of a step is the base model's own next token: exact
        choice = apply_rule(base[b, first], rule.get("rule", DEFAULT_RULE))
        assert torch.equal(y[b, first], choice)
        # every other accepted token passed the acceptance test against the base prediction
        test = {key: v for key, v in rule.items() if key != "refine"}  # how proposals were made
        ok = acceptance_test(y[b, ~first][None], base[b, ~first][None], **test)
        assert bool(ok.all())


def test_approximate_acceptance_drifts_from_greedy_but_accepts_more(model8, greedy_ref):
    lr, ref, rule = greedy_ref
    exact = blockwise_parallel_decode(model8, lr, k=8, rule=rule, n_tokens=N)
    loose = blockwise_parallel_decode(model8, lr, k=8, epsilon=8, rule=rule, n_tokens=N)
    assert loose.mean_accepted > exact.mean_accepted
    assert torch.equal(exact.images, ref.images)
    # the kept token is the proposal, not the base's choice: the image drifts from greedy,
    # but never by more than epsilon where a proposal was accepted (checked per token in
    # test_every_accepted_token_passes_the_test)
    drift = (loose.images.int() - ref.images.int()).abs()
    assert int(drift.max()) > 0


def test_min_block_forces_progress(model8):
    lr = random_lr(1, seed=41)
    res = blockwise_parallel_decode(model8, lr, k=4, min_block=3, n_tokens=N)
    assert bool((res.accepted[0][:-1] >= 3).all())


def test_k1_is_greedy_and_argument_checks(model8, greedy_ref):
    lr, ref, rule = greedy_ref
    res = blockwise_parallel_decode(model8, lr[:1], k=1, rule=rule, n_tokens=N)
    assert torch.equal(res.images, ref.images[:1])
    assert res.steps == [N]
    with pytest.raises(ValueError):
        blockwise_parallel_decode(model8, lr, k=9)  # the model has 8 slots
    with pytest.raises(ValueError):
        blockwise_parallel_decode(model8, lr, k=4, min_block=5)
    with pytest.raises(ValueError):
        sequential_decode(model8, lr.float())
    with pytest.raises(ValueError, match="epsilon"):
        blockwise_parallel_decode(model8, lr, k=4, epsilon=-1)
    with pytest.raises(ValueError, match="rule"):
        sequential_decode(model8, lr, rule="mode")


def test_acceptance_test_rules():
    props = torch.tensor([[10, 12, 200]])
    logits = torch.zeros(1, 3, 256)
    logits[0, 0, 10] = 5
    logits[0, 1, 10] = 5
    logits[0, 2, 0] = 5
    logits[0, 2, 200] = 4
    sharp = logits * 20  # so sharp that every rule agrees with argmax
    for rule in RULES:
        assert acceptance_test(props, sharp, rule=rule).tolist() == [[True, False, False]]
        assert acceptance_test(props, sharp, epsilon=2, rule=rule).tolist() == [[True, True, False]]
    assert acceptance_test(props, logits, top_t=2).tolist()[0][2] is True


def masses(*levels: int) -> torch.Tensor:
    """Logits (256,) of equal probability on ``levels`` and none elsewhere (float64)."""
    logits = torch.full((256,), -1e4, dtype=torch.float64)
    logits[list(levels)] = 0.0
    return logits


def test_mean_rule_values_and_rounding():
    # one-hot: its own value, for every level
    onehot = torch.stack([masses(v) for v in range(256)])
    assert torch.equal(apply_rule(onehot, "mean"), torch.arange(256))
    # equal masses: the midpoint, rounded half to even (torch.round): 11.5 -> 12, 12.5 -> 12
    assert int(apply_rule(masses(10, 13), "mean")) == 12
    assert int(apply_rule(masses(12, 13), "mean")) == 12
    assert int(apply_rule(masses(0, 3), "mean")) == 2  # 1.5 -> 2
    assert int(apply_rule(masses(0, 255), "mean")) == 128  # 127.5 -> 128
    # a float32 distribution gives the same mean as its float64 copy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g)
    assert torch.equal(apply_rule(logits, "mean"), apply_rule(logits.double(), "mean"))


def test_argmax_and_median_rules():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 256, generator=g)
    assert torch.equal(apply_rule(logits, "argmax"), logits.argmax(-1))  # unchanged
    assert int(apply_rule(masses(10, 13, 200), "median")) == 13
    assert int(apply_rule(masses(7), "median")) == 7
    skew = masses(0, 1, 2, 250)  # a far tail moves the mean, not the median
    assert int(apply_rule(skew, "median")) == 1
    assert int(apply_rule(skew, "mean")) == 63  # 253 / 4 = 63.25


@pytest.mark.parametrize("epsilon", [0, 2, 5])
def test_distance_acceptance_under_the_mean_rule(epsilon):
    """rule(base) is 12 here (masses at 10 and 13 ... mean 11.5, rounded to 12)."""
    base = masses(10, 13)[None, None].float()
    at = torch.tensor([[12 + epsilon]])
    beyond = torch.tensor([[12 + epsilon + 1]])
    below = torch.tensor([[12 - epsilon - 1]])
    assert acceptance_test(at, base, epsilon, rule="mean").item() is True
    assert acceptance_test(beyond, base, epsilon, rule="mean").item() is False
    assert acceptance_test(below, base, epsilon, rule="mean").item() is False
    # under argmax the same base chooses 10 (the first of two equal maxima)
    assert acceptance_test(torch.tensor([[10 + epsilon]]), base, epsilon, rule="argmax").item()


def test_refine_from_verify_takes_the_verify_predictions():
    from bpd_sr.decoding.acceptance import refine_from_verify

    k = 4
    base = torch.full((2, k, 256), -1e4)
    choices = torch.tensor([[5, 6, 7, 8], [50, 60, 70, 80]])
    base.scatter_(2, choices[..., None], 0.0)
    heads = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2]])
    old = torch.tensor([[5, 9, 0, 0], [50, 50, 60, 70]])
    n_ok = torch.tensor([0, 3])
    # row 0: proposal 1 (9) missed base choice 5 by 4 levels; with max_miss 4, new slot i >= 1
    # (target n + 1 + i) takes the verify prediction for that target (6, 7, 8); slot 0 stays
    # the base's own token; row 1 accepted everything: unchanged
    out = refine_from_verify(heads, old, base.argmax(-1), n_ok, max_miss=4)
    assert out.tolist() == [[1, 6, 7, 8], [2, 2, 2, 2]]
    out = refine_from_verify(heads, old, base.argmax(-1), torch.tensor([1, 3]), max_miss=10)
    assert out.tolist()[0] == [1, 7, 8, 1]  # n_ok = 1: two slots have a verify prediction
    out = refine_from_verify(heads, old, base.argmax(-1), n_ok, max_miss=3)
    assert out.tolist() == heads.tolist()  # missed by more than max_miss: heads kept


@pytest.mark.parametrize("rule", ["argmax", "mean"])
def test_exact_blockwise_in_float32_stays_within_rounding_of_sequential(rule):
    """In float32 a step over k tokens rounds differently from a step over one, so a choice
    on a near-tie can flip (and the decode then follows another prefix); it must stay rare.
    A broken acceptance rule (e.g. comparing with the wrong position) fails this at once."""
    model = tiny_model(k=4, seed=3, dtype=torch.float32)
    lr = random_lr(2, seed=5)
    ref = sequential_decode(model, lr, rule=rule, n_tokens=768)
    res = blockwise_parallel_decode(model, lr, k=4, rule=rule, n_tokens=768)
    same = (res.images == ref.images).flatten(1)[:, : 768]
    assert same.float().mean() >= 0.95, same.float().mean()


class _SyncCounter:
    """Counts the calls that make the host wait for the device (on a GPU: a stall of its
    queue): Tensor.tolist, item, and conversions to bool, int and float."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **kw):
                self.n += 1
                return _original(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("batch", [1, 3])
def test_blockwise_decoding_syncs_with_the_host_once_per_step(model8, monkeypatch, batch):
    lr = random_lr(batch, seed=8)
    counter = _SyncCounter(monkeypatch)
    res = blockwise_parallel_decode(model8, lr, k=4, epsilon=3, n_tokens=N)
    counted = counter.n
    monkeypatch.undo()
    steps = max(res.steps)
    assert counted <= steps + 2, (counted, steps)  # the rest: setting up and the result


def test_sequential_decoding_does_not_sync_per_token(model8, monkeypatch):
    lr = random_lr(2, seed=8)
    counter = _SyncCounter(monkeypatch)
    sequential_decode(model8, lr, n_tokens=200)
    counted = counter.n
    monkeypatch.undo()
    assert counted <= 2, counted
