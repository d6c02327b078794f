"""ABXI: causality of every stream and of the representation, the target domain picking its
branch, dLoRA / iLoRA starting as identity residuals, fitting a batch with 2 and 3 domains,
and scores equal to the dot products of score_parts."""

from __future__ import annotations

import pytest
import torch
from helpers import fit_batch
from test_gca import VOCAB, VOCAB3, _batch  # the same 2- and 3-domain fixtures

from cdsr.models.layers import domain_streams
from cdsr.models.registry import build_model, model_config

SMALL = {"d": 16, "heads": 2, "max_len": 12, "dropout": 0.1, "n_negatives": 8, "rank_domain": 4, "rank_invariant": 4}


def _model(vocab=VOCAB, **extra):
    torch.manual_seed(0)
    m = build_model("abxi", model_config("abxi", {**SMALL, **extra}, "merged"), vocab)
    for p in m.parameters():  # LoRA B starts at zero: perturb so that every path carries signal
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return m.eval()


def _future_changed(b, i):
    """``b`` with other items and domains at positions >= i + 1."""
    fut = {k: v.clone() for k, v in b.items()}
    g = torch.Generator().manual_seed(5)
    fut["domains"][:, i + 1:] = torch.randint(0, 2, fut["domains"][:, i + 1:].shape, generator=g)
    fut["items"][:, i + 1:] = fut["domains"][:, i + 1:] * 30 + torch.randint(1, 31, fut["items"][:, i + 1:].shape,
                                                                               generator=g)
    fut["mask"][:, i + 1:] = True
    return fut


@pytest.mark.parametrize("extra", [{"positions": "first"}, {"positions": "last"},
                                   {"positions": "last", "pad_sink": True, "init": "abxi"}])
@pytest.mark.parametrize("i", [3, 7, 10])
def test_causality(i, extra):
    """Items and domains at >= i+1 never change h^x or any stream state at <= i."""
    m, b = _model(**extra), _batch()
    h, S = m.encode(b)
    h2, S2 = m.encode(_future_changed(b, i))
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-5)
    assert torch.allclose(S[:, : i + 1], S2[:, : i + 1], atol=1e-5)
    assert not torch.allclose(h[:, i + 1:], h2[:, i + 1:])


