"""Subprocess servers for tests: a free port, start in a process group of its own, wait for an
HTTP health URL, stop the whole group, and the tail of its log for failure messages; and the
servers themselves: a Prefect API server, an MLflow tracking server, a PostgreSQL cluster.

Imported as ``from servers import ...`` (pytest's rootdir import mode finds it, as ``helpers``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent  # the virtual environment's scripts (prefect, mlflow, cdsr)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    """The last ``n`` lines of the log at ``path`` (a note when there is none)."""
    if not path.exists():
        return f"({path.name}: no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def start(cmd: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, so that :func:`stop` reaches its
    children too), stdin from /dev/null, stdout and stderr together into ``log``."""
    with log.open("wb") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop ``proc``'s process group: SIGTERM, up to ``grace`` seconds for it to exit, then SIGKILL
    to whatever is left (children that outlived their parent too). ``grace=0`` kills at once,
    leaving the processes no chance to clean up."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, interval: float = 0.5) -> None:
    """Poll ``url`` every ``interval`` seconds until it answers HTTP 200. Fails (AssertionError,
    with the tail of ``log``) if ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode} before {url} answered:\n{tail(log)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # refused, reset, timed out, or an HTTP error status (URLError is an OSError)
            pass
        assert time.monotonic() < deadline, f"{url} not answering 200 after {timeout} s:\n{tail(log)}"
        time.sleep(interval)


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def postgres_missing() -> str | None:
    """Why a throwaway PostgreSQL cluster cannot be started here (None: it can)."""
    if _pg_bin("initdb") is None or _pg_bin("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


@contextlib.contextmanager
def postgres_cluster(dbname: str = "cdsr"):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port, trust auth for local clients),
    with database ``dbname``; yields its SQLAlchemy URL (psycopg 3 driver). The server refuses
    to run as root, so as root it runs as the ``postgres`` user (runuser), in a directory of its
    own under the system temporary folder. Stopped (immediate mode) and removed on exit."""
    import pwd
    import shutil
    import tempfile

    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="cdsr-pg-"))
    data, log = base / "data", base / "server.log"
    if as_root:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if as_root else list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120, check=False, cwd=base)

    port = free_port()
    try:
        res = run(_pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        assert res.returncode == 0, f"initdb failed:\n{res.stdout}\n{res.stderr}"
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        res = run(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        assert res.returncode == 0, f"pg_ctl start failed:\n{res.stdout}\n{res.stderr}\n{tail(log)}"
        res = run(_pg_bin("psql") or "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {dbname}")
        assert res.returncode == 0, f"CREATE DATABASE failed:\n{res.stdout}\n{res.stderr}"
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        if (data / "postmaster.pid").exists():
            run(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def base_env(tmp: Path) -> dict[str, str]:
    """This environment without its Prefect/MLflow settings, offline, Prefect's home in tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@contextlib.contextmanager
def _http_service(cmd: list[str], env: dict, log: Path, health: str, cwd: Path | None, timeout: float):
    """A server process started with ``cmd``, ready once ``health`` answers; stopped on exit."""
    proc = start(cmd, env, log, cwd=cwd)
    try:
        wait_http(health, proc, log, timeout)
        yield proc
    finally:
        stop(proc)


@contextlib.contextmanager
def prefect_server(tmp: Path, cwd: Path | None = None, timeout: float = 120):
    """``prefect server start`` on 127.0.0.1:<free port> with its own home and sqlite database in
    ``tmp``, no UI, no analytics; yields ``(api_url, log)`` once /health answers; stopped on exit."""
    port = free_port()
    env = {**base_env(tmp), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}"}
    log = tmp / "server.log"
    api = f"http://127.0.0.1:{port}/api"
    with _http_service([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                        "--no-ui", "--analytics-off"], env, log, f"{api}/health", cwd, timeout):
        yield api, log


def prefect_api(api: str, coro_fn):
    """Run ``coro_fn(client)`` with a Prefect client on ``api``; returns its result."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return asyncio.run(go())


@contextlib.contextmanager
def mlflow_server(tmp: Path, timeout: float = 120):
    """``mlflow server`` on 127.0.0.1:<free port>: a sqlite backend and an artifact store in
    ``tmp``, artifacts served over HTTP (clients on other machines need no shared filesystem), one
    worker process. Yields ``(tracking_uri, log)`` once /health answers; stopped on exit."""
    port = free_port()
    log = tmp / "mlflow-server.log"
    url = f"http://127.0.0.1:{port}"
    with _http_service([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                        "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                        "--artifacts-destination", str(tmp / "artifacts")], base_env(tmp), log, f"{url}/health",
                       tmp, timeout):
        yield url, log


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children...), read from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid]
        out += kids
        todo += kids
    return out


def pids_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out
