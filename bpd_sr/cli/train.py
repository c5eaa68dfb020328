"""`bpd-sr train`, `fit-heads`, `fit-cond` and `fit-mixture`: the training commands."""

from __future__ import annotations

import click

from bpd_sr.cli.common import _writable_file, _write_json, main, one_line_errors, threads_option
from bpd_sr.config import (
    DEFAULT_EPSILON,
    DEFAULT_K,
    DEFAULT_RULE,
    MAX_ROTATION,
    MODEL_PRESETS,
    OBJECTIVES,
    RULES,
    TrainConfig,
)


@click.command("train")
@click.option("--data", required=True, help="npz file, folder of npz shards, folder of images, "
              "or a CelebA root (img_align_celeba/).")
@click.option("--regime", type=click.Choice(["base", "regular", "finetune", "distill"]),
              default="base", show_default=True,
              help="base: plain model (k=1). regular: frozen base, train heads. finetune: base "
                   "and heads jointly. distill: like finetune on the base's own sequential decodes.")
@click.option("--preset", type=click.Choice(sorted(MODEL_PRESETS)), default="small", show_default=True)
@click.option("--k", type=int, default=1, show_default=True, help="Proposal slots (regimes other than base).")
@click.option("--init", default="", help="Base checkpoint to warm-start from (regular/finetune/distill).")
@click.option("--out", default="runs/default", show_default=True, help="Run folder (checkpoints, log).")
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True, help="Per process.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup-steps", type=int, default=200, show_default=True)
@click.option("--max-steps", type=int, default=2000, show_default=True)
@click.option("--max-minutes", type=float, default=0.0, show_default=True,
              help="Stop after this much training time; the LR schedule is sized to it (0: off).")
@click.option("--random-head/--all-heads", default=False, show_default=True,
              help="Train one random proposal head per batch (the paper's option) or all.")
@click.option("--head-targets", type=click.Choice(["data", "base"]), default="data", show_default=True,
              help="What the proposal heads learn: the ground truth, or the base model's own "
                   "argmax given the true prefix (teacher-forced distillation).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--eval-every", type=click.IntRange(1, None), default=500, show_default=True)
