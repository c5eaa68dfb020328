"""Could the faces below bicubic be caught from the input alone and pulled towards bicubic?
For the shipped conditioning net (read as its mean mu, mirror-averaged, no back-projection) on
256 held-out training faces and the first 256 faces of a standard and a looser test set: how
well four input-only signals of the net's doubt follow each face's PSNR gain over bicubic
(correlation, and the rank of the three worst faces among 256, 0 = most doubt), and what a
blend (1 - w) mu + w bicubic, the same w for every face, does to the mean and to the worst
faces. Signals: the mean predicted sigma, the mean |mu(face) - mirror(mu(mirror(face)))|
(the two halves of the mirror average), the mean |downsample(mu) - input| (what
back-projection would correct) and the net's closeness to bicubic (minus the mean
|mu - bicubic| / sigma: the less the net departs from bicubic, the more doubt), with a
blend for the doubtful faces only (the net's step away from bicubic scaled down where that
departure is below a quantile of the held-out faces'). Last, how
many faces of the training recipe's own augmented batches (40 batches of 64 drawn from the
training faces) the net leaves below bicubic: what a loss that penalises such faces would
have to act on.

usage: python docs/results/bicubic_blend.py TRAIN_32.npz TEST_32.npz TEST_LOOSE_32.npz CKPT
       (held-out: the last 256 training faces, which fit-cond never trains on with --n-val 256)
"""
import sys

import numpy as np
import torch

from bpd_sr.config import COLOR_SEED_OFFSET
from bpd_sr.decoding.consistency import back_project
from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image
from bpd_sr.training.augment import augment_faces
from bpd_sr.training.condfit import conditioning_mu_images

torch.set_num_threads(1)


def gain_over_bicubic(net_img: np.ndarray, lr: torch.Tensor, hr) -> tuple[np.ndarray, np.ndarray]:
    """Per-face PSNR of bicubic and the net's gain over it: net_img and hr uint8 (N, 32, 32,
    3), lr uint8 (N, 8, 8, 3) -> (bicubic PSNR (N,), gain (N,))."""
    base = quality(upscale_bicubic(lr.numpy()), hr)["psnr_per_image"]
    return base, quality(net_img, hr)["psnr_per_image"] - base


train, test, loose, ckpt = sys.argv[1:5]
sets = {"held-out": np.load(train)["images"][-256:], "standard": np.load(test)["images"][:256],
        "looser": np.load(loose)["images"][:256]}
