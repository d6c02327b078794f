"""A training run of one (dataset, model, variant, seed): what `cdsr train` and the flows call.

``merged``: one model on the merged multi-domain sequences. ``single``: one independent model
per domain, each trained, early-stopped and evaluated on its domain's subsequences only; their
test ranks are pooled, so both variants are scored on exactly the same targets.

Writes into the run directory: ``config.json`` (resolved configs), ``metrics.json``
(``{"dataset", "model", "variant", "protocols": {P: {"overall", "domains", "buckets"}}, ...}``),
``history.json`` and ``best.pt`` / ``last.pt`` (per domain under ``domain-<name>/`` for single).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cdsr.config import ConfigError, check_dataset_name, from_dict
from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig, RankResult, cat, rank_targets, summarise
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.train.loop import TrainConfig, fit, load_best, pick_device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_overrides(params: dict[str, Any], model: str, sets: list[str]) -> dict[str, Any]:
    """``section.key=value`` overrides (value parsed as YAML); ``model.x`` means ``models.<model>.x``."""
    out = copy.deepcopy(params)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if path[0] == "model":
            path = ["models", model] + path[1:]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = yaml.safe_load(raw)
    return out


def yaml_text(value: Any) -> str:
    """``value`` as one line of YAML, which :func:`apply_overrides` parses back to it."""
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n...\n").strip()


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``key=value`` strings for :func:`apply_overrides`, which parses values as YAML. Not JSON:
    ``json.dumps(1e-06)`` is ``1e-06``, a *string* to PyYAML (its floats need a dot)."""
    return [f"{k}={yaml_text(v)}" for k, v in values.items()]


def resolve(params: dict[str, Any], model: str, variant: str, epochs: int | None = None):
    train = from_dict(TrainConfig, params.get("train"), "train")
    if epochs is not None:
        train = dataclasses.replace(train, epochs=epochs)
    ev = from_dict(EvalConfig, params.get("evaluate"), "evaluate")
    mcfg = model_config(model, (params.get("models") or {}).get(model), variant)
    if getattr(mcfg, "max_len", ev.max_len) != ev.max_len:
        ev = dataclasses.replace(ev, max_len=mcfg.max_len)
    return train, ev, mcfg


def load_split(dataset: str, data_root: str | Path = "data") -> SplitData:
    processed = Path(data_root) / check_dataset_name(dataset) / "processed"
    if not (processed / "split.parquet").exists():
        raise FileNotFoundError(f"{processed} has no built split: run `cdsr data build --dataset {dataset}` first")
    return SplitData.load(processed)


def _parts(data: SplitData, variant: str) -> list[tuple[str | None, SplitData]]:
    if variant == "merged":
        return [(None, data)]
    return [(name, data.restrict_to_domain(d)) for d, name in enumerate(data.domain_names)]


