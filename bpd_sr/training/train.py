"""Training: the base model and the proposal-head regimes of Stern et al. 2018 (section 6).

Regimes (``TrainConfig.regime``):
- ``base``: the plain Image Transformer (k = 1), from scratch.
- ``regular``: the base model frozen, only the proposal heads trained.
- ``finetune``: base and heads trained jointly, warm-started from a base checkpoint.
- ``distill``: like ``finetune``, but the targets are the base model's own sequential
  decodes of the training inputs (sequence-level distillation,
  Kim and Rush 2016; the paper's section 6 used it for translation). Decodes are made once
  and cached on disk.

Loss: cross-entropy of the base slot, plus the mean cross-entropy of the proposal slots at
their offsets (or one random slot per batch, the paper's option), plus the auxiliary
cross-entropy of the conditioning logits (Dahl et al. 2017).

Runs on one process or many (``torchrun --nproc-per-node N -m bpd_sr train ...``; gloo on
CPU, nccl on GPU; rank 0 logs and saves). Checkpoints hold the model config, the train
config, the step, the optimizer and the RNG state; they are written atomically every
``ckpt_minutes`` and at the end, and ``--resume`` continues a killed run. The batch order is
a pure function of (seed, step), so a resumed run sees the same batches as an unbroken one.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bpd_sr.config import ModelConfig, TrainConfig
from bpd_sr.io.data import load_faces
from bpd_sr.io.pretrained import load_checkpoint, save_checkpoint, warm_start
from bpd_sr.model.tokens import downsample, image_to_tokens
from bpd_sr.model.transformer import ImageTransformer
from bpd_sr.training.distill import distill_targets
from bpd_sr.training.loss import evaluate_heads, sr_loss
from bpd_sr.training.schedule import warmup_cosine
from bpd_sr.training.stopping import sigterm_as_interrupt
from bpd_sr.training.trainspeed import StepFunction, StepProfiler, bf16_native, synchronize

REGIMES = ("base", "regular", "finetune", "distill")


class TrainError(ValueError):
    """A one-line problem with the training setup."""


# ---- distributed helpers (nanoGPT / torchvision references style) ----------------------
def _dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ---- data ---------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1):
    """The images of one rank's batch at ``step``: an epoch-wise permutation seeded by
    (seed, epoch), so any step's batch can be recomputed after a restart. long (batch_size,)."""
    per_step = batch_size * world
    steps_per_epoch = max(1, n // per_step)
    epoch, i = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = i * per_step + rank * batch_size
    idx = perm[start : start + batch_size]
    if len(idx) < batch_size:  # fewer images than one global batch: sample with wrap-around
        idx = perm[torch.arange(start, start + batch_size) % n]
    return idx


def make_batch(images: torch.Tensor, idx: torch.Tensor, step: int, seed: int, flip: bool):
    """(lr uint8 (B, 8, 8, 3), targets long (B, 3072)); horizontal flips are the only
    augmentation, drawn from a generator seeded by the step."""
    hr = images[idx.to(images.device)]
    if flip:
        g = torch.Generator().manual_seed(seed * 7919 + step)
        do = (torch.rand(len(idx), generator=g) < 0.5).to(hr.device)
        hr = torch.where(do[:, None, None, None], hr.flip(2), hr)
    return downsample(hr), image_to_tokens(hr)


# ---- model setup ------------------------------------------------------------------------
def build_model(cfg: TrainConfig) -> ImageTransformer:
    """A new model for the regime; warm-started from ``cfg.init`` except for ``base``."""
    if cfg.head_targets not in ("data", "base"):
        raise TrainError(f"unknown head targets {cfg.head_targets!r}; choose data or base")
    if cfg.regime not in REGIMES:
        raise TrainError(f"unknown regime {cfg.regime!r}; choose from {', '.join(REGIMES)}")
    if cfg.regime == "base":
        return ImageTransformer(ModelConfig.preset(cfg.preset, k=1, **cfg.model_overrides))
    if not cfg.init:
        raise TrainError(f"regime {cfg.regime!r} needs --init BASE_CHECKPOINT")
    if cfg.k < 2:
        raise TrainError(f"regime {cfg.regime!r} trains proposal heads: use --k 2 or more")
    return warm_start(cfg.init, cfg.k, **cfg.model_overrides)[0]


def schedule_progress(cfg: TrainConfig, step: int, seconds: float,
                      anchor: tuple[float, int, float] = (0.0, 0, 0.0)) -> float:
    """How far the run is through its decay, 0..1: the larger of the step and time fractions.

    anchor (progress, step, seconds): where the budget was last extended. A resumed run
    whose budget grew continues its decay from there over the rest of the new budget,
    instead of jumping back to an earlier point of the cosine (which re-warms the learning
    rate and, measured on the default's fine-tuning, made the loss diverge).
    """
    p0, s0, t0 = anchor
    frac = (step - s0) / max(1, cfg.max_steps - s0)
    if cfg.max_minutes > 0:
        frac = max(frac, (seconds - t0) / max(1e-9, 60 * cfg.max_minutes - t0))
    return min(1.0, p0 + (1 - p0) * max(0.0, frac))


def _lr_at(cfg: TrainConfig, step: int, seconds: float,
           anchor: tuple[float, int, float] = (0.0, 0, 0.0)) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio over the run. A time-limited run
    measures its progress in time, so the schedule fits whatever the hardware manages."""
    progress = schedule_progress(cfg, step, seconds, anchor)
    return cfg.lr * warmup_cosine(step, cfg.warmup_steps, progress, cfg.min_lr_ratio)


@dataclass
class Run:
    """One training run as a checkpoint holds it and every step updates it."""

    cfg: TrainConfig
    model: ImageTransformer
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    step: int = 0
    seconds: float = 0.0
    log: list[dict] = field(default_factory=list)
    anchor: tuple[float, int, float] = (0.0, 0, 0.0)  # see schedule_progress

    def out_of_budget(self) -> bool:
        if self.step >= self.cfg.max_steps:
            return True
        return self.cfg.max_minutes > 0 and self.seconds >= 60 * self.cfg.max_minutes

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.model, self.cfg, extra={
            "optimizer": self.opt.state_dict(), "step": self.step,
            "train_seconds": self.seconds, "log": self.log,
            "rng": {"torch": torch.get_rng_state()}, "schedule_anchor": list(self.anchor),
        })


def resumed_config(cfg: TrainConfig, state: dict, path: Path,
                   say=tqdm.write) -> tuple[TrainConfig, tuple[float, int, float]]:
    """The config a killed run continues with, and its schedule anchor.

    The run continues as it was configured; only the budget (max_steps, max_minutes) may be
    extended. Settings of another bpd-sr version that this one does not know are dropped,
    with a note (``say``); a checkpoint without training state is a one-line TrainError.
    """
    missing = [k for k in ("train_config", "optimizer", "step", "train_seconds", "rng")
               if k not in state]
    if missing:
        raise TrainError(f"{path} cannot be resumed: it has no {', '.join(missing)} (an "
                         "exported or inference-only checkpoint?); give it as --init instead")
    saved, unknown = TrainConfig.from_saved(state["train_config"])
    if unknown:
        say(f"{path}: ignoring settings of another bpd-sr version: {', '.join(unknown)}")
    anchor = tuple(state.get("schedule_anchor", (0.0, 0, 0.0)))
    cfg = replace(saved, max_steps=max(cfg.max_steps, saved.max_steps),
                  max_minutes=max(cfg.max_minutes, saved.max_minutes))
    if (cfg.max_steps, cfg.max_minutes) != (saved.max_steps, saved.max_minutes):
        anchor = (schedule_progress(saved, state["step"], state["train_seconds"], anchor),
                  state["step"], state["train_seconds"])
    return cfg, anchor


def split_faces(cfg: TrainConfig, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(training faces, held-out faces), a random split seeded by cfg.seed."""
    images = load_faces(cfg.data, progress=progress)
    n_val = int(len(images) * cfg.val_fraction) if cfg.val_fraction > 0 else 0
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))
    val_images, train_images = images[perm[:n_val]], images[perm[n_val:]]
    if len(train_images) == 0:
        raise TrainError(f"{cfg.data}: no training images")
    return train_images, val_images


