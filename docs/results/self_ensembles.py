"""Three ways to average the conditioning net, measured on its own (mirror-averaged, read out
as its mean mu, clipped and rounded; the first 256 faces of a standard and a looser test set):

- a weight average of two or more fine-tunes of the same net (a "model soup");
- an output average of the same nets (an ensemble of their mu);
- a shift self-ensemble: the 8x8 input moved by one pixel (edge pixels repeated), the output
  moved back by four; each shifted pass is reported alone, kept everywhere except the four
  rows or columns it cannot see (the unshifted pass fills those), and averaged with it.

usage: python docs/results/self_ensembles.py TEST_32.npz TEST_LOOSE_32.npz CKPT CKPT [CKPT ...]
       (the first CKPT is the one the shifts are measured on)
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bpd_sr.evaluation.metrics import quality
from bpd_sr.io.pretrained import average_checkpoints, warm_start
from bpd_sr.model.tokens import downsample, levels_to_image

torch.set_num_threads(1)
paths = sys.argv[3:]


def net_of(path=None, soup_of=None):
    """The mirror-averaged net of one checkpoint, or of the weight average of several
    (``bpd-sr average``)."""
    model = average_checkpoints(soup_of) if soup_of else warm_start(path)[0].eval()
    model.cond.flip_average = True
    return model.cond


@torch.no_grad()
def mu_of(net, lr):
    return net.gaussian_parameters(lr)[0]  # (N, 3, 32, 32)


def shifted(lr, dy, dx):
    """lr uint8 (N, 8, 8, 3) with its content moved by (dy, dx) pixels, edges repeated."""
    x = F.pad(lr.permute(0, 3, 1, 2).float(), (1, 1, 1, 1), mode="replicate")
    x = x[:, :, 1 - dy : 9 - dy, 1 - dx : 9 - dx]
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def psnr(mu, hr):
    return quality(levels_to_image(mu).numpy(), hr.numpy())["psnr"]


nets = {p: net_of(path=p) for p in paths}
soups = {"soup of the first two": net_of(soup_of=paths[:2])}
if len(paths) > 2:
    soups["soup of all"] = net_of(soup_of=paths)
for name, path in (("standard", sys.argv[1]), ("looser", sys.argv[2])):
    hr = torch.as_tensor(np.load(path)["images"][:256])
    lr = downsample(hr)
    mus = {p: mu_of(n, lr) for p, n in nets.items()}
    base = mus[paths[0]]
    print(f"== {name}")
    for p, mu in mus.items():
        print(f"{p}: {psnr(mu, hr):.3f}")
    for label, net in soups.items():
        print(f"{label}: {psnr(mu_of(net, lr), hr):.3f}")
    print(f"output average of all: {psnr(sum(mus.values()) / len(mus), hr):.3f}")
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        back = torch.roll(mu_of(nets[paths[0]], shifted(lr, dy, dx)), (-4 * dy, -4 * dx), (2, 3))
        seen = torch.ones_like(back, dtype=torch.bool)
        rows = slice(-4, None) if dy == 1 else slice(0, 4) if dy == -1 else slice(0, 0)
        cols = slice(-4, None) if dx == 1 else slice(0, 4) if dx == -1 else slice(0, 0)
        seen[:, :, rows] = False
        seen[:, :, :, cols] = False
        alone = torch.where(seen, back, base)
        print(f"shift ({dy:+d}, {dx:+d}): alone {psnr(alone, hr):.3f}, "
              f"averaged with the unshifted pass {psnr((alone + base) / 2, hr):.3f}")
