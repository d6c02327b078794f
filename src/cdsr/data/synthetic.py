"""The embedded default dataset: seeded synthetic raw files in Amazon formats.

Planted structure (so that cross-domain information measurably helps):
- T topics exist in every domain; each item belongs to one topic; inside a (domain, topic) the
  item popularity is Zipf(a).
- Each user has a *shared* topic preference (used in every domain) mixed with a
  *domain-specific* one: p_d = w * theta_shared + (1 - w) * theta_d.
- Topics are sticky across domains: with probability ``stickiness`` an event keeps the topic of
  the user's previous event, whatever its domain, so a user's recent Books events predict the
  next Movies event. A single-domain model sees only part of that chain.
- Noise: a fraction of events are uniform random items; a few malformed raw rows and exact
  duplicates are written too, and must end in quarantine / duplicates, not in the data.

Output: one raw file per domain. The first domains are ratings-only CSV (2014 layout:
``user,item,rating,timestamp``, headerless), the last one review JSON lines (gzipped), so the
default pipeline exercises both readers. Timestamps are day-granular unix seconds, as in Amazon
data, so same-day ties occur.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import numpy as np

from cdsr.data.config import SyntheticConfig


def _item_ids(d: int, n: int) -> np.ndarray:
    return np.array([f"B{d:01d}S{i:07d}" for i in range(n)])


def generate_events(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Arrays (user, domain, item, rating, timestamp) of the clean events, time-ordered per user."""
    rng = np.random.default_rng(cfg.seed)
    U, D, V, T = cfg.users, len(cfg.domains), cfg.items_per_domain, cfg.topics
    item_topic = rng.integers(0, T, size=(D, V))
    # Zipf popularity: a random rank per item inside its domain
    ranks = np.argsort(rng.random((D, V)), axis=1).argsort(axis=1) + 1
    weight = 1.0 / ranks.astype(float) ** cfg.zipf_a
    # one CDF per (domain, topic), laid end to end: pair p occupies [p, p + 1)
    pair = item_topic + np.arange(D)[:, None] * T  # [D, V]
    order = np.argsort(pair.ravel(), kind="stable")
    pair_sorted = pair.ravel()[order]
    w_sorted = weight.ravel()[order]
    cum = np.cumsum(w_sorted)
    starts = np.searchsorted(pair_sorted, np.arange(D * T))
    ends = np.searchsorted(pair_sorted, np.arange(D * T), side="right")
    base = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    total = cum[np.maximum(ends - 1, 0)] - base
    total[ends == starts] = 1.0  # empty (domain, topic) pair: never drawn below
    cdf = (cum - base[pair_sorted]) / total[pair_sorted] + pair_sorted  # in (p, p + 1]

    theta_s = rng.dirichlet(np.full(T, 0.3), size=U)  # [U, T]
    theta_d = rng.dirichlet(np.full(T, 0.3), size=(U, D))  # [U, D, T]
    pref = cfg.shared_weight * theta_s[:, None, :] + (1 - cfg.shared_weight) * theta_d
    active = rng.random((U, D)) >= cfg.domain_skip_prob
    dom_w = rng.dirichlet(np.full(D, 1.0), size=U) * active
    none = dom_w.sum(1) == 0
    dom_w[none, rng.integers(0, D, none.sum())] = 1.0
    dom_w /= dom_w.sum(1, keepdims=True)
    lo, hi = cfg.events_per_user
    n_ev = rng.integers(lo, hi + 1, size=U)
    L = int(n_ev.max())

    dom = np.zeros((U, L), dtype=np.int64)
    item = np.zeros((U, L), dtype=np.int64)
    topic_prev = np.argmax(rng.random((U, T)) * theta_s, axis=1)
    for t in range(L):  # loop over positions; every step is vectorised over users
        d = (rng.random(U)[:, None] > np.cumsum(dom_w, 1)).sum(1).clip(0, D - 1)
        p = pref[np.arange(U), d]  # [U, T]
        fresh = (rng.random(U)[:, None] > np.cumsum(p, 1)).sum(1).clip(0, T - 1)
        # an empty (domain, topic) pair falls back to a fresh draw
        topic = np.where(rng.random(U) < cfg.stickiness, topic_prev, fresh)
        pid = d * T + topic
        empty = ends[pid] == starts[pid]
        topic = np.where(empty, fresh, topic)
        pid = d * T + topic
        pos = np.searchsorted(cdf, pid + rng.random(U) * (1 - 1e-12) + 1e-12)
        pos = np.clip(pos, starts[pid], ends[pid] - 1)
        it = order[pos] % V
        noisy = rng.random(U) < cfg.noise
        it = np.where(noisy, rng.integers(0, V, U), it)
        dom[:, t], item[:, t] = d, it
        topic_prev = topic
    valid = np.arange(L)[None, :] < n_ev[:, None]
    start = dt.datetime.fromisoformat(cfg.start).replace(tzinfo=dt.timezone.utc).timestamp()
    day0 = start // 86400 + rng.integers(0, 3 * 365, size=U)
    gaps = np.floor(rng.exponential(cfg.mean_gap_days, size=(U, L))).astype(np.int64)
    gaps[:, 0] = 0
    days = day0[:, None] + np.cumsum(gaps, axis=1)
    fav = pref[np.arange(U)[:, None], dom, item_topic[dom, item]]
    rating = np.clip(np.round(3 + 4 * fav + rng.normal(0, 0.8, (U, L))), 1, 5)
    users = np.broadcast_to(np.arange(U)[:, None], (U, L))
    return {
        "user": users[valid], "domain": dom[valid], "item": item[valid],
        "rating": rating[valid], "timestamp": (days[valid] * 86400).astype(np.int64),
    }


