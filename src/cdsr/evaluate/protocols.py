"""Named evaluation protocols (docs/protocols.md "Protocols"): candidates, ranks and summaries.

| name          | candidates for a target of domain d          | history excluded            |
|---------------|----------------------------------------------|-----------------------------|
| ``full``      | every item of domain d                       | if ``exclude_history``      |
| ``full-all``  | every item of every domain                   | if ``exclude_history``      |
| ``sampled-K`` | target + the first K stored negatives        | always (by construction of  |
|               | (uniform over domain d, drawn once, seeded)  | the stored draw)            |

The flow is ``rank_targets`` (one rank per target, plus the row's domain, history length and
user) -> ``summarise`` (metrics overall, per target domain, per history-length bucket).
Ranks use the pessimistic tie rule of :mod:`cdsr.evaluate.metrics`.

Everything is batched: a batch of evaluation rows is cut by :class:`EvalDataset` with one
vectorised gather, the candidate mask of a batch is built with tensor ops (the history mask with
one scatter over a ragged range), and there is no per-user Python work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from cdsr.data.loaders import EvalDataset, SplitData
from cdsr.evaluate.metrics import KS, metrics_from_ranks, ranks_full, ranks_sampled
from cdsr.models.base import SeqRecModel

# Upper bound on the cells of one [B, n_items + 1] score matrix (2^26 float32 = 256 MiB, plus
# two bool masks of the same shape): the full protocols shrink the batch for huge catalogues.
MAX_SCORE_CELLS = 1 << 26


@dataclass(frozen=True)
class Protocol:
    name: str
    kind: Literal["full", "sampled"]
    all_domains: bool = False  # full-all: candidates from every domain, not only the target's
    n_negatives: int = 0  # sampled-K: K

    @property
    def sampled(self) -> bool:
        return self.kind == "sampled"


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("full", "full"),
    Protocol("full-all", "full", all_domains=True),
    Protocol("sampled-999", "sampled", n_negatives=999),
    Protocol("sampled-100", "sampled", n_negatives=100),
)}


@dataclass(frozen=True)
class EvalConfig:
    protocols: list[str] = field(default_factory=lambda: ["full", "sampled-999"])
    # full / full-all only: drop every item of the user's whole history before the target
    # (not just the model's max_len window) from the candidates, except the target itself
    exclude_history: bool = False
    batch_size: int = 512
    max_len: int = 50
    ks: tuple[int, ...] = KS
    # upper edges of the history-length buckets: (5, 10, 20, 50) -> 1-5, 6-10, 11-20, 21-50, 51+
    buckets: tuple[int, ...] = (5, 10, 20, 50)
    # the events an evaluation input holds: ``max_len`` (the last max_len events) or ``train``
    # (at most as many as the longest training input, so that no position a model sees at
    # evaluation was left untrained: see :func:`input_events`)
    input_window: Literal["max_len", "train"] = "max_len"

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; known: {sorted(PROTOCOLS)}")
        if list(self.buckets) != sorted(set(self.buckets)) or (self.buckets and self.buckets[0] < 1):
            raise ValueError(f"buckets must be strictly increasing positive edges, got {self.buckets}")
        if self.batch_size < 1 or self.max_len < 1:
            raise ValueError("batch_size and max_len must be >= 1")
        if self.input_window not in ("max_len", "train"):
            raise ValueError(f"input_window must be max_len or train, not {self.input_window!r}")


def input_events(data: SplitData, cfg: EvalConfig) -> int:
    """The most events an evaluation input holds: ``cfg.max_len``, or under ``input_window:
    train`` the longest training input of ``data`` (training inputs are a prefix's events but
    its last, in the same max_len window). Under leave-one-out with sequences cut to 50 events
    that is 47 where validation inputs hold up to 48 and test inputs 49: a position a model
    indexes from the window's end would otherwise meet 1-2 rows at evaluation that no training
    example reached (ABXI's code cuts evaluation inputs to the training length for this)."""
    if cfg.input_window == "max_len":
        return cfg.max_len
    ends = data.train_ends()
    return int(min(cfg.max_len, max(int(ends.max()) - 1, 1))) if len(ends) else cfg.max_len


@dataclass
class RankResult:
    """One row per evaluated target (all [N], long, on the CPU)."""

    ranks: Tensor  # 1-based rank of the target
    n_candidates: Tensor  # candidates including the target
    domain: Tensor  # target domain index
    hist_len: Tensor  # events before the target (the whole history, not the model's window)
    user_idx: Tensor
    protocol: str

    def __len__(self) -> int:
        return int(self.ranks.numel())

    @classmethod
    def cat(cls, results: list["RankResult"]) -> "RankResult":
        return cat(results)


def cat(results: list[RankResult]) -> RankResult:
    """Concatenate results of the same protocol (e.g. shards of one split)."""
    if not results:
        raise ValueError("nothing to concatenate")
    protos = {r.protocol for r in results}
    if len(protos) != 1:
        raise ValueError(f"cannot concatenate results of different protocols {sorted(protos)}")
    return RankResult(*(torch.cat([getattr(r, f) for r in results]) for f in
                        ("ranks", "n_candidates", "domain", "hist_len", "user_idx")), protocol=protos.pop())


def _history_pairs(data: SplitData, user: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) for every event before each row's target: user u's events
    ``items[offsets[u] : offsets[u] + pos]``, flattened as a ragged range without a loop."""
    lens = pos.astype(np.int64)
    rows = np.repeat(np.arange(len(user)), lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return rows, data.items[np.repeat(data.offsets[user], lens) + within]


def _check_negatives(data: SplitData, ds: EvalDataset, k: int, name: str) -> None:
    """Refuse a sampled protocol whose stored draw is smaller than K (e.g. the split was built
    with only ``sampled-100``): ``EvalDataset`` would silently use fewer negatives. A row may
    legitimately hold fewer than K when its domain is small; the user's own items are excluded,
    so at least ``domain size - #events of the user`` negatives exist."""
    dom = data.domains[data.offsets[ds.user] + ds.pos]
    size = data.domain_ranges[dom, 1] - data.domain_ranges[dom, 0] + 1
    need = np.clip(np.minimum(k, size - np.diff(data.offsets)[ds.user]), 0, None)
    short = ds.neg_count < need
    if short.any():
        raise ValueError(f"{name}: {int(short.sum())} rows have fewer stored negatives than the domain allows "
                         f"(e.g. {int(ds.neg_count[short][0])} < {int(need[short][0])}); the split holds a smaller "
                         f"draw than {k}: rebuild it with '{name}: {k}' under split.negatives")


def rank_targets(model: nn.Module, data: SplitData, split: str, protocol: str, cfg: EvalConfig,
                 device: str | torch.device = "cpu") -> RankResult:
    """Rank every ``split`` target of ``data`` under ``protocol``.

    full / full-all: ``model.score(batch, None)`` -> [B, n_items + 1]; candidates are the items
    of the row's target domain (all items 1..n_items for full-all), minus the history items
    when ``cfg.exclude_history`` (the target stays a candidate even if it was seen before).
    sampled-K: candidates = [target, K stored negatives] -> ``model.score(batch, candidates)``
    -> [B, 1 + K]; padded negatives (short domains) are ignored.
    The model runs in eval mode under ``torch.no_grad`` and its training flag is restored.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    device = torch.device(device)
    ds = EvalDataset(data, split, cfg.max_len, n_negatives=proto.n_negatives, max_events=input_events(data, cfg))
    v1 = data.n_items + 1
    if proto.sampled:
        _check_negatives(data, ds, proto.n_negatives, protocol)
        bs = cfg.batch_size
    else:
        bs = max(1, min(cfg.batch_size, MAX_SCORE_CELLS // v1))

    # a dot-product scorer (one that implements SeqRecModel.score_parts) is ranked per target
    # domain in bounded blocks (_rank_by_domain), so its encoder takes whole batches
    parts_fn = getattr(model, "score_parts", None)
    if getattr(type(model), "score_parts", None) is SeqRecModel.score_parts:
        parts_fn = None
    if not proto.sampled and parts_fn is not None:
        bs = cfg.batch_size

    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {k: [] for k in ("ranks", "n_candidates", "domain", "hist_len", "user_idx")}
    # float32 whatever the caller's autocast: bf16 scores (8 significant bits) would tie
    # candidates that float32 orders, and ties count against the target
    fp32 = torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", enabled=False)
    try:
        with torch.no_grad(), fp32:
            for start in range(0, len(ds), bs):
                idx = np.arange(start, min(start + bs, len(ds)))
                batch = {k: v.to(device) for k, v in ds[idx].items()}
                target, tdom = batch["target"], batch["target_domain"]
                if proto.sampled:
                    ranks, n_cand = _rank_sampled(model, batch)
                elif (parts := parts_fn(batch) if parts_fn is not None else None) is not None:
                    hist = _history_pairs(data, ds.user[idx], ds.pos[idx]) if cfg.exclude_history else None
                    ranks, n_cand = _rank_by_domain(*parts, target, tdom, data.domain_ranges, proto.all_domains,
                                                    data.n_items, hist)
                else:
                    hist = _history_pairs(data, ds.user[idx], ds.pos[idx]) if cfg.exclude_history else None
                    ranks, n_cand = _rank_scored(model, batch, data, proto.all_domains, hist)
                out["ranks"].append(ranks.cpu())
                out["n_candidates"].append(n_cand.long().cpu())
                out["domain"].append(tdom.cpu())
                out["hist_len"].append(torch.from_numpy(ds.pos[idx]))
                out["user_idx"].append(batch["user_idx"].cpu())
    finally:
        model.train(was_training)
    return RankResult(**{k: torch.cat(v).long() for k, v in out.items()}, protocol=protocol)


def _rank_sampled(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Ranks among [target, stored negatives] -> ``(ranks [B], candidates per row [B])``."""
    cands = torch.cat([batch["target"][:, None], batch["negatives"]], 1)
    scores = model.score(batch, cands)
    if tuple(scores.shape) != tuple(cands.shape):
        raise ValueError(f"{type(model).__name__}.score returned {tuple(scores.shape)} for "
                         f"candidates {tuple(cands.shape)}")
    return ranks_sampled(scores, batch["n_negatives"]), 1 + batch["n_negatives"]


def _rank_scored(model: nn.Module, batch: dict[str, Tensor], data: SplitData, all_domains: bool,
                 hist: tuple[np.ndarray, np.ndarray] | None) -> tuple[Tensor, Tensor]:
    """Full-protocol ranks from ``model.score(batch, None)`` [B, n_items + 1]: the candidates are
    the target domain's items (every item with ``all_domains``), minus the ``hist`` (row, item)
    pairs; the target always stays a candidate."""
    target, tdom = batch["target"], batch["target_domain"]
    device, b, v1 = target.device, len(target), data.n_items + 1
    scores = model.score(batch, None)
    if tuple(scores.shape) != (b, v1):
        raise ValueError(f"{type(model).__name__}.score(batch, None) returned {tuple(scores.shape)}, "
                         f"expected {(b, v1)} (column = item id, 0 = padding)")
    ids = torch.arange(v1, device=device)[None, :]
    if all_domains:
        allowed = (ids >= 1).expand(b, v1).clone()
        n_cand = torch.full((b,), data.n_items, device=device)
    else:
        ranges = torch.as_tensor(data.domain_ranges, device=device)
        lo, hi = ranges[tdom, 0][:, None], ranges[tdom, 1][:, None]
        allowed = (ids >= lo) & (ids <= hi)
        n_cand = (hi - lo + 1)[:, 0]
    if hist is not None:
        rows, items = hist
        allowed[torch.from_numpy(rows).to(device), torch.from_numpy(items).to(device)] = False
        allowed[torch.arange(b, device=device), target] = True
        n_cand = allowed.sum(1, dtype=torch.int32)
    return ranks_full(scores, target, allowed), n_cand


# Scores per product in the per-domain ranking: 2^21 (8 MiB) stays in the caches, where a
# [rows, V_d] block of a 700k-item domain would stream through main memory twice.
SCORE_CHUNK_CELLS = 1 << 21
ROW_BLOCK = 512
# A domain of at most SCORE_CHUNK_CELLS / SINGLE_PASS_ROWS items (32k) is scored in one pass:
# blocks of SCORE_CHUNK_CELLS / V rows (64 to 512) against all its items, so each score is
# computed once; a wider domain needs the two passes below (each chunk's product twice).
SINGLE_PASS_ROWS = 64


def _rank_by_domain(q: Tensor, table: Tensor, bias: Tensor | None, target: Tensor, tdom: Tensor,
                    ranges: np.ndarray, all_domains: bool, n_items: int,
                    hist: tuple[np.ndarray, np.ndarray] | None) -> tuple[Tensor, Tensor]:
    """Full-protocol ranks from a dot-product scorer's parts (``SeqRecModel.score_parts``),
    each row scored against its candidates only: its target domain's items (all items for
    ``full-all``), never a [B, n_items + 1] matrix or mask.

    Rows of a domain are taken in blocks and its items in chunks of ``SCORE_CHUNK_CELLS``
    scores, so memory is bounded for any catalogue. A domain of up to 32k items is one chunk
    (blocks of 64 to 512 rows), each score computed once. A wider domain is scored twice: a
    first pass reads each row's target score from the chunk that holds it, a second counts the
    candidates scoring at least that; both passes compute every chunk with the same product
    (same shapes, same inputs), so the target is compared with the very values the counting
    sees. Rules as ``ranks_full``: rank = #(candidates scoring >= the target), the target
    counting itself (pessimistic ties); a NaN target score ranks last.
    ``hist`` (exclude_history): (row, item) pairs of the rows' histories, whose items leave
    the candidates unless they are the row's target.
    """
    B = len(target)
    dev = q.device
    ranks = torch.empty(B, dtype=torch.long, device=dev)
    n_cand = torch.empty(B, dtype=torch.long, device=dev)
    groups = [(torch.arange(B, device=dev), 1, n_items)] if all_domains else [
        ((tdom == d).nonzero()[:, 0], int(lo), int(hi)) for d, (lo, hi) in enumerate(ranges)]
    if hist is not None:
        rows_h, items_h = (torch.from_numpy(a).to(dev) for a in hist)
        keep = items_h != target[rows_h]
        key = torch.unique(rows_h[keep] * (n_items + 1) + items_h[keep])  # each (row, item) once
        rows_h, items_h = key // (n_items + 1), key % (n_items + 1)
    for rows, lo, hi in groups:
        V = hi - lo + 1
        block = min(ROW_BLOCK, SCORE_CHUNK_CELLS // V) if V * SINGLE_PASS_ROWS <= SCORE_CHUNK_CELLS else ROW_BLOCK
        for b0 in range(0, len(rows), block):
            r = rows[b0:b0 + block]
            n_r = len(r)
            qr, tr = q[r], target[r] - lo
            step = max(1, SCORE_CHUNK_CELLS // n_r)
            starts = list(range(0, V, step))

            def scores(a: int) -> Tensor:
                S = qr @ table[lo + a: lo + min(a + step, V)].T
                return S + bias[lo + a: lo + a + S.shape[1]] if bias is not None else S

            t = torch.empty(n_r, 1, dtype=q.dtype, device=dev)
            first = None
            for a in starts:  # pass 1: each row's target score, from the chunk holding it
                S = scores(a)
                here = (tr >= a) & (tr < a + S.shape[1])
                t[here] = S[here].gather(1, (tr[here] - a)[:, None])
                first = S if len(starts) == 1 else None
            if hist is not None:
                local = torch.full((B,), -1, dtype=torch.long, device=dev)
                local[r] = torch.arange(n_r, device=dev)
                sel = (local[rows_h] >= 0) & (items_h >= lo) & (items_h <= hi)
                hr, hc = local[rows_h[sel]], items_h[sel] - lo
            count = torch.zeros(n_r, dtype=torch.long, device=dev)
            n = torch.full((n_r,), V, dtype=torch.long, device=dev)
            for a in starts:  # pass 2: candidates scoring >= the target
                S = first if first is not None else scores(a)
                count += torch.ge(S, t).sum(1, dtype=torch.int32)
                if hist is not None:  # history items in this chunk leave the candidates
                    inc = (hc >= a) & (hc < a + S.shape[1])
                    beats = (S[hr[inc], hc[inc] - a] >= t[hr[inc], 0]).long()
                    count -= torch.zeros(n_r, dtype=torch.long, device=dev).index_add_(0, hr[inc], beats)
            if hist is not None:
                n -= torch.bincount(hr, minlength=n_r)
            ranks[r] = torch.where(torch.isnan(t[:, 0]), n, count)
            n_cand[r] = n
    return ranks, n_cand


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """(5, 10, 20, 50) -> ["1-5", "6-10", "11-20", "21-50", "51+"]."""
    lows = [1] + [e + 1 for e in edges]
    return [f"{lo}-{hi}" for lo, hi in zip(lows, edges)] + [f"{lows[-1]}+"]


def summarise(res: RankResult, domain_names: list[str], cfg: EvalConfig) -> dict:
    """{"protocol", "overall", "domains": {name: metrics}, "buckets": {label: metrics}}.

    AUC only for sampled protocols. Domains and buckets without targets are left out. A row
    with an empty history (not produced by leave-one-out) falls in an extra bucket "0".
    """
    auc = PROTOCOLS[res.protocol].sampled

    def m(sel: Tensor | None = None) -> dict[str, float]:
        if sel is None:
            return metrics_from_ranks(res.ranks, res.n_candidates, cfg.ks, auc)
        return metrics_from_ranks(res.ranks[sel], res.n_candidates[sel], cfg.ks, auc)

    domains = {}
    for d, name in enumerate(domain_names):
        sel = res.domain == d
        if bool(sel.any()):
            domains[name] = m(sel)
    # bucketize(right=False): index i such that edges[i-1] < h <= edges[i]
    which = torch.bucketize(res.hist_len, torch.tensor(cfg.buckets, dtype=res.hist_len.dtype))
    buckets = {}
    if bool((res.hist_len < 1).any()):
        buckets["0"] = m(res.hist_len < 1)
    for i, label in enumerate(bucket_labels(cfg.buckets)):
        sel = (which == i) & (res.hist_len >= 1)
        if bool(sel.any()):
            buckets[label] = m(sel)
    return {"protocol": res.protocol, "overall": m(), "domains": domains, "buckets": buckets}


AGGREGATES = ("overall", "sum", "mean")


def selection_value(summary: dict, metric: str, aggregate: str = "overall") -> float:
    """The number model selection maximises, from a :func:`summarise` result.

    - ``overall``: ``metric`` over all targets pooled (domains weighted by their target counts);
    - ``sum`` / ``mean``: the sum / mean of the per-domain values (every domain weighs the
      same whatever its size; ABXI selects on the sum of validation MRR over its two domains).
    A domain without targets in the split is absent from ``summary["domains"]`` and left out.
    """
    if aggregate == "overall":
        return float(summary["overall"][metric])
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; known: {list(AGGREGATES)}")
    vals = [float(v[metric]) for v in summary["domains"].values()]
    if not vals:
        raise ValueError("no domain has targets in this split")
    return sum(vals) if aggregate == "sum" else sum(vals) / len(vals)


def evaluate(model: nn.Module, data: SplitData, split: str, cfg: EvalConfig,
             device: str | torch.device = "cpu") -> dict[str, dict]:
    """protocol name -> :func:`summarise` of :func:`rank_targets`, for every ``cfg.protocols``."""
    return {p: summarise(rank_targets(model, data, split, p, cfg, device), data.domain_names, cfg)
            for p in cfg.protocols}
