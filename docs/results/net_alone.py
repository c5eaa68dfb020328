"""The conditioning net of each checkpoint on its own, averaged over each face and its mirror
image as the shipped weights use it, on the first 256 faces of a standard and a looser test
set, read out as evaluate's rows do (the expected intensity, "(mean)", and for a Gaussian head
its mean mu, "(mu)"): PSNR / SSIM, the faces below bicubic and the two faces furthest below or
nearest to it.
A cheap check of a fine-tuned net before its mixture is fitted and the decode evaluated
(seconds instead of an hour). Last on each line: mu on every face of each set, a steadier
comparison of two nets than 256 faces.

usage: python docs/results/net_alone.py TEST_32.npz TEST_LOOSE_32.npz CKPT [CKPT ...]
       (the looser set: docs/framing/loose_test_set.py)
"""
import sys

import numpy as np
import torch

from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.evaluation.quality import baseline_rows
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample
from bpd_sr.training.condfit import conditioning_mu_images

torch.set_num_threads(1)
sets = {"standard": sys.argv[1], "looser": sys.argv[2]}
every = {name: torch.as_tensor(np.load(path)["images"]) for name, path in sets.items()}
faces = {name: hr[:256] for name, hr in every.items()}
for path in sys.argv[3:]:
    model = warm_start(path)[0].eval()
    model.cond.flip_average = True
    out = []
    for name, hr in faces.items():
        bicubic = quality(upscale_bicubic(downsample(hr).numpy()), hr.numpy())
        for row in baseline_rows(model, hr, 64, bicubic, back_projection=False):
            if not row["method"].startswith("cond net"):
                continue
            gain = np.array(row["psnr_per_image"]) - np.array(bicubic["psnr_per_image"])
            worst = [(int(i), round(float(gain[i]), 2)) for i in np.argsort(gain)[:2]]
            out.append(f"{name} {row['method'][9:]} {row['psnr']:.3f} / {row['ssim']:.4f}, "
                       f"{int((gain < 0).sum())} below bicubic, worst (face, dB) {worst}")
    for name, hr in every.items():
        q = quality(conditioning_mu_images(model.cond, downsample(hr)).numpy(), hr.numpy())
        out.append(f"{name} (mu), all {len(hr)} faces {q['psnr']:.3f} / {q['ssim']:.4f}")
    print(path, " | ".join(out), flush=True)
