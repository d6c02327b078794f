"""MLflow tracking: where the store is, and what a run records.

The store: ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.tracking_uri`` in params.yaml, else
MLflow's own default, ``sqlite:///mlflow.db`` in the working directory (the project root under
`dvc repro`) with artifacts in ``./mlruns``. Keeping MLflow's default means a bare
``mlflow ui`` / ``mlflow models serve -m models:/cdsr-<dataset>@champion`` run from the project
root sees the same store with no flag.

A training run records: the resolved config (params, flattened, and ``config.json``), per-epoch
loss and validation metrics (``step`` = epoch), final metrics per split, protocol and domain
(``test/<protocol>/<domain|overall>/<metric>``; ``@`` is not allowed in MLflow names, so
``NDCG@10`` is logged as ``NDCG_10``), tags with the data version (MD5 of the split files, the
same digests DVC records in dvc.lock), git commit, protocols, dataset, method.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cdsr  # noqa: F401  (offline settings before mlflow is imported)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class TrackingConfig:
    """The ``mlflow:`` section of params.yaml."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment_prefix: str = "cdsr"  # experiment "<prefix>-<dataset>"
    model_prefix: str = "cdsr"  # registered model "<prefix>-<dataset>"
    log_models: bool = True  # log each benchmark run's model as a pyfunc (needed to promote it)


def tracking_config(params: dict[str, Any] | None) -> TrackingConfig:
    """The ``mlflow:`` section of ``params``, typed."""
    from cdsr.config import from_dict

    return from_dict(TrackingConfig, (params or {}).get("mlflow"), "mlflow")


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg is not None and cfg.tracking_uri:
        return cfg.tracking_uri
    return DEFAULT_TRACKING_URI


def setup(cfg: TrackingConfig | None = None) -> str:
    """Point MLflow at the configured store (sqlite paths made absolute) and return its URI."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_name(dataset: str, cfg: TrackingConfig | None = None) -> str:
    return f"{(cfg or TrackingConfig()).experiment_prefix}-{dataset}"


def registered_model_name(dataset: str, cfg: TrackingConfig | None = None) -> str:
    return f"{(cfg or TrackingConfig()).model_prefix}-{dataset}"


def use_experiment(dataset: str, cfg: TrackingConfig | None = None) -> str:
    """Create (if needed) and activate the dataset's experiment; returns its id."""
    import mlflow

    return mlflow.set_experiment(experiment_name(dataset, cfg)).experiment_id


