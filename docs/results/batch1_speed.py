"""Wall-clock of one face at batch 1: sequential decoding against blockwise decoding with
the same rule, interleaved (each round decodes every face with every configuration in turn),
so that load from other work falls on all of them alike.

usage: python docs/results/batch1_speed.py FACES.npz N ROUNDS OUT.json
(shipped weights, rule mean, one thread; configurations: sequential, k = 6, 8, 10 with
epsilon 2, k = 8 exact.)
"""

import json
import statistics
import sys
import time

import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained, sequential_decode
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
faces, n, rounds, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = load_pretrained()
lr = downsample(torch.as_tensor(np.load(faces)["images"][:n]))
configs = {"sequential": None, "k=6 eps=2": (6, 2), "k=8 eps=2": (8, 2),
           "k=10 eps=2": (10, 2), "k=8 exact": (8, 0)}
seconds = {name: [] for name in configs}
blocks = {name: [] for name in configs}
blockwise_parallel_decode(model, lr[:1], k=2, n_tokens=64)  # warm-up
for _ in range(rounds):
    for i in range(n):
        for name, cfg in configs.items():
            t = time.perf_counter()
            if cfg is None:
                r = sequential_decode(model, lr[i : i + 1])
            else:
                r = blockwise_parallel_decode(model, lr[i : i + 1], k=cfg[0], epsilon=cfg[1])
            seconds[name].append(time.perf_counter() - t)
            blocks[name].append(r.mean_accepted)
seq = statistics.median(seconds["sequential"])
result = {name: {"median_seconds": statistics.median(s), "speedup": seq / statistics.median(s),
                 "mean_block": statistics.fmean(blocks[name]), "seconds": s}
          for name, s in seconds.items()}
for name, r in result.items():
    print(f"{name:>12}: {r['median_seconds']:.2f} s, speed-up {r['speedup']:.2f}x, "
          f"block {r['mean_block']:.2f}")
with open(out_path, "w") as f:
    json.dump({"faces": n, "rounds": rounds, "rule": "mean", "results": result}, f, indent=1)
