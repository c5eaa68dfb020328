"""The package's default decode (k = 10, the default epsilon and rule, refined proposals) of
faces START:STOP of a set, with a checkpoint's conditioning weights (``cond_scale``) scaled
by each factor: PSNR / SSIM as decoded and back-projected, and tokens per step. Used to
choose the factor on training faces the net never saw (the last 256 of ``train_32.npz``:
``fit-cond --n-val 256`` holds them out), by ``fit-mixture``'s rule: the most tokens per
step within 0.01 dB of the best PSNR.

usage: python docs/results/cond_scale_factor.py FACES.npz START STOP OUT.json CKPT F1,F2,...
"""

import json
import sys
from dataclasses import replace

import numpy as np
import torch

from bpd_sr import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE, back_project, load_pretrained
from bpd_sr.decoding.loop import tokens_per_step
from bpd_sr.evaluation.metrics import quality
from bpd_sr.evaluation.quality import Method, decode_all
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
faces, start, stop, out_path, ckpt, factors = sys.argv[1:7]
hr = torch.as_tensor(np.load(faces)["images"][int(start):int(stop)])
lr = downsample(hr)
method = Method("default", DEFAULT_K, DEFAULT_EPSILON, 0.0, DEFAULT_RULE)
rows = []
for f in map(float, factors.split(",")):
    model = load_pretrained(ckpt)
    model.cfg = replace(model.cfg, cond_scale=tuple(s * f for s in model.cfg.cond_scales))
    images, accepted, _, _ = decode_all(model, lr, method, 255, 0, 64)
    made = quality(images.numpy(), hr.numpy())
    projected = quality(back_project(images, lr).numpy(), hr.numpy())
    row = {"factor": f, "cond_scale": list(model.cfg.cond_scales),
           "tokens_per_step": tokens_per_step(accepted),
           "as_decoded": {"psnr": float(made["psnr"]), "ssim": float(made["ssim"])},
           "back_projected": {"psnr": float(projected["psnr"]), "ssim": float(projected["ssim"])}}
    rows.append(row)
    print(json.dumps(row), flush=True)
with open(out_path, "w") as fh:
    json.dump({"command": " ".join(sys.argv), "faces": f"{faces}[{start}:{stop}]",
               "k": DEFAULT_K, "epsilon": DEFAULT_EPSILON, "rule": DEFAULT_RULE, "rows": rows},
              fh, indent=1)
