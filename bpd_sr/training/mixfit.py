"""Fit the product of experts: how much the decoder and the conditioning net each weigh.

The model's logits for a target are a weighted sum (Dahl et al. 2017, section 3, "a product
of experts" of a PixelCNN prior and a conditioning network):

    logits = t * decoder_logits + s[c] * conditioning_logits

with t a temperature of the decoder (every proposal slot goes through the same output
layer, so t is folded into ``out_proj``) and s[c] one weight per colour c of the target
(``ModelConfig.cond_scale``). The two nets are trained separately (the conditioning net
alone by ``bpd-sr fit-cond``), so nobody chose their balance: here it is fitted on faces the
nets were not trained on, under teacher forcing (every target sees the true ones before it),
by one of two objectives:

- ``"mse"``: the squared error of the expected intensity, which is what the default "mean"
  rule (``bpd_sr.decoding.rules``) writes, so what PSNR measures;
- ``"nll"``: the likelihood of the true intensity (bits per dimension).

Only the decoder's first slot (the base model) is read; the fitted weights then apply to
every slot.

Beyond the two experts' weights, the decoder's output layer itself (256 x d_model, shared by
every slot) can be refitted the same way (``fit_output_layer``): the decoder was trained
beside a much weaker conditioning net, so what its features should add to the present one
is not what its output layer learnt then. Its features on the decode's own states are
cached, the conditioning logits and their weights are held fixed, and the layer is fitted
by the squared error of the expected intensity on some of the faces while the rest tell
when to stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bpd_sr.config import CHANNELS
from bpd_sr.decoding.rules import expected_intensity
from bpd_sr.model.mixture import apply_mixture, set_flip_average
from bpd_sr.model.tokens import downsample, image_to_tokens, shift_right
from bpd_sr.model.transformer import ImageTransformer

OBJECTIVES = ("mse", "nll")


@dataclass
class ExpertLogits:
    """Teacher-forced logits of N faces: decoder (N, 3072, 256) and conditioning net
    (N, 3072, 256), both unweighted, and targets long (N, 3072); features (N, 3072, d_model),
    when kept: what the output layer reads for the base model (decoder = features @ W^T + b)."""

    decoder: torch.Tensor
    conditioning: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None


@torch.no_grad()
def expert_logits(model: ImageTransformer, hr: torch.Tensor, prefix: torch.Tensor | None = None,
                  batch_size: int = 16, progress: bool = False,
                  keep_features: bool = False) -> ExpertLogits:
    """Both experts' logits on faces hr uint8 (N, 32, 32, 3), float32 (see ExpertLogits).

    prefix: long (N, 3072), the tokens the decoder reads before each target; by default the
    true ones (teacher forcing). Under teacher forcing the decoder sees true neighbours it
    never has when decoding, so it looks better than it is; a decode's own output as the
    prefix gives the states it meets at decode time, the targets staying the truth."""
    model.eval()
    dec, cond, targets, features = [], [], [], []
    for s in tqdm(range(0, len(hr), batch_size), desc="teacher-forced logits",
                  disable=not progress, dynamic_ncols=True):
        faces = hr[s : s + batch_size]
        lr, tok = downsample(faces), image_to_tokens(faces)
        read = tok if prefix is None else prefix[s : s + batch_size]
        ctx = model.encode(lr)
        h = model.decoder_hidden(ctx, shift_right(read))
        dec.append(model.slot_outputs(h, 1)[:, :, 0].float())
        cond.append(model.conditioning_logits(lr)[:, : tok.shape[1]].float())
        targets.append(tok)
        if keep_features:
            features.append(model.heads(h, 1)[:, :, 0].float())
    return ExpertLogits(torch.cat(dec), torch.cat(cond), torch.cat(targets),
                        torch.cat(features) if keep_features else None)


def _target_loss(logits: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """The summed objective of logits (..., 256) against target intensities long (...)."""
    if objective == "mse":
        return (expected_intensity(logits, torch.float32) - target.float()).pow(2).sum()
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="sum")


def mixture_loss(data: ExpertLogits, temperature: torch.Tensor, cond_scale: torch.Tensor,
                 objective: str, chunk: int = 16) -> torch.Tensor:
    """The objective of the mixture (temperature (), cond_scale (3,)) over all targets,
    averaged; gradients are accumulated chunk by chunk (the logits of 256 faces are
    800 MB a copy), and the value is returned detached."""
    n, t = data.targets.shape
    colour = torch.arange(t) % CHANNELS
    total = 0.0
    for s in range(0, n, chunk):
        logits = (temperature * data.decoder[s : s + chunk]
                  + cond_scale[colour].unsqueeze(-1) * data.conditioning[s : s + chunk])
        part = _target_loss(logits, data.targets[s : s + chunk], objective)
        part = part / data.targets.numel()
        if part.requires_grad:  # the weights' small graph is shared by every chunk
            part.backward(retain_graph=True)
        total += part.item()
    return torch.tensor(total)


def evaluate_mixture(data: ExpertLogits, temperature: float,
                     cond_scale: tuple[float, ...]) -> dict[str, float]:
    """RMSE of the expected intensity (levels) and bits per dimension of one mixture."""
    t, s = torch.tensor(float(temperature)), torch.tensor(cond_scale, dtype=torch.float32)
    with torch.no_grad():
        mse = mixture_loss(data, t, s, "mse").item()
        nll = mixture_loss(data, t, s, "nll").item()
    return {"rmse_levels": round(math.sqrt(mse), 4), "bits_per_dim": round(nll / math.log(2), 4)}


def fit_mixture(data: ExpertLogits, objective: str = "mse", start_temperature: float = 1.0,
                start_cond_scale: tuple[float, ...] = (1.0, 1.0, 1.0),
                iterations: int = 30) -> tuple[float, tuple[float, float, float]]:
    """The temperature and per-colour conditioning weights that minimise ``objective`` on
    ``data``, by L-BFGS on their logarithms (they stay positive)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    log_t = torch.tensor(math.log(start_temperature), requires_grad=True)
    log_s = torch.tensor([math.log(v) for v in start_cond_scale], requires_grad=True)
    opt = torch.optim.LBFGS([log_t, log_s], lr=1.0, max_iter=iterations,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        return mixture_loss(data, log_t.exp(), log_s.exp(), objective)

    opt.step(closure)
    # 4 significant digits, not decimals: a weight fitted near zero must stay positive
    scales = tuple(float(f"{float(v):.4g}") for v in log_s.detach().exp())
    return float(f"{float(log_t.detach().exp()):.4g}"), scales  # type: ignore[return-value]


def fit_output_layer(data: ExpertLogits, weight: torch.Tensor, bias: torch.Tensor,
                     cond_scale: tuple[float, ...], steps: int = 400, lr: float = 1e-3,
                     val_share: float = 0.25, batch_faces: int = 8, eval_every: int = 25,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The decoder's output layer refitted on ``data`` (its ``features`` kept): weight
    (256, d_model) and bias (256,) from the current ones, by Adam on the squared error of
    the expected intensity of features @ W^T + b + cond_scale[colour] * conditioning, with
    the conditioning held fixed. The last ``val_share`` of the faces are held out: every
    ``eval_every`` steps the layer is scored on them, and the best (the starting layer
    included) is returned with {"val_rmse_before", "val_rmse_after", "step_kept"} (levels)."""
    if data.features is None:
        raise ValueError("fit_output_layer needs the decoder's features (keep_features=True)")
    n, t = data.targets.shape
    n_val = max(1, round(n * val_share))
    if n - n_val < 1:
        raise ValueError(f"{n} faces are too few to hold out {val_share:.0%} of them")
    colour = torch.arange(t) % CHANNELS
    offset_scale = torch.tensor(cond_scale, dtype=torch.float32)[colour].unsqueeze(-1)
    w = weight.detach().float().clone().requires_grad_(True)
    b = bias.detach().float().clone().requires_grad_(True)

    def loss_of(faces: slice | torch.Tensor) -> torch.Tensor:
        logits = (F.linear(data.features[faces], w, b)
                  + offset_scale * data.conditioning[faces])
        target = data.targets[faces]
        return _target_loss(logits, target, "mse") / target.numel()

    @torch.no_grad()
    def val_rmse() -> float:
        chunks = [slice(s, min(s + batch_faces, n)) for s in range(n - n_val, n, batch_faces)]
        total = sum(loss_of(c).item() * (c.stop - c.start) for c in chunks)
        return math.sqrt(total / n_val)

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([w, b], lr=lr)
    before = best = val_rmse()
    kept = (0, w.detach().clone(), b.detach().clone())
    for step in range(1, steps + 1):
        faces = torch.randint(n - n_val, (min(batch_faces, n - n_val),), generator=g)
        opt.zero_grad()
        loss_of(faces).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            score = val_rmse()
            if score < best:
                best, kept = score, (step, w.detach().clone(), b.detach().clone())
    info = {"val_rmse_before": round(before, 4), "val_rmse_after": round(best, 4),
            "step_kept": kept[0]}
    return kept[1].to(weight.dtype), kept[2].to(bias.dtype), info


def decode_faces(model: ImageTransformer, hr: torch.Tensor, k: int, epsilon: int,
                 batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, float]:
    """The package's blockwise decode (mean rule) of faces hr uint8 (N, 32, 32, 3) from their
    8x8 versions -> (uint8 (N, 32, 32, 3), tokens per step over all of them)."""
    from bpd_sr.decoding.loop import blockwise_parallel_decode, tokens_per_step

    out, accepted = [], []
    for s in tqdm(range(0, len(hr), batch_size), desc=f"decode k={k} epsilon={epsilon}",
                  disable=not progress, dynamic_ncols=True):
        lr = downsample(hr[s : s + batch_size])
        result = blockwise_parallel_decode(model, lr, k=k, epsilon=epsilon)
        out.append(result.images)
        accepted += result.accepted
    return torch.cat(out), tokens_per_step(accepted)


def choose_round(log: list[dict], psnr_tolerance: float = 0.0) -> dict:
    """The entry of ``log`` to keep: of the decodes whose PSNR is within ``psnr_tolerance`` dB
    of the best, the one that accepted the most tokens per step (so a mixture that decodes as
    well but faster is not lost to a difference below what the faces can tell); the earliest
    on a tie."""
    top = max(e["decode_psnr"] for e in log)
    close = [e for e in log if e["decode_psnr"] >= top - psnr_tolerance]
    return max(close, key=lambda e: e["decode_tokens_per_step"])


def fit_rounds(model: ImageTransformer, hr: torch.Tensor, objective: str = "mse",
               rounds: int = 2, k: int = 10, epsilon: int = 10, progress: bool = False,
               psnr_tolerance: float = 0.0, output_layer: bool = False
               ) -> tuple[ImageTransformer, list[dict]]:
    """Fit the mixture on the states the decode itself meets (``expert_logits`` with the
    decode's output as the prefix), ``rounds`` times: decode, fit, decode again; with
    ``output_layer``, each round then refits the decoder's output layer under the new
    weights (``fit_output_layer``). Keeps the mixture ``choose_round`` picks (the decode with
    the best PSNR on these faces, the model's own included, or within ``psnr_tolerance`` dB
    of it the one with the most tokens per step) and returns the model with it, and one log
    entry per decode."""
    from bpd_sr.evaluation.metrics import quality

    log: list[dict] = []
    temperature_total = 1.0
    snapshots = []  # each round's output layer and weights, to go back to the one kept
    for r in range(rounds + 1):
        snapshots.append((model.out_proj.weight.detach().clone(),
                          model.out_proj.bias.detach().clone(), model.cfg.cond_scales))
        images, tokens = decode_faces(model, hr, k, epsilon, progress=progress)
        q = quality(images.numpy(), hr.numpy())
        entry = {"round": r, "temperature": round(temperature_total, 4),
                 "cond_scale": list(model.cfg.cond_scales),
                 "decode_psnr": round(float(q["psnr"]), 4),
                 "decode_ssim": round(float(q["ssim"]), 4),
                 "decode_tokens_per_step": round(tokens, 3)}
        log.append(entry)
        if progress:
            tqdm.write(str(entry))
        if r == rounds:
            break
        data = expert_logits(model, hr, prefix=image_to_tokens(images), progress=progress,
                             keep_features=output_layer)
        t, scales = fit_mixture(data, objective, 1.0, model.cfg.cond_scales)
        entry.update(evaluate_mixture(data, 1.0, model.cfg.cond_scales))
        entry["fitted"] = {"temperature": t, "cond_scale": list(scales),
                           **evaluate_mixture(data, t, scales)}
        apply_mixture(model, t, scales)
        temperature_total *= t
        if output_layer:
            # Adam moves each weight by about lr a step: a few percent of the layer's typical
            # weight, which the fitted temperature has made small (an absolute 1e-3 moved the
            # shipped layer by 40% a step and found nothing)
            lr = 0.03 * model.out_proj.weight.detach().abs().mean().item()
            w, b, info = fit_output_layer(data, model.out_proj.weight, model.out_proj.bias,
                                          scales, lr=lr)
            with torch.no_grad():
                model.out_proj.weight.copy_(w)
                model.out_proj.bias.copy_(b)
            entry["fitted"]["output_layer"] = info
            if progress:
                tqdm.write(f"output layer: {info}")
    best = choose_round(log, psnr_tolerance)
    weight, bias, scales = snapshots[best["round"]]
    with torch.no_grad():
        model.out_proj.weight.copy_(weight)
        model.out_proj.bias.copy_(bias)
    model.cfg = replace(model.cfg, cond_scale=scales)
    return model, log


__all__ = ["choose_round", "decode_faces", "fit_rounds", "ExpertLogits", "OBJECTIVES",
           "apply_mixture", "evaluate_mixture", "expert_logits", "fit_mixture",
           "fit_output_layer", "mixture_loss", "set_flip_average"]
