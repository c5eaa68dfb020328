"""The one image reader and writer of bpd-sr (docs/method.md, "Inputs"): ``upscale``,
``train`` and ``evaluate`` see the same pixels from the same file.

Input policy: whatever the file holds (RGBA, grayscale, palette, 16-bit, CMYK, EXIF-rotated,
animated, any size) becomes uint8 RGB (H, W, 3). The model takes 8x8, so an image that is not
8x8 is framed (``bpd_sr.io.framing``: the training crop for aligned CelebA photos, the centre
square otherwise) and area-resized (PIL ``Image.BOX``) to 8x8, with a one-line notice saying
so. Transparent pixels are composited over white. Embedded ICC profiles are ignored: values
are taken as sRGB. Of an animated image, the first frame is used.

Every output carries the PNG text ``Software: bpd-sr``, so that a later run over the same
folder leaves this tool's own outputs alone (``find_images``).

User errors (missing, empty, corrupt or truncated files, decompression bombs, unwritable
outputs) raise ``ImageError`` with a one-line message that names the path, so the CLI can
print it and go on with the next file instead of showing a traceback.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from bpd_sr.config import HR_SIZE, LR_SIZE
from bpd_sr.io.atomic import write_atomic
from bpd_sr.io.framing import area_resize, frame

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# Modes that carry an alpha channel; palette and L/RGB images may also carry a
# "transparency" entry in img.info (a transparent index or colour).
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
# High bit-depth single-channel modes. Pillow's own convert("L") clips these at 255 instead
# of scaling, which turns most 16-bit photos white, so they are scaled by hand.
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


NOT_REGULAR = ("not a regular file (a pipe, a device, or a shell's <(...)): save the image "
               "to a file first")
SOFTWARE = "bpd-sr"  # the PNG "Software" text of every output: how a later run knows them


class ImageError(ValueError):
    """A user-facing problem with an image file; ``str(err)`` is one line naming the path."""


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (Pillow messages sometimes hold newlines)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), fully decoded (see ``read_input``)."""
    return read_input(path)[0]


