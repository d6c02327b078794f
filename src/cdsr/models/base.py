"""The one model interface every method implements (docs/architecture.md "The model interface").

A model is an ``nn.Module`` built from its config dataclass and the dataset's :class:`Vocab`:

- ``loss(batch) -> dict[str, Tensor]`` with at least ``"loss"`` (a scalar to minimise) and any
  named auxiliary terms (logged separately);
- ``score(batch, candidates=None) -> Tensor[B, C]``: scores for the next position of each
  history (and, for dot-product scorers, ``score_parts(batch)``: the user vectors and the item
  table those scores are products of). ``candidates`` is a ``[B, C]`` LongTensor of item ids (sampled protocols); ``None``
  means every item: the result is then ``[B, n_items + 1]`` (column = item id, column 0 is
  padding) and the evaluation keeps the columns of the target domain (or all, ``full-all``).
- optional ``aux_objectives(batch) -> dict[str, Tensor]`` for strategies that need several
  losses kept apart (AutoCDSR's Pareto step), with ``shared_parameters()`` (the parameters the
  strategy balances the objectives' gradients on) and ``train_strategy`` (see below);
- optional ``epoch_diagnostics(data, eval_cfg, device) -> dict[str, float]``: measurements the
  training loop adds to each validation epoch's record as ``val_<name>`` (logged to MLflow per
  epoch), e.g. GCA's |cos(X, X')| on the validation histories.

Batches come from ``cdsr.data.loaders``: ``items, domains, timestamps, mask [B, L]`` (right
aligned, 0 = padding), ``target_domain [B]`` (the requested domain: known at serving time), and
in training ``targets, target_domains [B, L]``. A model must never let position i see an item at
i+1 or later; only the *domain* of i+1 (the requested domain) may be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class BackboneConfig:
    """The fields every transformer backbone's config starts with (the small CPU defaults)."""

    d: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    max_len: int = 50


@dataclass(frozen=True)
class Vocab:
    """What a model needs to know about the dataset: item ids are contiguous per domain."""

    n_items: int  # largest item id (ids are 1..n_items; 0 = padding)
    domain_ranges: tuple[tuple[int, int], ...]  # (first, last) item id of each domain
    domain_names: tuple[str, ...] = ()

    @property
    def n_domains(self) -> int:
        return len(self.domain_ranges)

    @classmethod
    def from_ranges(cls, ranges: np.ndarray, names: list[str] | tuple[str, ...] = ()) -> Vocab:
        return cls(int(ranges[:, 1].max()), tuple((int(a), int(b)) for a, b in ranges), tuple(names))


class SeqRecModel(nn.Module):
    """Base class: subclasses implement ``loss`` and ``score``."""

    # The training strategy this model asks for (a key of cdsr.train.strategy.STRATEGIES, e.g.
    # "pareto" for AutoCDSR); None: the loop's configured default ("standard").
    train_strategy: str | None = None

    def __init__(self, vocab: Vocab):
        super().__init__()
        self.vocab = vocab

    def add_embeddings(self, d: int, max_len: int, domains: bool = True) -> None:
        """The input tables most models start from: ``item_emb`` [n_items + 1, d] (row 0:
        padding), ``pos_emb`` [max_len, d] and ``dom_emb`` [n_domains, d] (None without
        ``domains``), created in this order, which fixes their initial values under a seed."""
        self.item_emb = nn.Embedding(self.vocab.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.dom_emb = nn.Embedding(self.vocab.n_domains, d) if domains else None

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def score_parts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Optional, for dot-product scorers: ``(q [B, d], table [n_items + 1, d], bias
        [n_items + 1] or None)`` with ``score(batch, None)[b, j] = q[b] . table[j] + bias[j]``
        (j >= 1). It lets the full-ranking evaluation score each row against its target
        domain's items only, in memory-bounded chunks. None: use ``score``."""
        return None
