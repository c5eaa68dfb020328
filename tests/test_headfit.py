"""Head distillation on cached decoder states (bpd_sr.training.headfit): the cached states are the
decode-time states, fitting touches only the heads and makes them agree more, the command
resumes its decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bpd_sr.cli import main
from bpd_sr.config import ModelConfig
from bpd_sr.decoding.loop import blockwise_parallel_decode, sequential_decode
from bpd_sr.io.pretrained import load_checkpoint, load_pretrained, save_checkpoint
from bpd_sr.model.transformer import ImageTransformer
from bpd_sr.training.headfit import decode_states, fit_heads, head_agreement


@pytest.fixture(scope="module")
def decoded():
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", k=4)).double().eval()
    lr = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    # argmax: a random tiny model's expected intensities are all near 127 (its distributions
    # are flat), which leaves nothing to learn; the rule's plumbing is tested below
    return model, lr, sequential_decode(model, lr, rule="argmax").images


def test_cached_states_give_the_exact_acceptance_of_real_decoding(decoded):
    model, lr, images = decoded
    data = decode_states(model, lr, images, progress=False)
    stats = head_agreement(model, data, rule="argmax")
    assert stats["agree_exact"][0] == 1.0  # slot 0 is the base: it reproduces greedy
    assert 0 < stats["base_top1_prob"] < stats["base_mass_eps2"] <= 1
    # the estimate walks the heads' own proposals (no refinement from the verify pass)
    real = blockwise_parallel_decode(model, lr, k=4, epsilon=0, rule="argmax", refine=None)
    assert torch.equal(real.images, images)
    assert stats["exact_block"] == pytest.approx(real.mean_accepted, abs=1e-4)


def test_fit_heads_changes_only_the_heads_and_raises_agreement(decoded):
    model, lr, images = decoded
    model = ImageTransformer(model.cfg)  # float32: fitting runs as it does for real
    model.load_state_dict(decoded[0].state_dict())
    images = sequential_decode(model, lr, rule="argmax").images
    data = decode_states(model, lr, images, progress=False)
    before = head_agreement(model, data, rule="argmax")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("heads.")}
    heads = {n: p.clone() for n, p in model.named_parameters() if n.startswith("heads.")}
    history = fit_heads(model, data, data, steps=150, batch_images=3, positions=512,
                        lr=3e-3, warmup_steps=10, eval_every=150, progress=False, rule="argmax")
    after = history[-1]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, heads[n]) for n, p in model.named_parameters() if n in heads)
    gain = np.mean(after["agree_exact"][1:]) - np.mean(before["agree_exact"][1:])
    assert gain > 0.01, (before, after)
    assert after["exact_block"] > before["exact_block"]
    assert torch.equal(sequential_decode(model, lr, rule="argmax").images, images)  # base untouched


def test_mean_rule_agreement_and_value_loss(decoded):
    """Under the mean rule the states of mean decodes reproduce them in slot 0, and the
    value loss trains the heads' expected intensities toward the decoded tokens."""
    from bpd_sr.decoding.rules import expected_intensity

    model, lr, _ = decoded
    model = ImageTransformer(model.cfg)
    model.load_state_dict(decoded[0].state_dict())
    images = sequential_decode(model, lr, rule="mean").images
    data = decode_states(model, lr, images, progress=False)
    assert head_agreement(model, data, rule="mean")["agree_exact"][0] == 1.0

    def value_error():
        from bpd_sr.training.headfit import _slot_logits, _targets

        idx = torch.arange(len(data))
        pos = torch.arange(3072).expand(len(idx), -1)
        with torch.no_grad():
            logits = _slot_logits(model, data, idx, pos, 4)[:, :, 1:]
        tgt, valid = _targets(data, idx, pos, 4)
        err = (expected_intensity(logits) - tgt[:, :, 1:]).abs()[valid[:, :, 1:]]
        return float(err.mean())

    before = value_error()
    fit_heads(model, data, None, steps=60, batch_images=3, positions=512, lr=3e-3,
              warmup_steps=5, progress=False, rule="mean", value_loss_weight=1.0)
    assert value_error() < before


def test_fit_heads_command_resumes_decodes_and_writes_a_loadable_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base.pt", ImageTransformer(ModelConfig.preset("tiny")))
    out = tmp_path / "run"
    out.mkdir()
    # a run killed after its first batch of decodes left them here; they must be reused
    # (decodes made with another decoding rule must not: test_distill_cache_keeps_its_rule)
    np.savez(out / "decodes.npz.partial.npz", images=np.full((2, 32, 32, 3), 7, np.uint8),
             rule=np.array("mean"))
    args = ["fit-heads", "--data", str(faces), "--init", str(base), "--out", str(out),
            "--k", "3", "--n-faces", "5", "--n-val", "2", "--decode-batch", "2",
            "--steps", "4", "--batch-images", "2", "--positions", "64", "--eval-every", "2",
            "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    decodes = np.load(out / "decodes.npz")["images"]
    assert decodes.shape == (5, 32, 32, 3) and (decodes[:2] == 7).all() and not (decodes[2:] == 7).all()
    assert not (out / "decodes.npz.partial.npz").exists()
    model = load_pretrained(out / "heads.pt")
    assert model.cfg.k == 3
    about = load_checkpoint(out / "heads.pt")["about"]
    assert about["head_fit_config"]["n_faces"] == 5
    assert [e["step"] for e in about["log"]] == [0, 2, 4]
    base_model = load_pretrained(base)
    for name, p in base_model.state_dict().items():
        if not name.startswith("heads."):
            assert torch.equal(p, model.state_dict()[name]), name


def test_fit_heads_command_rejects_a_held_out_set_as_large_as_the_data(tmp_path):
    base = save_checkpoint(tmp_path / "base.pt", ImageTransformer(ModelConfig.preset("tiny")))
    result = CliRunner().invoke(main, ["fit-heads", "--data", "x.npz", "--init", str(base),
                                       "--n-faces", "4", "--n-val", "4", "--quiet"])
    assert result.exit_code != 0
    assert "held-out" in result.output and "Traceback" not in result.output


def test_warm_start_with_another_k_keeps_the_base_and_starts_new_heads(tmp_path):
    from bpd_sr.io.pretrained import warm_start

    torch.manual_seed(0)
    src = ImageTransformer(ModelConfig.preset("tiny", k=4))
    path = save_checkpoint(tmp_path / "k4.pt", src, dtype=torch.bfloat16)
    same, _ = warm_start(path)
    assert same.cfg.k == 4
    assert torch.equal(same.heads.fc.weight, src.heads.fc.weight.bfloat16().float())
    other, ckpt = warm_start(path, k=2)
    assert other.cfg.k == 2 and ckpt["model_config"]["k"] == 4
    assert torch.equal(other.out_proj.weight, src.out_proj.weight.bfloat16().float())
    assert other.heads.fc.weight.shape != src.heads.fc.weight.shape


def test_distill_cache_keeps_its_rule(tmp_path):
    """Cached decodes are reused only by a run with the same decoding rule."""
    from bpd_sr.training.distill import distill_targets

    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny")).eval()
    faces = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    cache = tmp_path / "decodes.npz"
    np.savez(cache, images=np.full((2, 32, 32, 3), 7, np.uint8), rule=np.array("argmax"))
    assert (distill_targets(model, faces, cache, progress=False, rule="argmax") == 7).all()
    fresh = distill_targets(model, faces, cache, progress=False, rule="mean")
    assert not (fresh == 7).all()
    assert str(np.load(cache)["rule"]) == "mean"
