"""The data stages of one dataset, as called by `dvc repro` and `cdsr data build`.

Layout under ``<root>/<dataset>/`` (root = ``data`` by default)::

    raw/                          generated raw files (synthetic only; real data is read in place)
    interim/interactions.parquet  canonical events            (ingest)
    interim/quarantine.parquet    rejected rows + reason      (ingest)
    interim/duplicates.parquet    exact duplicates dropped    (ingest)
    interim/ingest_report.json    the row account             (ingest)
    interim/validation/           validation.json + data_docs/ (validate: interactions)
    processed/sequences.parquet, items.parquet, users.parquet, stats.json   (sequences)
    processed/validation/         validation.json + data_docs/ (sequences: sequence tables)
    processed/split.parquet, negatives.parquet, split.json                 (split)

The files above are the same bytes for the same inputs (DVC tracks them). The wall times are in
``interim/ingest_timing.json``, ``interim/validation_timing.json`` and
``processed/validation_timing.json``, which DVC does not track (cdsr.data.timing).
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cdsr.data.config import DatasetConfig


@dataclass(frozen=True)
class DatasetPaths:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def interim(self) -> Path:
        return self.root / "interim"

    @property
    def processed(self) -> Path:
        return self.root / "processed"


def paths(cfg: DatasetConfig, data_root: str | Path = "data") -> DatasetPaths:
    return DatasetPaths(Path(data_root) / cfg.name)


def stage_generate(cfg: DatasetConfig, data_root: str | Path = "data") -> dict:
    from cdsr.data.synthetic import write_raw

    if cfg.generator is None:
        raise ValueError(f"dataset '{cfg.name}' has no generator (it reads real raw files)")
    return write_raw(cfg.generator, paths(cfg, data_root).raw)


def with_data_root(cfg: DatasetConfig, data_root: str | Path) -> DatasetConfig:
    """Substitute ``{data_root}`` in source paths (generated datasets read their own raw/); the
    root is glob-escaped, so a ``[`` or ``*`` in it is a character, not a pattern."""
    root = glob.escape(str(data_root))
    sources = [replace(s, path=s.path.replace("{data_root}", root)) for s in cfg.sources]
    return replace(cfg, sources=sources)


def stage_ingest(cfg: DatasetConfig, data_root: str | Path = "data") -> dict:
    from cdsr.data.ingest import ingest

    return ingest(with_data_root(cfg, data_root), paths(cfg, data_root).interim)


def stage_validate(cfg: DatasetConfig, data_root: str | Path = "data") -> dict:
    from cdsr.data.validate import validate_interactions_file

    p = paths(cfg, data_root)
    return validate_interactions_file(p.interim / "interactions.parquet", cfg, p.interim / "validation",
                                      p.interim / "validation_timing.json")


def stage_sequences(cfg: DatasetConfig, data_root: str | Path = "data") -> dict:
    from cdsr.data.sequences import build_sequences, write_sequences
    from cdsr.data.validate import validate_sequence_tables

    p = paths(cfg, data_root)
    p.processed.mkdir(parents=True, exist_ok=True)
    tables = build_sequences(p.interim / "interactions.parquet", cfg, work_dir=p.processed)
    validate_sequence_tables(tables.sequences, tables.items, cfg, p.processed / "validation",
                             p.processed / "validation_timing.json")
    write_sequences(tables, p.processed)
    return tables.stats


def stage_split(cfg: DatasetConfig, data_root: str | Path = "data") -> dict:
    from cdsr.data.sequences import read_sequences
    from cdsr.data.split import build_and_write_split

    p = paths(cfg, data_root)
    seqs, items = read_sequences(p.processed)
    return build_and_write_split(seqs, items, cfg, p.processed)


STAGES: dict[str, Callable[[DatasetConfig, str | Path], dict]] = {
    "generate": stage_generate,
    "ingest": stage_ingest,
    "validate": stage_validate,
    "sequences": stage_sequences,
    "split": stage_split,
}


def build(cfg: DatasetConfig, data_root: str | Path = "data", log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every data stage of one dataset in order (generate only for generated datasets)."""
    order = (["generate"] if cfg.generator is not None else []) + ["ingest", "validate", "sequences", "split"]
    results = {}
    for name in order:
        t0 = time.time()
        results[name] = STAGES[name](cfg, data_root)
        log(f"[{cfg.name}] {name}: {summarise(name, results[name])} ({time.time() - t0:.1f} s)")
    return results


def summarise(stage: str, res: dict) -> str:
    if stage == "generate":
        return f"{res['events']} events, {res['malformed_rows']} malformed + {res['duplicate_rows']} duplicate rows planted"
    if stage == "ingest":
        reasons = ", ".join(f"{k} {v}" for k, v in res["quarantine_reasons"].items()) or "none"
        return (f"read {res['rows_read']} = kept {res['rows_kept']} + quarantined {res['rows_quarantined']} "
                f"+ duplicate {res['rows_duplicate']} (quarantine reasons: {reasons})")
    if stage == "validate":
        return "interactions valid (GX + pandera)"
    if stage == "sequences":
        return (f"{res['users']} users, items {res['items_per_domain']}, events {res['events_per_domain']}, "
                f"mean length {res['mean_length']:.2f}, delta {res['delta']:.3f}")
    if stage == "split":
        extra = ""
        if res.get("scheme") == "timestamp":
            dropped = res["timestamp_split"]["dropped_no_training_events"]
            extra = f", dropped {dropped['users']} users without training events ({dropped['targets']} targets)"
        return (f"{res.get('scheme', 'leave-one-out')} targets {res['targets']}{extra}, "
                f"negatives {list(res['protocols'])} (seed {res['seed']})")
    return ""
