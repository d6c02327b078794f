"""Sequence augmentations for DPG-Diff's augmented view (seed 004, "Tri-view Contrastive
Learning": Crop, Mask, Reorder, Substitute, Insert; the CL4SRec / CoSeRec family).

Each function takes a right-aligned batch ``items, domains, mask [B, L]`` (0 = padding on the
left), a strength ``rate`` in [0, 1), the per-domain item ranges ``lo, size [D]`` where it needs
them, and a ``torch.Generator`` (None: the global RNG, which the training loop seeds), and
returns a new right-aligned ``(items, domains, mask)``. All are vectorised over the batch.

- ``crop``: a random contiguous run of ceil((1 - rate) n) of a row's n events;
- ``mask``: each event independently with probability ``rate`` gets item id 0 (the padding row
  of the embedding table, i.e. a zero item vector) but keeps its domain and position;
- ``reorder``: a random contiguous run of ceil(rate n) events is shuffled (item and domain move
  together);
- ``substitute``: each event with probability ``rate`` gets a random *other* item of its domain;
- ``insert``: before each event, with probability ``rate``, a random item of that event's domain
  is inserted; the row keeps its most recent L events.

NOTE (our choices; the seed names the five augmentations only): one ``rate`` for all five;
masking reuses the padding embedding (no extra [MASK] row, so scores keep their n_items + 1
columns); substitution and insertion draw uniformly within the event's domain (CoSeRec draws
correlated items; uniform is the seed's own noise model in its robustness study).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rand(shape, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device if gen is not None else device).to(device)


def _event_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n [B] events per row, k [B, L] index of each position's event counted from the row's first
    event: 0..n-1 on valid positions, negative on padding)."""
    L = mask.shape[1]
    n = mask.sum(1)
    k = torch.arange(L, device=mask.device)[None] - (L - n)[:, None]
    return n, k


def crop(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, rate: float,
         gen: torch.Generator | None = None) -> Batch:
    B, L = items.shape
    n, _ = _event_index(mask)
    m = torch.clamp(torch.ceil((1 - rate) * n.double()).long(), min=1)
    m = torch.minimum(m, n.clamp(min=1))
    start = (_rand(B, gen, items.device) * (n - m + 1).double()).long().clamp(max=(n - m).clamp(min=0))
    j = torch.arange(L, device=items.device)[None]
    keep = j >= (L - m)[:, None]
    src_event = start[:, None] + m[:, None] - (L - j)  # event index shown at output position j
    src = (L - n)[:, None] + src_event
    src = torch.where(keep & (n[:, None] > 0), src, 0).clamp(0, L - 1)
    keep = keep & (n[:, None] > 0)
    return items.gather(1, src) * keep, domains.gather(1, src) * keep, keep


def mask_items(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, rate: float,
               gen: torch.Generator | None = None) -> Batch:
    hit = (_rand(items.shape, gen, items.device) < rate) & mask
    return items.masked_fill(hit, 0), domains, mask


def reorder(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, rate: float,
            gen: torch.Generator | None = None) -> Batch:
    B, L = items.shape
    n, k = _event_index(mask)
    r = torch.minimum(torch.clamp(torch.ceil(rate * n.double()).long(), min=1), n.clamp(min=1))
    start = (_rand(B, gen, items.device) * (n - r + 1).double()).long().clamp(max=(n - r).clamp(min=0))
    inside = mask & (k >= start[:, None]) & (k < (start + r)[:, None])
    # sort keys: positions keep their index; the run's events get random keys inside the run's span
    key = torch.arange(L, device=items.device, dtype=torch.float64)[None].expand(B, L)
    span_lo = (L - n + start).double()[:, None]
    rnd = span_lo + _rand((B, L), gen, items.device).double() * (r - 1).double()[:, None]
    perm = torch.where(inside, rnd, key).argsort(dim=1, stable=True)
    return items.gather(1, perm), domains.gather(1, perm), mask


