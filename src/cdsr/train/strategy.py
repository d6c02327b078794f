"""Optimisation strategies: how the shared loop turns one batch into a parameter update.

A model names the strategy it needs (``model.train_strategy``, e.g. AutoCDSR's ``"pareto"``);
otherwise ``train.strategy`` applies. Registered in :data:`STRATEGIES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch

from cdsr.models.base import SeqRecModel
from cdsr.train.config import TrainConfig
from cdsr.train.distributed import NO_SYNC, GradSync
from cdsr.train.pareto import ParetoStrategy


class Strategy(Protocol):
    def step(self, model: SeqRecModel, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             cfg: TrainConfig, autocast: Callable[[], contextlib.AbstractContextManager],
             sync: GradSync = NO_SYNC) -> dict[str, float]:
        """One update from this process's share of a batch; ``sync`` combines the gradients of
        every process's share before clipping and the optimiser step (one process: a no-op)."""
        ...


class StandardStrategy:
    """Minimise ``model.loss(batch)["loss"]``; other returned terms are logged only."""

    def step(self, model, batch, optimizer, cfg, autocast, sync=NO_SYNC):
        with autocast():
            out = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        sync.grads([p for p in model.parameters() if p.requires_grad])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return {k: float(v.detach()) for k, v in out.items()}


STRATEGIES: dict[str, Callable[[], Strategy]] = {"standard": StandardStrategy, "pareto": ParetoStrategy}


def select_strategy(model: SeqRecModel, cfg: TrainConfig, strategy: Strategy | None = None) -> Strategy:
    """The ``strategy`` given, else the one the model names (``model.train_strategy``), else ``cfg.strategy``."""
    if strategy is not None:
        return strategy
    name = getattr(model, "train_strategy", None)
    name = cfg.strategy if name is None else name
    if name not in STRATEGIES:
        raise ValueError(f"unknown training strategy {name!r}; known: {sorted(STRATEGIES)}")
    return STRATEGIES[name]()
