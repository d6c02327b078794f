"""Serving a logged pyfunc model over HTTP with request limits: ``cdsr serve``.

``cdsr serve --model models:/cdsr-<dataset>@champion`` runs MLflow's own scoring app
(:func:`mlflow.pyfunc.scoring_server.init`, the app ``mlflow models serve`` runs: ``/ping``,
``/health``, ``/version``, ``POST /invocations``) under uvicorn, wrapped in
:class:`LimitsMiddleware`, a small pure-ASGI middleware that checks each request before MLflow
reads it:

- a body over ``max_body_bytes``: HTTP 413, the body never kept. Past twice the cap it is
  answered from ``Content-Length`` before any of it is read (chunked: once the streamed bytes pass
  that) and the connection closed; a smaller one is read to its end and dropped first, so that a
  client that reads only after sending gets the answer too (see :class:`LimitsMiddleware`);
- JSON nested deeper than ``max_json_depth`` (a valid request nests 4 levels): HTTP 400, before
  any JSON parser recurses into it (MLflow's own parse of a 100k-deep body raises RecursionError:
  HTTP 500);
- more than ``max_records`` records in ``dataframe_records`` / ``dataframe_split`` / ``inputs``
  / ``instances``: HTTP 413, before MLflow builds a DataFrame.

The model itself (:class:`cdsr.track.pyfunc.CDSRRecommender`) enforces ``max_records`` (413),
``max_history`` (400) and the element types of a request in ``predict``, so in-process use and a
plain ``mlflow models serve`` get those too; their values are logged with the model
(``model_config``) and ``CDSR_SERVE_MAX_RECORDS`` / ``CDSR_SERVE_MAX_HISTORY`` override them where
it is loaded. ``cdsr serve`` sets both from its own configuration, so the model and the
middleware agree.

A ``models:/<name>@<alias>`` URI is followed (:class:`AliasFollower`): the registry is asked every
``poll_seconds`` which version the alias names, a new one is loaded beside the serving one and
swapped in without a restart or a failed request, and every response says which version answered
(header ``x-cdsr-model-version: <name>/<version>``).

Configuration (:class:`ServeConfig`): the dataclass defaults, then the ``serve:`` section of
params.yaml, then environment variables ``CDSR_SERVE_<KEY>`` (``CDSR_SERVE_MAX_RECORDS=5000``),
then the command line (``--host``, ``--port``, ``--workers``). Errors keep MLflow's JSON shape:
``{"error_code": ..., "message": ...}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdsr.config import ConfigError, from_dict, load_params

ENV_PREFIX = "CDSR_SERVE_"
REQUEST_NESTING = 4  # {"dataframe_records": [{"item_ids": [...]}]}
MAX_JSON_DEPTH_CAP = 512  # Python's JSON parser recurses once per level (recursion limit 1000)
MODEL_ENV = "CDSR_SERVE_MODEL_PATH"  # the model the uvicorn workers load (workers > 1)


@dataclass(frozen=True)
class ServeConfig:
    """The ``serve:`` section of params.yaml."""

    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the model to the network
    port: int = 5001
    workers: int = 1  # uvicorn worker processes, each with its own copy of the model
    max_body_bytes: int = 8 * 1024 * 1024  # a larger request body: HTTP 413
    max_records: int = 1000  # records (rows) per request; more: HTTP 413
    max_history: int = 10_000  # events in one record's history; more: HTTP 400
    max_json_depth: int = 64  # JSON nesting levels; deeper: HTTP 400
    # seconds between registry lookups of a models:/<name>@<alias> URI (a new champion is loaded
    # and switched to without a restart); 0: serve the version found at start
    poll_seconds: int = 30

    def __post_init__(self) -> None:
        if self.poll_seconds < 0:
            raise ConfigError(f"serve.poll_seconds: must be >= 0, got {self.poll_seconds}")
        for name in ("workers", "max_body_bytes", "max_records", "max_history"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"serve.{name}: must be at least 1, got {value}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port: must be in 1..65535, got {self.port}")
        if not REQUEST_NESTING <= self.max_json_depth <= MAX_JSON_DEPTH_CAP:
            raise ConfigError(f"serve.max_json_depth: must be in {REQUEST_NESTING}..{MAX_JSON_DEPTH_CAP} "
                              f"(a request nests {REQUEST_NESTING} levels), got {self.max_json_depth}")
        if not self.host:
            raise ConfigError("serve.host: must not be empty")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def limit_hint(key: str) -> str:
    """How to change limit ``key``: said in every message about it."""
    return f"set serve.{key} in params.yaml or {env_name(key)} where the model is served"


def env_overrides(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``CDSR_SERVE_<KEY>`` variables set in ``env`` (default: os.environ), typed."""
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ServeConfig):
        raw = env.get(env_name(f.name))
        if raw is None or raw.strip() == "":
            continue
        if f.name == "host":
            out[f.name] = raw.strip()
            continue
        try:
            out[f.name] = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{env_name(f.name)}: expected an integer, got {raw!r}") from None
    return out


