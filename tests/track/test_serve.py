"""`cdsr serve`'s pieces without a model or a socket: the ``serve:`` config, the JSON depth and
record checks, and the ASGI limits middleware driven directly (the real-HTTP test is in
test_pyfunc_serving.py)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from cdsr.config import ConfigError, load_params
from cdsr.track.serve import LimitsMiddleware, ServeConfig, check_json, count_records, json_depth, serve_config

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_serve_section_is_the_documented_default():
    assert serve_config(load_params(ROOT / "params.yaml"), env={}) == ServeConfig()
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().max_body_bytes == 8 * 1024 * 1024


def test_precedence_params_then_env_then_flags():
    params = {"serve": {"max_records": 10, "port": 6000}}
    cfg = serve_config(params, env={"CDSR_SERVE_MAX_RECORDS": "20", "CDSR_SERVE_HOST": "0.0.0.0"}, port=7000)
    assert (cfg.max_records, cfg.host, cfg.port, cfg.max_history) == (20, "0.0.0.0", 7000, 10_000)
    assert serve_config(params, env={}, port=None).port == 6000  # None: flag not given


@pytest.mark.parametrize("params, env, message", [
    ({"max_records": 0}, {}, "serve.max_records: must be at least 1, got 0"),
    ({"max_json_depth": 3}, {}, "serve.max_json_depth: must be in 4..512"),
    ({"max_json_depth": 100000}, {}, "serve.max_json_depth: must be in 4..512"),
    ({"port": 70000}, {}, "serve.port: must be in 1..65535"),
    ({"max_body": 5}, {}, "serve: unknown key(s) ['max_body']"),
    ({"max_records": "many"}, {}, "serve.max_records: expected int"),
    ({}, {"CDSR_SERVE_MAX_HISTORY": "lots"}, "CDSR_SERVE_MAX_HISTORY: expected an integer, got 'lots'"),
    ({}, {"CDSR_SERVE_WORKERS": "0"}, "serve.workers: must be at least 1, got 0"),
])
def test_bad_serve_config_is_a_config_error(params, env, message):
    with pytest.raises(ConfigError) as err:
        serve_config({"serve": params}, env=env)
    assert message in str(err.value)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def test_json_depth_ignores_brackets_in_strings():
    rng = random.Random(0)
    alphabet = ['[', ']', '{', '}', '"', '\\', 'a', ' ', '\n', 'é']

    def make(level):
        r = rng.random()
        if level > 6 or r < 0.3:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))  # strings with brackets, quotes, \
        if r < 0.65:
            return [make(level + 1) for _ in range(rng.randrange(4))]
        return {make(7): make(level + 1) for _ in range(rng.randrange(4))}

    for _ in range(300):
        value = make(0)
        for body in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
            assert json_depth(body.encode()) == _depth(value), body
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert json_depth(b'"' + b'\\"' * 50_000 + b"[[[") == 0  # one unterminated string: linear, not quadratic


CFG = ServeConfig(max_body_bytes=1000, max_records=3, max_history=5, max_json_depth=8)


def test_check_json():
    deep = b'{"dataframe_records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, code, message = check_json(deep, CFG)
    assert status == 400 and code == "BAD_REQUEST"
    assert "nested 100001 levels deep, over the limit of 8" in message and "serve.max_json_depth" in message
    rec = {"item_ids": ["a"], "domains": ["Books"], "timestamps": [1], "target_domain": "Books"}
    many = json.dumps({"dataframe_records": [rec] * 4}).encode()
    status, code, message = check_json(many, CFG)
    assert status == 413 and "request has 4 records, over the limit of 3" in message
    assert "CDSR_SERVE_MAX_RECORDS" in message
    assert check_json(json.dumps({"dataframe_records": [rec] * 3}).encode(), CFG) is None
    assert check_json(b'{"dataframe_records": [', CFG) is None  # MLflow answers bad JSON itself
    assert count_records({"dataframe_split": {"columns": ["a"], "data": [[1]] * 5}}) == 5
    assert count_records({"inputs": {"item_ids": [["a"]] * 6, "target_domain": ["B"] * 6}}) == 6
    assert count_records({"instances": [1, 2]}) == 2 and count_records([1]) is None


# -- the middleware, driven as uvicorn would -----------------------------------------------
def _call(headers: dict[str, str], chunks: list[bytes], path="/invocations"):
    """Run the middleware over one request; -> (status, JSON body or None, what the app got,
    how many body chunks the middleware read)."""
    got, read = {}, [0]

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        got["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        i = read[0]
        read[0] += 1
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(LimitsMiddleware(app, CFG)(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], (json.loads(body) if start["status"] != 200 else None), got, read[0], dict(start["headers"])


def test_middleware_limits():
    js = {"Content-Type": "application/json"}
    # Content-Length past twice the cap: 413 at once, the body never read, the app never called
    status, body, got, read, headers = _call({**js, "Content-Length": "5000"}, [b"x" * 5000])
    assert (status, read, got) == (413, 0, {}) and headers[b"connection"] == b"close"
    assert body["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert "request body is 5000 bytes, over the limit of 1000 bytes" in body["message"]
    assert "CDSR_SERVE_MAX_BODY_BYTES" in body["message"]
    # within twice the cap: read to its end and dropped, so a client that reads late gets the 413
    status, body, got, read, headers = _call({**js, "Content-Length": "1500"}, [b"x" * 700, b"x" * 800])
    assert (status, read, got) == (413, 2, {}) and b"connection" not in headers
    # ... unless the client waits for 100-continue: then it has sent nothing
    status, _, got, read, headers = _call({**js, "Content-Length": "1500", "Expect": "100-continue"}, [b"x" * 1500])
    assert (status, read, got) == (413, 0, {}) and headers[b"connection"] == b"close"
    # chunked (no Content-Length): counted as it streams; dropped up to twice the cap, then cut off
    status, body, got, read, headers = _call(js, [b"x" * 400] * 10)
    assert (status, read, got) == (413, 6, {}) and headers[b"connection"] == b"close"
    assert "request body is over the limit of 1000 bytes" in body["message"]
    status, _, got, read, headers = _call(js, [b"x" * 400] * 4)
    assert (status, read, got) == (413, 4, {}) and b"connection" not in headers
    # too deep / too many records: 400 / 413 before the app
    status, body, got, _, _ = _call(js, [b"[" * 300, b"]" * 300])
    assert status == 400 and got == {} and "over the limit of 8" in body["message"]
    rec = '{"item_ids": [], "domains": [], "timestamps": [], "target_domain": "Books"}'
    status, body, got, _, _ = _call(js, [f'{{"dataframe_records": [{",".join([rec] * 4)}]}}'.encode()])
    assert status == 413 and got == {} and "4 records, over the limit of 3" in body["message"]
    # within the limits: the app gets the body as sent, in one piece
    ok = f'{{"dataframe_records": [{rec}]}}'.encode()
    status, _, got, _, _ = _call(js, [ok[:10], ok[10:]])
    assert status == 200 and got["body"] == ok
    # JSON checks are for POST /invocations with a JSON body only; the size cap is for every request
    assert _call({"Content-Type": "text/csv"}, [b"[" * 300])[0] == 200
    assert _call(js, [b"[" * 300], path="/other")[0] == 200
    assert _call(js, [b"x" * 1001], path="/other")[0] == 413
