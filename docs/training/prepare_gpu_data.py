"""The training faces a lent GPU gets: the aligned-crop part of train_32.npz (sources
celeba_align_full and celeba_align_half; the tighter celeba_facecrop faces are framed
otherwise), compressed, for the carried .gpu/ folder (the device's copy of the working tree
must stay under 64 MiB). No test faces go to the device: its weights are evaluated on the CPU.

usage: python docs/training/prepare_gpu_data.py TRAIN_32.npz .gpu/train.npz
"""

import sys
from pathlib import Path

import numpy as np

src, dst = sys.argv[1], Path(sys.argv[2])
with np.load(src) as f:
    keep = np.isin(f["source"], ["celeba_align_full", "celeba_align_half"])
    images = f["images"][keep]
dst.parent.mkdir(parents=True, exist_ok=True)
tmp = dst.with_name(dst.name + ".tmp.npz")
np.savez_compressed(tmp, images=images)
tmp.replace(dst)
print(f"{dst}: {len(images)} aligned-crop faces, {dst.stat().st_size / 2**20:.1f} MiB")
