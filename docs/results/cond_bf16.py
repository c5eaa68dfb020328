"""Conditioning logits of the shipped weights in float32 against the same under bfloat16
autocast (what a GPU fine-tune trains against): total-variation distance between the two
softmax distributions per target, and the largest difference of a logit among each target's
16 most likely (float32) intensities. Prints and writes JSON.

usage: python docs/results/cond_bf16.py FACES.npz N OUT.json
"""

import json
import sys

import numpy as np
import torch

from bpd_sr import load_pretrained
from bpd_sr.model.tokens import downsample

faces, n, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = load_pretrained(threads=1)
lr = downsample(torch.as_tensor(np.load(faces)["images"][:n]))
with torch.no_grad():
    ref = model.conditioning_logits(lr).float()[:, :3072]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.conditioning_logits(lr)[:, :3072]
    low = low.float()
tv = 0.5 * (ref.softmax(-1) - low.softmax(-1)).abs().sum(-1)  # (N, 3072)
top = ref.topk(16, dim=-1).indices
top_diff = (ref.gather(-1, top) - low.gather(-1, top)).abs()
result = {"faces": faces, "n": n, "autocast_dtype_of_logits": str(low.dtype),
          "tv_mean": round(float(tv.mean()), 5), "tv_max": round(float(tv.max()), 5),
          "top16_logit_max_abs_diff": round(float(top_diff.max()), 4),
          "torch": torch.__version__}
print(json.dumps(result, indent=1))
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
