"""The benchmark flow (train -> evaluate -> robustness -> MLflow per method), its resume after a
kill, and gated promotion in the MLflow registry, on the tiny synthetic dataset 't'."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _params(tmp: Path, **bench) -> dict:
    return {
        "seed": 42,
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "patience": 10},
        "evaluate": {"protocols": ["full", "sampled-100"], "max_len": 20},
        "models": {"sasrec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20},
                   "bert4rec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20},
                   "hstu": {"d": 16, "layers": 1, "heads": 1, "max_len": 20}},
        "benchmark": {"methods": ["sasrec", "bert4rec"], "epochs": 2, "max_workers": 2, "use_tuned": False,
                      "runs_dir": str(tmp / "runs"), "metrics_dir": str(tmp / "metrics"),
                      "plots_dir": str(tmp / "plots"), "tuned_dir": str(tmp / "tuned"), **bench},
        "robustness": {"p": [0.2, 0.3], "inference": ["substitute", "insert", "domain_flip"], "train": ["substitute"]},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "promote": {"margin": 0.0},
    }


def _write(tmp: Path, params: dict) -> Path:
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_root):
    """One benchmark of sasrec + bert4rec, plus an hstu whose config is broken."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from flows.benchmark import run_benchmark

    tmp = tmp_path_factory.mktemp("bench")
    params = _params(tmp, methods=["sasrec", "bert4rec", "hstu"])
    params["models"]["hstu"]["no_such_field"] = 1
    path = _write(tmp, params)
    with pytest.raises(RuntimeError, match=r"1 method\(s\) failed.*hstu.*no_such_field"):
        run_benchmark("t", str(path), str(tiny_root))
    return tmp, path, params


def test_benchmark_writes_metrics_plots_and_mlflow_runs(bench, tiny_root):
    import mlflow

    from cdsr.track.tracking import md5

    tmp, _, params = bench
    files = sorted(p.stem for p in (tmp / "metrics" / "t").glob("*.json"))
    assert files == ["bert4rec", "sasrec"]  # the broken hstu lost nothing of the others
    m = json.loads((tmp / "metrics" / "t" / "sasrec.json").read_text())
    for key in ("dataset", "model", "variant", "protocols", "validation", "fit", "history", "robustness"):
        assert key in m
    assert set(m["protocols"]) == {"full", "sampled-100"}
    assert set(m["protocols"]["full"]["domains"]) == {"Books", "Movies_and_TV", "CDs_and_Vinyl"}
    assert m["data_version"]["split.parquet"] == md5(tiny_root / "t" / "processed" / "split.parquet")
    # robustness: a clean row then one row per (kind, p), inference and training noise
    rob = m["robustness"]
    inf = {(r["kind"], r["p"]) for r in rob if r["scope"] == "inference"}
    assert inf == {("clean", 0.0)} | {(k, p) for k in ("substitute", "insert", "domain_flip") for p in (0.2, 0.3)}
    tr = {(r["kind"], r["p"]) for r in rob if r["scope"] == "train"}
    assert tr == {("clean", 0.0), ("substitute", 0.2), ("substitute", 0.3)}
    clean = next(r for r in rob if r["scope"] == "inference" and r["kind"] == "clean")
    assert clean["NDCG@10"] == pytest.approx(m["protocols"]["full"]["overall"]["NDCG@10"])
    for r in rob:
        assert r["rel_drop_NDCG@10"] == pytest.approx((clean["NDCG@10"] - r["NDCG@10"]) / clean["NDCG@10"])
    # DVC plots data
    learn = (tmp / "plots" / "t" / "learning" / "sasrec.csv").read_text().splitlines()
    assert learn[0].startswith("part,epoch") and len(learn) == 1 + 2
    curve = (tmp / "plots" / "t" / "robustness" / "sasrec" / "inference-insert.csv").read_text().splitlines()
    assert curve[0].startswith("p,") and [r.split(",")[0] for r in curve[1:]] == ["0.0", "0.2", "0.3"]
    # MLflow: params, per-epoch metrics, final metrics per protocol and domain, tags, model, plots
    mlflow.set_tracking_uri(params["mlflow"]["tracking_uri"])
    run = mlflow.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "64" and "train.lr" in run.data.params
    assert run.data.params["model_config.d"] == "16"
    assert run.data.tags["data_version"] == m["data_version"]["split.parquet"]
    assert run.data.tags["method"] == "sasrec" and run.data.tags["protocols"] == "full,sampled-100"
    assert "mlflow.parentRunId" in run.data.tags
    assert run.data.metrics["test/full/overall/NDCG_10"] == pytest.approx(m["protocols"]["full"]["overall"]["NDCG@10"])
    assert run.data.metrics["test/sampled-100/Books/HR_10"] == pytest.approx(
        m["protocols"]["sampled-100"]["domains"]["Books"]["HR@10"])
    hist = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_NDCG_10")
    assert [h.step for h in hist] == [0, 1]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert "plots/robustness-sasrec.png" in arts
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature is not None


