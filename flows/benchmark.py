"""Prefect flow: benchmark every method of params.yaml on one dataset.

One branch per method, train -> evaluate -> robustness -> track, each a Prefect task; branches
run concurrently on a thread pool sized to the machine (``benchmark.max_workers``; torch's
intra-op threads are split between them). A failing method does not stop the others: their
results are written, then the flow fails naming the method. Logic lives in ``cdsr.benchmark``.

    python flows/benchmark.py --dataset synthetic          (what `dvc repro` runs: cdsr benchmark)
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import argparse
import os
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


@flow(name="benchmark", flow_run_name="benchmark-{dataset}")
def benchmark(dataset: str, params_path: str | None = None, data_root: str = "data",
              methods: list[str] | None = None, command: str = "cdsr benchmark") -> dict[str, dict]:
    """Returns ``{method: {"ok": True, "metrics": path} | {"ok": False, "error": message}}``."""
    import mlflow

    params = load_params(params_path)
    cfg = bm.benchmark_config(params, methods)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // bm.workers(cfg)))
    tcfg = tracking.tracking_config(params)
    tracking.setup(tcfg)
    tracking.reap_dead_runs(tracking.use_experiment(dataset, tcfg))  # runs a killed benchmark left RUNNING
    with bm._MLFLOW_LOCK:
        parent = mlflow.start_run(run_name=f"benchmark/{dataset}",
                                  tags={"dataset": dataset, "cdsr.kind": "benchmark-parent",
                                        "git_commit": tracking.git_commit(), "methods": ",".join(cfg.methods),
                                        **tracking.owner_tags()})
        mlflow.end_run()
    results: dict[str, dict] = {}
    futures = {m: _branch(dataset, m, params, cfg, data_root, parent.info.run_id, command) for m in cfg.methods}
    for m, branch in futures.items():
        results[m] = {"ok": True, "metrics": str(Path(cfg.metrics_dir) / dataset / f"{m}.json")}
        for fut in branch:  # in order, so the error reported is the first step that failed
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 -- one failure is reported, the others are kept
                results[m] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                break
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    if failed and cfg.fail_on_error:
        raise RuntimeError(f"benchmark of {dataset}: {len(failed)} method(s) failed: {failed}")
    return results


def run_benchmark(dataset: str, params_path: str | None = None, data_root: str = "data",
                  methods: list[str] | None = None, command: str = "cdsr benchmark") -> dict[str, dict]:
    """Run the flow with a thread pool of ``benchmark.max_workers`` branches."""
    cfg = bm.benchmark_config(load_params(params_path), methods)
    runner = ThreadPoolTaskRunner(max_workers=bm.workers(cfg))
    return benchmark.with_options(task_runner=runner)(dataset, params_path, data_root, methods, command)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--params", default=None)
    ap.add_argument("--root", default="data")
    ap.add_argument("--method", action="append", default=None)
    a = ap.parse_args(argv)
    try:
        declared_dataset(load_params(a.params), a.dataset)
    except ConfigError as exc:
        ap.error(str(exc))
    start_temporary_server()  # ended by the kernel if this process is killed
    run_benchmark(a.dataset, a.params, a.root, a.method, command="python flows/benchmark.py")


if __name__ == "__main__":
    main()
