"""Prefect flow: benchmark every method of params.yaml on one dataset.

One branch per method, train -> evaluate -> robustness -> track, each a Prefect task. A failing
method does not stop the others: their results are written, then the flow fails naming the
method. Logic lives in ``cdsr.benchmark``. Where the branches run (``executor``):

- ``threads`` (the default, what `dvc repro` runs): concurrently on a thread pool sized to the
  machine (``benchmark.max_workers``; torch's intra-op threads are split between them);
- ``work-pool``: one flow run per method of the ``benchmark-method`` deployment (prefect.yaml,
  :func:`benchmark_method`), picked up by whichever ``prefect worker start --pool cdsr-local``
  is free, on this machine or another; this flow waits for them all and gathers their results.
  The workers need ``PREFECT_API_URL`` (a Prefect server, not a temporary one), one MLflow store
  (``MLFLOW_TRACKING_URI`` / ``mlflow.tracking_uri``: an ``mlflow server`` or a PostgreSQL
  backend, not a sqlite file, across machines) and the project directory at the same path
  (runs/, metrics/, plots/ and the data are files: on several machines, a shared filesystem).

Why a work pool and not a Ray or Dask task runner (prefect-ray, prefect-dask): no new dependency
or cluster to run; the same workers run tuning (the ``tune-worker`` deployment) and retraining;
a method is a whole process (its own torch threads and memory, a crash or OOM takes no other
method with it, and a killed worker's flow run is visible as such in Prefect); one worker per
machine is the only set-up a machine needs. Task runners pay off for many small tasks sharing
memory; a benchmark branch is minutes of training that shares nothing but files and the MLflow
store.

    python flows/benchmark.py --dataset synthetic          (what `dvc repro` runs: cdsr benchmark)
    cdsr benchmark --dataset synthetic --executor work-pool (PREFECT_API_URL set, workers started)
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import cdsr  # noqa: F401  (offline settings before prefect is imported)
import torch
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from cdsr import benchmark as bm
from cdsr.config import ConfigError, declared_dataset, load_params
from cdsr.orchestrate import start_temporary_server
from cdsr.track import tracking


@task(name="train", task_run_name="{dataset}:{method}:train", retries=1, retry_delay_seconds=2)
def train(dataset: str, method: str, params: dict, cfg: bm.BenchmarkConfig, data_root: str) -> str:
    # a retry resumes from the last checkpoint (transient failures: out of memory, a full disk freed)
    return bm.train_step(dataset, method, params, cfg, data_root)


@task(name="evaluate", task_run_name="{dataset}:{method}:evaluate")
def evaluate(dataset: str, method: str, run: str) -> dict:
    return bm.evaluate_step(run)


@task(name="robustness", task_run_name="{dataset}:{method}:robustness")
def robustness(dataset: str, method: str, run: str, params: dict, cfg: bm.BenchmarkConfig, data_root: str) -> list:
    return bm.robustness_step(dataset, method, run, params, cfg, data_root)


@task(name="track", task_run_name="{dataset}:{method}:track", retries=2, retry_delay_seconds=1)
def track(dataset: str, method: str, run: str, rob: list | None, params: dict, cfg: bm.BenchmarkConfig,
          data_root: str, parent: str | None, command: str) -> dict:
    # retried: a busy sqlite store ("database is locked") clears up
    return bm.track_step(dataset, method, run, rob, params, cfg, data_root, parent, command)


def _branch(dataset, method, params, cfg, data_root, parent, command):
    run = train.submit(dataset, method, params, cfg, data_root)
    ev = evaluate.submit(dataset, method, run)
    rob = robustness.submit(dataset, method, run, params, cfg, data_root, wait_for=[ev]) if cfg.robustness else None
    tr = track.submit(dataset, method, run, rob, params, cfg, data_root, parent, command, wait_for=[ev])
    return [f for f in (run, ev, rob, tr) if f is not None]


EXECUTORS = ("threads", "work-pool")
METHOD_DEPLOYMENT = "benchmark-method/benchmark-method"  # <flow name>/<deployment name> (prefect.yaml)
POLL_SECONDS = 2.0


def _metrics_path(cfg: bm.BenchmarkConfig, dataset: str, method: str) -> str:
    return str(Path(cfg.metrics_dir) / dataset / f"{method}.json")


def _outcome(branch: list, metrics: str) -> dict:
    """``{"ok": True, "metrics": path}``, or the first failed step's error."""
    for fut in branch:  # in order, so the error reported is the first step that failed
        try:
            fut.result()
        except Exception as exc:  # noqa: BLE001 -- one failure is reported, the others are kept
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "metrics": metrics}


def _parent_run(dataset: str, params: dict, cfg: bm.BenchmarkConfig) -> str:
    """The benchmark's MLflow parent run (ended at once: the methods' runs name it as parent)."""
    import mlflow

    tcfg = tracking.tracking_config(params)
    tracking.setup(tcfg)
    tracking.reap_dead_runs(tracking.use_experiment(dataset, tcfg))  # runs a killed benchmark left RUNNING
    with bm._MLFLOW_LOCK:
        parent = mlflow.start_run(run_name=f"benchmark/{dataset}",
                                  tags={"dataset": dataset, "cdsr.kind": "benchmark-parent",
                                        "git_commit": tracking.git_commit(), "methods": ",".join(cfg.methods),
                                        **tracking.owner_tags()})
        mlflow.end_run()
    return parent.info.run_id


