"""The method studies (cdsr.studies): the grid trainer, the tables, the CLI and the registry."""

from __future__ import annotations

import statistics

import pytest
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.config import load_params
from cdsr.evaluate.results import RunMetrics
from cdsr.models.registry import MODELS
from cdsr.runs import resolve
from cdsr.studies import STUDIES, quality
from cdsr.studies import tables as t
from cdsr.studies.grid import (
    Study,
    StudyError,
    Variant,
    collect,
    metrics_of,
    train_grid,
)

runner = CliRunner()
SMALL = ("model.d=8", "model.heads=1", "model.layers=1", "model.max_len=20", "evaluate.max_len=20",
         "evaluate.protocols=[full]", "train.progress=false")
TINY_STUDY = Study("tiny", "two SASRec variants", {"sasrec-merged": Variant("sasrec"),
                                                   "sasrec-wide": Variant("sasrec", ("model.d=16",))},
                   quality.report, common=SMALL, epochs=1, dataset="t")


def _metrics(seed: int, ndcg: dict[str, float]) -> RunMetrics:
    domains = {d: {"NDCG@10": v, "n": 1} for d, v in ndcg.items()}
    overall = {"NDCG@10": statistics.fmean(ndcg.values()), "n": len(ndcg)}
    fit = {"merged": {"epochs_run": 4, "best_epoch": 1, "train_seconds": 8.0 * seed}}
    return RunMetrics("t", "sasrec", "merged", seed, {"full": {"overall": overall, "domains": domains}}, {}, fit,
                      {"merged": [{"epoch": 1, "val_NDCG@10": 0.5}]})


# (a) the grid trainer ------------------------------------------------------------------------------

def test_grid_trains_what_is_missing_once_and_groups_by_variant(tmp_path, tiny_root, tiny_params):
    out, base = tmp_path / "runs", load_params(tiny_params)
    trained = train_grid(TINY_STUDY, "t", out, base, data_root=tiny_root, log=lambda s: None)
    assert sorted(rd.path.name for rd in trained) == ["sasrec-merged-s1", "sasrec-wide-s1"]
    mtimes = {rd.path.name: rd.file("metrics.json").stat().st_mtime_ns for rd in trained}
    assert train_grid(TINY_STUDY, "t", out, base, data_root=tiny_root, log=lambda s: None) == []
    assert {n: (out / "t" / n / "metrics.json").stat().st_mtime_ns for n in mtimes} == mtimes
    groups = metrics_of(collect(TINY_STUDY, "t", out))
    assert list(groups) == ["sasrec-merged", "sasrec-wide"] and all(len(ms) == 1 for ms in groups.values())
    assert groups["sasrec-wide"][0].fit["merged"]["epochs_run"] == 1 and groups["sasrec-wide"][0].parameters > \
        groups["sasrec-merged"][0].parameters  # the variant's own override (d=16) applied over the common d=8
    text = TINY_STUDY.report(TINY_STUDY, "t", out, tiny_root)
    rows = [ln for ln in text.splitlines() if ln.startswith("| sasrec-")]
    assert [r.split(" | ")[0] for r in rows] == ["| sasrec-merged", "| sasrec-wide"]
    want = groups["sasrec-wide"][0].domains("full")["Books"]["NDCG@10"]
    assert f"{want:.4f}" in rows[1] and "Popularity reference" in text


def test_grid_refuses_unknown_variants_and_orders_overrides():
    with pytest.raises(StudyError, match="no variant"):
        TINY_STUDY.variants(["nope"])
    assert TINY_STUDY.overrides("sasrec-wide", "t", ["train.epochs=3"]) == \
        ["train.epochs=1", *SMALL, "model.d=16", "train.epochs=3"]


# (b) tables --------------------------------------------------------------------------------------

