"""The ``bpd-sr`` command: a thin click layer over the library. User errors are one line
on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from .config import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE, MODEL_PRESETS, TrainConfig
from .framing import CROPS
from .rules import RULES

# what evaluate and benchmark compare by default: exact acceptance, the paper's tolerance and
# the package's own default
EPSILONS_COMPARED = ",".join(map(str, sorted({0, 2, DEFAULT_EPSILON})))

RULE_HELP = ("Decoding rule: the intensity taken from each 256-way distribution. mean: the "
             "expected intensity (sharper faces, more accepted tokens per step); argmax: the "
             "most likely one (the paper's greedy decoding); median.")


# Errors that are the user's to fix; anything else is a bug and keeps its traceback.
def _user_errors() -> tuple[type[Exception], ...]:
    from .data import DataError
    from .imageio import ImageError
    from .pretrained import CheckpointError
    from .train import TrainError

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

    from .threads import ENV, resolve

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
@click.option("--head-targets", type=click.Choice(["data", "base"]), default="data", show_default=True,
              help="What the proposal heads learn: the ground truth, or the base model's own "
                   "argmax given the true prefix (teacher-forced distillation).")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Random horizontal flips.")
@click.option("--eval-every", type=int, default=500, show_default=True)
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
    from .train import train

    _check_train_options(resume, kwargs)
    cfg = TrainConfig(**kwargs)
    path = train(cfg, resume=resume, progress=not quiet)
    click.echo(f"checkpoint: {path}")


def _check_train_options(resume: bool, options: dict) -> None:
    """Options that would be silently ignored are refused: a resumed run keeps its settings,
    and a warm start (--init) takes its model's size from the checkpoint, not --preset."""
    from pathlib import Path

    from .pretrained import load_checkpoint

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
@click.option("--n-faces", type=int, default=2048, show_default=True,
              help="Training faces to decode greedily (the slow part on a CPU: ~0.7 faces/s).")
@click.option("--n-val", type=int, default=64, show_default=True,
              help="Of those, held out to measure the heads' agreement with greedy decoding.")
@click.option("--decode-batch", type=int, default=128, show_default=True)
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--batch-images", type=int, default=16, show_default=True)
@click.option("--positions", type=int, default=1024, show_default=True,
              help="Random positions per image per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup-steps", type=int, default=50, show_default=True)
