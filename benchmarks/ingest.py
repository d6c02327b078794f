"""On-demand benchmark of the raw-file ingest reader (not a test).

Generates a large, deterministic Amazon 2018-style review JSON-lines file (``.json.gz``) and
measures, each in a fresh subprocess so peak RSS is clean:

* the cdsr ingest reader (``cdsr.data.ingest.ingest``: streamed byte chunks -> DuckDB), and
* naive pandas (``pandas.read_json(path, lines=True, compression="gzip")`` then the 4 fields),

reporting rows/s and peak RSS (VmHWM) for each, cdsr at several file sizes (memory should be
flat in the file size) and pandas capped at ``--pandas-rows`` rows (it is slow and its memory
grows with the file), with the speedup computed at equal size.

    .venv/bin/python benchmarks/ingest.py                      # default: 4,000,000 rows
    .venv/bin/python benchmarks/ingest.py --rows 1000000 --sizes 250000,1000000 --skip-pandas

The generated files are cached in ``--workdir`` (default: a ``cdsr-bench-ingest`` folder in the
system temp dir); a file of n rows is the prefix of any larger one (gzip members of fixed-size
blocks, each block seeded by its index), so smaller sizes are cut from a larger cached file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

GEN_VERSION = 1
BLOCK_ROWS = 50_000  # rows per gzip member; members are independent so prefixes are cheap
_ROOT = Path(__file__).resolve().parents[1]
_SAMPLE_REL = "shared/data/amazon-2018-5core/All_Beauty_5.json.gz"
REAL_SAMPLE = next((p for p in (_ROOT / _SAMPLE_REL, _ROOT.parent / _SAMPLE_REL) if p.exists()), _ROOT.parent / _SAMPLE_REL)
FIELDS = ["reviewerID", "asin", "unixReviewTime", "overall"]

# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------

_POOL: dict | None = None  # per-process template pool (built once per worker)


def _synthetic_corpus(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A word-salad review corpus, summaries and names for when no real sample is present."""
    syl = ["ba", "ro", "ti", "mel", "an", "sor", "qui", "de", "la", "ven", "po", "ka", "ser", "lu", "fen",
           "gra", "tho", "mi", "nor", "est", "pla", "cur", "vo", "zen", "ri", "tal", "mo", "ne", "sha", "di"]
    common = ["the", "and", "it", "is", "this", "I", "a", "to", "for", "my", "was", "of", "but", "very",
              "great", "product", "works", "well", "love", "would", "buy", "again", "not", "good", "price"]
    vocab = common * 8 + ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    sents = []
    for _ in range(20_000):
        w = [rng.choice(vocab) for _ in range(rng.randint(4, 22))]
        s = " ".join(w)
        sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", "...", '. "Quoted"', ".\n"]))
    corpus = "  ".join(sents)
    summaries = ["Five Stars", "Four Stars", "Great product", "Love it", "Not worth it", "Works as described",
                 "One Star", "Three Stars", "Good value"] + [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6)))
                                                             for _ in range(500)]
    names = ["Amazon Customer", "Kindle Customer"] + [
        "".join(rng.choice(syl) for _ in range(rng.randint(2, 4))).title() + rng.choice(["", " " + rng.choice(syl).upper()[0] + "."])
        for _ in range(2000)]
    return corpus, summaries, names


def _real_corpus(path: Path) -> tuple[str, list[str], list[str], list[dict]] | None:
    try:
        texts, summaries, names, styles = [], [], [], []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                if d.get("reviewText"):
                    texts.append(d["reviewText"])
                if d.get("summary"):
                    summaries.append(d["summary"])
                if d.get("reviewerName"):
                    names.append(d["reviewerName"])
                if isinstance(d.get("style"), dict):
                    styles.append(d["style"])
        if len(texts) < 100:
            return None
        return "  ".join(texts), summaries, names, styles
    except (OSError, ValueError, EOFError):
        return None


