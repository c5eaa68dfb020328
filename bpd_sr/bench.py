"""Benchmarks. Functions here return data (dicts and lists); the CLI prints and saves them.

- ``step_costs``: the cost of one cached decoder step over k new tokens (plus the proposal
  heads at one position) relative to a greedy step over 1 token: the quantity that local
  attention and the cache keep small, and that bounds the wall-clock gain of Stern et al.'s
  method (their section 7 measures it as "wall-clock speedup" against mean block size).
- ``table``: the paper's Table 2 on a set of faces: mean accepted block size, model calls,
  seconds per image at batch 1, speed-up over greedy timed in the same run, PSNR and SSIM,
  for every (k, epsilon). Greedy is run first and is the baseline of every speed-up.
- ``throughput``: images per second at larger batch sizes, greedy against blockwise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from .atomic import write_atomic
from .config import DEFAULT_EPSILON, DEFAULT_RULE
from .decoding import DecodeResult, blockwise_parallel_decode, greedy_decode, tokens_per_step
from .metrics import quality, upscale_bicubic, upscale_lanczos
from .model import ImageTransformer
from .quiet import quiet_stderr
from .tokens import BOS, downsample, previous_token_inputs
from .trainspeed import synchronize

# Stern et al. 2018, Table 2 (CelebA dev, mean accepted block size; docs/method.md):
# the fine-tuned model with epsilon = 2 for every k; with exact acceptance only its peak
# (2.23 at k = 6) is quoted; a frozen base with exact acceptance stays <= 1.10.
PAPER_TABLE2 = {
    "finetune_exact": {6: 2.23},
    "finetune_eps2": {2: 1.96, 4: 3.75, 6: 5.25, 8: 6.36, 10: 6.79},
}


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def step_costs(model: ImageTransformer, ks: Iterable[int], repeats: int = 300,
               position: int = 1500) -> dict:
    """Seconds of one cached decoding step at batch 1, for each k, and their ratio to a greedy
    step. A step over k tokens is what blockwise decoding runs: the decoder over k new tokens,
    the base logits at all k, and the proposal heads at the one accepted position."""
    lr = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    ctx = model.encode(lr)
    cache = model.new_cache(1)
    rows = torch.zeros(1, dtype=torch.long)
    inputs = torch.full((1, 16), BOS - 1, dtype=torch.long)

    def step(k: int):
        pos = torch.arange(position, position + k)[None]
        h = model.decoder_hidden(ctx, previous_token_inputs(inputs[:, :k] % 256, pos), pos, cache, rows)
        base = model.logits(ctx, h, pos, 1)
        if k > 1:
            model.logits(ctx, h[:, -1:], pos[:, -1:], model.cfg.k)
        return base

    out = {}
    greedy = None
    for k in [1, *[k for k in ks if k != 1]]:
        for _ in range(20):
            step(k)
        sec = _median_time(lambda k=k: step(k), repeats)
        greedy = sec if k == 1 else greedy
        out[k] = {"seconds": sec, "ratio_to_greedy_step": sec / greedy}
    return out


def _decode(model, lr, k: int, epsilon: int, rule: str = DEFAULT_RULE) -> DecodeResult:
    if k == 1:
        return greedy_decode(model, lr, rule=rule)
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
    decoding rule ``rule`` (bpd_sr.rules), which the result records.

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
        greedy_decode(model, lr[:1], rule=rule)
    configs = list(dict.fromkeys(
        [(1, 0)] + [(k, e) for k in ks for e in epsilons if k <= model.cfg.k]))
    # interleaved: each face is decoded by every configuration in turn, so that load from
    # other work (or a machine's drift) falls on all of them alike, sequential included
    decoded = {c: {"secs": [], "images": [], "accepted": [], "calls": 0} for c in configs}
    for i in range(n):
        if progress:
            progress(f"face {i + 1}/{n}")
        for k, eps in configs:
            res = _decode(model, lr[i : i + 1], k, eps, rule)
            d = decoded[(k, eps)]
            d["secs"].append(res.seconds)
            d["images"].append(res.images)
            d["accepted"] += res.accepted
            d["calls"] += res.model_calls
    rows = []
    greedy_images = torch.cat(decoded[(1, 0)]["images"])
    greedy_sec = statistics.median(decoded[(1, 0)]["secs"])
    for (k, eps), d in decoded.items():
        images = torch.cat(d["images"])
        q = quality(images.numpy(), ref)
        sec = statistics.median(d["secs"])
        same = (images == greedy_images).flatten(1).all(1).float().mean().item()
        rows.append({
            "k": k, "epsilon": eps, "regime": "sequential" if k == 1 else f"eps{eps}",
            "mean_accepted": tokens_per_step(d["accepted"]), "model_calls_per_image": d["calls"] / n,
            "seconds_per_image": sec, "seconds_per_image_mean": statistics.fmean(d["secs"]),
            "speedup": greedy_sec / sec, "psnr": q["psnr"], "ssim": q["ssim"],
            "psnr_per_image": [float(x) for x in q["psnr_per_image"]],
            "identical_to_sequential": same,
        })
    below = np.mean(np.asarray(rows[0]["psnr_per_image"]) < quality(upscale_bicubic(lr_np), ref)["psnr_per_image"])
    return {"n_images": n, "rule": rule, "baselines": baselines,
            "sequential_share_below_bicubic": float(below), "rows": rows}


def sampling_table(
    model: ImageTransformer, hr: torch.Tensor, temperatures: Iterable[float] = (0.8, 0.9, 1.0),
    ks: Iterable[int] = (4, 10), seed: int = 0,
) -> list[dict]:
    """Exact sampling at batch 1: plain cached sampling (one token per call) against blockwise
    sampling with the heads (speculative acceptance), timed in the same run, per temperature.
    hr: uint8 (N, 32, 32, 3). Each row: temperature, k (1 = plain), mean_accepted,
    seconds_per_image (median), speedup over plain sampling, psnr, ssim."""
    from .decoding import sample_decode

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
    """Images per second of one batch decode at each batch size, for greedy (k = 1) and
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


