"""Optuna tuning of one (dataset, model): the study behind `cdsr tune` and ``flows/tune.py``.

- Search space declared per model in params.yaml (``tune.search_space.<model>``): keys are
  ``--set`` style overrides (``train.lr``, ``model.d``); a spec is ``{low, high[, log, step]}``
  (float, or int when both bounds are ints) or ``{choices: [...]}``.
- TPE sampler (seeded) and a pruner (``tune.pruner.kind``: median, hyperband, successive
  halving) fed the validation selection value (``train.val_metric`` aggregated as
  ``train.val_aggregate``) after every epoch.
- Persistent storage (``tune.storage``: sqlite by default, any SQLAlchemy URL). The study is
  named ``<dataset>/<model>`` and loaded if it exists, so a killed ``cdsr tune`` resumes: a
  trial left RUNNING by a dead process stops heart-beating, is marked FAIL and retried once
  (Optuna's ``RetryFailedTrialCallback``), and the retry resumes from the dead trial's
  checkpoint. ``--trials N`` is the study's total of finished (complete or pruned) trials,
  counted across every worker and restart.
- Several workers may share one study (one ``cdsr tune`` per worker): trial numbers come from
  the database, each worker seeds its sampler differently (``--worker``), and a trial whose
  parameters equal an already finished trial's is not trained again (it reuses that value and
  records ``duplicate_of``).
- Each trial is a nested MLflow run under the worker's ``tune/<dataset>/<model>`` run. Runs
  carry their owner process; a worker starting on the study first ends (KILLED, tag
  ``cdsr.reaped``) the runs that dead workers left RUNNING: those whose owner process on this
  host is gone, and trial runs of other hosts whose Optuna trial failed its heartbeat.
- Each trial records who ran it (user attributes ``worker``, ``host``, ``pid`` and, in a flow run
  of a Prefect work pool, ``prefect_worker``). ``worker_trials`` caps a worker's own trials.
- The best parameters go to ``tuned/<dataset>/<model>.json``; the benchmark applies them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cdsr.config import ConfigError, check_choices, check_dataset_name, from_dict
from cdsr.runs import RunDir, RunSpec, apply_overrides, as_overrides, yaml_text
from cdsr.track import tracking
from cdsr.train.run import train_spec


@dataclass(frozen=True)
class PrunerConfig:
    """How trials are stopped early on their per-epoch validation value.

    - ``median``: stop a trial below the median of earlier trials at the same epoch (after
      ``n_startup_trials`` trials and ``n_warmup_steps`` epochs);
    - ``hyperband``: Optuna's Hyperband over epochs (``min_resource`` .. the trial budget
      ``tune.epochs``, brackets of successive halving with ``reduction_factor``): the CPU goes to
      the trials that are ahead at each rung;
    - ``successive_halving``: one such bracket (asynchronous successive halving);
    - ``none``: no pruning.
    """

    kind: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    n_startup_trials: int = 3
    n_warmup_steps: int = 2
    min_resource: int = 1
    reduction_factor: int = 3

    def __post_init__(self):
        check_choices(self, "tune.pruner")
        if self.min_resource < 1 or self.reduction_factor < 2:
            raise ConfigError("tune.pruner: need min_resource >= 1 and reduction_factor >= 2")


def make_pruner(cfg: PrunerConfig, max_resource: int):
    """The Optuna pruner of ``cfg``; ``max_resource``: the epochs a trial may run."""
    import optuna

    if cfg.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)
    if cfg.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=max_resource,
                                              reduction_factor=cfg.reduction_factor)
    if cfg.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource,
                                                      reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section of params.yaml."""

    storage: str = "sqlite:///optuna.db"
    trials: int = 20
    epochs: int = 20
    sampler_seed: int = 0
    seed: int = 42  # training seed of every trial (the comparison is between parameters, not seeds)
    timeout: float | None = None  # seconds for this worker
    heartbeat_interval: int = 10
    grace_period: int = 30
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    search_space: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    runs_dir: str = "runs/tune"
    tuned_dir: str = "tuned"
    keep_trial_runs: bool = False  # delete the checkpoints of finished non-best trials


