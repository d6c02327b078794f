"""Split stage: leave-one-out by time and the fixed sampled negatives (docs/protocols.md "Data split").

For a user with n events (time-ordered), position n-1 is the **test** target, n-2 the
**validation** target, and positions 1..n-3 are training targets. ``split.parquet`` holds one
row per (user, split) with the target's position, item and domain; the history of a target is
the user's events before its position.

Negatives for the sampled protocols are drawn once, seeded, per (user, split): items of the
target's domain, uniformly without replacement, never an item of the user's whole sequence.
One draw of size max(K) in uniformly random order serves all protocols: ``sampled-K`` uses its
first K entries (a uniform K-subset). Draws are vectorised per domain with Gumbel-top-k (random
keys, the user's own items keyed out, top-k).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cdsr.data.config import DatasetConfig

MIN_EVENTS = 3  # a validation target, a test target and at least one training event


class SplitError(ValueError):
    pass


def leave_one_out(seqs: pl.DataFrame) -> pl.DataFrame:
    """Rows (user_idx, split, pos, item_idx, domain_idx) for the validation and test targets."""
    n = seqs["items"].list.len()
    short = seqs.filter(n < MIN_EVENTS)
    if short.height:
        raise SplitError(f"{short.height} users have fewer than {MIN_EVENTS} events (e.g. user "
                         f"{short['user_id'][0]}); add '- min_user_events: {MIN_EVENTS}' to the dataset's filters")
    base = seqs.select("user_idx", n.alias("n"), "items", "domains")
    rows = []
    for split, back in (("valid", 2), ("test", 1)):
        rows.append(base.select(
            "user_idx", pl.lit(split).alias("split"), (pl.col("n") - back).cast(pl.Int64).alias("pos"),
            pl.col("items").list.get(-back).cast(pl.Int64).alias("item_idx"),
            pl.col("domains").list.get(-back).cast(pl.Int64).alias("domain_idx")))
    return pl.concat(rows).sort("split", "user_idx", descending=[True, False])


def sample_negatives(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int,
                     seed: int, max_cells: int = 1 << 24) -> pl.DataFrame:
    """Rows (user_idx, split, negatives: list[int64], n_negatives) for every target row.

    Deterministic for a seed: domains, splits and users are processed in a fixed order with one
    torch generator. ``max_cells`` bounds the [users x items] key matrix per chunk. The whole
    draw is held in memory: for millions of targets use :func:`write_negatives`, which writes
    the same rows to a file chunk by chunk.
    """
    out = [chunk for _, _, chunk in _negative_chunks(seqs, targets, items, n_neg, seed, max_cells)]
    return pl.concat(out).sort("split", "user_idx", descending=[True, False])


def _negative_chunks(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int, seed: int,
                     max_cells: int = 1 << 24) -> Iterator[tuple[int, str, pl.DataFrame]]:
    """The draws of :func:`sample_negatives` as (domain_idx, split, rows) chunks, in draw order
    (domain, then split, then users in user_idx order)."""
    gen = torch.Generator().manual_seed(seed)
    hist = seqs.select("user_idx", "items")
    ranges = items.group_by("domain_idx").agg(pl.col("item_idx").min().alias("lo"), pl.col("item_idx").max().alias("hi")).sort("domain_idx")
    for d, lo, hi in ranges.iter_rows():
        v = hi - lo + 1
        for split in ("valid", "test"):
            tg = targets.filter((pl.col("domain_idx") == d) & (pl.col("split") == split)).sort("user_idx")
            if tg.height == 0:
                continue
            k = min(n_neg, v - 1)
            users = tg["user_idx"].to_numpy()
            # the user's items of domain d, as (row, local item) pairs, grouped by row so a chunk
            # of rows is one slice (the draws do not depend on the pairs' order)
            ex = (tg.select("user_idx").with_row_index("row").join(hist, on="user_idx")
                  .explode("items").filter((pl.col("items") >= lo) & (pl.col("items") <= hi)))
            rows_ex = ex["row"].to_numpy().astype(np.int64)
            cols_ex = (ex["items"].to_numpy() - lo).astype(np.int64)
            del ex
            by_row = np.argsort(rows_ex, kind="stable")
            rows_ex, cols_ex = rows_ex[by_row], cols_ex[by_row]
            del by_row
            sparse = v >= 32 * k  # big domain: rejection sampling beats a [users x items] key matrix
            step = max(1, max_cells // (3 * k if sparse else v))
            for s in range(0, len(users), step):
                b = min(step, len(users) - s)
                i0, i1 = np.searchsorted(rows_ex, [s, s + b])
                r_ex, c_ex = rows_ex[i0:i1] - s, cols_ex[i0:i1]
                if sparse:
                    flat, counts = _draw_rejection(gen, b, v, k, r_ex, c_ex)
                    short = np.flatnonzero(counts < k)
                else:
                    short = np.arange(b)
                if len(short):  # exact path (also the rare rejection shortfall)
                    keep = np.isin(r_ex, short)
                    remap = np.full(b, -1, np.int64)
                    remap[short] = np.arange(len(short))
                    g_flat, g_counts = _draw_gumbel(gen, len(short), v, k, remap[r_ex[keep]], c_ex[keep])
                    if sparse:
                        flat, counts = _merge_rows(flat, counts, short, g_flat, g_counts)
                    else:
                        flat, counts = g_flat, g_counts
                offsets = np.concatenate([[0], np.cumsum(counts)])
                lists = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat + lo))
                yield d, split, pl.DataFrame({
                    "user_idx": users[s : s + b].astype(np.int64),
                    "split": [split] * b,
                    "negatives": pl.from_arrow(lists).cast(pl.List(pl.Int64)),
                    "n_negatives": counts.astype(np.int64),
                })


def write_negatives(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int, seed: int,
                    path: Path, max_cells: int = 1 << 24, merge_cells: int = 1 << 25) -> np.ndarray:
    """Write the rows of :func:`sample_negatives` (the same draws, in the same row order) to
    ``path`` with memory bounded in the number of targets; returns every row's n_negatives.

    The draws come domain by domain, each sorted by user, while the file is ordered by split then
    user: each (split, domain) run goes to a temporary file next to ``path``, then the runs of a
    split are merged by user_idx, a window of ``merge_cells`` negatives at a time (each window
    reads only the row groups of each run that hold its users).
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix="cdsr-negatives-", dir=path.parent))
    writer: pq.ParquetWriter | None = None
    try:
        runs: dict[tuple[str, int], pq.ParquetWriter] = {}
        for d, split, chunk in _negative_chunks(seqs, targets, items, n_neg, seed, max_cells):
            t = chunk.to_arrow()
            if (split, d) not in runs:
                runs[(split, d)] = pq.ParquetWriter(tmp / f"{split}-{d}.parquet", t.schema, compression="zstd")
            runs[(split, d)].write_table(t)
            del t, chunk
        for w in runs.values():
            w.close()
        counts = []
        users_per_step = max(1, merge_cells // max(n_neg, 1))
        for split in ("valid", "test"):
            files = [tmp / f"{s}-{d}.parquet" for (s, d) in sorted(runs) if s == split]
            for t in _merge_by_user(files, users_per_step):
                counts.append(t["n_negatives"].to_numpy())
                if writer is None:
                    writer = pq.ParquetWriter(path, t.schema, compression="zstd")
                writer.write_table(t)
                del t
            for f in files:
                f.unlink()
        if writer is None:
            raise SplitError("no targets to draw negatives for")
        return np.concatenate(counts)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_by_user(files: list[Path], users_per_step: int) -> Iterator[pa.Table]:
    """The rows of Parquet files each sorted by user_idx (no user in two files), merged in
    user_idx order, ``users_per_step`` users per table."""
    runs = []
    for f in files:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        users = pf.read(columns=["user_idx"])["user_idx"].to_numpy()
        runs.append((pf, np.concatenate([[0], np.cumsum(sizes)]), users))
    every = np.sort(np.concatenate([u for _, _, u in runs])) if runs else np.zeros(0, np.int64)
    for w in range(0, len(every), users_per_step):
        a, b = every[w], every[min(w + users_per_step, len(every)) - 1] + 1
        parts = []
        for pf, starts, users in runs:
            i0, i1 = (int(x) for x in np.searchsorted(users, [a, b]))
            if i0 == i1:
                continue
            g0 = int(np.searchsorted(starts, i0, side="right")) - 1
            g1 = int(np.searchsorted(starts, i1 - 1, side="right")) - 1
            part = pf.read_row_groups(list(range(g0, g1 + 1)))
            parts.append(part.slice(i0 - int(starts[g0]), i1 - i0))
        t = pa.concat_tables(parts)
        yield t.take(pa.array(np.argsort(t["user_idx"].to_numpy(), kind="stable")))


def _draw_gumbel(gen: torch.Generator, b: int, v: int, k: int, r_ex: np.ndarray, c_ex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uniform ordered k-samples without replacement from range(v) minus the excluded
    (row, col) pairs: random keys, excluded keyed to -1, top-k. Returns (flat local ids, counts)."""
    keys = torch.rand(b, v, generator=gen)
    keys[torch.from_numpy(r_ex), torch.from_numpy(c_ex)] = -1.0
    top = torch.topk(keys, k, dim=1)
    valid = top.values >= 0  # fewer than k items left after excluding the history
    return top.indices[valid].numpy().astype(np.int64), valid.sum(1).numpy().astype(np.int64)


def _draw_rejection(gen: torch.Generator, b: int, v: int, k: int, r_ex: np.ndarray, c_ex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same distribution as _draw_gumbel for v >> k: draw with replacement, keep the first
    occurrence of each item (the order of first occurrences is a uniform ordered sample without
    replacement), drop the user's items, take the first k. Rows may come back short.

    One sort of (item, column) keys per row finds both the repeats (a repeat follows its first
    occurrence) and the user's items (the sorted keys of all rows are one sorted array, looked up
    against the sorted excluded pairs); no per-row Python step."""
    per_row = np.bincount(r_ex, minlength=b)
    m = int(1.25 * k) + int(per_row.max(initial=0)) + 32
    cand = torch.randint(0, v, (b, m), generator=gen).numpy().astype(np.int64)
    # (item, column) in one sortable key: sorting a row by it is a stable sort by item
    sk = np.sort(cand * m + np.arange(m, dtype=np.int64), axis=1)
    col, item = sk % m, sk // m
    del sk
    first = np.ones((b, m), dtype=bool)
    first[:, 1:] = item[:, 1:] != item[:, :-1]
    flat = (item + np.arange(b, dtype=np.int64)[:, None] * v).ravel()  # sorted: rows are disjoint ranges
    del item
    excluded = np.unique(r_ex.astype(np.int64) * v + c_ex)
    if len(excluded):
        at = np.minimum(np.searchsorted(excluded, flat), len(excluded) - 1)
        first &= (excluded[at] != flat).reshape(b, m)
    del flat
    ok = np.empty((b, m), dtype=bool)
    ok[np.arange(b)[:, None], col] = first  # back to draw order
    run = np.cumsum(ok.ravel(), dtype=np.int64).reshape(b, m)
    before = np.concatenate([[0], run[:-1, -1]])  # kept items in earlier rows
    take = ok & (run - before[:, None] <= k)
    return cand[take], take.sum(1).astype(np.int64)


def _merge_rows(flat: np.ndarray, counts: np.ndarray, rows: np.ndarray, new_flat: np.ndarray, new_counts: np.ndarray):
    """Replace the given rows of a ragged (flat, counts) array."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    new_off = np.concatenate([[0], np.cumsum(new_counts)])
    parts, out_counts = [], counts.copy()
    pos = {int(r): i for i, r in enumerate(rows)}
    for r in range(len(counts)):  # only reached when a rejection draw fell short (rare)
        if r in pos:
            i = pos[r]
            parts.append(new_flat[new_off[i]:new_off[i + 1]])
            out_counts[r] = new_counts[i]
        else:
            parts.append(flat[offsets[r]:offsets[r + 1]])
    return np.concatenate(parts), out_counts


# above this many stored negatives (targets x max K) the split stage writes them chunk by chunk
# (write_negatives) instead of drawing them all in memory (8 bytes each)
STREAM_NEGATIVES_CELLS = 1 << 27


def build_split(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    targets = leave_one_out(seqs)
    n_max = max(cfg.split.negatives.values()) if cfg.split.negatives else 0
    negs = sample_negatives(seqs, targets, items, n_max, cfg.split.seed) if n_max else pl.DataFrame()
    return targets, negs, _meta(cfg, targets, negs["n_negatives"].to_numpy() if n_max else None)


def _meta(cfg: DatasetConfig, targets: pl.DataFrame, n_negatives: np.ndarray | None) -> dict:
    return {
        "scheme": "leave-one-out",
        "seed": cfg.split.seed,
        "protocols": {name: {"negatives": k, "rule": f"first {k} of the stored draw"} for name, k in cfg.split.negatives.items()},
        "targets": {s: int(targets.filter(pl.col("split") == s).height) for s in ("valid", "test")},
        "short_negative_rows": ({name: int((n_negatives < k).sum()) for name, k in cfg.split.negatives.items()}
                                if n_negatives is not None else {}),
    }


def write_split(targets: pl.DataFrame, negs: pl.DataFrame, meta: dict, out_dir: Path) -> None:
    targets.write_parquet(out_dir / "split.parquet")
    negs.write_parquet(out_dir / "negatives.parquet")
    (out_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")


def build_and_write_split(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig, out_dir: Path,
                          stream_cells: int = STREAM_NEGATIVES_CELLS) -> dict:
    """The split stage: :func:`build_split` then :func:`write_split`, except that more than
    ``stream_cells`` negatives are written by :func:`write_negatives` (the same rows, memory
    bounded) rather than drawn in memory."""
    n_max = max(cfg.split.negatives.values()) if cfg.split.negatives else 0
    targets = leave_one_out(seqs)
    if not n_max or targets.height * n_max <= stream_cells:
        targets, negs, meta = build_split(seqs, items, cfg)
        write_split(targets, negs, meta, out_dir)
        return meta
    counts = write_negatives(seqs, targets, items, n_max, cfg.split.seed, out_dir / "negatives.parquet")
    meta = _meta(cfg, targets, counts)
    targets.write_parquet(out_dir / "split.parquet")
    (out_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
