"""The benchmark of one dataset: per method train -> evaluate -> robustness -> track.

Pure functions over files; ``flows/benchmark.py`` makes each one a Prefect task and fans the
methods out. A method is ``<model>`` (merged sequences) or ``<model>-single`` (one model per
domain).

Where things go (all paths relative to the project root):
- ``runs/benchmark/<dataset>/<method>/<key>/``: the run directory (checkpoints, ``metrics.json``,
  ``robustness.json``, ``tracking.json``). ``<key>`` hashes everything that defines the run
  (resolved configs, seed, data version, a hash of the model/train/evaluate sources), so a rerun
  with the same inputs resumes or reuses it and a changed input starts afresh. It is not a DVC output: DVC deletes outputs before it reruns
  a stage, and a killed benchmark must resume from its checkpoints.
- ``metrics/<dataset>/<method>.json``: the DVC metrics (``cdsr train``'s metrics.json shape plus
  ``robustness``, ``data_version``, ``mlflow_run_id``, ``git_commit``).
- ``plots/<dataset>/learning/<method>.csv`` and ``plots/<dataset>/robustness/<method>.csv``:
  DVC plots data (learning curves; NDCG@10 against noise level p, one column per noise kind).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdsr.config import ConfigError, check_dataset_name, from_dict
from cdsr.evaluate.protocols import selection_value, summarise
from cdsr.evaluate.results import RunMetrics
from cdsr.evaluate.robustness import (
    RobustnessConfig,
    inference_curves,
    noise_seed,
    perturb,
    training_rows,
)
from cdsr.models.base import Vocab
from cdsr.models.registry import get_spec
from cdsr.runs import RunDir, RunSpec, apply_overrides, as_overrides, views
from cdsr.track import tracking
from cdsr.train.run import fit_spec, load_split, rank_run, score_spec, train_spec


@dataclass(frozen=True)
class BenchmarkConfig:
    """The ``benchmark:`` section of params.yaml."""

    methods: list[str] = field(default_factory=lambda: ["sasrec", "bert4rec", "hstu"])
    seed: int = 42
    epochs: int | None = None  # None: train.epochs
    max_workers: int = 0  # concurrent method branches; 0 = auto (one per 2 cores, at least 1)
    use_tuned: bool = True  # apply tuned/<dataset>/<model>.json when it exists
    robustness: bool = True
    runs_dir: str = "runs/benchmark"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    tuned_dir: str = "tuned"
    fail_on_error: bool = True  # the flow fails (after writing the others' results) if a method failed
    # the flow fails before any training when the dataset's last data validation failed (a
    # refresh with a corrupt batch): the champion stays, and its rows are in quarantine
    require_validation: bool = True
    # per-method --set style overrides for this benchmark only, e.g. {gca: [model.layers=1]}
    # (smaller settings in the default repro); tuned values are applied after them
    overrides: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("benchmark.methods is empty")
        for m in self.methods:
            parse_method(m)
        for m, sets in self.overrides.items():
            if any("=" not in str(x) for x in sets):
                raise ConfigError(f"benchmark.overrides.{m}: expected key=value strings, got {sets!r}")


def benchmark_config(params: dict[str, Any], methods: list[str] | None = None) -> BenchmarkConfig:
    """The ``benchmark:`` section, with ``methods`` (e.g. from ``--method``) replacing its list."""
    cfg = from_dict(BenchmarkConfig, params.get("benchmark"), "benchmark")
    return dataclasses.replace(cfg, methods=list(methods)) if methods else cfg


def parse_method(method: str) -> tuple[str, str]:
    """``sasrec`` -> (sasrec, merged); ``sasrec-single`` -> (sasrec, single)."""
    model, _, variant = method.partition("-")
    variant = variant or "merged"
    spec = get_spec(model)
    if variant not in spec.variants:
        raise ConfigError(f"method '{method}': model '{model}' has variants {list(spec.variants)}")
    return model, variant


def workers(cfg: BenchmarkConfig) -> int:
    if cfg.max_workers > 0:
        return min(cfg.max_workers, len(cfg.methods))
    return max(1, min(len(cfg.methods), (os.cpu_count() or 1) // 2))


def tuned_overrides(cfg: BenchmarkConfig, dataset: str, model: str) -> dict[str, Any]:
    from cdsr.tune import read_tuned, tuned_path

    path = tuned_path(cfg.tuned_dir, dataset, model)
    if not cfg.use_tuned or not path.exists():
        return {}
    return read_tuned(path)["params"]


def method_params(params: dict[str, Any], cfg: BenchmarkConfig, dataset: str, method: str) -> dict[str, Any]:
    """params.yaml with the method's ``benchmark.overrides`` and then its tuned values applied
    (``train.lr``, ``model.d``, ...)."""
    model, _ = parse_method(method)
    tuned = tuned_overrides(cfg, dataset, model)
    own = cfg.overrides.get(method, cfg.overrides.get(model, []))
    return apply_overrides(params, model, [*map(str, own), *as_overrides(tuned)])


CODE = ("models", "train", "evaluate", "data/loaders.py", "runs.py", "benchmark.py")  # what a run's results depend on


def code_version() -> str:
    """Hash of the package sources a run's results depend on: changed code never reuses a run."""
    pkg = Path(__file__).parent
    h = hashlib.sha256()
    for part in CODE:
        for f in sorted((pkg / part).rglob("*.py")) if (pkg / part).is_dir() else [pkg / part]:
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def run_spec(params: dict[str, Any], cfg: BenchmarkConfig, dataset: str, method: str,
             data_root: str | Path) -> RunSpec:
    """The run of ``method``: params with its overrides and tuned values, the benchmark's seed and epochs."""
    model, variant = parse_method(method)
    p = method_params(params, cfg, dataset, method)
    return RunSpec.build(p, check_dataset_name(dataset), model, variant, cfg.seed, cfg.epochs, data_root)


