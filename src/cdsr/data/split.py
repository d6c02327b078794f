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
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
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
    torch generator. ``max_cells`` bounds the [users x items] key matrix per chunk.
    """
    gen = torch.Generator().manual_seed(seed)
    hist = seqs.select("user_idx", "items")
    out = []
    ranges = items.group_by("domain_idx").agg(pl.col("item_idx").min().alias("lo"), pl.col("item_idx").max().alias("hi")).sort("domain_idx")
    for d, lo, hi in ranges.iter_rows():
        v = hi - lo + 1
        for split in ("valid", "test"):
            tg = targets.filter((pl.col("domain_idx") == d) & (pl.col("split") == split)).sort("user_idx")
            if tg.height == 0:
                continue
            k = min(n_neg, v - 1)
            users = tg["user_idx"].to_numpy()
            # the user's items of domain d, as (row, local item) pairs
            ex = (tg.select("user_idx").with_row_index("row").join(hist, on="user_idx")
                  .explode("items").filter((pl.col("items") >= lo) & (pl.col("items") <= hi)))
            rows_ex = ex["row"].to_numpy().astype(np.int64)
            cols_ex = (ex["items"].to_numpy() - lo).astype(np.int64)
            sparse = v >= 32 * k  # big domain: rejection sampling beats a [users x items] key matrix
            step = max(1, max_cells // (3 * k if sparse else v))
            for s in range(0, len(users), step):
                b = min(step, len(users) - s)
                sel = (rows_ex >= s) & (rows_ex < s + b)
                r_ex, c_ex = rows_ex[sel] - s, cols_ex[sel]
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
                out.append(pl.DataFrame({
                    "user_idx": users[s : s + b].astype(np.int64),
                    "split": [split] * b,
                    "negatives": pl.from_arrow(lists).cast(pl.List(pl.Int64)),
                    "n_negatives": counts.astype(np.int64),
                }))
    return pl.concat(out).sort("split", "user_idx", descending=[True, False])


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
    replacement), drop the user's items, take the first k. Rows may come back short."""
    per_row = np.bincount(r_ex, minlength=b)
    m = int(1.25 * k) + int(per_row.max(initial=0)) + 32
    cand = torch.randint(0, v, (b, m), generator=gen).numpy().astype(np.int64)
    keys = cand + np.arange(b, dtype=np.int64)[:, None] * v
    bad = np.isin(keys, r_ex.astype(np.int64) * v + c_ex)
    order = np.argsort(keys, axis=1, kind="stable")
    sk = np.take_along_axis(keys, order, 1)
    dup_sorted = np.zeros_like(sk, dtype=bool)
    dup_sorted[:, 1:] = sk[:, 1:] == sk[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    ok = ~bad & ~dup
    take = ok & (np.cumsum(ok, axis=1) <= k)
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


def build_split(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    targets = leave_one_out(seqs)
    n_max = max(cfg.split.negatives.values()) if cfg.split.negatives else 0
    negs = sample_negatives(seqs, targets, items, n_max, cfg.split.seed) if n_max else pl.DataFrame()
    meta = {
        "scheme": "leave-one-out",
        "seed": cfg.split.seed,
        "protocols": {name: {"negatives": k, "rule": f"first {k} of the stored draw"} for name, k in cfg.split.negatives.items()},
        "targets": {s: int(targets.filter(pl.col("split") == s).height) for s in ("valid", "test")},
        "short_negative_rows": {name: int((negs["n_negatives"] < k).sum()) for name, k in cfg.split.negatives.items()} if n_max else {},
    }
    return targets, negs, meta


def write_split(targets: pl.DataFrame, negs: pl.DataFrame, meta: dict, out_dir: Path) -> None:
    targets.write_parquet(out_dir / "split.parquet")
    negs.write_parquet(out_dir / "negatives.parquet")
    (out_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
