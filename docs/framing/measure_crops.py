"""PSNR of `bpd-sr upscale` on aligned CelebA photos with each --crop, against the 32x32
ground truth made by the training crop (138x138 at row 40, column 20, area-resized), and
against each crop's own 32x32 original (what `--compare` shows as "original").

usage: python docs/framing/measure_crops.py PHOTO_FOLDER OUT_JSON
(PHOTO_FOLDER: aligned CelebA originals, 178x218, e.g. from img_align_celeba/)
Runs `bpd-sr upscale FOLDER -o TMP/<crop> --crop <crop> -q` for each crop (the shipped
weights, default rule, k and epsilon, one thread), then compares every result with the ground
truth; bicubic upscaling of each crop's 8x8 input is the baseline.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bpd_sr import DEFAULT_RULE, load_pretrained
from bpd_sr.evaluation.metrics import psnr, upscale_bicubic
from bpd_sr.io.framing import area_resize, frame
from bpd_sr.io.imageio import read_image, reference_32, to_model_input

folder, out_json = Path(sys.argv[1]), Path(sys.argv[2])
photos = sorted(folder.glob("*.png"))
truth = {p.name: area_resize(frame(read_image(p), "celeba")[0], 32) for p in photos}
result = {"photos": len(photos), "command": "bpd-sr upscale FOLDER -o OUT --crop CROP -q",
          "decoding": {"rule": DEFAULT_RULE, "k": f"auto (up to {load_pretrained().cfg.k})",
                       "epsilon": 2},
          "crops": {}}
with tempfile.TemporaryDirectory() as tmp:
    for crop in ("celeba", "centre"):
        out = Path(tmp) / crop
        subprocess.run([sys.executable, "-m", "bpd_sr", "upscale", str(folder), "-o", str(out),
                        "--crop", crop, "-q"], check=True)
        sr = [psnr(read_image(out / f"{p.stem}_x4.png"), truth[p.name]) for p in photos]
        bic = [psnr(upscale_bicubic(to_model_input(read_image(p), crop)[0]), truth[p.name])
               for p in photos]
        own = [psnr(read_image(out / f"{p.stem}_x4.png"), reference_32(read_image(p), crop))
               for p in photos]
        result["crops"][crop] = {"psnr_mean": float(np.mean(sr)), "bicubic_psnr_mean": float(np.mean(bic)),
                                 "psnr_against_own_crop_mean": float(np.mean(own)),
                                 "psnr_per_photo": [round(x, 3) for x in sr]}
        print(crop, f"bpd-sr {np.mean(sr):.2f} dB, bicubic {np.mean(bic):.2f} dB, "
              f"against its own crop {np.mean(own):.2f} dB", flush=True)
out_json.write_text(json.dumps(result, indent=2) + "\n")
