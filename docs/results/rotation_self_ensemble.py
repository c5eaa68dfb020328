"""A rotation self-ensemble of the conditioning net, measured on its own (mirror-averaged,
read out as its mean mu, clipped and rounded; the first 256 faces of a standard and a looser
test set), for the faces the net leaves below bicubic (a strongly tilted face among them):
does the net, asked about the same face turned a little either way, disagree where it
guesses wrong, so that the average falls back towards a smoother image there?

Each turned pass: the net's own answer, back-projected onto the 8x8 input (so that its
8x8 version is the input itself), turned by +-a degrees about the centre (mirrored border,
bilinear), area-downsampled to a new 8x8 input; the net's answer to that input turned back
by -+a. Reported: a turned pass alone, the plain pass averaged with the two turned ones, and
the plain pass weighted twice against them; mean PSNR, faces below bicubic and the two
lowest gains over bicubic.

usage: python docs/results/rotation_self_ensemble.py TEST_32.npz TEST_LOOSE_32.npz CKPT
"""
import sys

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bpd_sr.decoding.consistency import back_project
from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample, levels_to_image

torch.set_num_threads(1)
ANGLES = (2, 4, 6, 10, 15)


def turned(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """float (N, 3, 32, 32) turned about the centre, the border mirrored twice (one
    reflection can add less than the image's own size)."""
    p = TF.pad(TF.pad(x, [16] * 4, padding_mode="reflect"), [16] * 4, padding_mode="reflect")
    return TF.rotate(p, degrees, interpolation=InterpolationMode.BILINEAR)[:, :, 32:64, 32:64]


def score(passes: list[torch.Tensor], weights: list[float], hr: np.ndarray,
          base: np.ndarray) -> str:
    """The weighted mean of passes of mu (N, 3, 32, 32) against faces hr uint8 (N, 32, 32, 3)
    and their bicubic PSNR base (N,)."""
    mu = sum(w * p for w, p in zip(weights, passes, strict=True)) / sum(weights)
    gain = quality(levels_to_image(mu).numpy(), hr)["psnr_per_image"] - base
    return (f"{base.mean() + gain.mean():.3f} dB, {int((gain < 0).sum())} below "
            f"bicubic, lowest {np.round(np.sort(gain)[:2], 2).tolist()}")


@torch.no_grad()
def main() -> None:
    test, loose, ckpt = sys.argv[1:4]
    net = warm_start(ckpt)[0].eval().cond
    net.flip_average = True
    print(f"# python docs/results/rotation_self_ensemble.py {' '.join(sys.argv[1:])}")
    for name, path in (("standard", test), ("looser", loose)):
        hr = np.load(path)["images"][:256]
        lr = downsample(torch.as_tensor(hr))
        base = quality(upscale_bicubic(lr.numpy()), hr)["psnr_per_image"]

        plain = net.gaussian_parameters(lr)[0]  # (N, 3, 32, 32)
        source = back_project(levels_to_image(plain), lr).permute(0, 3, 1, 2).float()
        print(f"== {name}: plain {score([plain], [1], hr, base)}")
        for a in ANGLES:
            pair = []
            for d in (a, -a):
                lr_d = downsample(turned(source, d).round().clamp(0, 255).to(torch.uint8)
                                  .permute(0, 2, 3, 1).contiguous())
                pair.append(turned(net.gaussian_parameters(lr_d)[0], -d))
            print(f"+-{a} degrees: alone {score(pair[:1], [1], hr, base)} | with the plain pass "
                  f"{score([plain, *pair], [1, 1, 1], hr, base)} | plain weighted twice "
                  f"{score([plain, *pair], [2, 1, 1], hr, base)}")


if __name__ == "__main__":
    main()
