"""Prefect flow: the champion's top-k for every user of a dataset, to Parquet (batch recommendations).

    cdsr recommend --dataset synthetic [--model models:/cdsr-synthetic@champion] [--k 10] [--out F]

The deployment ``recommend-synthetic`` (prefect.yaml) runs it nightly after the retrain.
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

from pathlib import Path

import cdsr  # noqa: F401
from prefect import flow, task

from cdsr.config import load_params
from cdsr.track import tracking
from cdsr.track.batch import recommend_all


@task(name="recommend", task_run_name="{dataset}:recommend")
def recommend_task(model_uri: str, dataset: str, data_root: str, k: int, out: str,
                   tcfg: tracking.TrackingConfig) -> dict:
    return recommend_all(model_uri, dataset, data_root, k, Path(out), tcfg)


@flow(name="recommend", flow_run_name="recommend-{dataset}")
def recommend_flow(dataset: str, model: str | None = None, k: int = 10, out: str | None = None,
                   params_path: str | None = None, data_root: str = "data") -> dict:
    """Returns the file's metadata (model and data versions, counts, users per second)."""
    params = load_params(params_path)
    tcfg = tracking.tracking_config(params)
    model = model or f"models:/{tracking.registered_model_name(dataset, tcfg)}@champion"
    return recommend_task(model, dataset, data_root, k, out or f"recommendations/{dataset}.parquet", tcfg)
