"""Attach a fallback conditioning net to a model: the per-face switch of ``ConditioningNet``.

A net trained to hedge on the faces a net fails (``bpd-sr fit-cond --hard-share``) lifts those
faces but costs the common ones; a net that departs little from bicubic on a face is one that
doubts it (``departure_from_bicubic``). So the model keeps its own net and hands over only
the faces on which that net's departure is below a threshold: the ``quantile`` of its
departures on held-out faces (the share of ordinary faces that the switch hands over).
Measured in ``docs/results/gated_hedging.py``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bpd_sr.model.conditioning import ConditioningNet
from bpd_sr.model.tokens import downsample
from bpd_sr.model.transformer import ImageTransformer


class SwitchFitError(ValueError):
    """The two nets cannot be switched between."""


@torch.no_grad()
def departures(net: ConditioningNet, hr: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """hr uint8 (N, 32, 32, 3) faces -> (N,) the net's own departure from bicubic on their
    8x8 inputs."""
    lr = downsample(hr)
    return torch.cat([net.departure(lr[i:i + batch_size]) for i in range(0, len(lr), batch_size)])


def attach_fallback(model: ImageTransformer, fallback: ConditioningNet, held_out: torch.Tensor,
                    quantile: float) -> float:
    """Give ``model``'s conditioning net ``fallback`` (same shape, gaussian head; its weights
    are copied; a fallback the net already has is replaced) and set the switch's threshold to
    the ``quantile`` of the model's own net's departures on ``held_out`` faces uint8
    (N, 32, 32, 3), in place. Returns the threshold."""
    net = model.cond
    if net is None or net.head != "gaussian":
        raise SwitchFitError("the model needs a conditioning net with the gaussian head")
    if fallback.fallback is not None:
        raise SwitchFitError("the fallback net has a fallback of its own: give a plain "
                             "conditioning net (a fit-cond run's checkpoint)")
    if not 0.0 < quantile < 1.0:
        raise SwitchFitError("the quantile must lie between 0 and 1")
    shape = dict(width=net.stem.out_channels, n_blocks=len(net.res), head=net.head,
                 up_width=net.out.in_channels)
    theirs = dict(width=fallback.stem.out_channels, n_blocks=len(fallback.res),
                  head=fallback.head, up_width=fallback.out.in_channels)
    if shape != theirs:
        raise SwitchFitError(f"the fallback net's shape {theirs} is not the model's {shape}")
    threshold = float(torch.quantile(departures(net, held_out).double(), quantile))
    twin = ConditioningNet(**shape, flip_average=net.flip_average).to(net.stem.weight)
    twin.load_state_dict(fallback.state_dict())
    net.fallback, net.switch_departure = twin.eval(), threshold
    model.cfg = replace(model.cfg, cond_fallback=True, cond_switch_departure=threshold)
    return threshold


def drop_fallback(model: ImageTransformer) -> None:
    """Remove the switch from ``model`` in place: its own conditioning net alone again."""
    if model.cond is not None:
        model.cond.fallback, model.cond.switch_departure = None, 0.0
    model.cfg = replace(model.cfg, cond_fallback=False, cond_switch_departure=0.0)

