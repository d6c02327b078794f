"""The one training loop every model and method uses.

- Early stopping on a validation metric (default NDCG@10 under the ``full`` protocol).
- Checkpoint + resume: ``last.pt`` holds model, optimiser, epoch, step inside the epoch and
  the RNG states; the batch order of epoch e is a pure function of (seed, e), so a run killed
  mid-epoch and resumed replays exactly the batches and random draws it would have made.
  ``best.pt`` holds the best model. Checkpoints load with ``weights_only=True``.
- Gradient clipping, AMP (bf16 autocast, float32 master weights) where the device computes bf16
  natively (CUDA, CPUs with AVX-512), cuda / mps / cpu device selection.
- A progress bar with loss and throughput.
- A pluggable optimisation strategy: ``Strategy.step`` turns a batch into a parameter update
  (AutoCDSR's Pareto step plugs in here rather than copying the loop).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import BatchSampler, RandomSampler
from tqdm import tqdm

from cdsr.config import ConfigError
from cdsr.data.loaders import SplitData, TrainDataset
from cdsr.evaluate.protocols import (
    AGGREGATES,
    EvalConfig,
    rank_targets,
    selection_value,
    summarise,
)
from cdsr.models.base import SeqRecModel
from cdsr.train.pareto import ParetoConfig, ParetoStrategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate over training: ``lr x warm-up x (cosine | plateau)``.

    - ``warmup_epochs``: linear warm-up from lr / steps to lr over this many epochs of steps
      (ABXI's recipe: 1); 0: none.
    - ``kind``: ``constant``; ``cosine`` (decay to ``min_lr_ratio`` x lr at the last epoch of
      ``train.epochs``, after the warm-up); ``plateau`` (x ``factor`` after ``plateau_patience``
      validations without an improvement of the selection metric, as torch's ReduceLROnPlateau
      in "max" mode, down to ``min_lr_ratio`` x lr).
    The rate is a pure function of the global step and the plateau state kept in the checkpoint,
    so a resumed run follows the same schedule.
    """

    kind: str = "constant"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    factor: float = 0.5
    plateau_patience: int = 5

    def __post_init__(self):
        if self.kind not in ("constant", "cosine", "plateau"):
            raise ConfigError(f"train.schedule.kind must be constant, cosine or plateau, not {self.kind!r}")
        if not (self.warmup_epochs >= 0 and 0 <= self.min_lr_ratio <= 1 and 0 < self.factor < 1
                and self.plateau_patience >= 1):
            raise ConfigError("train.schedule: need warmup_epochs >= 0, 0 <= min_lr_ratio <= 1, 0 < factor < 1, "
                             "plateau_patience >= 1")

    @property
    def trivial(self) -> bool:
        return self.kind == "constant" and self.warmup_epochs == 0


