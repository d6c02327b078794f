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
from helpers import TINY

from cdsr.evaluate.results import read_tracked

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
    m = read_tracked(tmp / "metrics" / "t" / "sasrec.json")  # completed from its run directory
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
    before = read_tracked(tmp / "metrics" / "t" / "sasrec.json")
    run_dir = next((tmp / "runs" / "t" / "sasrec").iterdir())
    stamp = (run_dir / "last.pt").stat().st_mtime_ns
    out = run_benchmark("t", str(path), str(tiny_root))
    assert out["sasrec"]["ok"]
    after = read_tracked(tmp / "metrics" / "t" / "sasrec.json")
    assert after["mlflow_run_id"] == before["mlflow_run_id"]
    assert after["protocols"] == before["protocols"]
    assert (run_dir / "last.pt").stat().st_mtime_ns == stamp


def _store_value(params: dict, run_id: str, metric: str = "NDCG_10", protocol: str = "full") -> float:
    from mlflow import MlflowClient

    return MlflowClient(params["mlflow"]["tracking_uri"]).get_run(run_id).data.metrics[
        f"valid/{protocol}/overall/{metric}"]


def _ranked(tmp: Path, params: dict) -> list[tuple[str, str, float]]:
    """(method, run id, validation NDCG@10 in the tracking store), best first."""
    out = []
    for f in sorted((tmp / "metrics" / "t").glob("*.json")):
        run_id = read_tracked(f)["mlflow_run_id"]
        out.append((f.stem, run_id, _store_value(params, run_id)))
    out.sort(key=lambda r: -r[2])
    assert out[0][2] > out[1][2], out  # the tests below need a strictly better and a worse model
    return out


def _promote(tmp: Path, params: dict, registry: str, metrics_dir: Path | None = None, data_root=None, **cfg):
    """Promotion into the registered model ``<registry>-t`` (one per test: the store is shared)."""
    from cdsr.track.registry import PromoteConfig, promote
    from cdsr.track.tracking import TrackingConfig

    tcfg = TrackingConfig(tracking_uri=params["mlflow"]["tracking_uri"], model_prefix=registry)
    return promote("t", PromoteConfig(**cfg), metrics_dir or tmp / "metrics", data_root, tcfg)


def test_promotion_is_gated_recorded_and_idempotent(bench, tiny_root):
    from mlflow import MlflowClient

    tmp, _, params = bench
    (best, best_run, best_v), (other, _, other_v) = _ranked(tmp, params)[:2]
    client = MlflowClient(params["mlflow"]["tracking_uri"])

    d = _promote(tmp, params, "gate", data_root=tiny_root)  # every candidate: the best one wins
    assert d["promoted"] and d["decision"] == "promoted" and d["candidate_method"] == best
    assert d["candidate_value"] == pytest.approx(best_v)
    assert d["basis"] == {"metric": "NDCG@10", "protocol": "full", "data_version": d["data_version"], "split": "valid"}
    champ = client.get_model_version_by_alias("gate-t", "champion")
    assert champ.run_id == best_run and champ.tags["promotion.decision"] == "promoted"
    # its model card: the version's description and an artifact of its run, from the run's records
    card = champ.description
    for part in ("# gate-t version 1", f"data version `{d['data_version']}`", "## Intended use", "## Limitations",
                 "## Robustness", "| valid | `full` |", "| test | `sampled-100` |", f"{best_v:.4f}", "seed 42"):
        assert part in card, part
    assert client.download_artifacts(best_run, "model_card.md") and \
        Path(client.download_artifacts(best_run, "model_card.md")).read_text() == card

    again = _promote(tmp, params, "gate", data_root=tiny_root)  # same inputs: nothing moves, no new version
    assert again["decision"] == "already-champion" and not again["promoted"]
    assert len(client.search_model_versions("name='gate-t'")) == 1

    # a worse candidate is never promoted, and the decision is recorded on its version
    d = _promote(tmp, params, "gate", data_root=tiny_root, methods=[other])
    assert not d["promoted"] and d["decision"] == "rejected"
    assert client.get_model_version_by_alias("gate-t", "champion").version == champ.version
    v = client.get_model_version("gate-t", d["candidate_version"])
    assert v.tags["promotion.decision"] == "rejected"
    assert float(v.tags["promotion.champion_value"]) == pytest.approx(best_v)
    assert float(v.tags["promotion.candidate_value"]) == pytest.approx(other_v)


