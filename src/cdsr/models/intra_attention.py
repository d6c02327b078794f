"""HSTU's pointwise attention, dense and block-sparse (intra-domain), behind one small "plan".

docs/methods.md "HSTU-CD"; seed 001 (arXiv 2508.20945), Sec. "intra-domain attention". HSTU's
attention (Zhai et al. 2024, Eq. 2) is ``A = SiLU(Q K^T + rab) / N`` under a mask: no softmax.
The intra-domain mask of HSTU-CD allows query i to use key j iff ``j <= i`` and
``dom(j) == dom(i)`` (both valid), so only ``sum_d s_d^2`` of the ``S^2`` pairs are live
(``delta = sum_d s_d^2 / S^2``).

A plan is built once per forward (the mask and the bias do not depend on the layer) and is then
applied by every layer: ``plan.attend(q, k, v) -> [B, L, h * d_v]``.

- :func:`dense_plan`: the dense reference. Scores for all ``L x L`` pairs, then the mask
  (what the HSTU reference does). Cost O(L^2) whatever the mask.
- :func:`tiled_plan`: the block-sparse path. Positions are grouped by domain: each domain's
  events are laid out in time order (a stable grouping by domain), each domain's run starting on
  a tile boundary. In that layout the live pairs of the
  intra-domain mask lie in lower-triangular diagonal blocks, one per domain. The layout is cut
  into tiles of ``block`` slots and only the tile pairs (query tile, key tile) of one domain with
  the key tile not after the query tile are computed. Those tiles are gathered, scored, masked
  exactly, multiplied by V and scatter-added back (``index_add``); the result is then put back
  in the original order. A domain with s events costs s^2 / 2 + s T / 2 pairs: O(sum_d s_d^2)
  in all. It is pure torch, so autograd gives the backward, on CPU and CUDA alike. With
  ``same_domain=False`` the same kernel computes plain causal attention (one run): the honest
  baseline to measure the domain sparsity against, apart from the causal halving.

NOTE (deviation from the paper): the paper masks with FlexAttention. FlexAttention normalises
with a softmax (HSTU's SiLU attention cannot be written through it) and has no CPU backward
(docs/stack.md "FlexAttention on CPU"). So the block-sparse path here is written directly in
torch. It is the path used on a GPU too; no fused Triton kernel was built (no GPU was available
to develop and verify one on).

``bias_fn(b, i, j) -> Tensor`` gives the additive bias ``rab`` for batch rows ``b``, query
positions ``i`` and key positions ``j`` (broadcasting index tensors; see
``RelativeBias.pair_fn`` in :mod:`cdsr.models.hstu`), so both plans evaluate it only where needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BiasFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _heads_out(av: torch.Tensor) -> torch.Tensor:
    B, h, L, dv = av.shape
    return av.transpose(1, 2).reshape(B, L, h * dv)


def intra_domain_mask(domains: torch.Tensor, valid: torch.Tensor, same_domain: bool = True) -> torch.Tensor:
    """[B, L, L] bool: query i may use key j iff both are valid, j <= i and (optionally) same domain.

    Padding queries get an empty row (their output is 0 and never used)."""
    L = domains.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=domains.device).tril()
    m = causal[None] & valid[:, None, :] & valid[:, :, None]
    if same_domain:
        m = m & (domains[:, :, None] == domains[:, None, :])
    return m


@dataclass
class DensePlan:
    """Dense masked attention: ``weight = mask / N`` [B, 1, L, L], ``bias`` [B or 1, 1, L, L] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k [B, h, L, d_qk]; v [B, h, L, d_v] -> [B, L, h * d_v]."""
        s = q @ k.transpose(-1, -2)
        if self.bias is not None:
            s = s + self.bias
        return _heads_out((F.silu(s) * self.weight) @ v)


def dense_plan(mask: torch.Tensor, bias_fn: BiasFn | None, norm: float) -> DensePlan:
    """The dense plan for a [B, L, L] mask (see :func:`intra_domain_mask`)."""
    B, L, _ = mask.shape
    bias = None
    if bias_fn is not None:
        r = torch.arange(L, device=mask.device)
        bias = bias_fn(torch.arange(B, device=mask.device)[:, None, None], r[None, :, None], r[None, None, :]).unsqueeze(1)
    return DensePlan(weight=(mask.to(torch.float32) / norm).unsqueeze(1), bias=bias)


class _RowPermute(torch.autograd.Function):
    """``y = x[fwd]`` over rows, where each row of x goes to at most one row of y (``fwd`` may
    point at row N: a zero row); ``bwd`` gives, for each row of x, the row of y it went to (or
    the zero row M). The backward of a permutation is then a gather too, not the scatter-add
    autograd would use for ``index_select`` (twice as slow on CPU, measured)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: torch.Tensor, bwd: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bwd)
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, fwd)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (bwd,) = ctx.saved_tensors
        return torch.cat([g, g.new_zeros(1, g.shape[1])]).index_select(0, bwd), None, None