def _build_pool(seed: int, use_real: bool) -> dict:
    """Pre-built JSON fragments; rows are assembled from these with one f-string each."""
    rng = random.Random(seed * 1_000_003 + 17)
    real = _real_corpus(REAL_SAMPLE) if use_real else None
    if real:
        corpus, summaries, names, styles = real
        source = f"real templates from {REAL_SAMPLE.name}"
    else:
        corpus, summaries, names = _synthetic_corpus(rng)
        styles = []
        source = "synthetic word-salad templates"
    if not styles:
        kinds = ["Size:", "Color:", "Flavor:", "Style:", "Scent Name:", "Format:"]
        styles = [{k: " " + rng.choice(["7.0 oz", "Pack of 2", "Blue", "Classic", "Large", "Lavender", "Kindle Edition",
                                        "Paperback", "12 Count", "Black"]) for k in rng.sample(kinds, rng.randint(1, 2))}
                  for _ in range(300)]
    # variable-length review texts, ~100..800 chars, cut from the corpus at word boundaries
    n_mid = 20_000
    mids = []
    for _ in range(n_mid):
        length = rng.randint(100, 800)
        start = rng.randrange(0, max(1, len(corpus) - length - 1))
        sp = corpus.find(" ", start)
        start = sp + 1 if 0 <= sp < start + 40 else start
        text = corpus[start : start + length].strip() or "Good."
        parts = []
        if rng.random() < 0.85:
            parts.append(f'"style": {json.dumps(rng.choice(styles))}')
        parts.append(f'"reviewerName": {json.dumps(rng.choice(names))}')
        if rng.random() < 0.995:
            parts.append(f'"reviewText": {json.dumps(text)}')
        parts.append(f'"summary": {json.dumps(rng.choice(summaries))}')
        mids.append(", ".join(parts) + ", ")
    # reviewers and items (Amazon-looking ids), Zipf-ish popularity handled at draw time
    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    users = ["A" + "".join(rng.choice(alnum) for _ in range(13)) for _ in range(200_000)]
    items = ["B0" + "".join(rng.choice(alnum) for _ in range(8)) for _ in range(40_000)]
    # review days 2000-01-01 .. 2018-09-30: (reviewTime, unixReviewTime) both from the same day
    day0 = 946684800
    days = []
    for k in range(0, 6847):
        t = day0 + 86400 * k
        tm = time.gmtime(t)
        days.append((f"{tm.tm_mon:02d} {tm.tm_mday}, {tm.tm_year}", t))
    heads = ['{"overall": %s, "verified": %s, ' % (r, v) for r in ("1.0", "2.0", "3.0", "4.0", "5.0")
             for v in ("true", "false")]
    return {"mids": mids, "users": users, "items": items, "days": days, "heads": heads, "source": source}


def _init_worker(seed: int, use_real: bool) -> None:
    global _POOL
    _POOL = _build_pool(seed, use_real)


def _block_lines(args: tuple[int, int, int]) -> tuple[bytes, int]:
    """The first ``n`` JSON lines of block ``block`` (deterministic in seed and block index),
    as one gzip member, and their uncompressed size."""
    seed, block, n = args
    import numpy as np

    p = _POOL
    rng = np.random.default_rng([seed, block])
    nu, ni, nd, nm = len(p["users"]), len(p["items"]), len(p["days"]), len(p["mids"])
    # skewed user/item popularity (power law over the id pools), skewed-to-recent days
    u = np.minimum((rng.pareto(1.2, n) * nu / 50).astype(np.int64), nu - 1)
    i = np.minimum((rng.pareto(1.0, n) * ni / 100).astype(np.int64), ni - 1)
    d = (nd - 1 - np.minimum(rng.exponential(nd / 4, n), nd - 1)).astype(np.int64)
    m = rng.integers(0, nm, n)
    stars = rng.choice(5, n, p=[0.06, 0.05, 0.09, 0.18, 0.62])
    verified = (rng.random(n) < 0.1).astype(np.int64)
    h = stars * 2 + verified
    users, items, days, mids, heads = p["users"], p["items"], p["days"], p["mids"], p["heads"]
    out = []
    for hh, dd, uu, ii, mm in zip(h.tolist(), d.tolist(), u.tolist(), i.tolist(), m.tolist()):
        rt, ts = days[dd]
        out.append(f'{heads[hh]}"reviewTime": "{rt}", "reviewerID": "{users[uu]}", "asin": "{items[ii]}", '
                   f'{mids[mm]}"unixReviewTime": {ts}}}\n')
    body = "".join(out).encode("ascii")
    c = zlib.compressobj(1, zlib.DEFLATED, 31)  # one gzip member
    return c.compress(body) + c.flush(), len(body)


