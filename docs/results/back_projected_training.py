"""The conditioning net trained through back-projection (`fit-cond --back-projected`) beside
the same run without it: each checkpoint's net, mirror-averaged as shipped, read as its mean
mu, on 256 held-out training faces (the last 256 of train_32.npz, never trained on with
--n-val 256) and on the standard and looser test faces (the first 256, then all 1,685):
PSNR / SSIM of mu back-projected, as `upscale` writes the image (and, for the standard and
looser test faces, the faces below bicubic and the lowest gain over it; until session 21
for the first 256 only), then PSNR of mu
as it is, and the mean |shortfall| of mu's block means from the input in levels (what
back-projection moves; a net trained through it has no reason to keep it small).

usage: python docs/results/back_projected_training.py TRAIN_32.npz TEST_32.npz TEST_LOOSE_32.npz CKPT [CKPT ...]
"""
import sys

import torch
from scored_subsets import scored_subsets

from bpd_sr.decoding.consistency import back_project
from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample
from bpd_sr.training.condfit import conditioning_mu_images

torch.set_num_threads(1)
train, test, loose = sys.argv[1:4]
subsets = scored_subsets(train, test, loose)
bicubic = {name: quality(upscale_bicubic(downsample(torch.as_tensor(hr)).numpy()),
                         hr)["psnr_per_image"] for name, hr in subsets.items()}
for path in sys.argv[4:]:
    net = warm_start(path)[0].eval().cond
    net.flip_average = True
    out = []
    for name, hr in subsets.items():
        lr = downsample(torch.as_tensor(hr))
        with torch.no_grad():
            mu = conditioning_mu_images(net, lr)
        projected = quality(back_project(mu, lr).numpy(), hr)
        plain = quality(mu.numpy(), hr)
        shortfall = (downsample(mu).float() - lr.float()).abs().mean()
        line = (f"{name} {projected['psnr']:.3f} / {projected['ssim']:.4f} (mu as it is "
                f"{plain['psnr']:.3f}, shortfall {shortfall:.2f})")
        if name != "held-out":
            gain = projected["psnr_per_image"] - bicubic[name]
            line += f", {int((gain < 0).sum())} below bicubic, lowest {gain.min():+.2f}"
        out.append(line)
    print(path, "|", " | ".join(out), flush=True)
