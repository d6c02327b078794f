"""AutoCDSR (SASRec / BERT4Rec) and AutoCDSR+ (IB tokens): the cross-domain attention mass
against a loop reference, the objectives' contract with the Pareto strategy, causality / no
target leak, and the IB mask (no direct cross-domain item attention, information still flows)."""

from __future__ import annotations

import dataclasses

import contextlib
import math

import pytest
import torch

from cdsr.models.autocdsr import AutoCDSRPlus, ib_attention_mask, ib_attention_mass
from cdsr.models.base import Vocab
from cdsr.models.layers import cross_domain_attention_mass
from cdsr.models.registry import build_model, get_spec, model_config
from cdsr.train.config import TrainConfig
from cdsr.train.strategy import STRATEGIES, StandardStrategy

VOCAB = Vocab(n_items=60, domain_ranges=((1, 20), (21, 40), (41, 60)), domain_names=("A", "B", "C"))
NAMES = ["autocdsr_sasrec", "autocdsr_bert4rec", "autocdsr_plus"]
BERT_LIKE = ["autocdsr_bert4rec", "autocdsr_plus"]


def _items_of(domains: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return domains * 20 + torch.randint(1, 21, domains.shape, generator=g)


def _batch(B=4, L=12, seed=0, n_domains=3):
    g = torch.Generator().manual_seed(seed)
    domains = torch.randint(0, n_domains, (B, L), generator=g)
    items = _items_of(domains, g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False  # left padding on one row
    items, domains = items * mask, domains * mask
    ts = torch.cumsum(torch.randint(0, 3, (B, L), generator=g) * 86400, 1) + 1_400_000_000
    tdom = torch.roll(domains, -1, 1)
    tdom[:, -1] = torch.randint(0, n_domains, (B,), generator=g)
    targets = _items_of(tdom, g)
    return {"items": items, "domains": domains, "timestamps": ts * mask, "mask": mask, "targets": targets * mask,
            "target_domains": tdom * mask, "target_domain": tdom[:, -1], "target_timestamp": ts[:, -1] + 86400}


def _model(name, **over):
    torch.manual_seed(0)
    section = {"d": 16, "heads": 2, "layers": 2, "max_len": 12, "dropout": 0.1, **over}
    return build_model(name, model_config(name, section, "merged"), VOCAB).eval()


# ---------------------------------------------------------------- the cross-domain attention mass

def _reference_mass(probs, domains, valid):
    total, n = 0.0, 0
    for p in probs:
        B, H, L, _ = p.shape
        for b in range(B):
            for h in range(H):
                for i in range(L):
                    if not valid[b, i]:
                        continue
                    total += sum(float(p[b, h, i, j]) for j in range(L) if valid[b, j] and domains[b, j] != domains[b, i])
                    n += 1
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_domain_mass_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, L = 3, 2, 7
    probs = [torch.rand(B, H, L, L, generator=g).softmax(-1) for _ in range(2)]
    domains = torch.randint(0, 3, (B, L), generator=g)
    valid = torch.rand(B, L, generator=g) < 0.7
    valid[:, -1] = True
    got = cross_domain_attention_mass(probs, domains, valid)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_reference_mass(probs, domains, valid), rel=1e-5)
    # the reference code's scale: per layer the mean over valid (query, key) cells and heads, summed over layers
    cells = 0.0
    for p in probs:
        s = n = 0.0
        for b in range(B):
            for h in range(H):
                for i in range(L):
                    for j in range(L):
                        if valid[b, i] and valid[b, j]:
                            s += float(p[b, h, i, j]) * bool(domains[b, j] != domains[b, i])
                            n += 1
        cells += s / n
    assert cross_domain_attention_mass(probs, domains, valid, "cell").item() == pytest.approx(cells, rel=1e-5)
    with pytest.raises(ValueError, match="scale"):
        cross_domain_attention_mass(probs, domains, valid, "key")


def test_cross_domain_mass_is_zero_for_one_domain_and_positive_otherwise():
    m = _model("autocdsr_sasrec")
    one = _batch(n_domains=1)
    _, cd = m._objectives(one)
    assert cd.item() == 0.0
    _, cd = m._objectives(_batch())
    assert cd.item() > 0.0
    b = _model("autocdsr_bert4rec")
    torch.manual_seed(0)
    assert b._objectives(one)[1].item() == 0.0
    assert b._objectives(_batch())[1].item() > 0.0


def test_bert4rec_mass_is_taken_under_the_bidirectional_mask():
    """A query attends to later keys too: the mass on a later other-domain key counts."""
    m = _model("autocdsr_bert4rec")
    items = torch.tensor([[3, 25]])  # domain A then domain B
    domains = torch.tensor([[0, 1]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, probs = m.encode(items, domains, mask, need_probs=True)
    assert (probs[0][0, :, 0, 1] > 0).all()  # the first query sees the second (future) key
    assert cross_domain_attention_mass(probs, domains, mask).item() > 0


# ---------------------------------------------------------------- the objectives' contract

@pytest.mark.parametrize("name", NAMES)
def test_one_standard_step_in_fixed_mode(name):
    m = _model(name, mode="fixed", alpha=0.5).train()
    assert m.train_strategy is None
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    stats = StandardStrategy().step(m, _batch(), opt, TrainConfig(), contextlib.nullcontext)
    assert {"loss", "rec", "cd_attn"} <= set(stats)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["loss"] == pytest.approx(stats["rec"] + 0.5 * stats["cd_attn"], rel=1e-5)
    grads = [p.grad for p in m.shared_parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


@pytest.mark.parametrize("name", NAMES)
def test_aux_objectives_are_scalars_with_gradients_on_the_shared_parameters(name):
    m = _model(name).train()
    assert m.train_strategy == "pareto"
    torch.manual_seed(1)
    out = m.aux_objectives(_batch())
    assert set(out) == {"rec", "cd"}
    for key in ("rec", "cd"):
        assert out[key].dim() == 0 and out[key].requires_grad and torch.isfinite(out[key])
    shared = m.shared_parameters()
    g_rec = torch.autograd.grad(out["rec"], shared, retain_graph=True, allow_unused=True)
    g_cd = torch.autograd.grad(out["cd"], shared, allow_unused=True)
    for g in (g_rec, g_cd):
        assert sum(float(x.abs().sum()) for x in g if x is not None) > 0
    # pareto mode: loss() is the recommendation loss (the aux term is logged, not added)
    torch.manual_seed(1)
    lo = m.loss(_batch())
    assert lo["loss"].item() == pytest.approx(out["rec"].item(), rel=1e-5)
    assert lo["cd_attn"].item() == pytest.approx(out["cd"].item(), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_shared_parameters_are_the_encoder_without_embedding_tables(name):
    m = _model(name)
    shared = m.shared_parameters()
    assert shared
    ids = {id(p) for p in shared}
    assert ids <= {id(p) for p in m.parameters()}
    tables = [m.item_emb.weight, m.pos_emb.weight, m.dom_emb.weight] + ([m.ib_emb.weight] if name == "autocdsr_plus" else [])
    assert not ids & {id(t) for t in tables}
    assert ids == {id(p) for p in m.encoder.parameters()}


def test_registry_and_config_checks():
    for name in NAMES:
        assert get_spec(name).variants == ("merged",)
        with pytest.raises(ValueError):
            model_config(name, {}, "single")
    with pytest.raises(ValueError, match="ib_tokens"):
        _model("autocdsr_plus", ib_tokens=0)
    with pytest.raises(ValueError, match="alpha"):
        _model("autocdsr_sasrec", alpha=-1.0)


@pytest.mark.skipif("pareto" not in STRATEGIES, reason="the Pareto strategy is not registered yet")
@pytest.mark.parametrize("name", NAMES)
def test_one_pareto_step(name):
    m = _model(name).train()
    before = [p.detach().clone() for p in m.shared_parameters()]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    stats = STRATEGIES[m.train_strategy]().step(m, _batch(), opt, TrainConfig(), contextlib.nullcontext)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, m.shared_parameters()))


# ---------------------------------------------------------------- causality / no target leak

@pytest.mark.parametrize("need_probs", [False, True])
@pytest.mark.parametrize("i", [3, 6, 10])
def test_autocdsr_sasrec_is_causal(i, need_probs):
    m, b = _model("autocdsr_sasrec"), _batch()
    h, _ = m.encode(b, need_probs=need_probs)
    fut = dict(b, items=b["items"].clone(), domains=b["domains"].clone())
    fut["domains"][:, i + 1:] = (fut["domains"][:, i + 1:] + 1) % 3
    fut["items"][:, i + 1:] = _items_of(fut["domains"][:, i + 1:], torch.Generator().manual_seed(9))
    h2, _ = m.encode(fut, need_probs=need_probs)
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-6)
    assert not torch.allclose(h[:, i + 1:], h2[:, i + 1:])


def test_autocdsr_sasrec_probs_are_causal():
    m, b = _model("autocdsr_sasrec"), _batch()
    _, probs = m.encode(b, need_probs=True)
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert all((p[..., upper] == 0).all() for p in probs)


@pytest.mark.parametrize("name", BERT_LIKE)
def test_bert_like_score_ignores_the_target_and_padding(name):
    m, b = _model(name), _batch()
    s = m.score(b)
    assert torch.equal(s, m.score(dict(b, targets=torch.randint(1, 61, b["targets"].shape))))
    short = {k: (v[:1, 3:] if v.dim() == 2 else v[:1]) for k, v in b.items()}  # less left padding
    assert torch.allclose(m.score(short)[0], s[0], atol=1e-5)
    items, domains, _ = m.inference_inputs(b)
    assert (items[:, -1] == m.mask_id).all() and torch.equal(items[:, :-1][:, -11:], b["items"][:, -11:])
    assert torch.equal(domains[:, -1], b["target_domain"])  # the [MASK] carries the requested domain
    other = dict(b, target_domain=(b["target_domain"] + 1) % 3)
    assert not torch.allclose(s, m.score(other))


@pytest.mark.parametrize("name", NAMES)
def test_score_shapes(name):
    m, b = _model(name), _batch()
    s = m.score(b)
    assert s.shape == (4, VOCAB.n_items + 1) and torch.isinf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    cand = torch.randint(1, 61, (4, 7))
    sc = m.score(b, cand)
    assert sc.shape == (4, 7)
    assert torch.allclose(sc, s.gather(1, cand), atol=1e-5)


# ---------------------------------------------------------------- AutoCDSR+ (IB tokens)

def test_ib_mask_rules_and_no_empty_rows():
    # 2 domains x K=2 IB tokens, then items [pad, A, B, A, MASK(B)]
    tok_dom = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0, 1]])
    valid = torch.tensor([[True] * 4 + [False, True, True, True, True]])
    am = ib_attention_mask(tok_dom, valid, 4)[0, 0]
    assert am.any(-1).all()  # every row has a key
    ib, items = slice(0, 4), [5, 6, 7, 8]
    assert am[ib, ib].all()  # IB tokens of all domains see each other
    for q in items:
        for k in range(9):
            want = bool(valid[0, k]) and tok_dom[0, k] == tok_dom[0, q]
            assert bool(am[q, k]) == want, (q, k)
    assert am[0, 5] and am[0, 7] and not am[0, 6] and not am[0, 8] and not am[0, 4]  # IB of A: A items only
    assert am[4].nonzero().flatten().tolist() == [4]  # a padding query sees itself only


