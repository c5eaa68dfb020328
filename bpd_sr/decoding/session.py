"""A decoding session: what decoding keeps beside the model, and the incremental step.

The model holds parameters only. Everything a decode adds lives in a ``DecodingSession``:
the decoder's weights gathered as tuples (``bpd_sr.model.decoder.DecoderWeights``), the
optional compiled step (``bpd_sr.decoding.compiled``) and memos such as auto-k's
measurements (``bpd_sr.decoding.autok``). Every decoding function takes a model or a
session (``DecodingSession.of``); a caller that decodes many batches, or compiles, makes one
session and passes it each time.

The step (``decoder_hidden``) runs the decoder's one implementation,
``bpd_sr.model.decoder.decoder_layers``, with a self-attention that writes the new tokens'
keys and values into the ``KVCache`` and reads their window back. When every row sits at the
same position (sequential decoding and sampling at any batch size, blockwise decoding at
batch 1) that window is a view and the position embeddings and conditioning logits are
slices of the encoder context instead of gathers.

Decoding is inference: dropout is off (``model.eval()``; a model in training mode with
dropout is refused rather than decoded with dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpd_sr.config import N_HR_TOKENS
from bpd_sr.decoding.cache import GATHERED, KVCache, Layout
from bpd_sr.model.decoder import decoder_layers, decoder_weights


class DecodingSession:
    """One model's decoding state: ``model``, ``weights`` (gathered once), ``compiled`` (a
    ``CompiledStep`` or None) and ``memo`` (a dict for measurements worth keeping between
    decodes, keyed by their owner).

    The weights are references to the parameters, so in-place updates (training,
    ``load_state_dict``, ``.to()``) stay visible; a session made before a submodule was
    replaced must be made again."""

    def __init__(self, model) -> None:
        self.model = model
        self.weights = decoder_weights(model)
        self.compiled = None
        self.memo: dict = {}

    @classmethod
    def of(cls, model_or_session) -> DecodingSession:
        """The session itself, or a new one of a model."""
        return model_or_session if isinstance(model_or_session, cls) else cls(model_or_session)

    def compile(self, options: dict | None = None, backend: str = "inductor"):
        """Run this session's shared-position steps through ``torch.compile`` from now on
        (``bpd_sr.decoding.compiled.CompiledStep``); returns the ``CompiledStep``."""
        from bpd_sr.decoding.compiled import CompiledStep

        self.compiled = CompiledStep(self.model, options, backend)
        return self.compiled

    def new_cache(self, batch: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache for ``batch`` images: by default 3072 positions plus k + 1 of look-ahead."""
        cfg, p = self.model.cfg, next(self.model.parameters())
        n, dtype = max_len or N_HR_TOKENS + cfg.k + 1, dtype or p.dtype
        return KVCache(cfg.n_dec_layer, batch, n, cfg.n_head, cfg.d_model // cfg.n_head,
                       cfg.attn_block, dtype, p.device)

    def decoder_hidden(self, ctx, inputs: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                       rows: torch.Tensor, layout: Layout = None) -> torch.Tensor:
        """Decoder output h (b, T, d) of T new tokens per row, writing their keys and values.

        inputs: long (b, T) vocabulary ids of the token before each position
        (``tokens.previous_token_inputs``); pos: long (b, T) contiguous positions of each row
        (positions past the context's last one, look-ahead fed near the end, reuse its
        embedding; their outputs are never used); rows: long (b,) the cache row of each
        batch row; layout: what the caller knows of rows and pos on the host
        (``bpd_sr.decoding.cache.Layout``; None: the step reads them, a host sync)."""
        m = self.model
        if m.training and m.cfg.dropout > 0:
            raise RuntimeError("incremental decoding runs without dropout: call model.eval() first")
        plan = cache.plan(rows, pos, layout)
        x = _input_embeddings(m, ctx, inputs, pos, plan.p0 if plan.shared else None)
        if self.compiled is not None and plan.shared:
            return self.compiled.decoder(x, ctx.cross_kv, cache, plan)

        def cached_attention(i: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            k, v = cache.update(i, plan, kv)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask)

        return decoder_layers(self.weights, x, ctx.cross_kv, cached_attention)

    def logits(self, ctx, h: torch.Tensor, pos: torch.Tensor, n_slots: int = 1,
               layout: Layout = None) -> torch.Tensor:
        """Logits of the first n_slots proposal slots: h (b, T, d), pos long (b, T) (any
        positions) -> (b, T, n_slots, 256). Slot i at position p gets the conditioning
        logits of p + i: a slice of the context when every row asks for the same single
        position. layout: as in ``decoder_hidden``."""
        b, t = pos.shape
        cond_all = ctx.cond_logits
        if t != 1 or layout == GATHERED:
            p0 = None
        else:
            p0 = _shared_position(pos) if layout is None else layout[1]
        shared = p0 is not None and p0 + n_slots <= cond_all.shape[1] and ctx.rows is None
        if not shared:
            return self.model.logits(ctx, h, pos, n_slots)
        cond = cond_all[:, None, p0 : p0 + n_slots]  # a view: (b, 1, S, 256)
        if self.compiled is not None:
            # h copied to fresh strides: the compiled graph is specialised on them
            h = torch.empty((b, 1, h.shape[-1]), dtype=h.dtype, device=h.device).copy_(h)
            return self.compiled.logits(h, cond, n_slots)
        # the sum takes the wider of the two dtypes: under bf16 autocast the conditioning
        # logits stay float32 (ConditioningNet)
        return self.model.slot_outputs(h, n_slots) + cond


def _shared_position(pos: torch.Tensor) -> int | None:
    """The position of column 0 when every row has the same one, else None. pos: (b, T)."""
    p = pos[:, 0].tolist()
    return p[0] if all(x == p[0] for x in p) else None


def _input_embeddings(model, ctx, inputs: torch.Tensor, pos: torch.Tensor,
                      p0: int | None) -> torch.Tensor:
    """The decoder input of the new tokens: (b, T, d), a slice of the context's position
    table when every row sits at p0..p0+T-1 (and the table reaches that far)."""
    t = inputs.shape[1]
    tok = F.embedding(inputs, model.dec_tok.weight)
    if p0 is not None and p0 + t <= ctx.dec_pos.shape[1] and ctx.rows is None:
        return tok + ctx.dec_pos[:, p0 : p0 + t]
    return tok + ctx.position_embeddings(pos)
