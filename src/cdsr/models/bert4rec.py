"""BERT4Rec (Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder
Representations from Transformer", CIKM 2019).

Training (Cloze task, Sec. 3.6): a fraction rho of the valid positions of the training sequence
is replaced by [MASK]; a bidirectional encoder predicts the original items with cross-entropy
against the items of the masked item's domain, through the tied item embeddings plus an output
bias (Sec. 3.5). Inference: [MASK] is appended after the history and scored.

The training sequence is the user's training prefix P: a training batch carries P[:-1] as
``items`` and P[1:] as ``targets`` (both right-aligned), so P = [items[:, :1], targets].
Positions: max_len + 1 (history of max_len events + the appended [MASK] at inference).
Domains (merged variant): every position carries its event's domain embedding, the [MASK]
position the *target* domain's (docs/methods.md "BERT4Rec": [MASK] carries the requested domain),
which is the requested domain, so nothing about the masked item itself leaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cdsr.models.base import BackboneConfig, SeqRecModel, Vocab
from cdsr.models.layers import (
    Dropout,
    Encoder,
    attention_mask,
    domain_softmax_loss,
    dot_scores,
)


@dataclass(frozen=True)
class BERT4RecConfig(BackboneConfig):
    mask_prob: float = 0.2  # 0.6 suits short, sparse sequences (docs/methods.md "BERT4Rec")
    use_domain_emb: bool = True


class BERT4Rec(SeqRecModel):
    def __init__(self, cfg: BERT4RecConfig, vocab: Vocab):
        super().__init__(vocab)
        self.cfg = cfg
        self.mask_id = vocab.n_items + 1
        self.item_emb = nn.Embedding(vocab.n_items + 2, cfg.d, padding_idx=0)
        self.out_bias = nn.Parameter(torch.zeros(vocab.n_items + 2))
        self.pos_emb = nn.Embedding(cfg.max_len + 1, cfg.d)
        self.dom_emb = nn.Embedding(vocab.n_domains, cfg.d) if cfg.use_domain_emb else None
        self.drop = Dropout(cfg.dropout)
        self.encoder = Encoder(cfg.d, cfg.layers, cfg.heads, cfg.dropout)
        self.head = nn.Sequential(nn.Linear(cfg.d, cfg.d), nn.GELU(), nn.LayerNorm(cfg.d))
        nn.init.normal_(self.item_emb.weight, std=cfg.d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def embed(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder input [B, L', d]: item * sqrt(d) + right-aligned position (+ domain), dropout."""
        L = items.shape[1]
        if L > self.cfg.max_len + 1:
            raise ValueError(f"sequence length {L} > max_len + 1 = {self.cfg.max_len + 1}")
        x = self.item_emb(items) * math.sqrt(self.cfg.d) + self.pos_emb.weight[-L:][None]
        if self.dom_emb is not None:
            x = x + self.dom_emb(domains)
        return self.drop(x) * mask[..., None]

    def encode(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, need_probs: bool = False,
               last_only: bool = False):
        """items/domains/mask [B, L'] (L' <= max_len + 1) -> (h [B, L', d] (``last_only``: [B, 1, d]),
        probs). Bidirectional."""
        h, probs = self.encoder(self.embed(items, domains, mask), attention_mask(mask, causal=False), need_probs,
                                last_only, valid=mask)
        return self.head(h), probs

    def cloze(self, batch: dict[str, torch.Tensor]):
        """The masked training sequence: (items, domains, mask, labels) with labels 0 where not
        masked. At least one position per sequence is masked (the last, if none was drawn)."""
        items = torch.cat([batch["items"][:, :1], batch["targets"]], 1)
        domains = torch.cat([batch["domains"][:, :1], batch["target_domains"]], 1)
        mask = items > 0
        pick = (torch.rand(items.shape, device=items.device) < self.cfg.mask_prob) & mask
        none = ~pick.any(1)
        pick[none, -1] = mask[none, -1]
        labels = torch.where(pick, items, torch.zeros_like(items))
        return torch.where(pick, torch.full_like(items, self.mask_id), items), domains, mask, labels

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        items, domains, mask, labels = self.cloze(batch)
        h, _ = self.encode(items, domains, mask)
        sel = labels > 0
        return {"loss": domain_softmax_loss(h[sel], labels[sel], domains[sel], self.item_emb.weight,
                                            self.vocab.domain_ranges, bias=self.out_bias)}

    def inference_inputs(self, batch: dict[str, torch.Tensor]):
        """History (last max_len events) + [MASK] carrying the requested (target) domain."""
        B = batch["items"].shape[0]
        items = torch.cat([batch["items"], torch.full((B, 1), self.mask_id, device=batch["items"].device)], 1)
        domains = torch.cat([batch["domains"], batch["target_domain"][:, None]], 1)
        mask = torch.cat([batch["mask"], torch.ones(B, 1, dtype=torch.bool, device=batch["mask"].device)], 1)
        return items[:, -(self.cfg.max_len + 1):], domains[:, -(self.cfg.max_len + 1):], mask[:, -(self.cfg.max_len + 1):]

    def score_parts(self, batch: dict[str, torch.Tensor]):
        h, _ = self.encode(*self.inference_inputs(batch), last_only=True)
        return h[:, -1], self.item_emb.weight[: self.mask_id], self.out_bias[: self.mask_id]

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        q, table, bias = self.score_parts(batch)
        return dot_scores(q, table, candidates, bias)
