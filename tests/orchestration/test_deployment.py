"""The scheduled retrain deployment end to end, against a real local Prefect server.

``prefect server start`` on 127.0.0.1 (a free port, its own home and database), then
``python flows/retrain.py serve`` registers the cron deployment and runs its flow runs; the test
triggers a run with ``prefect deployment run`` (as flows/retrain.py documents) and waits for it to
complete: data refresh -> tune (a budget of 1 trial) -> benchmark -> promote, on a tiny synthetic
dataset, every output in tmp_path (MLflow store, Optuna storage, runs, metrics, tuned values).
The same server then takes ``prefect deploy --all`` (prefect.yaml, the work-pool variant). The
server fixture (``prefect_server``) is shared with test_workers.py through conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from servers import base_env as _base_env
from servers import prefect_api as _api
from servers import start, stop, tail

from cdsr.evaluate.results import read_tracked

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

REGISTER_TIMEOUT = 120
RUN_TIMEOUT = 300


def _tiny_params(tmp: Path) -> Path:
    """params.yaml with a tiny 'tiny' dataset, one tiny model and every output under tmp."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = json.loads(json.dumps(params["datasets"]["synthetic"]))
    tiny["generator"].update(users=150, items_per_domain=120)
    tiny["sources"] = [{"format": "ratings-csv-2014", "path": "{data_root}/tiny/raw/*.csv"},
                       {"format": "amazon-review-json", "path": "{data_root}/tiny/raw/*.json.gz"}]
    params["datasets"]["tiny"] = tiny
    params["train"].update(progress=False, batch_size=64)
    params["evaluate"].update(protocols=["full"], max_len=20)
    params["models"]["sasrec"] = {"d": 16, "layers": 1, "heads": 1, "dropout": 0.1, "max_len": 20, "loss": "ce"}
    params["benchmark"].update(methods=["sasrec"], epochs=1, max_workers=1, runs_dir=str(tmp / "runs" / "benchmark"),
                               metrics_dir=str(tmp / "metrics"), plots_dir=str(tmp / "plots"),
                               tuned_dir=str(tmp / "tuned"))
    params["robustness"].update(p=[0.2], inference=["substitute"], train=[])
    params["tune"].update(storage=f"sqlite:///{tmp / 'optuna.db'}", trials=1, epochs=1,
                          runs_dir=str(tmp / "runs" / "tune"), tuned_dir=str(tmp / "tuned"),
                          search_space={"sasrec": {"train.lr": {"low": 0.001, "high": 0.005, "log": True},
                                                   "model.dropout": {"low": 0.0, "high": 0.3}}})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_retrain_deployment_runs_on_a_local_server(prefect_server, tmp_path):
    from prefect.exceptions import ObjectNotFound

    api, server_log = prefect_server
    env = {**_base_env(tmp_path), "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the runner looks for due runs every second, not 10
    params = _tiny_params(tmp_path)
    data_root = tmp_path / "data"
    name = f"retrain-test-{os.getpid()}"
    # a daily schedule half a day away: the scheduler registers runs, none falls due during the test
    cron = f"7 {(datetime.now(UTC).hour + 12) % 24} * * *"
    serve_log = tmp_path / "serve.log"
    serve = start([sys.executable, "flows/retrain.py", "serve", "--dataset", "tiny", "--params", str(params),
                   "--root", str(data_root), "--trials", "1", "--cron", cron, "--name", name], env, serve_log, cwd=ROOT)
    try:
        try:
            # 1. the runner registers the deployment with its cron schedule
            deadline = time.monotonic() + REGISTER_TIMEOUT
            while True:
                assert serve.poll() is None, f"serve exited with {serve.returncode}"
                try:
                    dep = _api(api, lambda c: c.read_deployment_by_name(f"retrain/{name}"))
                    break
                except ObjectNotFound:
                    pass
                assert time.monotonic() < deadline, f"deployment retrain/{name} not registered in {REGISTER_TIMEOUT} s"
                time.sleep(1)
            assert [s.schedule.cron for s in dep.schedules] == [cron]
            assert all(s.active for s in dep.schedules)
            assert dep.parameters["dataset"] == "tiny" and dep.parameters["trials"] == 1
            assert dep.parameters["params_path"] == str(params) and dep.parameters["data_root"] == str(data_root)

            # 2. a run now, as flows/retrain.py documents: `prefect deployment run 'retrain/<name>'`
            res = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"retrain/{name}"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
            ids = UUID.findall(res.stdout)
            assert ids, res.stdout
            run_id = ids[-1]

            # 3. the serving process picks it up and runs it to a final state
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                fr = _api(api, lambda c: c.read_flow_run(run_id))
                if fr.state is not None and fr.state.is_final():
                    break
                assert serve.poll() is None, f"serve exited with {serve.returncode} (run state {fr.state})"
                assert time.monotonic() < deadline, f"flow run still {fr.state} after {RUN_TIMEOUT} s"
                time.sleep(2)
            assert fr.deployment_id == dep.id and fr.parameters == dep.parameters
            assert fr.state.is_completed(), f"flow run ended {fr.state.type.value}: {fr.state.message}"

            # 4. what the run did: data refreshed, 1 trial tuned, sasrec benchmarked and promoted
            _check_outputs(tmp_path, data_root)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- serve log (last lines) ---\n{tail(serve_log)}\n"
                                 f"--- server log (last lines) ---\n{tail(server_log)}") from exc
    finally:
        stop(serve)