@click.option("--eval-every", type=int, default=250, show_default=True)
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
    the heads train on them for many epochs (bpd_sr.headfit). A killed run keeps its
    decodes: run the same command again to continue from them.
    """
    from .config import HeadFitConfig
    from .headfit import run
    from .threads import apply

    apply(threads)
    path = run(HeadFitConfig(**kwargs), progress=not quiet)
    click.echo(f"checkpoint: {path}")


@main.command("fit-cond")
@click.option("--data", required=True, help="Training faces (npz, shards, image folder or CelebA root).")
@click.option("--init", required=True, help="Checkpoint whose conditioning net is replaced.")
@click.option("--out", default="runs/cond", show_default=True,
              help="Run folder: last.pt (resumable), log.jsonl, cond.pt.")
@click.option("--width", type=int, default=96, show_default=True, help="Channels of the net.")
@click.option("--blocks", type=int, default=6, show_default=True, help="Residual blocks at 8x8.")
@click.option("--up-width", type=int, default=0, show_default=True,
              help="Channels of the upsampling path at 16x16 and 32x32 (0: --width); most of "
                   "the net's arithmetic at full width.")
@click.option("--objective", type=click.Choice(["ce", "regression"]), default="ce",
              show_default=True,
              help="ce: cross-entropy of the 256-level logits; regression (gaussian head): "
                   "squared error of the mean and Gaussian likelihood of the scale, several "
                   "times cheaper per face.")
@click.option("--head", type=click.Choice(["gaussian", "logits"]), default="gaussian",
              show_default=True, help="gaussian: a mean and a scale per colour (smooth, cheap); "
                                      "logits: 256 free logits per colour.")
@click.option("--steps", type=int, default=4000, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--value-loss-weight", type=float, default=0.05, show_default=True,
              help="Weight of a Huber loss on the expected intensity beside the cross-entropy.")
@click.option("--max-zoom", type=click.FloatRange(1.0, 3.0), default=1.5, show_default=True,
              help="Augmentation: zoom each face out by up to this factor into a mirrored "
                   "border (teaches framings looser than the training crop; 1: off).")
@click.option("--max-shift", type=click.FloatRange(0.0, 8.0), default=2.0, show_default=True,
              help="Augmentation: shift each face by up to this many pixels (0: off).")
@click.option("--n-val", type=int, default=256, show_default=True,
              help="Training faces held out to report PSNR of the net alone; the net that did "
                   "best on them is the one written.")
@click.option("--eval-every", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def fit_cond_command(resume: bool, quiet: bool, **kwargs) -> None:
    """Pretrain a wider, deeper conditioning net alone (cheap on a CPU); the rest of the
    model is kept. Its logits are added to the decoder's and to every proposal slot's, so a
    sharp one makes the base more decided and the proposals better. Fine-tune the decoder
    with it afterwards (bpd-sr train --regime finetune --init out/cond.pt)."""
    from .condfit import CondFitConfig, CondFitError, run

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
                   "did best on the faces is kept (the checkpoint's own included).")
@click.option("--k", type=click.IntRange(1, None), default=DEFAULT_K, show_default=True,
              help="Proposals of the decodes.")
@click.option("--epsilon", type=click.IntRange(0, 255), default=DEFAULT_EPSILON,
              show_default=True, help="Tolerance of the decodes.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Also write the log of the rounds here.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def fit_mixture_command(data, checkpoint, dest, n_faces, objective, rounds, k, epsilon,
                        json_path, threads, quiet):
    """Fit how much the decoder and the conditioning net weigh in the model's logits (a
    decoder temperature and one conditioning weight per colour) on held-out faces, on the
    states the decode itself meets, and keep the mixture that decodes best."""
    import torch

    from .data import load_faces
    from .mixfit import fit_rounds
    from .pretrained import load_pretrained, save_checkpoint

    _writable_file(dest, "--out")
    if json_path:
        _writable_file(json_path, "--json")
    model = load_pretrained(checkpoint, threads=threads)
    if k > model.cfg.k:
        raise click.UsageError(f"--k {k} is more than the model's {model.cfg.k} proposal slots")
    faces = load_faces(data, progress=not quiet)[-n_faces:]
    model, log = fit_rounds(model, faces, objective, rounds, k, epsilon, progress=not quiet)
    save_checkpoint(dest, model, dtype=torch.bfloat16, extra={"about": {"mixture_fit": {
        "data": str(data), "n_faces": len(faces), "objective": objective, "k": k,
        "epsilon": epsilon, "log": log}}})
    if json_path:
        _write_json(json_path, log)
    best = max(log, key=lambda e: e["decode_psnr"])
    click.echo(f"kept round {best['round']}: decoder temperature {best['temperature']}, "
               f"cond_scale {best['cond_scale']}, decode PSNR {best['decode_psnr']} dB")
    click.echo(f"wrote {dest}")


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
    from .pretrained import load_pretrained

    return load_pretrained(checkpoint, device=device, threads=threads)


CROP_HELP = ("How a photo is framed into the model's square. The model learnt faces framed "
             "like aligned CelebA's training crop: a square from the top of the hair to just "
             "below the chin, the eyes a little above the middle. auto: that crop (138x138 at "
             "row 40, column 20) for aligned CelebA photos (178x218, or the same shape), the "
             "centre square otherwise; celeba, centre: always that one. For any other photo, "
             "crop it to such a square first.")

LEGEND = ("per input: the files written; steps = decoding steps, tokens/step = mean accepted "
          "block (3072 tokens per image; 1.00 = one token per step, like greedy), model calls "
          "= decoder passes, seconds = decoding time")


def _choose_k(model, lr, epsilon: int, rule: str, temperature: float, quiet: bool) -> int:
    """--k auto: the fastest k for decodes like lr's, chosen once by the eager step's costs
    (bpd_sr.autok), with the acceptance settings the decode will use; said on the terminal."""
    from .autok import choose_k

    if temperature > 0:
        settings = {"epsilon": 0, "rule": DEFAULT_RULE, "temperature": temperature}
    else:
        settings = {"epsilon": epsilon, "rule": rule, "temperature": 0.0}
    choice = choose_k(model, lr, top_t=None, min_block=1, refine=255, **settings)
    if not quiet:
        click.echo(f"--k auto chose k={choice.k}" + (" (sequential decoding)" if choice.k == 1
                                                      else "") + " from this machine's timings")
    return choice.k


def _compile(model, k: int, quiet: bool) -> None:
    """Compile exactly the decoder steps a decode with this k runs (one token, and k)."""
    from .compiled import compile_decoder, warm_up
    from .quiet import quiet_stderr

    compile_decoder(model)
    with quiet_stderr():  # Inductor's autotuning prints a table per matrix product
        seconds = warm_up(model, 1, (k,))
    if not quiet:
        click.echo(f"compiled the decoder step (k={k}) in {seconds:.1f} s")


def _first_input(plans, crop: str):
    """uint8 (1, 8, 8, 3): the first input's 8x8 (k = 'auto' calibrates on it), or grey."""
    import torch

    from .upscale import read_model_input

    try:
        return torch.from_numpy(read_model_input(next(iter(plans)), crop)[1].copy())[None]
    except _user_errors():  # a bad first file is reported when its turn comes
        return torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)