def _file_name(seed: int, rows: int, use_real: bool) -> str:
    return f"reviews-v{GEN_VERSION}-s{seed}-{'r' if use_real else 'x'}-{rows}.json.gz"


def ensure_file(workdir: Path, rows: int, seed: int, use_real: bool, jobs: int) -> tuple[Path, int]:
    """Return a cached (or freshly generated) file of ``rows`` rows and its uncompressed size."""
    path = workdir / _file_name(seed, rows, use_real)
    done = workdir / (path.name + ".done")
    if path.exists() and done.exists():
        return path, json.loads(done.read_text())["raw_bytes"]
    # cut from a larger cached file if there is one: copy its first full blocks, generate the tail
    full, rest = divmod(rows, BLOCK_ROWS)
    donor = None
    for idx in sorted(workdir.glob(_file_name(seed, 0, use_real).replace("-0.json.gz", "-*.json.gz.index"))):
        index = json.loads(idx.read_text())
        if len(index["gz"]) - 1 >= full and (workdir / idx.name[: -len(".index")]).exists():
            donor = (workdir / idx.name[: -len(".index")], index)
            break
    t0 = time.time()
    tmp = path.with_suffix(".part")
    gz_offs, raw_offs = [0], [0]
    with open(tmp, "wb") as fh:
        start_block = 0
        if donor is not None:
            dpath, dindex = donor
            with open(dpath, "rb") as src:
                _copy_bytes(src, fh, dindex["gz"][full])
            gz_offs, raw_offs = dindex["gz"][: full + 1], dindex["raw"][: full + 1]
            start_block = full
        tasks = [(seed, b, BLOCK_ROWS) for b in range(start_block, full)]
        if rest:
            tasks.append((seed, full, rest))
        if tasks:
            with Pool(min(jobs, len(tasks)), initializer=_init_worker, initargs=(seed, use_real)) as pool:
                for member, raw_len in pool.imap(_block_lines, tasks, chunksize=1):
                    fh.write(member)
                    gz_offs.append(gz_offs[-1] + len(member))
                    raw_offs.append(raw_offs[-1] + raw_len)
    tmp.rename(path)
    if full:  # boundaries of the full blocks, so smaller files can be cut from this one
        n_off = full + 1
        (workdir / (path.name + ".index")).write_text(json.dumps({"gz": gz_offs[:n_off], "raw": raw_offs[:n_off]}))
    done.write_text(json.dumps({"rows": rows, "raw_bytes": raw_offs[-1]}))
    how = f"cut from {donor[0].name} + generated" if donor else "generated"
    print(f"  {how} {path.name}: {rows:,} rows, {path.stat().st_size / 1e6:,.0f} MB gz "
          f"({raw_offs[-1] / 1e6:,.0f} MB raw) in {time.time() - t0:.1f}s", flush=True)
    return path, raw_offs[-1]


def _copy_bytes(src, dst, n: int) -> None:
    while n > 0:
        buf = src.read(min(n, 64 << 20))
        if not buf:
            raise OSError("donor file shorter than its index")
        dst.write(buf)
        n -= len(buf)


