"""The Image Transformer for super-resolution, with proposal heads. No decoding loops here.

- Encoder: global self-attention over the 192 low-res channel tokens (Parmar et al. 2018,
  arXiv 1802.05751, section 3 and the img2img setting of section 5).
- Decoder: masked local-1D self-attention over the 3072 target tokens (Parmar et al. 2018,
  section 3.2: queries in a block of ``attn_block`` tokens attend to their own block up to
  themselves and to the whole previous block), encoder-decoder attention in every layer.
- Conditioning (Dahl et al. 2017, Pixel Recursive Super Resolution, section 3): a small
  convolutional net maps the low-res image to logits for every target position; they are
  added to the decoder's logits (of every proposal slot) and get their own auxiliary loss.
  The decoder also embeds the low-res intensity each target lies under.
- Proposal heads (Stern et al. 2018, arXiv 1811.03115, section 6): one feed-forward layer
  with hidden size k*head_d_ff and output k*d_model after the decoder, a residual from the
  decoder output into each slot, and the base output projection shared by all slots. Slot i
  predicts the token i positions ahead. With ``identity_first_slot`` slot 0 is the decoder
  output itself, so adding heads leaves the base model's predictions unchanged.

Decoding functions (``bpd_sr.decoding``) drive the model through ``encode``,
``decoder_hidden`` and ``logits``; ``forward`` is the teacher-forced training pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import step
from .cache import AttentionWindow, FlatKVCache, KVCache, Layout
from .config import CHANNELS, HR_SIZE, N_HR_TOKENS, N_INTENSITIES, N_LR_TOKENS, ModelConfig
from .tokens import channel_offset, hr_position_tables, shift_right


@dataclass
class EncoderContext:
    """What the decoder needs from one batch of low-res inputs, computed once per image.

    cross_kv: per decoder layer, keys and values of the encoder memory, each
        (B, n_head, 192, head_dim).
    cond_logits: (B, n + k, 256) conditioning logits of the first n targets (n = 3072 unless
        the decode stops early), zero-padded past the end so that slot i at position p can
        read position p + i.
    dec_pos: (B, n, d) what the decoder adds to each position's input: the position's
        embedding plus the embedding of the low-res intensity it lies under.
    rows: long (b,) the rows of cond_logits and dec_pos that the b rows of this context read
        (a subset of a batch, ``select``); None: all B, in order.
    """

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cond_logits: torch.Tensor
    dec_pos: torch.Tensor
    rows: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> EncoderContext:
        """The context of a subset of the batch (rows: long (b,)). The encoder memory's keys
        and values are copied (attention reads them batch-aligned); the per-position tables
        are not (7 MB per image: a batch decode that copied them whenever an image finished
        spent 7% of its time there at batch 64): the subset reads them through ``rows``."""
        return EncoderContext(
            cross_kv=[(k[rows], v[rows]) for k, v in self.cross_kv],
            cond_logits=self.cond_logits,
            dec_pos=self.dec_pos,
            rows=rows if self.rows is None else self.rows[rows],
        )

    def _table_rows(self, b: int, device: torch.device) -> torch.Tensor:
        """long (b,): the row of cond_logits and dec_pos that each of the b rows reads."""
        return self.rows if self.rows is not None else torch.arange(b, device=device)

    def position_embeddings(self, pos: torch.Tensor) -> torch.Tensor:
        """dec_pos at pos long (b, T) -> (b, T, d), in one flat gather. Positions past the
        table's last one (look-ahead fed near the end) read that one; their outputs are
        never used."""
        n_pos, d = self.dec_pos.shape[1:]
        flat = self._table_rows(pos.shape[0], pos.device)[:, None] * n_pos + pos.clamp(max=n_pos - 1)
        return self.dec_pos.reshape(-1, d).index_select(0, flat.reshape(-1)).view(*pos.shape, d)

    def slot_conditioning(self, pos: torch.Tensor, n_slots: int) -> torch.Tensor:
        """The conditioning logits of slots 0..n_slots-1 at pos long (b, T): slot i at
        position p reads target p + i (zeros past the end) -> (b, T, n_slots, 256)."""
        b, t = pos.shape
        n_cond = self.cond_logits.shape[1]
        target_pos = pos[:, :, None] + torch.arange(n_slots, device=pos.device)  # (b, T, S)
        flat = self._table_rows(b, pos.device)[:, None, None] * n_cond \
            + target_pos.clamp(max=n_cond - 1)
        cond = self.cond_logits.reshape(-1, N_INTENSITIES).index_select(0, flat.reshape(-1))
        return cond.view(b, t, n_slots, N_INTENSITIES)


class ConditioningNet(nn.Module):
    """Low-res image -> logits for every target intensity (Dahl et al. 2017).

    uint8 (B, 8, 8, 3) -> (B, 3072, 256). ``n_blocks`` residual blocks at 8x8, two
    pixel-shuffle upsamplings to 32x32, then a 1x1 convolution to the output per pixel:

    - ``head="logits"``: 256 free logits per colour (the shipped default's net);
    - ``head="gaussian"``: a mean mu and a scale sigma per colour, and logits
      -(i - mu)^2 / (2 sigma^2) for every intensity i: a discretised Gaussian, smooth and
      unimodal, so its expected intensity is mu away from the ends of the range. mu is a
      residual over the input pixel it lies under. 6 outputs per pixel instead of 768: far
      cheaper to train on a CPU (``bpd_sr.condfit``).
    """

    def __init__(self, width: int, n_blocks: int = 2, head: str = "logits",
                 up_width: int = 0) -> None:
        super().__init__()
        c = width
        u = up_width or width  # channels of the upsampling path (16x16 and 32x32)
        self.stem = nn.Conv2d(CHANNELS, c, 3, padding=1)
        self.res = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1))
            for _ in range(n_blocks)
        )
        self.up = nn.Sequential(
            nn.Conv2d(c, 4 * u, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            nn.Conv2d(u, 4 * u, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(),
            nn.Conv2d(u, u, 3, padding=1), nn.ReLU(),
        )
        if head not in ("logits", "gaussian"):
            raise ValueError(f"unknown conditioning head {head!r}")
        self.head = head
        self.out = nn.Conv2d(u, CHANNELS * (N_INTENSITIES if head == "logits" else 2), 1)
        if head == "gaussian":  # start at mu = the input pixel, sigma = 8 levels
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, lr: torch.Tensor, n_positions: int = N_HR_TOKENS) -> torch.Tensor:
        """lr: uint8 (B, 8, 8, 3) -> logits (B, n_positions, 256) of the first n_positions
        targets in raster order. The 1x1 output layer runs only on the image rows that hold
        them: a decode of a short prefix (the sampling tests) would otherwise write
        B x 3072 x 256 floats to read a few of them.

        The net runs in its parameters' dtype even under autocast. Its Gaussian logits are
        built from squared levels (i^2 up to 65025, which bfloat16 rounds to multiples of
        256) and from mu and sigma, whose bf16 rounding moves a sharp distribution by a
        fraction of a level, i.e. its top logits by several units: a fine-tune under bf16
        autocast would train the decoder against corrupted logits (docs/method.md). The net
        is a few percent of the model's arithmetic, so float32 costs little."""
        with torch.autocast(lr.device.type, enabled=False):
            return self._logits(lr, n_positions)

    def _features(self, lr: torch.Tensor, rows: int, detach_scale: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """lr uint8 (B, 8, 8, 3) -> (x (B, 3, 8, 8) input intensities, y (B, 768 or 6, rows,
        32) the output layer on the first rows of the image). detach_scale (gaussian head):
        the sigma outputs read the features detached, so that fitting sigma trains only its
        own output weights."""
        x = lr.permute(0, 3, 1, 2).to(self.stem.weight.dtype)  # (B, 3, 8, 8)
        y = self.stem(x / 127.5 - 1.0)
        for block in self.res:
            y = y + block(y)
        features = self.up(y)[:, :, :rows]
        if not detach_scale:
            return x, self.out(features)
        w, b = self.out.weight, self.out.bias
        return x, torch.cat([F.conv2d(features, w[:CHANNELS], b[:CHANNELS]),
                             F.conv2d(features.detach(), w[CHANNELS:], b[CHANNELS:])], dim=1)

    def _logits(self, lr: torch.Tensor, n_positions: int) -> torch.Tensor:
        rows = -(-n_positions // (HR_SIZE * CHANNELS))  # image rows holding those targets
        x, y = self._features(lr, rows)
        b = y.shape[0]
        if self.head == "gaussian":
            return self._gaussian_logits(*self._gaussian(x, y))[:, :n_positions]
        # the channel axis holds (colour, intensity); put it in raster order (row, col, colour)
        y = y.view(b, CHANNELS, N_INTENSITIES, rows, HR_SIZE).permute(0, 3, 4, 1, 2)
        return y.reshape(b, rows * HR_SIZE * CHANNELS, N_INTENSITIES)[:, :n_positions]

    def gaussian_parameters(self, lr: torch.Tensor, detach_scale: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian head's mean and scale in intensity levels, without the 256-level
        table: lr uint8 (B, 8, 8, 3) -> (mu, sigma), each (B, 3, 32, 32). Cheap to train by
        regression (``bpd_sr.condfit``, objective "regression"); detach_scale as in
        ``_features``."""
        if self.head != "gaussian":
            raise ValueError("gaussian_parameters needs the gaussian head")
        with torch.autocast(lr.device.type, enabled=False):
            return self._gaussian(*self._features(lr, HR_SIZE, detach_scale))

    @staticmethod
    def _gaussian(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 8, 8) input intensities; y: (B, 6, rows, 32) raw (mu, log sigma) per
        colour -> (mu, sigma), each (B, 3, rows, 32): mu a residual over the input pixel it
        lies under, sigma in 0.5 .. 160 levels."""
        rows = y.shape[2]
        under = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)[:, :, :rows]
        mu = under + 32.0 * y[:, :CHANNELS]
        sigma = 8.0 * torch.exp(y[:, CHANNELS:].clamp(-2.8, 3.0))
        return mu, sigma

    @staticmethod
    def _gaussian_logits(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """mu, sigma (B, 3, rows, 32) -> logits (B, rows * 96, 256) in raster order."""
        b, rows = mu.shape[0], mu.shape[2]
        n = rows * HR_SIZE * CHANNELS
        mu = mu.permute(0, 2, 3, 1).reshape(b, n, 1)
        a = sigma.permute(0, 2, 3, 1).reshape(b, n, 1).pow(-2)  # 1 / sigma^2
        # -(i - mu)^2 a / 2 = [mu a, -a/2, -mu^2 a/2] . [i, i^2, 1]: one small matmul instead
        # of five passes over (B, 3072, 256); sigma >= 0.5 keeps float32 cancellation < 0.02
        levels = torch.arange(N_INTENSITIES, device=mu.device, dtype=mu.dtype)
        basis = torch.stack([levels, levels * levels, torch.ones_like(levels)])  # (3, 256)
        coef = torch.cat([mu * a, -0.5 * a, -0.5 * mu * mu * a], dim=-1)  # (B, n, 3)
        return coef @ basis


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d_ff)
        self.proj = nn.Linear(d_ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.relu(self.fc(x))))


class GlobalSelfAttention(nn.Module):
    """Unmasked self-attention (the encoder)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3)
        q, k, v = qkv.unbind(2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """Decoder queries attend to the whole encoder memory (keys/values computed once)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 192, d) -> keys, values, each (B, n_head, 192, head_dim)."""
        b, s, d = memory.shape
        kv = self.kv(memory).view(b, s, 2, self.n_head, d // self.n_head).transpose(1, 3)
        k, v = kv.unbind(2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, kv[0], kv[1], dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


@functools.lru_cache(maxsize=16)
def local_block_mask(attn_block: int, n_blocks: int, device=None) -> torch.Tensor:
    """bool (1, n_blocks, attn_block, 2*attn_block): query i of block j may see key l of
    [block j-1 | block j]: all of the previous block (none for j = 0), its own up to itself.

    Made once per shape and device (cached): the full pass used to rebuild it every call.
    Four dimensions, because the CPU's fused (flash) attention takes a 4-D mask and falls
    back to the unfused math path for a 3-D one (twice the time, forward and backward)."""
    i = torch.arange(attn_block, device=device)[:, None]
    m = torch.arange(2 * attn_block, device=device)[None, :]
    mask = (m <= i + attn_block).expand(n_blocks, attn_block, 2 * attn_block).clone()
    mask[0, :, :attn_block] = False
    return mask[None]


class LocalSelfAttention(nn.Module):
    """Masked local-1D self-attention (Parmar et al. 2018, section 3.2).

    The key set of query position q is [start(q) - attn_block, q], where start(q) is the first
    position of q's block. The full pass computes it block by block; the cached pass reads the
    same window from the cache (``KVCache.window``), so both compute the same function.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.block = cfg.attn_block
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        cache: FlatKVCache | None = None,
        layer: int = 0,
        win: AttentionWindow | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d). Without a cache, x holds positions 0..T-1 (T a multiple of the block);
        with one, ``win`` says where the new tokens go and which keys they see."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).unbind(2)  # (B,T,H,hd)
        y = self._full(q, k, v) if cache is None else self._cached(q, k, v, cache, layer, win)
        return self.proj(y.reshape(b, t, d))

    def _full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, h, hd = q.shape
        blk = self.block
        nb = t // blk

        # 4-D (B*H, nb, blk, hd) so that fused attention kernels apply (CPU and CUDA)
        def blocks(x):  # (B, T, H, hd) -> (B*H, nb, blk, hd)
            return x.transpose(1, 2).reshape(b * h, nb, blk, hd)

        def with_previous(x):  # -> (B*H, nb, 2*blk, hd): keys of [previous block | own block]
            return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :-1], x], dim=2)

        y = F.scaled_dot_product_attention(
            blocks(q), with_previous(blocks(k)), with_previous(blocks(v)),
            attn_mask=local_block_mask(blk, nb, q.device),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return y.reshape(b, h, t, hd).transpose(1, 2)  # (B, T, H, hd)

    def _cached(self, q, k, v, cache: FlatKVCache, layer: int, win: AttentionWindow) -> torch.Tensor:
        b, t, h, hd = q.shape
        kw, vw = cache.update(layer, win, k.reshape(b, t, h * hd), v.reshape(b, t, h * hd))
        kw = kw.view(b, win.width, h, hd).transpose(1, 2)  # (b, H, L, hd)
        vw = vw.view(b, win.width, h, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kw, vw, attn_mask=win.mask)
        return y.transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = GlobalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = LocalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = CrossAttention(cfg)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cross_kv, cache=None, layer=0, win=None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), cache, layer, win))
        x = x + self.drop(self.cross_attn(self.ln2(x), cross_kv))
        return x + self.mlp(self.ln3(x))


