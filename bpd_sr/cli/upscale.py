"""`bpd-sr upscale`: photos in, 32x32 faces and pictures out."""

from __future__ import annotations

import sys

import click

from bpd_sr.cli.common import (
    RULE_HELP,
    _check_suffix,
    _finite,
    _k_choice,
    _load_model,
    _user_errors,
    _writable_folder,
    main,
    one_line_errors,
    pick_device,
    threads_option,
)
from bpd_sr.config import DEFAULT_EPSILON, DEFAULT_K, DEFAULT_RULE, RULES
from bpd_sr.io.framing import CROPS

CROP_HELP = ("How a photo is framed into the model's square. The model learnt faces framed "
             "like aligned CelebA's training crop: a square from the top of the hair to just "
             "below the chin, the eyes a little above the middle. auto: that crop (138x138 at "
             "row 40, column 20) for aligned CelebA photos (178x218, or the same shape), the "
             "centre square otherwise; celeba, centre: always that one. For any other photo, "
             "crop it to such a square first.")


LEGEND = ("per input: the files written; steps = decoding steps, tokens/step = mean accepted "
          "block (3072 tokens per image; 1.00 = one token per step, like sequential decoding), model calls "
          "= decoder passes, seconds = decoding time")


def _choose_k(model, lr, epsilon: int, rule: str, temperature: float, quiet: bool) -> int:
    """--k auto: the fastest k for decodes like lr's, chosen once by the eager step's costs
    (bpd_sr.decoding.autok), with the acceptance settings the decode will use; said on the terminal."""
    from bpd_sr.decoding.autok import choose_k

    if temperature > 0:
        settings = {"epsilon": 0, "rule": DEFAULT_RULE, "temperature": temperature}
    else:
        settings = {"epsilon": epsilon, "rule": rule, "temperature": 0.0}
    choice = choose_k(model, lr, top_t=None, min_block=1, refine=255, **settings)
    if not quiet:
        click.echo(f"--k auto chose k={choice.k}" + (" (sequential decoding)" if choice.k == 1
                                                      else "") + " from this machine's timings")
    return choice.k


def _compile(session, k: int, quiet: bool) -> None:
    """Compile exactly the decoder steps a decode with this k runs (one token, and k)."""
    from bpd_sr.decoding.compiled import warm_up
    from bpd_sr.quiet import quiet_stderr

    session.compile()
    with quiet_stderr():  # Inductor's autotuning prints a table per matrix product
        seconds = warm_up(session, 1, (k,))
    if not quiet:
        click.echo(f"compiled the decoder step (k={k}) in {seconds:.1f} s")


def _first_input(plans, crop: str):
    """uint8 (1, 8, 8, 3): the first input's 8x8 (k = 'auto' calibrates on it), or grey."""
    import torch

    from bpd_sr.upscale import read_model_input

    try:
        return torch.from_numpy(read_model_input(next(iter(plans)), crop)[1].copy())[None]
    except _user_errors():  # a bad first file is reported when its turn comes
        return torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)


def _check_output_folder(ctx, param, value):
    """--output is a folder: a name like ``face_x4.png`` would silently become a folder of
    that name holding ``face_x4.png``, so it is refused unless such a folder exists."""
    from pathlib import Path

    from bpd_sr.io.imageio import IMAGE_EXTENSIONS

    if value and Path(value).suffix.lower() in IMAGE_EXTENSIONS and not Path(value).is_dir():
        raise click.BadParameter(f"{value!r} names an image file, but --output is the folder "
                                 "the outputs go in (named <stem><suffix>.png: see --suffix)")
    return value


@main.command("upscale")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              callback=_check_output_folder,
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
@click.option("--sequential", "--greedy", "sequential", is_flag=True,
              help="Plain sequential decoding, one token per step (slow); --greedy is its old "
                   "name.")
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
@click.option("--back-projection/--no-back-projection", default=True, show_default=True,
              help="After decoding, move each 4x4 block of the output by one constant so that "
                   "its mean is its input pixel: the output then agrees with the input, and "
                   "comes nearer the true face whatever was decoded. --no-back-projection: "
                   "the decode as the model made it.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@one_line_errors
def upscale_command(paths, out_dir, recursive, suffix, crop, k, compile_step, epsilon, sequential,
                    rule, checkpoint, device, compare, heatmap, preview_scale, temperature,
                    samples, seed, back_projection, threads, quiet) -> None:
    """Upscale face images to 32x32 (4x from 8x8).

    PATHS are image files or folders. An input that is not 8x8 is framed (see --crop:
    aligned CelebA photos get the training crop, others are centre-cropped to a square) and
    area-resized to 8x8 first (a notice says so); the model then decodes the 32x32 face.
    Outputs are PNGs named <stem><suffix>.png, beside the input or in --output; an input is
    never overwritten, two inputs that would write the same file are refused before
    decoding, files this tool wrote are skipped, and every file is written atomically. A bad
    file is reported and skipped; the exit code is then 1.
    """
    from bpd_sr.decoding.session import DecodingSession
    from bpd_sr.upscale import DecodeSettings, upscale_file

    if samples is not None and temperature == 0:
        raise click.UsageError("--samples needs --temperature: sequential and blockwise decoding "
                               "give one result per input")
    given = click.get_current_context().get_parameter_source
    if sequential and (k is not None or given("epsilon") != click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--sequential decodes one token per step: --k and --epsilon do "
                               "not apply")
    # 1. inputs, and the names of every output, before any decoding
    plans, failed = _plan(paths, recursive, out_dir, suffix, samples, heatmap, compare, quiet)
    # 2. the model, and the k that decodes every input (auto: chosen once, from the first)
    session = DecodingSession(_upscale_model(checkpoint, device, threads, k))  # shared by all
    k = min(DEFAULT_K, session.model.cfg.k) if k is None else k
    if k == "auto" and not sequential:
        k = _choose_k(session, _first_input(plans, crop), epsilon, rule, temperature, quiet)
    settings = DecodeSettings(sequential, k, epsilon, temperature, seed, rule, back_projection)
    if compile_step:
        _compile(session, 1 if sequential else k, quiet)
    # 3. each input: read, decode, write
    legend = not quiet  # shown above the first result, not above an input that failed
    for path, names in plans.items():
        try:
            done = upscale_file(session, path, names, settings, crop, 32 * preview_scale)
        except _user_errors() as e:
            failed.append((path, str(e)))
            continue
        if legend:
            click.echo(LEGEND)
            legend = False
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


def _plan(paths, recursive: bool, out_dir, suffix: str, samples, heatmap: bool, compare: bool,
          quiet: bool):
    """(inputs -> the names of their outputs, failures so far), every output folder
    checked writable before any decoding; no input at all is a one-line error."""
    from pathlib import Path

    from bpd_sr.io import imageio, outputs

    found = imageio.find_images(list(paths), recursive)
    if found.skipped and not quiet:
        click.echo(f"skipped {len(found.skipped)} file(s) that bpd-sr wrote itself")
    plans, refused = outputs.plan_outputs(found.files, found.relative,
                                          Path(out_dir) if out_dir else None, suffix,
                                          samples or 1, heatmap, compare)
    failed = found.errors + refused
    if not plans:
        if len(failed) == 1:  # one bad input: its reason is the whole error, on one line
            raise click.ClickException(f"{failed[0][0]}: {failed[0][1]}")
        _report_failures(failed)
        raise click.ClickException("no images to upscale")
    for folder in sorted({p.parent for names in plans.values() for p in names.all()}):
        _writable_folder(folder, "output folder")  # before hours of decoding, not after
    return plans, failed


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
