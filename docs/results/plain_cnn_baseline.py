"""The plain-CNN baseline of the quality issue, trained and measured on this project's faces:
bicubic plus a learnt residual (6 residual blocks of 96 channels at 8x8, two pixel
shuffles), L2 loss, Adam 1e-3 decayed linearly to 0, batches of 64 training faces, one
thread. What a user would pick instead of bpd-sr; not part of the package.

usage: python docs/results/plain_cnn_baseline.py TRAIN.npz TEST.npz LOOSE.npz STEPS N OUT.json

The test sets are scored on their first N faces (PSNR / SSIM as `bpd-sr evaluate` measures
them, the 8x8 inputs made by the model's own downsampling), and each face against bicubic
(how many faces the CNN leaves below it, and the worst gains with their faces' indices: the
quality issue's target of no face below bicubic, met by this baseline or not). Prints and
writes JSON.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.model.tokens import downsample

torch.set_num_threads(1)
torch.manual_seed(0)


class PlainCNN(nn.Module):
    """float (B, 3, 8, 8) in [0, 1] -> float (B, 3, 32, 32): bicubic + a residual."""

    def __init__(self, width: int = 96, blocks: int = 6):
        super().__init__()
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1)) for _ in range(blocks))
        self.up = nn.Sequential(nn.Conv2d(width, 4 * width, 3, padding=1), nn.PixelShuffle(2),
                                nn.ReLU(), nn.Conv2d(width, 4 * width, 3, padding=1),
                                nn.PixelShuffle(2), nn.ReLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        h = self.head(lr)
        for block in self.blocks:
            h = h + block(h)
        base = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
        return base + self.up(h)


def as_input(hr: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float (B, 3, 8, 8) in [0, 1]."""
    return downsample(hr).permute(0, 3, 1, 2).float() / 255


def as_target(hr: torch.Tensor) -> torch.Tensor:
    return hr.permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def upscale(net: PlainCNN, hr: torch.Tensor) -> np.ndarray:
    out = torch.cat([net(as_input(hr[i:i + 64])) for i in range(0, len(hr), 64)])
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    train_path, test_path, loose_path, steps, n, out_path = sys.argv[1:7]
    steps, n = int(steps), int(n)
    train = torch.as_tensor(np.load(train_path)["images"])
    net = PlainCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        hr = train[torch.randint(len(train), (64,), generator=g)]
        loss = F.mse_loss(net(as_input(hr)), as_target(hr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}: mse {loss.item():.5f}, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    minutes = (time.perf_counter() - t0) / 60
    net.eval()
    result = {"steps": steps, "batch_size": 64, "train_minutes_one_thread": round(minutes, 1),
              "n_faces": n}
    for name, path in (("standard", test_path), ("looser_framing", loose_path)):
        hr = torch.as_tensor(np.load(path)["images"][:n])
        q = quality(upscale(net, hr), hr.numpy())
        bicubic = quality(upscale_bicubic(downsample(hr).numpy()), hr.numpy())
        gain = q["psnr_per_image"] - bicubic["psnr_per_image"]
        worst = np.argsort(gain)[:5]
        result[name] = {"psnr": round(q["psnr"], 3), "ssim": round(q["ssim"], 4),
                        "faces_below_bicubic": int((gain < 0).sum()),
                        "worst_gain_over_bicubic_db": {int(i): round(float(gain[i]), 3)
                                                       for i in worst}}
        print(f"{name}: PSNR {q['psnr']:.3f} dB, SSIM {q['ssim']:.4f} ({n} faces); "
              f"{int((gain < 0).sum())} below bicubic, the worst (face: dB) "
              f"{result[name]['worst_gain_over_bicubic_db']}")
    with open(out_path, "w") as f:
        json.dump({"command": " ".join(sys.argv), **result}, f, indent=1)


if __name__ == "__main__":
    main()