def make_optimizer(cfg: TrainConfig, model: ImageTransformer, device: torch.device):
    """AdamW over the trainable parameters (the heads only in the regular regime), no
    weight decay on biases and norms. Returns (optimizer, its parameters)."""
    if cfg.regime == "regular":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("heads."))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda",
    )
    return opt, params


def forward_loss(model, lr_img: torch.Tensor, targets: torch.Tensor, head_slot, amp,
                 cond_weight: float, base_targets: bool):
    """The teacher-forced pass and its loss: what ``StepFunction`` may compile."""
    with amp():
        logits, cond_logits = model(lr_img, targets)
    head_targets = logits[:, :, 0].argmax(-1).detach() if base_targets else None
    return sr_loss(logits, cond_logits, targets, cond_weight, head_slot, head_targets)


def train_step(run: Run, ddp_model, train_images: torch.Tensor, amp, rank: int, world: int,
               step_fn=forward_loss):
    """One optimizer step on the batch of (seed, step). Returns (loss, stats) as detached
    tensors: reading them is the caller's host sync, made only where it logs."""
    cfg = run.cfg
    idx = batch_indices(len(train_images), cfg.batch_size, run.step, cfg.seed, rank, world)
    lr_img, targets = make_batch(train_images, idx, run.step, cfg.seed, cfg.flip)
    for group in run.opt.param_groups:
        group["lr"] = _lr_at(cfg, run.step, run.seconds, run.anchor)
    head_slot = None  # like the batch, the random head is a function of (seed, step)
    if cfg.random_head and cfg.k > 1:
        head_slot = torch.tensor(int(np.random.default_rng([cfg.seed, run.step]).integers(1, cfg.k)))
    loss, stats = step_fn(ddp_model, lr_img, targets, head_slot, amp, cfg.cond_loss_weight,
                          cfg.head_targets == "base")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    run.opt.step()
    return loss.detach(), stats


