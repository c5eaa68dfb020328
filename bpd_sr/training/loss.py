"""The training loss of the base model and its proposal heads (Stern et al. 2018, section 6):
one cross-entropy over every slot's shifted targets, plus the conditioning net's auxiliary
cross-entropy (Dahl et al. 2017), and the heads' held-out agreement."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bpd_sr.config import N_HR_TOKENS
from bpd_sr.model.tokens import downsample, image_to_tokens
from bpd_sr.model.transformer import ImageTransformer

# ---- loss ---------------------------------------------------------------------------
IGNORE = -100  # the target of a slot that looks past the last position: not scored


def slot_targets(targets: torch.Tensor, k: int, head_targets: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """What each slot is scored against: long (B, T) -> (B, T, k), where slot i at position p
    holds target p + i (``IGNORE`` past the end). head_targets: what slots 1..k-1 learn
    instead of ``targets`` (slot 0, the base model, always learns the data)."""
    t = targets.shape[1]
    src = targets if head_targets is None else head_targets
    shifted = F.pad(src, (0, k), value=IGNORE).unfold(1, k, 1)[:, :t]  # (B, T, k) view
    if head_targets is None:
        return shifted
    return torch.cat([targets[..., None], shifted[..., 1:]], dim=-1)


def sr_loss(
    logits: torch.Tensor,
    cond_logits: torch.Tensor,
    targets: torch.Tensor,
    cond_weight: float,
    head_slot: int | torch.Tensor | None = None,
    head_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits (B, 3072, k, 256), cond_logits (B, 3072, 256), targets long (B, 3072).

    Slot i at position p is scored against target p + i (positions past the end are left
    out). head_slot: score only that proposal slot (the paper's one random head per batch;
    an int or a 0-d long tensor, so that a compiled loss does not specialise on it); None:
    the mean over all proposal slots. head_targets: long (B, 3072) what the proposal slots
    learn instead of ``targets`` (e.g. the base model's own predictions).

    One cross-entropy over every (position, slot): slicing each slot out and upcasting it
    apart made backward zero-fill a full-size gradient per slot. Returns the loss and its
    parts as detached 0-d tensors (bits per dimension): no host sync until someone reads them.
    """
    b, t, k, v = logits.shape
    tgt = slot_targets(targets, k, head_targets)  # (B, T, k)
    if head_slot is not None:  # slot 0 and the chosen proposal slot
        slots = torch.stack([torch.zeros_like(torch.as_tensor(head_slot)),
                             torch.as_tensor(head_slot)]).to(logits.device)
        logits, tgt = logits.index_select(2, slots), tgt.index_select(2, slots)
        offsets = slots
    else:
        offsets = torch.arange(k, device=logits.device)
    ce = F.cross_entropy(logits.reshape(-1, v).float(), tgt.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view(b, -1, offsets.numel()).sum((0, 1))
    per_slot = ce / (b * (t - offsets))  # mean over the positions each slot scores
    base = per_slot[0]
    cond = F.cross_entropy(cond_logits.flatten(0, 1).float(), targets.flatten())
    loss = base + cond_weight * cond
    to_bits = 1 / math.log(2)
    stats = {"bpd": base.detach() * to_bits, "cond_bpd": cond.detach() * to_bits}
    if offsets.numel() > 1:
        heads = per_slot[1:].mean()
        loss = loss + heads
        stats["heads_bpd"] = heads.detach() * to_bits
    return loss, stats


@torch.no_grad()
def evaluate_heads(model: ImageTransformer, images: torch.Tensor, batch_size: int, amp) -> dict:
    """Held-out bits per dimension of the base model and top-1 accuracy of every slot."""
    model.eval()
    k = model.cfg.k
    correct = torch.zeros(k)
    agree = torch.zeros(k)  # slot i's argmax within 2 levels of the base's argmax at p + i
    total = torch.zeros(k)
    nll = 0.0
    for s in range(0, len(images), batch_size):
        hr = images[s : s + batch_size]
        lr, targets = downsample(hr), image_to_tokens(hr)
        with amp():
            logits, _ = model(lr, targets)
        nll += F.cross_entropy(
            logits[:, :, 0].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
        pred = logits.argmax(-1)  # (B, 3072, k)
        for i in range(k):
            correct[i] += (pred[:, : N_HR_TOKENS - i, i] == targets[:, i:]).sum().item()
            near = (pred[:, : N_HR_TOKENS - i, i] - pred[:, i:, 0]).abs() <= 2
            agree[i] += near.sum().item()
            total[i] += targets[:, i:].numel()
    model.train()
    return {
        "val_bpd": nll / (len(images) * N_HR_TOKENS) / math.log(2),
        "val_top1": [round(float(c / t), 4) for c, t in zip(correct, total, strict=True)],
        "val_agree_eps2": [round(float(a / t), 4) for a, t in zip(agree, total, strict=True)],
    }
