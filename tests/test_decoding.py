"""Decoding: blockwise parallel decoding with exact acceptance == greedy, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bpd_sr import blockwise_parallel_decode, greedy_decode
from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding import acceptance_test
from bpd_sr.tokens import image_to_tokens
from bpd_sr.train import sr_loss
from tests.conftest import random_lr, tiny_model


@pytest.fixture(scope="module")
def model8():
    return tiny_model(k=8, seed=3)


@pytest.fixture(scope="module")
def greedy_ref(model8):
    lr = random_lr(3, seed=5)
    return lr, greedy_decode(model8, lr)


def synthetic_faces(n: int, seed: int) -> torch.Tensor:
    """Grey images with a few horizontal bands, which a tiny model learns in a few hundred
    steps: uint8 (n, 32, 32, 3). Runs of equal tokens make long blocks predictable."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(32).view(1, 32, 1, 1)
    base = torch.randint(40, 200, (n, 1, 1, 1), generator=g)
    slope = torch.randint(-8, 9, (n, 1, 1, 1), generator=g)
    return (base + slope * (r // 8)).clamp(0, 255).expand(n, 32, 32, 3).to(torch.uint8)


@pytest.fixture(scope="module")
def trained_model():
    """The tiny model with k = 4, base and heads trained jointly for 120 steps."""
    from bpd_sr.tokens import downsample

    model = tiny_model(k=4, seed=7, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        hr = synthetic_faces(4, seed=step)
        logits, cond = model(downsample(hr), image_to_tokens(hr))
        loss, _ = sr_loss(logits, cond, image_to_tokens(hr), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.double().eval()


def check_bookkeeping(res, k):
    for b, acc in enumerate(res.accepted):
        assert int(acc.sum()) == N_HR_TOKENS
        assert int(acc.min()) >= 1 and int(acc.max()) <= k
        # step_index says which step committed each token: step s committed accepted[s] tokens
        counts = torch.bincount(res.step_index[b].flatten(), minlength=len(acc))
        assert torch.equal(counts, acc)
    assert res.model_calls == max(res.steps) + 1


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_exact_blockwise_equals_greedy_random_heads(model8, greedy_ref, k, batch):
    lr, ref = greedy_ref
    res = blockwise_parallel_decode(model8, lr[:batch], k=k)
    assert torch.equal(res.images, ref.images[:batch])
    check_bookkeeping(res, k)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_oracle_proposals_accept_k_every_step(model8, greedy_ref, k):
    lr, ref = greedy_ref
    answer = image_to_tokens(ref.images)  # (3, 3072)
    padded = torch.cat([answer, torch.zeros(3, k, dtype=torch.long)], dim=1)

    def oracle(rows, next_pos, slot_logits):
        return padded[rows[:, None], next_pos[:, None] + torch.arange(k)]

    res = blockwise_parallel_decode(model8, lr, k=k, proposer=oracle)
    assert torch.equal(res.images, ref.images)
    steps = -(-N_HR_TOKENS // k)
    for acc in res.accepted:
        assert len(acc) == steps and bool((acc[:-1] == k).all())
    assert res.model_calls == steps + 1
    check_bookkeeping(res, k)


def test_a_wrong_oracle_is_caught(model8, greedy_ref):
    """Proposals that disagree with the base model are rejected: output stays greedy."""
    lr, ref = greedy_ref
    answer = image_to_tokens(ref.images)
    wrong = torch.cat([answer, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    wrong[:, 1::7] = (wrong[:, 1::7] + 1) % 256

    def oracle(rows, next_pos, slot_logits):
        props = wrong[rows[:, None], next_pos[:, None] + torch.arange(4)]
        props[:, 0] = slot_logits[:, 0].argmax(-1)  # slot 0 is the base's own token
        return props

    res = blockwise_parallel_decode(model8, lr, k=4, proposer=oracle)
    assert torch.equal(res.images, ref.images)
    assert res.mean_accepted < 4


@pytest.mark.parametrize("k", [2, 4])
def test_exact_blockwise_equals_greedy_trained_heads(trained_model, k):
    from bpd_sr.tokens import downsample

    lr = downsample(synthetic_faces(3, seed=999))
    ref = greedy_decode(trained_model, lr)
    res = blockwise_parallel_decode(trained_model, lr, k=k)
    assert torch.equal(res.images, ref.images)
    check_bookkeeping(res, k)
    # trained heads are worth having: well over one token per step
    assert res.mean_accepted > 1.5, res.mean_accepted


def test_batch_equals_each_image_alone(model8):
    lr = random_lr(3, seed=21)
    batch = blockwise_parallel_decode(model8, lr, k=4, epsilon=3)
    for i in range(3):
        alone = blockwise_parallel_decode(model8, lr[i : i + 1], k=4, epsilon=3)
        assert torch.equal(alone.images[0], batch.images[i])
        assert torch.equal(alone.accepted[0], batch.accepted[i])
        assert torch.equal(alone.step_index[0], batch.step_index[i])


def base_argmax_given(model, lr, images):
    """The uncached forward's base prediction at every position, given the image's own prefix."""
    y = image_to_tokens(images)
    with torch.no_grad():
        logits, _ = model(lr, y)
    return y, logits[:, :, 0]  # (B, 3072), (B, 3072, 256)


@pytest.mark.parametrize("rule", [{"epsilon": 3}, {"top_t": 3}])
def test_every_accepted_token_passes_the_test(model8, rule):
    lr = random_lr(2, seed=31)
    res = blockwise_parallel_decode(model8, lr, k=8, **rule)
    y, base = base_argmax_given(model8, lr, res.images)
    assert res.mean_accepted > 1.0
    for b in range(2):
        steps = res.step_index[b].flatten()
        first = torch.ones(N_HR_TOKENS, dtype=torch.bool)
        first[1:] = steps[1:] != steps[:-1]
        # the first token of a step is the base model's own next token: exact
        assert torch.equal(y[b, first], base[b, first].argmax(-1))
        # every other accepted token passed the acceptance test against the base prediction
        ok = acceptance_test(y[b, ~first][None], base[b, ~first][None], **rule)
        assert bool(ok.all())


def test_approximate_acceptance_drifts_from_greedy_but_accepts_more(model8, greedy_ref):
    lr, ref = greedy_ref
    exact = blockwise_parallel_decode(model8, lr, k=8)
    loose = blockwise_parallel_decode(model8, lr, k=8, epsilon=8)
    assert loose.mean_accepted > exact.mean_accepted


def test_min_block_forces_progress(model8):
    lr = random_lr(1, seed=41)
    res = blockwise_parallel_decode(model8, lr, k=4, min_block=3)
    assert bool((res.accepted[0][:-1] >= 3).all())


def test_k1_is_greedy_and_argument_checks(model8, greedy_ref):
    lr, ref = greedy_ref
    res = blockwise_parallel_decode(model8, lr[:1], k=1)
    assert torch.equal(res.images, ref.images[:1])
    assert res.steps == [N_HR_TOKENS]
    with pytest.raises(ValueError):
        blockwise_parallel_decode(model8, lr, k=9)  # the model has 8 slots
    with pytest.raises(ValueError):
        blockwise_parallel_decode(model8, lr, k=4, min_block=5)
    with pytest.raises(ValueError):
        greedy_decode(model8, lr.float())


def test_acceptance_test_rules():
    props = torch.tensor([[10, 12, 200]])
    logits = torch.zeros(1, 3, 256)
    logits[0, 0, 10] = 5
    logits[0, 1, 10] = 5
    logits[0, 2, 0] = 5
    logits[0, 2, 200] = 4
    assert acceptance_test(props, logits).tolist() == [[True, False, False]]
    assert acceptance_test(props, logits, epsilon=2).tolist() == [[True, True, False]]
    assert acceptance_test(props, logits, top_t=2).tolist()[0][2] is True
