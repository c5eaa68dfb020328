"""A colour self-ensemble of the conditioning net, measured and not built: the net (with its
mirror average) run on the input and on copies with their contrast or brightness changed,
each output mapped back by the inverse change and all averaged, like the mirror average.
Prints PSNR of the net alone (its mean mu, no back-projection) on the first 256 faces of a
standard and a looser test set, for the plain net and for each set of changes.

usage: python docs/results/colour_self_ensemble.py CKPT TEST_32.npz TEST_LOOSE_32.npz
"""
import sys

import numpy as np
import torch

from bpd_sr.evaluation.metrics import quality
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image

torch.set_num_threads(1)
net = warm_start(sys.argv[1])[0].eval().cond
net.flip_average = True


def mu_of(x: torch.Tensor) -> torch.Tensor:
    """x (B, 8, 8, 3) float intensities (the net reads floats as it reads uint8)."""
    with torch.no_grad():
        return net.gaussian_parameters(x)[0]


CHANGES = {  # (contrast about mid-grey, brightness offset) of each extra copy
    "contrast 0.9, 1.1": [(0.9, 0), (1.1, 0)],
    "contrast 0.85, 0.93, 1.07, 1.15": [(0.85, 0), (0.93, 0), (1.07, 0), (1.15, 0)],
    "brightness -8, +8": [(1, -8), (1, 8)],
    "contrast 0.9, 1.1 and brightness -8, +8": [(0.9, 0), (1.1, 0), (1, -8), (1, 8)],
}
for path in sys.argv[2:4]:
    hr = torch.as_tensor(np.load(path)["images"][:256])
    x = downsample(hr).float()
    base = mu_of(x)
    out = {"plain": quality(levels_to_image(base).numpy(), hr.numpy())["psnr"]}
    for name, changes in CHANGES.items():
        mus = [base] + [127.5 + (mu_of(127.5 + a * (x - 127.5) + b) - b - 127.5) / a
                        for a, b in changes]
        out[name] = quality(levels_to_image(sum(mus) / len(mus)).numpy(), hr.numpy())["psnr"]
    print(path, " | ".join(f"{k} {v:.4f}" for k, v in out.items()), flush=True)
