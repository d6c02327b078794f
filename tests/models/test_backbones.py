"""SASRec and BERT4Rec: causality (no future item reaches position i), the target never in the
input, padding invariance, and losses that go down. (HSTU has its own file.)"""

from __future__ import annotations

import pytest
import torch

from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config

VOCAB = Vocab(n_items=60, domain_ranges=((1, 30), (31, 60)), domain_names=("A", "B"))


def _batch(B=4, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    domains = torch.randint(0, 2, (B, L), generator=g)
    items = torch.where(domains == 0, torch.randint(1, 31, (B, L), generator=g), torch.randint(31, 61, (B, L), generator=g))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False  # left padding on one row
    items, domains = items * mask, domains * mask
    ts = torch.cumsum(torch.randint(0, 3, (B, L), generator=g) * 86400, 1) + 1_400_000_000
    tdom = torch.roll(domains, -1, 1)
    tdom[:, -1] = torch.randint(0, 2, (B,), generator=g)
    targets = torch.where(tdom == 0, torch.randint(1, 31, (B, L), generator=g), torch.randint(31, 61, (B, L), generator=g))
    return {"items": items, "domains": domains, "timestamps": ts * mask, "mask": mask, "targets": targets * mask,
            "target_domains": tdom * mask, "target_domain": tdom[:, -1], "target_timestamp": ts[:, -1] + 86400}


def _model(name, variant="merged"):
    torch.manual_seed(0)
    m = build_model(name, model_config(name, {"d": 16, "heads": 2, "layers": 2, "max_len": 12, "dropout": 0.1}, variant), VOCAB)
    return m.eval()


@pytest.mark.parametrize("i", [3, 6, 10])
def test_sasrec_is_causal(i):
    m, b = _model("sasrec"), _batch()
    h, _ = m.encode(b)
    fut = dict(b)
    fut["items"] = b["items"].clone()
    fut["items"][:, i + 1:] = torch.randint(1, 61, fut["items"][:, i + 1:].shape)
    fut["domains"] = b["domains"].clone()
    fut["domains"][:, i + 1:] = 1 - fut["domains"][:, i + 1:]
    h2, _ = m.encode(fut)
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-6)
    assert not torch.allclose(h[:, i + 1:], h2[:, i + 1:])


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_score_ignores_the_target_and_padding(name):
    m, b = _model(name), _batch()
    s = m.score(b)
    b2 = dict(b, targets=torch.randint(1, 61, b["targets"].shape))
    assert torch.equal(s, m.score(b2))
    # more left padding (shifted window) leaves the score of row 0 unchanged
    short = {k: (v[:1, 3:] if v.dim() == 2 else v[:1]) for k, v in b.items()}
    assert torch.allclose(m.score(short)[0], s[0], atol=1e-5)


def test_bert4rec_inference_sees_only_the_history_and_requested_domain():
    m, b = _model("bert4rec"), _batch()
    s = m.score(b)
    other = dict(b, target_domain=1 - b["target_domain"])
    assert not torch.allclose(s, m.score(other))  # the [MASK] carries the requested domain
    items, _, _ = m.inference_inputs(b)
    assert (items[:, -1] == m.mask_id).all() and torch.equal(items[:, :-1][:, -11:], b["items"][:, -11:])


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("variant", ["merged", "single"])
def test_loss_decreases(name, variant):
    m, b = _model(name, variant), _batch(B=16)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        torch.manual_seed(len(losses) % 4)  # BERT4Rec's Cloze masks cycle, so the task is fixed
        loss = m.loss(b)["loss"]
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_sasrec_loss_options_and_domain_restricted_softmax():
    b = _batch()
    for loss in ("ce", "sampled", "bce"):
        torch.manual_seed(0)
        m = build_model("sasrec", model_config("sasrec", {"d": 16, "max_len": 12, "loss": loss}, "merged"), VOCAB)
        assert torch.isfinite(m.loss(b)["loss"])
    from cdsr.models.layers import domain_softmax_loss

    h = torch.randn(5, 8)
    emb = torch.randn(61, 8)
    tg = torch.tensor([3, 40, 7, 59, 31])
    td = torch.tensor([0, 1, 0, 1, 1])
    want = sum(torch.nn.functional.cross_entropy((h[k] @ emb[lo:hi + 1].T)[None], (tg[k] - lo)[None])
               for k, (lo, hi) in enumerate([VOCAB.domain_ranges[int(d)] for d in td])) / 5
    assert torch.allclose(domain_softmax_loss(h, tg, td, emb, VOCAB.domain_ranges), want, atol=1e-5)


def test_sasrec_temperature_and_negatives_from_every_domain(monkeypatch):
    import cdsr.models.sasrec as S

    b = _batch()
    base = {"d": 16, "max_len": 12, "dropout": 0.0}

    def loss(**extra):
        torch.manual_seed(0)
        m = build_model("sasrec", model_config("sasrec", {**base, **extra}, "merged"), VOCAB)
        torch.manual_seed(1)  # the same negatives
        return m.loss(b)["loss"], m

    ce1, m = loss(loss="ce")
    ce2, _ = loss(loss="ce", temperature=0.5)
    h, _ = m.encode(b)
    valid = b["mask"] & (b["targets"] > 0)
    from cdsr.models.layers import domain_softmax_loss

    want = domain_softmax_loss(h[valid] / 0.5, b["targets"][valid], b["target_domains"][valid], m.item_emb.weight,
                               VOCAB.domain_ranges)
    assert torch.allclose(ce2, want, atol=1e-5) and not torch.allclose(ce1, ce2)
    seen = {}
    real = S.sampled_softmax_loss

    def spy(q, table, pos, neg, scale=1.0, **kw):
        seen["neg"], seen["scale"] = neg, scale
        return real(q, table, pos, neg, scale, **kw)

    monkeypatch.setattr(S, "sampled_softmax_loss", spy)
    loss(loss="sampled", n_negatives=5, temperature=0.75, negatives_from="all")
    neg = seen["neg"]
    assert neg.shape[1] == 10 and seen["scale"] == pytest.approx(1 / 0.75)
    assert bool(((neg[:, :5] >= 1) & (neg[:, :5] <= 30)).all()) and bool(((neg[:, 5:] >= 31) & (neg[:, 5:] <= 60)).all())
    loss(loss="sampled", n_negatives=5)
    assert seen["neg"].shape[1] == 5 and seen["scale"] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        model_config("sasrec", {"temperature": 0.0}, "merged")


@pytest.mark.parametrize("C", [2, 40])  # 100 items: the gather path for 2 candidates, the table GEMM for 40
def test_dot_scores_with_candidates_on_both_paths(C):
    from cdsr.models.layers import DENSE_SCORE_RATIO, dot_scores

    g = torch.Generator().manual_seed(C)
    q, E, bias = torch.randn(6, 8, generator=g), torch.randn(100, 8, generator=g), torch.randn(100, generator=g)
    cand = torch.randint(0, 100, (6, C), generator=g)
    cand[0, 0] = 0  # padding
    assert (100 <= DENSE_SCORE_RATIO * C) == (C == 40)
    for b in (None, bias):
        got = dot_scores(q, E, cand, b)
        want = (q[:, None, :] * E[cand]).sum(-1) + (0 if b is None else b[cand])
        real = cand != 0
        assert torch.allclose(got[real], want[real], atol=1e-5) and torch.isinf(got[~real]).all()
