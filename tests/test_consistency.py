"""Back-projection of a decode onto its input (bpd_sr.decoding.consistency)."""

from __future__ import annotations

import torch

from bpd_sr.decoding.consistency import back_project
from bpd_sr.decoding.loop import blockwise_parallel_decode
from bpd_sr.evaluation.quality import quality_rows
from bpd_sr.model.tokens import downsample
from bpd_sr.upscale import DecodeSettings, decode
from tests.conftest import random_lr, tiny_model


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def _sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image sum of squared differences of two uint8 (N, 32, 32, 3) batches."""
    return (a.double() - b.double()).pow(2).flatten(1).sum(1)


def test_the_output_agrees_with_the_input():
    truth = (_faces(4).int() * 3 // 4 + 32).to(torch.uint8)  # 32 .. 223: nothing to clip
    lr = downsample(truth)
    noise = torch.randint(-20, 21, truth.shape, generator=torch.Generator().manual_seed(2))
    out = back_project((truth.int() + noise + 7).to(torch.uint8), lr)
    assert out.dtype == torch.uint8 and out.shape == (4, 32, 32, 3)
    # every block's mean is its input pixel, up to the rounding of 16 pixels and of the input
    gap = (downsample(out).int() - lr.int()).abs()
    assert gap.max() <= 1 and (gap == 0).float().mean() > 0.8
    # an image that already agrees (blocks constant at their input pixel) is left alone
    lr = random_lr(4)
    blocky = lr.repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(back_project(blocky, lr), blocky)


def test_it_brings_any_image_nearer_the_truth():
    """The truth's block means are its input, so projecting onto that set never moves an
    image away from it: whether the image was a near miss or unrelated noise."""
    truth = _faces(8, seed=1)
    lr = downsample(truth)
    noise = torch.randint(-20, 21, truth.shape, generator=torch.Generator().manual_seed(2))
    near = (truth.int() + noise + 7).clamp(0, 255).to(torch.uint8)  # off by a bias, too
    # the near miss loses its bias; noise loses only its block means (1/16 of it)
    for image, most in ((near, 0.8), (_faces(8, seed=3), 0.97)):
        before, after = _sq_error(image, truth), _sq_error(back_project(image, lr), truth)
        # rounding the projected pixels may cost up to a quarter level^2 each
        assert (after <= before + 0.25 * 3072).all()
        assert after.sum() < most * before.sum()


def test_upscale_back_projects_by_default_and_can_leave_the_decode_alone():
    model = tiny_model(k=4)
    lr = random_lr(1, seed=5)
    raw = blockwise_parallel_decode(model, lr, k=4, epsilon=1)
    off = decode(model, lr, DecodeSettings(k=4, epsilon=1, back_projection=False))
    on = decode(model, lr, DecodeSettings(k=4, epsilon=1))
    assert torch.equal(off.images, raw.images)
    assert torch.equal(on.images, back_project(raw.images, lr))
    assert on.steps == raw.steps  # the decode itself is the same
    assert "back-projected" in DecodeSettings().method
    assert "back-projected" not in DecodeSettings(back_projection=False).method


def test_evaluate_measures_the_model_rows_back_projected(monkeypatch):
    import bpd_sr.evaluation.quality as evaluation

    model = tiny_model(k=4, cond_head="gaussian", cond_blocks=1)
    with torch.no_grad():  # the head starts at mu = the input pixel, which already agrees
        model.cond.out.weight.normal_(0, 0.05)
    hr = _faces(3, seed=4)

    def decode_all(model, lr, m, refine, seed, batch_size):  # a decode off by a bias
        images = (hr.int() + 9).clamp(0, 255).to(torch.uint8)
        return images, [torch.ones(3072, dtype=torch.long)] * len(lr), 3072 * len(lr), 0.0

    monkeypatch.setattr(evaluation, "decode_all", decode_all)
    kw = dict(ks=[4], epsilons=[1], rules=["mean"], batch_size=3)
    on = {r["method"]: r for r in quality_rows(model, hr, **kw)}
    off = {r["method"]: r for r in quality_rows(model, hr, back_projection=False, **kw)}
    assert on.keys() == off.keys()
    for name in ("bicubic", "lanczos"):  # the references stay as they are
        assert on[name]["psnr"] == off[name]["psnr"]
    for name in ("cond net (mean)", "cond net (mu)", "sequential (mean)", "k=4 eps=1 (mean)"):
        assert on[name]["psnr"] > off[name]["psnr"], name
        assert on[name]["as_decoded"]["psnr"] == off[name]["psnr"], name
        assert "as_decoded" not in off[name]


def test_block_shift_is_blind_to_block_means_and_keeps_the_detail():
    """What fit-cond --back-projected trains through: the output's block means are the input
    whatever the image's were, so a loss on it gives the block means no gradient, while the
    detail inside each block passes unchanged."""
    from bpd_sr.decoding.consistency import block_shift

    lr = downsample(_faces(2, seed=3))
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255).double()
    x.requires_grad_(True)
    out = block_shift(x, lr)
    means = torch.nn.functional.avg_pool2d(out, 4)
    assert torch.allclose(means, lr.permute(0, 3, 1, 2).double())
    offset = torch.randn(2, 3, 8, 8, dtype=torch.float64).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.allclose(block_shift(x + offset, lr), out)  # a block's own level is ignored
    target = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 255
    (out - target).pow(2).sum().backward()
    assert torch.allclose(torch.nn.functional.avg_pool2d(x.grad, 4), torch.zeros_like(means),
                          atol=1e-9)
    assert x.grad.abs().sum() > 0
