"""AutoCDSR and AutoCDSR+ ("Revisiting Self-attention for Cross-domain Sequential
Recommendation", KDD 2025; seed 000, docs/methods.md "AutoCDSR and AutoCDSR+").

AutoCDSR keeps the merged backbone (SASRec or BERT4Rec) unchanged and adds one auxiliary
objective, the cross-domain attention mass L_cd (:func:`cross_domain_attention_mass`), computed
from the attention probabilities of the same forward pass that gives the recommendation loss.
The two objectives are balanced per batch by the preference-aware Pareto step (MGDA /
Frank-Wolfe, ``cdsr.train.pareto``, strategy ``"pareto"``), or, in ``mode: fixed``, scalarised as
L_rec + alpha * L_cd (the static-weight baseline of the paper's Figure 4).

The contract with the Pareto strategy:

- ``aux_objectives(batch) -> {"rec", "cd"}``: both scalars from ONE forward pass (the explicit
  attention path, ``need_probs=True``); training only. Scoring uses the fused (SDPA) path.
- ``shared_parameters()``: the transformer encoder's parameters (not the embedding tables,
  not the output head): the gradients of both objectives are balanced on these.
- ``train_strategy``: ``"pareto"`` in pareto mode, ``None`` (the loop's default) in fixed mode.
- ``loss(batch)`` works with the standard strategy: ``{"loss", "rec", "cd_attn"}``, where
  ``loss = rec + alpha * cd`` in fixed mode and ``loss = rec`` in pareto mode.

AutoCDSR+ (:class:`AutoCDSRPlus`, BERT4Rec only) prepends K learned information-bottleneck (IB)
tokens per domain and restricts attention with :func:`ib_attention_mask` so that every piece of
cross-domain information passes through IB tokens; its auxiliary objective ("cd") is the attention
mass that item queries put on IB tokens (:func:`ib_attention_mass`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cdsr.models.base import Vocab
from cdsr.models.bert4rec import BERT4Rec, BERT4RecConfig
from cdsr.models.layers import cross_domain_attention_mass, domain_softmax_loss
from cdsr.models.sasrec import SASRec, SASRecConfig

Mode = Literal["pareto", "fixed"]


@dataclass(frozen=True)
class AutoCDSRSASRecConfig(SASRecConfig):
    mode: Mode = "pareto"  # pareto: MGDA step (strategy "pareto"); fixed: rec + alpha * cd
    alpha: float = 0.1  # weight of L_cd in fixed mode
    # L_cd's scale: query (mass per query, 0..1; docs/methods.md "AutoCDSR and AutoCDSR+") or cell (the
    # reference code's mean over the query x key block, summed over layers); see
    # cross_domain_attention_mass
    cd_scale: Literal["query", "cell"] = "query"
    # Robustness experiment (paper Section 5.5 / A.5): a seeded fraction of the catalogue carries a
    # wrong domain label wherever the model reads input domain labels (see _AutoCDSR.input_domains).
    label_noise: float = 0.0
    label_noise_seed: int = 0


@dataclass(frozen=True)
class AutoCDSRBERT4RecConfig(BERT4RecConfig):
    mode: Mode = "pareto"
    alpha: float = 0.1
    cd_scale: Literal["query", "cell"] = "query"
    label_noise: float = 0.0
    label_noise_seed: int = 0


@dataclass(frozen=True)
class AutoCDSRPlusConfig(AutoCDSRBERT4RecConfig):
    ib_tokens: int = 4  # K IB tokens per domain
    # NOTE (ours, after the paper's footnote 6 and the reference code): after every block but the
    # last, the k-th IB token of every domain is replaced by the element-wise mean of the k-th IB
    # tokens over domains. Without it, an item of domain A reaches an item of domain B only over
    # three attention hops (A item -> IB_A -> IB_B -> B item), i.e. with >= 3 layers; with it, two
    # layers suffice. The mask (IB tokens of all domains attend to each other) is the same either way.
    ib_sync: bool = True


def ib_attention_mask(token_domains: torch.Tensor, valid: torch.Tensor, n_ib: int) -> torch.Tensor:
    """AutoCDSR+'s structured mask [B, 1, T, T] (True = may attend) over tokens [IB..., items...].

    token_domains / valid [B, T]: the first ``n_ib`` tokens are the IB tokens (always valid).
    - an item query attends to valid items of its own domain and to its own domain's IB tokens;
    - an IB query attends to every IB token and to the valid items of its own domain;
    - a padding query attends to itself only (never an empty row: softmax would give NaN).
    No item query ever sees an item key of another domain.
    """
    T = token_domains.shape[1]
    is_ib = torch.arange(T, device=token_domains.device) < n_ib
    same = token_domains[:, :, None] == token_domains[:, None, :]
    allowed = valid[:, :, None] & valid[:, None, :] & (same | (is_ib[:, None] & is_ib[None, :]))
    return (allowed | torch.eye(T, dtype=torch.bool, device=valid.device)).unsqueeze(1)


def ib_attention_mass(probs: list[torch.Tensor], n_ib: int, valid: torch.Tensor, scale: str = "query") -> torch.Tensor:
    """The attention mass of valid item queries on the IB tokens.

    probs: per layer [B, h, T, T] over tokens [IB (n_ib)..., items (L)...]; valid [B, L] (items).
    ``scale``: ``query``: the mean over queries, heads and layers of the mass (in [0, 1]);
    ``cell`` (the reference code's): per layer the mean over the query x IB-token cells and
    heads, summed over layers (the per-query mass x layers / n_ib).
    """
    if scale not in ("query", "cell"):
        raise ValueError(f"scale must be query or cell, not {scale!r}")
    q = valid.float()
    total = sum((p[:, :, n_ib:, :n_ib].float().sum(-1).sum(1) * q).sum() for p in probs)
    if scale == "cell":
        return total / (q.sum() * n_ib * probs[0].shape[1]).clamp_min(1)
    return total / (q.sum() * probs[0].shape[1] * len(probs)).clamp_min(1)


def noisy_item_labels(vocab: Vocab, p: float, seed: int) -> torch.Tensor:
    """[n_items + 1] domain label per item id (index 0: padding, label 0): the true domain, except
    for a seeded fraction ``p`` of the items, which get a uniformly random *other* domain."""
    true = torch.zeros(vocab.n_items + 1, dtype=torch.long)
    for d, (a, b) in enumerate(vocab.domain_ranges):
        true[a: b + 1] = d
    if vocab.n_domains < 2 or p <= 0.0:
        return true
    g = torch.Generator().manual_seed(int(seed))
    flip = torch.rand(vocab.n_items + 1, generator=g) < p
    flip[0] = False
    shift = torch.randint(1, vocab.n_domains, (vocab.n_items + 1,), generator=g)
    return torch.where(flip, (true + shift) % vocab.n_domains, true)


class _AutoCDSR:
    """What the AutoCDSR models share: the scalarised / Pareto objectives. Subclasses implement
    ``_objectives(batch) -> (rec, cd)`` with one forward pass."""

    cfg: AutoCDSRSASRecConfig | AutoCDSRBERT4RecConfig
    encoder: nn.Module
    train_strategy: str | None = "pareto"

    def _init_autocdsr(self) -> None:
        if self.cfg.mode not in ("pareto", "fixed"):
            raise ValueError(f"mode must be 'pareto' or 'fixed', not {self.cfg.mode!r}")
        if self.cfg.alpha < 0:
            raise ValueError(f"alpha must be >= 0, not {self.cfg.alpha}")
        if not 0.0 <= self.cfg.label_noise <= 1.0:
            raise ValueError(f"label_noise must lie in [0, 1], not {self.cfg.label_noise}")
        self.train_strategy = "pareto" if self.cfg.mode == "pareto" else None
        labels = None
        if self.cfg.label_noise > 0.0:
            labels = noisy_item_labels(self.vocab, self.cfg.label_noise, self.cfg.label_noise_seed)
        self.register_buffer("item_label", labels, persistent=False)  # derived from the config

    def input_domains(self, items: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """[B, L] domain labels the model reads (domain embedding, L_cd pairs, IB mask): the true
        ``domains`` unless ``label_noise`` > 0, then each catalogue item's (possibly wrong) label.

        NOTE: label noise is per item (a mislabelled catalogue entry is wrong in every sequence,
        at training and at serving time), and touches only what the model reads as domain labels:
        the recommendation loss still ranks a target within its true domain, because item ids
        are partitioned by domain in our vocabulary. [MASK] and padding keep their labels.
        """
        if self.item_label is None:
            return domains
        real = (items >= 1) & (items <= self.vocab.n_items)
        return torch.where(real, self.item_label[items.clamp(0, self.vocab.n_items)], domains)

    def _objectives(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """The transformer encoder's parameters (blocks + final LayerNorm): no embedding table."""
        return list(self.encoder.parameters())

    def aux_objectives(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rec, cd = self._objectives(batch)
        return {"rec": rec, "cd": cd}

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rec, cd = self._objectives(batch)
        loss = rec + self.cfg.alpha * cd if self.cfg.mode == "fixed" else rec
        return {"loss": loss, "rec": rec.detach(), "cd_attn": cd.detach()}


class AutoCDSRSASRec(_AutoCDSR, SASRec):
    """AutoCDSR on the merged SASRec: L_cd under SASRec's causal mask."""

    def __init__(self, cfg: AutoCDSRSASRecConfig, vocab: Vocab):
        super().__init__(cfg, vocab)
        self._init_autocdsr()

    def encode(self, batch: dict[str, torch.Tensor], need_probs: bool = False, last_only: bool = False):
        if self.item_label is not None:
            batch = {**batch, "domains": self.input_domains(batch["items"], batch["domains"])}
        return super().encode(batch, need_probs, last_only)

    def _objectives(self, batch):
        h, probs = self.encode(batch, need_probs=True)
        valid = batch["mask"] & (batch["targets"] > 0)
        rec = self._rec_loss(h[valid], batch["targets"][valid], batch["target_domains"][valid])
        return rec, cross_domain_attention_mass(probs, self.input_domains(batch["items"], batch["domains"]),
                                                batch["mask"], self.cfg.cd_scale)


class AutoCDSRBERT4Rec(_AutoCDSR, BERT4Rec):
    """AutoCDSR on the merged BERT4Rec: L_cd under BERT4Rec's bidirectional mask, on the Cloze
    (masked) training sequence; a [MASK] position counts with the domain of the item it hides
    (known at serving time: the requested domain), like everywhere else in BERT4Rec."""

    def __init__(self, cfg: AutoCDSRBERT4RecConfig, vocab: Vocab):
        super().__init__(cfg, vocab)
        self._init_autocdsr()

    def encode(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, need_probs: bool = False,
               last_only: bool = False):
        return super().encode(items, self.input_domains(items, domains), mask, need_probs, last_only)

    def _objectives(self, batch):
        items, domains, mask, labels = self.cloze(batch)
        h, probs = self.encode(items, domains, mask, need_probs=True)
        sel = labels > 0
        rec = domain_softmax_loss(h[sel], labels[sel], domains[sel], self.item_emb.weight,
                                  self.vocab.domain_ranges, bias=self.out_bias)
        return rec, self._aux_mass(probs, self.input_domains(items, domains), mask)

    def _aux_mass(self, probs, domains, mask):
        return cross_domain_attention_mass(probs, domains, mask, self.cfg.cd_scale)


class AutoCDSRPlus(AutoCDSRBERT4Rec):
    """AutoCDSR+: BERT4Rec with K IB tokens per domain prepended, under :func:`ib_attention_mask`.

    Tokens: [IB of domain 0 (K), ..., IB of domain D-1 (K), items (L')]. The item positions are
    exactly BERT4Rec's (same embeddings, positions, Cloze training, [MASK] scoring); the IB
    tokens have no position embedding and are dropped from the output. At inference the appended
    [MASK] carries the requested (target) domain (BERT4Rec.inference_inputs), so under the mask it
    is an item of the target domain: it reads that domain's items and IB tokens, and that
    domain's IB tokens read it.
    NOTE: the reference code runs one encoder per domain over [IB, domain items] and merges the
    IB tokens between layers; we use the single shared encoder with the structured mask
    (docs/methods.md "AutoCDSR and AutoCDSR+"; plus the between-layer IB merge, ``ib_sync``), which has the
    same information flow without duplicating the encoder.
    """

    def __init__(self, cfg: AutoCDSRPlusConfig, vocab: Vocab):
        if cfg.ib_tokens < 1:
            raise ValueError(f"ib_tokens must be >= 1, not {cfg.ib_tokens}")
        super().__init__(cfg, vocab)
        D, K = vocab.n_domains, cfg.ib_tokens
        self.n_ib = D * K
        self.ib_emb = nn.Embedding(self.n_ib, cfg.d)
        nn.init.normal_(self.ib_emb.weight, std=cfg.d ** -0.5)  # x sqrt(d) below, like the items
        self.register_buffer("ib_dom", torch.arange(D).repeat_interleave(K), persistent=False)

    def _sync_ib(self, x: torch.Tensor) -> torch.Tensor:
        B, _, d = x.shape
        D = self.vocab.n_domains
        ib = x[:, : self.n_ib].reshape(B, D, self.n_ib // D, d).mean(1, keepdim=True).expand(B, D, -1, d)
        return torch.cat([ib.reshape(B, self.n_ib, d), x[:, self.n_ib:]], 1)

    def encode(self, items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, need_probs: bool = False,
               last_only: bool = False):
        """items/domains/mask [B, L'] -> (h [B, L', d] at the item positions, probs per layer
        [B, h, T, T] over all T = D*K + L' tokens, IB tokens first). ``last_only``: h [B, 1, d];
        only the last block computes the last position alone (the IB merge between blocks reads
        every position)."""
        B = items.shape[0]
        domains = self.input_domains(items, domains)
        x_items = self.embed(items, domains, mask)
        x_ib = (self.ib_emb.weight * math.sqrt(self.cfg.d)).unsqueeze(0).expand(B, -1, -1)
        x = torch.cat([x_ib.to(x_items.dtype), x_items], 1)
        tok_dom = torch.cat([self.ib_dom.expand(B, -1), domains], 1)
        valid = torch.cat([torch.ones(B, self.n_ib, dtype=torch.bool, device=mask.device), mask], 1)
        am = ib_attention_mask(tok_dom, valid, self.n_ib)
        probs = []
        blocks = self.encoder.blocks
        for i, blk in enumerate(blocks):
            x, p = blk(x, am, need_probs, last_only and i == len(blocks) - 1, valid)
            probs.append(p)
            if self.cfg.ib_sync and i < len(blocks) - 1:
                x = self._sync_ib(x)
        h = self.encoder.ln(x)
        return self.head(h if last_only else h[:, self.n_ib:]), probs

    def _aux_mass(self, probs, domains, mask):
        """AutoCDSR+'s objective: the attention mass of item queries onto the IB tokens."""
        return ib_attention_mass(probs, self.n_ib, mask, self.cfg.cd_scale)
