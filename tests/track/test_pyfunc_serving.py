"""The pyfunc recommender: logged from a tiny training run, registered, loaded in-process and
served by `mlflow models serve` over real HTTP."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from servers import free_port, start, stop, wait_http

PARAMS = {"train": {"epochs": 2, "batch_size": 64, "progress": False, "device": "cpu"},
          "evaluate": {"protocols": ["full"], "max_len": 20},
          "models": {"sasrec": {"d": 16, "layers": 1, "heads": 1, "max_len": 20}}}
MODEL = "cdsr-t"
L = 20


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh sqlite store + file artifact root, restored to the previous URIs afterwards."""
    import mlflow

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    before, before_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        exp = mlflow.create_experiment("pyfunc-serving", artifact_location=f"file://{tmp}/artifacts")
        yield uri, exp
        mlflow.set_tracking_uri(before)
        mlflow.set_registry_uri(before_registry)


def _train_and_log(tiny_root: Path, out: Path, variant: str, exp: str, params=PARAMS):
    import mlflow

    from cdsr.track.pyfunc import log_pyfunc
    from cdsr.train.run import train_run

    train_run("t", "sasrec", variant, params, out, seed=0, data_root=tiny_root)
    with mlflow.start_run(experiment_id=exp):
        return log_pyfunc(out, tiny_root / "t" / "processed" / "items.parquet")


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_root, store):
    """A merged SASRec run logged, registered as cdsr-t and aliased champion."""
    import mlflow
    from mlflow import MlflowClient

    run_dir = tmp_path_factory.mktemp("run-merged")
    info = _train_and_log(tiny_root, run_dir, "merged", store[1])
    version = mlflow.register_model(info.model_uri, MODEL)
    MlflowClient().set_registered_model_alias(MODEL, "champion", version.version)
    return run_dir


@pytest.fixture(scope="module")
def catalogue(tiny_root):
    items = pd.read_parquet(tiny_root / "t" / "processed" / "items.parquet")
    seqs = pl.read_parquet(tiny_root / "t" / "processed" / "sequences.parquet").sort("user_idx")
    return items, seqs


def _history(catalogue, user: int, n: int):
    """The user's last n events as raw ids + domain names, with strictly increasing timestamps."""
    items, seqs = catalogue
    row = seqs.row(user, named=True)
    idx, dom = np.array(row["items"][-n:]), np.array(row["domains"][-n:])
    raw = items.set_index("item_idx").loc[idx]
    ts = 1_500_000_000 + 3600 * np.arange(len(idx))
    return idx, dom, raw["item_id"].tolist(), raw["domain"].tolist(), ts.tolist()


def _net(tiny_root: Path, run_dir: Path, variant: str, domain: str | None = None):
    """The trained network, built and loaded the way the training code does (not via the wrapper)."""
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.train.loop import load_best
    from cdsr.train.run import load_split

    data = load_split("t", tiny_root)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    cfg = json.loads((run_dir / "config.json").read_text())
    net = build_model("sasrec", model_config("sasrec", cfg["model_config"], variant), vocab)
    return load_best(net, run_dir if domain is None else run_dir / f"domain-{domain}").eval(), data


def _direct_topk(net, data, idx, dom, target: str, k: int):
    """Top-k item idx of the target domain from net.score on a hand-built right-aligned batch."""
    d = data.domain_names.index(target)
    idx, dom = idx[-L:], dom[-L:]
    items = torch.zeros(1, L, dtype=torch.long)
    doms = torch.zeros(1, L, dtype=torch.long)
    if len(idx):
        items[0, L - len(idx):] = torch.as_tensor(idx)
        doms[0, L - len(idx):] = torch.as_tensor(dom)
    batch = {"items": items, "domains": doms, "timestamps": torch.zeros(1, L, dtype=torch.long),
             "mask": items > 0, "target_domain": torch.tensor([d]), "user_idx": torch.zeros(1, dtype=torch.long)}
    with torch.no_grad():
        s = net.score(batch, None)[0]
    lo, hi = data.domain_ranges[d]
    order = torch.argsort(s[lo:hi + 1], descending=True)[:k] + int(lo)
    return order.tolist(), s[order].tolist()


