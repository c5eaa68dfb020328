"""The ``bpd-sr`` command: a thin click layer over the library. User errors are one line
on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from .config import MODEL_PRESETS, TrainConfig

# Errors that are the user's to fix; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[Exception], ...]:
    from .pretrained import CheckpointError
    from .train import TrainError

    errors: list[type[Exception]] = [CheckpointError, TrainError]
    try:
        from .data import DataError

        errors.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .imageio import ImageError

        errors.append(ImageError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def one_line_errors(fn):
    """Turn the library's user-facing errors into ``bpd-sr: error: ...`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bpd-sr")
def main() -> None:
    """bpd-sr: 8x8 -> 32x32 face super-resolution with an Image Transformer, made fast by
    blockwise parallel decoding (Stern, Shazeer and Uszkoreit 2018)."""


@click.command("train")
@click.option("--data", required=True, help="npz file, folder of npz shards, folder of images, "
              "or a CelebA root (img_align_celeba/).")
@click.option("--regime", type=click.Choice(["base", "regular", "finetune", "distill"]),
              default="base", show_default=True,
              help="base: plain model (k=1). regular: frozen base, train heads. finetune: base "
                   "and heads jointly. distill: like finetune on the base's own greedy decodes.")
@click.option("--preset", type=click.Choice(sorted(MODEL_PRESETS)), default="small", show_default=True)
@click.option("--k", type=int, default=1, show_default=True, help="Proposal slots (regimes other than base).")
@click.option("--init", default="", help="Base checkpoint to warm-start from (regular/finetune/distill).")
@click.option("--out", default="runs/default", show_default=True, help="Run folder (checkpoints, log).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup-steps", type=int, default=200, show_default=True)
@click.option("--max-steps", type=int, default=2000, show_default=True)
@click.option("--max-minutes", type=float, default=0.0, show_default=True,
              help="Stop after this much training time; the LR schedule is sized to it (0: off).")
@click.option("--random-head/--all-heads", default=False, show_default=True,
              help="Train one random proposal head per batch (the paper's option) or all.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--eval-every", type=int, default=500, show_default=True)
@click.option("--ckpt-minutes", type=float, default=5.0, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CPU and GPU.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def train_command(resume: bool, quiet: bool, **kwargs) -> None:
    """Train a model (single process, or many with torchrun -m bpd_sr.train)."""
    from .train import train

    cfg = TrainConfig(**kwargs)
    path = train(cfg, resume=resume, progress=not quiet)
    click.echo(f"checkpoint: {path}")


main.add_command(train_command)


@main.command("prepare-celeba")
@click.argument("root", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--split", type=click.Choice(["train", "valid", "test", "all"]), default="all",
              show_default=True)
@click.option("--shard-size", type=int, default=20000, show_default=True)
@click.option("--quiet", is_flag=True)
@one_line_errors
def prepare_celeba_command(root: str, out_dir: str, split: str, shard_size: int, quiet: bool) -> None:
    """Turn a CelebA download (img_align_celeba/) into npz shards of 32x32 faces."""
    from .data import prepare_celeba

    paths = prepare_celeba(root, out_dir, split=split, shard_size=shard_size, progress=not quiet)
    click.echo(f"wrote {len(paths)} shard(s) to {out_dir}")


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@one_line_errors
def export_command(checkpoint: str, dest: str, dtype: str) -> None:
    """Write an inference-only copy of a training checkpoint (no optimizer state)."""
    import torch

    from .pretrained import export_weights

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    path = export_weights(checkpoint, dest, dt)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
