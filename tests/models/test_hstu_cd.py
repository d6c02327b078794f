"""HSTU-CD: the attention implementations agree, the compute really shrinks, TAPE and DDSR do
what docs/methods.md "HSTU-CD" says, and no future item reaches position i."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_hstu import assert_loss_halves, make_batch

from cdsr.models.base import Vocab
from cdsr.models.hstu import HSTU, HSTUConfig
from cdsr.models.hstu_cd import TAPE, HSTUCD, HSTUCDConfig, next_domains
from cdsr.models.layers import last_state_index
from cdsr.models.intra_attention import (
    dense_plan,
    domain_delta,
    intra_domain_mask,
    live_fraction,
    tiled_plan,
)

VOCAB3 = Vocab(n_items=90, domain_ranges=((1, 30), (31, 60), (61, 90)))


def random_case(B=5, L=37, D=3, seed=0, h=2, e=8):
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, D, (B, L), generator=g)
    lengths = torch.tensor([L, L - 5, 1, 9, L - 1])[:B]
    valid = torch.arange(L)[None] >= L - lengths[:, None]
    dom[3, -9:] = torch.tensor([0, 0, 0, 1, 0, 0, 2, 0, 0])  # domains 1 and 2 with a single event
    dom = dom * valid
    q, k, v = (torch.randn(B, h, L, e, generator=g, dtype=torch.float64) for _ in range(3))
    pos_w = torch.randn(2 * L - 1, generator=g, dtype=torch.float64)
    tq = torch.randn(B, L, generator=g, dtype=torch.float64)
    bias_fn = lambda b, i, j: pos_w[i - j + L - 1] + tq[b, i] * 0.1 * (i - j)
    return dom, valid, q, k, v, bias_fn


def loop_reference(q, k, v, dom, valid, bias_fn, norm, same_domain=True):
    """Python loops over (row, query, key): the definition, for tiny shapes."""
    B, h, L, e = q.shape
    out = torch.zeros(B, h, L, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for i in range(L):
            for j in range(i + 1):
                if not (valid[b, i] and valid[b, j]) or (same_domain and dom[b, i] != dom[b, j]):
                    continue
                s = (q[b, :, i] * k[b, :, j]).sum(-1) + bias_fn(torch.tensor(b), torch.tensor(i), torch.tensor(j))
                out[b, :, i] += torch.nn.functional.silu(s)[:, None] * v[b, :, j] / norm
    return out.transpose(1, 2).reshape(B, L, -1)


@pytest.mark.parametrize("same_domain", [True, False])
def test_dense_intra_attention_matches_the_loop_definition(same_domain):
    dom, valid, q, k, v, bias_fn = random_case(B=4, L=11)
    plan = dense_plan(intra_domain_mask(dom, valid, same_domain), bias_fn, 11.0)
    torch.testing.assert_close(plan.attend(q, k, v), loop_reference(q, k, v, dom, valid, bias_fn, 11.0, same_domain))


@pytest.mark.parametrize("block", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("same_domain", [True, False])
def test_tiled_agrees_with_dense_forward_and_backward(block, same_domain):
    dom, valid, q, k, v, bias_fn = random_case()
    L = dom.shape[1]
    dense = dense_plan(intra_domain_mask(dom, valid, same_domain), bias_fn, float(L))
    tiled = tiled_plan(dom, valid, bias_fn, float(L), block=block, same_domain=same_domain)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_d = dense.attend(*leaves)
    grads_d = torch.autograd.grad((out_d * torch.cos(out_d)).sum(), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v)]
    out_t = tiled.attend(*leaves2)
    grads_t = torch.autograd.grad((out_t * torch.cos(out_t)).sum(), leaves2)
    torch.testing.assert_close(out_t, out_d)
    for a, b in zip(grads_t, grads_d):
        torch.testing.assert_close(a, b)
    assert (out_t[~valid] == 0).all()  # padding queries get nothing


def test_tiled_bias_gradient_matches_dense():
    dom, valid, q, k, v, _ = random_case()
    L = dom.shape[1]
    w = torch.randn(2 * L - 1, dtype=torch.float64, requires_grad=True)
    fn = lambda b, i, j: w[i - j + L - 1]
    g_d = torch.autograd.grad(dense_plan(intra_domain_mask(dom, valid), fn, 5.0).attend(q, k, v).sum(), w)[0]
    g_t = torch.autograd.grad(tiled_plan(dom, valid, fn, 5.0, block=8).attend(q, k, v).sum(), w)[0]
    torch.testing.assert_close(g_t, g_d)


def test_tiled_plan_computes_only_the_live_blocks():
    """Balanced D domains on long rows: exactly the lower triangle of ceil(s_d / T) tiles per
    domain is computed, i.e. close to delta * L^2 / 2 pairs (the live causal intra-domain
    pairs), far under the L^2 of the dense path."""
    g = torch.Generator().manual_seed(0)
    T, L = 64, 1024
    for D in (2, 4, 8):
        dom = torch.randint(0, D, (4, L), generator=g)
        valid = torch.ones_like(dom, dtype=torch.bool)
        valid[1, :100] = False  # a padded row
        plan = tiled_plan(dom, valid, None, 1.0, block=T)
        n = (torch.stack([((dom == d) & valid).sum(1) for d in range(D)], 1) + T - 1) // T  # tiles per domain
        assert plan.n_tiles == int((n * (n + 1) // 2).sum())
        frac, delta = live_fraction(plan, 4, L), float(domain_delta(dom, valid).mean())
        assert delta / 2 < frac < delta / 2 * (1 + T / (L / D)) * (1 + 2 * T / (L / D)), (D, frac, delta)
    single = tiled_plan(torch.zeros(1, L, dtype=torch.long), torch.ones(1, L, dtype=torch.bool), None, 1.0, T)
    assert single.n_tiles == 16 * 17 // 2  # one domain: exactly the causal lower triangle of tiles


def test_domain_delta():
    dom = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 2, 2, 2]])
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(domain_delta(dom, valid), torch.tensor([0.5, 10 / 16, 1.0]))


def test_last_state_index_matches_a_loop():
    dom, valid, *_ = random_case(B=5, L=20, D=3)
    idx = last_state_index(dom, valid, 3)
    for b in range(5):
        for i in range(20):
            for d in range(3):
                want = max([j for j in range(i + 1) if valid[b, j] and dom[b, j] == d], default=-1)
                assert idx[b, i, d] == want


def test_tape_is_zero_without_a_transition_and_follows_the_formula():
    torch.manual_seed(0)
    t = TAPE(3, 8)
    dom = torch.tensor([[0, 0, 1, 2]])
    nxt = torch.tensor([[0, 1, 2, 2]])
    r = t(dom, nxt)
    assert (r[0, 0] == 0).all() and (r[0, 3] == 0).all()
    want = t.emb.weight[1] * (t.proj.weight @ t.emb.weight[0] + t.proj.bias)
    torch.testing.assert_close(r[0, 1], want)


def cd_model(**kw) -> HSTUCD:
    torch.manual_seed(0)
    return HSTUCD(HSTUCDConfig(max_len=20, n_negatives=16, **kw), VOCAB3)


def batch3(seed=0, lengths=(12, 7, 3, 10)):
    """make_batch on 3 domains (item ids follow their domains)."""
    b = make_batch(lengths=lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for key, ik in (("domains", "items"), ("target_domains", "targets")):
        d = torch.randint(0, 3, b[key].shape, generator=g) * b["mask"]
        b[key] = d
        b[ik] = torch.where(b["mask"], (b[ik] - 1) % 30 + 1 + 30 * d, 0)
    b["domains"][:, 1:] = torch.where(b["mask"][:, 1:], b["target_domains"][:, :-1], 0)  # consistent next domains
    b["target_domain"] = b["target_domains"][:, -1]
    return b


def test_next_domains_of_real_training_batches_are_the_target_domains(tiny_root):
    """TAPE reads d_{i+1} from the input domains (and the requested domain at the end): in the
    loader's training batches that is exactly the domain each position is trained to predict."""
    from cdsr.data.loaders import SplitData, TrainDataset

    ds = TrainDataset(SplitData.load(tiny_root / "t" / "processed"), 20)
    b = ds[list(range(len(ds)))]
    m = b["mask"]
    assert m.sum() > 100 and (b["domains"][m] != next_domains(b)[m]).any()  # transitions exist
    assert torch.equal(next_domains(b)[m], b["target_domains"][m])


