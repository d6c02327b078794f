"""Optuna tuning (`cdsr.tune`, `cdsr tune`): budget, pruning, duplicates, nested MLflow runs,
tuned parameters picked up by the benchmark, two concurrent workers, resume after a kill."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY
from servers import (
    free_port,
    postgres_cluster,
    postgres_missing,
    start,
    stop,
    wait_http,
)

from cdsr.config import ConfigError, from_dict
from cdsr.tune import TuneConfig, open_study, tune

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CDSR = BIN / "cdsr"
SPACE = {"train.lr": {"low": 0.0005, "high": 0.01, "log": True}, "model.dropout": {"choices": [0.0, 0.1, 0.2, 0.3]}}
FINISHED = ("COMPLETE", "PRUNED")
EPOCHS = 2  # per trial (a trial on 't' costs about a second an epoch on 2 cores)


def make_params(tmp: Path, prefix: str, epochs: int = EPOCHS, space: dict | None = None, **tune_extra) -> dict:
    """Tiny trials on the 't' dataset; every output (runs, tuned/, stores) under ``tmp``."""
    return {
        "train": {"epochs": epochs, "batch_size": 64, "progress": False, "patience": 10},
        "evaluate": {"protocols": ["full"], "max_len": 20},
        "models": {"sasrec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20}},
        "tune": {"storage": f"sqlite:///{tmp}/optuna.db", "trials": 3, "epochs": epochs,
                 "runs_dir": str(tmp / "runs"), "tuned_dir": str(tmp / "tuned"),
                 "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
                 "search_space": {"sasrec": copy.deepcopy(space or SPACE)}, **tune_extra},
        # an experiment per test: the MLflow store is shared by the module (its creation costs seconds)
        "mlflow": {"experiment_prefix": prefix},
        "datasets": {"t": TINY},  # the CLI takes declared dataset names only
    }


def tune_cfg(params: dict) -> TuneConfig:
    return from_dict(TuneConfig, params["tune"], "tune")


def load_study(params: dict):
    import optuna

    return optuna.load_study(study_name="t/sasrec", storage=params["tune"]["storage"])


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def mlflow_runs(prefix: str):
    """(parent tune runs, trial runs) of the experiment ``<prefix>-t``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(f"{prefix}-t")
    assert exp is not None, f"no MLflow experiment {prefix}-t"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cdsr.kind") == "tune"]
    trials = [r for r in runs if r.data.tags.get("cdsr.kind") == "tune-trial"]
    return client, parents, trials


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One MLflow sqlite store for the module, through $MLFLOW_TRACKING_URI (what the CLI reads too)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
    mlflow.set_tracking_uri(before)
    mlflow.set_registry_uri(before)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_root, mlflow_store):
    """A 3-trial study tuned in-process (shared by the result and budget tests)."""
    tmp = tmp_path_factory.mktemp("tune")
    params = make_params(tmp, "tune1")
    best = tune("t", "sasrec", params, tune_cfg(params), trials=3, data_root=tiny_root)
    return tmp, params, best