@click.option("--ckpt-minutes", type=float, default=5.0, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the hardware has bf16 (a GPU; a CPU with "
                   "AVX512-BF16 or AMX), else fp32.")
@click.option("--compile", "compile", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="Compile the forward pass and loss (torch.compile). auto: on a GPU with at "
                   "least 3 minutes of budget left. Falls back to eager if compiling fails or "
                   "the compiled step is not faster (timed on the first steps; the log says).")
@click.option("--profile-steps", type=click.IntRange(0, None), default=20, show_default=True,
              help="Profile this many steps once per run and write the table of operators to "
                   "OUT/profile.txt (0: none).")
@click.option("--export", "export_path", default="",
              help="Also write an inference checkpoint (bf16) here every --export-minutes and "
                   "at the end: a run killed at a deadline still leaves weights.")
@click.option("--export-minutes", type=click.FloatRange(0, None, min_open=True), default=2.0,
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the batch order, flips and initialisation.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint, with its own settings "
                   "(only --max-steps and --max-minutes may grow).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def train_command(resume: bool, quiet: bool, **kwargs) -> None:
    """Train a model (single process, or many with torchrun -m bpd_sr train).

    Ctrl-C or SIGTERM saves the checkpoint before stopping; --resume continues from it."""
    from bpd_sr.training.train import train

    _check_train_options(resume, kwargs)
    cfg = TrainConfig(**kwargs)
    path = train(cfg, resume=resume, progress=not quiet)
    click.echo(f"checkpoint: {path}")


def _check_train_options(resume: bool, options: dict) -> None:
    """Options that would be silently ignored are refused: a resumed run keeps its settings,
    and a warm start (--init) takes its model's size from the checkpoint, not --preset."""
    from pathlib import Path

    from bpd_sr.io.pretrained import load_checkpoint

    source = click.get_current_context().get_parameter_source
    given = {name for name in options if source(name) != click.core.ParameterSource.DEFAULT}
    if resume:
        last = Path(options["out"]) / "last.pt"
        if not last.is_file():
            raise click.UsageError(f"--resume: there is no run to continue in {options['out']} "
                                   "(no last.pt); leave out --resume to start one")
        saved = load_checkpoint(last).get("train_config", {})
        clash = sorted(n for n in given - {"max_steps", "max_minutes", "out"}
                       if n in saved and saved[n] != options[n])
        if clash:
            said = ", ".join(f"--{n.replace('_', '-')} {options[n]} (the run has {saved[n]})"
                             for n in clash)
            raise click.UsageError(f"--resume continues the run with its own settings: {said}; "
                                   "only --max-steps and --max-minutes may change")
    elif options["init"] and "preset" in given:
        raise click.UsageError("--preset does not apply with --init: the model's size is the "
                               "checkpoint's")


main.add_command(train_command)


@main.command("fit-heads")
@click.option("--data", required=True, help="Training faces (npz, shards, image folder or CelebA root).")
@click.option("--init", required=True, help="Checkpoint whose base model is kept frozen.")
@click.option("--out", default="runs/heads", show_default=True,
              help="Run folder: decodes.npz (resumable), log.jsonl, heads.pt.")
@click.option("--k", type=int, default=0, show_default=True,
              help="Proposal slots (0: as many as --init has; other values start new heads).")
@click.option("--n-faces", type=click.IntRange(1, None), default=2048, show_default=True,
              help="Training faces to decode sequentially (the slow part on a CPU).")
@click.option("--n-val", type=click.IntRange(0, None), default=64, show_default=True,
              help="Of those, held out to measure the heads' agreement with sequential decoding.")
@click.option("--decode-batch", type=click.IntRange(1, None), default=128, show_default=True)
@click.option("--steps", type=click.IntRange(1, None), default=2000, show_default=True)
@click.option("--batch-images", type=click.IntRange(1, None), default=16, show_default=True)
@click.option("--positions", type=click.IntRange(1, None), default=1024, show_default=True,
              help="Random positions per image per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup-steps", type=int, default=50, show_default=True)
@click.option("--eval-every", type=click.IntRange(1, None), default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rule", type=click.Choice(RULES), default=DEFAULT_RULE, show_default=True,
              help="Decoding rule of the decodes the heads learn (use the rule you decode with).")
@click.option("--value-loss-weight", type=float, default=0.0, show_default=True,
              help="With --rule mean: weight of a Huber loss on each head's expected intensity "
                   "beside the cross-entropy.")
@threads_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def fit_heads_command(quiet: bool, threads: int | None, **kwargs) -> None:
    """Distill the proposal heads from the base model's own sequential decodes.

    The base stays frozen, so its decoder states along each decode are computed once and
    the heads train on them for many epochs (bpd_sr.training.headfit). A killed run keeps its
    decodes: run the same command again to continue from them.
    """
    from bpd_sr.config import HeadFitConfig
    from bpd_sr.threads import apply
    from bpd_sr.training.headfit import run

    apply(threads)
    path = run(HeadFitConfig(**kwargs), progress=not quiet)
    click.echo(f"checkpoint: {path}")


@main.command("fit-cond")
@click.option("--data", required=True, help="Training faces (npz, shards, image folder or CelebA root).")
@click.option("--init", required=True, help="Checkpoint whose conditioning net is replaced.")
@click.option("--out", default="runs/cond", show_default=True,
              help="Run folder: last.pt (resumable), log.jsonl, cond.pt.")
@click.option("--width", type=click.IntRange(1, None), default=96, show_default=True, help="Channels of the net.")
@click.option("--blocks", type=click.IntRange(0, None), default=6, show_default=True, help="Residual blocks at 8x8.")
@click.option("--up-width", type=click.IntRange(0, None), default=0, show_default=True,
              help="Channels of the upsampling path at 16x16 and 32x32 (0: --width); most of "
                   "the net's arithmetic at full width.")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), default="ce",
              show_default=True,
              help="ce: cross-entropy of the 256-level logits; regression (gaussian head): "
                   "squared error of the mean and Gaussian likelihood of the scale, several "
                   "times cheaper per face; psnr: regression with the mean fitted to the "
                   "mean PSNR over faces (the log of each face's squared error).")
