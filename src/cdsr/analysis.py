"""Orthogonal-alignment analysis (seeds 002/003, Observation 2): over a set of runs, validation
performance against |cos(X, X')| of the GCA modules, the paper's main figure.

Each run contributes its per-epoch validation records (``val_cos``: mean |cos(X, X')| over all
GCA modules and domains, see :mod:`cdsr.models.gca`; and the validation metric). Two views:

- **across runs**: each run's point at its best validation epoch (a study's trials, a seed grid);
- **over training**: every (run, epoch) point, and the mean over runs of the within-run rank
  correlation between |cos| and the metric across epochs.

Sources: run directories (``history.json`` written by the training loop) or MLflow runs of a
dataset's experiment (the per-epoch ``val_cos`` history that benchmark runs and tuning trials
log), e.g. the trials of one Optuna study. Writes ``points.csv``, ``summary.json`` and
``orthogonality.png`` (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COS_KEY = "val_cos"


@dataclass
class RunCurve:
    """One run's per-epoch |cos| and validation metric (epochs where both were measured)."""

    name: str
    epochs: list[int]
    cos: list[float]
    metric: list[float]
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> int:
        """Index of the best validation epoch (first one on ties, as early stopping keeps it)."""
        return int(np.argmax(self.metric))


def curve_from_history(name: str, history: list[dict], metric: str, labels: dict | None = None) -> RunCurve | None:
    """A :class:`RunCurve` from a training loop history (``val_<metric>``, ``val_cos``); None if
    the run never measured |cos| (no GCA module)."""
    rows = [r for r in history if _finite(r.get(COS_KEY)) and _finite(r.get(f"val_{metric}"))]
    if not rows:
        return None
    return RunCurve(name, [int(r["epoch"]) for r in rows], [float(r[COS_KEY]) for r in rows],
                    [float(r[f"val_{metric}"]) for r in rows], labels or {})


def curves_from_dirs(paths: list[Path], metric: str) -> list[RunCurve]:
    """Curves of every run directory under ``paths`` (a ``history.json``, searched recursively)."""
    from cdsr.runs import RunDir

    out = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob(RunDir.HISTORY))
        for f in files:
            rd = RunDir(f.parent)
            labels = {}
            if rd.has_config():
                cfg = rd.config()
                labels = {"model": cfg.get("model"), "seed": cfg.get("seed"), **_gca_labels(cfg.get("model_config", {}))}
            c = curve_from_history(str(f.parent), json.loads(f.read_text()), metric, labels)
            if c is not None:
                out.append(c)
    return out


def curves_from_mlflow(experiment: str, metric: str, study: str | None = None, filter_string: str = "") -> list[RunCurve]:
    """Curves of the MLflow runs of ``experiment`` that logged ``val_cos`` (optionally only the
    trials of one Optuna study, and an extra MLflow filter string)."""
    from mlflow.tracking import MlflowClient

    from cdsr.track.tracking import metric_key

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FileNotFoundError(f"no MLflow experiment '{experiment}' in {client.tracking_uri}")
    filters = [f for f in (filter_string, f"tags.`optuna.study` = '{study}'" if study else "") if f]
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), max_results=50_000)
    mkey = metric_key(f"val_{metric}")
    out = []
    for r in runs:
        if COS_KEY not in r.data.metrics:
            continue
        cos = {m.step: m.value for m in client.get_metric_history(r.info.run_id, COS_KEY)}
        perf = {m.step: m.value for m in client.get_metric_history(r.info.run_id, mkey)}
        steps = sorted(s for s in cos if s in perf and _finite(cos[s]) and _finite(perf[s]))
        if not steps:
            continue
        labels = {k: r.data.tags.get(k) for k in ("method", "model", "optuna.study", "optuna.trial") if r.data.tags.get(k)}
        for k, v in r.data.params.items():  # benchmark runs: model_config.<x>; tuning trials: model.<x>
            if k.split(".")[-1] in ("gca_layers", "gate", "gca_ln") and k.split(".")[0] in ("model_config", "model"):
                labels[k.split(".")[-1]] = v
        out.append(RunCurve(r.info.run_name or r.info.run_id, steps, [cos[s] for s in steps], [perf[s] for s in steps], labels))
    return out


