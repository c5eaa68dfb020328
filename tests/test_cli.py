"""The command line: upscale on good and bad inputs, evaluate, benchmark, export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bpd_sr import ImageTransformer, ModelConfig
from bpd_sr.cli import main
from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_K
from bpd_sr.io.pretrained import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "data" / "examples" / "astronaut.png"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random model whose base and heads mostly agree, as a trained model's do: its
    decoder is left at its nearly flat random start and a Gaussian conditioning net (at its
    start: mu = the input pixel under the target, sigma = 8 levels) decides, so the default
    decode accepts about k tokens a step and the commands run in a fraction of the time
    (``tiny_model``'s sharpened decoder and random heads accept about one)."""
    torch.manual_seed(0)
    model = ImageTransformer(ModelConfig.preset("tiny", k=4, cond_head="gaussian",
                                                cond_scale=4.0)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", model)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def model_and_input(ckpt: Path, src: Path):
    """The model the CLI loads from ckpt and the uint8 (1, 8, 8, 3) input it reads from an
    8x8 src: for comparing what a command wrote with the library's own decode."""
    from bpd_sr import load_pretrained

    return load_pretrained(ckpt), torch.as_tensor(np.array(Image.open(src)))[None]


def face(path: Path, size=(8, 8), mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_help_explains_the_policy():
    res = run("upscale", "--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "centre-cropped" in text and "area-resized to 8x8" in text
    # how to frame a photo, and the training crop for aligned CelebA photos
    assert "top of the hair to just below the chin" in text
    assert "138x138 at row 40, column 20" in text and "178x218" in text


def test_upscale_one_file_with_compare_and_heatmap(tmp_path, tiny_ckpt, write_watcher):
    src = face(tmp_path / "a.png", size=(40, 30))
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "--compare", "--heatmap",
              "--preview-scale", "2")
    assert res.exit_code == 0, res.output
    assert "centre-cropped to 30x30" in res.output  # the notice for a non-8x8 input
    out = Image.open(tmp_path / "a_x4.png")
    assert out.size == (32, 32)  # the result at its true size, whatever the preview scale
    compare = Image.open(tmp_path / "a_x4_compare.png")
    # input | bicubic | bpd-sr at 64x64 and labels (no original: the 30x30 crop is under 32x32)
    assert compare.size[0] > 3 * 64 and compare.size[1] > 64
    assert Image.open(tmp_path / "a_x4_heatmap.png").size[0] > 2 * 64  # face, map, colour bar
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png", "a_x4.png", "a_x4_compare.png", "a_x4_heatmap.png"]
    write_watcher.check(*(tmp_path / n for n in ("a_x4.png", "a_x4_compare.png", "a_x4_heatmap.png")))
    # one legend, and a summary line that lists every file written
    assert res.output.count("tokens/step = mean accepted block") == 1
    line = next(x for x in res.output.splitlines() if x.startswith(f"{src} -> "))
    for name in ("a_x4.png", "a_x4_heatmap.png", "a_x4_compare.png"):
        assert str(tmp_path / name) in line
    assert "tokens/step" in line and "model calls" in line


def test_the_same_upscale_gives_the_same_image_every_time(tmp_path, tiny_ckpt, monkeypatch):
    """The image is a function of the input, the weights and the options: not of the k = auto
    cache (cold, warm or corrupt), the thread count or --heatmap. Every line names the k and
    tolerance that decoded."""
    from bpd_sr import blockwise_parallel_decode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = face(tmp_path / "a.png")
    outputs = []
    for i, extra in enumerate([(), ("--heatmap",)]):
        if i == 1:  # a corrupt k = auto cache file (any content: tests/test_autok.py)
            (tmp_path / "xdg" / "bpd-sr").mkdir(parents=True, exist_ok=True)
            (tmp_path / "xdg" / "bpd-sr" / "autok.json").write_text('{"x": {"k": 99}}')
        res = run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / f"out{i}", *extra)
        assert res.exit_code == 0, res.output
        line = next(x for x in res.output.splitlines() if x.startswith(f"{src} -> "))
        assert f"blockwise k=4 epsilon={DEFAULT_EPSILON}, rule mean" in line  # the tiny model's 4 slots
        outputs.append((tmp_path / f"out{i}" / "a_x4.png").read_bytes())
    assert outputs[0] == outputs[1]
    # threads: the same tokens at 1 and 2 (a prefix: which thread count --threads sets is
    # test_threads_policy_one_thread_unless_told's; two threads per worker here would
    # oversubscribe the machine the suite runs on)
    model, lr = model_and_input(tiny_ckpt, src)
    before = torch.get_num_threads()
    try:
        decodes = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            decodes.append(blockwise_parallel_decode(model, lr, k=4, epsilon=DEFAULT_EPSILON,
                                                     n_tokens=600).images.flatten()[:600])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*decodes)


