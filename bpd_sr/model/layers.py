"""The Image Transformer's layers (Parmar et al. 2018): the encoder's, the decoder's (as
parameters: ``bpd_sr.model.decoder`` runs them) and the proposal heads of blockwise parallel
decoding (Stern et al. 2018, section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpd_sr.config import ModelConfig


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
    """Decoder queries attend to the whole encoder memory: its keys and values are computed
    once per image (``memory_kv``); ``bpd_sr.model.decoder`` runs the queries."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 192, d) -> keys, values, each (B, n_head, 192, head_dim)."""
        b, s, d = memory.shape
        kv = self.kv(memory).view(b, s, 2, self.n_head, d // self.n_head).transpose(1, 3)
        k, v = kv.unbind(2)
        return k, v


class LocalSelfAttention(nn.Module):
    """The parameters of masked local-1D self-attention (Parmar et al. 2018, section 3.2);
    ``bpd_sr.model.decoder`` runs it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)


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
    """The parameters of one decoder layer; ``bpd_sr.model.decoder.decoder_layers`` runs all
    of them (the training pass and every decoding step alike)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = LocalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = CrossAttention(cfg)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.d_ff, cfg.dropout)


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
        """h (..., d) -> (..., n_slots, d), the first n_slots slots. Only the rows of the
        output layer that those slots need are read (a step that asks for fewer slots than
        the model has reads less of the heads' largest matrix)."""
        if self.identity_first_slot and n_slots == 1:
            return h.unsqueeze(-2)
        d = h.shape[-1]
        n_ff = n_slots - 1 if self.identity_first_slot else n_slots
        hidden = F.relu(F.linear(h, self.fc.weight, self.fc.bias))
        ff = F.linear(hidden, self.proj.weight[: n_ff * d], self.proj.bias[: n_ff * d])
        slots = h.unsqueeze(-2) + ff.unflatten(-1, (n_ff, d))
        if self.identity_first_slot:
            slots = torch.cat([h.unsqueeze(-2), slots], dim=-2)
        return slots
