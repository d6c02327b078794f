"""DPG-Diff: causality of both encoders (x_0 and the guidance at i see events <= i only), the
guidance fusion, the loss terms, deterministic inference, the ablation switches, 2 and 3 domains."""

from __future__ import annotations

import pytest
import torch

from cdsr.models.base import Vocab
from helpers import fit_batch
from cdsr.models.dpg import info_nce, tri_view_nce
from cdsr.models.registry import build_model, model_config

VOCAB = Vocab(n_items=60, domain_ranges=((1, 30), (31, 60)), domain_names=("A", "B"))
VOCAB3 = Vocab(n_items=90, domain_ranges=((1, 30), (31, 60), (61, 90)), domain_names=("A", "B", "C"))
SMALL = {"d": 16, "heads": 2, "layers": 2, "domain_layers": 1, "max_len": 12, "dropout": 0.1, "T": 20}


def _batch(B=4, L=12, seed=0, D=2):
    g = torch.Generator().manual_seed(seed)
    domains = torch.randint(0, D, (B, L), generator=g)
    items = domains * 30 + torch.randint(1, 31, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False
    if B > 1:
        mask[1, :9] = False
    items, domains = items * mask, domains * mask
    tdom = torch.roll(domains, -1, 1)
    tdom[:, -1] = torch.randint(0, D, (B,), generator=g)
    targets = (tdom * 30 + torch.randint(1, 31, (B, L), generator=g)) * mask
    return {"items": items, "domains": domains, "mask": mask, "targets": targets,
            "target_domains": tdom * mask, "target_domain": tdom[:, -1]}


def _model(vocab=VOCAB, **extra):
    torch.manual_seed(0)
    return build_model("dpg", model_config("dpg", {**SMALL, **extra}, "merged"), vocab).eval()


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("i", [3, 7, 10])
def test_causality_of_x0_and_guidance(D, i):
    """Items and domains at >= i+1 never change x_0 (Encoder_c) or any domain state at <= i."""
    m, b = _model(VOCAB if D == 2 else VOCAB3), _batch(D=D)
    h = m.encode_c(b["items"], b["domains"], b["mask"])
    S = m.domain_states(b["items"], b["domains"], b["mask"])
    fut = {k: v.clone() for k, v in b.items()}
    g = torch.Generator().manual_seed(5)
    fut["domains"][:, i + 1:] = torch.randint(0, D, fut["domains"][:, i + 1:].shape, generator=g)
    fut["items"][:, i + 1:] = fut["domains"][:, i + 1:] * 30 + torch.randint(1, 31, fut["items"][:, i + 1:].shape, generator=g)
    fut["mask"][:, i + 1:] = True
    h2 = m.encode_c(fut["items"], fut["domains"], fut["mask"])
    S2 = m.domain_states(fut["items"], fut["domains"], fut["mask"])
    assert torch.allclose(h[:, : i + 1], h2[:, : i + 1], atol=1e-5)
    assert torch.allclose(S[:, : i + 1], S2[:, : i + 1], atol=1e-5)
    assert not torch.allclose(h[:, i + 1:], h2[:, i + 1:])


def test_training_loss_at_position_i_ignores_the_future():
    """The whole training path (x_0, guidance, noising, denoiser, L_rec) at position i is the same
    when later events change: compare per-position reconstructions under one RNG state."""
    m, b = _model(), _batch(B=1, seed=2)
    b["mask"][:] = True
    i = 6
    outs = []
    for change in (False, True):
        x = {k: v.clone() for k, v in b.items()}
        if change:
            x["items"][:, i + 1:] = (x["items"][:, i + 1:] % 30) + 1 + 30 * x["domains"][:, i + 1:]  # other items
        torch.manual_seed(0)
        h = m.encode_c(x["items"], x["domains"], x["mask"])
        S = m.domain_states(x["items"], x["domains"], x["mask"])
        guide = m.guidance(S[0], x["target_domains"][0])
        t = torch.full((12,), 7)
        from cdsr.models.diffusion import q_sample
        outs.append(m.denoise(q_sample(h[0], t, torch.ones_like(h[0]), m.abar), t, guide))
    assert torch.allclose(outs[0][: i + 1], outs[1][: i + 1], atol=1e-5)
    assert not torch.allclose(outs[0][i + 1:], outs[1][i + 1:])


def test_score_never_reads_targets():
    m, b = _model(), _batch()
    s = m.score(b)
    clean = {k: v for k, v in b.items() if k not in ("targets", "target_domains")}
    assert torch.equal(m.score(clean), s)


def test_guidance_fuses_target_and_other_domain_states():
    m = _model(vocab=VOCAB3)
    S = torch.randn(5, 3, 16)
    tdom = torch.tensor([0, 1, 2, 0, 2])
    tokens, g_t, g_o, g_d = m.guidance(S, tdom)
    assert tokens.shape == (5, 4, 16)
    for n in range(5):
        t = int(tdom[n])
        assert torch.allclose(g_t[n], S[n, t])
        assert torch.allclose(g_o[n], S[n, [a for a in range(3) if a != t]].mean(0), atol=1e-6)
    assert torch.allclose(g_d, m.fuse(torch.cat([g_t, g_o, g_t * g_o], -1)))
    # the target's token carries the "target" role; the fused token is last
    assert torch.allclose(tokens[0, 0], S[0, 0] + m.role.weight[0] + m.dom_emb.weight[0])
    assert torch.allclose(tokens[0, 1], S[0, 1] + m.role.weight[1] + m.dom_emb.weight[1])
    assert torch.allclose(tokens[:, -1], g_d + m.role.weight[2])


def test_info_nce_against_a_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    sim = torch.tensor([[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]]) / tau  # cos(a_i, b_j) / tau
    row = -(sim.diag() - sim.logsumexp(1)).mean()
    col = -(sim.diag() - sim.logsumexp(0)).mean()
    assert float(info_nce(a, b, tau)) == pytest.approx(float(0.5 * (row + col)), rel=1e-6)
    assert float(tri_view_nce(a, a, a, tau)) == pytest.approx(float(info_nce(a, a, tau)), rel=1e-6)


def test_loss_terms_are_reported_and_weighted():
    b = _batch(B=8)
    m = _model(lambda_diff=0.5, lambda_cl=0.25).train()
    torch.manual_seed(1)
    out = m.loss(b)
    assert set(out) == {"loss", "rec", "diff", "cl"}
    want = out["rec"] + 0.5 * out["diff"] + 0.25 * out["cl"]
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-5)
    m0 = _model(lambda_cl=0.0).train()
    torch.manual_seed(1)
    out0 = m0.loss(b)
    assert "cl" not in out0 and float(out0["loss"]) == pytest.approx(float(out0["rec"] + 0.1 * out0["diff"]), rel=1e-5)
    m2 = _model(lambda_cl=0.0, lambda_rec_x0=0.5).train()
    torch.manual_seed(1)
    out2 = m2.loss(b)
    assert float(out2["loss"]) == pytest.approx(float(out2["rec"] + 0.1 * out2["diff"] + 0.5 * out2["rec_x0"]), rel=1e-5)


