"""Could the faces the shipped net doubts be drawn towards a net trained to hedge on hard faces
(`fit-cond --hard-share`) rather than towards bicubic? The doubt is session 17's signal
(`bicubic_blend.py`): the shipped net's departure from bicubic, d = mean |mu - bicubic| /
sigma, input-only. For a face with d below a quantile d0 of the held-out faces' departures,
the image is the fallback plus the shipped net's step away from it scaled by
min(1, d / d0) ** p (p = inf: a switch). Fallbacks: bicubic and each hedging net given. Each
net mirror-averaged as shipped, read as mu; every image back-projected, as `upscale` writes
it. On 256 held-out training faces (the last 256 of train_32.npz), the first 256 standard and
looser test faces, then all of them: mean PSNR / SSIM, faces below bicubic, the lowest gain.
The exploration that led to ``bpd-sr fit-switch``; it reads bicubic as `evaluate` does (PIL),
the shipped switch (``ConditioningNet``) with torch's bicubic, so its thresholds differ a
little: `back_projected_training.py` scores the switched checkpoints themselves.

usage: python docs/results/gated_hedging.py TRAIN_32.npz TEST_32.npz TEST_LOOSE_32.npz CKPT_SHIPPED CKPT_HEDGING [CKPT_HEDGING ...]
"""
import sys

import numpy as np
import torch
from scored_subsets import scored_subsets

from bpd_sr.decoding.consistency import back_project
from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image

torch.set_num_threads(1)
train, test, loose = sys.argv[1:4]
subsets = scored_subsets(train, test, loose)


def load(path: str):
    net = warm_start(path)[0].eval().cond
    net.flip_average = True
    return net


def score(image_mu: torch.Tensor, lr: torch.Tensor, hr: np.ndarray, base: np.ndarray) -> str:
    """mu (N, 3, 32, 32) back-projected onto lr -> 'PSNR / SSIM, faces below bicubic, the
    lowest gain' against hr, base the bicubic PSNR per face."""
    result = quality(back_project(levels_to_image(image_mu), lr).numpy(), hr)
    gain = result["psnr_per_image"] - base
    return (f"{result['psnr']:.3f} / {result['ssim']:.4f}, {int((gain < 0).sum())} below "
            f"bicubic, lowest {gain.min():+.2f}")


shipped = load(sys.argv[4])
hedging = {path: load(path) for path in sys.argv[5:]}
thresholds: dict[float, float] = {}
for name, hr in subsets.items():
    lr = downsample(torch.as_tensor(hr))
    bic = torch.as_tensor(upscale_bicubic(lr.numpy())).permute(0, 3, 1, 2).float()
    base = quality(upscale_bicubic(lr.numpy()), hr)["psnr_per_image"]
    with torch.no_grad():
        mu, sigma = shipped.gaussian_parameters(lr)
        fallbacks = {"bicubic": bic}
        fallbacks.update({path: net.gaussian_parameters(lr)[0] for path, net in hedging.items()})
    departure = ((mu - bic).abs() / sigma).mean((1, 2, 3)).numpy()
    if name == "held-out":
        thresholds = {q: float(np.quantile(departure, q)) for q in (0.05, 0.1, 0.2)}

    print(f"{name}: shipped {score(mu, lr, hr, base)}", flush=True)
    for label, fallback in fallbacks.items():
        print(f"  fallback {label} alone: {score(fallback, lr, hr, base)}", flush=True)
        for q, d0 in thresholds.items():
            for p in (1.0, 2.0, 4.0, float("inf")):
                ratio = np.minimum(1.0, departure / d0)
                scale = ratio ** p if p != float("inf") else (ratio >= 1.0).astype(float)
                scale = torch.as_tensor(scale).float()[:, None, None, None]
                image_mu = fallback + (mu - fallback) * scale
                print(f"    d0 = held-out {q:.0%} quantile ({int((departure < d0).sum())} faces "
                      f"drawn), p = {p:g}: {score(image_mu, lr, hr, base)}", flush=True)
