"""bpd_sr.io.imageio: every input mode, every user error, atomic writes, folder expansion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bpd_sr.io.imageio import (
    IMAGE_EXTENSIONS,
    ImageError,
    find_images,
    read_image,
    read_input,
    reference_32,
    to_model_input,
    write_image_atomic,
)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- reading modes


def test_rgb_roundtrip(tmp_path: Path) -> None:
    img = _noise(5, 7)
    Image.fromarray(img).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, img)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    rgba = np.array(
        [[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8
    )  # transparent red, opaque blue, half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    np.testing.assert_array_equal(out[0, 2], [127, 127, 127])  # 255 * (1 - 128/255)


def test_la_composited_over_white(tmp_path: Path) -> None:
    la = Image.merge(
        "LA", [Image.new("L", (2, 1), 50), Image.frombytes("L", (2, 1), bytes([0, 255]))]
    )
    la.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [50, 50, 50])


def test_palette_with_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # index 0 (black) is transparent
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # white, not black
    np.testing.assert_array_equal(out[0, 1], [255, 0, 0])


def test_palette_gif_without_transparency(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 2:] = (0, 255, 0)
    Image.fromarray(img).convert("P").save(tmp_path / "g.gif")
    out = read_image(tmp_path / "g.gif")
    np.testing.assert_array_equal(out, img)


def test_grayscale_l(tmp_path: Path) -> None:
    Image.new("L", (3, 2), 77).save(tmp_path / "l.png")
    out = read_image(tmp_path / "l.png")
    assert out.shape == (2, 3, 3)
    assert (out == 77).all()


@pytest.mark.parametrize("name", ["i16.png", "i16.tif"])
def test_16_bit_scaled_not_clipped(tmp_path: Path, name: str) -> None:
    # Pillow's own convert("L") clips 16-bit values at 255: 32896 would come out white.
    values = np.array([[0, 257 * 128, 65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode in {"I;16", "I", "I;16B"}
    out = read_image(tmp_path / name)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 10])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_32_bit_int_mode_i(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 200, 70000, -5]], dtype=np.int32)  # out of range is clipped
    Image.fromarray(values, "I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    out = read_image(tmp_path / "i32.tif")
    np.testing.assert_array_equal(out[0, :, 0], [0, 200, 255, 0])


def test_cmyk(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # pure cyan
    cmyk.save(tmp_path / "c.tif")
    out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 255, 255])


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # Stored 20 wide x 10 tall, left half red; orientation 6 means "rotate 90 degrees
    # clockwise to display", so the viewer sees 10 wide x 20 tall with red on top.
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)
    top, bottom = out[2, 5].astype(int), out[17, 5].astype(int)
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


def test_animated_image_first_frame_and_a_notice(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    img, notice = read_input(tmp_path / "a.gif")
    assert (img == [255, 0, 0]).all()
    assert notice == "3 frames (animated): the first frame is used"
    Image.new("RGB", (8, 8)).save(tmp_path / "still.gif")
    assert read_input(tmp_path / "still.gif")[1] is None


def test_non_square_any_size(tmp_path: Path) -> None:
    img = _noise(218, 178)
    Image.fromarray(img).save(tmp_path / "celeba.png")
    out = read_image(tmp_path / "celeba.png")
    assert out.shape == (218, 178, 3)


# ----------------------------------------------------------------------------- input policy


def test_to_model_input_crops_centre_and_reports() -> None:
    img = np.zeros((218, 178, 3), np.uint8)
    img[20:198] = 200  # the centre 178x178 square is 200; the 20-row bands are 0
    lr, notice = to_model_input(img, crop="centre")
    assert lr.shape == (8, 8, 3) and lr.dtype == np.uint8
    assert (lr == 200).all()  # nothing of the cropped-off bands leaks in
    assert notice == "input is 178x218: centre-cropped to 178x178 and area-resized to 8x8"
    wide, notice = to_model_input(np.zeros((30, 40, 3), np.uint8))  # auto: not CelebA-shaped
    assert notice == "input is 40x30: centre-cropped to 30x30 and area-resized to 8x8"


@pytest.mark.parametrize("size", [(178, 218), (89, 109), (356, 436)])
def test_aligned_celeba_photos_get_the_training_crop_by_default(size) -> None:
    """The model learnt the Img2imgCeleba framing: 138x138 at row 40, column 20."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    left, top, right, bottom = (round(v * w / 178) for v in (20, 40, 158, 178))
    img[top:bottom, left:right] = 200  # only the training box is 200
    for crop in ("auto", "celeba"):
        lr, notice = to_model_input(img, crop=crop)
        assert (lr == 200).all(), crop
        assert "training framing" in notice
        assert (reference_32(img, crop=crop) == 200).all()
    centre, _ = to_model_input(img, crop="centre")
    assert not (centre == 200).all()


