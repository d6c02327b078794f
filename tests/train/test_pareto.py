"""The preference-aware Pareto step: min-norm solvers against brute force, the ParetoMTL
sub-problem on hand-computed 2-D cases, and the strategy inside the shared loop."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from cdsr.config import from_dict
from cdsr.train import pareto
from cdsr.train.config import TrainConfig
from cdsr.train.strategy import STRATEGIES, StandardStrategy, select_strategy
from cdsr.train.pareto import (
    ParetoConfig,
    ParetoStrategy,
    min_norm_2,
    min_norm_element,
    min_norm_from_gram,
    pareto_ratio,
    pareto_weights,
)

NO_AMP = contextlib.nullcontext


# --------------------------------------------------------------------------------- min_norm_2


def _brute_2(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """(gamma, squared norm) of the best of 10001 evenly spaced gammas."""
    gam = torch.linspace(0, 1, 10001, dtype=torch.float64)[:, None]
    pts = gam * g1.double() + (1 - gam) * g2.double()
    sq = (pts * pts).sum(1)
    i = int(sq.argmin())
    return float(gam[i]), float(sq[i])


def _pairs():
    g = torch.Generator().manual_seed(0)
    out = [(torch.randn(7, generator=g), torch.randn(7, generator=g)) for _ in range(20)]
    v = torch.randn(7, generator=g)
    out += [(v, v.clone()),  # identical
            (v, 3 * v), (3 * v, v),  # parallel, different lengths
            (v, -v), (v, -0.25 * v),  # opposite
            (v, v + 1e-3 * torch.randn(7, generator=g)),  # nearly identical
            (torch.zeros(7), v)]  # one zero vector
    return out


@pytest.mark.parametrize("g1,g2", _pairs())
def test_min_norm_2_matches_brute_force(g1, g2):
    gamma, cost = min_norm_2(g1, g2)
    _, b_cost = _brute_2(g1, g2)
    assert 0.0 <= gamma <= 1.0
    assert cost <= b_cost + 1e-9  # never worse than the grid
    assert cost >= b_cost - 1e-6 * max(b_cost, 1.0) - 1e-6  # and the grid is within its spacing
    point = gamma * g1.double() + (1 - gamma) * g2.double()
    assert float(point @ point) == pytest.approx(cost, rel=1e-9, abs=1e-12)  # cost is the squared norm


def test_min_norm_2_closed_form_and_degenerate_cases():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    gamma, cost = min_norm_2(g1, g2)
    # interior: gamma = <g2 - g1, g2> / |g1 - g2|^2 = 4 / 5
    assert gamma == pytest.approx(4 / 5) and cost == pytest.approx((4 / 5) ** 2 + (2 / 5) ** 2)
    v = torch.tensor([1.0, -2.0, 0.5])
    assert min_norm_2(v, v) == pytest.approx((0.5, float(v @ v)))  # identical: any gamma, 0.5 returned
    assert min_norm_2(v, 3 * v) == pytest.approx((1.0, float(v @ v)))  # parallel: the shorter end, exactly
    assert min_norm_2(3 * v, v) == pytest.approx((0.0, float(v @ v)))
    gamma, cost = min_norm_2(v, -v)  # opposite: the origin halfway
    assert gamma == pytest.approx(0.5) and cost == pytest.approx(0.0, abs=1e-12)
    gamma, cost = min_norm_2(2 * v, -v)  # the origin at gamma = 1/3
    assert gamma == pytest.approx(1 / 3) and cost == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------- min_norm_element


def _simplex_grid(n: int, steps: int) -> torch.Tensor:
    pts = [c for c in itertools.product(range(steps + 1), repeat=n - 1) if sum(c) <= steps]
    w = torch.tensor(pts, dtype=torch.float64) / steps
    return torch.cat([w, 1 - w.sum(1, keepdim=True)], 1)


def _projected_gradient_min(gram: np.ndarray, iters: int = 3000) -> float:
    """An upper bound on the min norm: projected gradient descent on the simplex (scipy-free)."""
    def proj(y):
        u = np.sort(y)[::-1]
        css = np.cumsum(u)
        r = np.nonzero(u * np.arange(1, len(y) + 1) > css - 1)[0][-1]
        return np.maximum(y - (css[r] - 1) / (r + 1), 0.0)
    w = np.ones(len(gram)) / len(gram)
    lip = np.linalg.eigvalsh(gram).max() + 1e-12
    for _ in range(iters):
        w = proj(w - gram @ w / lip)
    return math.sqrt(max(w @ gram @ w, 0.0))


def _exhaustive_min(gram: np.ndarray) -> float:
    """The exact min norm: the best feasible affine minimiser over every face of the simplex."""
    n, best = len(gram), math.inf
    for k in range(1, n + 1):
        for face in itertools.combinations(range(n), k):
            f = list(face)
            kkt = np.block([[gram[np.ix_(f, f)], np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
            w = np.linalg.lstsq(kkt, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
            if w.min() >= -1e-12 and abs(w.sum() - 1) < 1e-9:
                best = min(best, math.sqrt(max(w @ gram[np.ix_(f, f)] @ w, 0.0)))
    return best


def _random_sets(n_sets: int, seed: int):
    rng = np.random.default_rng(seed)
    for k in range(n_sets):
        n, p = int(rng.integers(2, 6)), int(rng.integers(2, 12))
        v = rng.normal(size=(n, p)) * rng.uniform(0.1, 3.0, size=(n, 1))
        if k % 4 == 1:
            v[1] = v[0] * rng.uniform(-2, 2)  # a parallel / opposite pair
        if k % 4 == 2:
            v[-1] = v[0]  # a repeated vector
        yield torch.from_numpy(v)


def test_min_norm_element_n3_vs_simplex_grid():
    grid = _simplex_grid(3, 400)  # ~80k points, spacing 0.0025
    for v in _random_sets(40, 1):
        v = v[:3] if len(v) >= 3 else torch.cat([v, v[:1] * 0.5])
        w, norm = min_norm_element(v)
        assert w.shape == (3,) and (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
        assert float((w @ v).norm()) == pytest.approx(norm, abs=1e-9)  # the norm is that of the returned point
        brute = float((grid @ v).norm(dim=1).min())
        assert norm <= brute + 1e-4


def test_min_norm_element_2_to_5_vs_projected_gradient_and_exhaustive():
    for v in _random_sets(40, 2):
        w, norm = min_norm_element(list(v))  # a list of vectors works too
        assert (w >= 0).all() and float(w.sum()) == pytest.approx(1.0)
        gram = (v @ v.T).numpy()
        assert norm <= _projected_gradient_min(gram) + 1e-4
        assert norm <= _exhaustive_min(gram) + 1e-6
        w2, norm2 = min_norm_element(v)  # same from an [n, P] tensor
        assert torch.allclose(w, w2) and norm == pytest.approx(norm2)


def test_min_norm_element_origin_in_hull_and_single_vector():
    v = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])  # the origin is inside the triangle
    w, norm = min_norm_element(v)
    assert norm == pytest.approx(0.0, abs=1e-4)
    assert torch.allclose(w, torch.tensor([0.5, 0.25, 0.25], dtype=w.dtype), atol=1e-3)
    w, norm = min_norm_element(torch.tensor([[3.0, 4.0]]))
    assert w.tolist() == [1.0] and norm == pytest.approx(5.0)
    w, norm = min_norm_from_gram(np.array([[4.0, -4.0], [-4.0, 4.0]]))  # opposite pair: closed form
    assert w.tolist() == pytest.approx([0.5, 0.5]) and norm == pytest.approx(0.0)


# ---------------------------------------------------------------------- the Pareto sub-problem

E_CD, E_REC = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def _check_normalised(w_rec, w_cd):
    assert w_rec >= 0.0
    assert abs(w_rec) + abs(w_cd) == pytest.approx(1.0)


def test_pareto_no_active_constraint_is_mgda_on_normalised_gradients():
    # L_rec <= 0.414 L_cd: the loss vector lies in the reference sub-region: plain MGDA; with unit
    # gradients the min-norm point of the segment is the midpoint, whatever the angle
    for g_cd in (E_CD, torch.tensor([0.6, 0.8]), torch.tensor([-0.6, 0.8]), -E_REC):
        w_rec, w_cd = pareto_weights(5.0 * E_REC, 0.1 * g_cd, l_rec=0.1, l_cd=1.0)
        assert (w_rec, w_cd) == pytest.approx((0.5, 0.5))


def test_pareto_both_constraints_active_orthogonal_hand_computed():
    # L_rec > L_cd: G_0 and G_2 active. Vectors over (gh_cd, gh_rec): (1,0), (0,1), u_0-u_1 = (-1,1),
    # u_2-u_1 = (-0.2929, 0.7071). With orthonormal gradients their hull's min-norm point is on the
    # edge (1,0)-(-1,1): (1-2s, s), minimal at s = 0.4 -> w = (cd 0.2, rec 0.4) -> (1/3, 2/3).
    w_rec, w_cd = pareto_weights(3.0 * E_REC, 0.01 * E_CD, l_rec=8.0, l_cd=0.3)
    assert (w_rec, w_cd) == pytest.approx((2 / 3, 1 / 3), abs=1e-6)
    assert pareto_ratio(w_rec, w_cd, 10.0) == pytest.approx(0.5, abs=1e-5)


def test_pareto_only_g2_active_orthogonal_hand_computed():
    # L_cd >= L_rec > 0.414 L_cd: only G_2 active, diff = (-p, q) = (-0.2929, 0.7071). The min-norm
    # point is on the edge (1,0)-(-p,q): (1-(1+p)s, q s), s = (1+p)/((1+p)^2+q^2): ratio = q / (1+p).
    p, q = 1 - 0.7071, 0.7071
    w_rec, w_cd = pareto_weights(E_REC, E_CD, l_rec=0.6, l_cd=1.0)
    _check_normalised(w_rec, w_cd)
    assert w_cd / w_rec == pytest.approx(q / (1 + p), abs=1e-5)
    assert (w_rec, w_cd) == pytest.approx(((1 + p) / (1 + p + q), q / (1 + p + q)), abs=1e-5)


def test_pareto_conflicting_gradients_hand_computed():
    # cos(g_cd, g_rec) = -0.6, both constraints active. Points: v0 = (1,0), v1 = (-0.6,0.8),
    # v2 = v1 - v0 = (-1.6,0.8), v3 = 0.7071 v1 - 0.2929 v0. The closest edge is v0-v2:
    # (1-2.6t, 0.8t), t = 5.2/14.8 = 13/37 (v1, v3 lie beyond it). lambda_cd = 24/37, beta_0 = 13/37:
    # w = (cd 24/37 - 13/37, rec 13/37) = (11/37, 13/37) -> normalised (11/24, 13/24), ratio 11/13.
    g_cd, g_rec = torch.tensor([2.0, 0.0]), torch.tensor([-0.6, 0.8]) * 7
    w_rec, w_cd = pareto_weights(g_rec, g_cd, l_rec=8.0, l_cd=0.3)
    assert (w_rec, w_cd) == pytest.approx((13 / 24, 11 / 24), abs=1e-6)
    # gradient scales do not matter (normalised), loss scales only through the active set
    assert pareto_weights(g_rec * 1e-3, g_cd * 50, l_rec=80.0, l_cd=3.0) == pytest.approx((w_rec, w_cd), abs=1e-6)


def test_pareto_equal_and_opposite_gradients_finite():
    g = torch.tensor([0.3, -1.2, 2.0])
    for l_rec, l_cd in ((8.0, 0.3), (0.6, 1.0), (0.1, 1.0)):
        for g_cd in (g, 2 * g, -g):
            w_rec, w_cd = pareto_weights(g, g_cd, l_rec=l_rec, l_cd=l_cd)
            _check_normalised(w_rec, w_cd)
            r = pareto_ratio(w_rec, w_cd, 10.0)
            assert math.isfinite(r) and 0.0 <= r <= 10.0
    # identical gradients, constraints inactive: MGDA's tie -> the midpoint, ratio 1
    assert pareto_ratio(*pareto_weights(g, g, l_rec=0.1, l_cd=1.0), 10.0) == pytest.approx(1.0)
    # identical gradients, L_rec > L_cd: grad G_0 = gh_rec - gh_cd = 0 is the min-norm element:
    # w = u_0 - u_1 = (cd -1, rec 1) -> ratio clamped to 0
    assert pareto_weights(g, g, l_rec=8.0, l_cd=0.3) == pytest.approx((0.5, -0.5))
    assert pareto_ratio(0.5, -0.5, 10.0) == 0.0
    # zero / non-finite gradients: the recommendation step alone
    assert pareto_weights(g, torch.zeros(3), 1.0, 1.0) == (1.0, 0.0)
    assert pareto_weights(torch.zeros(3), g, 1.0, 1.0) == (1.0, 0.0)
    assert pareto_weights(g, torch.tensor([float("nan"), 0.0, 1.0]), 1.0, 1.0) == (1.0, 0.0)


def test_pareto_weights_random_are_normalised():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        g_rec, g_cd = torch.randn(20, generator=gen), torch.randn(20, generator=gen)
        l_rec, l_cd = float(torch.rand(1, generator=gen)) * 5, float(torch.rand(1, generator=gen))
        w_rec, w_cd = pareto_weights(g_rec, g_cd, l_rec, l_cd)
        _check_normalised(w_rec, w_cd)


def test_pareto_ratio_guards():
    assert pareto_ratio(0.5, 0.5, 10.0) == 1.0
    assert pareto_ratio(0.0, 1.0, 10.0) == 10.0  # w_rec ~ 0
    assert pareto_ratio(0.01, 0.99, 10.0) == 10.0  # clamped
    assert pareto_ratio(0.7, -0.3, 10.0) == 0.0  # negative
    assert pareto_ratio(float("nan"), 0.3, 10.0) == 0.0


# ----------------------------------------------------------------------------------- strategy


class FakeModel(nn.Module):
    """An embedding table and two shared Linear layers; two quadratic objectives from one forward."""

    train_strategy = "pareto"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.lin1, self.lin2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.forwards = 0

    def shared_parameters(self):
        return [*self.lin1.parameters(), *self.lin2.parameters()]

    def aux_objectives(self, batch):
        self.forwards += 1
        h = self.lin2(torch.tanh(self.lin1(self.emb(batch["items"]))))
        rec = ((h - torch.tensor([1.0, -1.0, 0.5])) ** 2).mean()
        cd = (h[..., :2] ** 2).mean()
        return {"rec": rec, "cd": cd, "extra": cd.detach() * 2}


def _batch():
    return {"items": torch.tensor([[1, 2, 3], [4, 5, 6]])}


def _cfg(**pareto_kw):
    return TrainConfig(grad_clip=0.0, pareto=ParetoConfig(**pareto_kw))


def test_strategy_step_matches_the_total_loss_gradient():
    model = FakeModel()
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strat = ParetoStrategy()
    seen = {}
    real = pareto.pareto_weights

    def spy(g_rec, g_cd, *a, **k):
        seen["sizes"] = (g_rec.numel(), g_cd.numel())
        return real(g_rec, g_cd, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pareto, "pareto_weights", spy)
        stats = strat.step(model, _batch(), opt, _cfg(), NO_AMP)
    n_shared = sum(p.numel() for p in model.shared_parameters())
    assert seen["sizes"] == (n_shared, n_shared)  # the solver sees the shared parameters only
    ratio = stats["pareto_ratio"]
    assert 0.0 <= ratio <= 10.0 and ratio == strat.ratio and model.forwards == 1  # one forward
    # the update is the gradient of rec + ratio * cd on every parameter, the embedding included
    out = before.aux_objectives(_batch())
    total = out["rec"] + ratio * out["cd"]
    ref = torch.autograd.grad(total, list(before.parameters()))
    for (name, p), g, p0 in zip(model.named_parameters(), ref, before.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-6), name
        assert torch.allclose(p.data, p0.data - 0.1 * g, atol=1e-6), name
    assert not torch.equal(model.emb.weight, before.emb.weight)
    assert stats["loss"] == pytest.approx(float(total.detach()), rel=1e-6)
    assert stats["rec"] == pytest.approx(out["rec"].item()) and stats["cd"] == pytest.approx(out["cd"].item())
    assert "extra" in stats


def test_strategy_every_k_solves_on_steps_0_3_6_and_reuses_the_ratio(monkeypatch):
    calls = []
    real = pareto.pareto_weights
    strat = ParetoStrategy()

    def counting(*a, **k):
        calls.append(strat.n_steps)
        return real(*a, **k)

    monkeypatch.setattr(pareto, "pareto_weights", counting)
    model = FakeModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cfg = _cfg(every_k=3)
    ratios = []
    for _ in range(8):
        snapshot = copy.deepcopy(model)
        stats = strat.step(model, _batch(), opt, cfg, NO_AMP)
        ratios.append(stats["pareto_ratio"])
        assert 0.0 <= stats["pareto_ratio"] <= cfg.pareto.max_ratio
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), snapshot.parameters()))
    assert calls == [0, 3, 6] and strat.n_solves == 3 and model.forwards == 8
    assert ratios[1] == ratios[2] == ratios[0] and ratios[4] == ratios[5] == ratios[3]


def test_strategy_clip_and_max_ratio(monkeypatch):
    monkeypatch.setattr(pareto, "pareto_weights", lambda *a, **k: (0.0, 1.0))  # w_rec = 0
    model = FakeModel()
    stats = ParetoStrategy().step(model, _batch(), torch.optim.SGD(model.parameters(), lr=0.1),
                                  TrainConfig(grad_clip=1e-3, pareto=ParetoConfig(max_ratio=4.0)), NO_AMP)
    assert stats["pareto_ratio"] == 4.0
    total_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(total_norm) <= 1e-3 + 1e-6


def test_select_strategy_order():
    cfg = TrainConfig()
    assert isinstance(select_strategy(FakeModel(), cfg), ParetoStrategy)  # the model's choice
    explicit = StandardStrategy()
    assert select_strategy(FakeModel(), cfg, explicit) is explicit  # the argument wins
    plain = nn.Linear(1, 1)  # no train_strategy attribute: cfg.strategy
    assert isinstance(select_strategy(plain, cfg), StandardStrategy)
    assert isinstance(select_strategy(plain, TrainConfig(strategy="pareto")), ParetoStrategy)
    plain.train_strategy = None
    assert isinstance(select_strategy(plain, TrainConfig(strategy="pareto")), ParetoStrategy)
    plain.train_strategy = "nope"
    with pytest.raises(ValueError, match="nope"):
        select_strategy(plain, cfg)
    assert STRATEGIES["pareto"] is ParetoStrategy


def test_train_pareto_config_from_params():
    cfg = from_dict(TrainConfig, {"strategy": "standard", "pareto": {"every_k": 4, "max_ratio": 3}}, "train")
    assert cfg.pareto == ParetoConfig(every_k=4, max_ratio=3.0)
    assert from_dict(TrainConfig, {}, "train").pareto == ParetoConfig()


def _tiny_split():
    """An in-memory SplitData: 48 users x 8 events over two domains of 10 items (ids 1-10, 11-20)."""
    import polars as pl

    from cdsr.data.loaders import SplitData

    rng = np.random.default_rng(0)
    n_users, n_ev = 48, 8
    doms = rng.integers(0, 2, size=(n_users, n_ev))
    items = doms * 10 + rng.integers(1, 11, size=(n_users, n_ev))
    rows = [(u, split, n_ev - k, int(items[u, n_ev - k]), int(doms[u, n_ev - k]))
            for u in range(n_users) for split, k in (("valid", 2), ("test", 1))]
    targets = pl.DataFrame(rows, schema=["user_idx", "split", "pos", "item_idx", "domain_idx"], orient="row")
    return SplitData(items=items.reshape(-1).astype(np.int64), domains=doms.reshape(-1).astype(np.int64),
                     timestamps=np.arange(n_users * n_ev, dtype=np.int64),
                     offsets=np.arange(0, n_users * n_ev + 1, n_ev, dtype=np.int64), targets=targets, negatives=None,
                     domain_ranges=np.array([[1, 10], [11, 20]]), domain_names=["A", "B"])


def test_fit_uses_the_models_pareto_strategy(tmp_path, monkeypatch):
    """End to end through ``fit``: a SASRec with a stand-in auxiliary objective picks ``pareto``."""
    from cdsr.evaluate.protocols import EvalConfig
    from cdsr.models.base import Vocab
    from cdsr.models.sasrec import SASRec, SASRecConfig
    from cdsr.train.loop import fit

    class ParetoSASRec(SASRec):
        train_strategy = "pareto"

        def shared_parameters(self):
            return list(self.encoder.parameters())

        def aux_objectives(self, batch):
            h, _ = self.encode(batch)
            valid = batch["mask"] & (batch["targets"] > 0)
            rec = self._rec_loss(h[valid], batch["targets"][valid], batch["target_domains"][valid])
            return {"rec": rec, "cd": (h[valid] ** 2).mean() * 1e-2}  # stand-in for the attention mass

    steps = []
    real_step = ParetoStrategy.step
    monkeypatch.setattr(ParetoStrategy, "step", lambda self, *a: steps.append(self.n_solves) or real_step(self, *a))
    data = _tiny_split()
    torch.manual_seed(0)
    model = ParetoSASRec(SASRecConfig(d=16, layers=1, heads=2, max_len=10),
                         Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, device="cpu", pareto=ParetoConfig(every_k=2))
    res = fit(model, data, cfg, seed=0, run_dir=tmp_path, eval_cfg=EvalConfig(protocols=["full"], max_len=10))
    assert res.epochs_run == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    assert len(steps) == 6 and steps == [0, 1, 1, 2, 2, 3]  # 3 batches per epoch; solves on steps 0, 2, 4


def _fit_autocdsr(data, run_dir, stop_at=None):
    from cdsr.evaluate.protocols import EvalConfig
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.train.loop import TrainingInterrupted, fit

    torch.manual_seed(3)
    model = build_model("autocdsr_sasrec", model_config("autocdsr_sasrec", {"d": 16, "layers": 1, "heads": 2,
                                                                           "max_len": 10}, "merged"),
                        Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, device="cpu", checkpoint_every_steps=2,
                      pareto=ParetoConfig(every_k=3))

    def on_step(step):
        if stop_at is not None and step == stop_at:
            raise TrainingInterrupted("simulated kill")

    fit(model, data, cfg, seed=3, run_dir=run_dir, eval_cfg=EvalConfig(protocols=["full"], max_len=10), on_step=on_step)
    return model


def test_resume_with_every_k_replays_the_uninterrupted_run(tmp_path):
    """The strategy's step counter and ratio are in the checkpoint: a run killed mid-epoch, between
    two solve steps, and resumed solves on the same steps and ends with the same parameters; the
    per-step log (steps.csv) holds each step exactly once."""
    import csv

    from cdsr.train.loop import TrainingInterrupted

    data = _tiny_split()  # 48 users, batch 8: 6 steps per epoch
    ref = _fit_autocdsr(data, tmp_path / "ref")
    with pytest.raises(TrainingInterrupted):
        _fit_autocdsr(data, tmp_path / "run", stop_at=9)  # step 9: after the checkpoint at step 8 (epoch 1, step 2)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["strategy"]["n_steps"] == 8 and ck["strategy"]["n_solves"] == 3  # solves on steps 0, 3, 6
    model = _fit_autocdsr(data, tmp_path / "run")
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    rows = [list(csv.DictReader((tmp_path / d / "steps.csv").open())) for d in ("ref", "run")]
    assert [r["step"] for r in rows[1]] == [str(i) for i in range(1, 13)]
    assert rows[0] == rows[1]
    assert [float(r["pareto_solved"]) for r in rows[0]] == [1.0 if i % 3 == 0 else 0.0 for i in range(12)]
    for r in rows[0]:
        ratio = float(r["pareto_ratio"])
        assert 0.0 <= ratio <= ParetoConfig().max_ratio and math.isfinite(float(r["pareto_w_cd"]))
