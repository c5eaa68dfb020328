"""Quality against tokens per step for every (k, epsilon) of a sweep made with
`bpd-sr evaluate ... --json` (sequential decoding and bicubic drawn as lines).

usage: python docs/benchmark/tolerance/plot.py SWEEP.json OUT.png [DEFAULT_K DEFAULT_EPS]
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sweep = json.load(open(sys.argv[1]))
rows = sweep["rows"]
seq = next(r for r in rows if r["method"].startswith("sequential"))
bicubic = next(r for r in rows if r["method"] == "bicubic")
default = tuple(map(int, sys.argv[3:5])) if len(sys.argv) > 4 else None
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for k in sorted({r["k"] for r in rows if r.get("k", 1) > 1}):
    rs = sorted((r for r in rows if r.get("k") == k and r.get("temperature", 0) == 0),
                key=lambda r: r["epsilon"])
    x = [r["mean_accepted"] for r in rs]
    for ax, key in zip(axes, ("psnr", "ssim", "share_below_bicubic"), strict=True):
        y = [r[key] for r in rs]
        ax.plot(x, y, "o-", label=f"k={k}")
        if k == max(r["k"] for r in rows if r.get("k", 1) > 1):
            for r, xi, yi in zip(rs, x, y, strict=True):
                ax.annotate(f"{r['epsilon']}", (xi, yi), fontsize=6, xytext=(2, 3),
                            textcoords="offset points")
for ax, key, label in zip(axes, ("psnr", "ssim", "share_below_bicubic"),
                          ("PSNR (dB)", "SSIM", "share of faces below bicubic"), strict=True):
    ax.axhline(seq[key], color="black", lw=1, ls="--", label="sequential")
    if key != "share_below_bicubic":
        ax.axhline(bicubic[key], color="grey", lw=1, ls=":", label="bicubic")
    if default:
        d = next(r for r in rows if r.get("k") == default[0] and r.get("epsilon") == default[1]
                 and r.get("temperature", 0) == 0)
        ax.plot([d["mean_accepted"]], [d[key]], "k*", ms=12, label="default")
    ax.set(xlabel="tokens per step (mean accepted block)", ylabel=label)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"{sweep['n_images']} test faces, rule mean: quality against tokens per step "
             "(numbers: epsilon, on the largest k)", fontsize=9)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"wrote {sys.argv[2]}")
