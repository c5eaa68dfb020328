"""How a photo is framed into the model's square, and area resizing (docs/method.md, "Data").

The model learnt faces framed like tensor2tensor's ``Img2imgCeleba`` crop of aligned CelebA:
a 138x138 square at row 40, column 20 of the 178x218 ``img_align_celeba`` image, from the
top of the hair to just below the chin, the eyes a little above the middle. A photo framed
otherwise comes out less face-like, so:

- ``celeba``: that box, scaled to the image (89x109 -> (10, 20, 79, 89)); only for images
  with the aligned CelebA shape (178:218).
- ``centre``: the largest centred square.
- ``auto``: ``celeba`` for images of the aligned CelebA shape, ``centre`` for the rest.

Every crop is then area-resized (PIL ``Image.BOX``). Boxes are (left, top, right, bottom).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

CELEBA_SIZE = (178, 218)  # (width, height) of an img_align_celeba image
CELEBA_BOX = (20, 40, 158, 178)  # (left, top, right, bottom): 138x138 at row 40, column 20
CROPS = ("auto", "celeba", "centre")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def celeba_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The Img2imgCeleba crop box for an aligned image of this size: (20, 40, 158, 178) at
    178x218, scaled proportionally otherwise (89x109 -> (10, 20, 79, 89))."""
    sx, sy = width / CELEBA_SIZE[0], height / CELEBA_SIZE[1]
    left, top, right, bottom = CELEBA_BOX
    return (_round_half_up(left * sx), _round_half_up(top * sy),
            _round_half_up(right * sx), _round_half_up(bottom * sy))


def has_celeba_shape(width: int, height: int) -> bool:
    """Whether the scaled CelebA box is square to within a pixel (the 178:218 shape)."""
    left, top, right, bottom = celeba_box(width, height)
    return width >= 2 and abs((right - left) - (bottom - top)) <= 1


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def choose_crop(width: int, height: int, crop: str = "auto") -> str:
    """``celeba`` or ``centre``: what ``crop`` means for an image of this size.
    Raises ValueError for an unknown crop, or ``celeba`` on an image of another shape."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; choose from {', '.join(CROPS)}")
    if crop == "auto":
        return "celeba" if has_celeba_shape(width, height) else "centre"
    if crop == "celeba" and not has_celeba_shape(width, height):
        raise ValueError(f"the training crop needs an aligned CelebA photo (178x218 or the same "
                         f"shape), not {width}x{height}")
    return crop


def frame(img: np.ndarray, crop: str = "auto") -> tuple[np.ndarray, str]:
    """uint8 (H, W, 3) -> (the framed crop (S, S', 3), what was done, e.g. "cropped to the
    training framing (138x138 at row 40, column 20)" or "centre-cropped to 30x30"; "" when
    the whole image was kept)."""
    h, w = img.shape[:2]
    kind = choose_crop(w, h, crop)
    left, top, right, bottom = (celeba_box if kind == "celeba" else centre_box)(w, h)
    out = img[top:bottom, left:right]
    if kind == "celeba":
        what = f"cropped to the training framing ({right - left}x{bottom - top} at row {top}, column {left})"
    else:
        what = "" if (h, w) == out.shape[:2] else f"centre-cropped to {right - left}x{bottom - top}"
    return out, what


def area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (S, S', 3) -> uint8 (size, size, 3) with PIL's box (area-average) filter."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((size, size), Image.BOX), dtype=np.uint8).copy()
