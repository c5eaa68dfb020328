"""Fit the proposal heads of a frozen base model to its own sequential decodes, on cached states.

Stern et al. 2018 (section 6) train the heads with the base frozen ("regular") or jointly
("fine-tuning"), and use sequence-level distillation (Kim and Rush 2016): the targets are the
base model's own decodes. Verification only ever asks "is proposal i the token sequential
decoding would put at p + i?", so those are the targets the heads should learn.

With the base frozen, the decoder output h_p at every position of a sequential decode does not
depend on the heads. It is computed once per image (one teacher-forced pass over the decode,
equal to the decode-time states by the cached == uncached parity of the model), and the
heads are then trained for many epochs on the cached states: a step costs the heads and the
shared output projection only, two orders of magnitude less than a decoder pass on a CPU.

The decodes are made with a decoding rule (``bpd_sr.decoding.rules``; the package default, the
expected intensity, unless told otherwise) and the heads learn that rule's tokens.

Measures (``head_agreement``): per slot, how often its rule value equals the decoded token
at p + i (and is within epsilon of it), and the mean accepted block size that blockwise decoding
with exact acceptance would reach on those decodes. For exact acceptance that walk is not an
estimate: the base prediction after an accepted prefix of decoded tokens is the decoded token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bpd_sr.config import DEFAULT_RULE, N_HR_TOKENS, HeadFitConfig
from bpd_sr.decoding.rules import apply_rule, check_rule, expected_intensity
from bpd_sr.io.atomic import write_atomic
from bpd_sr.io.data import load_faces
from bpd_sr.io.pretrained import save_checkpoint, warm_start
from bpd_sr.model.tokens import downsample, image_to_tokens, shift_right
from bpd_sr.model.transformer import EncoderContext, ImageTransformer
from bpd_sr.training.distill import distill_targets
from bpd_sr.training.schedule import step_progress, warmup_cosine
from bpd_sr.training.train import TrainError


@dataclass
class DecodeStates:
    """Greedy decodes and what the frozen base computed along them.

    lr: uint8 (N, 8, 8, 3) the inputs; tokens: long (N, 3072) their sequential decodes;
    states: (N, 3072, d) the decoder output at each position (slot 0 predicts the token
    there). The conditioning logits are recomputed from lr when needed (a cheap conv net)
    rather than stored (1.5 MB per image).
    """

    lr: torch.Tensor
    tokens: torch.Tensor
    states: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)


@torch.no_grad()
def decode_states(
    model: ImageTransformer, lr: torch.Tensor, decodes: torch.Tensor, batch_size: int = 16,
    dtype: torch.dtype | None = None, progress: bool = True,
) -> DecodeStates:
    """Teacher-forced states of the base along its sequential decodes.

    lr: uint8 (N, 8, 8, 3); decodes: uint8 (N, 32, 32, 3), sequential decodes of lr.
    Computed in the model's precision (the states seen at decode time) and stored in
    ``dtype`` (default: the model's): bfloat16 halves the memory and is enough to train on.
    """
    model.eval()
    tokens = image_to_tokens(decodes)
    dtype = dtype or model.out_proj.weight.dtype
    states = torch.empty(len(lr), N_HR_TOKENS, model.cfg.d_model, dtype=dtype)
    for s in tqdm(range(0, len(lr), batch_size), desc="decoder states", disable=not progress):
        ctx = model.encode(lr[s : s + batch_size])
        states[s : s + batch_size] = model.decoder_hidden(ctx, shift_right(tokens[s : s + batch_size]))
    return DecodeStates(lr, tokens, states)


def _slot_logits(model: ImageTransformer, data: DecodeStates, idx: torch.Tensor,
                 pos: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Logits of slots 0..n_slots-1 at the given positions: idx long (b,), pos long (b, P)
    -> (b, P, n_slots, 256), through the model's own ``logits`` (heads, output projection,
    conditioning logits of position p + i)."""
    dtype = model.out_proj.weight.dtype
    h = data.states[idx[:, None], pos].to(dtype)  # (b, P, d)
    with torch.no_grad():
        cond = model.conditioning_logits(data.lr[idx]).to(dtype)
    # logits() reads only the conditioning logits of the context
    ctx = EncoderContext(cross_kv=[], cond_logits=cond, dec_pos=h.new_zeros(0))
    return model.logits(ctx, h, pos, n_slots)


def _targets(data: DecodeStates, idx: torch.Tensor, pos: torch.Tensor, n_slots: int):
    """Greedy token at p + i for each slot i, and where p + i is inside the image.
    Returns long (b, P, n_slots) and bool (b, P, n_slots)."""
    tp = pos[:, :, None] + torch.arange(n_slots)  # (b, P, S)
    valid = tp < N_HR_TOKENS
    tgt = data.tokens[idx][torch.arange(len(idx))[:, None, None], tp.clamp(max=N_HR_TOKENS - 1)]
    return tgt, valid


@torch.no_grad()
def head_agreement(model: ImageTransformer, data: DecodeStates, epsilon: int = 2,
                   batch_size: int = 4, rule: str = DEFAULT_RULE) -> dict:
    """How well the heads predict the decodes (made with ``rule``) they are checked against:
    each slot's rule value against the decoded token at p + i.

    Returns per-slot exact agreement and agreement within epsilon, and ``exact_block``:
    the mean accepted block size of blockwise decoding with exact acceptance and k =
    model.cfg.k on these inputs (each step accepts 1 + the leading slots that agree).
    Also how decided the base itself is along its decodes: the mean probability of its
    argmax (``base_top1_prob``) and of the tokens within epsilon of its rule value
    (``base_mass_eps``).
    """
    model.eval()
    k = model.cfg.k
    exact = torch.zeros(k)
    near = torch.zeros(k)
    total = torch.zeros(k)
    steps = 0
    top1 = mass = 0.0
    for s in range(0, len(data), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(data)))
        pos = torch.arange(N_HR_TOKENS).expand(len(idx), -1)
        logits = _slot_logits(model, data, idx, pos, k)  # (b, 3072, k, 256)
        pred = apply_rule(logits, rule)  # (b, 3072, k)
        probs = logits[:, :, 0].double().softmax(-1)
        levels = torch.arange(probs.shape[-1])
        near_top = (levels - pred[:, :, :1]).abs() <= epsilon  # (b, 3072, 256)
        top1 += probs.amax(-1).sum().item()
        mass += (probs * near_top).sum().item()
        tgt, valid = _targets(data, idx, pos, k)
        hit = (pred == tgt) & valid
        exact += hit.sum((0, 1)).float()
        near += (((pred - tgt).abs() <= epsilon) & valid).sum((0, 1)).float()
        total += valid.sum((0, 1)).float()
        # accepted block from p: slot 0 (the base itself) + the leading agreeing slots
        block = 1 + torch.cumprod(hit[:, :, 1:].long(), -1).sum(-1)  # (b, 3072)
        for row in block.tolist():
            p = 0
            while p < N_HR_TOKENS:
                p += row[p]
                steps += 1
    return {
        "agree_exact": [round(float(x), 4) for x in exact / total],
        f"agree_eps{epsilon}": [round(float(x), 4) for x in near / total],
        "exact_block": round(len(data) * N_HR_TOKENS / max(1, steps), 4),
        "base_top1_prob": round(top1 / (len(data) * N_HR_TOKENS), 4),
        f"base_mass_eps{epsilon}": round(mass / (len(data) * N_HR_TOKENS), 4),
    }


