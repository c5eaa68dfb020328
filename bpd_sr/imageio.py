"""Read any image file robustly, write outputs atomically (GUIDE section 4).

Input policy: whatever the file holds (RGBA, grayscale, palette, 16-bit, CMYK, EXIF-rotated,
any size) becomes uint8 RGB (H, W, 3). The model takes 8x8, so an image that is not 8x8 is
centre-square cropped (the largest centred square) and area-resized (PIL ``Image.BOX``) to
8x8, with a one-line notice saying so. Transparent pixels are composited over white.
Embedded ICC profiles are ignored: values are taken as sRGB.

User errors (missing, empty, corrupt or truncated files, decompression bombs, unwritable
outputs) raise ``ImageError`` with a one-line message that names the path, so the CLI can
print it and go on with the next file instead of showing a traceback.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

LR_SIZE = 8  # the model's input side
HR_SIZE = 32  # the model's output side

# Modes that carry an alpha channel; palette and L/RGB images may also carry a
# "transparency" entry in img.info (a transparent index or colour).
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
# High bit-depth single-channel modes. Pillow's own convert("L") clips these at 255 instead
# of scaling, which turns most 16-bit photos white, so they are scaled by hand.
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """A user-facing problem with an image file; ``str(err)`` is one line naming the path."""


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (Pillow messages sometimes hold newlines)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB (H, W, 3), fully decoded.

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
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
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


def _centre_square(img: np.ndarray) -> np.ndarray:
    """(H, W, C) -> the largest centred square (S, S, C), S = min(H, W)."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top : top + side, left : left + side]


def _area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (S, S, 3) -> uint8 (size, size, 3) with PIL's box (area-average) filter."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((size, size), Image.BOX), dtype=np.uint8).copy()


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


def to_model_input(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """uint8 (H, W, 3) -> (uint8 (8, 8, 3), notice).

    The policy for inputs that are not 8x8: centre-square crop, then area resize to 8x8.
    ``notice`` is one line describing what was done, or None when the input was already 8x8.
    Sizes in the notice are width x height, as image viewers show them.
    """
    _check_rgb(img)
    h, w = img.shape[:2]
    if (h, w) == (LR_SIZE, LR_SIZE):
        return img.copy(), None
    square = _centre_square(img)
    side = square.shape[0]
    steps = []
    if h != w:
        steps.append(f"centre-cropped to {side}x{side}")
    if side > LR_SIZE:
        steps.append(f"area-resized to {LR_SIZE}x{LR_SIZE}")
    elif side < LR_SIZE:
        # Enlarging cannot add detail; say so rather than pretend it was a normal input.
        steps.append(
            f"enlarged to {LR_SIZE}x{LR_SIZE} (box filter: it is smaller than the model's input)"
        )
    notice = f"input is {w}x{h}: " + " and ".join(steps)
    return _area_resize(square, LR_SIZE), notice


def reference_32(img: np.ndarray) -> np.ndarray | None:
    """uint8 (H, W, 3) -> uint8 (32, 32, 3) or None.

    The same centre-square crop as ``to_model_input``, area-resized to 32x32: what a perfect
    upscaler would produce, shown as "original" beside the output. Needs a centre square of
    at least 32x32 (a 32x32 input is its own reference); None for smaller inputs, since
    enlarging them would invent a reference.
    """
    _check_rgb(img)
    square = _centre_square(img)
    if square.shape[0] < HR_SIZE:
        return None
    if square.shape[0] == HR_SIZE:
        return square.copy()
    return _area_resize(square, HR_SIZE)


def _is_image_name(path: Path) -> bool:
    # Hidden files (macOS "._x.png" resource forks, editor temp files) are never images.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(
    paths: list[str | os.PathLike], recursive: bool = False
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and folders into image files.

    A file given explicitly is kept whatever its extension (``read_image`` judges it later).
    A folder contributes its files with an image extension (case-insensitive), sorted, and
    those of its subfolders when ``recursive``. Returns (images, errors): errors are
    (path, one-line reason) for missing paths and folders without images. Duplicates (the
    same file reached twice) are kept once, in first-seen order.
    """
    found: list[Path] = []
    errors: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            found.append(p)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.glob("*")
            images = sorted(p for p in pattern if _is_image_name(p) and p.is_file())
            if not images:
                reason = "no image files in this folder"
                if not recursive and any(
                    _is_image_name(p) and p.is_file() for p in path.rglob("*")
                ):
                    reason += " (its subfolders have some: use the recursive option)"
                errors.append((path, reason))
            for p in images:
                add(p)
        elif path.exists():
            add(path)
        else:
            errors.append((path, "no such file or folder"))
    return found, errors


def write_image_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 (H, W, 3) to ``path`` atomically; the format follows the extension.

    The data goes to a temporary file in the same folder, then ``os.replace`` renames it over
    ``path``, so a crash or a full disk never leaves a half-written image. An unknown or
    missing extension writes PNG. On failure the temporary file is removed and ImageError
    is raised (e.g. "cannot write out/x.png: Permission denied").
    """
    _check_rgb(array, "array")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    # Same folder, so the rename never crosses file systems; hidden so that a folder scan
    # running at the same time skips it.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # 0o666 minus the umask: the final file gets the same permissions as any new file
        # (tempfile.mkstemp would make it owner-only).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ImageError(f"cannot write {path}: {exc.strerror or _one_line(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(array)).save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # including KeyboardInterrupt: never leave the temp file
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, Exception):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
            raise ImageError(f"cannot write {path}: {reason}") from exc
        raise


def output_path(input_path: str | os.PathLike, out_dir: Path | None, suffix: str) -> Path:
    """``<stem><suffix>.png`` beside the input, or in ``out_dir`` when given.

    Raises ImageError when that would be the input file itself (inputs are never overwritten).
    """
    input_path = Path(input_path)
    folder = Path(out_dir) if out_dir is not None else input_path.parent
    out = folder / f"{input_path.stem}{suffix}.png"
    if out.resolve() == input_path.resolve():
        raise ImageError(
            f"cannot write {out}: it would overwrite the input; give a suffix or an output folder"
        )
    return out