def test_benchmark_rerun_reuses_finished_runs(bench, tiny_root):
    """A second run with the same inputs trains nothing and logs nothing new."""
    from flows.benchmark import run_benchmark

    tmp, _, params = bench
    params = dict(params, benchmark={**params["benchmark"], "methods": ["sasrec"]})
    path = _write(tmp, params)
    before = json.loads((tmp / "metrics" / "t" / "sasrec.json").read_text())
    run_dir = next((tmp / "runs" / "t" / "sasrec").iterdir())
    stamp = (run_dir / "last.pt").stat().st_mtime_ns
    out = run_benchmark("t", str(path), str(tiny_root))
    assert out["sasrec"]["ok"]
    after = json.loads((tmp / "metrics" / "t" / "sasrec.json").read_text())
    assert after["mlflow_run_id"] == before["mlflow_run_id"]
    assert after["protocols"] == before["protocols"]
    assert (run_dir / "last.pt").stat().st_mtime_ns == stamp


def _candidates(tmp):
    from cdsr.track.registry import candidates

    return candidates(tmp / "metrics", "t")


def test_promotion_is_gated_recorded_and_idempotent(bench, tiny_root):
    import mlflow
    from mlflow import MlflowClient

    from cdsr.track.registry import Candidate, PromoteConfig, promote
    from cdsr.track.tracking import TrackingConfig

    tmp, _, params = bench
    tcfg = TrackingConfig(tracking_uri=params["mlflow"]["tracking_uri"])
    cands = _candidates(tmp)
    assert [c.value for c in cands] == sorted((c.value for c in cands), reverse=True)
    best, other = cands[0], cands[1]

    d = promote("t", PromoteConfig(), tmp / "metrics", tiny_root, tcfg)
    assert d["promoted"] and d["decision"] == "promoted" and d["candidate_method"] == best.method
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    champ = client.get_model_version_by_alias("cdsr-t", "champion")
    assert champ.run_id == best.run_id and champ.tags["promotion.decision"] == "promoted"

    # again: same version, nothing moves, no new version
    again = promote("t", PromoteConfig(), tmp / "metrics", tiny_root, tcfg)
    assert again["decision"] == "already-champion" and not again["promoted"]
    assert len(client.search_model_versions("name='cdsr-t'")) == 1

    # a worse candidate is never promoted, and the decision is recorded on its version
    worse = Candidate(other.method, other.run_id, best.value - 0.01, other.metric, other.data_version)
    d = promote("t", PromoteConfig(), tmp / "metrics", tiny_root, tcfg, candidate=worse)
    assert not d["promoted"] and d["decision"] == "rejected"
    assert client.get_model_version_by_alias("cdsr-t", "champion").version == champ.version
    v = client.get_model_version("cdsr-t", d["candidate_version"])
    assert v.tags["promotion.decision"] == "rejected"
    assert float(v.tags["promotion.champion_value"]) == pytest.approx(best.value)

    # better, but not by the margin: rejected; by more than the margin: promoted
    slightly = Candidate(other.method, other.run_id, best.value + 0.001, other.metric, other.data_version)
    d = promote("t", PromoteConfig(margin=0.01), tmp / "metrics", tiny_root, tcfg, candidate=slightly)
    assert not d["promoted"] and d["threshold"] == pytest.approx(best.value + 0.01)
    clearly = Candidate(other.method, other.run_id, best.value + 0.02, other.metric, other.data_version)
    d = promote("t", PromoteConfig(margin=0.01), tmp / "metrics", tiny_root, tcfg, candidate=clearly)
    assert d["promoted"]
    new = client.get_model_version_by_alias("cdsr-t", "champion")
    assert new.run_id == other.run_id
    assert client.get_model_version("cdsr-t", champ.version).tags["promotion.replaced_by"] == str(new.version)
    mlflow.set_tracking_uri(params["mlflow"]["tracking_uri"])


def test_promotion_refuses_data_that_failed_validation(bench, tiny_root, tmp_path):
    import shutil

    from cdsr.track.registry import PromoteConfig, promote
    from cdsr.track.tracking import TrackingConfig

    tmp, _, _ = bench
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "t", root / "t")
    report = root / "t" / "processed" / "validation" / "validation.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "success": False}))
    tcfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")  # no champion yet
    d = promote("t", PromoteConfig(), tmp / "metrics", root, tcfg)
    assert not d["promoted"] and "data validation failed" in d["reason"]