def test_auto_is_opt_in_and_says_what_it_chose(tmp_path, tiny_ckpt, monkeypatch):
    import bpd_sr.decoding.autok as autok

    def sequential(model, lr, *args, **kwargs):  # auto's choice on a machine where it pays
        return autok.AutoK(k=1, batch=len(lr), seconds_per_step={}, tokens_per_step={},
                           calibration_seconds=0.0)

    monkeypatch.setattr(autok, "choose_k", sequential)
    src = face(tmp_path / "a.png")
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "--k", "auto", "--heatmap")
    assert res.exit_code == 0, res.output
    assert "--k auto chose k=1 (sequential decoding)" in res.output
    line = next(x for x in res.output.splitlines() if x.startswith(f"{src} -> "))
    assert f"blockwise k=1 epsilon={DEFAULT_EPSILON}" in line and "3072 steps" in line  # --heatmap changes nothing


def test_greedy_refuses_options_it_would_ignore(tmp_path, tiny_ckpt):
    src = face(tmp_path / "a.png")
    for extra in (("--k", "4"), ("--epsilon", "9"), ("--epsilon", "2")):
        res = run("upscale", src, "--checkpoint", tiny_ckpt, "--greedy", *extra)
        assert res.exit_code == 2 and "do not apply" in res.output, res.output
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "--greedy")  # the old name still works
    assert res.exit_code == 0 and "sequential, rule mean" in res.output
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "--sequential", "--k", "4")
    assert res.exit_code == 2 and "--sequential decodes one token per step" in res.output


def test_pictures_are_labelled_and_readable(tmp_path, tiny_ckpt):
    """Default pictures: panels enlarged 4x (an 8x8 input as 128x128 blocks of 16x16), text
    under them; the heatmap has a colour bar. Text is dark pixels on the white margin."""
    src = face(tmp_path / "a.png", size=(64, 64))
    assert run("upscale", src, "--checkpoint", tiny_ckpt, "--compare", "--heatmap", "-q").exit_code == 0
    compare = np.asarray(Image.open(tmp_path / "a_x4_compare.png"))
    gap = 128 // 16
    lr_panel = compare[gap : gap + 128, gap : gap + 128]
    assert (lr_panel == np.repeat(np.repeat(lr_panel[::16, ::16], 16, 0), 16, 1)).all()
    under = compare[gap + 128 :, : gap + 128]
    assert (under < 100).any()  # the label "input 8x8"
    heat = np.asarray(Image.open(tmp_path / "a_x4_heatmap.png"))
    right = heat[:, 2 * (128 + gap) + gap :]  # past the face and the map: the colour bar
    assert (np.abs(np.diff(right.astype(int), axis=0)).sum(-1) > 0).any()


def test_outputs_never_overwrite_each_other(tmp_path, tiny_ckpt):
    """Same names in different folders keep their folders under -o; two inputs that would
    still write one file are refused before decoding; nothing is lost."""
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    face(src / "a" / "face.png")
    face(src / "b" / "face.png", size=(9, 9))
    out = tmp_path / "out"
    res = run("upscale", src, "-r", "-o", out, "--checkpoint", tiny_ckpt, "-q")
    assert res.exit_code == 0, res.output
    assert (out / "a" / "face_x4.png").exists() and (out / "b" / "face_x4.png").exists()
    # face.png and face.jpg side by side would both be face_x4.png
    face(src / "a" / "face.jpg")
    res = run("upscale", src / "a", "-o", tmp_path / "out2", "--checkpoint", tiny_ckpt, "-q")
    assert res.exit_code == 1
    assert "face.png" in res.output and "face.jpg" in res.output
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").rglob("*.png"))
    # explicit files from two folders into one -o: refused too
    res = run("upscale", src / "a" / "face.png", src / "b" / "face.png", "-o", tmp_path / "o3",
              "--checkpoint", tiny_ckpt, "-q")
    assert res.exit_code == 1 and "would write" in res.output


def test_a_second_run_skips_this_tools_outputs(tmp_path, tiny_ckpt):
    face(tmp_path / "x.png")
    args = ("upscale", tmp_path, "--checkpoint", tiny_ckpt, "--compare", "--heatmap")
    assert run(*args, "-q").exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert "skipped 3 file(s) that bpd-sr wrote itself" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no x_x4_x4.png


@pytest.mark.parametrize("args,message", [
    (["--epsilon", "-1"], "--epsilon"),
    (["--samples", "2"], "--samples needs --temperature"),
    (["--k", "0"], "--k"),
])
def test_bad_options_are_one_line(tmp_path, tiny_ckpt, args, message):
    src = face(tmp_path / "a.png")
    res = run("upscale", src, "--checkpoint", tiny_ckpt, *args)
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "a_x4.png").exists()


def test_animated_input_says_the_first_frame_is_used(tmp_path, tiny_ckpt):
    frames = [Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    res = run("upscale", tmp_path / "a.gif", "--checkpoint", tiny_ckpt)
    assert res.exit_code == 0, res.output
    assert "3 frames (animated): the first frame is used" in res.output


def test_upscale_folder_to_output_dir_and_greedy(tmp_path, tiny_ckpt):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    face(src / "x.png")
    face(src / "sub" / "y.jpg")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    res = run("upscale", src, "-o", out, "-r", "--checkpoint", tiny_ckpt, "--greedy", "-q")
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "sub/y_x4.png", "x_x4.png"]  # the folder structure is kept
    assert res.output == ""


