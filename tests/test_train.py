"""Training: every regime runs, checkpoints resume exactly, torchrun with 2 CPU processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bpd_sr.config import TrainConfig
from bpd_sr.io.pretrained import load_checkpoint, load_pretrained
from bpd_sr.training.train import TrainError, _lr_at, batch_indices, schedule_progress, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "faces.npz"
    np.savez(path, images=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    return path


def cfg(faces, out, **kw) -> TrainConfig:
    # no step profile: summarising one costs a tiny run seconds (the GPU script's test has one)
    base = dict(data=str(faces), preset="tiny", batch_size=4, max_steps=3, warmup_steps=1,
                eval_every=3, val_fraction=0.2, out=str(out), amp="fp32", profile_steps=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def base_ckpt(faces, tmp_path_factory) -> Path:
    return train(cfg(faces, tmp_path_factory.mktemp("base")), progress=False)


def test_base_run_writes_a_self_describing_checkpoint(base_ckpt):
    ck = load_checkpoint(base_ckpt)
    assert ck["step"] == 3 and ck["model_config"]["k"] == 1
    assert ck["train_config"]["regime"] == "base"
    assert "optimizer" in ck and "rng" in ck
    log = (base_ckpt.parent / "log.jsonl").read_text().splitlines()
    assert "val_bpd" in log[-1]


RUNS = {  # name: (regime, options), each trained 3 steps from the same base and seed
    "regular": ("regular", {}),
    "regular_base_targets": ("regular", {"head_targets": "base"}),
    "finetune": ("finetune", {}),
    "finetune_random_head": ("finetune", {"random_head": True}),
    "distill": ("distill", {}),
}


@pytest.fixture(scope="module")
def regimes(faces, base_ckpt, tmp_path_factory) -> dict:
    runs = {}
    for name, (regime, extra) in RUNS.items():
        out = tmp_path_factory.mktemp(name)
        path = train(cfg(faces, out, regime=regime, k=3, init=str(base_ckpt),
                         distill_cache=str(out / "distill.npz"), **extra), progress=False)
        runs[name] = (load_pretrained(path), out)
    return runs


def _same(a, b, prefix: str) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[n], sb[n]) for n in sa if n.startswith(prefix))


@pytest.mark.parametrize("name", list(RUNS))
def test_every_regime_trains_what_it_says(regimes, base_ckpt, name):
    before = load_pretrained(base_ckpt)
    after, _ = regimes[name]
    assert after.cfg.k == 3
    base_same = torch.equal(after.dec_layers[0].mlp.fc.weight, before.dec_layers[0].mlp.fc.weight)
    assert base_same == (RUNS[name][0] == "regular")  # the regular regime freezes the base
    assert after.heads.proj.weight.abs().sum() > 0  # the heads learnt: they start at zero


@pytest.mark.parametrize("a,b", [("regular", "regular_base_targets"),
                                 ("finetune", "finetune_random_head"), ("finetune", "distill")])
def test_each_option_changes_what_is_learnt(regimes, a, b):
    """An option that were ignored would give the same weights as the run without it."""
    assert not _same(regimes[a][0], regimes[b][0], "heads.")


def test_distill_learns_from_the_base_models_own_decodes(regimes, base_ckpt, faces):
    """The distillation targets are the base model's sequential decodes (the default rule) of
    exactly the training split's inputs, in its order."""
    from bpd_sr.decoding.loop import sequential_decode
    from bpd_sr.model.tokens import downsample
    from bpd_sr.training.train import split_faces

    _, out = regimes["distill"]
    decodes = np.load(out / "distill.npz")["images"]
    train_faces, _ = split_faces(cfg(faces, out), progress=False)
    assert decodes.shape == tuple(train_faces.shape)
    expect = sequential_decode(load_pretrained(base_ckpt), downsample(train_faces[:2])).images
    assert np.array_equal(decodes[:2], expect.numpy())
    # decodes, not the training images themselves
    assert not np.array_equal(decodes[:2], train_faces[:2].numpy())