def git_commit(root: str | Path = ".") -> str:
    """HEAD commit (with ``-dirty`` when tracked files changed; dvc.lock, which `dvc repro` itself
    rewrites, does not count), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"], cwd=root, check=False,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_version(dataset: str, data_root: str | Path = "data") -> dict[str, str]:
    """MD5 of the built split files (what DVC's lock file records for the split stage)."""
    processed = Path(data_root) / dataset / "processed"
    return {name: md5(processed / name) for name in ("split.parquet", "negatives.parquet", "items.parquet")
            if (processed / name).exists()}


def validation_passed(dataset: str, data_root: str | Path = "data") -> tuple[bool, str]:
    """Whether the dataset's last data validation (interactions and sequences) succeeded."""
    base = Path(data_root) / dataset
    reports = [base / "interim" / "validation" / "validation.json", base / "processed" / "validation" / "validation.json"]
    for r in reports:
        if not r.exists():
            return False, f"{r} is missing"
        if not json.loads(r.read_text()).get("success"):
            return False, f"{r} reports failure"
    return True, "interactions and sequences validation passed"


def metric_key(name: str) -> str:
    return name.replace("@", "_")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def summary_metrics(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
    """``summarise`` output -> ``{prefix/overall/NDCG_10: v, prefix/<domain>/NDCG_10: v, ...}``."""
    out = {f"{prefix}/overall/{metric_key(k)}": float(v) for k, v in summary["overall"].items()}
    for dom, vals in summary.get("domains", {}).items():
        out.update({f"{prefix}/{dom}/{metric_key(k)}": float(v) for k, v in vals.items()})
    return out


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every number of a ``train_run`` metrics dict worth a metric: test per protocol and domain,
    validation, robustness drops."""
    out: dict[str, float] = {}
    for proto, summ in metrics.get("protocols", {}).items():
        out.update(summary_metrics(f"test/{proto}", summ))
    if "validation" in metrics:
        out.update(summary_metrics(f"valid/{metrics['validation']['protocol']}", metrics["validation"]))
    for row in metrics.get("robustness", []):
        if row["kind"] == "clean":
            continue
        for k, v in row.items():
            if k.startswith("rel_drop_") or k in {"NDCG@10", "HR@10", "MRR"}:
                out[f"robust/{row['scope']}/{row['kind']}/p{row['p']}/{metric_key(k)}"] = float(v)
    out["train_seconds"] = float(sum(f.get("train_seconds", 0.0) for f in metrics.get("fit", {}).values()))
    return out


def log_history(history: dict[str, list[dict]]) -> None:
    """Per-epoch loss and validation metrics, ``step`` = epoch; single-variant runs prefix the domain."""
    import mlflow

    for part, records in history.items():
        pre = "" if part == "merged" else f"{part}/"
        for rec in records:
            vals = {f"{pre}{metric_key(k)}": float(v) for k, v in rec.items() if k != "epoch"}
            mlflow.log_metrics(vals, step=int(rec["epoch"]))


def log_params(config: dict[str, Any]) -> None:
    import mlflow

    flat = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in flatten(config).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[i:i + 100]))


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifacts(paths: Iterable[Path], artifact_path: str | None = None) -> None:
    import mlflow

    for p in paths:
        if Path(p).is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif Path(p).exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)


# -- runs left RUNNING by a killed process ----------------------------------------------------
# Each run cdsr starts carries its owner (host, pid and the pid's start time, so a recycled pid
# is not mistaken for the owner). A process killed with SIGKILL cannot end its runs; the next
# `cdsr tune` / `cdsr benchmark` on the same store ends those whose owner is gone.

def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; the name (field 2) may hold spaces


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the owner of a run (and, in a flow run of a Prefect work
    pool, the worker that started it: ``PREFECT__WORKER_NAME``, set by ``prefect worker start``)."""
    tags = {"cdsr.host": socket.gethostname(), "cdsr.pid": str(os.getpid()),
            "cdsr.pid_start": _proc_start(os.getpid()) or ""}
    if os.environ.get("PREFECT__WORKER_NAME"):
        tags["cdsr.prefect_worker"] = os.environ["PREFECT__WORKER_NAME"]
    return tags


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run (its :func:`owner_tags`) still runs: None when that
    cannot be told from here (another host, or no owner recorded)."""
    if tags.get("cdsr.host") != socket.gethostname() or not str(tags.get("cdsr.pid", "")).isdigit():
        return None
    pid = int(tags["cdsr.pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = _proc_start(pid)
    return start is None or not tags.get("cdsr.pid_start") or start == tags["cdsr.pid_start"]


def reap_dead_runs(experiment_id: str, dead_trials: set[tuple[str, int]] | frozenset = frozenset()) -> list[str]:
    """End the RUNNING runs of an experiment whose owner process is gone: status KILLED and a
    ``cdsr.reaped`` tag saying why. ``dead_trials`` (``(study name, trial number)`` pairs that
    Optuna marked failed by their missing heartbeat) also ends Optuna trial runs owned by
    processes on other hosts. Returns the ended run ids."""
    from mlflow import MlflowClient

    client = MlflowClient()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        alive = owner_alive(tags)
        trial = (tags.get("optuna.study"), int(tags["optuna.trial"])) if str(tags.get("optuna.trial", "")).isdigit() else None
        if alive is False:
            why = f"owner process {tags['cdsr.pid']} on {tags['cdsr.host']} is gone (killed)"
        elif alive is None and trial is not None and trial in dead_trials:
            why = f"Optuna trial {trial[1]} of study {trial[0]} was failed by its missing heartbeat"
        else:
            continue
        client.set_tag(run.info.run_id, "cdsr.reaped", why)
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended
