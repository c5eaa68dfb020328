"""Image quality (PSNR / SSIM) and interpolation baselines.

Conventions (docs/method.md, "Metrics"), so that numbers compare with other super-resolution work:

- Inputs are uint8 RGB (32, 32, 3); the metrics are computed on all three channels together,
  with **no border shave** (at 32x32 a shave would drop a large share of the image).
- PSNR = ``skimage.metrics.peak_signal_noise_ratio(ref, pred, data_range=255)``:
  10 log10(255^2 / MSE), the MSE taken over all pixels and channels.
- SSIM = ``skimage.metrics.structural_similarity(ref, pred, channel_axis=-1, data_range=255,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: the Wang et al. (2004)
  settings (Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged over channels.
- Identical images have PSNR = inf. It is kept, not capped: a mean over images that contains
  an inf is inf, which says plainly that some outputs were exact copies of the reference.

Baselines: bicubic and Lanczos upscaling of the same 8x8 input with PIL ``Image.resize``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

ArrayLike = np.ndarray | torch.Tensor


def _numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of an array or a (possibly GPU) tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if pred.dtype != np.uint8 or ref.dtype != np.uint8:
        raise ValueError(f"pred and ref must be uint8, got {pred.dtype} and {ref.dtype}")
    if pred.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., 3), got {pred.shape}")


def psnr(pred: ArrayLike, ref: ArrayLike) -> float:
    """PSNR in dB of uint8 (H, W, 3) ``pred`` against ``ref``; inf when identical."""
    from skimage.metrics import peak_signal_noise_ratio  # imported here: scipy costs ~0.8 s

    pred, ref = _numpy(pred), _numpy(ref)
    _check_pair(pred, ref)
    # skimage divides by an MSE of 0 for identical images: inf is the right answer, the
    # numpy warning is noise.
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(ref, pred, data_range=255))


def ssim(pred: ArrayLike, ref: ArrayLike) -> float:
    """SSIM of uint8 (H, W, 3) ``pred`` against ``ref`` (1.0 when identical)."""
    from skimage.metrics import structural_similarity  # imported here: scipy costs ~0.8 s

    pred, ref = _numpy(pred), _numpy(ref)
    _check_pair(pred, ref)
    return float(
        structural_similarity(
            ref,
            pred,
            channel_axis=-1,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def quality(pred: ArrayLike, ref: ArrayLike) -> dict:
    """Mean and per-image PSNR / SSIM of uint8 (N, 32, 32, 3) ``pred`` against ``ref``.

    Returns {"psnr": float, "ssim": float, "psnr_per_image": float64 (N,),
    "ssim_per_image": float64 (N,), "n": N}. The PSNR mean is inf if any image is exact.
    """
    pred, ref = _numpy(pred), _numpy(ref)
    _check_pair(pred, ref)
    if pred.ndim != 4 or len(pred) == 0:
        raise ValueError(f"expected a non-empty batch (N, H, W, 3), got {pred.shape}")
    p = np.array([psnr(a, b) for a, b in zip(pred, ref, strict=True)], dtype=np.float64)
    s = np.array([ssim(a, b) for a, b in zip(pred, ref, strict=True)], dtype=np.float64)
    return {
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "psnr_per_image": p,
        "ssim_per_image": s,
        "n": len(p),
    }


def _upscale_pil(lr: ArrayLike, scale: int, resample: int) -> np.ndarray:
    """uint8 (N, h, w, 3) or (h, w, 3) -> uint8 (N, h*scale, w*scale, 3) (or unbatched)."""
    lr = _numpy(lr)
    if lr.dtype != np.uint8 or lr.ndim not in (3, 4) or lr.shape[-1] != 3:
        raise ValueError(f"lr must be uint8 (N, h, w, 3) or (h, w, 3), got {lr.dtype} {lr.shape}")
    batch = lr if lr.ndim == 4 else lr[None]
    h, w = batch.shape[1:3]
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(im)).resize((w * scale, h * scale), resample)
            )
            for im in batch
        ]
    ).astype(np.uint8)
    return out if lr.ndim == 4 else out[0]


def upscale_bicubic(lr: ArrayLike, scale: int = 4) -> np.ndarray:
    """Bicubic baseline: uint8 (N, 8, 8, 3) -> uint8 (N, 32, 32, 3) (PIL Image.BICUBIC)."""
    return _upscale_pil(lr, scale, Image.BICUBIC)


def upscale_lanczos(lr: ArrayLike, scale: int = 4) -> np.ndarray:
    """Lanczos baseline: uint8 (N, 8, 8, 3) -> uint8 (N, 32, 32, 3) (PIL Image.LANCZOS)."""
    return _upscale_pil(lr, scale, Image.LANCZOS)
