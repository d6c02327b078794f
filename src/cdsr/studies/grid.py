"""A method study as a declarative grid, its resumable trainer and its runs grouped over seeds.

A :class:`Study` names variants (variant name -> :class:`Variant`: a registered model, its
``--set`` overrides, and optionally the variant whose finished run it continues), the overrides
common to all, an epoch budget (one, or per dataset), per-dataset settings, the default
dataset, seeds and output folder, and its report function. :func:`train_grid` trains every
missing ``(variant, seed)`` into ``<out>/<dataset>/<variant>-s<seed>`` with
:func:`cdsr.train.run.train_run` (what ``cdsr train`` calls): a run directory with
``metrics.json`` is skipped, an interrupted one resumes. :func:`collect` groups the finished runs
by variant (read through :class:`cdsr.runs.RunDir`).

Overrides apply in this order: ``train.epochs=<budget>``, the common ones, the dataset's
settings, the variant's own, then the caller's ``--set`` (so ``--set train.epochs=1`` wins).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdsr.evaluate.results import RunMetrics
from cdsr.runs import RunDir, apply_overrides


class StudyError(ValueError):
    """A study request that cannot be met (unknown variant, missing run to continue)."""


@dataclass(frozen=True)
class Variant:
    model: str
    sets: tuple[str, ...] = ()
    variant: str = "merged"
    continues: str | None = None  # a variant whose finished run of the same seed this one continues


@dataclass(frozen=True)
class Study:
    name: str
    doc: str
    grid: dict[str, Variant]
    report: Callable[..., str]  # (study, dataset, out, data_root) -> markdown
    common: tuple[str, ...] = ()
    epochs: int | dict[str, int] | None = None
    settings: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dataset: str = "amazon-food-kitchen-benchmark"
    seeds: tuple[int, ...] = (1,)
    out: str = "runs/study"
    progress: tuple[str, str] = ("full", "NDCG@10")  # printed after each trained run

    def budget(self, dataset: str) -> int | None:
        return self.epochs.get(dataset) if isinstance(self.epochs, dict) else self.epochs

    def variants(self, names: Sequence[str] | None = None) -> list[str]:
        """``names`` (all when empty), checked against the grid."""
        unknown = [n for n in names or () if n not in self.grid]
        if unknown:
            raise StudyError(f"study {self.name!r} has no variant(s) {unknown}; it has {list(self.grid)}")
        return list(names or self.grid)

    def overrides(self, name: str, dataset: str, sets: Sequence[str] = ()) -> list[str]:
        """The ``--set`` overrides of one variant on ``dataset``, in the order they apply."""
        n = self.budget(dataset)
        return [*([f"train.epochs={n}"] if n is not None else []), *self.common, *self.settings.get(dataset, ()),
                *self.grid[name].sets, *sets]

    def params(self, name: str, dataset: str, base: dict[str, Any], sets: Sequence[str] = ()) -> dict[str, Any]:
        return apply_overrides(base, self.grid[name].model, self.overrides(name, dataset, sets))


def run_dir(out: str | Path, dataset: str, name: str, seed: int) -> RunDir:
    return RunDir(Path(out) / dataset / f"{name}-s{seed}")


def _continue_from(study: Study, out: Path, dataset: str, name: str, seed: int) -> None:
    """Seed the run directory of a continuing variant with its source run's checkpoints."""
    src = run_dir(out, dataset, study.grid[name].continues, seed)
    dst = run_dir(out, dataset, name, seed)
    if dst.has_last():
        return
    if not src.has_metrics():
        raise StudyError(f"{name}-s{seed} continues {src.path}: train that run first")
    dst.continue_from(src)


def train_grid(study: Study, dataset: str, out: str | Path, base: dict[str, Any], seeds: Sequence[int] = (),
               variants: Sequence[str] = (), sets: Sequence[str] = (), data_root: str | Path = "data",
               log: Callable[[str], None] = print) -> list[RunDir]:
    """Train every ``(seed, variant)`` that has no ``metrics.json`` yet; returns the trained ones."""
    from cdsr.train.run import load_split, train_run

    names = study.variants(variants)
    for name in names:  # a config error is reported before anything trains
        study.params(name, dataset, base, sets)
    out, data, trained = Path(out), None, []
    for seed in seeds or study.seeds:
        for name in names:
            rd = run_dir(out, dataset, name, seed)
            if rd.has_metrics():
                continue
            v = study.grid[name]
            if v.continues:
                _continue_from(study, out, dataset, name, seed)
            data = data or load_split(dataset, data_root)
            t0 = time.time()
            m = train_run(dataset, v.model, v.variant, study.params(name, dataset, base, sets), rd.path, seed=seed,
                          data_root=data_root, data=data)
            proto, key = study.progress
            got = m["protocols"].get(proto, {}).get("overall", {}).get(key, float("nan"))
            log(f"{dataset} {name}-s{seed}: {time.time() - t0:.0f} s, {proto} {key} {got:.4f}")
            trained.append(rd)
    return trained


@dataclass(frozen=True)
class Run:
    dir: RunDir
    metrics: RunMetrics


def collect(study: Study, dataset: str, out: str | Path) -> dict[str, list[Run]]:
    """The finished runs of each variant of the grid (in grid order, seeds ascending); variants
    without one are left out."""
    root = Path(out) / dataset
    groups: dict[str, list[Run]] = {}
    for name in study.grid:
        found = []
        for f in root.glob(f"{name}-s*/metrics.json"):
            prefix, _, seed = f.parent.name.rpartition("-s")
            if prefix == name and seed.isdigit():
                found.append((int(seed), Run(RunDir(f.parent), RunDir(f.parent).metrics())))
        if found:
            groups[name] = [r for _, r in sorted(found, key=lambda x: x[0])]
    return groups


def metrics_of(groups: dict[str, list[Run]]) -> dict[str, list[RunMetrics]]:
    return {name: [r.metrics for r in runs] for name, runs in groups.items()}


def no_runs(dataset: str, out: str | Path) -> str:
    return f"no runs under {Path(out) / dataset}"
