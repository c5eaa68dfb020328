"""Face datasets for 8x8 -> 32x32 super-resolution.

Every dataset here yields the 32x32 *target*: a uint8 tensor (32, 32, 3), RGB. The 8x8 model
input is made from it by the trainer with ``bpd_sr.model.tokens.downsample`` (a 4x4 area mean).

Crop protocol (tensor2tensor ``Img2imgCeleba``, the problem used by both the Image Transformer,
Parmar et al. 2018, and blockwise parallel decoding, Stern et al. 2018, section 6; see
docs/method.md, "Data"): decode the 178x218 aligned CelebA image (``img_align_celeba``) to RGB,
crop the 138x138 square box=(left=20, top=40, right=158, bottom=178), i.e. row 40, column 20,
then area-resize it to 32x32 with ``PIL.Image.resize(..., Image.BOX)``. Aligned images of
another size (some copies are 89x109) get the same box scaled proportionally:
89x109 -> (10, 20, 79, 89). The geometry lives in ``bpd_sr.io.framing`` and files are read by
``bpd_sr.io.imageio``, the same code ``upscale`` uses, so training and upscaling see the same
pixels from the same file.

Sources:

- ``NpzFaces``: ``.npz`` arrays ``images`` uint8 (N, 32, 32, 3), already cropped (the shared
  data's format, and what ``prepare_celeba`` writes), one file or a folder of shards.
- ``FolderFaces``: any folder of face images, framed like ``upscale`` frames them (the
  training crop for aligned CelebA-shaped photos, the centre square otherwise), area
  resized to 32x32.
- ``CelebAFaces``: CelebA in its own (torchvision) layout, cropped as above.
- ``open_faces`` picks one of these from what a path is.

Nothing here downloads anything: see ``data/README.md`` for getting CelebA.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from bpd_sr.config import CHANNELS, HR_SIZE
from bpd_sr.io.atomic import write_atomic
from bpd_sr.io.framing import area_resize, frame
from bpd_sr.io.imageio import IMAGE_EXTENSIONS, ImageError, is_image_name, list_images, read_image

__all__ = [
    "CelebAFaces",
    "DataError",
    "FolderFaces",
    "NpzFaces",
    "open_faces",
    "prepare_celeba",
]

CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
_TARGET_SHAPE = (HR_SIZE, HR_SIZE, CHANNELS)


class DataError(ValueError):
    """A user-facing data problem; the message is one line, fit to print without a traceback."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- npz arrays


def _npz_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.npz") if p.is_file())
        if not files:
            raise DataError(f"{path}: no .npz files in this folder")
        return files
    return [path]


