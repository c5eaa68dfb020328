"""`bpd-sr evaluate` and `bpd-sr benchmark`: quality and speed on sets of faces."""

from __future__ import annotations

import click

from bpd_sr.cli.common import (
    EPSILONS_COMPARED,
    RULE_HELP,
    _load_model,
    _parse_rules,
    _positive_floats,
    _writable_file,
    _writable_folder,
    _write_json,
    int_list,
    main,
    one_line_errors,
    pick_device,
    threads_option,
)
from bpd_sr.config import DEFAULT_RULE, RULES


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
@click.option("--back-projection/--no-back-projection", default=True, show_default=True,
              help="Measure the model's rows (the net alone too) as bpd-sr upscale writes "
                   "them: each 4x4 block moved to the mean of its input pixel. --no-back-"
                   "projection: the decodes as the model made them.")
@threads_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def evaluate_command(data, ks, epsilons, rules, refine, limit, temperatures, seed, batch_size,
                     checkpoint, device, json_path, loose, back_projection, threads, quiet):
    """PSNR / SSIM against the ground truth of bicubic, Lanczos, the conditioning net alone,
    sequential and blockwise decoding, for each decoding rule.

    DATA: an npz of 32x32 faces, a folder of face images, or a CelebA root. The input is the
    4x4 area mean of each face. Metrics: scikit-image PSNR (data_range 255) and SSIM
    (Gaussian weights, sigma 1.5, no sample covariance) on uint8 RGB, no border shave.
    "cond net (mean)" is the model's conditioning network on its own (no decoder): the
    expected intensity of its logits at every position, a regression baseline; "cond net
    (mu)", for a discretised-Gaussian net, is its mean mu itself, rounded: the value it is
    trained to predict, which the range does not pull inwards near black and white.
    The model's rows, the net's included, are measured as bpd-sr upscale writes its
    output: back-projected onto the input (--no-back-projection: as decoded).
    """
    from bpd_sr.evaluation.quality import format_rows, quality_rows
    from bpd_sr.io.data import load_faces

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
                            batch_size, progress=not quiet, back_projection=back_projection)
        click.echo(f"{len(hr)} faces from {path}")
        click.echo(format_rows(rows))
        results.append({"data": path, "n_images": len(hr), "rows": rows})
    if json_path:
        first = results[0]
        _write_json(json_path, {**first, "rules": rule_list,
                                "checkpoint": checkpoint or "shipped default",
                                "back_projection": back_projection,
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
              help="Also time one decoding step over k tokens against a sequential step.")
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
    seconds per image at batch 1 and speed-up over cached sequential decoding (timed in the same
    run), PSNR / SSIM; then throughput at larger batches for sequential decoding and every --k and
    --epsilon. Writes JSON, Markdown and a plot, each atomically."""
    import platform
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from bpd_sr.evaluation import speed as speed_benchmarks
    from bpd_sr.evaluation import table as paper_table
    from bpd_sr.io.atomic import write_atomic
    from bpd_sr.io.data import load_faces

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
        costs = speed_benchmarks.step_costs(model, range(1, model.cfg.k + 1), repeats=step_repeats)
        result["step_costs"] = costs
        if not quiet:
            click.echo("step cost over k tokens / sequential step: " + ", ".join(
                f"k={k}: {c['ratio_to_sequential_step']:.2f}" for k, c in costs.items()))
    hr = load_faces(data, split="test", limit=max(limit, max(batch_sizes)))
    bar = tqdm(disable=quiet, desc="table")
    result["table"] = paper_table.table(
        model, hr[:limit], ks, epsilons, rule=rule,
        progress=lambda s: bar.set_postfix_str(s) or bar.update(1))
    bar.close()
    if temperatures:
        result["sampling"] = paper_table.sampling_table(model, hr[:limit], temperatures, sampling_k)
    configs = [(1, 0)] + [(k, e) for k in ks for e in epsilons]
    result["throughput"] = paper_table.throughput(model, hr, batch_sizes, configs, rule=rule)
    out = Path(out_dir)
    _write_json(str(out / "benchmark.json"), result)
    md = paper_table.benchmark_markdown(result)
    write_atomic(out / "table.md", lambda f: f.write(md.encode()))
    written = ["benchmark.json", "table.md"]
    if plots:
        paper_table.plot(result["table"], str(out / "plots.png"))
        written.append("plots.png")
    if not quiet:
        click.echo(md)
        click.echo(f"wrote {', '.join(str(out / name) for name in written)}")


def _grid(checkpoint, data, limit, ks, epsilons, batch_sizes, rule, budget_seconds, device,
          threads, out_dir, quiet) -> None:
    """benchmark --grid: speed_benchmarks.decode_grid, printed and written as JSON."""
    from pathlib import Path

    from bpd_sr.evaluation import speed as speed_benchmarks
    from bpd_sr.io.data import load_faces

    model = _load_model(checkpoint, pick_device(device), threads)
    hr = load_faces(data, split="test", limit=limit)
    report = speed_benchmarks.decode_grid(model, hr, batch_sizes, ks, epsilons, budget_seconds, rule,
                               progress=None if quiet else lambda s: click.echo(f"... {s}", err=True))
    _write_json(str(Path(out_dir) / "grid.json"), report)
    if not quiet:
        for r in report["rows"]:
            click.echo(f"batch {r['batch_size']:3d}  k {r['k']:2d}  eps {r['epsilon']}  "
                       f"{r['seconds_per_image']:.3f} s/image  {r['tokens_per_step']:.2f} tokens/step"
                       f"  {r['speedup_vs_sequential'] or 0:.2f}x")
        click.echo(f"wrote {Path(out_dir) / 'grid.json'}")


def _speed(model, data, batch_sizes, k, tokens, compile_step, out_dir, quiet) -> None:
    """benchmark --speed: speed_benchmarks.speed_report, printed and written as JSON and Markdown."""
    from pathlib import Path

    from bpd_sr.evaluation import speed as speed_benchmarks
    from bpd_sr.io.data import load_faces

    hr = load_faces(data, split="test", limit=max(batch_sizes))
    report = speed_benchmarks.speed_report(model, hr, batch_sizes, k, compile_step, tokens,
                                progress=None if quiet else lambda s: click.echo(f"... {s}", err=True))
    out = Path(out_dir)
    _write_json(str(out / "speed.json"), report)
    md = speed_benchmarks.speed_markdown(report)
    from bpd_sr.io.atomic import write_atomic

    write_atomic(out / "speed.md", lambda f: f.write(md.encode()))
    if not quiet:
        click.echo(md)
        click.echo(f"wrote {out}/speed.json, speed.md")