def test_promotion_needs_the_margin(bench, tiny_root):
    from mlflow import MlflowClient

    tmp, _, params = bench
    (best, best_run, best_v), (other, other_run, other_v) = _ranked(tmp, params)[:2]
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    assert _promote(tmp, params, "margin", data_root=tiny_root, methods=[other])["promoted"]  # the weaker first
    gap = best_v - other_v
    d = _promote(tmp, params, "margin", data_root=tiny_root, methods=[best], margin=2 * gap)
    assert not d["promoted"] and d["threshold"] == pytest.approx(other_v + 2 * gap)
    d = _promote(tmp, params, "margin", data_root=tiny_root, methods=[best], margin=gap / 2)
    assert d["promoted"]
    new = client.get_model_version_by_alias("margin-t", "champion")
    assert new.run_id == best_run
    first = next(v for v in client.search_model_versions("name='margin-t'") if v.run_id == other_run)
    assert first.tags["promotion.replaced_by"] == str(new.version)
    rel = _promote(tmp, params, "margin", data_root=tiny_root, methods=[other], margin=0.0, relative=True)
    assert rel["decision"] == "rejected"


@pytest.mark.parametrize("margin", [-0.01, float("nan"), float("inf")])
def test_a_negative_or_non_finite_margin_is_refused_in_config(bench, tiny_root, margin, in_root):
    from typer.testing import CliRunner

    from cdsr.cli import app
    from cdsr.config import ConfigError, from_dict
    from cdsr.track.registry import PromoteConfig

    tmp, _, params = bench
    with pytest.raises(ConfigError, match="promote.margin must be a finite number >= 0"):
        from_dict(PromoteConfig, {"margin": margin}, "promote")
    bad = {**params, "promote": {"margin": margin}, "datasets": {"t": TINY}}
    path = tmp / f"params-margin-{margin}.yaml"
    path.write_text(yaml.safe_dump(bad))
    res = CliRunner().invoke(app, ["promote", "--dataset", "t", "--params", str(path), "--root", str(tiny_root),
                                   "--metrics-dir", str(tmp / "metrics")])
    assert res.exit_code == 1 and "promote.margin must be a finite number >= 0" in res.output


def test_promotion_compares_on_the_champions_own_metric(bench, tiny_root):
    """A benchmark selected on HR@10 is compared with a champion promoted on NDCG@10 on NDCG@10
    (the candidate's HR@10 would beat the champion's NDCG@10 and promote a worse model)."""
    from mlflow import MlflowClient

    tmp, _, params = bench
    (best, _, best_v), (other, other_run, other_v) = _ranked(tmp, params)[:2]
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    assert _promote(tmp, params, "metric", data_root=tiny_root, methods=[best])["promoted"]
    hr = _store_value(params, other_run, "HR_10")
    assert hr > best_v  # what the old gate compared
    metrics = tmp / "metrics-hr"
    (metrics / "t").mkdir(parents=True)
    m = json.loads((tmp / "metrics" / "t" / f"{other}.json").read_text())
    (metrics / "t" / f"{other}.json").write_text(json.dumps({**m, "val_metric": "HR@10"}))
    client.set_tag(other_run, "val_metric", "HR@10")  # as if that benchmark had selected on HR@10
    try:
        d = _promote(tmp, params, "metric", metrics_dir=metrics, data_root=tiny_root)
    finally:
        client.set_tag(other_run, "val_metric", "NDCG@10")
    assert d["decision"] == "rejected" and not d["promoted"]
    assert d["metric"] == "NDCG@10" and d["candidate_value"] == pytest.approx(other_v)
    assert d["reason"].startswith("NDCG@10 (full)")