def rank_correlation(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman rho (average ranks on ties); NaN with fewer than 3 points or a constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": n, "pearson": math.nan, "spearman": math.nan}
    return {"n": n, "pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])}


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # ties share their mean rank
        tie = v == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def analyse(curves: list[RunCurve], metric: str) -> dict[str, Any]:
    """Correlations of the metric with |cos|: across runs (best epochs), over all (run, epoch)
    points, and the mean within-run (across epochs) Spearman rho."""
    if not curves:
        raise ValueError("no run with a |cos(X, X')| measurement (val_cos): were they GCA runs?")
    best_cos = [c.cos[c.best] for c in curves]
    best_metric = [c.metric[c.best] for c in curves]
    within = [rank_correlation(c.cos, c.metric)["spearman"] for c in curves if len(c.epochs) >= 3]
    within = [w for w in within if _finite(w)]
    return {"metric": f"val_{metric}", "runs": len(curves),
            "across_runs": rank_correlation(best_cos, best_metric),
            "all_epochs": rank_correlation([v for c in curves for v in c.cos], [v for c in curves for v in c.metric]),
            "within_runs_mean_spearman": float(np.mean(within)) if within else math.nan,
            "within_runs_n": len(within),
            "cos_first_epoch_mean": float(np.mean([c.cos[0] for c in curves])),
            "cos_best_epoch_mean": float(np.mean(best_cos))}


def write_analysis(curves: list[RunCurve], metric: str, out_dir: Path) -> dict[str, Any]:
    """``points.csv`` (run, epoch, cos, metric, best), ``summary.json``, ``orthogonality.png``."""
    from cdsr.report import _mpl_text, _new_figure, _save

    summary = analyse(curves, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = sorted({k for c in curves for k in c.labels})
        w.writerow(["run", "epoch", "cos", f"val_{metric}", "best_epoch", *keys])
        for c in curves:
            for i, (e, cs, m) in enumerate(zip(c.epochs, c.cos, c.metric)):
                w.writerow([c.name, e, repr(cs), repr(m), int(i == c.best), *(c.labels.get(k, "") for k in keys)])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    fig = _new_figure(11, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    groups = sorted({_group(c) for c in curves})
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    color = {g: cmap(i % cmap.N) for i, g in enumerate(groups)}
    for g in groups:
        cs = [c for c in curves if _group(c) == g]
        ax1.scatter([c.cos[c.best] for c in cs], [c.metric[c.best] for c in cs], color=color[g], label=_mpl_text(g), s=28)
    a = summary["across_runs"]
    ax1.set_xlabel("|cos(X, X')| at the best epoch")
    ax1.set_ylabel(f"validation {metric}")
    ax1.set_title(f"across runs: Spearman {a['spearman']:.2f}, Pearson {a['pearson']:.2f} (n={a['n']})", fontsize=9)
    ax1.legend(fontsize=7)
    for c in curves:
        ax2.plot(c.cos, c.metric, "-o", color=color[_group(c)], ms=2.5, lw=0.8, alpha=0.8)
    ax2.set_xlabel("|cos(X, X')| per epoch")
    ax2.set_ylabel(f"validation {metric}")
    ax2.set_title(f"over training: mean within-run Spearman {summary['within_runs_mean_spearman']:.2f}", fontsize=9)
    _save(fig, out_dir / "orthogonality.png")
    return summary


def _group(c: RunCurve) -> str:
    """A legend label: method, GCA[placement], gate, LN / no LN (what is known of the run)."""
    lab = c.labels
    parts = [str(lab["method"])] if lab.get("method") else []
    if lab.get("gca_layers") not in (None, ""):
        parts.append(f"GCA[{str(lab['gca_layers']).strip('[]()').replace(' ', '')}]")
    if lab.get("gate"):
        parts.append(str(lab["gate"]))
    if lab.get("gca_ln") not in (None, ""):
        parts.append("LN" if str(lab["gca_ln"]).lower() == "true" else "no LN")
    return " ".join(parts) or lab.get("model") or "runs"


def _gca_labels(model_config: dict) -> dict[str, Any]:
    return {k: (",".join(map(str, model_config[k])) if isinstance(model_config[k], list) else model_config[k])
            for k in ("gca_layers", "gate", "gca_ln") if k in model_config}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