@pytest.mark.timeout(600)
def test_killed_benchmark_resumes_from_checkpoint_and_keeps_finished_work(tmp_path, tiny_root):
    """Kill the flow while bert4rec trains (sasrec already done), rerun: sasrec is not retrained
    or re-logged, bert4rec resumes from its last checkpoint."""
    params = _params(tmp_path, methods=["sasrec", "bert4rec"], epochs=6, max_workers=1, robustness=False)
    params["models"]["bert4rec"].update(d=64, layers=2)  # slower, so the kill lands mid-training
    params["train"]["checkpoint_every_steps"] = 1
    path = _write(tmp_path, params)
    cmd = [str(BIN / "python"), "flows/benchmark.py", "--dataset", "t", "--params", str(path), "--root", str(tiny_root)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    sas = tmp_path / "metrics" / "t" / "sasrec.json"
    bert = tmp_path / "runs" / "t" / "bert4rec"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if sas.exists() and any(bert.glob("*/last.pt")) and not any(bert.glob("*/fit.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the flow ended before it could be killed: " + proc.stdout.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = json.loads(sas.read_text())
    sas_run = next((tmp_path / "runs" / "t" / "sasrec").iterdir())
    sas_stamp = (sas_run / "metrics.json").stat().st_mtime_ns
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (sas_run / "metrics.json").stat().st_mtime_ns == sas_stamp  # not retrained
    assert json.loads(sas.read_text())["mlflow_run_id"] == first["mlflow_run_id"]  # not re-logged
    fit = json.loads(next(bert.glob("*/fit.json")).read_text())["fit"]["merged"]
    assert fit["resumes"], "bert4rec started over instead of resuming"
    hist = json.loads(next(bert.glob("*/history.json")).read_text())
    assert [h["epoch"] for h in hist] == list(range(6))
    assert (tmp_path / "metrics" / "t" / "bert4rec.json").exists()


def test_report_command_compares_methods_and_logs_to_mlflow(bench, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from cdsr.cli import app

    tmp, path, params = bench
    monkeypatch.setenv("MLFLOW_TRACKING_URI", params["mlflow"]["tracking_uri"])
    out = tmp / "report"
    res = CliRunner().invoke(app, ["report", "--dataset", "t", "--metrics-dir", str(tmp / "metrics"),
                                   "--out", str(out), "--params", str(path)])
    assert res.exit_code == 0, res.output
    html = (out / "index.html").read_text()
    assert "sasrec" in html and "bert4rec" in html and "CDs_and_Vinyl" in html
    assert (out / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    mlflow.set_tracking_uri(params["mlflow"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["cdsr-t"], filter_string="tags.`cdsr.kind` = 'report'",
                              output_format="list")
    assert runs and {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "report")} >= {
        "report/index.html", "report/robustness.png"}
    missing = CliRunner().invoke(app, ["report", "--dataset", "nope", "--metrics-dir", str(tmp / "metrics"),
                                       "--no-mlflow"])
    assert missing.exit_code == 1 and "no metrics files" in missing.output


def test_method_overrides_apply_before_tuned_values(tmp_path):
    """benchmark.overrides: per-method settings for the benchmark only; tuned values win; a
    malformed entry is a config error."""
    from cdsr.benchmark import BenchmarkConfig, benchmark_config, method_params
    from cdsr.config import ConfigError, load_params

    params = load_params(ROOT / "params.yaml")
    (tmp_path / "tuned" / "t").mkdir(parents=True)
    (tmp_path / "tuned" / "t" / "gca.json").write_text(json.dumps({"params": {"model.d": 32}}))
    cfg = BenchmarkConfig(tuned_dir=str(tmp_path / "tuned"), overrides={"gca": ["model.layers=1", "model.d=16"]})
    p = method_params(params, cfg, "t", "gca")
    assert p["models"]["gca"]["layers"] == 1 and p["models"]["gca"]["d"] == 32
    assert method_params(params, cfg, "t", "sasrec")["models"]["sasrec"] == params["models"]["sasrec"]
    assert benchmark_config(params).overrides == {"hstu_cd": ["model.layers=1"], "gca": ["model.layers=1"],
                                                  "dpg": ["model.layers=1", "model.d=32"]}  # the default repro's small settings
    with pytest.raises(ConfigError, match="benchmark.overrides.gca"):
        BenchmarkConfig(overrides={"gca": ["layers"]})
