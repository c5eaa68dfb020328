"""Benchmarks. Functions here return data (dicts and lists); the CLI prints and saves them.

- ``step_costs``: the cost of one cached decoder step over k new tokens (plus the proposal
  heads at one position) relative to a sequential step over 1 token: the quantity that local
  attention and the cache keep small, and that bounds the wall-clock gain of Stern et al.'s
  method (their section 7 measures it as "wall-clock speedup" against mean block size).
- ``table``: the paper's Table 2 on a set of faces: mean accepted block size, model calls,
  seconds per image at batch 1, speed-up over sequential decoding timed in the same run, PSNR and SSIM,
  for every (k, epsilon). Greedy is run first and is the baseline of every speed-up.
- ``throughput``: images per second at larger batch sizes, sequential against blockwise.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import numpy as np
import torch

from bpd_sr.config import DEFAULT_RULE
from bpd_sr.decoding.loop import (
    DecodeResult,
    blockwise_parallel_decode,
    sequential_decode,
    tokens_per_step,
)
from bpd_sr.evaluation.metrics import quality, upscale_bicubic, upscale_lanczos
from bpd_sr.io.atomic import write_atomic
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import ImageTransformer

# Stern et al. 2018, Table 2 (CelebA dev, mean accepted block size; docs/method.md): the
# fine-tuned model with exact acceptance and with epsilon = 2 (a frozen base with exact
# acceptance stays <= 1.10).
PAPER_TABLE2 = {
    "finetune_exact": {2: 1.59, 4: 2.11, 6: 2.23, 8: 2.17, 10: 2.04},
    "finetune_eps2": {2: 1.96, 4: 3.75, 6: 5.25, 8: 6.36, 10: 6.79},
}


def _decode(model, lr, k: int, epsilon: int, rule: str = DEFAULT_RULE) -> DecodeResult:
    if k == 1:
        return sequential_decode(model, lr, rule=rule)
    return blockwise_parallel_decode(model, lr, k=k, epsilon=epsilon, rule=rule)


def table(
    model: ImageTransformer,
    hr: torch.Tensor,
    ks: Iterable[int] = (2, 4, 6, 8, 10),
    epsilons: Iterable[int] = (0, 2),
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    rule: str = DEFAULT_RULE,
) -> dict:
    """Decode every face at batch 1 sequentially and with each (k, epsilon), all with the
    decoding rule ``rule`` (bpd_sr.decoding.rules), which the result records.

    hr: uint8 (N, 32, 32, 3) ground truth; the input is its 4x4 area mean.
    Returns {"baselines": ..., "rows": [...]} where each row has k, epsilon, mean_accepted,
    model_calls_per_image, seconds_per_image (median over images), speedup (sequential's
    median / this one's, timed interleaved face by face), psnr, ssim, and
    identical_to_sequential (share of images).
    """
    lr = downsample(hr)
    n = len(lr)
    ref = hr.numpy()
    lr_np = lr.numpy()
    baselines = {name: {kk: v for kk, v in quality(fn(lr_np), ref).items() if kk in ("psnr", "ssim")}
                 for name, fn in (("bicubic", upscale_bicubic), ("lanczos", upscale_lanczos))}
    for _ in range(warmup):
        blockwise_parallel_decode(model, lr[:1], k=min(2, model.cfg.k), rule=rule)
        sequential_decode(model, lr[:1], rule=rule)
    configs = list(dict.fromkeys(
        [(1, 0)] + [(k, e) for k in ks for e in epsilons if k <= model.cfg.k]))
    rows = _rows(_decode_interleaved(model, lr, configs, rule, progress), ref)
    below = np.mean(np.asarray(rows[0]["psnr_per_image"]) < quality(upscale_bicubic(lr_np), ref)["psnr_per_image"])
    return {"n_images": n, "rule": rule, "baselines": baselines,
            "sequential_share_below_bicubic": float(below), "rows": rows}


def _decode_interleaved(model, lr: torch.Tensor, configs: list, rule: str, progress) -> dict:
    """Every face at batch 1 by every (k, epsilon) of configs (k = 1: sequential) ->
    {config: {"secs", "images", "accepted", "calls"}}. Interleaved: each face is decoded by
    every configuration in turn, so that load from other work (or a machine's drift) falls
    on all of them alike, sequential included."""
    decoded = {c: {"secs": [], "images": [], "accepted": [], "calls": 0} for c in configs}
    for i in range(len(lr)):
        if progress:
            progress(f"face {i + 1}/{len(lr)}")
        for k, eps in configs:
            res = _decode(model, lr[i : i + 1], k, eps, rule)
            d = decoded[(k, eps)]
            d["secs"].append(res.seconds)
            d["images"].append(res.images)
            d["accepted"] += res.accepted
            d["calls"] += res.model_calls
    return decoded


def _rows(decoded: dict, ref: np.ndarray) -> list[dict]:
    """The table's rows from ``_decode_interleaved``'s decodes (sequential first) of the
    faces ref uint8 (N, 32, 32, 3)."""
    n = len(ref)
    rows = []
    sequential_images = torch.cat(decoded[(1, 0)]["images"])
    sequential_sec = statistics.median(decoded[(1, 0)]["secs"])
    for (k, eps), d in decoded.items():
        images = torch.cat(d["images"])
        q = quality(images.numpy(), ref)
        sec = statistics.median(d["secs"])
        same = (images == sequential_images).flatten(1).all(1).float().mean().item()
        rows.append({
            "k": k, "epsilon": eps, "regime": "sequential" if k == 1 else f"eps{eps}",
            "mean_accepted": tokens_per_step(d["accepted"]), "model_calls_per_image": d["calls"] / n,
            "seconds_per_image": sec, "seconds_per_image_mean": statistics.fmean(d["secs"]),
            "speedup": sequential_sec / sec, "psnr": q["psnr"], "ssim": q["ssim"],
            "psnr_per_image": [float(x) for x in q["psnr_per_image"]],
            "identical_to_sequential": same,
        })
    return rows


def sampling_table(
    model: ImageTransformer, hr: torch.Tensor, temperatures: Iterable[float] = (0.8, 0.9, 1.0),
    ks: Iterable[int] = (4, 10), seed: int = 0,
) -> list[dict]:
    """Exact sampling at batch 1: plain cached sampling (one token per call) against blockwise
    sampling with the heads (speculative acceptance), timed in the same run, per temperature.
    hr: uint8 (N, 32, 32, 3). Each row: temperature, k (1 = plain), mean_accepted,
    seconds_per_image (median), speedup over plain sampling, psnr, ssim."""
    from bpd_sr.decoding.loop import sample_decode

    lr = downsample(hr)
    ref = hr.numpy()
    rows = []
    for t in temperatures:
        plain_sec = None
        for k in [1, *[k for k in ks if k <= model.cfg.k]]:
            secs, images, accepted = [], [], []
            for i in range(len(lr)):
                g = torch.Generator().manual_seed(seed * 100_003 + i)
                if k == 1:
                    res = sample_decode(model, lr[i : i + 1], t, g)
                else:
                    res = blockwise_parallel_decode(model, lr[i : i + 1], k=k, temperature=t, generator=g)
                secs.append(res.seconds)
                images.append(res.images)
                accepted += res.accepted
            sec = statistics.median(secs)
            plain_sec = sec if k == 1 else plain_sec
            q = quality(torch.cat(images).numpy(), ref)
            rows.append({"temperature": t, "k": k,
                         "mean_accepted": tokens_per_step(accepted),
                         "seconds_per_image": sec, "speedup": plain_sec / sec,
                         "psnr": q["psnr"], "ssim": q["ssim"]})
    return rows


def throughput(
    model: ImageTransformer, hr: torch.Tensor, batch_sizes: Iterable[int] = (1, 8, 32),
    configs: Iterable[tuple[int, int]] = ((1, 0), (4, 2), (8, 2), (10, 2)),
    rule: str = DEFAULT_RULE,
) -> list[dict]:
    """Images per second of one batch decode at each batch size, for sequential decoding (k = 1) and
    blockwise (k, epsilon) configurations. hr: uint8 (N, 32, 32, 3), N >= max batch size."""
    lr = downsample(hr)
    out = []
    for bs in batch_sizes:
        if bs > len(lr):
            continue
        batch = lr[:bs]
        for k, eps in configs:
            if k > model.cfg.k:
                continue
            res = _decode(model, batch, k, eps, rule)
            out.append({"batch_size": bs, "k": k, "epsilon": eps, "rule": rule,
                        "images_per_second": bs / res.seconds, "seconds": res.seconds,
                        "mean_accepted": res.mean_accepted, "model_calls": res.model_calls})
    return out


def markdown_table(result: dict) -> str:
    """The measured table laid out like the paper's Table 2 (rows k, a group of columns per
    epsilon), beside the paper's fine-tuned rows."""
    rows = {(r["k"], r["epsilon"]): r for r in result["rows"]}
    g = rows[(1, 0)]
    epsilons = sorted({e for k, e in rows if k > 1})
    head = "| k | " + " | ".join(f"eps={e}: mean block | eps={e}: speed-up | eps={e}: PSNR / SSIM"
                                 for e in epsilons) + " | paper exact | paper eps=2 |"
    lines = [
        f"Decoding rule: {result.get('rule', 'argmax')}. Speed-up: against sequential decoding "
        "timed interleaved (each face decoded by every configuration in turn), batch 1.",
        "",
        head,
        "|" + "---|" * (3 * len(epsilons) + 3),
        f"| 1 (sequential, {g['seconds_per_image']:.2f} s/image) | "
        + " | ".join(f"1.00 | 1.00x | {g['psnr']:.2f} / {g['ssim']:.3f}" for _ in epsilons)
        + " | 1.00 | 1.00 |",
    ]

    def cell(r, key, fmt):
        return format(r[key], fmt) if r else "-"

    for k in sorted({k for k, _ in rows if k > 1}):
        cells = []
        for e in epsilons:
            r = rows.get((k, e))
            cells.append(f"{cell(r, 'mean_accepted', '.2f')} | {cell(r, 'speedup', '.2f')}x | "
                         f"{cell(r, 'psnr', '.2f')} / {cell(r, 'ssim', '.3f')}")
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {PAPER_TABLE2['finetune_exact'].get(k, '-')} "
                     f"| {PAPER_TABLE2['finetune_eps2'].get(k, '-')} |")
    b = result["baselines"]
    lines.append("")
    lines.append(f"Baselines on the same {result['n_images']} faces: bicubic {b['bicubic']['psnr']:.2f} dB / "
                 f"{b['bicubic']['ssim']:.3f}, Lanczos {b['lanczos']['psnr']:.2f} dB / {b['lanczos']['ssim']:.3f}.")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Mean accepted block size and speed-up (interleaved timing) against k, one line per
    epsilon, beside the paper's (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    markers = "os^dvP*X"
    epsilons = sorted({r["epsilon"] for r in result["rows"] if r["k"] > 1})
    for i, eps in enumerate(epsilons):
        rs = sorted((r for r in result["rows"] if r["epsilon"] == eps and r["k"] > 1), key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        style = markers[i % len(markers)] + "-"
        axes[0].plot(ks, [r["mean_accepted"] for r in rs], style, label=f"bpd-sr, epsilon={eps}")
        axes[1].plot(ks, [r["speedup"] for r in rs], style, label=f"bpd-sr, epsilon={eps}")
    for name, key, style in (("paper exact", "finetune_exact", "x--"), ("paper eps=2", "finetune_eps2", "+--")):
        ks = sorted(PAPER_TABLE2[key])
        axes[0].plot(ks, [PAPER_TABLE2[key][k] for k in ks], style, color="grey", label=name)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="k", ylabel="mean accepted block size")
    axes[1].set(xlabel="k", ylabel="speed-up over sequential (interleaved)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def benchmark_markdown(result: dict) -> str:
    """The benchmark's Markdown: the paper's table (``markdown_table``), the throughput at
    each batch size and, when measured, the sampling table."""
    md = markdown_table(result["table"])
    md += ("\n\n| batch | k | epsilon | images/s | mean block |\n|---|---|---|---|---|\n"
           + "\n".join(f"| {r['batch_size']} | {r['k']} | {r['epsilon']} | "
                       f"{r['images_per_second']:.3f} | {r['mean_accepted']:.2f} |"
                       for r in result["throughput"]) + "\n")
    if result.get("sampling"):
        md += ("\n| temperature | k | mean block | s/image | speed-up over plain sampling | PSNR "
               "| SSIM |\n|---|---|---|---|---|---|---|\n" + "\n".join(
                   f"| {r['temperature']} | {r['k'] if r['k'] > 1 else '1 (plain)'} | "
                   f"{r['mean_accepted']:.2f} | {r['seconds_per_image']:.2f} | {r['speedup']:.2f}x "
                   f"| {r['psnr']:.2f} | {r['ssim']:.3f} |" for r in result["sampling"]) + "\n")
    return md


__all__ = ["PAPER_TABLE2", "benchmark_markdown", "markdown_table", "plot", "sampling_table",
           "table", "throughput"]
