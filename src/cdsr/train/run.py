"""A training run of one (dataset, model, variant, seed): what `cdsr train` and the flows call.

``merged``: one model on the merged multi-domain sequences. ``single``: one independent model
per domain, each trained, early-stopped and evaluated on its domain's subsequences only; their
test ranks are pooled, so both variants are scored on exactly the same targets.

What the run directory holds, and the only code that reads or writes it: :mod:`cdsr.runs`.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdsr.config import check_dataset_name
from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig, RankResult, cat, rank_targets, summarise
from cdsr.evaluate.results import RunMetrics
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model
from cdsr.runs import RunDir, RunSpec, views
from cdsr.train import distributed
from cdsr.train.config import pick_device
from cdsr.train.loop import fit


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(dataset: str, data_root: str | Path = "data") -> SplitData:
    processed = Path(data_root) / check_dataset_name(dataset) / "processed"
    if not (processed / "split.parquet").exists():
        raise FileNotFoundError(f"{processed} has no built split: run `cdsr data build --dataset {dataset}` first")
    return SplitData.load(processed)


# CPU flags that decide which kernels (and so which speed and rounding) a run gets
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the flags of :data:`CPU_FLAGS` it has (Linux /proc/cpuinfo;
    elsewhere the platform's processor string and no flags)."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": name, "cpu_flags": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() in ("flags", "Features"):
            have = set(value.split())
            flags = [f for f in CPU_FLAGS if f in have]
            break
    return {"cpu": name, "cpu_flags": flags}


def hardware(train_cfg: Any = None) -> dict[str, Any]:
    """Where a run computed: device, torch, threads, CPU model and flags, and the precision its
    training used (``bf16`` under autocast where the device has it, else ``fp32``)."""
    from cdsr.train.config import TrainConfig, amp_dtype

    dev = pick_device("auto" if train_cfg is None else train_cfg.device)
    cfg = train_cfg or TrainConfig()
    amp = amp_dtype(dev) if cfg.amp else None
    info = {"device": dev.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(), **cpu_info(), "precision": "fp32" if amp is None else str(amp).removeprefix("torch.").replace("bfloat16", "bf16")}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fit_spec(spec: RunSpec, out: RunDir, data: SplitData,
             on_epoch: Callable[[int, dict], None] | None = None,
             train_transform: Callable[[SplitData], SplitData] | None = None) -> dict[str, Any]:
    """Train the run of ``spec`` into ``out`` with early stopping on validation; writes
    ``config.json``, checkpoints and ``fit.json``, and returns the latter
    (``{"fit": {part: info}, "history": {part: [epoch records]}, "parameters"}``).

    ``train_transform`` corrupts the training data only (robustness: training-time noise);
    validation stays clean. A run directory whose ``last.pt`` exists resumes where it stopped
    (a finished one returns at once). Under torchrun every process calls this; rank 0 writes the
    run directory (:mod:`cdsr.train.distributed`).
    """
    d, _ = distributed.init(pick_device(spec.train.device))
    if d.main:
        out.prepare(spec)
    distributed.barrier()
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    fits, history, n_params = {}, {}, 0
    for name, view in views(data, spec.variant):
        set_seed(spec.seed)
        net = build_model(spec.model, spec.model_config, vocab)
        n_params = sum(p.numel() for p in net.parameters())
        train_view = view if train_transform is None else train_transform(view)
        res = fit(net, train_view, spec.train, spec.seed, out.part(name), spec.evaluate, on_epoch=on_epoch,
                  val_data=view)
        fits[name or "merged"] = {"best_epoch": res.best_epoch, "best_val": res.best_metric, "epochs_run": res.epochs_run,
                                  "stopped_early": res.stopped_early, "train_seconds": round(res.train_seconds, 2),
                                  "resumes": res.resumes}
        history[name or "merged"] = res.history
    fitted = {"fit": fits, "history": history, "parameters": n_params}
    if d.main:
        out.write_fit(fitted)
    return fitted


def rank_run(models: list[tuple[str | None, SplitData, torch.nn.Module]], split: str, protocol: str,
             ev: EvalConfig) -> RankResult:
    """Ranks of every ``split`` target, pooled over a run's models (see :meth:`RunDir.load_models`)."""
    return cat([rank_targets(net, view, split, protocol, ev, next(net.parameters()).device) for _, view, net in models])


