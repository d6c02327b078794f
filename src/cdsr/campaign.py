"""Campaigns: named lists of runs (params.yaml ``campaigns:``) that a CPU-bound team runs for
weeks, interrupted at any point: ``cdsr campaign run NAME``.

- A run whose current record is in the results store (:mod:`cdsr.store`) is skipped.
- A run whose directory under ``runs/`` still has its checkpoint resumes from it; a stale or
  partial record is replaced by the finished run's.
- Each finished run's record is written at once (and, with ``--commit``, committed to git), so a
  machine replaced mid-campaign loses at most the run in progress.
- ``cdsr campaign plan NAME`` prints the remaining cost from measured epoch times before
  anything runs (:func:`plan`).

A campaign entry::

    campaigns:
      abxi:
        dataset: amazon-food-kitchen-benchmark
        runs:
          - {preset: abxi-paper, seeds: [1]}
          - {name: abxi-fast-sink, preset: abxi-fast, seeds: [1, 2, 3], set: [model.pad_sink=true],
             epochs: 30}
          - {model: sasrec, seeds: [1], tuned: tuned/amazon-food-kitchen-benchmark/sasrec.json}

A run is named as ``cdsr train`` names it (:func:`cdsr.runs.run_name`) from ``name`` (default
its preset or model), plus ``-s<seed>``.
"""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdsr.config import ConfigError, from_dict


@dataclass(frozen=True)
class RunEntry:
    seeds: tuple[int, ...]
    preset: str | None = None
    model: str | None = None
    name: str | None = None
    variant: str = "merged"
    set: tuple[str, ...] = ()
    tuned: str | None = None
    epochs: int | None = None

    def __post_init__(self):
        if self.preset is None and self.model is None:
            raise ConfigError("campaign run: give `preset` or `model`")
        if not self.seeds:
            raise ConfigError("campaign run: give at least one seed")


@dataclass(frozen=True)
class CampaignConfig:
    dataset: str
    runs: tuple[RunEntry, ...] = field(default_factory=tuple)
    description: str = ""


@dataclass
class PlannedRun:
    name: str
    seed: int
    spec: Any  # RunSpec
    command: str
    state: str = "missing"  # missing | current | partial | stale | other
    epochs_done: int = 0
    in_progress: bool = False
    epoch_seconds: float | None = None  # measured so far by the run in progress
    best_epoch: int = -1


def campaign_config(params: dict[str, Any], name: str) -> CampaignConfig:
    known = params.get("campaigns") or {}
    if name not in known:
        raise ConfigError(f"unknown campaign {name!r}; declared in params.yaml `campaigns:`: {sorted(known) or 'none'}")
    return from_dict(CampaignConfig, known[name], f"campaigns.{name}")


def expand(params: dict[str, Any], camp: CampaignConfig, runs_dir: Path, data_root: str | Path,
           store: Any) -> list[PlannedRun]:
    """Every (entry, seed) of ``camp`` as a resolved run with its state in ``store``."""
    from cdsr import presets
    from cdsr.runs import RunDir, RunSpec, apply_overrides, as_overrides, run_name
    from cdsr.tune import read_tuned

    out = []
    for e in camp.runs:
        model, sets = (presets.expand(params, e.preset, e.model) if e.preset else (e.model, []))
        tuned = as_overrides(read_tuned(e.tuned, camp.dataset)["params"]) if e.tuned else []
        all_sets = [*sets, *tuned, *e.set]
        for seed in e.seeds:
            name = run_name(e.name or e.preset or model, e.variant, seed, preset=e.name is not None or e.preset is not None,
                            tuned=e.tuned is not None and e.name is None)
            spec = RunSpec.build(apply_overrides(params, model, all_sets), camp.dataset, model, e.variant, seed,
                                 e.epochs, data_root)
            cmd = ["cdsr train --dataset", camp.dataset, f"--preset {e.preset}" if e.preset else f"--model {model}",
                   f"--variant {e.variant}" if e.variant != "merged" else "", f"--seed {seed}",
                   f"--epochs {e.epochs}" if e.epochs else "", f"--tuned {e.tuned}" if e.tuned else "",
                   *(f"--set {s}" for s in e.set), f"--out {runs_dir / camp.dataset / name}"]
            p = PlannedRun(name, seed, spec, " ".join(c for c in cmd if c))
            p.state = store.state(_stored_config(spec), name)
            rd = RunDir(runs_dir / camp.dataset / name)
            st = rd.last_state() if rd.has_last() else None
            if st is not None:
                p.epochs_done, p.in_progress = int(st.get("epoch", 0)), True
                p.best_epoch = int(st.get("best_epoch", -1))
                if p.epochs_done:
                    p.epoch_seconds = float(st.get("train_seconds", 0.0)) / p.epochs_done
            out.append(p)
    return out


def _stored_config(spec: Any) -> dict[str, Any]:
    """``spec`` as its run directory's ``config.json`` holds it (the JSON round trip)."""
    import json

    return json.loads(json.dumps(spec.to_json()))


def _expected_epochs(spec: Any, seen: list[int]) -> int:
    """Epochs a run will take: the median of finished runs like it (the same name, else the same
    model), capped by its budget; without any, its budget capped at 60 (early stopping usually
    ends a run well before a large cap)."""
    cap = spec.train.epochs
    return min(cap, int(statistics.median(seen))) if seen else min(cap, 60)