@dataclass
class TiledPlan:
    """Block-sparse attention over the live tiles of the domain-grouped layout.

    slot_src [B * Lp]: flat source row (b * L + position) of each slot of the tiled layout
    (B * L: an empty slot, a zero row); pos_slot [B * L]: flat slot of each position (B * Lp for
    padding: a zero output); q_tile, k_tile [n]: flat (row, tile) indices of the n live tile
    pairs; weight [n, 1, T, T] = exact mask / N; bias [n, 1, T, T] or None.
    """

    slot_src: torch.Tensor
    pos_slot: torch.Tensor
    q_tile: torch.Tensor
    k_tile: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    block: int

    @property
    def n_tiles(self) -> int:
        return int(self.q_tile.numel())

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, L, e] -> [B * nT, h, T, e] (a view) in the tiled layout."""
        B, h, L, e = x.shape
        rows = x.transpose(1, 2).reshape(B * L, h * e)
        xs = _RowPermute.apply(rows, self.slot_src, self.pos_slot)  # [B * Lp, h * e]
        return xs.view(-1, self.block, h, e).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k [B, h, L, d_qk]; v [B, h, L, d_v] -> [B, L, h * d_v]."""
        B, h, L, dv = v.shape
        T = self.block
        qt = self._tiles(q).index_select(0, self.q_tile)  # [n, h, T, d_qk]
        kt = self._tiles(k).index_select(0, self.k_tile)
        vt = self._tiles(v).index_select(0, self.k_tile)
        s = qt @ kt.transpose(-1, -2)  # [n, h, T, T]
        if self.bias is not None:
            s = s + self.bias
        o = (F.silu(s) * self.weight) @ vt  # [n, h, T, d_v]
        n_slots = self.slot_src.numel()
        out = o.new_zeros(n_slots // T, h, T, dv).index_add_(0, self.q_tile, o)
        out = out.transpose(1, 2).reshape(n_slots, h * dv)
        return _RowPermute.apply(out, self.pos_slot, self.slot_src).view(B, L, h * dv)  # back to positions


def tiled_plan(domains: torch.Tensor, valid: torch.Tensor, bias_fn: BiasFn | None, norm: float,
               block: int = 64, same_domain: bool = True) -> TiledPlan:
    """The block-sparse plan (module docstring). domains [B, L] long, valid [B, L] bool.

    Sorted layout: each domain's events in time order, each domain's run starting on a tile
    boundary (so a tile holds one domain, and a domain of s events costs the lower triangle of
    ceil(s / T) tiles: s^2 / 2 + s T / 2 pairs instead of s^2 / 2).
    ``block <= 0``: :func:`auto_block` from this batch's domain sizes.
    """
    B, L = domains.shape
    dev = domains.device
    dom = domains if same_domain else torch.zeros_like(domains)
    D = int(dom.max()) + 1 if dom.numel() else 1
    hit = F.one_hot(dom, D).to(torch.long) * valid.unsqueeze(-1)  # [B, L, D]
    counts = hit.sum(1)  # [B, D]
    T = int(block) if block > 0 else auto_block(counts)
    padded = (counts + T - 1) // T * T
    starts = padded.cumsum(1) - padded  # first slot of each domain's run
    rank = (hit.cumsum(1) * hit).sum(-1) - 1  # rank of each event inside its domain
    slot = starts.gather(1, dom) + rank  # [B, L] (meaningless at padding positions)
    Lp = max(int(padded.sum(1).max()) if B else 0, T)
    rows = torch.arange(B, device=dev)[:, None].expand(B, L)
    pos = torch.arange(L, device=dev).expand(B, L)
    order = torch.full((B, Lp), L, dtype=torch.long, device=dev)  # L: an empty slot
    order[rows[valid], slot[valid]] = pos[valid]
    nT = Lp // T
    row0 = torch.arange(B, device=dev)[:, None]
    slot_src = torch.where(order < L, row0 * L + order, B * L).reshape(-1)
    pos_slot = torch.where(valid, row0 * Lp + slot, B * Lp).reshape(-1)

    s_valid = order < L
    s_dom = dom.gather(1, order.clamp(max=L - 1)) if L else order
    tv, td = s_valid.view(B, nT, T), s_dom.view(B, nT, T)
    tile_dom = torch.where(tv, td, torch.full_like(td, D)).amin(-1)  # [B, nT]; D: an empty tile
    tri = torch.ones(nT, nT, dtype=torch.bool, device=dev).tril()  # key tile <= query tile
    live = tri[None] & (tile_dom[:, :, None] == tile_dom[:, None, :]) & (tile_dom < D)[:, :, None]
    b, qi, kj = live.nonzero(as_tuple=True)
    q_tile, k_tile = b * nT + qi, b * nT + kj

    # exact mask inside each live tile pair, from the slots' original positions
    sp, sv = order.view(B * nT, T), s_valid.view(B * nT, T)
    pq, pk = sp[q_tile], sp[k_tile]  # [n, T]
    m = (pk[:, None, :] <= pq[:, :, None]) & sv[q_tile][:, :, None] & sv[k_tile][:, None, :]
    bias = None
    if bias_fn is not None:
        # empty slots point at position L: clamp to a real index (their weight is 0 anyway)
        bias = bias_fn(b[:, None, None], pq.clamp(max=L - 1)[:, :, None], pk.clamp(max=L - 1)[:, None, :]).unsqueeze(1)
    return TiledPlan(slot_src=slot_src, pos_slot=pos_slot, q_tile=q_tile, k_tile=k_tile,
                     weight=(m.to(torch.float32) / norm).unsqueeze(1), bias=bias, block=T)


def auto_block(counts: torch.Tensor, lo: int = 16, hi: int = 128) -> int:
    """Tile size for domain runs of ``counts`` [B, D] events: the power of two nearest to a
    quarter of the cost-weighted mean run length sum s^2 / sum s, within [lo, hi].

    Small tiles waste less at run ends (s T / 2 pairs per run); large ones have less per-tile
    overhead. On a 2-core CPU this choice measured best, or within 20% of the best, for runs of
    32 to 1,024 events (``benchmarks/attention.py --blocks``; the worst tiles cost 2-30x)."""
    c = counts.to(torch.float64)
    s_eff = float((c ** 2).sum() / c.sum().clamp_min(1))
    return int(min(max(2 ** round(math.log2(max(s_eff / 4, 1.0))), lo), hi))


def live_fraction(plan: TiledPlan, n_rows: int, length: int) -> float:
    """Computed pairs of a tiled plan / L^2 per row (what the tiles cost, waste included)."""
    return plan.n_tiles * plan.block ** 2 / max(n_rows * length * length, 1)


def domain_delta(domains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B] delta = sum_d s_d^2 / S^2 of each row (docs/methods.md "HSTU-CD"): the ideal cost ratio
    intra/dense."""
    D = int(domains.max()) + 1 if domains.numel() else 1
    counts = torch.zeros(domains.shape[0], D, device=domains.device).scatter_add_(
        1, domains, valid.to(torch.float32))
    s = counts.sum(1).clamp_min(1)
    return (counts ** 2).sum(1) / s ** 2