@pytest.mark.parametrize("parts", [dict(), dict(tape=False), dict(ddsr=False), dict(tape=False, ddsr=False),
                                   dict(intra_domain=False)])
def test_dense_and_tiled_models_agree(parts):
    b = batch3()
    m_dense = cd_model(attention="dense", **parts).eval()
    m_tiled = cd_model(attention="tiled", block=4, **parts).eval()
    m_tiled.load_state_dict(m_dense.state_dict())
    torch.testing.assert_close(m_tiled.encode(b)[b["mask"]], m_dense.encode(b)[b["mask"]], atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    ld = m_dense.loss(b)["loss"]
    torch.manual_seed(1)
    lt = m_tiled.loss(b)["loss"]
    torch.testing.assert_close(lt, ld, atol=1e-5, rtol=1e-5)
    gd = torch.autograd.grad(ld, list(m_dense.parameters()), allow_unused=True)
    gt = torch.autograd.grad(lt, list(m_tiled.parameters()), allow_unused=True)
    for a, c in zip(gt, gd):
        if a is not None or c is not None:
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_auto_picks_tiled_for_long_windows():
    m = cd_model()
    assert m.attention_impl(50) == "dense" and m.attention_impl(256) == "tiled"


def test_all_switches_off_is_hstu():
    b = batch3()
    torch.manual_seed(0)
    base = HSTU(HSTUConfig(max_len=20, n_negatives=16), VOCAB3).eval()
    off = cd_model(intra_domain=False, tape=False, ddsr=False).eval()
    off.load_state_dict(base.state_dict())
    torch.testing.assert_close(off.encode(b), base.encode(b), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["dense", "tiled"])
@pytest.mark.parametrize("i", [0, 4, 8, 10])
def test_causality(i, attention):
    """Items at >= i+1 and domains / timestamps at >= i+2 never reach positions <= i. (The
    domain of i+1 is the requested domain; TAPE may use it, tested below.)"""
    m = cd_model(attention=attention, block=4).eval()
    b = batch3(lengths=(12, 12, 12, 12))
    h = m.encode(b)
    g = torch.Generator().manual_seed(i)
    p = dict(b)
    p["items"] = torch.where(torch.arange(12) >= i + 1, torch.randint(1, 91, (4, 12), generator=g), b["items"])
    p["domains"] = torch.where(torch.arange(12) >= i + 2, torch.randint(0, 3, (4, 12), generator=g), b["domains"])
    p["timestamps"] = torch.where(torch.arange(12) >= i + 2, b["timestamps"] + torch.randint(0, 10**6, (4, 12), generator=g),
                                  b["timestamps"])
    p["targets"] = torch.randint(1, 91, (4, 12), generator=g)
    p["target_domains"] = torch.randint(0, 3, (4, 12), generator=g)
    h2 = m.encode(p)
    torch.testing.assert_close(h2[:, : i + 1], h[:, : i + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[:, i + 1:], h[:, i + 1:])


def test_only_tape_reads_the_next_domain():
    b = batch3(lengths=(12, 12, 12, 12))
    i = 5
    p = dict(b, domains=b["domains"].clone())
    p["domains"][:, i + 1] = (p["domains"][:, i + 1] + 1) % 3
    with_tape, without = cd_model().eval(), cd_model(tape=False).eval()
    assert not torch.allclose(with_tape.encode(p)[:, i], with_tape.encode(b)[:, i])
    torch.testing.assert_close(without.encode(p)[:, : i + 1], without.encode(b)[:, : i + 1], rtol=0, atol=1e-6)


def test_intra_domain_attention_isolates_domains_and_ddsr_reconnects_them():
    """Without TAPE and DDSR, a position's output depends on its own domain's events only;
    DDSR brings the other domains back (through their last states)."""
    b = batch3(lengths=(12, 12, 12, 12))
    other = b["domains"] != b["domains"][:, -1:]  # events of another domain than the last one
    p = dict(b, items=torch.where(other, (b["items"] + 7 - 1) % 30 + 1 + 30 * b["domains"], b["items"]))
    iso = cd_model(tape=False, ddsr=False).eval()
    torch.testing.assert_close(iso.encode(p)[:, -1], iso.encode(b)[:, -1], rtol=0, atol=1e-6)
    merged = cd_model(intra_domain=False, tape=False, ddsr=False).eval()
    assert not torch.allclose(merged.encode(p)[:, -1], merged.encode(b)[:, -1])
    ddsr = cd_model(tape=False).eval()
    assert not torch.allclose(ddsr.encode(p)[:, -1], ddsr.encode(b)[:, -1])


def test_left_padding_invariance():
    m, b = cd_model(attention="tiled", block=4).eval(), batch3()
    pad = 6
    wide = {k: torch.cat([torch.zeros(4, pad, dtype=v.dtype), v], 1) if v.ndim == 2 else v for k, v in b.items()}
    torch.testing.assert_close(m.encode(wide)[:, pad:][b["mask"]], m.encode(b)[b["mask"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(m.score(wide), m.score(b), rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "tiled"])
def test_loss_decreases(attention):
    assert_loss_halves(cd_model(dropout=0.0, attention=attention, block=4), batch3())


def test_single_domain_ddsr_is_identity():
    vocab = Vocab(n_items=30, domain_ranges=((1, 30),))
    torch.manual_seed(0)
    m = HSTUCD(HSTUCDConfig(max_len=20, n_negatives=8, tape=False), vocab).eval()
    b = make_batch()
    b = dict(b, domains=torch.zeros_like(b["domains"]), target_domains=torch.zeros_like(b["domains"]),
             target_domain=torch.zeros(4, dtype=torch.long), items=(b["items"] - 1) % 30 + 1,
             targets=(b["targets"] - 1) % 30 + 1)
    b["items"], b["targets"] = b["items"] * b["mask"], b["targets"] * b["mask"]
    no = HSTUCD(dataclasses.replace(m.cfg, ddsr=False), vocab).eval()
    no.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ddsr")})
    torch.testing.assert_close(m.encode(b), no.encode(b), rtol=0, atol=0)
    assert torch.isfinite(m.loss(b)["loss"])


def test_auto_block_follows_the_run_length():
    from cdsr.models.intra_attention import auto_block

    assert auto_block(torch.tensor([[400, 400]])) == 128  # quarter of 400 -> 100 -> nearest power 128
    assert auto_block(torch.tensor([[100] * 8])) == 32
    assert auto_block(torch.tensor([[5, 3]])) == 16  # floor
    assert auto_block(torch.tensor([[4000]])) == 128  # cap
    dom, valid, q, k, v, fn = random_case()
    auto = tiled_plan(dom, valid, fn, 7.0, block=0)
    torch.testing.assert_close(auto.attend(q, k, v), dense_plan(intra_domain_mask(dom, valid), fn, 7.0).attend(q, k, v))