def _plus_probs(m, b):
    items, domains, mask = m.inference_inputs(b)
    h, probs = m.encode(items, domains, mask, need_probs=True)
    return items, domains, mask, h, probs


def test_ib_no_item_query_attends_to_another_domains_item():
    m, b = _model("autocdsr_plus"), _batch()
    _, domains, mask, h, probs = _plus_probs(m, b)
    assert torch.isfinite(h).all()
    n = m.n_ib
    cross = (domains[:, :, None] != domains[:, None, :]) & mask[:, :, None]
    for p in probs:
        assert torch.isfinite(p).all()
        it = p[:, :, n:, n:]  # item queries x item keys
        assert (it.permute(0, 2, 3, 1)[cross] == 0).all()  # exactly zero
        assert (it.permute(0, 2, 3, 1)[~cross & mask[:, None, :] & mask[:, :, None]] > 0).any()
        # item queries see only their own domain's IB tokens
        ib_dom = m.ib_dom
        other_ib = (domains[:, :, None] != ib_dom[None, None, :]) & mask[:, :, None]
        assert (p[:, :, n:, :n].permute(0, 2, 3, 1)[other_ib] == 0).all()
        assert (p[:, :, n:, :n].sum(-1)[mask[:, None, :].expand(-1, p.shape[1], -1)] > 0).all()
    # the appended [MASK] (last position) reads the target domain only: its items + its IB tokens
    last = probs[0][:, :, -1]  # [B, h, T]
    tok_dom = torch.cat([ib_dom.expand(4, -1), domains], 1)
    off = tok_dom != b["target_domain"][:, None]
    assert (last.permute(0, 2, 1)[off] == 0).all()


