"""Builds notebooks/accepted_block_heatmaps.ipynb, and with --execute runs it and saves its
outputs, so that a reader sees the figures on the repository page without running it.

    python notebooks/make_notebook.py --execute    # from the repository root

The notebook uses only the public-domain example face (data/examples/), so its saved
outputs may be published. CI runs it again under nbmake (pytest --nbmake).
"""

import sys
from pathlib import Path

import nbformat as nbf

PATH = Path(__file__).with_name("accepted_block_heatmaps.ipynb")
cells: list = []


def md(text: str) -> None:
    cells.append(nbf.v4.new_markdown_cell(text))


def code(text: str) -> None:
    cells.append(nbf.v4.new_code_cell(text))


md("""# Where blockwise parallel decoding accepts blocks

Stern, Shazeer and Uszkoreit (2018) decode k tokens per model call when k proposal heads agree
with the base model. This notebook shows **where** in the image the proposals were accepted, for
the public-domain example face in `data/examples/` (NASA), with the weights shipped in
`bpd_sr/weights/`, on a CPU. It checks what it shows: exact blockwise decoding gives the same
image as sequential decoding.""")

code("""import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from bpd_sr import blockwise_parallel_decode, load_pretrained, sequential_decode
from bpd_sr.evaluation.metrics import psnr, upscale_bicubic
from bpd_sr.evaluation.viz import accepted_length_map, step_map
from bpd_sr.io.imageio import read_image, reference_32
from bpd_sr.model.tokens import downsample, image_to_tokens

torch.manual_seed(0)
torch.set_num_threads(1)  # one image decodes fastest on one thread
model = load_pretrained()
K = model.cfg.k
root = Path.cwd() if (Path.cwd() / "data").exists() else Path.cwd().parent
face = read_image(root / "data" / "examples" / "astronaut.png")
hr = torch.as_tensor(reference_32(face))[None]  # the 32x32 original
lr = downsample(hr)
print(f"public-domain example face; model k = {K}")""")

md("""## Decode under two decoding rules: sequential, exact blockwise, epsilon = 2

The decoding rule is the intensity taken from each 256-way distribution: `"argmax"` is the
paper's greedy decoding, `"mean"` (the package default, `bpd_sr.DEFAULT_RULE`) the expected
intensity. Blockwise decoding tests each proposal against the base's choice under the same rule.""")
code("""from bpd_sr import DEFAULT_RULE

RULE_NAMES = ["argmax", "mean"]
t = time.perf_counter()
decodes = {}
for rule in RULE_NAMES:
    decodes[rule] = {
        "sequential": sequential_decode(model, lr, rule=rule),
        "exact": blockwise_parallel_decode(model, lr, k=K, epsilon=0, rule=rule),
        "epsilon=2": blockwise_parallel_decode(model, lr, k=K, epsilon=2, rule=rule),
    }
print(f"decoded in {time.perf_counter() - t:.1f} s; default rule: {DEFAULT_RULE}")
for rule, runs in decodes.items():
    for name, r in runs.items():
        print(f"{rule:>7} {name:>10}: mean accepted block {r.mean_accepted:.2f}, "
              f"model calls {r.model_calls}, PSNR {psnr(r.images.numpy(), hr.numpy()):.2f} dB")
    same = (runs["exact"].images == runs["sequential"].images).float().mean().item()
    print(f"{rule:>7}: exact blockwise has {same:.2%} of its intensities identical to sequential "
          "decoding in float32")
greedy, exact, approx = (decodes[DEFAULT_RULE][n] for n in ("sequential", "exact", "epsilon=2"))""")

md("""Exact acceptance reproduces sequential decoding as an algorithm. In float32 a step over k
tokens and a step over one token round differently (other matrix shapes), which can flip a
choice that sits on a tie; float64 leaves no such ties, so there the two must be identical:""")
code("""import copy

m64 = copy.deepcopy(model).double()
for rule in RULE_NAMES:
    seq64 = sequential_decode(m64, lr[:1], rule=rule, n_tokens=384)
    blk64 = blockwise_parallel_decode(m64, lr[:1], k=K, epsilon=0, rule=rule, n_tokens=384)
    # compare the decoded tokens only: past n_tokens blockwise leaves its look-ahead scratch
    seq_tokens, blk_tokens = (image_to_tokens(r.images)[:, :384] for r in (seq64, blk64))
    assert torch.equal(seq_tokens, blk_tokens), rule
print("float64, first 384 tokens: exact blockwise == sequential for", RULE_NAMES)""")