def lr_multiplier(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int, plateau_scale: float = 1.0) -> float:
    """The factor on the base rate for optimiser step ``step`` (0-based, global)."""
    warm = round(cfg.warmup_epochs * steps_per_epoch)
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
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints (0: at epoch ends only)
    strategy: str = "standard"  # used unless the model names one (``model.train_strategy``)
    pareto: ParetoConfig = field(default_factory=ParetoConfig)  # the "pareto" strategy (AutoCDSR)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # learning rate over training
    amp: bool = True  # bf16 autocast where the device has native bf16 (see amp_dtype); False: float32
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.val_aggregate not in AGGREGATES:
            raise ConfigError(f"train.val_aggregate must be one of {list(AGGREGATES)}, not {self.val_aggregate!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.eval_every < 1:
            raise ConfigError("train: epochs, batch_size, patience and eval_every must be >= 1")
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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Strategy(Protocol):
    def step(self, model: SeqRecModel, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             cfg: TrainConfig, autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        ...


class StandardStrategy:
    """Minimise ``model.loss(batch)["loss"]``; other returned terms are logged only."""

    def step(self, model, batch, optimizer, cfg, autocast):
        with autocast():
            out = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
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


class TrainingInterrupted(RuntimeError):
    """Raised by an ``on_step`` callback to stop a run (the last checkpoint stays valid)."""


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)  # (epoch, step) where a killed run was resumed


class StepLog:
    """Per-step training statistics (loss, and e.g. the Pareto ratio and weights) as CSV rows
    ``step, epoch, <stat>...``, buffered in memory and appended at each checkpoint, so that the
    file holds exactly the checkpointed steps; :meth:`truncate` drops the rows of a killed run
    past the checkpoint it resumes from."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[tuple[int, int, dict[str, float]]] = []

    def add(self, step: int, epoch: int, stats: dict[str, float]) -> None:
        self.rows.append((step, epoch, stats))

    def flush(self) -> None:
        if not self.rows:
            return
        keys = sorted(self.rows[0][2])
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", *keys])
            w.writerows([st, ep, *(repr(float(d.get(k, math.nan))) for k in keys)] for st, ep, d in self.rows)
        self.rows = []

    def truncate(self, global_step: int | None) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        if global_step is None:  # a checkpoint from before the step log: start it afresh
            self.path.unlink()
            return
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= global_step]
        if len(keep) != len(lines):
            self.path.write_text("".join(keep))


def _batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(BatchSampler(RandomSampler(range(n), generator=g), batch_size, drop_last=False))


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a kill never leaves a half-written checkpoint


def fit(model: SeqRecModel, data: SplitData, cfg: TrainConfig, seed: int, run_dir: Path,
        eval_cfg: EvalConfig | None = None, strategy: Strategy | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
        on_step: Callable[[int], None] | None = None, val_data: SplitData | None = None) -> FitResult:
    """Train ``model`` on ``data``'s training prefixes, early-stopping on validation.

    ``val_data`` (default ``data``): where the validation targets are ranked, e.g. the clean
    data when ``data`` carries training-time noise. Resumes from ``run_dir/last.pt`` when it
    exists; a run that already finished (all epochs, or stopped early) returns at once.
    ``on_epoch(epoch, record)`` may raise (e.g. optuna.TrialPruned) to stop; ``on_step(global_step)``
    is called after each step.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    model.to(device)
    eval_cfg = eval_cfg or EvalConfig(protocols=[cfg.val_protocol])
    strategy = select_strategy(model, cfg, strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = amp_dtype(device) if cfg.amp else None

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    ds = TrainDataset(data, eval_cfg.max_len)
    if len(ds) == 0:
        raise ValueError("no user has a training prefix of >= 2 events")
    state = {"epoch": 0, "step": 0, "best_metric": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": [],
             "train_seconds": 0.0}
    last = run_dir / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda"])
        state = ck["state"]
        if "strategy" in ck and hasattr(strategy, "load_state_dict"):
            strategy.load_state_dict(ck["strategy"])
        if state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:  # an unfinished run resumes
            state.setdefault("resumes", []).append({"epoch": state["epoch"], "step": state["step"]})
            log.info("resumed from %s at epoch %d step %d", last, state["epoch"], state["step"])

    steps_log = StepLog(run_dir / "steps.csv")
    if last.exists():
        steps_log.truncate(state.get("global_step", None))

    def checkpoint() -> None:
        state["global_step"] = global_step
        steps_log.flush()  # before the checkpoint: a resume truncates rows past its global step
        ck = {"model": model.state_dict(), "optim": opt.state_dict(), "rng_cpu": torch.get_rng_state(), "state": state}
        if hasattr(strategy, "state_dict"):
            ck["strategy"] = strategy.state_dict()
        if device.type == "cuda":
            ck["rng_cuda"] = torch.cuda.get_rng_state()
        _save(last, ck)

    val_data = data if val_data is None else val_data
    stopped = state["bad_epochs"] >= cfg.patience
    global_step = sum(len(_batch_order(len(ds), cfg.batch_size, seed, e)) for e in range(state["epoch"])) + state["step"]
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"]
        order = _batch_order(len(ds), cfg.batch_size, seed, epoch)
        model.train()
        t0, seen, n_steps = time.time(), 0, 0
        sums: dict[str, float] = {}  # every scalar the strategy reports (loss, aux terms, pareto_ratio)
        bar = tqdm(order[state["step"]:], desc=f"epoch {epoch}", leave=False,
                   disable=not (cfg.progress and sys.stderr.isatty()))  # no \r spam in logs
        for idx in bar:
            if not cfg.schedule.trivial:
                lr = cfg.lr * lr_multiplier(cfg.schedule, global_step, len(order), cfg.epochs,
                                            state.get("plateau_scale", 1.0))
                for group in opt.param_groups:
                    group["lr"] = lr
            batch = to_device(ds[idx], device)
            stats = strategy.step(model, batch, opt, cfg, autocast)
            state["step"] += 1
            global_step += 1
            seen += len(idx)
            n_steps += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            steps_log.add(global_step, epoch, stats)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", seq_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
            if cfg.checkpoint_every_steps and state["step"] % cfg.checkpoint_every_steps == 0 and state["step"] < len(order):
                state["train_seconds"] += time.time() - t0
                t0 = time.time()
                checkpoint()
            if on_step is not None:
                on_step(global_step)
        state["train_seconds"] += time.time() - t0
        # mean over the steps this process ran (after a mid-epoch resume: the rest of the epoch)
        record = {"epoch": epoch, "loss": float("nan"), **{k: v / max(n_steps, 1) for k, v in sums.items()}}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            summary = summarise(rank_targets(model, val_data, "valid", cfg.val_protocol, eval_cfg, device),
                                val_data.domain_names, eval_cfg)
            metric = selection_value(summary, cfg.val_metric, cfg.val_aggregate)
            record.update({f"val_{k}": v for k, v in summary["overall"].items() if k != "n"})
            record["val_selection"] = metric  # what early stopping, the plateau schedule and tuning follow
            diagnose = getattr(model, "epoch_diagnostics", None)  # e.g. GCA's |cos(X, X')| on validation
            if diagnose is not None:
                record.update({f"val_{k}": v for k, v in diagnose(val_data, eval_cfg, device).items()})
            if metric > state["best_metric"] + cfg.min_delta:
                state.update(best_metric=metric, best_epoch=epoch, bad_epochs=0)
                _save(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch, "metric": metric})
            else:
                state["bad_epochs"] += 1
            if cfg.schedule.kind == "plateau":  # its own patience, counted in validations
                if metric > state.get("plateau_best", -math.inf):
                    state.update(plateau_best=metric, plateau_bad=0)
                else:
                    state["plateau_bad"] = state.get("plateau_bad", 0) + 1
                    if state["plateau_bad"] >= cfg.schedule.plateau_patience:
                        state.update(plateau_scale=state.get("plateau_scale", 1.0) * cfg.schedule.factor, plateau_bad=0)
            if not cfg.schedule.trivial:  # the rate of the epoch's last step
                record["lr"] = cfg.lr * lr_multiplier(cfg.schedule, max(global_step - 1, 0), len(order), cfg.epochs,
                                                      state.get("plateau_scale", 1.0))
            stopped = state["bad_epochs"] >= cfg.patience
            log.info("epoch %d loss %.4f val %s %s %.4f (best %.4f @ %d)%s", epoch, record["loss"], cfg.val_protocol,
                     cfg.val_metric if cfg.val_aggregate == "overall" else f"{cfg.val_aggregate} of {cfg.val_metric}",
                     metric, state["best_metric"], state["best_epoch"],
                     f" lr {record['lr']:.3g}" if "lr" in record else "")
        state["history"].append(record)
        state["epoch"], state["step"] = epoch + 1, 0
        checkpoint()
        if on_epoch is not None:
            on_epoch(epoch, record)
    steps_log.flush()
    (run_dir / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
    return FitResult(best_epoch=state["best_epoch"], best_metric=state["best_metric"], epochs_run=state["epoch"],
                     stopped_early=stopped, train_seconds=state["train_seconds"], history=state["history"],
                     resumes=state.get("resumes", []))


def load_best(model: SeqRecModel, run_dir: Path) -> SeqRecModel:
    ck = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    return model