def _load_npz(path: Path) -> np.ndarray:
    """One npz file -> its images uint8 (N, 32, 32, 3) (other arrays in it are not read)."""
    if path.is_file() and not zipfile.is_zipfile(path):  # np.load would blame pickled data
        raise DataError(f"{path}: not an npz file (an npz is a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise DataError(
                    f"{path}: no 'images' array (it has: {', '.join(z.files) or 'none'})"
                )
            images = z["images"]
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        # ValueError covers object arrays (which need pickle, refused on purpose).
        raise DataError(f"{path}: not a readable npz file ({e})") from e
    if images.dtype != np.uint8 or images.shape[1:] != _TARGET_SHAPE or images.ndim != 4:
        raise DataError(
            f"{path}: 'images' must be uint8 (N, {HR_SIZE}, {HR_SIZE}, {CHANNELS}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    return images


class NpzFaces(Dataset):
    """Pre-cropped 32x32 faces from npz: item i is uint8 (32, 32, 3).

    path: an ``.npz`` file with ``images`` uint8 (N, 32, 32, 3), or a folder whose ``*.npz``
    shards (sorted by name) are concatenated. The arrays are read once into memory.

    Attribute: ``images`` uint8 tensor (n, 32, 32, 3).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or folder")
        chunks = [_load_npz(f) for f in _npz_files(self.path)]
        images = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # (n, 32, 32, 3) uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        """uint8 (32, 32, 3)."""
        return self.images[i].clone()


# --------------------------------------------------------------------------- image files


def _read_face(path: Path, crop: str) -> torch.Tensor:
    """An image file, framed (``bpd_sr.io.framing``) and area-resized: uint8 (32, 32, 3).
    DataError (one line) when it cannot be read."""
    try:
        img = read_image(path)
    except ImageError as e:
        raise DataError(str(e)) from e
    return torch.from_numpy(area_resize(frame(img, crop)[0], HR_SIZE))


class FolderFaces(Dataset):
    """A folder of face images of any size and mode: item i is uint8 (32, 32, 3).

    Each image is read by ``bpd_sr.io.imageio.read_image`` (RGBA composited on white, EXIF
    rotation applied), framed as ``upscale`` frames it (``bpd_sr.io.framing``, crop "auto"), and
    area-resized (Image.BOX) to 32x32. Files are those with an image extension
    (``imageio.IMAGE_EXTENSIONS``, any case), sorted by path; hidden ones skipped.
    """

    def __init__(self, root: str | os.PathLike, recursive: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        self.files = list_images(self.root, recursive)
        if not self.files:
            raise DataError(f"{self.root}: no image files ({' '.join(sorted(IMAGE_EXTENSIONS))})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        """uint8 (32, 32, 3)."""
        return _read_face(self.files[i], "auto")


# --------------------------------------------------------------------------- CelebA


def _find_celeba(root: Path) -> tuple[Path, Path] | None:
    """(image folder, folder to look for list_eval_partition in), or None if not CelebA."""
    if root.name == "img_align_celeba" and root.is_dir():
        image_dir, base = root, root.parent
    elif (root / "img_align_celeba").is_dir():
        image_dir, base = root / "img_align_celeba", root
    elif (root / "celeba" / "img_align_celeba").is_dir():
        image_dir, base = root / "celeba" / "img_align_celeba", root / "celeba"
    else:
        return None
    # The Kaggle zip nests the images one level deeper: img_align_celeba/img_align_celeba/*.jpg.
    nested = image_dir / "img_align_celeba"
    if nested.is_dir() and not any((is_image_name(p) and p.is_file()) for p in image_dir.iterdir()):
        image_dir = nested
    return image_dir, base


def _read_partition(base: Path) -> dict[str, int] | None:
    """list_eval_partition.txt ("000001.jpg 0") or Kaggle's .csv ("000001.jpg,0" after a
    header) -> {file name: partition}; None when neither file exists."""
    for name in ("list_eval_partition.txt", "list_eval_partition.csv"):
        path = base / name
        if path.is_file():
            break
    else:
        return None
    table: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.replace(",", " ").split()
            if not fields or (lineno == 1 and fields[0] == "image_id"):
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(f"{path}:{lineno}: expected 'NAME.jpg 0|1|2', got {line.strip()!r}")
            table[fields[0]] = int(fields[1])
    return table


class CelebAFaces(Dataset):
    """CelebA aligned faces, cropped by the Img2imgCeleba protocol: item i is uint8 (32, 32, 3).

    root: a folder holding ``img_align_celeba/``, torchvision's parent folder holding
    ``celeba/img_align_celeba/``, or the ``img_align_celeba`` folder itself.
    split: "train", "valid", "test" (partitions 0, 1, 2 of ``list_eval_partition.txt``, looked
    for beside ``img_align_celeba``) or "all" (every image; needs no partition file). Images in
    the folder but not in the partition file belong only to "all".

    Attributes: ``files`` (sorted paths), ``celeba_ids`` (image numbers from the file names,
    -1 where the name is not a number).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train"):
        self.root = Path(root)
        if split not in (*CELEBA_SPLITS, "all"):
            raise DataError(f"unknown CelebA split {split!r}: use train, valid, test or all")
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")
        found = _find_celeba(self.root)
        if found is None:
            raise DataError(f"{self.root}: no img_align_celeba folder here or under celeba/")
        self.image_dir, base = found
        files = sorted(p for p in self.image_dir.iterdir() if (is_image_name(p) and p.is_file()))
        if not files:
            raise DataError(f"{self.image_dir}: no images")
        if split != "all":
            partition = _read_partition(base)
            if partition is None:
                raise DataError(
                    f"{base}: no list_eval_partition.txt, so split {split!r} is unknown; "
                    "add that file from the CelebA download or use split 'all'"
                )
            want = CELEBA_SPLITS[split]
            files = [p for p in files if partition.get(p.name) == want]
            if not files:
                raise DataError(f"{self.image_dir}: no images of split {split!r}")
        self.files = files
        self.celeba_ids = [int(p.stem) if p.stem.isdigit() else -1 for p in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        """uint8 (32, 32, 3)."""
        return _read_face(self.files[i], "celeba")


# --------------------------------------------------------------------------- dispatch


def open_faces(path: str | os.PathLike, split: str = "train") -> Dataset:
    """A face dataset (items uint8 (32, 32, 3)) chosen by what ``path`` is:

    - an ``.npz`` file, or a folder with ``*.npz`` in it -> ``NpzFaces``;
    - a folder named ``img_align_celeba``, or holding one directly or under ``celeba/`` ->
      ``CelebAFaces(path, split)``;
    - any other folder with image files (searched recursively) -> ``FolderFaces``.

    Raises DataError (one line) when the path is missing, empty, or none of these.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return NpzFaces(p)
        raise DataError(f"{p}: not a dataset; give an .npz file or a folder of images")
    if _find_celeba(p) is not None:
        return CelebAFaces(p, split)
    if any(q.is_file() for q in p.glob("*.npz")):
        return NpzFaces(p)
    if list_images(p, recursive=True):
        return FolderFaces(p, recursive=True)
    raise DataError(f"{p}: no .npz files, CelebA img_align_celeba folder or images found")


# --------------------------------------------------------------------------- preparation


def load_faces(
    path: str | Path, split: str = "train", limit: int | None = None, progress: bool = False
) -> torch.Tensor:
    """The first ``limit`` faces (all by default) of a dataset as one uint8 tensor
    (N, 32, 32, 3): small enough to hold in memory (200k CelebA faces are 600 MB), so that
    training batches and evaluation sets are free to assemble."""
    if limit is not None and limit < 1:
        raise DataError(f"the number of faces to use must be at least 1, got {limit}")
    ds = open_faces(path, split=split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise DataError(f"{path}: no faces in it")
    images = getattr(ds, "images", None)
    if images is not None:
        return torch.as_tensor(np.ascontiguousarray(images[:n]))
    items = [ds[i] for i in tqdm(range(n), desc="loading faces", disable=not progress)]
    return torch.stack([torch.as_tensor(np.asarray(x)) for x in items])


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed, atomically (``bpd_sr.io.atomic``)."""
    # a file object: savez would append .npz to a name
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def prepare_celeba(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: str = "all",
    shard_size: int = 20000,
    progress: bool = True,
) -> list[Path]:
    """Crop a CelebA ``img_align_celeba`` download into npz shards for ``NpzFaces``.

    Writes ``out_dir/celeba_<split>_<i:03d>.npz``, each with ``images`` uint8 (n, 32, 32, 3)
    and ``celeba_id`` int32 (n,), n <= shard_size, each written atomically. Shards of the same
    split left by an earlier run with more shards are removed, so the folder reads back as
    exactly this split; a folder holding other npz files is refused (keep one folder per
    split, since ``NpzFaces`` concatenates every shard in a folder). Returns the shard paths.
    """

    if shard_size < 1:
        raise DataError(f"shard_size must be at least 1, got {shard_size}")
    dataset = CelebAFaces(root, split)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"celeba_{split}_"

    def ours(p: Path) -> bool:
        num = p.stem[len(prefix) :]
        return p.stem.startswith(prefix) and len(num) >= 3 and num.isdigit()

    others = sorted(p.name for p in out.glob("*.npz") if not ours(p))
    if others:
        raise DataError(
            f"{out}: already holds other npz files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); use a separate folder for each split"
        )

    n = len(dataset)
    written: list[Path] = []
    with tqdm(total=n, unit="img", desc=f"celeba {split}", disable=not progress) as bar:
        for shard, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            images = np.empty((stop - start, *_TARGET_SHAPE), dtype=np.uint8)
            for j, i in enumerate(range(start, stop)):
                images[j] = dataset[i].numpy()
                bar.update(1)
            ids = np.asarray(dataset.celeba_ids[start:stop], dtype=np.int32)
            path = out / f"{prefix}{shard:03d}.npz"
            write_npz_atomic(path, images=images, celeba_id=ids)
            written.append(path)
    keep = set(written)
    for stale in out.glob(f"{prefix}*.npz"):
        if ours(stale) and stale not in keep:
            stale.unlink()
    return written
