"""Framing augmentation for training on faces, with ``torchvision.transforms.v2``.

The training faces are all framed alike (aligned CelebA's tight crop), so a net trained on
them alone learns that framing and does worse on looser ones. Each face of a batch here is,
with its own random parameters:

- zoomed out: reflection-padded by its size on every side, then a square of side
  ``zoom`` x 32 (zoom uniform in [1, max_zoom]) is cut around the face and resized back to
  32x32 with antialiasing (the face shrinks, the background around it is mirrored);
- shifted by up to ``max_shift`` pixels (of the 32) in each direction;
- rotated by up to ``max_rotation`` degrees either way about the centre, before the cut, so
  that the mirrored border, not an empty corner, fills the square (tilted heads are the faces
  a net trained on upright crops does worst on); either the reframed faces are rotated, or a
  share of its own (``rotated_share``), drawn independently, so that zoomed-out faces stay
  upright too;
- flipped horizontally with probability 1/2;
- recoloured (``color_share`` of the faces, drawn from a generator of its own so that the
  framing draws stay those of runs made without it): brightness and contrast scaled by up to
  ``color_strength``, saturation by up to twice that, hue turned by up to a quarter of it
  (of a full turn). It keeps the aligned geometry the test faces share and shows the net
  colourings the training faces lack, against learning single faces by heart.

It works on uint8 (B, 32, 32, 3) tensors on any device (a GPU too); zoom 1, shift 0 and no
flip give the face back unchanged.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bpd_sr.config import HR_SIZE, MAX_ROTATION


def augment_faces(hr: torch.Tensor, generator: torch.Generator, max_zoom: float = 1.5,
                  max_shift: float = 2.0, flip: bool = True, reframed_share: float = 1.0,
                  max_rotation: float = 0.0,
                  rotated_share: float | None = None, color_share: float = 0.0,
                  color_generator: torch.Generator | None = None,
                  color_strength: float = 0.2) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> uint8 (B, 32, 32, 3), each face framed anew (module
    docstring); only a random ``reframed_share`` of them is zoomed, shifted and rotated, the
    rest keep the training crop (a net that sees only zoomed faces does worse on the training
    crop). ``rotated_share`` None rotates the reframed faces; a number rotates that share
    of the faces, drawn on its own (a rotated face may or may not also be reframed).
    The random draws come from ``generator`` (a CPU generator), so a run is reproducible
    from its seed; with ``max_rotation`` 0 no angle is drawn, so the draws of runs made
    before rotations existed stay the same. ``max_rotation`` is at most ``MAX_ROTATION``
    degrees, and rotating needs a cut that lies inside the circle the mirrored square keeps
    filled at every angle (``check_rotation``). ``color_share`` > 0 needs
    ``color_generator`` (module docstring)."""
    _check_settings(max_rotation, rotated_share, color_share, color_generator)
    check_rotation(max_rotation, max_zoom, max_shift)
    b = hr.shape[0]
    pad = HR_SIZE
    zoom = 1 + (max_zoom - 1) * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_shift
    do_flip = (torch.rand(b, generator=generator) < 0.5) & flip
    keep = torch.rand(b, generator=generator) >= reframed_share
    angle = torch.zeros(b)
    if max_rotation > 0:
        angle = (torch.rand(b, generator=generator) * 2 - 1) * max_rotation
        upright = keep
        if rotated_share is not None:
            upright = torch.rand(b, generator=generator) >= rotated_share
        angle[upright] = 0.0
    zoom[keep], shift[keep] = 1.0, 0.0
    x = hr.permute(0, 3, 1, 2)  # (B, 3, 32, 32): torchvision's layout
    # mirrored twice, since one reflection can add less than the image's own size
    padded = TF.pad(x.float(), [pad // 2] * 4, padding_mode="reflect")
    padded = TF.pad(padded, [pad - pad // 2] * 4, padding_mode="reflect")  # (B, 3, 96, 96)
    out = []
    for i in range(b):
        src = padded[i]
        if float(angle[i]) != 0.0:
            src = TF.rotate(src, float(angle[i]), interpolation=InterpolationMode.BILINEAR)
        side = int(round(HR_SIZE * float(zoom[i])))
        top = int(round(pad + (HR_SIZE - side) / 2 + float(shift[i, 0])))
        left = int(round(pad + (HR_SIZE - side) / 2 + float(shift[i, 1])))
        top = min(max(top, 0), 2 * pad + HR_SIZE - side)
        left = min(max(left, 0), 2 * pad + HR_SIZE - side)
        if side == HR_SIZE:  # a shift alone: a plain crop, no resampling
            face = TF.crop(src, top, left, side, side)
        else:
            face = TF.resized_crop(src, top, left, side, side, [HR_SIZE, HR_SIZE],
                                   antialias=True)
        if do_flip[i]:
            face = TF.horizontal_flip(face)
        out.append(face)
    y = torch.stack(out)
    if color_share > 0:
        y = _recolour(y, color_share, color_generator, color_strength)
    y = y.round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def check_rotation(max_rotation: float, max_zoom: float, max_shift: float) -> None:
    """A ValueError if a rotation could bring an empty corner into the cut. The face is
    mirrored into a square of 3 x 32 pixels and turned about its centre: whatever the
    angle, the circle inscribed in that square stays filled, so the cut (side 32 x zoom,
    shifted by up to max_shift in each direction) must have its corners inside it, with a
    pixel to spare for the bilinear resampling."""
    if max_rotation == 0:
        return
    half = HR_SIZE * max_zoom / 2 + max_shift  # furthest reach of the cut along an axis
    if half * math.sqrt(2) > 1.5 * HR_SIZE - 1:
        raise ValueError(f"rotating needs the cut inside the mirrored border: --max-zoom "
                         f"{max_zoom:g} with --max-shift {max_shift:g} reaches too far "
                         f"(at most zoom 1.5 with shift 8, or zoom 2 with shift 1)")


def _check_settings(max_rotation: float, rotated_share: float | None, color_share: float,
                    color_generator: torch.Generator | None) -> None:
    """The settings of ``augment_faces`` that it cannot work with, as a ValueError."""
    if not 0.0 <= max_rotation <= MAX_ROTATION:
        raise ValueError(f"max_rotation must be in [0, {MAX_ROTATION}] degrees")
    if rotated_share is not None and not 0.0 <= rotated_share <= 1.0:
        raise ValueError("rotated_share must be in [0, 1]")
    if not 0.0 <= color_share <= 1.0:
        raise ValueError("color_share must be in [0, 1]")
    if color_share > 0 and color_generator is None:
        raise ValueError("color_share needs a color_generator")


def _recolour(x: torch.Tensor, share: float, g: torch.Generator, strength: float
              ) -> torch.Tensor:
    """float (B, 3, 32, 32) in 0 .. 255 -> the same, a random share of the faces recoloured
    (``augment_faces``); the draws are made for every face, so a face's colouring does not
    depend on which other faces were drawn."""
    b = x.shape[0]
    chosen = torch.rand(b, generator=g) < share
    u = torch.rand(b, 4, generator=g) * 2 - 1  # brightness, contrast, saturation, hue
    out = []
    for i in range(b):
        face = x[i]
        if chosen[i]:
            face = (face / 255.0).clamp(0, 1)  # torchvision's float range
            face = TF.adjust_brightness(face, 1 + strength * float(u[i, 0]))
            face = TF.adjust_contrast(face, 1 + strength * float(u[i, 1]))
            face = TF.adjust_saturation(face, 1 + 2 * strength * float(u[i, 2]))
            face = TF.adjust_hue(face, 0.25 * strength * float(u[i, 3])) * 255.0
        out.append(face)
    return torch.stack(out)