def _raw(catalogue, idx: list[int]) -> list[str]:
    return catalogue[0].set_index("item_idx").loc[idx, "item_id"].tolist()


@pytest.fixture(scope="module")
def champion_model(champion):
    import mlflow

    return mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")


def test_registered_champion_predicts_like_the_network(champion, champion_model, server, catalogue, tiny_root,
                                                       monkeypatch):
    """models:/cdsr-t@champion in-process gives the network's own top-k (``server`` is asked for
    only so that it boots meanwhile)."""
    model = champion_model
    items = catalogue[0]
    idx, dom, ids, doms, ts = _history(catalogue, user=3, n=25)  # longer than max_len: keeps the last 20
    rev = slice(None, None, -1)  # newest first on the wire: the wrapper sorts by timestamp
    req = pd.DataFrame([
        {"item_ids": ["nope-1"] + ids[rev], "domains": ["Books"] + doms[rev], "timestamps": [1_400_000_000] + ts[rev],
         "target_domain": "Movies_and_TV", "k": 7},
        {"item_ids": ["nope-2", "nope-2"], "domains": ["Books", "CDs_and_Vinyl"], "timestamps": [1, 2],
         "target_domain": "CDs_and_Vinyl"},  # no known item; k missing -> 10
        {"item_ids": ids[-3:], "domains": doms[-3:], "timestamps": ts[-3:], "target_domain": "Books", "k": 1000},
    ])
    out = model.predict(req)
    assert list(out.columns) == ["item_ids", "scores", "unknown_items"] and len(out) == 3
    assert [len(x) for x in out["item_ids"]] == [7, 10, int((items["domain"] == "Books").sum())]  # k capped by domain size
    assert out["unknown_items"].tolist() == [["nope-1"], ["nope-2"], []]
    for row, target in zip(out.itertuples(), ["Movies_and_TV", "CDs_and_Vinyl", "Books"]):
        known = set(items.loc[items["domain"] == target, "item_id"])
        assert set(row.item_ids) <= known and len(set(row.item_ids)) == len(row.item_ids)
        assert all(np.isfinite(row.scores)) and row.scores == sorted(row.scores, reverse=True)

    net, data = _net(tiny_root, champion, "merged")
    top, scores = _direct_topk(net, data, idx, dom, "Movies_and_TV", 7)
    assert out["item_ids"][0] == _raw(catalogue, top)
    np.testing.assert_allclose(out["scores"][0], scores, rtol=1e-4, atol=1e-5)
    top, scores = _direct_topk(net, data, idx[:0], dom[:0], "CDs_and_Vinyl", 10)  # fully padded history
    assert out["item_ids"][1] == _raw(catalogue, top)
    np.testing.assert_allclose(out["scores"][1], scores, rtol=1e-4, atol=1e-5)

    from cdsr.track import pyfunc

    monkeypatch.setattr(pyfunc, "CHUNK", 2)  # the same answers when the rows are scored in chunks
    chunked = model.predict(req)
    assert chunked["item_ids"].tolist() == out["item_ids"].tolist()
    for a, b in zip(chunked["scores"], out["scores"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"target_domain": "Games"}, "unknown target_domain 'Games'; known domains: Books, Movies_and_TV, CDs_and_Vinyl"),
    ({"domains": ["Books", "Bookz"]}, "unknown domain label(s) ['Bookz']"),
    ({"timestamps": [1]}, "must have the same length, got 2, 2 and 1"),
    ({"k": 0}, "k must be an integer in 1..1000, got 0"),
    ({"k": 2.5}, "k must be an integer in 1..1000, got 2.5"),
])
def test_bad_input_raises_invalid_parameter_value(champion_model, catalogue, change, message):
    from mlflow.exceptions import MlflowException

    _, _, ids, doms, ts = _history(catalogue, user=0, n=2)
    rec = {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 3} | change
    with pytest.raises(MlflowException) as err:
        champion_model.predict(pd.DataFrame([rec]))
    assert message in err.value.message and err.value.get_http_status_code() == 400


