"""Robustness protocol: seeded perturbations of a split, and the curves built from them.

Most checks run on a hand-built SplitData whose timestamps are globally unique and increasing,
so an inserted event (which copies the timestamp of the event it precedes) is recognisable: it
is exactly an event whose timestamp equals that of the next event of the same user.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from cdsr.config import ConfigError, from_dict
from cdsr.data.loaders import EvalDataset, SplitData, TrainDataset
from cdsr.evaluate.protocols import EvalConfig, rank_targets
from cdsr.evaluate.robustness import (
    KINDS,
    RobustnessConfig,
    inference_curves,
    noise_seed,
    perturb,
    relative_drop,
    training_rows,
)

RANGES = np.array([[1, 40], [41, 100], [101, 130]], dtype=np.int64)
NAMES = ["A", "B", "C"]
CASES = [(k, s) for k in KINDS for s in ("history", "train") if (k, s) != ("domain_flip", "train")]


def make_data(n_users: int = 400, seed: int = 1, train_end: bool = False, ranges: np.ndarray = RANGES) -> SplitData:
    """Users of 4..60 events, items drawn within their domain, valid/test targets at n-2 / n-1.
    ``train_end=True`` sets an explicit, shorter training prefix (n - 2 - k, k in 0..3)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(4, 61, n_users)
    n = int(lens.sum())
    doms = rng.integers(0, len(ranges), n)
    items = ranges[doms, 0] + rng.integers(0, ranges[doms, 1] - ranges[doms, 0] + 1)
    ts = np.arange(n, dtype=np.int64) * 10 + 1_000
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    users = np.arange(n_users)
    rows = []
    for split, back in (("valid", 2), ("test", 1)):
        pos = lens - back
        g = offsets[:-1] + pos
        rows.append(pl.DataFrame({"user_idx": users, "split": [split] * n_users, "pos": pos,
                                  "item_idx": items[g], "domain_idx": doms[g]}))
    targets = pl.concat(rows)
    te = (lens - 2 - rng.integers(0, 4, n_users)).clip(min=1) if train_end else None
    return SplitData(items=items.astype(np.int64), domains=doms.astype(np.int64), timestamps=ts, offsets=offsets,
                     targets=targets, negatives=None, domain_ranges=ranges, domain_names=NAMES, train_end=te)


