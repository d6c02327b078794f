"""Dual-stream host and Gated Cross-Attention: the stream layout against a loop, time-causal
cross-attention keys, causality of the whole model, the gates, the |cos(X, X')| measurement
against a hand computation, the parameter-matched host and the per-epoch logging hook."""

from __future__ import annotations

import math

import pytest
import torch

from cdsr.models.base import Vocab
from helpers import fit_batch
from cdsr.models.gca import GCA, DualStreamConfig, domain_streams, matched_config, n_parameters, stream_slots
from cdsr.models.registry import build_model, model_config

VOCAB = Vocab(n_items=60, domain_ranges=((1, 30), (31, 60)), domain_names=("A", "B"))
VOCAB3 = Vocab(n_items=90, domain_ranges=((1, 30), (31, 60), (61, 90)), domain_names=("A", "B", "C"))
SMALL = {"d": 16, "heads": 2, "layers": 2, "max_len": 12, "dropout": 0.1}


def _batch(B=4, L=12, seed=0, D=2):
    g = torch.Generator().manual_seed(seed)
    domains = torch.randint(0, D, (B, L), generator=g)
    items = domains * 30 + torch.randint(1, 31, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    if B > 1:
        mask[1, :9] = False  # a short row: some domains have 0 or 1 events
    items, domains = items * mask, domains * mask
    ts = (torch.cumsum(torch.randint(0, 3, (B, L), generator=g) * 86400, 1) + 1_400_000_000) * mask
    tdom = torch.roll(domains, -1, 1)
    tdom[:, -1] = torch.randint(0, D, (B,), generator=g)
    targets = (tdom * 30 + torch.randint(1, 31, (B, L), generator=g)) * mask
    return {"items": items, "domains": domains, "timestamps": ts, "mask": mask, "targets": targets,
            "target_domains": tdom * mask, "target_domain": tdom[:, -1]}


def _model(name="gca", vocab=VOCAB, **extra):
    torch.manual_seed(0)
    return build_model(name, model_config(name, {**SMALL, **extra}, "merged"), vocab).eval()


def test_domain_streams_match_a_loop():
    b = _batch(D=3)
    layout = domain_streams(b["domains"], b["mask"], 3)
    for a, (order, valid) in enumerate(layout):
        slots = stream_slots(order, valid, b["items"].shape[1])
        for r in range(b["items"].shape[0]):
            want = [i for i in range(12) if b["mask"][r, i] and b["domains"][r, i] == a]
            got = order[r][valid[r]].tolist()
            assert got == want  # a's events, in time order
            assert valid[r].tolist() == [False] * (order.shape[1] - len(want)) + [True] * len(want)  # right-aligned
            assert [int(slots[r, i]) for i in want] == list(range(order.shape[1] - len(want), order.shape[1]))
            assert all(int(slots[r, i]) == -1 for i in range(12) if i not in want)


def test_cross_attention_keys_are_other_domain_events_strictly_before_the_query():
    """Hook the mask CA_a receives and compare it with the loop definition."""
    m, b = _model(vocab=VOCAB3), _batch(D=3)
    seen = []
    for a in range(3):
        m.gca["0"].ca[a].register_forward_hook(lambda mod, args, out, a=a: seen.append((a, args[2].clone())))
    m.score(b)
    layout = domain_streams(b["domains"], b["mask"], 3)
    for a, allowed in seen:
        oq, vq = layout[a]
        others = [layout[c] for c in range(3) if c != a]
        ok_ = torch.cat([o for o, _ in others], 1)
        vk = torch.cat([v for _, v in others], 1)
        for r in range(b["items"].shape[0]):
            for i in range(oq.shape[1]):
                for j in range(ok_.shape[1]):
                    want = bool(vq[r, i] and vk[r, j] and ok_[r, j] < oq[r, i])
                    assert bool(allowed[r, i, j]) == want
                    if want:  # an earlier event of another domain
                        assert b["domains"][r, ok_[r, j]] != a and ok_[r, j] < oq[r, i]


@pytest.mark.parametrize("name,extra", [("dual_stream", {}), ("gca", {}),
                                        ("gca", {"gca_layers": [0, 1, 2], "gate": "tanh", "alpha": "channel",
                                                 "alpha_init": 0.5, "combine": "concat", "gca_ln": False})])
@pytest.mark.parametrize("i", [3, 7, 10])
def test_causality(name, extra, i):
    """Items and domains at >= i+1 never change the representation at <= i (h^m and every stream
    state), whatever the GCA placement."""
    m, b = _model(name, **extra), _batch()
    h, S = m.encode(b)
    fut = {k: v.clone() for k, v in b.items()}
    g = torch.Generator().manual_seed(5)
    fut["domains"][:, i + 1:] = torch.randint(0, 2, fut["domains"][:, i + 1:].shape, generator=g)
    fut["items"][:, i + 1:] = fut["domains"][:, i + 1:] * 30 + torch.randint(1, 31, fut["items"][:, i + 1:].shape, generator=g)
    fut["mask"][:, i + 1:] = True
    h2, S2 = m.encode(fut)
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-5)
    assert torch.allclose(S[:, : i + 1], S2[:, : i + 1], atol=1e-5)
    assert not torch.allclose(h[:, i + 1:], h2[:, i + 1:])


