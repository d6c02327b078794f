"""Ranks and metrics against hand-computed values (docs/protocols.md "Metrics")."""

from __future__ import annotations

import math

import pytest
import torch

from cdsr.evaluate.metrics import KS, metrics_from_ranks, ranks_full, ranks_sampled

NAN = float("nan")


def _all(b: int, v: int) -> torch.Tensor:
    return torch.ones(b, v, dtype=torch.bool)


def test_full_rank_counts_higher_and_ties_against_the_target():
    scores = torch.tensor([
        [9.0, 0.5, 0.9, 0.5, 0.5, 0.2],  # target col 1: one higher (0.9), two tied -> 1 + 1 + 2
        [9.0, 0.5, 0.1, 0.5, 0.5, 0.2],  # target col 1: tied with 2 others, none higher -> 3
        [9.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target col 5: best -> 1
        [9.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target col 1: worst of 5 -> 5
    ])
    allowed = _all(4, 6)
    allowed[:, 0] = False  # padding column scores 9 but is not a candidate
    ranks = ranks_full(scores, torch.tensor([1, 1, 5, 1]), allowed)
    assert ranks.tolist() == [4, 3, 1, 5]
    assert ranks.dtype == torch.long


def test_full_rank_ignores_columns_that_are_not_allowed():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    allowed = torch.tensor([[False, False, True, False, True, True]])  # candidates 2, 4, 5
    assert ranks_full(scores, torch.tensor([4]), allowed).tolist() == [2]  # only item 2 beats it


def test_constant_scores_get_the_worst_rank():
    v = 31
    allowed = _all(3, v)
    allowed[:, 0] = False
    ranks = ranks_full(torch.zeros(3, v), torch.tensor([1, 15, 30]), allowed)
    assert ranks.tolist() == [30, 30, 30]  # = number of candidates, never the best
    m = metrics_from_ranks(ranks, allowed.sum(1))
    assert m["HR@10"] == 0.0 and m["NDCG@10"] == 0.0 and m["HR@50"] == 1.0
    s = ranks_sampled(torch.ones(2, 101), torch.tensor([100, 40]))
    assert s.tolist() == [101, 41]
    assert metrics_from_ranks(s, 1 + torch.tensor([100, 40]), auc=True)["AUC"] == 0.0


def test_nan_scores_are_the_worst():
    scores = torch.tensor([
        [0.0, NAN, 0.1, 0.2, 0.3],  # NaN target -> worst rank among 4 candidates
        [0.0, 0.5, NAN, NAN, 0.1],  # NaN candidates never beat the target -> 1
        [0.0, 0.5, NAN, 0.5, 0.9],  # one higher, one tie, NaN ignored -> 3
    ])
    allowed = _all(3, 5)
    allowed[:, 0] = False
    assert ranks_full(scores, torch.tensor([1, 1, 1]), allowed).tolist() == [4, 1, 3]
    s = torch.tensor([[NAN, 0.1, 0.2, 7.0], [0.3, NAN, 0.3, 7.0]])
    assert ranks_sampled(s, torch.tensor([2, 2])).tolist() == [3, 2]


def test_target_must_be_a_candidate():
    allowed = _all(2, 4)
    allowed[1, 2] = False
    with pytest.raises(ValueError, match="not among their allowed candidates"):
        ranks_full(torch.rand(2, 4), torch.tensor([1, 2]), allowed)


def test_full_rank_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 25), generator=g).float()  # many ties
    allowed = torch.rand(40, 25, generator=g) < 0.6
    target = torch.randint(0, 25, (40,), generator=g)
    allowed[torch.arange(40), target] = True
    got = ranks_full(scores, target, allowed).tolist()
    for b in range(40):
        t = int(target[b])
        ref = 1 + sum(1 for c in range(25) if c != t and allowed[b, c] and scores[b, c] >= scores[b, t])
        assert got[b] == ref


def test_sampled_ranks_ignore_padding():
    scores = torch.tensor([
        [0.5, 0.1, 0.9, 0.5, 99.0, 99.0],  # 3 valid negatives (one higher, one tie), padding scores 99 -> 3
        [0.5, 0.1, 0.2, 99.0, 99.0, 99.0],  # 2 valid negatives, both below -> 1
        [0.5, 99.0, 99.0, 99.0, 99.0, 99.0],  # no negatives -> 1
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all 5 valid and tied -> 6
    ])
    ranks = ranks_sampled(scores, torch.tensor([3, 2, 0, 5]))
    assert ranks.tolist() == [3, 1, 1, 6]
    with pytest.raises(ValueError):
        ranks_sampled(scores, torch.tensor([3, 2, 0, 6]))  # more negatives than columns


def test_metric_values_by_hand():
    ranks = torch.tensor([1, 2, 3, 10, 11, 100, 101])
    n = len(ranks)
    m = metrics_from_ranks(ranks, torch.full((n,), 1000), ks=(1, 5, 10, 100))
    assert m["n"] == n
    assert m["HR@1"] == pytest.approx(1 / n)
    assert m["HR@5"] == pytest.approx(3 / n)
    assert m["HR@10"] == pytest.approx(4 / n)
    assert m["HR@100"] == pytest.approx(6 / n)
    g = {r: 1 / math.log2(r + 1) for r in (1, 2, 3, 10, 11, 100)}
    assert m["NDCG@1"] == pytest.approx(1 / n)
    assert m["NDCG@5"] == pytest.approx((g[1] + g[2] + g[3]) / n)
    assert m["NDCG@10"] == pytest.approx((g[1] + g[2] + g[3] + g[10]) / n)
    assert m["NDCG@100"] == pytest.approx((g[1] + g[2] + g[3] + g[10] + g[11] + g[100]) / n)
    assert m["MRR"] == pytest.approx(sum(1 / r for r in (1, 2, 3, 10, 11, 100, 101)) / n)  # no cut-off
    assert m["MRR@1"] == pytest.approx(1 / n)
    assert m["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 10) / n)
    assert m["MRR@100"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 100) / n)
    assert "AUC" not in m
    assert set(m) == {"n", "MRR"} | {f"{x}@{k}" for x in ("HR", "NDCG", "MRR") for k in (1, 5, 10, 100)}


def test_default_keys():
    m = metrics_from_ranks(torch.tensor([1, 7]), torch.tensor([10, 10]), auc=True)
    assert set(m) == {"n", "MRR", "AUC"} | {f"{x}@{k}" for x in ("HR", "NDCG", "MRR") for k in KS}
    assert KS == (1, 5, 10, 20, 50, 100)


def test_auc_formula():
    ranks = torch.tensor([1, 500, 1000, 3, 1])
    n_cand = torch.tensor([1000, 1000, 1000, 5, 1])  # the last row has no negatives: AUC 1
    per_row = [1.0, 1 - 499 / 999, 0.0, 1 - 2 / 4, 1.0]
    m = metrics_from_ranks(ranks, n_cand, auc=True)
    assert m["AUC"] == pytest.approx(sum(per_row) / 5)


def test_empty_input_gives_nan():
    m = metrics_from_ranks(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), auc=True)
    assert m["n"] == 0 and math.isnan(m["HR@10"]) and math.isnan(m["AUC"])
