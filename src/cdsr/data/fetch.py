"""Downloading the official Amazon review files of a dataset: `cdsr data fetch NAME`.

Per file (see :func:`fetch_file`):

1. If the destination exists and matches its pin (size + digest from the catalogue or the lock
   file), nothing is requested: re-running is a no-op.
2. Mirrors are tried in order: a private base URL first when one is configured
   (``--mirror``, ``CDSR_FETCH_BASE_URL`` or params ``fetch.base_url``; files are addressed as
   ``<base>/<release>/<path>``), then the catalogue's official roots (unless ``mirror_only``).
3. The body streams to ``<dest>.part``. After a dropped connection the next attempt asks for
   ``Range: bytes=N-``: a 206 appends, a 200 (a server that ignores Range) restarts from zero,
   a 416 means the part is complete only if its size is the pinned size. Attempts back off
   exponentially. 404 / 410 / 403 (S3's "Access Denied") and other client errors move to the
   next mirror at once; so does a host name that does not resolve.
4. A body shorter than its Content-Length, or an empty file, is never kept: it is retried.
5. Size and digest (and, for ``.gz`` files, the gzip magic bytes, so that an error page served
   with 200 is never pinned) are checked *before* ``os.replace`` moves the part into place. A
   mismatch is an error naming file, URL, expected and actual values; the bytes are kept as
   ``<dest>.bad`` for inspection (never under the destination name, so nothing downstream reads
   them) and the next mirror is tried.
6. A file without a pin gets one: its size and sha256 are recorded in the lock file (committed
   with the project) on first download, and every later download must match them.

Every error is a :class:`FetchError`; the CLI prints its message, not a traceback.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cdsr.config import ConfigError, from_dict
from cdsr.data import catalogue
from cdsr.data.catalogue import Pin

ENV_BASE_URL = "CDSR_FETCH_BASE_URL"
CHUNK = 1 << 20
USER_AGENT = "cdsr-fetch/1"


class FetchError(Exception):
    """Any failure to fetch a file; the message names the file and what was tried."""


class ChecksumMismatch(FetchError):
    """A downloaded file whose size or digest is not the pinned one."""


class DownloadFailed(FetchError):
    """Every mirror of a file failed; the message lists each URL and its failure."""


class Offline(DownloadFailed):
    """No mirror could be reached at all (name resolution or connection failures only)."""


class _Retry(Exception):
    """An attempt that failed in a way worth retrying on the same mirror (resuming)."""


class _NextMirror(Exception):
    """A failure that retrying the same mirror will not fix."""


class _Unreachable(_Retry):
    """A connection-level failure (refused, reset before any response, timeout)."""


@dataclass(frozen=True)
class FetchConfig:
    """The ``fetch:`` section of params.yaml."""

    # a private mirror tried before the official ones: <base_url>/<release>/<path>
    base_url: str | None = None
    # attempts per mirror after the first; waits backoff_s * 2**k between them (capped at 60 s)
    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    # size + sha256 recorded on first download (committed, like dvc.lock)
    lock: str = "fetch.lock.json"

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError("fetch: retries and backoff_s must be >= 0, timeout_s > 0")


def fetch_config(params: dict[str, Any]) -> FetchConfig:
    return from_dict(FetchConfig, params.get("fetch"), "fetch")


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its key (``<release>/<path>``), URLs in order, pin and destination."""

    key: str
    urls: tuple[str, ...]
    dest: Path
    pin: Pin


@dataclass
class Options:
    """How to download (resolved from FetchConfig, the environment and command-line options)."""

    retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Result:
    key: str
    dest: Path
    status: str  # "skipped" (already in place), "downloaded"
    size: int
    sha256: str
    url: str | None = None


# -- the lock file -------------------------------------------------------------------------

