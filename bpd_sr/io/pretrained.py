"""Checkpoints: save atomically, load safely, and load the shipped default weights.

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)`` and holds
plain dicts, lists, numbers and tensors: ``model_config`` (a ``ModelConfig`` as a dict),
``model`` (the state dict) and, for training checkpoints, ``train_config``, ``optimizer``,
``step``, ``train_seconds``, ``log`` and ``rng``.
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bpd_sr.config import ModelConfig, TrainConfig
from bpd_sr.io.atomic import write_atomic
from bpd_sr.model.mixture import apply_mixture, set_flip_average
from bpd_sr.model.transformer import ImageTransformer

DEFAULT_WEIGHTS = "default.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or of another configuration: one sentence,
    fit to print without a traceback."""


def save_checkpoint(
    path: str | Path, model: ImageTransformer, train_config: TrainConfig | None = None,
    extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically (``bpd_sr.io.atomic``).

    dtype: store floating-point weights in this type (bf16 halves a shipped file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu()
             for k, v in model.state_dict().items()}
    ckpt: dict[str, Any] = {"model_config": model.cfg.to_dict(), "model": state}
    if train_config is not None:
        ckpt["train_config"] = train_config.to_dict()
    ckpt.update(extra or {})
    return write_atomic(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True``; CheckpointError on any problem."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} was not found.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code:
        # a checkpoint is data, so that advice is not passed on.
        raise CheckpointError(f"Checkpoint {path} holds Python objects other than tensors and "
                              "plain data, and bpd-sr loads checkpoints as data only.") from None
    except Exception:  # truncated zip archives, other formats
        raise CheckpointError(f"Checkpoint {path} cannot be read: it is truncated or not a "
                              "PyTorch checkpoint.") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a bpd-sr checkpoint: it has no model_config "
                              "and model.")
    return ckpt


def _model_config(ckpt: dict[str, Any], path: Path) -> ModelConfig:
    """The ModelConfig a checkpoint holds; CheckpointError (one sentence) when this version
    of bpd-sr cannot build it (settings it does not know, or values it refuses)."""
    try:
        return ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {path} describes a model this version of bpd-sr "
                              f"cannot build: {e}.") from None


def _load_weights(model: ImageTransformer, state: dict[str, torch.Tensor], path: Path,
                  strict: bool = True) -> list[str]:
    """Load ``state`` into ``model``; CheckpointError (one sentence) for weights that do not
    fit or are not finite. Returns the missing names (allowed when not strict)."""
    bad = [n for n, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"The weights in {path} hold NaN or infinite values (in "
                              f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the "
                              "checkpoint is broken, perhaps by a training run that diverged.")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes: "size mismatch for NAME: copying a param with shape ..."
        detail = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"The weights in {path} do not fit the model its configuration "
                              f"describes ({(detail or ['shapes differ'])[0].rstrip('.')}).") from None
    if (strict and missing) or unexpected:
        raise CheckpointError(f"The weights in {path} do not fit the model its configuration "
                              f"describes (missing {list(missing)[:3]}, unexpected "
                              f"{list(unexpected)[:3]}).")
    return list(missing)


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> ImageTransformer:
    """Build the model a checkpoint describes, with its weights, in fp32 eval mode."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    model = ImageTransformer(_model_config(ckpt, path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    _load_weights(model, state, path)
    return model.to(device).eval()


def warm_start(
    path: str | Path, k: int | None = None, **overrides: Any
) -> tuple[ImageTransformer, dict[str, Any]]:
    """The model of checkpoint ``path`` with ``k`` proposal slots (default: its own k) and
    config fields overridden, for further training; also returns the checkpoint.

    The base weights are loaded; the heads too when k is unchanged (other heads start new).
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    saved = _model_config(ckpt, path)
    k = saved.k if k is None else k
    model = ImageTransformer(replace(saved, k=k, **overrides))
    state = ckpt["model"]
    if k != saved.k:  # heads of another k have other shapes: keep only the base's weights
        state = {n: v for n, v in state.items() if not n.startswith("heads.")}
    missing = _load_weights(model, state, path, strict=False)
    bad = [m for m in missing if not m.startswith("heads.")]  # new heads may start fresh
    if bad:
        raise CheckpointError(f"The weights in {path} do not fit the model its configuration "
                              f"describes (missing {bad[:3]}).")
    return model, ckpt