@flow(name="benchmark", flow_run_name="benchmark-{dataset}")
def benchmark(dataset: str, params_path: str | None = None, data_root: str = "data",
              methods: list[str] | None = None, command: str = "cdsr benchmark", executor: str = "threads",
              deployment: str = METHOD_DEPLOYMENT) -> dict[str, dict]:
    """Returns ``{method: {"ok": True, "metrics": path} | {"ok": False, "error": message}}``."""
    params = load_params(params_path)
    cfg = bm.benchmark_config(params, methods)
    ok, why = tracking.validation_passed(dataset, data_root)
    if cfg.require_validation and not ok:
        raise RuntimeError(f"benchmark of {dataset}: data validation failed ({why}); nothing is trained and the "
                           "champion stays (rejected rows: the build's quarantine; benchmark.require_validation)")
    parent = _parent_run(dataset, params, cfg)
    if executor == "work-pool":
        results = _fan_out(dataset, params_path, data_root, cfg, parent, command, deployment)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // bm.workers(cfg)))
        futures = {m: _branch(dataset, m, params, cfg, data_root, parent, command) for m in cfg.methods}
        results = {m: _outcome(branch, _metrics_path(cfg, dataset, m)) for m, branch in futures.items()}
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    if failed and cfg.fail_on_error:
        raise RuntimeError(f"benchmark of {dataset}: {len(failed)} method(s) failed: {failed}")
    return results


@flow(name="benchmark-method", flow_run_name="benchmark-{dataset}-{method}")
def benchmark_method(dataset: str, method: str, params_path: str | None = None, data_root: str = "data",
                     parent_run_id: str | None = None, command: str = "cdsr benchmark",
                     project_dir: str | None = None) -> dict:
    """One method's branch (train -> evaluate -> robustness -> track) as a flow run of its own: the
    ``benchmark-method`` deployment, which :func:`benchmark` runs per method on a work pool.
    ``project_dir``: where params.yaml, runs/ and metrics/ live (the worker may start the flow
    elsewhere). Fails if the branch failed; returns ``{"ok": True, "metrics": path}``."""
    with contextlib.chdir(project_dir or os.curdir):
        params = load_params(params_path)
        cfg = bm.benchmark_config(params, [method])
        out = _outcome(_branch(dataset, method, params, cfg, data_root, parent_run_id, command),
                       _metrics_path(cfg, dataset, method))
    if not out["ok"]:
        raise RuntimeError(f"benchmark of {dataset}: {method} failed: {out['error']}")
    return out


def _fan_out(dataset: str, params_path: str | None, data_root: str, cfg: bm.BenchmarkConfig, parent: str,
             command: str, deployment: str) -> dict[str, dict]:
    """One flow run of ``deployment`` per method (all submitted at once, as subflow runs of this
    one), then wait until each is final. Paths go absolute: the workers start elsewhere."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    base = {"dataset": dataset, "params_path": str(Path(params_path).resolve()) if params_path else None,
            "data_root": str(Path(data_root).resolve()), "parent_run_id": parent, "command": command,
            "project_dir": str(Path.cwd())}
    pending = {m: run_deployment(deployment, parameters={**base, "method": m}, timeout=0).id for m in cfg.methods}
    final = {}
    with get_client(sync_client=True) as client:
        while pending:
            for m, run_id in list(pending.items()):
                fr = client.read_flow_run(run_id)
                if fr.state is not None and fr.state.is_final():
                    final[m] = fr
                    del pending[m]
            if pending:
                time.sleep(POLL_SECONDS)
    return {m: {"ok": True, "metrics": _metrics_path(cfg, dataset, m)} if fr.state.is_completed()
            else {"ok": False, "error": f"flow run {fr.name} ({fr.id}) {fr.state.name}: {fr.state.message}"}
            for m, fr in ((m, final[m]) for m in cfg.methods)}


def run_benchmark(dataset: str, params_path: str | None = None, data_root: str = "data",
                  methods: list[str] | None = None, command: str = "cdsr benchmark", executor: str = "threads",
                  deployment: str = METHOD_DEPLOYMENT) -> dict[str, dict]:
    """Run the flow: its branches on a thread pool of ``benchmark.max_workers``, or (``executor``
    ``work-pool``) as flow runs of ``deployment`` on its work pool (needs ``PREFECT_API_URL``)."""
    from prefect.settings import PREFECT_API_URL

    if executor not in EXECUTORS:
        raise ConfigError(f"benchmark executor '{executor}': expected one of {list(EXECUTORS)}")
    if executor == "work-pool" and not PREFECT_API_URL.value():
        raise ConfigError("the work-pool executor needs PREFECT_API_URL: the Prefect server its workers poll")
    cfg = bm.benchmark_config(load_params(params_path), methods)
    runner = ThreadPoolTaskRunner(max_workers=bm.workers(cfg))
    return benchmark.with_options(task_runner=runner)(dataset, params_path, data_root, methods, command, executor,
                                                      deployment)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--params", default=None)
    ap.add_argument("--root", default="data")
    ap.add_argument("--method", action="append", default=None)
    ap.add_argument("--executor", choices=EXECUTORS, default="threads")
    ap.add_argument("--deployment", default=METHOD_DEPLOYMENT, help="The per-method deployment (work-pool executor).")
    a = ap.parse_args(argv)
    try:
        declared_dataset(load_params(a.params), a.dataset)
    except ConfigError as exc:
        ap.error(str(exc))
    start_temporary_server()  # ended by the kernel if this process is killed
    run_benchmark(a.dataset, a.params, a.root, a.method, command="python flows/benchmark.py", executor=a.executor,
                  deployment=a.deployment)


if __name__ == "__main__":
    main()