def test_the_training_crop_refuses_other_shapes() -> None:
    with pytest.raises(ImageError, match="aligned CelebA"):
        to_model_input(np.zeros((100, 100, 3), np.uint8), crop="celeba")


def test_to_model_input_8x8_untouched() -> None:
    img = _noise(8, 8)
    lr, notice = to_model_input(img)
    assert notice is None
    np.testing.assert_array_equal(lr, img)
    assert lr is not img


def test_to_model_input_32x32_is_4x4_mean() -> None:
    img = _noise(32, 32)
    lr, notice = to_model_input(img)
    mean = img.reshape(8, 4, 8, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(lr.astype(float) - mean).max() <= 1.0
    assert notice == "input is 32x32: area-resized to 8x8"


def test_to_model_input_small_input_notice() -> None:
    lr, notice = to_model_input(np.full((4, 6, 3), 9, np.uint8))
    assert lr.shape == (8, 8, 3) and (lr == 9).all()
    assert notice is not None and notice.startswith("input is 6x4: centre-cropped to 4x4")
    assert "enlarged" in notice


def test_to_model_input_rejects_wrong_arrays() -> None:
    with pytest.raises(ValueError):
        to_model_input(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((8, 8, 3), np.float32))


def test_reference_32() -> None:
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # centre square is white, the sides black
    ref = reference_32(img)
    assert ref is not None and ref.shape == (32, 32, 3) and (ref == 255).all()
    small = _noise(32, 32)
    np.testing.assert_array_equal(reference_32(small), small)  # its own reference
    assert reference_32(_noise(20, 20)) is None
    assert reference_32(_noise(20, 300)) is None  # the centre square is only 20x20


# ----------------------------------------------------------------------------- read errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in _one_line(err) and "no such file" in str(err.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        read_image(tmp_path)
    assert "folder" in _one_line(err)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "empty.png")
    assert "empty" in _one_line(err) and "empty.png" in str(err.value)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "notes.png")
    assert "not an image" in _one_line(err) and "notes.png" in str(err.value)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    full = tmp_path / f"full.{ext}"
    Image.fromarray(_noise(64, 64)).save(full)
    cut = tmp_path / f"cut.{ext}"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        read_image(cut)
    assert f"cut.{ext}" in _one_line(err)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)
    read_image(full)  # the intact file is fine