@main.command("upscale")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the outputs (created if needed), keeping the inputs' folder "
                   "structure under it. Default: beside each input.")
@click.option("-r", "--recursive", is_flag=True, help="Look for images in subfolders too.")
@click.option("--suffix", default="_x4", show_default=True, callback=_check_suffix,
              help="Added to each output's name (no folder separators: see --output).")
@click.option("--crop", type=click.Choice(CROPS), default="auto", show_default=True, help=CROP_HELP)
@click.option("--k", type=_k_choice, default=None, metavar="K|auto",
              help=f"Proposals per step [default: {DEFAULT_K}, or every slot of a model with "
                   "fewer]. 'auto' (opt-in): the fastest k at batch 1 on this machine (or "
                   "sequential decoding), timed and kept in ~/.cache/bpd-sr; with --epsilon "
                   "above 0 each k gives a different image, so auto's images can differ between "
                   "machines. The k that decoded is printed.")
@click.option("--compile", "compile_step", is_flag=True,
              help="Run the decoder steps through torch.compile (Inductor): faster steps after "
                   "a compile of tens of seconds the first time (then read from Inductor's "
                   "on-disk cache); the time it took is printed.")
@click.option("--epsilon", type=click.IntRange(0, 255), default=DEFAULT_EPSILON, show_default=True,
              help="Accept a proposal within this many intensity levels of the base model's "
                   "choice. The default is the smallest that gave >= 7 tokens per step on "
                   "held-out faces with quality at least sequential decoding's (README, "
                   "Results). 0 = exact: the algorithm reproduces sequential decoding with the "
                   "same --rule; in float32 a near-tie can still round the other way (measured: "
                   "README, Exactness).")
@click.option("--greedy", is_flag=True, help="Plain sequential decoding, one token per step (slow).")
@click.option("--rule", type=click.Choice(RULES), default=DEFAULT_RULE, show_default=True,
              help=RULE_HELP)
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A checkpoint to use instead of the shipped weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
              show_default=True)
@click.option("--compare", is_flag=True, help="Also write <name>_compare.png: input | bicubic | "
              "bpd-sr | original (when the input was larger than 8x8), enlarged and labelled.")
@click.option("--heatmap", is_flag=True, help="Also write <name>_heatmap.png: the result beside "
              "the accepted block length of the step that produced each pixel, with a colour bar "
              "(it changes nothing in the result).")
@click.option("--preview-scale", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Enlargement of the --compare and --heatmap pictures (nearest neighbour). "
                   "The result itself is always 32x32.")
@click.option("--temperature", type=click.FloatRange(0, None), default=0.0, show_default=True,
              callback=_finite,
              help="Sample at this temperature instead of decoding greedily (0.8-0.9 look most "
                   "real). Exact: proposals are kept by the speculative-sampling rule.")
