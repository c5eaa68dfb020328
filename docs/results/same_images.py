"""The same images from two checkouts of bpd-sr: the default decode (k = DEFAULT_K, epsilon
= DEFAULT_EPSILON, rule mean) of the first N test faces, each at batch 1, one thread, with
each checkout's own shipped weights. Used to check that a refactor changed no output.

usage: python docs/results/same_images.py TEST_32.npz N CHECKOUT_A CHECKOUT_B OUT.json
(each checkout is decoded in a fresh process that imports bpd_sr from it)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DECODE = """
import sys, numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import bpd_sr
assert bpd_sr.__file__.startswith(sys.argv[1]), bpd_sr.__file__
from bpd_sr import DEFAULT_EPSILON, DEFAULT_K, blockwise_parallel_decode, load_pretrained
hr = torch.as_tensor(np.load(sys.argv[2])["images"][: int(sys.argv[3])])
lr = hr.reshape(-1, 8, 4, 8, 4, 3).float().mean((2, 4)).round().to(torch.uint8)
model = load_pretrained(sys.argv[1] + "/bpd_sr/weights/default.pt")
images = [blockwise_parallel_decode(model, lr[i : i + 1], k=DEFAULT_K,
                                    epsilon=DEFAULT_EPSILON).images for i in range(len(lr))]
np.save(sys.argv[4], torch.cat(images).numpy())
"""

faces, n, out = str(Path(sys.argv[1]).resolve()), sys.argv[2], sys.argv[5]
a, b = (str(Path(p).resolve()) for p in sys.argv[3:5])
with tempfile.TemporaryDirectory() as tmp:
    images = []
    for i, checkout in enumerate((a, b)):
        path = f"{tmp}/{i}.npy"
        subprocess.run([sys.executable, "-c", DECODE, checkout, faces, n, path], check=True,
                       cwd=tmp, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        images.append(np.load(path))
same = images[0] == images[1]
result = {"faces": int(n), "identical_images": int(same.reshape(len(same), -1).all(1).sum()),
          "differing_intensities": int((~same).sum())}
Path(out).write_text(json.dumps(result, indent=1) + "\n")
print(result)
