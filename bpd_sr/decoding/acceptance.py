"""Acceptance in blockwise parallel decoding (Stern et al. 2018, sections 3-5): the test of
each proposal against the base model's choice (exact, within a distance epsilon, or top-t),
exact sampling's test (speculative sampling), the proposers, and the refinement of the next
proposals from the verify pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bpd_sr.decoding.rules import DEFAULT_RULE, apply_rule, check_rule

# proposer(rows, next_pos, slot_logits) -> (b, k) proposed tokens. rows: cache rows (b,);
# next_pos: (b,) position of the first proposal; slot_logits: (b, k, 256) of the proposal slots.
Proposer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def acceptance_test(
    proposals: torch.Tensor, base_logits: torch.Tensor, epsilon: int = 0,
    top_t: int | None = None, rule: str = DEFAULT_RULE,
) -> torch.Tensor:
    """Which proposals pass against the base model's prediction at the same position.

    proposals: long (b, m); base_logits: (b, m, 256). Returns bool (b, m).
    top_t: the proposal is among the base's t most likely tokens (section 5.2, "top-k").
    Otherwise: |proposal - rule(base)| <= epsilon ("distance-based"; epsilon 0 = exact),
    where rule(base) is the base's choice under the decoding rule (``bpd_sr.decoding.rules``).
    """
    if top_t is not None:
        top = base_logits.topk(top_t, dim=-1).indices  # (b, m, t)
        return (top == proposals[..., None]).any(-1)
    return distance_test(proposals, apply_rule(base_logits, rule), epsilon)


def distance_test(proposals: torch.Tensor, choice: torch.Tensor, epsilon: int) -> torch.Tensor:
    """|proposal - base's choice| <= epsilon; proposals, choice long (b, m) -> bool (b, m)."""
    return (proposals - choice).abs() <= epsilon


def speculative_accept(
    proposals: torch.Tensor, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """The rejection rule of speculative sampling: keep x ~ q with probability min(1, p(x)/q(x)).

    proposals: long (b, m); p, q: (b, m, 256) base and proposal distributions at the same
    targets; u: uniform (b, m). Returns bool (b, m).
    """
    px = p.gather(-1, proposals[..., None])[..., 0]
    qx = q.gather(-1, proposals[..., None])[..., 0]
    return u * qx < px  # u < p/q without dividing by a q that underflowed to 0


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) (..., 256); where p == q to rounding, p itself."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 1e-12, r / total.clamp(min=1e-300), p)


def rule_proposer(rule: str = DEFAULT_RULE) -> Proposer:
    """The paper's proposer under a decoding rule: each slot's rule value (argmax in the
    paper). (b, k, 256) slot logits -> (b, k)."""
    check_rule(rule)

    def propose(rows: torch.Tensor, next_pos: torch.Tensor, slot_logits: torch.Tensor):
        return apply_rule(slot_logits, rule)

    return propose


def refine_from_verify(
    proposals: torch.Tensor, old_proposals: torch.Tensor, choice: torch.Tensor,
    n_ok: torch.Tensor, max_miss: int,
) -> torch.Tensor:
    """Proposals for the next step refined by the verify pass that just ran (no model call).

    The verify pass fed old proposal j at position n + 1 + j and computed the base's choice
    for every target after it. After accepting proposals 0..n_ok, the next step's slot i
    (i >= 1) targets the same position as old base prediction n_ok + i. That prediction was
    made after the first rejected proposal, old n_ok + 1; when that proposal missed the base's
    choice by at most ``max_miss`` levels, the prefix it saw is close to the true one and its
    prediction is a Jacobi-iteration guess, often better than the head's (README, "Levers").

    proposals: long (b, k) from the heads; old_proposals: long (b, k) this step's; choice:
    long (b, k) the base's choice (its rule applied to the verify pass's logits) for old
    target n + 1 + j; n_ok: long (b,). Returns long (b, k).
    Slot 0 (the base's own token) is never changed, so exactness is kept.
    """
    b, k = proposals.shape
    sel = torch.arange(b, device=proposals.device)
    first_rejected = (n_ok + 1).clamp(max=k - 1)
    miss = (old_proposals[sel, first_rejected] - choice[sel, n_ok]).abs()
    usable = (n_ok < k - 1) & (miss <= max_miss)  # (b,)
    slot = torch.arange(k, device=proposals.device)
    j = n_ok[:, None] + slot  # (b, k): old index of new slot i
    from_verify = (slot >= 1) & (j < k) & usable[:, None]
    guess = choice.gather(1, j.clamp(max=k - 1))
    return torch.where(from_verify, guess, proposals)
