"""Prefect flow + deployment: data refresh -> tune (budgeted) -> benchmark -> promote.

The scheduled retraining job. Serve it (registers a cron deployment on the Prefect API in
``PREFECT_API_URL`` and runs its runs in subprocesses of this process):

    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python flows/retrain.py serve --dataset synthetic --cron "0 3 * * *"
    prefect deployment run 'retrain/retrain-synthetic'        # a run now, besides the schedule

or deploy it to a work pool with ``prefect deploy`` (``prefect.yaml`` at the project root).
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import cdsr  # noqa: F401
from prefect import flow

from flows.benchmark import run_benchmark
from flows.data import data_build
from flows.promote import promote_flow
from flows.tune import tune_flow

from cdsr import benchmark as bm
from cdsr.config import from_dict, load_params


@flow(name="retrain", flow_run_name="retrain-{dataset}")
def retrain(dataset: str = "synthetic", params_path: str | None = None, data_root: str = "data",
            trials: int = 5, methods: list[str] | None = None, project_dir: str | None = None) -> dict:
    """``trials``: the tuning budget per model this run adds (0 skips tuning). ``project_dir``:
    where params.yaml, runs/ and metrics/ live (the runner may start the flow elsewhere); the
    flow runs there and gives the caller its working directory back."""
    with contextlib.chdir(project_dir or os.curdir):
        return _pipeline(dataset, params_path, data_root, trials, methods)


def _pipeline(dataset: str, params_path: str | None, data_root: str, trials: int, methods: list[str] | None) -> dict:
    data = data_build([dataset], params_path=params_path, data_root=data_root)
    params = load_params(params_path)
    cfg = bm.benchmark_config(params, methods)
    chosen = cfg.methods
    tuned = {}
    if trials > 0:
        models = sorted({bm.parse_method(m)[0] for m in chosen if bm.parse_method(m)[1] == "merged"})
        from optuna.trial import TrialState
        from cdsr.tune import TuneConfig, open_study

        tcfg = from_dict(TuneConfig, params.get("tune"), "tune")
        for m in models:  # the budget is per run: the study's target grows by `trials`
            study = open_study(dataset, m, tcfg)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
            tuned[m] = tune_flow(dataset, [m], params_path, trials=done + trials, data_root=data_root)[m]
    bench = run_benchmark(dataset, params_path, data_root, chosen, command="retrain flow")
    decision = promote_flow(dataset, params_path, str(cfg.metrics_dir), data_root,
                            out=str(Path(cfg.metrics_dir) / "promotion" / f"{dataset}.json"))
    return {"data": data[dataset]["ok"], "tuned": tuned, "benchmark": bench, "promotion": decision}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve the scheduled retrain deployment.")
    ap.add_argument("command", choices=["serve", "run"])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--params", default=None)
    ap.add_argument("--root", default="data")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--cron", default="0 3 * * *", help="Schedule (cron, server time zone).")
    ap.add_argument("--name", default=None, help="Deployment name (default retrain-<dataset>).")
    a = ap.parse_args(argv)
    kwargs = {"dataset": a.dataset, "params_path": a.params, "data_root": a.root, "trials": a.trials,
              "project_dir": str(Path.cwd())}
    if a.command == "run":
        print(retrain(**kwargs))
        return
    retrain.serve(name=a.name or f"retrain-{a.dataset}", cron=a.cron, parameters=kwargs,
                  description="Nightly: data refresh -> tune (budgeted) -> benchmark -> promote")


if __name__ == "__main__":
    main()
