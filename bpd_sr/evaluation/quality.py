"""Quality of every method on a set of faces: the rows of ``bpd-sr evaluate``.

Each face's input is its 4x4 area mean (``tokens.downsample``). Rows: bicubic, Lanczos, the
conditioning net alone (the expected intensity of its logits: a regression baseline; for a
discretised-Gaussian head also its mean mu, the value it is fitted to),
sequential decoding and blockwise decoding for each (k, epsilon) and decoding rule, and
sampling at the given temperatures. Metrics: ``bpd_sr.evaluation.metrics.quality``.

With ``back_projection`` (the package's default output, as ``bpd-sr upscale`` writes it)
every row of the model, the net alone included, is measured after
``bpd_sr.decoding.consistency.back_project`` (and its images as the model made them, under
"as_decoded"); bicubic and Lanczos stay as they are, the references every row is compared
with. Whether a blockwise decode is identical to sequential decoding is judged on the images
as decoded: it measures the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from bpd_sr.config import DEFAULT_RULE
from bpd_sr.decoding.consistency import back_project
from bpd_sr.decoding.loop import blockwise_parallel_decode, sample_decode, tokens_per_step
from bpd_sr.evaluation.metrics import quality, upscale_bicubic, upscale_lanczos
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import ImageTransformer


def summary(q: dict, bicubic: dict) -> dict:
    """Mean PSNR / SSIM, and collapse measured directly: the per-image PSNR, its minimum and
    median, and the share of faces below bicubic upscaling of the same input."""
    per = q["psnr_per_image"]
    return {"psnr": float(q["psnr"]), "ssim": float(q["ssim"]),
            "psnr_min": float(per.min()), "psnr_median": float(np.median(per)),
            "share_below_bicubic": float((per < bicubic["psnr_per_image"]).mean()),
            "psnr_per_image": [round(float(x), 3) for x in per]}


def output_summary(images: torch.Tensor, lr: torch.Tensor, ref: np.ndarray, bicubic: dict,
                   back_projection: bool) -> dict:
    """``summary`` of the model's images uint8 (N, 32, 32, 3) of inputs lr as the package
    outputs them: back-projected, with PSNR / SSIM as decoded beside (module docstring), or
    as decoded."""
    if not back_projection:
        return summary(quality(images.numpy(), ref), bicubic)
    made = quality(images.numpy(), ref)
    return {**summary(quality(back_project(images, lr).numpy(), ref), bicubic),
            "as_decoded": {"psnr": float(made["psnr"]), "ssim": float(made["ssim"])}}


@dataclass(frozen=True)
class Method:
    """One decoded row: k = 1 is sequential decoding (or plain sampling)."""

    name: str
    k: int
    epsilon: int
    temperature: float
    rule: str | None


def methods(ks: list[int], epsilons: list[int], rules: list[str],
            temperatures: list[float]) -> list[Method]:
    """The decoded rows, in the order they are reported."""
    out = []
    for rule in rules:
        out.append(Method(f"sequential ({rule})", 1, 0, 0.0, rule))
        out += [Method(f"k={k} eps={e} ({rule})", k, e, 0.0, rule) for k in ks for e in epsilons]
    for t in temperatures:
        out.append(Method(f"sample T={t}", 1, 0, t, None))
        out += [Method(f"blockwise k={k} T={t}", k, 0, t, None) for k in ks]
    return out


def decode_all(model: ImageTransformer, lr: torch.Tensor, m: Method, refine: int, seed: int,
               batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor], int, float]:
    """Decode every face of lr uint8 (N, 8, 8, 3) by method m -> (images uint8 (N, 32, 32,
    3), accepted blocks per face, decoder calls over all faces, seconds)."""
    images, acc, calls, secs = [], [], 0, 0.0
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(lr), batch_size):
        batch = lr[s : s + batch_size]
        if m.k == 1:
            res = sample_decode(model, batch, m.temperature, gen, rule=m.rule or DEFAULT_RULE)
            calls += res.model_calls * len(batch)  # one call per token, per image
        else:
            extra = {"rule": m.rule, "refine": refine or None} if m.temperature == 0 else {}
            res = blockwise_parallel_decode(model, batch, k=m.k, epsilon=m.epsilon,
                                            temperature=m.temperature, generator=gen, **extra)
            calls += sum(len(a) + 1 for a in res.accepted)
        images.append(res.images)
        acc += res.accepted
        secs += res.seconds
    return torch.cat(images), acc, calls, secs


def baseline_rows(model: ImageTransformer, hr: torch.Tensor, batch_size: int,
                  bicubic: dict, back_projection: bool = True) -> list[dict]:
    """Bicubic, Lanczos and the conditioning net alone on faces hr uint8 (N, 32, 32, 3);
    bicubic: ``quality`` of bicubic upscaling on them (every row is compared with it);
    back_projection: the net's rows back-projected (module docstring)."""
    lr, ref = downsample(hr), hr.numpy()
    rows = [{"method": "bicubic", **summary(bicubic, bicubic)},
            {"method": "lanczos", **summary(quality(upscale_lanczos(lr.numpy()), ref), bicubic)}]
    if model.cond is not None:
        from bpd_sr.training.condfit import conditioning_images, conditioning_mu_images

        cond = conditioning_images(model.cond, lr, batch_size)
        rows.append({"method": "cond net (mean)",
                     **output_summary(cond, lr, ref, bicubic, back_projection)})
        if model.cond.head == "gaussian":  # the regression output itself, uncut by the range
            cond = conditioning_mu_images(model.cond, lr, batch_size)
            rows.append({"method": "cond net (mu)",
                         **output_summary(cond, lr, ref, bicubic, back_projection)})
    return rows