def _change_domain_a_item(b, row=1):
    """A copy of ``b`` with one domain-0 item of ``row`` replaced; returns (copy, position)."""
    pos = int((b["domains"][row] == 0).nonzero()[0])
    b2 = dict(b, items=b["items"].clone())
    b2["items"][row, pos] = 1 + (b["items"][row, pos] % 20)
    return b2, pos


@pytest.mark.parametrize("layers,sync,flows", [(2, True, True), (3, False, True), (2, False, False), (1, True, False)])
def test_ib_tokens_carry_cross_domain_information(layers, sync, flows):
    """Changing a domain-A item changes the output at domain-B/C positions iff there are enough
    layers for the path A item -> IB_A (-> merge / IB_B) -> B item; it always changes A outputs."""
    m, b = _model("autocdsr_plus", layers=layers, ib_sync=sync), _batch()
    b2, pos = _change_domain_a_item(b)
    h1 = m.encode(b["items"], b["domains"], b["mask"])[0][1]
    h2 = m.encode(b2["items"], b2["domains"], b2["mask"])[0][1]
    other = b["domains"][1] != 0
    a_pos = (b["domains"][1] == 0) & (torch.arange(12) != pos)
    assert not torch.allclose(h1[a_pos], h2[a_pos], atol=1e-6)
    assert torch.allclose(h1[other], h2[other], atol=1e-6) != flows
    if flows:  # also the score of a requested domain other than A
        s1 = m.score(dict(b, target_domain=torch.full((4,), 1)))
        s2 = m.score(dict(b2, target_domain=torch.full((4,), 1)))
        assert not torch.allclose(s1[1], s2[1], atol=1e-6)