@pytest.mark.parametrize("guidance", ["cross_attention", "concat", "none"])
@pytest.mark.parametrize("D", [2, 3])
def test_loss_decreases_and_every_part_learns(guidance, D):
    m, b = _model(VOCAB if D == 2 else VOCAB3, guidance=guidance, lambda_diff=0.1), _batch(B=16, D=D)
    losses = fit_batch(m, b, 50)
    # without guidance a heavily noised x_t carries little of x_0: only the small-t steps can fit
    assert sum(losses[-4:]) < (0.95 if guidance == "none" else 0.75) * sum(losses[:4])
    assert all(p.grad is not None for p in m.encoder_c.parameters())
    assert all(p.grad is not None for p in m.denoiser.out.parameters())
    if guidance != "none":
        assert all(p.grad is not None for p in m.streams.parameters())
        assert all(p.grad is not None for p in m.fuse.parameters())


def test_inference_is_deterministic_and_t_inf_matters():
    m, b = _model(t_inf=5), _batch()
    s1, s2 = m.score(b), m.score(b)
    assert torch.equal(s1, s2)
    x0 = m.represent(b, t_inf=0)
    assert torch.allclose(x0, m.encode_c(b["items"], b["domains"], b["mask"])[:, -1])
    assert not torch.allclose(m.represent(b, t_inf=1), m.represent(b, t_inf=5))
    cands = torch.randint(1, 61, (4, 7))
    assert torch.allclose(m.score(b, cands), s1.gather(1, cands), atol=1e-5)
    assert torch.all(s1[:, 0] == float("-inf"))


