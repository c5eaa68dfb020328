"""k = "auto": the number of proposals (or sequential decoding) that is fastest at a batch size.

A blockwise step verifies k proposals, so it costs more than a sequential step over one
token: little more at batch 1, where a step is mostly reading weights and per-operation
overhead, and up to k times more once a batch makes the step compute-bound. It pays when the
tokens it accepts per step outweigh that. So the choice is

    k* = argmax over k of  E[tokens per step at k] / seconds per step at (batch, k),

with k = 1 meaning plain sequential decoding (one token per step, no proposal heads).

- Seconds per step are measured on this machine at this batch size, by timing decoder
  steps over k tokens of each candidate k as a decode runs them (a full-size cache; for
  k > 1 rows at different positions, as images that accept different lengths soon are).
- Tokens per step come from the lengths L that blockwise decoding at the model's largest k
  accepts on the first images of the batch (a short calibration decode with the same
  acceptance rule): a step at a smaller k accepts min(L, k), so
  E[tokens per step at k] = sum over j = 1..k of P(L >= j).

Both are measured once per (model, decode options, batch size, threads) and kept in memory and in a
small JSON file in the user's cache folder (``$XDG_CACHE_HOME/bpd-sr``, else
``~/.cache/bpd-sr``; ``BPD_SR_CACHE=off`` turns the file off), so repeated runs pay nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bpd_sr.config import DEFAULT_RULE, N_HR_TOKENS
from bpd_sr.decoding.loop import DecodeResult, blockwise_parallel_decode, sample_decode
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.decoding.steptime import step_function
from bpd_sr.timing import median_seconds

CANDIDATES = (1, 2, 4, 6, 8, 10)
CALIBRATION_TOKENS = 256  # tokens of up to 2 images decoded to measure acceptance
TIMING_STEPS = 5  # steps timed per candidate and round
ROUNDS = 3  # interleaved timing rounds: the median of each candidate's is kept
MARGIN = 1.1  # blockwise must promise 10% more tokens per second than sequential decoding


@dataclass
class AutoK:
    """The choice and what it rests on. k: 1 = sequential. seconds_per_step and
    tokens_per_step per candidate k (str keys, as in JSON)."""

    k: int
    batch: int
    seconds_per_step: dict[str, float]
    tokens_per_step: dict[str, float]
    calibration_seconds: float


def expected_tokens(accepted: torch.Tensor, k: int) -> float:
    """Mean tokens per step at k, from lengths accepted at a larger k: mean of min(L, k)."""
    return float(accepted.clamp(max=k).double().mean())


def pick(seconds_per_step: dict[int, float], tokens_per_step: dict[int, float],
         margin: float = MARGIN) -> int:
    """The k with the most tokens per second (ties: the smaller k); a k > 1 only when it
    promises ``margin`` times sequential decoding's rate, so that timing noise on a busy
    machine does not buy a slower decode."""
    rate = {k: tokens_per_step[k] / seconds_per_step[k] for k in seconds_per_step}
    best = max(sorted(rate), key=rate.get)
    return best if 1 not in rate or rate[best] > margin * rate[1] else 1


def _decode(model, lr, k: int, n_tokens: int, options: dict):
    if k == 1:
        return sample_decode(model, lr, options.get("temperature", 0.0), _generator(options),
                             n_tokens=n_tokens, **_sequential_options(options))
    return blockwise_parallel_decode(model, lr, k=k, n_tokens=n_tokens, **_blockwise_options(options))


def _generator(options: dict):
    return torch.Generator().manual_seed(0) if options.get("temperature", 0.0) > 0 else None


def _sequential_options(options: dict) -> dict:
    """What sequential decoding takes of the decode options: the decoding rule, when given."""
    return {k: v for k, v in options.items() if k == "rule"}


def _blockwise_options(options: dict) -> dict:
    out = dict(options)
    if out.get("temperature", 0.0) > 0:
        out["generator"] = _generator(options)
    return out


def _seconds_per_step(session: DecodingSession, lr: torch.Tensor, k: int) -> float:
    """Seconds of one decoding step over k tokens for the batch lr
    (``bpd_sr.decoding.steptime``), the rows at different positions as in a blockwise
    decode of a batch. The loop's own bookkeeping is left out (the margin covers it)."""
    step = step_function(session, lr.shape[0], k, spread=True,
                         n_slots=min(session.model.cfg.k, k), lr=lr)
    step()  # warm
    return median_seconds(step, TIMING_STEPS)


def _timed(session: DecodingSession, lr: torch.Tensor, ks) -> dict[int, float]:
    """Seconds per step of every candidate: ROUNDS interleaved rounds (every k once per round,
    so that other load on the machine hits all of them alike), the median of each."""
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(ROUNDS):
        for k in ks:
            samples[k].append(_seconds_per_step(session, lr, k))
    return {k: statistics.median(v) for k, v in samples.items()}


