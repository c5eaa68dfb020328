"""Batch decode with images leaving the batch as they finish: the context's per-position
tables read through a row map (now) against copied for every subset (before), interleaved
in one process. Run from the repository root:

    PYTHONPATH=. python docs/results/select_no_copy.py FACES.npz OUT.json
"""

import json
import sys

import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import EncoderContext

torch.set_num_threads(1)
model = load_pretrained()
lr = downsample(torch.as_tensor(np.load(sys.argv[1])["images"][:64]))
now = EncoderContext.select


def copying(self, rows):  # what select did before: copy both tables for every subset
    return EncoderContext([(k[rows], v[rows]) for k, v in self.cross_kv],
                          self.cond_logits[rows], self.dec_pos[rows])


rows, images = [], {}
for rnd in range(2):
    for name, fn in (("copied", copying), ("row map", now)):
        EncoderContext.select = fn
        res = blockwise_parallel_decode(model, lr, k=8, epsilon=2)
        images.setdefault(name, res.images)
        rows.append({"round": rnd, "select": name, "seconds": round(res.seconds, 2),
                     "mean_accepted": round(res.mean_accepted, 3)})
        print(rows[-1], flush=True)
EncoderContext.select = now
same = torch.equal(images["copied"], images["row map"])
out = {"command": "PYTHONPATH=. python docs/results/select_no_copy.py test_32.npz OUT.json",
       "batch": 64, "k": 8, "epsilon": 2, "threads": 1, "identical_images": same, "rows": rows}
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
print("identical images:", same)