@click.option("--samples", type=click.IntRange(1, 64), default=None,
              help="With --temperature: this many different samples of each input [default: 1].")
@click.option("--seed", type=click.IntRange(0, 10**12), default=0, show_default=True,
              help="Seed of the sampler: the same seed gives the same samples.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@one_line_errors
def upscale_command(paths, out_dir, recursive, suffix, crop, k, compile_step, epsilon, greedy,
                    rule, checkpoint, device, compare, heatmap, preview_scale, temperature,
                    samples, seed, threads, quiet) -> None:
    """Upscale face images to 32x32 (4x from 8x8).

    PATHS are image files or folders. An input that is not 8x8 is framed (see --crop:
    aligned CelebA photos get the training crop, others are centre-cropped to a square) and
    area-resized to 8x8 first (a notice says so); the model then decodes the 32x32 face.
    Outputs are PNGs named <stem><suffix>.png, beside the input or in --output; an input is
    never overwritten, two inputs that would write the same file are refused before
    decoding, files this tool wrote are skipped, and every file is written atomically. A bad
    file is reported and skipped; the exit code is then 1.
    """
    from pathlib import Path

    from . import imageio, outputs
    from .upscale import DecodeSettings, upscale_file

    if samples is not None and temperature == 0:
        raise click.UsageError("--samples needs --temperature: greedy and blockwise decoding "
                               "give one result per input")
    given = click.get_current_context().get_parameter_source
    if greedy and (k is not None or given("epsilon") != click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--greedy decodes one token per step: --k and --epsilon do "
                               "not apply")
    # 1. inputs, and the names of every output, before any decoding
    found = imageio.find_images(list(paths), recursive)
    if found.skipped and not quiet:
        click.echo(f"skipped {len(found.skipped)} file(s) that bpd-sr wrote itself")
    plans, refused = outputs.plan_outputs(found.files, found.relative,
                                          Path(out_dir) if out_dir else None, suffix,
                                          samples or 1, heatmap, compare)
    failed = found.errors + refused
    if not plans:
        _report_failures(failed)
        raise click.ClickException("no images to upscale")
    for folder in sorted({p.parent for names in plans.values() for p in names.all()}):
        _writable_folder(folder, "output folder")  # before hours of decoding, not after
    # 2. the model, and the k that decodes every input (auto: chosen once, from the first)
    model = _upscale_model(checkpoint, device, threads, k)
    k = min(DEFAULT_K, model.cfg.k) if k is None else k
    if k == "auto" and not greedy:
        k = _choose_k(model, _first_input(plans, crop), epsilon, rule, temperature, quiet)
    settings = DecodeSettings(greedy, k, epsilon, temperature, seed, rule)
    if compile_step:
        _compile(model, 1 if greedy else k, quiet)
    # 3. each input: read, decode, write
    if not quiet:
        click.echo(LEGEND)
    for path, names in plans.items():
        try:
            done = upscale_file(model, path, names, settings, crop, 32 * preview_scale)
        except _user_errors() as e:
            failed.append((path, str(e)))
            continue
        if not quiet:
            for notice in done.notices:
                click.echo(f"{path}: {notice}")
            click.echo(f"{path} -> {', '.join(map(str, done.written))}: {settings.method}, "
                       f"{done.steps} steps, "
                       f"{done.tokens_per_step:.2f} tokens/step, {done.model_calls} model calls, "
                       f"{done.seconds:.1f} s")
    if failed:
        _report_failures(failed)
        sys.exit(1)


def _upscale_model(checkpoint: str | None, device: str, threads: int | None, k: int | str):
    """The model to upscale with, on its device; --k checked against its proposal slots."""
    device = pick_device(device)
    model = _load_model(checkpoint, device, threads)
    if k not in (None, "auto") and k > model.cfg.k:
        raise click.ClickException(f"--k must be in 1..{model.cfg.k} or auto for this model")
    return model


def _report_failures(failed: list) -> None:
    if failed:
        click.echo(f"bpd-sr: {len(failed)} input(s) failed:", err=True)
        for path, why in failed:
            click.echo(f"  {path}: {why}", err=True)


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

    from .atomic import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


@main.command("evaluate")
@click.argument("data", type=click.Path())
@click.option("--k", "ks", default="4,8,10", show_default=True, callback=int_list(1),
              help="Comma-separated k values (each at most the model's proposal slots).")
@click.option("--epsilon", "epsilons", default=EPSILONS_COMPARED, show_default=True,
              callback=int_list(0),
              help="Comma-separated tolerances: exact, the paper's 2 and the package default.")
@click.option("--rule", "rules", default=DEFAULT_RULE, show_default=True,
              help="Comma-separated decoding rules (mean, argmax, median); every deterministic "
                   "row is decoded with each.")
@click.option("--refine", type=click.IntRange(0, 255), default=255, show_default=True,
              help="Blockwise rows: after a partial acceptance, take the next proposals from the "
                   "verify pass where the first rejected proposal missed by at most this many "
                   "levels (255: always; 0: never, the paper's proposals).")
@click.option("--limit", type=click.IntRange(1, None), default=None, help="Use the first N faces.")
@click.option("--temperature", "temperatures", default="", callback=_positive_floats,
              help="Also sample at these temperatures (comma-separated, above 0), plainly "
                   "and blockwise with each k.")
@click.option("--seed", type=click.IntRange(0, 10**12), default=0, show_default=True,
              help="Seed of the samplers (--temperature).")
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True,
              help="Faces decoded together.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A checkpoint to use instead of the shipped weights.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
              show_default=True, help="auto: cuda, then mps, then cpu.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Also write the results here (checked before decoding).")
