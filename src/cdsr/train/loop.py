"""The one training loop every model and method uses.

- Early stopping on a validation metric (default NDCG@10 under the ``full`` protocol).
- Checkpoint + resume: ``last.pt`` holds model, optimiser, epoch, step inside the epoch and
  the RNG states; the batch order of epoch e is a pure function of (seed, e), so a run killed
  mid-epoch and resumed replays exactly the batches and random draws it would have made.
  ``best.pt`` holds the best model. Checkpoints load with ``weights_only=True``.
- Gradient clipping, AMP (bf16 autocast, float32 master weights) where the device computes bf16
  natively (CUDA, CPUs with AVX-512), cuda / mps / cpu device selection.
- A progress bar with loss and throughput.
- An optional exponential moving average of the weights (``train.ema``, torch's
  ``AveragedModel``): validation ranks with the average, and ``best.pt`` holds it.
- A pluggable optimisation strategy: ``Strategy.step`` turns a batch into a parameter update
  (AutoCDSR's Pareto step plugs in here rather than copying the loop).
- Data parallelism over several processes launched by torchrun (:mod:`cdsr.train.distributed`):
  each process takes its share of every global batch; rank 0 validates and writes the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, RandomSampler
from tqdm import tqdm

from cdsr.data.loaders import SplitData, TrainDataset
from cdsr.evaluate.protocols import EvalConfig, rank_targets, selection_value, summarise
from cdsr.models.base import SeqRecModel
from cdsr.runs import RunDir, StepLog
from cdsr.train import distributed
from cdsr.train.checkpoint import TrainState, best_entry, pack, restore
from cdsr.train.config import TrainConfig, amp_dtype, lr_multiplier, pick_device
from cdsr.train.distributed import GradSync
from cdsr.train.strategy import Strategy, select_strategy

log = logging.getLogger(__name__)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def _batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(BatchSampler(RandomSampler(range(n), generator=g), batch_size, drop_last=False))


class _Session:
    """One call of :func:`fit`: the model, optimiser and strategy, and where the run stands."""

    def __init__(self, model: SeqRecModel, data: SplitData, cfg: TrainConfig, seed: int, rd: RunDir,
                 eval_cfg: EvalConfig, strategy: Strategy | None):
        self.model, self.cfg, self.seed, self.rd, self.eval_cfg = model, cfg, seed, rd, eval_cfg
        self.dist, self.device = distributed.init(pick_device(cfg.device))
        model.to(self.device)
        distributed.replicate(model, self.dist)
        if self.dist.rank > 0:  # its own draws (dropout, negatives); rank 0 keeps a one-process run's
            torch.manual_seed(seed * 1_000_003 + self.dist.rank)
        self.strategy = select_strategy(model, cfg, strategy)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = amp_dtype(self.device) if cfg.amp else None
        # buffers stay the model's (use_buffers=False): these models keep only constants there,
        # some of them integer, which an average would corrupt
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
        self.ds = TrainDataset(data, eval_cfg.max_len)
        if len(self.ds) == 0:
            raise ValueError("no user has a training prefix of >= 2 events")
        self.state = TrainState()
        self.steps_log: StepLog = rd.steps_log()
        ck = distributed.broadcast(rd.load_last() if self.dist.main and rd.has_last() else None, self.dist)
        if ck is not None:
            self._resume(ck)
        self.steps_per_epoch = math.ceil(len(self.ds) / cfg.batch_size)  # every epoch: drop_last=False
        self.global_step = self.state.epoch * self.steps_per_epoch + self.state.step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def order(self, epoch: int) -> list[list[int]]:
        return _batch_order(len(self.ds), self.cfg.batch_size, self.seed, epoch)

    def _resume(self, ck: dict) -> None:
        st = self.state = restore(ck, self.model, self.opt, self.strategy, self.device, self.dist, self.ema)
        if not self.finished():  # an unfinished run resumes
            st.resumes.append({"epoch": st.epoch, "step": st.step})
            if self.dist.main:
                log.info("resumed from %s at epoch %d step %d", self.rd.file(RunDir.LAST), st.epoch, st.step)
        if self.dist.main:
            self.steps_log.truncate(st.global_step)

    def stopped(self) -> bool:
        return self.state.bad_epochs >= self.cfg.patience

    def finished(self) -> bool:
        return self.state.epoch >= self.cfg.epochs or self.stopped()

    def checkpoint(self) -> None:
        self.state.global_step = self.global_step
        ck = pack(self.model, self.opt, self.strategy, self.state, self.device, self.dist, self.ema)  # all ranks: RNG
        if self.dist.main:
            self.steps_log.flush()  # before the checkpoint: a resume truncates rows past its global step
            self.rd.save_last(ck)

    def lr(self, steps_per_epoch: int, step: int) -> float:
        return self.cfg.lr * lr_multiplier(self.cfg.schedule, step, steps_per_epoch, self.cfg.epochs,
                                           self.state.plateau_scale)

    def train_epoch(self, epoch: int, on_step: Callable[[int], None] | None) -> dict:
        """The rest of ``epoch`` (all of it unless resumed mid-epoch) -> its record with the mean
        of every scalar the strategy reported over the steps this process ran."""
        cfg, st = self.cfg, self.state
        order = self.order(epoch)
        self.model.train()
        t0, seen, n_steps, sums = time.time(), 0, 0, {}
        bar = tqdm(order[st.step:], desc=f"epoch {epoch}", leave=False,
                   disable=not (cfg.progress and sys.stderr.isatty() and self.dist.main))  # no \r spam in logs
        for idx in bar:
            if not cfg.schedule.trivial:
                for group in self.opt.param_groups:
                    group["lr"] = self.lr(self.steps_per_epoch, self.global_step)
            stats = self._step(idx)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            st.step += 1
            self.global_step += 1
            seen += len(idx)
            n_steps += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.dist.main:
                self.steps_log.add(self.global_step, epoch, stats)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", seq_s=f"{seen / max(time.time() - t0, 1e-9):.0f}")
            if cfg.checkpoint_every_steps and st.step % cfg.checkpoint_every_steps == 0 and st.step < len(order):
                st.train_seconds += time.time() - t0
                t0 = time.time()
                self.checkpoint()
            if on_step is not None:
                on_step(self.global_step)
        st.train_seconds += time.time() - t0
        return {"epoch": epoch, "loss": float("nan"), **{k: v / max(n_steps, 1) for k, v in sums.items()}}

    def _step(self, idx: list[int]) -> dict[str, float]:
        """One optimiser step on the global batch ``idx`` (this process's share of it); the step's
        statistics are those of the global batch."""
        if not self.dist.active:
            return self.strategy.step(self.model, to_device(self.ds[idx], self.device), self.opt, self.cfg,
                                      self.autocast)
        mine, weight = distributed.shard(idx, self.dist)
        sync = GradSync(self.dist, weight, self.device)
        stats = self.strategy.step(self.model, to_device(self.ds[mine], self.device), self.opt, self.cfg,
                                   self.autocast, sync=sync)
        return sync.stats(stats)

    def validate(self, epoch: int, record: dict, val_data: SplitData) -> None:
        """Rank 0 validates (:meth:`_validate`) and every rank takes its record and decisions."""
        if self.dist.main:
            self._validate(epoch, record, val_data)
        if self.dist.active:
            st = self.state
            shared = distributed.broadcast((record, st.best_metric, st.best_epoch, st.bad_epochs, st.plateau_scale,
                                            st.plateau_best, st.plateau_bad), self.dist)
            record.update(shared[0])
            (st.best_metric, st.best_epoch, st.bad_epochs, st.plateau_scale, st.plateau_best,
             st.plateau_bad) = shared[1:]

    def _validate(self, epoch: int, record: dict, val_data: SplitData) -> None:
        """Rank the validation targets; update the best checkpoint, early stopping and the plateau
        schedule from the selection value; add the validation figures to ``record``."""
        cfg, st = self.cfg, self.state
        model = self.model if self.ema is None else self.ema.module
        summary = summarise(rank_targets(model, val_data, "valid", cfg.val_protocol, self.eval_cfg, self.device),
                            val_data.domain_names, self.eval_cfg)
        metric = selection_value(summary, cfg.val_metric, cfg.val_aggregate)
        record.update({f"val_{k}": v for k, v in summary["overall"].items() if k != "n"})
        record["val_selection"] = metric  # what early stopping, the plateau schedule and tuning follow
        diagnose = getattr(model, "epoch_diagnostics", None)  # e.g. GCA's |cos(X, X')| on validation
        if diagnose is not None:
            record.update({f"val_{k}": v for k, v in diagnose(val_data, self.eval_cfg, self.device).items()})
        if metric > st.best_metric + cfg.min_delta or (cfg.ties_improve and metric == st.best_metric + cfg.min_delta):
            st.best_metric, st.best_epoch, st.bad_epochs = metric, epoch, 0
            self.rd.save_best(best_entry(model, epoch, metric))
        else:
            st.bad_epochs += 1
        if cfg.schedule.kind == "plateau":  # its own patience, counted in validations
            self._plateau(metric)
        if not cfg.schedule.trivial:  # the rate of the epoch's last step
            record["lr"] = self.lr(self.steps_per_epoch, max(self.global_step - 1, 0))
        log.info("epoch %d loss %.4f val %s %s %.4f (best %.4f @ %d)%s", epoch, record["loss"], cfg.val_protocol,
                 cfg.val_metric if cfg.val_aggregate == "overall" else f"{cfg.val_aggregate} of {cfg.val_metric}",
                 metric, st.best_metric, st.best_epoch, f" lr {record['lr']:.3g}" if "lr" in record else "")

    def _plateau(self, metric: float) -> None:
        st = self.state
        if metric > st.plateau_best or (self.cfg.ties_improve and metric == st.plateau_best):
            st.plateau_best, st.plateau_bad = metric, 0
        else:
            st.plateau_bad += 1
            if st.plateau_bad >= self.cfg.schedule.plateau_patience:
                st.plateau_scale, st.plateau_bad = st.plateau_scale * self.cfg.schedule.factor, 0


def fit(model: SeqRecModel, data: SplitData, cfg: TrainConfig, seed: int, run_dir: Path | RunDir,
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
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    s = _Session(model, data, cfg, seed, rd, eval_cfg or EvalConfig(protocols=[cfg.val_protocol]), strategy)
    val_data = data if val_data is None else val_data
    while not s.finished():
        epoch = s.state.epoch
        record = s.train_epoch(epoch, on_step)
        warming = not cfg.validate_in_warmup and epoch < cfg.schedule.warmup_epochs
        if not warming and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            s.validate(epoch, record, val_data)
        else:
            if not cfg.schedule.trivial:
                record["lr"] = s.lr(s.steps_per_epoch, max(s.global_step - 1, 0))
            if s.dist.main:
                log.info("epoch %d loss %.4f (not validated%s)%s", epoch, record["loss"], ": warm-up" if warming else "",
                         f" lr {record['lr']:.3g}" if "lr" in record else "")
        s.state.history.append(record)
        s.state.epoch, s.state.step = epoch + 1, 0
        s.checkpoint()
        if on_epoch is not None:
            on_epoch(epoch, record)
    if s.dist.main:
        s.steps_log.flush()
        rd.write_history(s.state.history)
    st = s.state
    return FitResult(best_epoch=st.best_epoch, best_metric=st.best_metric, epochs_run=st.epoch,
                     stopped_early=s.stopped(), train_seconds=st.train_seconds, history=st.history,
                     resumes=st.resumes)


def load_best(model: SeqRecModel, run_dir: Path | RunDir) -> SeqRecModel:
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    model.load_state_dict(rd.load_best()["model"])
    return model