def test_the_gate_reads_the_tracking_store_not_the_metrics_files(bench, tiny_root):
    tmp, _, params = bench
    (best, _, _), (other, other_run, other_v) = _ranked(tmp, params)[:2]
    assert _promote(tmp, params, "tamper", data_root=tiny_root, methods=[best])["promoted"]
    metrics = tmp / "metrics-tampered"
    (metrics / "t").mkdir(parents=True)
    m = json.loads((tmp / "metrics" / "t" / f"{other}.json").read_text())
    m["validation"]["overall"]["NDCG@10"] = 0.99
    (metrics / "t" / f"{other}.json").write_text(json.dumps(m))
    d = _promote(tmp, params, "tamper", metrics_dir=metrics, data_root=tiny_root)
    assert d["decision"] == "rejected" and d["candidate_value"] == pytest.approx(other_v)
    assert any("claims NDCG@10 0.99" in w and other_run in w for w in d["warnings"])


def _fake_run(params: dict, **tags_and_metrics) -> str:
    """A benchmark-looking MLflow run with chosen tags and validation metrics (and no model)."""
    from mlflow import MlflowClient

    client = MlflowClient(params["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("cdsr-t")
    metrics = tags_and_metrics.pop("metrics")
    run = client.create_run(exp.experiment_id, tags={"dataset": "t", "cdsr.kind": "benchmark", **tags_and_metrics})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_candidates_that_cannot_be_compared_like_for_like_are_refused(bench, tiny_root, tmp_path):
    import shutil

    from cdsr.track.tracking import data_version

    tmp, _, params = bench
    (best, _, _), _ = _ranked(tmp, params)[:2]
    assert _promote(tmp, params, "like", data_root=tiny_root, methods=[best])["promoted"]
    current = data_version("t", tiny_root)["split.parquet"]
    other_protocol = _fake_run(params, val_metric="NDCG@10", val_protocol="sampled-100", data_version=current,
                               metrics={"valid/sampled-100/overall/NDCG_10": 0.99})
    other_data = _fake_run(params, val_metric="NDCG@10", val_protocol="full", data_version="0" * 32,
                           metrics={"valid/full/overall/NDCG_10": 0.99})
    metrics = tmp_path / "metrics"
    (metrics / "t").mkdir(parents=True)
    for name, run_id in (("proto", other_protocol), ("data", other_data)):
        (metrics / "t" / f"{name}.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    d = _promote(tmp, params, "like", metrics_dir=metrics, data_root=tiny_root)
    assert d["decision"] == "refused" and not d["promoted"] and d["candidate_version"] is None
    assert "validated under 'sampled-100'" in d["reason"] and "trained on data version 00000000" in d["reason"]

    # a champion validated on another build that cannot be read: re-scoring fails, so refused
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "t", root / "t")
    with open(root / "t" / "processed" / "split.parquet", "ab") as f:
        f.write(b"\0")
    d = _promote(tmp, params, "like", data_root=root, methods=[best])
    assert d["decision"] == "refused" and "could not be re-scored" in d["reason"]


def test_after_a_refresh_the_champion_is_rescored_and_compared_like_for_like(bench, tiny_root, tmp_path):
    """A rebuild with 15% more users (a new data version): the champion's registered model is
    re-scored on the new validation split (logged once, reused), and the new benchmark's best is
    compared with that value: promoted or rejected, never refused for the data version."""
    from helpers import TINY, make_cfg
    from mlflow import MlflowClient

    from cdsr.data.build import build
    from cdsr.track.tracking import data_version
    from flows.benchmark import run_benchmark

    tmp, _, params = bench
    (best, _, _), _ = _ranked(tmp, params)[:2]
    assert _promote(tmp, params, "refresh", data_root=tiny_root, methods=[best])["promoted"]
    root = tmp_path / "data"
    build(make_cfg(**{**TINY, "generator": {**TINY["generator"], "users": 230}}), root, log=lambda s: None)
    new = data_version("t", root)["split.parquet"]
    assert new != data_version("t", tiny_root)["split.parquet"]
    params2 = _params(tmp_path, methods=["sasrec", "bert4rec"])
    params2["mlflow"] = params["mlflow"]
    run_benchmark("t", str(_write(tmp_path, params2)), str(root))

    # a margin no model can pass first: rejected after the re-score, which a second call reuses
    d = _promote(tmp_path, params2, "refresh", data_root=root, margin=1.0)
    assert d["decision"] == "rejected" and not d["promoted"], d
    assert d["champion_data_version"] == new and d["basis"]["data_version"] == new
    assert d["champion_promoted_on_data_version"] != new and d["champion_value_at_promotion"] is not None
    r = d["champion_rescore"]
    assert r["targets"] > 0 and 0 <= r["unseen_targets"] <= r["targets"]
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    run = client.get_run(d["champion_rescore_run_id"])
    assert run.data.tags["cdsr.kind"] == "rescore" and run.data.tags["data_version"] == new
    assert run.data.metrics["valid/full/overall/NDCG_10"] == pytest.approx(d["champion_value"])
    again = _promote(tmp_path, params2, "refresh", data_root=root, margin=1.0)
    assert again["champion_rescore_run_id"] == d["champion_rescore_run_id"]
    assert again["champion_value"] == d["champion_value"]
    # the configured margin: a like-for-like decision on the new build
    d = _promote(tmp_path, params2, "refresh", data_root=root)
    assert d["decision"] in ("promoted", "rejected") and d["champion_value"] == again["champion_value"]
    assert d["promoted"] == (d["candidate_value"] > d["champion_value"])
    assert d["reason"].startswith("NDCG@10 (full)")


def test_promotion_refuses_data_that_failed_validation(bench, tiny_root, tmp_path):
    import shutil

    tmp, _, params = bench
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "t", root / "t")
    report = root / "t" / "processed" / "validation" / "validation.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "success": False}))
    d = _promote(tmp, params, "invalid", data_root=root)  # no champion yet
    assert not d["promoted"] and "data validation failed" in d["reason"]


def test_a_refresh_that_failed_validation_trains_nothing(tiny_root, tmp_path):
    """The retrain stops before any training (a failed flow run, with the reason) when the new
    build's data validation failed; the champion is untouched."""
    import shutil

    from prefect.client.orchestration import get_client

    from flows.benchmark import run_benchmark

    root = tmp_path / "data"
    shutil.copytree(tiny_root / "t", root / "t")
    report = root / "t" / "interim" / "validation" / "validation.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "success": False}))
    params = _params(tmp_path, methods=["sasrec"])
    with pytest.raises(RuntimeError, match=r"data validation failed .*interim.*reports failure.*nothing is trained"):
        run_benchmark("t", str(_write(tmp_path, params)), str(root))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "metrics").exists()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=5, sort="START_TIME_DESC")
    assert any(r.name == "benchmark-t" and r.state.is_failed() and "data validation failed" in (r.state.message or "")
               for r in runs)


@pytest.mark.timeout(600)
def test_killed_benchmark_resumes_from_checkpoint_and_keeps_finished_work(tmp_path, tiny_root):
    """Kill the flow while bert4rec trains (sasrec already done), rerun: sasrec is not retrained
    or re-logged, bert4rec resumes from its last checkpoint."""
    params = _params(tmp_path, methods=["sasrec", "bert4rec"], epochs=6, max_workers=1, robustness=False)
    params["models"]["bert4rec"].update(d=64, layers=2)  # slower, so the kill lands mid-training
    params["train"]["checkpoint_every_steps"] = 1
    params["datasets"] = {"t": TINY}  # `flows/benchmark.py` takes declared dataset names only
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
    first = read_tracked(sas)
    sas_run = next((tmp_path / "runs" / "t" / "sasrec").iterdir())
    sas_stamp = (sas_run / "metrics.json").stat().st_mtime_ns
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (sas_run / "metrics.json").stat().st_mtime_ns == sas_stamp  # not retrained
    assert read_tracked(sas)["mlflow_run_id"] == first["mlflow_run_id"]  # not re-logged
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
