"""The conditioning net pretrained alone (bpd_sr.training.condfit): its Gaussian head, the command,
resume, and that only the conditioning net changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bpd_sr.cli import main
from bpd_sr.config import ModelConfig
from bpd_sr.decoding.rules import apply_rule
from bpd_sr.io.pretrained import load_checkpoint, load_pretrained, save_checkpoint
from bpd_sr.model.conditioning import ConditioningNet
from bpd_sr.model.transformer import ImageTransformer


def test_gaussian_head_is_a_discretised_gaussian():
    torch.manual_seed(0)
    net = ConditioningNet(8, 1, head="gaussian").double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
        net.out.bias.normal_(0, 0.3)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    logits = net(lr)  # (2, 3072, 256)
    assert logits.shape == (2, 3072, 256)
    # recompute mu and sigma the slow way and compare with -(i - mu)^2 / (2 sigma^2)
    x = lr.permute(0, 3, 1, 2).double()
    y = net.stem(x / 127.5 - 1.0)
    for block in net.res:
        y = y + block(y)
    y = net.out(net.up(y))
    mu = x.repeat_interleave(4, 2).repeat_interleave(4, 3) + 32.0 * y[:, :3]
    sigma = 8.0 * torch.exp(y[:, 3:].clamp(-2.8, 3.0))
    mu = mu.permute(0, 2, 3, 1).reshape(2, 3072, 1)
    sigma = sigma.permute(0, 2, 3, 1).reshape(2, 3072, 1)
    ref = -0.5 * ((torch.arange(256.0, dtype=torch.float64) - mu) / sigma) ** 2
    assert torch.allclose(logits, ref, atol=1e-6)
    # its expected intensity is mu (rounded) where mu is well inside the range
    inside = ((mu > 40) & (mu < 215) & (sigma < 10))[..., 0]
    assert inside.any()
    assert torch.equal(apply_rule(logits, "mean")[inside], torch.round(mu[..., 0][inside]).long())


def test_a_new_gaussian_net_starts_at_the_input_pixel():
    net = ConditioningNet(8, 1, head="gaussian")
    # away from 0 and 255, where the range cuts the Gaussian (sigma 8) and biases its mean
    lr = torch.randint(40, 216, (1, 8, 8, 3), dtype=torch.uint8)
    img = apply_rule(net(lr), "mean").view(1, 32, 32, 3)
    nearest = lr.repeat_interleave(4, 1).repeat_interleave(4, 2).long()
    assert torch.equal(img, nearest)


def test_old_checkpoints_keep_their_conditioning_net(tmp_path):
    """A checkpoint written before cond_blocks / cond_up_channels / cond_head existed loads
    as the net it was (2 blocks, full-width upsampling, 256 logits), weights and all."""
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", cond_blocks=2, cond_head="logits")).eval()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "new.pt", model))
    for key in ("cond_blocks", "cond_up_channels", "cond_head"):
        ckpt["model_config"].pop(key)
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_pretrained(tmp_path / "old.pt")
    assert (old.cfg.cond_blocks, old.cfg.cond_up_channels, old.cfg.cond_head) == (2, 0, "logits")
    lr = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(old.conditioning_logits(lr), model.conditioning_logits(lr))


def test_fit_cond_changes_only_the_conditioning_net_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces.npz"
    blocks = np.repeat(np.repeat(rng.integers(40, 200, (12, 8, 8, 3)), 4, 1), 4, 2)
    noisy = blocks + rng.integers(-6, 7, blocks.shape)  # not exactly the input upsampled
    np.savez(faces, images=noisy.clip(0, 255).astype(np.uint8))
    torch.manual_seed(0)
    init = save_checkpoint(tmp_path / "init.pt", ImageTransformer(ModelConfig.preset("tiny", k=2)))
    out = tmp_path / "run"
    args = ["fit-cond", "--data", faces, "--init", init, "--out", out, "--width", "8",
            "--blocks", "1", "--batch-size", "4", "--n-val", "4", "--eval-every", "3", "--quiet"]
    res = CliRunner().invoke(main, [str(a) for a in args + ["--steps", "3"]])
    assert res.exit_code == 0, res.output
    # the same folder again without --resume: refused, nothing overwritten
    res = CliRunner().invoke(main, [str(a) for a in args + ["--steps", "3"]])
    assert res.exit_code != 0 and "--resume" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, [str(a) for a in ["fit-cond", "--data", faces, "--init", init,
                                                     "--out", out, "--resume", "--quiet"]])
    assert res.exit_code == 0, res.output  # resumes a finished run: nothing to do, same file
    model = load_pretrained(out / "cond.pt")
    assert model.cfg.cond_head == "gaussian" and model.cfg.cond_channels == 8
    base = load_pretrained(init)
    for name, p in base.state_dict().items():
        if not name.startswith("cond."):
            assert torch.equal(p, model.state_dict()[name]), name
    log = load_checkpoint(out / "cond.pt")["about"]["log"]
    assert [e["step"] for e in log] == [3]
    assert 0 < log[0]["val_psnr"] < 100


@pytest.mark.parametrize("args, message", [
    (["--resume"], "nothing to resume"),
    (["--steps", "0"], "--steps"),
    (["--width", "0"], "--width"),
    (["--rotated-share", "0.5"], "needs --max-rotation"),
    (["--max-rotation", "10", "--max-zoom", "2", "--max-shift", "4"], "inside the mirrored border"),
    (["--add-blocks", "2"], "needs --keep-net"),
    (["--back-projected"], "needs the regression or psnr objective"),
    (["--hard-share", "0.25"], "--hard-share needs the regression or psnr objective"),
])
def test_fit_cond_bad_settings_are_one_line_and_no_work(tmp_path, args, message):
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=np.zeros((8, 32, 32, 3), dtype=np.uint8))
    init = save_checkpoint(tmp_path / "init.pt", ImageTransformer(ModelConfig.preset("tiny")))
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["fit-cond", "--data", str(faces), "--init", str(init),
                                    "--out", str(out), "--quiet", *args])
    assert res.exit_code != 0 and message in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert "Traceback" not in res.output and len(errors) == 1
    assert not out.exists()  # refused before any work: no run folder


@pytest.mark.parametrize("head", ["logits", "gaussian"])
def test_both_heads_plug_into_the_model(head):
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", k=2, cond_head=head, cond_blocks=3)).eval()
    lr = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    assert model.conditioning_logits(lr).shape == (1, 3072 + 2, 256)
    assert len(model.cond.res) == 3


def test_cond_scale_weighs_the_conditioning_logits_in_decoding_only():
    from dataclasses import replace

    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", k=2)).double().eval()
    lr = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    targets = torch.randint(0, 256, (1, 3072))
    logits1, aux1 = model(lr, targets)
    model.cfg = replace(model.cfg, cond_scale=2.5)
    logits2, aux2 = model(lr, targets)
    cond = model.conditioning_logits(lr)[:, :3072]
    assert torch.allclose(aux2, aux1) and torch.allclose(aux1, cond)  # the aux loss: unscaled
    # the decoder's part is the same; the conditioning part is 2.5 times as large
    assert torch.allclose(logits2 - logits1, 1.5 * _shifted(cond, 2), atol=1e-9)
    with pytest.raises(ValueError):
        ModelConfig.preset("tiny", cond_scale=0.0)


def _shifted(cond: torch.Tensor, k: int) -> torch.Tensor:
    """(1, 3072, 256) conditioning logits -> (1, 3072, k, 256): slot i reads position p + i
    (zero past the end)."""
    padded = torch.nn.functional.pad(cond, (0, 0, 0, k))
    return torch.stack([padded[:, i : i + 3072] for i in range(k)], dim=2)


def test_fit_cond_writes_the_net_that_did_best_on_held_out_faces(tmp_path, monkeypatch):
    import bpd_sr.training.condfit as condfit

    rng = np.random.default_rng(1)
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    init = save_checkpoint(tmp_path / "init.pt", ImageTransformer(ModelConfig.preset("tiny", k=2)))
    scores = iter([20.0, 25.0, 22.0])  # the held-out PSNR of evaluations 1, 2, 3
    monkeypatch.setattr(condfit, "conditioning_psnr", lambda net, val, **kw: {"val_psnr": next(scores)})
    path = condfit.run(condfit.CondFitConfig(data=str(faces), init=str(init), out=str(tmp_path / "r"),
                                             width=8, blocks=1, batch_size=4, n_val=4, steps=3,
                                             eval_every=1), progress=False)
    assert load_checkpoint(tmp_path / "r" / "best.pt")["step"] == 2
    best = load_checkpoint(tmp_path / "r" / "best.pt")["model"]
    written = load_checkpoint(path)["model"]
    assert all(torch.equal(best[n], written[n]) for n in best if n.startswith("cond."))


def test_gaussian_parameters_are_the_ones_its_logits_are_made_of():
    torch.manual_seed(0)
    net = ConditioningNet(8, 1, head="gaussian", up_width=4).double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mu, sigma = net.gaussian_parameters(lr)  # (2, 3, 32, 32) each
    assert mu.shape == sigma.shape == (2, 3, 32, 32)
    assert net.up[0].out_channels == 16 and net.out.in_channels == 4  # the narrower path
    mu_r, sigma_r = (t.permute(0, 2, 3, 1).reshape(2, 3072, 1) for t in (mu, sigma))
    ref = -0.5 * ((torch.arange(256.0, dtype=torch.float64) - mu_r) / sigma_r) ** 2
    assert torch.allclose(net(lr), ref, atol=1e-6)
    with pytest.raises(ValueError, match="gaussian"):
        ConditioningNet(8, 1, head="logits").gaussian_parameters(lr)


def test_the_net_alone_is_reported_by_its_mu_as_well_as_its_expected_intensity():
    """evaluate's "cond net (mu)" row: mu clipped and rounded, which the expected intensity
    equals inside the range and not where the range cuts a tail."""
    from bpd_sr.evaluation.metrics import quality, upscale_bicubic
    from bpd_sr.evaluation.quality import baseline_rows
    from bpd_sr.model.tokens import downsample
    from bpd_sr.training.condfit import conditioning_images, conditioning_mu_images

    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", cond_blocks=1,
                                                cond_head="gaussian")).eval()
    with torch.no_grad():
        model.cond.out.weight.normal_(0, 0.05)
    hr = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    hr[0] //= 32  # a dark face: mu within a sigma of black
    lr = downsample(hr)
    mu = model.cond.gaussian_parameters(lr)[0].detach()  # (3, 3, 32, 32)
    got = conditioning_mu_images(model.cond, lr, batch_size=2)  # two batches
    assert got.dtype == torch.uint8 and got.shape == (3, 32, 32, 3)
    assert torch.equal(got, mu.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    mean = conditioning_images(model.cond, lr)
    edge = mu.permute(0, 2, 3, 1) < 4  # sigma is about 8 levels
    assert edge.any() and (mean[edge] > got[edge]).all()  # the cut tail pulls the mean in
    bicubic = quality(upscale_bicubic(lr.numpy()), hr.numpy())
    rows = baseline_rows(model, hr, 2, bicubic, back_projection=False)  # the net as it is
    rows = {r["method"]: r for r in rows}
    assert rows["cond net (mu)"]["psnr"] == pytest.approx(float(quality(got.numpy(),
                                                                         hr.numpy())["psnr"]))
    logits = ImageTransformer(ModelConfig.preset("tiny", cond_head="logits")).eval()
    names = [r["method"] for r in baseline_rows(logits, hr, 2, bicubic)]
    assert "cond net (mean)" in names and "cond net (mu)" not in names  # mu: Gaussian only


def test_regression_loss_fits_mu_by_squared_error_and_sigma_by_likelihood():
    from bpd_sr.training.condfit import regression_loss

    hr = torch.full((1, 32, 32, 3), 100, dtype=torch.uint8)
    mu = torch.full((1, 3, 32, 32), 104.0, requires_grad=True)
    log_sigma = torch.full((1, 3, 32, 32), 0.0, requires_grad=True)
    loss, stats = regression_loss(mu, log_sigma.exp(), hr)
    loss.backward()
    # d/dmu of ((mu - t) / 32)^2 only: the likelihood term does not move mu
    assert torch.allclose(mu.grad, torch.full_like(mu, 2 * 4 / 32**2 / mu.numel()))
    # sigma = 1 with an error of 4 levels: the likelihood wants sigma larger
    assert (log_sigma.grad < 0).all()
    assert stats["mse"] == pytest.approx((4 / 32) ** 2)


def test_psnr_objective_weighs_each_face_by_its_inverse_error():
    from bpd_sr.training.condfit import regression_loss

    hr = torch.full((2, 32, 32, 3), 100, dtype=torch.uint8)
    mu = torch.stack([torch.full((3, 32, 32), 104.0), torch.full((3, 32, 32), 108.0)])
    grads = {}
    for per_face_log in (False, True):
        m = mu.clone().requires_grad_(True)
        loss, stats = regression_loss(m, torch.ones_like(m), hr, per_face_log=per_face_log)
        loss.backward()
        grads[per_face_log] = m.grad[:, 0, 0, 0]
        assert stats["mse"] == pytest.approx(((4 / 32) ** 2 + (8 / 32) ** 2) / 2)
    # squared error: a face's pull grows with its error (4 and 8 levels: 1 : 2)
    assert grads[False][1] / grads[False][0] == pytest.approx(2.0)
    # the mean log error: d log(e^2) / d mu = 2 / e, so the nearer face pulls twice as hard
    assert grads[True][0] / grads[True][1] == pytest.approx(2.0)
    # scaled by the batch's mean squared error (equal errors: the plain loss's gradient)
    mse = ((4 / 32) ** 2 + (8 / 32) ** 2) / 2
    n = 3 * 32 * 32
    assert grads[True][0] == pytest.approx(mse * 2 / 4 / n / 2, rel=1e-5)


def test_hard_faces_weigh_more_and_the_loss_keeps_its_scale():
    """--hard-share: the faces of lowest gain over bicubic weigh (1 + hard_weight) times the
    rest, the weights averaging 1; equal weights are the plain loss."""
    from bpd_sr.training.condfit import hardest_faces, regression_loss

    gain = torch.tensor([2.0, -0.4, 3.0, 0.5, 1.0, 1.0, 4.0, 0.1])
    w = hardest_faces(gain, 0.25, 3.0)  # 2 of 8 faces: the ones at -0.4 and 0.1 dB
    assert w.mean() == pytest.approx(1.0)
    assert torch.equal(w > 1, torch.tensor([0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool))
    assert w[1] / w[0] == pytest.approx(4.0)
    assert torch.equal(hardest_faces(gain, 0.0, 3.0), torch.ones(8))
    hr = torch.full((2, 32, 32, 3), 100, dtype=torch.uint8)
    mu = torch.stack([torch.full((3, 32, 32), 104.0), torch.full((3, 32, 32), 108.0)])
    for per_face_log in (False, True):
        grads = []
        for weights in (None, torch.ones(2), torch.tensor([0.5, 1.5])):
            m = mu.clone().requires_grad_(True)
            regression_loss(m, torch.ones_like(m), hr, per_face_log=per_face_log,
                            face_weights=weights)[0].backward()
            grads.append(m.grad[:, 0, 0, 0])
        assert torch.equal(grads[0], grads[1])
        # weights 0.5 : 1.5 scale each face's pull by them
        assert torch.allclose(grads[2], grads[0] * torch.tensor([0.5, 1.5]))


def test_gain_over_bicubic_matches_evaluates_psnr_gain():
    from bpd_sr.evaluation.metrics import quality, upscale_bicubic
    from bpd_sr.model.tokens import downsample
    from bpd_sr.training.condfit import gain_over_bicubic

    rng = np.random.default_rng(0)
    hr = torch.as_tensor(rng.integers(60, 200, (3, 32, 32, 3), dtype=np.uint8))
    lr = downsample(hr)
    bicubic = torch.as_tensor(upscale_bicubic(lr.numpy()))
    assert torch.allclose(gain_over_bicubic(bicubic, hr, lr), torch.zeros(3, dtype=torch.float64))
    nearer = ((bicubic.double() + hr.double()) / 2).round().to(torch.uint8)
    as_levels = nearer.permute(0, 3, 1, 2).float()  # the loss's layout gives the same gain
    gain = gain_over_bicubic(nearer, hr, lr)
    assert torch.allclose(gain, gain_over_bicubic(as_levels, hr, lr))
    ours = quality(nearer.numpy(), hr.numpy())["psnr_per_image"]
    theirs = quality(bicubic.numpy(), hr.numpy())["psnr_per_image"]
    assert np.allclose(gain.numpy(), np.array(ours) - np.array(theirs), atol=1e-6)
    assert (gain > 4).all()  # half the error: about 6 dB


@pytest.mark.parametrize("objective", ["regression", "psnr"])
def test_fit_cond_regression_objectives_with_a_narrow_upsampling_path(tmp_path, objective):
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=rng.integers(30, 220, (10, 32, 32, 3), dtype=np.uint8))
    init = save_checkpoint(tmp_path / "init.pt", ImageTransformer(ModelConfig.preset("tiny", k=2)))
    args = ["fit-cond", "--data", faces, "--init", init, "--width", "8", "--blocks", "1",
            "--batch-size", "4", "--n-val", "2", "--eval-every", "2", "--steps", "2", "--quiet"]
    res = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "r",
                                                            "--objective", objective,
                                                            "--up-width", "4"]])
    assert res.exit_code == 0, res.output
    model = load_pretrained(tmp_path / "r" / "cond.pt")
    assert model.cfg.cond_up_channels == 4 and model.cond.out.in_channels == 4
    about = load_checkpoint(tmp_path / "r" / "cond.pt")["about"]
    assert {"mse", "nll", "val_psnr"} <= set(about["log"][0])
    assert about["cond_fit_config"]["objective"] == objective
    assert not about["cond_fit_config"]["back_projected"]
    res = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "b", "--objective",
                                                            objective, "--back-projected"]])
    assert res.exit_code == 0, res.output
    about = load_checkpoint(tmp_path / "b" / "cond.pt")["about"]
    assert about["cond_fit_config"]["back_projected"]
    assert about["log"][0]["shortfall"] > 0  # a new net's block means are not yet the input
    res = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "h", "--objective",
                                                            objective, "--hard-share", "0.5",
                                                            "--hard-weight", "2"]])
    assert res.exit_code == 0, res.output
    about = load_checkpoint(tmp_path / "h" / "cond.pt")["about"]
    assert about["cond_fit_config"]["hard_share"] == 0.5
    assert about["cond_fit_config"]["hard_weight"] == 2.0
    assert "lowest_gain" in about["log"][0] and "val_lowest_gain" in about["log"][0]
    res = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "s", "--head",
                                                            "logits", "--objective", objective]])
    assert res.exit_code != 0 and f"the {objective} objective needs the gaussian head" in res.output


def test_detached_scale_trains_only_the_scale_outputs():
    torch.manual_seed(0)
    net = ConditioningNet(8, 1, head="gaussian", up_width=4)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mu, sigma = net.gaussian_parameters(lr, detach_scale=True)
    ref_mu, ref_sigma = net.gaussian_parameters(lr)
    assert torch.equal(mu, ref_mu) and torch.allclose(sigma, ref_sigma)
    sigma.sum().backward()
    assert net.stem.weight.grad is None or not net.stem.weight.grad.any()
    assert net.out.weight.grad[3:].abs().sum() > 0 and not net.out.weight.grad[:3].any()


def test_fit_cond_can_fine_tune_the_init_net_itself(tmp_path):
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=rng.integers(30, 220, (10, 32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    base = ImageTransformer(ModelConfig.preset("tiny", k=2, cond_head="gaussian", cond_blocks=1))
    init = save_checkpoint(tmp_path / "init.pt", base)
    args = ["fit-cond", "--data", faces, "--init", init, "--keep-net", "--width", "99",
            "--batch-size", "4", "--n-val", "2", "--eval-every", "2", "--steps", "2",
            "--objective", "regression", "--reframed-share", "0.5", "--max-rotation", "10",
            "--rotated-share", "0.25", "--color-share", "0.5", "--weight-decay", "0.01",
            "--quiet", "--out", tmp_path / "r"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    model = load_pretrained(tmp_path / "r" / "cond.pt")
    assert model.cfg.cond_channels == base.cfg.cond_channels  # the init's shape, not --width
    about = load_checkpoint(tmp_path / "r" / "cond.pt")["about"]["cond_fit_config"]
    assert about["max_rotation"] == 10.0 and about["reframed_share"] == 0.5
    assert about["rotated_share"] == 0.25
    assert about["color_share"] == 0.5 and about["weight_decay"] == 0.01
    # the recolouring draws resume where they stopped, like the framing draws
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert last["color_rng"].shape == last["rng"].shape
    before = base.cond.stem.weight
    assert model.cond.stem.weight.shape == before.shape
    # two small steps from the init's weights: close to them, yet moved
    assert torch.allclose(model.cond.stem.weight, before, atol=0.05)
    assert not torch.equal(model.cond.stem.weight, before)


@pytest.mark.parametrize("head", ["gaussian", "logits"])
def test_flip_average_is_the_mean_of_the_face_and_its_mirror_image(head):
    torch.manual_seed(0)
    net = ConditioningNet(8, 1, head=head).double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mirror = lr.flip(2)  # (B, 8, 8, 3): columns reversed
    plain, plain_mirror = net(lr), net(mirror)
    net.flip_average = True
    averaged = net(lr)
    # logits in raster order (row, col, colour): mirror the columns back, then average
    back = plain_mirror.view(2, 32, 32, 3, 256).flip(2).reshape(2, 3072, 256)
    if head == "logits":
        assert torch.allclose(averaged, 0.5 * (plain + back), atol=1e-9)
    else:  # the average is of mu and log sigma, so compare the parameters
        net.flip_average = False
        mu, sigma = net.gaussian_parameters(lr)
        mu_m, sigma_m = (t.flip(3) for t in net.gaussian_parameters(mirror))
        net.flip_average = True
        mu_a, sigma_a = net.gaussian_parameters(lr)
        assert torch.allclose(mu_a, 0.5 * (mu + mu_m), atol=1e-9)
        assert torch.allclose(sigma_a, (sigma * sigma_m).sqrt(), atol=1e-9)
    assert not torch.allclose(averaged, plain, atol=1e-3)  # the mirror run did count
    # and the averaged net is mirror-equivariant
    assert torch.allclose(net(mirror).view(2, 32, 32, 3, 256).flip(2).reshape(2, 3072, 256),
                          averaged, atol=1e-9)


def test_added_blocks_start_as_the_identity_and_then_learn(tmp_path):
    from bpd_sr.training.condfit import add_identity_blocks

    torch.manual_seed(0)
    base = ImageTransformer(ModelConfig.preset("tiny", k=2, cond_head="gaussian", cond_blocks=1))
    with torch.no_grad():  # the head starts at zero, which would hide any change
        base.cond.out.weight.normal_(0, 0.05)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    before = base.cond(lr)
    add_identity_blocks(base, 2)
    assert len(base.cond.res) == 3 and base.cfg.cond_blocks == 3
    assert torch.equal(base.cond(lr), before)  # deeper, the same function
    with torch.no_grad():  # and the new blocks do reach the output once they move
        base.cond.res[2][3].bias.fill_(0.1)
    assert not torch.allclose(base.cond(lr), before)
    init = save_checkpoint(tmp_path / "init.pt", ImageTransformer(
        ModelConfig.preset("tiny", k=2, cond_head="gaussian", cond_blocks=1)))
    rng = np.random.default_rng(0)
    faces = tmp_path / "faces.npz"
    np.savez(faces, images=rng.integers(30, 220, (10, 32, 32, 3), dtype=np.uint8))
    args = ["fit-cond", "--data", faces, "--init", init, "--keep-net", "--add-blocks", "2",
            "--batch-size", "4", "--n-val", "2", "--eval-every", "2", "--steps", "2",
            "--objective", "regression", "--lr", "1e-2", "--quiet", "--out", tmp_path / "r"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    model = load_pretrained(tmp_path / "r" / "cond.pt")  # loads at its new depth
    assert model.cfg.cond_blocks == 3 and len(model.cond.res) == 3
    assert model.cond.res[2][3].weight.abs().sum() > 0  # the new blocks trained
    # resuming the finished run rebuilds the same deeper net from the init
    res = CliRunner().invoke(main, ["fit-cond", "--data", str(faces), "--init", str(init),
                                    "--out", str(tmp_path / "r"), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output