def test_the_target_domain_picks_its_branch():
    m, b = _model(), _batch()
    h, S = m.encode(b)
    hx, s = h[:, -1], S[:, -1]
    r0 = m.represent(hx, s, torch.zeros(4, dtype=torch.long))
    r1 = m.represent(hx, s, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(r0, r1)
    with torch.no_grad():  # domain 1's projector does not touch domain-0 targets
        for p in m.proj[1].parameters():
            p.add_(1.0)
    assert torch.allclose(m.represent(hx, s, torch.zeros(4, dtype=torch.long)), r0, atol=1e-6)
    assert not torch.allclose(m.represent(hx, s, torch.ones(4, dtype=torch.long)), r1)
    mixed = m.represent(hx, s, torch.tensor([0, 1, 0, 1]))
    assert torch.allclose(mixed[[0, 2]], r0[[0, 2]], atol=1e-6)  # row subsets: other GEMM blocking


def test_attention_dropout_follows_dropout_unless_set():
    assert _model(dropout=0.3).attn.p == 0.3
    assert _model(dropout=0.3, attn_dropout=0.0).attn.p == 0.0
    with pytest.raises(ValueError, match="attn_dropout"):
        model_config("abxi", {"attn_dropout": 1.0}, "merged")


def test_adapters_start_as_zero_maps():
    torch.manual_seed(0)
    m = build_model("abxi", model_config("abxi", SMALL, "merged"), VOCAB)
    x = torch.randn(5, 16)
    for lora in [*m.dlora, *m.ilora]:
        assert torch.equal(lora(x), torch.zeros_like(x))


@pytest.mark.parametrize(("vocab", "D", "loss", "extra"), [
    (VOCAB, 2, "sampled", {}), (VOCAB3, 3, "sampled", {}), (VOCAB, 2, "ce", {}),
    (VOCAB, 2, "sampled", {"positions": "last", "loss_average": "user"}),
    (VOCAB3, 3, "ce", {"positions": "last", "loss_average": "user"})])
def test_fits_a_batch(vocab, D, loss, extra):
    torch.manual_seed(0)
    m = build_model("abxi", model_config("abxi", {**SMALL, "dropout": 0.0, "loss": loss, **extra}, "merged"), vocab)
    losses = fit_batch(m, _batch(D=D), steps=60, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for name, p in m.named_parameters():
        assert p.grad is not None, name


def test_scores_are_the_dot_products_of_score_parts():
    m, b = _model(vocab=VOCAB3), _batch(D=3)
    q, table, bias = m.score_parts(b)
    assert bias is None and q.shape == (4, 16)
    full = m.score(b)
    assert torch.allclose(full[:, 1:], q @ table[1:].T, atol=1e-5)
    cand = torch.tensor([[1, 5, 40]] * 4)
    assert torch.allclose(m.score(b, cand), full.gather(1, cand), atol=1e-5)


def test_last_positions_count_merged_steps_back_from_the_window_end():
    m = _model(positions="last", dropout=0.0)
    items = torch.tensor([[0, 3, 40, 5, 41]])
    valid, doms = items > 0, (items > 30).long()
    got = m._embed(items, valid) - m.item_emb(items)
    assert torch.allclose(got[0, 1:], m.pos_emb.weight[[3, 2, 1, 0]], atol=1e-6)  # the last event: 0
    (o0, v0), (o1, v1) = domain_streams(doms, valid, 2)
    for o, v in ((o0, v0), (o1, v1)):  # a domain stream: its events' merged distance to the end
        x = m._embed(items.gather(1, o), v, o, 5) - m.item_emb(items.gather(1, o))
        assert torch.allclose(x[v], m.pos_emb.weight[4 - o[v]], atol=1e-6)
    assert torch.equal(o1[v1], torch.tensor([2, 4]))


@pytest.mark.parametrize("extra", [{"positions": "first"}, {"positions": "last"}, {"pad_sink": True}])
def test_last_position_scoring_equals_the_full_encoding(extra):
    for vocab, D in ((VOCAB, 2), (VOCAB3, 3)):
        m, b = _model(vocab=vocab, **extra), _batch(D=D)
        b["domains"][2, :] = 0  # a row without any event of the other domains
        b["items"][2, :] = torch.arange(1, 13)
        b["target_domain"][2] = 1  # ... asked for a domain it has no event of: the empty state
        h, S = m.encode(b)
        want = m.represent(h[:, -1], S[:, -1], b["target_domain"])
        q, _, _ = m.score_parts(b)
        assert torch.allclose(q, want, atol=1e-5)


def _gca_model(vocab=VOCAB, layers=(0, 1), **extra):
    torch.manual_seed(0)
    m = build_model("abxi_gca", model_config("abxi_gca", {**SMALL, "gca_layers": list(layers), **extra}, "merged"), vocab)
    for p in m.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        for g in m.gca.values():
            g.alpha.fill_(2.0)  # gates well open: the cross-attention must matter
    return m.eval()


@pytest.mark.parametrize("layers", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("i", [3, 7])
def test_gca_over_abxi_is_causal_and_scores_its_last_position(layers, i):
    m, b = _gca_model(layers=layers), _batch()
    h, S = m.encode(b)
    h2, S2 = m.encode(_future_changed(b, i))
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-5)
    assert torch.allclose(S[:, : i + 1], S2[:, : i + 1], atol=1e-5)
    want = m.represent(h[:, -1], S[:, -1], b["target_domain"])
    assert torch.allclose(m.score_parts(b)[0], want, atol=1e-5)
    plain = build_model("abxi", model_config("abxi", SMALL, "merged"), VOCAB)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gca.")})
    assert not torch.allclose(plain.eval().encode(b)[1], S, atol=1e-4)  # GCA changes the domain streams


def test_gca_over_abxi_fits_and_measures_orthogonality(tiny_root):
    from cdsr.data.loaders import SplitData
    from cdsr.evaluate.protocols import EvalConfig
    from cdsr.models.base import Vocab

    torch.manual_seed(0)
    m = build_model("abxi_gca", model_config("abxi_gca", {**SMALL, "dropout": 0.0, "gca_layers": [0, 1]}, "merged"), VOCAB3)
    losses = fit_batch(m, _batch(D=3), steps=60, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert all(p.grad is not None for p in m.gca.parameters())
    data = SplitData.load(tiny_root / "t" / "processed")
    m = build_model("abxi_gca", model_config("abxi_gca", {**SMALL, "max_len": 20}, "merged"),
                    Vocab.from_ranges(data.domain_ranges, data.domain_names))
    diag = m.epoch_diagnostics(data, EvalConfig(max_len=20), "cpu")
    assert 0 < diag["cos"] <= 1 and {f"cos_gca{k}" for k in (0,)} <= set(diag)
    assert diag["gate_gca0_Books"] == pytest.approx(0.5)  # sigmoid(alpha_init = 0)
    with pytest.raises(ValueError, match="gca_layers"):
        model_config("abxi", {"gca_layers": [2]}, "merged")


def test_pad_sink_is_attention_over_the_zero_vectors_themselves():
    """The sink key (log n on one bias key) equals attending to n literal zero inputs, as ABXI's
    unmasked padding does; its weight grows with the count and vanishes at 0."""
    from cdsr.models.layers import MultiHeadAttention, attention_mask

    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, 0.0).eval()
    torch.nn.init.normal_(mha.qkv.bias, std=0.5)  # non-zero biases: the sink must carry signal
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    x = x * valid[..., None]
    n = torch.tensor([[3] * 5, [4] * 5])  # zero vectors seen by each query
    got, _ = mha(x, attention_mask(valid, causal=True), sink=n)
    for b in range(2):
        k = int(n[b, 0])
        ext = torch.cat([torch.zeros(k, 8), x[b]], 0)[None]  # the zeros as real keys, left of the row
        ok = torch.cat([torch.ones(k, dtype=torch.bool), valid[b]])[None]
        full = attention_mask(ok, causal=True)
        full[..., :k] = True  # every query sees every zero vector
        want, _ = mha(ext, full)
        rows = valid[b]
        assert torch.allclose(got[b][rows], want[0, k:][rows], atol=1e-5)
    none, _ = mha(x, attention_mask(valid, causal=True), sink=torch.zeros(2, 5, dtype=torch.long))
    plain, _ = mha(x, attention_mask(valid, causal=True))
    assert torch.allclose(none[valid], plain[valid], atol=1e-6)
    probs = mha(x, attention_mask(valid, causal=True), need_probs=True, sink=n)[1]
    assert probs.shape == (2, 2, 5, 6) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 5))