def test_tune_writes_the_best_trial_logs_nested_runs_and_feeds_the_benchmark(tuned):
    from cdsr.benchmark import BenchmarkConfig, method_params

    tmp, params, best = tuned
    study = load_study(params)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and all(t.state.name in FINISHED for t in trials), states(study)
    bt = study.best_trial
    assert bt.state.name == "COMPLETE"

    # tuned/<dataset>/<model>.json is the study's best trial
    written = json.loads((tmp / "tuned" / "t" / "sasrec.json").read_text())
    assert written == {k: v for k, v in best.items() if k != "path"}
    assert (written["trial"], written["value"], written["params"]) == (bt.number, bt.value, bt.params)
    assert written["study"] == "t/sasrec" and sum(written["trials"].values()) == 3
    assert set(bt.params) == {"train.lr", "model.dropout"}
    assert 0.0005 <= bt.params["train.lr"] <= 0.01 and bt.params["model.dropout"] in (0.0, 0.1, 0.2, 0.3)

    # only the best trial's run directory is kept
    runs = tmp / "runs" / "t" / "sasrec"
    assert written["run_dir"] == str(runs / f"trial-{bt.number}")
    assert sorted(p.name for p in runs.iterdir()) == [f"trial-{bt.number}"]
    kept = runs / f"trial-{bt.number}"
    assert (kept / "best.pt").exists() and (kept / "metrics.json").exists()
    cfg = json.loads((kept / "config.json").read_text())
    assert cfg["train"]["lr"] == bt.params["train.lr"]
    assert cfg["model_config"]["dropout"] == bt.params["model.dropout"]
    assert cfg["train"]["epochs"] == EPOCHS

    # one parent run, one nested run per trial, with its params and per-epoch validation metric
    client, parents, children = mlflow_runs("tune1")
    assert len(parents) == 1 and parents[0].info.run_name == "tune/t/sasrec"
    parent = parents[0]
    assert parent.data.metrics["best_value"] == pytest.approx(bt.value)
    assert len(children) == 3
    by_number = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert set(by_number) == {t.number for t in trials}
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == f"trial-{t.number}"
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
        assert float(run.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
        assert float(run.data.params["model.dropout"]) == t.params["model.dropout"]
        hist = client.get_metric_history(run.info.run_id, "val_NDCG_10")
        assert sorted(m.step for m in hist) == sorted(t.intermediate_values)
        assert {m.step: m.value for m in hist} == pytest.approx(t.intermediate_values)
        if t.state.name == "COMPLETE":
            assert sorted(t.intermediate_values) == list(range(EPOCHS))  # trial.report after every epoch
            assert run.data.metrics["val_metric"] == pytest.approx(t.value)

    # the benchmark applies the tuned values
    p = method_params(params, BenchmarkConfig(tuned_dir=str(tmp / "tuned")), "t", "sasrec")
    assert p["train"]["lr"] == bt.params["train.lr"]
    assert p["models"]["sasrec"]["dropout"] == bt.params["model.dropout"]
    assert p["models"]["sasrec"]["d"] == 16  # untouched values stay
    untuned = method_params(params, BenchmarkConfig(tuned_dir=str(tmp / "nothing")), "t", "sasrec")
    assert "lr" not in untuned["train"]


def test_trials_is_the_study_total_across_calls(tuned, tiny_root):
    tmp, params, _ = tuned
    cfg = tune_cfg(params)
    tune("t", "sasrec", params, cfg, trials=3, data_root=tiny_root)  # budget already reached
    study = load_study(params)
    assert len(study.get_trials(deepcopy=False)) == 3
    best = tune("t", "sasrec", params, cfg, trials=4, data_root=tiny_root)  # exactly one more
    study = load_study(params)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state.name in FINISHED for t in trials), states(study)
    assert best["trial"] == study.best_trial.number and best["trials"]["COMPLETE"] + best["trials"]["PRUNED"] == 4
    assert json.loads((tmp / "tuned" / "t" / "sasrec.json").read_text()) == {k: v for k, v in best.items() if k != "path"}
    runs = tmp / "runs" / "t" / "sasrec"
    assert sorted(p.name for p in runs.iterdir()) == [f"trial-{best['trial']}"]
    _, parents, children = mlflow_runs("tune1")
    assert len(parents) == 3 and len(children) == 4  # one parent per call, one nested run per trial


def test_median_pruner_prunes_and_duplicates_are_not_trained(tmp_path, tiny_root, mlflow_store):
    import optuna

    # deterministic order through enqueued trials: a good lr, a useless one, the good one again
    space = {"train.lr": {"choices": [0.01, 1e-6]}, "model.dropout": {"choices": [0.0]}}
    params = make_params(tmp_path, "tune3", space=space)
    cfg = tune_cfg(params)
    study = open_study("t", "sasrec", cfg)
    for lr in (0.01, 1e-6, 0.01):
        study.enqueue_trial({"train.lr": lr, "model.dropout": 0.0})
    best = tune("t", "sasrec", params, cfg, trials=3, data_root=tiny_root)

    t0, t1, t2 = load_study(params).get_trials(deepcopy=False)
    assert t0.state == optuna.trial.TrialState.COMPLETE and sorted(t0.intermediate_values) == list(range(EPOCHS))
    # lr 1e-6 does not learn: below the completed trial's median at its first epoch, pruned there
    assert t1.state == optuna.trial.TrialState.PRUNED and t1.params["train.lr"] == 1e-6
    assert sorted(t1.intermediate_values) == [0]
    assert t1.intermediate_values[0] < t0.intermediate_values[0]
    # same parameters as trial 0: its value is reused, nothing is trained
    assert t2.state == optuna.trial.TrialState.COMPLETE and t2.user_attrs["duplicate_of"] == 0
    assert t2.value == t0.value and t2.intermediate_values == {}
    assert best["value"] == t0.value and best["run_dir"] == str(tmp_path / "runs" / "t" / "sasrec" / "trial-0")
    runs = tmp_path / "runs" / "t" / "sasrec"
    assert sorted(p.name for p in runs.iterdir()) == ["trial-0"]  # the pruned trial's run is deleted

    _, _, children = mlflow_runs("tune3")
    tags = sorted((r.data.tags["optuna.trial"], r.data.tags["optuna.state"], r.info.status) for r in children)
    assert tags == [("0", "COMPLETE", "FINISHED"), ("1", "PRUNED", "KILLED")]  # no run for the duplicate


