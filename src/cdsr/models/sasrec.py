"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).

Input: item embedding * sqrt(d) + learned absolute position (+ learned domain embedding of each
event in the merged variant); L causal pre-LN blocks (Sec. III-B/C); h_i scores item j by
h_i . e_j with the input embeddings tied to the output (Sec. III-D).

Loss (docs/methods.md "SASRec"): full softmax cross-entropy of the next item against the items of the
*target's domain* (default, ``loss: ce``); ``sampled`` (sampled softmax, R negatives of the
target domain) and ``bce`` (the paper's binary loss with one negative) are options.
NOTE: the paper trains with BCE and one random negative; full softmax is our default because
it is the stronger, now-standard choice (and what ABXI and RecBole use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsr.models.base import BackboneConfig, SeqRecModel, Vocab
from cdsr.models.layers import (
    Dropout,
    Encoder,
    attention_mask,
    domain_softmax_loss,
    dot_scores,
    sample_domain_negatives,
    sampled_softmax_loss,
)


@dataclass(frozen=True)
class SASRecConfig(BackboneConfig):
    use_domain_emb: bool = True  # merged variant; the single-domain variant turns it off
    loss: Literal["ce", "sampled", "bce"] = "ce"
    n_negatives: int = 128  # for loss: sampled (per domain when negatives_from: all)
    # logits = q . e / temperature for ce and sampled (ABXI's InfoNCE: 0.75)
    temperature: float = 1.0
    # sampled negatives from the target's domain, or n_negatives from every domain (ABXI's draw)
    negatives_from: Literal["target", "all"] = "target"

    def __post_init__(self):
        if not self.temperature > 0 or self.n_negatives < 1:
            raise ValueError(f"{type(self).__name__}: temperature > 0 and n_negatives >= 1 are required")


class SASRec(SeqRecModel):
    def __init__(self, cfg: SASRecConfig, vocab: Vocab):
        super().__init__(vocab)
        self.cfg = cfg
        self.add_embeddings(cfg.d, cfg.max_len, cfg.use_domain_emb)
        self.drop = Dropout(cfg.dropout)
        self.encoder = Encoder(cfg.d, cfg.layers, cfg.heads, cfg.dropout)
        ranges = torch.tensor(vocab.domain_ranges, dtype=torch.long)
        self.register_buffer("dom_lo", ranges[:, 0], persistent=False)
        self.register_buffer("dom_size", ranges[:, 1] - ranges[:, 0] + 1, persistent=False)
        nn.init.normal_(self.item_emb.weight, std=cfg.d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, batch: dict[str, torch.Tensor], need_probs: bool = False, last_only: bool = False):
        """-> (h [B, L, d] (``last_only``: [B, 1, d], the last position), attention probs per
        layer or Nones). Causal: h_i sees events <= i."""
        items, mask = batch["items"], batch["mask"]
        L = items.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"sequence length {L} > max_len {self.cfg.max_len}")
        x = self.item_emb(items) * math.sqrt(self.cfg.d) + self.pos_emb.weight[-L:][None]
        if self.dom_emb is not None:
            x = x + self.dom_emb(batch["domains"])
        x = self.drop(x) * mask[..., None]
        return self.encoder(x, attention_mask(mask, causal=True), need_probs, last_only, valid=mask)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, _ = self.encode(batch)
        valid = batch["mask"] & (batch["targets"] > 0)
        q, tgt, tdom = h[valid], batch["targets"][valid], batch["target_domains"][valid]
        return {"loss": self._rec_loss(q, tgt, tdom)}

    def _rec_loss(self, q: torch.Tensor, tgt: torch.Tensor, tdom: torch.Tensor) -> torch.Tensor:
        t = self.cfg.temperature
        if self.cfg.loss == "ce":
            return domain_softmax_loss(q / t if t != 1.0 else q, tgt, tdom, self.item_emb.weight, self.vocab.domain_ranges)
        k = 1 if self.cfg.loss == "bce" else self.cfg.n_negatives
        if self.cfg.loss == "sampled" and self.cfg.negatives_from == "all":
            neg = torch.cat([sample_domain_negatives(torch.full_like(tdom, a), self.dom_lo, self.dom_size, k)
                             for a in range(self.vocab.n_domains)], 1)
        else:
            neg = sample_domain_negatives(tdom, self.dom_lo, self.dom_size, k)
        if self.cfg.loss == "sampled":  # a negative equal to the positive is masked
            return sampled_softmax_loss(q, self.item_emb.weight, tgt, neg, 1.0 / t)
        pos_s = (q * self.item_emb(tgt)).sum(-1)
        neg_s = (q * self.item_emb(neg[:, 0])).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_s, torch.ones_like(pos_s)) + \
            F.binary_cross_entropy_with_logits(neg_s, torch.zeros_like(pos_s))

    def score_parts(self, batch: dict[str, torch.Tensor]):
        h, _ = self.encode(batch, last_only=True)
        return h[:, -1], self.item_emb.weight, None

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        q, table, _ = self.score_parts(batch)
        return dot_scores(q, table, candidates)
