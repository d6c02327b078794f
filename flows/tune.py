"""Prefect flow: an Optuna study per (dataset, model); logic in ``cdsr.tune``.

    cdsr tune --dataset synthetic --model sasrec --trials 20 [--storage URL] [--worker K] [--worker-trials M]

Several workers (processes, machines) may run this flow on one study (shared ``--storage``,
e.g. PostgreSQL). On a Prefect work pool each flow run of the ``tune-worker`` deployment
(prefect.yaml) is one such worker, its ``worker`` and ``worker_trials`` given per run:

    prefect deployment run tune/tune-worker --param worker=1 --param worker_trials=4 \\
        --param storage=postgresql+psycopg://USER@HOST:PORT/DB
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import contextlib
import os

import cdsr  # noqa: F401
from prefect import flow, task

from cdsr.config import from_dict, load_params
from cdsr.tune import TuneConfig, tune


@task(name="optuna-study", task_run_name="{dataset}:{model}:study")
def study(dataset: str, model: str, params_path: str | None, trials: int | None, storage: str | None, worker: int,
          data_root: str, preset: str | None = None, worker_trials: int | None = None) -> dict:
    params = load_params(params_path)
    cfg = from_dict(TuneConfig, params.get("tune"), "tune")
    return tune(dataset, None if preset else model, params, cfg, trials=trials, storage=storage, worker=worker,
                data_root=data_root, preset=preset, worker_trials=worker_trials)


@flow(name="tune", flow_run_name="tune-{dataset}-w{worker}")
def tune_flow(dataset: str, models: list[str], params_path: str | None = None, trials: int | None = None,
              storage: str | None = None, worker: int = 0, data_root: str = "data",
              presets: list[str] | None = None, worker_trials: int | None = None,
              project_dir: str | None = None) -> dict[str, dict]:
    """One study per model and per preset, in turn (each trial already uses the machine's cores).
    ``trials``: the study's total of finished trials; ``worker_trials``: at most that many trials
    of this worker's own per study. ``project_dir``: where params.yaml, runs/ and tuned/ live (a
    work-pool worker may start the flow elsewhere)."""
    with contextlib.chdir(project_dir or os.curdir):
        out = {m: study(dataset, m, params_path, trials, storage, worker, data_root, worker_trials=worker_trials)
               for m in models}
        out.update({p: study(dataset, p, params_path, trials, storage, worker, data_root, preset=p,
                             worker_trials=worker_trials) for p in presets or []})
    return out