def test_search_space_errors_are_config_errors(tmp_path, tiny_root, mlflow_store):
    params = make_params(tmp_path, "tune6")
    with pytest.raises(ConfigError, match="tune.search_space has no entry for model 'bert4rec'"):
        tune("t", "bert4rec", params, tune_cfg(params), data_root=tiny_root)
    bad = make_params(tmp_path, "tune6", space={"train.lr": {"low": 0.001}})
    with pytest.raises(ConfigError, match=r"tune.search_space.sasrec.train.lr: need 'choices' or 'low' and 'high'"):
        tune("t", "sasrec", bad, tune_cfg(bad), data_root=tiny_root)
    assert not (tmp_path / "optuna.db").exists()  # rejected before any study or trial exists
    with pytest.raises(ConfigError, match=r"tune: unknown key\(s\) \['trails'\]"):
        from_dict(TuneConfig, {"trails": 3}, "tune")


# -- the CLI, as separate processes -------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _prefect_server(tmp_path_factory):
    """A Prefect server of the module's own (home and database in tmp), started when the module
    starts so that its start-up overlaps the in-process tests: each `cdsr tune` process then
    talks to it instead of starting a temporary server of its own (about 15 s each)."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                  "--no-ui", "--analytics-off"], env, log)
    try:
        yield {"url": f"http://127.0.0.1:{port}/api", "home": home, "proc": proc, "log": log}
    finally:
        stop(proc)


@pytest.fixture
def prefect_env(_prefect_server) -> dict[str, str]:
    """Environment for `cdsr tune` processes: the module's Prefect server, once it is healthy."""
    url = _prefect_server["url"]
    wait_http(f"{url}/health", _prefect_server["proc"], _prefect_server["log"], timeout=240)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": url, "PREFECT_HOME": str(_prefect_server["home"])}


def write_params(tmp: Path, params: dict) -> Path:
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(params, sort_keys=False))
    return p


