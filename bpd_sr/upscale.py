"""One input file -> its output files: read, frame, decode, write the result and pictures.

The steps of ``bpd-sr upscale`` for one image, as functions the command drives in a loop
(``bpd_sr.cli``) and the Python API can call: ``read_model_input`` (file -> 8x8 and
notices), ``decode`` (8x8 -> a DecodeResult, by the chosen method), ``pictures`` (the
labelled comparison and the heatmap) and ``upscale_file`` (all of it, writing every file
atomically). Output names are decided beforehand for the whole batch (``bpd_sr.io.outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE
from bpd_sr.decoding.autok import auto_decode
from bpd_sr.decoding.consistency import back_project
from bpd_sr.decoding.loop import (
    DecodeResult,
    blockwise_parallel_decode,
    sample_decode,
    sequential_decode,
)
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.evaluation import viz
from bpd_sr.io import imageio
from bpd_sr.io.outputs import OutputNames
from bpd_sr.model.transformer import ImageTransformer


@dataclass(frozen=True)
class DecodeSettings:
    """How ``upscale`` decodes: sequential (one token per step) or blockwise with k proposals
    and an epsilon, each token by the decoding rule (``bpd_sr.decoding.rules``); with temperature >
    0, exact sampling instead (seeded per sample)."""

    sequential: bool = False
    k: int | str | None = DEFAULT_K  # None: every slot the model has; "auto": bpd_sr.decoding.autok
    epsilon: int = DEFAULT_EPSILON
    temperature: float = 0.0
    seed: int = 0
    rule: str = DEFAULT_RULE
    back_projection: bool = True  # bpd_sr.decoding.consistency, after decoding

    @property
    def method(self) -> str:
        """What decodes, in words: every output line names it."""
        if self.sequential:
            way = "sequential"
        elif self.temperature > 0:
            way = f"blockwise k={self.k}"
        else:
            way = f"blockwise k={self.k} epsilon={self.epsilon}"
        if self.temperature > 0:
            way = f"{way}, sampling T={self.temperature} seed={self.seed}"
        else:
            way = f"{way}, rule {self.rule}"
        return f"{way}, back-projected" if self.back_projection else way


def decode(model: ImageTransformer | DecodingSession, lr: torch.Tensor,
           settings: DecodeSettings, sample: int = 0) -> DecodeResult:
    """lr: uint8 (1, 8, 8, 3) -> the decode ``settings`` ask for, back-projected onto lr
    when they say so; ``sample`` picks the seed of one of several samples (seed * 1000 +
    sample)."""
    res = _decode(model, lr, settings, sample)
    if settings.back_projection:
        res = replace(res, images=back_project(res.images, lr))
    return res


def _decode(model: ImageTransformer | DecodingSession, lr: torch.Tensor,
            settings: DecodeSettings, sample: int) -> DecodeResult:
    """``decode`` before back-projection."""
    if settings.temperature > 0:
        generator = torch.Generator().manual_seed(settings.seed * 1000 + sample)
        if settings.sequential:
            return sample_decode(model, lr, settings.temperature, generator)
        blockwise = auto_decode if settings.k == "auto" else partial(
            blockwise_parallel_decode, k=settings.k)
        return blockwise(model, lr, temperature=settings.temperature, generator=generator)
    if settings.sequential:
        return sequential_decode(model, lr, rule=settings.rule)
    blockwise = auto_decode if settings.k == "auto" else partial(
        blockwise_parallel_decode, k=settings.k)
    return blockwise(model, lr, epsilon=settings.epsilon, rule=settings.rule)


def read_model_input(path: Path, crop: str = "auto") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A file -> (its pixels uint8 (H, W, 3), the model input uint8 (8, 8, 3), notices:
    one line each on what of the file was used and how it was framed)."""
    img, frames = imageio.read_input(path)
    lr, framing = imageio.to_model_input(img, crop)
    return img, lr, [n for n in (frames, framing) if n]


def pictures(img: np.ndarray, lr: np.ndarray, results: list[np.ndarray], crop: str,
             size: int) -> np.ndarray:
    """The labelled comparison: input | bicubic | bpd-sr (each sample) | original, the last
    when the input was larger than 8x8 and the original can be shown at 32x32."""
    from bpd_sr.evaluation.metrics import upscale_bicubic

    names = ["bpd-sr"] if len(results) == 1 else [f"sample {i}" for i in range(len(results))]
    panels = [("input 8x8", lr), ("bicubic", upscale_bicubic(lr)), *zip(names, results, strict=True)]
    ref = imageio.reference_32(img, crop)
    if ref is not None and max(img.shape[:2]) > 8:
        panels.append(("original", ref))
    return viz.labelled_panels(panels, size)


@dataclass
class Upscaled:
    """What ``upscale_file`` did for one input: the files it wrote, the notices about the
    input, and the decoding statistics over all of its samples."""

    written: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    model_calls: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.steps)


def upscale_file(model: ImageTransformer | DecodingSession, path: Path, names: OutputNames,
                 settings: DecodeSettings, crop: str = "auto", picture_size: int = 128) -> Upscaled:
    """Read ``path``, decode it (one result per name in ``names.results``) and write the
    results at their true 32x32, then the heatmaps and the comparison, each atomically.
    Raises ImageError (one line) for a file that cannot be read or written."""
    img, lr, notices = read_model_input(path, crop)
    done = Upscaled(notices=notices)
    results = []
    for i in range(len(names.results)):
        res = decode(model, torch.from_numpy(lr)[None], settings, sample=i)
        results.append(res)
        done.steps += res.steps[0]
        done.tokens += int(res.accepted[0].sum())
        done.model_calls += res.model_calls
        done.seconds += res.seconds
    _make_folders(names)
    n_slots = DecodingSession.of(model).model.cfg.k
    k = n_slots if settings.k in (None, "auto") else settings.k  # for the heatmap's scale
    for i, (name, res) in enumerate(zip(names.results, results, strict=True)):
        done.written.append(_write(name, res.images[0].numpy()))
        if names.heatmaps:
            amap = viz.accepted_length_map(res.accepted[0], res.step_index[0])
            figure = viz.heatmap_figure(res.images[0], amap, 1 if settings.sequential else k,
                                        picture_size)
            done.written.append(_write(names.heatmaps[i], figure))
    if names.compare is not None:
        figure = pictures(img, lr, [r.images[0].numpy() for r in results], crop, picture_size)
        done.written.append(_write(names.compare, figure))
    return done


def _make_folders(names: OutputNames) -> None:
    for folder in {p.parent for p in names.all()}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise imageio.ImageError(f"cannot create output folder {folder}: "
                                     f"{e.strerror or e}") from None


def _write(path: Path, img: np.ndarray) -> Path:
    imageio.write_image_atomic(path, img)
    return path
