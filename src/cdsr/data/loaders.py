"""torch datasets over a built split (docs/architecture.md "The model interface").

Sequences are held as flat arrays + offsets, and a batch is cut out of them with one vectorised
gather (no per-user Python work). Windows are right-aligned: the last column is the most recent
event, padding (item 0, mask False) is on the left.

Training batch (one example per user; the user's training prefix P = events[0 : train_end], with
train_end = n-2 under leave-one-out and the number of events before ``valid_from`` under the
timestamp scheme, so no validation / test target is ever trained on):
    items, domains, timestamps, mask   [B, L]   inputs   P[:-1]  (last L)
    targets, target_domains,           [B, L]   next events P[1:] (0 where padded)
    target_timestamps
    target_domain                      [B]      domain of the last target
Evaluation batch (one example per target row (user, split, pos=t); leave-one-out has one per user
and split, the timestamp scheme any number, ordered by (user_idx, pos)):
    items, domains, timestamps, mask   [B, L]   history events[0 : t] (last L)
    target, target_domain, user_idx    [B]
    negatives [B, K], n_negatives [B]           only when a sampled protocol is asked for
The target item never appears in an input: inputs stop strictly before the target position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler


@dataclass(frozen=True)
class LoaderConfig:
    max_len: int = 50
    batch_size: int = 256
    eval_batch_size: int = 512


@dataclass
class SplitData:
    """A built dataset in memory: flat event arrays, per-user offsets, targets, negatives."""

    items: np.ndarray  # [E] int64
    domains: np.ndarray  # [E] int64
    timestamps: np.ndarray  # [E] int64
    offsets: np.ndarray  # [U + 1] int64; user u's events are [offsets[u], offsets[u+1])
    targets: pl.DataFrame  # user_idx, split, pos, item_idx, domain_idx
    # user_idx, split, [pos (timestamp scheme: several targets per user and split),] negatives, n_negatives
    negatives: pl.DataFrame | None
    domain_ranges: np.ndarray  # [D, 2] first / last item_idx of each domain
    domain_names: list[str]
    # [U] exclusive end (relative to the user's start) of each training prefix; None = n - 2
    # (leave-one-out); the timestamp scheme: the user's events before valid_from (see load)
    train_end: np.ndarray | None = None

    def train_ends(self) -> np.ndarray:
        return self.train_end if self.train_end is not None else np.diff(self.offsets) - 2

    def restrict_to_domain(self, d: int) -> "SplitData":
        """The single-domain view: every user's subsequence of domain ``d`` events (same user
        indices, possibly empty), the validation/test targets of domain ``d`` with positions
        remapped into the subsequence, and training prefixes = domain-``d`` events of the merged
        training prefix (so the view never trains on a merged validation/test event)."""
        keep = self.domains == d
        lens = np.diff(self.offsets)
        user = np.repeat(np.arange(len(lens)), lens)
        n_keep = np.bincount(user[keep], minlength=len(lens))
        offsets = np.concatenate([[0], np.cumsum(n_keep)]).astype(np.int64)
        before = np.cumsum(keep) - keep  # domain-d events strictly before each global event
        start_count = before[self.offsets[:-1].clip(max=len(keep) - 1)] if len(keep) else np.zeros(0, np.int64)
        start_count = np.where(lens > 0, start_count, 0)

        def remap(global_pos: np.ndarray, users: np.ndarray) -> np.ndarray:
            g = self.offsets[users] + global_pos
            at = before[np.minimum(g, len(keep) - 1)] + np.where(g >= len(keep), keep[-1], 0)
            return (at - start_count[users]).astype(np.int64)

        users = np.arange(len(lens))
        train_end = remap(self.train_ends(), users)
        t0 = self.targets.filter(pl.col("domain_idx") == d)
        new_pos = pl.Series("pos", remap(t0["pos"].to_numpy(), t0["user_idx"].to_numpy()), dtype=t0.schema["pos"])
        t = t0.with_columns(new_pos)
        negs = None
        if self.negatives is not None and "pos" in self.negatives.columns:
            # several targets per user: a negatives row is keyed by its target's original pos,
            # which moves with the target into the subsequence
            key = t0.select("user_idx", "split", "pos", new_pos.alias("view_pos"))
            negs = (self.negatives.join(key, on=["user_idx", "split", "pos"], how="inner")
                    .with_columns(pl.col("view_pos").cast(self.negatives.schema["pos"]).alias("pos"))
                    .select(self.negatives.columns))
        elif self.negatives is not None:
            negs = self.negatives.join(t.select("user_idx", "split"), on=["user_idx", "split"], how="semi")
        return SplitData(items=self.items[keep], domains=self.domains[keep], timestamps=self.timestamps[keep],
                         offsets=offsets, targets=t, negatives=negs, domain_ranges=self.domain_ranges,
                         domain_names=self.domain_names, train_end=train_end)

    @property
    def n_items(self) -> int:
        return int(self.domain_ranges[:, 1].max())

    @classmethod
    def load(cls, processed: str | Path) -> "SplitData":
        p = Path(processed)
        seqs = pl.read_parquet(p / "sequences.parquet").sort("user_idx")
        if not (seqs["user_idx"].to_numpy() == np.arange(seqs.height)).all():
            raise ValueError(f"{p / 'sequences.parquet'}: user_idx is not 0..U-1")
        items = pl.read_parquet(p / "items.parquet")
        lens = seqs["items"].list.len().to_numpy().astype(np.int64)
        negs = pl.read_parquet(p / "negatives.parquet") if (p / "negatives.parquet").exists() else None
        ranges = (items.group_by("domain_idx").agg(pl.col("item_idx").min().alias("lo"), pl.col("item_idx").max().alias("hi"))
                  .sort("domain_idx"))
        names = items.unique("domain_idx").sort("domain_idx")["domain"].to_list()
        timestamps = seqs["timestamps"].explode().to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return cls(
            items=seqs["items"].explode().to_numpy().astype(np.int64),
            domains=seqs["domains"].explode().to_numpy().astype(np.int64),
            timestamps=timestamps,
            offsets=offsets,
            targets=pl.read_parquet(p / "split.parquet"),
            negatives=negs,
            domain_ranges=np.stack([ranges["lo"].to_numpy(), ranges["hi"].to_numpy()], 1).astype(np.int64),
            domain_names=names,
            train_end=_scheme_train_ends(p / "split.json", timestamps, offsets),
        )


def _scheme_train_ends(meta_path: Path, timestamps: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    """[U] training prefix lengths of the split's scheme (split.json): None for leave-one-out
    (n - 2, :meth:`SplitData.train_ends`), the events before ``valid_from`` for the timestamp
    scheme. Not derived from the targets: a user whose targets were dropped, or who has none,
    must still not train on events at or after ``valid_from``."""
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    scheme = meta.get("scheme", "leave-one-out")
    if scheme == "leave-one-out":
        return None
    if scheme == "timestamp":
        from cdsr.data.split import timestamp_train_ends

        return timestamp_train_ends(timestamps, offsets, int(meta["timestamp_split"]["cutoffs_unix_s"]["valid_from"]))
    raise ValueError(f"{meta_path}: unknown split scheme {scheme!r}; rebuild the split")


def _windows(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned windows of flat[starts:ends] (last L values). Returns (values [B, L], mask)."""
    idx = ends[:, None] - L + np.arange(L)[None, :]
    mask = idx >= np.maximum(starts, ends - L)[:, None]
    vals = flat[np.clip(idx, 0, max(len(flat) - 1, 0))]
    return np.where(mask, vals, 0), mask