def test_score_matches_for_a_shorter_window_of_the_same_history():
    """Left padding does not change a user's score (row 0 is padded on the left)."""
    m, b = _model(), _batch()
    s = m.score(b)
    short = {k: (v[:1, 3:] if v.dim() == 2 else v[:1]) for k, v in b.items()}
    assert torch.allclose(m.score(short)[0], s[0], atol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="t_inf"):
        _model(t_inf=30)
    with pytest.raises(ValueError, match="tau"):
        _model(tau=0.0)
    with pytest.raises(ValueError, match="choose from"):
        _model(augmentations=["shuffle"])


def test_epoch_diagnostics_report_collapse_checks():
    m, b = _model(), _batch()
    st = m.guidance_stats([b])
    assert set(st) == {"cos_guidance", "cos_x0_denoised"} and all(-1 <= v <= 1 for v in st.values())


def test_short_training_run_logs_each_loss_term_and_beats_random(tmp_path, tiny_root, in_root):
    """One short run through the real loop on the three-domain fixture: the per-epoch record
    carries rec / diff / cl apart and the collapse checks; the model is clearly above random."""
    import csv

    from cdsr.config import load_params
    from cdsr.train.run import train_run

    params = load_params()
    params["models"]["dpg"] = {**params["models"]["dpg"], **SMALL, "max_len": 20, "lambda_diff": 0.1}
    params["train"] = {**params["train"], "batch_size": 64, "lr": 0.005, "patience": 3, "progress": False}
    params["evaluate"] = {"protocols": ["full", "sampled-100"], "max_len": 20}
    m = train_run("t", "dpg", "merged", params, tmp_path / "run", seed=3, epochs=4, data_root=tiny_root)
    hist = m["history"]["merged"]
    assert len(hist) == 4
    for rec in hist:
        assert rec["rec"] > 0 and rec["diff"] > 0 and rec["cl"] > 0
        assert rec["loss"] == pytest.approx(rec["rec"] + 0.1 * rec["diff"] + 0.1 * rec["cl"], rel=1e-4)
        assert -1 <= rec["val_cos_guidance"] <= 1 and -1 <= rec["val_cos_x0_denoised"] <= 1
    steps = list(csv.DictReader((tmp_path / "run" / "steps.csv").open()))
    assert {"rec", "diff", "cl"} <= set(steps[0])
    assert m["protocols"]["sampled-100"]["overall"]["HR@10"] > 0.15  # random is ~0.1
    # inference-time settings re-score the trained run (cdsr evaluate --set model.t_inf=...)
    from cdsr.config import ConfigError
    from cdsr.train.run import evaluate_run

    run = tmp_path / "run"
    by_t = {t: evaluate_run(run, ["full"], model_sets=[f"model.t_inf={t}"])["protocols"]["full"]["overall"]["NDCG@10"]
            for t in (0, 2, 5)}
    assert by_t[2] == pytest.approx(m["protocols"]["full"]["overall"]["NDCG@10"])  # the trained default
    assert len(set(by_t.values())) > 1
    with pytest.raises(RuntimeError, match="size mismatch"):
        evaluate_run(run, ["full"], model_sets=["model.d=8"])
    with pytest.raises(ConfigError, match="only model"):
        evaluate_run(run, ["full"], model_sets=["train.lr=0.1"])


@pytest.mark.parametrize("D", [2, 3])
def test_last_position_encoders_equal_the_full_ones(D):
    """Scoring's encoders (last blocks on the last position, stream states at the window's end)
    give the full encoders' last position, also for a row without an event of some domain."""
    m, b = _model(VOCAB3 if D == 3 else VOCAB), _batch(D=D)
    b["domains"][2, :] = 0
    b["items"][2, :] = torch.arange(1, 13)
    args = (b["items"], b["domains"], b["mask"])
    with torch.no_grad():
        assert torch.allclose(m.encode_c(*args, last_only=True)[:, -1], m.encode_c(*args)[:, -1], atol=1e-5)
        assert torch.allclose(m.domain_states(*args, last_only=True), m.domain_states(*args)[:, -1], atol=1e-5)
