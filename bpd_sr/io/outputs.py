"""Where ``upscale`` writes: output names, decided for the whole batch before any decoding,
so that no result is ever lost to another.

An input ``<stem>.<ext>`` gives ``<stem><suffix>.png`` (``_s<i>`` before ``.png`` per sample
when there are several), ``..._heatmap.png`` per result and one ``<stem><suffix>_compare.png``.
They go beside the input, or under ``--output`` at the input's path relative to the folder it
was found in (``in/a/face.png`` and ``in/b/face.png`` -> ``out/a/face_x4.png`` and
``out/b/face_x4.png``, as Real-ESRGAN-style tools do). Two inputs that would still write the
same file (``face.png`` and ``face.jpg`` side by side), or an output that would be one of the
inputs, are refused before decoding: the inputs concerned fail with a one-line reason. So does an output that exists and was not
written by bpd-sr (``imageio.is_own_output``): a user's file is never replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bpd_sr.io.imageio import is_own_output


@dataclass
class OutputNames:
    """The files one input gives: results (one per sample), their heatmaps (or none) and
    the comparison strip (or None)."""

    results: list[Path]
    heatmaps: list[Path]
    compare: Path | None

    def all(self) -> list[Path]:
        return [*self.results, *self.heatmaps, *([self.compare] if self.compare else [])]


def output_names(source: Path, relative: Path, out_dir: Path | None, suffix: str,
                 samples: int = 1, heatmap: bool = False, compare: bool = False) -> OutputNames:
    """The names for one input. relative: its path relative to the folder it was found in."""
    folder = source.parent if out_dir is None else out_dir / relative.parent
    stem = f"{source.stem}{suffix}"
    results = [folder / (f"{stem}.png" if samples == 1 else f"{stem}_s{i}.png")
               for i in range(samples)]
    heatmaps = [r.with_name(f"{r.stem}_heatmap.png") for r in results] if heatmap else []
    return OutputNames(results, heatmaps, folder / f"{stem}_compare.png" if compare else None)


def plan_outputs(
    sources: list[Path], relative: list[Path], out_dir: Path | None, suffix: str,
    samples: int = 1, heatmap: bool = False, compare: bool = False,
) -> tuple[dict[Path, OutputNames], list[tuple[Path, str]]]:
    """Names for every input, and (input, one-line reason) for the inputs refused because
    an output would overwrite an input or another input's output."""
    names = {s: output_names(s, r, out_dir, suffix, samples, heatmap, compare)
             for s, r in zip(sources, relative, strict=True)}
    inputs = {s.resolve(): s for s in sources}
    claims: dict[Path, list[Path]] = {}
    for source, n in names.items():
        for path in n.all():
            claims.setdefault(path.resolve(), []).append(source)
    refused: dict[Path, str] = {}
    for path, owners in claims.items():
        if path.exists() and not is_own_output(path) and path not in inputs:
            for source in owners:  # a file of the user's: only the tool's own are replaced
                refused.setdefault(source, f"would overwrite {path}, which bpd-sr did not "
                                           "write: move it, or give another --suffix or --output")
        elif path in inputs:
            for source in owners:
                refused.setdefault(source, f"its output {path.name} would overwrite the input "
                                           f"{inputs[path]}: give another --suffix or --output")
        elif len(owners) > 1:
            for source in owners:
                others = ", ".join(str(o) for o in owners if o != source)
                refused.setdefault(source, f"would write {path} as {others} would: rename one, "
                                           "or upscale them into different --output folders")
    kept = {s: n for s, n in names.items() if s not in refused}
    return kept, [(s, refused[s]) for s in sources if s in refused]