@click.option("--back-projected", is_flag=True,
              help="regression / psnr: take the mean's error after back-projection (each 4x4 "
                   "block moved to its input pixel's level), as upscale writes the image; the "
                   "held-out PSNR that picks the kept net is read the same way.")
@click.option("--hard-share", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="regression / psnr: this share of each batch, the faces the net gains "
                   "least on over bicubic, weighs more in the loss (--hard-weight): trains "
                   "the worst faces, not only the average; 0: off.")
@click.option("--hard-weight", type=click.FloatRange(0.0, None), default=1.0, show_default=True,
              help="With --hard-share: those faces weigh (1 + this) times the rest.")
@click.option("--head", type=click.Choice(["gaussian", "logits"]), default="gaussian",
              show_default=True, help="gaussian: a mean and a scale per colour (smooth, cheap); "
                                      "logits: 256 free logits per colour.")
@click.option("--steps", type=click.IntRange(1, None), default=4000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--value-loss-weight", type=float, default=0.05, show_default=True,
              help="Weight of a Huber loss on the expected intensity beside the cross-entropy.")
@click.option("--max-zoom", type=click.FloatRange(1.0, 3.0), default=1.5, show_default=True,
              help="Augmentation: zoom each face out by up to this factor into a mirrored "
                   "border (teaches framings looser than the training crop; 1: off).")
@click.option("--max-shift", type=click.FloatRange(0.0, 8.0), default=2.0, show_default=True,
              help="Augmentation: shift each face by up to this many pixels (0: off).")