class ProposalHeads(nn.Module):
    """Stern et al. 2018, section 6: h (..., d) -> per-slot hidden states (..., n_slots, d).

    One feed-forward layer, hidden n_ff*head_d_ff, output n_ff*d_model, plus a residual from h
    into every slot. With ``identity_first_slot`` slot 0 is h itself (n_ff = k - 1).
    The output layer starts at zero (``reset_parameters``), so new heads start as the
    identity: every slot repeats the base model's prediction until training moves it
    (Medusa initialises its heads the same way), instead of random proposals that a frozen
    or warm-started base would first have to unlearn.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.identity_first_slot = cfg.identity_first_slot
        self.n_ff_slots = cfg.k - 1 if cfg.identity_first_slot else cfg.k
        if self.n_ff_slots > 0:
            self.fc = nn.Linear(cfg.d_model, self.n_ff_slots * cfg.head_d_ff)
            self.proj = nn.Linear(self.n_ff_slots * cfg.head_d_ff, self.n_ff_slots * cfg.d_model)

    def reset_parameters(self) -> None:
        """Zero the output layer: each slot's hidden state is then h, the identity."""
        if self.n_ff_slots > 0:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, n_slots: int) -> torch.Tensor:
        if self.identity_first_slot and n_slots == 1:
            return h.unsqueeze(-2)
        ff = self.proj(F.relu(self.fc(h))).unflatten(-1, (self.n_ff_slots, h.shape[-1]))
        slots = h.unsqueeze(-2) + ff
        if self.identity_first_slot:
            slots = torch.cat([h.unsqueeze(-2), slots], dim=-2)
        return slots[..., :n_slots, :]