class TrainDataset(Dataset):
    """One example per user with at least two training events; index with a list of indices."""

    def __init__(self, data: SplitData, max_len: int):
        self.data, self.L = data, max_len
        self.ends = data.train_ends()
        self.users = np.flatnonzero(self.ends >= 2)  # a prefix of >= 2 events gives >= 1 target

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        u = self.users[np.asarray(index, dtype=np.int64).reshape(-1)]
        d = self.data
        s = d.offsets[u]
        e = s + self.ends[u]  # training prefix [s, e)
        items, mask = _windows(d.items, s, e - 1, self.L)
        doms, _ = _windows(d.domains, s, e - 1, self.L)
        ts, _ = _windows(d.timestamps, s, e - 1, self.L)
        tgt, _ = _windows(d.items, s + 1, e, self.L)
        tdom, _ = _windows(d.domains, s + 1, e, self.L)
        tts, _ = _windows(d.timestamps, s + 1, e, self.L)
        return {
            "user_idx": torch.from_numpy(u),
            "items": torch.from_numpy(items), "domains": torch.from_numpy(doms),
            "timestamps": torch.from_numpy(ts), "mask": torch.from_numpy(mask),
            "targets": torch.from_numpy(np.where(mask, tgt, 0)), "target_domains": torch.from_numpy(np.where(mask, tdom, 0)),
            "target_timestamps": torch.from_numpy(np.where(mask, tts, 0)),
            "target_domain": torch.from_numpy(tdom[:, -1].copy()),
        }


