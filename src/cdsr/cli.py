"""The `cdsr` command line. Thin: every command calls the same functions as the DVC stages."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

import cdsr  # noqa: F401  (offline settings first)
from cdsr.config import ConfigError, check_dataset_name, declared_dataset, load_params

app = typer.Typer(
    help="cdsr: cross-domain sequential recommendation, from raw Amazon-style files to served models.\n\n"
    "Main job: `dvc repro` (see README). Datasets are declared in params.yaml under `datasets:`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data stages: generate, ingest, validate, sequences, split (or all: build).",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

DATASET = typer.Option(..., "--dataset", "-d", help="A dataset declared under `datasets:` in params.yaml.")
PARAMS = typer.Option(None, "--params", "-p", help="Params file (default: ./params.yaml).")
ROOT = typer.Option(Path("data"), "--root", help="Where datasets are written: <root>/<dataset>/...")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _dataset(name: str, params: Optional[Path]):
    from cdsr.data.config import dataset_config

    try:
        return dataset_config(load_params(params), name)
    except ConfigError as exc:
        _fail(str(exc))


def _declared(name: str, params: Optional[Path]) -> dict:
    """The params, once ``name`` is a dataset they declare (no other name reaches a path)."""
    try:
        p = load_params(params)
        declared_dataset(p, name)
    except ConfigError as exc:
        _fail(str(exc))
    return p


def _safe_name(name: str) -> str:
    try:
        return check_dataset_name(name)
    except ConfigError as exc:
        _fail(str(exc))


def _output_file(path: Optional[Path], option: str = "--out") -> Optional[Path]:
    """An output file path that can be written (a directory there is an error naming it)."""
    if path is not None and path.is_dir():
        _fail(f"{option} {path}: is a directory; give a file path")
    return path


def _known_errors() -> tuple[type[BaseException], ...]:
    from cdsr.data.formats import RawFormatError
    from cdsr.data.sequences import SequenceBuildError
    from cdsr.data.split import SplitError
    from cdsr.data.validate import ValidationFailed

    return (ConfigError, RawFormatError, ValidationFailed, SequenceBuildError, SplitError)


def _run_stages(name: str, params: Optional[Path], root: Path, stages: list[str] | None) -> None:
    from cdsr.data.build import STAGES, build, summarise
    from cdsr.data.ingest import quarantine_summary

    cfg = _dataset(name, params)
    try:
        if stages is None:
            results = build(cfg, root, log=typer.echo)
        else:
            results = {}
            for s in stages:
                results[s] = STAGES[s](cfg, root)
                typer.echo(f"[{cfg.name}] {s}: {summarise(s, results[s])}")
    except _known_errors() as exc:
        _fail(f"dataset '{name}': {exc}")
    if "ingest" in results and results["ingest"]["rows_quarantined"]:
        interim = Path(root) / cfg.name / "interim"
        typer.echo(f"  quarantined rows are in {interim / 'quarantine.parquet'}; first ones:")
        for line in quarantine_summary(interim):
            typer.echo(f"    {line}")


@data_app.command("build")
def data_build(dataset: str = DATASET, params: Optional[Path] = PARAMS, root: Path = ROOT) -> None:
    """Run ingest -> validate -> sequences -> split for one dataset (generate first if synthetic)."""
    _run_stages(dataset, params, root, None)


def _stage_command(stage: str, doc: str):
    def command(dataset: str = DATASET, params: Optional[Path] = PARAMS, root: Path = ROOT) -> None:
        _run_stages(dataset, params, root, [stage])

    command.__doc__ = doc
    data_app.command(stage)(command)


_stage_command("generate", "Write the raw files of a generated (synthetic) dataset.")
_stage_command("ingest", "Raw files -> interim/interactions.parquet, quarantine, ingest_report.json.")
_stage_command("validate", "Validate interactions (Great Expectations + pandera); writes Data Docs.")
_stage_command("sequences", "Filter, order and re-index into processed/sequences.parquet (+ validation).")
_stage_command("split", "Leave-one-out split and fixed sampled negatives.")


@data_app.command("list")
def data_list(params: Optional[Path] = PARAMS, root: Path = ROOT) -> None:
    """List the declared datasets, whether they are built, and their size."""
    try:
        declared = load_params(params).get("datasets") or {}
    except ConfigError as exc:
        _fail(str(exc))
    for name, entry in declared.items():
        stats = Path(root) / name / "processed" / "stats.json"
        if stats.exists():
            s = json.loads(stats.read_text())
            state = f"built: {s['users']} users, {s['items']} items, {s['events']} events"
        else:
            state = "not built"
        typer.echo(f"{name:34s} {state:55s} {(entry or {}).get('description', '')[:60]}")


def _fetch_list() -> None:
    from cdsr.data.catalogue import RELEASES

    for r in RELEASES.values():
        typer.echo(f"Amazon {r.name} ({r.homepage})")
        typer.echo(f"  mirrors, in order: {', '.join(r.mirrors)}")
        for kind, paths in r.kinds.items():
            typer.echo(f"  {kind:32s} {', '.join(paths)}")
        typer.echo(f"  categories: {', '.join(r.categories)}")


@data_app.command("fetch")
def data_fetch(
    dataset: Optional[str] = typer.Argument(None, help="A dataset with a `fetch:` entry in params.yaml."),
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
    list_: bool = typer.Option(False, "--list", help="List the catalogue: releases, mirrors, file kinds, categories."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print URLs, pinned sizes and destinations; download nothing."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="A private mirror tried first: <URL>/<release>/<path> (default $CDSR_FETCH_BASE_URL or fetch.base_url)."),
    mirror_only: bool = typer.Option(False, "--mirror-only", help="Use only the private mirror, never the official hosts."),
    retries: Optional[int] = typer.Option(None, "--retries", min=0, help="Attempts per mirror after the first (default fetch.retries)."),
    lock: Optional[Path] = typer.Option(None, "--lock", help="Lock file of pinned sizes and sha256 (default fetch.lock: fetch.lock.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A progress bar on stderr (only on a terminal)."),
    dvc: bool = typer.Option(False, "--dvc/--no-dvc", help="Then `dvc add <root>/<dataset>/raw`, so DVC versions and caches the fetched files."),
) -> None:
    """Download a dataset's raw files from the official Amazon releases: mirrors in order, resumed
    after a drop, verified against pinned sizes and sha256 before they are moved into place."""
    import os

    from cdsr.data import fetch as F

    if list_:
        _fetch_list()
        return
    if dataset is None:
        _fail("give a dataset name (or --list)")
    cfg = _dataset(dataset, params)
    if cfg.fetch is None:
        _fail(f"dataset '{dataset}' has no `fetch:` entry in the params file (its raw files are local)")
    try:
        fc = F.fetch_config(load_params(params))
        base = mirror or os.environ.get(F.ENV_BASE_URL) or fc.base_url
        lk = F.Lock(lock or Path(fc.lock))
        raw = Path(root) / cfg.name / "raw"
        files = F.plan(cfg.name, cfg.fetch, raw, lk, base, mirror_only)
        if dry_run:
            for f in files:
                size = f"{f.pin.size} bytes" if f.pin.size is not None else "size unknown"
                pinned = "pinned" if (f.pin.sha256 or f.pin.md5) else "not pinned yet"
                typer.echo(f"{f.dest}  ({size}, {pinned})")
                for u in f.urls:
                    typer.echo(f"    {u}")
            return
        opts = F.Options(retries=fc.retries if retries is None else retries, backoff_s=fc.backoff_s,
                         timeout_s=fc.timeout_s, progress=progress,
                         log=lambda m: typer.echo(m, err=True))
        F.fetch_all(files, lk, opts)
        if dvc:
            F.dvc_add(raw, typer.echo)
    except (F.FetchError, ConfigError) as exc:
        _fail(str(exc))
    typer.echo(f"{len(files)} file(s) in {raw}; next: cdsr data build --dataset {cfg.name}"
               + (f" --root {root}" if Path(root) != Path("data") else ""))


@app.command("models")
def models_list() -> None:
    """List the registered models (name first) and their variants."""
    from cdsr.models.registry import MODELS

    for name, spec in MODELS.items():
        typer.echo(f"{name:12s} variants: {', '.join(spec.variants):16s} {spec.description}")


@app.command("presets")
def presets_list(params: Optional[Path] = PARAMS) -> None:
    """List the named presets of params.yaml (name first): `cdsr train --preset NAME`."""
    from cdsr.presets import presets

    try:
        known = presets(load_params(params))
    except ConfigError as exc:
        _fail(str(exc))
    for name, pr in known.items():
        typer.echo(f"{name:16s} model {pr.model:10s} {pr.description}")


def _tuned_sets(path: Path, dataset: str) -> list[str]:
    """The overrides of a `cdsr tune` result file, refused when it was tuned on another dataset."""
    from cdsr.runs import as_overrides
    from cdsr.tune import read_tuned

    return as_overrides(read_tuned(path, dataset)["params"])


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _progress_log() -> None:
    """One line per epoch on stderr (loss, validation value, best so far) from the training loop,
    so that a long run's log shows where it is."""
    log = logging.getLogger("cdsr.train.loop")
    if not log.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _cli_args(**options: object) -> list[str]:
    """Options back into command-line arguments (None: left out; a list: the option repeated)."""
    out: list[str] = []
    for name, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                out += [f"--{name.replace('_', '-')}", str(v)]
    return out