def test_the_cpu_bf16_training_path(faces, tmp_path):
    """amp=bf16 trains under CPU autocast: the same run as fp32 to bf16 rounding (close,
    not equal), with float32 master weights in the checkpoint."""
    import json

    runs = {}
    for amp in ("fp32", "bf16"):
        path = train(cfg(faces, tmp_path / amp, amp=amp, max_steps=2, eval_every=1), progress=False)
        log = [json.loads(x) for x in (tmp_path / amp / "log.jsonl").read_text().splitlines()]
        runs[amp] = (load_checkpoint(path), log[0]["bpd"])
    (ck32, loss32), (ck16, loss16) = runs["fp32"], runs["bf16"]
    assert all(v.dtype == torch.float32 for v in ck16["model"].values() if v.is_floating_point())
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.02 * loss32
    w32, w16 = ck32["model"]["dec_layers.0.mlp.fc.weight"], ck16["model"]["dec_layers.0.mlp.fc.weight"]
    assert not torch.equal(w32, w16) and torch.allclose(w32, w16, atol=1e-2)


def test_regime_errors(faces, tmp_path):
    with pytest.raises(TrainError):
        train(cfg(faces, tmp_path, regime="finetune", k=3), progress=False)  # no --init
    with pytest.raises(TrainError):
        train(cfg(faces, tmp_path, regime="magic"), progress=False)


def test_batches_are_a_function_of_seed_and_step():
    a = batch_indices(100, 8, 37, seed=1)
    assert torch.equal(a, batch_indices(100, 8, 37, seed=1))
    assert not torch.equal(a, batch_indices(100, 8, 38, seed=1))
    r0, r1 = batch_indices(100, 8, 5, 1, rank=0, world=2), batch_indices(100, 8, 5, 1, rank=1, world=2)
    assert not set(r0.tolist()) & set(r1.tolist())  # ranks see different images


