"""The fitted product of experts (bpd_sr.training.mixfit): per-colour conditioning weights, the decoder
temperature folded into the output layer, the fit, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from bpd_sr.cli import main
from bpd_sr.config import ModelConfig
from bpd_sr.io.pretrained import load_checkpoint, load_pretrained, save_checkpoint
from bpd_sr.model.tokens import downsample, image_to_tokens, shift_right
from bpd_sr.training.mixfit import (
    ExpertLogits,
    apply_mixture,
    choose_round,
    expert_logits,
    fit_mixture,
    fit_output_layer,
)
from tests.conftest import random_lr, tiny_model


def test_cond_scale_is_one_number_or_one_per_colour():
    assert ModelConfig.preset("tiny", cond_scale=2.0).cond_scales == (2.0, 2.0, 2.0)
    cfg = ModelConfig.preset("tiny", cond_scale=[1, 2, 3])  # as a checkpoint's JSON gives it
    assert cfg.cond_scale == (1.0, 2.0, 3.0)
    assert ModelConfig.from_dict(cfg.to_dict()).cond_scales == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="one per colour"):
        ModelConfig.preset("tiny", cond_scale=(1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        ModelConfig.preset("tiny", cond_scale=(1.0, 0.0, 2.0))


def test_each_target_gets_the_conditioning_weight_of_its_colour():
    model = tiny_model(k=3)
    lr = random_lr(2)
    raw = model.conditioning_logits(lr)  # (2, 3072 + 3, 256), unweighted
    apply_mixture(model, 1.0, (0.5, 2.0, 3.0))
    table = model.encode(lr).cond_logits
    for p, s in [(0, 0.5), (1, 2.0), (2, 3.0), (3, 0.5), (3070, 2.0), (3071, 3.0), (3073, 2.0)]:
        assert torch.allclose(table[:, p], s * raw[:, p]), p
    # the training forward still returns the net's own (unweighted) logits
    hr = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    _, cond = model(downsample(hr), image_to_tokens(hr))
    assert torch.allclose(cond, model.conditioning_logits(downsample(hr))[:, :3072])


def test_the_mixture_gives_temperature_times_decoder_plus_weighted_conditioning():
    model = tiny_model(k=3)
    hr = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    lr, tok = downsample(hr), image_to_tokens(hr)
    data = expert_logits(model, hr)
    apply_mixture(model, 0.25, (1.0, 3.0, 0.5))
    logits, _ = model(lr, tok)  # (2, 3072, 3, 256): slot 0 is the base model
    colour = torch.arange(3072) % 3
    scale = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)[colour].unsqueeze(-1)
    expected = 0.25 * data.decoder + scale * data.conditioning
    assert torch.allclose(logits[:, :, 0].double(), expected.double(), atol=1e-5)  # stored in float32
    # and the teacher-forced prefix is the true one unless another is given
    other = expert_logits(model, hr, prefix=torch.zeros_like(tok))
    assert not torch.allclose(other.decoder, expert_logits(model, hr).decoder)
    assert torch.equal(shift_right(tok)[:, 1], tok[:, 0])


@pytest.mark.parametrize("objective", ["nll", "mse"])
def test_the_fit_recovers_the_weights_that_made_the_targets(objective):
    g = torch.Generator().manual_seed(0)
    n, t = 6, 3072
    dec = torch.randn(n, t, 256, generator=g) * 2
    cond = torch.randn(n, t, 256, generator=g) * 2
    true_t, true_s = 0.5, torch.tensor([2.0, 1.0, 3.0])
    colour = torch.arange(t) % 3
    logits = true_t * dec + true_s[colour].unsqueeze(-1) * cond
    targets = torch.multinomial(torch.softmax(logits, -1).flatten(0, 1), 1, generator=g)
    data = ExpertLogits(dec, cond, targets.view(n, t))
    fitted_t, fitted_s = fit_mixture(data, objective, 1.0, (1.0, 1.0, 1.0))
    tol = 0.1 if objective == "nll" else 0.35
    assert abs(fitted_t - true_t) < tol * 2
    assert np.allclose(fitted_s, true_s.numpy(), rtol=tol)


def _fit_mixture_files(tmp_path, n_faces: int, seed: int):
    """A tiny float32 model, its checkpoint and n_faces random faces in an npz; the paths of
    the command's outputs."""
    model = tiny_model(k=3, dtype=torch.float32)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    faces = np.random.default_rng(seed).integers(0, 256, (n_faces, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "faces.npz", images=faces)
    return model, ckpt, tmp_path / "mixed.pt", tmp_path / "log.json"


def test_fit_mixture_writes_a_model_that_loads_with_its_mixture(tmp_path):
    model, ckpt, out, log = _fit_mixture_files(tmp_path, 6, seed=0)
    r = CliRunner().invoke(main, ["fit-mixture", "--data", str(tmp_path / "faces.npz"),
                                  "--checkpoint", str(ckpt), "--out", str(out), "--n-faces", "4",
                                  "--rounds", "1", "--k", "3", "--epsilon", "2", "--json",
                                  str(log), "--flip-average", "-q"])
    assert r.exit_code == 0, r.output
    rounds = json.loads(log.read_text())
    assert [e["round"] for e in rounds] == [0, 1]
    assert "fitted" in rounds[0]
    assert all(1.0 <= e["decode_tokens_per_step"] <= 3.0 for e in rounds)
    best = choose_round(rounds, 0.01)
    loaded = load_pretrained(out)
    assert loaded.cfg.cond_scales == pytest.approx(tuple(best["cond_scale"]))
    assert loaded.cfg.cond_flip_average and loaded.cond.flip_average  # saved with the model
    assert not model.cfg.cond_flip_average
    assert load_checkpoint(out)["about"]["mixture_fit"]["n_faces"] == 4
    # a k the model does not have is refused before any work
    r = CliRunner().invoke(main, ["fit-mixture", "--data", str(tmp_path / "faces.npz"),
                                  "--checkpoint", str(ckpt), "--out", str(out), "--k", "9"])
    assert r.exit_code != 0 and "proposal slots" in r.output


def test_the_round_kept_is_the_fastest_decode_within_the_psnr_tolerance():
    log = [{"round": 0, "decode_psnr": 23.70, "decode_tokens_per_step": 9.9},
           {"round": 1, "decode_psnr": 24.024, "decode_tokens_per_step": 9.80},
           {"round": 2, "decode_psnr": 24.026, "decode_tokens_per_step": 8.66}]
    assert choose_round(log, 0.0)["round"] == 2  # the best PSNR alone
    assert choose_round(log, 0.01)["round"] == 1  # as good within 0.01 dB, and faster
    assert choose_round(log, 1.0)["round"] == 0
    tie = [dict(e, decode_tokens_per_step=9.0) for e in log]
    assert choose_round(tie, 1.0)["round"] == 0  # the earliest on a tie


def test_the_output_layer_refit_recovers_a_layer_and_keeps_the_best_on_held_out_faces():
    g = torch.Generator().manual_seed(0)
    n, t, d = 8, 3072, 6
    features = torch.randn(n, t, d, generator=g)
    cond = torch.randn(n, t, 256, generator=g)
    true_w, true_b = torch.randn(256, d, generator=g), torch.randn(256, generator=g)
    colour = torch.arange(t) % 3
    scales = (1.0, 0.5, 2.0)
    logits = F.linear(features, true_w, true_b) + torch.tensor(scales)[colour].unsqueeze(-1) * cond
    # the intensity the true mixture's mean rule writes: a layer that fits it scores ~0.3
    targets = (torch.softmax(logits, -1) @ torch.arange(256.0)).round().long()
    data = ExpertLogits(F.linear(features, true_w, true_b), cond, targets, features)
    start_w, start_b = torch.zeros(256, d), torch.zeros(256)
    w, b, info = fit_output_layer(data, start_w, start_b, scales, steps=150, lr=0.05,
                                  eval_every=10)
    assert info["val_rmse_after"] < 0.9 * info["val_rmse_before"]
    assert info["step_kept"] > 0 and not torch.equal(w, start_w)
    # with no step that beats it on the held-out faces, the starting layer comes back as it is
    w, b, info = fit_output_layer(data, true_w, true_b, scales, steps=0)
    assert info["step_kept"] == 0 and torch.equal(w, true_w) and torch.equal(b, true_b)
    with pytest.raises(ValueError, match="features"):
        fit_output_layer(ExpertLogits(data.decoder, cond, data.targets), true_w, true_b, scales)


def test_fit_mixture_with_the_output_layer_keeps_the_chosen_rounds_layer(tmp_path):
    model, ckpt, out, log = _fit_mixture_files(tmp_path, 8, seed=1)
    args = ["fit-mixture", "--data", str(tmp_path / "faces.npz"), "--checkpoint", str(ckpt),
            "--out", str(out), "--rounds", "1", "--k", "3", "--epsilon", "2", "-q"]
    r = CliRunner().invoke(main, args + ["--n-faces", "8", "--output-layer", "--json", str(log)])
    assert r.exit_code == 0, r.output
    rounds = json.loads(log.read_text())
    fitted = rounds[0]["fitted"]["output_layer"]
    assert fitted["val_rmse_after"] <= fitted["val_rmse_before"]
    loaded = load_pretrained(out)
    as_it_was = model.out_proj.weight.to(torch.bfloat16).float()  # saved in bf16
    # round 0 kept: the checkpoint's own layer; round 1: the refitted one
    kept_own = torch.equal(loaded.out_proj.weight, as_it_was)
    assert kept_own == (choose_round(rounds)["round"] == 0)
    assert load_checkpoint(out)["about"]["mixture_fit"]["output_layer"] is True
    r = CliRunner().invoke(main, args + ["--n-faces", "1", "--output-layer"])
    assert r.exit_code != 0 and "--n-faces 2" in r.output and "Traceback" not in r.output
