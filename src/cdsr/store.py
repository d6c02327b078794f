"""The results store: every finished run's record, kept in git under ``results/<dataset>/<name>/``.

``runs/`` (git-ignored) stays the working area: checkpoints, step logs, anything large. When a
run finishes, its record is written here, so it outlives the machine it ran on:

- ``record.json``: the identity (``key``; the behaviour versions, data version and seed it
  stands on), ``status`` (``finished``, or ``partial``: an unfinished run's best checkpoint so
  far, scored), the command, the code commit, the wall time and seconds per epoch, the machine
  (CPU model and flags, threads, precision) and when it was written.
- ``config.json``: the run's resolved configuration (:class:`cdsr.runs.RunSpec`).
- ``metrics.json``: its :class:`cdsr.evaluate.results.RunMetrics` (test metrics per protocol,
  validation, the per-epoch history). No checkpoints: a record is tens of kilobytes.

**Identity.** What determines a run's numbers: its configuration, seed, data version and the
behaviour versions of :mod:`cdsr.behaviour` (the pipeline's and the model's). The configuration
enters in its canonical form, the settings that differ from the current defaults
(:func:`canonical`), so a setting added later with a default that keeps the old behaviour does
not orphan a record, and code moved or rewritten without changing a number keeps every record
valid. A record whose behaviour versions are not the current ones is *stale*: readers list it
apart and never average it with current records.

Optuna studies live here too, as journal files (``results/<dataset>/studies/<study>.journal``,
:func:`journal_storage`): append-only text that git carries and any machine resumes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdsr.evaluate.results import RunMetrics
from cdsr.jsonio import write_json

SCHEMA = 1
RECORD, CONFIG, METRICS = "record.json", "config.json", "metrics.json"
STUDIES = "studies"


class StoreError(ValueError):
    """A record that cannot be written or read as asked (a name holding another run, no result)."""


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys, tuples as the lists JSON gives back."""
    from cdsr.track.tracking import flatten

    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(d).items()}


def _defaults(model: str, variant: str) -> dict[str, Any]:
    from cdsr.evaluate.protocols import EvalConfig
    from cdsr.models.registry import model_config
    from cdsr.train.config import TrainConfig

    return _flatten({"train": dataclasses.asdict(TrainConfig()), "evaluate": dataclasses.asdict(EvalConfig()),
                     "model_config": dataclasses.asdict(model_config(model, {}, variant))})


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """A stored ``config.json`` as the settings that matter: dataset, model, variant, seed and
    data version always; of the rest, the values other than the current defaults, without the
    entries that change nothing a run computes (:data:`cdsr.runs.NOT_PROVENANCE`)."""
    from cdsr.runs import NOT_PROVENANCE

    base = _defaults(config["model"], config["variant"])
    flat = _flatten({k: config[k] for k in ("train", "evaluate", "model_config") if k in config})
    keep = {k: v for k, v in flat.items() if k not in NOT_PROVENANCE and (k not in base or base[k] != v)}
    return {"dataset": config["dataset"], "model": config["model"], "variant": config["variant"],
            "seed": int(config["seed"]), "data_version": dict(config.get("data_version") or {}), **keep}


def identity_key(config: dict[str, Any], behaviour: dict[str, int]) -> str:
    blob = json.dumps({"config": canonical(config), "behaviour": behaviour}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def current_behaviour(model: str) -> dict[str, int]:
    from cdsr import behaviour

    return behaviour.versions(model)


@dataclass
class Record:
    """One record directory of the store."""

    path: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    metrics: RunMetrics

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def key(self) -> str:
        """The identity now: its configuration's canonical form against today's defaults, with
        the behaviour versions it was written under (``record.json`` keeps the key at writing)."""
        return identity_key(self.config, self.meta.get("behaviour") or {})

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "finished"))

    @property
    def stale(self) -> bool:
        """Written under other behaviour versions than the code's: its numbers may differ."""
        try:
            return self.meta.get("behaviour") != current_behaviour(self.config["model"])
        except KeyError:  # a model that no longer exists
            return True

    @classmethod
    def read(cls, path: Path) -> Record:
        try:
            meta = json.loads((path / RECORD).read_text())
            config = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: not a readable results record ({exc})") from exc
        if meta.get("schema") != SCHEMA:
            raise StoreError(f"{path / RECORD}: schema {meta.get('schema')!r}; this cdsr reads schema {SCHEMA}")
        return cls(path, meta, config, RunMetrics.read(path / METRICS))


def _epoch_seconds(metrics: RunMetrics) -> float | None:
    train = sum(float(f.get("train_seconds", 0.0)) for f in metrics.fit.values())
    epochs = metrics.epochs_run
    return round(train / epochs, 2) if epochs else None


