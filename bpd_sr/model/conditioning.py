"""The conditioning network (Dahl et al. 2017, section 3): the 8x8 input to logits for every
target intensity, added to the decoder's (a product of experts)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from bpd_sr.config import CHANNELS, HR_SIZE, N_HR_TOKENS, N_INTENSITIES


def residual_block(width: int) -> nn.Sequential:
    """The residual branch of one block at 8x8 (the block is y + branch(y)): ReLU, 3x3
    convolution, ReLU, 3x3 convolution, width channels throughout."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1))


class ConditioningNet(nn.Module):
    """Low-res image -> logits for every target intensity (Dahl et al. 2017).

    uint8 (B, 8, 8, 3) -> (B, 3072, 256). ``n_blocks`` residual blocks at 8x8, two
    pixel-shuffle upsamplings to 32x32, then a 1x1 convolution to the output per pixel:

    - ``head="logits"``: 256 free logits per colour (the shipped default's net);
    - ``head="gaussian"``: a mean mu and a scale sigma per colour, and logits
      -(i - mu)^2 / (2 sigma^2) for every intensity i: a discretised Gaussian, smooth and
      unimodal, so its expected intensity is mu away from the ends of the range. mu is a
      residual over the input pixel it lies under. 6 outputs per pixel instead of 768: far
      cheaper to train on a CPU (``bpd_sr.training.condfit``).

    ``flip_average``: the output layer is the mean of the net's outputs for the face and for
    its mirror image (flipped back), i.e. the net is made mirror-equivariant at run time.

    ``fallback``: a second net of the gaussian head (trained to hedge on the faces a net
    fails, ``fit-cond --hard-share``) that takes over every face on which this net departs
    from bicubic by less than ``switch_departure`` (``departure_from_bicubic``): a per-face
    switch decided by the input alone, since a net that barely leaves bicubic is one that
    doubts (``bpd_sr.training.switchfit`` sets the threshold on held-out faces).
    """

    @property
    def flip_average(self) -> bool:
        return self._flip_average

    @flip_average.setter
    def flip_average(self, on: bool) -> None:
        # the two nets of a switch are one self-ensemble setting
        self._flip_average = on
        if self.fallback is not None:
            self.fallback.flip_average = on

    def __init__(self, width: int, n_blocks: int = 2, head: str = "logits",
                 up_width: int = 0, flip_average: bool = False,
                 fallback: ConditioningNet | None = None, switch_departure: float = 0.0) -> None:
        super().__init__()
        if fallback is not None and (head != "gaussian" or fallback.head != "gaussian"):
            raise ValueError("a fallback net needs the gaussian head on both nets")
        self.fallback = fallback
        self.switch_departure = switch_departure
        self.flip_average = flip_average
        c = width
        u = up_width or width  # channels of the upsampling path (16x16 and 32x32)
        self.stem = nn.Conv2d(CHANNELS, c, 3, padding=1)
        self.res = nn.ModuleList(residual_block(c) for _ in range(n_blocks))
        self.up = nn.Sequential(
            nn.Conv2d(c, 4 * u, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            nn.Conv2d(u, 4 * u, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            nn.Conv2d(u, u, 3, padding=1), nn.ReLU(),
        )
        if head not in ("logits", "gaussian"):
            raise ValueError(f"unknown conditioning head {head!r}")
        self.head = head
        self.out = nn.Conv2d(u, CHANNELS * (N_INTENSITIES if head == "logits" else 2), 1)
        if head == "gaussian":  # start at mu = the input pixel, sigma = 8 levels
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, lr: torch.Tensor, n_positions: int = N_HR_TOKENS) -> torch.Tensor:
        """lr: uint8 (B, 8, 8, 3) -> logits (B, n_positions, 256) of the first n_positions
        targets in raster order. The 1x1 output layer runs only on the image rows that hold
        them: a decode of a short prefix (the sampling tests) would otherwise write
        B x 3072 x 256 floats to read a few of them.

        The net runs in its parameters' dtype even under autocast. Its Gaussian logits are
        built from squared levels (i^2 up to 65025, which bfloat16 rounds to multiples of
        256) and from mu and sigma, whose bf16 rounding moves a sharp distribution by a
        fraction of a level, i.e. its top logits by several units: a fine-tune under bf16
        autocast would train the decoder against corrupted logits (docs/method.md). The net
        is a few percent of the model's arithmetic, so float32 costs little."""
        with torch.autocast(lr.device.type, enabled=False):
            return self._logits(lr, n_positions)

    def _features(self, lr: torch.Tensor, rows: int, detach_scale: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """lr uint8 (B, 8, 8, 3) -> (x (B, 3, 8, 8) input intensities, y (B, 768 or 6, rows,
        32) the output layer on the first rows of the image). detach_scale (gaussian head):
        the sigma outputs read the features detached, so that fitting sigma trains only its
        own output weights."""
        x = lr.permute(0, 3, 1, 2).to(self.stem.weight.dtype)  # (B, 3, 8, 8)
        with _thread_invariant(x):
            return self._switched_features(x, lr, rows, detach_scale)

    def _switched_features(self, x: torch.Tensor, lr: torch.Tensor, rows: int,
                           detach_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fallback is None:
            return x, self._mirrored_output(x, rows, detach_scale)
        # the switch reads the whole image's departure, whatever rows are asked for
        y = self._mirrored_output(x, HR_SIZE, detach_scale)
        doubt = self._departure(x, y) < self.switch_departure
        if bool(doubt.any()):
            y = y.clone()
            y[doubt] = self.fallback._features(lr[doubt], HR_SIZE, detach_scale)[1].to(y.dtype)
        return x, y[:, :, :rows]

    def departure(self, lr: torch.Tensor) -> torch.Tensor:
        """lr uint8 (B, 8, 8, 3) -> (B,) this net's own ``departure_from_bicubic`` (never its
        fallback's): what the switch compares with ``switch_departure``."""
        with torch.autocast(lr.device.type, enabled=False):
            x = lr.permute(0, 3, 1, 2).to(self.stem.weight.dtype)
            with _thread_invariant(x):
                return self._departure(x, self._mirrored_output(x, HR_SIZE, False))

    def _departure(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 8, 8), y (B, 6, 32, 32) the gaussian head's whole output layer -> (B,)."""
        return departure_from_bicubic(x, *self._gaussian(x, y))

    def _mirrored_output(self, x: torch.Tensor, rows: int, detach_scale: bool) -> torch.Tensor:
        """x (B, 3, 8, 8) input intensities -> the output layer (B, 768 or 6, rows, 32), the
        mean over the face and its mirror image where ``flip_average`` is on."""
        if not self.flip_average:
            return self._output(x, rows, detach_scale)
        # one pass over the faces and their mirror images; every output (mu's residual, log
        # sigma, a logit) sits over the same input pixel in both, so flipping back aligns them
        y = self._output(torch.cat([x, x.flip(3)]), rows, detach_scale)
        return 0.5 * (y[: len(x)] + y[len(x):].flip(3))

    def _output(self, x: torch.Tensor, rows: int, detach_scale: bool) -> torch.Tensor:
        """x (B, 3, 8, 8) input intensities -> the output layer (B, 768 or 6, rows, 32)."""
        y = self.stem(x / 127.5 - 1.0)
        for block in self.res:
            y = y + block(y)
        features = self.up(y)[:, :, :rows]
        if not detach_scale:
            return self.out(features)
        w, b = self.out.weight, self.out.bias
        return torch.cat([F.conv2d(features, w[:CHANNELS], b[:CHANNELS]),
                          F.conv2d(features.detach(), w[CHANNELS:], b[CHANNELS:])], dim=1)

    def _logits(self, lr: torch.Tensor, n_positions: int) -> torch.Tensor:
        rows = -(-n_positions // (HR_SIZE * CHANNELS))  # image rows holding those targets
        x, y = self._features(lr, rows)
        b = y.shape[0]
        if self.head == "gaussian":
            return self._gaussian_logits(*self._gaussian(x, y))[:, :n_positions]
        # the channel axis holds (colour, intensity); put it in raster order (row, col, colour)
        y = y.view(b, CHANNELS, N_INTENSITIES, rows, HR_SIZE).permute(0, 3, 4, 1, 2)
        return y.reshape(b, rows * HR_SIZE * CHANNELS, N_INTENSITIES)[:, :n_positions]

    def gaussian_parameters(self, lr: torch.Tensor, detach_scale: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian head's mean and scale in intensity levels, without the 256-level
        table: lr uint8 (B, 8, 8, 3) -> (mu, sigma), each (B, 3, 32, 32). Cheap to train by
        regression (``bpd_sr.training.condfit``, objective "regression"); detach_scale as in
        ``_features``."""
        if self.head != "gaussian":
            raise ValueError("gaussian_parameters needs the gaussian head")
        with torch.autocast(lr.device.type, enabled=False):
            return self._gaussian(*self._features(lr, HR_SIZE, detach_scale))

    @staticmethod
    def _gaussian(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 8, 8) input intensities; y: (B, 6, rows, 32) raw (mu, log sigma) per
        colour -> (mu, sigma), each (B, 3, rows, 32): mu a residual over the input pixel it
        lies under, sigma in 0.5 .. 160 levels."""
        rows = y.shape[2]
        under = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :rows]
        mu = under + 32.0 * y[:, :CHANNELS]
        sigma = 8.0 * torch.exp(y[:, CHANNELS:].clamp(-2.8, 3.0))
        return mu, sigma

    @staticmethod
    def _gaussian_logits(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """mu, sigma (B, 3, rows, 32) -> logits (B, rows * 96, 256) in raster order."""
        b, rows = mu.shape[0], mu.shape[2]
        n = rows * HR_SIZE * CHANNELS
        mu = mu.permute(0, 2, 3, 1).reshape(b, n, 1)
        a = sigma.permute(0, 2, 3, 1).reshape(b, n, 1).pow(-2)  # 1 / sigma^2
        # -(i - mu)^2 a / 2 = [mu a, -a/2, -mu^2 a/2] . [i, i^2, 1]: one small matmul instead
        # of five passes over (B, 3072, 256); sigma >= 0.5 keeps float32 cancellation < 0.02
        levels = torch.arange(N_INTENSITIES, device=mu.device, dtype=mu.dtype)
        basis = torch.stack([levels, levels * levels, torch.ones_like(levels)])  # (3, 256)
        coef = torch.cat([mu * a, -0.5 * a, -0.5 * mu * mu * a], dim=-1)  # (B, n, 3)
        return coef @ basis


def _thread_invariant(x: torch.Tensor):
    """A context for the net's convolutions at inference on a CPU: oneDNN's split their sums
    by thread count, PyTorch's own (im2col and a matrix product, MKL_CBWR set by the package)
    give the same output at any, and the image must not depend on --threads. Training keeps
    oneDNN's speed."""
    if x.device.type == "cpu" and not torch.is_grad_enabled():
        return _without_onednn()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_onednn():
    # not torch.backends.mkldnn.flags(), which also sets (and warns about) TF32
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def departure_from_bicubic(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """How far a gaussian-head net steps away from bicubic upscaling, in units of its own
    predicted scale: x (B, 3, 8, 8) input intensities, mu and sigma (B, 3, 32, 32) ->
    (B,) the mean of |mu - bicubic(x)| / sigma. Small where the net stays near bicubic: the
    faces it doubts (and faces bicubic already fits), which a fallback net takes over."""
    bicubic = F.interpolate(x.float(), scale_factor=4, mode="bicubic",
                            align_corners=False).clamp(0, 255)
    return ((mu.float() - bicubic).abs() / sigma.float()).mean((1, 2, 3))