md("## Input | bicubic | argmax and mean decodes | ground truth")
code("""bicubic = upscale_bicubic(lr.numpy())
cols = [("input 8x8", lr.numpy()), ("bicubic", bicubic)]
for rule in RULE_NAMES:
    cols += [(f"{rule}", decodes[rule]["sequential"].images.numpy()),
             (f"{rule} eps=2", decodes[rule]["epsilon=2"].images.numpy())]
cols.append(("ground truth", hr.numpy()))
fig, axes = plt.subplots(len(hr), len(cols), figsize=(1.8 * len(cols), 2 * len(hr)), squeeze=False)
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

md("""## Heatmaps: accepted block length per pixel, argmax against mean

Each pixel shows the mean (over its three channels) of the accepted length of the step that
produced it (epsilon = 2), and the step index at which it was decoded under the default rule:
where the step index rises slowly, decoding moved fast.""")
code("""fig, axes = plt.subplots(len(hr), 3, figsize=(8, 2.4 * len(hr)), squeeze=False)
for i in range(len(hr)):
    for j, rule in enumerate(RULE_NAMES):
        r = decodes[rule]["epsilon=2"]
        im = axes[i, j].imshow(accepted_length_map(r.accepted[i], r.step_index[i]),
                               vmin=1, vmax=K, cmap="viridis")
        axes[i, j].set_title(f"{rule}, eps=2: block ({r.mean_accepted:.2f})", fontsize=9)
        plt.colorbar(im, ax=axes[i, j], fraction=0.046)
    im = axes[i, 2].imshow(step_map(approx.step_index[i]), cmap="magma")
    axes[i, 2].set_title(f"{DEFAULT_RULE}, eps=2: step index", fontsize=9)
    plt.colorbar(im, ax=axes[i, 2], fraction=0.046)
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
# k = K with epsilon 2 under the default rule is the decode above (`approx`): not done twice
rows = {2: [approx.mean_accepted if k == K else
            blockwise_parallel_decode(model, one, k=k, epsilon=2).mean_accepted for k in ks]}
print("decoding rule:", DEFAULT_RULE)
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
# three samples of the face in one batch: each row draws its own tokens
drawn = blockwise_parallel_decode(model, lr[:1].expand(3, -1, -1, -1), k=K, temperature=T,
                                  generator=torch.Generator().manual_seed(0))
fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
panels = [(DEFAULT_RULE, greedy.images[0])] + [(f"sample {s}", drawn.images[s]) for s in range(3)]
for ax, (name, img) in zip(axes[:4], panels, strict=True):
    ax.imshow(img.numpy(), interpolation="nearest")
    ax.set_title(name, fontsize=9)
for ax, (name, r) in zip(axes[4:], [(f"{DEFAULT_RULE} eps=2", approx), (f"sample T={T}", drawn)], strict=True):
    ax.imshow(accepted_length_map(r.accepted[0], r.step_index[0]), vmin=1, vmax=K, cmap="viridis")
    ax.set_title(f"{name}: block", fontsize=9)
for ax in axes:
    ax.set(xticks=[], yticks=[])
# tokens per step of each sample: 3072 over its number of steps
print("mean accepted block under sampling:", [round(float(a.float().mean()), 2) for a in drawn.accepted])""")


def build() -> nbf.NotebookNode:
    """The notebook of the cells above (no outputs)."""
    nb = nbf.v4.new_notebook()
    nb["cells"] = [nbf.from_dict(c) for c in cells]  # copies: executing one leaves these clean
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}
    return nb


def execute(nb: nbf.NotebookNode) -> None:
    """Run every cell in the repository root (as nbmake does) and keep the outputs."""
    from nbclient import NotebookClient

    root = PATH.parent.parent
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(root)}}).execute()


if __name__ == "__main__":
    notebook = build()
    if "--execute" in sys.argv:
        execute(notebook)
    nbf.write(notebook, str(PATH))
    print(f"written {PATH}")