def serve_config(params: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> ServeConfig:
    """Defaults <- ``params["serve"]`` <- ``CDSR_SERVE_*`` in ``env`` <- ``overrides`` (None: unset)."""
    cfg = from_dict(ServeConfig, (params or {}).get("serve"), "serve")
    changes = {**env_overrides(env), **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_serve_params(path: str | Path | None) -> dict[str, Any]:
    """The params file: ``path``, else ./params.yaml if there is one, else no params (defaults)."""
    if path is None and not Path("params.yaml").is_file():
        return {}
    return load_params(path)


# -- request checks -----------------------------------------------------------------------
def json_depth(body: bytes) -> int:
    """Deepest nesting of ``[`` / ``{`` outside JSON strings (exact for valid JSON), without
    parsing: vectorised over the positions of quotes, backslashes and brackets, so its time and
    memory are linear in the body (no recursion, no backtracking)."""
    a = np.frombuffer(body, dtype=np.uint8)
    brackets = np.flatnonzero((a == 0x5B) | (a == 0x7B) | (a == 0x5D) | (a == 0x7D))
    if len(brackets) == 0:
        return 0
    quotes = np.flatnonzero(a == 0x22)
    if len(quotes):
        # a quote is escaped when an odd run of backslashes ends right before it
        slashes = np.flatnonzero(a == 0x5C)
        run = np.zeros(len(quotes), dtype=np.int64)
        if len(slashes):
            starts = slashes[np.r_[True, np.diff(slashes) != 1]]  # first backslash of each run
            ends = slashes[np.r_[np.diff(slashes) != 1, True]]  # last backslash of each run
            k = np.searchsorted(ends, quotes - 1)  # the run that may end at quote - 1
            hit = k < len(ends)
            hit[hit] &= ends[k[hit]] == quotes[hit] - 1
            run[hit] = ends[k[hit]] - starts[k[hit]] + 1
        real = quotes[run % 2 == 0]
        outside = np.searchsorted(real, brackets) % 2 == 0  # an even number of quotes before it
        brackets = brackets[outside]
    step = np.where((a[brackets] == 0x5B) | (a[brackets] == 0x7B), 1, -1).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def count_records(payload: Any) -> int | None:
    """Records (rows) in a scoring request: ``dataframe_records`` (a list), ``dataframe_split``
    (its ``data``), ``inputs`` / ``instances`` (a list, or a dict of columns); None if unknown."""
    if not isinstance(payload, dict):
        return None
    counts = []
    for key in ("dataframe_records", "inputs", "instances"):
        value = payload.get(key)
        if isinstance(value, list):
            counts.append(len(value))
        elif isinstance(value, dict):
            counts.append(max((len(v) for v in value.values() if isinstance(v, list)), default=1))
    split = payload.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("data"), list):
        counts.append(len(split["data"]))
    return max(counts) if counts else None


def check_json(body: bytes, cfg: ServeConfig) -> tuple[int, str, str] | None:
    """(status, error code, message) for a JSON request body past a limit; None if it may go on
    (a body that is not valid JSON goes on: MLflow answers it with its own 400)."""
    opening = body.count(b"[") + body.count(b"{")
    if opening > cfg.max_json_depth:  # else it cannot nest deeper: no need to look
        depth = json_depth(body)
        if depth > cfg.max_json_depth:
            return 400, "BAD_REQUEST", (
                f"request JSON is nested {depth} levels deep, over the limit of {cfg.max_json_depth} "
                f"(a scoring request nests {REQUEST_NESTING}); {limit_hint('max_json_depth')}")
    try:
        payload = json.loads(body)
    except RecursionError:
        return 400, "BAD_REQUEST", (f"request JSON is nested too deeply to parse; the limit is "
                                    f"{cfg.max_json_depth} levels ({limit_hint('max_json_depth')})")
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    n = count_records(payload)
    if n is not None and n > cfg.max_records:
        return 413, "REQUEST_LIMIT_EXCEEDED", (
            f"request has {n} records, over the limit of {cfg.max_records} per request; send them in "
            f"several requests or {limit_hint('max_records')}")
    return None


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


class LimitsMiddleware:
    """Pure-ASGI request limits in front of an app (see the module docstring). Bodies within the
    cap are buffered and replayed to the app unchanged.

    A body over the cap is never kept. The 413 for it: uvicorn (h11) closes the connection after
    an answer sent before the whole body was read, and a client that reads only after sending
    everything (Python's urllib / requests; curl watches and stops) then sees a reset instead of
    the answer. So a body of up to twice the cap is first read to its end and dropped (constant
    memory); a larger one, or one whose client waits for ``Expect: 100-continue``, is answered at
    once: from ``Content-Length`` before any of it is read."""

    def __init__(self, app, cfg: ServeConfig) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.cfg.max_body_bytes
        waits = (_header(scope, b"expect") or b"").lower() == b"100-continue"  # sends nothing unless asked
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _error(send, 400, "BAD_REQUEST", f"invalid Content-Length {length!r}", close=True)
            if declared > cap:
                drained = not waits and declared <= 2 * cap and await _drain(receive, 0, 2 * cap)
                return await _error(send, 413, "REQUEST_LIMIT_EXCEEDED",
                                    f"request body is {declared} bytes, over the limit of {cap} bytes; send "
                                    f"fewer records per request or {limit_hint('max_body_bytes')}", close=not drained)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:  # a chunked body: counted as it streams in
                drained = message.get("more_body", False) is False or await _drain(receive, size, 2 * cap)
                return await _error(send, 413, "REQUEST_LIMIT_EXCEEDED",
                                    f"request body is over the limit of {cap} bytes; send fewer records per "
                                    f"request or {limit_hint('max_body_bytes')}", close=not drained)
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        del parts
        ctype = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/invocations" \
                and ctype == b"application/json":
            problem = await asyncio.to_thread(check_json, body, self.cfg)  # off the event loop
            if problem is not None:
                return await _error(send, *problem)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect as usual

        return await self.app(scope, replay, send)


async def _drain(receive, size: int, limit: int) -> bool:
    """Read and drop the rest of a body while the total stays within ``limit``; True if it ended."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        size += len(message.get("body", b""))
        if size > limit:
            return False
        if not message.get("more_body", False):
            return True


async def _error(send, status: int, code: str, message: str, close: bool = False) -> None:
    """An MLflow-shaped JSON error; ``close`` when the rest of the body is left unread."""
    content = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


# -- the server -----------------------------------------------------------------------------
def model_limits_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment that makes the loaded model enforce ``cfg``'s limits (see pyfunc)."""
    return {env_name("max_records"): str(cfg.max_records), env_name("max_history"): str(cfg.max_history)}


def create_app(model, cfg: ServeConfig):
    """MLflow's scoring app for a loaded pyfunc ``model``, behind :class:`LimitsMiddleware`."""
    from mlflow.pyfunc import scoring_server

    return LimitsMiddleware(scoring_server.init(model), cfg)


VERSION_HEADER = b"x-cdsr-model-version"


def alias_of(model_uri: str) -> tuple[str, str] | None:
    """``models:/<name>@<alias>`` -> (name, alias); any other URI -> None."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    name, alias = model_uri[len("models:/"):].rsplit("@", 1)
    return name.strip("/"), alias


class AliasFollower:
    """The ASGI app of the version a registry alias names, switched when the alias moves.

    A thread looks the alias up every ``poll_seconds``; a new version is loaded beside the one
    serving and then swapped in by one reference assignment, so a request in flight finishes on
    the version it started with and none fails (a version that fails to load is logged and the
    old one keeps serving). Every HTTP response carries ``x-cdsr-model-version: <name>/<version>``."""

    def __init__(self, name: str, alias: str, cfg: ServeConfig, log=print) -> None:
        from mlflow import MlflowClient

        self.name, self.alias, self.cfg, self.log = name, alias, cfg, log
        self.client = MlflowClient()
        version = self.client.get_model_version_by_alias(name, alias)
        self.current = (str(version.version), self._app(str(version.version)))
        if cfg.poll_seconds > 0:  # a daemon thread: it ends with the server process
            import threading

            threading.Thread(target=self._follow, name="cdsr-alias-follower", daemon=True).start()

    def _app(self, version: str):
        import mlflow
        from mlflow.pyfunc import scoring_server

        return scoring_server.init(mlflow.pyfunc.load_model(f"models:/{self.name}/{version}"))

    def check(self) -> str:
        """Look the alias up once; load and switch to a new version. -> the version serving."""
        version = str(self.client.get_model_version_by_alias(self.name, self.alias).version)
        if version != self.current[0]:
            app = self._app(version)
            before, self.current = self.current[0], (version, app)
            self.log(f"{self.name}@{self.alias}: version {before} -> {version}")
        return self.current[0]

    def _follow(self) -> None:
        import time

        while True:
            time.sleep(self.cfg.poll_seconds)
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 (a registry or load failure keeps the old version serving)
                self.log(f"{self.name}@{self.alias}: still serving version {self.current[0]} ({type(exc).__name__}: {exc})")

    async def __call__(self, scope, receive, send) -> None:
        version, app = self.current  # one read: this request is answered by this version
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        tag = f"{self.name}/{version}".encode()

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (VERSION_HEADER, tag)]}
            await send(message)

        await app(scope, receive, tagged)


def serving_app(model_uri: str, cfg: ServeConfig, log=print):
    """The app for ``model_uri``: an alias URI is followed (:class:`AliasFollower`), anything else
    is loaded once."""
    import mlflow

    alias = alias_of(model_uri)
    if alias is None:
        return create_app(mlflow.pyfunc.load_model(model_uri), cfg)
    return LimitsMiddleware(AliasFollower(*alias, cfg, log), cfg)


def app_factory():
    """uvicorn factory of each worker process (``workers`` > 1): the model at ``$CDSR_SERVE_MODEL_PATH``
    with the configuration in ``CDSR_SERVE_*`` (both set by :func:`run`)."""
    import mlflow

    cfg = serve_config({})
    uri = os.environ[MODEL_ENV]
    return serving_app(uri, cfg) if alias_of(uri) else create_app(mlflow.pyfunc.load_model(uri), cfg)


def run(model_uri: str, cfg: ServeConfig, params: Mapping[str, Any] | None = None, log=print) -> None:
    """Serve ``model_uri`` until interrupted (SIGINT / SIGTERM). The tracking store is the one of
    the ``mlflow:`` section of ``params`` (``$MLFLOW_TRACKING_URI`` first), as for every cdsr command."""
    import mlflow
    import uvicorn

    from cdsr.track import tracking

    store = tracking.setup(tracking.tracking_config(params))
    os.environ.update(model_limits_env(cfg))  # the model reads them when it is loaded
    limits = (f"max_body_bytes={cfg.max_body_bytes} max_records={cfg.max_records} "
              f"max_history={cfg.max_history} max_json_depth={cfg.max_json_depth}")
    following = alias_of(model_uri) is not None and cfg.poll_seconds > 0
    if following:
        limits += f"; following the alias every {cfg.poll_seconds} s"
    if cfg.workers == 1:
        app = serving_app(model_uri, cfg, log)
        log(f"serving {model_uri} on http://{cfg.host}:{cfg.port} ({limits})")
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
        return
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    with tempfile.TemporaryDirectory(prefix="cdsr-serve-") as tmp:
        # a followed alias: each worker follows it; else one download (and one registry lookup:
        # every worker serves the same version)
        local = model_uri if following else _download_artifact_from_uri(model_uri, output_path=tmp)
        os.environ.update({env_name(f.name): str(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)})
        os.environ[MODEL_ENV] = local
        if following:
            os.environ["MLFLOW_TRACKING_URI"] = store  # the workers look the alias up there
        log(f"serving {model_uri} on http://{cfg.host}:{cfg.port} with {cfg.workers} workers ({limits})")
        uvicorn.run("cdsr.track.serve:app_factory", factory=True, host=cfg.host, port=cfg.port,
                    workers=cfg.workers, log_level="info")
