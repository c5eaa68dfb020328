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

Decoding functions (``bpd_sr.decoding.loop``) drive the model through ``encode`` and a
``bpd_sr.decoding.session.DecodingSession`` (the cached step); ``forward`` is the
teacher-forced training pass. Both run the decoder's one implementation,
``bpd_sr.model.decoder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bpd_sr.config import CHANNELS, HR_SIZE, N_HR_TOKENS, N_INTENSITIES, N_LR_TOKENS, ModelConfig
from bpd_sr.model.conditioning import ConditioningNet
from bpd_sr.model.decoder import decoder_layers, decoder_weights, local_attention
from bpd_sr.model.layers import (
    DecoderLayer,
    EncoderLayer,
    ProposalHeads,
)
from bpd_sr.model.tokens import channel_offset, hr_position_tables, shift_right


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
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec_layer))
        self.dec_ln = nn.LayerNorm(d)
        self.heads = ProposalHeads(cfg)
        self.out_proj = nn.Linear(d, N_INTENSITIES)  # shared by every slot
        self.cond = None
        if cfg.cond_channels > 0:
            shape = (cfg.cond_channels, cfg.cond_blocks, cfg.cond_head, cfg.cond_up_channels,
                     cfg.cond_flip_average)
            self.cond = ConditioningNet(
                *shape, fallback=ConditioningNet(*shape) if cfg.cond_fallback else None,
                switch_departure=cfg.cond_switch_departure)
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
    def decoder_hidden(self, ctx: EncoderContext, inputs: torch.Tensor) -> torch.Tensor:
        """Decoder output h (B, T, d) of positions 0..T-1 at once (teacher forcing).

        inputs: long (B, T) vocabulary ids of the token *before* each position
        (``tokens.shift_right``). Decoding runs the same layers one step at a time on a
        key/value cache (``bpd_sr.decoding.session``)."""
        b, t = inputs.shape
        blk = self.cfg.attn_block
        t_pad = -(-t // blk) * blk
        dec_pos = ctx.dec_pos if ctx.rows is None else ctx.dec_pos[ctx.rows]
        x = self.dec_tok(F.pad(inputs, (0, t_pad - t))) + dec_pos[:, :t_pad]
        dropout = self.cfg.dropout if self.training else 0.0
        x = F.dropout(x, dropout) if dropout else x

        def all_at_once(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return local_attention(q, kv, blk, dropout)

        h = decoder_layers(decoder_weights(self), x, ctx.cross_kv, all_at_once, dropout=dropout)
        return h[:, :t]

    def logits(self, ctx: EncoderContext, h: torch.Tensor, pos: torch.Tensor,
               n_slots: int = 1) -> torch.Tensor:
        """Logits of the first n_slots slots: h (B, T, d), pos long (B, T) (any positions)
        -> (B, T, n_slots, 256). Slot i at position p predicts target p + i, so it gets the
        conditioning logits of p + i."""
        return self.slot_outputs(h, n_slots) + ctx.slot_conditioning(pos, n_slots)

    def slot_outputs(self, h: torch.Tensor, n_slots: int) -> torch.Tensor:
        """The decoder's own logits of the first n_slots slots, without the conditioning:
        h (B, T, d) -> (B, T, n_slots, 256), through the proposal heads and the shared
        output layer."""
        return F.linear(self.heads(h, n_slots), self.out_proj.weight, self.out_proj.bias)

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
