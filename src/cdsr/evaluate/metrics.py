"""Ranks of the target among its candidates, and the ranking metrics computed from them
(docs/protocols.md "Protocols", "Tie handling" and "Metrics").

Tie rule (pessimistic): rank = 1 + #(candidates scoring strictly higher) + #(other candidates
scoring exactly equal). A constant-score model therefore gets the *worst* rank (the number of
candidates), never the best; a model cannot gain from emitting ties.

NaN rule: a NaN target score is the worst possible (rank = number of candidates); a NaN
candidate score is never above the target (it cannot beat anything). Comparisons with NaN are
False in IEEE arithmetic, which gives the second rule for free; the first is forced explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

KS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)


def ranks_full(scores: Tensor, target: Tensor, allowed: Tensor) -> Tensor:
    """Rank of each row's target among the row's allowed columns.

    scores  [B, V1] float, column = item id
    target  [B]     long, the target's column; must be allowed in its row
    allowed [B, V1] bool, the candidate set (the target included)
    returns [B]     long, 1 = best, ``allowed.sum(1)`` = worst
    """
    if scores.shape != allowed.shape or target.shape != scores.shape[:1]:
        raise ValueError(f"shape mismatch: scores {tuple(scores.shape)}, target {tuple(target.shape)}, "
                         f"allowed {tuple(allowed.shape)}")
    tgt = target.long()[:, None]
    if not bool(allowed.gather(1, tgt).all()):
        bad = (~allowed.gather(1, tgt)[:, 0]).nonzero()[:, 0]
        raise ValueError(f"{len(bad)} targets are not among their allowed candidates (e.g. row {int(bad[0])}, "
                         f"item {int(target[bad[0]])})")
    t = scores.gather(1, tgt)  # [B, 1]
    # ">=" counts both the strictly-higher and the tied candidates (pessimistic ties); the
    # target's own column always ties with itself and is taken out by index, not by value.
    beats = torch.ge(scores, t).logical_and_(allowed)
    beats.scatter_(1, tgt, False)
    # an int32 accumulator halves the cost of a bool row sum on the CPU (int64 is the default)
    rank = 1 + beats.sum(1, dtype=torch.int32).long()
    nan = torch.isnan(t[:, 0])
    if bool(nan.any()):
        rank = torch.where(nan, allowed.sum(1, dtype=torch.int32).long(), rank)
    return rank


def ranks_sampled(scores: Tensor, n_valid: Tensor, ties: str = "pessimistic") -> Tensor:
    """Rank of the target (column 0) among itself and its sampled negatives.

    ``ties``: ``pessimistic`` (a negative scoring equal to the target ranks above it: cdsr's
    rule everywhere) or ``optimistic`` (below it: ABXI's ``(neg > target).sum() + 1``); only the
    tie analysis (:mod:`cdsr.evaluate.ties`) uses the latter.

    scores  [B, 1 + K] float: column 0 the target, columns 1..n_valid[b] its negatives, later
                       columns padding (ignored whatever their score)
    n_valid [B]        long, number of real negatives per row (0..K)
    returns [B]        long, 1 = best, 1 + n_valid = worst
    """
    if scores.dim() != 2 or n_valid.shape != scores.shape[:1]:
        raise ValueError(f"shape mismatch: scores {tuple(scores.shape)}, n_valid {tuple(n_valid.shape)}")
    k = scores.shape[1] - 1
    n_valid = n_valid.long()
    if bool((n_valid < 0).any()) or bool((n_valid > k).any()):
        raise ValueError(f"n_valid must lie in [0, {k}]")
    t = scores[:, :1]
    valid = torch.arange(k, device=scores.device)[None, :] < n_valid[:, None]  # [B, K]
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be pessimistic or optimistic, not {ties!r}")
    beats = scores[:, 1:] >= t if ties == "pessimistic" else scores[:, 1:] > t
    rank = 1 + (beats & valid).sum(1)
    return torch.where(torch.isnan(t[:, 0]), 1 + n_valid, rank)


def metrics_from_ranks(ranks: Tensor, n_candidates: Tensor, ks: tuple[int, ...] = KS,
                       auc: bool = False) -> dict[str, float]:
    """Means over rows of HR@k, NDCG@k, MRR@k (k in ``ks``), MRR and optionally AUC.

    ranks        [N] long, 1-based rank of the target
    n_candidates [N] long, number of candidates including the target (so n_candidates - 1
                 negatives); only AUC uses it
    Returns {"n": N, "HR@k": ..., "NDCG@k": ..., "MRR@k": ..., "MRR": ..., ["AUC": ...]}; MRR@k
    counts 1 / rank only when rank <= k (DPG-Diff's MRR@10), MRR has no cut-off. With a single
    relevant item the ideal DCG is 1, so NDCG@k = 1 / log2(rank + 1) when rank <= k, else 0.
    AUC = 1 - (rank - 1) / (n_candidates - 1): the fraction of negatives ranked below the
    target; a row without negatives counts as AUC 1 (nothing was ranked above the target).
    An empty input gives n = 0 and NaN metrics.
    """
    r = ranks.detach().to("cpu", torch.float64).reshape(-1)
    n = int(r.numel())
    out: dict[str, float] = {"n": n}
    if n == 0:
        for k in ks:
            out[f"HR@{k}"] = out[f"NDCG@{k}"] = out[f"MRR@{k}"] = float("nan")
        out["MRR"] = float("nan")
        if auc:
            out["AUC"] = float("nan")
        return out
    if bool((r < 1).any()):
        raise ValueError("ranks are 1-based")
    gain = 1.0 / torch.log2(r + 1.0)
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, gain, torch.zeros_like(gain)).mean())
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / r, torch.zeros_like(r)).mean())
    out["MRR"] = float((1.0 / r).mean())
    if auc:
        c = n_candidates.detach().to("cpu", torch.float64).reshape(-1)
        if c.shape != r.shape:
            raise ValueError(f"n_candidates has {c.numel()} rows, ranks {n}")
        if bool((r > c).any()):
            raise ValueError("a rank exceeds its number of candidates")
        out["AUC"] = float((1.0 - (r - 1.0) / (c - 1.0).clamp(min=1.0)).mean())
    return out
