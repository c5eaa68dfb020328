"""The acceptors of blockwise parallel decoding: one per kind of acceptance. Each proposes
the next k tokens from the slots' logits, decides how many proposals the verify pass
confirms, and gives the first token and the revision of the next proposals
(bpd_sr.decoding.loop drives them; the tests they apply are in acceptance)."""

from __future__ import annotations

import torch

from bpd_sr.decoding.acceptance import (
    Proposer,
    acceptance_test,
    distance_test,
    refine_from_verify,
    residual_distribution,
    speculative_accept,
)
from bpd_sr.decoding.rules import apply_rule


def draw_tokens(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample from each distribution: probs (..., 256) -> long (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


class RuleAcceptor:
    """Deterministic blockwise decoding (sections 3-5): proposals are each slot's rule value
    (or ``proposer``'s), and proposal j >= 1 is kept while it passes the test against the
    base's choice after proposal j - 1 (within ``epsilon`` levels, or among the ``top_t``),
    at least ``min_block`` tokens a step; the next proposals may be refined from the verify
    pass (``refine_from_verify``)."""

    def __init__(self, k: int, proposer: Proposer, rule: str, epsilon: int, top_t: int | None,
                 min_block: int, refine: int | None) -> None:
        self.k, self.proposer, self.rule = k, proposer, rule
        self.epsilon, self.top_t, self.min_block, self.refine = epsilon, top_t, min_block, refine

    def propose(self, live, slot_logits: torch.Tensor, first=None):
        """(b, k, 256) slot logits -> (proposals long (b, k), None: no distributions)."""
        return self.proposer(live.rows, live.n, slot_logits), None

    def accept(self, live, base: torch.Tensor):
        """base logits (b, k, 256) -> (proposals kept after proposal 0, long (b,); the base's
        choice at every proposed position, long (b, k), which refinement reuses)."""
        choice = apply_rule(base, self.rule)
        if self.top_t is not None:
            ok = acceptance_test(live.proposals[:, 1:], base[:, :-1], top_t=self.top_t)
        else:
            ok = distance_test(live.proposals[:, 1:], choice[:, :-1], self.epsilon)
        n_ok = torch.cumprod(ok.long(), dim=-1).sum(-1)  # longest passing prefix
        return n_ok.clamp(min=self.min_block - 1, max=self.k - 1), choice

    def first_of_next(self, n_ok: torch.Tensor, choice: torch.Tensor, q: None) -> None:
        """Slot 0 of the next proposals is the base's own token: nothing to replace."""
        return None

    def revise(self, proposals: torch.Tensor, old: torch.Tensor, choice: torch.Tensor,
               n_ok: torch.Tensor) -> torch.Tensor:
        if self.refine is None:
            return proposals
        return refine_from_verify(proposals, old, choice, n_ok, self.refine)


class SpeculativeAcceptor:
    """Exact sampling at ``temperature`` (speculative sampling): proposals are draws from
    the heads' tempered distributions q; proposal x is kept with probability
    min(1, p(x) / q(x)) under the base's tempered p; after the first rejection the next
    token is a draw from norm(max(0, p - q)), after none a draw from p."""

    def __init__(self, k: int, temperature: float, generator: torch.Generator | None) -> None:
        self.k, self.temperature, self.generator = k, temperature, generator

    def propose(self, live, slot_logits: torch.Tensor, first=None):
        """(b, k, 256) slot logits -> (proposals long (b, k), their distributions q (b, k,
        256)); first: (b,) tokens that replace slot 0 (the draws after a rejection)."""
        q = torch.softmax(slot_logits.double() / self.temperature, -1)
        props = draw_tokens(q, self.generator)
        if first is not None:
            props[:, 0] = first
        return props, q

    def accept(self, live, base: torch.Tensor):
        """base logits (b, k, 256) -> (proposals kept after proposal 0, long (b,); the base's
        tempered distributions p (b, k, 256))."""
        p = torch.softmax(base.double() / self.temperature, -1)
        u = torch.rand(live.rows.numel(), self.k - 1, generator=self.generator,
                       dtype=torch.float64)
        ok = speculative_accept(live.proposals[:, 1:], p[:, :-1], live.q[:, 1:],
                                u.to(base.device))
        return torch.cumprod(ok.long(), dim=-1).sum(-1), p

    def first_of_next(self, n_ok: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The token after the kept proposals, (b,): from the residual after a rejection,
        from p when all were kept."""
        sel = torch.arange(len(n_ok), device=n_ok.device)
        nxt = (n_ok + 1).clamp(max=self.k - 1)
        resid = residual_distribution(p[sel, n_ok], q[sel, nxt])
        return torch.where(n_ok < self.k - 1, draw_tokens(resid, self.generator),
                           draw_tokens(p[sel, n_ok], self.generator))

    def revise(self, proposals, old, verdict, n_ok) -> torch.Tensor:
        return proposals  # draws must stay draws from the heads
