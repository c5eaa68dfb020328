"""Do the outputs of several fine-tunes of the net, averaged, beat the first net alone? Each
checkpoint's conditioning net, mirror-averaged as shipped, read as its mean mu (no
back-projection), on 256 held-out training faces (the last 256 of train_32.npz) and the first
256 standard and looser test faces: each net's PSNR and its lowest gain over bicubic, then
w * mu(first) + (1 - w) * the mean of the others' mu for w = 0.5 and 0.7.

usage: python docs/results/output_ensemble.py TRAIN_32.npz TEST_32.npz TEST_LOOSE_32.npz CKPT CKPT [CKPT ...]
"""
import sys

import numpy as np
import torch

from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image

torch.set_num_threads(1)
sets = {"held-out": np.load(sys.argv[1])["images"][-256:],
        "standard": np.load(sys.argv[2])["images"][:256],
        "looser": np.load(sys.argv[3])["images"][:256]}
nets = []
for path in sys.argv[4:]:
    net = warm_start(path)[0].eval().cond
    net.flip_average = True
    nets.append(net)


def scored(mu: torch.Tensor, hr: np.ndarray, base: np.ndarray) -> str:
    """PSNR of mu (N, 3, 32, 32) on hr uint8 (N, 32, 32, 3), and its lowest gain over base."""
    psnr = quality(levels_to_image(mu).numpy(), hr)["psnr_per_image"]
    return f"{psnr.mean():.3f} (lowest gain {np.min(psnr - base):+.2f})"


for name, hr in sets.items():
    lr = downsample(torch.as_tensor(hr))
    with torch.no_grad():
        mus = [net.gaussian_parameters(lr)[0] for net in nets]
    base = quality(upscale_bicubic(lr.numpy()), hr)["psnr_per_image"]
    line = [f"net {i} {scored(mu, hr, base)}" for i, mu in enumerate(mus)]
    others = sum(mus[1:]) / (len(mus) - 1)
    line += [f"w = {w} {scored(w * mus[0] + (1 - w) * others, hr, base)}" for w in (0.5, 0.7)]
    print(f"{name}: " + "; ".join(line), flush=True)