def run_key(spec: RunSpec, params: dict[str, Any], cfg: BenchmarkConfig) -> str:
    rob = robustness_config(params) if cfg.robustness else None
    return spec.key(code=code_version(), robustness=dataclasses.asdict(rob) if rob else None)


def robustness_config(params: dict[str, Any]) -> RobustnessConfig:
    return from_dict(RobustnessConfig, params.get("robustness"), "robustness")


def run_dir(spec: RunSpec, params: dict[str, Any], cfg: BenchmarkConfig, method: str) -> RunDir:
    """``<runs_dir>/<dataset>/<method>/<key>``: the same inputs and code find the same directory."""
    return RunDir(Path(cfg.runs_dir) / spec.dataset / method / run_key(spec, params, cfg))


# -- the steps (each a Prefect task in flows/benchmark.py) --------------------------------------

def train_step(dataset: str, method: str, params: dict[str, Any], cfg: BenchmarkConfig,
               data_root: str | Path = "data") -> str:
    """Train with early stopping, resuming from the run directory's last checkpoint; returns the
    run directory. A finished run (``fit.json`` present) is reused as is."""
    spec = run_spec(params, cfg, dataset, method, data_root)
    rd = run_dir(spec, params, cfg, method)
    if not rd.has_fit():
        fit_spec(spec, rd, load_split(dataset, data_root))
    return str(rd.path)


def evaluate_step(run: str) -> dict[str, Any]:
    """Test metrics per protocol (from params) and the validation summary of the best checkpoint;
    writes the run's ``metrics.json`` (the record of ``cdsr train``)."""
    rd = RunDir(run)
    if rd.has_metrics():
        return rd.metrics().to_json()
    spec = rd.spec()
    return score_spec(rd, load_split(spec.dataset, spec.data_root)).to_json()


