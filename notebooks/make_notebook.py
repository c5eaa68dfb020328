"""Builds notebooks/accepted_block_heatmaps.ipynb (run: python notebooks/make_notebook.py)."""
from pathlib import Path

import nbformat as nbf

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731

md("""# Where blockwise parallel decoding accepts blocks

Stern, Shazeer and Uszkoreit (2018) decode k tokens per model call when k proposal heads agree
with the base model. This notebook shows, for a few faces, **where** in the image the proposals
were accepted: long blocks in smooth regions, single tokens at edges.

It runs on CPU with the weights shipped in `bpd_sr/weights/`. It uses the test faces of
`../shared/data/faces/test_32.npz` when that file is there (CelebA: not part of this repository),
and the public-domain example face in `data/examples/` otherwise.""")

code("""import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, greedy_decode, load_pretrained
from bpd_sr.imageio import read_image, reference_32
from bpd_sr.metrics import psnr, upscale_bicubic
from bpd_sr.tokens import downsample
from bpd_sr.viz import accepted_length_map, step_map

torch.manual_seed(0)
model = load_pretrained()
K = model.cfg.k
root = Path.cwd() if (Path.cwd() / "data").exists() else Path.cwd().parent
test_npz = root.parent / "shared" / "data" / "faces" / "test_32.npz"
if test_npz.exists():
    hr = torch.as_tensor(np.load(test_npz)["images"][:3])
    source = "CelebA test faces"
else:
    face = read_image(root / "data" / "examples" / "astronaut.png")
    hr = torch.as_tensor(reference_32(face))[None]
    source = "public-domain example face"
lr = downsample(hr)
print(f"{len(hr)} {source}; model k = {K}")""")

md("## Decode: greedy, exact blockwise, and blockwise with epsilon = 2")
code("""t = time.perf_counter()
greedy = greedy_decode(model, lr)
exact = blockwise_parallel_decode(model, lr, k=K, epsilon=0)
approx = blockwise_parallel_decode(model, lr, k=K, epsilon=2)
print(f"decoded in {time.perf_counter() - t:.1f} s")
for name, r in [("greedy", greedy), ("exact", exact), ("epsilon=2", approx)]:
    print(f"{name:>10}: mean accepted block {r.mean_accepted:.2f}, model calls {r.model_calls}")
print("exact blockwise identical to greedy:", torch.equal(exact.images, greedy.images))""")

md("## Input | bicubic | greedy | blockwise exact | blockwise epsilon = 2 | ground truth")
code("""bicubic = upscale_bicubic(lr.numpy())
cols = [("input 8x8", lr.numpy()), ("bicubic", bicubic), ("greedy", greedy.images.numpy()),
        ("exact", exact.images.numpy()), ("epsilon=2", approx.images.numpy()),
        ("ground truth", hr.numpy())]
fig, axes = plt.subplots(len(hr), len(cols), figsize=(2 * len(cols), 2 * len(hr)), squeeze=False)
for i in range(len(hr)):
    for j, (name, imgs) in enumerate(cols):
        ax = axes[i, j]
        ax.imshow(imgs[i], interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        if i == 0:
            ax.set_title(name, fontsize=9)
        if name not in ("input 8x8", "ground truth"):
            ax.set_xlabel(f"{psnr(imgs[i], hr.numpy()[i]):.1f} dB", fontsize=8)
plt.tight_layout()""")

md("""## Heatmaps: accepted block length and decoding step per pixel

Each pixel shows the mean (over its three channels) of the accepted length of the step that
produced it, and the step index at which it was decoded: where the step index rises slowly,
decoding moved fast.""")
code("""fig, axes = plt.subplots(len(hr), 4, figsize=(10, 2.4 * len(hr)), squeeze=False)
for i in range(len(hr)):
    for j, (name, r) in enumerate([("exact", exact), ("epsilon=2", approx)]):
        im = axes[i, 2 * j].imshow(accepted_length_map(r.accepted[i], r.step_index[i]),
                                   vmin=1, vmax=K, cmap="viridis")
        axes[i, 2 * j].set_title(f"{name}: accepted block", fontsize=9)
        plt.colorbar(im, ax=axes[i, 2 * j], fraction=0.046)
        im = axes[i, 2 * j + 1].imshow(step_map(r.step_index[i]), cmap="magma")
        axes[i, 2 * j + 1].set_title(f"{name}: step index", fontsize=9)
        plt.colorbar(im, ax=axes[i, 2 * j + 1], fraction=0.046)
for ax in axes.flat:
    ax.set(xticks=[], yticks=[])
plt.tight_layout()""")

md("## Histogram of accepted lengths")
code("""fig, ax = plt.subplots(figsize=(6, 3))
for name, r in [("exact", exact), ("epsilon=2", approx)]:
    lengths = torch.cat(r.accepted).numpy()
    ax.hist(lengths, bins=np.arange(1, K + 2) - 0.5, alpha=0.6, label=name)
ax.set(xlabel="accepted tokens per step", ylabel="steps", yscale="log")
ax.legend();""")

md("## Mean accepted block size against k")
code("""ks = [2, 4, 6, 8, 10]
one = lr[:1]
rows = {2: [blockwise_parallel_decode(model, one, k=k, epsilon=2).mean_accepted for k in ks]}
fig, ax = plt.subplots(figsize=(5, 3))
for eps, vals in rows.items():
    ax.plot(ks, vals, "o-", label=f"epsilon = {eps}")
ax.plot(ks, [1.96, 3.75, 5.25, 6.36, 6.79], "x--", color="grey", label="paper, epsilon = 2")
ax.set(xlabel="k", ylabel="mean accepted block size")
ax.legend()
ax.grid(alpha=0.3)
print({eps: [round(v, 2) for v in vals] for eps, vals in rows.items()})""")

md("""## Sampling at a temperature (beyond the paper)

Greedy super-resolution is smooth; sampling at T = 0.8 to 0.9 gave the Image Transformer its
most realistic faces. `blockwise_parallel_decode(..., temperature=T)` samples *exactly* from the
base model's tempered distribution, with the heads' proposals kept by the speculative-sampling
rule. Several samples of one face, and where blocks were accepted under sampling beside greedy.""")
code("""T = 0.9
samples = [blockwise_parallel_decode(model, lr[:1], k=K, temperature=T,
                                     generator=torch.Generator().manual_seed(s)) for s in range(3)]
fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
panels = [("greedy", greedy.images[0])] + [(f"sample {s}", r.images[0]) for s, r in enumerate(samples)]
for ax, (name, img) in zip(axes[:4], panels, strict=True):
    ax.imshow(img.numpy(), interpolation="nearest")
    ax.set_title(name, fontsize=9)
for ax, (name, r) in zip(axes[4:], [("greedy eps=2", approx), (f"sample T={T}", samples[0])], strict=True):
    ax.imshow(accepted_length_map(r.accepted[0], r.step_index[0]), vmin=1, vmax=K, cmap="viridis")
    ax.set_title(f"{name}: block", fontsize=9)
for ax in axes:
    ax.set(xticks=[], yticks=[])
print("mean accepted block under sampling:", [round(r.mean_accepted, 2) for r in samples])""")

nb["cells"] = cells
nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, str(Path(__file__).with_name("accepted_block_heatmaps.ipynb")))
print("written")
