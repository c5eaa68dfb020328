"""Checkpoints: save atomically, load safely, and load the shipped default weights.

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)`` and holds
plain dicts, lists, numbers and tensors: ``model_config`` (a ``ModelConfig`` as a dict),
``model`` (the state dict) and, for training checkpoints, ``train_config``, ``optimizer``,
``step``, ``train_seconds``, ``log`` and ``rng``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, TrainConfig
from .model import ImageTransformer

DEFAULT_WEIGHTS = "default.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or of another configuration (one line)."""


def save_checkpoint(
    path: str | Path, model: ImageTransformer, train_config: TrainConfig | None = None,
    extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically (temporary file, then rename).

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True``; CheckpointError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip archives, wrong formats
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a bpd-sr checkpoint (no model_config / model)")
    return ckpt


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> ImageTransformer:
    """Build the model a checkpoint describes, with its weights, in fp32 eval mode."""
    ckpt = load_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incompatible model configuration ({e})") from None
    model = ImageTransformer(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match its configuration ({first})") from None
    return model.to(device).eval()


def warm_start(
    path: str | Path, k: int | None = None, **overrides: Any
) -> tuple[ImageTransformer, dict[str, Any]]:
    """The model of checkpoint ``path`` with ``k`` proposal slots (default: its own k) and
    config fields overridden, for further training; also returns the checkpoint.

    The base weights are loaded; the heads too when k is unchanged (other heads start new).
    """
    ckpt = load_checkpoint(path)
    try:
        saved = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incompatible model configuration ({e})") from None
    k = saved.k if k is None else k
    model = ImageTransformer(replace(saved, k=k, **overrides))
    state = ckpt["model"]
    if k != saved.k:  # heads of another k have other shapes: keep only the base's weights
        state = {n: v for n, v in state.items() if not n.startswith("heads.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [m for m in missing if not m.startswith("heads.")]
    if bad or unexpected:
        raise CheckpointError(f"{path}: does not fit this model (missing {bad[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    return model, ckpt


def default_weights_path() -> Path:
    return Path(str(resources.files("bpd_sr") / "weights" / DEFAULT_WEIGHTS))


def load_pretrained(
    checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> ImageTransformer:
    """The shipped default model (``bpd_sr/weights/default.pt``), or ``checkpoint``.

    Works offline: the weights are inside the installed package.
    """
    return model_from_checkpoint(checkpoint or default_weights_path(), device)


def export_weights(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                   note: dict[str, Any] | None = None) -> Path:
    """A small inference-only copy of a training checkpoint: config and weights (in ``dtype``),
    no optimizer. ``note`` (e.g. what it was trained on) is stored under ``"about"``."""
    ckpt = load_checkpoint(src)
    model = model_from_checkpoint(src)
    about = {k: ckpt[k] for k in ("train_config", "step", "train_seconds", "log") if k in ckpt}
    about.update(note or {})
    return save_checkpoint(dst, model, extra={"about": about}, dtype=dtype)