def test_pad_sink_counts_the_zero_slots_before_each_query():
    """Merged stream: its padding; a domain stream: the merged slots at or before the query that
    are not its domain's events (padding and other domains), never anything later."""
    m = _model(pad_sink=True, dropout=0.0)
    seen = []
    orig = m.attn.forward
    m.attn.forward = lambda x, mask, need_probs=False, last_only=False, sink=None, rows=None: (
        seen.append(sink), orig(x, mask, need_probs, last_only, sink, rows))[1]
    items = torch.tensor([[0, 0, 3, 40, 5, 41, 42]])
    b = {"items": items, "domains": (items > 30).long(), "mask": items > 0}
    m.encode(b)
    merged, dom0, dom1 = seen
    assert merged[0, 2:].tolist() == [2, 2, 2, 2, 2]
    (o0, v0), (o1, v1) = domain_streams(b["domains"], b["mask"], 2)
    assert dom0[v0].tolist() == [2, 3]  # items 3 (slot 2) and 5 (slot 4): 2 pads, then + item 40
    assert dom1[v1].tolist() == [3, 4, 4]  # 40 (slot 3), 41, 42: pads + items 3 and 5 before them


def test_abxi_init_matches_its_code():
    torch.manual_seed(0)
    m = build_model("abxi", model_config("abxi", {**SMALL, "init": "abxi"}, "merged"), VOCAB)
    assert m.item_emb.weight.abs().max() <= 0.04 and m.pos_emb.weight.abs().max() <= 0.04
    assert torch.equal(m.item_emb.weight[0], torch.zeros(16))
    assert m.ffn.w12.weight.std().item() == pytest.approx(0.02, rel=0.2)
    bound = (6 / (16 + 48)) ** 0.5  # Xavier-uniform on the [3d, d] input projection
    assert m.attn.qkv.weight.abs().max() <= bound and m.attn.qkv.weight.abs().max() > 0.8 * bound
    assert torch.equal(m.attn.qkv.bias, torch.zeros(48)) and torch.equal(m.attn.out.bias, torch.zeros(16))
    assert all(torch.equal(lo.B, torch.zeros_like(lo.B)) for lo in m.dlora)


@pytest.mark.parametrize("extra", [{}, {"pad_sink": True, "attn_dropout": 0.0}, {"gca_layers": [0, 1]}])
def test_the_packed_encoder_computes_the_padded_ones_numbers(extra):
    """packed (the encoder on valid positions only) = the padded computation: the same loss, the
    same dropout draws, gradients equal up to float rounding."""
    name = "abxi_gca" if "gca_layers" in extra else "abxi"
    out = []
    for packed in (False, True):
        torch.manual_seed(0)
        m = build_model(name, model_config(name, {**SMALL, **extra, "packed": packed}, "merged"), VOCAB).train()
        torch.manual_seed(3)
        loss = m.loss(_batch())["loss"]
        loss.backward()
        out.append((loss.detach(), [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = out
    assert torch.allclose(a, b, rtol=1e-6)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("extra", [{}, {"pad_sink": True}, {"packed": False}, {"positions": "first"}])
@pytest.mark.parametrize("name", ["abxi", "abxi_gca"])
def test_evaluation_mode_computes_training_modes_numbers(extra, name):
    """Without dropout, training mode (padding rows zeroed, keys and values projected) and
    evaluation mode (padding left as is, the folded last-position attention) give the same
    valid states and the same scores."""
    torch.manual_seed(0)
    m = build_model(name, model_config(name, {**SMALL, "dropout": 0.0, **extra}, "merged"), VOCAB)
    for p in m.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    b = _batch()
    with torch.no_grad():
        m.train()
        h_t, S_t = m.encode(b)
        q_t = m.represent(h_t[:, -1], S_t[:, -1], b["target_domain"])
        m.eval()
        h_e, S_e = m.encode(b)
        q_e, _, _ = m.score_parts(b)
    valid = b["mask"]
    assert torch.allclose(h_t[valid], h_e[valid], atol=1e-5)
    assert torch.allclose(S_t[valid], S_e[valid], atol=1e-5)
    assert torch.allclose(q_t, q_e, atol=1e-5)
