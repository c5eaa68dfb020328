"""Configuration dataclasses and named presets.

Configs are plain dataclasses, saved inside every checkpoint (``asdict``) and rebuilt with
``from_dict``: a checkpoint describes itself, and no code is executed to load it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# The image geometry is fixed by the task (8x8 -> 32x32 RGB); it is not configurable.
LR_SIZE = 8
HR_SIZE = 32
CHANNELS = 3
SCALE = HR_SIZE // LR_SIZE
N_LR_TOKENS = LR_SIZE * LR_SIZE * CHANNELS  # 192
N_HR_TOKENS = HR_SIZE * HR_SIZE * CHANNELS  # 3072
N_INTENSITIES = 256

# The decoding rule every deterministic decode uses unless told otherwise (bpd_sr.decoding.rules):
# "mean", the expected intensity, measured better than the paper's "argmax" on PSNR, SSIM
# and acceptance with the shipped weights (README, "Results"). The one place that decides it.
DEFAULT_RULE = "mean"
# The decoding rules there are (bpd_sr.decoding.rules); here so that the command line can
# offer them without importing torch (a fast --help).
RULES = ("argmax", "mean", "median")

# The acceptance tolerance of blockwise decoding when the user gives none: a proposal is kept
# when it is within this many intensity levels of the base model's choice (Stern et al.
# 2018, section 5.2, "distance-based"); 0 is exact acceptance, the base model's own greedy
# decode. The one place that decides it, by the tolerance rule (README, "Results").
DEFAULT_EPSILON = 0
# The proposals per step when the user gives none (fewer for a model with fewer slots). A
# fixed number, not a choice made from timings: with a tolerance above 0 each k gives a
# different image, and an output must depend only on the input, the weights and the options.
DEFAULT_K = 10


def _from_dict(cls, d: dict[str, Any]):
    """Build dataclass ``cls`` from ``d``, refusing unknown keys (a checkpoint of another kind
    or version); missing keys take their defaults."""
    unknown = unknown_fields(cls, d)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings {', '.join(unknown)}")
    return cls(**d)


def unknown_fields(cls, d: dict[str, Any]) -> list[str]:
    """The keys of ``d`` that are not fields of dataclass ``cls``, sorted."""
    return sorted(set(d) - {f.name for f in fields(cls)})


@dataclass(frozen=True)
class ModelConfig:
    """The Image Transformer for super-resolution plus its proposal heads.

    ``k`` is the number of proposal slots of blockwise parallel decoding (Stern et al. 2018,
    section 6): slot i (0-based) predicts the token i positions ahead. ``k = 1`` is the plain
    model. ``attn_block`` is the query block of masked local-1D attention (Parmar et al. 2018,
    section 3.2) and has nothing to do with ``k``.
    """

    d_model: int = 256
    n_head: int = 8
    d_ff: int = 1024
    n_enc_layer: int = 2
    n_dec_layer: int = 4
    attn_block: int = 128
    dropout: float = 0.1
    k: int = 1
    head_d_ff: int = 256  # hidden units per proposal slot (the paper: d_ff, i.e. k*d_ff in all)
    identity_first_slot: bool = True  # slot 0 is the base model itself: heads leave it unchanged
    cond_channels: int = 64  # width of the conditioning conv net (Dahl et al. 2017); 0 = none
    cond_blocks: int = 2  # its residual blocks at 8x8 (bpd-sr fit-cond trains a deeper one)
    # channels of its upsampling path at 16x16 and 32x32; 0 = cond_channels. The path is
    # most of the net's arithmetic at full width, while the detail is decided at 8x8
    cond_up_channels: int = 0
    cond_head: str = "logits"  # "logits" (256 per colour) or "gaussian" (mu, sigma per colour)
    # run the net on the face and on its mirror image and average the two outputs (a
    # self-ensemble: faces are nearly mirror-symmetric and the net is trained with flips, so
    # the two runs err differently); twice the net's small share of the arithmetic
    cond_flip_average: bool = False
    # a second net of the same shape that takes over the faces on which the first departs
    # from bicubic by less than cond_switch_departure (``ConditioningNet``, ``bpd-sr
    # fit-switch``): a net trained to hedge on hard faces, used only where the first doubts
    cond_fallback: bool = False
    cond_switch_departure: float = 0.0
    # weight of the conditioning logits in the sum with the decoder's (1: as trained): one
    # number, or one per colour (R, G, B) as ``bpd-sr fit-mixture`` fits them on held-out
    # faces; a decoding setting saved with the checkpoint
    cond_scale: float | tuple[float, float, float] = 1.0
    lr_input_embedding: bool = True  # embed the low-res intensity each target comes from

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError("d_model must be divisible by n_head")
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if isinstance(self.cond_scale, (list, tuple)):  # a checkpoint's JSON gives a list
            object.__setattr__(self, "cond_scale", tuple(float(s) for s in self.cond_scale))
            if len(self.cond_scale) != CHANNELS:
                raise ValueError(f"cond_scale must be one number or {CHANNELS}, one per colour")
        if not all(s > 0 for s in self.cond_scales):
            raise ValueError("cond_scale must be positive")
        if self.attn_block < 1 or N_HR_TOKENS % self.attn_block:
            raise ValueError(f"attn_block must divide {N_HR_TOKENS}")

    @property
    def cond_scales(self) -> tuple[float, float, float]:
        """cond_scale per colour (R, G, B)."""
        s = self.cond_scale
        return tuple(s) if isinstance(s, tuple) else (float(s),) * CHANNELS

    @staticmethod
    def preset(name: str, **overrides: Any) -> ModelConfig:
        """A named configuration, with fields overridden (e.g. ``preset("small", k=10)``)."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
        return replace(MODEL_PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests: decodes an image in well under a second.
    "tiny": ModelConfig(
        d_model=32, n_head=2, d_ff=64, n_enc_layer=1, n_dec_layer=2, attn_block=64,
        dropout=0.0, head_d_ff=32, cond_channels=8,
    ),
    # The shipped default; sized by measurement (README, "Training the default").
    "small": ModelConfig(
        d_model=192, n_head=6, d_ff=768, n_enc_layer=2, n_dec_layer=4, attn_block=128,
        dropout=0.0, head_d_ff=64, cond_channels=64,
    ),
    # The paper's img2img_transformer_b3 (tensor2tensor), plus our conditioning.
    "paper": ModelConfig(
        d_model=512, n_head=8, d_ff=2048, n_enc_layer=4, n_dec_layer=8, attn_block=128,
        dropout=0.1, head_d_ff=2048, cond_channels=64,
    ),
}