def _torchrun(command: list[str], nproc: int, max_restarts: int) -> int:
    """Run ``cdsr COMMAND`` as ``nproc`` processes on this machine under torchrun; its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "-m", "cdsr", *command]
    return subprocess.run(cmd, check=False).returncode


@app.command("train")
def train(
    dataset: str = DATASET,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A registered model (see `cdsr models`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A named preset from params.yaml `presets:` (a model and its training regime; see `cdsr presets`)."),
    variant: str = typer.Option("merged", "--variant", "-v", help="merged (whole multi-domain sequence) or single (one model per domain)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (default: train.epochs in params)."),
    seed: int = typer.Option(42, "--seed", help="Fixes initialisation, batch order and sampled negatives."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<dataset>/<model>[-tuned]-<variant>-s<seed>, or <preset>[-tuned]-s<seed>)."),
    sets: list[str] = typer.Option([], "--set", help="Override a param: train.lr=0.0005, model.d=128, evaluate.exclude_history=true (after the preset's)."),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="Apply a `cdsr tune` result (e.g. tuned/<dataset>/<model>.json) after the preset and before --set."),
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine: runs `torchrun --standalone --nproc-per-node N -m cdsr train ...` (gloo on CPU, NCCL on GPU; README \"Scaling out\")."),
    max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="With --nproc: torchrun restarts every process this many times after one dies; they resume from the last checkpoint."),
    record: Optional[bool] = typer.Option(None, "--record/--no-record", help="Write the finished run's record to the results store (results/<dataset>/<run name>/, kept in git). Default: for runs in runs/ (no --out) only."),
    results: Optional[Path] = typer.Option(None, "--results", help="The results store (default: results/ beside the params file)."),
) -> None:
    """Train a model (or preset) with early stopping, evaluate its best checkpoint on test, write metrics.json.

    Re-running the same command resumes an interrupted run from its checkpoint and skips a finished one.
    The finished run's record goes to the results store (see `cdsr results`)."""
    from cdsr.presets import expand
    from cdsr.runs import RunDir, RunSpec, apply_overrides, run_name
    from cdsr.train import distributed
    from cdsr.train.run import train_spec

    if nproc > 1 and not distributed.from_env().active:
        args = _cli_args(dataset=dataset, model=model, preset=preset, variant=variant, epochs=epochs, seed=seed,
                         out=out, set=sets, tuned=tuned, params=params, root=root)
        raise typer.Exit(_torchrun(["train", *args], nproc, max_restarts))
    import shlex

    _progress_log()
    p = _declared(dataset, params)
    sets_given = list(sets)
    try:
        preset_sets: list[str] = []
        if preset is not None:
            model, preset_sets = expand(p, preset, model)
        elif model is None:
            raise ConfigError("give --model or --preset")
        sets = [*preset_sets, *(_tuned_sets(tuned, dataset) if tuned is not None else []), *sets]
        name = run_name(preset or model, variant, seed, preset=preset is not None, tuned=tuned is not None)
        record = out is None if record is None else record
        out = out or Path("runs") / dataset / name
        spec = RunSpec.build(apply_overrides(p, model, sets), dataset, model, variant, seed, epochs, root)
        command = "cdsr train " + shlex.join(_cli_args(dataset=dataset, model=model if preset is None else None,
                                                       preset=preset, variant=None if variant == "merged" else variant,
                                                       epochs=epochs, seed=seed, set=sets_given, tuned=tuned,
                                                       out=None if record else out))
        if distributed.from_env().main:
            RunDir(out).prepare(spec)  # refuses a file, or a directory of another run, before writing in it
            RunDir(out).write_command(command)
        metrics = train_spec(spec, RunDir(out))
        m = metrics.to_json()
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc))
    if not distributed.from_env().main:
        return
    if record:
        _record(RunDir(out), metrics, _results_root(results, params), command=command)
    for proto, res in m["protocols"].items():
        dom = "  ".join(f"{d}: HR@10 {v['HR@10']:.4f} NDCG@10 {v['NDCG@10']:.4f} MRR {v['MRR']:.4f}"
                        for d, v in res["domains"].items())
        typer.echo(f"{proto:12s} overall HR@10 {res['overall']['HR@10']:.4f} NDCG@10 {res['overall']['NDCG@10']:.4f} | {dom}")
    typer.echo(f"metrics: {out / 'metrics.json'}")