def robustness_step(dataset: str, method: str, run: str, params: dict[str, Any], cfg: BenchmarkConfig,
                    data_root: str | Path = "data") -> list[dict]:
    """Inference-time noise on the trained model, then training-time noise (one retrain per kind
    and p, same settings, clean validation and test). Cached in ``robustness.json``."""
    rd = RunDir(run)
    cached = rd.read_json(RunDir.ROBUSTNESS)
    if cached is not None:
        return cached
    rc = robustness_config(params)
    spec = rd.spec()
    data = load_split(dataset, data_root)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)  # noise keeps every item in its domain
    nets = rd.load_nets(spec, vocab, data.domain_names)  # loaded once for every noise level
    rows = inference_curves(lambda d: overall_test_metrics(nets, spec, d, rc.protocol), data, rc)
    clean = rows[0]
    noisy = {}
    for kind in rc.train:
        for prob in rc.train_levels:
            sub = RunDir(rd.path / f"train-noise-{kind}-p{prob}")
            seed = noise_seed(rc, kind, prob)
            if not sub.has_metrics():
                train_spec(spec, sub, data,
                           train_transform=lambda v, k=kind, q=prob, s=seed: perturb(v, k, q, s, scope="train"))
            noisy[(kind, prob)] = overall_test_metrics(sub.load_nets(spec, vocab, data.domain_names), spec, data,
                                                       rc.protocol)
    rows += training_rows({m: clean[m] for m in rc.metrics}, noisy, rc)
    rd.write_json(RunDir.ROBUSTNESS, rows)
    return rows


def overall_test_metrics(nets: dict, spec: RunSpec, data, protocol: str) -> dict[str, float]:
    """Overall test metrics of a run's best model(s) (:meth:`RunDir.load_nets`) on ``data``
    (possibly noisy)."""
    models = [(name, view, nets[name]) for name, view in views(data, spec.variant)]
    ev = spec.evaluate
    return summarise(rank_run(models, "test", protocol, ev), data.domain_names, ev)["overall"]


_MLFLOW_LOCK = threading.Lock()  # the fluent MLflow API keeps one active-run stack per process


def track_step(dataset: str, method: str, run: str, robustness: list[dict] | None, params: dict[str, Any],
               cfg: BenchmarkConfig, data_root: str | Path = "data", parent_run_id: str | None = None,
               command: str = "") -> dict[str, Any]:
    """Log the run to MLflow (once: ``tracking.json`` remembers the run id), complete the run's
    ``metrics.json`` with the benchmark's fields, and write the DVC metrics and plots files.

    ``metrics/<dataset>/<method>.json`` holds what the run computed (:data:`VOLATILE` fields,
    e.g. wall times and the MLflow run id, stay in the run directory it names as ``run_dir``), so
    that repeating the pipeline from a clean clone reproduces it byte for byte. Returns the
    run's full record."""
    rd = RunDir(run)
    spec = rd.spec()
    tcfg = tracking.tracking_config(params)
    metrics = dataclasses.replace(
        rd.metrics(), method=method, val_metric=spec.train.val_metric, robustness=robustness or [],
        data_version=tracking.data_version(dataset, data_root), git_commit=tracking.git_commit(), command=command,
        robustness_protocol=robustness_config(params).protocol if robustness else None)
    plots = write_plots(dataset, method, metrics.to_json(), cfg, rd.path)
    with _MLFLOW_LOCK:
        tracking.setup(tcfg)
        tracking.use_experiment(dataset, tcfg)
        known = rd.read_json(RunDir.TRACKING) or {}
        run_id = known.get("run_id") if known.get("tracking_uri") == tracking.tracking_uri(tcfg) else None
        if run_id and _finished(run_id):
            stored = rd.metrics()
            if stored.mlflow_run_id == run_id:  # tracked before: its record stays as it was logged
                metrics = stored
        else:
            rd.write_metrics(metrics)  # the artefact logged with the run
            run_id = _log_run(rd, spec, metrics, plots, params, tcfg, parent_run_id)
            rd.write_json(RunDir.TRACKING, {"run_id": run_id, "tracking_uri": tracking.tracking_uri(tcfg)}, indent=None)
    if metrics.mlflow_run_id != run_id:
        metrics.mlflow_run_id = run_id
        rd.write_metrics(metrics)
    dest = Path(cfg.metrics_dir) / dataset / f"{method}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(stable_record(metrics, rd), indent=2) + "\n")
    return metrics.to_json()


# Fields of a run's record that differ between two runs of the same pipeline: wall times, the
# machine, the MLflow run id, the commit and command line. Kept in the run directory's
# metrics.json; left out of the DVC metrics file.
VOLATILE = ("seconds", "hardware", "mlflow_run_id", "git_commit", "command")
VOLATILE_FIT = ("train_seconds", "resumes")


