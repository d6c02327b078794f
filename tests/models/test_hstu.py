"""HSTU backbone: shapes, training signal, causality, padding invariance, negative sampling."""

from __future__ import annotations

import pytest
import torch

from cdsr.models.base import Vocab
from cdsr.models.hstu import HSTU, HSTUConfig, time_buckets
from cdsr.models.intra_attention import dense_plan
from cdsr.models.layers import sample_domain_negatives

VOCAB = Vocab(n_items=60, domain_ranges=((1, 30), (31, 60)))


def make_batch(B: int = 4, L: int = 12, seed: int = 0, lengths=(12, 7, 3, 10)) -> dict[str, torch.Tensor]:
    """Training-style, right-aligned batch: events e_0..e_n per user, inputs e_0..e_{n-1}."""
    g = torch.Generator().manual_seed(seed)
    ev_dom = torch.randint(0, 2, (B, L + 1), generator=g)
    ev_item = torch.randint(0, 30, (B, L + 1), generator=g) + 1 + 30 * ev_dom
    ev_ts = torch.cumsum(torch.randint(1, 100_000, (B, L + 1), generator=g), 1) + 1_600_000_000
    mask = torch.arange(L)[None, :] >= L - torch.tensor(lengths)[:B, None]
    z = lambda t: torch.where(mask, t, torch.zeros_like(t))
    return {
        "items": z(ev_item[:, :-1]), "domains": z(ev_dom[:, :-1]), "timestamps": z(ev_ts[:, :-1]),
        "mask": mask, "targets": z(ev_item[:, 1:]), "target_domains": z(ev_dom[:, 1:]),
        "target_domain": ev_dom[:, -1], "target_timestamp": ev_ts[:, -1],
    }


def model(**kw) -> HSTU:
    torch.manual_seed(0)
    return HSTU(HSTUConfig(max_len=20, n_negatives=16, **kw), VOCAB)


def test_shapes_and_finite_loss():
    m, b = model(), make_batch()
    assert m.encode(b).shape == (4, 12, 64)
    assert m.score(b).shape == (4, VOCAB.n_items + 1)
    assert torch.isinf(m.score(b)[:, 0]).all()
    cand = torch.tensor([[1, 5, 0], [31, 32, 33], [2, 3, 4], [40, 0, 0]])
    s = m.score(b, cand)
    assert s.shape == (4, 3) and torch.isinf(s[cand == 0]).all() and torch.isfinite(s[cand > 0]).all()
    out = m.loss(b)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_loss_decreases():
    assert_loss_halves(model(dropout=0.0), make_batch())


def assert_loss_halves(m: torch.nn.Module, b: dict[str, torch.Tensor], steps: int = 30) -> None:
    """``steps`` Adam steps on one batch halve the loss (same negatives before and after)."""
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)

    def evaluate() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return m.loss(b)["loss"].item()

    first = evaluate()
    for _ in range(steps):
        opt.zero_grad()
        m.loss(b)["loss"].backward()
        opt.step()
    assert evaluate() < 0.5 * first


def test_loss_is_seeded():
    m, b = model(dropout=0.0), make_batch()
    torch.manual_seed(7)
    a = m.loss(b)["loss"]
    torch.manual_seed(7)
    assert torch.equal(a, m.loss(b)["loss"])