def _results_root(results: Optional[Path], params: Optional[Path]) -> Path:
    return results if results is not None else (params.parent if params is not None else Path(".")) / "results"


def _record(rd, metrics, root: Path, name: Optional[str] = None, status: str = "finished",
            command: Optional[str] = None) -> None:
    from cdsr.store import Store, StoreError

    try:
        rec = Store(root).put(rd, name=name, command=command, metrics=metrics, status=status)
    except StoreError as exc:
        _fail(str(exc))
    typer.echo(f"record: {rec.path} (key {rec.key}, {rec.status})")


def _run_json(run: Path, out: Optional[Path], default_name: str, compute) -> tuple[dict, Path]:
    """A command on a trained run directory: check it, ``compute()``, write the JSON result to
    ``out`` (default ``run/default_name``); known errors become one-line failures."""
    from cdsr.runs import RunDir

    if not RunDir(run).has_config():
        _fail(f"{run}: not a run directory (no config.json)")
    _output_file(out)
    try:
        res = compute()
    except (ConfigError, FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    dest = out or run / default_name
    dest.write_text(json.dumps(res, indent=2) + "\n")
    return res, dest


@app.command("evaluate")
def evaluate(
    run: Path = typer.Option(..., "--run", help="A run directory written by `cdsr train`."),
    protocol: list[str] = typer.Option(["full"], "--protocol", help="full, full-all, sampled-999, sampled-100 (repeatable)."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    exclude_history: Optional[bool] = typer.Option(None, "--exclude-history/--keep-history", help="Remove history items from full-ranking candidates."),
    out: Optional[Path] = typer.Option(None, "--out", help="Metrics JSON to write (default <run>/eval-<split>.json)."),
    set_: list[str] = typer.Option([], "--set", help="An inference-time model setting, e.g. model.t_inf=5 (DPG-Diff's reverse steps); parameters stay as trained."),
    input_window: Optional[str] = typer.Option(None, "--input-window", help="max_len or train: the events an evaluation input holds (default: the run's evaluate.input_window)."),
) -> None:
    """Evaluate a trained run's best checkpoint under named protocols; writes a metrics JSON."""
    from cdsr.train.run import evaluate_run

    m, dest = _run_json(run, out, f"eval-{split}.json",
                        lambda: evaluate_run(run, protocol, split, exclude_history, set_, input_window))
    for proto, res in m["protocols"].items():
        typer.echo(f"{proto:12s} " + " ".join(f"{k} {v:.4f}" for k, v in res["overall"].items() if k != "n"))
    typer.echo(f"metrics: {dest}")


def _flows():
    """Start what the Prefect flows need. The flows (``flows/`` at the project root) are installed
    with cdsr, so they import from any directory."""
    from cdsr.orchestrate import start_temporary_server

    start_temporary_server()  # Prefect's temporary server, ended by the kernel if this process is killed


@app.command("benchmark")
def benchmark(
    dataset: str = DATASET,
    method: list[str] = typer.Option([], "--method", help="Only these methods (default: benchmark.methods in params)."),
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
    executor: str = typer.Option("threads", "--executor", help="threads (this process) or work-pool (a flow run per method on the workers of the benchmark-method deployment; needs PREFECT_API_URL)."),
    deployment: str = typer.Option("benchmark-method/benchmark-method", "--deployment", help="The per-method deployment of the work-pool executor."),
) -> None:
    """Prefect benchmark flow: per method train -> evaluate -> robustness -> MLflow; writes metrics/<dataset>/."""
    _declared(dataset, params)
    _flows()
    from flows.benchmark import run_benchmark

    try:
        res = run_benchmark(dataset, str(params) if params else None, str(root), list(method) or None,
                            command=" ".join(["cdsr"] + sys.argv[1:]), executor=executor, deployment=deployment)
    except ConfigError as exc:
        _fail(str(exc))
    for m, r in res.items():
        typer.echo(f"{m:16s} {'ok: ' + r['metrics'] if r['ok'] else 'FAILED: ' + r['error']}")


@app.command("tune")
def tune(
    dataset: str = DATASET,
    model: list[str] = typer.Option([], "--model", "-m", help="Model(s) to tune (one study each)."),
    preset: list[str] = typer.Option([], "--preset", help="Preset(s) to tune from (one study each, named after the preset)."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Finished trials the study should reach (default tune.trials)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default tune.storage: sqlite:///optuna.db)."),
    worker: int = typer.Option(0, "--worker", help="Worker index when several workers share a study (seeds its sampler)."),
    worker_trials: Optional[int] = typer.Option(None, "--worker-trials", min=1, help="At most this many trials of this worker's own per study (default: no cap but --trials)."),
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
) -> None:
    """Prefect tune flow: an Optuna study per model or preset (TPE, Hyperband pruning by default, persistent, resumable)."""
    _declared(dataset, params)
    if not model and not preset:
        _fail("give --model and/or --preset")
    _flows()
    from flows.tune import tune_flow

    try:
        res = tune_flow(dataset, list(model), str(params) if params else None, trials, storage, worker, str(root),
                        presets=list(preset), worker_trials=worker_trials)
    except ConfigError as exc:
        _fail(str(exc))
    for m, best in res.items():
        typer.echo(f"{m}: best {best['value']:.4f} (trial {best['trial']}) {best['params']} -> {best['path']}")


@app.command("promote")
def promote(
    dataset: str = DATASET,
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
    metrics_dir: Path = typer.Option(Path("metrics"), "--metrics-dir"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the decision as JSON here."),
) -> None:
    """Prefect promote flow: the best benchmark model becomes cdsr-<dataset>@champion if it beats the
    champion on the champion's own metric, protocol and data version (values from the tracking store)."""
    _declared(dataset, params)
    _output_file(out)
    _flows()
    from flows.promote import promote_flow

    try:
        d = promote_flow(dataset, str(params) if params else None, str(metrics_dir), str(root), str(out) if out else None)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    for w in d.get("warnings", []):
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    if d["decision"] == "refused":
        typer.echo(f"{d['registered_model']}: refused: {d['reason']}")
    else:
        typer.echo(f"{d['registered_model']}: {d['decision']} version {d['candidate_version']} "
                   f"({d['candidate_method']}): {d['reason']}")


@app.command("recommend")
def recommend(
    dataset: str = DATASET,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model URI (default models:/cdsr-<dataset>@champion, pinned to its version)."),
    k: int = typer.Option(10, "--k", help="Items per user and domain (1..1000)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Parquet file (default recommendations/<dataset>.parquet)."),
    params: Optional[Path] = PARAMS,
    root: Path = ROOT,
) -> None:
    """Prefect recommend flow: the model's top-k of every domain for every user of the dataset's
    current build, to Parquet (model and data versions in the file's metadata)."""
    from mlflow.exceptions import MlflowException

    _declared(dataset, params)
    _flows()
    from flows.recommend import recommend_flow

    try:
        meta = recommend_flow(dataset, model, k, str(out) if out else None, str(params) if params else None, str(root))
    except (ConfigError, FileNotFoundError, MlflowException, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{meta['rows']} rows ({meta['users']} users) from {meta['model_uri']} on data "
               f"{meta['data_version'][:8]}: {meta['users_per_second']} users/s -> {out or f'recommendations/{dataset}.parquet'}")


@app.command("report")
def report(
    dataset: str = DATASET,
    metrics_dir: Path = typer.Option(Path("metrics"), "--metrics-dir"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default reports/<dataset>)."),
    params: Optional[Path] = PARAMS,
    log_mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Also log the report to MLflow."),
    runs: list[Path] = typer.Option([], "--runs", help="Also a leaderboard of the records / run directories under these paths (repeatable; e.g. --runs results, the results store)."),
    tuned_dir: Path = typer.Option(Path("tuned"), "--tuned-dir", help="Where `cdsr tune` wrote its studies' results."),
) -> None:
    """One HTML page (+ PNG plots) comparing the benchmarked methods of a dataset (and, with --runs, the leaderboard)."""
    import datetime

    _safe_name(dataset)
    from cdsr.leaderboard import build
    from cdsr.report import report_files, write_report

    out = out or Path("reports") / dataset
    ctx = {"generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "commands": ["dvc repro", " ".join(["cdsr"] + sys.argv[1:])]}
    try:
        html = write_report(dataset, metrics_dir / dataset, out, ctx,
                            leaderboard=build(runs, dataset, tuned_dir) if runs else None)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if log_mlflow:
        import mlflow

        from cdsr.track import tracking

        tcfg = tracking.tracking_config(load_params(params))
        tracking.setup(tcfg)
        tracking.use_experiment(dataset, tcfg)
        with mlflow.start_run(run_name=f"report/{dataset}", tags={"dataset": dataset, "cdsr.kind": "report"}):
            for f in report_files(out):
                mlflow.log_artifact(str(f), "report")
    typer.echo(f"report: {html}")


@app.command("leaderboard")
def leaderboard(
    dataset: str = DATASET,
    runs: list[Path] = typer.Option([Path("results")], "--runs", help="The results store and/or run directories to search for records / metrics.json (repeatable; default: the results store)."),
    tuned_dir: Path = typer.Option(Path("tuned"), "--tuned-dir", help="Where `cdsr tune` wrote its studies' results."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the markdown here."),
) -> None:
    """Every trained configuration of a dataset over its seeds (mean ± sd per domain), with the
    published best and the tuning studies, as markdown."""
    from cdsr.leaderboard import build, markdown

    _safe_name(dataset)
    _output_file(out)
    try:
        text = markdown(build(runs, dataset, tuned_dir))
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(text)
    if out:
        out.write_text(text + "\n")


analyze_app = typer.Typer(help="Analyses over sets of runs.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("orthogonality")
def analyze_orthogonality(
    dataset: str = DATASET,
    runs: list[Path] = typer.Option([], "--runs", help="Run directories (searched for history.json) instead of MLflow."),
    study: Optional[str] = typer.Option(None, "--study", help="Only the trials of this Optuna study (MLflow tag optuna.study)."),
    filter_string: str = typer.Option("", "--filter", help="An extra MLflow search filter, e.g. \"tags.method = 'gca'\"."),
    metric: str = typer.Option("NDCG@10", "--metric", help="Validation metric to plot against |cos(X, X')|."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default reports/<dataset>/orthogonality)."),
    params: Optional[Path] = PARAMS,
) -> None:
    """Validation performance against GCA's |cos(X, X')| over a set of runs (seeds 002/003's main figure)."""
    _safe_name(dataset)
    from cdsr.analysis import curves_from_dirs, curves_from_mlflow, write_analysis

    if runs:
        curves = curves_from_dirs(runs, metric)
    else:
        from cdsr.track import tracking

        tcfg = tracking.tracking_config(load_params(params))
        tracking.setup(tcfg)
        try:
            curves = curves_from_mlflow(tracking.experiment_name(dataset, tcfg), metric, study, filter_string)
        except FileNotFoundError as exc:
            _fail(str(exc))
    out = out or Path("reports") / dataset / "orthogonality"
    try:
        s = write_analysis(curves, metric, out)
    except ValueError as exc:
        _fail(str(exc))
    a, e = s["across_runs"], s["all_epochs"]
    typer.echo(f"{s['runs']} runs: |cos| vs val {metric}: across runs Spearman {a['spearman']:.3f} "
               f"(Pearson {a['pearson']:.3f}, n={a['n']}); all epochs Spearman {e['spearman']:.3f} (n={e['n']}); "
               f"mean within-run Spearman {s['within_runs_mean_spearman']:.3f} ({s['within_runs_n']} runs); "
               f"|cos| first epoch {s['cos_first_epoch_mean']:.3f} -> best epoch {s['cos_best_epoch_mean']:.3f}")
    typer.echo(f"written: {out}/orthogonality.png, points.csv, summary.json")


@analyze_app.command("ties")
def analyze_ties(
    run: Path = typer.Option(..., "--run", help="A run directory written by `cdsr train`."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    k: int = typer.Option(999, "--k", help="Negatives per target (the split must store at least K)."),
    draws: int = typer.Option(5, "--draws", help="Fresh negative draws for ABXI's estimator."),
    seed: int = typer.Option(1000, "--seed", help="Seed of the first fresh draw (draw r uses seed + r)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON to write (default <run>/ties-<split>.json)."),
) -> None:
    """cdsr's sampled-K (one stored draw, ties against the target) against ABXI's (a fresh draw
    per evaluation, ties in the target's favour) on one trained model."""
    from cdsr.evaluate.ties import compare_estimators, format_table

    if split not in ("test", "valid") or k < 1 or draws < 1:
        _fail("need --split test|valid, --k >= 1 and --draws >= 1")
    res, dest = _run_json(run, out, f"ties-{split}.json", lambda: compare_estimators(run, split, k, draws, seed))
    typer.echo(format_table(res))
    typer.echo(f"written: {dest}")


results_app = typer.Typer(help="The results store (results/<dataset>/<run>/, kept in git): finished runs' records, "
                          "the tables generated from them.", no_args_is_help=True)
app.add_typer(results_app, name="results")
RESULTS = typer.Option(Path("results"), "--results", help="The results store.")


@results_app.command("add")
def results_add(
    run: Path = typer.Option(..., "--run", help="A run directory written by `cdsr train` (runs/<dataset>/<name>)."),
    name: Optional[str] = typer.Option(None, "--name", help="The record's name (default: the run directory's)."),
    partial: bool = typer.Option(False, "--partial", help="An unfinished run: score its best checkpoint so far and record it as partial (its trajectory so far included)."),
    command: Optional[str] = typer.Option(None, "--command", help="The command that trains the run (default: the one its directory records)."),
    results: Path = RESULTS,
) -> None:
    """Write a run's record to the store (a finished run's metrics.json, or with --partial the
    best checkpoint so far of a run still training)."""
    from cdsr.runs import RunDir
    from cdsr.store import StoreError, partial_metrics
    from cdsr.train.run import load_split

    rd = RunDir(run)
    if not rd.has_config():
        _fail(f"{run}: not a run directory (no config.json)")
    try:
        if partial:
            spec = rd.spec()
            metrics = partial_metrics(rd, load_split(spec.dataset, spec.data_root))
        elif not rd.has_metrics():
            raise StoreError(f"{run}: no metrics.json (not finished); --partial records a run still training")
        else:
            metrics = rd.metrics()
    except (StoreError, FileNotFoundError) as exc:
        _fail(str(exc))
    _record(rd, metrics, results, name, "partial" if partial else "finished", command=command)


@results_app.command("rename")
def results_rename(dataset: str = typer.Option(..., "--dataset", "-d"), old: str = typer.Argument(...),
                   new: str = typer.Argument(...), results: Path = RESULTS) -> None:
    """Rename a record (its directory and name), e.g. before a default changes so that a preset's
    name goes on meaning its current configuration."""
    from cdsr.store import Store, StoreError

    try:
        rec = Store(results).rename(dataset, old, new)
    except StoreError as exc:
        _fail(str(exc))
    typer.echo(f"renamed: {rec.path}")


@results_app.command("list")
def results_list(dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="One dataset (default: all)."),
                 results: Path = RESULTS) -> None:
    """Every record: name, status (finished / partial; stale when written under older behaviour
    versions), key, epochs, wall time, precision and CPU."""
    from cdsr.store import Store

    store = Store(results)
    names = [dataset] if dataset else sorted(p.name for p in results.glob("*") if p.is_dir())
    for d in names:
        for r in store.records(d):
            hw = r.meta.get("machine") or {}
            wall = r.meta.get("wall_seconds")
            typer.echo(f"{d}/{r.name:40s} {r.status + (' STALE' if r.stale else ''):16s} {r.key} "
                       f"epochs {r.meta.get('epochs')} wall {('%.0f s' % wall) if wall is not None else 'n/a'} "
                       f"{hw.get('precision', '?')} {hw.get('cpu', '?')}")


@results_app.command("docs")
def results_docs(check: bool = typer.Option(False, "--check", help="Change nothing; exit 1 if a generated table is out of date."),
                 docs: Path = typer.Option(Path("docs"), "--docs", help="Markdown files (a folder is searched) to regenerate."),
                 results: Path = RESULTS, tuned_dir: Path = typer.Option(Path("tuned"), "--tuned-dir")) -> None:
    """Regenerate the tables between `<!-- cdsr:leaderboard ... -->` markers in the docs from the store."""
    from cdsr.docs_tables import DocsError, render_tree

    try:
        changed = render_tree(docs, results, tuned_dir, write=not check)
    except DocsError as exc:
        _fail(str(exc))
    for f in changed:
        typer.echo(f"{'out of date' if check else 'regenerated'}: {f}")
    if check and changed:
        raise typer.Exit(1)


campaign_app = typer.Typer(help="Campaigns (params.yaml `campaigns:`): lists of runs that skip what the results store "
                           "holds and resume what runs/ has.", no_args_is_help=True)
app.add_typer(campaign_app, name="campaign")


@campaign_app.command("plan")
def campaign_plan(name: str = typer.Argument(..., help="A campaign declared in params.yaml."),
                  params: Optional[Path] = PARAMS, root: Path = ROOT, results: Path = RESULTS,
                  runs_dir: Path = typer.Option(Path("runs"), "--runs-dir")) -> None:
    """Each run's state and the campaign's remaining cost, from the measured epoch times in the store."""
    from cdsr import campaign
    from cdsr.store import Store

    p = load_params(params)
    try:
        camp = campaign.campaign_config(p, name)
        store = Store(results)
        runs = campaign.expand(p, camp, runs_dir, root, store)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(campaign.format_plan(campaign.plan(p, camp, runs, store)))


@campaign_app.command("run")
def campaign_run(name: str = typer.Argument(..., help="A campaign declared in params.yaml."),
                 params: Optional[Path] = PARAMS, root: Path = ROOT, results: Path = RESULTS,
                 runs_dir: Path = typer.Option(Path("runs"), "--runs-dir"),
                 commit: bool = typer.Option(False, "--commit", help="git-commit each record as its run finishes."),
                 only: list[str] = typer.Option([], "--only", help="Only these runs, by the names `campaign plan` lists (seed included: NAME-sS; repeatable).")) -> None:
    """Train the campaign's runs that have no current record, one at a time; each record is
    written (and with --commit committed) as its run finishes. Re-run to continue."""
    from cdsr import campaign
    from cdsr.store import Store, StoreError

    _progress_log()
    try:
        done = campaign.run(load_params(params), name, Store(results), runs_dir, root, commit, typer.echo, only)
    except (ConfigError, FileNotFoundError, StoreError) as exc:
        _fail(str(exc))
    typer.echo(f"{len(done)} run(s) trained")


study_app = typer.Typer(help="Method studies: a declarative grid of variants, trained over seeds and reported as markdown.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")
STUDY_DATASET = typer.Option(None, "--dataset", "-d", help="Dataset (default: the study's own, see `cdsr study list`).")
STUDY_OUT = typer.Option(None, "--out", "-o", help="Runs folder: <out>/<dataset>/<variant>-s<seed> (default: the study's own).")
STUDY_NAME = typer.Argument(..., help="A study (see `cdsr study list`).")
STUDY_SEEDS = typer.Option([], "--seeds", help="Seeds, repeated or comma-separated: --seeds 1,2,3 (default: the study's).")
STUDY_VARIANTS = typer.Option([], "--variants", help="Variants of the grid, repeated or comma-separated (default: all).")
STUDY_SETS = typer.Option([], "--set", help="Override a param in every run (after the study's own): train.epochs=1, model.d=8.")


def _split_list(values: list[str]) -> list[str]:
    """Repeated and/or comma-separated option values: ``--seeds 1,2 --seeds 3`` -> 1, 2, 3."""
    return [v for item in values for v in item.replace(",", " ").split()]


def _study(name: str):
    from cdsr.studies import StudyError, get

    try:
        return get(name)
    except StudyError as exc:
        _fail(str(exc))


@study_app.command("list")
def study_list() -> None:
    """List the studies (name first): default dataset, output folder and variants."""
    from cdsr.studies import STUDIES

    for name, st in STUDIES.items():
        typer.echo(f"{name:10s} {st.dataset:32s} {st.out:16s} {', '.join(st.grid)}")


@study_app.command("run")
def study_run(
    name: str = STUDY_NAME,
    dataset: str | None = STUDY_DATASET,
    seeds: list[str] = STUDY_SEEDS,
    variants: list[str] = STUDY_VARIANTS,
    sets: list[str] = STUDY_SETS,
    out: Path | None = STUDY_OUT,
    params: Path | None = PARAMS,
    root: Path = ROOT,
) -> None:
    """Train every missing (variant, seed) of a study's grid into <out>/<dataset>/<variant>-s<seed>
    (a finished run is skipped, an interrupted one resumes); `cdsr study report` prints the tables."""
    from cdsr.studies import StudyError
    from cdsr.studies.grid import train_grid

    st = _study(name)
    dataset = dataset or st.dataset
    base = _declared(dataset, params)
    try:
        seed_list = [int(s) for s in _split_list(seeds)]
    except ValueError:
        _fail(f"--seeds {' '.join(seeds)}: expected integers")
    _progress_log()
    out = out or Path(st.out)
    try:
        trained = train_grid(st, dataset, out, base, seed_list, _split_list(variants), sets, root, log=typer.echo)
    except (StudyError, ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{len(trained)} run(s) trained under {out / dataset}; tables: "
               f"cdsr study report {name} --dataset {dataset} --out {out}")


@study_app.command("report")
def study_report(
    name: str = STUDY_NAME,
    dataset: str | None = STUDY_DATASET,
    out: Path | None = STUDY_OUT,
    root: Path = ROOT,
) -> None:
    """Print a study's report (markdown) over its finished runs; study-specific extras a run
    lacks (attention mass, inference-step sweeps, robustness) are computed and cached first."""
    st = _study(name)
    dataset = _safe_name(dataset or st.dataset)
    try:
        text = st.report(st, dataset, out or Path(st.out), root)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(text)


@app.command("serve")
def serve(
    model: str = typer.Option(..., "--model", "-m", help="Model URI: models:/cdsr-<dataset>@champion, runs:/<run id>/model or a path."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default serve.host: 127.0.0.1, this machine only)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default serve.port: 5001)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="uvicorn worker processes (default serve.workers: 1)."),
    params: Optional[Path] = PARAMS,
) -> None:
    """Serve a logged model over HTTP: MLflow's scoring app (/invocations, /ping) with request limits (params `serve:`)."""
    from mlflow.exceptions import MlflowException

    from cdsr.track.serve import load_serve_params, run, serve_config

    try:
        p = load_serve_params(params)
        cfg = serve_config(p, host=host, port=port, workers=workers)
        run(model, cfg, p, log=typer.echo)
    except (ConfigError, MlflowException) as exc:
        _fail(str(exc))


def main() -> None:
    """The ``cdsr`` console script: the app, with a file-system error (a path that cannot be read
    or written) reported as one clear line instead of a traceback."""
    try:
        app()
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        typer.secho(f"error: {where}{exc.strerror or exc}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
