"""Pictures as uint8 arrays: heatmaps of accepted blocks and comparison strips.

No matplotlib here (it is not a core dependency): colour maps are small anchor tables
(9 colours sampled from matplotlib's viridis and magma at 0, 1/8, ..., 1) linearly
interpolated, close enough to the originals for heatmaps. The maps come from a
``DecodeResult`` (see ``bpd_sr.decoding``): ``accepted`` (steps,) and ``step_index``
(32, 32, 3) of one image.
"""

from __future__ import annotations

import numpy as np
import torch

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


def enlarge(img: ArrayLike, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement: (H, W, 3) or (H, W) -> (H*scale, W*scale[, 3])."""
    img = _numpy(img)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def _resize_nearest(img: np.ndarray, height: int) -> np.ndarray:
    """(h, w, 3) -> (height, round(w * height / h), 3) by nearest neighbour.

    Index arithmetic rather than a library resize, so an integer factor gives exact blocks
    (each source pixel repeated height/h times), which is what makes an 8x8 input legible.
    """
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    return img[rows[:, None], cols[None, :]]


def strip(images: list[ArrayLike], height: int, gap: int = 2) -> np.ndarray:
    """Images side by side: uint8 (height, sum of widths + gaps, 3).

    Each uint8 (H, W, 3) (or grayscale (H, W)) image is enlarged by nearest neighbour to
    ``height`` rows (a square image becomes height x height) and placed left to right on a
    white background, ``gap`` white columns apart.
    """
    if not images:
        raise ValueError("strip needs at least one image")
    if height < 1 or gap < 0:
        raise ValueError(f"need height >= 1 and gap >= 0, got {height}, {gap}")
    tiles = []
    for img in images:
        arr = _numpy(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"strip takes uint8 images, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"strip takes (H, W, 3) or (H, W) images, got {arr.shape}")
        tiles.append(_resize_nearest(arr, height))
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for t in tiles:
        out[:, x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    return out