def read_input(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """Read an image file as uint8 RGB (H, W, 3), fully decoded, and a notice (one line, or
    None) about what of the file was not used: the other frames of an animated image.

    Handles alpha (composited over white), grayscale, palette, 16-bit (scaled: 65535 -> 255),
    float (0..1 or 0..255), CMYK and EXIF orientation. Multi-frame files give their first frame.
    Raises ImageError for a missing path, a folder, an empty file, a file that is not an
    image, truncated or corrupt data, and images over Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``; the warning level counts as an error too).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"cannot read {path}: no such file")
    if path.is_dir():
        raise ImageError(f"cannot read {path}: is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"cannot read {path}: {NOT_REGULAR}")
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"cannot read {path}: file is empty (0 bytes)")
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or _one_line(exc)}") from exc

    # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises
    # DecompressionBombError above twice that; a face tool has no business decoding either.
    # ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left False, so truncated data fails in
    # load() instead of silently decoding as grey.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                img.load()  # Image.open is lazy: force the full decode here, inside the try
                frames = getattr(img, "n_frames", 1)
                img = ImageOps.exif_transpose(img)
                notice = None
                if frames > 1:
                    notice = f"{frames} frames (animated): the first frame is used"
                return _to_rgb(img), notice
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"cannot read {path}: image too large, refused as a possible decompression "
                f"bomb ({_one_line(exc)})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise ImageError(
                f"cannot read {path}: not an image file (or a format Pillow cannot read)"
            ) from exc
        except ImageError:
            raise
        except PermissionError as exc:
            raise ImageError(f"cannot read {path}: {exc.strerror or _one_line(exc)}") from exc
        except MemoryError as exc:
            raise ImageError(f"cannot read {path}: not enough memory to decode it") from exc
        except Exception as exc:
            # Pillow's format plugins raise many types on malformed data (OSError "image file
            # is truncated", SyntaxError "broken PNG file", struct.error, zlib.error,
            # ValueError, EOFError, ...): all of them mean the file cannot be decoded.
            raise ImageError(
                f"cannot read {path}: truncated or corrupt image data ({_one_line(exc)})"
            ) from exc


def _to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 (H, W, 3) RGB."""
    mode = img.mode
    if mode in _INT_MODES:
        # 16-bit grayscale (PNG opens as I;16 or I): scale 0..65535 to 0..255, rounded.
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(np.clip(arr, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        # Float images have no fixed range; treat 0..1 data as such, anything else as 0..255.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        # Composite over white: transparent regions of a face cut-out read as background,
        # not as whatever colour the encoder left under alpha = 0 (often black).
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    return np.array(img, dtype=np.uint8)  # a copy, independent of the PIL image


def _check_rgb(img: np.ndarray, name: str = "img") -> None:
    if (
        not isinstance(img, np.ndarray)
        or img.dtype != np.uint8
        or img.ndim != 3
        or img.shape[2] != 3
    ):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name} must be a uint8 array (H, W, 3), got {got}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"{name} is empty: {img.shape}")


def to_model_input(img: np.ndarray, crop: str = "auto") -> tuple[np.ndarray, str | None]:
    """uint8 (H, W, 3) -> (uint8 (8, 8, 3), notice).

    The policy for inputs that are not 8x8: frame (``bpd_sr.io.framing``, ``crop`` auto, celeba
    or centre), then area resize to 8x8. ``notice`` is one line describing what was done, or
    None when the input was already 8x8. Sizes in the notice are width x height, as image
    viewers show them. Raises ImageError for ``crop="celeba"`` on an image of another shape.
    """
    _check_rgb(img)
    h, w = img.shape[:2]
    if (h, w) == (LR_SIZE, LR_SIZE):
        return img.copy(), None
    square, what = _frame(img, crop)
    side = min(square.shape[:2])
    steps = [what] if what else []
    if side > LR_SIZE:
        steps.append(f"area-resized to {LR_SIZE}x{LR_SIZE}")
    elif side < LR_SIZE:
        # Enlarging cannot add detail; say so rather than pretend it was a normal input.
        steps.append(
            f"enlarged to {LR_SIZE}x{LR_SIZE} (box filter: it is smaller than the model's input)"
        )
    notice = f"input is {w}x{h}: " + " and ".join(steps)
    return area_resize(square, LR_SIZE), notice


def _frame(img: np.ndarray, crop: str) -> tuple[np.ndarray, str]:
    try:
        return frame(img, crop)
    except ValueError as exc:
        raise ImageError(f"cannot use --crop {crop}: {exc}") from None


def reference_32(img: np.ndarray, crop: str = "auto") -> np.ndarray | None:
    """uint8 (H, W, 3) -> uint8 (32, 32, 3) or None.

    The same framing as ``to_model_input``, area-resized to 32x32: what a perfect upscaler
    would produce, shown as "original" beside the output. Needs a crop of at least 32x32 (a
    32x32 input is its own reference); None for smaller inputs, since enlarging them would
    invent a reference.
    """
    _check_rgb(img)
    square, _ = _frame(img, crop)
    if min(square.shape[:2]) < HR_SIZE:
        return None
    if square.shape[:2] == (HR_SIZE, HR_SIZE):
        return square.copy()
    return area_resize(square, HR_SIZE)


def is_image_name(path: Path) -> bool:
    """An image extension (case-insensitive), and not hidden: macOS "._x.png" resource forks
    and editor temporary files are never images."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool) -> list[Path]:
    """The image files of a folder (and of its subfolders when ``recursive``), sorted;
    nothing under a hidden folder (.git, .cache)."""
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(
        p for p in found
        if is_image_name(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def is_own_output(path: Path) -> bool:
    """Whether this file was written by bpd-sr (its PNG text says so; see ``SOFTWARE``).
    Only regular files are opened: a named pipe would block the read forever."""
    if not path.is_file():
        return False
    try:
        with warnings.catch_warnings():  # a huge image: read_image refuses it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # lazy: reads the header and text chunks only
                return str(img.info.get("Software", "")).split(" ")[0] == SOFTWARE
    except Exception:  # not an image, unreadable: read_image will say why
        return False


@dataclass
class FoundImages:
    """What ``find_images`` found.

    files: the images to read, in order. relative: each file's path relative to the folder
    it was found in (its name when it was given directly), for mirroring folder trees.
    errors: (path, one-line reason) for missing paths and folders without images.
    skipped: files that bpd-sr wrote itself (a second run over a folder leaves them alone).
    """

    files: list[Path] = field(default_factory=list)
    relative: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def find_images(paths: list[str | os.PathLike], recursive: bool = False) -> FoundImages:
    """Expand files and folders into image files.

    A file given explicitly is kept whatever its extension (``read_image`` judges it later).
    A folder contributes its files with an image extension (case-insensitive), sorted, and
    those of its subfolders when ``recursive``. Files that bpd-sr wrote are skipped, given
    directly or not (``is_own_output``). Duplicates (the same file reached twice) are kept
    once, in first-seen order.
    """
    res = FoundImages()
    seen: set[Path] = set()

    def add(p: Path, rel: Path) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        if is_own_output(p):
            res.skipped.append(p)
        else:
            res.files.append(p)
            res.relative.append(rel)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = list_images(path, recursive)
            if not images:
                reason = "no image files in this folder"
                if not recursive and list_images(path, recursive=True):
                    reason += " (its subfolders have some: use the recursive option)"
                res.errors.append((path, reason))
            for p in images:
                add(p, p.relative_to(path))
        elif path.exists() and not path.is_file():
            res.errors.append((path, NOT_REGULAR))
        elif path.exists():
            add(path, Path(path.name))
        else:
            res.errors.append((path, "no such file or folder"))
    return res


def write_image_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 (H, W, 3) to ``path`` atomically (``bpd_sr.io.atomic``); the format follows
    the extension, and an unknown or missing one writes PNG. A PNG carries the text
    ``Software: bpd-sr``. On failure nothing is left behind and ImageError is raised (e.g.
    "cannot write out/x.png: Permission denied").
    """
    _check_rgb(array, "array")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    extra = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        extra["pnginfo"] = info
    pil = Image.fromarray(np.ascontiguousarray(array))
    try:
        write_atomic(path, lambda f: pil.save(f, format=fmt, **extra))
    except Exception as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
        raise ImageError(f"cannot write {path}: {reason}") from exc
