"""Pictures as uint8 arrays: labelled comparisons and heatmaps of accepted blocks.

Drawn with Pillow (text, colour bar), so that ``upscale`` does not pay matplotlib's import:
colour maps are small anchor tables (9 colours sampled from matplotlib's viridis and magma
at 0, 1/8, ..., 1) linearly interpolated, close enough to the originals for heatmaps. The
maps come from a ``DecodeResult`` (see ``bpd_sr.decoding.loop``): ``accepted`` (steps,) and
``step_index`` (32, 32, 3) of one image.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ArrayLike = np.ndarray | torch.Tensor

# matplotlib's maps sampled at np.linspace(0, 1, 9), as 0..255 RGB.
_COLORMAPS: dict[str, np.ndarray] = {
    "viridis": np.array(
        [
            (68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
            (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37),
        ],
        dtype=np.float64,
    ),
    "magma": np.array(
        [
            (0, 0, 4), (29, 17, 71), (81, 18, 124), (131, 38, 129), (183, 55, 121),
            (231, 82, 99), (252, 137, 97), (254, 196, 136), (252, 253, 191),
        ],
        dtype=np.float64,
    ),
}  # fmt: skip

NAN_COLOUR = (128, 128, 128)  # where a value is NaN (e.g. a pixel no step produced)


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colormap(values: ArrayLike, vmin: float, vmax: float, name: str = "viridis") -> np.ndarray:
    """float (H, W) -> uint8 (H, W, 3): ``vmin`` maps to the first colour, ``vmax`` to the last.

    Values outside [vmin, vmax] are clipped; NaN becomes grey. With vmin == vmax every value
    gets the first colour (nothing to distinguish).
    """
    if name not in _COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}; choose from {sorted(_COLORMAPS)}")
    table = _COLORMAPS[name]
    values = _numpy(values).astype(np.float64)
    nan = np.isnan(values)
    span = float(vmax) - float(vmin)
    t = (values - vmin) / span if span > 0 else np.zeros_like(values)
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    # Position among the anchors: anchor i sits at i / (n - 1).
    pos = t * (len(table) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(table) - 2)
    frac = (pos - lo)[..., None]
    rgb = table[lo] * (1.0 - frac) + table[lo + 1] * frac
    out = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    out[nan] = NAN_COLOUR
    return out


def accepted_length_map(accepted: ArrayLike, step_index: ArrayLike) -> np.ndarray:
    """Per-pixel accepted length: float (32, 32).

    ``accepted``: int (steps,), tokens committed by each step; ``step_index``: int (32, 32, 3),
    the step that committed each channel. A pixel's value is the mean over its 3 channels of
    ``accepted[step_index]``: how large a block its intensities were decoded in. Bright
    regions are where the proposal heads guessed well.
    """
    accepted = _numpy(accepted).reshape(-1)
    step_index = _numpy(step_index).astype(np.int64)
    if step_index.ndim != 3:
        raise ValueError(f"step_index must be (H, W, C), got {step_index.shape}")
    if step_index.size and (step_index.min() < 0 or step_index.max() >= len(accepted)):
        raise ValueError(
            f"step_index refers to steps {step_index.min()}..{step_index.max()} "
            f"but accepted has {len(accepted)} steps"
        )
    return accepted.astype(np.float64)[step_index].mean(axis=-1)


def step_map(step_index: ArrayLike) -> np.ndarray:
    """int (32, 32, 3) -> float (32, 32): the mean step index of each pixel's channels."""
    step_index = _numpy(step_index)
    if step_index.ndim != 3:
        raise ValueError(f"step_index must be (H, W, C), got {step_index.shape}")
    return step_index.astype(np.float64).mean(axis=-1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _as_rgb(img: ArrayLike) -> np.ndarray:
    arr = _numpy(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"pictures take uint8 images, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"pictures take (H, W, 3) or (H, W) images, got {arr.shape}")
    return arr


def labelled_panels(panels: list[tuple[str, ArrayLike]], size: int = 128) -> np.ndarray:
    """Images side by side, each enlarged (nearest neighbour, so an 8x8 input shows its
    pixels) to ``size`` x ``size`` with its label underneath: uint8 (H, W, 3) on white.

    panels: (label, uint8 (h, w, 3) or (h, w)); the 8x8 input and the 32x32 images alike.
    """
    if not panels:
        raise ValueError("labelled_panels needs at least one image")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    font = _font(max(10, size // 9))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = max(_text_size(probe, label, font)[1] for label, _ in panels) + 8
    widths = [max(size, _text_size(probe, label, font)[0] + 8) for label, _ in panels]
    gap = max(4, size // 16)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(panels) + 1), gap + size + label_h),
                       "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for (label, img), w in zip(panels, widths, strict=True):
        tile = Image.fromarray(np.ascontiguousarray(_as_rgb(img))).resize((size, size), Image.NEAREST)
        canvas.paste(tile, (x + (w - size) // 2, gap))
        draw.text((x + w / 2, gap + size + 4), label, fill="black", font=font, anchor="ma")
        x += w + gap
    return np.asarray(canvas)


def with_caption(img: np.ndarray, caption: str, size: int = 128) -> np.ndarray:
    """``img`` with a line of text below it (the picture widened if the text needs it)."""
    font = _font(max(10, size // 10))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gap = max(4, size // 16)
    tw, th = _text_size(probe, caption, font)
    h, w = img.shape[:2]
    canvas = Image.new("RGB", (max(w, tw + 2 * gap), h + th + 2 * gap), "white")
    canvas.paste(Image.fromarray(img), (0, 0))
    ImageDraw.Draw(canvas).text((gap, h + gap // 2), caption, fill="black", font=font)
    return np.asarray(canvas)


def colour_bar(vmin: float, vmax: float, height: int, ticks: list[float],
               name: str = "viridis") -> np.ndarray:
    """A vertical colour bar, vmax at the top, with tick labels on its right: uint8 (height, W, 3)."""
    font = _font(max(10, height // 12))
    bar_w = max(8, height // 10)
    values = np.linspace(vmax, vmin, height)[:, None].repeat(bar_w, axis=1)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(_text_size(probe, f"{t:g}", font)[0] for t in ticks) + 6
    pad = _text_size(probe, "0", font)[1]  # room for the top and bottom labels
    canvas = Image.new("RGB", (bar_w + 4 + text_w, height + 2 * pad), "white")
    canvas.paste(Image.fromarray(colormap(values, vmin, vmax, name)), (0, pad))
    draw = ImageDraw.Draw(canvas)
    for t in ticks:
        y = pad + (vmax - t) / (vmax - vmin) * (height - 1) if vmax > vmin else pad
        draw.line([(bar_w, y), (bar_w + 3, y)], fill="black")
        draw.text((bar_w + 5, y), f"{t:g}", fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def heatmap_figure(result: ArrayLike, values: ArrayLike, k: int, size: int = 128) -> np.ndarray:
    """The upscaled face beside the accepted-block heatmap of its decode, with a colour bar
    from 1 to k and a caption saying what the colours mean: uint8 (H, W, 3).

    result: uint8 (32, 32, 3); values: float (32, 32) from ``accepted_length_map``.
    """
    top = max(k, 2)
    panels = labelled_panels([("bpd-sr", result), ("accepted block", colormap(values, 1, top))], size)
    ticks = sorted({int(round(t)) for t in np.linspace(1, top, min(top, 4))})
    bar = colour_bar(1, top, size, [float(t) for t in ticks])
    gap = max(4, size // 16)
    row = np.full((max(panels.shape[0], bar.shape[0]), panels.shape[1] + bar.shape[1] + gap, 3),
                  255, np.uint8)
    row[: panels.shape[0], : panels.shape[1]] = panels
    y = max(0, gap - (bar.shape[0] - size) // 2)  # the bar level with the pictures
    row[y : y + bar.shape[0], panels.shape[1] : panels.shape[1] + bar.shape[1]] = bar
    return with_caption(row, f"colour: tokens accepted by the decoding step that made each "
                             f"pixel (1 to k = {k}; higher is faster)", size)


__all__ = ["accepted_length_map", "colormap", "colour_bar", "heatmap_figure", "labelled_panels",
           "step_map", "with_caption"]
