"""Do the shipped weights' images depend on the thread count? The default decode (k =
DEFAULT_K, epsilon = DEFAULT_EPSILON, rule mean, back-projected as `upscale` writes it) of
the first N test faces, each at batch 1, in one fresh process per thread count (one after
the other, never side by side): how many images differ, and by how much.

usage: python docs/results/thread_count_images.py TEST_32.npz N OUT.json [THREADS ...]  (default 1 2)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DECODE = """
import sys, numpy as np, torch
from bpd_sr import DEFAULT_EPSILON, DEFAULT_K, blockwise_parallel_decode, load_pretrained
from bpd_sr.decoding.consistency import back_project
from bpd_sr.model.tokens import downsample
model = load_pretrained(threads=int(sys.argv[1]))
assert torch.get_num_threads() == int(sys.argv[1])
lr = downsample(torch.as_tensor(np.load(sys.argv[2])["images"][: int(sys.argv[3])]))
images = [back_project(blockwise_parallel_decode(model, lr[i : i + 1], k=DEFAULT_K,
                                                 epsilon=DEFAULT_EPSILON).images, lr[i : i + 1])
          for i in range(len(lr))]
np.save(sys.argv[4], torch.cat(images).numpy())
"""

faces, n, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
threads = [int(t) for t in sys.argv[4:]] or [1, 2]
with tempfile.TemporaryDirectory() as tmp:
    images = {}
    for t in threads:
        path = Path(tmp) / f"{t}.npy"
        subprocess.run([sys.executable, "-c", DECODE, str(t), faces, str(n), str(path)], check=True)
        images[t] = np.load(path).astype(int)
first = images[threads[0]]
result = {"faces": faces, "n": n, "threads": threads, "against": threads[0], "others": {}}
for t in threads[1:]:
    diff = np.abs(images[t] - first)
    differing = [int(i) for i in np.nonzero(diff.reshape(n, -1).max(1))[0]]
    result["others"][str(t)] = {
        "images_differing": differing, "pixels_differing": int((diff.max(-1) > 0).sum()),
        "largest_difference_levels": int(diff.max())}
    print(f"{t} threads against {threads[0]}: {len(differing)} of {n} images differ "
          f"({differing}), {result['others'][str(t)]['pixels_differing']} pixels, "
          f"at most {int(diff.max())} levels")
Path(out_path).write_text(json.dumps(result, indent=1))