def log_entry(run: Run, stats: dict, images_per_s: float, world: int, val_images: torch.Tensor,
              amp, progress: bool, extra: dict | None = None) -> None:
    """Append the step's statistics and the held-out evaluation to the run's log and to
    ``log.jsonl`` (rank 0 only). images_per_s: measured over the steps since the last entry."""
    cfg = run.cfg
    entry = {"step": run.step, "train_seconds": round(run.seconds, 1), "world_size": world,
             "lr": run.opt.param_groups[0]["lr"],
             **{k: float(v) for k, v in stats.items()},  # the host sync, once per entry
             "images_per_s": round(images_per_s, 1), **(extra or {})}
    if len(val_images):
        device = next(run.model.parameters()).device
        entry.update(evaluate_heads(run.model, val_images[:256].to(device), cfg.batch_size, amp))
    run.log.append(entry)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "a") as f:  # appended line by line: a crash loses one line
        f.write(json.dumps(entry) + "\n")
    if progress:
        tqdm.write(json.dumps(entry))


def export_now(run: Run) -> None:
    """The inference checkpoint of the run so far (bf16) at ``cfg.export_path``, atomically."""
    about = {"train_config": run.cfg.to_dict(), "step": run.step,
             "train_seconds": run.seconds, "log": run.log}
    save_checkpoint(run.cfg.export_path, run.model, extra={"about": about}, dtype=torch.bfloat16)