# ------------------------------------------------------------------------------------------
# measured children (each runs in a fresh interpreter)
# ------------------------------------------------------------------------------------------


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, path: str, out_dir: str) -> None:
    if kind == "cdsr":
        import cdsr.data.ingest as ing
        from cdsr.data.config import dataset_config
        from cdsr.data.ingest import ingest

        phase: dict[str, float] = {}
        policies = getattr(ing, "_apply_policies", None)
        if callable(policies):  # diagnostic only: peak RSS of the streaming phase, before the policy pass

            def _wrapped(*a, **k):
                phase["stream_peak_mb"] = _vmhwm_mb()
                return policies(*a, **k)

            ing._apply_policies = _wrapped

        cfg = dataset_config({"datasets": {"bench": {
            "sources": [{"format": "amazon-review-json", "path": path}],
            "ingest": {"duplicates": "keep"}}}}, "bench")
        base = _vmhwm_mb()
        t0 = time.perf_counter()
        rep = ingest(cfg, Path(out_dir))
        dt = time.perf_counter() - t0
        rows, kept = rep["rows_read"], rep["rows_kept"]
        extra = {"rows_quarantined": rep["rows_quarantined"], **phase}
    else:
        import pandas as pd

        base = _vmhwm_mb()
        t0 = time.perf_counter()
        df = pd.read_json(path, lines=True, compression="gzip")
        df = df[FIELDS]
        dt = time.perf_counter() - t0
        rows = kept = len(df)
        extra = {}
    print("RESULT " + json.dumps({"rows": rows, "kept": kept, "seconds": dt, "peak_rss_mb": _vmhwm_mb(),
                                  "import_rss_mb": base, **extra}), flush=True)


