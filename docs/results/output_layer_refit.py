"""Does refitting the decoder's output layer pay (``bpd_sr.training.mixfit.fit_output_layer``,
``bpd-sr fit-mixture --output-layer``)? The shipped weights; the last 256 training faces
(which neither net trained on) decoded once with the default decode; the output layer's
input on those decodes cached; then the layer refitted at several Adam learning rates (400
steps of 8 faces, a quarter of the faces held out, the best layer on them kept). Prints the
held-out RMSE (levels) before and after, and how far the layer moved.

usage: python docs/results/output_layer_refit.py train_32.npz
"""

import sys
import time

import torch

from bpd_sr import load_pretrained
from bpd_sr.io.data import load_faces
from bpd_sr.model.tokens import image_to_tokens
from bpd_sr.training.mixfit import decode_faces, expert_logits, fit_output_layer

torch.set_num_threads(1)
model = load_pretrained()
hr = load_faces(sys.argv[1], progress=False)[-256:]
t = time.time()
images, tps = decode_faces(model, hr, 10, 1)
data = expert_logits(model, hr, prefix=image_to_tokens(images), keep_features=True)
print("decoded + states", round(time.time() - t), "s; tokens/step", tps, flush=True)
w0, b0 = model.out_proj.weight.detach(), model.out_proj.bias.detach()
print("weight scale", w0.abs().mean().item(), b0.abs().mean().item(), flush=True)
for lr in [3e-6, 1e-5, 3e-5, 1e-4]:
    t = time.time()
    w, b, info = fit_output_layer(data, w0, b0, model.cfg.cond_scales, steps=400, lr=lr)
    print(lr, info, "rel change", ((w - w0).norm() / w0.norm()).item(),
          round(time.time() - t), "s", flush=True)
