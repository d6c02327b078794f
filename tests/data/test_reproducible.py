"""The data stages' DVC outputs are a function of their inputs: two builds of the tiny synthetic
dataset write byte-identical files (so `dvc repro` in a fresh clone leaves dvc.lock unchanged);
the wall times go to *_timing.json files that DVC does not track."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from helpers import TINY, make_cfg

from cdsr.data.build import build

ROOT = Path(__file__).resolve().parents[2]
DATA_STAGES = ("ingest", "validate", "sequences", "split")
TIMING_FILES = ("interim/ingest_timing.json", "interim/validation_timing.json", "processed/validation_timing.json")


def _tracked_paths(key: str) -> list[str]:
    """The outs and metrics of the foreach data stages of dvc.yaml, for dataset ``key``,
    relative to ``data/<key>``."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name in DATA_STAGES:
        do = stages[name]["do"]
        for entry in do.get("outs", []) + do.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            out.append(path.replace("${key}", key).removeprefix(f"data/{key}/"))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_builds_write_byte_identical_dvc_outputs(tmp_path, monkeypatch):
    cfg = make_cfg(**TINY)
    trees = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)  # a relative data root, as `dvc repro` runs the stages
        build(cfg, "data", log=lambda s: None)
        trees.append(_files(tmp_path / run / "data" / "t"))
    a, b = trees
    timing = {k for k in a if k.endswith("_timing.json")}
    assert timing == set(TIMING_FILES)
    for k in TIMING_FILES:  # the wall times are kept, out of the tracked files
        t = json.loads(a[k])
        assert t["elapsed_s"] >= 0 and t["started_at"].endswith("Z")
    tracked = _tracked_paths("t")
    assert tracked and not any(p.endswith("_timing.json") for p in tracked)
    for p in tracked:  # every DVC output of the data stages exists (a folder: its files)
        assert p in a or any(k.startswith(p + "/") for k in a), p
    assert sorted(set(a) - timing) == sorted(set(b) - timing)
    differ = [k for k in a if k not in timing and a[k] != b[k]]
    assert not differ, f"not reproducible: {differ}"
    # the reports keep their content and lose only the wall time
    report = json.loads(a["interim/ingest_report.json"])
    assert "elapsed_s" not in report
    assert report["rows_read"] == report["rows_kept"] + report["rows_quarantined"] + report["rows_duplicate"]
    assert report["rows_quarantined"] == TINY["generator"]["malformed_rows"] and report["quarantine_reasons"]
    for v in ("interim/validation/validation.json", "processed/validation/validation.json"):
        saved = json.loads(a[v])
        assert saved["success"] and saved["great_expectations"] and "elapsed_s" not in saved
    docs = [k for k in a if k.startswith("interim/validation/data_docs/validations/")]
    assert docs and all("/cdsr/19700101T000000.000000Z/" in k for k in docs)  # GX's fixed run id