def _step_fn(model, variant: str, batch: int, k: int, position: int = 1500):
    """A zero-argument function running one decoding step at batch ``batch`` over k tokens
    the way decoding runs it: the decoder over k new tokens and the base logits at each, plus
    (k > 1) the proposal slots at the last one. variant: "reference" (the module path on the
    token-major cache: the step as it was), "eager" (``bpd_sr.step``) or "compiled"."""
    from .compiled import uncompile_decoder

    if variant != "compiled":
        uncompile_decoder(model)
    lr = torch.zeros(batch, 8, 8, 3, dtype=torch.uint8, device=next(model.parameters()).device)
    ctx = model.encode(lr)
    cache = model.new_cache(batch, reference=variant == "reference")
    logits = model.reference_logits if variant == "reference" else model.logits
    rows = torch.arange(batch, device=lr.device)
    pos = torch.arange(position, position + k, device=lr.device).expand(batch, -1)
    inputs = previous_token_inputs(torch.full_like(pos, 7), pos)

    def step():
        h = model.decoder_hidden(ctx, inputs, pos, cache, rows)
        out = logits(ctx, h, pos, 1)
        if k > 1:
            logits(ctx, h[:, -1:], pos[:, -1:], model.cfg.k)
        return out

    return step


@torch.inference_mode()
def step_seconds(model, variants=("reference", "eager"), ks=(1, 8), batch: int = 1,
                 rounds: int = 7, repeats: int = 50, compiled=None) -> dict:
    """Median seconds of one decoding step per variant and k (``_step_fn``), measured in
    interleaved rounds (every variant and k once per round, then the median over rounds of
    each round's median) so that other load on the machine hits all of them alike.
    compiled: the ``CompiledStep`` to use for the "compiled" variant."""
    fns = {}
    for v in variants:
        for k in ks:
            fns[(v, k)] = _step_fn(model, v, batch, k)
    samples: dict = {key: [] for key in fns}
    for _ in range(rounds):
        for (v, k), fn in fns.items():
            if v == "compiled":
                model._compiled_step = compiled
            else:
                model.__dict__.pop("_compiled_step", None)
            for _ in range(3):
                fn()
            samples[(v, k)].append(_median_time(fn, repeats))
    model.__dict__.pop("_compiled_step", None)
    return {v: {k: statistics.median(samples[(v, k)]) for k in ks} for v in variants}