@pytest.mark.parametrize("name,extra", [("dual_stream", {}), ("gca", {}), ("gca", {"gca_layers": [2]}),
                                        ("gca", {"gca_layers": [0, 1, 2], "combine": "concat"})])
def test_last_position_scoring_equals_the_full_encoding(name, extra):
    """score_parts (last blocks on the last position, stream states at the window's end) gives
    the representation of the full encoding's last position, also with a row that has no
    event of a domain."""
    m, b = _model(name, **extra), _batch()
    b["domains"][2, :] = 0
    b["items"][2, :] = torch.arange(1, 13)
    b["target_domain"] = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        h, S = m.encode(b)
        want = m.represent(h[:, -1], S[:, -1], b["target_domain"])
        q, _, _ = m.score_parts(b)
    assert torch.allclose(q, want, atol=1e-5)


def test_only_gca_lets_a_stream_read_the_other_domain():
    """Changing one earlier B item changes the A-stream state only when GCA is on."""
    b = _batch(B=1, seed=3)
    b["mask"][:] = True
    b["domains"] = torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0]])
    b["items"] = b["domains"] * 30 + torch.arange(1, 13)[None]
    alt = {k: v.clone() for k, v in b.items()}
    alt["items"][0, 0] = 30 + 29  # the first event (B) is before every A event
    for name, moves in (("dual_stream", False), ("gca", True)):
        m = _model(name)
        _, S = m.encode(b)
        _, S2 = m.encode(alt)
        assert torch.allclose(S[..., 0, :], S2[..., 0, :], atol=1e-6) != moves, name


def test_a_closed_tanh_gate_is_the_identity_and_sigmoid_opens_half():
    cfg = DualStreamConfig(d=8, heads=2, gate="tanh", gca_ln=True)
    gca = GCA(cfg, 2)
    xs = [torch.randn(2, 3, 8), torch.randn(2, 4, 8)]
    midx = [torch.tensor([[1, 4, 6], [2, 3, 9]]), torch.tensor([[0, 2, 3, 5], [0, 1, 4, 5]])]
    valid = [torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)]
    out = gca(xs, midx, valid)
    assert all(torch.equal(o, x) for o, x in zip(out, xs))
    gca_s = GCA(DualStreamConfig(d=8, heads=2, gate="sigmoid", alpha="channel"), 2)
    assert gca_s.gate().shape == (2, 8) and torch.allclose(gca_s.gate(), torch.full((2, 8), 0.5))
    gca_s.eval()
    out = gca_s(xs, midx, valid)
    # the very first B event (midx 0) has no earlier A event: unchanged
    assert torch.equal(out[1][:, 0], xs[1][:, 0]) and not torch.allclose(out[1][:, 1:], xs[1][:, 1:])


def test_orthogonality_matches_a_hand_computation():
    """|cos(X, X')| per module and domain = the mean over valid queries with a key, computed here
    from the module's hooked input X and cross-attention output X'."""
    m, b = _model(gca_layers=[0, 2]), _batch()
    got = m.orthogonality([b, _batch(seed=1)])
    acc = {}
    for k in ("0", "2"):
        mod = m.gca[k]
        mod.register_forward_pre_hook(lambda mod, args, k=k: acc.setdefault(k, {}).setdefault("x", []).append(args[0]))
        for a in range(2):
            mod.ca[a].register_forward_hook(
                lambda mod, args, out, k=k, a=a: acc[k].setdefault(a, []).append((out, args[2].any(-1))))
    with torch.no_grad():
        m.encode(b)
        m.encode(_batch(seed=1))
    for k in ("0", "2"):
        for a, name in enumerate("AB"):
            vals = []
            for xs, (xp, live) in zip(acc[k]["x"], acc[k][a]):
                X = xs[a]
                for r in range(X.shape[0]):
                    for i in range(X.shape[1]):
                        if live[r, i]:
                            vals.append(abs(float(X[r, i] @ xp[r, i]) / float(X[r, i].norm() * xp[r, i].norm())))
            assert got[f"cos_gca{k}_{name}"] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
        assert 0 <= got[f"cos_gca{k}"] <= 1
    assert got["gate_gca0_A"] == pytest.approx(0.5)
    assert math.isfinite(got["cos"]) and _model("dual_stream").orthogonality([b]) == {}


