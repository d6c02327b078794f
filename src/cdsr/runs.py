"""A run's resolved configuration (:class:`RunSpec`) and its directory (:class:`RunDir`).

:class:`RunDir` is the only code that reads or writes a run directory. Its layout:

- ``config.json``: the :class:`RunSpec` (resolved, typed configs; see :meth:`RunSpec.to_json`).
- ``last.pt`` / ``best.pt``: the resumable checkpoint and the best model (see
  :mod:`cdsr.train.checkpoint`); ``steps.csv`` (per-step statistics), ``history.json`` (per
  epoch). For the ``single`` variant these four live in ``domain-<name>/``, one per domain.
- ``fit.json``: what training reported per part; ``metrics.json``: the
  :class:`cdsr.evaluate.results.RunMetrics` record (versioned schema).
- ``robustness.json`` and ``tracking.json``: the benchmark's robustness rows and MLflow run id.
- ``command.txt``: the command that trains it (``cdsr train`` and campaigns write it).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cdsr.config import ConfigError, from_dict
from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig
from cdsr.evaluate.results import RunMetrics
from cdsr.jsonio import write_json
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.train.config import TrainConfig, pick_device


class RunDirError(ValueError):
    """A run directory that cannot hold this run (a file, or a run of another configuration)."""


# -- the configuration of a run ------------------------------------------------------------------

def apply_overrides(params: dict[str, Any], model: str, sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
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
    """The typed ``(TrainConfig, EvalConfig, model config)`` of ``params`` for one model: the one
    place the raw params' ``train``, ``evaluate`` and ``models.<model>`` sections are parsed."""
    train = from_dict(TrainConfig, params.get("train"), "train")
    if epochs is not None:
        train = dataclasses.replace(train, epochs=epochs)
    ev = from_dict(EvalConfig, params.get("evaluate"), "evaluate")
    mcfg = model_config(model, (params.get("models") or {}).get(model), variant)
    if getattr(mcfg, "max_len", ev.max_len) != ev.max_len:
        ev = dataclasses.replace(ev, max_len=mcfg.max_len)
    return train, ev, mcfg


