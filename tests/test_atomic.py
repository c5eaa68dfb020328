"""bpd_sr.io.atomic: the one atomic writer, tested once for every file bpd-sr writes."""

from __future__ import annotations

import os
import stat

import pytest

from bpd_sr.io.atomic import write_atomic


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "x.bin"
    write_atomic(target, lambda f: f.write(b"first"))
    write_atomic(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_are_those_of_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_atomic(tmp_path / "x.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "nope" / "x.bin", lambda f: f.write(b"x"))


def test_every_command_writes_its_files_atomically(tmp_path, monkeypatch):
    """Run the commands that write files with the file system watched: every file they leave
    must have arrived by os.replace of a hidden temporary file, and no visible path may have
    been opened for writing directly (PIL, torch.save, numpy, matplotlib and json all write
    through builtins.open or os.open)."""
    import builtins

    import numpy as np
    import torch
    from click.testing import CliRunner
    from PIL import Image

    from bpd_sr.cli import main
    from bpd_sr.io.pretrained import save_checkpoint
    from tests.conftest import tiny_model

    ckpt = save_checkpoint(tmp_path / "tiny.pt", tiny_model(k=2, dtype=torch.float32))
    npz = tmp_path / "faces.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(tmp_path / "f.png")
    out = tmp_path / "out"
    out.mkdir()
    direct, replaced = [], []
    real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

    def watch(path):  # a visible file (a folder is opened only to probe that it is writable)
        if isinstance(path, (str, os.PathLike)) and str(path).startswith(str(out)):
            if not (os.path.basename(path).startswith(".") or os.path.isdir(path)):
                direct.append(str(path))

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            watch(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            watch(path)
        return real_os_open(path, flags, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        replaced.append(str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", replace)
    commands = [
        ["upscale", tmp_path / "f.png", "-o", out / "up", "--compare", "--heatmap", "--checkpoint", ckpt],
        ["export", ckpt, out / "small.pt"],
        ["evaluate", npz, "--k", "2", "--epsilon", "0", "--json", out / "eval.json", "--checkpoint", ckpt],
        ["benchmark", "--data", npz, "--limit", "1", "--k", "2", "--epsilon", "0", "--batch-sizes", "1",
         "--temperatures", "", "--no-step-costs", "--checkpoint", ckpt, "--out", out / "bench"],
    ]
    for args in commands:
        res = CliRunner().invoke(main, [str(a) for a in args + ["-q"] * (args[0] != "export")])
        assert res.exit_code == 0, (args[0], res.output)
    monkeypatch.undo()
    left = sorted(str(p) for p in out.rglob("*") if p.is_file())
    assert len(left) >= 8  # 3 pictures, a checkpoint, 1 json, benchmark.json, table.md, plots.png
    assert not direct, f"opened for writing directly: {direct}"
    assert set(left) <= set(replaced), f"not written by os.replace: {set(left) - set(replaced)}"