def measure(kind: str, path: Path, workdir: Path, timeout: float) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix=f"out-{kind}-", dir=workdir))
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, str(path), str(out_dir)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def _fmt_rows(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 and n % 100_000 == 0 else f"{n / 1e3:g}k" if n % 1000 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000, help="largest file size in rows (default 4,000,000)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated row counts for the cdsr memory-vs-size runs (default: rows/4, rows/2, rows)")
    ap.add_argument("--pandas-rows", type=int, default=1_000_000,
                    help="pandas runs on min(rows, this) rows (default 1,000,000; pandas is slow and memory-hungry)")
    ap.add_argument("--skip-pandas", action="store_true", help="do not run the pandas baseline")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cdsr-bench-ingest",
                    help="where generated files are cached (default: $TMPDIR/cdsr-bench-ingest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-text", action="store_true",
                    help="use word-salad templates even when the real Amazon sample is present")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed per measured run (default 300)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="generator processes")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child(*args._child)
        return 0

    t_start = time.time()
    sizes = sorted({int(s) for s in args.sizes.split(",")} if args.sizes else
                   {max(1, args.rows // 4), max(1, args.rows // 2), args.rows})
    rows_max = max(sizes)
    p_rows = min(rows_max, args.pandas_rows)
    if not args.skip_pandas and p_rows not in sizes:
        sizes = sorted(sizes + [p_rows])  # cdsr at the pandas size too, for an equal-size speedup
    use_real = REAL_SAMPLE.exists() and not args.synthetic_text
    args.workdir.mkdir(parents=True, exist_ok=True)

    print(f"cdsr ingest benchmark: amazon-review-json, sizes {', '.join(_fmt_rows(s) for s in sizes)} rows; "
          f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"workdir {args.workdir}; text templates: "
          f"{'real reviews from ' + REAL_SAMPLE.name if use_real else 'synthetic word salad'}")
    print("preparing input files (cached)...", flush=True)
    t0 = time.time()
    files, raw_bytes = {}, {}
    for n in sorted(set(sizes), reverse=True):  # largest first, so smaller ones are cut from it
        files[n], raw_bytes[n] = ensure_file(args.workdir, n, args.seed, use_real, args.jobs)
    gen_s = time.time() - t0
    print(f"input ready in {gen_s:.1f}s", flush=True)

    results: list[tuple[str, int, dict]] = []
    for n in sizes:
        print(f"running cdsr on {_fmt_rows(n)} rows...", flush=True)
        results.append(("cdsr", n, measure("cdsr", files[n], args.workdir, args.timeout)))
    if not args.skip_pandas:
        print(f"running pandas on {_fmt_rows(p_rows)} rows...", flush=True)
        results.append(("pandas", p_rows, measure("pandas", files[p_rows], args.workdir, args.timeout)))

    print()
    hdr = (f"{'reader':<8} {'rows':>10} {'file MB (gz/raw)':>17} {'seconds':>9} {'rows/s':>11} {'peak RSS MB':>12} "
           f"{'(streaming phase)':>17}  note")
    print(hdr)
    print("-" * len(hdr))
    for reader, n, r in results:
        gz = f"{files[n].stat().st_size / 1e6:,.0f} / {raw_bytes[n] / 1e6:,.0f}"
        if "error" in r:
            print(f"{reader:<8} {n:>10,} {gz:>17} {'-':>9} {'-':>11} {'-':>12} {'-':>17}  {r['error']}")
            continue
        rate = r["rows"] / r["seconds"]
        note = "" if r["rows"] == n else f"rows read {r['rows']:,} != {n:,}!"
        if reader == "cdsr" and r.get("rows_quarantined"):
            note += f" quarantined {r['rows_quarantined']:,}"
        stream = f"{r['stream_peak_mb']:,.0f}" if "stream_peak_mb" in r else "-"
        print(f"{reader:<8} {n:>10,} {gz:>17} {r['seconds']:>9.1f} {rate:>11,.0f} {r['peak_rss_mb']:>12,.0f} "
              f"{stream:>17}  {note}")
    print()
    print("seconds = the read call only (ingest() incl. its parquet outputs / read_json + field selection), "
          "in a fresh subprocess; peak RSS = that process's VmHWM (incl. interpreter and imports); "
          "streaming phase = cdsr's VmHWM when the chunked read ends, before its whole-file policy pass "
          "(duplicates / cross-domain items in DuckDB).")

    ok = True
    cd = [(n, r) for reader, n, r in results if reader == "cdsr" and "error" not in r]
    if len(cd) >= 2:
        lo, hi = cd[0], cd[-1]
        growth = hi[1]["peak_rss_mb"] / lo[1]["peak_rss_mb"]
        flat = growth < 1.5
        print(f"cdsr memory vs size: {_fmt_rows(lo[0])} -> {_fmt_rows(hi[0])} rows ({hi[0] / lo[0]:.0f}x) "
              f"peak RSS {lo[1]['peak_rss_mb']:,.0f} -> {hi[1]['peak_rss_mb']:,.0f} MB ({growth:.2f}x): "
              f"{'FLAT' if flat else 'GROWS'} (target: flat, < 1.5x)")
        ok &= flat
        if "stream_peak_mb" in lo[1] and "stream_peak_mb" in hi[1]:
            sg = hi[1]["stream_peak_mb"] / lo[1]["stream_peak_mb"]
            print(f"  of which the streaming phase: {lo[1]['stream_peak_mb']:,.0f} -> {hi[1]['stream_peak_mb']:,.0f} MB "
                  f"({sg:.2f}x: {'flat' if sg < 1.5 else 'grows'}); the rest is the whole-file policy pass")
    if not args.skip_pandas:
        pr = next(r for reader, n, r in results if reader == "pandas")
        cr = next((r for reader, n, r in results if reader == "cdsr" and n == p_rows), None)
        if rows_max > p_rows:
            print(f"pandas was run on {_fmt_rows(p_rows)} rows only (--pandas-rows; file of {_fmt_rows(rows_max)} "
                  f"would take ~{rows_max / (p_rows / pr['seconds']) / 60:.0f} min at its rate)"
                  if "error" not in pr else f"pandas was run on {_fmt_rows(p_rows)} rows only")
        if cr and "error" not in pr and "error" not in cr:
            sp = pr["seconds"] / cr["seconds"]
            mem = pr["peak_rss_mb"] / cr["peak_rss_mb"]
            print(f"speedup at equal size ({_fmt_rows(p_rows)} rows): cdsr is {sp:.1f}x as fast as pandas "
                  f"(target >= 5x: {'MET' if sp >= 5 else 'NOT MET'}); pandas peak RSS {mem:.1f}x cdsr's")
            big = cd[-1]
            print(f"cdsr throughput at {_fmt_rows(big[0])} rows: {big[0] / big[1]['seconds']:,.0f} rows/s "
                  f"= {big[0] / big[1]['seconds'] / (p_rows / pr['seconds']):.1f}x pandas's rate at {_fmt_rows(p_rows)}")
            ok &= sp >= 5
    print(f"total benchmark time {time.time() - t_start:.0f}s (input preparation {gen_s:.0f}s); "
          f"targets {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
