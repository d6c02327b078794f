"""The `cdsr` command line. Thin: every command calls the same functions as the DVC stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

import cdsr  # noqa: F401  (offline settings first)
from cdsr.config import ConfigError, load_params

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


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
