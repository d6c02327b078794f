"""Split stage: the split scheme and the fixed sampled negatives (docs/protocols.md "Data split").

``split.scheme: leave-one-out`` (the default): for a user with n events (time-ordered), position
n-1 is the **test** target, n-2 the **validation** target, and positions 1..n-3 are training
targets. ``split.parquet`` holds one row per (user, split).

``split.scheme: timestamp`` (the Amazon Reviews 2023 release's "timestamp" split): two global
cut-offs; every event at or after ``test_from`` is a test target, every event in
[``valid_from``, ``test_from``) a validation target, so a user may have several targets per split
(and ``negatives.parquet`` then carries ``pos`` too). Training uses only events before
``valid_from`` (:func:`timestamp_train_ends`). See :func:`timestamp_split`.

In both schemes a row of ``split.parquet`` is (user_idx, split, pos, item_idx, domain_idx), and
the history of a target is the user's events (all domains) before its position ``pos``.

Negatives for the sampled protocols are drawn once, seeded, per (user, split): items of the
target's domain, uniformly without replacement, never an item of the user's whole sequence.
One draw of size max(K) in uniformly random order serves all protocols: ``sampled-K`` uses its
first K entries (a uniform K-subset). Draws are vectorised per domain with Gumbel-top-k (random
keys, the user's own items keyed out, top-k). Under the timestamp scheme a draw is made per target
row (user, split, pos).
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


# The Amazon Reviews 2023 release's timestamp split cut-offs, unix ms (train < t1 <= valid < t2 <=
# test). Source: github.com/hyp1231/AmazonReviews2023, benchmark_scripts/README.md "rating_only ->
# timestamp" and benchmark_scripts/timestamp_split.py; chosen there to split all of the release's
# reviews 8:1:1 and used for every category.
AMAZON_2023_VALID_FROM_MS = 1628643414042
AMAZON_2023_TEST_FROM_MS = 1658002729837


def timestamp_split(seqs: pl.DataFrame, valid_from: int, test_from: int) -> tuple[pl.DataFrame, dict]:
    """Rows (user_idx, split, pos, item_idx, domain_idx) of the global timestamp split, and its
    counts for split.json.

    ``valid_from`` < ``test_from`` are unix seconds (the resolution of ``timestamps``). As in the
    Amazon Reviews 2023 release (benchmark_scripts/timestamp_split.py of hyp1231/AmazonReviews2023:
    train (-inf, t1), valid [t1, t2), test [t2, +inf), the same cut-offs for every category; its
    ``_w_his`` files give each valid / test row the user's items before it):

    - every event with timestamp >= ``test_from`` is a **test** target, every event in
      [``valid_from``, ``test_from``) a **validation** target: a user has 0..n targets per split;
    - a target at position ``pos`` is predicted from the user's events 0..pos-1 (all domains),
      i.e. every earlier event, including earlier validation / test events (the ground truth of
      earlier targets is revealed, the model's parameters are not updated); events with the same
      timestamp keep the sequence order (``sequences.tie_break``), so one ordered before the
      target is in its history, as in the release's history column;
    - training uses only each user's events before ``valid_from`` (a prefix of the time-ordered
      sequence, :func:`timestamp_train_ends`);
    - a user with no event before ``valid_from`` (nothing to train on, a cold-start user) has all
      of their targets dropped; how many users and targets is recorded in split.json
      (``dropped_no_training_events``). The release keeps such rows (with an empty or all-future
      history), so its valid / test row counts exceed ours by exactly those targets.

    Vectorised: one explode of the sequences, no per-user step. Raises SplitError when a split
    has no target (cut-offs outside the data's time range).
    """
    ev = (seqs.select("user_idx", pl.int_ranges(0, pl.col("items").list.len()).alias("pos"),
                      "items", "domains", "timestamps")
          .explode("pos", "items", "domains", "timestamps"))
    n_train = ev.group_by("user_idx").agg((pl.col("timestamps") < valid_from).sum().alias("n_train"))
    ev = ev.join(n_train, on="user_idx", how="left")
    later = ev.filter(pl.col("timestamps") >= valid_from).with_columns(
        split=pl.when(pl.col("timestamps") >= test_from).then(pl.lit("test")).otherwise(pl.lit("valid")))
    cold = later.filter(pl.col("n_train") == 0)
    targets = (later.filter(pl.col("n_train") > 0)
               .select(pl.col("user_idx"), "split", pl.col("pos").cast(pl.Int64),
                       pl.col("items").cast(pl.Int64).alias("item_idx"),
                       pl.col("domains").cast(pl.Int64).alias("domain_idx"))
               .sort(["split", "user_idx", "pos"], descending=[True, False, False]))
    counts = {sp: int((targets["split"] == sp).sum()) for sp in ("valid", "test")}
    empty = [sp for sp, c in counts.items() if c == 0]
    if empty:
        lo, hi = (int(seqs["timestamps"].list.min().min()), int(seqs["timestamps"].list.max().max())) \
            if seqs.height else (None, None)
        raise SplitError(f"timestamp split: no {' / '.join(empty)} target (valid_from {valid_from}, test_from "
                         f"{test_from} unix s; the events span {lo} .. {hi}): move the cut-offs into the data")
    info = {
        "users_with_targets": int(targets["user_idx"].n_unique()),
        # every event before valid_from: the user only trains
        "users_without_targets": int(seqs.height - later["user_idx"].n_unique()),
        "dropped_no_training_events": {
            "users": int(cold["user_idx"].n_unique()),
            "targets": {sp: int((cold["split"] == sp).sum()) for sp in ("valid", "test")},
        },
    }
    return targets, info


def timestamp_train_ends(timestamps: np.ndarray, offsets: np.ndarray, valid_from: int) -> np.ndarray:
    """[U] length of each user's training prefix under the timestamp scheme: the number of the
    user's events before ``valid_from`` (unix s). ``timestamps`` [E] is time-ordered within each
    user (``offsets`` [U + 1]), so those events are exactly positions 0 .. end-1."""
    c = np.concatenate([[0], np.cumsum(timestamps < valid_from)]).astype(np.int64)
    return c[offsets[1:]] - c[offsets[:-1]]


def sample_negatives(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int,
                     seed: int, max_cells: int = 1 << 24, with_pos: bool = False) -> pl.DataFrame:
    """Rows (user_idx, split[, pos], negatives: list[int64], n_negatives) for every target row.

    Deterministic for a seed: domains, splits and users are processed in a fixed order with one
    torch generator. ``max_cells`` bounds the [users x items] key matrix per chunk. The whole
    draw is held in memory: for millions of targets use :func:`write_negatives`, which writes
    the same rows to a file chunk by chunk. ``with_pos`` (several targets per user and split, as
    in the timestamp scheme): rows also carry the target's ``pos`` and are ordered by it within a
    user; without it the leave-one-out file is unchanged byte for byte.
    """
    out = [chunk for _, _, chunk in _negative_chunks(seqs, targets, items, n_neg, seed, max_cells, with_pos)]
    keys = ["split", "user_idx"] + (["pos"] if with_pos else [])
    return pl.concat(out).sort(keys, descending=[True] + [False] * (len(keys) - 1))


def _negative_chunks(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int, seed: int,
                     max_cells: int = 1 << 24, with_pos: bool = False) -> Iterator[tuple[int, str, pl.DataFrame]]:
    """The draws of :func:`sample_negatives` as (domain_idx, split, rows) chunks, in draw order
    (domain, then split, then target rows in (user_idx, pos) order)."""
    gen = torch.Generator().manual_seed(seed)
    hist = seqs.select("user_idx", "items")
    ranges = items.group_by("domain_idx").agg(pl.col("item_idx").min().alias("lo"), pl.col("item_idx").max().alias("hi")).sort("domain_idx")
    for d, lo, hi in ranges.iter_rows():
        v = hi - lo + 1
        for split in ("valid", "test"):
            tg = targets.filter((pl.col("domain_idx") == d) & (pl.col("split") == split))
            tg = tg.sort(["user_idx", "pos"] if with_pos else "user_idx")
            if tg.height == 0:
                continue
            k = min(n_neg, v - 1)
            users = tg["user_idx"].to_numpy()
            pos = tg["pos"].to_numpy() if with_pos else None
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
                cols = {"user_idx": users[s : s + b].astype(np.int64), "split": [split] * b}
                if pos is not None:
                    cols["pos"] = pos[s : s + b].astype(np.int64)
                yield d, split, pl.DataFrame({
                    **cols,
                    "negatives": pl.from_arrow(lists).cast(pl.List(pl.Int64)),
                    "n_negatives": counts.astype(np.int64),
                })


def write_negatives(seqs: pl.DataFrame, targets: pl.DataFrame, items: pl.DataFrame, n_neg: int, seed: int,
                    path: Path, max_cells: int = 1 << 24, merge_cells: int = 1 << 25,
                    with_pos: bool = False) -> np.ndarray:
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
        for d, split, chunk in _negative_chunks(seqs, targets, items, n_neg, seed, max_cells, with_pos):
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
    """The rows of Parquet files each sorted by user_idx (then pos, when the rows carry it),
    merged in that order, ``users_per_step`` users per table. A user may have rows in several
    files (targets in several domains, timestamp scheme): windows are cut between distinct
    users, so each window reads all of its users' rows from every file."""
    runs = []
    for f in files:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        users = pf.read(columns=["user_idx"])["user_idx"].to_numpy()
        runs.append((pf, np.concatenate([[0], np.cumsum(sizes)]), users))
    # distinct users: with one row per user (leave-one-out) this is the plain sorted list
    every = np.unique(np.concatenate([u for _, _, u in runs])) if runs else np.zeros(0, np.int64)
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
        if "pos" in t.column_names:
            order = np.lexsort((t["pos"].to_numpy(), t["user_idx"].to_numpy()))
        else:
            order = np.argsort(t["user_idx"].to_numpy(), kind="stable")
        yield t.take(pa.array(order))


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


def make_targets(seqs: pl.DataFrame, cfg: DatasetConfig) -> tuple[pl.DataFrame, dict]:
    """The target rows of ``cfg.split.scheme`` and the scheme's own split.json entries
    (none for leave-one-out, whose split.json is unchanged)."""
    if cfg.split.scheme == "leave-one-out":
        return leave_one_out(seqs), {}
    if cfg.split.scheme == "timestamp":
        v, t = cfg.split.cutoffs()
        targets, info = timestamp_split(seqs, v, t)
        return targets, {
            "valid_from": cfg.split.valid_from, "test_from": cfg.split.test_from,
            "cutoff_unit": cfg.split.cutoff_unit,
            # what the split and SplitData.load (training prefixes) compare the timestamps with
            "cutoffs_unix_s": {"valid_from": v, "test_from": t},
            "rule": "test: timestamp >= test_from; valid: valid_from <= timestamp < test_from; training: "
                    "events before valid_from; history of a target: the user's events before it",
            **info,
        }
    raise SplitError(f"unknown split scheme {cfg.split.scheme!r}")


def build_split(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    return _with_negatives(seqs, items, cfg, *make_targets(seqs, cfg))


def _with_negatives(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig, targets: pl.DataFrame,
                    extra: dict) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """(targets, negatives drawn in memory, split.json) for targets of :func:`make_targets`."""
    n_max = _max_negatives(cfg)
    with_pos = cfg.split.scheme != "leave-one-out"
    negs = sample_negatives(seqs, targets, items, n_max, cfg.split.seed, with_pos=with_pos) if n_max else pl.DataFrame()
    return targets, negs, _meta(cfg, targets, negs["n_negatives"].to_numpy() if n_max else None, extra)


def _max_negatives(cfg: DatasetConfig) -> int:
    return max(cfg.split.negatives.values()) if cfg.split.negatives else 0


def _meta(cfg: DatasetConfig, targets: pl.DataFrame, n_negatives: np.ndarray | None, extra: dict | None = None) -> dict:
    meta = {
        "scheme": cfg.split.scheme,
        "seed": cfg.split.seed,
        "protocols": {name: {"negatives": k, "rule": f"first {k} of the stored draw"} for name, k in cfg.split.negatives.items()},
        "targets": {s: int(targets.filter(pl.col("split") == s).height) for s in ("valid", "test")},
        "short_negative_rows": ({name: int((n_negatives < k).sum()) for name, k in cfg.split.negatives.items()}
                                if n_negatives is not None else {}),
    }
    if extra:  # the timestamp scheme's entries; leave-one-out has none, so its split.json stays the same bytes
        meta["timestamp_split"] = extra
    return meta


def write_split(targets: pl.DataFrame, negs: pl.DataFrame, meta: dict, out_dir: Path) -> None:
    targets.write_parquet(out_dir / "split.parquet")
    negs.write_parquet(out_dir / "negatives.parquet")
    (out_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")


def build_and_write_split(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig, out_dir: Path,
                          stream_cells: int = STREAM_NEGATIVES_CELLS) -> dict:
    """The split stage: :func:`build_split` then :func:`write_split`, except that more than
    ``stream_cells`` negatives are written by :func:`write_negatives` (the same rows, memory
    bounded) rather than drawn in memory."""
    n_max = _max_negatives(cfg)
    targets, extra = make_targets(seqs, cfg)
    if not n_max or targets.height * n_max <= stream_cells:
        targets, negs, meta = _with_negatives(seqs, items, cfg, targets, extra)
        write_split(targets, negs, meta, out_dir)
        return meta
    counts = write_negatives(seqs, targets, items, n_max, cfg.split.seed, out_dir / "negatives.parquet",
                             with_pos=cfg.split.scheme != "leave-one-out")
    meta = _meta(cfg, targets, counts, extra)
    targets.write_parquet(out_dir / "split.parquet")
    (out_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
