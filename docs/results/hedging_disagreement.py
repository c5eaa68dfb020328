"""Could a per-face switch between the shipped net and a net trained to hedge on hard faces
(`fit-cond --hard-share`) find the faces where the hedging net is better, from the input
alone? The signal tried: how far the two nets' images lie apart (RMS, levels). Each net
mirror-averaged as shipped, read as mu and back-projected as `upscale` writes the image, on
256 held-out training faces (the last 256 of train_32.npz) and the first 256 standard and
looser test faces: the 50 / 90 / 99% quantiles of the distance, the five most distant faces
(index, distance, second net's PSNR minus the first's, first net's gain over bicubic), the
correlation of the distance with the second net's advantage, and on the standard faces the
rank of face 20 (the tilted face below bicubic).

usage: python docs/results/hedging_disagreement.py TRAIN_32.npz TEST_32.npz TEST_LOOSE_32.npz CKPT_SHIPPED CKPT_HEDGING
"""
import sys

import numpy as np
import torch

from bpd_sr.decoding.consistency import back_project
from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample
from bpd_sr.training.condfit import conditioning_mu_images

torch.set_num_threads(1)
sets = {"held-out": np.load(sys.argv[1])["images"][-256:],
        "standard": np.load(sys.argv[2])["images"][:256],
        "looser": np.load(sys.argv[3])["images"][:256]}
nets = []
for path in sys.argv[4:6]:
    net = warm_start(path)[0].eval().cond
    net.flip_average = True
    nets.append(net)
for name, hr in sets.items():
    lr = downsample(torch.as_tensor(hr))
    bicubic = quality(upscale_bicubic(lr.numpy()), hr)["psnr_per_image"]
    with torch.no_grad():
        images = [back_project(conditioning_mu_images(net, lr).float(), lr) for net in nets]
    psnr = [quality(image.numpy(), hr)["psnr_per_image"] for image in images]
    distance = (images[0].float() - images[1].float()).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
    advantage = psnr[1] - psnr[0]
    order = np.argsort(-distance)
    top = [(int(i), round(float(distance[i]), 2), round(float(advantage[i]), 2),
            round(float(psnr[0][i] - bicubic[i]), 2)) for i in order[:5]]
    line = (f"{name}: distance quantiles 50/90/99% {np.round(np.percentile(distance, [50, 90, 99]), 2)}, "
            f"most distant {top}, correlation with the advantage "
            f"{np.corrcoef(distance, advantage)[0, 1]:+.3f}")
    if name == "standard":
        line += f"; face 20: distance {distance[20]:.2f}, rank {int(np.where(order == 20)[0][0]) + 1} of 256"
    print(line, flush=True)