def test_mean_sd_relative_change_and_markdown_by_hand():
    assert t.mean_sd([0.1, 0.2, 0.3]) == "0.2000 +- 0.1000"
    assert t.mean_sd([0.5]) == "0.5000" and t.mean_sd([]) == ""
    assert t.mean_sd([0.01, 0.03], "{:.2f}", 100) == "2.00 +- 1.41"
    assert t.change(0.11, 0.10) == "+10.0%" and t.change(0.09, 0.10) == "-10.0%" and t.change(1.0, 0.0) == "n/a"
    a = [_metrics(1, {"A": 0.2, "B": 0.4}), _metrics(2, {"A": 0.4, "B": 0.6})]
    ref = [_metrics(1, {"A": 0.2, "B": 0.5})]
    assert t.cells(a, "full", ["A", t.OVERALL], ["NDCG@10"]) == ["0.3000 +- 0.1414", "0.4000 +- 0.1414"]
    assert t.relative(a, ref, "full", ["A", "B", None], ["NDCG@10"]) == ["+50.0%", "+0.0%", "+14.3%"]
    assert t.seeds(a) == "1,2" and t.domains_of(a, "full") == ["A", "B"]
    table = t.markdown(["variant", "x"], [["a", 1], ["b", 2]])
    assert table == ["| variant | x |", "|---|---|", "| a | 1 |", "| b | 2 |"]
    assert t.fit_rows(a) == ("4 (2), 4 (2)", 3.0, [{"epoch": 1, "val_NDCG@10": 0.5}] * 2)


# (c) the command line ----------------------------------------------------------------------------

def test_cli_list_run_and_report(tmp_path, tiny_root, tiny_params, in_root):
    res = runner.invoke(app, ["study", "list"])
    assert res.exit_code == 0 and [ln.split()[0] for ln in res.output.splitlines()] == list(STUDIES)
    common = ["--dataset", "t", "--root", str(tiny_root), "--out", str(tmp_path / "runs")]
    res = runner.invoke(app, ["study", "run", "hstu_cd", *common, "--params", str(tiny_params), "--variants", "hstu",
                              "--seeds", "1", *(x for s in ("train.epochs=1", *SMALL[:5]) for x in ("--set", s))])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "t" / "hstu-s1" / "metrics.json").exists()
    assert "1 run(s) trained" in res.output and "cdsr study report hstu_cd" in res.output
    rep = runner.invoke(app, ["study", "report", "hstu_cd", *common])
    assert rep.exit_code == 0, rep.output
    assert "#### `t`: test, protocol `full`" in rep.output and "| hstu | 1 | overall |" in rep.output
    assert "| hstu | 1 (1) |" in rep.output  # --set train.epochs=1 applied
    again = runner.invoke(app, ["study", "run", "hstu_cd", *common, "--params", str(tiny_params), "--variants", "hstu"])
    assert again.exit_code == 0 and "0 run(s) trained" in again.output  # finished: not retrained


def test_cli_errors_are_one_line(tmp_path, tiny_params, in_root):
    for args, msg in ((["study", "run", "nope"], "unknown study 'nope'"),
                      (["study", "report", "nope"], "unknown study 'nope'"),
                      (["study", "run", "gca", "--dataset", "t", "--params", str(tiny_params), "--variants", "bogus"],
                       "has no variant(s) ['bogus']"),
                      (["study", "run", "gca", "--dataset", "t", "--params", str(tiny_params), "--seeds", "x"],
                       "expected integers"),
                      (["study", "run", "gca", "--dataset", "t", "--params", str(tiny_params), "--variants", "host",
                        "--root", str(tmp_path / "empty"), "--out", str(tmp_path)], "has no built split")):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output


# (d) the registry --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_names_registered_models_and_parses(name, in_root):
    study, base = STUDIES[name], load_params()
    assert study.name == name and study.grid and study.report
    for variant, v in study.grid.items():
        assert v.model in MODELS, (variant, v.model)
        assert v.continues is None or v.continues in study.grid
        for dataset in {study.dataset, *study.settings}:
            resolve(study.params(variant, dataset, base), v.model, v.variant)
