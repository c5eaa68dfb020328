"""The ``bpd-sr`` command: a thin click layer over the library. User errors are one line
on stderr and a non-zero exit code, never a traceback.

One module per group of commands; ``common`` holds the group and the shared checks."""

from bpd_sr.cli import data, evaluate, train, upscale  # noqa: F401  (they register their commands)
from bpd_sr.cli.common import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
