"""The leaderboard (cdsr.leaderboard, `cdsr leaderboard`, `cdsr report --runs`) on hand-written runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_report import _full, _protocol, _write
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.leaderboard import build, collect, markdown
from cdsr.report import write_report

runner = CliRunner()


def _run(root: Path, name: str, base: float, model: str = "sasrec", dataset: str = "synthetic", seconds: float = 10.0):
    d = root / name
    d.mkdir(parents=True)
    m = _full("x", model, "merged", base)
    m.update(dataset=dataset, seconds=seconds,
             protocols={**m["protocols"], "sampled-100": _protocol("sampled-100", base * 3, auc=True)})
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    _run(root / "a", "fast-s1", 0.10, seconds=10)
    _run(root / "a", "fast-s2", 0.12, seconds=14)
    _run(root / "a", "fast-s3", 0.11, seconds=12)
    _run(root / "b" / "sasrec", "robust", 0.2)  # a benchmark-style nested run: its own group
    _run(root / "b" / "hstu", "robust", 0.2, model="hstu")  # same leaf name elsewhere: another group
    _run(root / "a", "hstu-merged-s1", 0.05, model="hstu")
    _run(root / "a", "other-data-s1", 0.9, dataset="elsewhere")  # another dataset: left out
    (root / "a" / "broken-s1").mkdir()
    (root / "a" / "broken-s1" / "metrics.json").write_text("{half")  # unreadable: left out
    return root


def test_groups_over_seeds_by_hand(runs):
    groups = {g["name"]: g for g in collect([runs / "a", runs / "b"], "synthetic")}
    assert sorted(groups) == ["fast", "hstu-merged", "hstu/robust", "sasrec/robust"]
    assert {g["name"] for g in collect([runs], "synthetic")} == {"a/fast", "a/hstu-merged", "b/hstu/robust",
                                                                  "b/sasrec/robust"}
    g = groups["fast"]
    assert g["seeds"] == [1, 2, 3] and g["model"] == "sasrec" and g["epochs"] == [3, 3, 3] and g["parameters"] == 312000
    xs = [0.10 * 1.2 * 1.5, 0.12 * 1.2 * 1.5, 0.11 * 1.2 * 1.5]  # Books HR@10 of the three seeds under full
    got = g["protocols"]["full"]["Books"]["HR@10"]
    assert got["mean"] == pytest.approx(statistics.fmean(xs)) and got["sd"] == pytest.approx(statistics.stdev(xs))
    assert g["seconds"]["mean"] == pytest.approx(12.0)
    assert groups["hstu-merged"]["protocols"]["full"]["Books"]["MRR"]["sd"] is None  # one seed: no sd


def test_a_name_reused_for_another_model_is_refused(runs):
    _run(runs / "a", "fast-s9", 0.1, model="hstu")
    with pytest.raises(ValueError, match="'fast' are of different models"):
        collect([runs / "a"], "synthetic")


def test_published_row_and_studies(tmp_path, runs):
    tuned = tmp_path / "tuned" / "amazon-food-kitchen-benchmark"
    tuned.mkdir(parents=True)
    (tuned / "abxi.json").write_text(json.dumps({"value": 0.3012, "trial": 4, "wall_seconds": 1234.5, "params": {},
                                                 "trials": {"COMPLETE": 5, "PRUNED": 7, "FAIL": 0}}))
    lb = build([runs / "a"], "amazon-food-kitchen-benchmark", tmp_path / "tuned")
    text = markdown(lb)
    assert "| ABXI (published, 5 seeds) |" in text and "0.3243" in text and "0.1219" in text
    assert "| abxi | 5 | 7 | 0 | 0.3012 | 4 | 1234 |" in text
    lb = build([runs / "a"], "synthetic", tmp_path / "tuned")
    text = markdown(lb)
    assert "ABXI" not in text and "#### sampled-100" in text
    assert f"| fast | 1,2,3 | 3,3,3 | 12 | 312000 | {0.11 * 1.2 * 1.5:.4f} ± " in text


def _metrics_dir(tmp_path: Path) -> Path:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    _write(metrics_dir, "sasrec", _full("sasrec", "sasrec", "merged", 0.1))
    return metrics_dir


def test_groups_against_the_published_row(monkeypatch, runs):
    import cdsr.leaderboard as lbm

    pub = {"Books": {"HR@5": 0.5, "HR@10": 0.6, "NDCG@10": 0.3, "MRR": 0.2},
           "CDs_&_Vinyl": {"HR@5": 0.25, "HR@10": 0.3, "NDCG@10": 0.1, "MRR": 0.05}}
    monkeypatch.setitem(lbm.PUBLISHED, "synthetic", {"name": "Paper", "protocol": "sampled-999", "domains": pub})
    lb = build([runs / "a"], "synthetic")
    vs = lbm.versus_published(lb)
    assert vs["columns"] == ["run", "seeds", *(f"{d} {k}" for d in pub for k in ("HR@5", "HR@10", "NDCG@10", "MRR")),
                             "mean / published"]
    fast = next(r for r in vs["rows"] if r[0] == "fast")
    # sampled-999 is built at 2 x base (base mean 0.11); Books 1.2 x, CDs 0.7 x; HR@5 = x, HR@10 1.5 x,
    # NDCG@10 0.75 x, MRR x / 2
    want = [0.11 * 2 * f * g for f in (1.2, 0.7) for g in (1, 1.5, 0.75, 0.5)]
    assert fast[1] == "1,2,3" and fast[2:10] == [f"{x:.4f}" for x in want]
    ratios = [w / p for w, p in zip(want, [v for d in pub.values() for v in d.values()])]
    assert fast[10] == f"{min(ratios):.2f}-{max(ratios):.2f}"
    assert vs["rows"][-1] == ["Paper", "", *(f"{v:.4f}" for d in pub.values() for v in d.values()), "1"]
    assert "#### Against Paper, sampled-999 (seed means)" in markdown(lb)
    html = write_report("synthetic", _metrics_dir(runs.parent), runs.parent / "rep", leaderboard=lb).read_text()
    assert 'id="versus-published"' in html and f"<td class=\"num\">{fast[10]}</td>" in html
    monkeypatch.delitem(lbm.PUBLISHED, "synthetic")
    assert lbm.versus_published(build([runs / "a"], "synthetic")) is None


def test_cli_and_report(tmp_path, runs):
    res = runner.invoke(app, ["leaderboard", "--dataset", "synthetic", "--runs", str(runs / "a"), "--tuned-dir",
                              str(tmp_path / "none"), "--out", str(tmp_path / "lb.md")])
    assert res.exit_code == 0, res.output
    assert "| fast | 1,2,3 |" in (tmp_path / "lb.md").read_text()
    empty = runner.invoke(app, ["leaderboard", "--dataset", "synthetic", "--runs", str(tmp_path / "nothing")])
    assert empty.exit_code == 0 and "no finished runs" in empty.output
    metrics_dir = _metrics_dir(tmp_path)
    html = write_report("synthetic", metrics_dir, tmp_path / "rep", leaderboard=build([runs], "synthetic")).read_text()
    assert 'id="leaderboard"' in html and "<td>a/hstu-merged</td>" in html
    assert 'id="leaderboard"' not in write_report("synthetic", metrics_dir, tmp_path / "rep2").read_text()
    assert 'id="versus-published"' not in html  # no published row for this dataset
    # a dataset the benchmark never ran: the report of the store alone, with a warning
    res = runner.invoke(app, ["report", "--dataset", "synthetic", "--runs", str(runs), "--metrics-dir",
                              str(tmp_path / "no-metrics"), "--out", str(tmp_path / "rep3"), "--no-mlflow"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "rep3" / "index.html").read_text()
    assert "<td>a/hstu-merged</td>" in html and "this page holds the leaderboard only" in html
    res = runner.invoke(app, ["report", "--dataset", "synthetic", "--metrics-dir", str(tmp_path / "no-metrics"),
                              "--no-mlflow", "--out", str(tmp_path / "rep4")])
    assert res.exit_code != 0 and "no metrics files" in res.output
