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
