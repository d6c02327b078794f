"""On-demand benchmark of the data pipeline at Amazon-2023 scale (not a test).

Generates a deterministic Amazon-2023-style category pair (review JSON lines, gzipped, one file
per domain: ``Home_and_Kitchen.jsonl.gz`` and ``Tools_and_Home_Improvement.jsonl.gz``; 50M events
by default, about 4M users and 2.5M items) and runs the real data stages on it, each as its own
``cdsr data <stage>`` subprocess on a params file and data root in the work dir:

    ingest -> validate -> sequences -> split     (the `dvc repro` data stages of a dataset)

For every stage it reports the wall time, the peak RSS (the stage process's own high-water mark
from ``wait4``, and the peak of the whole process tree sampled with psutil), the size of the
stage's outputs and the peak disk use under the data root while it ran (spill files included).
Then the row account (read = kept + quarantined + duplicate) and the sequence statistics.

    .venv/bin/python benchmarks/pipeline_scale.py                 # 50M events (15 min on 2 idle cores)
    .venv/bin/python benchmarks/pipeline_scale.py --events 1000000  # quick check (1M events: 29 s)

The raw files are cached in ``--workdir`` (default ``$TMPDIR/cdsr-scale``) under a name holding
the generator version, the seed and the size, so reruns skip generation; ``--clean`` removes the
stage outputs afterwards (they are rebuilt by every run anyway). As in ``benchmarks/ingest.py``,
the files are written as independent gzip members of fixed-size blocks, each block drawn from a
generator seeded by (seed, domain, block), by a process pool.

The generated data: users draw a lognormal activity weight (heavy-tailed: a median user has a
few events, the most active thousands) and a domain preference (40 % Home only, 20 % Tools only,
40 % both); items have Zipf-like popularity (rank density ~ r^-0.6); timestamps in ms over
2000..2023, skewed to recent years. Planted: 0.2 % exact duplicate lines, about 10 bad rows per
million (truncated JSON, missing user_id, non-numeric or out-of-range timestamps, no item) and a
few items that also appear in the other domain (the cross-domain-items policy drops them).
It always exits 0; the target (every stage under 8 GB peak RSS) is printed as MET / NOT MET.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from multiprocessing import Pool
from pathlib import Path


def _sibling(name: str):
    """A module of benchmarks/ loaded by file path (the import path is left alone)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fmt_rows = _sibling("ingest")._fmt_rows  # benchmarks/ingest.py: the same row-count labels

GEN_VERSION = 1
BLOCK_ROWS = 500_000
DATASET = "amazon-2023-scale"
DOMAINS = {"Home_and_Kitchen": 0.6, "Tools_and_Home_Improvement": 0.4}  # share of the events
USERS_PER_EVENT = 0.08  # 4M users at 50M events
ITEMS_PER_EVENT = {"Home_and_Kitchen": 0.03, "Tools_and_Home_Improvement": 0.02}  # 1.5M + 1M items
ITEM_ZIPF = 0.6
USER_SIGMA = 1.5
DUP_RATE = 0.002
T0_MS, T1_MS = 946_684_800_000, 1_693_526_400_000  # 2000-01-01 .. 2023-09-01
TARGET_RSS_MB = 8 * 1024
STAGES = ["ingest", "validate", "sequences", "split"]

PARAMS = """\
datasets:
  {name}:
    description: Generated Amazon-2023-style category pair (benchmarks/pipeline_scale.py).
    sources:
      - {{format: amazon-2023-jsonl, path: '{raw}/*.jsonl.gz'}}
    domains: [{domains}]
    ingest: {{duplicates: drop, cross_domain_items: drop}}
    sequences:
      filters:
        - min_item_events: 5
        - min_user_domains: 2
        - trim_last: 50
        - min_user_domain_events: 2
        - min_user_events: 3
      domains_required: present
    split: {{seed: 42}}
"""

# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------

_W: dict = {}  # per-worker pools, built once