def _heads_loss(model: ImageTransformer, data: DecodeStates, idx: torch.Tensor,
                pos: torch.Tensor, rule: str, value_loss_weight: float) -> torch.Tensor:
    """The loss of slots 1..k-1 at positions pos long (b, P) of decodes idx long (b,) (see
    ``fit_heads``)."""
    k = model.cfg.k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _slot_logits(model, data, idx, pos, k)[:, :, 1:]  # (b, P, k-1, 256)
    tgt, valid = _targets(data, idx, pos, k)
    logits = logits.to(model.out_proj.weight.dtype).flatten(0, 2)
    target = tgt[:, :, 1:].flatten()
    per_token = F.cross_entropy(logits, target, reduction="none")
    if rule == "mean" and value_loss_weight > 0:
        value = expected_intensity(logits, torch.float32)
        per_token = per_token + value_loss_weight * F.huber_loss(
            value, target.float(), reduction="none", delta=2.0)
    w = valid[:, :, 1:].flatten().float()
    return (per_token * w).sum() / w.sum()


def fit_heads(
    model: ImageTransformer,
    train: DecodeStates,
    val: DecodeStates | None = None,
    steps: int = 1000,
    batch_images: int = 16,
    positions: int = 1024,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    seed: int = 0,
    eval_every: int = 250,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    rule: str = DEFAULT_RULE,
    value_loss_weight: float = 0.0,
) -> list[dict]:
    """Train ``model.heads`` (everything else frozen) on cached decode states.

    Each step: ``batch_images`` random decodes, ``positions`` random positions in each;
    the loss is the mean cross-entropy of slots 1..k-1 against the decoded token at p + i,
    plus, for the "mean" rule, ``value_loss_weight`` times a Huber loss (in intensity levels,
    transition at 2 levels: the epsilon that acceptance allows) between each slot's expected
    intensity and that token: acceptance tests the slot's rule value, not its probability.
    Cosine learning-rate decay over ``steps`` after a linear warm-up. Returns the log.
    """
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("heads."))
    params = list(model.heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="fit heads", disable=not progress, dynamic_ncols=True)
    for step in bar:
        scale = warmup_cosine(step, warmup_steps, step_progress(step, warmup_steps, steps), 0.02)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(len(train), (batch_images,), generator=g)
        pos = torch.randint(N_HR_TOKENS, (batch_images, positions), generator=g)
        loss = _heads_loss(model, train, idx, pos, rule, value_loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                     "loss": round(loss.item(), 4)}
            if val is not None:
                entry.update(head_agreement(model, val, rule=rule))
                model.train()
            history.append(entry)
            if log is not None:
                log(entry)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return history


