"""The embedded synthetic dataset: deterministic, and its planted cross-domain structure
measurably helps prediction."""

from __future__ import annotations

import numpy as np
import torch
from helpers import make_cfg

from cdsr.data.build import build
from cdsr.data.config import SyntheticConfig
from cdsr.data.loaders import EvalDataset, SplitData
from cdsr.data.synthetic import write_raw


def test_generator_is_byte_identical_for_a_seed(tmp_path):
    cfg = SyntheticConfig(users=100, items_per_domain=80)
    write_raw(cfg, tmp_path / "a")
    write_raw(cfg, tmp_path / "b")
    write_raw(SyntheticConfig(users=100, items_per_domain=80, seed=8), tmp_path / "c")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    assert (tmp_path / "a" / "Books.csv").read_bytes() != (tmp_path / "c" / "Books.csv").read_bytes()


def _transition_scores(d: SplitData, b: dict, same_domain: bool) -> torch.Tensor:
    """Learning-free predictor: counts of item -> later item (lags 1..3, weight 1/lag) on the
    training prefixes, over the merged sequence or within each domain's subsequence."""
    V = d.n_items + 1
    idx = np.arange(len(d.items))
    user = np.searchsorted(d.offsets, idx, side="right") - 1
    train_end = d.offsets[user + 1] - 2
    C = torch.zeros(V, V)
    key = user * 1000 + (d.domains if same_domain else 0)
    order = np.lexsort((idx, key))
    sk = key[order]
    for lag in (1, 2, 3):
        prev = np.full(len(idx), -1)
        same_group = np.r_[np.zeros(lag, bool), sk[lag:] == sk[:-lag]]
        prev[order] = np.where(same_group, np.r_[np.full(lag, -1), order[:-lag]], -1)
        ok = (prev >= 0) & (idx < train_end)
        C.index_put_((torch.from_numpy(d.items[prev[ok]]), torch.from_numpy(d.items[idx[ok]])),
                     torch.full((int(ok.sum()),), 1.0 / lag), accumulate=True)
    eligible = b["mask"] & ((b["domains"] == b["target_domain"][:, None]) if same_domain else True)
    recency = eligible.flip(1).cumsum(1).flip(1)  # 1 = most recent eligible event
    scores = torch.zeros(len(b["target"]), V)
    for k in (1, 2, 3):
        h = (b["items"] * (eligible & (recency == k))).sum(1)
        scores += C[h] / k
    lo = torch.from_numpy(d.domain_ranges[b["target_domain"].numpy(), 0])
    hi = torch.from_numpy(d.domain_ranges[b["target_domain"].numpy(), 1])
    ar = torch.arange(V)[None]
    return scores.masked_fill((ar < lo[:, None]) | (ar > hi[:, None]), float("-inf"))


def _hr10(scores: torch.Tensor, target: torch.Tensor) -> float:
    s_t = scores.gather(1, target[:, None])
    rank = (scores > s_t).sum(1) + (scores == s_t).sum(1)  # ties count against the target
    return float((rank <= 10).float().mean())


def _merged_vs_single(tmp_path, **generator) -> tuple[float, float]:
    cfg = make_cfg(generator={"users": 1200, "items_per_domain": 600, "seed": 11, **generator},
                   sources=[{"format": "ratings-csv-2014", "path": "{data_root}/t/raw/*.csv"},
                            {"format": "amazon-review-json", "path": "{data_root}/t/raw/*.json.gz"}],
                   domains=["Books", "Movies_and_TV", "CDs_and_Vinyl"],
                   sequences={"filters": [{"min_user_domains": 2}, {"min_user_domain_events": 2}], "domains_required": "present"},
                   split={"negatives": {"sampled-100": 100}})
    build(cfg, tmp_path, log=lambda s: None)
    d = SplitData.load(tmp_path / "t" / "processed")
    ds = EvalDataset(d, "test", max_len=50)
    b = ds[list(range(len(ds)))]
    return (_hr10(_transition_scores(d, b, same_domain=False), b["target"]),
            _hr10(_transition_scores(d, b, same_domain=True), b["target"]))


def test_cross_domain_history_predicts_better(tmp_path):
    merged, single = _merged_vs_single(tmp_path)
    assert merged > single * 1.05, (merged, single)
    assert single > 0.05  # and the domain-specific signal is real too


def test_without_sticky_topics_the_advantage_disappears(tmp_path):
    """Control: with no cross-domain topic carry-over the merged history loses its edge."""
    merged, single = _merged_vs_single(tmp_path, stickiness=0.0)
    assert merged < single * 1.05, (merged, single)
