"""bpd_sr.evaluation.metrics: PSNR / SSIM conventions and baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bpd_sr.evaluation.metrics import (
    psnr,
    quality,
    ssim,
    upscale_bicubic,
    upscale_lanczos,
)


def _noise(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_of_known_mse() -> None:
    ref = np.full((32, 32, 3), 100, np.uint8)
    pred = ref.copy()
    pred[::2] += 10  # half the values off by 10: MSE = 50
    assert psnr(pred, ref) == pytest.approx(10 * math.log10(255**2 / 50), abs=1e-9)


def test_psnr_identical_is_inf_without_warning() -> None:
    img = _noise(32, 32, 3)
    with np.errstate(all="raise"):
        assert psnr(img, img) == math.inf


def test_psnr_accepts_tensors() -> None:
    ref = np.zeros((32, 32, 3), np.uint8)
    pred = np.full((32, 32, 3), 255, np.uint8)
    assert psnr(torch.from_numpy(pred), torch.from_numpy(ref)) == pytest.approx(0.0)


def test_ssim_identical_is_one_and_noise_is_low() -> None:
    img = _noise(32, 32, 3)
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(_noise(32, 32, 3, seed=1), img) < 0.1


def test_ssim_uses_gaussian_window_convention() -> None:
    # The documented settings, not skimage's defaults (7x7 uniform window, sample covariance).
    from skimage.metrics import structural_similarity

    ref, pred = _noise(32, 32, 3), _noise(32, 32, 3, seed=2)
    pred = ((ref.astype(int) + pred) // 2).astype(np.uint8)  # correlated with ref
    expected = structural_similarity(
        ref, pred, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip
    default = structural_similarity(ref, pred, channel_axis=-1, data_range=255)
    assert ssim(pred, ref) == pytest.approx(expected)
    assert ssim(pred, ref) != pytest.approx(default)


def test_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        psnr(np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError):
        ssim(np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.float32))


def test_quality_means_and_per_image() -> None:
    ref = _noise(3, 32, 32, 3)
    pred = ref.copy()
    pred[1] = 255 - pred[1]
    pred[2, :, :, 0] = 0
    q = quality(pred, ref)
    assert q["n"] == 3
    assert q["psnr_per_image"].shape == (3,) and q["ssim_per_image"].shape == (3,)
    assert q["psnr_per_image"][0] == math.inf and q["psnr"] == math.inf  # kept, not capped
    assert q["ssim"] == pytest.approx(q["ssim_per_image"].mean())
    assert q["psnr_per_image"][1] == pytest.approx(psnr(pred[1], ref[1]))
    assert q["ssim_per_image"][2] == pytest.approx(ssim(pred[2], ref[2]))


@pytest.mark.parametrize("upscale", [upscale_bicubic, upscale_lanczos])
def test_baselines_shape_and_constant_image(upscale) -> None:
    lr = _noise(5, 8, 8, 3)
    hr = upscale(lr)
    assert hr.shape == (5, 32, 32, 3) and hr.dtype == np.uint8
    const = np.full((2, 8, 8, 3), 137, np.uint8)
    assert (upscale(const) == 137).all()
    # A single image works too, and agrees with the batched result.
    np.testing.assert_array_equal(upscale(lr[3]), hr[3])


def test_baselines_differ_and_track_the_input() -> None:
    lr = _noise(2, 8, 8, 3)
    bic, lan = upscale_bicubic(lr), upscale_lanczos(lr)
    assert not np.array_equal(bic, lan)
    # Downsampling the upscaled image again lands near the input.
    back = bic.reshape(2, 8, 4, 8, 4, 3).astype(float).mean(axis=(2, 4))
    assert np.abs(back - lr).mean() < 20