@click.option("--loose", type=click.Path(), default=None,
              help="A second set of faces framed looser than the training crop (e.g. made "
                   "by docs/framing/loose_test_set.py): every row is measured on it too.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def evaluate_command(data, ks, epsilons, rules, refine, limit, temperatures, seed, batch_size,
                     checkpoint, device, json_path, loose, threads, quiet):
    """PSNR / SSIM against the ground truth of bicubic, Lanczos, the conditioning net alone,
    sequential and blockwise decoding, for each decoding rule.

    DATA: an npz of 32x32 faces, a folder of face images, or a CelebA root. The input is the
    4x4 area mean of each face. Metrics: scikit-image PSNR (data_range 255) and SSIM
    (Gaussian weights, sigma 1.5, no sample covariance) on uint8 RGB, no border shave.
    "cond net (mean)" is the model's conditioning network on its own (no decoder): the
    expected intensity of its logits at every position, a regression baseline.
    """
    from .data import load_faces
    from .evaluation import format_rows, quality_rows

    rule_list = _parse_rules(rules)
    if json_path:
        _writable_file(json_path, "--json")
    sets = [(data, load_faces(data, split="test", limit=limit))]
    if loose:  # read before hours of decoding, not after
        sets.append((loose, load_faces(loose, split="test", limit=limit)))
    model = _load_model(checkpoint, pick_device(device), threads)
    if max(ks) > model.cfg.k:
        raise click.UsageError(f"--k {max(ks)}: this model has {model.cfg.k} proposal slots")
    results = []
    for path, hr in sets:
        rows = quality_rows(model, hr, ks, epsilons, rule_list, refine, temperatures, seed,
                            batch_size, progress=not quiet)
        click.echo(f"{len(hr)} faces from {path}")
        click.echo(format_rows(rows))
        results.append({"data": path, "n_images": len(hr), "rows": rows})
    if json_path:
        first = results[0]
        _write_json(json_path, {**first, "rules": rule_list,
                                "checkpoint": checkpoint or "shipped default",
                                "looser_framing": results[1] if loose else None})


@main.command("benchmark")
@click.option("--data", type=click.Path(), required=True,
              help="Faces to decode: an npz of 32x32 faces, a folder of face images (e.g. "
                   "data/examples) or a CelebA root.")
@click.option("--limit", type=click.IntRange(1, None), default=16, show_default=True,
              help="Faces for the batch-1 table.")
@click.option("--k", "ks", default="2,4,6,8,10", show_default=True, callback=int_list(1),
              help="Comma-separated k values (those above the model's proposal slots are left out).")
