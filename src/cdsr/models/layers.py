"""Shared transformer pieces: pre-LN blocks with a fused attention path (SDPA) and an explicit
path that also returns the attention probabilities (needed by AutoCDSR's cross-domain
attention mass, computed inside the forward pass)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] boolean mask (True = may attend) over valid keys; causal: key j <= query i.

    The diagonal is always allowed so a padding query never has an empty row (its output is
    never used, but an empty row would give NaN through softmax).
    """
    L = valid.shape[1]
    allowed = valid[:, None, None, :].expand(-1, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return allowed | torch.eye(L, dtype=torch.bool, device=valid.device)


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.h, self.dk, self.p = heads, d // heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False):
        """x [B, L, d], mask [B, 1, L, L] -> (y [B, L, d], probs [B, h, L, L] or None)."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dk).permute(2, 0, 3, 1, 4)
        if not need_probs:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
            probs = None
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(self.dk)
            probs = s.masked_fill(~mask, float("-inf")).softmax(-1)  # after softmax, before dropout
            y = F.dropout(probs, self.p, self.training) @ v
        return self.out(y.transpose(1, 2).reshape(B, L, d)), probs


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Drop(MHA(LN(x))), then x + Drop(FFN(LN(x)))."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_mult: int = 4, ffn_dim: int | None = None):
        super().__init__()
        hidden = ffn_dim or ffn_mult * d
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False):
        a, probs = self.attn(self.ln1(x), mask, need_probs)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.ln2(x))), probs


class Encoder(nn.Module):
    """A stack of blocks with a final LayerNorm. Returns (h [B, L, d], per-layer probs)."""

    def __init__(self, d: int, layers: int, heads: int, dropout: float, ffn_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, dropout, ffn_dim=ffn_dim) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, need_probs: bool = False):
        probs = []
        for blk in self.blocks:
            x, p = blk(x, mask, need_probs)
            probs.append(p)
        return self.ln(x), probs


def sample_domain_negatives(domains: torch.Tensor, lo: torch.Tensor, size: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] uniform item ids of each entry's domain: lo + floor(rand * size) (global RNG).

    domains [...] long; lo, size [D] first item id / number of items of each domain.
    """
    lo_, size_ = lo[domains].unsqueeze(-1), size[domains].unsqueeze(-1)
    u = torch.rand(*domains.shape, n, device=domains.device)
    return lo_ + torch.minimum((u * size_).long(), size_ - 1)  # min: guards float rounding to 1


def domain_softmax_loss(h: torch.Tensor, targets: torch.Tensor, target_domains: torch.Tensor,
                        item_emb: torch.Tensor, domain_ranges: tuple[tuple[int, int], ...],
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Full softmax cross-entropy of each target against the items of its own domain.

    h [N, d] query vectors, targets / target_domains [N]; item_emb [n_items + 1, d]. Domain d's
    items are the contiguous slice [lo_d, hi_d], so each group of positions is scored against
    its slice only (N x V_d instead of N x V). Mean over the N positions.
    """
    total = h.new_zeros(())
    for d, (lo, hi) in enumerate(domain_ranges):
        sel = target_domains == d
        if not bool(sel.any()):
            continue
        logits = h[sel] @ item_emb[lo : hi + 1].T
        if bias is not None:
            logits = logits + bias[lo : hi + 1]
        total = total + F.cross_entropy(logits, targets[sel] - lo, reduction="sum")
    return total / max(int(targets.numel()), 1)


def cross_domain_attention_mass(probs: list[torch.Tensor], domains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AutoCDSR's L_cd (METHODS.md): the attention mass that valid queries put on valid keys of
    another domain, averaged over valid queries, heads and layers.

    probs: per layer [B, h, L, L] (after softmax, before dropout, under the model's own mask);
    domains / valid [B, L]. For query i: c_i = sum_j [valid_j and dom_j != dom_i] P_ij. Returns a
    scalar (0 when no valid query exists). Differentiable in ``probs``.
    """
    cross = ((domains[:, :, None] != domains[:, None, :]) & valid[:, None, :]).unsqueeze(1)  # [B, 1, Lq, Lk]
    q = valid.float()
    # float32 elementwise product + sum (not autocast-lowered), so bf16 probs lose no precision
    total = sum(((p.float() * cross).sum(-1).sum(1) * q).sum() for p in probs)
    return total / (q.sum() * probs[0].shape[1] * len(probs)).clamp_min(1)


def last_state_index(domains: torch.Tensor, valid: torch.Tensor, n_domains: int) -> torch.Tensor:
    """[B, L, D]: index of the last valid position <= i of domain d (-1 if none). Running max."""
    B, L = domains.shape
    pos = torch.arange(L, device=domains.device)
    hit = (domains.unsqueeze(-1) == torch.arange(n_domains, device=domains.device)) & valid.unsqueeze(-1)
    return torch.where(hit, pos[None, :, None], torch.full_like(pos, -1)[None, :, None]).cummax(dim=1).values


def domain_streams(domains: torch.Tensor, valid: torch.Tensor, n_domains: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per domain a: (order [B, L_a] merged positions of a's events in time order, right-aligned;
    valid [B, L_a]). Entries left of a row's a-events are other positions, marked invalid."""
    B, L = domains.shape
    pos = torch.arange(L, device=domains.device)
    out = []
    for a in range(n_domains):
        hit = valid & (domains == a)
        La = max(int(hit.sum(1).max()), 1)
        order = torch.where(hit, pos + L, pos).argsort(dim=1)[:, L - La:]  # distinct keys: hits last, in time order
        out.append((order, hit.gather(1, order)))
    return out


def stream_slots(order: torch.Tensor, valid: torch.Tensor, L: int) -> torch.Tensor:
    """[B, L]: the stream index of each merged position of the stream's domain (-1 elsewhere)."""
    B, La = order.shape
    slot = torch.full((B, L + 1), -1, dtype=torch.long, device=order.device)
    col = torch.arange(La, device=order.device).expand(B, -1)
    return slot.scatter(1, torch.where(valid, order, L), col)[:, :L]


def subsequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """[B, L_a] 0, 1, ... over a right-aligned stream's valid entries, counted from its first
    event (padding: 0)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


def stream_states(xs: list[torch.Tensor], layout: list[tuple[torch.Tensor, torch.Tensor]], domains: torch.Tensor,
                  valid: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """[B, L, D, d]: each domain stream's state at its last event <= merged position i.

    xs: per domain a the encoded stream [B, L_a, d] of ``layout`` (:func:`domain_streams`);
    domains / valid [B, L] of the merged window; ``empty`` [D, d] is used where domain a has no
    event <= i in the window."""
    L, D = domains.shape[1], len(xs)
    slots = torch.stack([stream_slots(o, v, L) for o, v in layout], -1)  # [B, L, D] slot of position i
    at = last_state_index(domains, valid, D)  # [B, L, D] merged index of the last d-event <= i
    sl = slots.gather(1, at.clamp(min=0))  # [B, L, D] its slot in stream d
    d = xs[0].shape[-1]
    S = torch.stack([xs[a].gather(1, sl[..., a].clamp(min=0)[..., None].expand(-1, -1, d)) for a in range(D)], 2)
    return torch.where((at >= 0).unsqueeze(-1), S, empty)


def dot_scores(q: torch.Tensor, item_emb: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """The model interface's scores from user vectors q [B, d] and the (tied) item table
    [n_items + 1, d]: [B, n_items + 1] over every item (column 0, padding, is -inf) when
    ``candidates`` is None, else [B, C] for the candidate ids [B, C]."""
    if candidates is None:
        s = q @ item_emb.T
        s[:, 0] = float("-inf")
        return s
    return torch.einsum("bd,bcd->bc", q, item_emb[candidates])