class ImageTransformer(nn.Module):
    """8x8 -> 32x32 Image Transformer with ``cfg.k`` proposal slots."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # encoder
        self.enc_tok = nn.Embedding(CHANNELS * N_INTENSITIES, d)
        self.enc_pos = nn.Embedding(N_LR_TOKENS, d)
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc_layer))
        self.enc_ln = nn.LayerNorm(d)
        # decoder inputs: previous token (+BOS), factorised position, low-res intensity
        self.dec_tok = nn.Embedding(CHANNELS * N_INTENSITIES + 1, d)
        self.row_emb = nn.Embedding(HR_SIZE, d)
        self.col_emb = nn.Embedding(HR_SIZE, d)
        self.chan_emb = nn.Embedding(CHANNELS, d)
        self.lr_emb = nn.Embedding(CHANNELS * N_INTENSITIES, d) if cfg.lr_input_embedding else None
        self.dec_drop = nn.Dropout(cfg.dropout)
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layer))
        self.dec_ln = nn.LayerNorm(d)
        self.heads = ProposalHeads(cfg)
        self.out_proj = nn.Linear(d, N_INTENSITIES)  # shared by every slot
        self.cond = (ConditioningNet(cfg.cond_channels, cfg.cond_blocks, cfg.cond_head,
                                     cfg.cond_up_channels)
                     if cfg.cond_channels > 0 else None)
        row, col, chan, lr_index = hr_position_tables()
        self.register_buffer("pos_row", row, persistent=False)
        self.register_buffer("pos_col", col, persistent=False)
        self.register_buffer("pos_chan", chan, persistent=False)
        self.register_buffer("pos_lr_index", lr_index, persistent=False)
        self.apply(self._init_weights)
        self.heads.reset_parameters()  # after apply(), which would draw them at random

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ---- encoder (runs once per image) ------------------------------------------------
    def encode(self, lr: torch.Tensor, n_positions: int = N_HR_TOKENS) -> EncoderContext:
        """lr: uint8 (B, 8, 8, 3) -> the EncoderContext of the batch. A decode of only the
        first n_positions targets passes that number: it never reads the conditioning logits
        or position embeddings of later targets, and those are the context's largest tensors
        (B x 3072 x 256 and B x 3072 x d)."""
        b = lr.shape[0]
        lr_tokens = lr.reshape(b, N_LR_TOKENS).long()
        x = self.enc_tok(channel_offset(lr_tokens)) + self.enc_pos.weight  # (B, 192, d)
        for layer in self.enc_layers:
            x = layer(x)
        memory = self.enc_ln(x)
        cross_kv = [layer.cross_attn.memory_kv(memory) for layer in self.dec_layers]
        # the decoder's logits are added to cond_scale times the conditioning logits: a
        # product of experts whose balance is a decoding setting of the checkpoint
        cond = self.conditioning_logits(lr, n_positions)
        cond = (cond * self.cond_scale_of_positions(cond.shape[1], cond)).to(memory.dtype)
        n = n_positions
        dec_pos = (self.row_emb(self.pos_row[:n]) + self.col_emb(self.pos_col[:n])
                   + self.chan_emb(self.pos_chan[:n])).expand(b, -1, -1)  # (B, n, d)
        if self.lr_emb is not None:
            lr_under = lr_tokens[:, self.pos_lr_index[:n]]  # (B, n): low-res intensity under p
            dec_pos = dec_pos + self.lr_emb(channel_offset(lr_under))
        return EncoderContext(cross_kv=cross_kv, cond_logits=cond, dec_pos=dec_pos)

    def conditioning_logits(self, lr: torch.Tensor, n_positions: int = N_HR_TOKENS) -> torch.Tensor:
        """lr: uint8 (B, 8, 8, 3) -> (B, n_positions + k, 256): the conditioning net's logits
        for the first n_positions targets, zero-padded past the end so that slot i at
        position p can read p + i."""
        b = lr.shape[0]
        if self.cond is not None:
            cond = self.cond(lr, n_positions)  # (B, n_positions, 256)
        else:
            cond = self.out_proj.weight.new_zeros(b, n_positions, N_INTENSITIES)
        return F.pad(cond, (0, 0, 0, self.cfg.k))

    # ---- decoder -------------------------------------------------------------------
    def decoder_hidden(
        self,
        ctx: EncoderContext,
        inputs: torch.Tensor,
        pos: torch.Tensor | None = None,
        cache: KVCache | FlatKVCache | None = None,
        rows: torch.Tensor | None = None,
        layout: Layout = None,
    ) -> torch.Tensor:
        """Decoder output h (B, T, d).

        inputs: long (B, T) vocabulary ids of the token *before* each position
            (``tokens.shift_right`` / ``tokens.previous_token_inputs``).
        Full pass (no cache): inputs hold positions 0..T-1.
        Incremental pass: pos long (B, T) contiguous positions of each row, the cache, and
            rows long (B,) the cache row of each batch row. Positions past the context's
            last one (3071, or n - 1 after ``encode(lr, n)``: look-ahead fed near the end)
            reuse its embedding; their outputs are never used.
            With a ``KVCache`` (``new_cache()``) this is ``bpd_sr.step.decoder_step``; with a
            ``FlatKVCache`` (``new_cache(reference=True)``) the module path below, which
            computes the same numbers with many more operations (the parity reference).
            layout: what the caller knows of rows and pos on the host (``bpd_sr.cache``),
            so that the step needs no host-device sync to plan itself.
        """
        if isinstance(cache, KVCache):
            return step.decoder_step(self, ctx, inputs, pos, cache, rows, layout)
        b, t = inputs.shape
        if cache is None:
            blk = self.cfg.attn_block
            t_pad = -(-t // blk) * blk
            dec_pos = ctx.dec_pos if ctx.rows is None else ctx.dec_pos[ctx.rows]
            x = self.dec_tok(F.pad(inputs, (0, t_pad - t))) + dec_pos[:, :t_pad]
            win = None
        else:
            x = self.dec_tok(inputs) + ctx.position_embeddings(pos)
            win = cache.window(rows, pos, self.cfg.attn_block)
        x = self.dec_drop(x)
        for i, layer in enumerate(self.dec_layers):
            x = layer(x, ctx.cross_kv[i], cache, i, win)
        return self.dec_ln(x)[:, :t]

    def logits(
        self, ctx: EncoderContext, h: torch.Tensor, pos: torch.Tensor, n_slots: int = 1,
        layout: Layout = None,
    ) -> torch.Tensor:
        """Logits of the first n_slots slots: h (B, T, d), pos long (B, T) -> (B, T, n_slots, 256).

        Slot i at position p predicts target p + i, so it gets the conditioning logits of p + i
        (``bpd_sr.step.slot_logits``; layout as in ``decoder_hidden``).
        """
        return step.slot_logits(self, ctx, h, pos, n_slots, layout)

    def slot_outputs(self, h: torch.Tensor, n_slots: int) -> torch.Tensor:
        """The decoder's own logits of the first n_slots slots, without the conditioning:
        h (B, T, d) -> (B, T, n_slots, 256), through the proposal heads and the shared
        output layer."""
        return self.out_proj(self.heads(h, n_slots))

    def reference_logits(
        self, ctx: EncoderContext, h: torch.Tensor, pos: torch.Tensor, n_slots: int = 1,
        layout: Layout = None,
    ) -> torch.Tensor:
        """``logits`` through the modules and a flat gather: the parity reference (layout,
        accepted for the same signature, changes nothing here)."""
        return self.slot_outputs(h, n_slots) + ctx.slot_conditioning(pos, n_slots)

    def forward(self, lr: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced training pass.

        lr: uint8 (B, 8, 8, 3); targets: long (B, 3072).
        Returns (logits (B, 3072, k, 256), cond_logits (B, 3072, 256)). Under autocast the
        logits are float32: the decoder's bf16 logits plus the float32 conditioning logits.
        """
        ctx = self.encode(lr)
        h = self.decoder_hidden(ctx, shift_right(targets))
        k, t = self.cfg.k, targets.shape[1]
        # slot i at position p reads the conditioning logits of p + i: a strided view of the
        # zero-padded (B, T + k, 256) table, not a gathered copy of k of them
        cond_slots = ctx.cond_logits.unfold(1, k, 1)[:, :t].transpose(-1, -2)  # (B, T, k, 256)
        logits = self.slot_outputs(h, k) + cond_slots
        cond = ctx.cond_logits[:, :t]  # the auxiliary loss sees the net's own logits
        return logits, cond / self.cond_scale_of_positions(t, cond)

    def cond_scale_of_positions(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The weight of the conditioning logits at positions 0..n-1 (each has its colour,
        the position modulo 3): (n, 1), in like's dtype and device."""
        per_colour = like.new_tensor(self.cfg.cond_scales)
        return per_colour[torch.arange(n, device=like.device) % CHANNELS].unsqueeze(-1)

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
        reference: bool = False,
    ) -> KVCache | FlatKVCache:
        """A cache for ``batch`` images: by default 3072 positions plus k + 1 of look-ahead.
        reference: the token-major ``FlatKVCache`` of the module path (parity tests, benchmark)."""
        p = next(self.parameters())
        n, dtype = max_len or N_HR_TOKENS + self.cfg.k + 1, dtype or p.dtype
        cfg = self.cfg
        if reference:
            return FlatKVCache(cfg.n_dec_layer, batch, n, cfg.d_model, dtype, p.device)
        return KVCache(cfg.n_dec_layer, batch, n, cfg.n_head, cfg.d_model // cfg.n_head,
                       cfg.attn_block, dtype, p.device)