def score(rd: RunDir, spec: RunSpec, data: SplitData, protocols: list[str] | None = None) -> dict[str, Any]:
    """Test metrics per protocol and the validation summary of a trained run's best checkpoint(s)."""
    ev = spec.evaluate
    models = rd.load_models(data, spec=spec)
    return {"protocols": {p: summarise(rank_run(models, "test", p, ev), data.domain_names, ev)
                          for p in list(protocols or ev.protocols)},
            "validation": summarise(rank_run(models, "valid", spec.train.val_protocol, ev), data.domain_names, ev)}


def score_spec(rd: RunDir, data: SplitData) -> RunMetrics:
    """Score a fitted run (``fit.json`` present) and write its ``metrics.json``: the one builder
    of the record, for ``cdsr train`` and the benchmark alike."""
    t0 = time.time()
    spec = rd.spec()
    scored = score(rd, spec, data)
    metrics = RunMetrics.build(spec, scored, rd.read_fit(), time.time() - t0, hardware(spec.train))
    rd.write_metrics(metrics)
    return metrics


def train_spec(spec: RunSpec, out: RunDir, data: SplitData | None = None,
               on_epoch: Callable[[int, dict], None] | None = None,
               train_transform: Callable[[SplitData], SplitData] | None = None) -> RunMetrics:
    """:func:`fit_spec` then :func:`score_spec` (under torchrun: rank 0 scores and broadcasts
    its record)."""
    data = data if data is not None else load_split(spec.dataset, spec.data_root)
    fit_spec(spec, out, data, on_epoch, train_transform)
    d = distributed.from_env()
    if not d.active:
        return score_spec(out, data)
    return distributed.broadcast(score_spec(out, data) if d.main else None, d)  # no shared filesystem needed


def train_run(dataset: str, model: str, variant: str, params: dict[str, Any], out_dir: Path, seed: int = 42,
              epochs: int | None = None, data_root: str | Path = "data",
              on_epoch: Callable[[int, dict], None] | None = None,
              train_transform: Callable[[SplitData], SplitData] | None = None,
              data: SplitData | None = None) -> dict[str, Any]:
    """:func:`train_spec` from a raw params dict; returns ``metrics.json`` as written."""
    spec = RunSpec.build(params, dataset, model, variant, seed, epochs, data_root)  # config errors first
    return train_spec(spec, RunDir(out_dir), data, on_epoch, train_transform).to_json()


def evaluate_run(run_dir: Path, protocols: list[str], split: str = "test", exclude_history: bool | None = None,
                 model_sets: list[str] | tuple[str, ...] = (), input_window: str | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run's best checkpoint(s) under the given protocols (``model_sets``:
    see :meth:`RunDir.load_models`; ``input_window``: ``evaluate.input_window`` for this
    evaluation)."""
    rd = RunDir(run_dir)
    spec = rd.spec(model_sets)
    data = load_split(spec.dataset, spec.data_root)
    ev = dataclasses.replace(spec.evaluate, protocols=list(protocols),
                             exclude_history=spec.evaluate.exclude_history if exclude_history is None else exclude_history,
                             input_window=input_window or spec.evaluate.input_window)
    models = rd.load_models(data, spec=spec)
    return {"dataset": spec.dataset, "model": spec.model, "variant": spec.variant, "split": split,
            "exclude_history": ev.exclude_history, "input_window": ev.input_window, "model_sets": list(model_sets),
            "protocols": {p: summarise(rank_run(models, split, p, ev), data.domain_names, ev) for p in protocols}}