class EvalDataset(Dataset):
    """One example per (user, split) target; ``n_negatives`` > 0 attaches sampled negatives."""

    def __init__(self, data: SplitData, split: str, max_len: int, n_negatives: int = 0, max_events: int | None = None):
        self.data, self.L = data, max_len
        # at most this many of the history's last events fill the right of the L-wide window
        self.keep = max_len if max_events is None else max(1, min(max_events, max_len))
        # (user, pos) order: one row per user under leave-one-out, several under the timestamp scheme
        t = data.targets.filter(pl.col("split") == split).sort("user_idx", "pos")
        if t.height == 0:
            raise ValueError(f"no '{split}' targets in the split")
        self.user = t["user_idx"].to_numpy().astype(np.int64)
        self.pos = t["pos"].to_numpy().astype(np.int64)
        self.neg = self.neg_count = None
        if n_negatives:
            if data.negatives is None:
                raise ValueError("negatives.parquet is missing: rebuild the split")
            ng = data.negatives.filter(pl.col("split") == split)
            if "pos" in ng.columns:
                ng = ng.sort("user_idx", "pos")
                ok = len(ng) == len(t) and (ng["pos"].to_numpy() == self.pos).all()
            else:
                if len(self.user) > 1 and (np.diff(self.user) == 0).any():
                    raise ValueError(f"several '{split}' targets per user but negatives.parquet has no 'pos' column "
                                     f"to tell them apart: rebuild the split")
                ng = ng.sort("user_idx")
                ok = len(ng) == len(t)
            if not (ok and (ng["user_idx"].to_numpy() == self.user).all()):
                raise ValueError("negatives do not line up with the targets")
            lists = ng["negatives"]
            k = min(n_negatives, int(lists.list.len().max()))
            full = lists.list.len().to_numpy().astype(np.int64)
            lens = np.minimum(full, k)
            flat = lists.explode().to_numpy().astype(np.int64)
            offs = np.concatenate([[0], np.cumsum(full)]).astype(np.int64)
            idx = offs[:-1, None] + np.arange(k)[None, :]
            ok = np.arange(k)[None, :] < lens[:, None]
            self.neg = np.where(ok, flat[np.clip(idx, 0, len(flat) - 1)], 0)  # 0-padded when a domain is small
            self.neg_count = lens.astype(np.int64)

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        i = np.asarray(index, dtype=np.int64).reshape(-1)
        d, u, p = self.data, self.user[i], self.pos[i]
        e = d.offsets[u] + p
        s = np.maximum(d.offsets[u], e - self.keep)
        items, mask = _windows(d.items, s, e, self.L)
        doms, _ = _windows(d.domains, s, e, self.L)
        ts, _ = _windows(d.timestamps, s, e, self.L)
        out = {
            "user_idx": torch.from_numpy(u),
            "items": torch.from_numpy(items), "domains": torch.from_numpy(doms),
            "timestamps": torch.from_numpy(ts), "mask": torch.from_numpy(mask),
            "target": torch.from_numpy(d.items[e]), "target_domain": torch.from_numpy(d.domains[e]),
            "target_timestamp": torch.from_numpy(d.timestamps[e]),
        }
        if self.neg is not None:
            out["negatives"] = torch.from_numpy(self.neg[i])
            out["n_negatives"] = torch.from_numpy(self.neg_count[i])
        return out


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches are built by the dataset from a list of indices (vectorised); the shuffling
    order is fixed by ``seed``."""
    base = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None)
