"""The pyfunc recommender: logged from a tiny training run, registered, loaded in-process and
served over real HTTP by `mlflow models serve` and by `cdsr serve` (with request limits)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
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


def _train_and_log(tiny_root: Path, out: Path, variant: str, exp: str, params=PARAMS, serve=None):
    import mlflow

    from cdsr.track.pyfunc import log_pyfunc
    from cdsr.train.run import train_run

    train_run("t", "sasrec", variant, params, out, seed=0, data_root=tiny_root)
    with mlflow.start_run(experiment_id=exp):
        return log_pyfunc(out, tiny_root / "t" / "processed" / "items.parquet", serve=serve)


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


def test_registered_champion_predicts_like_the_network(champion, champion_model, server, cdsr_server, catalogue,
                                                       tiny_root, monkeypatch):
    """models:/cdsr-t@champion in-process gives the network's own top-k (``server`` and
    ``cdsr_server`` are asked for only so that they boot meanwhile)."""
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

    from cdsr.track.serve import ServeConfig

    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": 1}}
    info = _train_and_log(tiny_root, tmp_path / "run", "single", store[1], params,
                          serve=ServeConfig(max_records=3, max_history=40))
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.metadata.flavors["python_function"]["config"] == {"max_records": 3, "max_history": 40}
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


BAD_ELEMENTS = [  # (column, value, position, what the message says it got)
    ("item_ids", [None, "B"], 0, "null"),
    ("item_ids", ["A", 7], 1, "integer 7"),
    ("item_ids", [True, "B"], 0, "boolean true"),
    ("item_ids", [{"a": 1}, "B"], 0, 'object {"a": 1}'),
    ("item_ids", [["A"], "B"], 0, 'array ["A"]'),
    ("domains", ["Books", None], 1, "null"),
    ("domains", [3, "Books"], 0, "integer 3"),
    ("timestamps", [None, 2], 0, "null"),
    ("timestamps", [1, 2.5], 1, "number 2.5"),
    ("timestamps", [True, 2], 0, "boolean true"),
    ("timestamps", ["1", 2], 0, 'string "1"'),
    ("timestamps", [1, float("inf")], 1, "number Infinity"),
]


@pytest.mark.parametrize("column, value, pos, got", BAD_ELEMENTS, ids=lambda v: repr(v)[:20])
def test_bad_elements_are_rejected_not_coerced(champion_model, catalogue, column, value, pos, got):
    """A malformed element of a history list is an error naming row, column and position (MLflow's
    Array(string) enforcement used to turn [null, "B"] into ["n", "B"] and answer 200)."""
    from mlflow.exceptions import MlflowException

    _, _, ids, doms, ts = _history(catalogue, user=0, n=2)
    good = {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 3}
    with pytest.raises(MlflowException) as err:
        champion_model.predict(pd.DataFrame([good, {**good, column: value}]))
    message = f"row 1: '{column}'[{pos}] must be " + ("an integer (unix seconds)" if column == "timestamps" else "a string")
    assert f"{message}, got {got}" in err.value.message and err.value.get_http_status_code() == 400


def test_list_columns_must_be_lists_and_integral_timestamps_are_taken(champion_model, catalogue):
    from mlflow.exceptions import MlflowException

    _, _, ids, doms, ts = _history(catalogue, user=0, n=2)
    good = {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 3}
    with pytest.raises(MlflowException) as err:  # Array(Any) lets a null list through to predict
        champion_model.predict(pd.DataFrame([good, {**good, "item_ids": None}]))
    assert "row 1: 'item_ids' must be a list, got null" in err.value.message
    for column, value in [("domains", "Books"), ("timestamps", {"a": 1})]:  # MLflow's own check, 400 too
        with pytest.raises(MlflowException) as err:
            champion_model.predict(pd.DataFrame([{**good, column: value}]))
        assert "Expected data to be list or numpy array" in err.value.message
        assert err.value.get_http_status_code() == 400
    as_float = champion_model.predict(pd.DataFrame([{**good, "timestamps": [float(t) for t in ts]}]))
    as_array = champion_model.predict(pd.DataFrame([{**good, "item_ids": np.array(ids), "timestamps": np.array(ts)}]))
    plain = champion_model.predict(pd.DataFrame([good]))
    assert as_float["item_ids"].tolist() == as_array["item_ids"].tolist() == plain["item_ids"].tolist()


def test_record_and_history_limits(champion, catalogue, monkeypatch):
    """max_records (413) and max_history (400), from the logged model_config, a load-time override
    and the CDSR_SERVE_* environment."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _, _, ids, doms, ts = _history(catalogue, user=1, n=4)
    rec = {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 3}
    monkeypatch.delenv("CDSR_SERVE_MAX_RECORDS", raising=False)
    monkeypatch.delenv("CDSR_SERVE_MAX_HISTORY", raising=False)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", model_config={"max_records": 2, "max_history": 3})
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame([rec] * 3))
    assert err.value.get_http_status_code() == 413 and err.value.error_code == "REQUEST_LIMIT_EXCEEDED"
    assert "request has 3 records, over the limit of 2 per request" in err.value.message
    assert "serve.max_records in params.yaml or CDSR_SERVE_MAX_RECORDS" in err.value.message
    short = {**rec, "item_ids": ids[-3:], "domains": doms[-3:], "timestamps": ts[-3:]}
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame([short, rec]))
    assert err.value.get_http_status_code() == 400
    assert "row 1: 'item_ids' has 4 events, over the history limit of 3" in err.value.message
    assert "serve.max_history in params.yaml or CDSR_SERVE_MAX_HISTORY" in err.value.message
    assert len(model.predict(pd.DataFrame([short] * 2))) == 2

    monkeypatch.setenv("CDSR_SERVE_MAX_RECORDS", "1")  # the environment where it is loaded wins
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    with pytest.raises(MlflowException, match="request has 2 records, over the limit of 1"):
        model.predict(pd.DataFrame([rec] * 2))
    assert len(model.predict(pd.DataFrame([rec]))) == 1  # max_history: the logged default (10000)
    monkeypatch.setenv("CDSR_SERVE_MAX_RECORDS", "none")
    with pytest.raises(MlflowException, match="CDSR_SERVE_MAX_RECORDS: expected a positive integer, got 'none'"):
        mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")


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
        ({"dataframe_records": [good, {**good, "item_ids": [None] + ids}]},  # was 200, scored as ["n", ...]
         "row 1: 'item_ids'[0] must be a string, got null"),
    ]
    for payload, message in bad:
        status, body = _post(f"{base}/invocations", json.dumps(payload))
        assert status == 400 and message in body["message"], (payload, status, body)
    status, body = _post(f"{base}/invocations", '{"dataframe_records": [{"item_ids": [')  # malformed JSON
    assert status == 400 and "valid JSON" in body["message"], body