def start_cli(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`cdsr tune` from the project root (it needs flows/ there), in its own process group."""
    return start([str(CDSR), "tune", "--dataset", "t", "--model", "sasrec", *args], env, log, cwd=ROOT)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group at once: no clean-up runs (a crashed worker)."""
    stop(proc, grace=0)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        kill(proc)
    return log.read_text()


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_storage(request, tmp_path):
    """The Optuna storage several workers share: a sqlite file, or a throwaway PostgreSQL cluster
    on 127.0.0.1 started and stopped here (`tune.storage` = a postgresql URL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shared-optuna.db"
        return
    why = postgres_missing()
    if why:
        pytest.skip(why)
    with postgres_cluster("optuna") as url:
        yield url


def test_two_concurrent_workers_share_one_study(tmp_path, tiny_root, mlflow_store, prefect_env, shared_storage):
    import optuna

    storage = shared_storage
    experiment = "tune4" if storage.startswith("sqlite") else "tune4-pg"  # the MLflow store is the module's
    params = make_params(tmp_path, experiment, keep_trial_runs=True)
    p = write_params(tmp_path, params)
    args = ["--trials", "4", "--storage", storage, "--params", str(p), "--root", str(tiny_root)]
    logs = [tmp_path / f"worker{k}.log" for k in (0, 1)]
    procs = [start_cli([*args, "--worker", str(k)], logs[k], prefect_env) for k in (0, 1)]
    try:
        outs = [finish(proc, log) for proc, log in zip(procs, logs)]
    finally:
        for proc in procs:
            kill(proc)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
        assert "sasrec: best" in out

    study = optuna.load_study(study_name="t/sasrec", storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in trials if t.state.name in FINISHED]
    # the budget is global; a worker may finish the one trial it had in flight when the other reached it
    assert 4 <= len(finished) <= 5 and len(finished) == len(trials), states(study)
    trained = [t for t in finished if "duplicate_of" not in t.user_attrs]
    keys = [tuple(sorted(t.params.items())) for t in trained if t.state.name == "COMPLETE"]
    assert len(keys) == len(set(keys)), "two trials were trained with the same parameters"
    for t in finished:
        if "duplicate_of" in t.user_attrs:
            orig = next(o for o in trials if o.number == t.user_attrs["duplicate_of"])
            assert orig.params == t.params and orig.value == t.value
    runs = tmp_path / "runs" / "t" / "sasrec"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"trial-{t.number}" for t in trained)

    _, parents, children = mlflow_runs(experiment)
    assert sorted(r.data.tags["optuna.worker"] for r in parents) == ["0", "1"]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in trained)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= {r.info.run_id for r in parents}
    best = json.loads((tmp_path / "tuned" / "t" / "sasrec.json").read_text())
    assert best["value"] == max(t.value for t in finished if t.state.name == "COMPLETE")


def test_killed_tune_resumes_and_retries_the_stale_trial_from_its_checkpoint(tmp_path, tiny_root, mlflow_store,
                                                                              prefect_env, shared_storage):
    import optuna
    import torch

    experiment = "tune5" if shared_storage.startswith("sqlite") else "tune5-pg"  # the MLflow store is the module's
    params = make_params(tmp_path, experiment, epochs=30, heartbeat_interval=1, grace_period=2, keep_trial_runs=True,
                         pruner={"n_startup_trials": 10, "n_warmup_steps": 0})
    params["tune"]["storage"] = shared_storage
    params["train"]["patience"] = 100
    p = write_params(tmp_path, params)
    args = ["--trials", "3", "--params", str(p), "--root", str(tiny_root)]
    runs = tmp_path / "runs" / "t" / "sasrec"
    log = tmp_path / "first.log"
    proc = start_cli(args, log, prefect_env)
    try:
        deadline = time.time() + 300
        while not (runs / "trial-0" / "last.pt").exists():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "no checkpoint after 300 s\n" + log.read_text()
            time.sleep(0.2)
    finally:
        kill(proc)  # SIGKILL to the whole group: no clean-up runs
    study = load_study(params)
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["RUNNING"]
    done = torch.load(runs / "trial-0" / "last.pt", weights_only=True)["state"]["epoch"]  # epochs checkpointed
    assert 1 <= done < 30

    # rerun, with fewer epochs (a run's resume point does not depend on them): 2 more for the stale trial
    params["tune"]["epochs"] = params["train"]["epochs"] = done + 2
    write_params(tmp_path, params)
    time.sleep(2.5)  # past the grace period even if the rerun starts at once
    log = tmp_path / "rerun.log"
    out = finish(start_cli(args, log, prefect_env), log)
    assert "sasrec: best" in out, out

    trials = load_study(params).get_trials(deepcopy=False)
    assert trials[0].state == optuna.trial.TrialState.FAIL  # the stale trial, failed by the heartbeat check
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1, [(t.number, t.state.name, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["run_dir"] == str(runs / "trial-0")
    assert len([t for t in trials if t.state.name in FINISHED]) == 3 and len(trials) == 4
    # resumed, not restarted: the retry reported only the epochs after the checkpoint
    assert sorted(retry.intermediate_values) == [done, done + 1]
    history = json.loads((runs / "trial-0" / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(done + 2))
    assert not (runs / f"trial-{retry.number}").exists()

    # the MLflow runs the killed worker left RUNNING (its study run and trial 0's) were ended by the rerun
    _, parents, children = mlflow_runs(experiment)
    assert not [r for r in parents + children if r.info.status == "RUNNING"]
    dead = [r for r in parents + children if "cdsr.reaped" in r.data.tags]
    assert sorted((r.data.tags["cdsr.kind"], r.info.status) for r in dead) == [("tune", "KILLED"), ("tune-trial", "KILLED")]
    assert {r.data.tags["cdsr.pid"] for r in dead} == {str(proc.pid)}
    assert f"owner process {proc.pid}" in dead[0].data.tags["cdsr.reaped"]


def _children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid``: {pid: command line}."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(stat.parent.name)] = cmd
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_tune_takes_its_temporary_prefect_server_with_it(tmp_path, tiny_root, mlflow_store):
    """Without PREFECT_API_URL, `cdsr tune` runs Prefect's temporary API server as a child; a
    kill -9 of `cdsr tune` alone (not its process group) must not leave that server behind."""
    params = make_params(tmp_path, "tune7")
    p = write_params(tmp_path, params)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "tune.log"
    proc = start_cli(["--trials", "1", "--params", str(p), "--root", str(tiny_root)], log, env)
    try:
        deadline = time.time() + 120
        server = None
        while server is None:
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "no temporary Prefect server after 120 s\n" + log.read_text()
            server = next((c for c, cmd in _children(proc.pid).items() if "prefect.server.api.server:create_app" in cmd),
                          None)
            time.sleep(0.2)
        os.kill(proc.pid, 9)  # the parent only: no exit handler of its runs
        proc.wait(30)
        deadline = time.time() + 30
        while _alive(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the temporary Prefect server {server} outlived its killed parent"
    finally:
        kill(proc)


def test_every_registered_model_has_a_search_space_of_real_fields():
    """`cdsr tune --model M` works for every model: params.yaml has its search space, and each
    key names a field of the model's config dataclass or of TrainConfig."""
    import dataclasses

    from cdsr.config import load_params
    from cdsr.models.registry import MODELS
    from cdsr.train.config import TrainConfig

    spaces = load_params()["tune"]["search_space"]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, spec in MODELS.items():
        assert name in spaces, f"tune.search_space has no entry for {name}"
        model_fields = {f.name for f in dataclasses.fields(spec.config)}
        for key in spaces[name]:
            section, field = key.split(".", 1)
            root = field.split(".", 1)[0]
            assert (section == "model" and root in model_fields) or (section == "train" and root in train_fields), (name, key)


def test_successive_halving_and_hyperband_pruners(tmp_path, tiny_root, mlflow_store):
    import optuna

    from cdsr.tune import PrunerConfig, make_pruner

    assert isinstance(make_pruner(PrunerConfig(kind="hyperband"), 20), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(PrunerConfig(kind="none"), 20), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match="tune.pruner.kind"):
        PrunerConfig(kind="asha")
    with pytest.raises(ConfigError, match="reduction_factor"):
        PrunerConfig(kind="hyperband", reduction_factor=1)
    # a good lr, then a useless one: at the first rung the useless trial is not in the top half
    space = {"train.lr": {"choices": [0.01, 1e-6]}, "model.dropout": {"choices": [0.0]}}
    params = make_params(tmp_path, "tune-sh", epochs=3, space=space,
                         pruner={"kind": "successive_halving", "min_resource": 1, "reduction_factor": 2})
    cfg = tune_cfg(params)
    study = open_study("t", "sasrec", cfg)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    for lr in (0.01, 1e-6):
        study.enqueue_trial({"train.lr": lr, "model.dropout": 0.0})
    tune("t", "sasrec", params, cfg, trials=2, data_root=tiny_root)
    t0, t1 = load_study(params).get_trials(deepcopy=False)
    assert t0.state == optuna.trial.TrialState.COMPLETE and len(t0.intermediate_values) == 3
    assert t1.state == optuna.trial.TrialState.PRUNED and len(t1.intermediate_values) < 3


def test_list_valued_choices_are_suggested_as_text_and_read_back():
    import optuna

    from cdsr.runs import apply_overrides, as_overrides
    from cdsr.tune import decode, suggest

    space = {"model.gca_layers": {"choices": [[0], [1], [0, 1]]}, "train.lr": {"choices": [0.001]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        v = suggest(trial, space)
        assert v["model.gca_layers"] in ([0], [1], [0, 1]) and isinstance(trial.params["model.gca_layers"], str)
        assert decode(trial.params, space) == v
        p = apply_overrides({}, "abxi_gca", as_overrides(v))
        assert p["models"]["abxi_gca"]["gca_layers"] == v["model.gca_layers"]
        seen.add(tuple(v["model.gca_layers"]))
        study.tell(trial, 0.0)
    assert len(seen) == 3


def test_a_study_from_a_preset(tmp_path, tiny_root, mlflow_store):
    import optuna

    params = make_params(tmp_path, "tune-preset", space={"train.lr": {"choices": [0.005]}})
    params["tune"]["search_space"]["fast-sas"] = {"model.dropout": {"choices": [0.0, 0.3]}}
    params["presets"] = {"fast-sas": {"model": "sasrec", "set": ["train.val_metric=MRR", "train.val_aggregate=sum",
                                                                  "train.lr=0.004"]}}
    best = tune("t", None, params, tune_cfg(params), trials=1, data_root=tiny_root, preset="fast-sas")
    assert best["study"] == "t/fast-sas" and Path(best["path"]) == tmp_path / "tuned" / "t" / "fast-sas.json"
    assert set(best["params"]) == {"model.dropout"}  # the preset's own space
    cfg = json.loads((Path(best["run_dir"]) / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.004 and cfg["train"]["val_aggregate"] == "sum"  # trials start from the preset
    m = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    assert best["value"] == pytest.approx(sum(v["MRR"] for v in m["validation"]["domains"].values()))
    assert best["wall_seconds"] > 0
    optuna.load_study(study_name="t/fast-sas", storage=params["tune"]["storage"])
    with pytest.raises(ConfigError, match="not 'hstu'"):
        tune("t", "hstu", params, tune_cfg(params), trials=1, data_root=tiny_root, preset="fast-sas")