class Lock:
    """``{"version": 1, "files": {"<release>/<path>": {"size": N, "sha256": "..."}}}``, written
    atomically with sorted keys so that its diffs stay readable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.files = dict(data["files"])
            except (ValueError, KeyError, TypeError) as exc:
                raise FetchError(f"{self.path}: not a fetch lock file ({exc}); fix or delete it") from exc

    def pin(self, key: str) -> Pin:
        e = self.files.get(key) or {}
        return Pin(size=e.get("size"), sha256=e.get("sha256"), md5=e.get("md5"))

    def record(self, key: str, size: int, sha256: str) -> None:
        self.files[key] = {"size": size, "sha256": sha256}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "files": self.files}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def merge_pins(published: Pin, locked: Pin) -> Pin:
    """A published value wins; the lock fills what is not published."""
    return Pin(size=published.size if published.size is not None else locked.size,
               sha256=published.sha256 or locked.sha256, md5=published.md5 or locked.md5)


# -- planning ------------------------------------------------------------------------------

def base_urls(release_name: str, base_url: str | None, mirror_only: bool) -> list[str]:
    """Roots to try in order: the private one (``<base>/<release>/``) first, then the official."""
    rel = catalogue.release(release_name)
    out = [base_url.rstrip("/") + f"/{release_name}/"] if base_url else []
    if mirror_only and not out:
        raise FetchError("--mirror-only needs a mirror: --mirror URL, $CDSR_FETCH_BASE_URL or fetch.base_url")
    return out if mirror_only else out + list(rel.mirrors)


def plan(dataset: str, spec: Any, raw_dir: Path, lock: Lock, base_url: str | None = None,
         mirror_only: bool = False) -> list[RemoteFile]:
    """The files of ``spec`` (a data.config.FetchSpec) with their URLs, pins and destinations
    (``raw_dir/<file name>``; two files with one name would be an error)."""
    rel = catalogue.release(spec.release)
    roots = base_urls(spec.release, base_url, mirror_only)
    out, seen = [], {}
    for path in catalogue.paths(spec.release, list(spec.categories), list(spec.files)):
        name = path.rsplit("/", 1)[-1]
        if name in seen:  # pragma: no cover - the release's file names are unique per layout
            raise FetchError(f"dataset '{dataset}': {path} and {seen[name]} would both be {raw_dir / name}")
        seen[name] = path
        key = f"{spec.release}/{path}"
        pin = merge_pins(rel.known.get(path, Pin()), lock.pin(key))
        out.append(RemoteFile(key, tuple(r + path for r in roots), raw_dir / name, pin))
    return out


# -- digests -------------------------------------------------------------------------------

class _Digest:
    """sha256 always (it is what the lock records); md5 only where a pin publishes one."""

    def __init__(self, md5: bool = False) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.size = 0

    def update(self, b: bytes) -> None:
        self.sha256.update(b)
        if self.md5 is not None:
            self.md5.update(b)
        self.size += len(b)

    def feed_file(self, path: Path) -> None:
        with open(path, "rb") as fh:
            while b := fh.read(CHUNK):
                self.update(b)


def _problems(d: _Digest, pin: Pin) -> list[str]:
    """How ``d`` differs from ``pin`` (empty: it matches every known value)."""
    out = []
    if pin.size is not None and d.size != pin.size:
        out.append(f"size {d.size} bytes, expected {pin.size}")
    if pin.sha256 and d.sha256.hexdigest() != pin.sha256.lower():
        out.append(f"sha256 {d.sha256.hexdigest()}, expected {pin.sha256.lower()}")
    if pin.md5 and d.md5 is not None and d.md5.hexdigest() != pin.md5.lower():
        out.append(f"md5 {d.md5.hexdigest()}, expected {pin.md5.lower()}")
    return out


def _not_gzip(path: Path, name: str) -> list[str]:
    """A ``.gz`` file must start with the gzip magic bytes: an HTML error page or a proxy's
    notice served with status 200 would otherwise be pinned as the file on first download."""
    if not name.endswith(".gz"):
        return []
    with open(path, "rb") as fh:
        head = fh.read(2)
    return [] if head == b"\x1f\x8b" else [f"not gzip data (starts with {head!r}; an error page?)"]


def _pinned(pin: Pin) -> bool:
    return bool(pin.sha256 or pin.md5)


# -- one attempt ---------------------------------------------------------------------------

def _is_dns_failure(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, socket.gaierror)


def _request(url: str, part: Path, offset: int, opts: Options) -> http.client.HTTPResponse:
    """Open ``url`` (with ``Range: bytes=offset-`` when resuming); failures are sorted into
    retry-here (_Retry), unreachable (_Unreachable) and next-mirror (_NextMirror)."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(req, timeout=opts.timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            # past the end: a part of the pinned size never gets here (_attempt verifies it
            # without a request), so this part is not the file
            part.unlink()
            raise _Retry(f"HTTP 416 for a resume at byte {offset}: restarting from zero") from None
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
        raise _NextMirror(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if _is_dns_failure(exc):
            raise _NextMirror(f"cannot resolve host ({exc.reason})") from None
        raise _Unreachable(f"cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Unreachable(f"cannot connect ({exc!r})") from None


def _stream(resp: http.client.HTTPResponse, part: Path, mode: str, d: _Digest, bar) -> int:
    """Append (or write) the body to ``part``, feeding ``d``; the number of body bytes read."""
    got = 0
    try:
        with open(part, mode) as fh:
            while True:
                try:
                    b = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"connection dropped after {d.size} bytes ({exc!r})") from None
                if not b:
                    return got
                fh.write(b)
                d.update(b)
                got += len(b)
                if bar is not None:
                    bar.update(len(b))
    finally:
        if bar is not None:
            bar.close()


def _attempt(url: str, part: Path, pin: Pin, opts: Options) -> _Digest:
    """One GET of ``url`` into ``part`` (resuming from its size); the digest of the whole part
    when the body arrived complete. Raises _Retry / _NextMirror / _Unreachable."""
    offset = part.stat().st_size if part.exists() else 0
    if pin.size is not None and offset > pin.size:  # longer than the file can be: start over
        part.unlink()
        offset = 0
    if pin.size is not None and offset == pin.size and offset > 0:
        d = _Digest(bool(pin.md5))  # a complete part left by an interrupted run: just verify it
        d.feed_file(part)
        return d
    with _request(url, part, offset, opts) as resp:
        mode = "ab"
        if offset and resp.status == 206:
            if _range_start(resp.headers.get("Content-Range")) != offset:
                part.unlink()
                raise _Retry(f"Content-Range {resp.headers.get('Content-Range')!r} does not start at byte "
                             f"{offset}: restarting from zero")
        elif offset:
            opts.log(f"  {url}: the server ignored the Range request (HTTP {resp.status}): restarting from zero")
            offset, mode = 0, "wb"
        elif resp.status != 200:
            raise _NextMirror(f"unexpected HTTP {resp.status}")
        length = resp.headers.get("Content-Length")
        expected_body = int(length) if length and length.isdigit() else None
        d = _Digest(bool(pin.md5))
        if offset:
            d.feed_file(part)
        total = (offset + expected_body) if expected_body is not None else pin.size
        got = _stream(resp, part, mode, d, _progress(part.name.removesuffix(".part"), total, offset, opts))
    if expected_body is not None and got != expected_body:
        raise _Retry(f"connection dropped: {got} of {expected_body} body bytes (resuming at {offset + got})")
    if d.size == 0:
        part.unlink(missing_ok=True)
        raise _Retry("empty reply (0 bytes)")
    if pin.size is not None and d.size < pin.size:
        raise _Retry(f"short body: {d.size} of {pin.size} bytes (resuming)")
    return d


def _range_start(content_range: str | None) -> int | None:
    # "bytes 100-999/1000"
    try:
        return int(content_range.split()[1].split("-")[0])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return None


def _progress(name: str, total: int | None, initial: int, opts: Options):
    """A tqdm bar on stderr (size, rate, ETA) when asked for and stderr is a terminal."""
    if not opts.progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, leave=False, dynamic_ncols=True)


