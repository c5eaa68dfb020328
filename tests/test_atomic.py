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


def test_the_write_watcher_catches_a_write_in_place(tmp_path, write_watcher):
    """The watcher the command tests use (tests/conftest.py) tells the two apart: a file
    written through write_atomic passes, one written in place (even via numpy) fails."""
    import numpy as np

    write_atomic(tmp_path / "good.bin", lambda f: f.write(b"x"))
    write_watcher.check(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(AssertionError, match="bad.npy"):
        write_watcher.check(tmp_path)
    with pytest.raises(AssertionError, match="bad.npy"):
        write_watcher.check(tmp_path / "bad.npy")