@pytest.mark.parametrize("i", [0, 4, 8, 10])
def test_causality(i):
    m, b = model().eval(), make_batch(lengths=(12, 12, 12, 12))
    h = m.encode(b)
    g = torch.Generator().manual_seed(i)
    p = dict(b)
    later = torch.arange(12) >= i + 1
    p["items"] = torch.where(later, torch.randint(1, 61, (4, 12), generator=g), b["items"])
    p["domains"] = torch.where(later, torch.randint(0, 2, (4, 12), generator=g), b["domains"])
    # t_{i+1} is position i's query time (allowed); every later timestamp may change
    shifted = b["timestamps"] + torch.randint(0, 10**6, (4, 12), generator=g)
    p["timestamps"] = torch.where(torch.arange(12) >= i + 2, shifted, b["timestamps"])
    p["targets"] = torch.randint(1, 61, (4, 12), generator=g)
    h2 = m.encode(p)
    torch.testing.assert_close(h2[:, : i + 1], h[:, : i + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[:, i + 1 :], h[:, i + 1 :])


def test_only_the_timestamp_of_next_event_is_used():
    """Position i uses t_{i+1} (query time) but not the item or domain of i+1."""
    m, b = model().eval(), make_batch(lengths=(12, 12, 12, 12))
    i = 5
    h = m.encode(b)
    p = dict(b, items=b["items"].clone(), domains=b["domains"].clone())
    p["items"][:, i + 1] = (p["items"][:, i + 1] % 60) + 1
    p["domains"][:, i + 1] = 1 - p["domains"][:, i + 1]
    torch.testing.assert_close(m.encode(p)[:, : i + 1], h[:, : i + 1], rtol=0, atol=1e-6)
    p = dict(b, timestamps=b["timestamps"].clone())
    p["timestamps"][:, i + 1] += 10**7
    assert not torch.allclose(m.encode(p)[:, i], h[:, i])  # the time bias does see t_{i+1}


def test_score_ignores_the_target():
    m, b = model().eval(), make_batch()
    b["target"] = torch.tensor([1, 2, 3, 4])
    s = m.score(b)
    b["target"] = torch.tensor([50, 51, 52, 53])
    b["targets"] = torch.randint(1, 61, (4, 12))
    torch.testing.assert_close(m.score(b), s, rtol=0, atol=0)


def test_left_padding_invariance():
    m, b = model().eval(), make_batch()
    pad = 6
    wide = {k: torch.cat([torch.zeros(4, pad, dtype=v.dtype), v], 1) if v.ndim == 2 else v for k, v in b.items()}
    h, hw = m.encode(b), m.encode(wide)
    valid = b["mask"]
    torch.testing.assert_close(hw[:, pad:][valid], h[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(m.score(wide), m.score(b), rtol=0, atol=1e-4)


def test_inference_uses_target_timestamp():
    m, b = model().eval(), make_batch()
    s = m.score(b)
    s_none = m.score({k: v for k, v in b.items() if k != "target_timestamp"})
    assert not torch.allclose(s, s_none)  # falls back to the last input timestamp


def test_negatives_come_from_the_target_domain():
    vocab = Vocab(n_items=100, domain_ranges=((1, 7), (8, 100)))
    lo, size = torch.tensor([1, 8]), torch.tensor([7, 93])
    dom = torch.randint(0, 2, (50, 30))
    torch.manual_seed(0)
    neg = sample_domain_negatives(dom, lo, size, 64)
    assert neg.shape == (50, 30, 64)
    d = dom.unsqueeze(-1).expand_as(neg)
    assert (neg >= lo[d]).all() and (neg <= lo[d] + size[d] - 1).all()
    assert set(neg[d == 0].tolist()) == set(range(1, 8))  # the whole small domain is reachable
    assert neg[d == 1].min() == 8 and neg[d == 1].max() == 100
    ranges = torch.tensor(vocab.domain_ranges)
    assert ((neg >= ranges[d, 0]) & (neg <= ranges[d, 1])).all()


def test_time_buckets_and_attention_mask():
    t = torch.tensor([[0, 1, 2, 10, 1000]])
    qt = torch.tensor([[1, 2, 10, 1000, 10**12]])
    b = time_buckets(qt, t)
    assert b[0, 0, 0] == 0 and b[0, 0, 1] == 0 and b[0, 0, 3] == 7  # dt 1, dt 0 -> 0; |1 - 10| -> 7
    assert b[0, 2, 2] == 6 and b[0, 2, 0] == 7  # dt 8 -> floor(2.079 / 0.301); dt 10 -> 7
    assert b[0, 4, 0] == 91 and b.max() <= 128  # dt 1e12 -> floor(27.63 / 0.301)
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    mask = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    out = dense_plan(mask, None, 5.0).attend(q, k, v)
    v2 = v.clone()
    v2[..., 3:, :] += 1.0  # keys >= 3 are not visible to queries < 3
    torch.testing.assert_close(dense_plan(mask, None, 5.0).attend(q, k, v2)[:, :3], out[:, :3])