@click.option("--reframed-share", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Augmentation: the share of faces zoomed and shifted (and rotated, unless "
                   "--rotated-share); the rest keep the training crop (flips apply to all).")
@click.option("--max-rotation", type=click.FloatRange(0.0, MAX_ROTATION), default=0.0,
              show_default=True,
              help="Augmentation: rotate faces by up to this many degrees either way "
                   "(teaches tilted heads; 0: off); which faces: --rotated-share.")
@click.option("--rotated-share", type=click.FloatRange(0.0, 1.0), default=None,
              help="Augmentation: the share of faces rotated, drawn apart from the reframed "
                   "share, so zoomed-out faces stay upright too (default: the reframed faces).")
@click.option("--color-share", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Augmentation: the share of faces recoloured (brightness and contrast up "
                   "to 20%, saturation up to 40%, hue up to 18 degrees); 0: off.")
@click.option("--weight-decay", type=click.FloatRange(0.0, None), default=1e-4,
              show_default=True, help="AdamW's decoupled weight decay.")
@click.option("--keep-net", is_flag=True,
              help="Fine-tune --init's own conditioning net (its shape) instead of a new one.")
@click.option("--add-blocks", type=click.IntRange(0, None), default=0, show_default=True,
              help="With --keep-net: append this many residual blocks to the kept net, each "
                   "starting as the identity (the deeper net begins where the kept one is).")
@click.option("--warmup-steps", type=click.IntRange(0, None), default=100, show_default=True)
@click.option("--n-val", type=click.IntRange(0, None), default=256, show_default=True,
              help="Training faces held out to report PSNR of the net alone; the net that did "
                   "best on them is the one written.")
@click.option("--eval-every", type=click.IntRange(1, None), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def fit_cond_command(resume: bool, quiet: bool, **kwargs) -> None:
    """Pretrain a wider, deeper conditioning net alone (cheap on a CPU); the rest of the
    model is kept. Its logits are added to the decoder's and to every proposal slot's, so a
    sharp one makes the base more decided and the proposals better. Fine-tune the decoder
    with it afterwards (bpd-sr train --regime finetune --init out/cond.pt)."""
    from bpd_sr.training.condfit import CondFitConfig, CondFitError, run

    try:
        path = run(CondFitConfig(**kwargs), resume=resume, progress=not quiet)
    except CondFitError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"checkpoint: {path}")


@main.command("fit-mixture")
@click.option("--data", required=True, help="Faces the model was not trained on (npz, shards, "
              "image folder or CelebA root); the last --n-faces are used.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The model to fit (default: the shipped weights).")
@click.option("--out", "dest", type=click.Path(), required=True,
              help="Where to write the model with the fitted mixture (bf16).")
@click.option("--n-faces", type=click.IntRange(1, None), default=128, show_default=True,
              help="The last N faces of --data fit the mixture.")
@click.option("--objective", type=click.Choice(["mse", "nll"]), default="mse", show_default=True,
              help="mse: squared error of the expected intensity (what the mean rule writes); "
                   "nll: likelihood of the true intensity.")
@click.option("--rounds", type=click.IntRange(1, 10), default=2, show_default=True,
              help="Decode, fit on the decode's own states, repeat; the mixture whose decode "
                   "did best on the faces is kept (the checkpoint's own included; see "
                   "--psnr-tolerance).")
@click.option("--psnr-tolerance", type=click.FloatRange(0.0, None), default=0.01,
              show_default=True,
              help="Of the decodes within this many dB of the best PSNR, keep the one that "
                   "accepted the most tokens per step (0: the best PSNR alone).")
@click.option("--output-layer", is_flag=True,
              help="Each round also refits the decoder's output layer (shared by every "
                   "proposal slot) on the decode's states against the weighted conditioning "
                   "logits, a quarter of the faces held out to keep the best layer.")
@click.option("--k", type=click.IntRange(1, None), default=DEFAULT_K, show_default=True,
              help="Proposals of the decodes.")
@click.option("--epsilon", type=click.IntRange(0, 255), default=DEFAULT_EPSILON,
              show_default=True, help="Tolerance of the decodes.")
@click.option("--flip-average/--no-flip-average", default=None,
              help="Run the conditioning net on each face and its mirror image and average "
                   "the two (a self-ensemble) before fitting  [default: as the checkpoint].")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Also write the log of the rounds here.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def fit_mixture_command(data, checkpoint, dest, n_faces, objective, rounds, psnr_tolerance,
                        output_layer, k, epsilon, flip_average, json_path, threads, quiet):
    """Fit how much the decoder and the conditioning net weigh in the model's logits (a
    decoder temperature and one conditioning weight per colour) on held-out faces, on the
    states the decode itself meets, and keep the mixture that decodes best (or as well and
    faster: --psnr-tolerance)."""
    import torch

    from bpd_sr.io.data import load_faces
    from bpd_sr.io.pretrained import load_pretrained, save_checkpoint
    from bpd_sr.training.mixfit import choose_round, fit_rounds, set_flip_average

    _writable_file(dest, "--out")
    if json_path:
        _writable_file(json_path, "--json")
    if output_layer and n_faces < 2:
        raise click.UsageError("--output-layer holds out a quarter of the faces: give "
                               "--n-faces 2 or more")
    model = load_pretrained(checkpoint, threads=threads)
    if k > model.cfg.k:
        raise click.UsageError(f"--k {k} is more than the model's {model.cfg.k} proposal slots")
    if flip_average is not None:
        try:
            set_flip_average(model, flip_average)
        except ValueError as e:  # the model has no conditioning net
            raise click.UsageError(f"--flip-average: {e}") from None
    faces = load_faces(data, progress=not quiet)[-n_faces:]
    model, log = fit_rounds(model, faces, objective, rounds, k, epsilon, progress=not quiet,
                            psnr_tolerance=psnr_tolerance, output_layer=output_layer)
    save_checkpoint(dest, model, dtype=torch.bfloat16, extra={"about": {"mixture_fit": {
        "data": str(data), "n_faces": len(faces), "objective": objective, "k": k,
        "epsilon": epsilon, "psnr_tolerance": psnr_tolerance, "output_layer": output_layer,
        "log": log}}})
    if json_path:
        _write_json(json_path, log)
    best = choose_round(log, psnr_tolerance)
    click.echo(f"kept round {best['round']}: decoder temperature {best['temperature']}, "
               f"cond_scale {best['cond_scale']}, decode PSNR {best['decode_psnr']} dB, "
               f"{best['decode_tokens_per_step']} tokens per step")
    click.echo(f"wrote {dest}")


@main.command("fit-switch")
@click.option("--fallback", type=click.Path(), required=True,
              help="A checkpoint whose conditioning net takes over the faces the model's own "
                   "net doubts: one trained to hedge on hard faces (fit-cond --hard-share), "
                   "of the same shape. A switched model gives its own fallback net, so "
                   "that --checkpoint X --fallback X sets X's threshold again.")
@click.option("--data", required=True, help="Faces neither net was trained on (npz, shards, "
              "image folder or CelebA root); the last --n-val are used.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The model whose net is switched (default: the shipped weights); a "
                   "fallback it already has is replaced.")
@click.option("--out", "dest", type=click.Path(), required=True,
              help="Where to write the model with the switch (bf16).")
@click.option("--n-val", type=click.IntRange(1, None), default=256, show_default=True,
              help="The last N faces of --data set the threshold (fit-cond --n-val holds "
                   "them out).")
@click.option("--quantile", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              default=0.05, show_default=True,
              help="The share of these faces handed to the fallback: the threshold is this "
                   "quantile of the model's net's departure from bicubic on them.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def fit_switch_command(fallback, data, checkpoint, dest, n_val, quantile, threads, quiet):
    """Give the model's conditioning net a fallback net for the faces it doubts: a face on
    which the net departs from bicubic less than on QUANTILE of held-out faces (mean |mu -
    bicubic| / sigma) is upscaled by the fallback net instead. The weights are rounded to
    bf16 before the threshold is measured, so that it holds for the file written."""
    import torch

    from bpd_sr.io.data import load_faces
    from bpd_sr.io.pretrained import (
        default_weights_path,
        load_checkpoint,
        load_pretrained,
        save_checkpoint,
    )
    from bpd_sr.training.switchfit import SwitchFitError, attach_fallback

    _writable_file(dest, "--out")
    model = load_pretrained(checkpoint, threads=threads).to(torch.bfloat16).float()
    other = load_pretrained(fallback, threads=threads).to(torch.bfloat16).float().cond
    if other is None:
        raise click.UsageError(f"--fallback {fallback} has no conditioning net")
    if other.fallback is not None:  # a switched model: its own fallback (to set it again)
        other = other.fallback
    faces = load_faces(data, progress=not quiet)[-n_val:]
    try:
        threshold = attach_fallback(model, other, faces, quantile)
    except SwitchFitError as e:
        raise click.ClickException(str(e)) from None
    about = load_checkpoint(checkpoint or default_weights_path()).get("about")
    about = dict(about) if isinstance(about, dict) else {}  # what the model was, kept
    about["switch_fit"] = {"fallback": str(fallback), "data": str(data), "n_val": len(faces),
                           "quantile": quantile, "threshold": threshold}
    save_checkpoint(dest, model, dtype=torch.bfloat16, extra={"about": about})
    click.echo(f"threshold: departure {threshold:.4f} (the {quantile:g} quantile of "
               f"{len(faces)} faces); wrote {dest}")