def command_line() -> str:
    """This process's command, as a user would type it (``cdsr ...`` for the console script)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cdsr", "__main__.py"):
        argv[0] = "cdsr"
    return shlex.join(argv)


class Store:
    """``results/``: one directory per dataset, one record directory per run name."""

    def __init__(self, root: str | Path = "results"):
        self.root = Path(root)

    def dir(self, dataset: str, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or name == STUDIES:
            raise StoreError(f"{name!r} cannot name a record (a plain directory name, not {STUDIES!r})")
        return self.root / dataset / name

    def get(self, dataset: str, name: str) -> Record | None:
        path = self.dir(dataset, name)
        return Record.read(path) if (path / RECORD).exists() else None

    def records(self, dataset: str) -> list[Record]:
        base = self.root / dataset
        return [Record.read(p.parent) for p in sorted(base.glob(f"*/{RECORD}"))] if base.is_dir() else []

    def state(self, config: dict[str, Any], name: str) -> str:
        """Where a run of ``config`` (a ``config.json`` dict) named ``name`` stands: ``missing``,
        ``current`` (a finished record with its identity), ``partial`` (an unfinished run's
        record with its identity), ``stale`` (the same configuration under older behaviour
        versions) or ``other`` (the name holds a different run)."""
        rec = self.get(config["dataset"], name)
        if rec is None:
            return "missing"
        key = identity_key(config, current_behaviour(config["model"]))
        if rec.key == key:
            return "current" if rec.status == "finished" else "partial"
        if rec.stale and canonical(rec.config) == canonical(config):
            return "stale"
        return "other"

    def put(self, run_dir: Any, name: str | None = None, command: str | None = None,
            metrics: RunMetrics | None = None, status: str = "finished", replace: bool = False) -> Record:
        """Write the record of the run in ``run_dir`` (a :class:`cdsr.runs.RunDir`) as ``name``
        (default: the run directory's name). ``metrics``: its result (default its
        ``metrics.json``). A name holding a current record of another run is refused unless
        ``replace``; a stale or partial record of the same run is replaced."""
        from cdsr.track.tracking import git_commit

        config = run_dir.config()
        metrics = metrics if metrics is not None else run_dir.metrics()
        name = name or run_dir.path.name
        state = self.state(config, name)
        if state == "other" and not replace:
            old = self.get(config["dataset"], name)
            raise StoreError(f"{self.dir(config['dataset'], name)} holds another run (key {old.key if old else '?'}); "
                             "name this one differently, or replace it explicitly")
        behaviour = current_behaviour(config["model"])
        meta = {
            "schema": SCHEMA, "key": identity_key(config, behaviour), "status": status, "behaviour": behaviour,
            "data_version": config.get("data_version"), "seed": config["seed"], "name": name,
            "command": command or run_dir.command() or command_line(), "git_commit": git_commit(),
            "wall_seconds": metrics.seconds, "epoch_seconds": _epoch_seconds(metrics), "epochs": metrics.epochs_run,
            "machine": metrics.hardware, "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        path = self.dir(config["dataset"], name)
        path.mkdir(parents=True, exist_ok=True)
        for fname, obj, indent in ((CONFIG, config, 2), (METRICS, metrics.to_json(), 1), (RECORD, meta, 2)):
            write_json(path / fname, obj, indent)  # record.json last: a record is complete once it exists
        return Record(path, meta, config, metrics)

    def rename(self, dataset: str, old: str, new: str) -> Record:
        """Move record ``old`` to ``new`` (e.g. before a default changes, so that the name of a
        preset goes on meaning its current configuration)."""
        src, dst = self.dir(dataset, old), self.dir(dataset, new)
        if not (src / RECORD).exists():
            raise StoreError(f"{src}: no record")
        if dst.exists():
            raise StoreError(f"{dst} exists")
        src.rename(dst)
        meta = json.loads((dst / RECORD).read_text())
        write_json(dst / RECORD, {**meta, "name": new}, 2)
        return Record.read(dst)

    # -- studies ------------------------------------------------------------------------------
    def journal(self, dataset: str, study: str) -> Path:
        return self.root / dataset / STUDIES / f"{study}.journal"


def journal_storage(path: str | Path):
    """An Optuna storage on an append-only journal file (JournalStorage + JournalFileBackend):
    a text file that git carries and any machine resumes; several processes on one machine may
    share it (file locks)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def partial_metrics(run_dir: Any, data: Any) -> RunMetrics:
    """An unfinished ``merged`` run's best checkpoint so far, scored like a finished one, with
    the training state of its ``last.pt`` (epochs run, best epoch, history so far)."""
    import time

    from cdsr.train.run import hardware, score

    spec = run_dir.spec()
    if spec.variant != "merged":
        raise StoreError(f"{run_dir.path}: a partial record is made of a merged run only")
    state = run_dir.last_state()
    if state is None or not run_dir.file(run_dir.BEST).exists():
        raise StoreError(f"{run_dir.path}: no checkpoint with a validated epoch yet")
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model

    net = build_model(spec.model, spec.model_config, Vocab.from_ranges(data.domain_ranges, data.domain_names))
    n_params = sum(p.numel() for p in net.parameters())
    fitted = {"fit": {"merged": {"best_epoch": state["best_epoch"], "best_val": state["best_metric"],
                                 "epochs_run": state["epoch"], "stopped_early": False,
                                 "train_seconds": round(float(state.get("train_seconds", 0.0)), 2),
                                 "resumes": state.get("resumes", [])}},
              "history": {"merged": state.get("history", [])}, "parameters": n_params}
    t0 = time.time()
    scored = score(run_dir, spec, data)
    return RunMetrics.build(spec, scored, fitted, time.time() - t0, hardware(spec.train))