def _sizes(events: int) -> dict:
    users = max(100, int(events * USERS_PER_EVENT))
    items = {d: max(50, int(events * r)) for d, r in ITEMS_PER_EVENT.items()}
    rows = {}
    left = events
    names = list(DOMAINS)
    for d in names[:-1]:
        rows[d] = round(events * DOMAINS[d])
        left -= rows[d]
    rows[names[-1]] = left
    return {"users": users, "items": items, "rows": rows}


def _encode(vals, alphabet: bytes, width: int) -> list[str]:
    """Fixed-width base-len(alphabet) strings of non-negative uint64 values, vectorised."""
    import numpy as np

    base = len(alphabet)
    digits = np.empty((len(vals), width), dtype=np.uint8)
    v = vals.astype(np.uint64).copy()
    lut = np.frombuffer(alphabet, dtype=np.uint8)
    for k in range(width - 1, -1, -1):
        digits[:, k] = lut[(v % np.uint64(base)).astype(np.int64)]
        v //= np.uint64(base)
    buf = digits.tobytes().decode("ascii")
    return [buf[i * width:(i + 1) * width] for i in range(len(vals))]


def _coprime(p: int, n: int) -> int:
    while math.gcd(p, n) != 1:
        p += 2
    return p


def _init_worker(seed: int, events: int) -> None:
    import numpy as np

    sz = _sizes(events)
    n_u = sz["users"]
    rng = np.random.default_rng([seed, 0])
    # users: Amazon-2023-looking 28-character ids, a bijection of the index
    u = np.arange(n_u, dtype=np.uint64)
    b32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    mask60 = np.uint64((1 << 60) - 1)
    m1 = (u * np.uint64(0x9E3779B97F4A7C15) + np.uint64(12345)) & mask60
    m2 = (u * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(777)) & mask60
    a, b = _encode(m1, b32, 12), _encode(m2, b32, 12)
    users = ["AE" + x + y + "QA" for x, y in zip(a, b)]
    del a, b
    weight = np.exp(USER_SIGMA * rng.standard_normal(n_u))
    kind = rng.random(n_u)
    p_home = np.where(kind < 0.4, 1.0, np.where(kind < 0.6, 0.0, rng.uniform(0.15, 0.85, n_u)))
    names = list(DOMAINS)
    cdf = {}
    for d, p in ((names[0], p_home), (names[1], 1.0 - p_home)):
        c = np.cumsum(weight * p)
        cdf[d] = c / c[-1]
    # items: "B0" + 8 base-36 characters, a bijection of the global item index
    b36 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    items, offset = {}, 0
    for d in names:
        n_i = sz["items"][d]
        g = np.arange(offset, offset + n_i, dtype=np.uint64)
        items[d] = ["B0" + s for s in _encode((g * np.uint64(2_654_435_761) + np.uint64(99)) % np.uint64(36 ** 8), b36, 8)]
        offset += n_i
    # review bodies: a pool of (title, text, helpful votes, verified, images) fragments
    words = ["great", "product", "works", "well", "love", "it", "easy", "to", "use", "sturdy", "cheap", "broke",
             "after", "week", "the", "and", "for", "my", "kitchen", "drill", "fits", "perfect", "would", "buy", "again",
             "not", "worth", "price", "quality", "size", "color", "returned", "fast", "shipping"]
    mids = []
    for _ in range(5000):
        title = " ".join(rng.choice(words, rng.integers(1, 5))).capitalize()
        text = " ".join(rng.choice(words, rng.integers(4, 22))).capitalize() + "."
        img = '[]' if rng.random() < 0.9 else '[{"small_image_url": "https://m.media-amazon.com/images/I/x._SL256_.jpg"}]'
        mids.append(f'"title": "{title}", "text": "{text}", "images": {img}, ')
    tails = [f', "helpful_vote": {h}, "verified_purchase": {v}}}\n' for h in range(4) for v in ("true", "false")]
    _W.update(users=users, cdf=cdf, items=items, mids=mids, tails=tails, names=names)


