"""`cdsr analyze orthogonality`: correlations against hand-computed values, and the two sources
(run directories; the MLflow trials of a real Optuna study of the GCA model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdsr.analysis import RunCurve, analyse, curve_from_history, rank_correlation

runner = CliRunner()


def test_rank_correlation_against_hand_values():
    assert rank_correlation([1, 2, 3, 4], [2, 4, 6, 9])["spearman"] == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [8, 6, 4, 2])["pearson"] == pytest.approx(-1.0)
    # ties share their mean rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3)
    r = rank_correlation([1, 2, 2, 3], [1, 2, 3, 4])["spearman"]
    rx, ry = [0, 1.5, 1.5, 3], [0, 1, 2, 3]
    mx, my = sum(rx) / 4, sum(ry) / 4
    want = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert r == pytest.approx(want)
    assert math.isnan(rank_correlation([1, 2], [3, 4])["spearman"])
    assert math.isnan(rank_correlation([1, 1, 1], [3, 4, 5])["pearson"])


def test_analyse_uses_each_runs_best_epoch():
    hist = [{"epoch": 0, "val_cos": 0.5, "val_NDCG@10": 0.10}, {"epoch": 1, "val_cos": 0.3, "val_NDCG@10": 0.20},
            {"epoch": 2, "val_cos": 0.2, "val_NDCG@10": 0.15}, {"epoch": 3, "loss": 1.0}]
    c = curve_from_history("a", hist, "NDCG@10")
    assert c.epochs == [0, 1, 2] and c.best == 1
    assert curve_from_history("host", [{"epoch": 0, "val_NDCG@10": 0.1}], "NDCG@10") is None  # no GCA: no |cos|
    curves = [c, RunCurve("b", [0, 1], [0.6, 0.4], [0.05, 0.08]), RunCurve("c", [0], [0.1], [0.3])]
    s = analyse(curves, "NDCG@10")
    assert s["runs"] == 3 and s["across_runs"]["n"] == 3
    assert s["across_runs"]["spearman"] == pytest.approx(-1.0)  # best points (0.3, .2), (0.4, .08), (0.1, .3)
    assert s["within_runs_n"] == 1 and s["within_runs_mean_spearman"] == pytest.approx(rank_correlation(c.cos, c.metric)["spearman"])
    assert s["cos_best_epoch_mean"] == pytest.approx((0.3 + 0.4 + 0.1) / 3)
    with pytest.raises(ValueError, match="no run"):
        analyse([], "NDCG@10")


def test_cli_over_run_directories(tmp_path):
    from cdsr.cli import app

    for i, (cos, ndcg) in enumerate([(0.4, 0.1), (0.3, 0.2), (0.2, 0.25)]):
        d = tmp_path / "runs" / f"r{i}"
        d.mkdir(parents=True)
        (d / "history.json").write_text(json.dumps([{"epoch": 0, "val_cos": cos + 0.1, "val_NDCG@10": ndcg / 2},
                                                    {"epoch": 1, "val_cos": cos, "val_NDCG@10": ndcg}]))
        (d / "config.json").write_text(json.dumps({"model": "gca", "seed": i, "model_config": {"gca_layers": [0], "gate": "tanh"}}))
    res = runner.invoke(app, ["analyze", "orthogonality", "--dataset", "t", "--runs", str(tmp_path / "runs"),
                              "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "3 runs" in res.output and "across runs Spearman -1.000" in res.output
    assert (tmp_path / "out" / "orthogonality.png").stat().st_size > 1000
    rows = (tmp_path / "out" / "points.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("run,epoch,cos,val_NDCG@10,best_epoch")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["runs"] == 3
    empty = runner.invoke(app, ["analyze", "orthogonality", "--dataset", "t", "--runs", str(tmp_path / "out")])
    assert empty.exit_code == 1 and "no run with a |cos" in empty.output


def test_cli_over_the_trials_of_an_optuna_study(tmp_path, tiny_root, monkeypatch):
    """A real 2-trial study of `gca` logs |cos| per epoch to MLflow; the analysis reads it back."""
    from cdsr.cli import app
    from cdsr.config import from_dict
    from cdsr.tune import TuneConfig, tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = {
        "train": {"epochs": 3, "batch_size": 64, "progress": False, "patience": 10},
        "evaluate": {"protocols": ["full"], "max_len": 20},
        "models": {"gca": {"d": 16, "layers": 1, "heads": 1, "max_len": 20, "gca_layers": [0]}},
        "tune": {"storage": f"sqlite:///{tmp_path}/optuna.db", "trials": 2, "epochs": 3,
                 "runs_dir": str(tmp_path / "runs"), "tuned_dir": str(tmp_path / "tuned"),
                 "pruner": {"n_startup_trials": 5, "n_warmup_steps": 0},
                 "search_space": {"gca": {"train.lr": {"low": 0.001, "high": 0.01, "log": True},
                                          "model.gate": {"choices": ["sigmoid", "tanh"]}}}},
        "mlflow": {"experiment_prefix": "orth"},
    }
    tune("t", "gca", params, from_dict(TuneConfig, params["tune"], "tune"), trials=2, data_root=tiny_root)
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    res = runner.invoke(app, ["analyze", "orthogonality", "--dataset", "t", "--study", "t/gca",
                              "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "2 runs" in res.output
    rows = (tmp_path / "out" / "points.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # 2 trials x 3 epochs
    other = runner.invoke(app, ["analyze", "orthogonality", "--dataset", "t", "--study", "nope",
                                "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o2")])
    assert other.exit_code == 1


def test_points_csv_marks_the_best_epoch(tmp_path):
    from cdsr.analysis import write_analysis

    write_analysis([RunCurve("x", [0, 1, 2], [0.3, 0.2, 0.25], [0.1, 0.3, 0.2], {"gate": "tanh"})], "NDCG@10", tmp_path)
    rows = [r.split(",") for r in (tmp_path / "points.csv").read_text().splitlines()[1:]]
    assert [r[4] for r in rows] == ["0", "1", "0"] and rows[0][-1] == "tanh"
    assert Path(tmp_path / "summary.json").exists()