def plan(params: dict[str, Any], camp: CampaignConfig, runs: list[PlannedRun], store: Any) -> dict[str, Any]:
    """The campaign's remaining cost from measured epoch times: per run, the seconds per epoch
    of the store's records of the same run name without its seed, else of the same model, else
    of runs of the model in progress, times the epochs still to go."""
    from cdsr.leaderboard import _SEED

    recs = store.records(camp.dataset)
    rows, total = [], 0.0
    for r in runs:
        group = _SEED.match(r.name)["name"] if _SEED.match(r.name) else r.name
        same = [x for x in recs if (_SEED.match(x.name) or {"name": x.name})["name"] == group and not x.stale
                and x.status == "finished"]
        model = [x for x in recs if x.config.get("model") == r.spec.model and x.meta.get("epoch_seconds")]
        secs = [float(x.meta["epoch_seconds"]) for x in (same or model) if x.meta.get("epoch_seconds")]
        if not secs:  # runs of the model still in progress (this one first)
            secs = [r.epoch_seconds] if r.epoch_seconds else \
                [x.epoch_seconds for x in runs if x.spec.model == r.spec.model and x.epoch_seconds]
        per_epoch = statistics.median(secs) if secs else None
        finished = same or [x for x in model if x.status == "finished" and not x.stale]
        expected = _expected_epochs(r.spec, [int(x.meta.get("epochs") or 0) for x in finished])
        if r.in_progress:  # it runs at least until its patience after its best epoch so far
            expected = max(expected, min(r.spec.train.epochs, max(r.best_epoch, 0) + r.spec.train.patience + 1))
        left = 0 if r.state == "current" else max(expected - r.epochs_done, 1)
        cost = None if per_epoch is None else left * per_epoch
        total += cost or 0.0
        rows.append({"name": r.name, "state": r.state + (f", at epoch {r.epochs_done}" if r.in_progress else ""),
                     "epochs_left": left, "epoch_seconds": per_epoch, "seconds_left": cost})
    unknown = [x["name"] for x in rows if x["seconds_left"] is None and x["epochs_left"]]
    return {"rows": rows, "seconds_left": total, "unknown": unknown}


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"{'run':44s} {'state':28s} {'epochs left':>11s} {'s/epoch':>8s} {'hours left':>10s}"]
    for r in p["rows"]:
        eps = "?" if r["epoch_seconds"] is None else f"{r['epoch_seconds']:.0f}"
        hrs = "?" if r["seconds_left"] is None else f"{r['seconds_left'] / 3600:.2f}"
        lines.append(f"{r['name']:44s} {r['state']:28s} {r['epochs_left']:>11d} {eps:>8s} {hrs:>10s}")
    lines.append(f"remaining: {p['seconds_left'] / 3600:.1f} h of measured cost"
                 + (f", plus {len(p['unknown'])} run(s) with no measured epoch time of their model yet"
                    if p["unknown"] else ""))
    return "\n".join(lines)


def commit_record(path: Path, message: str) -> bool:
    """``git add`` the record and commit it alone; False when git is not there or has nothing to commit."""
    try:
        subprocess.run(["git", "add", "--", str(path)], check=True, capture_output=True)
        res = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return res.returncode == 0


def run(params: dict[str, Any], name: str, store: Any, runs_dir: Path = Path("runs"),
        data_root: str | Path = "data", commit: bool = False, log=print, only: list[str] | None = None) -> list[str]:
    """Train every run of campaign ``name`` without a current record, one at a time, writing
    (and with ``commit`` committing) each record when it finishes. Returns the names trained."""
    from cdsr.runs import RunDir
    from cdsr.train.run import load_split, train_spec

    camp = campaign_config(params, name)
    runs = expand(params, camp, runs_dir, data_root, store)
    bad = [r.name for r in runs if r.state == "other"]
    if bad:
        raise ConfigError(f"campaign {name}: the store holds other runs under the names {bad}; rename these entries")
    unknown = sorted(set(only or ()) - {r.name for r in runs})
    if unknown:
        raise ConfigError(f"campaign {name} has no run named {unknown}; its runs: {[r.name for r in runs]}")
    data = None
    done = []
    for r in runs:
        if only and r.name not in only:
            continue
        if r.state == "current":
            log(f"skip {r.name}: its record is in the store")
            continue
        log(f"run  {r.name} ({r.state}{', resuming at epoch %d' % r.epochs_done if r.in_progress else ''}): {r.command}")
        data = data if data is not None else load_split(camp.dataset, data_root)
        rd = RunDir(runs_dir / camp.dataset / r.name)
        rd.prepare(r.spec)
        rd.write_command(r.command)
        metrics = train_spec(r.spec, rd, data)
        rec = store.put(rd, name=r.name, command=r.command, metrics=metrics)
        log(f"done {r.name}: record {rec.path} (key {rec.key})")
        if commit and commit_record(rec.path, f"results: {camp.dataset}/{r.name} (campaign {name})"):
            log(f"committed {rec.path}")
        done.append(r.name)
    return done