def default_weights_path() -> Path:
    return Path(str(resources.files("bpd_sr") / "weights" / DEFAULT_WEIGHTS))


def load_pretrained(
    checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
    threads: int | None = None,
) -> ImageTransformer:
    """The shipped default model (``bpd_sr/weights/default.pt``), or ``checkpoint``.

    Works offline: the weights are inside the installed package. threads: the package's
    thread policy (``bpd_sr.threads``): by default one thread (or ``$BPD_SR_THREADS``);
    0 leaves PyTorch's setting alone.
    """
    from bpd_sr.threads import apply

    apply(threads)
    return model_from_checkpoint(checkpoint or default_weights_path(), device)


def average_checkpoints(paths: list[str | Path]) -> ImageTransformer:
    """The weight average of checkpoints of one configuration (a "model soup", Wortsman et
    al. 2022): fine-tunes of the same net from the same start lie close enough in weight
    space that their mean is a net of its own, often better than each, at the cost of one.
    Floating-point weights are averaged in float64; the model is the first's, in fp32."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs two checkpoints or more")
    ckpts = [load_checkpoint(p) for p in paths]
    configs = [_model_config(c, Path(p)) for c, p in zip(ckpts, paths, strict=True)]
    for cfg, p in zip(configs[1:], paths[1:], strict=True):
        if cfg != configs[0]:
            raise CheckpointError(f"{p} is of another configuration than {paths[0]}: only "
                                  "fine-tunes of the same net can be averaged.")
    states = [c["model"] for c in ckpts]
    if any(s.keys() != states[0].keys() for s in states):
        raise CheckpointError("the checkpoints hold different weights: they cannot be averaged")
    mean = {k: (sum(s[k].double() for s in states) / len(states)).float()
            if v.is_floating_point() else v for k, v in states[0].items()}
    model = ImageTransformer(configs[0])
    _load_weights(model, mean, Path(paths[0]))
    return model.eval()


def export_weights(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                   cond_scale_factor: float = 1.0, flip_average: bool | None = None,
                   note: str | None = None) -> Path:
    """A small inference-only copy of a checkpoint: config and weights (in ``dtype``), no
    optimizer; what it was trained on, and the source's own ``"about"``, are kept under
    ``"about"``. How a shipped checkpoint is assembled from a net's run: the conditioning
    net's weights in the mixture multiplied by ``cond_scale_factor``, its mirror average
    switched on or off (None: as the source), a ``note`` saying what the weights are."""
    ckpt = load_checkpoint(src)
    model = model_from_checkpoint(src)
    if (cond_scale_factor != 1.0 or flip_average is not None) and model.cond is None:
        raise CheckpointError(f"{src} has no conditioning net, so its mixture and mirror "
                              "average cannot be set.")
    if not cond_scale_factor > 0:
        raise ValueError("cond_scale_factor must be positive")
    about = dict(ckpt["about"]) if isinstance(ckpt.get("about"), dict) else {}
    about.update({k: ckpt[k] for k in ("train_config", "step", "train_seconds", "log") if k in ckpt})
    if cond_scale_factor != 1.0:
        apply_mixture(model, 1.0, tuple(s * cond_scale_factor for s in model.cfg.cond_scales))
    if flip_average is not None:
        set_flip_average(model, flip_average)
    about["exported"] = {"from": str(src), "cond_scale_factor": cond_scale_factor,
                         "flip_average": model.cfg.cond_flip_average}
    if note:
        about["note"] = note
    return save_checkpoint(dst, model, extra={"about": about}, dtype=dtype)
