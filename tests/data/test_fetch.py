"""`cdsr data fetch`: the downloader against a real HTTP server on 127.0.0.1 serving generated
bytes, one behaviour per path (normal, a dropped connection, a server ignoring Range, 404 / S3's
403 "Access Denied", an empty reply), an unreachable port, the lock file, and the command line
from fetch to a built split. Nothing here touches the internet."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdsr.cli import app
from cdsr.data import fetch as F
from cdsr.data.catalogue import Pin

BODY = bytes(range(256)) * 400  # 102,400 bytes
DROP_AT = 40_000
S3_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
             b"<Message>Access Denied</Message></Error>")


class Handler(BaseHTTPRequestHandler):
    """GET /<behaviour>/<anything>: the behaviour and body come from the server's ``routes``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            n = srv.counts.get(self.path, 0)
            srv.counts[self.path] = n + 1
        behaviour, body = srv.routes.get(self.path, ("404", b""))
        self._serve(behaviour, body, rng, n)

    def _note(self, sent: int) -> None:
        """Log (path, Range, body bytes) before the reply goes out: the client may be done
        reading, and the test checking the log, before this thread runs another line."""
        with self.server.lock:
            self.server.log.append((self.path, self.headers.get("Range"), sent))

    def _serve(self, behaviour: str, body: bytes, rng: str | None, n: int) -> int:
        if behaviour == "404":
            return self._reply(404, b"not found")
        if behaviour == "403":
            return self._reply(403, S3_DENIED, "application/xml")
        if behaviour == "empty":
            return self._reply(200, b"")
        if behaviour == "empty-once" and n == 0:
            return self._reply(200, b"")
        if behaviour in ("drop-once", "ignore-range") and n == 0:
            self._note(DROP_AT)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:DROP_AT])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return DROP_AT
        if rng and behaviour != "ignore-range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                return self._reply(416, b"")
            self._note(len(body) - start)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])
            return len(body) - start
        return self._reply(200, body)

    def _reply(self, code: int, body: bytes, ctype: str = "application/octet-stream") -> int:
        self._note(len(body))
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return len(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.routes, srv.counts, srv.log, srv.lock = {}, {}, [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours proxy variables: the tests talk to 127.0.0.1 directly."""
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv(F.ENV_BASE_URL, raising=False)


def opts(logs: list[str] | None = None, retries: int = 2) -> F.Options:
    return F.Options(retries=retries, backoff_s=0.001, timeout_s=5, progress=False,
                     log=(logs.append if logs is not None else lambda m: None))


def remote(tmp_path: Path, *urls: str, pin: Pin = Pin(), key: str = "2023/x/file.bin") -> F.RemoteFile:
    return F.RemoteFile(key, tuple(urls), tmp_path / "raw" / "file.bin", pin)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_normal_download_pins_size_and_sha256(server, tmp_path):
    server.routes["/ok/file.bin"] = ("ok", BODY)
    lock = F.Lock(tmp_path / "fetch.lock.json")
    r = F.fetch_file(remote(tmp_path, server.url + "/ok/file.bin"), lock, opts())
    assert r.status == "downloaded" and r.dest.read_bytes() == BODY
    assert not list(r.dest.parent.glob("*.part"))
    pinned = json.loads((tmp_path / "fetch.lock.json").read_text())["files"]["2023/x/file.bin"]
    assert pinned == {"size": len(BODY), "sha256": sha(BODY)}


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.routes["/drop/file.bin"] = ("drop-once", BODY)
    logs: list[str] = []
    r = F.fetch_file(remote(tmp_path, server.url + "/drop/file.bin"), None, opts(logs))
    assert r.dest.read_bytes() == BODY
    (p1, rng1, sent1), (p2, rng2, sent2) = server.log
    assert rng1 is None and sent1 == DROP_AT
    assert rng2 == f"bytes={DROP_AT}-" and sent2 == len(BODY) - DROP_AT  # only the rest transferred
    assert any("connection dropped" in m for m in logs)


def test_a_later_run_resumes_the_part_of_a_failed_one(server, tmp_path):
    server.routes["/drop/file.bin"] = ("drop-once", BODY)
    f = remote(tmp_path, server.url + "/drop/file.bin")
    with pytest.raises(F.DownloadFailed, match="next run resumes"):
        F.fetch_file(f, None, opts(retries=0))
    assert f.dest.with_name("file.bin.part").stat().st_size == DROP_AT and not f.dest.exists()
    r = F.fetch_file(f, None, opts(retries=0))
    assert r.dest.read_bytes() == BODY and server.log[-1][1] == f"bytes={DROP_AT}-"


def test_416_on_resume_restarts_unless_the_part_has_the_pinned_size(server, tmp_path):
    server.routes["/ok/file.bin"] = ("ok", BODY)
    f = remote(tmp_path, server.url + "/ok/file.bin")
    f.dest.parent.mkdir(parents=True)
    part = f.dest.with_name("file.bin.part")
    part.write_bytes(b"y" * len(BODY))  # as long as the file, but not its bytes, and no pin
    r = F.fetch_file(f, None, opts())
    assert r.dest.read_bytes() == BODY and [x[1] for x in server.log] == [f"bytes={len(BODY)}-", None]
    # with a pin, a complete part is verified and moved into place without a request
    r.dest.unlink()
    part.write_bytes(BODY)
    n = len(server.log)
    f2 = remote(tmp_path, server.url + "/ok/file.bin", pin=Pin(size=len(BODY), sha256=sha(BODY)))
    assert F.fetch_file(f2, None, opts()).dest.read_bytes() == BODY and len(server.log) == n


def test_a_published_md5_is_checked(server, tmp_path):
    server.routes["/ok/file.bin"] = ("ok", BODY)
    good = hashlib.md5(BODY).hexdigest()
    assert F.fetch_file(remote(tmp_path, server.url + "/ok/file.bin", pin=Pin(md5=good)), None, opts()).size == len(BODY)
    (tmp_path / "raw" / "file.bin").unlink()
    with pytest.raises(F.ChecksumMismatch, match="md5"):
        F.fetch_file(remote(tmp_path, server.url + "/ok/file.bin", pin=Pin(md5="f" * 32)), None, opts())


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.routes["/norange/file.bin"] = ("ignore-range", BODY)
    logs: list[str] = []
    r = F.fetch_file(remote(tmp_path, server.url + "/norange/file.bin"), None, opts(logs))
    assert r.dest.read_bytes() == BODY
    assert server.log[1][1] == f"bytes={DROP_AT}-" and server.log[1][2] == len(BODY)
    assert any("ignored the Range request" in m for m in logs)


@pytest.mark.parametrize("bad", ["404", "403"])
def test_mirror_that_fails_then_a_good_mirror(server, tmp_path, bad):
    server.routes["/bad/file.bin"] = (bad, b"")
    server.routes["/good/file.bin"] = ("ok", BODY)
    r = F.fetch_file(remote(tmp_path, server.url + "/bad/file.bin", server.url + "/good/file.bin"), None, opts())
    assert r.url.endswith("/good/file.bin") and r.dest.read_bytes() == BODY
    assert server.counts["/bad/file.bin"] == 1  # a 404 / Access Denied is not retried


def test_wrong_checksum_is_an_error_and_nothing_is_in_place(server, tmp_path):
    server.routes["/ok/file.bin"] = ("ok", BODY)
    wrong = "0" * 64
    f = remote(tmp_path, server.url + "/ok/file.bin", pin=Pin(sha256=wrong))
    with pytest.raises(F.ChecksumMismatch) as e:
        F.fetch_file(f, None, opts())
    msg = str(e.value)
    assert "file.bin" in msg and server.url + "/ok/file.bin" in msg and wrong in msg and sha(BODY) in msg
    assert not f.dest.exists() and not f.dest.with_name("file.bin.part").exists()
    assert f.dest.with_name("file.bin.bad").read_bytes() == BODY  # kept aside for inspection
    assert isinstance(e.value, F.FetchError)


def test_empty_reply_is_never_kept(server, tmp_path):
    server.routes["/empty/file.bin"] = ("empty", b"")
    f = remote(tmp_path, server.url + "/empty/file.bin")
    with pytest.raises(F.DownloadFailed, match="empty reply"):
        F.fetch_file(f, None, opts(retries=2))
    assert server.counts["/empty/file.bin"] == 3 and not f.dest.exists()
    assert not f.dest.with_name("file.bin.part").exists()


def test_empty_reply_then_the_file(server, tmp_path):
    server.routes["/empty1/file.bin"] = ("empty-once", BODY)
    r = F.fetch_file(remote(tmp_path, server.url + "/empty1/file.bin"), None, opts())
    assert r.dest.read_bytes() == BODY and server.counts["/empty1/file.bin"] == 2


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_lists_every_url_tried(tmp_path):
    urls = [f"http://127.0.0.1:{_closed_port()}/a/file.bin", f"http://127.0.0.1:{_closed_port()}/b/file.bin"]
    with pytest.raises(F.Offline) as e:
        F.fetch_file(remote(tmp_path, *urls), None, opts())
    for u in urls:
        assert u in str(e.value)
    assert "no mirror could be reached" in str(e.value)


def test_rerun_is_a_no_op_and_the_lock_verifies_later_downloads(server, tmp_path):
    server.routes["/ok/file.bin"] = ("ok", BODY)
    lock = F.Lock(tmp_path / "lock.json")
    url = server.url + "/ok/file.bin"
    F.fetch_file(remote(tmp_path, url, pin=lock.pin("2023/x/file.bin")), lock, opts())
    n = len(server.log)
    lock = F.Lock(tmp_path / "lock.json")  # as a new run reads it
    r = F.fetch_file(remote(tmp_path, url, pin=lock.pin("2023/x/file.bin")), lock, opts())
    assert r.status == "skipped" and len(server.log) == n  # no request at all
    # the server now serves other bytes under the same name: the pin refuses them
    r.dest.unlink()
    server.routes["/ok/file.bin"] = ("ok", BODY[::-1])
    with pytest.raises(F.ChecksumMismatch, match="sha256"):
        F.fetch_file(remote(tmp_path, url, pin=lock.pin("2023/x/file.bin")), lock, opts())
    assert not r.dest.exists()


def test_dvc_add_tracks_the_raw_directory(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    raw = Path("data/d/raw")
    raw.mkdir(parents=True)
    (raw / "Books.jsonl.gz").write_bytes(b"x")
    F.dvc_add(raw, lambda m: None)
    assert "md5" in Path("data/d/raw.dvc").read_text()


# -- the command line ------------------------------------------------------------------------

def _reviews(domain: str, items: int, users: int) -> bytes:
    """A small Amazon-2023-style reviews JSONL.gz: every user rates 6 items of the domain."""
    lines = []
    for u in range(users):
        for k in range(6):
            item = f"{domain[:2].upper()}{(u * 3 + k * 7) % items:04d}"
            lines.append(json.dumps({"rating": float(1 + (u + k) % 5), "title": "t", "text": "r", "images": [],
                                     "asin": item + "X", "parent_asin": item, "user_id": f"U{u:04d}",
                                     "timestamp": 1_600_000_000_000 + (u * 100 + k * 13 + len(domain)) * 86_400_000,
                                     "helpful_vote": 0, "verified_purchase": True}))
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


@pytest.fixture
def fetch_project(server, tmp_path):
    files = {"Books": _reviews("Books", 30, 40), "Movies_and_TV": _reviews("Movies_and_TV", 30, 40)}
    for cat, body in files.items():
        server.routes[f"/2023/raw/review_categories/{cat}.jsonl.gz"] = ("ok", body)
    params = {
        "fetch": {"retries": 1, "backoff_s": 0.001, "lock": str(tmp_path / "fetch.lock.json")},
        "datasets": {"tiny-2023": {
            "fetch": {"release": "2023", "categories": ["Books", "Movies_and_TV"], "files": ["reviews"]},
            "sources": [{"format": "amazon-2023-jsonl", "path": "{data_root}/tiny-2023/raw/" + f"{c}.jsonl.gz"}
                        for c in files],
            "domains": ["Books", "Movies_and_TV"],
            "sequences": {"filters": [{"min_user_domains": 2}, {"min_item_events": 1},
                                      {"min_user_domain_events": 2}], "domains_required": "all"},
            "split": {"seed": 1},
        }},
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p, tmp_path / "data", files


def test_cli_fetch_then_build(server, fetch_project, monkeypatch):
    params, root, files = fetch_project
    monkeypatch.setenv(F.ENV_BASE_URL, server.url)
    runner = CliRunner()
    args = ["data", "fetch", "tiny-2023", "--params", str(params), "--root", str(root), "--mirror-only"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for cat, body in files.items():
        assert (root / "tiny-2023" / "raw" / f"{cat}.jsonl.gz").read_bytes() == body
    lock = json.loads(Path(yaml.safe_load(params.read_text())["fetch"]["lock"]).read_text())["files"]
    assert set(lock) == {f"2023/raw/review_categories/{c}.jsonl.gz" for c in files}
    n = len(server.log)
    assert runner.invoke(app, args).exit_code == 0 and len(server.log) == n  # second run: no request
    res = runner.invoke(app, ["data", "build", "--dataset", "tiny-2023", "--params", str(params), "--root", str(root)])
    assert res.exit_code == 0, res.output
    split = json.loads((root / "tiny-2023" / "processed" / "split.json").read_text())
    assert split["targets"]


def test_cli_dry_run_and_list(server, fetch_project):
    params, root, _ = fetch_project
    runner = CliRunner()
    res = runner.invoke(app, ["data", "fetch", "tiny-2023", "--params", str(params), "--root", str(root),
                              "--dry-run", "--mirror", "http://mirror.invalid/amazon"])
    assert res.exit_code == 0, res.output
    assert "http://mirror.invalid/amazon/2023/raw/review_categories/Books.jsonl.gz" in res.output
    assert "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/review_categories/Books.jsonl.gz" in res.output
    assert server.log == [] and not (root / "tiny-2023").exists()
    res = runner.invoke(app, ["data", "fetch", "--list"])
    assert res.exit_code == 0 and "benchmark-5core-timestamp-w-his" in res.output and "Movies_and_TV" in res.output


def test_cli_offline_is_one_clear_error(fetch_project):
    params, root, _ = fetch_project
    res = CliRunner().invoke(app, ["data", "fetch", "tiny-2023", "--params", str(params), "--root", str(root),
                                   "--mirror", f"http://127.0.0.1:{_closed_port()}", "--mirror-only"])
    assert res.exit_code == 1
    assert "no mirror could be reached" in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_cli_refuses_a_dataset_without_fetch(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"datasets": {"local": {"sources": [{"format": "amazon-2023-jsonl", "path": "x"}]}}}))
    res = CliRunner().invoke(app, ["data", "fetch", "local", "--params", str(p)])
    assert res.exit_code == 1 and "no `fetch:` entry" in res.output


def test_unknown_category_is_a_config_error(tmp_path):
    p = tmp_path / "params.yaml"
    ds = {"fetch": {"release": "2023", "categories": ["Bookz"], "files": ["reviews"]},
          "sources": [{"format": "amazon-2023-jsonl", "path": "x"}]}
    p.write_text(yaml.safe_dump({"datasets": {"d": ds}}))
    res = CliRunner().invoke(app, ["data", "fetch", "d", "--params", str(p)])
    assert res.exit_code == 1 and "Bookz" in res.output


def test_the_presets_parse_and_plan(in_root):
    """The params.yaml presets name real catalogue entries and need nothing under ../shared."""
    from cdsr.config import load_params
    from cdsr.data.config import dataset_config

    p = load_params()
    fetched = [n for n, e in p["datasets"].items() if (e or {}).get("fetch")]
    assert {"amazon-2023-books-movies", "amazon-2023-home-food", "amazon-2023-electronics-phones",
            "amazon-2023-books-movies-5core"} <= set(fetched)
    for name in fetched:
        cfg = dataset_config(p, name)
        assert all("../shared" not in s.path for s in cfg.sources)
        files = F.plan(name, cfg.fetch, Path("data") / name / "raw", F.Lock(Path(os.devnull + ".none")))
        assert files and all(f.urls[0].startswith("https://mcauleylab.ucsd.edu/") for f in files)


def test_only_a_declared_dataset_name_is_fetched(tmp_path):
    from conftest import ROOT

    res = CliRunner().invoke(app, ["data", "fetch", "../../evil", "--params", str(ROOT / "params.yaml"),
                                   "--root", str(tmp_path / "data")])
    assert res.exit_code == 1 and "is not declared" in res.output
    assert list(tmp_path.iterdir()) == []


def test_an_error_page_served_as_a_gz_file_is_never_pinned(server, tmp_path):
    server.routes["/page/Books.jsonl.gz"] = ("ok", b"<html>Service moved</html>")
    lock = F.Lock(tmp_path / "lock.json")
    f = F.RemoteFile("2023/raw/Books.jsonl.gz", (server.url + "/page/Books.jsonl.gz",),
                     tmp_path / "raw" / "Books.jsonl.gz", Pin())
    with pytest.raises(F.ChecksumMismatch, match="not gzip data"):
        F.fetch_file(f, lock, opts())
    assert not f.dest.exists() and lock.files == {}