def test_single_variant_uses_the_target_domains_model(tmp_path, tiny_root, store, catalogue):
    import mlflow

    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 1}}
    info = _train_and_log(tiny_root, tmp_path / "run", "single", store[1], params)
    model = mlflow.pyfunc.load_model(info.model_uri)
    idx, dom, ids, doms, ts = _history(catalogue, user=5, n=30)
    out = model.predict(pd.DataFrame([
        {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": t, "k": 5}
        for t in ["Books", "CDs_and_Vinyl", "Books"]]))
    for row, target in zip(out.itertuples(), ["Books", "CDs_and_Vinyl", "Books"]):
        net, data = _net(tiny_root, tmp_path / "run", "single", target)
        d = data.domain_names.index(target)
        top, scores = _direct_topk(net, data, idx[dom == d], dom[dom == d], target, 5)  # that domain's events only
        assert row.item_ids == _raw(catalogue, top)
        np.testing.assert_allclose(row.scores, scores, rtol=1e-4, atol=1e-5)


# -- the REST scoring server -------------------------------------------------------------------
def _post(url: str, body: str | bytes) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(champion, store, tmp_path_factory):
    """`mlflow models serve -m models:/cdsr-t@champion`, started as soon as the champion exists so
    that it boots (10-20 s) while the in-process tests run; only the HTTP test waits for it.
    Stopped by killing its process group."""
    port = free_port()
    bindir = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0], "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
                  "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env, log)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        stop(proc)


def test_models_serve_over_http(server, catalogue):
    proc, base, log = server
    wait_http(f"{base}/ping", proc, log, timeout=90, interval=0.25)
    _, _, ids, doms, ts = _history(catalogue, user=7, n=6)
    good = {"item_ids": ids + ["nope-3"], "domains": doms + ["Books"], "timestamps": ts + [ts[-1] + 1],
            "target_domain": "Books", "k": 4}
    status, body = _post(f"{base}/invocations", json.dumps({"dataframe_records": [good, {**good, "k": None}]}))
    assert status == 200, body
    pred = body["predictions"]
    assert [len(p["item_ids"]) for p in pred] == [4, 10] and pred[0]["unknown_items"] == ["nope-3"]
    assert pred[1]["item_ids"][:4] == pred[0]["item_ids"]
    books = set(catalogue[0].loc[catalogue[0]["domain"] == "Books", "item_id"])
    assert set(pred[1]["item_ids"]) <= books and pred[0]["scores"] == sorted(pred[0]["scores"], reverse=True)

    bad = [
        ({"dataframe_records": [{**good, "target_domain": "Games"}]}, "unknown target_domain 'Games'"),
        ({"dataframe_records": [{**good, "timestamps": ts}]}, "must have the same length, got 7, 7 and 6"),
        ({"dataframe_records": [{k: v for k, v in good.items() if k != "target_domain"}]},
         "Model is missing inputs ['target_domain']"),
        ({"dataframe_records": [{**good, "k": 5000}]}, "k must be an integer in 1..1000"),
        ({"dataframe_records": [{**good, "item_ids": "B0S0000002"}]}, "item_ids"),
    ]
    for payload, message in bad:
        status, body = _post(f"{base}/invocations", json.dumps(payload))
        assert status == 400 and message in body["message"], (payload, status, body)
    status, body = _post(f"{base}/invocations", '{"dataframe_records": [{"item_ids": [')  # malformed JSON
    assert status == 400 and "valid JSON" in body["message"], body
