"""`cdsr train` / `cdsr evaluate` / `cdsr models`: the contract the acceptance checks call."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cdsr.cli import app

runner = CliRunner()


def test_models_lists_registered_models_name_first():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.output.splitlines() if line.strip()]
    assert {"sasrec", "bert4rec", "hstu"} <= set(names)


def test_train_writes_metrics_in_the_contract_shape(tmp_path, tiny_root, tiny_params, in_root):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root),
                              "--model", "sasrec", "--epochs", "2",
                              "--seed", "1", "--out", str(out), "--set", "model.d=16", "--set", "model.max_len=20",
                              "--set", "evaluate.max_len=20", "--set", "evaluate.protocols=[full, sampled-100]",
                              "--set", "train.progress=false"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert (m["dataset"], m["model"], m["variant"]) == ("t", "sasrec", "merged")
    for proto in ("full", "sampled-100"):
        p = m["protocols"][proto]
        assert {"HR@10", "NDCG@10", "MRR"} <= set(p["overall"])
        assert set(p["domains"]) == {"Books", "Movies_and_TV", "CDs_and_Vinyl"}
    assert "AUC" in m["protocols"]["sampled-100"]["overall"] and "AUC" not in m["protocols"]["full"]["overall"]
    ev = runner.invoke(app, ["evaluate", "--run", str(out), "--protocol", "full", "--protocol", "full-all"])
    assert ev.exit_code == 0, ev.output
    again = json.loads((out / "eval-test.json").read_text())
    assert again["protocols"]["full"]["overall"] == m["protocols"]["full"]["overall"]  # same checkpoint, same numbers
    assert again["protocols"]["full-all"]["overall"]["NDCG@10"] <= again["protocols"]["full"]["overall"]["NDCG@10"] + 1e-9


def test_train_errors_are_readable(tmp_path, in_root):
    res = runner.invoke(app, ["train", "--dataset", "nope", "--model", "sasrec", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "dataset 'nope' is not declared under 'datasets:'" in res.output
    res = runner.invoke(app, ["train", "--dataset", "kuairand-1k", "--root", str(tmp_path / "empty"),
                              "--model", "sasrec", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "cdsr data build --dataset kuairand-1k" in res.output
    res = runner.invoke(app, ["train", "--dataset", "synthetic", "--model", "gpt", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "unknown model 'gpt'" in res.output