@dataclass
class TrainConfig:
    """One training run. Saved in its checkpoints so a run can be resumed and audited."""

    data: str = ""
    regime: str = "base"  # base | regular | finetune | distill
    preset: str = "small"
    k: int = 1
    init: str = ""  # checkpoint to warm-start from (regular / finetune / distill)
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 2000
    max_minutes: float = 0.0  # 0 = no time limit; otherwise the schedule is sized by steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cond_loss_weight: float = 1.0
    random_head: bool = False  # the paper's option: one random proposal head per batch
    # what the proposal heads learn: "data" (the ground truth, as in the paper) or "base"
    # (the base model's own argmax at each position given the true prefix: teacher-forced
    # distillation, one forward pass, no decoding; verification checks the decoding rule's
    # choice, which is the argmax only under the argmax rule)
    head_targets: str = "data"
    flip: bool = True
    val_fraction: float = 0.02
    eval_every: int = 500
    ckpt_minutes: float = 5.0
    amp: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | bf16 | fp32
    compile: str = "auto"  # auto (on a GPU, when it pays) | on | off: bpd_sr.training.trainspeed
    profile_steps: int = 20  # steps profiled once per run into <out>/profile.txt (0: none)
    # an inference checkpoint (bf16, like the shipped one) written every export_minutes and
    # at the end, so that a run killed at a deadline still leaves weights ("": none)
    export_path: str = ""
    export_minutes: float = 2.0
    seed: int = 0
    out: str = "runs/default"
    distill_cache: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> tuple[TrainConfig, list[str]]:
        """The config of a checkpoint written by this or another version of bpd-sr, and the
        settings it holds that this version does not know (dropped: they described how an
        older or newer version ran, e.g. ``num_workers``, not what the model is)."""
        unknown = unknown_fields(cls, d)
        return cls(**{k: v for k, v in d.items() if k not in unknown}), unknown


