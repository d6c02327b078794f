"""The results store (cdsr.store): records written by `cdsr train`, identity that survives
refactors and marks behaviour changes stale, partial records of unfinished runs, campaigns that
skip recorded runs and resume interrupted ones, docs tables generated from the store, and Optuna
studies in journal files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdsr import behaviour
from cdsr.cli import app
from cdsr.runs import RunDir
from cdsr.store import Store, StoreError, canonical, identity_key

from conftest import ROOT

runner = CliRunner()
SETS = ["--set", "model.d=16", "--set", "model.max_len=20", "--set", "evaluate.max_len=20",
        "--set", "evaluate.protocols=[full, sampled-100]", "--set", "train.progress=false",
        "--set", "train.val_protocol=sampled-100"]


def _train(tiny_params, tiny_root, *extra, seed=1, epochs=2):
    res = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root),
                              "--model", "sasrec", "--epochs", str(epochs), "--seed", str(seed), *SETS, *extra])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def trained(tmp_path, tiny_root, tiny_params, monkeypatch):
    """A finished run in runs/ (the working area) of a project folder, and its record."""
    monkeypatch.chdir(tmp_path)
    res = _train(tiny_params, tiny_root)
    return tmp_path, res


def test_train_writes_a_small_record_with_its_provenance(trained):
    root, res = trained
    rec_dir = root / "results" / "t" / "sasrec-merged-s1"
    assert "record: " in res.output and "sasrec-merged-s1 (key " in res.output
    meta = json.loads((rec_dir / "record.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 1 and meta["name"] == "sasrec-merged-s1"
    assert meta["behaviour"] == behaviour.versions("sasrec")
    assert meta["command"].startswith("cdsr train --dataset t --model sasrec --epochs 2 --seed 1 --set model.d=16")
    assert meta["epochs"] == 2 and meta["epoch_seconds"] > 0 and meta["wall_seconds"] > 0
    assert {"cpu", "cpu_flags", "cpu_threads", "precision"} <= set(meta["machine"])
    assert meta["data_version"] and set(meta["data_version"]) >= {"split.parquet"}
    m = json.loads((rec_dir / "metrics.json").read_text())
    assert len(m["history"]["merged"]) == 2 and "val_selection" in m["history"]["merged"][0]
    assert json.loads((rec_dir / "config.json").read_text())["model_config"]["d"] == 16
    assert not list(rec_dir.glob("*.pt"))
    size = sum(f.stat().st_size for f in rec_dir.iterdir())
    assert size < 64_000, size  # no checkpoints: tens of kilobytes per run
    listed = runner.invoke(app, ["results", "list", "--results", str(root / "results")])
    assert "t/sasrec-merged-s1" in listed.output and "finished" in listed.output


def test_an_explicit_out_is_not_recorded_unless_asked(tmp_path, tiny_root, tiny_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train(tiny_params, tiny_root, "--out", str(tmp_path / "elsewhere"), epochs=1)
    assert not (tmp_path / "results").exists()
    _train(tiny_params, tiny_root, "--out", str(tmp_path / "elsewhere"), "--record", epochs=1)
    assert (tmp_path / "results" / "t" / "elsewhere" / "record.json").exists()


def test_identity_survives_new_default_settings_and_changes_with_values(trained):
    root, _ = trained
    store = Store(root / "results")
    rec = store.get("t", "sasrec-merged-s1")
    config = rec.config
    assert store.state(config, rec.name) == "current"
    older = json.loads(json.dumps(config))
    del older["train"]["ties_improve"], older["evaluate"]["input_window"]  # written before these existed
    assert canonical(older) == canonical(config)
    assert identity_key(older, rec.meta["behaviour"]) == rec.key
    assert "model_config.d" in canonical(config) and "train.ties_improve" not in canonical(config)
    other = json.loads(json.dumps(config))
    other["model_config"]["dropout"] = 0.3
    assert identity_key(other, rec.meta["behaviour"]) != rec.key
    assert store.state(other, rec.name) == "other"
    with pytest.raises(StoreError, match="holds another run"):
        (root / "fake").mkdir()
        (root / "fake" / "config.json").write_text(json.dumps(other))
        (root / "fake" / "metrics.json").write_text((rec.path / "metrics.json").read_text())
        store.put(RunDir(root / "fake"), name=rec.name)


def test_a_behaviour_change_marks_records_stale_and_readers_set_them_apart(trained, monkeypatch):
    root, _ = trained
    store = Store(root / "results")
    rec = store.get("t", "sasrec-merged-s1")
    lb = runner.invoke(app, ["leaderboard", "--dataset", "t", "--runs", str(root / "results")])
    assert "| sasrec-merged | 1 |" in lb.output and "Stale" not in lb.output
    real = behaviour.versions
    monkeypatch.setattr(behaviour, "versions", lambda m: {**real(m), "model": real(m)["model"] + 1})
    assert store.get("t", rec.name).stale
    assert store.state(rec.config, rec.name) == "stale"
    lb = runner.invoke(app, ["leaderboard", "--dataset", "t", "--runs", str(root / "results")])
    assert "| sasrec-merged | 1 |" not in lb.output
    assert "Stale records" in lb.output and f"sasrec-merged-s1 (key {rec.key}" in lb.output
    again = store.put(RunDir(root / "runs" / "t" / "sasrec-merged-s1"))  # a rerun's record replaces it
    assert not again.stale and again.key != rec.key


def test_a_partial_record_scores_the_best_checkpoint_so_far(tmp_path, tiny_root, tiny_params, monkeypatch):
    from cdsr.train import loop

    monkeypatch.chdir(tmp_path)
    real_fit = loop.fit
    out = tmp_path / "runs" / "t" / "long"

    def stop_after_two(*a, **k):
        def on_epoch(epoch, record):
            if epoch == 1:
                raise loop.TrainingInterrupted("stop")
        return real_fit(*a, **{**k, "on_epoch": on_epoch})

    monkeypatch.setattr("cdsr.train.run.fit", stop_after_two)
    res = runner.invoke(app, ["train", "--dataset", "t", "--params", str(tiny_params), "--root", str(tiny_root),
                              "--model", "sasrec", "--epochs", "6", "--seed", "1", "--out", str(out), *SETS])
    assert res.exit_code != 0
    monkeypatch.setattr("cdsr.train.run.fit", real_fit)
    monkeypatch.chdir(ROOT)  # the run directory records data_root relative to nothing: absolute here
    res = runner.invoke(app, ["results", "add", "--run", str(out), "--partial", "--results", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    rec = Store(tmp_path / "results").get("t", "long")
    assert rec.status == "partial" and rec.metrics.epochs_run == 2 and len(rec.metrics.history["merged"]) == 2
    assert set(rec.metrics.protocols) == {"full", "sampled-100"}
    lb = runner.invoke(app, ["leaderboard", "--dataset", "t", "--runs", str(tmp_path / "results")])
    assert "long (partial: 2 epochs)" in lb.output
    assert Store(tmp_path / "results").state(rec.config, "long") == "partial"


def _campaign_params(tiny_params: Path) -> Path:
    p = yaml.safe_load(tiny_params.read_text())
    sets = [s for s in SETS if s != "--set"]
    p["campaigns"] = {"c": {"dataset": "t", "runs": [
        {"model": "sasrec", "seeds": [1, 2], "epochs": 2, "set": sets},
        {"name": "wide", "model": "sasrec", "seeds": [1], "epochs": 1, "set": [*sets, "model.d=32"]}]}}
    tiny_params.write_text(yaml.safe_dump(p))
    return tiny_params


def test_a_campaign_skips_recorded_runs_and_resumes_an_interrupted_one(tmp_path, tiny_root, tiny_params, monkeypatch):
    from cdsr.train import loop

    monkeypatch.chdir(tmp_path)
    params = _campaign_params(tiny_params)
    args = ["--params", str(params), "--root", str(tiny_root), "--results", str(tmp_path / "results")]
    plan = runner.invoke(app, ["campaign", "plan", "c", *args])
    assert plan.exit_code == 0, plan.output
    assert plan.output.count("missing") == 3 and "no measured epoch time" in plan.output
    real_fit = loop.fit
    calls = []

    def killed_in_second(*a, **k):  # the second run dies after its first epoch
        calls.append(1)
        if len(calls) == 2:
            def on_epoch(epoch, record):
                raise loop.TrainingInterrupted("kill")
            return real_fit(*a, **{**k, "on_epoch": on_epoch})
        return real_fit(*a, **k)

    monkeypatch.setattr("cdsr.train.run.fit", killed_in_second)
    res = runner.invoke(app, ["campaign", "run", "c", *args, "--only", "wide"])  # names carry the seed
    assert res.exit_code != 0 and "no run named ['wide']" in res.output and "wide-s1" in res.output
    res = runner.invoke(app, ["campaign", "run", "c", *args])
    assert res.exit_code != 0
    store = Store(tmp_path / "results")
    assert [r.name for r in store.records("t")] == ["sasrec-merged-s1"]
    plan = runner.invoke(app, ["campaign", "plan", "c", *args])
    assert "current" in plan.output and "at epoch 1" in plan.output and "remaining:" in plan.output
    monkeypatch.setattr("cdsr.train.run.fit", real_fit)
    res = runner.invoke(app, ["campaign", "run", "c", *args])
    assert res.exit_code == 0, res.output
    assert "skip sasrec-merged-s1" in res.output and "resuming at epoch 1" in res.output
    recs = {r.name: r for r in store.records("t")}
    assert set(recs) == {"sasrec-merged-s1", "sasrec-merged-s2", "wide-s1"}
    assert recs["sasrec-merged-s2"].metrics.fit["merged"]["resumes"] == [{"epoch": 1, "step": 0}]
    res = runner.invoke(app, ["campaign", "run", "c", *args])
    assert res.output.count("skip") == 3 and "0 run(s) trained" in res.output
    res = runner.invoke(app, ["campaign", "run", "c", *args, "--only", "wide-s1"])
    assert res.exit_code == 0 and res.output.count("skip") == 1 and "skip wide-s1" in res.output


def test_docs_tables_come_from_the_store(trained):
    root, _ = trained
    doc = root / "page.md"
    doc.write_text("# Page\n\n<!-- cdsr:leaderboard dataset=t view=tables protocols=full metrics=NDCG@10 -->\n"
                   "stale text\n<!-- /cdsr:leaderboard -->\n\nafter\n")
    args = ["--docs", str(doc), "--results", str(root / "results"), "--tuned-dir", str(root / "tuned")]
    check = runner.invoke(app, ["results", "docs", "--check", *args])
    assert check.exit_code == 1 and "out of date" in check.output
    assert runner.invoke(app, ["results", "docs", *args]).exit_code == 0
    text = doc.read_text()
    rec = Store(root / "results").get("t", "sasrec-merged-s1")
    ndcg = rec.metrics.protocols["full"]["domains"]["Books"]["NDCG@10"]
    assert f"{ndcg:.4f}" in text and "stale text" not in text and text.endswith("\nafter\n")
    assert "Generated by `cdsr results docs`" in text
    assert runner.invoke(app, ["results", "docs", "--check", *args]).exit_code == 0
    doc.write_text("<!-- cdsr:leaderboard dataset=t view=trajectory runs=sasrec-merged-s1 every=1 -->\n"
                   "<!-- /cdsr:leaderboard -->\n<!-- cdsr:leaderboard dataset=t view=validation runs=sasrec-merged-s1 -->\n"
                   "<!-- /cdsr:leaderboard -->\n")
    assert runner.invoke(app, ["results", "docs", *args]).exit_code == 0
    text = doc.read_text()
    vals = [h["val_selection"] for h in rec.metrics.history["merged"]]
    assert f"| 0 | {vals[0]:.4f} |" in text and f"| 1 | {vals[1]:.4f} |" in text
    fit = rec.metrics.fit["merged"]
    assert f"| sasrec-merged-s1 | {fit['best_val']:.4f} | {fit['best_epoch']} | 2 | finished |" in text
    for marker, err in (("view=tables", "needs dataset="), ("dataset=t view=trajectory", "needs runs="),
                        ("dataset=t view=validation runs=nope", "no record")):
        doc.write_text(f"<!-- cdsr:leaderboard {marker} -->\n<!-- /cdsr:leaderboard -->\n")
        bad = runner.invoke(app, ["results", "docs", *args])
        assert bad.exit_code == 1 and err in bad.output, (marker, bad.output)


def test_the_projects_docs_match_its_store():
    """Every generated table in docs/ is what `cdsr results docs` makes of results/."""
    from cdsr.docs_tables import render_tree

    assert render_tree(ROOT / "docs", ROOT / "results", ROOT / "tuned", write=False) == []


def test_a_study_in_a_journal_file_resumes_in_another_process(tmp_path):
    script = (
        "import sys, optuna\n"
        "from cdsr.store import journal_storage\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "s = optuna.create_study(study_name='x', storage=journal_storage(sys.argv[1]), load_if_exists=True,\n"
        "                        sampler=optuna.samplers.TPESampler(seed=len(sys.argv)))\n"
        "s.optimize(lambda t: t.suggest_float('a', 0, 1), n_trials=2)\n"
        "print(len(s.trials))\n")
    path = tmp_path / "results" / "t" / "studies" / "x.journal"
    outs = [subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert [o.strip() for o in outs] == ["2", "4"]
    assert path.read_text().count("\n") > 4  # plain text lines, git carries them


def test_a_dead_workers_trial_in_a_journal_study_is_failed_on_reopen(tmp_path):
    """A journal file has no heartbeat: a RUNNING trial whose worker process on this host is gone
    is failed when the study is next used (cdsr.tune._fail_orphans), one of a live process is not."""
    import optuna

    from cdsr.store import journal_storage
    from cdsr.tune import _fail_orphans, worker_attrs

    path = tmp_path / "s.journal"
    script = (
        "import sys, optuna\n"
        "from cdsr.store import journal_storage\n"
        "from cdsr.tune import worker_attrs\n"
        "s = optuna.create_study(study_name='x', storage=journal_storage(sys.argv[1]), load_if_exists=True)\n"
        "t = s.ask()\n"
        "[t.set_user_attr(k, v) for k, v in worker_attrs(0).items()]\n")  # exits with the trial RUNNING
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    study = optuna.load_study(study_name="x", storage=journal_storage(path))
    mine = study.ask()
    for k, v in worker_attrs(0).items():
        mine.set_user_attr(k, v)
    assert _fail_orphans(study) == [0]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.RUNNING}