# Config entries that do not change what a run computes: where the data was read from (its
# content is pinned by ``data_version``), the progress bar, the device choice and how often
# mid-epoch checkpoints are written.
NOT_PROVENANCE = {"data_root", "train.progress", "train.device", "train.checkpoint_every_steps"}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run, parsed once: ``config.json`` is :meth:`to_json`."""

    dataset: str
    model: str
    variant: str
    seed: int
    data_root: str
    data_version: dict[str, str]
    train: TrainConfig
    evaluate: EvalConfig
    model_config: Any

    @classmethod
    def build(cls, params: dict[str, Any], dataset: str, model: str, variant: str, seed: int = 42,
              epochs: int | None = None, data_root: str | Path = "data",
              data_version: dict[str, str] | None = None) -> RunSpec:
        from cdsr.track.tracking import data_version as version_of

        train, ev, mcfg = resolve(params, model, variant, epochs)
        dv = version_of(dataset, data_root) if data_version is None else data_version
        return cls(dataset, model, variant, seed, str(data_root), dv, train, ev, mcfg)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "model": self.model, "variant": self.variant, "seed": self.seed,
                "data_root": self.data_root, "data_version": self.data_version,
                "train": dataclasses.asdict(self.train), "evaluate": dataclasses.asdict(self.evaluate),
                "model_config": dataclasses.asdict(self.model_config)}

    @classmethod
    def from_json(cls, d: dict[str, Any], model_sets: list[str] | tuple[str, ...] = ()) -> RunSpec:
        """Parse a ``config.json``; ``model_sets`` (``model.key=value``) change the model config."""
        section = dict(d["model_config"])
        for item in model_sets:
            key = item.split("=", 1)[0].strip()
            if not key.startswith("model.") or "=" not in item:
                raise ConfigError(f"--set {item!r}: only model.<field>=value applies to a trained run")
            section = apply_overrides({"models": {d["model"]: section}}, d["model"], [item])["models"][d["model"]]
        return cls(d["dataset"], d["model"], d["variant"], int(d["seed"]), str(d.get("data_root", "data")),
                   dict(d.get("data_version") or {}), from_dict(TrainConfig, d["train"], "config.json: train"),
                   from_dict(EvalConfig, d["evaluate"], "config.json: evaluate"),
                   model_config(d["model"], section, d["variant"]))

    def key(self, **extra: Any) -> str:
        """A short hash of what the run computes (its config without :data:`NOT_PROVENANCE`)
        plus ``extra`` (e.g. a code version)."""
        from cdsr.track.tracking import flatten

        flat = {k: v for k, v in flatten(self.to_json()).items() if k not in NOT_PROVENANCE}
        blob = json.dumps({**flat, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_name(base: str, variant: str, seed: int, preset: bool = False, tuned: bool = False) -> str:
    """The name of a run (its directory under ``runs/<dataset>/`` and its record in the results
    store): ``<preset>[-tuned]-s<seed>`` for a merged preset run, else
    ``<base>[-tuned]-<variant>-s<seed>``."""
    base += "-tuned" if tuned else ""
    return f"{base}-s{seed}" if preset and variant == "merged" else f"{base}-{variant}-s{seed}"


def views(data: SplitData, variant: str) -> list[tuple[str | None, SplitData]]:
    """The data each model of a run sees: the whole split (``merged``), or one view per domain."""
    if variant == "merged":
        return [(None, data)]
    return [(name, data.restrict_to_domain(d)) for d, name in enumerate(data.domain_names)]


# -- the directory -------------------------------------------------------------------------------

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


class RunDir:
    """One run directory (or one domain's part of a ``single`` run: :meth:`part`)."""

    CONFIG, FIT, METRICS, HISTORY, STEPS = "config.json", "fit.json", "metrics.json", "history.json", "steps.csv"
    BEST, LAST, ROBUSTNESS, TRACKING = "best.pt", "last.pt", "robustness.json", "tracking.json"
    COMMAND = "command.txt"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def part(self, name: str | None) -> RunDir:
        return self if name is None else RunDir(self.path / f"domain-{name}")

    def parts(self) -> list[RunDir]:
        """This directory and its per-domain parts (``single`` runs)."""
        return [self, *(RunDir(p) for p in sorted(self.path.glob("domain-*")) if p.is_dir())]

    # config ---------------------------------------------------------------------------------
    def has_config(self) -> bool:
        return self.file(self.CONFIG).exists()

    def config(self) -> dict[str, Any]:
        """``config.json`` as stored (for comparisons and logging; :meth:`spec` parses it)."""
        return json.loads(self.file(self.CONFIG).read_text())

    def spec(self, model_sets: list[str] | tuple[str, ...] = ()) -> RunSpec:
        return RunSpec.from_json(self.config(), model_sets)

    def prepare(self, spec: RunSpec | dict[str, Any]) -> None:
        """Make this directory hold the run of ``spec`` (or of a stored config), or refuse with
        :class:`RunDirError` (see :func:`check_same_run`); writes ``config.json``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory; a run directory is a folder "
                              "(pick another --out)")
        config = json.loads(json.dumps(spec.to_json() if isinstance(spec, RunSpec) else spec))
        if self.has_config():
            try:
                old = self.config()
            except (OSError, json.JSONDecodeError) as exc:
                raise RunDirError(f"{self.file('config.json')}: unreadable ({exc}); move the run directory "
                                  "away or pick another --out") from exc
            check_same_run(self, old, config)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise RunDirError(f"{self.path}: cannot be a run directory: {exc}") from exc
        write_json(self.file(self.CONFIG), config)

    def write_command(self, command: str) -> None:
        """The command line that trains (and, re-run, resumes) this run."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.file(self.COMMAND).write_text(command + "\n")

    def command(self) -> str | None:
        f = self.file(self.COMMAND)
        return f.read_text().strip() if f.exists() else None

    def trained(self) -> bool:
        """Whether any trained state exists (a checkpoint, fit or metrics)."""
        return any(self.file(f).exists() for f in (self.LAST, self.BEST, self.METRICS, self.FIT)) or \
            any(p.file(self.LAST).exists() for p in self.parts()[1:])

    # checkpoints ----------------------------------------------------------------------------
    def has_last(self) -> bool:
        return self.file(self.LAST).exists()

    def load_last(self) -> dict[str, Any]:
        return torch.load(self.file(self.LAST), map_location="cpu", weights_only=True)

    def last_state(self) -> dict | None:
        """The training state in ``last.pt`` (None without one)."""
        if not self.has_last():
            return None
        try:
            return self.load_last()["state"]
        except Exception as exc:  # any unreadable checkpoint (truncated, not a torch file) is reported the same way
            raise RunDirError(f"{self.file('last.pt')}: unreadable checkpoint ({exc}); move the run directory "
                              "away or pick another --out") from exc

    def _save(self, name: str, obj: dict) -> None:
        tmp = self.file(name).with_suffix(".tmp")  # name: BEST or LAST
        torch.save(obj, tmp)
        tmp.replace(self.file(name))  # atomic: a kill never leaves a half-written checkpoint

    def save_last(self, ck: dict) -> None:
        self._save(self.LAST, ck)

    def save_best(self, ck: dict) -> None:
        self._save(self.BEST, ck)

    def load_best(self) -> dict[str, Any]:
        return torch.load(self.file(self.BEST), map_location="cpu", weights_only=True)

    def continue_from(self, src: RunDir) -> None:
        """Start this run where ``src`` stopped: its checkpoints and logs (e.g. the longer budget
        of a study variant that continues another); its config and results are not copied."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (self.LAST, self.BEST, self.STEPS, self.HISTORY):
            if src.file(name).exists():
                shutil.copy2(src.file(name), self.file(name))

    def steps_log(self) -> StepLog:
        return StepLog(self.file(self.STEPS))

    def steps_files(self) -> list[Path]:
        return [p.file(self.STEPS) for p in self.parts() if p.file(self.STEPS).exists()]

    def write_history(self, history: list[dict]) -> None:
        write_json(self.file(self.HISTORY), history, indent=1)

    # results --------------------------------------------------------------------------------
    def has_fit(self) -> bool:
        return self.file(self.FIT).exists()

    def write_fit(self, fitted: dict[str, Any]) -> None:
        write_json(self.file(self.FIT), fitted, indent=1)

    def read_fit(self) -> dict[str, Any]:
        return json.loads(self.file(self.FIT).read_text())

    def has_metrics(self) -> bool:
        return self.file(self.METRICS).exists()

    def write_metrics(self, metrics: RunMetrics) -> None:
        write_json(self.file(self.METRICS), metrics.to_json())

    def metrics(self) -> RunMetrics:
        return RunMetrics.read(self.file(self.METRICS))

    def read_json(self, name: str) -> Any:
        """``robustness.json``, ``tracking.json`` or a study's cache file; None when absent."""
        f = self.file(name)
        return json.loads(f.read_text()) if f.exists() else None

    def write_json(self, name: str, obj: Any, indent: int = 1) -> Path:
        write_json(self.file(name), obj, indent=indent)
        return self.file(name)

    # models ---------------------------------------------------------------------------------
    def load_nets(self, spec: RunSpec, vocab: Vocab, names: list[str],
                  device: torch.device | None = None) -> dict[str | None, torch.nn.Module]:
        """The best checkpoint(s) as models: ``{None: net}`` for ``merged``, ``{domain name: net}``
        for ``single``. A model config change that alters a parameter's shape fails to load, naming it."""
        device = device or pick_device(spec.train.device)
        keys: list[str | None] = [None] if spec.variant == "merged" else list(names)
        out = {}
        for name in keys:
            net = build_model(spec.model, spec.model_config, vocab)
            net.load_state_dict(self.part(name).load_best()["model"])
            out[name] = net.to(device)
        return out

    def load_models(self, data: SplitData, model_sets: list[str] | tuple[str, ...] = (),
                    device: torch.device | None = None, spec: RunSpec | None = None
                    ) -> list[tuple[str | None, SplitData, torch.nn.Module]]:
        """The best checkpoint(s) with the data view each one serves (see :func:`views`);
        ``model_sets`` (``model.key=value``) change the trained model's config before loading,
        for settings that leave the parameters as they are (e.g. DPG-Diff's ``model.t_inf=5``).
        ``spec``: the run's config (with those settings) when the caller has already read it."""
        spec = spec if spec is not None else self.spec(model_sets)
        nets = self.load_nets(spec, Vocab.from_ranges(data.domain_ranges, data.domain_names), data.domain_names,
                              device)
        return [(name, view, nets[name]) for name, view in views(data, spec.variant)]


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


def check_same_run(rd: RunDir, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse (:class:`RunDirError`) to resume or reuse ``rd`` for config ``new`` when it holds
    trained state of another configuration ``old``.

    Under other settings its checkpoints and metrics would sit next to a config of the new ones.
    The training budget is the exception where the run so far is also a run of the new budget
    (see :func:`_budget_ok`): a finished 20-epoch run continued to 30. Keys one side lacks are
    settings that did not exist when the other was written (code grew a field with a default) and
    are not compared, unless the default differs from what the code did before (``BEFORE_THE_KEY``:
    the old config is read with that value). A directory with a config but no trained state yet
    takes the new config.
    """
    from cdsr.track.tracking import flatten

    a, b = flatten(old), flatten(new)
    a = {**BEFORE_THE_KEY.get(old.get("model"), {}), **a}
    diff = sorted(k for k in set(a) & set(b) if k not in NOT_PROVENANCE and a[k] != b[k])
    if not diff or not rd.trained():
        return
    states = [p.last_state() for p in rd.parts() if p.has_last()]
    blocking = [k for k in diff if not (states and all(_budget_ok(k, a[k], b[k], st) for st in states))]
    if blocking:
        shown = "; ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in blocking[:12])
        more = f" (and {len(blocking) - 12} more)" if len(blocking) > 12 else ""
        raise RunDirError(f"{rd.path} holds a run of another configuration ({shown}{more}): resuming or "
                          "reusing it would mix the two. Train into a new --out, or delete the directory "
                          "to start over.")
