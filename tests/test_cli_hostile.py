"""The command line under hostile arguments: a run directory never mixes two configurations,
only declared dataset names reach a path, and a bad ``--out`` is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.config import ConfigError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.d=16", "--set", "model.layers=1", "--set", "model.max_len=20", "--set", "evaluate.max_len=20",
         "--set", "evaluate.protocols=[full]", "--set", "train.progress=false"]


def _train(tiny_root: Path, params: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "--dataset", "t", "--params", str(params), "--root", str(tiny_root),
                               "--model", "sasrec", "--seed", "1", "--out", str(out), *SMALL, *extra])


def test_a_run_directory_never_mixes_two_configurations(tmp_path, tiny_root, tiny_params, in_root):
    out = tmp_path / "run"
    first = _train(tiny_root, tiny_params, out, "--epochs", "1")
    assert first.exit_code == 0, first.output
    files = ("config.json", "metrics.json", "best.pt", "last.pt")
    before = {f: (out / f).read_bytes() for f in files}

    # other settings into the finished run: refused, naming the keys; nothing in the directory changes
    res = _train(tiny_root, tiny_params, out, "--epochs", "1", "--set", "train.lr=0.0005", "--set", "model.dropout=0.35")
    assert res.exit_code == 1
    assert "holds a run of another configuration" in res.output
    assert "train.lr: 0.002 -> 0.0005" in res.output and "model_config.dropout" in res.output and "0.35" in res.output
    assert {f: (out / f).read_bytes() for f in files} == before

    # the same settings reuse it (same numbers); a longer budget continues it, a shorter one is refused
    same = _train(tiny_root, tiny_params, out, "--epochs", "1")
    assert same.exit_code == 0, same.output
    assert (out / "best.pt").read_bytes() == before["best.pt"]
    assert json.loads((out / "metrics.json").read_text())["protocols"] == \
        json.loads(before["metrics.json"])["protocols"]
    longer = _train(tiny_root, tiny_params, out, "--epochs", "2")
    assert longer.exit_code == 0, longer.output
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
    shorter = _train(tiny_root, tiny_params, out, "--epochs", "1")
    assert shorter.exit_code == 1 and "train.epochs: 2 -> 1" in shorter.output


def test_a_setting_whose_default_changed_is_compared_with_its_old_behaviour(tmp_path):
    """abxi's model.positions arrived with default last; a run stored before it ran with first."""
    from cdsr.runs import RunDir, RunDirError

    prepare_run_dir = RunDir.prepare

    out = tmp_path / "run"
    out.mkdir()
    old = {"model": "abxi", "train": {"lr": 0.001}, "model_config": {"d": 16}}
    (out / "config.json").write_text(json.dumps(old))
    (out / "metrics.json").write_text("{}")  # a finished run
    with pytest.raises(RunDirError, match="model_config.positions: 'first' -> 'last'"):
        prepare_run_dir(RunDir(out), {**old, "model_config": {"d": 16, "positions": "last"}})
    prepare_run_dir(RunDir(out), {**old, "model_config": {"d": 16, "positions": "first"}})  # the same run
    prepare_run_dir(RunDir(out), {**old, "model_config": {"d": 16, "loss_average": "position"}})  # a plain new key


def test_a_run_of_other_data_is_not_reused(tmp_path, tiny_root, tiny_params, in_root):
    """The data version (MD5 of the split files) is part of a run's configuration."""
    import shutil

    out = tmp_path / "run"
    assert _train(tiny_root, tiny_params, out, "--epochs", "1").exit_code == 0
    other = tmp_path / "data"
    shutil.copytree(tiny_root / "t", other / "t")
    neg = other / "t" / "processed" / "negatives.parquet"
    import polars as pl

    df = pl.read_parquet(neg)
    df.head(len(df) - 1).write_parquet(neg)  # a rebuilt split with other negatives
    res = _train(other, tiny_params, out, "--epochs", "1")
    assert res.exit_code == 1 and "data_version.negatives.parquet" in res.output


@pytest.mark.parametrize("command", [
    ["train", "--model", "sasrec"],
    ["benchmark"],
    ["tune", "--model", "sasrec"],
    ["promote"],
    ["data", "build"],
    ["data", "ingest"],
])
def test_only_declared_dataset_names_are_accepted(tmp_path, command):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    res = runner.invoke(app, [*command, "--dataset", "../../evil", "--params", str(ROOT / "params.yaml"),
                              "--root", str(work / "data")])
    assert res.exit_code == 1, res.output
    assert "'../../evil' is not declared under 'datasets:'" in res.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing read or written


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x\x00y"])
def test_a_dataset_name_is_one_plain_path_component(name):
    from cdsr.data.config import dataset_config

    with pytest.raises(ConfigError, match="is not allowed"):
        dataset_config({"datasets": {name: {"sources": [{"format": "ratings-csv-2014", "path": "x.csv"}]}}}, name)
    res = runner.invoke(app, ["report", "--dataset", name or "..", "--no-mlflow"])
    assert res.exit_code == 1 and "is not allowed" in res.output


def test_an_out_that_is_a_file_or_dev_null_is_a_clear_error(tmp_path, tiny_root, tiny_params, in_root):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    for out in (f, Path("/dev/null")):
        res = _train(tiny_root, tiny_params, out, "--epochs", "1")
        assert res.exit_code == 1, res.output
        assert f"{out}: exists and is not a directory" in res.output
        assert not isinstance(res.exception, OSError)
    assert f.read_text() == "keep me"

    run = tmp_path / "run"
    assert _train(tiny_root, tiny_params, run, "--epochs", "1").exit_code == 0
    res = runner.invoke(app, ["evaluate", "--run", str(run), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "is a directory" in res.output
    # any other file-system error of the console script is one line, not a traceback
    proc = subprocess.run([str(Path(sys.executable).parent / "cdsr"), "evaluate", "--run", str(run), "--out", "/dev/full"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "No space left on device" in proc.stderr


def test_params_for_a_declared_dataset_reach_the_flows(tmp_path, tiny_root):
    """The declared-name rule applies to `python flows/benchmark.py` too."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {}}))
    proc = subprocess.run([sys.executable, "flows/benchmark.py", "--dataset", "../x", "--params", str(params),
                           "--root", str(tiny_root)], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "'../x' is not declared" in proc.stderr