def test_ib_mass_objective():
    m = _model("autocdsr_plus").train()
    torch.manual_seed(0)
    _, mass = m._objectives(_batch())
    assert 0 < mass.item() < 1
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(2, 2, 6, 6, generator=g).softmax(-1)]
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    want = sum(float(probs[0][b, h, 2 + i, :2].sum()) for b in range(2) for h in range(2) for i in range(4) if valid[b, i]) / (7 * 2)
    assert ib_attention_mass(probs, 2, valid).item() == pytest.approx(want, rel=1e-5)
    assert ib_attention_mass(probs, 2, valid, "cell").item() == pytest.approx(want / 2, rel=1e-5)  # / n_ib keys
    m = _model("autocdsr_plus").train()
    cell = m.__class__(dataclasses.replace(m.cfg, cd_scale="cell"), m.vocab)
    cell.load_state_dict(m.state_dict())
    torch.manual_seed(0)
    _, q_mass = m._objectives(_batch())
    torch.manual_seed(0)
    _, c_mass = cell.train()._objectives(_batch())
    assert c_mass.item() == pytest.approx(q_mass.item() * len(m.encoder.blocks) / m.n_ib, rel=1e-4)


def test_ib_fully_padded_history_has_no_nan():
    m = _model("autocdsr_plus")
    b = _batch()
    b = dict(b, mask=torch.zeros_like(b["mask"]), items=torch.zeros_like(b["items"]), domains=torch.zeros_like(b["domains"]))
    assert torch.isfinite(m.score(b)[:, 1:]).all()
    assert isinstance(m, AutoCDSRPlus)


# ---------------------------------------------------------------- learning + a real run

@pytest.mark.parametrize("name", NAMES)
def test_fixed_mode_loss_decreases(name):
    m, b = _model(name, mode="fixed"), _batch(B=16)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        torch.manual_seed(len(losses) % 4)
        loss = m.loss(b)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


@pytest.mark.parametrize("name,mode", [(n, "fixed") for n in NAMES] + [
    pytest.param("autocdsr_plus", "pareto", marks=pytest.mark.skipif("pareto" not in STRATEGIES, reason="no pareto strategy"))])