def run(cfg: HeadFitConfig, progress: bool = True) -> Path:
    """The whole recipe, resumable where it is slow: pick ``n_faces`` training faces, decode
    them greedily with the frozen base (cached in ``out/decodes.npz``, saved batch by batch),
    compute the decoder states, fit the heads, and write ``out/heads.pt`` (atomically).
    Returns the checkpoint's path."""
    if cfg.n_faces <= cfg.n_val or cfg.n_val < 0:
        raise TrainError(f"need more faces ({cfg.n_faces}) than held-out faces ({cfg.n_val})")
    check_rule(cfg.rule)
    model, ckpt = warm_start(cfg.init, cfg.k or None)
    if model.cfg.k < 2:
        raise TrainError(f"{cfg.init} has k = 1: give --k 2 or more to add heads")
    model.eval()

    faces = load_faces(cfg.data, progress=progress)
    if len(faces) < cfg.n_faces:
        raise TrainError(f"{cfg.data}: {len(faces)} faces, fewer than --n-faces {cfg.n_faces}")
    pick = torch.randperm(len(faces), generator=torch.Generator().manual_seed(cfg.seed))
    faces = faces[pick[: cfg.n_faces]]
    out = Path(cfg.out)
    decodes = distill_targets(model, faces, out / "decodes.npz", cfg.decode_batch, progress,
                              rule=cfg.rule)
    lr_in = downsample(faces)
    n_train = cfg.n_faces - cfg.n_val
    train = decode_states(model, lr_in[:n_train], decodes[:n_train], dtype=torch.bfloat16,
                          progress=progress)
    val = decode_states(model, lr_in[n_train:], decodes[n_train:], progress=progress) \
        if cfg.n_val else None
    def log(entry: dict) -> None:
        if progress:
            tqdm.write(json.dumps(entry))

    history: list[dict] = []
    if val is not None:
        history.append({"step": 0, **head_agreement(model, val, rule=cfg.rule)})
        log(history[0])
    history += fit_heads(model, train, val, steps=cfg.steps, batch_images=cfg.batch_images,
                         positions=cfg.positions, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         seed=cfg.seed, eval_every=cfg.eval_every, log=log, progress=progress,
                         rule=cfg.rule, value_loss_weight=cfg.value_loss_weight)
    out.mkdir(parents=True, exist_ok=True)
    log_text = "".join(json.dumps(e) + "\n" for e in history)
    write_atomic(out / "log.jsonl", lambda f: f.write(log_text.encode()))
    about = {"head_fit_config": cfg.to_dict(), "log": history,
             "base": ckpt.get("about", {}) or {"train_config": ckpt.get("train_config")}}
    return save_checkpoint(out / "heads.pt", model, extra={"about": about})
