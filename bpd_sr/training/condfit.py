"""Pretrain the conditioning network alone, cheaply, on a CPU (issue: "a decided model on a
CPU budget", lever 0).

The conditioning net (Dahl et al. 2017, section 3; ``model.ConditioningNet``) maps the 8x8
input to 256-way logits for every target intensity; the model adds them to the decoder's
logits and to every proposal slot's logits at the slot's target position. A sharp one makes
the base model more decided *and* the proposals better, and being convolutional it is two
orders of magnitude cheaper to train than the decoder. Here it is trained on its own, the rest
of the model untouched:

    loss = cross-entropy of its logits against the true intensity
         + value_loss_weight * Huber(expected intensity, true intensity; transition 2 levels)

The second term fits what the default decoding rule ("mean", ``bpd_sr.decoding.rules``) reads from
the logits. Checkpoints (the whole model, with the new net) are written atomically every
``ckpt_minutes``; a killed run resumes from ``out/last.pt`` bit for bit in its schedule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bpd_sr.config import COLOR_SEED_OFFSET, OBJECTIVES, CondFitConfig
from bpd_sr.decoding.consistency import back_project, block_shift
from bpd_sr.decoding.rules import apply_rule, expected_intensity
from bpd_sr.io.data import load_faces
from bpd_sr.io.pretrained import load_checkpoint, save_checkpoint, warm_start
from bpd_sr.model.conditioning import ConditioningNet, residual_block
from bpd_sr.model.tokens import downsample, image_to_tokens, levels_to_image, tokens_to_image
from bpd_sr.training.augment import augment_faces, check_rotation
from bpd_sr.training.schedule import step_progress, warmup_cosine
from bpd_sr.training.switchfit import drop_fallback


class CondFitError(ValueError):
    """A bad setting of a conditioning-net run (one line)."""




def conditioning_loss(logits: torch.Tensor, targets: torch.Tensor,
                      value_loss_weight: float) -> tuple[torch.Tensor, dict]:
    """logits (B, 3072, 256), targets long (B, 3072) -> (loss, stats)."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss = ce
    stats = {"ce": ce.item()}
    if value_loss_weight > 0:
        value = expected_intensity(logits, torch.float32)
        huber = F.huber_loss(value, targets.float(), delta=2.0)
        loss = loss + value_loss_weight * huber
        stats["huber"] = huber.item()
    return loss, stats