def hardware() -> dict[str, Any]:
    dev = pick_device("auto")
    info = {"device": dev.type, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RunDirError(ValueError):
    """A run directory that cannot hold this run (a file, or a run of another configuration)."""


# Config entries that do not change what a run computes: where the data was read from (its
# content is pinned by ``data_version``), the progress bar, the device choice (as in the
# benchmark's run key) and how often mid-epoch checkpoints are written.
_NOT_PROVENANCE = {"data_root", "train.progress", "train.device", "train.checkpoint_every_steps"}
# Settings that arrived with a default other than the behaviour before them: a stored config
# without the key ran with this value, and is compared as such (model -> flattened key -> value)
BEFORE_THE_KEY = {m: {"model_config.positions": "first"} for m in ("abxi", "abxi_gca")}


def _budget_ok(key: str, old: Any, new: Any, state: dict | None) -> bool:
    """Whether the run so far is also a run under the new training budget, so that resuming
    (continuing, or stopping where it is) under it keeps the directory truthful: a larger or
    smaller ``epochs`` that the run has not gone past, or a larger ``patience``."""
    if state is None or not isinstance(new, int) or not isinstance(old, int):
        return False
    if key == "train.epochs":
        return int(state.get("epoch", 0)) <= new
    if key == "train.patience":
        return new >= old
    return False


def _checkpoint_state(out_dir: Path) -> dict | None:
    last = out_dir / "last.pt"
    if not last.exists():
        return None
    try:
        return torch.load(last, map_location="cpu", weights_only=True)["state"]
    except Exception as exc:  # any unreadable checkpoint (truncated, not a torch file) is reported the same way
        raise RunDirError(f"{last}: unreadable checkpoint ({exc}); move the run directory away or pick another --out") from exc


def prepare_run_dir(out_dir: Path, config: dict[str, Any]) -> None:
    """Make ``out_dir`` hold the run of ``config``, or refuse with :class:`RunDirError`.

    A directory that already holds a run (``config.json``) is resumed or reused only under the
    same configuration: under other settings its checkpoints and metrics would sit next to a
    config of the new ones. The training budget is the exception where the run so far is also
    a run of the new budget (see :func:`_budget_ok`): a finished 20-epoch run continued to 30.
    Keys one side lacks are settings that did not exist when the other was written (code grew
    a field with a default) and are not compared, unless the default differs from what the code
    did before (``BEFORE_THE_KEY``: the old config is read with that value). A directory with a
    config but no trained state yet (no checkpoint, no metrics) takes the new config.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir}: exists and is not a directory; a run directory is a folder (pick another --out)")
    old_path = out_dir / "config.json"
    if old_path.exists():
        try:
            old = json.loads(old_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{old_path}: unreadable ({exc}); move the run directory away or pick another --out") from exc
        from cdsr.track.tracking import flatten

        a, b = flatten(old), flatten(json.loads(json.dumps(config)))
        a = {**BEFORE_THE_KEY.get(old.get("model"), {}), **a}
        diff = sorted(k for k in set(a) & set(b) if k not in _NOT_PROVENANCE and a[k] != b[k])
        trained = any((out_dir / f).exists() for f in ("last.pt", "best.pt", "metrics.json", "fit.json")) or \
            any(out_dir.glob("domain-*/last.pt"))
        if diff and trained:
            states = [_checkpoint_state(d) for d in [out_dir, *sorted(out_dir.glob("domain-*"))] if (d / "last.pt").exists()]
            blocking = [k for k in diff if not (states and all(_budget_ok(k, a[k], b[k], st) for st in states))]
            if blocking:
                shown = "; ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in blocking[:12])
                more = f" (and {len(blocking) - 12} more)" if len(blocking) > 12 else ""
                raise RunDirError(f"{out_dir} holds a run of another configuration ({shown}{more}): resuming or "
                                  "reusing it would mix the two. Train into a new --out, or delete the directory "
                                  "to start over.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise RunDirError(f"{out_dir}: cannot be a run directory: {exc}") from exc
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def fit_run(dataset: str, model: str, variant: str, params: dict[str, Any], out_dir: Path, seed: int = 42,
            epochs: int | None = None, data_root: str | Path = "data",
            on_epoch: Callable[[int, dict], None] | None = None,
            train_transform: Callable[[SplitData], SplitData] | None = None,
            data: SplitData | None = None) -> dict[str, Any]:
    """Train with early stopping on validation; writes ``config.json``, checkpoints and ``fit.json``.

    ``train_transform`` corrupts the training data only (robustness: training-time noise);
    validation stays clean. ``data`` skips loading the split (already in memory). A run
    directory whose ``last.pt`` exists resumes where it stopped (a finished one returns at once).
    Returns ``{"fit": {part: info}, "history": {part: [epoch records]}, "parameters"}``.
    """
    train_cfg, eval_cfg, mcfg = resolve(params, model, variant, epochs)
    data = data if data is not None else load_split(dataset, data_root)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    from cdsr.track.tracking import data_version

    config = {"dataset": dataset, "model": model, "variant": variant, "seed": seed, "data_root": str(data_root),
              "data_version": data_version(dataset, data_root), "train": dataclasses.asdict(train_cfg),
              "evaluate": dataclasses.asdict(eval_cfg), "model_config": dataclasses.asdict(mcfg)}
    prepare_run_dir(out_dir, config)
    fits, history, n_params = {}, {}, 0
    for name, view in _parts(data, variant):
        sub = out_dir if name is None else out_dir / f"domain-{name}"
        set_seed(seed)
        net = build_model(model, mcfg, vocab)
        n_params = sum(p.numel() for p in net.parameters())
        train_view = view if train_transform is None else train_transform(view)
        res = fit(net, train_view, train_cfg, seed, sub, eval_cfg, on_epoch=on_epoch, val_data=view)
        fits[name or "merged"] = {"best_epoch": res.best_epoch, "best_val": res.best_metric, "epochs_run": res.epochs_run,
                                  "stopped_early": res.stopped_early, "train_seconds": round(res.train_seconds, 2),
                                  "resumes": res.resumes}
        history[name or "merged"] = res.history
    out = {"fit": fits, "history": history, "parameters": n_params}
    (out_dir / "fit.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def load_run_models(run_dir: Path, data: SplitData, model_sets: list[str] | tuple[str, ...] = ()
                    ) -> list[tuple[str | None, SplitData, torch.nn.Module]]:
    """The best checkpoint(s) of a run with the data view each one serves: one for ``merged``,
    one per domain for ``single``. ``model_sets`` (``model.key=value``) change the trained
    model's config before loading, for settings that leave the parameters as they are (e.g.
    DPG-Diff's inference steps ``model.t_inf=5``); one that changes a parameter's shape fails
    to load, naming it."""
    config = json.loads((run_dir / "config.json").read_text())
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    section = dict(config["model_config"])
    for item in model_sets:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("model.") or "=" not in item:
            raise ConfigError(f"--set {item!r}: only model.<field>=value applies to a trained run")
        section = apply_overrides({"models": {config["model"]: section}}, config["model"], [item])["models"][config["model"]]
    mcfg = model_config(config["model"], section, config["variant"])
    device = pick_device(config["train"]["device"])
    out = []
    for name, view in _parts(data, config["variant"]):
        net = load_best(build_model(config["model"], mcfg, vocab), run_dir if name is None else run_dir / f"domain-{name}")
        out.append((name, view, net.to(device)))
    return out


def rank_run(models: list[tuple[str | None, SplitData, torch.nn.Module]], split: str, protocol: str,
             ev: EvalConfig) -> RankResult:
    """Ranks of every ``split`` target, pooled over a run's models (see :func:`load_run_models`)."""
    return cat([rank_targets(net, view, split, protocol, ev, next(net.parameters()).device) for _, view, net in models])


def score_run(run_dir: Path, data: SplitData | None = None, protocols: list[str] | None = None) -> dict[str, Any]:
    """Test metrics per protocol and the validation summary of a trained run's best checkpoint(s)."""
    config = json.loads((run_dir / "config.json").read_text())
    data = data if data is not None else load_split(config["dataset"], config["data_root"])
    ev = from_dict(EvalConfig, config["evaluate"], "evaluate")
    models = load_run_models(run_dir, data)
    protos = list(protocols or ev.protocols)
    val_proto = config["train"]["val_protocol"]
    return {"protocols": {p: summarise(rank_run(models, "test", p, ev), data.domain_names, ev) for p in protos},
            "validation": summarise(rank_run(models, "valid", val_proto, ev), data.domain_names, ev)}


def train_run(dataset: str, model: str, variant: str, params: dict[str, Any], out_dir: Path, seed: int = 42,
              epochs: int | None = None, data_root: str | Path = "data",
              on_epoch: Callable[[int, dict], None] | None = None,
              train_transform: Callable[[SplitData], SplitData] | None = None,
              data: SplitData | None = None) -> dict[str, Any]:
    """:func:`fit_run` then :func:`score_run`; writes and returns ``metrics.json``."""
    t0 = time.time()
    resolve(params, model, variant, epochs)  # a config error is reported before any data is read
    data = data if data is not None else load_split(dataset, data_root)
    fitted = fit_run(dataset, model, variant, params, out_dir, seed, epochs, data_root, on_epoch, train_transform, data)
    scored = score_run(out_dir, data)
    metrics = {"dataset": dataset, "model": model, "variant": variant, "seed": seed, **scored, **fitted,
               "seconds": round(time.time() - t0, 2), "hardware": hardware()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_run(run_dir: Path, protocols: list[str], split: str = "test", exclude_history: bool | None = None,
                 model_sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Re-evaluate a finished run's best checkpoint(s) under the given protocols (``model_sets``:
    see :func:`load_run_models`)."""
    config = json.loads((run_dir / "config.json").read_text())
    data = load_split(config["dataset"], config["data_root"])
    ev = from_dict(EvalConfig, config["evaluate"], "evaluate")
    ev = dataclasses.replace(ev, protocols=list(protocols),
                             exclude_history=ev.exclude_history if exclude_history is None else exclude_history)
    models = load_run_models(run_dir, data, model_sets)
    return {"dataset": config["dataset"], "model": config["model"], "variant": config["variant"], "split": split,
            "exclude_history": ev.exclude_history, "model_sets": list(model_sets),
            "protocols": {p: summarise(rank_run(models, split, p, ev), data.domain_names, ev) for p in protocols}}