def _block(args: tuple[int, int, int, int]) -> tuple[bytes, int, dict]:
    """Lines of block ``block`` of domain ``di`` as one gzip member; (member, raw bytes, planted)."""
    import numpy as np

    seed, di, block, n = args
    w = _W
    d = w["names"][di]
    other = w["names"][1 - di]
    rng = np.random.default_rng([seed, 1 + di, block])
    users, items, mids, tails = w["users"], w["items"][d], w["mids"], w["tails"]
    n_i = len(items)
    uu = np.searchsorted(w["cdf"][d], rng.random(n), side="right")
    uu = np.minimum(uu, len(users) - 1)
    rank = np.minimum((n_i * rng.random(n) ** (1.0 / (1.0 - ITEM_ZIPF))).astype(np.int64), n_i - 1)
    ii = (rank * _coprime(1_000_003, n_i)) % n_i
    span = T1_MS - T0_MS
    ts = T1_MS - np.minimum(rng.exponential(span / 4, n), span - 1).astype(np.int64)
    stars = rng.choice(5, n, p=[0.08, 0.05, 0.08, 0.15, 0.64]) + 1
    mm = rng.integers(0, len(mids), n)
    tt = rng.integers(0, len(tails), n)
    out = []
    for u, i, t, s, m, k in zip(uu.tolist(), ii.tolist(), ts.tolist(), stars.tolist(), mm.tolist(), tt.tolist()):
        it = items[i]
        out.append(f'{{"rating": {s}.0, {mids[m]}"asin": "{it}", "parent_asin": "{it}", "user_id": "{users[u]}", '
                   f'"timestamp": {t}{tails[k]}')
    planted = {"duplicates": 0, "bad": 0, "cross_domain": 0}
    # exact duplicates: a line repeated in place of the next line (the row count stays n)
    for j in sorted(set(rng.integers(0, n - 1, int(n * DUP_RATE)).tolist())):
        out[j + 1] = out[j]
    # bad rows, ~10 per million lines (at least one kind per block)
    n_bad = max(1, round(n * 1e-5))
    for j in rng.choice(n, min(n, n_bad), replace=False).tolist():
        kind = planted["bad"] % 5
        line = out[j]
        if kind == 0:
            out[j] = line[: len(line) // 2] + "\n"  # truncated JSON
        elif kind == 1:
            out[j] = line.replace('"user_id"', '"user"')  # no user_id
        elif kind == 2:
            out[j] = line.replace('"timestamp": ', '"timestamp": "yesterday", "x": ')
        elif kind == 3:
            out[j] = re.sub(r'"timestamp": \d+', '"timestamp": 86400000', line)  # 1970: out of range
        else:
            out[j] = line.replace('"parent_asin"', '"parent"').replace('"asin"', '"asn"')  # no item
        planted["bad"] += 1
    # a few items of the other domain (the cross_domain_items policy drops all their rows)
    if block % 4 == 0:
        j = int(rng.integers(0, n))
        foreign = w["items"][other][int(rng.integers(0, len(w["items"][other])))]
        it = items[ii[j]]
        out[j] = out[j].replace(f'"{it}"', f'"{foreign}"')
        planted["cross_domain"] += 1
    body = "".join(out).encode("ascii")
    planted["duplicates"] = sum(1 for a, b in itertools.pairwise(out) if a == b)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(body) + c.flush(), len(body), planted


def ensure_raw(workdir: Path, events: int, seed: int, jobs: int) -> tuple[Path, dict]:
    """The cached raw directory of ``events`` events (generated if missing) and its manifest."""
    raw = workdir / f"raw-v{GEN_VERSION}-s{seed}-{events}"
    manifest = raw / "manifest.json"
    if manifest.exists():
        return raw, json.loads(manifest.read_text())
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    sz = _sizes(events)
    t0 = time.time()
    info = {"events": events, "users_pool": sz["users"], "items_pool": sz["items"], "files": {},
            "planted": {"duplicates": 0, "bad": 0, "cross_domain": 0}}
    tasks = []
    for di, d in enumerate(DOMAINS):
        full, rest = divmod(sz["rows"][d], BLOCK_ROWS)
        tasks.append((d, [(seed, di, b, BLOCK_ROWS) for b in range(full)] + ([(seed, di, full, rest)] if rest else [])))
    print(f"generating {_fmt_rows(events)} events into {raw} ({jobs} processes)...", flush=True)
    with Pool(jobs, initializer=_init_worker, initargs=(seed, events)) as pool:
        for d, blocks in tasks:
            path = raw / f"{d}.jsonl.gz"
            raw_bytes = 0
            with open(path.with_suffix(".part"), "wb") as fh:
                for member, n_raw, planted in pool.imap(_block, blocks, chunksize=1):
                    fh.write(member)
                    raw_bytes += n_raw
                    for k, v in planted.items():
                        info["planted"][k] += v
            path.with_suffix(".part").rename(path)
            info["files"][path.name] = {"rows": sz["rows"][d], "gz_bytes": path.stat().st_size, "raw_bytes": raw_bytes}
            print(f"  {path.name}: {sz['rows'][d]:,} lines, {path.stat().st_size / 1e9:.2f} GB gz "
                  f"({raw_bytes / 1e9:.2f} GB raw), {time.time() - t0:.0f} s", flush=True)
    info["seconds"] = round(time.time() - t0, 1)
    manifest.write_text(json.dumps(info, indent=2))
    return raw, info


# ------------------------------------------------------------------------------------------
# measured stages
# ------------------------------------------------------------------------------------------


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


STAGE_OUTPUTS = {
    "ingest": ["interim/interactions.parquet", "interim/quarantine.parquet", "interim/duplicates.parquet",
               "interim/ingest_report.json"],
    "validate": ["interim/validation"],
    "sequences": ["processed/sequences.parquet", "processed/items.parquet", "processed/users.parquet",
                  "processed/stats.json", "processed/validation"],
    "split": ["processed/split.parquet", "processed/negatives.parquet", "processed/split.json"],
}


def run_stage(stage: str, params: Path, root: Path, timeout: float) -> dict:
    """Run ``cdsr data <stage>`` in a subprocess; wall time, peak RSS and disk."""
    import psutil

    cmd = [sys.executable, "-m", "cdsr", "data", stage, "--dataset", DATASET, "--params", str(params), "--root", str(root)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = root / f"{stage}.log"
    base_disk = _du(root)
    peak = {"tree_rss": 0, "disk": base_disk}
    stop = threading.Event()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

        def poll() -> None:
            p = psutil.Process(proc.pid)
            k = 0
            while not stop.is_set():
                try:
                    procs = [p] + p.children(recursive=True)
                    peak["tree_rss"] = max(peak["tree_rss"], sum(q.memory_info().rss for q in procs))
                except psutil.Error:
                    pass
                if k % 10 == 0:  # the data root's size every ~2 s (spill files included)
                    peak["disk"] = max(peak["disk"], _du(root))
                k += 1
                stop.wait(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, ru = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    d = root / DATASET
    out_bytes = sum(_du(d / o) if (d / o).is_dir() else ((d / o).stat().st_size if (d / o).exists() else 0)
                    for o in STAGE_OUTPUTS[stage])
    res = {"stage": stage, "rc": proc.returncode, "wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024,
           "tree_rss_mb": peak["tree_rss"] / 2**20, "out_bytes": out_bytes,
           "peak_disk_extra": max(0, peak["disk"] - base_disk), "log": str(log)}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-6:]
        res["error"] = f"exit {proc.returncode}" + (" (killed: timeout)" if wall >= timeout else "") + ": " + " | ".join(tail)
    return res


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000_000, help="raw events (lines) in all (default 50,000,000)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cdsr-scale",
                    help="raw-file cache, params file and data root (default: $TMPDIR/cdsr-scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="generator processes")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per stage (default 3600)")
    ap.add_argument("--generate-only", action="store_true", help="generate (or find) the raw files and stop")
    ap.add_argument("--clean", action="store_true", help="remove the stage outputs at the end (keeps the raw cache)")
    args = ap.parse_args(argv)

    t_start = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"cdsr pipeline-at-scale benchmark: {_fmt_rows(args.events)} events, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}; workdir {args.workdir}", flush=True)
    raw, info = ensure_raw(args.workdir, args.events, args.seed, args.jobs)
    gz = sum(f["gz_bytes"] for f in info["files"].values())
    rawb = sum(f["raw_bytes"] for f in info["files"].values())
    print(f"raw: {len(info['files'])} files, {info['events']:,} lines, {_gb(gz)} gz ({_gb(rawb)} uncompressed); "
          f"pools {info['users_pool']:,} users, {sum(info['items_pool'].values()):,} items; planted "
          f"{info['planted']['duplicates']:,} duplicate lines, {info['planted']['bad']:,} bad rows, "
          f"{info['planted']['cross_domain']:,} cross-domain items (generated in {info['seconds']:.0f} s)", flush=True)
    if args.generate_only:
        return 0

    root = args.workdir / f"data-{args.events}"
    stages = [s for s in args.stages.split(",") if s]
    if "ingest" in stages:  # a fresh build; a later stage alone reruns on the outputs already there
        shutil.rmtree(root / DATASET, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    params = args.workdir / f"params-{args.events}.yaml"
    params.write_text(PARAMS.format(name=DATASET, raw=str(raw), domains=", ".join(DOMAINS)))
    results = []
    for stage in stages:
        print(f"running cdsr data {stage}...", flush=True)
        r = run_stage(stage, params, root, args.timeout)
        results.append(r)
        print(f"  {stage}: {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:,.0f} MB"
              + (f"  FAILED {r['error']}" if "error" in r else ""), flush=True)
        if "error" in r:
            break

    print()
    hdr = f"{'stage':<10} {'wall s':>8} {'peak RSS MB':>12} {'tree RSS MB':>12} {'outputs':>11} {'peak extra disk':>16}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        note = r.get("error", "")
        print(f"{r['stage']:<10} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12,.0f} {r['tree_rss_mb']:>12,.0f} "
              f"{_gb(r['out_bytes']):>11} {_gb(r['peak_disk_extra']):>16}  {note}")
    total = sum(r["wall_s"] for r in results)
    print(f"{'total':<10} {total:>8.1f} {max((r['peak_rss_mb'] for r in results), default=0):>12,.0f}")
    print("peak RSS = the stage process's high-water mark (wait4 ru_maxrss); tree RSS = the largest sum of RSS over "
          "the process tree, sampled every 0.2 s; outputs = the stage's output files; peak extra disk = the largest "
          "growth of the data root during the stage (outputs plus spill / temp files), sampled every ~2 s.")

    d = root / DATASET
    rep = d / "interim" / "ingest_report.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        print(f"rows: read {r['rows_read']:,} = kept {r['rows_kept']:,} + quarantined {r['rows_quarantined']:,} "
              f"+ duplicate {r['rows_duplicate']:,} (lines generated {info['events']:,}; quarantine reasons "
              f"{r['quarantine_reasons']})")
    st = d / "processed" / "stats.json"
    if st.exists():
        s = json.loads(st.read_text())
        print(f"sequences: {s['users']:,} users, {s['items']:,} items, {s['events']:,} events "
              f"({s['events_per_domain']}), mean length {s['mean_length']:.1f}; filter log "
              + "; ".join(f"{x['step']}: {x['users']:,} users / {x['events']:,} events" for x in s["filter_log"]))
    sp = d / "processed" / "split.json"
    if sp.exists():
        s = json.loads(sp.read_text())
        print(f"split: targets {s['targets']}, short negative rows {s['short_negative_rows']}")
    ok = len(results) == len(stages) and all("error" not in r for r in results)
    mem_ok = ok and all(max(r["peak_rss_mb"], r["tree_rss_mb"]) < TARGET_RSS_MB for r in results)
    print(f"target: every stage completes: {'MET' if ok else 'NOT MET'}; every stage under 8 GB peak RSS: "
          f"{'MET' if mem_ok else 'NOT MET'}")
    if args.clean:
        shutil.rmtree(d, ignore_errors=True)
    print(f"total benchmark time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
