"""Static, preallocated key/value caches for the decoder's local self-attention.

As in gpt-fast's ``KVCache``: keys and values of every decoder layer are written at their
absolute positions (``input_pos``). Nothing is ever deleted. Blockwise parallel decoding
writes the keys of k proposed tokens; when some are rejected, the decoding loop simply does
not advance its pointer past them, the attention window (key position <= query position)
hides the stale entries, and the next step overwrites them. Rollback costs nothing.

Each image of a batch owns one cache row and advances at its own pace.

``KVCache`` (what decoding uses) is head-major: one (2, batch, n_head, stored_len, head_dim)
tensor per layer, keys at index 0 and values at 1, so that the keys of a window of positions
are a *view* (a slice along the stored axis) in exactly the (B, n_head, L, head_dim) layout
that ``scaled_dot_product_attention`` reads. When every row of a call sits at the same
position (sequential decoding and sampling at any batch size, blockwise decoding at batch 1)
a step writes its new keys and values with one strided copy and reads its window without
copying, and the window's mask is made once per (offset in the block, T) and reused.
Rows at different positions (blockwise decoding of a batch) fall back to one flat
``index_copy_`` / ``index_select`` per layer.

"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 / -inf of ``dtype``: what attention turns a bool mask into on every
    call, done once per step (or once per cache) instead of once per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def window_mask(qpos: torch.Tensor, kpos: torch.Tensor, attn_block: int) -> torch.Tensor:
    """Masked local-1D attention (Parmar et al. 2018, section 3.2): query q sees keys
    [start(q) - attn_block, q], start(q) the first position of q's block; never a key < 0.

    qpos: long (..., T, 1), kpos: long (..., 1, L) -> bool (..., T, L)."""
    return (kpos >= (qpos // attn_block) * attn_block - attn_block) & (kpos <= qpos) & (kpos >= 0)


# Layout of a call, as the caller knows it on the host: (r0, p0) when the b rows are the cache
# rows r0..r0+b-1 and all sit at positions p0..p0+T-1; GATHERED when they may differ (any
# rows, any positions: the flat-index path, which needs no host value); None: unknown.
GATHERED = "gathered"
Layout = tuple[int, int] | str | None


@dataclass
class StepPlan:
    """Where one incremental decoder call writes and reads, shared by all layers.

    Every query row reads a window of fixed width: ``width`` = 2*attn_block + T - 1 keys from
    start(p0) - attn_block, masked. One width per T means one mask per (offset in the block,
    T), made once and reused, and fixed shapes for the compiled step, which is specialised on
    them.

    shared: every row sits at the same positions p0..p0+T-1 and the rows are the contiguous
        cache rows r0..r1-1; the window is the view [lo, lo + width) along the stored axis.
    mask: additive (0 / -inf) float mask, (T, width) when shared, (b, 1, T, width) when gathered.
    write_idx / read_idx (gathered only): long (2*b*H*T,) and (2*b*H*width,) flat slots of the
        cache viewed as (2*B*H*stored_len, head_dim).
    """

    shared: bool
    t: int
    mask: torch.Tensor
    width: int
    r0: int = 0
    r1: int = 0
    p0: int = 0
    lo: int = 0
    write_idx: torch.Tensor | None = None
    read_idx: torch.Tensor | None = None


class KVCache:
    """Keys and values of ``n_layer`` layers: ``data`` (n_layer, 2, batch, n_head, stored_len,
    head_dim), and ``kv[layer]`` its view of one layer.

    Position p is stored at index p + attn_block: a block of zeros in front and at least one
    behind let every window be a view, even the first block's (which starts at -attn_block)
    and the last one's; those slots are always masked."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_len: int,
        n_head: int,
        head_dim: int,
        attn_block: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        # rounded up so that caches of slightly different lengths share their strides, which
        # a compiled step (bpd_sr.decoding.compiled) is specialised on
        self.stored_len = -(-(max_len + 2 * attn_block) // 512) * 512
        shape = (n_layer, 2, batch, n_head, self.stored_len, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)  # all layers in one tensor
        self.kv = list(self.data.unbind(0))  # per layer (2, batch, n_head, stored_len, head_dim)
        self.batch, self.n_head, self.max_len, self.head_dim = batch, n_head, max_len, head_dim
        self.attn_block = attn_block
        self._masks: dict[tuple[int, int, bool], torch.Tensor] = {}

    def plan(self, rows: torch.Tensor, pos: torch.Tensor, layout: Layout = None) -> StepPlan:
        """The plan of a call: rows long (b,) cache rows; pos long (b, T) contiguous positions.

        layout: what the caller knows on the host (``Layout``); None: find out by reading
        rows and pos, a host-device sync that stalls a GPU's queue once per call."""
        b, t = pos.shape
        if layout is None:
            p = pos[:, 0].tolist()
            r = rows.tolist()
            shared = all(x == p[0] for x in p) and r == list(range(r[0], r[0] + b))
            layout = (r[0], p[0]) if shared else GATHERED
        if layout == GATHERED:
            return self._gathered_plan(rows, pos)
        r0, p0 = layout
        return self._shared_plan(r0, b, p0, t, pos.device)

    def _shared_plan(self, r0: int, b: int, p0: int, t: int, device) -> StepPlan:
        blk = self.attn_block
        start = (p0 // blk) * blk - blk  # first key position of the window, >= -blk
        key = (p0 % blk, t, start < 0)  # the mask depends on nothing else
        mask = self._masks.get(key)
        if mask is None:
            qp = torch.arange(p0, p0 + t, device=device)[:, None]
            kp = start + torch.arange(2 * blk + t - 1, device=device)[None, :]
            mask = self._masks[key] = additive(window_mask(qp, kp, blk), self.kv[0].dtype)
        return StepPlan(True, t, mask, mask.shape[1], r0=r0, r1=r0 + b, p0=p0, lo=start + blk)

    def _gathered_plan(self, rows: torch.Tensor, pos: torch.Tensor) -> StepPlan:
        b, t = pos.shape
        blk, h, big_b, n = self.attn_block, self.n_head, self.batch, self.stored_len
        start = (pos[:, :1] // blk) * blk - blk  # (b, 1), may be < 0
        width = 2 * blk + t - 1  # covers every key of every query in the row
        key_pos = start + torch.arange(width, device=pos.device)  # (b, L)
        mask = window_mask(pos[:, :, None], key_pos[:, None, :], blk)[:, None]  # (b, 1, T, L)
        mask = additive(mask, self.kv[0].dtype)
        # flat slot of (kv, row, head, position p): ((kv * B + row) * H + head) * n + p + blk
        lead = ((torch.arange(2, device=pos.device)[:, None, None] * big_b + rows[None, :, None]) * h
                + torch.arange(h, device=pos.device)[None, None, :]) * n + blk  # (2, b, H)
        write = lead[..., None] + pos[None, :, None, :]  # (2, b, H, T)
        read = lead[..., None] + key_pos[None, :, None, :]  # (2, b, H, L)
        return StepPlan(False, t, mask, width, write_idx=write.reshape(-1),
                        read_idx=read.reshape(-1))

    def update(
        self, layer: int, plan: StepPlan, kv_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv_new (2, b, H, T, head_dim) (any strides) at the plan's positions; return the
        window's keys and values, each (b, H, width, head_dim)."""
        kv = self.kv[layer]
        if plan.shared:
            at = plan.p0 + self.attn_block
            kv[:, plan.r0 : plan.r1, :, at : at + plan.t].copy_(kv_new)
            win = kv[:, plan.r0 : plan.r1, :, plan.lo : plan.lo + plan.width]
            return win[0], win[1]
        flat = kv.view(-1, self.head_dim)
        flat.index_copy_(0, plan.write_idx, kv_new.reshape(-1, self.head_dim).to(kv.dtype))
        b = kv_new.shape[1]
        win = flat.index_select(0, plan.read_idx).view(2, b, self.n_head, plan.width, self.head_dim)
        return win[0], win[1]