@pytest.mark.parametrize("limit", [300, 150])  # 400 px: a warning at 300, an error at 150
def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    Image.fromarray(_noise(20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "bomb.png")
    assert "decompression bomb" in _one_line(err) and "bomb.png" in str(err.value)


# ----------------------------------------------------------------------------- writing


def test_read_and_train_see_the_same_pixels(tmp_path: Path) -> None:
    """One reader: a folder dataset (train, evaluate) gets exactly what upscale's reader
    and framing give, for the files where two readers used to differ (16-bit values below
    256, half-transparent pixels, extensions only one of them accepted)."""
    from bpd_sr.io.data import FolderFaces

    Image.fromarray(np.full((40, 40), 200, np.uint16)).save(tmp_path / "a_16bit_dark.png")
    Image.new("RGBA", (36, 36), (10, 20, 30, 77)).save(tmp_path / "b_half_alpha.png")
    Image.fromarray(_noise(218, 178)).save(tmp_path / "c_celeba.png")
    Image.new("L", (33, 33), 90).save(tmp_path / "d_grey.pgm")
    Image.fromarray(_noise(40, 40)).convert("P").save(tmp_path / "e_palette.gif")
    ds = FolderFaces(tmp_path)
    assert [p.name for p in ds.files] == sorted(p.name for p in tmp_path.iterdir())
    for i, path in enumerate(ds.files):
        np.testing.assert_array_equal(ds[i].numpy(), reference_32(read_image(path)), path.name)


def test_write_roundtrip_and_format_from_extension(tmp_path: Path) -> None:
    img = _noise(9, 11)
    write_image_atomic(tmp_path / "out.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "out.png"), img)
    write_image_atomic(tmp_path / "out.jpg", img)
    assert (tmp_path / "out.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG magic
    write_image_atomic(tmp_path / "out.unknownext", img)
    assert (tmp_path / "out.unknownext").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "out.png", "out.unknownext"]


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    write_image_atomic(tmp_path / "o.png", np.zeros((4, 4, 3), np.uint8))
    write_image_atomic(tmp_path / "o.png", np.full((4, 4, 3), 200, np.uint8))
    assert (read_image(tmp_path / "o.png") == 200).all()
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_write_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (e.g. root) who can write to a 0o500 folder")
        with pytest.raises(ImageError) as err:
            write_image_atomic(locked / "x.png", np.zeros((4, 4, 3), np.uint8))
        assert _one_line(err) == f"cannot write {locked / 'x.png'}: Permission denied"
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_write_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        write_image_atomic(tmp_path / "nope" / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert "cannot write" in _one_line(err) and "No such file" in str(err.value)


def test_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails while encoding, after the temporary file exists.
    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError) as err:
        write_image_atomic(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert _one_line(err) == f"cannot write {tmp_path / 'x.png'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_write_failure_at_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    # The target is a non-empty folder: encoding succeeds, os.replace fails.
    (tmp_path / "x.png").mkdir()
    (tmp_path / "x.png" / "keep").write_text("")
    with pytest.raises(ImageError):
        write_image_atomic(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_write_rejects_bad_array(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_image_atomic(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- find_images


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_image_extensions() -> None:
    assert {".png", ".jpg", ".jpeg", ".tif", ".webp", ".pgm"} <= IMAGE_EXTENSIONS


def test_find_images_nested(tmp_path: Path) -> None:
    root = tmp_path / "root"
    a = _touch(root / "a.png")
    b = _touch(root / "b.JPG")
    _touch(root / "notes.txt")
    _touch(root / ".hidden.png")
    c = _touch(root / "sub" / "c.webp")
    d = _touch(root / "sub" / "deeper" / "d.tiff")

    _touch(root / ".git" / "e.png")  # nothing under a hidden folder
    res = find_images([root], recursive=False)
    assert res.files == [a, b] and res.errors == []

    res = find_images([root], recursive=True)
    assert res.files == [a, b, c, d] and res.errors == []
    assert res.relative == [Path("a.png"), Path("b.JPG"), Path("sub/c.webp"),
                            Path("sub/deeper/d.tiff")]


def test_find_images_errors_and_explicit_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    only_sub = tmp_path / "only_sub"
    _touch(only_sub / "inner" / "x.png")
    odd = _touch(tmp_path / "face.dat")  # explicit: kept whatever the extension
    missing = tmp_path / "missing.png"

    res = find_images([empty, odd, missing, only_sub, str(odd)], recursive=False)
    assert res.files == [odd]  # given twice, listed once
    reasons = dict(res.errors)
    assert set(reasons) == {empty, missing, only_sub}
    assert "no image files" in reasons[empty]
    assert "no such file" in reasons[missing]
    assert "recursive" in reasons[only_sub]

    res = find_images([only_sub], recursive=True)
    assert res.files == [only_sub / "inner" / "x.png"] and res.errors == []


def test_find_images_skips_this_tools_own_outputs(tmp_path: Path) -> None:
    """Outputs carry PNG text that says bpd-sr wrote them; a second run leaves them alone,
    given in a folder or directly, whatever they are named."""
    face = tmp_path / "face.png"
    Image.fromarray(_noise(8, 8)).save(face)
    write_image_atomic(tmp_path / "face_x4.png", _noise(32, 32))
    write_image_atomic(tmp_path / "renamed.png", _noise(32, 32))
    res = find_images([tmp_path, tmp_path / "renamed.png"])
    assert res.files == [face]
    assert sorted(p.name for p in res.skipped) == ["face_x4.png", "renamed.png"]