def quality_rows(model: ImageTransformer, hr: torch.Tensor, ks: list[int], epsilons: list[int],
                 rules: list[str], refine: int = 255, temperatures: list[float] = (),
                 seed: int = 0, batch_size: int = 32, progress: bool = False,
                 back_projection: bool = True) -> list[dict]:
    """Every row of ``bpd-sr evaluate`` on faces hr uint8 (N, 32, 32, 3) (module docstring);
    a blockwise row also says how far it moved from sequential decoding with its rule."""
    lr, ref = downsample(hr), hr.numpy()
    bicubic = quality(upscale_bicubic(lr.numpy()), ref)
    rows = baseline_rows(model, hr, batch_size, bicubic, back_projection)
    sequential: dict = {}  # rule -> (PSNR, images) of its sequential decode
    for m in tqdm(methods(ks, epsilons, rules, list(temperatures)), desc="decoding",
                  disable=not progress):
        decoded, acc, calls, secs = decode_all(model, lr, m, refine, seed, batch_size)
        mean = tokens_per_step(acc)
        row = {"method": m.name, "rule": m.rule, "k": m.k, "epsilon": m.epsilon,
               "temperature": m.temperature,
               "refine": refine if m.k > 1 and m.temperature == 0 else None,
               **output_summary(decoded, lr, ref, bicubic, back_projection),
               "mean_accepted": mean, "model_calls_per_image": calls / len(lr),
               "seconds": secs}
        if m.k > 1:  # of the k - 1 proposals tested per step (slot 0 is the base's own token)
            row["share_of_proposals_rejected"] = (m.k - mean) / (m.k - 1)
        if m.temperature == 0 and m.k == 1:
            sequential[m.rule] = (row["psnr"], decoded)
        elif m.temperature == 0 and m.rule in sequential:
            row.update(_against_sequential(row["psnr"], decoded, *sequential[m.rule]))
        rows.append(row)
    return rows


def _against_sequential(psnr: float, decoded: torch.Tensor, seq_psnr: float,
                        seq_images: torch.Tensor) -> dict:
    """How far a blockwise decode moved from the sequential decode with its rule."""
    same = decoded == seq_images
    return {"psnr_minus_sequential": psnr - seq_psnr,
            "identical_images_to_sequential": float(same.flatten(1).all(1).float().mean()),
            "identical_tokens_to_sequential": float(same.float().mean())}


def format_rows(rows: list[dict]) -> str:
    """The rows as the fixed-width table ``bpd-sr evaluate`` prints."""
    lines = [f"{'method':<28}{'PSNR':>8}{'SSIM':>8}{'min PSNR':>9}{'<bicubic':>9}"
             f"{'block':>8}{'calls/img':>11}{'same img':>9}"]
    for r in rows:
        extra = (f"{r['mean_accepted']:>8.2f}{r['model_calls_per_image']:>11.0f}"
                 if "mean_accepted" in r else "")
        if "identical_images_to_sequential" in r:
            extra += f"{r['identical_images_to_sequential']:>9.0%}"
        lines.append(f"{r['method']:<28}{r['psnr']:>8.2f}{r['ssim']:>8.3f}"
                     f"{r['psnr_min']:>9.2f}{r['share_below_bicubic']:>9.0%}{extra}")
    return "\n".join(lines)


__all__ = ["Method", "baseline_rows", "decode_all", "format_rows", "methods", "quality_rows",
           "summary"]
