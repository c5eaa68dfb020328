"""Datasets on small synthetic data written to tmp_path (no CelebA images here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bpd_sr.io.data import (
    CelebAFaces,
    DataError,
    FolderFaces,
    NpzFaces,
    open_faces,
    prepare_celeba,
)
from bpd_sr.io.framing import celeba_box

INSIDE = (200, 40, 90)
OUTSIDE = (20, 210, 30)
JPEG_TOL = 12  # max abs error allowed from JPEG coding of flat regions


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def boxed_face(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """OUTSIDE everywhere except the box, which is INSIDE."""
    a = np.empty((height, width, 3), np.uint8)
    a[:] = OUTSIDE
    left, top, right, bottom = box
    a[top:bottom, left:right] = INSIDE
    return Image.fromarray(a)


def save_jpeg(img: Image.Image, path) -> None:
    # No chroma subsampling, so colour edges stay where they are drawn.
    img.save(path, quality=95, subsampling=0)


def assert_colour(item: torch.Tensor, colour, tol: int = JPEG_TOL) -> None:
    assert item.dtype == torch.uint8 and tuple(item.shape) == (32, 32, 3)
    err = (item.int() - torch.tensor(colour, dtype=torch.int32)).abs().max().item()
    assert err <= tol, f"max error {err} from {colour}"


def make_celeba(root, n: int = 6, size=(178, 218), partition=None, layout: str = "plain"):
    """A fake CelebA: n boxed JPEGs 000001.jpg.. in root/img_align_celeba (or root/celeba/...).

    Returns the image folder. partition: list of 0/1/2 per image to write list_eval_partition.txt.
    """
    base = root / "celeba" if layout == "torchvision" else root
    image_dir = base / "img_align_celeba"
    image_dir.mkdir(parents=True)
    box = celeba_box(*size)
    for i in range(1, n + 1):
        save_jpeg(boxed_face(*size, box), image_dir / f"{i:06d}.jpg")
    if partition is not None:
        lines = [f"{i:06d}.jpg {p}\n" for i, p in enumerate(partition, 1)]
        (base / "list_eval_partition.txt").write_text("".join(lines))
    return image_dir


# --------------------------------------------------------------------------- NpzFaces


def test_npz_file_items_match_array(tmp_path):
    images = random_images(5)
    np.savez(tmp_path / "f.npz", images=images, celeba_id=np.arange(5, dtype=np.int32) + 100)
    ds = NpzFaces(tmp_path / "f.npz")
    assert len(ds) == 5
    for i in range(5):
        assert ds[i].dtype == torch.uint8 and tuple(ds[i].shape) == (32, 32, 3)
        assert np.array_equal(ds[i].numpy(), images[i])
    # Items are copies: changing one does not change the dataset.
    item = ds[0]
    item.fill_(7)
    assert np.array_equal(ds[0].numpy(), images[0])


def test_npz_folder_of_shards_concatenated_in_name_order(tmp_path):
    a, b = random_images(3, seed=1), random_images(2, seed=2)
    # Written out of order; read in sorted name order.
    np.savez_compressed(tmp_path / "s_001.npz", images=b)
    np.savez_compressed(tmp_path / "s_000.npz", images=a)
    (tmp_path / "notes.txt").write_text("not a shard")
    ds = NpzFaces(tmp_path)
    assert len(ds) == 5
    got = np.stack([ds[i].numpy() for i in range(5)])
    assert np.array_equal(got, np.concatenate([a, b]))


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 32, 32), np.uint8), "must be uint8"),
        (np.zeros((2, 64, 64, 3), np.uint8), r"\(2, 64, 64, 3\)"),
        (np.zeros((2, 32, 32, 3), np.float32), "float32"),
    ],
)
def test_npz_bad_array_is_one_line_error(tmp_path, images, match):
    np.savez(tmp_path / "bad.npz", images=images)
    with pytest.raises(DataError, match=match) as e:
        NpzFaces(tmp_path / "bad.npz")
    assert "\n" not in str(e.value)


def test_npz_missing_images_array_and_garbage_file(tmp_path):
    np.savez(tmp_path / "x.npz", pixels=random_images(1))
    with pytest.raises(DataError, match="no 'images' array"):
        NpzFaces(tmp_path / "x.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not an npz file"):
        NpzFaces(tmp_path / "junk.npz")


def test_npz_object_array_refused(tmp_path):
    np.savez(tmp_path / "o.npz", images=np.array([object()], dtype=object))
    with pytest.raises(DataError):
        NpzFaces(tmp_path / "o.npz")


# --------------------------------------------------------------------------- FolderFaces


def test_folder_mixed_modes_and_sizes(tmp_path):
    # 60 wide x 40 high: centre square is columns 10..50, painted blue; the sides are not.
    wide = np.zeros((40, 60, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:50] = (0, 0, 255)
    wide[:, 50:] = (0, 255, 0)
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    # 30 wide x 90 high: centre square is rows 30..60.
    tall = np.zeros((90, 30, 3), np.uint8)
    tall[30:60] = (10, 100, 200)
    Image.fromarray(tall).save(tmp_path / "b_tall.bmp")
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(tmp_path / "c_clear.png")  # -> white
    Image.new("L", (100, 100), 77).save(tmp_path / "d_grey.jpg", quality=95)
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([30, 60, 90] + [0] * 765)
    pal.save(tmp_path / "e_palette.png")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "f_16bit.png")
    Image.new("RGB", (8, 8), (5, 6, 7)).save(tmp_path / "G_small.TIFF")
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.new("RGB", (33, 33), (1, 2, 3)).save(sub / "h_nested.webp", lossless=True)
    (tmp_path / "readme.txt").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"ignored too")

    ds = FolderFaces(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == [
        "G_small.TIFF",
        "a_wide.png",
        "b_tall.bmp",
        "c_clear.png",
        "d_grey.jpg",
        "e_palette.png",
        "f_16bit.png",
        "sub/h_nested.webp",
    ]
    by_name = {p.name: ds[i] for i, p in enumerate(ds.files)}
    assert_colour(by_name["a_wide.png"], (0, 0, 255), tol=0)
    assert_colour(by_name["b_tall.bmp"], (10, 100, 200), tol=0)
    assert_colour(by_name["c_clear.png"], (255, 255, 255), tol=0)
    assert_colour(by_name["d_grey.jpg"], (77, 77, 77), tol=2)
    assert_colour(by_name["e_palette.png"], (30, 60, 90), tol=0)
    assert_colour(by_name["f_16bit.png"], (156, 156, 156), tol=1)  # rescaled, not clipped
    assert_colour(by_name["G_small.TIFF"], (5, 6, 7), tol=0)
    assert_colour(by_name["h_nested.webp"], (1, 2, 3), tol=0)

    flat = FolderFaces(tmp_path, recursive=False)
    assert len(flat) == len(ds) - 1
    assert all(p.parent == tmp_path for p in flat.files)


def test_folder_rgba_half_transparent_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 128)).save(tmp_path / "half.png")
    item = FolderFaces(tmp_path)[0]
    # black at alpha 128/255 over white: about 127
    assert_colour(item, (127, 127, 127), tol=1)


def test_folder_bad_image_is_one_line_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = FolderFaces(tmp_path)
    with pytest.raises(DataError, match="broken.png") as e:
        ds[0]
    assert "\n" not in str(e.value)


def test_folder_empty_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        FolderFaces(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        FolderFaces(tmp_path / "nope")


# --------------------------------------------------------------------------- CelebAFaces


def test_celeba_box_values():
    assert celeba_box(178, 218) == (20, 40, 158, 178)
    assert celeba_box(89, 109) == (10, 20, 79, 89)
    assert celeba_box(356, 436) == (40, 80, 316, 356)


def test_celeba_crop_keeps_only_the_box(tmp_path):
    make_celeba(tmp_path, n=3)
    ds = CelebAFaces(tmp_path, split="all")
    assert len(ds) == 3
    assert ds.celeba_ids == [1, 2, 3]
    for i in range(3):
        assert_colour(ds[i], INSIDE)


def test_celeba_crop_is_not_shifted(tmp_path):
    # The box one pixel smaller on every side: the border of the 32x32 result must then
    # show some of the outside colour, so a crop off by a pixel would be caught above.
    image_dir = tmp_path / "img_align_celeba"
    image_dir.mkdir()
    save_jpeg(boxed_face(178, 218, (21, 41, 157, 177)), image_dir / "000001.jpg")
    item = CelebAFaces(tmp_path, split="all")[0].int()
    inside = torch.tensor(INSIDE)
    assert (item[0] - inside).abs().max() > 3 * JPEG_TOL
    assert (item[-1] - inside).abs().max() > 3 * JPEG_TOL
    assert (item[:, 0] - inside).abs().max() > 3 * JPEG_TOL
    assert (item[:, -1] - inside).abs().max() > 3 * JPEG_TOL
    assert (item[2:-2, 2:-2] - inside).abs().max() <= JPEG_TOL


def test_celeba_matches_reference_pillow_pipeline(tmp_path):
    rng = np.random.default_rng(3)
    image_dir = tmp_path / "img_align_celeba"
    image_dir.mkdir()
    save_jpeg(
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)),
        image_dir / "000042.jpg",
    )
    ref = Image.open(image_dir / "000042.jpg").convert("RGB")
    ref = np.array(ref.crop((20, 40, 158, 178)).resize((32, 32), Image.BOX))
    ds = CelebAFaces(tmp_path, split="all")
    assert ds.celeba_ids == [42]
    assert np.array_equal(ds[0].numpy(), ref)


def test_celeba_half_size_images(tmp_path):
    make_celeba(tmp_path, n=2, size=(89, 109))
    ds = CelebAFaces(tmp_path, split="all")
    for i in range(2):
        assert_colour(ds[i], INSIDE)


def test_celeba_partition_splits(tmp_path):
    make_celeba(tmp_path, n=6, partition=[0, 0, 1, 2, 0, 1])
    assert CelebAFaces(tmp_path, "train").celeba_ids == [1, 2, 5]
    assert CelebAFaces(tmp_path, "valid").celeba_ids == [3, 6]
    assert CelebAFaces(tmp_path, "test").celeba_ids == [4]
    assert len(CelebAFaces(tmp_path, "all")) == 6
    assert_colour(CelebAFaces(tmp_path, "test")[0], INSIDE)
    with pytest.raises(DataError, match="unknown CelebA split"):
        CelebAFaces(tmp_path, "val")


def test_celeba_without_partition_only_all(tmp_path):
    make_celeba(tmp_path, n=2)
    assert len(CelebAFaces(tmp_path, "all")) == 2
    with pytest.raises(DataError, match="list_eval_partition.txt") as e:
        CelebAFaces(tmp_path, "train")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ["plain", "torchvision"])
def test_celeba_root_variants(tmp_path, layout):
    image_dir = make_celeba(tmp_path, n=4, partition=[0, 1, 0, 2], layout=layout)
    for root in (tmp_path, image_dir.parent, image_dir):
        ds = CelebAFaces(root, "train")
        assert ds.celeba_ids == [1, 3], root
        assert ds.image_dir == image_dir


def test_celeba_kaggle_nested_folder_and_csv_partition(tmp_path):
    outer = tmp_path / "img_align_celeba"
    inner = outer / "img_align_celeba"
    inner.mkdir(parents=True)
    for i in (1, 2, 3):
        save_jpeg(boxed_face(178, 218, (20, 40, 158, 178)), inner / f"{i:06d}.jpg")
    (tmp_path / "list_eval_partition.csv").write_text(
        "image_id,partition\n000001.jpg,0\n000002.jpg,2\n000003.jpg,0\n"
    )
    ds = CelebAFaces(tmp_path, "train")
    assert ds.image_dir == inner
    assert ds.celeba_ids == [1, 3]


def test_celeba_malformed_partition_file(tmp_path):
    make_celeba(tmp_path, n=1)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 7\n")
    with pytest.raises(DataError, match=":1:"):
        CelebAFaces(tmp_path, "train")


# --------------------------------------------------------------------------- open_faces


def test_open_faces_dispatch(tmp_path):
    np.savez(tmp_path / "one.npz", images=random_images(2))
    assert isinstance(open_faces(tmp_path / "one.npz"), NpzFaces)

    shards = tmp_path / "shards"
    shards.mkdir()
    np.savez(shards / "s_000.npz", images=random_images(2))
    np.savez(shards / "s_001.npz", images=random_images(1))
    ds = open_faces(shards)
    assert isinstance(ds, NpzFaces) and len(ds) == 3

    celeba = tmp_path / "celeba_root"
    image_dir = make_celeba(celeba, n=3, partition=[0, 1, 0], layout="torchvision")
    for root in (celeba, celeba / "celeba", image_dir):
        ds = open_faces(root)
        assert isinstance(ds, CelebAFaces) and ds.celeba_ids == [1, 3]
    assert len(open_faces(celeba, split="valid")) == 1

    faces = tmp_path / "faces"
    (faces / "deep").mkdir(parents=True)
    Image.new("RGB", (40, 40), (9, 9, 9)).save(faces / "deep" / "x.png")
    ds = open_faces(faces)
    assert isinstance(ds, FolderFaces) and len(ds) == 1


def test_open_faces_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        open_faces(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz files, CelebA"):
        open_faces(empty)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"\(3, 16, 16, 3\)"):
        open_faces(tmp_path / "wrong.npz")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="not a dataset"):
        open_faces(tmp_path / "x.csv")
    no_partition = tmp_path / "c"
    make_celeba(no_partition, n=1)
    with pytest.raises(DataError, match="use split 'all'"):
        open_faces(no_partition)
    err = DataError("first\nsecond")
    assert isinstance(err, ValueError) and str(err) == "first second"


# --------------------------------------------------------------------------- prepare_celeba


def test_prepare_celeba_shards_read_back_equal(tmp_path):
    rng = np.random.default_rng(5)
    image_dir = tmp_path / "raw" / "img_align_celeba"
    image_dir.mkdir(parents=True)
    for i in (3, 7, 11, 12, 20):
        a = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        save_jpeg(Image.fromarray(a), image_dir / f"{i:06d}.jpg")
    out = tmp_path / "out"
    paths = prepare_celeba(tmp_path / "raw", out, split="all", shard_size=2, progress=False)
    assert [p.name for p in paths] == [
        "celeba_all_000.npz",
        "celeba_all_001.npz",
        "celeba_all_002.npz",
    ]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]  # no temp files
    with np.load(paths[0]) as z:
        assert z["images"].shape == (2, 32, 32, 3) and z["images"].dtype == np.uint8
        assert z["celeba_id"].dtype == np.int32
    with np.load(paths[2]) as z:
        assert z["images"].shape == (1, 32, 32, 3)

    src = CelebAFaces(tmp_path / "raw", "all")
    back = NpzFaces(out)
    assert len(back) == len(src) == 5
    ids = np.concatenate([np.load(p)["celeba_id"] for p in paths])
    assert ids.tolist() == [3, 7, 11, 12, 20]
    for i in range(5):
        assert torch.equal(back[i], src[i])
    assert isinstance(open_faces(out), NpzFaces)

    # A rerun with bigger shards leaves no stale shards behind.
    paths = prepare_celeba(tmp_path / "raw", out, split="all", shard_size=100, progress=False)
    assert [p.name for p in out.iterdir()] == ["celeba_all_000.npz"]
    assert len(NpzFaces(out)) == 5


def test_prepare_celeba_split_and_foreign_npz(tmp_path):
    make_celeba(tmp_path / "raw", n=4, partition=[0, 1, 0, 2])
    out = tmp_path / "train"
    paths = prepare_celeba(tmp_path / "raw", out, split="train", progress=False)
    assert [p.name for p in paths] == ["celeba_train_000.npz"]
    ds = NpzFaces(out)
    assert np.load(paths[0])["celeba_id"].tolist() == [1, 3]
    assert_colour(ds[0], INSIDE)
    with pytest.raises(DataError, match="separate folder"):
        prepare_celeba(tmp_path / "raw", out, split="valid", progress=False)
    make_celeba(tmp_path / "nopart", n=1)
    with pytest.raises(DataError, match="list_eval_partition"):
        prepare_celeba(tmp_path / "nopart", tmp_path / "o2", split="train", progress=False)
    assert not (tmp_path / "o2").exists()  # nothing created before the check
    with pytest.raises(DataError, match="shard_size"):
        prepare_celeba(tmp_path / "raw", tmp_path / "o3", shard_size=0, progress=False)