net = warm_start(ckpt)[0].eval().cond
for name, hr in sets.items():
    lr = downsample(torch.as_tensor(hr))
    with torch.no_grad():
        net.flip_average = True
        mu, sigma = net.gaussian_parameters(lr)
        net.flip_average = False
        one_side = net.gaussian_parameters(lr)[0]
        other_side = net.gaussian_parameters(lr.flip(2))[0].flip(3)
    net_img = levels_to_image(mu).numpy()
    bicubic = upscale_bicubic(lr.numpy())
    bic = torch.as_tensor(bicubic).permute(0, 3, 1, 2).float()  # (N, 3, 32, 32), as mu
    base, gain = gain_over_bicubic(net_img, lr, hr)
    worst = np.argsort(gain)[:3]
    print(f"{name}: net {base.mean() + gain.mean():.3f} dB, bicubic {base.mean():.3f}, "
          f"faces below bicubic: {int((gain < 0).sum())}, the three worst {np.round(gain[worst], 2).tolist()}")
    signals = {
        "sigma": sigma.mean((1, 2, 3)).numpy(),
        "mirror disagreement": (one_side - other_side).abs().mean((1, 2, 3)).numpy(),
        "back-projection residual": (downsample(torch.as_tensor(net_img)).float()
                                     - lr.float()).abs().mean((1, 2, 3)).numpy(),
        # small where the net stays close to bicubic: doubt, or a face bicubic already fits
        "closeness to bicubic": -((mu - bic).abs() / sigma).mean((1, 2, 3)).numpy(),
    }
    for signal, value in signals.items():
        rank = np.argsort(np.argsort(-value))
        print(f"  {signal}: correlation with the gain {np.corrcoef(value, gain)[0, 1]:+.3f}, "
              f"the worst faces' ranks {rank[worst].tolist()}")
    for w in (0.1, 0.2, 0.3, 0.5):
        blend = np.clip(np.rint((1 - w) * net_img + w * bicubic.astype(np.float64)), 0, 255)
        bgain = quality(blend.astype(np.uint8), hr)["psnr_per_image"] - base
        print(f"  blend w = {w}: {base.mean() + bgain.mean():.3f} dB, the three worst "
              f"{np.round(np.sort(bgain)[:3], 2).tolist()}")
    # a blend for the doubtful faces only: departure d = mean |mu - bicubic| / sigma, the net's
    # step away from bicubic scaled by min(1, d / d0) ** p, d0 a quantile of d on the
    # held-out faces (the first set), so faces the net departs from less than those do
    departure = -signals["closeness to bicubic"]
    if name == "held-out":
        thresholds = {q: float(np.quantile(departure, q)) for q in (0.05, 0.1, 0.2)}
    projected_gain = quality(back_project(torch.as_tensor(net_img), lr).numpy(),
                             hr)["psnr_per_image"] - base
    print(f"  the net back-projected: {base.mean() + projected_gain.mean():.3f} dB, "
          f"{int((projected_gain < 0).sum())} below bicubic, the worst {projected_gain.min():+.2f}")
    for q, d0 in thresholds.items():
        for p in (1, 2, 4):
            scale = torch.as_tensor(np.minimum(1.0, departure / d0) ** p).float()
            shrunk = levels_to_image(bic + (mu - bic) * scale[:, None, None, None])
            sgain = quality(shrunk.numpy(), hr)["psnr_per_image"] - base
            # back-projected, as upscale writes it, against the net back-projected
            pgain = quality(back_project(shrunk, lr).numpy(), hr)["psnr_per_image"] - base
            print(f"  doubtful faces drawn to bicubic, d0 = held-out {q:.0%} quantile "
                  f"{d0:.3f}, p = {p}: {int((departure < d0).sum())} faces drawn, "
                  f"{base.mean() + sgain.mean():.3f} dB ({sgain.mean() - gain.mean():+.4f}), "
                  f"{int((sgain < 0).sum())} below bicubic, the worst {sgain.min():+.2f}; "
                  f"back-projected {base.mean() + pgain.mean():.3f} dB "
                  f"({pgain.mean() - projected_gain.mean():+.4f}), {int((pgain < 0).sum())} "
                  f"below bicubic, the worst {pgain.min():+.2f}")

# the shipped nets' recipe (docs/training/README.md): fit-cond --max-zoom 1.5 --max-shift 2
# --reframed-share 0.25 --max-rotation 10 --rotated-share 0.15 --color-share 0.8
train_faces = torch.as_tensor(np.load(train)["images"][:-256])
g = torch.Generator().manual_seed(123)
color_g = torch.Generator().manual_seed(123 + COLOR_SEED_OFFSET)
net.flip_average = True
gains = []
for _ in range(40):
    hr = augment_faces(train_faces[torch.randint(len(train_faces), (64,), generator=g)], g,
                       1.5, 2, reframed_share=0.25, max_rotation=10, rotated_share=0.15,
                       color_share=0.8, color_generator=color_g)
    lr = downsample(hr)
    gains.append(gain_over_bicubic(conditioning_mu_images(net, lr).numpy(), lr, hr)[1])
gain = np.concatenate(gains)
print(f"augmented training batches: {int((gain < 0).sum())} of {len(gain)} faces below bicubic, "
      f"{int((gain < 0.5).sum())} less than 0.5 dB above it")
