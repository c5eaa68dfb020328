"""Atomic file writes: the one way every file bpd-sr writes reaches the disk.

The data goes to a hidden temporary file in the same folder (so the rename never crosses
file systems, and a folder scan running at the same time skips it), is flushed to the disk,
then ``os.replace`` renames it over the target: a crash, a full disk or Ctrl-C leaves the
old file or the new one, never half of one, and no temporary file behind.

Permissions: like any new file (0o666 minus the umask), whatever is written. A temporary
file from ``tempfile.mkstemp`` would be owner-only, and outputs, checkpoints and benchmark
results are meant to be shared.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file object, then put the result at ``path`` atomically.

    Raises what ``write`` or the file system raises (OSError for an unwritable folder),
    after removing the temporary file; callers turn that into their own one-line errors.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # including KeyboardInterrupt: never leave the temporary file
        tmp.unlink(missing_ok=True)
        raise
    return path
