"""The tie rule of sampled ranks and the estimator comparison (`cdsr analyze ties`)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.evaluate.metrics import ranks_sampled

runner = CliRunner()


def test_the_two_tie_rules_by_hand():
    # target 0.5; negatives: 0.9 (above), 0.5 (tie), 0.5 (tie), 0.1 (below), 7.0 (padding: ignored)
    s = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 7.0]])
    n = torch.tensor([4])
    assert ranks_sampled(s, n).tolist() == [4]  # 1 + above + both ties
    assert ranks_sampled(s, n, "pessimistic").tolist() == [4]
    assert ranks_sampled(s, n, "optimistic").tolist() == [2]  # 1 + strictly above
    nan = torch.tensor([[float("nan"), 0.1, 0.2]])
    assert ranks_sampled(nan, torch.tensor([2]), "optimistic").tolist() == [3]  # a NaN target ranks last either way
    with pytest.raises(ValueError, match="ties"):
        ranks_sampled(s, n, "random")


def test_analyze_ties_on_a_trained_run(tmp_path, tiny_root, tiny_params, in_root):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root),
                              "--model", "sasrec", "--epochs", "1", "--seed", "1", "--out", str(out),
                              "--set", "model.d=16", "--set", "model.max_len=20", "--set", "evaluate.max_len=20",
                              "--set", "evaluate.protocols=[sampled-100]", "--set", "train.progress=false",
                              "--set", "train.val_protocol=sampled-100"])
    assert res.exit_code == 0, res.output
    args = ["analyze", "ties", "--run", str(out), "--k", "100", "--draws", "3", "--seed", "7"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    t = json.loads((out / "ties-test.json").read_text())
    m = json.loads((out / "metrics.json").read_text())["protocols"]["sampled-100"]["domains"]
    for dom, vals in t["stored_pessimistic"].items():  # exactly the benchmark's sampled-100 numbers
        for key in ("HR@5", "HR@10", "NDCG@10", "MRR"):
            assert vals[key] == pytest.approx(m[dom][key], abs=1e-12)
            assert t["stored_optimistic"][dom][key] >= vals[key] - 1e-12  # ties can only help the target
            r = t["redraw_optimistic"][dom][key]
            assert 0 <= r["mean"] <= 1 and r["std"] >= 0
    assert t["redraw_seeds"] == [7, 8, 9] and t["rows"] > 0
    runner.invoke(app, args + ["--out", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["redraw_optimistic"] == t["redraw_optimistic"]  # seeded
    gaps = [abs(t["stored_pessimistic"][d][k] - r["mean"]) for d, ms in t["redraw_optimistic"].items() for k, r in ms.items()]
    assert t["max_abs_diff"] == pytest.approx(max(gaps))
    assert runner.invoke(app, ["analyze", "ties", "--run", str(tmp_path)]).exit_code == 1