# -- one file ------------------------------------------------------------------------------

def fetch_file(f: RemoteFile, lock: Lock | None, opts: Options) -> Result:
    """Put ``f`` in place, verified; see the module docstring for the behaviour."""
    f.dest.parent.mkdir(parents=True, exist_ok=True)
    if f.dest.exists():
        d = _Digest(bool(f.pin.md5))
        d.feed_file(f.dest)
        in_place = Result(f.key, f.dest, "skipped", d.size, d.sha256.hexdigest())
        problems = _problems(d, f.pin)
        if _pinned(f.pin) and not problems:
            return in_place
        if _pinned(f.pin):
            opts.log(f"  {f.dest}: in place but {'; '.join(problems)}: downloading it again")
        elif lock is not None and d.size > 0:
            # in place without a pin (fetched before the lock existed, or copied in): pin what is there
            lock.record(f.key, d.size, d.sha256.hexdigest())
            opts.log(f"  {f.dest}: already in place; pinned size {d.size} and sha256 in {lock.path}")
            return in_place
    part = f.dest.with_name(f.dest.name + ".part")
    failures: list[tuple[str, str]] = []
    mismatch = False
    for url in f.urls:
        last = ""
        for attempt in range(opts.retries + 1):
            if attempt:
                opts.sleep(min(opts.backoff_s * 2 ** (attempt - 1), 60.0))
            try:
                d = _attempt(url, part, f.pin, opts)
            except _NextMirror as exc:
                last = str(exc)
                break
            except _Retry as exc:
                last = str(exc)
                if isinstance(exc, _Unreachable) and attempt == 0:
                    break  # a host that refuses the first connection: the next mirror, not a wait
                opts.log(f"  {url}: attempt {attempt + 1}/{opts.retries + 1} failed: {exc}")
                continue
            problems = _problems(d, f.pin) or _not_gzip(part, f.dest.name)
            if problems:
                bad = f.dest.with_name(f.dest.name + ".bad")
                os.replace(part, bad)
                mismatch = True
                last = (f"checksum mismatch for {f.dest.name}: {'; '.join(problems)} "
                        f"(the bytes are kept as {bad}, not in place)")
                opts.log(f"  {url}: {last}")
                break
            os.replace(part, f.dest)  # same directory: atomic
            if lock is not None and not _pinned(f.pin):
                lock.record(f.key, d.size, d.sha256.hexdigest())
                opts.log(f"  {f.dest.name}: first download; pinned size {d.size} and sha256 "
                         f"{d.sha256.hexdigest()} in {lock.path}")
            return Result(f.key, f.dest, "downloaded", d.size, d.sha256.hexdigest(), url)
        failures.append((url, last))
    listing = "\n".join(f"  {u}: {why}" for u, why in failures)
    unreachable = all(w.startswith(("cannot connect", "cannot resolve")) for _, w in failures)
    if mismatch:
        raise ChecksumMismatch(f"{f.dest}: no mirror gave the pinned file ({f.key}):\n{listing}")
    if unreachable:
        raise Offline(f"{f.dest}: no mirror could be reached (offline? use --mirror for a private mirror):\n{listing}")
    partial = f" (the partial download {part} is kept: the next run resumes it)" if part.exists() else ""
    raise DownloadFailed(f"{f.dest}: every mirror failed ({f.key}){partial}:\n{listing}")


def fetch_all(files: list[RemoteFile], lock: Lock | None, opts: Options) -> list[Result]:
    """Fetch every file in order; the first failure stops (its error names the file)."""
    out = []
    for i, f in enumerate(files, 1):
        r = fetch_file(f, lock, opts)
        verb = "up to date" if r.status == "skipped" else f"downloaded from {r.url}"
        opts.log(f"[{i}/{len(files)}] {r.dest}: {verb} ({r.size} bytes, sha256 {r.sha256[:12]}...)")
        out.append(r)
    return out


def dvc_add(path: Path, log: Callable[[str], None]) -> None:
    """Track a fetched raw directory with DVC (``dvc add``: <path>.dvc holds its content hash,
    the cache holds the files, ``dvc push`` copies them to the project's remote)."""
    import subprocess

    cmd = [sys.executable, "-m", "dvc", "add", str(path)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise FetchError(f"dvc add {path} failed: {(res.stderr or res.stdout).strip()[-800:]}")
    log(f"DVC now tracks {path} ({path}.dvc)")
