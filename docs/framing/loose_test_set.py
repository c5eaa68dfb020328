"""The looser-framing test set: each 64x64 test face reflection-padded to 96x96 and
area-resized to 32x32 (bpd_sr.augment.looser_framing), so that the face fills two thirds of
the square instead of all of it. Written as an npz that every command reads (never commit it:
CelebA's licence).

usage: python docs/framing/loose_test_set.py TEST_64.npz OUT.npz
"""

import sys
from pathlib import Path

import numpy as np
import torch

from bpd_sr.augment import looser_framing
from bpd_sr.data import write_npz_atomic

src, dst = sys.argv[1], sys.argv[2]
faces = torch.as_tensor(np.load(src)["images"])
write_npz_atomic(Path(dst), images=looser_framing(faces).numpy())
print(f"{dst}: {len(faces)} faces, framed looser (64 -> 96 by reflection -> 32)")