def study_name(dataset: str, model: str) -> str:
    return f"{dataset}/{model}"


def _composite(choices: list[Any]) -> bool:
    """Choices Optuna cannot store as they are (it takes None, bool, int, float and str only)."""
    return any(isinstance(c, (list, tuple, dict)) for c in choices)


def decode(params: dict[str, Any], space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna's stored parameters -> values: a composite choice (a list, e.g. ``gca_layers``)
    is suggested as its YAML text and read back here."""
    import yaml

    return {k: yaml.safe_load(v) if isinstance(v, str) and _composite(list(space.get(k, {}).get("choices", [])))
            else v for k, v in params.items()}


def suggest(trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        if "choices" in spec and _composite(list(spec["choices"])):
            out[key] = decode({key: trial.suggest_categorical(key, [yaml_text(c) for c in spec["choices"]])}, space)[key]
        elif "choices" in spec:
            out[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif "low" in spec and "high" in spec:
            if isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("float"):
                out[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                             log=bool(spec.get("log")))
            else:
                out[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                               step=spec.get("step"), log=bool(spec.get("log")))
        else:
            raise ConfigError(f"tune.search_space.{key}: need 'choices' or 'low' and 'high', got {spec}")
    return out


def check_space(model: str, space: dict[str, dict[str, Any]]) -> None:
    """Fail before the study is opened (not inside a trial, which would leave a FAIL trial behind)."""
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ("choices" in spec or ("low" in spec and "high" in spec)):
            raise ConfigError(f"tune.search_space.{model}.{key}: need 'choices' or 'low' and 'high', got {spec!r}")
        if "choices" in spec and not spec["choices"]:
            raise ConfigError(f"tune.search_space.{model}.{key}: 'choices' is empty")


def storage_url(url: str) -> str:
    """sqlite paths made absolute (so workers in other directories share the file)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
    return url


def _retry_callback() -> tuple[str, Any]:
    """Optuna's stale-trial retry callback and the RDBStorage keyword taking it (renamed in 4.9:
    the old names still work but warn, and go in 6.0)."""
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

        return "heartbeat_stale_trial_callback", Retry
    except ImportError:  # optuna < 4.9
        from optuna.storages import RetryFailedTrialCallback as Retry

        return "failed_trial_callback", Retry


def retried_trial_number(study, trial) -> int | None:
    """The number of the stale trial that ``trial`` retries (None for a fresh trial).

    Optuna's ``retried_trial_number`` reads ``system_attrs``, which only a ``FrozenTrial`` has:
    passing it the live ``Trial`` of an objective raises AttributeError."""
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number:
            with _quiet():
                return _retry_callback()[1].retried_trial_number(t)
    return None


@contextlib.contextmanager
def _quiet():
    """Optuna warns that the heartbeat and retry API is experimental on every use (noise in logs)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


JOURNAL = "journal:"


def journal_path(url: str, dataset: str, name: str) -> Path:
    """``journal:`` (the results store's ``results/<dataset>/studies/<name>.journal``) or
    ``journal:PATH``: an Optuna journal file, which git carries with the store."""
    rest = url[len(JOURNAL):]
    if rest:
        return Path(rest)
    from cdsr.store import Store

    return Store().journal(dataset, name.replace("/", "_"))


def open_study(dataset: str, model: str, cfg: TuneConfig, worker: int = 0, storage: str | None = None):
    import optuna
    from optuna.storages import RDBStorage

    url = storage or cfg.storage
    if url.startswith(JOURNAL):
        # NOTE: a journal file has no heartbeat: a killed worker's trial stays RUNNING in it (it
        # is not retried); RDB storages (sqlite, PostgreSQL) fail and retry it
        from cdsr.store import journal_storage

        st = journal_storage(journal_path(url, dataset, model))
    else:
        key, retry = _retry_callback()
        with _quiet():
            st = RDBStorage(storage_url(url), heartbeat_interval=cfg.heartbeat_interval,
                            grace_period=cfg.grace_period, **{key: retry(max_retry=1)},
                            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    study = optuna.create_study(
        study_name=study_name(dataset, model), storage=st, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed(cfg, worker, 0)),
        pruner=make_pruner(cfg.pruner, cfg.epochs))
    n = len(study.get_trials(deepcopy=False))
    if n:  # a resumed study: a fresh sampler with the same seed would replay the first trials' draws
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(cfg, worker, n))
    return study


def sampler_seed(cfg: TuneConfig, worker: int, n_trials: int) -> int:
    """The TPE seed of a worker opening a study that already holds ``n_trials`` trials: distinct
    per worker and per resume point (TPE's random start-up draws depend on the seed only, so a
    resumed or second worker with the same seed would propose the very same parameters)."""
    import numpy as np

    return int(np.random.SeedSequence([cfg.sampler_seed, worker, n_trials]).generate_state(1)[0])


def _duplicate(study, trial) -> Any:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == trial.params:
            return t
    return None


@contextlib.contextmanager
def _sqlite_lock(url: str):
    """One process at a time in the block, per sqlite file (a no-op for other databases)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if fcntl is None or not url.startswith("sqlite:///"):
        yield
        return
    path = str(Path(url[len("sqlite:///"):].split("?", 1)[0]).resolve())
    lock = Path(tempfile.gettempdir()) / f"cdsr-{hashlib.sha1(path.encode()).hexdigest()[:16]}.lock"
    try:
        f = open(lock, "a")  # noqa: SIM115  (closed below)
    except OSError:  # e.g. another user's lock file: go on unlocked (the caller retries)
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _first_use(fn, url: str, attempts: int = 5):
    """``fn()``, the first use of a store, which creates its tables when the file is new.

    Workers started together on a fresh store race to create and migrate its tables (MLflow:
    ``table ... already exists``, alembic ``expected to match one row``; Optuna: the same in
    ``create_all``): sqlite stores are locked meanwhile; other databases get a few retries."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            with _sqlite_lock(url):
                return fn()
        except (sqlalchemy.exc.DBAPIError, MlflowException):
            if i == attempts - 1:
                raise
            time.sleep(0.5 * (i + 1))


def _what_to_tune(params: dict[str, Any], cfg: TuneConfig, model: str | None,
                  preset: str | None) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """``(model, study name, params with the preset applied, search space)``."""
    if preset is not None:
        from cdsr.presets import expand

        model, sets = expand(params, preset, model)
        params = apply_overrides(params, model, sets)
    elif model is None:
        raise ConfigError("tune needs a model or a preset")
    name = preset or model
    space = cfg.search_space.get(name) or cfg.search_space.get(model)
    if not space:
        raise ConfigError(f"tune.search_space has no entry for model '{model}'")
    check_space(name, space)
    return model, name, params, space


def _trial_dir(study, trial, runs: Path) -> Path:
    """The trial's run directory: a retry resumes its original's; a fresh trial number never had
    one in this study, so a directory already there is left from a deleted study of the same
    name, holds another trial's run and is removed."""
    retried = retried_trial_number(study, trial)
    out = runs / f"trial-{retried if retried is not None else trial.number}"
    if retried is None and out.exists():
        shutil.rmtree(out)
    trial.set_user_attr("run_dir", str(out))  # now: the clean-up must find pruned / running trials' dirs
    return out


def worker_attrs(worker: int) -> dict[str, Any]:
    """Who runs a trial (its Optuna user attributes): the worker index, host and process, and the
    Prefect worker whose flow run it is (``PREFECT__WORKER_NAME``, set by ``prefect worker start``)."""
    out: dict[str, Any] = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid()}
    if os.environ.get("PREFECT__WORKER_NAME"):
        out["prefect_worker"] = os.environ["PREFECT__WORKER_NAME"]
    return out


def _objective(study, dataset: str, model: str, params: dict[str, Any], space: dict[str, Any], cfg: TuneConfig,
               runs: Path, data_root: str | Path, preset: str | None, worker: int = 0):
    """The Optuna objective: one training run per trial, its own nested MLflow run, the validation
    selection value reported per epoch (Hyperband prunes on it) and returned at the end."""
    import mlflow
    import optuna

    from cdsr.evaluate.protocols import selection_value

    def objective(trial) -> float:
        for k, v in worker_attrs(worker).items():
            trial.set_user_attr(k, v)
        chosen = suggest(trial, space)
        dup = _duplicate(study, trial)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup.number)
            # same run: if this trial ends up best, its run dir is the original's (kept, not deleted)
            if dup.user_attrs.get("run_dir"):
                trial.set_user_attr("run_dir", dup.user_attrs["run_dir"])
            return float(dup.value)
        out = _trial_dir(study, trial, runs)
        # not `with start_run()`: it ends a run left by an exception as FAILED, and a pruned trial did not fail
        mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                         tags={"dataset": dataset, "model": model, "cdsr.kind": "tune-trial", "preset": preset or "",
                               "optuna.study": study.study_name, "optuna.trial": str(trial.number),
                               **tracking.owner_tags()})
        status = "FAILED"
        try:
            mlflow.log_params(chosen)
            spec = RunSpec.build(apply_overrides(params, model, as_overrides(chosen)), dataset, model, "merged",
                                 cfg.seed, cfg.epochs, data_root)  # a space may set train.val_*: the trial's own

            def on_epoch(epoch: int, record: dict) -> None:
                if "val_selection" not in record:
                    return
                # every validation number of the epoch (e.g. GCA's |cos|, for `cdsr analyze orthogonality`)
                mlflow.log_metrics({tracking.metric_key(k): float(v) for k, v in record.items()
                                    if k.startswith("val_") and isinstance(v, (int, float))}, step=epoch)
                trial.report(record["val_selection"], epoch)
                if trial.should_prune():
                    mlflow.set_tag("optuna.state", "PRUNED")
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            m = train_spec(spec, RunDir(out), on_epoch=on_epoch)
            value = selection_value(m.validation, spec.train.val_metric, spec.train.val_aggregate)
            mlflow.log_metric("val_metric", value)
            mlflow.set_tag("optuna.state", "COMPLETE")
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status)

    return objective


