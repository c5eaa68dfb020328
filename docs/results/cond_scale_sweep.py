"""Decode N test faces blockwise (k = 8, epsilon 2, mean rule, refined proposals) for each
(checkpoint, cond_scale); print and save PSNR, SSIM and the mean accepted block.

usage: python docs/results/cond_scale_sweep.py FACES.npz N OUT.json CKPT:S1,S2 [default:S1,...]
"""

import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained
from bpd_sr.evaluation.metrics import quality
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
faces, n, out_path, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
hr = torch.as_tensor(np.load(faces)["images"][:n])
lr = downsample(hr)
rows = []
for job in jobs:
    ckpt, scales = job.split(":")
    for s in scales.split(","):
        model = load_pretrained(None if ckpt == "default" else ckpt)
        model.cfg = replace(model.cfg, cond_scale=float(s))
        t = time.perf_counter()
        r = blockwise_parallel_decode(model, lr, k=8, epsilon=2, rule="mean")
        q = quality(r.images.numpy(), hr.numpy())
        rows.append({"ckpt": ckpt, "cond_scale": float(s), "psnr": float(q["psnr"]),
                     "ssim": float(q["ssim"]), "mean_accepted": r.mean_accepted,
                     "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)
