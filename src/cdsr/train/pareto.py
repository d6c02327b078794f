"""AutoCDSR's preference-aware Pareto step as an optimisation strategy of the shared loop.

docs/methods.md "AutoCDSR and AutoCDSR+"; seed 000 (Eq. 12); MGDA (Sener & Koltun 2018) and
ParetoMTL (Lin et al. 2019). Written from the papers; no reference code is copied.

Pieces:

- :func:`min_norm_2`: closed-form min-norm point of the segment ``[g2, g1]``.
- :func:`min_norm_element`: Frank-Wolfe min-norm element of the convex hull of n vectors (MGDA).
- :func:`pareto_weights`: the preference-aware ParetoMTL sub-problem for the two objectives
  (recommendation loss, cross-domain attention mass) -> loss weights ``(w_rec, w_cd)``.
- :class:`ParetoStrategy`: the ``Strategy`` the training loop calls; the model provides
  ``aux_objectives(batch) -> {"rec", "cd", ...}`` (one forward) and ``shared_parameters()``.

All solvers work on the Gram matrix of the gradients: the P-dimensional work is three dot
products per solve, the rest is an n x n problem (n <= 4) on the CPU in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdsr.train.config import ParetoConfig, TrainConfig
from cdsr.train.distributed import NO_SYNC, GradSync

if TYPE_CHECKING:  # pragma: no cover
    import contextlib

# Preference vectors in the loss space, coordinates ordered (L_cd, L_rec) (the order of the
# reference implementation; the set is symmetric, so it reads the same in (L_rec, L_cd) order).
PREF_VECS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (1.0, 0.0), (0.7071, 0.7071))
# The reference preference u_r = (L_cd: 1, L_rec: 0): its ParetoMTL sub-region is the cone of loss
# vectors closest in angle to the L_cd axis, i.e. solutions whose *recommendation* loss is small
# relative to L_cd: the rec-favouring preference.
REF_PREF = 1

_EPS = 1e-12


# ----------------------------------------------------------------------------- min-norm solvers


def _min_norm_2_dots(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """min_{gamma in [0,1]} |gamma x1 + (1-gamma) x2|^2 from v11=<x1,x1>, v12=<x1,x2>, v22=<x2,x2>."""
    denom = v11 + v22 - 2.0 * v12  # = |x1 - x2|^2 >= 0
    if denom <= 1e-12 * max(v11 + v22, _EPS):  # x1 == x2 (up to rounding): every gamma is optimal
        gamma = 0.5
    else:
        gamma = min(max((v22 - v12) / denom, 0.0), 1.0)
    cost = gamma * gamma * denom + 2.0 * gamma * (v12 - v22) + v22
    return gamma, max(cost, 0.0)


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1)


def min_norm_2(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """Closed-form min-norm point of the segment between two vectors.

    Returns ``(gamma, cost)`` with ``gamma`` in [0, 1] minimising ``|gamma g1 + (1 - gamma) g2|``
    and ``cost`` the *squared* norm there. Interior solution:
    ``gamma = <g2 - g1, g2> / |g1 - g2|^2``, clamped to [0, 1] (so when one vector's projection
    onto the other lies beyond it, e.g. parallel vectors of different lengths, the shorter end
    is returned exactly; NOTE: the MGDA reference clips to 0.001 / 0.999 instead). Identical
    vectors: every gamma is optimal, 0.5 is returned. Opposite vectors: the origin, cost 0.
    """
    a, b = _flat(g1).double(), _flat(g2).double()
    dots = torch.stack([a @ a, a @ b, b @ b]).tolist()
    return _min_norm_2_dots(*dots)


def min_norm_from_gram(gram: np.ndarray | torch.Tensor, max_iter: int = 250,
                       tol: float = 1e-5) -> tuple[np.ndarray, float]:
    """Min-norm element of the convex hull of vectors given by their Gram matrix.

    Frank-Wolfe (MGDA, Sener & Koltun 2018, Alg. 2): start from the best pair (closed form over
    every pair: optimal for n = 2), then repeatedly move toward the vertex ``s = argmin (G w)_s``
    with an exact line search; stop when the weights change by less than ``tol`` (L1), the
    Frank-Wolfe duality gap is 0, or after ``max_iter`` iterations. Returns ``(weights [n], norm)``.

    NOTE: with *away steps* (Lacoste-Julien & Jaggi 2015: when moving weight off the worst vertex
    of the support, ``argmax (G w)`` there, reduces the objective faster than the FW step, take
    that step instead). Plain FW, as in the MGDA reference, converges sublinearly when the
    optimum lies inside a face and stops up to ~1e-2 above the minimum norm within 250
    iterations on random sets of 3-5 vectors; away steps help but still zig-zag on ill-conditioned
    sets (up to ~4e-2 above the minimum), so the result is finished exactly by Wolfe's
    min-norm-point cycles (:func:`_polish`, a few n x n solves; kept only if not worse).
    """
    g = np.asarray(gram.detach().cpu().double().numpy() if isinstance(gram, torch.Tensor) else gram,
                   dtype=np.float64)
    n = g.shape[0]
    if n == 0:
        raise ValueError("min-norm element of an empty set")
    w = np.zeros(n)
    if n == 1:
        w[0] = 1.0
        return w, math.sqrt(max(g[0, 0], 0.0))
    best = (math.inf, 0, 1, 0.5)
    for i in range(n):
        for j in range(i + 1, n):
            gamma, cost = _min_norm_2_dots(g[i, i], g[i, j], g[j, j])
            if cost < best[0]:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    w[i], w[j] = gamma, 1.0 - gamma
    if n > 2:
        for _ in range(max_iter):
            gw = g @ w
            s = int(np.argmin(gw))  # Frank-Wolfe vertex
            support = np.flatnonzero(w > 0.0)
            v = int(support[np.argmax(gw[support])])  # away vertex
            wgw = float(w @ gw)
            if wgw - gw[s] <= 0.0:  # FW duality gap 0: optimal
                break
            if wgw - gw[s] >= gw[v] - wgw:  # toward s
                d = -w.copy()
                d[s] += 1.0
                step_max = 1.0
            else:  # away from v
                d = w.copy()
                d[v] -= 1.0
                step_max = w[v] / (1.0 - w[v])
            dgd = float(d @ g @ d)
            if dgd <= 0.0:
                break
            step = min(max(-float(gw @ d) / dgd, 0.0), step_max)  # exact line search
            new = w + step * d
            new[np.abs(new) < 1e-15] = 0.0
            new = np.maximum(new, 0.0)
            new /= new.sum()
            change = float(np.abs(new - w).sum())
            w = new
            if change < tol:
                break
        w = _polish(g, w)
    return w, math.sqrt(max(float(w @ g @ w), 0.0))


def _affine_min(g: np.ndarray, support: list[int]) -> np.ndarray | None:
    """argmin of w^T G w over the affine hull of the vertices ``support`` (weights summing to 1)."""
    k = len(support)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = g[np.ix_(support, support)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
    return sol if np.all(np.isfinite(sol)) and abs(sol.sum() - 1.0) < 1e-6 else None


def _polish(g: np.ndarray, w: np.ndarray, max_cycles: int = 100) -> np.ndarray:
    """Finish a Frank-Wolfe solution exactly with Wolfe's min-norm-point cycles (Wolfe 1976).

    Minor cycle: move toward the affine minimiser on the current support, dropping the vertices
    whose weight reaches 0, until the affine minimiser is inside the simplex. Major cycle: add
    the Frank-Wolfe vertex ``argmin (G w)`` while the duality gap is positive. Finite and exact
    for the small sets used here; the result is kept only if it is not worse than ``w``.
    """
    n = len(w)
    gap_tol = 1e-13 * max(float(np.max(np.diag(g))), _EPS)
    cur = w.copy()
    support = [int(i) for i in np.flatnonzero(cur > 0.0)]
    for _ in range(max_cycles):
        for _ in range(n + 1):  # minor cycles
            v = _affine_min(g, support)
            if v is None:
                return w
            if v.min() > 0.0:
                cur = np.zeros(n)
                cur[support] = v
                break
            ws = cur[support]
            neg = v <= 0.0
            theta = float(np.min(ws[neg] / (ws[neg] - v[neg])))
            ws = ws + theta * (v - ws)
            drop = int(np.flatnonzero(neg)[np.argmin(ws[neg])])
            keep = [i for i in range(len(support)) if i != drop and ws[i] > 0.0]
            if not keep:
                return w
            cur = np.zeros(n)
            cur[[support[i] for i in keep]] = ws[keep]
            cur /= cur.sum()
            support = [support[i] for i in keep]
        gw = g @ cur
        s = int(np.argmin(gw))
        if float(cur @ gw) - gw[s] <= gap_tol or s in support:
            break
        support.append(s)  # major cycle
    return cur if float(cur @ g @ cur) <= float(w @ g @ w) else w


def min_norm_element(vecs: Sequence[torch.Tensor] | torch.Tensor, max_iter: int = 250,
                     tol: float = 1e-5) -> tuple[torch.Tensor, float]:
    """Min-norm element of the convex hull of ``vecs`` (a list of tensors, each flattened, or an
    ``[n, P]`` tensor): ``(weights [n] on the simplex, |sum_i w_i v_i|)``. See :func:`min_norm_from_gram`."""
    if isinstance(vecs, torch.Tensor):
        mat = vecs.detach().reshape(vecs.shape[0], -1)
    else:
        mat = torch.stack([_flat(v) for v in vecs])
    mat = mat.double()
    w, _ = min_norm_from_gram(mat @ mat.T, max_iter, tol)
    w = torch.from_numpy(w).to(mat.device)
    return w.cpu(), float(torch.linalg.vector_norm(w @ mat))  # direct: sqrt(w^T G w) loses digits near 0


# ----------------------------------------------------------------------- the Pareto sub-problem


def pareto_weights_from_gram(gram: np.ndarray, l_cd: float, l_rec: float, ref: int = REF_PREF,
                             pref_vecs: Sequence[Sequence[float]] = PREF_VECS, max_iter: int = 250,
                             tol: float = 1e-5) -> tuple[float, float]:
    """:func:`pareto_weights` from the 2 x 2 Gram matrix of the raw gradients, order (cd, rec)."""
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    if not np.all(np.isfinite(gram)) or norms.min() <= _EPS:
        # NOTE: a zero (or non-finite) gradient on the shared parameters leaves nothing to trade
        # off: keep the recommendation step alone (w_cd = 0).
        return 1.0, 0.0
    ghat = gram / np.outer(norms, norms)  # Gram of the L2-normalised gradients
    u = np.asarray(pref_vecs, dtype=np.float64)
    f = np.array([l_cd, l_rec], dtype=np.float64)
    f = f / max(float(np.linalg.norm(f)), _EPS)
    diff = u - u[ref]  # rows (u_j - u_r); row r is zero
    active = diff @ f > 0.0  # G_j = (u_j - u_r)^T F > 0: the loss vector is outside the sub-region
    a = np.concatenate([np.eye(2), diff[active]], axis=0)  # the vectors to combine, as rows over (g_cd, g_rec)
    lam, _ = min_norm_from_gram(a @ ghat @ a.T, max_iter, tol)
    w = lam @ a  # (w_cd, w_rec) = lambda + sum_j beta_j (u_j - u_r)
    s = float(np.abs(w).sum())
    if not math.isfinite(s) or s <= _EPS:
        return 1.0, 0.0
    w = w / s
    return float(w[1]), float(w[0])


def pareto_weights(g_rec: torch.Tensor, g_cd: torch.Tensor, l_rec: float | torch.Tensor,
                   l_cd: float | torch.Tensor, *, ref: int = REF_PREF,
                   pref_vecs: Sequence[Sequence[float]] = PREF_VECS, max_iter: int = 250,
                   tol: float = 1e-5) -> tuple[float, float]:
    """Loss weights ``(w_rec, w_cd)`` from the preference-aware ParetoMTL sub-problem.

    Objectives ``F = (L_cd, L_rec)`` with gradients ``g_cd, g_rec`` on the shared parameters,
    each L2-normalised: ``gh_i = g_i / |g_i|``. Preference vectors
    (docs/methods.md "AutoCDSR and AutoCDSR+", step 2)
    ``u_0 = (0, 1), u_1 = (1, 0), u_2 = (0.7071, 0.7071)`` in (L_cd, L_rec) coordinates; the
    reference preference is ``u_r = u_1 = (L_cd 1, L_rec 0)``: its sub-region
    ``Omega_r = {F : (u_j - u_r)^T F <= 0 for all j}`` is the cone of loss vectors within
    22.5 degrees of the L_cd axis, i.e. trade-offs with a *small recommendation loss* relative
    to L_cd (the rec-favouring preference).

    Constraints (ParetoMTL, Lin et al. 2019; the AutoCDSR paper's Eq. 12):
    ``G_j(theta) = (u_j - u_r)^T F(theta) <= 0`` for j != r. A constraint is *active* when
    ``(u_j - u_r)^T F / |F| > 0`` (violated). With u_r = (1, 0):
    ``G_0 = L_rec - L_cd`` (active when L_rec > L_cd) and
    ``G_2 = 0.7071 L_rec - 0.2929 L_cd`` (active when L_rec > 0.414 L_cd). The sub-problem
    ``min_{d, alpha} alpha + |d|^2 / 2  s.t.  gh_i^T d <= alpha (i in {cd, rec}),
    grad G_j^T d <= alpha (j active)`` with ``grad G_j = (u_j - u_r)_cd gh_cd + (u_j - u_r)_rec gh_rec``
    has the dual: find ``(lambda_cd, lambda_rec, beta_j)`` on the simplex minimising
    ``|lambda_cd gh_cd + lambda_rec gh_rec + sum_j beta_j grad G_j|`` (solved by Frank-Wolfe on the
    Gram matrix, :func:`min_norm_from_gram`). The descent direction is a weighted sum of the two
    gradients with ``w = lambda + sum_j beta_j (u_j - u_r)``, i.e.
    ``w_cd = lambda_cd - beta_0 - 0.2929 beta_2`` and ``w_rec = lambda_rec + beta_0 + 0.7071 beta_2``,
    normalised so that ``|w_cd| + |w_rec| = 1``. With no active constraint this is plain MGDA on the
    normalised gradients (w = (0.5, 0.5) unless the gradients coincide).

    Range: ``w_rec >= 0`` always; ``w_cd`` may be *negative* (an active constraint asks to move
    toward the preferred region, which can mean trading cd attention mass for recommendation
    loss); the strategy clamps ``w_cd / w_rec`` to ``[0, max_ratio]``
    (docs/methods.md "AutoCDSR and AutoCDSR+", step 3).

    NOTE (choices):
    - the constraint gradients are built from the *normalised* objective gradients (as the
      AutoCDSR reference does), not from the raw ones as in ParetoMTL;
    - the active set uses the raw loss values ``F`` (no per-objective scaling) with epsilon = 0
      (ParetoMTL activates at ``G_j >= -eps``); since L_rec (a cross-entropy) is usually far
      larger than L_cd (a mass in [0, 1]), both constraints are normally active;
    - ParetoMTL's initial phase (first reaching the sub-region) is not run: the preference only
      shapes every step's weights, as in AutoCDSR;
    - a zero or non-finite gradient gives ``(1, 0)`` (the recommendation step alone).
    """
    a, b = _flat(g_cd).float(), _flat(g_rec).float()
    dots = torch.stack([a @ a, a @ b, b @ b]).double().cpu().tolist()
    gram = np.array([[dots[0], dots[1]], [dots[1], dots[2]]])
    return pareto_weights_from_gram(gram, float(l_cd), float(l_rec), ref=ref, pref_vecs=pref_vecs,
                                    max_iter=max_iter, tol=tol)


def pareto_ratio(w_rec: float, w_cd: float, max_ratio: float) -> float:
    """``w_cd / w_rec`` clamped to ``[0, max_ratio]``: negative or non-finite w_cd -> 0, w_rec ~ 0 -> max_ratio."""
    if not (math.isfinite(w_cd) and math.isfinite(w_rec)) or w_cd <= 0.0:
        return 0.0
    if w_rec <= 1e-8 * w_cd:
        return float(max_ratio)
    return float(min(w_cd / w_rec, max_ratio))


# ----------------------------------------------------------------------------------- strategy


def _flat_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


class ParetoStrategy:
    """The preference-aware Pareto step (docs/methods.md "AutoCDSR and AutoCDSR+", steps 1-3) for the
    shared loop.

    The model provides ``aux_objectives(batch)`` (one forward, scalars ``"rec"`` and ``"cd"``) and
    ``shared_parameters()`` (the transformer parameters, not the embedding tables). Every
    ``cfg.pareto.every_k`` steps (from the first step this instance runs) the gradients of both
    objectives on the shared parameters give the weights (:func:`pareto_weights`) and the ratio
    ``clamp(w_cd / w_rec, 0, max_ratio)``; in between the last ratio is reused. The update
    minimises ``L_rec + ratio * L_cd`` (ratio detached: a plain float).

    NOTE (efficiency): on a solve step, the gradient of L_cd is taken once with
    ``torch.autograd.grad`` on every trainable parameter and L_rec is back-propagated once with
    ``backward()``; the shared slices of those two give g_cd and g_rec, and ``ratio * grad L_cd``
    is then added to ``.grad``. This is the gradient of ``L_rec + ratio * L_cd`` exactly (the
    embeddings get grad L_rec + ratio grad L_cd, never anything else) with two backward passes
    instead of three (two autograd.grad on the shared parameters + one of the total loss). Off
    solve steps it is one ordinary backward of the total loss (L_cd skipped when ratio = 0).

    Per step it reports ``pareto_ratio`` (the clamped ratio used), ``pareto_w_rec`` / ``pareto_w_cd``
    (the last solved weights, before clamping; w_cd may be negative) and ``pareto_solved`` (1 on a
    solve step): the loop writes them to ``steps.csv`` and averages them per epoch.

    The step counter, last ratio and weights are in the loop's checkpoint (:meth:`state_dict`), so a
    resumed run with every_k > 1 solves on the same steps as an uninterrupted one.

    Several processes (:mod:`cdsr.train.distributed`): ``grad L_rec`` (in ``.grad``), the list
    ``grad L_cd`` and the two loss values are reduced to the global batch's before g_rec, g_cd and
    their Gram matrix are formed, so every process solves the same MGDA problem from the same
    numbers and takes the same ratio; ``ratio * grad L_cd`` is then added from the reduced list, so
    the update needs no further reduction. Off solve steps the total loss's gradient is reduced.
    """

    def state_dict(self) -> dict:
        return {"n_steps": self.n_steps, "n_solves": self.n_solves, "ratio": self.ratio,
                "weights": None if self.weights is None else list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.n_steps, self.n_solves = int(state["n_steps"]), int(state["n_solves"])
        self.ratio = None if state["ratio"] is None else float(state["ratio"])
        self.weights = None if state["weights"] is None else (float(state["weights"][0]), float(state["weights"][1]))

    def __init__(self) -> None:
        self.n_steps = 0  # steps taken by this instance
        self.n_solves = 0
        self.ratio: float | None = None  # the last solved ratio (None: never solved)
        self.weights: tuple[float, float] | None = None  # the last (w_rec, w_cd)

    def _solve_now(self, every_k: int) -> bool:
        return self.ratio is None or self.n_steps % max(int(every_k), 1) == 0

    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             cfg: TrainConfig, autocast: Callable[[], contextlib.AbstractContextManager],
             sync: GradSync = NO_SYNC) -> dict[str, float]:
        pc: ParetoConfig = getattr(cfg, "pareto", None) or ParetoConfig()
        with autocast():
            out = model.aux_objectives(batch)
        rec, cd = out["rec"], out["cd"]
        optimizer.zero_grad(set_to_none=True)
        solved = self._solve_now(pc.every_k)
        if solved:
            params = [p for p in model.parameters() if p.requires_grad]
            index = {id(p): i for i, p in enumerate(params)}
            shared = [p for p in model.shared_parameters() if p.requires_grad]
            missing = [i for i, p in enumerate(shared) if id(p) not in index]
            if missing:
                raise ValueError(f"shared_parameters() entries {missing} are not parameters of the model")
            if cd.requires_grad:
                g_cd_all = list(torch.autograd.grad(cd, params, retain_graph=True, allow_unused=True))
            else:
                g_cd_all = [None] * len(params)
            rec.backward()  # .grad = grad L_rec on every parameter
            # several processes: the global batch's gradients and losses, before the solve
            sync.grads(params)
            g_cd_all = sync.grad_list(g_cd_all, params)
            l_rec, l_cd = sync.values(rec.detach(), cd.detach())
            g_rec = _flat_grads([p.grad for p in shared], shared)
            g_cd = _flat_grads([g_cd_all[index[id(p)]] for p in shared], shared)
            w_rec, w_cd = pareto_weights(g_rec, g_cd, l_rec, l_cd, max_iter=pc.max_iter, tol=pc.tol)
            self.weights = (w_rec, w_cd)
            self.ratio = pareto_ratio(w_rec, w_cd, pc.max_ratio)
            self.n_solves += 1
            if self.ratio > 0.0:
                for p, g in zip(params, g_cd_all):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = (self.ratio * g).to(p.dtype)
                    else:
                        p.grad.add_(g, alpha=self.ratio)
        else:
            (rec + self.ratio * cd if self.ratio > 0.0 else rec).backward()
            sync.grads([p for p in model.parameters() if p.requires_grad])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        self.n_steps += 1
        stats = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        stats["rec"], stats["cd"] = float(rec.detach()), float(cd.detach())
        stats["loss"] = stats["rec"] + self.ratio * stats["cd"]
        stats["pareto_ratio"] = self.ratio
        stats["pareto_w_rec"], stats["pareto_w_cd"] = self.weights
        stats["pareto_solved"] = float(solved)
        return stats
