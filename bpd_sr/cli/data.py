"""`bpd-sr prepare-celeba`, `bpd-sr export` and `bpd-sr average`: data sets and checkpoints."""

from __future__ import annotations

import click

from bpd_sr.cli.common import _writable_file, main, one_line_errors


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
    from bpd_sr.io.data import prepare_celeba

    paths = prepare_celeba(root, out_dir, split=split, shard_size=shard_size, progress=not quiet)
    click.echo(f"wrote {len(paths)} shard(s) to {out_dir}")


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--cond-scale-factor", type=click.FloatRange(0.0, None, min_open=True), default=1.0,
              show_default=True,
              help="Multiply the conditioning net's weights in the mixture (cond_scale, one per "
                   "colour) by this: larger makes the decode follow the net more closely and "
                   "accept more tokens per step.")
@click.option("--flip-average/--no-flip-average", default=None,
              help="Switch the conditioning net's mirror average on or off  [default: as the "
                   "checkpoint].")
@click.option("--note", default=None, help="What these weights are, kept in the checkpoint "
                                           "(under about.note).")
@one_line_errors
def export_command(checkpoint: str, dest: str, dtype: str, cond_scale_factor: float,
                   flip_average: bool | None, note: str | None) -> None:
    """Write an inference-only copy of a checkpoint (no optimizer state), optionally with its
    mixture scaled and its mirror average set: how the shipped weights are assembled from a
    `bpd-sr fit-cond` run or a `bpd-sr average`."""
    import torch

    from bpd_sr.io.pretrained import export_weights

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    _writable_file(dest, "DEST")
    path = export_weights(checkpoint, dest, dt, cond_scale_factor=cond_scale_factor,
                          flip_average=flip_average, note=note)
    click.echo(f"wrote {path}")


@main.command("average")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--out", "dest", required=True, type=click.Path(),
              help="The averaged checkpoint to write (fp32; `bpd-sr export` makes a bf16 copy).")
@one_line_errors
def average_command(checkpoints: tuple[str, ...], dest: str) -> None:
    """Average the weights of two or more checkpoints of the same net (a model soup): for
    fine-tunes from the same start, e.g. runs of `bpd-sr fit-cond` that differ in one
    setting. Writes the first's configuration with the mean weights."""
    from bpd_sr.io.pretrained import average_checkpoints, save_checkpoint

    _writable_file(dest, "--out")
    model = average_checkpoints(list(checkpoints))
    path = save_checkpoint(dest, model, extra={"about": {"averaged": list(checkpoints)}})
    click.echo(f"wrote {path}: the mean of {len(checkpoints)} checkpoints")
