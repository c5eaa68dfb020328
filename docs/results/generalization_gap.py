"""How much better the conditioning net does on faces it trained on than on faces it never
saw: its gain over bicubic (PSNR dB; the net alone, mirror-averaged, read as its mean mu) on
1,024 random training faces it trained on, on the last 256 training faces (held out by
``fit-cond --n-val 256``) and on every test face. A gap between the first and the other two
is the net learning single faces by heart.

usage: python docs/results/generalization_gap.py TRAIN_32.npz TEST_32.npz CKPT
"""

import sys

import numpy as np
import torch

from bpd_sr.evaluation.metrics import quality, upscale_bicubic
from bpd_sr.io.pretrained import warm_start
from bpd_sr.model.tokens import downsample
from bpd_sr.training.condfit import conditioning_mu_images

torch.set_num_threads(1)
train = np.load(sys.argv[1])["images"]
test = np.load(sys.argv[2])["images"]
model = warm_start(sys.argv[3])[0].eval()
model.cond.flip_average = True
seen = np.random.RandomState(0).permutation(len(train) - 256)[:1024]
for name, faces in (("trained on, 1,024 random", train[seen]),
                    ("held out, the last 256", train[-256:]),
                    (f"test, all {len(test)}", test)):
    hr = torch.as_tensor(faces)
    lr = downsample(hr)
    bicubic = quality(upscale_bicubic(lr.numpy()), hr.numpy())["psnr"]
    net = quality(conditioning_mu_images(model.cond, lr).numpy(), hr.numpy())["psnr"]
    print(f"{name}: bicubic {bicubic:.3f}, net {net:.3f}, gain {net - bicubic:.3f}")
