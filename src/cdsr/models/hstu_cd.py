"""HSTU-CD: HSTU with intra-domain attention, Transition-Aware Positional Embeddings (TAPE) and
Dynamic Domain State Representation (DDSR).

Seed 001 ("Efficient Large-Scale Cross-Domain Sequential Recommendation with Dynamic State
Representations", arXiv 2508.20945); docs/methods.md "HSTU-CD". Written from the seed.
The backbone is :class:`cdsr.models.hstu.HSTU` (its loss: sampled softmax with negatives from
the target's domain only; its scoring and its requested-domain query embedding).

Each part is switched by one config field, so the ablation grid {HSTU merged, + intra-domain
mask, + TAPE, + DDSR, + both} is one change each (``intra_domain``, ``tape``, ``ddsr``):

- **Intra-domain attention**: query i uses key j iff j <= i and dom(j) == dom(i)
  (:mod:`cdsr.models.intra_attention`). ``attention: tiled`` is the block-sparse path whose cost
  is O(sum_d s_d^2); ``dense`` is the masked reference; ``auto`` picks ``tiled`` from
  ``tiled_min_len`` positions on (on short windows, e.g. 50, the dense matmul is faster).
- **TAPE** (seed Sec. "Mechanism 2"): ``r_i = e(d_{i+1}) * (W e(d_i) + b)`` if d_{i+1} != d_i,
  else 0, added to the input at position i. e are TAPE's own learned domain embeddings. d_{i+1}
  of the last position is the requested domain, which is known at serving time.
- **DDSR** (seed "Mechanism 3"): after each layer, for each position i and domain d,
  ``S_d(i)`` is the hidden state of the last position <= i of domain d, or a learned per-domain
  "empty" state if there is none. It is found with a running index (cummax) and a gather. A
  multi-head attention with query h_i over the D-1 keys {S_d(i) : d != dom(i)} adds its output to
  h_i (residual, optionally gated). Cost O(L D d).

NOTE (our choices where the seed is silent):
- DDSR queries and states are LayerNorm-ed (pre-LN, like the rest of HSTU). The gate is
  ``sigmoid(W_g LN(h_i))`` per channel. The output gets dropout, and padding positions are
  left unchanged;
- TAPE's domain embeddings are separate from the input domain embedding; W and b are a Linear
  of width d;
- the paper adds ALiBi as the base position encoding; we keep HSTU's own relative-position and
  time biases (rab), so the only difference from our HSTU baseline is the three switches;
- with one domain, DDSR has no other domain to read and is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.base import Vocab
from cdsr.models.hstu import HSTU, HSTUConfig
from cdsr.models.intra_attention import (
    DensePlan,
    TiledPlan,
    dense_plan,
    intra_domain_mask,
    tiled_plan,
)
from cdsr.models.layers import Dropout, last_state_index


@dataclass(frozen=True)
class HSTUCDConfig(HSTUConfig):
    intra_domain: bool = True
    tape: bool = True
    ddsr: bool = True
    ddsr_heads: int = 2
    ddsr_gate: bool = True
    attention: Literal["auto", "dense", "tiled"] = "auto"
    block: int = 0  # tile size of the block-sparse path; 0: from the batch's domain sizes (auto_block)
    tiled_min_len: int = 256  # auto: the tiled path from this window length on


def next_domains(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L] domain of the event after each position; the last one is the requested domain."""
    return torch.cat([batch["domains"][:, 1:], batch["target_domain"].reshape(-1, 1).to(batch["domains"])], dim=1)


class TAPE(nn.Module):
    """Transition-aware positional embedding: domains, next domains [B, L] -> r [B, L, d]."""

    def __init__(self, n_domains: int, d: int):
        super().__init__()
        self.emb = nn.Embedding(n_domains, d)
        self.proj = nn.Linear(d, d)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, domains: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        r = self.emb(nxt) * self.proj(self.emb(domains))
        return r * (nxt != domains).unsqueeze(-1)


class DomainState(nn.Module):
    """DDSR: x [B, L, d] -> x + gate * Attn(h_i; {S_d(i) : d != dom(i)}) at valid positions."""

    def __init__(self, d: int, n_domains: int, heads: int, dropout: float, gate: bool):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by ddsr_heads={heads}")
        self.D, self.h, self.dk = n_domains, heads, d // heads
        self.ln_q, self.ln_s = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)
        self.gate = nn.Linear(d, d) if gate else None
        self.empty = nn.Parameter(torch.randn(n_domains, d) * 0.02)  # S_d(i) before d's first event
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, domains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.D < 2:
            return x
        B, L, d = x.shape
        idx = last_state_index(domains, valid, self.D)  # [B, L, D]
        s = self.ln_s(x).gather(1, idx.clamp(min=0).reshape(B, L * self.D, 1).expand(-1, -1, d)).view(B, L, self.D, d)
        s = torch.where((idx >= 0).unsqueeze(-1), s, self.empty)
        hq = self.ln_q(x)
        q = self.q(hq).view(B, L, self.h, self.dk)
        k, v = self.kv(s).view(B, L, self.D, 2, self.h, self.dk).unbind(3)  # [B, L, D, h, dk]
        att = torch.einsum("blhe,bldhe->blhd", q, k) / math.sqrt(self.dk)
        own = domains.unsqueeze(-1) == torch.arange(self.D, device=x.device)  # [B, L, D]: dom(i) is no key
        att = att.masked_fill(own.unsqueeze(2), float("-inf")).softmax(-1)
        out = self.o(torch.einsum("blhd,bldhe->blhe", self.drop(att), v).reshape(B, L, d))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(hq)) * out
        return x + self.drop(out) * valid.unsqueeze(-1)


class HSTUCD(HSTU):
    """HSTU + intra-domain attention + TAPE + DDSR (module docstring); loss and scoring: HSTU's."""

    def __init__(self, cfg: HSTUCDConfig, vocab: Vocab):
        super().__init__(cfg, vocab)
        self.tape = TAPE(vocab.n_domains, cfg.d) if cfg.tape else None
        self.ddsr = nn.ModuleList(DomainState(cfg.d, vocab.n_domains, cfg.ddsr_heads, cfg.dropout, cfg.ddsr_gate)
                                  for _ in range(cfg.layers)) if cfg.ddsr else None

    def embed(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
        x = super().embed(batch, valid)
        if self.tape is not None:
            x = x + self.tape(batch["domains"], next_domains(batch))
        return x

    def after_layer(self, index: int, x: torch.Tensor, batch: dict[str, torch.Tensor],
                    valid: torch.Tensor) -> torch.Tensor:
        return x if self.ddsr is None else self.ddsr[index](x, batch["domains"], valid)

    def attention_impl(self, length: int) -> str:
        impl = self.cfg.attention
        if impl == "auto":
            impl = "tiled" if length >= self.cfg.tiled_min_len else "dense"
        return impl

    def attention_plan(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> DensePlan | TiledPlan:
        if not self.cfg.intra_domain:
            return super().attention_plan(batch, valid)
        domains = batch["domains"]
        bias = self.rab.pair_fn(batch["timestamps"], self.query_times(batch))
        norm = float(self.cfg.max_len)
        if self.attention_impl(domains.shape[1]) == "dense":
            return dense_plan(intra_domain_mask(domains, valid), bias, norm)
        return tiled_plan(domains, valid, bias, norm, self.cfg.block)