def positions(data: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """(user, position within the user's sequence) of every event."""
    lens = np.diff(data.offsets)
    user = np.repeat(np.arange(len(lens)), lens)
    return user, np.arange(len(data.items)) - data.offsets[user]


def eligible(data: SplitData, scope: str) -> np.ndarray:
    user, pos = positions(data)
    ok = pos < data.train_ends()[user] if scope == "train" else np.ones(len(pos), bool)
    # history scope: the validation target is part of the test history, only test targets are spared
    t = data.targets if scope == "train" else data.targets.filter(pl.col("split") == "test")
    g = data.offsets[t["user_idx"].to_numpy()] + t["pos"].to_numpy()
    ok[g] = False
    return ok


def inserted_mask(data: SplitData) -> np.ndarray:
    """[E'] True for inserted events (timestamp equal to the next event of the same user)."""
    user, _ = positions(data)
    nxt = np.zeros(len(data.items), bool)
    nxt[:-1] = (data.timestamps[:-1] == data.timestamps[1:]) & (user[:-1] == user[1:])
    return nxt


def snapshot(data: SplitData) -> dict:
    return {f.name: (getattr(data, f.name).copy() if isinstance(getattr(data, f.name), np.ndarray)
                     else getattr(data, f.name)) for f in dataclasses.fields(data)}


@pytest.fixture(scope="module")
def data() -> SplitData:
    return make_data()


@pytest.fixture(scope="module")
def data_te() -> SplitData:
    return make_data(seed=2, train_end=True)


# --- perturb -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,scope", CASES)
@pytest.mark.parametrize("which", ["data", "data_te"])
def test_targets_untouched(kind, scope, which, request):
    clean = request.getfixturevalue(which)
    noisy = perturb(clean, kind, 0.3, seed=5, scope=scope)
    t0, t1 = clean.targets, noisy.targets
    assert t1.select("user_idx", "split", "item_idx", "domain_idx").equals(
        t0.select("user_idx", "split", "item_idx", "domain_idx"))
    if scope == "history":  # only the test targets are spared (the validation target is test history)
        t0, t1 = (t.filter(pl.col("split") == "test") for t in (t0, t1))
    g0 = clean.offsets[t0["user_idx"].to_numpy()] + t0["pos"].to_numpy()
    g1 = noisy.offsets[t1["user_idx"].to_numpy()] + t1["pos"].to_numpy()
    for f in ("items", "domains", "timestamps"):
        np.testing.assert_array_equal(getattr(noisy, f)[g1], getattr(clean, f)[g0])
    np.testing.assert_array_equal(noisy.items[g1], t0["item_idx"].to_numpy())
    np.testing.assert_array_equal(noisy.domains[g1], t0["domain_idx"].to_numpy())
    # the test target's history is the valid target plus everything before it
    assert (noisy.targets.filter(pl.col("split") == "test")["pos"].to_numpy()
            > noisy.targets.filter(pl.col("split") == "valid")["pos"].to_numpy()).all()
    assert noisy.negatives is clean.negatives and noisy.domain_ranges is clean.domain_ranges


@pytest.mark.parametrize("kind,scope", [c for c in CASES if c[0] != "insert"])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_in_place_kinds_rate_and_eligibility(kind, scope, p, data_te):
    clean = data_te
    noisy = perturb(clean, kind, p, seed=11, scope=scope)
    np.testing.assert_array_equal(noisy.offsets, clean.offsets)
    np.testing.assert_array_equal(noisy.timestamps, clean.timestamps)
    np.testing.assert_array_equal(noisy.train_ends(), clean.train_ends())
    ok = eligible(clean, scope)
    changed = (noisy.items != clean.items) | (noisy.domains != clean.domains)
    assert not changed[~ok].any()
    assert abs(changed[ok].mean() - p) < 0.03, changed[ok].mean()
    if kind == "substitute":
        np.testing.assert_array_equal(noisy.domains, clean.domains)
        d = clean.domains[changed]
        assert ((noisy.items[changed] >= RANGES[d, 0]) & (noisy.items[changed] <= RANGES[d, 1])).all()
        assert (noisy.items[changed] != clean.items[changed]).all()
        # the replacement is spread over the domain, not a fixed offset
        assert len(np.unique(noisy.items[changed & (clean.domains == 1)])) > 40
    else:
        np.testing.assert_array_equal(noisy.items, clean.items)
        assert (noisy.domains[changed] != clean.domains[changed]).all()
        assert ((noisy.domains >= 0) & (noisy.domains < len(RANGES))).all()
        assert set(np.unique(noisy.domains[changed & (clean.domains == 0)])) == {1, 2}
    if scope == "train":  # the evaluation part of every sequence is identical
        user, pos = positions(clean)
        rest = pos >= clean.train_ends()[user]
        np.testing.assert_array_equal(noisy.items[rest], clean.items[rest])
        np.testing.assert_array_equal(noisy.domains[rest], clean.domains[rest])


@pytest.mark.parametrize("kind,scope", CASES)
def test_p_one_touches_every_eligible_event(kind, scope, data_te):
    """p = 1: substitution / flip never draws the original value back; one insertion per event."""
    clean = data_te
    noisy = perturb(clean, kind, 1.0, seed=0, scope=scope)
    ok = eligible(clean, scope)
    if kind == "insert":
        ins = inserted_mask(noisy)
        assert int(ins.sum()) == int(ok.sum())
    else:
        changed = (noisy.items != clean.items) | (noisy.domains != clean.domains)
        np.testing.assert_array_equal(changed, ok)


@pytest.mark.parametrize("scope", ["history", "train"])
@pytest.mark.parametrize("which", ["data", "data_te"])
def test_insert(scope, which, request):
    clean = request.getfixturevalue(which)
    p = 0.2
    noisy = perturb(clean, "insert", p, seed=3, scope=scope)
    ins = inserted_mask(noisy)
    n_ins = int(ins.sum())
    assert len(noisy.items) == len(clean.items) + n_ins
    assert len(noisy.domains) == len(noisy.timestamps) == len(noisy.items) == noisy.offsets[-1]
    # removing the insertions gives back the original sequences exactly
    for f in ("items", "domains", "timestamps"):
        np.testing.assert_array_equal(getattr(noisy, f)[~ins], getattr(clean, f))
    nu, npos = positions(noisy)
    np.testing.assert_array_equal(np.bincount(nu[~ins], minlength=len(clean.offsets) - 1), np.diff(clean.offsets))
    # each insertion precedes an eligible original event and is in that event's domain
    orig_index = np.cumsum(~ins) - 1 + ins  # for an inserted event: the index of the next original
    follows = orig_index[ins]
    assert eligible(clean, scope)[follows].all()
    assert (noisy.domains[ins] == clean.domains[follows]).all()
    d = noisy.domains[ins]
    assert ((noisy.items[ins] >= RANGES[d, 0]) & (noisy.items[ins] <= RANGES[d, 1])).all()
    assert abs(n_ins / eligible(clean, scope).sum() - p) < 0.03
    # train prefixes: the same original events, plus the insertions made before them
    assert isinstance(noisy.train_end, np.ndarray)
    in_prefix = npos < noisy.train_end[nu]
    n_users = len(clean.offsets) - 1
    np.testing.assert_array_equal(np.bincount(nu[in_prefix & ~ins], minlength=n_users), clean.train_ends())
    cu, cpos = positions(clean)
    clean_prefix = cpos < clean.train_ends()[cu]
    np.testing.assert_array_equal(in_prefix[~ins], clean_prefix)
    np.testing.assert_array_equal(in_prefix[ins], clean_prefix[follows])
    if scope == "train":
        assert not (ins & ~in_prefix).any()
        rest_n, rest_c = ~in_prefix, ~clean_prefix
        np.testing.assert_array_equal(noisy.items[rest_n], clean.items[rest_c])
    # the single-domain views still line up with their targets
    for dom in range(len(RANGES)):
        view = noisy.restrict_to_domain(dom)
        assert (view.domains == dom).all()
        g = view.offsets[view.targets["user_idx"].to_numpy()] + view.targets["pos"].to_numpy()
        np.testing.assert_array_equal(view.items[g], view.targets["item_idx"].to_numpy())
        assert (view.train_ends() <= np.diff(view.offsets)).all()
        ref = clean.restrict_to_domain(dom)
        assert view.targets.select("user_idx", "split", "item_idx").equals(ref.targets.select("user_idx", "split", "item_idx"))
        assert (view.train_ends() >= ref.train_ends()).all()


def test_insert_before_first_event_and_explicit_remap():
    """A hand-checked case: one user [a, b, c, V, T], train prefix 3."""
    clean = SplitData(items=np.array([1, 2, 41, 42, 101]), domains=np.array([0, 0, 1, 1, 2]),
                      timestamps=np.array([10, 20, 30, 40, 50]), offsets=np.array([0, 5]),
                      targets=pl.DataFrame({"user_idx": [0, 0], "split": ["valid", "test"], "pos": [3, 4],
                                            "item_idx": [42, 101], "domain_idx": [1, 2]}),
                      negatives=None, domain_ranges=RANGES, domain_names=NAMES)
    noisy = perturb(clean, "insert", 1.0, seed=0, scope="history")  # p = 1: before each of a, b, c, V
    np.testing.assert_array_equal(noisy.domains, [0, 0, 0, 0, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(noisy.timestamps, [10, 10, 20, 20, 30, 30, 40, 40, 50])
    np.testing.assert_array_equal(noisy.items[[1, 3, 5, 7, 8]], [1, 2, 41, 42, 101])
    np.testing.assert_array_equal(noisy.offsets, [0, 9])
    assert noisy.targets["pos"].to_list() == [7, 8]
    np.testing.assert_array_equal(noisy.train_end, [6])
    trained = perturb(clean, "insert", 1.0, seed=0, scope="train")  # only the prefix a, b, c
    np.testing.assert_array_equal(trained.items[[1, 3, 5, 6, 7]], [1, 2, 41, 42, 101])
    assert trained.targets["pos"].to_list() == [6, 7]
    assert perturb(clean, "insert", 0.0, seed=0).items.tolist() == clean.items.tolist()


def test_one_item_domain_is_not_substituted():
    ranges = np.array([[1, 40], [41, 41]], dtype=np.int64)
    clean = make_data(n_users=50, ranges=ranges)
    noisy = perturb(clean, "substitute", 0.9, seed=0)
    lone = clean.domains == 1
    assert lone.any()
    np.testing.assert_array_equal(noisy.items[lone], clean.items[lone])
    assert (noisy.items[~lone] != clean.items[~lone]).mean() > 0.5


@pytest.mark.parametrize("kind,scope", CASES)
def test_deterministic_and_input_untouched(kind, scope, data_te):
    before = snapshot(data_te)
    a = perturb(data_te, kind, 0.2, seed=7, scope=scope)
    b = perturb(data_te, kind, 0.2, seed=7, scope=scope)
    c = perturb(data_te, kind, 0.2, seed=8, scope=scope)
    for f in ("items", "domains", "timestamps", "offsets"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(a.train_ends(), b.train_ends())
    assert a.targets.equals(b.targets)
    assert not (len(a.items) == len(c.items) and (a.items == c.items).all() and (a.domains == c.domains).all())
    after = snapshot(data_te)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after[k], v)
        elif isinstance(v, pl.DataFrame):
            assert after[k].equals(v)
        else:
            assert after[k] == v
    assert a.items is not data_te.items and a.domains is not data_te.domains


def test_perturb_rejects_bad_arguments(data):
    with pytest.raises(ValueError, match="unknown noise kind"):
        perturb(data, "shuffle", 0.1, 0)
    with pytest.raises(ValueError, match="scope"):
        perturb(data, "substitute", 0.1, 0, scope="test")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb(data, "substitute", 1.5, 0)
    with pytest.raises(ValueError, match="inference-time"):
        perturb(data, "domain_flip", 0.1, 0, scope="train")
    one = dataclasses.replace(data, domain_ranges=RANGES[:1], domains=np.zeros_like(data.domains))
    with pytest.raises(ValueError, match="two domains"):
        perturb(one, "domain_flip", 0.1, 0)


# --- config and curves ---------------------------------------------------------------------------


def test_config_validation_and_yaml_lists():
    cfg = from_dict(RobustnessConfig, {"p": [0.1, 0.25], "inference": ["insert", "domain_flip"], "seed": 3},
                    "robustness")
    assert cfg.p == (0.1, 0.25) and cfg.inference == ("insert", "domain_flip") and cfg.train == ("substitute",)
    direct = RobustnessConfig(p=[0.5], inference=["substitute"], metrics=["MRR"])
    assert direct.p == (0.5,) and isinstance(direct.inference, tuple) and direct.metrics == ("MRR",)
    hash(direct)  # frozen and hashable with list input
    for bad, match in [({"p": (0.0,)}, "between 0 and 1"), ({"p": (1.0,)}, "between 0 and 1"),
                       ({"p": (0.1, 0.1)}, "duplicate"), ({"inference": ("swap",)}, "unknown noise kind"),
                       ({"train": ("insert", "bogus")}, "unknown noise kind"),
                       ({"train": ("domain_flip",)}, "inference-time"), ({"protocol": "full-ish"}, "unknown protocol"),
                       ({"metrics": ()}, "metric"), ({"p": "0.1"}, "expected a list")]:
        with pytest.raises(ValueError, match=match):
            RobustnessConfig(**bad)
    with pytest.raises(TypeError, match="seed"):
        RobustnessConfig(seed=1.5)
    with pytest.raises((ConfigError, ValueError)):
        from_dict(RobustnessConfig, {"p": [0.1], "kinds": ["insert"]}, "robustness")


def test_noise_seed_distinct_and_stable():
    cfg = RobustnessConfig()
    seeds = {(k, p): noise_seed(cfg, k, p) for k in KINDS for p in cfg.p}
    assert len(set(seeds.values())) == len(seeds)
    assert all(isinstance(s, int) and s >= 0 for s in seeds.values())
    assert seeds[("insert", 0.2)] == noise_seed(RobustnessConfig(), "insert", 0.2)
    assert noise_seed(RobustnessConfig(seed=1), "insert", 0.2) != seeds[("insert", 0.2)]


def test_relative_drop():
    assert relative_drop(0.5, 0.4) == pytest.approx(0.2)
    assert relative_drop(0.5, 0.6) == pytest.approx(-0.2)
    assert relative_drop(0.0, 0.1) == 0.0
    assert relative_drop(0.3, 0.3) == 0.0


def fake_evaluator(clean: SplitData, calls: list):
    """Metrics that fall with the amount of noise: the fraction of clean events kept."""

    def evaluate_fn(d: SplitData) -> dict[str, float]:
        calls.append(d)
        if len(d.items) == len(clean.items):
            kept = float(((d.items == clean.items) & (d.domains == clean.domains)).mean())
        else:
            kept = len(clean.items) / len(d.items)
        return {"NDCG@10": kept, "HR@10": kept ** 2, "MRR": 0.5 * kept, "HR@5": 1.0}

    return evaluate_fn


def test_inference_curves(data):
    cfg = RobustnessConfig(p=(0.1, 0.3), seed=4)
    calls: list = []
    fn = fake_evaluator(data, calls)
    rows = inference_curves(fn, data, cfg)
    assert len(rows) == 1 + len(cfg.inference) * len(cfg.p) == len(calls)
    assert calls[0] is data
    metric_keys = ["NDCG@10", "HR@10", "MRR"]
    expected_keys = ["scope", "kind", "p", *metric_keys, *[f"rel_drop_{m}" for m in metric_keys]]
    assert all(list(r) == expected_keys for r in rows)
    assert rows[0] == {"scope": "inference", "kind": "clean", "p": 0.0, "NDCG@10": 1.0, "HR@10": 1.0, "MRR": 0.5,
                       "rel_drop_NDCG@10": 0.0, "rel_drop_HR@10": 0.0, "rel_drop_MRR": 0.0}
    assert [(r["kind"], r["p"]) for r in rows[1:]] == [(k, p) for k in cfg.inference for p in cfg.p]
    for r in rows[1:]:
        assert r["scope"] == "inference"
        want = fn(perturb(data, r["kind"], r["p"], noise_seed(cfg, r["kind"], r["p"]), scope="history"))
        for m in metric_keys:
            assert r[m] == pytest.approx(want[m])
            assert r[f"rel_drop_{m}"] == pytest.approx((rows[0][m] - want[m]) / rows[0][m])
        # the drop grows with the noise in expectation; here the kept fraction is ~ 1 - p (1/(1+p))
        expected_kept = 1 / (1 + r["p"] * 0.95) if r["kind"] == "insert" else 1 - r["p"] * 0.95
        assert r["NDCG@10"] == pytest.approx(expected_kept, abs=0.03)
    drops = {(r["kind"], r["p"]): r["rel_drop_NDCG@10"] for r in rows[1:]}
    assert all(drops[(k, 0.3)] > drops[(k, 0.1)] > 0 for k in cfg.inference)
    # reproducible
    assert inference_curves(fake_evaluator(data, []), data, cfg) == rows


def test_inference_curves_missing_metric(data):
    with pytest.raises(KeyError, match="missing"):
        inference_curves(lambda d: {"NDCG@10": 1.0}, data, RobustnessConfig(p=(0.1,), inference=("insert",)))


def test_training_rows():
    cfg = RobustnessConfig(p=(0.1, 0.2), train=("substitute", "insert"), metrics=("NDCG@10", "MRR"))
    clean = {"NDCG@10": 0.4, "MRR": 0.2, "HR@10": 0.9}
    noisy = {(k, p): {"NDCG@10": 0.4 - p, "MRR": 0.2 - p / 2} for k in cfg.train for p in cfg.p}
    rows = training_rows(clean, noisy, cfg)
    assert rows[0] == {"scope": "train", "kind": "clean", "p": 0.0, "NDCG@10": 0.4, "MRR": 0.2,
                       "rel_drop_NDCG@10": 0.0, "rel_drop_MRR": 0.0}
    assert [(r["kind"], r["p"]) for r in rows[1:]] == list(noisy)
    for r in rows[1:]:
        assert r["scope"] == "train"
        assert r["rel_drop_NDCG@10"] == pytest.approx(r["p"] / 0.4)
        assert r["rel_drop_MRR"] == pytest.approx(r["p"] / 2 / 0.2)
    with pytest.raises(KeyError, match="insert"):
        training_rows(clean, {k: v for k, v in noisy.items() if k[0] == "substitute"}, cfg)


# --- end to end with a real model on the built tiny dataset ---------------------------------------


def test_end_to_end_with_sasrec(tiny_root):
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config

    clean = SplitData.load(tiny_root / "t" / "processed")
    vocab = Vocab.from_ranges(clean.domain_ranges, clean.domain_names)
    torch.manual_seed(0)
    net = build_model("sasrec", model_config("sasrec", {"d": 16, "layers": 1, "heads": 1, "max_len": 20}, "merged"),
                      vocab)
    ecfg = EvalConfig(protocols=["full"], max_len=20)
    n_test = clean.targets.filter(pl.col("split") == "test").height
    for kind, scope in CASES:
        noisy = perturb(clean, kind, 0.3, seed=noise_seed(RobustnessConfig(), kind, 0.3), scope=scope)
        res = rank_targets(net, noisy, "test", "full", ecfg, "cpu")
        assert len(res) == n_test
        assert ((res.ranks >= 1) & (res.ranks <= res.n_candidates)).all()
        if kind == "insert":  # histories grew
            assert int(res.hist_len.sum()) > int(rank_targets(net, clean, "test", "full", ecfg).hist_len.sum())
        if scope == "train":  # validation stays clean under training-time noise
            ev = EvalDataset(noisy, "valid", 20, n_negatives=100)
            batch = ev[np.arange(len(ev))]
            valid = clean.targets.filter(pl.col("split") == "valid").sort("user_idx")
            np.testing.assert_array_equal(batch["target"].numpy(), valid["item_idx"].to_numpy())
            tr = TrainDataset(noisy, 20)
            assert len(tr) == len(TrainDataset(clean, 20))
            out = net.loss(tr[np.arange(min(len(tr), 32))])
            assert torch.isfinite(out["loss"])


def test_train_p_sets_the_training_noise_levels_only():
    cfg = RobustnessConfig(p=[0.1, 0.2, 0.3], train=["substitute"], train_p=[0.2])
    assert cfg.p == (0.1, 0.2, 0.3) and cfg.train_levels == (0.2,)
    assert RobustnessConfig(p=[0.1, 0.3]).train_levels == (0.1, 0.3)
    clean = {"NDCG@10": 0.5, "HR@10": 0.8, "MRR": 0.4}
    rows = training_rows(clean, {("substitute", 0.2): {"NDCG@10": 0.25, "HR@10": 0.4, "MRR": 0.2}}, cfg)
    assert [(r["kind"], r["p"]) for r in rows] == [("clean", 0.0), ("substitute", 0.2)]
    assert rows[1]["rel_drop_NDCG@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="train_p"):
        RobustnessConfig(train_p=[0.2, 1.5])
