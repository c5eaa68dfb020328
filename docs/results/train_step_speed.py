"""Training-step throughput of two bpd-sr source trees (e.g. before and after a change),
in one run, interleaved: each round times every tree once, each in a fresh one-thread
process, so that load and thermal drift fall on both alike. Prints and writes JSON.

The fine-tune regime (base and heads jointly, k proposal slots) warm-started from --init
(default: the shipped weights, small preset), or from a new tiny base with --preset tiny.
bf16 autocast where the CPU has it (AVX512-BF16 or AMX), else fp32.

usage: python docs/results/train_step_speed.py FACES.npz OUT.json NAME=TREE [NAME=TREE ...]
       [--preset small|tiny] [--batch 8] [--k 10] [--steps 3] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, time
from contextlib import nullcontext
import numpy as np, torch
torch.set_num_threads(1)
from bpd_sr.config import ModelConfig, TrainConfig
from bpd_sr.model.transformer import ImageTransformer
from bpd_sr.io.pretrained import save_checkpoint
from bpd_sr.training.train import Run, build_model, make_optimizer, train_step
faces, preset, batch, k, steps, init, bf16 = sys.argv[1:8]
batch, k, steps, bf16 = int(batch), int(k), int(steps), bf16 == "1"
if preset == "tiny":
    torch.manual_seed(0)
    save_checkpoint(init, ImageTransformer(ModelConfig.preset("tiny")))
cfg = TrainConfig(regime="finetune", k=k, init=init, batch_size=batch, warmup_steps=1,
                  amp="bf16" if bf16 else "fp32")
model = build_model(cfg).train()
opt, params = make_optimizer(cfg, model, torch.device("cpu"))
run = Run(cfg, model, opt, params)
images = torch.as_tensor(np.load(faces)["images"][:512])
amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
train_step(run, model, images, amp, 0, 1)  # warm-up
run.step += 1
t0 = time.perf_counter()
for _ in range(steps):
    loss, _ = train_step(run, model, images, amp, 0, 1)
    run.step += 1
float(loss)
dt = (time.perf_counter() - t0) / steps
print(json.dumps({"seconds_per_step": dt, "images_per_s": batch / dt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("faces")
    ap.add_argument("out")
    ap.add_argument("trees", nargs="+", help="NAME=PATH of a bpd-sr source tree")
    ap.add_argument("--preset", default="small", choices=["small", "tiny"])
    ap.add_argument("--init", default="bpd_sr/weights/default.pt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, os.getcwd())
    import torch

    from bpd_sr.training.trainspeed import bf16_native

    bf16 = bf16_native(torch.device("cpu"))
    trees = dict(t.split("=", 1) for t in a.trees)
    runs: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.abspath(a.init) if a.preset == "small" else os.path.join(tmp, "tiny.pt")
        for r in range(a.rounds):
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
                out = subprocess.run(
                    [sys.executable, "-c", WORKER, os.path.abspath(a.faces), a.preset,
                     str(a.batch), str(a.k), str(a.steps), init, "1" if bf16 else "0"],
                    env=env, cwd=tmp, capture_output=True, text=True, check=True)
                ips = json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]
                runs[name].append(ips)
                print(f"round {r + 1} {name}: {ips:.3f} images/s", flush=True)
    best = {name: max(v) for name, v in runs.items()}
    first = next(iter(trees))
    result = {"preset": a.preset, "regime": "finetune", "k": a.k, "batch": a.batch,
              "steps_per_measurement": a.steps, "rounds": a.rounds, "threads": 1,
              "autocast": "bf16" if bf16 else "fp32",
              "cpu": _cpu(), "torch": torch.__version__, "images_per_s": runs,
              "best_images_per_s": best,
              "speedup_vs_" + first: {n: round(best[n] / best[first], 3) for n in trees}}
    print(json.dumps(result, indent=1))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