def stable_record(metrics: RunMetrics, rd: RunDir) -> dict[str, Any]:
    """The DVC metrics file: ``metrics`` without :data:`VOLATILE` fields, naming the run directory."""
    out = {k: v for k, v in metrics.to_json().items() if k not in VOLATILE}
    out["fit"] = {part: {k: v for k, v in f.items() if k not in VOLATILE_FIT} for part, f in out["fit"].items()}
    return {**out, "run_dir": rd.path.as_posix()}


def _log_run(rd: RunDir, spec: RunSpec, metrics: RunMetrics, plots: list[Path], params: dict[str, Any],
             tcfg: tracking.TrackingConfig, parent_run_id: str | None) -> str:
    """One MLflow run: params, per-epoch history, final metrics, artefacts and the pyfunc model."""
    import mlflow

    tags = {"dataset": spec.dataset, "method": metrics.method, "model": spec.model, "variant": spec.variant,
            "protocols": ",".join(metrics.protocols), "val_protocol": spec.train.val_protocol,
            "val_metric": spec.train.val_metric, "git_commit": metrics.git_commit,
            "data_version": metrics.data_version.get("split.parquet", "unknown"),
            "run_dir": str(rd.path), "cdsr.kind": "benchmark", **tracking.owner_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=f"{spec.dataset}/{metrics.method}", tags=tags) as r:
        tracking.log_params(rd.config())
        mlflow.log_dict(metrics.data_version, "data_version.json")
        tracking.log_history(metrics.history)
        vals = tracking.final_metrics(metrics.to_json())
        vals["val_metric"] = selection_value(metrics.validation, spec.train.val_metric, spec.train.val_aggregate)
        mlflow.log_metrics(vals)
        tracking.log_artifacts([rd.file(RunDir.CONFIG), rd.file(RunDir.METRICS), rd.file(RunDir.ROBUSTNESS)], "run")
        tracking.log_artifacts(plots, "plots")
        for steps in rd.steps_files():  # per-step loss, Pareto ratio
            tracking.log_artifacts([steps], "steps" if steps.parent == rd.path else f"steps/{steps.parent.name}")
        if tcfg.log_models:
            from cdsr.track.pyfunc import log_pyfunc
            from cdsr.track.serve import serve_config

            items = Path(spec.data_root) / spec.dataset / "processed" / "items.parquet"
            # the request limits of params `serve:` travel with the model (env: not at log time)
            log_pyfunc(rd.path, items, name="model", serve=serve_config(params, env={}))
        return r.info.run_id


def _finished(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id).info.status == "FINISHED"
    except MlflowException:  # deleted, or another store
        return False


def write_plots(dataset: str, method: str, metrics: dict[str, Any], cfg: BenchmarkConfig, run: Path) -> list[Path]:
    """DVC plots data: learning curve and robustness curve CSVs, and a robustness PNG."""
    base = Path(cfg.plots_dir) / dataset
    out = []
    learn = base / "learning" / f"{method}.csv"
    learn.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"part": part, **rec} for part, recs in metrics.get("history", {}).items() for rec in recs]
    if rows:
        cols = ["part", "epoch"] + sorted({k for r in rows for k in r} - {"part", "epoch"})
        with open(learn, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        out.append(learn)
    rob = metrics.get("robustness") or []
    if rob:
        # one curve per file (DVC draws one line per file of a plots directory)
        mdir = base / "robustness" / method
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir(parents=True)
        cols = ["p"] + [k for k in rob[0] if k not in {"scope", "kind", "p"}]
        for scope in ("inference", "train"):
            clean = [r for r in rob if r["scope"] == scope and r["kind"] == "clean"]
            for kind in _kinds(rob, scope):
                pts = clean + sorted((r for r in rob if r["scope"] == scope and r["kind"] == kind), key=lambda r: r["p"])
                path = mdir / f"{scope}-{kind}.csv"
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(pts)
                out.append(path)
        from cdsr.report import plot_robustness

        png = run / f"robustness-{method}.png"
        plot_robustness({method: metrics}, png)
        out.append(png)
    return out


def _kinds(rows: list[dict], scope: str) -> list[str]:
    return sorted({r["kind"] for r in rows if r["scope"] == scope and r["kind"] != "clean"})
