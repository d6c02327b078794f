"""The entry points: `cdsr` CLI, the Prefect data flow, and `dvc repro` from a clean clone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdsr.cli import app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
runner = CliRunner()


def test_help_lists_the_data_commands():
    res = runner.invoke(app, ["data", "--help"])
    assert res.exit_code == 0
    for cmd in ("build", "ingest", "validate", "sequences", "split", "list"):
        assert cmd in res.output


def test_data_build_synthetic_and_list(tmp_path, in_root):
    res = runner.invoke(app, ["data", "build", "--dataset", "synthetic", "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "quarantined rows are in" in res.output and "empty_user_id" in res.output
    stats = json.loads((tmp_path / "synthetic" / "processed" / "stats.json").read_text())
    for key in ("users", "items_per_domain", "events_per_domain", "mean_length", "delta"):
        assert key in stats
    rep = json.loads((tmp_path / "synthetic" / "interim" / "ingest_report.json").read_text())
    assert rep["rows_read"] == rep["rows_kept"] + rep["rows_quarantined"] + rep["rows_duplicate"]
    manifest = json.loads((tmp_path / "synthetic" / "raw" / "manifest.json").read_text())
    assert rep["rows_quarantined"] == manifest["malformed_rows"]  # every planted bad row, nothing else
    assert rep["rows_duplicate"] >= manifest["duplicate_rows"]
    listed = runner.invoke(app, ["data", "list", "--root", str(tmp_path)])
    assert "synthetic" in listed.output and "built:" in listed.output


def test_errors_are_readable_and_exit_non_zero(tmp_path, in_root):
    res = runner.invoke(app, ["data", "build", "--dataset", "nope"])
    assert res.exit_code == 1 and "dataset 'nope' is not declared" in res.output
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["broken"] = {"sources": [{"format": "ratings-csv-2014", "path": str(tmp_path / "missing" / "*.csv")}]}
    params["datasets"]["typo"] = {"sources": [], "ingest": {"duplicate": "drop"}}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    res = runner.invoke(app, ["data", "build", "--dataset", "broken", "--params", str(p), "--root", str(tmp_path)])
    assert res.exit_code == 1 and "raw directory" in res.output and "does not exist" in res.output
    res = runner.invoke(app, ["data", "ingest", "--dataset", "typo", "--params", str(p)])
    assert res.exit_code == 1 and "unknown key(s) ['duplicate']" in res.output


def test_prefect_data_flow_builds_a_dataset(tmp_path, in_root):
    from flows.data import data_build

    out = data_build(["synthetic"], data_root=str(tmp_path))
    assert out["synthetic"]["ok"] and (tmp_path / "synthetic" / "processed" / "negatives.parquet").exists()


def _lock_md5(lock: dict, suffix: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
            if o["path"].endswith(suffix)}


def test_dvc_repro_from_a_clean_clone_is_deterministic(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not available")
    clone = tmp_path / "cdsr"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # the data stages only: the benchmark stage after them is covered by the orchestration tests
    res = subprocess.run([str(BIN / "dvc"), "repro", "split@synthetic"], cwd=clone, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (clone / "data" / "synthetic" / "processed" / "split.parquet").exists()
    again = subprocess.run([str(BIN / "dvc"), "repro", "split@synthetic"], cwd=clone, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout
    committed = yaml.safe_load(subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=ROOT, capture_output=True,
                                              text=True, check=True).stdout)
    rebuilt = yaml.safe_load((clone / "dvc.lock").read_text())
    # the same seed gives byte-identical data
    assert _lock_md5(rebuilt, ".parquet") == _lock_md5(committed, ".parquet")
    # and byte-identical reports: timings live in untracked files, so every data stage's entry of the
    # lock file (validation folders, ingest report, stats) is the one committed
    stages = [k for k in rebuilt["stages"] if k.split("@")[0] in ("generate", "ingest", "validate", "sequences",
                                                                  "split")]
    assert len(stages) == 5
    assert {k: rebuilt["stages"][k] for k in stages} == {k: committed["stages"].get(k) for k in stages}
