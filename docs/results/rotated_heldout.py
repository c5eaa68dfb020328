"""Are tilted faces in general the ones the net leaves below bicubic, and could a fallback to
bicubic be fitted on training faces? The shipped conditioning net (read as its mean mu,
mirror-averaged, no back-projection) on the 256 held-out training faces (the last 256 of
train_32.npz, which fit-cond never trains on with --n-val 256), each rotated by an angle
drawn uniformly in [-max, max] degrees (the training recipe's rotation: reflection-padded,
bilinear, `augment_faces`), three draws per max: the net's PSNR gain over bicubic (mean,
the lowest, faces below bicubic), the correlation of that gain with the net's departure
from bicubic (mean |mu - bicubic| / sigma, `bicubic_blend.py`'s doubt signal) and the share
of faces whose departure is below the upright held-out faces' 5% quantile (those a fallback
with that threshold would pull towards bicubic). Then the same for the first 256 standard
test faces, unrotated, for comparison.

usage: python docs/results/rotated_heldout.py TRAIN_32.npz TEST_32.npz CKPT
"""
import sys

import numpy as np
import torch

from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image
from bpd_sr.training.augment import augment_faces

torch.set_num_threads(1)
train, test, ckpt = sys.argv[1:4]
held = torch.as_tensor(np.load(train)["images"][-256:])
net = warm_start(ckpt)[0].eval().cond
net.flip_average = True


def departure_and_gain(hr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """hr uint8 (N, 32, 32, 3) -> (the net's departure from bicubic (N,), its PSNR gain
    over bicubic (N,))."""
    lr = downsample(hr)
    with torch.no_grad():
        mu, sigma = net.gaussian_parameters(lr)
    bicubic = upscale_bicubic(lr.numpy())
    bic = torch.as_tensor(bicubic).permute(0, 3, 1, 2).float()  # (N, 3, 32, 32), as mu
    departure = ((mu - bic).abs() / sigma).mean((1, 2, 3)).numpy()
    base = quality(bicubic, hr.numpy())["psnr_per_image"]
    return departure, quality(levels_to_image(mu).numpy(), hr.numpy())["psnr_per_image"] - base


def report(name: str, departure: np.ndarray, gain: np.ndarray, d0: float) -> None:
    print(f"{name}: gain over bicubic {gain.mean():.3f} dB, the lowest "
          f"{np.round(np.sort(gain)[:3], 2).tolist()}, {int((gain < 0).sum())} of {len(gain)} "
          f"below bicubic; correlation(departure, gain) {np.corrcoef(departure, gain)[0, 1]:+.3f}; "
          f"departure below d0: {np.mean(departure < d0):.0%} of the faces")


d_up, g_up = departure_and_gain(held)
d0 = float(np.quantile(d_up, 0.05))
print(f"d0 = the upright held-out faces' 5% quantile of departure: {d0:.3f}")
report("held-out, upright", d_up, g_up, d0)
for max_rotation in (15, 25, 35, 45):
    departures, gains = [], []
    for draw in range(3):
        g = torch.Generator().manual_seed(1000 * draw + max_rotation)
        rotated = augment_faces(held, g, 1.0, 0.0, flip=False, reframed_share=0.0,
                                max_rotation=max_rotation, rotated_share=1.0)
        d, gain = departure_and_gain(rotated)
        departures.append(d)
        gains.append(gain)
    report(f"held-out, rotated up to {max_rotation} degrees (3 x 256)",
           np.concatenate(departures), np.concatenate(gains), d0)
report("standard test faces, upright", *departure_and_gain(
    torch.as_tensor(np.load(test)["images"][:256])), d0)
