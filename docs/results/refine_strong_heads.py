"""Refined proposals against strong heads: the tiny test model trained on the synthetic bands
of tests/test_decoding.py, decoded with its heads' own proposals (refine=None) and with
proposals refined from the verify pass (refine=255, the default).

Run from the repository root:  PYTHONPATH=. python docs/results/refine_strong_heads.py OUT.json
"""

import json
import sys
import time

import torch

from bpd_sr import blockwise_parallel_decode, sequential_decode
from bpd_sr.model.tokens import downsample
from tests.test_decoding import synthetic_faces, train_on_bands

torch.set_num_threads(1)


rows = []
for batch, steps in [(1, 60), (4, 60)]:  # (1, 60) is the test fixture
    t = time.perf_counter()
    model = train_on_bands(batch, steps, 3e-3)
    seconds = time.perf_counter() - t
    lr = downsample(synthetic_faces(3, seed=999))
    ref = sequential_decode(model, lr, rule="argmax")
    for k in (2, 4):
        for refine in (None, 255):
            res = blockwise_parallel_decode(model, lr, k=k, rule="argmax", refine=refine)
            rows.append({"train_batch": batch, "train_steps": steps, "train_seconds": round(seconds, 1),
                         "k": k, "refine": refine, "mean_accepted": round(res.mean_accepted, 2),
                         "identical_to_sequential": torch.equal(res.images, ref.images)})
            print(rows[-1], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"command": "PYTHONPATH=. python docs/results/refine_strong_heads.py", "rows": rows}, f, indent=1)