def _restore(cfg: TrainConfig, resume: bool, rank: int, device: torch.device, progress: bool):
    """(run, training faces on the device, held-out faces): the run fresh or from its
    last checkpoint (distillation replaces the training faces by the base's decodes)."""
    last = Path(cfg.out) / "last.pt"
    state = load_checkpoint(last) if resume and last.exists() else None
    anchor: tuple[float, int, float] = (0.0, 0, 0.0)
    if state is not None:
        cfg, anchor = resumed_config(cfg, state, last)
    torch.manual_seed(cfg.seed + rank)
    train_images, val_images = split_faces(cfg, progress and rank == 0)
    model = build_model(cfg) if state is None else ImageTransformer(
        ModelConfig.from_dict(state["model_config"]))
    if cfg.regime == "distill":
        base = build_model(replace(cfg, regime="regular")).to(device)
        cache = Path(cfg.distill_cache or (Path(cfg.out) / "distill_targets.npz"))
        train_images = distill_targets(base, train_images.to(device), cache,
                                       progress=progress and rank == 0).cpu()
        del base
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(device).train()
    opt, params = make_optimizer(cfg, model, device)
    run = Run(cfg, model, opt, params, anchor=anchor)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        run.step, run.seconds, run.log = state["step"], state["train_seconds"], state.get("log", [])
        torch.set_rng_state(state["rng"]["torch"])
    return run, train_images.to(device), val_images


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) one training run; returns the path of its final checkpoint.

    Interrupted (Ctrl-C or SIGTERM), it saves its checkpoint (and export) before it stops."""
    rank, world, device = _dist_setup()
    run, train_images, val_images = _restore(cfg, resume, rank, device, progress)
    cfg, last = run.cfg, Path(run.cfg.out) / "last.pt"
    ddp_model = run.model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and bf16_native(device))

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    minutes_left = cfg.max_minutes - run.seconds / 60 if cfg.max_minutes > 0 else None
    step_fn = StepFunction(forward_loss, cfg.compile, device, minutes_left)
    profiler = StepProfiler(Path(cfg.out) / "profile.txt", device, cfg.profile_steps if rank == 0 else 0,
                            header=f"regime {cfg.regime}, k {cfg.k}, batch {cfg.batch_size} x "
                                   f"{world}, {device}, {'bf16' if use_bf16 else 'fp32'}")
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not progress or rank != 0,
               desc=f"train {cfg.regime}", dynamic_ncols=True)
    interrupted = False
    try:
        with sigterm_as_interrupt() as stop_point:
            _loop(run, ddp_model, train_images, val_images, amp, rank, world, step_fn, profiler,
                  bar, progress, stop_point)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        profiler.stop()
        bar.close()
    if rank == 0:
        run.save(last)
        if cfg.export_path:
            export_now(run)
        if not interrupted:
            profiler.write()
    if interrupted:
        raise KeyboardInterrupt
    if world > 1:
        dist.barrier()
    return last


def _loop(run: Run, ddp_model, train_images, val_images, amp, rank: int, world: int, step_fn,
          profiler, bar, progress: bool, stop_point) -> None:
    """Step, log, checkpoint until the run's budget is spent. No host sync per step: losses
    are read (and a GPU waited for) only at log points, and images/s is measured over the
    steps between them. stop_point() is called after each step's saves (it raises
    KeyboardInterrupt once SIGTERM has come: ``stopping.sigterm_as_interrupt``)."""
    cfg, device = run.cfg, train_images.device
    last_ckpt = last_export = time.monotonic()
    since, since_t = 0, time.perf_counter()
    while not run.out_of_budget():
        t0 = time.perf_counter()
        loss, stats = train_step(run, ddp_model, train_images, amp, rank, world, step_fn)
        run.seconds += time.perf_counter() - t0
        run.step += 1
        since += 1
        bar.update(1)
        profiler.step_done()
        if rank == 0 and (run.step % cfg.eval_every == 0 or run.out_of_budget()):
            synchronize(device)
            rate = since * cfg.batch_size * world / (time.perf_counter() - since_t)
            bar.set_postfix(loss=f"{float(loss):.3f}", bpd=f"{float(stats['bpd']):.3f}",
                            img_s=f"{rate:.0f}")
            log_entry(run, stats, rate, world, val_images, amp, progress, step_fn.notes)
            since, since_t = 0, time.perf_counter()
        if rank == 0 and time.monotonic() - last_ckpt > 60 * cfg.ckpt_minutes:
            run.save(Path(cfg.out) / "last.pt")
            last_ckpt = time.monotonic()
        if rank == 0 and cfg.export_path and time.monotonic() - last_export > 60 * cfg.export_minutes:
            export_now(run)
            last_export = time.monotonic()
        stop_point()


if __name__ == "__main__":
    # The library never imports the command line (click); say where training starts instead.
    raise SystemExit("bpd_sr.training.train is a library module: run `python -m bpd_sr train ...` "
                     "(with torchrun: `torchrun --nproc-per-node N -m bpd_sr train ...`).")
