"""Prefect flow: an Optuna study per (dataset, model); logic in ``cdsr.tune``.

    cdsr tune --dataset synthetic --model sasrec --trials 20 [--storage URL] [--worker K]

Several workers (processes, machines) may run this flow on one study (shared ``--storage``).
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import cdsr  # noqa: F401
from prefect import flow, task

from cdsr.config import from_dict, load_params
from cdsr.tune import TuneConfig, tune


@task(name="optuna-study", task_run_name="{dataset}:{model}:study")
def study(dataset: str, model: str, params_path: str | None, trials: int | None, storage: str | None, worker: int,
          data_root: str, preset: str | None = None) -> dict:
    params = load_params(params_path)
    cfg = from_dict(TuneConfig, params.get("tune"), "tune")
    return tune(dataset, None if preset else model, params, cfg, trials=trials, storage=storage, worker=worker,
                data_root=data_root, preset=preset)


@flow(name="tune", flow_run_name="tune-{dataset}")
def tune_flow(dataset: str, models: list[str], params_path: str | None = None, trials: int | None = None,
              storage: str | None = None, worker: int = 0, data_root: str = "data",
              presets: list[str] | None = None) -> dict[str, dict]:
    """One study per model and per preset, in turn (each trial already uses the machine's cores)."""
    out = {m: study(dataset, m, params_path, trials, storage, worker, data_root) for m in models}
    out.update({p: study(dataset, p, params_path, trials, storage, worker, data_root, preset=p) for p in presets or []})
    return out
