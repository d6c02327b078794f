"""Work across processes on real engines: Prefect work-pool workers and a PostgreSQL study.

A real Prefect server (conftest.py), the ``cdsr-local`` process pool with the ``tune-worker``
and ``benchmark-method`` deployments of prefect.yaml, and two ``prefect worker start --pool
cdsr-local --limit 1`` processes (one flow run at a time each, one torch thread each), all on
127.0.0.1 and stopped at the end whatever happens:

- two tune-worker flow runs x 2 trials on one Optuna study in a throwaway PostgreSQL cluster;
- a trial of one ``cdsr tune`` worker pruned on the intermediate values of another's;
- the benchmark's methods fanned out as flow runs to the two workers, MLflow shared through an
  ``mlflow server``, against what the thread-pool benchmark writes;
- a worker killed with its flow run mid-trial, recovered by the other worker from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY
from servers import (
    BIN,
    base_env,
    descendants,
    mlflow_server,
    pids_with,
    postgres_cluster,
    postgres_missing,
    prefect_api,
    start,
    stop,
    tail,
)

ROOT = Path(__file__).resolve().parents[2]
POOL = "cdsr-local"
WORKERS = ("cdsr-test-w0", "cdsr-test-w1")
RUN_TIMEOUT = 300


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}{res.stderr}"
    return res


def _online(api: str) -> set[str]:
    async def go(client):
        return await client.read_workers_for_work_pool(POOL)

    return {w.name for w in prefect_api(api, go) if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}


@pytest.fixture(scope="module")
def pool(prefect_server, tmp_path_factory):
    """The process pool, its deployments (prefect.yaml) and two workers of one flow run each;
    yields ``(api_url, env, worker logs)`` once both workers are online."""
    api, server_log = prefect_server
    tmp = tmp_path_factory.mktemp("pool")
    env = {**base_env(tmp), "PREFECT_API_URL": api, "CDSR_PROJECT_DIR": str(ROOT)}
    _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env)
    # only these two: the retrain deployment's schedule has no business on the test's workers
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "tune-worker", "--name", "benchmark-method"], env)
    wenv = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs = [tmp / f"{name}.log" for name in WORKERS]
    procs = []
    try:
        for name, log in zip(WORKERS, logs):
            procs.append(start([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1",
                                "--name", name], wenv, log, cwd=ROOT))
        deadline = time.monotonic() + 120
        while _online(api) != set(WORKERS):
            for p, log in zip(procs, logs):
                assert p.poll() is None, f"worker exited with {p.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"workers not online after 120 s: {_online(api)}\n{tail(server_log)}"
            time.sleep(0.5)
        yield api, env, logs
    finally:
        for p in procs:
            stop(p)


def _deployment_id(api: str, name: str):
    async def go(client):
        return (await client.read_deployment_by_name(name)).id

    return prefect_api(api, go)


def _submit(api: str, deployment: str, parameters: list[dict]) -> list:
    """One flow run of ``deployment`` per parameter set, all scheduled now; their ids."""
    dep = _deployment_id(api, deployment)

    async def go(client):
        return [(await client.create_flow_run_from_deployment(dep, parameters=p)).id for p in parameters]

    return prefect_api(api, go)


def _flow_runs(api: str, ids: list) -> list:
    async def go(client):
        return [await client.read_flow_run(i) for i in ids]

    return prefect_api(api, go)


def _wait_final(api: str, ids: list, logs: list[Path], timeout: float = RUN_TIMEOUT) -> list:
    deadline = time.monotonic() + timeout
    while True:
        runs = _flow_runs(api, ids)
        if all(r.state is not None and r.state.is_final() for r in runs):
            return runs
        assert time.monotonic() < deadline, (f"flow runs not final after {timeout} s: {[str(r.state) for r in runs]}\n"
                                             + "\n".join(tail(log, 40) for log in logs))
        time.sleep(1)


def _tune_params(tmp: Path, storage: str, epochs: int, space: dict, pruner: dict) -> Path:
    """Tiny trials on the 't' dataset; every output (runs, tuned/, MLflow) under ``tmp``."""
    params = {
        "train": {"epochs": epochs, "batch_size": 64, "progress": False, "patience": 10},
        "evaluate": {"protocols": ["full"], "max_len": 20},
        "models": {"sasrec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20}},
        "tune": {"storage": storage, "epochs": epochs, "runs_dir": str(tmp / "runs"), "tuned_dir": str(tmp / "tuned"),
                 "keep_trial_runs": True, "pruner": pruner, "search_space": {"sasrec": space}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "datasets": {"t": TINY},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _mlflow_runs(uri: str, experiment: str, kind: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("cdsr.kind") == kind]


def _skip_without_postgres() -> None:
    why = postgres_missing()
    if why:
        pytest.skip(why)


def test_two_work_pool_workers_share_one_postgresql_study(pool, tmp_path, tiny_root):
    """2 flow runs of tune-worker x 2 trials, one per Prefect worker: 4 distinct completed trials."""
    import optuna

    _skip_without_postgres()
    api, _, logs = pool
    space = {"train.lr": {"low": 0.0005, "high": 0.01, "log": True}, "model.dropout": {"choices": [0.0, 0.1, 0.2, 0.3]}}
    with postgres_cluster("optuna") as storage:
        params = _tune_params(tmp_path, storage, epochs=1, space=space, pruner={"kind": "none"})
        common = {"dataset": "t", "models": ["sasrec"], "params_path": str(params), "trials": 4, "storage": storage,
                  "data_root": str(tiny_root), "worker_trials": 2}
        ids = _submit(api, "tune/tune-worker", [{**common, "worker": k} for k in (0, 1)])
        runs = _wait_final(api, ids, logs)
        for r in runs:
            assert r.state.is_completed(), f"{r.name}: {r.state.type.value} {r.state.message}\n{tail(logs[0])}\n{tail(logs[1])}"
        trials = optuna.load_study(study_name="t/sasrec", storage=storage).get_trials(deepcopy=False)

    # each flow run on a worker of its own (the worker labels its flow run), as each trial records
    by_worker = {r.parameters["worker"]: r.labels["prefect.worker.name"] for r in runs}
    assert sorted(by_worker.values()) == sorted(WORKERS), by_worker
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.number, t.state.name) for t in trials]
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    keys = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(keys)) == 4 and not any("duplicate_of" in t.user_attrs for t in trials), keys
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 1, 1]
    for t in trials:
        assert t.user_attrs["prefect_worker"] == by_worker[t.user_attrs["worker"]]
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # two flow-run processes

    # MLflow: one study run per worker, one nested run per trial, each naming its Prefect worker
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents = _mlflow_runs(uri, "cdsr-t", "tune")
    assert sorted(r.data.tags["optuna.worker"] for r in parents) == ["0", "1"]
    assert {r.data.tags["optuna.worker"]: r.data.tags["cdsr.prefect_worker"] for r in parents} == \
        {str(k): v for k, v in by_worker.items()}
    children = _mlflow_runs(uri, "cdsr-t", "tune-trial")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    assert all(r.info.status == "FINISHED" for r in parents + children)
    best = json.loads((tmp_path / "tuned" / "t" / "sasrec.json").read_text())
    assert best["trials"]["COMPLETE"] == 4 and best["value"] == max(t.value for t in trials)


def test_a_trial_is_pruned_on_another_workers_intermediate_values(prefect_server, tmp_path, tiny_root):
    """Worker 0 completes a trial with a good lr; worker 1 (another process, later) gets a lr that
    does not learn and is pruned at its first epoch by the median of worker 0's values there.
    With no shared study, worker 1 would have no completed trial to compare with (n_startup_trials
    = 1) and would train the trial to the end."""
    import optuna

    from cdsr.config import from_dict
    from cdsr.tune import TuneConfig, open_study

    _skip_without_postgres()
    api, _ = prefect_server
    env = {**base_env(tmp_path), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1"}
    space = {"train.lr": {"choices": [0.01, 1e-6]}, "model.dropout": {"choices": [0.0]}}
    with postgres_cluster("optuna") as storage:
        params = _tune_params(tmp_path, storage, epochs=2, space=space,
                              pruner={"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
        cfg = from_dict(TuneConfig, yaml.safe_load(params.read_text())["tune"], "tune")
        args = ["tune", "--dataset", "t", "--model", "sasrec", "--params", str(params), "--root", str(tiny_root)]
        for worker, lr, total in ((0, 0.01, 1), (1, 1e-6, 2)):
            open_study("t", "sasrec", cfg).enqueue_trial({"train.lr": lr, "model.dropout": 0.0})
            log = tmp_path / f"worker{worker}.log"
            proc = start([str(BIN / "cdsr"), *args, "--trials", str(total), "--worker", str(worker)], env, log, cwd=ROOT)
            try:
                assert proc.wait(timeout=RUN_TIMEOUT) == 0, tail(log)
            finally:
                stop(proc, grace=0)
        trials = optuna.load_study(study_name="t/sasrec", storage=storage).get_trials(deepcopy=False)

    assert [(t.state.name, t.user_attrs["worker"]) for t in trials] == [("COMPLETE", 0), ("PRUNED", 1)]
    first, pruned = trials
    assert first.user_attrs["pid"] != pruned.user_attrs["pid"]  # two processes
    assert pruned.params["train.lr"] == 1e-6 and sorted(pruned.intermediate_values) == [0]
    # what the median pruner compared with at epoch 0: the values other trials reported there, all worker 0's
    others = [t for t in trials if t.number != pruned.number and 0 in t.intermediate_values]
    assert {t.user_attrs["worker"] for t in others} == {0}
    assert pruned.intermediate_values[0] < float(sorted(t.intermediate_values[0] for t in others)[len(others) // 2])
    assert sorted(first.intermediate_values) == [0, 1]  # worker 0's own trial ran to the end


def _bench_params(tmp: Path, tracking_uri: str, metrics_dir: str) -> Path:
    params = {
        "seed": 42,
        "train": {"epochs": 1, "batch_size": 64, "progress": False, "patience": 10},
        "evaluate": {"protocols": ["full"], "max_len": 20},
        "models": {"sasrec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20},
                   "bert4rec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20}},
        "benchmark": {"methods": ["sasrec", "bert4rec"], "epochs": 1, "use_tuned": False,
                      "runs_dir": str(tmp / "runs"), "metrics_dir": str(tmp / metrics_dir),
                      "plots_dir": str(tmp / "plots"), "tuned_dir": str(tmp / "tuned")},
        "robustness": {"p": [0.2], "inference": ["substitute"], "train": []},
        "mlflow": {"tracking_uri": tracking_uri},
        "promote": {"margin": 0.0},
        "datasets": {"t": TINY},
    }
    path = tmp / f"params-{metrics_dir}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_benchmark_methods_fan_out_to_two_work_pool_workers(pool, tmp_path, tiny_root, monkeypatch):
    import mlflow

    from cdsr.config import from_dict
    from cdsr.evaluate.results import read_tracked
    from cdsr.track import tracking
    from cdsr.track.registry import PromoteConfig, promote

    api, env, logs = pool
    with mlflow_server(tmp_path) as (uri, mlflow_log):
        params = _bench_params(tmp_path, uri, "metrics")
        cmd = [str(BIN / "cdsr"), "benchmark", "--dataset", "t", "--params", str(params), "--root", str(tiny_root)]
        log = tmp_path / "benchmark.log"
        proc = start([*cmd, "--executor", "work-pool"], env, log, cwd=ROOT)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            stop(proc, grace=0)
        assert rc == 0, f"{tail(log)}\n{tail(logs[0])}\n{tail(logs[1])}\n{tail(mlflow_log)}"
        out = log.read_text()
        assert "sasrec" in out and "bert4rec" in out and "FAILED" not in out, out

        # one flow run of benchmark-method per method, each on a worker of its own
        dep = _deployment_id(api, "benchmark-method/benchmark-method")

        async def children(client):
            from prefect.client.schemas.filters import (
                DeploymentFilter,
                DeploymentFilterId,
            )

            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep])))

        runs = prefect_api(api, children)
        assert sorted(r.parameters["method"] for r in runs) == ["bert4rec", "sasrec"]
        assert all(r.state.is_completed() for r in runs), [str(r.state) for r in runs]
        on = {r.parameters["method"]: r.labels["prefect.worker.name"] for r in runs}
        assert sorted(on.values()) == sorted(WORKERS), on

        # both metrics files, both MLflow runs in the shared store, under the benchmark's parent run
        metrics = {m: read_tracked(tmp_path / "metrics" / "t" / f"{m}.json") for m in on}
        benchmark_runs = {r.data.tags["method"]: r for r in _mlflow_runs(uri, "cdsr-t", "benchmark")}
        (parent,) = _mlflow_runs(uri, "cdsr-t", "benchmark-parent")
        assert sorted(benchmark_runs) == ["bert4rec", "sasrec"]
        for m, r in benchmark_runs.items():
            assert r.info.run_id == metrics[m]["mlflow_run_id"] and r.info.status == "FINISHED"
            assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert r.data.tags["cdsr.prefect_worker"] == on[m]

        # the threaded benchmark on the same inputs reuses those runs and writes the same metrics files
        threaded = _bench_params(tmp_path, uri, "metrics-threads")
        _run([*cmd[:4], "--params", str(threaded), *cmd[6:]], env, timeout=RUN_TIMEOUT)
        for m in on:
            assert (tmp_path / "metrics-threads" / "t" / f"{m}.json").read_bytes() == \
                (tmp_path / "metrics" / "t" / f"{m}.json").read_bytes()

        # promotion reads them from the tracking server as it reads the threaded path's
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store of params.yaml, the server
        p = yaml.safe_load(params.read_text())
        before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        try:
            decision = promote("t", from_dict(PromoteConfig, p["promote"], "promote"), tmp_path / "metrics",
                               tiny_root, tracking.tracking_config(p))
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])
        assert decision["promoted"] is True, decision
        assert {c["run_id"] for c in decision["candidates"]} == {r.info.run_id for r in benchmark_runs.values()}
        assert decision["candidate_run_id"] in {r.info.run_id for r in benchmark_runs.values()}


def test_a_killed_work_pool_worker_is_recovered(pool, tmp_path, tiny_root):
    """kill -9 of the Prefect worker running a tuning flow run (the worker and its flow-run
    process: a crashed machine). A new flow run of the same Optuna worker, taken by the surviving
    Prefect worker, finds the dead trial failed by its heartbeat and retries it from its checkpoint.
    Runs last: it leaves the pool with one worker."""
    import optuna
    import torch

    _skip_without_postgres()
    api, _, logs = pool
    space = {"train.lr": {"low": 0.001, "high": 0.01, "log": True}}
    with postgres_cluster("optuna") as storage:
        params = _tune_params(tmp_path, storage, epochs=30, space=space, pruner={"kind": "none"})
        p = yaml.safe_load(params.read_text())
        p["tune"].update(heartbeat_interval=1, grace_period=2)
        p["train"]["patience"] = 100
        params.write_text(yaml.safe_dump(p, sort_keys=False))
        run = {"dataset": "t", "models": ["sasrec"], "params_path": str(params), "trials": 1, "storage": storage,
               "data_root": str(tiny_root), "worker": 1}
        (first,) = _submit(api, "tune/tune-worker", [run])
        trial_dir = tmp_path / "runs" / "t" / "sasrec" / "trial-0"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (trial_dir / "last.pt").exists():
            assert time.monotonic() < deadline, "no checkpoint\n" + "\n".join(tail(log) for log in logs)
            time.sleep(0.2)
        (fr,) = _flow_runs(api, [first])
        victim = fr.labels["prefect.worker.name"]
        (worker_pid,) = pids_with(f"--name {victim}")
        for pid in [worker_pid, *descendants(worker_pid)]:  # the worker and the flow run it started
            os.kill(pid, signal.SIGKILL)
        study = optuna.load_study(study_name="t/sasrec", storage=storage)
        assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["RUNNING"]
        done = torch.load(trial_dir / "last.pt", weights_only=True)["state"]["epoch"]

        # recovery: the same Optuna worker again, now with 2 more epochs than checkpointed
        p["tune"]["epochs"] = p["train"]["epochs"] = done + 2
        params.write_text(yaml.safe_dump(p, sort_keys=False))
        time.sleep(2.5)  # past the heartbeat's grace period
        (again,) = _wait_final(api, _submit(api, "tune/tune-worker", [run]), logs)
        assert again.state.is_completed(), f"{again.state.message}\n" + "\n".join(tail(log) for log in logs)
        assert again.labels["prefect.worker.name"] != victim
        trials = optuna.load_study(study_name="t/sasrec", storage=storage).get_trials(deepcopy=False)

    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], [(t.number, t.state.name) for t in trials]
    retry = trials[1]
    assert retry.system_attrs.get("failed_trial") == 0 and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == str(trial_dir)
    assert sorted(retry.intermediate_values) == [done, done + 1]  # resumed from the checkpoint, not restarted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dead = [r for r in _mlflow_runs(uri, "cdsr-t", "tune-trial") + _mlflow_runs(uri, "cdsr-t", "tune")
            if "cdsr.reaped" in r.data.tags]
    assert sorted(r.data.tags["cdsr.kind"] for r in dead) == ["tune", "tune-trial"]  # ended by the new run
