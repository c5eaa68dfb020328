"""Keep what PyTorch's C++ side prints off the user's terminal.

The profiler prints start/stop lines and, on a machine without a GPU, 'gpuGetDeviceCount
failed'; Inductor's autotuning prints a table per matrix product it times. They go to file
descriptor 2 directly, past Python's sys.stderr, so only redirecting the descriptor keeps
them out of a one-line-per-result command line.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def quiet_stderr():
    """File descriptor 2 goes to /dev/null inside the block (Python's own errors still
    raise: only what is printed is lost)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