# -- `cdsr serve`: MLflow's scoring app behind the request limits --------------------------------
SERVE_LIMITS = {"max_body_bytes": 256 * 1024, "max_records": 4, "max_history": 30, "max_json_depth": 16}


@pytest.fixture(scope="module")
def cdsr_server(champion, store, tmp_path_factory):
    """`cdsr serve --model models:/cdsr-t@champion` with small limits from its --params file, booting
    alongside ``server``; stopped by killing its process group."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("cdsr-serve")
    params = tmp / "params.yaml"
    params.write_text(json.dumps({"serve": SERVE_LIMITS}))  # JSON is YAML
    cdsr = Path(sys.executable).parent / "cdsr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSR_SERVE_")}
    env["MLFLOW_TRACKING_URI"] = store[0]
    log = tmp / "serve.log"
    proc = start([str(cdsr), "serve", "--model", f"models:/{MODEL}@champion", "--params", str(params),
                  "--port", str(port)], env, log, cwd=tmp)
    try:
        yield proc, port, log
    finally:
        stop(proc)


def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send ``head`` (request line + headers) and ``body`` as they are; -> status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, json.loads(r.read())


def test_cdsr_serve_limits_over_http(cdsr_server, catalogue):
    proc, port, log = cdsr_server
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ping", proc, log, timeout=90, interval=0.25)
    url = f"{base}/invocations"
    _, _, ids, doms, ts = _history(catalogue, user=7, n=6)
    good = {"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 4}

    def ok():
        status, body = _post(url, json.dumps({"dataframe_records": [good]}))
        assert status == 200 and len(body["predictions"][0]["item_ids"]) == 4, (status, body)

    ok()
    # 11: a null inside item_ids (was 200 with unknown_items ["n", "B"])
    status, body = _post(url, json.dumps({"dataframe_records": [good, {**good, "item_ids": [None] + ids[1:]}]}))
    assert status == 400 and "row 1: 'item_ids'[0] must be a string, got null" in body["message"], body
    # 12: 100k levels of nesting (was 500: RecursionError inside MLflow's JSON parsing)
    deep = '{"dataframe_records": ' + "[" * 100_000 + "]" * 100_000 + "}"
    status, body = _post(url, deep)
    assert status == 400 and body["error_code"] == "BAD_REQUEST", body
    assert "nested 100001 levels deep, over the limit of 16" in body["message"]
    assert "serve.max_json_depth in params.yaml or CDSR_SERVE_MAX_JSON_DEPTH" in body["message"]
    # 13: a body over the cap, by Content-Length: answered before any of it is sent ...
    status, body = _raw_request(port, "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      "Content-Length: 40000000\r\n")
    assert status == 413 and body["error_code"] == "REQUEST_LIMIT_EXCEEDED", body
    assert "request body is 40000000 bytes, over the limit of 262144 bytes" in body["message"]
    assert "CDSR_SERVE_MAX_BODY_BYTES" in body["message"]
    # ... or sent whole by a client that reads only afterwards (urllib) ...
    status, body = _post(url, b"[" * 300_000)
    assert status == 413 and "request body is 300000 bytes, over the limit of 262144" in body["message"], body
    # ... and chunked, without a length: cut off once the streamed bytes pass the cap
    chunk = b"[" * 32 * 1024
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"  # 288 KiB
    status, body = _raw_request(port, "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                      "Transfer-Encoding: chunked\r\n", chunks)
    assert status == 413 and "request body is over the limit of 262144 bytes" in body["message"], body
    # too many records (413) and too long a history (400)
    status, body = _post(url, json.dumps({"dataframe_records": [good] * 5}))
    assert status == 413 and "request has 5 records, over the limit of 4" in body["message"], body
    assert "CDSR_SERVE_MAX_RECORDS" in body["message"]
    status, body = _post(url, json.dumps({"dataframe_split": {"columns": list(good), "data": [list(good.values())] * 5}}))
    assert status == 413 and "request has 5 records" in body["message"], body
    _, _, ids, doms, ts = _history(catalogue, user=7, n=40)
    if len(ids) > 30:
        long = {**good, "item_ids": ids, "domains": doms, "timestamps": ts}
    else:  # a short user: repeat the history
        long = {**good, "item_ids": ids * 31, "domains": doms * 31, "timestamps": list(range(len(ids) * 31))}
    status, body = _post(url, json.dumps({"dataframe_records": [long]}))
    assert status == 400 and f"row 0: 'item_ids' has {len(long['item_ids'])} events, over the history limit of 30" \
        in body["message"], body
    assert "CDSR_SERVE_MAX_HISTORY" in body["message"]
    ok()  # the server survived all of it
    assert proc.poll() is None


def test_models_are_logged_from_code_and_pickled_versions_still_load(champion, champion_model, store, catalogue,
                                                                     tmp_path):
    """The logged pyfunc is code (MLflow models-from-code): no pickled object in its artifacts.
    A version logged the older way (a cloudpickled CDSRRecommender) loads and answers alike."""
    import mlflow

    from cdsr.track.pyfunc import CDSRRecommender

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "new")))
    assert not list(local.rglob("*.pkl")) and (local / "pyfunc_model.py").exists()
    assert "pyfunc_model.py" in (local / "MLmodel").read_text()
    with mlflow.start_run(experiment_id=store[1]):
        old = mlflow.pyfunc.log_model(name="old-style", python_model=CDSRRecommender(),
                                      artifacts={"run": str(local / "artifacts" / "run")},
                                      code_paths=[str(local / "code" / "cdsr")])
    old_local = Path(mlflow.artifacts.download_artifacts(old.model_uri, dst_path=str(tmp_path / "old")))
    assert list(old_local.rglob("python_model.pkl"))
    idx, dom, ids, doms, ts = _history(catalogue, user=5, n=8)
    req = pd.DataFrame([{"item_ids": ids, "domains": doms, "timestamps": ts, "target_domain": "Books", "k": 5}])
    want = champion_model.predict(req)
    got = mlflow.pyfunc.load_model(old.model_uri).predict(req)
    assert got["item_ids"].tolist() == want["item_ids"].tolist()


def test_cdsr_serve_follows_the_alias_under_load(champion, store, catalogue, tmp_path):
    """`cdsr serve --model models:/cdsr-t@champion` while requests keep coming: the alias moves to
    another version, the server switches to it without a restart, no request fails, and each
    response names the version that answered (in order: the old one, then the new one)."""
    import threading

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    v1 = client.get_model_version_by_alias(MODEL, "champion")
    v2 = mlflow.register_model(f"runs:/{v1.run_id}/model", MODEL).version
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDSR_SERVE_")}
    env.update(MLFLOW_TRACKING_URI=store[0], CDSR_SERVE_POLL_SECONDS="1")
    log = tmp_path / "serve.log"
    proc = start([str(Path(sys.executable).parent / "cdsr"), "serve", "--model", f"models:/{MODEL}@champion",
                  "--port", str(port)], env, log, cwd=tmp_path)
    _, _, ids, doms, ts = _history(catalogue, user=7, n=6)
    body = json.dumps({"dataframe_records": [{"item_ids": ids, "domains": doms, "timestamps": ts,
                                              "target_domain": "Books", "k": 3}]}).encode()
    answers, stop_flag = [], threading.Event()

    def load():
        while not stop_flag.is_set():
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    answers.append((r.status, r.headers.get("x-cdsr-model-version")))
            except Exception as exc:  # noqa: BLE001 (any failure is a failed request)
                answers.append((getattr(exc, "code", repr(exc)), None))

    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log, timeout=90, interval=0.25)
        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(2)
        client.set_registered_model_alias(MODEL, "champion", v2)
        deadline = time.time() + 60
        while time.time() < deadline and not any(v == f"{MODEL}/{v2}" for _, v in answers[-5:]):
            time.sleep(0.2)
        time.sleep(1)
        stop_flag.set()
        for w in workers:
            w.join(timeout=30)
    finally:
        stop_flag.set()
        client.set_registered_model_alias(MODEL, "champion", v1.version)
        stop(proc)
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [v for _, v in answers]
    first_new = versions.index(f"{MODEL}/{v2}")
    assert set(versions[:first_new]) == {f"{MODEL}/{v1.version}"} and first_new > 0
    assert f"version {v1.version} -> {v2}" in log.read_text()


def test_batch_recommendations_match_the_served_model(champion, champion_model, store, tiny_root, catalogue, tmp_path):
    """The recommend flow writes every user's top-k of every domain with the model and data
    versions in the file; a user's row is what the served model answers for their history."""
    from mlflow import MlflowClient

    from cdsr.track.batch import read_metadata, recommend_all
    from cdsr.track.tracking import TrackingConfig, data_version

    out = tmp_path / "recs.parquet"
    meta = recommend_all(f"models:/{MODEL}@champion", "t", tiny_root, 4, out, TrackingConfig(tracking_uri=store[0]))
    version = MlflowClient().get_model_version_by_alias(MODEL, "champion").version
    assert read_metadata(out) == meta and meta["model_version"] == str(version)
    assert meta["model_uri"] == f"models:/{MODEL}/{version}"
    assert meta["data_version"] == data_version("t", tiny_root)["split.parquet"]
    df = pd.read_parquet(out)
    items, seqs = catalogue
    users = pd.read_parquet(tiny_root / "t" / "processed" / "users.parquet")
    assert len(df) == meta["rows"] == len(users) * 3 and meta["users"] == len(users)
    assert set(df["target_domain"]) == {"Books", "Movies_and_TV", "CDs_and_Vinyl"}
    dom_of = dict(zip(items["item_id"].astype(str), items["domain"].astype(str)))
    assert all(len(r) == 4 and {dom_of[i] for i in r} == {d} for r, d in zip(df["item_ids"], df["target_domain"]))
    # user 3's row against the served model given their whole history
    u = users.sort_values("user_idx").iloc[3]
    seq = seqs.filter(pl.col("user_idx") == int(u["user_idx"])).row(0, named=True)
    ids = items.set_index("item_idx").loc[list(seq["items"]), "item_id"].astype(str).tolist()
    doms = [dom_of[i] for i in ids]
    ts = [int(t) for t in seq["timestamps"]]
    want = champion_model.predict(pd.DataFrame([{"item_ids": ids, "domains": doms, "timestamps": ts,
                                                 "target_domain": "Movies_and_TV", "k": 4}]))
    row = df[(df["user_id"] == u["user_id"]) & (df["target_domain"] == "Movies_and_TV")].iloc[0]
    assert list(row["item_ids"]) == want["item_ids"][0]
    np.testing.assert_allclose(row["scores"], want["scores"][0], rtol=1e-5)
