"""What back-projection (``bpd_sr.decoding.consistency``) does to the package's default
decode (k = 10, the default epsilon and rule) of the first N faces of each set: PSNR / SSIM
as decoded and back-projected, and per face the change in PSNR (how many faces came nearer
their truth, the smallest and largest change).

usage: python docs/results/back_projection.py TEST_32.npz TEST_LOOSE_32.npz N OUT.json [CKPT]
"""

import json
import sys

import numpy as np
import torch

from bpd_sr import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE, back_project, load_pretrained
from bpd_sr.decoding.loop import tokens_per_step
from bpd_sr.evaluation.metrics import quality
from bpd_sr.evaluation.quality import Method, decode_all
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
sets = {"standard": sys.argv[1], "looser": sys.argv[2]}
n, out_path = int(sys.argv[3]), sys.argv[4]
model = load_pretrained(sys.argv[5] if len(sys.argv) > 5 else None)
result = {"command": " ".join(sys.argv), "k": DEFAULT_K, "epsilon": DEFAULT_EPSILON, "rule": DEFAULT_RULE}
for name, path in sets.items():
    hr = torch.as_tensor(np.load(path)["images"][:n])
    lr = downsample(hr)
    method = Method("default", DEFAULT_K, DEFAULT_EPSILON, 0.0, DEFAULT_RULE)
    images, accepted, _, _ = decode_all(model, lr, method, 255, 0, 64)
    made = quality(images.numpy(), hr.numpy())
    projected = quality(back_project(images, lr).numpy(), hr.numpy())
    change = np.asarray(projected["psnr_per_image"]) - np.asarray(made["psnr_per_image"])
    result[name] = {
        "tokens_per_step": tokens_per_step(accepted),
        "as_decoded": {"psnr": float(made["psnr"]), "ssim": float(made["ssim"])},
        "back_projected": {"psnr": float(projected["psnr"]), "ssim": float(projected["ssim"])},
        "faces_nearer": int((change > 0).sum()), "faces_further": int((change < 0).sum()),
        "psnr_change_min": float(change.min()), "psnr_change_max": float(change.max())}
    print(name, json.dumps(result[name]), flush=True)
with open(out_path, "w") as fh:
    json.dump(result, fh, indent=1)
