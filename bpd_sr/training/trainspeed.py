"""What makes a training step fast without changing what it computes: an optional compiled
forward-and-loss with a fallback to eager, a 20-step profile of every run, and the choice of
bf16 autocast where the hardware has it.

A lent GPU comes for minutes at a time, so a run must never lose them to a compile that
fails or does not pay: ``StepFunction`` compiles only when asked ("on") or when it can pay
("auto": on a GPU with at least ``MIN_MINUTES_TO_COMPILE`` of budget left), times a few
compiled steps against eager ones, and keeps whichever is faster.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bpd_sr.io.atomic import write_atomic
from bpd_sr.quiet import quiet_stderr

COMPILE_MODES = ("auto", "on", "off")
MIN_MINUTES_TO_COMPILE = 3.0  # compiling the step takes about a minute; below this it cannot pay
TIMED_STEPS = 3  # steps timed per variant before choosing


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here: a CUDA device that supports them,
    or a CPU with AVX512-BF16 or AMX (elsewhere CPU autocast emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepFunction:
    """forward + loss (``fn(*args) -> (loss, stats)``), eager or compiled.

    mode "off": eager. "on": compiled, back to eager if compiling raises. "auto": as "on" on
    a GPU when at least MIN_MINUTES_TO_COMPILE of the run's budget is left, else eager.
    After TIMED_STEPS eager and TIMED_STEPS compiled steps (the compile call itself not
    counted), the faster one is kept. ``notes`` says what happened, for the log.
    """

    def __init__(self, fn: Callable, mode: str, device: torch.device,
                 minutes_left: float | None) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.eager, self.device = fn, device
        self.notes: dict[str, object] = {"compile": mode}
        want = mode == "on" or (mode == "auto" and device.type == "cuda" and (
            minutes_left is None or minutes_left >= MIN_MINUTES_TO_COMPILE))
        self.compiled = torch.compile(fn) if want else None
        self.phase = "eager_timing" if want else "eager"
        self.times: dict[str, list[float]] = {"eager": [], "compiled": []}
        if not want:
            self.notes["compiled"] = False

    def __call__(self, *args):
        if self.phase == "eager":
            return self.eager(*args)
        if self.phase == "compiled":
            return self.compiled(*args)
        return self._timed(*args)

    def _timed(self, *args):
        """The choosing phase: eager steps, the compile call, compiled steps, each timed."""
        variant = "eager" if self.phase == "eager_timing" else "compiled"
        fn = self.eager if variant == "eager" else self.compiled
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # any compiler failure: train on, eagerly
            if variant == "eager":
                raise
            self.phase, self.compiled = "eager", None
            self.notes.update(compiled=False, compile_error=str(e).strip().splitlines()[0][:200])
            return self.eager(*args)
        synchronize(self.device)
        dt = time.perf_counter() - t0
        if self.phase == "compiling":
            self.notes["compile_seconds"] = round(dt, 1)
            self.phase = "compiled_timing"
            return out
        self.times[variant].append(dt)
        if variant == "eager" and len(self.times["eager"]) >= TIMED_STEPS:
            self.phase = "compiling"
        elif variant == "compiled" and len(self.times["compiled"]) >= TIMED_STEPS:
            eager, compiled = (min(self.times[v]) for v in ("eager", "compiled"))
            keep = compiled < 0.97 * eager
            self.phase = "compiled" if keep else "eager"
            self.notes.update(compiled=keep, eager_step_s=round(eager, 4),
                              compiled_step_s=round(compiled, 4))
        return out


class StepProfiler:
    """Profiles ``steps`` training steps after ``skip`` warm-up steps; ``write`` puts the
    summary table (the operators that took the time) into ``path``. Summarising parses
    every recorded event (seconds of CPU), so the run calls ``write`` after its last save
    and export: a deadline never costs weights for a profile."""

    def __init__(self, path: Path, device: torch.device, steps: int = 20, skip: int = 3,
                 header: str = "") -> None:
        self.path, self.device, self.steps, self.skip, self.header = path, device, steps, skip, header
        self.seen, self.prof, self.done, self.t0, self.seconds = 0, None, None, 0.0, 0.0

    def step_done(self) -> None:
        """Call after every step."""
        if self.steps <= 0 or self.done is not None:
            return
        self.seen += 1
        if self.seen == self.skip:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with quiet_stderr():
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.__enter__()
            synchronize(self.device)
            self.t0 = time.perf_counter()
        elif self.prof is not None and self.seen == self.skip + self.steps:
            self.stop()

    def stop(self) -> None:
        """Stop recording (a run shorter than skip + steps stops at its end)."""
        if self.prof is None:
            return
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        with quiet_stderr():
            self.prof.__exit__(None, None, None)
        self.done, self.prof = self.prof, None

    def write(self) -> None:
        self.stop()
        if self.done is None:
            return
        n = self.seen - self.skip
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with quiet_stderr():
            table = self.done.key_averages().table(sort_by=key, row_limit=30)
        self.done = None
        text = (f"{self.header}\nprofiled {n} steps: {self.seconds / max(1, n):.4f} s per step "
                f"(with the profiler's overhead), sorted by {key}\n\n{table}\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, lambda f: f.write(text.encode()))
