"""Prefect flow: build declared datasets (ingest -> validate -> sequences -> split).

Thin: each task is one stage function of ``cdsr.data.build`` (the same ones `dvc repro` and
`cdsr data build` run). Datasets are built concurrently, stages in order within a dataset.

    python flows/data.py synthetic amazon-food-kitchen-benchmark
"""

# ruff: noqa: I001  (cdsr sets the offline environment before prefect is imported)
from __future__ import annotations

import sys

import cdsr  # noqa: F401  (offline settings before prefect is imported)
from prefect import flow, task

from cdsr.config import load_params
from cdsr.data.build import STAGES, summarise
from cdsr.data.config import dataset_config


@task(name="data-stage", task_run_name="{dataset}:{stage}")
def run_stage(dataset: str, stage: str, params_path: str | None, data_root: str) -> dict:
    cfg = dataset_config(load_params(params_path), dataset)
    result = STAGES[stage](cfg, data_root)
    print(f"[{dataset}] {stage}: {summarise(stage, result)}")
    return result


@flow(name="data-build")
def data_build(datasets: list[str], params_path: str | None = None, data_root: str = "data") -> dict[str, dict]:
    """Build each dataset; one failing dataset does not stop the others (its error is returned)."""
    params = load_params(params_path)
    futures = {}
    for name in datasets:
        cfg = dataset_config(params, name)
        order = (["generate"] if cfg.generator is not None else []) + ["ingest", "validate", "sequences", "split"]
        prev = None
        for stage in order:
            prev = run_stage.submit(name, stage, params_path, data_root, wait_for=[prev] if prev else None)
        futures[name] = prev
    out = {}
    for name, fut in futures.items():
        try:
            out[name] = {"ok": True, "split": fut.result()}
        except Exception as exc:  # noqa: BLE001 -- reported per dataset; the flow fails below
            out[name] = {"ok": False, "error": str(exc)}
    failed = [n for n, r in out.items() if not r["ok"]]
    if failed:
        raise RuntimeError(f"data build failed for {failed}: " + "; ".join(out[n]["error"] for n in failed))
    return out


if __name__ == "__main__":
    data_build(sys.argv[1:] or ["synthetic"])
