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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bpd_sr.config import CHANNELS
from bpd_sr.decoding.rules import expected_intensity
from bpd_sr.model.tokens import downsample, image_to_tokens, shift_right
from bpd_sr.model.transformer import ImageTransformer

OBJECTIVES = ("mse", "nll")


@dataclass
class ExpertLogits:
    """Teacher-forced logits of N faces: decoder (N, 3072, 256) and conditioning net
    (N, 3072, 256), both unweighted, and targets long (N, 3072)."""

    decoder: torch.Tensor
    conditioning: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def expert_logits(model: ImageTransformer, hr: torch.Tensor, prefix: torch.Tensor | None = None,
                  batch_size: int = 16, progress: bool = False) -> ExpertLogits:
    """Both experts' logits on faces hr uint8 (N, 32, 32, 3), float32 (see ExpertLogits).

    prefix: long (N, 3072), the tokens the decoder reads before each target; by default the
    true ones (teacher forcing). Under teacher forcing the decoder sees true neighbours it
    never has when decoding, so it looks better than it is; a decode's own output as the
    prefix gives the states it meets at decode time, the targets staying the truth."""
    model.eval()
    dec, cond, targets = [], [], []
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
    return ExpertLogits(torch.cat(dec), torch.cat(cond), torch.cat(targets))


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
        target = data.targets[s : s + chunk]
        if objective == "mse":
            value = expected_intensity(logits, torch.float32)
            part = (value - target.float()).pow(2).sum()
        else:
            part = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
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


@torch.no_grad()
def apply_mixture(model: ImageTransformer, temperature: float,
                  cond_scale: tuple[float, float, float]) -> ImageTransformer:
    """Set the mixture on ``model`` in place: the decoder's output layer is multiplied by
    ``temperature`` (relative to its current weights) and ``cfg.cond_scale`` is replaced
    (absolute: the weights of the net's raw logits)."""
    model.out_proj.weight.mul_(temperature)
    if model.out_proj.bias is not None:
        model.out_proj.bias.mul_(temperature)
    model.cfg = replace(model.cfg, cond_scale=tuple(float(v) for v in cond_scale))
    return model


def set_flip_average(model: ImageTransformer, on: bool) -> ImageTransformer:
    """Switch the conditioning net's mirror self-ensemble (``ModelConfig.cond_flip_average``)
    on or off in place; it changes the net's logits, so the mixture is fitted after it."""
    if model.cond is None:
        raise ValueError("the model has no conditioning net")
    model.cfg = replace(model.cfg, cond_flip_average=on)
    model.cond.flip_average = on
    return model


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
               psnr_tolerance: float = 0.0) -> tuple[ImageTransformer, list[dict]]:
    """Fit the mixture on the states the decode itself meets (``expert_logits`` with the
    decode's output as the prefix), ``rounds`` times: decode, fit, decode again. Keeps the
    mixture ``choose_round`` picks (the decode with the best PSNR on these faces, the model's
    own included, or within ``psnr_tolerance`` dB of it the one with the most tokens per step)
    and returns the model with it, and one log entry per decode."""
    from bpd_sr.evaluation.metrics import quality

    log: list[dict] = []
    temperature_total = 1.0
    for r in range(rounds + 1):
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
        data = expert_logits(model, hr, prefix=image_to_tokens(images), progress=progress)
        t, scales = fit_mixture(data, objective, 1.0, model.cfg.cond_scales)
        entry.update(evaluate_mixture(data, 1.0, model.cfg.cond_scales))
        entry["fitted"] = {"temperature": t, "cond_scale": list(scales),
                           **evaluate_mixture(data, t, scales)}
        apply_mixture(model, t, scales)
        temperature_total *= t
    # back to the chosen decode's mixture (the temperatures multiply)
    best = choose_round(log, psnr_tolerance)
    apply_mixture(model, best["temperature"] / temperature_total, tuple(best["cond_scale"]))
    return model, log


__all__ = ["choose_round", "decode_faces", "fit_rounds", "ExpertLogits", "OBJECTIVES",
           "apply_mixture", "evaluate_mixture", "expert_logits", "fit_mixture", "mixture_loss",
           "set_flip_average"]
