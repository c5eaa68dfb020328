"""Mean accepted block with and without proposals refined from the verify pass.

usage: python docs/results/refine_sweep.py FACES.npz CHECKPOINT|- N OUT.json
(k = 8, epsilon 2, mean rule; refine None = the paper's proposals, 255 = always.)
"""

import json
import sys
import time

import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
faces, ckpt, n, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = load_pretrained(None if ckpt == "-" else ckpt)
lr = downsample(torch.as_tensor(np.load(faces)["images"][:n]))
out = {}
for refine in (None, 2, 4, 8, 255):
    t = time.perf_counter()
    r = blockwise_parallel_decode(model, lr, k=8, epsilon=2, rule="mean", refine=refine)
    out[str(refine)] = {"mean_accepted": r.mean_accepted, "seconds": time.perf_counter() - t}
    print(refine, out[str(refine)], flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
