"""Set how the model's two experts combine, in place: the decoder's temperature (folded into
its output layer, which every proposal slot shares), the conditioning net's weight per colour
(``ModelConfig.cond_scale``) and the net's mirror self-ensemble. Fitting these is
``bpd_sr.training.mixfit``; setting them is here, so that fitting, exporting and loading use
one implementation."""

from __future__ import annotations

from dataclasses import replace

import torch

from bpd_sr.model.transformer import ImageTransformer


@torch.no_grad()
def apply_mixture(model: ImageTransformer, temperature: float,
                  cond_scale: tuple[float, float, float]) -> ImageTransformer:
    """Set the mixture on ``model`` in place: the decoder's output layer is multiplied by
    ``temperature`` (relative to its current weights) and ``cfg.cond_scale`` is replaced
    (absolute: the weights of the net's raw logits)."""
    model.out_proj.weight.mul_(temperature)
    if model.out_proj.bias is not None:
        model.out_proj.bias.mul_(temperature)
    model.cfg = replace(model.cfg, cond_scale=tuple(float(v) for v in cond_scale))
    return model


def set_flip_average(model: ImageTransformer, on: bool) -> ImageTransformer:
    """Switch the conditioning net's mirror self-ensemble (``ModelConfig.cond_flip_average``)
    on or off in place; it changes the net's logits, so the mixture is fitted after it."""
    if model.cond is None:
        raise ValueError("the model has no conditioning net")
    model.cfg = replace(model.cfg, cond_flip_average=on)
    model.cond.flip_average = on
    return model