def test_left_padding_invariance_and_score_ignores_targets():
    m, b = _model(gca_layers=[0, 1]), _batch()
    s = m.score(b)
    assert torch.equal(s, m.score(dict(b, targets=torch.randint(1, 61, b["targets"].shape))))
    short = {k: (v[:1, 3:] if v.dim() == 2 else v[:1]) for k, v in b.items()}
    assert torch.allclose(m.score(short)[0], s[0], atol=1e-5)
    cands = torch.randint(1, 61, (4, 7))
    assert torch.allclose(m.score(b, cands), s.gather(1, cands), atol=1e-5)


@pytest.mark.parametrize("name,extra", [("dual_stream", {}), ("gca", {"gca_layers": [0, 1], "gate": "tanh", "alpha_init": 0.1})])
def test_loss_decreases(name, extra):
    m, b = _model(name, **extra), _batch(B=16)
    losses = fit_batch(m, b, 60)
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    if name == "gca":
        assert all(p.grad is not None for p in m.gca.parameters())


def test_gca_placement_is_validated():
    with pytest.raises(ValueError, match="gca_layers"):
        _model(gca_layers=[3])
    with pytest.raises(ValueError, match="gca_layers"):
        _model(gca_layers=[0, 0])


@pytest.mark.parametrize("by", ["auto", "ffn", "width", "depth"])
def test_param_matched_host(by):
    """The matched host has no GCA and the smallest size of its family at or above host+GCA's
    parameter count; auto takes the closest family (here the fine-grained FFN width)."""
    cfg = model_config("dual_stream", {**SMALL, "param_match": [0, 1], "param_match_by": by, "gate": "tanh"}, "merged")
    target = n_parameters(model_config("gca", {**SMALL, "gca_layers": [0, 1], "gate": "tanh"}, "merged"), VOCAB)
    host = n_parameters(model_config("dual_stream", SMALL, "merged"), VOCAB)
    got = matched_config(cfg, VOCAB)
    n = n_parameters(got, VOCAB)
    assert got.gca_layers == () and got.param_match == () and host < target <= n
    m = build_model("dual_stream", cfg, VOCAB)
    assert sum(p.numel() for p in m.parameters()) == n and not m.gca
    if by == "ffn":
        assert got.ffn_dim > 4 * SMALL["d"] and n - (2 * SMALL["d"] + 1) * 2 * 3 < target  # one unit less is short
    if by == "width":
        assert got.d > SMALL["d"] and n_parameters(DualStreamConfig(**{**SMALL, "d": got.d - 2}), VOCAB) < target
    if by == "depth":
        assert got.layers > SMALL["layers"]
    if by == "auto":
        others = [n_parameters(matched_config(cfg.__class__(**{**cfg.__dict__, "param_match_by": o}), VOCAB), VOCAB)
                  for o in ("ffn", "width", "depth")]
        assert n == min(others)


def test_training_loop_logs_orthogonality_per_epoch(tmp_path, tiny_root, in_root):
    from cdsr.config import load_params
    from cdsr.train.run import train_run

    params = load_params()
    params["models"]["gca"] = {**params["models"].get("gca", {}), **SMALL, "max_len": 20}
    params["train"] = {**params["train"], "batch_size": 64, "lr": 0.005, "patience": 3, "progress": False}
    params["evaluate"] = {"protocols": ["full", "sampled-100"], "max_len": 20}
    m = train_run("t", "gca", "merged", params, tmp_path / "run", seed=3, epochs=3, data_root=tiny_root)
    hist = m["history"]["merged"]
    assert len(hist) == 3
    for rec in hist:
        for dom in ("Books", "Movies_and_TV", "CDs_and_Vinyl"):
            assert 0 <= rec[f"val_cos_gca0_{dom}"] <= 1 and 0 < rec[f"val_gate_gca0_{dom}"] < 1
    assert m["protocols"]["sampled-100"]["overall"]["HR@10"] > 0.15  # clearly above random (~0.1)

