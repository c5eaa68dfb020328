"""Whole-face decoding time of sequential decoding against blockwise decoding at chosen
(k, epsilon), interleaved: each batch of faces is decoded by every configuration in turn
before the next batch, so that load from other work falls on all of them alike. Also the
quality of what each configuration decoded (PSNR / SSIM against the true faces) and its
tokens per step. Shipped weights, the default rule, one thread. Prints and writes JSON.

usage: python docs/benchmark/tolerance/speed.py FACES.npz N BATCH ROUNDS OUT.json K:EPS [K:EPS ...]
       [--checkpoint=PATH]   (another model than the shipped weights)
"""

import json
import sys
import time

import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained, sequential_decode
from bpd_sr.evaluation.metrics import quality
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
faces, n, batch, rounds, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
configs = {"sequential": None}
options = [a for a in sys.argv[6:] if a.startswith("--checkpoint=")]
configs.update({f"k={c.split(':')[0]} eps={c.split(':')[1]}": tuple(map(int, c.split(":")))
                for c in sys.argv[6:] if c not in options})
model = load_pretrained(options[-1].split("=", 1)[1] if options else None)
hr = torch.as_tensor(np.load(faces)["images"][:n])
lr = downsample(hr)
seconds = {name: 0.0 for name in configs}
tokens = {name: [0, 0] for name in configs}
images = {name: [] for name in configs}
blockwise_parallel_decode(model, lr[:1], k=2, n_tokens=64)  # warm-up
for r in range(rounds):
    for s in range(0, n, batch):
        for name, cfg in configs.items():
            t = time.perf_counter()
            if cfg is None:
                res = sequential_decode(model, lr[s : s + batch])
            else:
                res = blockwise_parallel_decode(model, lr[s : s + batch], k=cfg[0], epsilon=cfg[1])
            seconds[name] += time.perf_counter() - t
            if r == 0:
                images[name].append(res.images)
                tokens[name][0] += sum(int(a.sum()) for a in res.accepted)
                tokens[name][1] += sum(res.steps)
    print(f"round {r + 1} done", flush=True)
seq = seconds["sequential"]
result = {}
for name in configs:
    q = quality(torch.cat(images[name]).numpy(), hr.numpy())
    result[name] = {"seconds_per_image": seconds[name] / (n * rounds), "speedup": seq / seconds[name],
                    "tokens_per_step": tokens[name][0] / tokens[name][1],
                    "psnr": float(q["psnr"]), "ssim": float(q["ssim"])}
for name, r in result.items():
    print(f"{name:>12}: {r['seconds_per_image']:.2f} s/image, speed-up {r['speedup']:.2f}x, "
          f"{r['tokens_per_step']:.2f} tokens/step, PSNR {r['psnr']:.3f}, SSIM {r['ssim']:.4f}")
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), "unknown")
with open(out_path, "w") as f:
    json.dump({"faces": faces, "n": n, "batch": batch, "rounds": rounds, "threads": 1,
               "rule": "mean", "cpu": cpu, "torch": torch.__version__, "results": result}, f,
              indent=1)
