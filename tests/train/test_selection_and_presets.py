"""Model selection over domains (train.val_aggregate) and named presets (params.yaml `presets:`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.config import ConfigError, from_dict
from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig, rank_targets, selection_value, summarise
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.presets import expand, presets
from cdsr.train.config import TrainConfig
from cdsr.train.loop import fit
from cdsr.train.run import set_seed

runner = CliRunner()
SUMMARY = {"overall": {"MRR": 0.30}, "domains": {"A": {"MRR": 0.5}, "B": {"MRR": 0.1}, "C": {"MRR": 0.2}}}


def test_selection_value_by_hand():
    assert selection_value(SUMMARY, "MRR") == 0.30
    assert selection_value(SUMMARY, "MRR", "sum") == pytest.approx(0.8)
    assert selection_value(SUMMARY, "MRR", "mean") == pytest.approx(0.8 / 3)
    with pytest.raises(ValueError, match="unknown aggregate"):
        selection_value(SUMMARY, "MRR", "max")
    with pytest.raises(ValueError, match="no domain"):
        selection_value({"overall": {"MRR": 0.0}, "domains": {}}, "MRR", "sum")


def test_bad_training_regimes_are_config_errors():
    with pytest.raises(ConfigError, match="val_aggregate"):
        from_dict(TrainConfig, {"val_aggregate": "median"}, "train")
    for bad in ({"lr": 0.0}, {"lr": float("nan")}, {"weight_decay": -1.0}, {"epochs": 0}, {"patience": 0}):
        with pytest.raises(ConfigError):
            from_dict(TrainConfig, bad, "train")


def test_the_loop_selects_on_the_sum_over_domains(tiny_root, tmp_path):
    data = SplitData.load(tiny_root / "t" / "processed")
    set_seed(3)
    model = build_model("sasrec", model_config("sasrec", {"d": 16, "layers": 1, "max_len": 20}, "merged"),
                        Vocab.from_ranges(data.domain_ranges, data.domain_names))
    ev = EvalConfig(protocols=["sampled-100"], max_len=20)
    cfg = TrainConfig(epochs=1, batch_size=32, progress=False, val_protocol="sampled-100", val_metric="MRR",
                      val_aggregate="sum")
    res = fit(model, data, cfg, seed=3, run_dir=tmp_path / "r", eval_cfg=ev)
    summary = summarise(rank_targets(model, data, "valid", "sampled-100", ev), data.domain_names, ev)
    want = sum(v["MRR"] for v in summary["domains"].values())
    assert len(summary["domains"]) == 3 and want != pytest.approx(summary["overall"]["MRR"])
    assert res.history[0]["val_selection"] == pytest.approx(want) == pytest.approx(res.best_metric)
    assert res.history[0]["val_MRR"] == pytest.approx(summary["overall"]["MRR"])  # the pooled value is still logged


def _params(**presets_section):
    return {"presets": presets_section}


def test_presets_expand_and_refuse_bad_entries():
    p = _params(fast={"model": "sasrec", "description": "x", "set": ["train.lr=0.001", "model.d=32"]})
    assert expand(p, "fast") == ("sasrec", ["train.lr=0.001", "model.d=32"])
    assert expand(p, "fast", "sasrec")[0] == "sasrec"
    with pytest.raises(ConfigError, match="not 'hstu'"):
        expand(p, "fast", "hstu")
    with pytest.raises(ConfigError, match="unknown preset 'slow'.*fast"):
        expand(p, "slow")
    with pytest.raises(ConfigError, match="unknown model"):
        presets(_params(x={"model": "nope"}))
    with pytest.raises(ConfigError, match="section.key=value"):
        presets(_params(x={"model": "sasrec", "set": ["train.lr"]}))
    with pytest.raises(ConfigError, match="unknown key"):
        presets(_params(x={"model": "sasrec", "sets": []}))
    with pytest.raises(ConfigError, match="valid preset name"):
        presets(_params(**{"../x": {"model": "sasrec"}}))
    # a base's overrides come first, the preset's own after (the later of two equal keys wins)
    p = _params(fast={"model": "sasrec", "set": ["train.lr=0.001", "model.d=32"]},
                wide={"model": "sasrec", "base": "fast", "set": ["model.d=64"]},
                wider={"model": "hstu", "base": "wide", "set": ["train.lr=0.01"]})
    assert expand(p, "wider") == ("hstu", ["train.lr=0.001", "model.d=32", "model.d=64", "train.lr=0.01"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        presets(_params(x={"model": "sasrec", "base": "nope"}))
    with pytest.raises(ConfigError, match="a cycle"):
        presets(_params(x={"model": "sasrec", "base": "y"}, y={"model": "sasrec", "base": "x"}))


def test_the_project_presets_parse_and_build():
    from cdsr.config import load_params
    from cdsr.runs import apply_overrides, resolve

    p = load_params(Path(__file__).parents[2] / "params.yaml")
    assert "abxi-paper" in presets(p)
    for name in presets(p):
        model, sets = expand(p, name)
        resolve(apply_overrides(p, model, sets), model, "merged")  # every override names a real field


def test_train_by_preset_name(tmp_path, tiny_root, tiny_params, in_root):
    params = yaml.safe_load(tiny_params.read_text())
    params["presets"] = {"tiny-sas": {"model": "sasrec", "description": "test",
                                      "set": ["model.d=16", "model.max_len=20", "evaluate.max_len=20",
                                              "evaluate.protocols=[sampled-100]", "train.lr=0.003",
                                              "train.val_protocol=sampled-100", "train.val_aggregate=mean",
                                              "train.progress=false"]}}
    tiny_params.write_text(yaml.safe_dump(params, sort_keys=False))
    args = ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root), "--preset", "tiny-sas",
            "--epochs", "1", "--seed", "2", "--set", "train.lr=0.002"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == "sasrec" and cfg["model_config"]["d"] == 16
    assert cfg["train"]["lr"] == 0.002 and cfg["train"]["val_aggregate"] == "mean"  # the command's --set wins
    again = runner.invoke(app, args + ["--out", str(tmp_path / "run")])  # a finished run is skipped, same numbers
    assert again.exit_code == 0 and "epoch 0" in res.output and "epoch" not in again.output  # nothing retrained
    assert again.output.splitlines() == [ln for ln in res.output.splitlines() if " epoch " not in ln]
    bad = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root),
                              "--preset", "tiny-sas", "--model", "hstu"])
    assert bad.exit_code == 1 and "not 'hstu'" in bad.output
    none = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root)])
    assert none.exit_code == 1 and "--model or --preset" in none.output
    listed = runner.invoke(app, ["presets", "--params", str(tiny_params)])
    assert listed.exit_code == 0 and listed.output.split()[:4] == ["tiny-sas", "model", "sasrec", "test"]
    assert "preset" not in runner.invoke(app, ["models"]).output  # `cdsr models` lists models only


def test_train_with_a_tuning_result(tmp_path, tiny_root, tiny_params, in_root):
    best = tmp_path / "sasrec.json"
    best.write_text(json.dumps({"study": "t/sasrec", "value": 0.1, "params": {"model.d": 8, "train.lr": 0.004}}))
    base = ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root), "--model", "sasrec",
            "--epochs", "1", "--set", "model.max_len=20", "--set", "evaluate.max_len=20", "--set", "train.progress=false",
            "--set", "evaluate.protocols=[full]"]
    res = runner.invoke(app, [*base, "--tuned", str(best), "--set", "train.lr=0.002", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model_config"]["d"] == 8 and cfg["train"]["lr"] == 0.002  # tuned applied, --set after it
    best.write_text(json.dumps({"study": "other/sasrec", "value": 0.1, "params": {"model.d": 8}}))
    bad = runner.invoke(app, [*base, "--tuned", str(best)])
    assert bad.exit_code == 1 and "not of a study on dataset t" in bad.output
    best.write_text("{")
    assert "not a readable" in runner.invoke(app, [*base, "--tuned", str(best)]).output