def test_one_epoch_train_run_on_the_tiny_dataset(tmp_path, tiny_root, in_root, name, mode):
    from cdsr.config import load_params
    from cdsr.train.run import train_run

    params = load_params()
    params["models"][name] = {**params["models"][name], "d": 16, "layers": 2, "heads": 2, "max_len": 20, "mode": mode}
    params["train"] = {**params["train"], "batch_size": 64, "progress": False}
    params["evaluate"] = {"protocols": ["full"], "max_len": 20}
    m = train_run("t", name, "merged", params, tmp_path / "run", seed=0, epochs=1, data_root=tiny_root)
    assert m["model"] == name and 0 <= m["protocols"]["full"]["overall"]["NDCG@10"] <= 1


# ----------------------------------------------------------------- domain-label noise (Section 5.5)


def test_noisy_item_labels_flip_a_seeded_fraction_to_another_domain():
    from cdsr.models.autocdsr import noisy_item_labels

    vocab = Vocab(3000, ((1, 1000), (1001, 2000), (2001, 3000)))
    true = torch.arange(3001).sub(1).clamp_min(0) // 1000
    lab = noisy_item_labels(vocab, 0.2, seed=5)
    flipped = lab[1:] != true[1:]
    assert lab[0] == 0 and 0.17 < flipped.float().mean() < 0.23
    assert torch.equal(lab, noisy_item_labels(vocab, 0.2, seed=5))
    assert not torch.equal(lab, noisy_item_labels(vocab, 0.2, seed=6))
    assert torch.equal(noisy_item_labels(vocab, 0.0, seed=5), true)
    assert ((lab >= 0) & (lab < 3)).all()


@pytest.mark.parametrize("name", ["autocdsr_sasrec", "autocdsr_bert4rec", "autocdsr_plus"])
def test_label_noise_is_exactly_relabelled_input_domains(name):
    """A model with label_noise reads, everywhere (embedding, L_cd pairs, IB mask), the catalogue's
    noisy labels: it equals the clean model (same weights) fed the relabelled domains, and differs
    from the clean model fed the true ones; its recommendation loss still uses the true domains."""
    vocab = Vocab(20, ((1, 10), (11, 20)))
    small = {"d": 16, "layers": 2, "heads": 2, "max_len": 8, "dropout": 0.0}
    torch.manual_seed(0)
    clean = build_model(name, model_config(name, small, "merged"), vocab).eval()
    noisy = build_model(name, model_config(name, {**small, "label_noise": 0.5, "label_noise_seed": 1}, "merged"),
                        vocab).eval()
    noisy.load_state_dict(clean.state_dict())
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, 21, (6, 8), generator=g)
    batch = {"items": items, "domains": (items - 1) // 10, "mask": torch.ones(6, 8, dtype=torch.bool),
             "timestamps": torch.zeros(6, 8, dtype=torch.long), "target_domain": torch.tensor([0, 1] * 3)}
    relabelled = {**batch, "domains": noisy.item_label[items]}
    assert not torch.equal(relabelled["domains"], batch["domains"])
    with torch.no_grad():
        assert torch.allclose(noisy.score(batch), clean.score(relabelled), atol=1e-5)
        assert not torch.allclose(noisy.score(batch), clean.score(batch), atol=1e-3)
    targets = torch.randint(1, 21, (6, 8), generator=g)
    train = {**batch, "targets": targets, "target_domains": (targets - 1) // 10}
    torch.manual_seed(2)
    a = noisy.aux_objectives(train)
    if name == "autocdsr_sasrec":  # (BERT4Rec's Cloze loss takes the true domains of the hidden items)
        b = clean.aux_objectives({**train, "domains": relabelled["domains"]})
        assert torch.allclose(a["cd"], b["cd"]) and torch.allclose(a["rec"], b["rec"])
    assert math.isfinite(float(a["rec"])) and 0.0 <= float(a["cd"]) <= 1.0


def test_label_noise_must_be_a_fraction():
    with pytest.raises(ValueError, match="label_noise"):
        build_model("autocdsr_sasrec", model_config("autocdsr_sasrec", {"label_noise": 1.5}, "merged"),
                    Vocab(20, ((1, 10), (11, 20))))