@click.option("--epsilon", "epsilons", default=EPSILONS_COMPARED, show_default=True,
              callback=int_list(0),
              help="Comma-separated tolerances: exact, the paper's 2 and the package default.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=int_list(1),
              help="For the throughput table (and --speed, --grid).")
@click.option("--rule", type=click.Choice(RULES), default=DEFAULT_RULE, show_default=True,
              help=RULE_HELP)
@click.option("--temperatures", default="0.8,0.9,1.0", show_default=True, callback=_positive_floats,
              help="Exact sampling: plain against blockwise (k from --sampling-k); '' to skip.")
@click.option("--sampling-k", default="4,10", show_default=True, callback=int_list(1, True),
              help="k of the blockwise sampling rows.")
@click.option("--step-costs/--no-step-costs", default=True, show_default=True,
              help="Also time one decoding step over k tokens against a greedy step.")
@click.option("--step-repeats", type=click.IntRange(1, None), default=300, show_default=True,
              help="Timed repetitions of each step (median).")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="A checkpoint to use instead of the shipped weights.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmark",
              show_default=True, help="Folder for benchmark.json, table.md and plots.png.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw plots.png.")
@click.option("--speed", is_flag=True,
              help="Only the speed report (speed.json, speed.md): one step at 1 and --speed-k "
                   "tokens as it was, eager and compiled, operations per step, the weight-read "
                   "floor, and seconds per image at --batch-sizes (sequential, k, k=auto).")
@click.option("--speed-k", type=click.IntRange(2, None), default=8, show_default=True,
              help="Speed report: the k of the blockwise step and decodes.")
@click.option("--tokens", type=click.IntRange(1, 3072), default=3072, show_default=True,
              help="Speed report: decode only the first N tokens of each image (a quicker run).")
@click.option("--compile/--no-compile", "compile_step", default=True, show_default=True,
              help="Speed report: also time the compiled step (compiles first; time reported).")
@click.option("--grid", is_flag=True,
              help="Only the decode grid (grid.json): whole-face seconds per image and tokens per "
                   "step of sequential decoding and every --k x --epsilon at each --batch-sizes, "
                   "on --device, within --budget-seconds (made for a lent GPU).")
@click.option("--budget-seconds", type=click.FloatRange(0, None, min_open=True), default=60.0,
              show_default=True, help="Grid: start no decode after this many seconds.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="cpu",
              show_default=True, help="Grid: where to decode (the other benchmarks run on the CPU).")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="Only the results.")