def _check_outputs(tmp: Path, data_root: Path) -> None:
    from mlflow import MlflowClient

    assert (data_root / "tiny" / "processed" / "split.parquet").exists()
    tuned = json.loads((tmp / "tuned" / "tiny" / "sasrec.json").read_text())
    assert tuned["study"] == "tiny/sasrec"
    assert tuned["trials"]["COMPLETE"] + tuned["trials"]["PRUNED"] == 1  # the budget: --trials 1
    metrics = read_tracked(tmp / "metrics" / "tiny" / "sasrec.json")  # completed from its run directory
    assert metrics["mlflow_run_id"] and list(metrics["protocols"]) == ["full"]
    assert metrics["protocols"]["full"]["overall"]["n"] > 0 and metrics["robustness"]
    decision = json.loads((tmp / "metrics" / "promotion" / "tiny.runs.json").read_text())  # with the run ids
    assert decision["promoted"] is True and decision["decision"] == "promoted", decision
    assert decision["registered_model"] == "cdsr-tiny" and decision["candidate_method"] == "sasrec"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("cdsr-tiny", "champion")
    assert str(champion.version) == decision["candidate_version"]
    assert champion.run_id == metrics["mlflow_run_id"] == decision["candidate_run_id"]
    # nothing leaked into the project's own outputs
    assert not (ROOT / "metrics" / "tiny").exists() and not (ROOT / "tuned" / "tiny").exists()


def test_prefect_yaml_registers_the_same_schedule_on_a_work_pool(prefect_server, tmp_path):
    """``prefect deploy --all`` (prefect.yaml) against the server: the retrain deployment on the
    cdsr-local pool, with its nightly cron and the pull step into the project directory."""
    api, server_log = prefect_server
    env = {**_base_env(tmp_path), "PREFECT_API_URL": api, "CDSR_PROJECT_DIR": str(ROOT)}
    for cmd in (["work-pool", "create", "cdsr-local", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        res = subprocess.run([str(BIN / "prefect"), *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180, check=False)
        assert res.returncode == 0, f"prefect {' '.join(cmd)}:\n{res.stdout}{res.stderr}\n{tail(server_log)}"
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    dep = _api(api, lambda c: c.read_deployment_by_name(f"retrain/{spec['name']}"))
    assert dep.entrypoint == "flows/retrain.py:retrain" and dep.work_pool_name == "cdsr-local"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [("0 3 * * *", "UTC", True)]
    assert dep.parameters == spec["parameters"] and dep.parameters["trials"] > 0  # tuning is part of the job
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
