"""k = "auto": the choice follows the measured costs and acceptance; decoding with it works."""

from __future__ import annotations

import json

import torch

from bpd_sr import sequential_decode
from bpd_sr.decoding import autok
from bpd_sr.model.tokens import image_to_tokens
from tests.conftest import random_lr, tiny_model


def test_expected_tokens_from_lengths_accepted_at_a_larger_k():
    accepted = torch.tensor([1, 1, 2, 4, 8])
    assert autok.expected_tokens(accepted, 1) == 1.0
    assert autok.expected_tokens(accepted, 2) == (1 + 1 + 2 + 2 + 2) / 5
    assert autok.expected_tokens(accepted, 8) == accepted.double().mean().item()


def test_pick_trades_tokens_per_step_against_seconds_per_step():
    tokens = {1: 1.0, 2: 1.5, 4: 2.5}
    assert autok.pick({1: 1.0, 2: 1.2, 4: 1.5}, tokens) == 4  # cheap verification: long blocks
    assert autok.pick({1: 1.0, 2: 2.0, 4: 4.0}, tokens) == 1  # compute-bound: sequential
    assert autok.pick({1: 1.0, 2: 1.2, 4: 3.0}, tokens) == 2
    # a gain within the margin is not worth the risk of a slower decode
    assert autok.pick({1: 1.0, 2: 1.45, 4: 2.4}, tokens, margin=1.1) == 1
    assert autok.pick({1: 1.0, 2: 1.45, 4: 2.4}, tokens, margin=1.0) == 4


def test_auto_decodes_like_the_k_it_chose(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = tiny_model(k=4, seed=7)
    lr = random_lr(2, seed=7)
    choice = autok.choose_k(model, lr, epsilon=0, top_t=None, min_block=1, temperature=0.0)
    assert set(choice.seconds_per_step) == {"1", "2", "4"}
    # the choice is the fastest by its own measurements (not any candidate)
    secs = {int(k): v for k, v in choice.seconds_per_step.items()}
    toks = {int(k): v for k, v in choice.tokens_per_step.items()}
    assert choice.k == autok.pick(secs, toks)
    assert (tmp_path / "bpd-sr" / "autok.json").is_file()  # kept for the next run
    res = autok.auto_decode(model, lr, n_tokens=300)
    # exact acceptance: whatever k was chosen, the 300 tokens are the greedy decode's (a
    # blockwise decode may leave its last proposals past n_tokens: compare the 300 only)
    ref = sequential_decode(model, lr, n_tokens=300)
    assert torch.equal(image_to_tokens(res.images)[:, :300], image_to_tokens(ref.images)[:, :300])


def test_auto_follows_the_costs(monkeypatch, tmp_path):
    """Force the measured costs: expensive verification gives sequential decoding (one token
    per step), cheap verification a blockwise decode."""
    monkeypatch.setenv("BPD_SR_CACHE", "off")
    model = tiny_model(k=4, seed=8)
    lr = random_lr(1, seed=8)
    costs = {False: lambda m, lr, k: float(k),  # compute-bound: k times the cost
             True: lambda m, lr, k: 1.0 if k == 1 else 0.5}  # forced: blockwise cheaper
    for expect_blockwise, cost in costs.items():
        monkeypatch.setattr(autok, "_seconds_per_step", cost)
        res = autok.auto_decode(model, lr, n_tokens=200)
        assert (max(len(a) for a in res.accepted) < 200) == expect_blockwise


import pytest  # noqa: E402


@pytest.mark.parametrize("content", [b"not json {\xff", b"[1, 2, 3]", b'{"KEY": {"k": 99}}',
                                     b'{"KEY": {"k": "abc"}}'])
def test_any_cache_content_is_ignored_and_rewritten(monkeypatch, tmp_path, content):
    """The cache file may hold anything (a user's edit, another version, a disk error): the
    choice is measured again and the file rewritten, never a traceback."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = tiny_model(k=4, seed=7)
    lr = random_lr(1, seed=7)
    rule = dict(epsilon=0, top_t=None, min_block=1, temperature=0.0)
    key = autok._fingerprint(model, 1, rule, [1, 2, 4])
    path = tmp_path / "bpd-sr" / "autok.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content.replace(b"KEY", key.encode()))
    choice = autok.choose_k(model, lr, **rule)
    assert choice.k in (1, 2, 4)
    saved = json.loads(path.read_text())
    assert isinstance(saved, dict) and saved[key]["k"] == choice.k