def _remove_trial_runs(study, best: dict[str, Any], runs: Path, finished: tuple) -> None:
    """Delete the finished trials' run directories except the best one's and running trials'."""
    from optuna.trial import TrialState

    keep = {t.user_attrs.get("run_dir") for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
    keep.add(best.get("run_dir"))
    for t in study.get_trials(deepcopy=False, states=finished):
        d = t.user_attrs.get("run_dir") or str(runs / f"trial-{t.number}")
        if d not in keep and Path(d).exists():
            shutil.rmtree(d, ignore_errors=True)


def tune(dataset: str, model: str | None, params: dict[str, Any], cfg: TuneConfig, trials: int | None = None,
         storage: str | None = None, worker: int = 0, data_root: str | Path = "data",
         preset: str | None = None, worker_trials: int | None = None) -> dict[str, Any]:
    """Run trials until the study has ``trials`` finished ones; write and return the best.

    ``worker_trials``: this worker also stops after that many trials of its own (a per-worker
    budget: two workers with ``worker_trials=2`` on a study of ``trials=4`` run exactly 2 each;
    with the study total alone, a worker may finish the trial it had in flight when the other
    reached the total).

    ``preset`` (params.yaml ``presets:``): the trials start from the preset's settings (its model,
    regime and selection metric) instead of params.yaml's; the study, its runs and its result
    are named after the preset (``<dataset>/<preset>``, ``tuned/<dataset>/<preset>.json``); the
    search space is ``tune.search_space.<preset>`` if declared, else the model's."""
    import mlflow
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from cdsr.train.config import TrainConfig

    check_dataset_name(dataset)
    model, name, params, space = _what_to_tune(params, cfg, model, preset)
    total = trials if trials is not None else cfg.trials
    study = _first_use(lambda: open_study(dataset, name, cfg, worker, storage), storage_url(storage or cfg.storage))
    tcfg = tracking.tracking_config(params)
    experiment = _first_use(lambda: tracking.use_experiment(dataset, tcfg), tracking.setup(tcfg))
    reap(study, experiment)
    from_dict(TrainConfig, params.get("train"), "train")  # a config error before the study is opened
    runs = Path(cfg.runs_dir) / dataset / name
    objective = _objective(study, dataset, model, params, space, cfg, runs, data_root, preset, worker)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    with mlflow.start_run(run_name=f"tune/{dataset}/{name}",
                          tags={"dataset": dataset, "model": model, "cdsr.kind": "tune", "preset": preset or "",
                                "optuna.study": study.study_name, "optuna.worker": str(worker),
                                **tracking.owner_tags()}):
        if done < total:
            study.optimize(objective, n_trials=worker_trials, callbacks=[MaxTrialsCallback(total, states=finished)],
                           timeout=cfg.timeout, catch=(), gc_after_trial=True)
        best = write_best(study, dataset, name, cfg, space)
        mlflow.log_metric("best_value", best["value"])
        mlflow.log_dict(best, "best.json")
    if not cfg.keep_trial_runs:
        _remove_trial_runs(study, best, runs, finished)
    return best


def _fail_orphans(study) -> list[int]:
    """A journal-file study has no heartbeat: its RUNNING trials whose worker process, on this
    host, is gone are failed here (and retried by the next trials, which resume their run
    directory's checkpoint when they draw the same parameters)."""
    from optuna.storages import JournalStorage
    from optuna.trial import TrialState

    if not isinstance(study._storage, JournalStorage):
        return []
    host, out = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        out.append(t.number)
    return out


def reap(study, experiment_id: str) -> list[str]:
    """Before new trials: fail the study's stale trials (a dead worker's, by their missing
    heartbeat; Optuna queues their retry) and end the MLflow runs that dead workers left RUNNING
    (see :func:`cdsr.track.tracking.reap_dead_runs`)."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with _quiet():
        fail_stale_trials(study)
    _fail_orphans(study)
    dead = {(study.study_name, t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return tracking.reap_dead_runs(experiment_id, dead)


def write_best(study, dataset: str, model: str, cfg: TuneConfig, space: dict[str, dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    from optuna.trial import TrialState

    states = {s.name: sum(1 for t in study.get_trials(deepcopy=False) if t.state == s) for s in TrialState}
    try:
        bt = study.best_trial
    except ValueError as exc:
        raise RuntimeError(f"study {study.study_name}: no trial completed ({states})") from exc
    # wall time: the sum of the finished trials' durations (CPU time of the study across workers)
    wall = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False)
               if t.datetime_start is not None and t.datetime_complete is not None)
    best = {"study": study.study_name, "trial": bt.number, "value": bt.value, "params": decode(bt.params, space or {}),
            "run_dir": bt.user_attrs.get("run_dir"), "trials": states, "wall_seconds": round(wall, 1)}
    dest = tuned_path(cfg.tuned_dir, dataset, model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(best, indent=2) + "\n")
    return {**best, "path": str(dest)}


def tuned_path(tuned_dir: str | Path, dataset: str, name: str) -> Path:
    """Where a study's result lives: ``<tuned_dir>/<dataset>/<model or preset>.json``."""
    return Path(tuned_dir) / dataset / f"{name}.json"


def read_tuned(path: str | Path, dataset: str | None = None) -> dict[str, Any]:
    """A study's result (written by :func:`write_best`); with ``dataset``, refused unless the
    study ran on that dataset. Raises ConfigError naming the file."""
    path = Path(path)
    try:
        best = json.loads(path.read_text())
        chosen, study = best["params"], str(best.get("study", ""))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable `cdsr tune` result ({exc})") from exc
    if not isinstance(chosen, dict):
        raise ConfigError(f"{path}: not a readable `cdsr tune` result ('params' is not a mapping)")
    if dataset is not None and study.split("/", 1)[0] != dataset:
        raise ConfigError(f"{path}: the result of study {study!r}, not of a study on dataset {dataset}")
    return best
