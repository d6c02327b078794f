"""Prefect flow: gated promotion of the best benchmark model to ``cdsr-<dataset>@champion``.

    cdsr promote --dataset synthetic        (the `register` stage of dvc.yaml)
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import json
from pathlib import Path

import cdsr  # noqa: F401
from prefect import flow, task

from cdsr.config import from_dict, load_params
from cdsr.evaluate.protocols import EvalConfig
from cdsr.track import tracking
from cdsr.track.registry import PromoteConfig, promote


@task(name="promote", task_run_name="{dataset}:promote", retries=2, retry_delay_seconds=1)
def promote_task(dataset: str, cfg: PromoteConfig, tcfg: tracking.TrackingConfig, metrics_dir: str,
                 data_root: str, eval_cfg: EvalConfig) -> dict:
    # retried: a busy sqlite store ("database is locked") clears up; the decision is idempotent
    return promote(dataset, cfg, Path(metrics_dir), data_root, tcfg, eval_cfg)


@flow(name="promote", flow_run_name="promote-{dataset}")
def promote_flow(dataset: str, params_path: str | None = None, metrics_dir: str = "metrics", data_root: str = "data",
                 out: str | None = None) -> dict:
    """Returns the decision; ``out`` also writes it as JSON (DVC metrics of the register stage).
    A bad ``promote:`` / ``mlflow:`` section fails here, before the (retried) task."""
    params = load_params(params_path)
    cfg = from_dict(PromoteConfig, params.get("promote"), "promote")
    tcfg = tracking.tracking_config(params)
    eval_cfg = from_dict(EvalConfig, params.get("evaluate"), "evaluate")  # how a champion is re-scored
    decision = promote_task(dataset, cfg, tcfg, metrics_dir, data_root, eval_cfg)
    if out:
        write_decision(decision, Path(out))
    return decision


def write_decision(decision: dict, out: Path) -> None:
    """``out``: the decision without MLflow run ids (random per tracking store), so the register
    stage's DVC metrics repeat from a clean clone; ``<out>.runs.json`` (no DVC output): all of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stable = {k: v for k, v in decision.items() if k not in ("candidate_run_id", "champion_rescore_run_id")}
    if "candidates" in stable:
        stable["candidates"] = [{k: v for k, v in c.items() if k != "run_id"} for c in stable["candidates"]]
    out.write_text(json.dumps(stable, indent=2) + "\n")
    out.with_suffix(".runs.json").write_text(json.dumps(decision, indent=2) + "\n")
