"""What every bpd-sr command shares: the click group, one-line errors, and options checked
before any work."""

from __future__ import annotations

import functools
import sys

import click

from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_RULE, RULES

# what evaluate and benchmark compare by default: exact acceptance, the paper's tolerance and
# the package's own default
EPSILONS_COMPARED = ",".join(map(str, sorted({0, 2, DEFAULT_EPSILON})))


RULE_HELP = ("Decoding rule: the intensity taken from each 256-way distribution. mean: the "
             "expected intensity (sharper faces, more accepted tokens per step); argmax: the "
             "most likely one (the paper's greedy decoding); median.")


# Errors that are the user's to fix; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[Exception], ...]:
    from bpd_sr.io.data import DataError
    from bpd_sr.io.imageio import ImageError
    from bpd_sr.io.pretrained import CheckpointError
    from bpd_sr.training.train import TrainError

    return CheckpointError, TrainError, DataError, ImageError


_SAVES_ON_INTERRUPT = {"train_command"}  # commands that save their state before stopping


def one_line_errors(fn):
    """Turn the library's user-facing errors into ``bpd-sr: error: ...`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted" + (" (checkpoint saved)" if fn.__name__ in _SAVES_ON_INTERRUPT
                                        else ""), err=True)
            sys.exit(130)

    return wrapper


def _check_threads(ctx, param, value):
    """--threads or $BPD_SR_THREADS, checked before any work; a count above the cores warns."""
    import os

    from bpd_sr.threads import ENV, resolve

    try:
        n = resolve(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (from ${ENV})") from None
    cores = os.cpu_count() or 1
    if n > cores:
        click.echo(f"bpd-sr: warning: {n} threads on {cores} cores: every step waits for "
                   "threads that share a core; expect decoding to be many times slower", err=True)
    return value


def _finite(ctx, param, value):
    """A float option must be a number: nan and inf pass click's ranges."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}")
    return value


def _writable_folder(path, what: str) -> None:
    """Checked before any work: ``path`` is a folder (made if missing) that can be written."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise click.UsageError(f"{what} {p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise click.UsageError(f"cannot write into {what} {p}: {e.strerror or e}") from None


def _writable_file(path, what: str) -> None:
    """Checked before any work: a file can be written at ``path`` (not a folder)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise click.UsageError(f"{what} {p} is a folder: give a file name")
    _writable_folder(p.parent, f"the folder of {what}")


def _check_suffix(ctx, param, value: str) -> str:
    import os

    if any(sep in value for sep in {"/", "\\", os.sep}) or value in (".", ".."):
        raise click.BadParameter(f"{value!r} would put outputs in another folder: use --output "
                                 "for where they go")
    return value


def threads_option(fn):
    """--threads, the same on every command that decodes (bpd_sr.threads: one policy)."""
    return click.option(
        "--threads", type=click.IntRange(0, None), default=None, callback=_check_threads,
        help="CPU threads [default: $BPD_SR_THREADS, else 1]. Decoding is many tiny matrix "
             "products in a row, which more threads only slow down; 0 leaves PyTorch's "
             "default (README, Speed).")(fn)


def _k_choice(text: str):
    """--k: a whole number >= 1 or 'auto'."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise click.BadParameter(f"expected a whole number or 'auto', got {text!r}") from None
    if k < 1:
        raise click.BadParameter(f"expected 1 or more, or 'auto', got {k}")
    return k


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bpd-sr")
def main() -> None:
    """bpd-sr: 8x8 -> 32x32 face super-resolution with an Image Transformer, made fast by
    blockwise parallel decoding (Stern, Shazeer and Uszkoreit 2018)."""


def pick_device(name: str) -> str:
    """auto: cuda > mps > cpu. The model always runs in fp32 (half precision on CPU is slow
    or unsupported, and it would change what greedy decoding picks)."""
    import torch

    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device is available")
        if name == "mps" and not torch.backends.mps.is_available():
            raise click.ClickException("--device mps: MPS is not available")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _load_model(checkpoint: str | None, device: str, threads: int | None = None):
    from bpd_sr.io.pretrained import load_pretrained

    return load_pretrained(checkpoint, device=device, threads=threads)


def _parse_ints(text: str, minimum: int | None = None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if minimum is not None and any(v < minimum for v in values):
        raise click.BadParameter(f"every value must be at least {minimum}, got {text!r}")
    return values


def int_list(minimum: int, allow_empty: bool = False):
    """A click callback: comma-separated whole numbers >= minimum, parsed before any work."""
    def parse(ctx, param, value):
        values = _parse_ints(value, minimum)
        if not values and not allow_empty:
            raise click.BadParameter("give at least one value")
        return values
    return parse


def _positive_floats(ctx, param, value):
    """A click callback: comma-separated finite numbers > 0 ('' for none)."""
    import math

    try:
        values = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise click.BadParameter(f"temperatures must be finite and above 0, got {value!r} "
                                 "(temperature 0 is the sequential decode, always included)")
    return values


def _parse_rules(text: str) -> list[str]:
    rules = [r.strip() for r in text.split(",") if r.strip()]
    for r in rules:
        if r not in RULES:
            raise click.BadParameter(f"unknown decoding rule {r!r}; choose from {', '.join(RULES)}",
                                     param_hint="--rule")
    return rules or [DEFAULT_RULE]


def _write_json(path: str, obj) -> None:
    import json
    from pathlib import Path

    from bpd_sr.io.atomic import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))