@torch.inference_mode()
def op_counts(model, variant: str, k: int = 1, batch: int = 1, compiled=None) -> dict:
    """Operations one step runs (torch.profiler): top-level aten ops (the ones Python or a
    compiled graph called) and all aten calls (nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    fn = _step_fn(model, variant, batch, k)
    if variant == "compiled":
        model._compiled_step = compiled
    for _ in range(3):
        fn()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    model.__dict__.pop("_compiled_step", None)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"top_level_aten_ops": len(top), "aten_calls": len(aten)}


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory: the best of ``repeats`` sums over a
    buffer far larger than the caches."""
    buf = torch.ones(megabytes * 2**20 // 4)
    best = min(_median_time(buf.sum, 1) for _ in range(repeats))
    return buf.numel() * 4 / best


def decoder_bytes(model) -> dict:
    """Bytes of the weights one step reads: the decoder layers, final norm and output layer
    (a one-token step), and the proposal heads (read too by a blockwise step)."""
    def size(mods):
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    step = size([model.dec_layers, model.dec_ln, model.out_proj])
    return {"one_token_step": step, "proposal_heads": size([model.heads])}


@torch.inference_mode()
def seconds_per_image(model, hr: torch.Tensor, batch_sizes=(1, 8, 32, 64), k_fixed: int | None = None,
                      epsilon: int = DEFAULT_EPSILON, n_tokens: int = 3072, progress=None) -> list[dict]:
    """At each batch size: seconds per image of sequential decoding, blockwise decoding with
    k_fixed (default: the model's k) and with k = "auto" (its calibration timed apart, and not
    counted: it is paid once per machine and kept). n_tokens < 3072 decodes only the first
    n tokens of each image (for a quick run; the seconds are then per n tokens).
    hr: uint8 (N, 32, 32, 3), N >= the largest batch size."""
    from .autok import choose_k

    lr = downsample(hr)
    k_fixed = k_fixed or model.cfg.k
    rows = []
    for bs in batch_sizes:
        if bs > len(lr):
            continue
        batch = lr[:bs]
        if progress:
            progress(f"batch {bs}: choosing k")
        # the same arguments as blockwise_parallel_decode(k="auto") passes: the decode below
        # reuses this very choice (kept in memory), so its time has no calibration in it
        choice = choose_k(model, batch, epsilon=epsilon, top_t=None, min_block=1,
                          rule=DEFAULT_RULE, refine=None, temperature=0.0)
        row = {"batch_size": bs, "n_tokens": n_tokens, "auto_k": choice.k,
               "auto_calibration_seconds": choice.calibration_seconds,
               "auto_measured_seconds_per_step": choice.seconds_per_step,
               "auto_tokens_per_step": choice.tokens_per_step}
        for name, kw in (("sequential", None), (f"k={k_fixed}", k_fixed), ("auto", "auto")):
            if progress:
                progress(f"batch {bs}: {name}")
            if kw is None:
                res = greedy_decode(model, batch, n_tokens=n_tokens)
            else:
                res = blockwise_parallel_decode(model, batch, k=kw, epsilon=epsilon, n_tokens=n_tokens)
            row[name] = {"seconds_per_image": res.seconds / bs, "mean_accepted": res.mean_accepted}
        rows.append(row)
    return rows


def speed_report(model, hr: torch.Tensor | None = None, batch_sizes=(1, 8, 32, 64), k: int = 8,
                 compile_step: bool = True, n_tokens: int = 3072, rounds: int = 7,
                 progress=None) -> dict:
    """Everything the README's speed section shows, as data: per-step seconds at 1 and k
    tokens for the step as it was, the eager step and the compiled one (with compile time),
    operations per step, the weight-read floor, and seconds per image at each batch size."""
    import platform

    compiled, compile_seconds, variants = None, None, ("reference", "eager")
    if compile_step:
        from .compiled import CompiledStep, warm_up

        if progress:
            progress("compiling")
        compiled = model._compiled_step = CompiledStep(model)
        compile_seconds = warm_up(model, 1, (k,))
        variants = ("reference", "eager", "compiled")
    if progress:
        progress("step costs")
    steps = step_seconds(model, variants, (1, k), rounds=rounds, compiled=compiled)
    ops = {v: {kk: op_counts(model, v, kk, compiled=compiled) for kk in (1, k)} for v in variants}
    bw = memory_bandwidth()
    weights = decoder_bytes(model)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if platform.system() == "Linux" else platform.processor()
    out = {
        "machine": {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "k": k, "step_seconds": steps, "compile_seconds": compile_seconds, "ops_per_step": ops,
        "memory_bandwidth_bytes_per_second": bw, "weight_bytes": weights,
        "weight_read_floor_seconds": weights["one_token_step"] / bw,
        "ratios": {
            "eager_1_over_reference_1": steps["eager"][1] / steps["reference"][1],
            f"eager_{k}_over_eager_1": steps["eager"][k] / steps["eager"][1],
        },
    }
    if compiled is not None:
        out["ratios"]["compiled_1_over_reference_1"] = steps["compiled"][1] / steps["reference"][1]
        out["ratios"][f"compiled_{k}_over_compiled_1"] = steps["compiled"][k] / steps["compiled"][1]
    if hr is not None:
        out["seconds_per_image"] = seconds_per_image(model, hr, batch_sizes, n_tokens=n_tokens,
                                                     progress=progress)
    return out


def speed_markdown(r: dict) -> str:
    """The speed report (``speed_report``) as Markdown tables."""
    k, st, ops = r["k"], r["step_seconds"], r["ops_per_step"]
    names = {"reference": "as it was (modules, token-major cache)", "eager": "eager step",
             "compiled": "compiled step"}
    ref1 = st["reference"][1]
    lines = [f"CPU: {r['machine']['cpu']}, {r['machine']['threads']} thread(s), torch "
             f"{r['machine']['torch']}. One decoding step at batch 1 (medians of interleaved rounds):",
             "", f"| step | 1 token (ms) | {k} tokens (ms) | {k} / 1 | 1 token / as it was "
             f"| aten ops per step: top-level, all (1 token) |", "|---|---|---|---|---|---|"]
    for v in st:
        lines.append(f"| {names.get(v, v)} | {st[v][1] * 1e3:.3f} | {st[v][k] * 1e3:.3f} | "
                     f"{st[v][k] / st[v][1]:.2f} | {st[v][1] / ref1:.2f} | "
                     f"{ops[v][1]['top_level_aten_ops']}, {ops[v][1]['aten_calls']} |")
    lines += ["", f"Weight-read floor of a one-token step: {r['weight_bytes']['one_token_step'] / 1e6:.1f} MB "
              f"of weights at {r['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s measured = "
              f"{r['weight_read_floor_seconds'] * 1e3:.3f} ms (the proposal heads add "
              f"{r['weight_bytes']['proposal_heads'] / 1e6:.1f} MB to a blockwise step)."]
    if r.get("compile_seconds") is not None:
        lines.append(f"Compiling (or loading from Inductor's cache) the 1- and {k}-token steps took "
                     f"{r['compile_seconds']:.1f} s.")
    rows = r.get("seconds_per_image")
    if rows:
        kk = next(key for key in rows[0] if key.startswith("k="))
        lines += ["", f"Seconds per image (first {rows[0]['n_tokens']} tokens of each; epsilon 2; "
                  "the k=auto calibration is timed apart):", "",
                  f"| batch | sequential | blockwise {kk} (mean block) | k=auto: chosen k | k=auto "
                  "| auto / sequential | calibration (s) |", "|---|---|---|---|---|---|---|"]
        for row in rows:
            seq, fix, auto = row["sequential"], row[kk], row["auto"]
            lines.append(
                f"| {row['batch_size']} | {seq['seconds_per_image']:.3f} | "
                f"{fix['seconds_per_image']:.3f} ({fix['mean_accepted']:.2f}) | "
                f"{row['auto_k'] if row['auto_k'] > 1 else '1 (sequential)'} | "
                f"{auto['seconds_per_image']:.3f} | "
                f"{auto['seconds_per_image'] / seq['seconds_per_image']:.2f} | "
                f"{row['auto_calibration_seconds']:.1f} |")
    return "\n".join(lines) + "\n"




def _timed_decode(model, lr: torch.Tensor, k: int, epsilon: int, rule: str) -> tuple[DecodeResult, float]:
    """One whole decode (sequential when k == 1) and its wall-clock seconds, the device
    waited for at both ends."""
    dev = next(model.parameters()).device
    synchronize(dev)
    t0 = time.perf_counter()
    res = _decode(model, lr, k, epsilon, rule)
    synchronize(dev)
    return res, time.perf_counter() - t0


@torch.inference_mode()
def decode_grid(model, hr: torch.Tensor, batch_sizes: Iterable[int], ks: Iterable[int],
                epsilons: Iterable[int], budget_seconds: float, rule: str = DEFAULT_RULE,
                progress=None) -> dict:
    """Whole-face seconds per image for sequential decoding and blockwise decoding at every
    (k, epsilon), at each batch size, with tokens per step and the speed-up over sequential
    decoding at the same batch size; made for a device lent for minutes (a GPU).

    Configurations run in order (sequential first, then the (k, epsilon) pairs as given),
    each at every batch size before the next; once budget_seconds have passed no new decode
    starts, and what was left is listed under ``skipped``. Last, the same blockwise decode
    at the first batch size with the decoder reading its layout from the device at every
    call (``probing_layout``) measures what the host-device syncs that the loop avoids cost.
    hr: uint8 (N, 32, 32, 3); a batch of b takes faces 0..b-1, repeated when N < b.
    """
    from .decoding import probing_layout

    lr_all = downsample(hr)
    batch_sizes = list(batch_sizes)
    configs = list(dict.fromkeys(  # in order, each once
        [(1, 0)] + [(k, e) for k in ks for e in epsilons if 1 < k <= model.cfg.k]))
    t_start = time.perf_counter()
    blockwise_parallel_decode(model, lr_all[:1], k=max(k for k, _ in configs), n_tokens=96)
    rows, skipped = [], []
    for k, eps in configs:
        for bs in batch_sizes:
            name = "sequential" if k == 1 else f"k={k} eps={eps}"
            if time.perf_counter() - t_start > budget_seconds:
                skipped.append({"batch_size": bs, "k": k, "epsilon": eps})
                continue
            if progress:
                progress(f"batch {bs}: {name}")
            lr = lr_all[torch.arange(bs) % len(lr_all)]
            res, seconds = _timed_decode(model, lr, k, eps, rule)
            rows.append({"batch_size": bs, "k": k, "epsilon": eps if k > 1 else None,
                         "seconds_per_image": seconds / bs, "tokens_per_step": res.mean_accepted,
                         "steps": max(res.steps)})
    for r in rows:
        seq = next((q for q in rows if q["k"] == 1 and q["batch_size"] == r["batch_size"]), None)
        r["speedup_vs_sequential"] = seq["seconds_per_image"] / r["seconds_per_image"] if seq else None
    syncs = None
    blockwise = [r for r in rows if r["k"] > 1 and r["batch_size"] == batch_sizes[0]]
    if blockwise and time.perf_counter() - t_start <= budget_seconds:
        r = blockwise[-1]
        lr = lr_all[torch.arange(r["batch_size"]) % len(lr_all)]
        with probing_layout():
            _, seconds = _timed_decode(model, lr, r["k"], r["epsilon"], rule)
        syncs = {"batch_size": r["batch_size"], "k": r["k"], "epsilon": r["epsilon"],
                 "seconds_per_image_one_sync_per_step": r["seconds_per_image"],
                 "seconds_per_image_syncing_every_call": seconds / r["batch_size"]}
    return {"device": str(next(model.parameters()).device), "rule": rule,
            "budget_seconds": budget_seconds,
            "seconds": time.perf_counter() - t_start, "rows": rows, "skipped": skipped,
            "host_syncs": syncs}


__all__ = ["decode_grid", "markdown_table", "op_counts", "plot", "sampling_table",
           "seconds_per_image", "speed_markdown", "speed_report", "step_costs", "step_seconds",
           "table", "throughput"]
