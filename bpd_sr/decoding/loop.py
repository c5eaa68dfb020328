"""Greedy decoding and blockwise parallel decoding (Stern, Shazeer and Uszkoreit 2018).

The functions here take the model as an argument and return a ``DecodeResult``; the model
holds no loop. Blockwise parallel decoding (paper section 3, with the combined scoring and
proposal of section 4) is a short loop over four named steps:

1. **propose**: the k proposal slots at the last accepted position give the next k tokens;
   slot 0 is the base model's own next token, so it is always right.
2. **verify**: one decoder pass over the k proposals (cached, at their positions) gives the
   base model's prediction after each proposal.
3. **accept**: keep the longest prefix of proposals that pass the test against the base
   prediction (exact match, distance <= epsilon, or top-t; section 5.2), at least
   ``min_block`` (section 5.3); ``torch.cumprod`` finds it for the whole batch at once.
4. **commit**: write the accepted tokens and move each image's pointer. The same verify pass
   already computed the hidden state at the last accepted position, so the next proposals
   cost no extra decoder pass: model calls = steps + 1.

Every image of a batch advances by its own accepted length; finished images leave the batch.
Rejected proposals are forgotten by not moving the pointer (see ``bpd_sr.decoding.cache``).

Beyond the paper, ``temperature > 0`` turns the same loop into exact sampling from the base
model's tempered distribution (speculative sampling: Leviathan et al. 2023, arXiv 2211.17192;
Chen et al. 2023, arXiv 2302.01318): proposal x ~ q (the head's distribution) is kept with
probability min(1, p(x) / q(x)); at the first rejection a token is drawn from the normalised
max(0, p - q); when all are kept the next token is drawn from p.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding.acceptance import (
    Proposer,
    rule_proposer,
)
from bpd_sr.decoding.acceptors import RuleAcceptor, SpeculativeAcceptor, draw_tokens
from bpd_sr.decoding.cache import GATHERED, Layout
from bpd_sr.decoding.rules import DEFAULT_RULE, apply_rule, check_rule
from bpd_sr.decoding.session import DecodingSession
from bpd_sr.model.tokens import BOS, previous_token_inputs, tokens_to_image
from bpd_sr.model.transformer import EncoderContext, ImageTransformer


@dataclass
class DecodeResult:
    """What a decode produced, and how.

    images: uint8 (B, 32, 32, 3).
    accepted: B 1-D long tensors, the number of tokens committed by each step.
    step_index: long (B, 32, 32, 3), the (0-based) step that committed each intensity.
    model_calls: decoder forward passes for the whole batch.
    seconds: wall-clock time of the decode.
    """

    images: torch.Tensor
    accepted: list[torch.Tensor]
    step_index: torch.Tensor
    model_calls: int
    seconds: float

    @property
    def steps(self) -> list[int]:
        return [len(a) for a in self.accepted]

    @property
    def mean_accepted(self) -> float:
        """Mean accepted block size: tokens per step, over all steps of all images."""
        return tokens_per_step(self.accepted)


def tokens_per_step(accepted: list[torch.Tensor]) -> float:
    """Mean accepted block size over every step of every image: accepted holds one 1-D
    long tensor per image, the tokens each of its steps committed."""
    total = sum(int(a.sum()) for a in accepted)
    return total / max(1, sum(len(a) for a in accepted))


def _prepare(session: DecodingSession, lr: torch.Tensor, n_tokens: int = N_HR_TOKENS):
    if lr.dtype != torch.uint8 or lr.dim() != 4 or tuple(lr.shape[1:]) != (8, 8, 3):
        raise ValueError(f"lr must be a uint8 tensor (B, 8, 8, 3), got {lr.dtype} {tuple(lr.shape)}")
    if not 1 <= n_tokens <= N_HR_TOKENS:
        raise ValueError(f"n_tokens must be in 1..{N_HR_TOKENS}")
    model = session.model
    lr = lr.to(next(model.parameters()).device)
    return (lr, model.encode(lr, n_positions=n_tokens),
            session.new_cache(lr.shape[0], max_len=n_tokens + model.cfg.k + 1))


def _result(tokens, step_of, acc, n_steps, calls, t0) -> DecodeResult:
    b = tokens.shape[0]
    return DecodeResult(
        images=tokens_to_image(tokens[:, :N_HR_TOKENS].cpu()),
        accepted=[acc[i, : n_steps[i]].cpu() for i in range(b)],
        step_index=step_of[:, :N_HR_TOKENS].reshape(b, 32, 32, 3).cpu(),
        model_calls=calls,
        seconds=time.perf_counter() - t0,
    )


@torch.inference_mode()
def sample_decode(
    model: ImageTransformer | DecodingSession, lr: torch.Tensor, temperature: float = 1.0,
    generator: torch.Generator | None = None, n_tokens: int = N_HR_TOKENS,
    rule: str = DEFAULT_RULE,
) -> DecodeResult:
    """Ancestral sampling from the base model at a temperature, one token per decoder call.

    The reference for sampling; temperature 0 is sequential decoding with ``rule`` (the
    decoding rule, ``bpd_sr.decoding.rules``; ignored when sampling). lr: uint8 (B, 8, 8, 3).
    n_tokens: decode only the first n tokens (the rest stay 0; for tests). model: the model,
    or a ``DecodingSession`` of it (compiled step, memos).
    """
    check_rule(rule)
    t0 = time.perf_counter()
    session = DecodingSession.of(model)
    lr, ctx, cache = _prepare(session, lr, n_tokens)
    b, dev = lr.shape[0], lr.device
    rows = torch.arange(b, device=dev)
    tokens = torch.zeros(b, N_HR_TOKENS, dtype=torch.long, device=dev)
    inputs = torch.full((b, 1), BOS, dtype=torch.long, device=dev)
    for p in range(n_tokens):
        pos = torch.full((b, 1), p, dtype=torch.long, device=dev)
        # every row at position p, known here: no host-device sync per token
        layout = None if _PROBE_LAYOUT else (0, p)
        h = session.decoder_hidden(ctx, inputs, pos, cache, rows, layout)
        logits = session.logits(ctx, h, pos, 1, layout)[:, 0, 0]  # (B, 256)
        if temperature > 0:
            nxt = draw_tokens(torch.softmax(logits.double() / temperature, -1), generator)
        else:
            nxt = apply_rule(logits, rule)
        tokens[:, p] = nxt
        inputs = previous_token_inputs(nxt[:, None], pos + 1)
    step_of = torch.arange(N_HR_TOKENS, device=dev).expand(b, -1)
    acc = torch.ones(b, N_HR_TOKENS, dtype=torch.long)
    return _result(tokens, step_of, acc, [n_tokens] * b, n_tokens, t0)


def sequential_decode(
    model: ImageTransformer | DecodingSession, lr: torch.Tensor, n_tokens: int = N_HR_TOKENS,
    rule: str = DEFAULT_RULE,
) -> DecodeResult:
    """The reference: sequential decoding, one token per decoder call, with the key/value
    cache; each token is ``rule`` applied to the model's distribution (``"argmax"``: the
    paper's greedy decoding; ``"mean"``: the expected intensity, the package default).

    lr: uint8 (B, 8, 8, 3). Model calls = 3072.
    """
    return sample_decode(model, lr, temperature=0.0, n_tokens=n_tokens, rule=rule)


# the name of earlier versions: it runs the package's decoding rule, which is greedy (argmax)
# only with rule="argmax"
greedy_decode = sequential_decode


@dataclass
class _Batch:
    """The live part of a blockwise decode: images that are not finished yet.

    rows: long (b,) their rows in the full batch (and in the cache); n: long (b,) tokens
    committed so far; proposals: long (b, k) this step's proposals, fed at n + 1 + j (proposal
    0 is the base's own next token); q: (b, k, 256) their distributions when sampling.
    rows_host, n_host: the same rows and counts as Python lists, read once per step (the
    loop's one host-device sync): they tell the decoder where a lone image sits, so that it
    plans its step without reading the device again, and which images have finished.
    """

    rows: torch.Tensor
    n: torch.Tensor
    proposals: torch.Tensor
    q: torch.Tensor | None
    ctx: EncoderContext
    rows_host: list[int]
    n_host: list[int]

    def layout(self, offset: int) -> Layout:
        """The decoder call's layout (``bpd_sr.decoding.cache``) when every row is fed at n + offset:
        a lone image's position is known; the rows of a batch sit at their own positions."""
        if _PROBE_LAYOUT:
            return None
        if len(self.rows_host) == 1:
            return (self.rows_host[0], self.n_host[0] + offset)
        return GATHERED


# True only inside ``probing_layout``: the decoder then reads its rows and positions from the
# device at every call, as it did before the loop kept them on the host (the benchmark's
# measure of what those host syncs cost).
_PROBE_LAYOUT = False


@contextmanager
def probing_layout():
    """Decode as if the loop did not know its layout on the host: 3-4 host-device syncs per
    step instead of one. Same outputs; for measuring the syncs' cost (``bpd_sr.evaluation.speed.decode_grid``)."""
    global _PROBE_LAYOUT
    _PROBE_LAYOUT = True
    try:
        yield
    finally:
        _PROBE_LAYOUT = False


@torch.inference_mode()
def blockwise_parallel_decode(
    model: ImageTransformer | DecodingSession,
    lr: torch.Tensor,
    k: int | str | None = None,
    epsilon: int = 0,
    top_t: int | None = None,
    min_block: int = 1,
    proposer: Proposer | None = None,
    rule: str = DEFAULT_RULE,
    refine: int | None = 255,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    n_tokens: int = N_HR_TOKENS,
) -> DecodeResult:
    """Blockwise parallel decoding of a batch of low-res images.

    lr: uint8 (B, 8, 8, 3). k: proposals per step, 1 <= k <= model.cfg.k (default: all); the
    fastest k measured for a batch and rule is ``bpd_sr.decoding.autok.auto_decode``.
    rule: the decoding rule (``bpd_sr.decoding.rules``): it gives the proposals (each slot's rule
    value, unless ``proposer`` is given) and the base's choice each proposal is tested
    against. epsilon / top_t: the acceptance test (``acceptance_test``). min_block: accept at
    least this many tokens per step even if they fail the test (section 5.3).
    With epsilon = 0, top_t = None and min_block = 1 the output equals
    ``sequential_decode(model, lr, rule=rule)`` (in float32 up to rounding across matrix shapes:
    README, "Exactness").
    refine: after a partial acceptance, take the next proposals from the verify pass itself
    where the first rejected proposal was within ``refine`` levels of the base's choice
    (Jacobi-style; ``refine_from_verify``); 255 (the default): always, None: never. It
    changes only which tokens are proposed, never what exact acceptance outputs (its effect
    on tokens per step: README, "Levers"). Not used when
    sampling, whose proposals must be draws from the heads.
    temperature > 0: exact sampling at that temperature (speculative sampling; the
    proposals are drawn from the heads, ``generator`` makes it reproducible).
    n_tokens: decode only the first n tokens (the rest stay 0; for tests). model: the model,
    or a ``DecodingSession`` of it (compiled step, memos).
    """
    session = DecodingSession.of(model)
    acceptor = _acceptor(session.model.cfg.k, k, epsilon, top_t, min_block, proposer, rule,
                         refine, temperature, generator)
    k = acceptor.k
    t0 = time.perf_counter()
    lr, ctx_all, cache = _prepare(session, lr, n_tokens)
    b, dev = lr.shape[0], lr.device
    ar_k = torch.arange(k, device=dev)
    record = _Record(b, k, dev)
    live, calls = _start(session, ctx_all, cache, acceptor), 1
    while live.rows.numel() > 0:
        pos, h, base = _verify(session, live, cache, ar_k)  # 2. verify (one model call)
        calls += 1
        n_ok, verdict = acceptor.accept(live, base)  # 3. accept
        n_acc = torch.minimum(n_ok + 1, n_tokens - live.n)  # (b,), in 1..k
        record.commit(live, n_acc)  # 4. commit
        live.n = live.n + n_acc
        live.n_host = live.n.tolist()  # the step's one host-device sync
        _propose_next(session, live, h, pos, n_ok, verdict, acceptor, n_tokens)  # 1. propose
        live = _without_finished(live, ctx_all, n_tokens)
    return record.result(n_tokens, calls, t0)


def _acceptor(n_slots: int, k, epsilon, top_t, min_block, proposer, rule, refine,
              temperature, generator):
    """The acceptor of a decode's settings (``blockwise_parallel_decode``'s), checked: one
    line of ValueError for a bad one. n_slots: the model's proposal slots."""
    if k == "auto":
        raise ValueError('k="auto" is measured by bpd_sr.decoding.autok.auto_decode')
    k = n_slots if k is None else k
    if not isinstance(k, int) or not 1 <= k <= n_slots:
        raise ValueError(f"k must be in 1..{n_slots} for this model, got {k}")
    if not 1 <= min_block <= k:
        raise ValueError(f"min_block must be in 1..k, got {min_block}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    check_rule(rule)
    if temperature > 0:
        if epsilon or top_t is not None or min_block > 1 or proposer is not None:
            raise ValueError("sampling (temperature > 0) uses its own exact acceptance rule")
        return SpeculativeAcceptor(k, temperature, generator)
    return RuleAcceptor(k, proposer or rule_proposer(rule), rule, epsilon, top_t, min_block,
                        refine)


def _start(session: DecodingSession, ctx_all: EncoderContext, cache, acceptor) -> _Batch:
    """The first call reads BOS at position 0 and yields the first k proposals."""
    b, dev = ctx_all.dec_pos.shape[0], ctx_all.dec_pos.device
    live = _Batch(torch.arange(b, device=dev), torch.zeros(b, dtype=torch.long, device=dev),
                  None, None, ctx_all, list(range(b)), [0] * b)
    pos0 = torch.zeros(b, 1, dtype=torch.long, device=dev)
    h = session.decoder_hidden(ctx_all, torch.full_like(pos0, BOS), pos0, cache, live.rows,
                               layout=(0, 0))
    live.proposals, live.q = acceptor.propose(
        live, session.logits(ctx_all, h, pos0, acceptor.k, (0, 0))[:, 0])
    return live


def _propose_next(session: DecodingSession, live: _Batch, h: torch.Tensor, pos: torch.Tensor,
                  n_ok: torch.Tensor, verdict: torch.Tensor, acceptor, n_tokens: int) -> None:
    """1. propose (for the next step) from the slots at the last accepted position, in the
    same verify pass: no extra model call. verdict: what ``accept`` returned beside n_ok."""
    sel = torch.arange(live.rows.numel(), device=n_ok.device)
    h_last, pos_last = h[sel, n_ok][:, None], pos[sel, n_ok][:, None]
    # pos_last is the new n, except for an image cut at n_tokens, which is finished
    layout = live.layout(0) if max(live.n_host) < n_tokens else GATHERED
    first = acceptor.first_of_next(n_ok, verdict, live.q)
    old = live.proposals
    live.proposals, live.q = acceptor.propose(
        live, session.logits(live.ctx, h_last, pos_last, acceptor.k, layout)[:, 0], first)
    live.proposals = acceptor.revise(live.proposals, old, verdict, n_ok)


def _verify(session: DecodingSession, live: _Batch, cache, ar_k: torch.Tensor):
    """2. verify: proposal j is fed at position n + 1 + j; the base prediction there is the
    model's choice for target n + 1 + j given the proposals before it.
    Returns pos long (b, k), decoder states h (b, k, d) and base logits (b, k, 256)."""
    pos = live.n[:, None] + 1 + ar_k
    h = session.decoder_hidden(live.ctx, previous_token_inputs(live.proposals, pos), pos, cache,
                               live.rows, live.layout(1))
    return pos, h, session.logits(live.ctx, h, pos, 1, GATHERED)[:, :, 0]


def _without_finished(live: _Batch, ctx_all: EncoderContext, n_tokens: int) -> _Batch:
    """Finished images leave the batch: they cost nothing more. Read from the host copy of
    n: no extra sync."""
    keep_host = [i for i, n in enumerate(live.n_host) if n < n_tokens]
    if len(keep_host) == len(live.n_host):
        return live
    keep = torch.tensor(keep_host, dtype=torch.long, device=live.n.device)
    rows = live.rows[keep]
    return _Batch(rows, live.n[keep], live.proposals[keep],
                  live.q[keep] if live.q is not None else None, ctx_all.select(rows),
                  [live.rows_host[i] for i in keep_host], [live.n_host[i] for i in keep_host])


class _Record:
    """What a blockwise decode has committed: tokens long (B, 3072 + k) (+k: a scratch tail
    for the proposals past the accepted ones), the step of each token, and the accepted
    length of every step of every image."""

    def __init__(self, b: int, k: int, dev: torch.device) -> None:
        self.k = k
        self.tokens = torch.zeros(b, N_HR_TOKENS + k, dtype=torch.long, device=dev)
        self.step_of = torch.zeros_like(self.tokens)
        self.acc = torch.zeros(b, N_HR_TOKENS, dtype=torch.long, device=dev)
        self.n_steps = torch.zeros(b, dtype=torch.long, device=dev)

    def commit(self, live: _Batch, n_acc: torch.Tensor) -> None:
        """4. commit: write all k proposals (the tail past n_acc is scratch, overwritten by
        the next step) and the step's accepted length."""
        rows = live.rows
        write_pos = live.n[:, None] + torch.arange(self.k, device=rows.device)
        self.tokens[rows[:, None], write_pos] = live.proposals
        self.step_of[rows[:, None], write_pos] = self.n_steps[rows, None]
        self.acc[rows, self.n_steps[rows]] = n_acc
        self.n_steps[rows] += 1

    def result(self, n_tokens: int, calls: int, t0: float) -> DecodeResult:
        self.tokens[:, n_tokens:] = 0  # the scratch tail past the last token: "the rest stay 0"
        self.step_of[:, n_tokens:] = 0
        return _result(self.tokens, self.step_of, self.acc, self.n_steps.tolist(), calls, t0)


