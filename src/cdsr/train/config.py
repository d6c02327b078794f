"""Typed configuration of the training loop (params.yaml ``train:``) and the device it runs on.

Parsed once at the edge (:class:`cdsr.runs.RunSpec`) and passed down typed: the loop, the
strategies and the tuner read these dataclasses, never the raw params dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from cdsr.config import ConfigError, check_choices
from cdsr.evaluate.protocols import AGGREGATES


@dataclass(frozen=True)
class ParetoConfig:
    """``train.pareto``: AutoCDSR's preference-aware Pareto step (:mod:`cdsr.train.pareto`)."""

    every_k: int = 1  # solve the sub-problem every k steps; reuse the last ratio in between
    max_ratio: float = 10.0  # clamp of w_cd / w_rec
    max_iter: int = 250  # Frank-Wolfe iterations
    tol: float = 1e-5  # Frank-Wolfe stop: L1 change of the weights


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate over training: ``lr x warm-up x (cosine | plateau)``.

    - ``warmup_epochs``: linear warm-up over this many epochs; 0: none. ``warmup_unit: step``
      rises per step from lr / steps to lr; ``epoch`` holds one rate per epoch, from
      ``warmup_start`` x lr in the first epoch up by equal steps, reaching lr after the
      warm-up (ABXI's ``LinearLR(start_factor=1e-5, total_iters=n_warmup)`` stepped per
      epoch: its v2.1 recipe warms up for 10 epochs).
    - ``kind``: ``constant``; ``cosine`` (decay to ``min_lr_ratio`` x lr at the last epoch of
      ``train.epochs``, after the warm-up); ``plateau`` (x ``factor`` after ``plateau_patience``
      validations without an improvement of the selection metric, as torch's ReduceLROnPlateau
      in "max" mode, down to ``min_lr_ratio`` x lr).
    The rate is a pure function of the global step and the plateau state kept in the checkpoint,
    so a resumed run follows the same schedule.
    """

    kind: Literal["constant", "cosine", "plateau"] = "constant"
    warmup_epochs: float = 0.0
    warmup_unit: Literal["step", "epoch"] = "step"
    warmup_start: float = 1e-5  # warmup_unit epoch: the first epoch's factor
    min_lr_ratio: float = 0.0
    factor: float = 0.5
    plateau_patience: int = 5

    def __post_init__(self):
        check_choices(self, "train.schedule")
        if not (self.warmup_epochs >= 0 and 0 <= self.min_lr_ratio <= 1 and 0 < self.factor < 1
                and self.plateau_patience >= 1 and 0 < self.warmup_start <= 1):
            raise ConfigError("train.schedule: need warmup_epochs >= 0, 0 <= min_lr_ratio <= 1, 0 < factor < 1, "
                             "plateau_patience >= 1, 0 < warmup_start <= 1")
        if self.warmup_unit == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ConfigError(f"train.schedule: warmup_unit epoch needs whole warmup_epochs, got {self.warmup_epochs}")

    @property
    def trivial(self) -> bool:
        return self.kind == "constant" and self.warmup_epochs == 0


def lr_multiplier(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int, plateau_scale: float = 1.0) -> float:
    """The factor on the base rate for optimiser step ``step`` (0-based, global)."""
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.warmup_unit == "epoch" and warm > 0:
        f = cfg.warmup_start + (1 - cfg.warmup_start) * min(step // steps_per_epoch / cfg.warmup_epochs, 1.0)
    else:
        f = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if cfg.kind == "cosine":
        total = max(epochs * steps_per_epoch - warm, 1)
        progress = min(max(step - warm, 0) / total, 1.0)
        f *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.kind == "plateau":
        f *= max(plateau_scale, cfg.min_lr_ratio)
    return f


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    patience: int = 10  # epochs without a validation improvement before stopping
    min_delta: float = 0.0
    val_metric: str = "NDCG@10"
    val_protocol: str = "full"
    # how the per-domain validation values become the one selection number (see
    # cdsr.evaluate.protocols.selection_value): overall (pooled targets), sum or mean over domains
    val_aggregate: str = "overall"
    eval_every: int = 1
    # validate (select, early-stop, plateau) during the warm-up epochs too; ABXI's code does not
    validate_in_warmup: bool = True
    # an equal selection value counts as an improvement (ABXI's ``>=``); False: only a larger one
    ties_improve: bool = False
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints (0: at epoch ends only)
    strategy: str = "standard"  # used unless the model names one (``model.train_strategy``)
    pareto: ParetoConfig = field(default_factory=ParetoConfig)  # the "pareto" strategy (AutoCDSR)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # learning rate over training
    amp: bool = True  # bf16 autocast where the device has native bf16 (see amp_dtype); False: float32
    # exponential moving average of the weights, updated after every step with this decay (0: off);
    # validation, best.pt and so the test figures use the average (torch.optim.swa_utils)
    ema: float = 0.0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.val_aggregate not in AGGREGATES:
            raise ConfigError(f"train.val_aggregate must be one of {list(AGGREGATES)}, not {self.val_aggregate!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.eval_every < 1:
            raise ConfigError("train: epochs, batch_size, patience and eval_every must be >= 1")
        if not self.validate_in_warmup and self.epochs <= self.schedule.warmup_epochs:
            raise ConfigError(f"train: validate_in_warmup false needs epochs ({self.epochs}) > schedule.warmup_epochs "
                              f"({self.schedule.warmup_epochs}), or no epoch would be validated")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"train.ema must be in [0, 1) (0: off), got {self.ema}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"train: need lr > 0 and weight_decay >= 0 (finite), got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where ``device`` computes it natively: CUDA with bf16 support, and CPUs whose oneDNN
    has a bf16 path (AVX-512: BF16/AMX instructions, or AVX-512 emulation); None (float32)
    elsewhere, e.g. AVX2-only CPUs, where bf16 would be slower than float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None