def _fingerprint(model, batch: int, options: dict, candidates) -> str:
    p = model.out_proj.weight
    h = hashlib.sha256()
    h.update(json.dumps([model.cfg.to_dict(), options, batch, list(candidates), str(p.device),
                         str(p.dtype), torch.get_num_threads(), torch.__version__],
                        sort_keys=True, default=str).encode())
    for t in (model.out_proj.weight, model.heads.state_dict().get("proj.weight", p)):
        h.update(t.detach().float().cpu().numpy().tobytes()[:1 << 16])
    return h.hexdigest()[:24]


def _cache_file() -> Path | None:
    if os.environ.get("BPD_SR_CACHE", "").lower() in ("off", "0", "no"):
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "bpd-sr" / "autok.json"


def _valid(entry, key_candidates: list[int]) -> AutoK | None:
    """An entry of the cache file as an AutoK, or None if it is anything else: the file is
    the user's to break (by hand, another version, a disk error), never a reason to fail."""
    if not isinstance(entry, dict):
        return None
    try:
        choice = AutoK(**entry)
    except TypeError:
        return None
    tables = (choice.seconds_per_step, choice.tokens_per_step)
    ok = (type(choice.k) is int and choice.k in key_candidates
          and type(choice.batch) is int and choice.batch >= 1
          and isinstance(choice.calibration_seconds, (int, float))
          and all(isinstance(t, dict) and all(isinstance(v, (int, float)) for v in t.values())
                  for t in tables))
    return choice if ok else None


def _read_cache(path: Path) -> dict:
    """The cache file's entries; {} for a missing, unreadable or malformed file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _load(key: str, candidates: list[int]) -> AutoK | None:
    path = _cache_file()
    return _valid(_read_cache(path).get(key), candidates) if path else None


def _save(key: str, choice: AutoK) -> None:
    """Add the choice to the cache file, atomically; whatever else in it is not a valid entry
    is dropped, so a corrupt file is rewritten whole."""
    from bpd_sr.io.atomic import write_atomic

    path = _cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in _read_cache(path).items()
                if isinstance(v, dict) and _valid(v, list(CANDIDATES)) is not None}
        data[key] = asdict(choice)
        write_atomic(path, lambda f: f.write(json.dumps(data, indent=1).encode()))
    except OSError:
        pass  # a cache that cannot be written only costs the next run a calibration


@torch.inference_mode()
def choose_k(model, lr: torch.Tensor, candidates=CANDIDATES, **options) -> AutoK:
    """The fastest k (1 = sequential) for decoding ``lr`` (uint8 (B, 8, 8, 3)) with the
    decode options ``options`` (blockwise_parallel_decode's keywords: epsilon, top_t,
    min_block, refine, rule, temperature), measured as the module docstring says.
    model: the model or a ``DecodingSession`` of it; a session remembers its choices
    (``memo``)."""
    session = DecodingSession.of(model)
    model = session.model
    batch = lr.shape[0]
    ks = sorted({1, *[k for k in candidates if 1 <= k <= model.cfg.k]})
    key = _fingerprint(model, batch, options, ks)
    memo = session.memo.setdefault("autok", {})
    if key in memo:
        return memo[key]
    choice = _load(key, ks)
    if choice is None:
        t0 = time.perf_counter()
        if len(ks) == 1:
            accepted = torch.ones(1, dtype=torch.long)
        else:
            calib = _decode(session, lr[:2], ks[-1], CALIBRATION_TOKENS, options)
            accepted = torch.cat(calib.accepted)
        secs = _timed(session, lr, ks)
        toks = {k: expected_tokens(accepted, k) if k > 1 else 1.0 for k in ks}
        choice = AutoK(
            k=pick(secs, toks), batch=batch,
            seconds_per_step={str(k): v for k, v in secs.items()},
            tokens_per_step={str(k): v for k, v in toks.items()},
            calibration_seconds=time.perf_counter() - t0,
        )
        _save(key, choice)
    memo[key] = choice
    return choice


def auto_decode(model, lr: torch.Tensor, generator: torch.Generator | None = None,
                n_tokens: int = N_HR_TOKENS, **options) -> DecodeResult:
    """Decode ``lr`` (uint8 (B, 8, 8, 3)) with the k that ``choose_k`` measures for this batch
    size and decode options (``blockwise_parallel_decode``'s keywords): blockwise with that
    k, or sequential decoding when no k pays. model: the model or a ``DecodingSession``;
    the choice is remembered by the session, and the decode runs on it."""
    session = DecodingSession.of(model)
    k = choose_k(session, lr, **options).k
    if k == 1:
        return sample_decode(session, lr, options.get("temperature", 0.0), generator, n_tokens,
                             rule=options.get("rule", DEFAULT_RULE))
    options["min_block"] = min(options.get("min_block", 1), k)
    return blockwise_parallel_decode(session, lr, k=k, generator=generator, n_tokens=n_tokens,
                                     **options)


__all__ = ["AutoK", "CANDIDATES", "auto_decode", "choose_k", "expected_tokens", "pick"]