def test_batch_goes_on_past_bad_files_and_reports_them(tmp_path, tiny_ckpt):
    good = face(tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")
    trunc = tmp_path / "trunc.png"
    data = (tmp_path / "good.png").read_bytes()
    face(tmp_path / "big.png", size=(64, 64))
    trunc.write_bytes((tmp_path / "big.png").read_bytes()[:200])
    res = run("upscale", good, empty, text, trunc, tmp_path / "missing.png",
              "-o", tmp_path / "o", "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1
    assert (tmp_path / "o" / "good_x4.png").exists()
    for name in ("empty.png", "text.png", "trunc.png", "missing.png"):
        assert name in res.output
        assert not (tmp_path / "o" / name.replace(".png", "_x4.png")).exists()
    assert "Traceback" not in res.output
    assert data == (tmp_path / "good.png").read_bytes()  # inputs untouched


def test_decompression_bomb_is_refused(tmp_path, tiny_ckpt, monkeypatch):
    src = face(tmp_path / "bomb.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    res = run("upscale", src, "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1 and "bomb.png" in res.output
    assert not (tmp_path / "bomb_x4.png").exists()


class Pickled:  # an object weights_only loading refuses
    pass


@pytest.mark.parametrize("problem", ["missing", "corrupt", "incompatible", "nan", "inf",
                                     "code", "shapes"])
def test_bad_checkpoint_is_one_sentence(tmp_path, tiny_ckpt, problem):
    src = face(tmp_path / "a.png")
    ckpt = tmp_path / "c.pt"
    good = torch.load(tiny_ckpt, weights_only=True)
    if problem == "corrupt":
        ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    elif problem == "incompatible":
        torch.save({"model_config": {"d_model": 8, "colour": 3}, "model": {}}, ckpt)
    elif problem in ("nan", "inf"):
        good["model"]["out_proj.weight"][0, 0] = float(problem)
        torch.save(good, ckpt)
    elif problem == "code":
        torch.save({**good, "about": Pickled()}, ckpt)
    elif problem == "shapes":
        good["model"]["out_proj.bias"] = torch.zeros(3)
        torch.save(good, ckpt)
    res = run("upscale", src, "--checkpoint", ckpt)
    assert res.exit_code != 0
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    sentence = res.output.strip().removeprefix("Error: ")
    assert sentence[0].isupper() and sentence.endswith("."), sentence
    assert "weights_only" not in res.output  # never PyTorch's advice to run the file's code
    assert not (tmp_path / "a_x4.png").exists()


def test_missing_path_and_empty_folder(tmp_path, tiny_ckpt):
    res = run("upscale", tmp_path / "nope.png", "--checkpoint", tiny_ckpt)
    assert res.exit_code != 0
    assert res.output.strip() == f"Error: {tmp_path / 'nope.png'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    res = run("upscale", tmp_path / "empty", "--checkpoint", tiny_ckpt)
    assert res.exit_code != 0
    assert res.output.strip() == f"Error: {tmp_path / 'empty'}: no image files in this folder"
    assert "Traceback" not in res.output


def test_an_unreadable_image_is_reported_without_the_legend(tmp_path, tiny_ckpt):
    """A file that is not an image fails on its own line; the legend of the result lines is
    printed above the first result only, so a run with none has no legend."""
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = run("upscale", bad, "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1
    assert f"{bad}: cannot read" in res.output and "tokens/step" not in res.output
    assert not (tmp_path / "bad_x4.png").exists()
    good = face(tmp_path / "good.png")
    res = run("upscale", bad, good, "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1 and res.output.count("tokens/step =") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_unwritable_output_folder(tmp_path, tiny_ckpt):
    src = face(tmp_path / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    res = run("upscale", src, "-o", ro, "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1 and "Permission denied" in res.output
    assert list(ro.iterdir()) == []


def test_unwritable_output_path_is_reported(tmp_path, tiny_ckpt):
    """An output folder that cannot be created (a file is in the way): one line, no output."""
    src = face(tmp_path / "a.png")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    res = run("upscale", src, "-o", blocker / "out", "--checkpoint", tiny_ckpt)
    assert res.exit_code != 0 and "cannot write into output folder" in res.output
    assert "Traceback" not in res.output


def test_never_overwrites_the_input(tmp_path, tiny_ckpt):
    src = face(tmp_path / "a.png")
    before = src.read_bytes()
    res = run("upscale", src, "--suffix", "", "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1
    assert src.read_bytes() == before


def test_default_weights_upscale_the_example_face(tmp_path):
    """The README's first command: the shipped weights, the public-domain example face.
    The result must be about as close to the original as bicubic upscaling of the same
    8x8 input (noise, a flat image or an unconditioned face would be several dB worse)
    and come back to the input when averaged down again."""
    from bpd_sr.evaluation.metrics import psnr, upscale_bicubic
    from bpd_sr.io.imageio import read_image, reference_32, to_model_input

    res = run("upscale", EXAMPLE, "-o", tmp_path, "--compare", "--k", "4")
    assert res.exit_code == 0, res.output
    out = np.asarray(Image.open(tmp_path / "astronaut_x4.png"))
    assert out.shape == (32, 32, 3)
    img = read_image(EXAMPLE)
    lr, ref = to_model_input(img)[0], reference_32(img)
    assert psnr(out, ref) > psnr(upscale_bicubic(lr), ref) - 1.0
    back = out.reshape(8, 4, 8, 4, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(back - lr).mean() < 1  # back-projected (noise or a flat image: about 47)


def test_upscale_rule_reaches_the_decode(tmp_path, tiny_ckpt):
    """Each --rule writes exactly the library's decode under that rule, at the defaults,
    back-projected onto its input; --no-back-projection writes the decode itself."""
    from bpd_sr import back_project, blockwise_parallel_decode

    src = face(tmp_path / "f.png")
    model, lr = model_and_input(tiny_ckpt, src)
    outs = {}
    for rule in ("argmax", "mean"):
        res = run("upscale", src, "-o", tmp_path / rule, "--rule", rule, "--checkpoint", tiny_ckpt)
        assert res.exit_code == 0, res.output
        outs[rule] = np.asarray(Image.open(tmp_path / rule / "f_x4.png"))
        decoded = blockwise_parallel_decode(model, lr, k=min(DEFAULT_K, model.cfg.k),
                                            epsilon=DEFAULT_EPSILON, rule=rule).images
        assert np.array_equal(outs[rule], back_project(decoded, lr)[0].numpy()), rule
    assert not np.array_equal(outs["argmax"], outs["mean"])
    res = run("upscale", src, "-o", tmp_path / "raw", "--no-back-projection", "--checkpoint",
              tiny_ckpt)
    assert res.exit_code == 0 and "back-projected" not in res.output, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "raw" / "f_x4.png")),
                          decoded[0].numpy())  # the mean rule's decode, as made
    res = run("upscale", src, "--rule", "mode", "--checkpoint", tiny_ckpt)
    assert res.exit_code == 2 and "mode" in res.output


def test_evaluate_writes_json(tmp_path, tiny_ckpt, write_watcher):
    rng = np.random.default_rng(0)
    npz = tmp_path / "faces.npz"
    np.savez(npz, images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    res = run("evaluate", npz, "--k", "2", "--epsilon", "0,2", "--rule", "argmax,mean",
              "--checkpoint", tiny_ckpt, "--json", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    write_watcher.check(tmp_path / "e.json")
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    names = [r["method"] for r in rows]
    assert names == ["bicubic", "lanczos", "cond net (mean)", "cond net (mu)",
                     "sequential (argmax)", "k=2 eps=0 (argmax)", "k=2 eps=2 (argmax)",
                     "sequential (mean)", "k=2 eps=0 (mean)", "k=2 eps=2 (mean)"]
    rows = rows[:3] + rows[4:]  # the Gaussian net's mu row: tests/test_condfit.py
    assert [r.get("rule") for r in rows[3:]] == ["argmax"] * 3 + ["mean"] * 3
    for seq, exact in ((rows[3], rows[4]), (rows[6], rows[7])):
        assert exact["psnr"] == pytest.approx(seq["psnr"])  # exact acceptance == sequential
        assert exact["identical_images_to_sequential"] == 1.0
        assert exact["psnr_minus_sequential"] == pytest.approx(0.0)
        assert 1.0 <= exact["mean_accepted"] <= 2.0
    assert rows[3]["psnr_per_image"] != rows[6]["psnr_per_image"]  # the rules decode differently
    # collapse, measured per image against bicubic upscaling of the same input
    assert rows[0]["share_below_bicubic"] == 0.0
    for r in rows:
        assert len(r["psnr_per_image"]) == 3
        assert r["psnr_min"] == pytest.approx(min(r["psnr_per_image"]), abs=1e-3)
    bic = rows[0]["psnr_per_image"]
    below = np.mean([g < b for g, b in zip(rows[3]["psnr_per_image"], bic, strict=True)])
    assert rows[3]["share_below_bicubic"] == pytest.approx(below)
    res = run("evaluate", npz, "--rule", "mode", "--checkpoint", tiny_ckpt, "-q")
    assert res.exit_code != 0 and "unknown decoding rule 'mode'" in res.output


def test_evaluate_measures_every_row_on_the_looser_framing_too(tmp_path, tiny_ckpt):
    rng = np.random.default_rng(0)
    npz, loose = tmp_path / "faces.npz", tmp_path / "loose.npz"
    np.savez(npz, images=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    np.savez(loose, images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    res = run("evaluate", npz, "--k", "2", "--epsilon", "0", "--loose", loose,
              "--checkpoint", tiny_ckpt, "--json", tmp_path / "e.json", "-q")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["n_images"] == 2 and out["looser_framing"]["n_images"] == 3
    assert ([r["method"] for r in out["rows"]]
            == [r["method"] for r in out["looser_framing"]["rows"]])
    assert "cond net (mean)" in [r["method"] for r in out["looser_framing"]["rows"]]
    assert f"3 faces from {loose}" in res.output
    # a missing second set is refused before any decoding
    res = run("evaluate", npz, "--loose", tmp_path / "nope.npz", "--checkpoint", tiny_ckpt, "-q")
    assert res.exit_code != 0 and "decoding" not in res.output


def test_benchmark_writes_json_table_and_plot(tmp_path, tiny_ckpt, write_watcher):
    rng = np.random.default_rng(0)
    npz = tmp_path / "faces.npz"
    np.savez(npz, images=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    # one (k, epsilon) that is no default of any table: each table must follow the options
    res = run("benchmark", "--data", npz, "--limit", "1", "--k", "3", "--epsilon", "2",
              "--batch-sizes", "2", "--temperatures", "0.9", "--sampling-k", "2",
              "--step-repeats", "5", "--checkpoint", tiny_ckpt, "--out", tmp_path / "b", "-q")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert [(r["k"], r["epsilon"]) for r in result["table"]["rows"]] == [(1, 0), (3, 2)]
    assert set(result["step_costs"]) == {"1", "2", "3", "4"}  # every k the model has
    assert result["table"]["rows"][0]["speedup"] == pytest.approx(1.0)
    assert {r["batch_size"] for r in result["throughput"]} == {2}
    # the throughput rows follow --k and --epsilon (they used to be fixed at k = 4, 8, 10)
    assert {(r["k"], r["epsilon"]) for r in result["throughput"]} == {(1, 0), (3, 2)}
    assert "| 3 |" in (tmp_path / "b" / "table.md").read_text()
    assert [(r["temperature"], r["k"]) for r in result["sampling"]] == [(0.9, 1), (0.9, 2)]
    assert (tmp_path / "b" / "plots.png").stat().st_size > 1000
    write_watcher.check(tmp_path / "b")  # benchmark.json, table.md, plots.png


def test_benchmark_needs_data_and_says_only_what_it_wrote(tmp_path, tiny_ckpt):
    res = run("benchmark", "--checkpoint", tiny_ckpt, "--out", tmp_path / "b")
    assert res.exit_code == 2 and "Missing option '--data'" in res.output
    npz = tmp_path / "faces.npz"
    np.savez(npz, images=np.zeros((1, 32, 32, 3), np.uint8))
    args = ("benchmark", "--data", npz, "--limit", "1", "--k", "2", "--epsilon", "0",
            "--batch-sizes", "1", "--temperatures", "", "--no-step-costs",
            "--checkpoint", tiny_ckpt)
    res = run(*args, "--out", tmp_path / "c", "--no-plots")
    assert res.exit_code == 0, res.output
    assert "plots.png" not in res.output and not (tmp_path / "c" / "plots.png").exists()
    assert f"wrote {tmp_path / 'c' / 'benchmark.json'}, {tmp_path / 'c' / 'table.md'}" in res.output


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_export_makes_a_small_loadable_copy(tmp_path, tiny_ckpt, dtype, write_watcher):
    res = run("export", tiny_ckpt, tmp_path / "small.pt", *(["--dtype", dtype] if dtype else []))
    assert res.exit_code == 0, res.output
    write_watcher.check(tmp_path / "small.pt")
    from bpd_sr.io.pretrained import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(tmp_path / "small.pt")
    want = torch.float16 if dtype == "fp16" else torch.bfloat16  # bf16 by default
    assert {t.dtype for t in ck["model"].values() if t.is_floating_point()} == {want}
    model = model_from_checkpoint(tmp_path / "small.pt")
    assert model.cfg.k == 4
    # the copy decodes like the original, to its precision
    original = model_from_checkpoint(tiny_ckpt)
    for name, t in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name].float(), t.float(), rtol=1e-2, atol=1e-2)


def test_export_sets_the_mixture_and_mirror_average_and_keeps_what_it_came_from(tmp_path, tiny_ckpt):
    # how the shipped weights are assembled: the net's weight in the mixture scaled, the
    # mirror average on, a note; the weights themselves are the source's (to bf16)
    from bpd_sr.io.pretrained import load_checkpoint, model_from_checkpoint

    src = tmp_path / "src.pt"
    save_checkpoint(src, model_from_checkpoint(tiny_ckpt), extra={"about": {"averaged": ["a", "b"]}})
    res = run("export", src, tmp_path / "x.pt", "--dtype", "fp32", "--cond-scale-factor", "2.5",
              "--flip-average", "--note", "the test weights")
    assert res.exit_code == 0, res.output
    model = model_from_checkpoint(tmp_path / "x.pt")
    assert model.cfg.cond_scales == (10.0, 10.0, 10.0)  # 4.0 x 2.5
    assert model.cfg.cond_flip_average and model.cond.flip_average
    about = load_checkpoint(tmp_path / "x.pt")["about"]
    assert about["note"] == "the test weights" and about["averaged"] == ["a", "b"]
    assert about["exported"] == {"from": str(src), "cond_scale_factor": 2.5, "flip_average": True}
    original = model_from_checkpoint(tiny_ckpt)
    for name, t in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    # and back: the factor's inverse and the mirror average off give the source's config
    res = run("export", tmp_path / "x.pt", tmp_path / "y.pt", "--dtype", "fp32",
              "--cond-scale-factor", "0.4", "--no-flip-average")
    assert res.exit_code == 0, res.output
    back = model_from_checkpoint(tmp_path / "y.pt")
    assert back.cfg.cond_scales == pytest.approx(original.cfg.cond_scales)
    assert not back.cfg.cond_flip_average and not back.cond.flip_average


@pytest.mark.parametrize("args, message", [
    (["--cond-scale-factor", "0"], "Invalid value for '--cond-scale-factor'"),
    (["--flip-average"], "has no conditioning net"),
    (["--cond-scale-factor", "2"], "has no conditioning net"),
])
def test_export_refuses_a_mixture_it_cannot_set_in_one_line(tmp_path, args, message):
    torch.manual_seed(0)
    plain = save_checkpoint(tmp_path / "plain.pt",
                            ImageTransformer(ModelConfig.preset("tiny", k=4, cond_channels=0)))
    res = run("export", plain, tmp_path / "x.pt", *args)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.pt").exists()


def test_average_writes_the_mean_of_the_weights(tmp_path, tiny_ckpt, write_watcher):
    from bpd_sr.io.pretrained import load_checkpoint, model_from_checkpoint, save_checkpoint

    first = model_from_checkpoint(tiny_ckpt)
    second = model_from_checkpoint(tiny_ckpt)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p))
    other = save_checkpoint(tmp_path / "other.pt", second)
    res = run("average", tiny_ckpt, other, "--out", tmp_path / "soup.pt")
    assert res.exit_code == 0, res.output
    write_watcher.check(tmp_path / "soup.pt")
    soup = model_from_checkpoint(tmp_path / "soup.pt")
    assert soup.cfg == first.cfg
    a, b = first.state_dict(), second.state_dict()
    for name, t in soup.state_dict().items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2)
    assert load_checkpoint(tmp_path / "soup.pt")["about"]["averaged"] == [str(tiny_ckpt),
                                                                          str(other)]


def test_average_refuses_nets_of_other_shapes_and_a_single_checkpoint(tmp_path, tiny_ckpt):
    from bpd_sr.io.pretrained import save_checkpoint

    wider = save_checkpoint(tmp_path / "wider.pt", ImageTransformer(
        ModelConfig.preset("tiny", k=4, cond_channels=8)))
    for args, message in [((tiny_ckpt, wider), "another configuration"),
                          ((tiny_ckpt,), "two checkpoints or more")]:
        res = run("average", *args, "--out", tmp_path / "soup.pt")
        assert res.exit_code != 0 and message in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "soup.pt").exists()


def test_upscale_samples_at_a_temperature(tmp_path, tiny_ckpt):
    """--samples N writes N exact samples, sample i seeded by (--seed, i): exactly the
    library's sampler with those generators (so the same on every run, other for another
    seed), back-projected like every output."""
    from bpd_sr import back_project, blockwise_parallel_decode

    src = face(tmp_path / "a.png")
    model, lr = model_and_input(tiny_ckpt, src)
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "--temperature", "0.9", "--samples", "2",
              "--seed", "3", "--compare", "-q", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    samples = [np.asarray(Image.open(tmp_path / "o" / f"a_x4_s{i}.png")) for i in range(2)]
    for i, got in enumerate(samples):
        generator = torch.Generator().manual_seed(3 * 1000 + i)
        expect = blockwise_parallel_decode(model, lr, k=min(DEFAULT_K, model.cfg.k),
                                           temperature=0.9, generator=generator)
        assert np.array_equal(got, back_project(expect.images, lr)[0].numpy()), i
    assert not np.array_equal(*samples)  # two different samples
    strip = Image.open(tmp_path / "o" / "a_x4_compare.png")
    assert strip.size[0] > 3 * strip.size[1]  # input | bicubic | sample 0 | sample 1


class _Stop(Exception):
    pass


def _every_decoding_command_passes_threads_on(tmp_path, tiny_ckpt, monkeypatch):
    """--threads N reaches the thread policy of each command (which then stops it)."""
    import bpd_sr.threads

    asked = []

    def record(threads=None):
        asked.append(threads)
        raise _Stop

    with monkeypatch.context() as only_here:  # undoes this stub alone, not the caller's
        only_here.setattr(bpd_sr.threads, "apply", record)
        npz = tmp_path / "threads_faces.npz"
        np.savez(npz, images=np.zeros((2, 32, 32, 3), dtype=np.uint8))
        commands = {"upscale": [face(tmp_path / "t.png")], "evaluate": [npz],
                    "benchmark": ["--data", npz, "--out", tmp_path / "tb"],
                    "fit-heads": ["--data", npz, "--init", tiny_ckpt, "--out", tmp_path / "th"]}
        for command, args in commands.items():
            extra = [] if command == "fit-heads" else ["--checkpoint", tiny_ckpt]
            res = run(command, *args, *extra, "--threads", "3", "-q" if command != "fit-heads" else "--quiet")
            assert isinstance(res.exception, _Stop), (command, res.output)
            assert asked[-1] == 3, command


def test_threads_policy_one_thread_unless_told(tmp_path, tiny_ckpt, monkeypatch):
    """Every decoding command takes --threads; without it, $BPD_SR_THREADS, else 1."""
    from bpd_sr import load_pretrained

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("BPD_SR_THREADS", raising=False)
        torch.set_num_threads(2)
        load_pretrained(tiny_ckpt)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("BPD_SR_THREADS", "2")
        load_pretrained(tiny_ckpt)
        assert torch.get_num_threads() == 2
        load_pretrained(tiny_ckpt, threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        load_pretrained(tiny_ckpt, threads=0)  # 0: leave PyTorch's setting
        assert torch.get_num_threads() == 2
        _every_decoding_command_passes_threads_on(tmp_path, tiny_ckpt, monkeypatch)
        seen = []

        def fake_decode(model, lr, settings, sample=0):  # records the threads, decodes nothing
            from bpd_sr.decoding.loop import DecodeResult

            seen.append(torch.get_num_threads())
            return DecodeResult(torch.zeros(1, 32, 32, 3, dtype=torch.uint8),
                                [torch.tensor([3072])], torch.zeros(1, 32, 32, 3, dtype=torch.long),
                                1, 0.0)

        monkeypatch.setattr("bpd_sr.upscale.decode", fake_decode)
        face_path = face(tmp_path / "f.png")
        for flag, expect in ((["--threads", "2"], 2), ([], 1)):
            monkeypatch.delenv("BPD_SR_THREADS", raising=False)
            res = run("upscale", face_path, "--checkpoint", tiny_ckpt, "-o", tmp_path / str(expect),
                      *flag, "-q")
            assert res.exit_code == 0, res.output
            assert seen[-1] == expect
    finally:
        torch.set_num_threads(before)


def test_upscale_k_auto_is_the_default(tmp_path, tiny_ckpt):
    face_path = face(tmp_path / "f.png")
    assert "auto" in run("upscale", "--help").output
    res = run("upscale", face_path, "--checkpoint", tiny_ckpt, "--epsilon", "0")
    assert res.exit_code == 0, res.output
    bad = run("upscale", face_path, "--checkpoint", tiny_ckpt, "--k", "fast")
    assert bad.exit_code == 2 and "auto" in bad.output


@pytest.mark.slow
def test_compile_compiles_the_k_it_decodes_with_and_keeps_the_terminal_clean(tmp_path, tiny_ckpt):
    import subprocess

    src = face(tmp_path / "a.png")
    res = subprocess.run([sys.executable, "-m", "bpd_sr", "upscale", str(src), "--checkpoint",
                          str(tiny_ckpt), "--compile"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "compiled the decoder step (k=4)" in res.stdout
    assert "blockwise k=4 epsilon=" in res.stdout
    assert "AUTOTUNE" not in res.stderr and "AUTOTUNE" not in res.stdout


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_ckpt):
    """Paths for the table of bad command lines: faces, an empty npz, a text file named npz,
    a plain file to put paths under, an existing folder, a named pipe."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    np.savez(d / "faces.npz", images=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    np.savez(d / "empty.npz", images=np.zeros((0, 32, 32, 3), dtype=np.uint8))
    (d / "text.npz").write_text("just text\n")
    (d / "afile").write_text("x")
    (d / "folder").mkdir()
    os.mkfifo(d / "pipe.png")
    face(d / "face.png")
    return {"d": d, "ckpt": tiny_ckpt, "npz": d / "faces.npz"}


def _bad_command_lines(p):
    d, ck, npz = p["d"], p["ckpt"], p["npz"]
    up = ["upscale", d / "face.png", "--checkpoint", ck]
    ev = ["evaluate", npz, "--checkpoint", ck, "--k", "2", "-q"]
    bm = ["benchmark", "--data", npz, "--checkpoint", ck, "--no-step-costs", "-q", "--out", d / "bm"]
    return {
        "suffix escapes -o": [*up, "--suffix", "/../../ESCAPED", "-o", d / "o1"],
        "temperature nan": [*up, "--temperature", "nan", "--samples", "2"],
        "seed overflow": [*up, "--temperature", "0.9", "--seed", "99999999999999999"],
        "greedy with k": [*up, "--greedy", "--k", "4"],
        "output under a file": [*up, "-o", d / "afile" / "sub"],
        "k 0": [*up, "--k", "0"],
        "k too large": [*up, "--k", "9"],
        "threads env abc": ([*up, "-o", d / "o2"], {"BPD_SR_THREADS": "abc"}),
        "threads env negative": ([*up, "-o", d / "o3"], {"BPD_SR_THREADS": "-3"}),
        "evaluate json is a folder": [*ev, "--json", d / "folder"],
        "evaluate json under a file": [*ev, "--json", d / "afile" / "x.json"],
        "evaluate empty npz": ["evaluate", d / "empty.npz", "--checkpoint", ck],
        "evaluate text npz": ["evaluate", d / "text.npz", "--checkpoint", ck],
        "evaluate limit 0": [*ev, "--limit", "0"],
        "evaluate limit -1": [*ev, "--limit", "-1"],
        "evaluate batch 0": [*ev, "--batch-size", "0"],
        "evaluate k 0": [*ev, "--k", "0"],
        "evaluate k 99": [*ev, "--k", "99"],
        "evaluate epsilon -1": [*ev, "--epsilon", "-1"],
        "evaluate temperature abc": [*ev, "--temperature", "abc"],
        "evaluate temperature -1": [*ev, "--temperature", "-1"],
        "benchmark temperatures abc": [*bm, "--temperatures", "abc"],
        "benchmark out under a file": [*bm[:-1], d / "afile" / "sub"],
        "benchmark empty npz": ["benchmark", "--data", d / "empty.npz", "--checkpoint", ck,
                                "--out", d / "bm2"],
        "benchmark limit 0": [*bm, "--limit", "0"],
        "benchmark speed batch 0": [*bm, "--speed", "--batch-sizes", "0"],
        "benchmark speed empty npz": ["benchmark", "--data", d / "empty.npz", "--speed",
                                      "--checkpoint", ck, "--out", d / "bm3"],
        "export into a folder": ["export", ck, d / "folder"],
        "train resume nothing": ["train", "--data", npz, "--resume", "--out", d / "none"],
        "train init and preset": ["train", "--data", npz, "--regime", "finetune", "--k", "2",
                                  "--init", ck, "--preset", "small", "--out", d / "t"],
    }


BAD = ["suffix escapes -o", "temperature nan", "seed overflow", "greedy with k",
       "output under a file", "k 0", "k too large", "threads env abc", "threads env negative",
       "evaluate json is a folder", "evaluate json under a file", "evaluate empty npz",
       "evaluate text npz", "evaluate limit 0", "evaluate limit -1", "evaluate batch 0",
       "evaluate k 0", "evaluate k 99", "evaluate epsilon -1", "evaluate temperature abc",
       "evaluate temperature -1", "benchmark temperatures abc", "benchmark out under a file",
       "benchmark empty npz", "benchmark limit 0", "benchmark speed batch 0",
       "benchmark speed empty npz", "export into a folder", "train resume nothing",
       "train init and preset"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_command_line_is_one_line_and_no_work(bad_inputs, case):
    """Every command, a bad option or path: a non-zero exit and a one-line error, never a
    traceback, and no decoding or training first (each of these ends in well under 10 s)."""
    import time

    line = _bad_command_lines(bad_inputs)[case]
    args, env = line if isinstance(line, tuple) else (line, {})
    t0 = time.monotonic()
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    errors = [x for x in res.output.splitlines() if "rror" in x]
    assert errors, res.output
    assert time.monotonic() - t0 < 10
    assert not (bad_inputs["d"] / "ESCAPED.png").exists()


def test_an_output_named_like_an_image_file_is_refused_unless_it_is_a_folder(tmp_path, tiny_ckpt):
    # -o face_x4.png would otherwise make a folder face_x4.png holding face_x4.png
    src = face(tmp_path / "face.png")
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / "face_x4.PNG")
    assert res.exit_code == 2 and "names an image file, but --output is the folder" in res.output
    assert not (tmp_path / "face_x4.PNG").exists()
    (tmp_path / "old.jpg").mkdir()  # a folder so named is still a folder
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / "old.jpg")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "old.jpg" / "face_x4.png").is_file()


def test_a_named_pipe_is_refused_without_hanging(bad_inputs):
    d = bad_inputs["d"]
    res = CliRunner().invoke(main, ["upscale", str(d / "pipe.png"), "--checkpoint",
                                    str(bad_inputs["ckpt"])])
    assert res.exit_code != 0 and "not a regular file" in res.output


def test_a_users_own_file_is_never_overwritten(tmp_path, tiny_ckpt):
    src = face(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "a_x4.png"
    Image.new("RGB", (5, 5)).save(mine)  # the user's, untagged
    before = mine.read_bytes()
    res = run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / "out")
    assert res.exit_code == 1 and "which bpd-sr did not write" in res.output
    assert mine.read_bytes() == before
    mine.unlink()
    assert run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / "out").exit_code == 0
    # its own output is replaced by a second run
    assert run("upscale", src, "--checkpoint", tiny_ckpt, "-o", tmp_path / "out").exit_code == 0


def test_help_names_every_option():
    for command in ("upscale", "evaluate", "benchmark", "train", "export"):
        text = run(command, "--help").output
        assert "_K_CHOICE" not in text
        options = [ln for ln in text.splitlines() if ln.strip().startswith("-")]
        bare = [ln for ln in options if len(ln.split("  ")) < 2 and "--help" not in ln]
        assert not bare, (command, bare)


def test_too_many_threads_warn_and_a_huge_image_is_one_line(tmp_path, tiny_ckpt, monkeypatch):
    res = run("upscale", tmp_path / "missing.png", "--threads", "1000")
    assert "warning: 1000 threads on" in res.output
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is then over the warning level
    src = face(tmp_path / "big.png", size=(40, 40))
    res = run("upscale", src, "--checkpoint", tiny_ckpt)
    assert res.exit_code == 1 and "decompression bomb" in res.output
    assert "DecompressionBombWarning" not in res.output