def write_raw(cfg: SyntheticConfig, out_dir: Path) -> dict:
    """Write the raw files into ``out_dir`` and return a manifest of what was planted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.csv")) + list(out_dir.glob("*.json.gz")):
        old.unlink()
    ev = generate_events(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    user_ids = np.array([f"A{u:011d}SYN" for u in range(cfg.users)])
    manifest = {"files": {}, "malformed_rows": 0, "duplicate_rows": 0, "events": int(len(ev["user"]))}
    D = len(cfg.domains)
    for d, name in enumerate(cfg.domains):
        m = ev["domain"] == d
        items = _item_ids(d, cfg.items_per_domain)[ev["item"][m]]
        users = user_ids[ev["user"][m]]
        ts, rating = ev["timestamp"][m], ev["rating"][m]
        srt = np.lexsort((ts, users, items))  # raw dumps come grouped by item
        items, users, ts, rating = items[srt], users[srt], ts[srt], rating[srt]
        n_dup = cfg.duplicate_rows // D + (1 if d < cfg.duplicate_rows % D else 0)
        dup_idx = np.sort(rng.choice(len(items), size=min(n_dup, len(items)), replace=False))
        as_json = d == D - 1 and D > 1
        if as_json:
            lines = [json.dumps({"overall": float(r), "verified": True, "reviewerID": u, "asin": i,
                                 "reviewText": "synthetic review", "summary": "synthetic",
                                 "unixReviewTime": int(t)}) for i, u, t, r in zip(items, users, ts, rating)]
            bad = ['{"reviewerID": "A0BAD", "asin": "B9BAD", "unixReviewTime": ', '{"asin": "B9X", "unixReviewTime": 1500000000}',
                   '{"reviewerID": "A0BAD", "asin": "B9Y", "unixReviewTime": "yesterday"}', 'not json at all']
        else:
            lines = [f"{u},{i},{r:.1f},{t}" for i, u, t, r in zip(items, users, ts, rating)]
            bad = ["A0BAD,,5.0,1500000000", "A0BAD,B9Z,5.0,notatime", ",B9Z,4.0,1500000000", "A0BAD,B9W,3.0,-5",
                   "garbage line", "A0BAD,B9V,4.0,99999999999999"]
        for j in dup_idx[::-1]:
            lines.insert(int(j) + 1, lines[int(j)])
        n_bad = cfg.malformed_rows // D + (1 if d < cfg.malformed_rows % D else 0)
        for k in range(n_bad):
            lines.insert(int(rng.integers(0, len(lines) + 1)), bad[k % len(bad)])
        path = out_dir / (f"{name}.json.gz" if as_json else f"{name}.csv")
        text = ("\n".join(lines) + "\n").encode()
        if as_json:
            with gzip.GzipFile(path, "wb", mtime=0) as fh:  # mtime=0: byte-identical reruns
                fh.write(text)
        else:
            path.write_bytes(text)
        manifest["files"][path.name] = {"rows": len(lines), "malformed": n_bad, "duplicates": int(len(dup_idx))}
        manifest["malformed_rows"] += n_bad
        manifest["duplicate_rows"] += int(len(dup_idx))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
