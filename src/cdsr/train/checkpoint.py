"""What a checkpoint holds, and the loop's state between steps.

``last.pt`` = model, optimiser, CPU (and CUDA) RNG state, the strategy's state, the weights'
moving average where training keeps one, and the :class:`TrainState`; ``best.pt`` = the best model with its epoch and validation value. These
functions build and apply those dicts; where they are stored is :class:`cdsr.runs.RunDir`'s
business. Checkpoints hold only tensors and plain values, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from cdsr.train.distributed import SINGLE, Dist, gather


@dataclass
class TrainState:
    """Where a run stands: the epoch and the step inside it, early-stopping and plateau counters.

    Stored in ``last.pt`` as a plain dict; keys missing from an older checkpoint take these
    defaults, which are what the loop assumed when it wrote that checkpoint.
    """

    epoch: int = 0
    step: int = 0  # steps done inside ``epoch``
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # validations since the last improvement
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    train_seconds: float = 0.0
    resumes: list[dict] = field(default_factory=list)  # (epoch, step) where a killed run was resumed
    global_step: int | None = None  # None: a checkpoint written before the step log existed
    plateau_scale: float = 1.0
    plateau_best: float = -math.inf
    plateau_bad: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rng(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def pack(model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: object, state: TrainState,
         device: torch.device, d: Dist = SINGLE, ema: torch.nn.Module | None = None) -> dict[str, Any]:
    """The ``last.pt`` dict: everything a killed run needs to continue as if never stopped.

    Several processes: every rank calls this (the RNG states of all ranks are gathered into
    ``rng_ranks``, in rank order); rank 0 saves it."""
    rng = _rng(device)
    ck = {"model": model.state_dict(), "optim": optimizer.state_dict(), "rng_cpu": rng["cpu"],
          "state": state.to_dict()}
    if hasattr(strategy, "state_dict"):
        ck["strategy"] = strategy.state_dict()
    if ema is not None:
        ck["ema"] = ema.state_dict()
    if "cuda" in rng:
        ck["rng_cuda"] = rng["cuda"]
    if d.active:
        ck["rng_ranks"] = gather(rng, d)
    return ck


def restore(ck: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: object,
            device: torch.device, d: Dist = SINGLE, ema: torch.nn.Module | None = None) -> TrainState:
    """Apply a ``last.pt`` dict (see :func:`pack`) to fresh objects; returns the state it holds.

    A rank takes its own RNG state from ``rng_ranks``; where the checkpoint was written by another
    number of processes, ranks other than 0 keep the draws they were seeded with."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optim"])
    ranks = ck.get("rng_ranks") or []
    rng = ranks[d.rank] if len(ranks) == d.world else {"cpu": ck["rng_cpu"], "cuda": ck.get("rng_cuda")} if d.main else {}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    if "strategy" in ck and hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(ck["strategy"])
    if ema is not None:
        if "ema" not in ck:
            raise ValueError("this checkpoint was written without train.ema, so its run cannot resume with it")
        ema.load_state_dict(ck["ema"])
    return TrainState.from_dict(ck["state"])


def best_entry(model: torch.nn.Module, epoch: int, metric: float) -> dict[str, Any]:
    """The ``best.pt`` dict."""
    return {"model": model.state_dict(), "epoch": epoch, "metric": metric}
