"""One thread policy for the command line and the Python API.

Decoding runs many small matrix products one step after another; more threads than one only
add synchronisation to each of them, and processes that together ask for more threads than
there are cores slow down many times over (README, Speed). So bpd-sr uses **one thread**
unless told otherwise:

- ``threads`` given (``--threads N`` on every command that decodes, ``load_pretrained(...,
  threads=N)``): N threads;
- otherwise the environment variable ``BPD_SR_THREADS``, if set;
- otherwise 1.

``threads=0`` (or ``BPD_SR_THREADS=0``) leaves PyTorch's own setting alone.
"""

from __future__ import annotations

import os

import torch

ENV = "BPD_SR_THREADS"
DEFAULT = 1


def resolve(threads: int | None = None) -> int:
    """The number of threads the policy asks for (0: leave PyTorch's setting)."""
    if threads is None:
        text = os.environ.get(ENV, "").strip()
        try:
            threads = int(text) if text else DEFAULT
        except ValueError:
            raise ValueError(f"{ENV} must be a whole number, got {text!r}") from None
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    return threads


def apply(threads: int | None = None) -> int:
    """Set PyTorch's intra-op threads by the policy; returns the number in use."""
    n = resolve(threads)
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