def test_resume_after_kill_continues_exactly(faces, tmp_path):
    """Kill a run (SIGKILL) after its first checkpoint; --resume ends where an unbroken run ends."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bpd_sr", "train", "--data", str(faces), "--preset", "tiny",
           "--batch-size", "4", "--max-steps", "8", "--warmup-steps", "1", "--eval-every", "100",
           "--amp", "fp32", "--profile-steps", "0", "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "whole")], cwd=ROOT, check=True)
    whole = tmp_path / "whole" / "last.pt"
    cmd += ["--out", str(out)]
    proc = subprocess.Popen([*cmd, "--ckpt-minutes", "0"], cwd=ROOT)  # checkpoint every step
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "last.pt").exists() and load_checkpoint(out / "last.pt")["step"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / "last.pt")["step"]
    assert killed_at < 8
    subprocess.run([*cmd, "--resume"], cwd=ROOT, check=True)
    a, b = load_checkpoint(whole), load_checkpoint(out / "last.pt")
    assert b["step"] == 8
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_extending_a_finished_run_keeps_decaying_the_learning_rate(faces, tmp_path):
    """Resuming with a larger budget must not re-warm the cosine schedule."""
    first = train(cfg(faces, tmp_path, max_steps=6, eval_every=1), progress=False)
    lrs = [e["lr"] for e in load_checkpoint(first)["log"]]
    train(cfg(faces, tmp_path, max_steps=12, eval_every=1), resume=True, progress=False)
    log = load_checkpoint(tmp_path / "last.pt")["log"]
    assert [e["step"] for e in log] == list(range(1, 13))
    extended = [e["lr"] for e in log[6:]]
    assert all(b <= a + 1e-12 for a, b in zip([lrs[-1], *extended], extended, strict=False))
    # a partial run extended mid-way continues from the rate it had reached
    mid = TrainConfig(max_steps=10, warmup_steps=1, lr=1.0, min_lr_ratio=0.0)
    p = schedule_progress(mid, 5, 0.0)
    anchor = (p, 5, 0.0)
    longer = replace(mid, max_steps=20)
    assert _lr_at(longer, 5, 0.0, anchor) == pytest.approx(_lr_at(mid, 5, 0.0))
    assert _lr_at(longer, 20, 0.0, anchor) == pytest.approx(0.0, abs=1e-12)
    assert _lr_at(longer, 5, 0.0) > _lr_at(mid, 5, 0.0)  # what re-warming would have done


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_two_cpu_processes(faces, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "bpd_sr", "train",
         "--data", str(faces), "--preset", "tiny", "--batch-size", "2", "--max-steps", "2",
         "--warmup-steps", "1", "--eval-every", "2", "--amp", "fp32", "--out", str(tmp_path),
         "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2
    assert ck["log"][-1]["images_per_s"] > 0
    assert ck["log"][-1]["world_size"] == 2


def test_gpu_finetune_script_runs_on_the_cpu(tmp_path):
    """The one-shot device script (docs/training/gpu_finetune.sh) end to end with a tiny
    model under a short deadline: what a GPU session runs as it is. It must end within its
    deadline and leave weights, log, profile and the decode grid in $OUT, with no test set."""
    import json

    from bpd_sr.io.pretrained import load_pretrained, save_checkpoint
    from tests.conftest import tiny_model

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", images=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    init = save_checkpoint(tmp_path / "init.pt", tiny_model(k=2, dtype=torch.float32))
    out = tmp_path / "out"
    deadline = 48
    env = dict(os.environ, OUT=str(out), RUNS=str(tmp_path / "runs"), BS="4", K="2",
               DATA=str(tmp_path / "train.npz"), INIT=str(init), DEVICE="cpu",
               DEADLINE=str(deadline), GRID_SECONDS="4", MARGIN="4", STOP_GAP="16",
               GRID_RESERVE="3", EVAL_EVERY="1000", GRID_BATCHES="1,2", GRID_KS="2", PROFILE_STEPS="4",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(root / "docs/training/gpu_finetune.sh")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert took < deadline + 10, took  # the deadline holds (a few seconds for bash itself)
    for name in ("default.pt", "log.jsonl", "profile.txt", "grid.json", "run.txt"):
        assert (out / name).is_file(), name
    model = load_pretrained(out / "default.pt")
    assert model.cfg.k == 2
    grid = json.loads((out / "grid.json").read_text())
    assert grid["rows"][0]["k"] == 1 and grid["rows"][0]["tokens_per_step"] == 1.0
    assert "self_cpu_time_total" in (out / "profile.txt").read_text()


def test_the_gpu_script_refuses_a_learning_rate_above_the_previous_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    previous = float((root / "docs/training/previous_peak_lr").read_text())
    env = dict(os.environ, OUT=str(tmp_path), LR=str(previous * 2), DATA=__file__,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["bash", str(root / "docs/training/gpu_finetune.sh")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "above the previous run's peak" in res.stderr


@pytest.mark.parametrize("how", ["kill", "term"])
def test_a_run_stopped_at_a_deadline_leaves_weights(faces, tmp_path, how):
    """--export writes an inference checkpoint every --export-minutes: a run killed outright
    (SIGKILL) still leaves its last export; one told to stop (SIGTERM) saves and exports."""
    export = tmp_path / "export.pt"
    cmd = [sys.executable, "-m", "bpd_sr", "train", "--data", str(faces), "--preset", "tiny",
           "--batch-size", "4", "--max-steps", "100000", "--warmup-steps", "1", "--eval-every",
           "1000", "--amp", "fp32", "--quiet", "--out", str(tmp_path / "run"), "--export",
           str(export), "--export-minutes", "0.002", "--profile-steps", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not export.exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    about = load_checkpoint(export)["about"]
    assert about["step"] > 0 and "optimizer" not in load_checkpoint(export)
    if how == "term":
        assert proc.returncode == 130 and "checkpoint saved" in err, (proc.returncode, err[-2000:])
        assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == about["step"]


def test_sigterm_stops_at_the_stop_point_not_where_it_lands():
    """SIGTERM inside the context raises nothing where it lands (it could be inside a
    checkpoint being written); the stop point raises KeyboardInterrupt, and the old
    handler is back afterwards."""
    from bpd_sr.training.stopping import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt() as stop_point:
        stop_point()  # nothing has come yet
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now, and raised nothing
        with pytest.raises(KeyboardInterrupt):
            stop_point()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_checkpoint_of_another_version_resumes(faces, tmp_path, capsys):
    """An older version saved a training setting this one does not know (num_workers):
    resuming used to raise a traceback; now the setting is dropped with a note."""
    train(cfg(faces, tmp_path, max_steps=2), progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    state["train_config"]["num_workers"] = 4
    torch.save(state, tmp_path / "last.pt")
    train(cfg(faces, tmp_path, max_steps=4), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert "ignoring settings of another bpd-sr version: num_workers" in capsys.readouterr().out


def test_resuming_what_cannot_be_resumed_is_one_line(faces, tmp_path):
    from click.testing import CliRunner

    from bpd_sr.cli import main
    from bpd_sr.io.pretrained import save_checkpoint
    from tests.conftest import tiny_model

    save_checkpoint(tmp_path / "last.pt", tiny_model(k=1, dtype=torch.float32))  # no optimizer
    res = CliRunner().invoke(main, ["train", "--data", str(faces), "--preset", "tiny",
                                    "--out", str(tmp_path), "--resume", "--quiet"])
    assert res.exit_code != 0 and "cannot be resumed" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_one_cross_entropy_equals_the_loss_of_each_slot():
    """sr_loss scores every (position, slot) at once; it must equal the per-slot losses it
    replaced: slot i at p against target p + i, past the end left out, the mean over slots."""
    import math

    import torch.nn.functional as F

    from bpd_sr.training.loss import sr_loss

    g = torch.Generator().manual_seed(0)
    b, t, k = 2, 3072, 4
    logits = torch.randn(b, t, k, 256, generator=g)
    cond = torch.randn(b, t, 256, generator=g)
    targets = torch.randint(0, 256, (b, t), generator=g)
    head_targets = torch.randint(0, 256, (b, t), generator=g)

    def ce(i, tg):
        return F.cross_entropy(logits[:, : t - i, i].flatten(0, 1), tg[:, i:].flatten())

    base = ce(0, targets)
    cond_ce = F.cross_entropy(cond.flatten(0, 1), targets.flatten())
    for slot, tg in [(None, None), (2, None), (None, head_targets)]:
        loss, stats = sr_loss(logits, cond, targets, 0.5, slot, tg)
        heads = [ce(i, targets if tg is None else tg) for i in ([slot] if slot else range(1, k))]
        want = base + 0.5 * cond_ce + torch.stack(heads).mean()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(stats["heads_bpd"], torch.stack(heads).mean() / math.log(2))


def test_compiling_falls_back_to_eager_when_it_fails_or_does_not_pay(monkeypatch):
    from bpd_sr.training import trainspeed

    calls = []

    def step(x):
        calls.append("eager")
        return x + 1

    def broken(fn):
        def run(*a):
            raise RuntimeError("inductor exploded\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    fn = trainspeed.StepFunction(step, "on", torch.device("cpu"), None)
    assert [fn(i) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert fn.notes["compiled"] is False and fn.notes["compile_error"] == "inductor exploded"

    def slow(fn_):
        def run(*a):
            time.sleep(0.05)
            return fn_(*a)
        return run

    monkeypatch.setattr(torch, "compile", slow)
    fn = trainspeed.StepFunction(step, "on", torch.device("cpu"), None)
    assert [fn(i) for i in range(10)] == list(range(1, 11))
    assert fn.phase == "eager" and fn.notes["compiled"] is False  # slower: dropped
    assert fn.notes["compiled_step_s"] > fn.notes["eager_step_s"]
    # auto on a CPU, or with too little budget left on any device: never compiled
    assert trainspeed.StepFunction(step, "auto", torch.device("cpu"), None).compiled is None
    assert trainspeed.StepFunction(step, "auto", torch.device("cuda"), 1.0).compiled is None


def test_the_training_loop_reads_the_device_only_at_log_points(faces, tmp_path, monkeypatch):
    """A host sync per step stalls a GPU: losses are read where they are logged. Counted:
    reads made by bpd-sr's own code (the CPU optimizer reads its step counter, a CPU
    tensor; on a GPU the fused optimizer does not)."""
    reads = []

    def counting(original):
        def read(t, *a, **kw):
            if "bpd_sr" in sys._getframe(1).f_code.co_filename:
                reads.append(1)
            return original(t, *a, **kw)
        return read

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    train(cfg(faces, tmp_path, regime="base", max_steps=12, eval_every=6, val_fraction=0.0,
              profile_steps=0), progress=False)
    monkeypatch.undo()
    assert len(reads) <= 2 * 3 + 2, len(reads)  # 2 log points x 3 statistics, and setting up


def test_resume_refuses_settings_it_would_ignore(base_ckpt, faces):
    from click.testing import CliRunner

    from bpd_sr.cli import main

    out = str(base_ckpt.parent)
    res = CliRunner().invoke(main, ["train", "--data", str(faces), "--resume", "--out", out,
                                    "--preset", "small", "--batch-size", "4"])
    assert res.exit_code == 2 and "--preset small (the run has tiny)" in res.output
