"""Speed benchmarks. Functions here return data (dicts and lists); the CLI prints and saves
them.

- ``step_costs``: the cost of one cached decoder step over k new tokens (plus the proposal
  heads at one position) relative to a sequential step over 1 token: the quantity that
  local attention and the cache keep small, and that bounds the wall-clock gain of Stern et
  al.'s method (their section 7 measures it as "wall-clock speedup" against mean block
  size).
- ``speed_report`` / ``seconds_per_image``: whole-face seconds per image at each batch size.
- ``decode_grid``: the same on a device, for sequential decoding and every (k, epsilon)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch

from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_RULE
from bpd_sr.decoding.loop import (
    DecodeResult,
    blockwise_parallel_decode,
    sequential_decode,
)
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.decoding.steptime import step_function
from bpd_sr.evaluation.table import _decode
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import ImageTransformer
from bpd_sr.quiet import quiet_stderr
from bpd_sr.timing import median_seconds
from bpd_sr.training.trainspeed import synchronize


@torch.inference_mode()
def step_costs(model: ImageTransformer, ks: Iterable[int], repeats: int = 300,
               position: int = 1500) -> dict:
    """Seconds of one cached decoding step at batch 1, for each k, and their ratio to a sequential
    step. A step over k tokens is what blockwise decoding runs (``bpd_sr.decoding.steptime``)."""
    session = DecodingSession(model)
    out = {}
    sequential = None
    for k in [1, *[k for k in ks if k != 1]]:
        step = step_function(session, 1, k, position)
        for _ in range(20):
            step()
        sec = median_seconds(step, repeats)
        sequential = sec if k == 1 else sequential
        out[k] = {"seconds": sec, "ratio_to_sequential_step": sec / sequential}
    return out


@torch.inference_mode()
def step_seconds(sessions: dict, ks=(1, 8), batch: int = 1, rounds: int = 7,
                 repeats: int = 50) -> dict:
    """Median seconds of one decoding step (``bpd_sr.decoding.steptime``) per session
    (sessions: name -> ``DecodingSession``, e.g. eager and compiled) and k, measured in
    interleaved rounds (every session and k once per round, then the median over rounds of
    each round's median) so that other load on the machine hits all of them alike."""
    fns = {(name, k): step_function(s, batch, k) for name, s in sessions.items() for k in ks}
    samples: dict = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(3):
                fn()
            samples[key].append(median_seconds(fn, repeats))
    return {name: {k: statistics.median(samples[(name, k)]) for k in ks} for name in sessions}


@torch.inference_mode()
def op_counts(session: DecodingSession, k: int = 1, batch: int = 1) -> dict:
    """Operations one step runs (torch.profiler): top-level aten ops (the ones Python or a
    compiled graph called) and all aten calls (nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    fn = step_function(session, batch, k)
    for _ in range(3):
        fn()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"top_level_aten_ops": len(top), "aten_calls": len(aten)}


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory: the best of ``repeats`` sums over a
    buffer far larger than the caches."""
    buf = torch.ones(megabytes * 2**20 // 4)
    best = min(median_seconds(buf.sum, 1) for _ in range(repeats))
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
    from bpd_sr.decoding.autok import auto_decode, choose_k

    lr = downsample(hr)
    k_fixed = k_fixed or model.cfg.k
    rows = []
    for bs in batch_sizes:
        if bs > len(lr):
            continue
        batch = lr[:bs]
        if progress:
            progress(f"batch {bs}: choosing k")
        # the decode below passes the same acceptance settings, so it reuses this very
        # choice (kept in memory) and its time has no calibration in it
        options = {"epsilon": epsilon, "top_t": None, "min_block": 1, "rule": DEFAULT_RULE,
                "refine": 255, "temperature": 0.0}
        choice = choose_k(model, batch, **options)
        row = {"batch_size": bs, "n_tokens": n_tokens, "auto_k": choice.k,
               "auto_calibration_seconds": choice.calibration_seconds,
               "auto_measured_seconds_per_step": choice.seconds_per_step,
               "auto_tokens_per_step": choice.tokens_per_step}
        for name, kw in (("sequential", None), (f"k={k_fixed}", k_fixed), ("auto", "auto")):
            if progress:
                progress(f"batch {bs}: {name}")
            if kw is None:
                res = sequential_decode(model, batch, n_tokens=n_tokens)
            elif kw == "auto":
                res = auto_decode(model, batch, n_tokens=n_tokens, **options)
            else:
                res = blockwise_parallel_decode(model, batch, k=kw, epsilon=epsilon, n_tokens=n_tokens)
            row[name] = {"seconds_per_image": res.seconds / bs, "mean_accepted": res.mean_accepted}
        rows.append(row)
    return rows


def speed_report(model, hr: torch.Tensor | None = None, batch_sizes=(1, 8, 32, 64), k: int = 8,
                 compile_step: bool = True, n_tokens: int = 3072, rounds: int = 7,
                 progress=None) -> dict:
    """Everything the README's speed section shows, as data: per-step seconds at 1 and k
    tokens for the eager step and the compiled one (with compile time),
    operations per step, the weight-read floor, and seconds per image at each batch size."""
    import platform

    sessions, compile_seconds = {"eager": DecodingSession(model)}, None
    if compile_step:
        from bpd_sr.decoding.compiled import warm_up

        if progress:
            progress("compiling")
        sessions["compiled"] = DecodingSession(model)
        sessions["compiled"].compile()
        compile_seconds = warm_up(sessions["compiled"], 1, (k,))
    if progress:
        progress("step costs")
    steps = step_seconds(sessions, (1, k), rounds=rounds)
    ops = {v: {kk: op_counts(s, kk) for kk in (1, k)} for v, s in sessions.items()}
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
            f"eager_{k}_over_eager_1": steps["eager"][k] / steps["eager"][1],
        },
    }
    if "compiled" in steps:
        out["ratios"]["compiled_1_over_eager_1"] = steps["compiled"][1] / steps["eager"][1]
        out["ratios"][f"compiled_{k}_over_compiled_1"] = steps["compiled"][k] / steps["compiled"][1]
    if hr is not None:
        out["seconds_per_image"] = seconds_per_image(model, hr, batch_sizes, n_tokens=n_tokens,
                                                     progress=progress)
    return out


def speed_markdown(r: dict) -> str:
    """The speed report (``speed_report``) as Markdown tables."""
    k, st, ops = r["k"], r["step_seconds"], r["ops_per_step"]
    names = {"eager": "eager step", "compiled": "compiled step"}
    ref1 = st["eager"][1]
    lines = [f"CPU: {r['machine']['cpu']}, {r['machine']['threads']} thread(s), torch "
             f"{r['machine']['torch']}. One decoding step at batch 1 (medians of interleaved rounds):",
             "", f"| step | 1 token (ms) | {k} tokens (ms) | {k} / 1 | 1 token / eager "
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
    from bpd_sr.decoding.loop import probing_layout

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


__all__ = ["decode_grid", "decoder_bytes", "memory_bandwidth", "op_counts", "seconds_per_image",
           "speed_markdown", "speed_report", "step_costs", "step_seconds"]