@one_line_errors
def benchmark_command(data, limit, ks, epsilons, batch_sizes, rule, temperatures, sampling_k,
                      step_costs, step_repeats, checkpoint, out_dir, plots, speed, speed_k, tokens,
                      compile_step, grid, budget_seconds, device, threads, quiet):
    """Reproduce the paper's Table 2 on this machine: mean accepted block size, model calls,
    seconds per image at batch 1 and speed-up over cached greedy decoding (timed in the same
    run), PSNR / SSIM; then throughput at larger batches for greedy and every --k and
    --epsilon. Writes JSON, Markdown and a plot, each atomically."""
    import platform
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from . import bench
    from .atomic import write_atomic
    from .data import load_faces

    _writable_folder(out_dir, "--out")
    if grid:
        _grid(checkpoint, data, limit, ks, epsilons, batch_sizes, rule, budget_seconds, device,
              threads, out_dir, quiet)
        return
    model = _load_model(checkpoint, "cpu", threads)
    if speed:
        _speed(model, data, batch_sizes, speed_k, tokens, compile_step, out_dir, quiet)
        return

    result: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "torch": torch.__version__, "threads": torch.get_num_threads()},
                    "checkpoint": checkpoint or "shipped default", "model_config": model.cfg.to_dict()}
    if step_costs:
        costs = bench.step_costs(model, range(1, model.cfg.k + 1), repeats=step_repeats)
        result["step_costs"] = costs
        if not quiet:
            click.echo("step cost over k tokens / greedy step: " + ", ".join(
                f"k={k}: {c['ratio_to_greedy_step']:.2f}" for k, c in costs.items()))
    hr = load_faces(data, split="test", limit=max(limit, max(batch_sizes)))
    bar = tqdm(disable=quiet, desc="table")
    result["table"] = bench.table(model, hr[:limit], ks, epsilons,
                                  progress=lambda s: bar.set_postfix_str(s) or bar.update(1),
                                  rule=rule)
    bar.close()
    temps = temperatures
    if temps:
        result["sampling"] = bench.sampling_table(model, hr[:limit], temps, sampling_k)
    configs = [(1, 0)] + [(k, e) for k in ks for e in epsilons]
    result["throughput"] = bench.throughput(model, hr, batch_sizes, configs,
                                          rule=rule)
    out = Path(out_dir)
    _write_json(str(out / "benchmark.json"), result)
    md = bench.markdown_table(result["table"])
    thr = "\n".join(f"| {r['batch_size']} | {r['k']} | {r['epsilon']} | {r['images_per_second']:.3f} "
                    f"| {r['mean_accepted']:.2f} |" for r in result["throughput"])
    md += ("\n\n| batch | k | epsilon | images/s | mean block |\n|---|---|---|---|---|\n" + thr + "\n")
    if temps:
        md += ("\n| temperature | k | mean block | s/image | speed-up over plain sampling | PSNR | SSIM |\n"
               "|---|---|---|---|---|---|---|\n" + "\n".join(
                   f"| {r['temperature']} | {r['k'] if r['k'] > 1 else '1 (plain)'} | {r['mean_accepted']:.2f} | "
                   f"{r['seconds_per_image']:.2f} | {r['speedup']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.3f} |"
                   for r in result["sampling"]) + "\n")
    write_atomic(out / "table.md", lambda f: f.write(md.encode()))
    written = ["benchmark.json", "table.md"]
    if plots:
        bench.plot(result["table"], str(out / "plots.png"))
        written.append("plots.png")
    if not quiet:
        click.echo(md)
        click.echo(f"wrote {', '.join(str(out / name) for name in written)}")


def _grid(checkpoint, data, limit, ks, epsilons, batch_sizes, rule, budget_seconds, device,
          threads, out_dir, quiet) -> None:
    """benchmark --grid: bench.decode_grid, printed and written as JSON."""
    from pathlib import Path

    from . import bench
    from .data import load_faces

    model = _load_model(checkpoint, pick_device(device), threads)
    hr = load_faces(data, split="test", limit=limit)
    report = bench.decode_grid(model, hr, batch_sizes, ks, epsilons, budget_seconds, rule,
                               progress=None if quiet else lambda s: click.echo(f"... {s}", err=True))
    _write_json(str(Path(out_dir) / "grid.json"), report)
    if not quiet:
        for r in report["rows"]:
            click.echo(f"batch {r['batch_size']:3d}  k {r['k']:2d}  eps {r['epsilon']}  "
                       f"{r['seconds_per_image']:.3f} s/image  {r['tokens_per_step']:.2f} tokens/step"
                       f"  {r['speedup_vs_sequential'] or 0:.2f}x")
        click.echo(f"wrote {Path(out_dir) / 'grid.json'}")


def _speed(model, data, batch_sizes, k, tokens, compile_step, out_dir, quiet) -> None:
    """benchmark --speed: bench.speed_report, printed and written as JSON and Markdown."""
    from pathlib import Path

    from . import bench
    from .data import load_faces

    hr = load_faces(data, split="test", limit=max(batch_sizes))
    report = bench.speed_report(model, hr, batch_sizes, k, compile_step, tokens,
                                progress=None if quiet else lambda s: click.echo(f"... {s}", err=True))
    out = Path(out_dir)
    _write_json(str(out / "speed.json"), report)
    md = bench.speed_markdown(report)
    from .atomic import write_atomic

    write_atomic(out / "speed.md", lambda f: f.write(md.encode()))
    if not quiet:
        click.echo(md)
        click.echo(f"wrote {out}/speed.json, speed.md")


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
    _writable_file(dest, "DEST")
    path = export_weights(checkpoint, dest, dt)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
