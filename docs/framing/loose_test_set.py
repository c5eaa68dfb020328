"""The looser-framing test set: each 64x64 test face reflection-padded to 96x96 and
area-resized to 32x32, so that the face fills two thirds of
the square instead of all of it. Written as an npz that every command reads (never commit it:
CelebA's licence).

usage: python docs/framing/loose_test_set.py TEST_64.npz OUT.npz
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from bpd_sr.io.data import write_npz_atomic
from bpd_sr.io.framing import area_resize


def looser_framing(faces_64: torch.Tensor, pad: int = 16) -> torch.Tensor:
    """uint8 (N, 64, 64, 3) -> uint8 (N, 32, 32, 3): reflection-padded by ``pad`` on every
    side (64 -> 96), then area-resized (the papers' resize, as the training faces were)."""
    wide = TF.pad(faces_64.permute(0, 3, 1, 2), [pad] * 4, padding_mode="reflect")
    return torch.from_numpy(np.stack([area_resize(f, 32) for f in wide.permute(0, 2, 3, 1).numpy()]))


src, dst = sys.argv[1], sys.argv[2]
faces = torch.as_tensor(np.load(src)["images"])
write_npz_atomic(Path(dst), images=looser_framing(faces).numpy())
print(f"{dst}: {len(faces)} faces, framed looser (64 -> 96 by reflection -> 32)")