def regression_loss(mu: torch.Tensor, sigma: torch.Tensor, hr: torch.Tensor,
                    scale_weight: float = 0.1, per_face_log: bool = False,
                    centre: torch.Tensor | None = None,
                    face_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """mu, sigma (B, 3, 32, 32) in levels, hr uint8 (B, 32, 32, 3) -> (loss, stats).

    mu is fitted by squared error, which is what PSNR measures and what the "mean" rule
    reads back (the expected intensity of the discretised Gaussian is mu, up to the range
    cutting its tails). sigma is fitted by the likelihood of the true intensity under a
    continuous Gaussian around the detached mu: for sigma >= 0.5 that is the discretised
    head's likelihood up to its normaliser's edge terms (around ``centre`` when given: the
    net's own mu when the fitted mu is its back-projection, so that sigma stays the scale of
    the distribution the model's logits hold). With ``gaussian_parameters(...,
    detach_scale=True)`` only sigma's own output weights learn from it, and its small
    weight keeps its gradient from dominating the clipped gradient norm: measured, a shared
    likelihood term slowed the learning of mu several times.

    per_face_log: mu is fitted by the mean over faces of the log of each face's squared
    error instead, i.e. by the mean PSNR over faces that evaluation reports (PSNR is -10
    log10 of a face's error): plain squared error weighs a face by its error, so it spends
    the net on the hardest faces, while the mean PSNR rewards a dB gained on any face alike.
    Its gradient is multiplied by the batch's detached squared error, which makes it the
    plain loss's when all faces' errors are equal (the gradient clipping and the likelihood
    term's weight stay as tuned for it).

    face_weights (B,), mean 1: each face's share of the fit of mu (``hardest_faces``);
    None: all alike."""
    target = hr.permute(0, 3, 1, 2).to(mu.dtype)
    face_mse = ((mu - target) / 32.0).pow(2).flatten(1).mean(1)  # (B,)
    mse = face_mse.mean()
    per_face = face_mse.log() if per_face_log else face_mse
    if face_weights is not None:
        per_face = face_weights * per_face
    fit = mse.detach() * per_face.mean() if per_face_log else per_face.mean()
    centre = mu if centre is None else centre
    nll = (torch.log(sigma) + (target - centre.detach()).pow(2) / (2 * sigma.pow(2))).mean()
    return fit + scale_weight * nll, {"mse": mse.detach(), "nll": nll.detach()}


def gain_over_bicubic(images: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """PSNR of each face's images over that of bicubic upscaling (``evaluate``'s bicubic row),
    in dB: images float (B, 3, 32, 32) or uint8 (B, 32, 32, 3) levels, hr uint8 (B, 32, 32, 3),
    lr uint8 (B, 8, 8, 3) -> (B,)."""
    from bpd_sr.evaluation.metrics import upscale_bicubic

    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2)
    target = hr.permute(0, 3, 1, 2).double()
    bicubic = torch.as_tensor(upscale_bicubic(lr.numpy())).permute(0, 3, 1, 2).double()
    face_mse = (images.detach().double() - target).pow(2).flatten(1).mean(1)
    bicubic_mse = (bicubic - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(bicubic_mse / face_mse.clamp_min(1e-12))


def hardest_faces(gain: torch.Tensor, share: float, weight: float) -> torch.Tensor:
    """The weights of ``regression_loss``'s faces: gain (B,) over bicubic in dB -> (B,), the
    ceil(share * B) faces of lowest gain weighing (1 + weight) times the rest, normalised
    to mean 1 so that the loss keeps its scale (its gradient clipping stays as tuned)."""
    n_hard = math.ceil(share * len(gain))
    weights = torch.ones(len(gain), dtype=torch.float32)
    weights[torch.argsort(gain, stable=True)[:n_hard]] += weight
    return weights / weights.mean()


@torch.no_grad()
def conditioning_images(net: ConditioningNet, lr: torch.Tensor, batch_size: int = 64,
                        on_logits=None) -> torch.Tensor:
    """The conditioning net alone, as a regression model: the expected intensity of its
    logits at every target, rounded. lr uint8 (N, 8, 8, 3) -> uint8 (N, 32, 32, 3).
    on_logits(start, logits (b, 3072, 256)) sees each batch's logits."""
    dev = next(net.parameters()).device
    images = []
    for s in range(0, len(lr), batch_size):
        logits = net(lr[s : s + batch_size].to(dev))
        if on_logits is not None:
            on_logits(s, logits)
        images.append(tokens_to_image(apply_rule(logits, "mean").cpu()))
    return torch.cat(images)


@torch.no_grad()
def conditioning_mu_images(net: ConditioningNet, lr: torch.Tensor, batch_size: int = 64
                           ) -> torch.Tensor:
    """The Gaussian head's mean mu itself, clipped to 0 .. 255 and rounded: the value the net
    is fitted to by squared error (``regression_loss``). It differs from the expected
    intensity of its logits where the range cuts a tail (near black and white), which pulls
    that expectation inwards. lr uint8 (N, 8, 8, 3) -> uint8 (N, 32, 32, 3)."""
    dev = next(net.parameters()).device
    return levels_to_image(torch.cat([net.gaussian_parameters(lr[s : s + batch_size].to(dev))[0]
                                  for s in range(0, len(lr), batch_size)]))


def conditioning_psnr(net: ConditioningNet, hr: torch.Tensor, batch_size: int = 64,
                      back_projected: bool = False) -> dict:
    """PSNR / bits per dimension of the net's expected-intensity image on faces hr uint8
    (N, 32, 32, 3); back_projected: PSNR / SSIM of that image back-projected."""
    from bpd_sr.evaluation.metrics import quality

    net.eval()
    nll = 0.0

    def add_nll(start: int, logits: torch.Tensor) -> None:
        nonlocal nll
        targets = image_to_tokens(hr[start : start + len(logits)]).to(logits.device)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               reduction="sum").item()

    lr = downsample(hr)
    images = conditioning_images(net, lr, batch_size, add_nll)
    net.train()
    if back_projected:
        images = back_project(images, lr)
    q = quality(images.numpy(), hr.numpy())
    return {"val_psnr": round(float(q["psnr"]), 3), "val_ssim": round(float(q["ssim"]), 4),
            "val_bpd": round(nll / hr.numel() / math.log(2), 4),
            "val_lowest_gain": round(float(gain_over_bicubic(images, hr, lr).min()), 3)}


def _resumed(cfg: CondFitConfig, resume: bool) -> tuple[CondFitConfig, dict | None]:
    """The run's config and its checkpoint when resuming; refuses to overwrite a run."""
    last = Path(cfg.out) / "last.pt"
    if resume:
        if not last.exists():
            raise CondFitError(f"nothing to resume in {cfg.out} (no last.pt)")
        state = load_checkpoint(last)
        return CondFitConfig.from_dict(state["cond_fit_config"]), state
    if last.exists():
        raise CondFitError(f"{cfg.out} already holds a run: use --resume, or another --out")
    return cfg, None


def _model_with_net(cfg: CondFitConfig, state: dict | None):
    """(cfg, the model of cfg.init with the net to train), the settings checked first."""
    if cfg.width < 1 or cfg.blocks < 0 or cfg.steps < 1:
        raise CondFitError("width and steps must be positive and blocks >= 0")
    if cfg.head not in ("gaussian", "logits"):
        raise CondFitError(f"unknown head {cfg.head!r}; choose gaussian or logits")
    if cfg.objective not in OBJECTIVES:
        raise CondFitError(f"unknown objective {cfg.objective!r}; choose "
                           + ", ".join(OBJECTIVES))
    if cfg.rotated_share is not None and cfg.max_rotation == 0:
        raise CondFitError("--rotated-share needs --max-rotation above 0")
    try:
        check_rotation(cfg.max_rotation, cfg.max_zoom, cfg.max_shift)
    except ValueError as e:
        raise CondFitError(str(e)) from None
    if cfg.add_blocks < 0 or (cfg.add_blocks and not cfg.keep_net):
        raise CondFitError("--add-blocks deepens a kept net: it needs --keep-net "
                           "(a new net takes --blocks)")
    model, _ = warm_start(cfg.init)
    if cfg.keep_net:  # fine-tune the init's own net: its shape, not width / blocks / head
        if model.cond is None:
            raise CondFitError(f"{cfg.init} has no conditioning net to keep")
        if model.cond.fallback is not None:
            # training moves the net's departure from bicubic, which the switch's threshold
            # was measured on: the run trains the net alone, and fit-switch sets it again
            drop_fallback(model)
            tqdm.write(f"{cfg.init}: its fallback net is left out of this run; give the "
                       "result one again with bpd-sr fit-switch")
        cfg = replace(cfg, width=model.cfg.cond_channels, blocks=model.cfg.cond_blocks,
                      head=model.cfg.cond_head, up_width=model.cfg.cond_up_channels)
        if cfg.add_blocks:
            add_identity_blocks(model, cfg.add_blocks)
    else:
        model.cfg = replace(model.cfg, cond_channels=cfg.width, cond_blocks=cfg.blocks,
                            cond_head=cfg.head, cond_up_channels=cfg.up_width)
        torch.manual_seed(cfg.seed)
        model.cond = ConditioningNet(cfg.width, cfg.blocks, cfg.head, cfg.up_width,
                                     model.cfg.cond_flip_average)
    if cfg.objective != "ce" and cfg.head != "gaussian":
        raise CondFitError(f"the {cfg.objective} objective needs the gaussian head")
    if cfg.back_projected and cfg.objective == "ce":
        raise CondFitError("--back-projected needs the regression or psnr objective")
    if cfg.hard_share and cfg.objective == "ce":
        raise CondFitError("--hard-share needs the regression or psnr objective")
    if not (0.0 <= cfg.hard_share <= 1.0 and cfg.hard_weight >= 0.0):
        raise CondFitError("--hard-share must lie in 0 .. 1 and --hard-weight be >= 0")
    if state is not None:
        model.load_state_dict(state["model"])
    return cfg, model


def add_identity_blocks(model, n: int) -> None:
    """Deepen the model's conditioning net by n residual blocks at 8x8, appended after its
    own, and record the depth in ``model.cfg``. Each new block's last convolution starts at
    zero, so the block adds nothing and the deeper net computes exactly what the kept one
    did (the zero-initialised residual branch of Goyal et al. 2017); training then grows
    it from there. The gradient reaches that last convolution at once (its input is the
    block's first convolution's activation), and through it the rest of the block."""
    net = model.cond
    width = net.stem.out_channels
    for _ in range(n):
        block = residual_block(width)
        nn.init.zeros_(block[3].weight)
        nn.init.zeros_(block[3].bias)
        net.res.append(block.to(net.stem.weight))
    model.cfg = replace(model.cfg, cond_blocks=len(net.res))


def _batch_loss(cfg: CondFitConfig, net: ConditioningNet, train: torch.Tensor,
                g: torch.Generator, color_g: torch.Generator):
    """(loss, stats) of one augmented batch of training faces."""
    idx = torch.randint(len(train), (cfg.batch_size,), generator=g)
    hr = augment_faces(train[idx], g, cfg.max_zoom, cfg.max_shift,
                       reframed_share=cfg.reframed_share, max_rotation=cfg.max_rotation,
                       rotated_share=cfg.rotated_share, color_share=cfg.color_share,
                       color_generator=color_g)
    if cfg.objective != "ce":
        lr = downsample(hr)
        mu, sigma = net.gaussian_parameters(lr, detach_scale=True)
        # back-projected: the block means of mu get no gradient; how far they drift from the
        # input (in levels) is logged beside the loss
        fitted = block_shift(mu, lr) if cfg.back_projected else mu
        extra, weights = {}, None
        if cfg.hard_share:
            gain = gain_over_bicubic(fitted, hr, lr)
            weights = hardest_faces(gain, cfg.hard_share, cfg.hard_weight)
            extra["lowest_gain"] = gain.min()
        loss, stats = regression_loss(fitted, sigma, hr, per_face_log=cfg.objective == "psnr",
                                      centre=mu, face_weights=weights)
        if cfg.back_projected:
            extra["shortfall"] = (fitted - mu).detach().abs().mean()
        return loss, {**stats, **extra}
    return conditioning_loss(net(downsample(hr)), image_to_tokens(hr), cfg.value_loss_weight)


def run(cfg: CondFitConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train a new conditioning net for the model in ``cfg.init``; write ``out/cond.pt``
    (the whole model with the new net) and return its path."""
    out = Path(cfg.out)
    cfg, state = _resumed(cfg, resume)
    cfg, model = _model_with_net(cfg, state)
    net = model.cond.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, log = 0, []
    g = torch.Generator().manual_seed(cfg.seed)
    color_g = torch.Generator().manual_seed(cfg.seed + COLOR_SEED_OFFSET)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
        g.set_state(state["rng"])
        if "color_rng" in state:  # runs saved before recolouring existed drew no colours
            color_g.set_state(state["color_rng"])
    faces = load_faces(cfg.data, progress=progress)
    if len(faces) <= cfg.n_val:
        raise CondFitError(f"{cfg.data}: {len(faces)} faces, not more than --n-val {cfg.n_val}")
    # the last n_val faces are held out (faces[-0:] would be all of them)
    val, train = faces[len(faces) - cfg.n_val:], faces[: len(faces) - cfg.n_val]
    t_ckpt = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="fit cond net", disable=not progress,
               dynamic_ncols=True)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(
                step, cfg.warmup_steps, step_progress(step, cfg.warmup_steps, cfg.steps), 0.02)
        loss, stats = _batch_loss(cfg, net, train, g, color_g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log.append(_log_entry(step, stats, net, val, model, out, log, progress,
                                  cfg.back_projected))
        if time.perf_counter() - t_ckpt > cfg.ckpt_minutes * 60 or step == cfg.steps:
            save_checkpoint(out / "last.pt", model, extra={
                "cond_fit_config": cfg.to_dict(), "optimizer": opt.state_dict(), "step": step,
                "log": log, "rng": g.get_state(), "color_rng": color_g.get_state()})
            t_ckpt = time.perf_counter()
    bar.close()
    return _finish(cfg, model, log)


def _log_entry(step: int, stats: dict, net, val: torch.Tensor, model, out: Path, log: list,
               progress: bool, back_projected: bool = False) -> dict:
    """The log line of a step; the model is kept as best.pt when the net did best so far on
    the held-out faces."""
    entry = {"step": step, **{k: round(float(v), 4) for k, v in stats.items()}}
    if len(val):
        entry.update(conditioning_psnr(net, val, back_projected=back_projected))
        best_psnr = max((e.get("val_psnr", -1.0) for e in log), default=-1.0)
        if entry["val_psnr"] > best_psnr:
            save_checkpoint(out / "best.pt", model, extra={"step": step})
    if progress:
        tqdm.write(json.dumps(entry))
    return entry


def _finish(cfg: CondFitConfig, model, log: list) -> Path:
    """The model with the net that did best on the held-out faces (else the last), written
    as cond.pt beside the log."""
    out = Path(cfg.out)
    if (out / "best.pt").exists():
        model.load_state_dict(load_checkpoint(out / "best.pt")["model"])
    model.eval()
    with open(out / "log.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in log)
    return save_checkpoint(out / "cond.pt", model, extra={
        "about": {"cond_fit_config": cfg.to_dict(), "log": log,
                  "base": load_checkpoint(cfg.init).get("about", {})}})


__all__ = ["CondFitConfig", "CondFitError", "add_identity_blocks", "conditioning_images",
           "conditioning_loss", "conditioning_mu_images", "conditioning_psnr",
           "gain_over_bicubic", "hardest_faces", "run"]
