"""Protocols end to end on a small built dataset, with fake models whose ranks are known."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch
from helpers import make_cfg
from torch import nn

from cdsr.data.build import build
from cdsr.data.loaders import SplitData
from cdsr.evaluate import protocols as P
from cdsr.evaluate.protocols import PROTOCOLS, EvalConfig, RankResult, cat, evaluate, rank_targets, summarise

ALL = ("full", "full-all", "sampled-999", "sampled-100")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SplitData:
    root = tmp_path_factory.mktemp("data")
    # 150 items per domain: sampled-999 rows hold fewer than 999 negatives (padding is exercised)
    cfg = make_cfg(generator={"users": 200, "items_per_domain": 150, "topics": 6, "malformed_rows": 3, "duplicate_rows": 2},
                   sources=[{"format": "ratings-csv-2014", "path": "{data_root}/t/raw/*.csv"},
                            {"format": "amazon-review-json", "path": "{data_root}/t/raw/*.json.gz"}],
                   domains=["Books", "Movies_and_TV", "CDs_and_Vinyl"],
                   sequences={"filters": [{"min_user_domains": 2}, {"min_user_events": 5}], "domains_required": "present"})
    build(cfg, root, log=lambda s: None)
    return SplitData.load(root / "t" / "processed")


class Fake(nn.Module):
    """Scores from a function of (batch, candidate ids [B, C]); checks the evaluation context."""

    def __init__(self, n_items: int, fn):
        super().__init__()
        self.n_items, self.fn, self.batch_sizes = n_items, fn, []
        self.lin = nn.Linear(1, 1)  # a parameter, so that no_grad matters

    def score(self, batch, candidates=None):
        assert not self.training and not torch.is_grad_enabled()
        b = batch["items"].shape[0]
        self.batch_sizes.append(b)
        if candidates is None:
            candidates = torch.arange(self.n_items + 1).expand(b, -1)
        return self.fn(batch, candidates).float()


class DotFake(Fake):
    """The same scores as a product (``SeqRecModel.score_parts``): q = the fake's score row over
    every item, table = the identity, so full protocols take the per-domain block path."""

    def score_parts(self, batch):
        assert not self.training and not torch.is_grad_enabled()
        b = batch["items"].shape[0]
        self.batch_sizes.append(b)
        q = self.fn(batch, torch.arange(self.n_items + 1).expand(b, -1)).float()
        return q, torch.eye(self.n_items + 1), None


MODELS = [Fake, DotFake]


def oracle(batch, c):  # reads the target: only a test may do this
    return (c == batch["target"][:, None]).float()


def constant(batch, c):
    return torch.zeros(c.shape)


def by_item_id(batch, c):
    return c.float()


def history_first(batch, c):
    """History items of the window score 2, the target 1, everything else 0."""
    in_hist = (c[:, :, None] == batch["items"][:, None, :]).any(-1)  # [B, C]; padding id 0 never a candidate
    return 2.0 * in_hist + oracle(batch, c) * ~in_hist


def _test_rows(data: SplitData, split: str = "test"):
    t = data.targets.filter(pl.col("split") == split).sort("user_idx")
    return list(zip(*(t[c].to_list() for c in ("user_idx", "pos", "item_idx", "domain_idx"))))


def _reference(data: SplitData, protocol: str, exclude_history: bool):
    """Slow per-user loop: ranks and candidate counts of the by-item-id model (higher id = better)."""
    negs = {}
    if PROTOCOLS[protocol].sampled:
        ng = data.negatives.filter(pl.col("split") == "test")
        negs = dict(zip(ng["user_idx"].to_list(), ng["negatives"].to_list()))
    ranks, n_cand = [], []
    for u, p, t, d in _test_rows(data):
        seq = data.items[data.offsets[u] : data.offsets[u + 1]]
        assert seq[p] == t
        if PROTOCOLS[protocol].sampled:
            cands = negs[u][: PROTOCOLS[protocol].n_negatives]
            n_cand.append(1 + len(cands))
        else:
            lo, hi = (1, data.n_items) if protocol == "full-all" else data.domain_ranges[d]
            cands = set(range(lo, hi + 1))
            if exclude_history:
                cands -= set(seq[:p].tolist()) - {t}
            n_cand.append(len(cands))
            cands.discard(t)
        ranks.append(1 + sum(1 for c in cands if c >= t))
    return ranks, n_cand


@pytest.mark.parametrize("exclude_history", [False, True])
def test_oracle_is_always_first(data, exclude_history):
    cfg = EvalConfig(protocols=list(ALL), exclude_history=exclude_history, batch_size=64)
    out = evaluate(Fake(data.n_items, oracle), data, "test", cfg)
    assert list(out) == list(ALL)
    for name, s in out.items():
        assert s["protocol"] == name
        assert s["overall"]["HR@1"] == 1.0 and s["overall"]["MRR"] == 1.0
        assert s["overall"]["n"] == data.targets.filter(pl.col("split") == "test").height
        assert ("AUC" in s["overall"]) == name.startswith("sampled")
        if "AUC" in s["overall"]:
            assert s["overall"]["AUC"] == 1.0


@pytest.mark.parametrize("kind", MODELS)
def test_constant_model_gets_the_worst_rank(data, kind):
    cfg = EvalConfig(protocols=list(ALL), batch_size=50)
    model = kind(data.n_items, constant)
    for name in ALL:
        res = rank_targets(model, data, "test", name, cfg)
        assert torch.equal(res.ranks, res.n_candidates)
    full = rank_targets(model, data, "test", "full", cfg)
    sizes = torch.as_tensor(data.domain_ranges[:, 1] - data.domain_ranges[:, 0] + 1)
    assert torch.equal(full.n_candidates, sizes[full.domain])
    s = summarise(rank_targets(model, data, "test", "sampled-999", cfg), data.domain_names, cfg)
    assert s["overall"]["AUC"] == 0.0 and s["overall"]["HR@10"] == 0.0


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("protocol", ALL)
@pytest.mark.parametrize("exclude_history", [False, True])
def test_ranks_match_a_slow_reference(data, protocol, exclude_history, kind, monkeypatch):
    # a short window: exclusion must use the whole history, not what the model sees
    cfg = EvalConfig(protocols=[protocol], exclude_history=exclude_history, batch_size=37, max_len=4)
    if kind is DotFake:  # small blocks: several row blocks, and every domain split into chunks (two passes)
        monkeypatch.setattr(P, "ROW_BLOCK", 7)
        monkeypatch.setattr(P, "SCORE_CHUNK_CELLS", 7 * 40)
        monkeypatch.setattr(P, "SINGLE_PASS_ROWS", 10**9)
    res = rank_targets(kind(data.n_items, by_item_id), data, "test", protocol, cfg)
    ranks, n_cand = _reference(data, protocol, exclude_history and not PROTOCOLS[protocol].sampled)
    assert res.protocol == protocol
    assert res.ranks.tolist() == ranks
    assert res.n_candidates.tolist() == n_cand
    rows = _test_rows(data)
    assert res.user_idx.tolist() == [r[0] for r in rows]
    assert res.hist_len.tolist() == [r[1] for r in rows]
    assert res.domain.tolist() == [r[3] for r in rows]
    if protocol == "sampled-999":
        assert max(n_cand) < 1000  # short domains: padded negatives were really ignored
    if protocol == "sampled-100":
        assert set(n_cand) == {101}


@pytest.mark.parametrize("kind", MODELS)
def test_exclude_history_removes_history_items(data, kind):
    model = kind(data.n_items, history_first)
    seen = rank_targets(model, data, "test", "full", EvalConfig(batch_size=64))
    assert float((seen.ranks == 1).double().mean()) < 0.9
    # without exclusion the window's distinct items of the target domain (other than the target) outrank it
    expected = []
    for u, p, t, d in _test_rows(data):
        lo, hi = data.domain_ranges[d]
        window = set(data.items[data.offsets[u] : data.offsets[u] + p][-50:].tolist())
        expected.append(1 + sum(1 for x in window if lo <= x <= hi and x != t))
    assert seen.ranks.tolist() == expected
    for name in ("full", "full-all"):
        res = rank_targets(model, data, "test", name, EvalConfig(exclude_history=True, batch_size=64))
        assert (res.ranks == 1).all()
        assert (res.n_candidates < (seen.n_candidates if name == "full" else data.n_items)).any()


def test_summary_breakdowns_add_up_to_overall(data):
    g = torch.Generator().manual_seed(0)
    model = Fake(data.n_items, lambda b, c: torch.rand(c.shape, generator=g))
    cfg = EvalConfig(protocols=["full", "sampled-100"], batch_size=64, buckets=(20, 30))
    out = evaluate(model, data, "test", cfg)
    for s in out.values():
        overall = s["overall"]
        assert set(s["domains"]) <= set(data.domain_names) and len(s["domains"]) > 1
        assert set(s["buckets"]) <= {"1-20", "21-30", "31+"} and len(s["buckets"]) > 1
        for part in ("domains", "buckets"):
            assert sum(m["n"] for m in s[part].values()) == overall["n"]
            for key, value in ((k, v) for k, v in overall.items() if k != "n"):
                weighted = sum(m[key] * m["n"] for m in s[part].values()) / overall["n"]
                assert weighted == pytest.approx(value, abs=1e-12), (part, key)


def test_summary_labels_and_omitted_domains():
    hist = torch.tensor([1, 5, 6, 10, 11, 20, 21, 50, 51, 200])
    res = RankResult(ranks=torch.arange(1, 11), n_candidates=torch.full((10,), 20), domain=torch.tensor([0] * 5 + [2] * 5),
                     hist_len=hist, user_idx=torch.arange(10), protocol="full")
    s = summarise(res, ["A", "B", "C"], EvalConfig())
    assert list(s["domains"]) == ["A", "C"]  # B has no targets
    assert {k: v["n"] for k, v in s["buckets"].items()} == {"1-5": 2, "6-10": 2, "11-20": 2, "21-50": 2, "51+": 2}
    assert s["buckets"]["1-5"]["MRR"] == pytest.approx((1 + 1 / 2) / 2)
    assert "AUC" not in s["overall"]
    res0 = dataclasses.replace(res, hist_len=torch.zeros(10, dtype=torch.long))
    assert list(summarise(res0, ["A", "B", "C"], EvalConfig())["buckets"]) == ["0"]


def test_cat_and_config_checks(data):
    res = rank_targets(Fake(data.n_items, by_item_id), data, "test", "full", EvalConfig())
    parts = [RankResult(*(getattr(res, f)[s] for f in ("ranks", "n_candidates", "domain", "hist_len", "user_idx")), protocol="full")
             for s in (slice(0, 10), slice(10, None))]
    joined = cat(parts)
    assert torch.equal(joined.ranks, res.ranks) and torch.equal(joined.user_idx, res.user_idx)
    assert torch.equal(RankResult.cat(parts).hist_len, res.hist_len)
    with pytest.raises(ValueError, match="different protocols"):
        cat([parts[0], dataclasses.replace(parts[1], protocol="full-all")])
    with pytest.raises(ValueError, match="unknown protocol"):
        EvalConfig(protocols=["sampled-50"])
    with pytest.raises(ValueError, match="unknown protocol"):
        rank_targets(Fake(data.n_items, by_item_id), data, "test", "nope", EvalConfig())


def test_batches_shrink_for_big_catalogues(data, monkeypatch):
    v1 = data.n_items + 1
    ref = rank_targets(Fake(data.n_items, by_item_id), data, "test", "full", EvalConfig(batch_size=512))
    monkeypatch.setattr(P, "MAX_SCORE_CELLS", 7 * v1 + 3)
    model = Fake(data.n_items, by_item_id)
    res = rank_targets(model, data, "test", "full", EvalConfig(batch_size=512))
    assert max(model.batch_sizes) == 7
    assert torch.equal(res.ranks, ref.ranks)


def test_training_mode_is_restored_and_valid_split_works(data):
    model = Fake(data.n_items, oracle)
    model.train()
    res = rank_targets(model, data, "valid", "sampled-100", EvalConfig())
    assert model.training
    assert (res.ranks == 1).all()
    assert res.hist_len.tolist() == [r[1] for r in _test_rows(data, "valid")]


def test_a_too_small_stored_draw_is_refused(data):
    short = data.negatives.with_columns(pl.col("negatives").list.head(20), pl.col("n_negatives").clip(upper_bound=20))
    with pytest.raises(ValueError, match="rebuild"):
        rank_targets(Fake(data.n_items, oracle), dataclasses.replace(data, negatives=short), "test", "sampled-100", EvalConfig())


@pytest.mark.parametrize("kind", MODELS)
def test_nan_model_gets_the_worst_rank(data, kind):
    model = kind(data.n_items, lambda b, c: torch.full(c.shape, float("nan")))
    for name in ("full", "sampled-999"):
        res = rank_targets(model, data, "test", name, EvalConfig())
        assert torch.equal(res.ranks, res.n_candidates)


def test_bad_score_shape_is_reported(data):
    class Bad(Fake):
        def score(self, batch, candidates=None):
            return torch.zeros(batch["items"].shape[0], 3)

    with pytest.raises(ValueError, match="returned"):
        rank_targets(Bad(data.n_items, None), data, "test", "full", EvalConfig())


@pytest.mark.parametrize("chunked", [False, True, "single"])
def test_real_models_rank_the_same_through_score_parts(data, chunked, monkeypatch):
    """The per-domain block path over ``score_parts`` gives the ranks of ``score`` over every item:
    one block of rows per domain, two passes over item chunks, and one pass in small row blocks."""
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config

    class ScoreOnly(nn.Module):  # hides score_parts: the [B, n_items + 1] path
        def __init__(self, net):
            super().__init__()
            self.net = net

        def score(self, batch, candidates=None):
            return self.net.score(batch, candidates)

    widest = int(max(hi - lo + 1 for lo, hi in data.domain_ranges))
    if chunked == "single":  # every domain in one chunk, 3 rows at a time
        monkeypatch.setattr(P, "SINGLE_PASS_ROWS", 3)
        monkeypatch.setattr(P, "SCORE_CHUNK_CELLS", 3 * widest)
    elif chunked:  # items in chunks of 50: the two-pass path on every domain
        monkeypatch.setattr(P, "SINGLE_PASS_ROWS", 10**9)
        monkeypatch.setattr(P, "SCORE_CHUNK_CELLS", 64 * 50)
        assert widest > 50
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    for name in ("sasrec", "bert4rec", "hstu", "gca", "dpg", "abxi", "abxi_gca"):
        torch.manual_seed(0)
        small = {"d": 16, "heads": 1, "max_len": 20, **({} if name.startswith("abxi") else {"layers": 1})}  # ABXI: one layer
        net = build_model(name, model_config(name, small, "merged"), vocab)
        for proto in ("full", "full-all"):
            for excl in (False, True):
                cfg = EvalConfig(protocols=[proto], exclude_history=excl, max_len=20, batch_size=64)
                a = rank_targets(net, data, "test", proto, cfg)
                b = rank_targets(ScoreOnly(net), data, "test", proto, cfg)
                assert torch.equal(a.ranks, b.ranks), (name, proto, excl)
                assert torch.equal(a.n_candidates, b.n_candidates), (name, proto, excl)


def test_ranking_is_float32_under_a_callers_bf16_autocast(data):
    """No ties added: a bf16 autocast around the evaluation (the training loop's precision)
    changes no rank of a real model, full and sampled, and the target's ties stay float32's."""
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config

    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    for name in ("sasrec", "abxi"):
        torch.manual_seed(0)
        small = {"d": 16, "heads": 1, "max_len": 20, **({} if name == "abxi" else {"layers": 1})}
        net = build_model(name, model_config(name, small, "merged"), vocab)
        for proto in ("full", "sampled-100"):
            cfg = EvalConfig(protocols=[proto], max_len=20, batch_size=64)
            want = rank_targets(net, data, "test", proto, cfg)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = rank_targets(net, data, "test", proto, cfg)
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
            assert torch.equal(got.ranks, want.ranks), (name, proto)