@dataclass
class HeadFitConfig:
    """Fitting the proposal heads of a frozen base to its own sequential decodes
    (``bpd_sr.training.headfit``). Saved in the checkpoint it produces."""

    data: str = ""
    init: str = ""  # the base (or base + heads) checkpoint; its base is kept frozen
    k: int = 0  # proposal slots; 0 = as many as ``init`` has
    n_faces: int = 2048  # training faces to decode (a random subset of data)
    n_val: int = 64  # of which held out to measure agreement
    decode_batch: int = 128
    steps: int = 2000
    batch_images: int = 16
    positions: int = 1024  # random positions per image per step
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 250
    seed: int = 0
    out: str = "runs/heads"
    rule: str = DEFAULT_RULE  # the decoding rule whose decodes the heads learn (bpd_sr.decoding.rules)
    # weight of a loss on each head's rule value (for "mean": its expected intensity) beside
    # the cross-entropy: acceptance asks for |head's value - target| <= epsilon, not for mass
    value_loss_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadFitConfig:
        return _from_dict(cls, d)


# the largest rotation of the framing augmentation (bpd_sr.training.augment), in degrees
# either way: heads tilted further than this are rare in face photos
MAX_ROTATION = 45.0
OBJECTIVES = ("ce", "regression", "psnr")  # CondFitConfig.objective
# fit-cond's recolouring generator is seeded seed + this (CondFitConfig.color_share)
COLOR_SEED_OFFSET = 1_000_003


@dataclass
class CondFitConfig:
    """One conditioning-net run (``bpd-sr fit-cond``, ``bpd_sr.training.condfit``); saved in
    its checkpoints."""

    data: str = ""
    init: str = ""  # the model whose conditioning net is replaced (the rest is kept as is)
    width: int = 96
    blocks: int = 6
    up_width: int = 0  # channels of the upsampling path; 0 = width
    keep_net: bool = False  # fine-tune init's own conditioning net instead of a new one
    # with keep_net: residual blocks appended to the kept net, each starting as the identity
    add_blocks: int = 0
    head: str = "gaussian"  # "gaussian": mu and sigma per colour; "logits": 256 free logits
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    value_loss_weight: float = 0.05
    # "ce": the cross-entropy of the 256-level logits (+ the value loss above);
    # "regression" (gaussian head): squared error of mu, and the Gaussian likelihood of the
    # true intensity for sigma with mu held fixed; no 256-level table, so several times
    # cheaper per face (module docstring); "psnr": the same with mu fitted by the mean over
    # faces of the log of each face's squared error (condfit.regression_loss)
    objective: str = "ce"
    # regression / psnr objectives: mu's error is taken after back-projection (each 4x4 block
    # moved to its input pixel's level, bpd_sr.decoding.consistency), as upscale and evaluate
    # write the image, and the held-out PSNR that picks the kept net is read the same way
    back_projected: bool = False
    # regression / psnr objectives: this share of each batch, the faces the net gains least on
    # over bicubic (in dB), weighs (1 + hard_weight) times as much in the loss as the rest
    # (the weights normalised to mean 1): the net's errors where it fares worst, not only on
    # average, which is what "no face below bicubic" asks; 0: off
    hard_share: float = 0.0
    hard_weight: float = 1.0
    # framing augmentation (bpd_sr.training.augment): zoom-out up to this factor, shifts up to this
    # many pixels, flips; 1.0 / 0.0 keep the training crop as it is (flips stay)
    max_zoom: float = 1.5
    max_shift: float = 2.0
    # the share of faces zoomed and shifted, and rotated unless rotated_share is set (the
    # rest: flips only)
    reframed_share: float = 1.0
    max_rotation: float = 0.0  # degrees either way, at most MAX_ROTATION (0: off)
    # the share of faces rotated, drawn apart from the reframed share (None: the reframed faces)
    rotated_share: float | None = None
    # the share of faces recoloured (brightness, contrast, saturation, hue), from a generator
    # of its own (seeded seed + COLOR_SEED_OFFSET) so that the other draws stay the same
    color_share: float = 0.0
    n_val: int = 256  # held out from the training data to report PSNR; the best is kept
    eval_every: int = 500
    ckpt_minutes: float = 3.0
    seed: int = 0
    out: str = "runs/cond"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CondFitConfig:
        return _from_dict(cls, d)

