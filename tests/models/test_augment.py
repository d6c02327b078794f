"""DPG-Diff's five sequence augmentations, each against its definition on a right-aligned batch
(a Python loop over rows here, in the test, only), seeded reproducibility, and the per-row mix."""

from __future__ import annotations

import math

import pytest
import torch

from cdsr.models.augment import AUGMENTATIONS, augment, crop, insert, mask_items, reorder, substitute

LO = torch.tensor([1, 31, 61])
SIZE = torch.tensor([30, 30, 30])


def _batch(B=64, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, 3, (B, L), generator=g)
    items = LO[dom] + torch.randint(0, 30, (B, L), generator=g)
    n = torch.randint(0, L + 1, (B,), generator=g)
    n[0], n[1], n[2] = 0, 1, L  # an empty row, a single event, a full row
    mask = torch.arange(L)[None] >= (L - n)[:, None]
    return items * mask, dom * mask, mask


def _events(items, dom, mask, r):
    return list(zip(items[r][mask[r]].tolist(), dom[r][mask[r]].tolist()))


def _right_aligned(mask):
    n = mask.sum(1)
    return torch.equal(mask, torch.arange(mask.shape[1])[None] >= (mask.shape[1] - n)[:, None])


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_crop_keeps_a_contiguous_run_of_the_right_length(rate):
    i, d, m = _batch()
    ci, cd, cm = crop(i, d, m, rate, _gen())
    assert _right_aligned(cm)
    for r in range(i.shape[0]):
        ev, got = _events(i, d, m, r), _events(ci, cd, cm, r)
        if not ev:
            assert not got
            continue
        assert len(got) == max(1, math.ceil((1 - rate) * len(ev)))
        assert any(ev[s:s + len(got)] == got for s in range(len(ev) - len(got) + 1))
    assert torch.all(ci[~cm] == 0) and torch.all(cd[~cm] == 0)


def test_mask_only_blanks_items_at_about_the_rate():
    i, d, m = _batch(B=400)
    mi, md, mm = mask_items(i, d, m, 0.3, _gen())
    assert torch.equal(md, d) and torch.equal(mm, m)
    changed = mi != i
    assert torch.all(mi[changed] == 0) and not torch.any(changed & ~m)
    assert float(changed.sum() / m.sum()) == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_reorder_shuffles_one_contiguous_run_and_moves_domains_with_items(rate):
    i, d, m = _batch()
    ri, rd, rm = reorder(i, d, m, rate, _gen())
    assert torch.equal(rm, m)
    moved_rows = 0
    for r in range(i.shape[0]):
        ev, got = _events(i, d, m, r), _events(ri, rd, rm, r)
        assert sorted(ev) == sorted(got)  # the same events (item, domain pairs)
        diff = [k for k in range(len(ev)) if ev[k] != got[k]]
        if diff:
            moved_rows += 1
            assert diff[-1] - diff[0] + 1 <= math.ceil(rate * len(ev))
    assert moved_rows > i.shape[0] // 3


def test_substitute_changes_items_within_their_domain():
    i, d, m = _batch(B=400)
    si, sd, sm = substitute(i, d, m, 0.2, LO, SIZE, _gen())
    assert torch.equal(sd, d) and torch.equal(sm, m)
    ch = si != i
    assert not torch.any(ch & ~m)
    lo, hi = LO[d[ch]], LO[d[ch]] + SIZE[d[ch]] - 1
    assert torch.all((si[ch] >= lo) & (si[ch] <= hi))
    assert float(ch.sum() / m.sum()) == pytest.approx(0.2, abs=0.02)


def test_substitute_leaves_a_one_item_domain_alone():
    i, d, m = torch.tensor([[5, 5]]), torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool)
    si, _, _ = substitute(i, d, m, 0.99, torch.tensor([5]), torch.tensor([1]), _gen())
    assert torch.equal(si, i)


def test_insert_adds_same_domain_items_before_events_and_keeps_the_latest_L():
    i, d, m = _batch(B=200)
    ii, idd, im = insert(i, d, m, 0.3, LO, SIZE, _gen())
    assert _right_aligned(im)
    extra = 0
    for r in range(i.shape[0]):
        ev, got = _events(i, d, m, r), _events(ii, idd, im, r)
        # got is ev with items inserted, cut to the last L: greedy subsequence match from the end
        k, inserted = len(ev) - 1, []
        for g in reversed(got):
            if k >= 0 and g == ev[k]:
                k -= 1
            else:
                inserted.append(g)
        assert len(got) - len(inserted) == len(ev) - 1 - k  # the kept originals are the latest ones
        assert len(inserted) <= len(ev)  # at most one before each event
        for it, dm in inserted:
            assert LO[dm] <= it <= LO[dm] + SIZE[dm] - 1
        extra += len(inserted)
        if len(got) == len(ev) + len(inserted):  # nothing pushed off the edge
            assert k == -1
    assert extra > 0


def test_inserted_item_takes_the_domain_of_the_event_it_precedes():
    i = torch.tensor([[0, 0, 0, 3, 40, 70]])
    d = torch.tensor([[0, 0, 0, 0, 1, 2]])
    m = i > 0
    ii, idd, im = insert(i, d, m, 0.999, LO, SIZE, _gen())
    assert im.tolist() == [[True] * 6]
    assert idd.tolist() == [[0, 0, 1, 1, 2, 2]] and ii[0, 1::2].tolist() == [3, 40, 70]
    assert LO[1] <= ii[0, 2] <= 60 and LO[2] <= ii[0, 4] <= 90


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_each_augmentation_is_reproducible_from_its_seed(name):
    i, d, m = _batch()
    extra = (LO, SIZE) if name in ("substitute", "insert") else ()
    a = AUGMENTATIONS[name](i, d, m, 0.3, *extra, gen=_gen(7))
    b = AUGMENTATIONS[name](i, d, m, 0.3, *extra, gen=_gen(7))
    c = AUGMENTATIONS[name](i, d, m, 0.3, *extra, gen=_gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_augment_mixes_one_augmentation_per_row():
    i, d, m = _batch(B=300)
    ai, ad, am = augment(i, d, m, ("mask", "crop"), 0.4, LO, SIZE, _gen(3))
    masked = cropped = 0
    for r in range(i.shape[0]):
        if int(m[r].sum()) < 3:
            continue
        if torch.equal(am[r], m[r]) and torch.equal(ad[r], d[r]):
            masked += 1  # mask keeps layout and domains
            assert torch.all((ai[r] == i[r]) | (ai[r] == 0))
        else:
            cropped += 1
            assert int(am[r].sum()) < int(m[r].sum())
    assert masked > 50 and cropped > 50
    a2 = augment(i, d, m, ("mask", "crop"), 0.4, LO, SIZE, _gen(3))
    assert torch.equal(a2[0], ai)


def test_augment_validates_its_arguments():
    i, d, m = _batch(B=4)
    with pytest.raises(ValueError, match="choose from"):
        augment(i, d, m, ("shuffle",), 0.2, LO, SIZE)
    with pytest.raises(ValueError, match="rate"):
        augment(i, d, m, ("mask",), 1.0, LO, SIZE)