def _random_same_domain(domains: torch.Tensor, lo: torch.Tensor, size: torch.Tensor,
                        gen: torch.Generator | None) -> torch.Tensor:
    u = _rand(domains.shape, gen, domains.device)
    lo_, sz = lo.to(domains.device)[domains], size.to(domains.device)[domains]
    return lo_ + torch.minimum((u * sz).long(), sz - 1)


def substitute(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, rate: float,
               lo: torch.Tensor, size: torch.Tensor, gen: torch.Generator | None = None) -> Batch:
    hit = (_rand(items.shape, gen, items.device) < rate) & mask
    # a different item of the same domain: offset by 1..size-1 inside the domain's id range
    lo_, sz = lo.to(items.device)[domains], size.to(items.device)[domains]
    off = 1 + torch.minimum((_rand(items.shape, gen, items.device) * (sz - 1)).long(), (sz - 2).clamp(min=0))
    other = lo_ + (items - lo_ + off) % sz
    hit = hit & (sz > 1)
    return torch.where(hit, other, items), domains, mask


def insert(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, rate: float,
           lo: torch.Tensor, size: torch.Tensor, gen: torch.Generator | None = None) -> Batch:
    B, L = items.shape
    ins = (_rand(items.shape, gen, items.device) < rate) & mask
    new = _random_same_domain(domains, lo, size, gen)
    width = mask.long() * (1 + ins.long())  # output slots each position emits
    after = width.flip(1).cumsum(1).flip(1) - width  # slots emitted by later positions
    end = L - 1 - after  # output slot of the original event
    dump = L  # positions pushed off the left edge (and padding) land in a dropped column
    ev = torch.where(mask & (end >= 0), end, dump)
    iv = torch.where(ins & (end - 1 >= 0), end - 1, dump)
    out_i = items.new_zeros(B, L + 1).scatter(1, ev, items).scatter(1, iv, new)
    out_d = domains.new_zeros(B, L + 1).scatter(1, ev, domains).scatter(1, iv, domains)
    out_m = mask.new_zeros(B, L + 1).scatter(1, ev, mask).scatter(1, iv, ins)
    return out_i[:, :L], out_d[:, :L], out_m[:, :L]


AUGMENTATIONS: dict[str, Callable[..., Batch]] = {
    "crop": crop,
    "mask": mask_items,
    "reorder": reorder,
    "substitute": substitute,
    "insert": insert,
}
_NEED_RANGES = {"substitute", "insert"}


def check(names: tuple[str, ...], rate: float) -> None:
    """Raise ValueError for an unknown augmentation name, an empty list or a rate outside [0, 1)."""
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad or not names:
        raise ValueError(f"augmentations {list(names)}: choose from {sorted(AUGMENTATIONS)}")
    if not 0.0 <= rate < 1.0 or math.isnan(rate):
        raise ValueError(f"augmentation rate must be in [0, 1), got {rate}")


def augment(items: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor, names: tuple[str, ...], rate: float,
            lo: torch.Tensor, size: torch.Tensor, gen: torch.Generator | None = None) -> Batch:
    """One augmentation per row, drawn uniformly from ``names`` (every listed one is computed
    for the whole batch and each row keeps its own: no loop over rows)."""
    check(names, rate)
    B = items.shape[0]
    pick = (_rand(B, gen, items.device) * len(names)).long().clamp(max=len(names) - 1)
    out_i, out_d, out_m = items.clone(), domains.clone(), mask.clone()
    for j, name in enumerate(names):
        extra = (lo, size) if name in _NEED_RANGES else ()
        a_i, a_d, a_m = AUGMENTATIONS[name](items, domains, mask, rate, *extra, gen=gen)
        sel = (pick == j)[:, None]
        out_i, out_d, out_m = torch.where(sel, a_i, out_i), torch.where(sel, a_d, out_d), torch.where(sel, a_m, out_m)
    return out_i, out_d, out_m
