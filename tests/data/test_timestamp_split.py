"""The global timestamp split (``split.scheme: timestamp``, the Amazon Reviews 2023 release's
protocol): targets, histories, training prefixes, negatives and metrics on a dataset small enough
to check by hand, causality, the streamed path and the single-domain views; leave-one-out is
unchanged."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from helpers import items_table, make_cfg
from torch import nn

from cdsr.config import ConfigError
from cdsr.data.build import build
from cdsr.data.config import SplitConfig
from cdsr.data.loaders import EvalDataset, SplitData, TrainDataset
from cdsr.data.sequences import read_sequences
from cdsr.data.split import (AMAZON_2023_TEST_FROM_MS, AMAZON_2023_VALID_FROM_MS, SplitError, build_and_write_split,
                             build_split, timestamp_split, write_negatives)
from cdsr.evaluate.protocols import EvalConfig, evaluate, rank_targets

# Two domains of 4 items: D0 = items 1..4, D1 = items 5..8. Cut-offs 100 s and 200 s.
VALID_FROM, TEST_FROM = 100, 200
USERS = [  # (items, domains, timestamps)
    ([1, 5, 2, 6, 3], [0, 1, 0, 1, 0], [10, 20, 150, 160, 250]),  # u0: 2 train, 2 valid, 1 test
    ([5, 6, 7], [1, 1, 1], [50, 60, 70]),  # u1: trains only
    ([1, 2, 7], [0, 0, 1], [120, 130, 210]),  # u2: nothing before valid_from: dropped
    ([4, 8, 1, 2], [0, 1, 0, 0], [90, 100, 200, 200]),  # u3: cut-offs hit exactly; a tie at 200
]
VALID = [(0, 2, 2, 0), (0, 3, 6, 1), (3, 1, 8, 1)]  # (user, pos, item, domain)
TEST = [(0, 4, 3, 0), (3, 2, 1, 0), (3, 3, 2, 0)]


def _seqs(users=USERS):
    return pl.DataFrame({"user_idx": list(range(len(users))), "user_id": [f"u{i}" for i in range(len(users))],
                         "items": [u[0] for u in users], "domains": [u[1] for u in users],
                         "timestamps": [u[2] for u in users]},
                        schema_overrides={"items": pl.List(pl.Int64), "domains": pl.List(pl.Int64),
                                          "timestamps": pl.List(pl.Int64)})


def _items(n_per_domain=(4, 4)):
    return items_table(n_per_domain)


def _cfg(**split):
    split = {"scheme": "timestamp", "valid_from": VALID_FROM * 1000, "test_from": TEST_FROM * 1000,
             "negatives": {"sampled-100": 100}, **split}
    return make_cfg(split=split)


@pytest.fixture
def hand(tmp_path) -> SplitData:
    """The hand-built dataset, split and loaded like a built one."""
    seqs, items = _seqs(), _items()
    seqs.write_parquet(tmp_path / "sequences.parquet")
    items.write_parquet(tmp_path / "items.parquet")
    build_and_write_split(seqs, items, _cfg(), tmp_path)
    return SplitData.load(tmp_path)


def _rows(t: pl.DataFrame, split: str):
    return t.filter(pl.col("split") == split).select("user_idx", "pos", "item_idx", "domain_idx").rows()


def test_targets_by_hand_and_split_json():
    targets, negs, meta = build_split(_seqs(), _items(), _cfg())
    assert _rows(targets, "valid") == VALID  # ts == valid_from is validation (u3 pos 1)
    assert _rows(targets, "test") == TEST  # ts == test_from is test, and both events of the tie
    assert targets.columns == ["user_idx", "split", "pos", "item_idx", "domain_idx"]
    assert targets["split"].to_list() == ["valid"] * 3 + ["test"] * 3
    ts = meta["timestamp_split"]
    assert meta["scheme"] == "timestamp" and meta["targets"] == {"valid": 3, "test": 3}
    assert ts["cutoffs_unix_s"] == {"valid_from": VALID_FROM, "test_from": TEST_FROM}
    assert (ts["valid_from"], ts["test_from"], ts["cutoff_unit"]) == (VALID_FROM * 1000, TEST_FROM * 1000, "ms")
    assert ts["users_with_targets"] == 2 and ts["users_without_targets"] == 1
    assert ts["dropped_no_training_events"] == {"users": 1, "targets": {"valid": 2, "test": 1}}
    # one draw per target row, keyed by pos; never an item of the user's sequence
    assert negs.columns == ["user_idx", "split", "pos", "negatives", "n_negatives"]
    assert negs.select("user_idx", "pos").rows() == [(u, p) for u, p, _, _ in VALID + TEST]
    seq_items = {u: set(USERS[u][0]) for u in range(len(USERS))}
    for u, neg in zip(negs["user_idx"], negs["negatives"]):
        assert not set(neg) & seq_items[u]
    # u0's D0 items are 1, 2, 3: only item 4 is left to draw
    assert negs.filter((pl.col("user_idx") == 0) & (pl.col("pos") == 2))["negatives"].to_list() == [[4]]


def test_training_prefix_is_the_events_before_valid_from(hand):
    assert hand.train_ends().tolist() == [2, 3, 0, 1]
    ds = TrainDataset(hand, max_len=4)
    assert ds.users.tolist() == [0, 1]  # a prefix of >= 2 events
    b = ds[[0, 1]]
    assert b["items"][0][b["mask"][0]].tolist() == [1] and b["targets"][0][b["mask"][0]].tolist() == [5]
    assert b["items"][1][b["mask"][1]].tolist() == [5, 6] and b["targets"][1][b["mask"][1]].tolist() == [6, 7]
    assert int(b["target_timestamps"][b["mask"]].max()) < VALID_FROM


def test_each_target_is_scored_from_its_earlier_events_only(hand):
    for split, want in (("valid", VALID), ("test", TEST)):
        ds = EvalDataset(hand, split, max_len=10, n_negatives=100)
        assert list(zip(ds.user.tolist(), ds.pos.tolist())) == [(u, p) for u, p, _, _ in want]
        b = ds[list(range(len(ds)))]
        assert b["target"].tolist() == [it for _, _, it, _ in want]
        for r, (u, p, _, _) in enumerate(want):
            items, _, ts = USERS[u]
            hist = b["items"][r][b["mask"][r]].tolist()
            assert hist == items[:p]  # every earlier event, earlier targets included; nothing later
            assert (b["timestamps"][r][b["mask"][r]] <= b["target_timestamp"][r]).all()
            assert not set(hist) & set(items[p:])  # (items are distinct per user here)
            assert int(b["target"][r]) not in b["negatives"][r][: int(b["n_negatives"][r])].tolist()
    # u3's second test target (same timestamp as the first) sees the first one, as in the release's history column
    b = EvalDataset(hand, "test", max_len=10)[[2]]
    assert b["items"][0][b["mask"][0]].tolist() == [4, 8, 1]


class ByItemId(nn.Module):
    """Higher item id = higher score; records every history it is given."""

    def __init__(self, n_items: int):
        super().__init__()
        self.n_items, self.seen = n_items, []
        self.lin = nn.Linear(1, 1)

    def score(self, batch, candidates=None):
        self.seen.append((batch["items"].clone(), batch["mask"].clone(), batch["timestamps"].clone(),
                          batch["target_timestamp"].clone()))
        b = batch["items"].shape[0]
        if candidates is None:
            candidates = torch.arange(self.n_items + 1).expand(b, -1)
        return candidates.float()


class ByItemIdDot(ByItemId):
    """The same scores as a product (``score_parts``): the per-domain block path of the full protocols."""

    def score_parts(self, batch):
        b = batch["items"].shape[0]
        return torch.arange(self.n_items + 1).float().expand(b, -1), torch.eye(self.n_items + 1), None


@pytest.mark.parametrize("kind", [ByItemId, ByItemIdDot])
def test_metrics_by_hand(hand, kind):
    cfg = EvalConfig(protocols=["full"], batch_size=2, ks=(1, 5))
    model = kind(hand.n_items)
    valid = rank_targets(model, hand, "valid", "full", cfg)
    # D0 = 1..4, D1 = 5..8: rank = #(domain items with id >= the target)
    assert valid.ranks.tolist() == [3, 3, 1] and valid.n_candidates.tolist() == [4, 4, 4]
    assert valid.hist_len.tolist() == [2, 3, 1] and valid.user_idx.tolist() == [0, 0, 3]
    test = rank_targets(model, hand, "test", "full", cfg)
    assert test.ranks.tolist() == [2, 4, 3]
    excl = rank_targets(model, hand, "test", "full", dataclasses.replace(cfg, exclude_history=True))
    # history items of the target domain leave the candidates: u0 pos 4 {1, 2}; u3 pos 2 {4}; u3 pos 3 {4, 1}
    assert excl.ranks.tolist() == [2, 3, 2] and excl.n_candidates.tolist() == [2, 3, 2]
    out = evaluate(model, hand, "valid", cfg)["full"]
    assert out["overall"]["n"] == 3
    assert out["overall"]["MRR"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert out["overall"]["HR@1"] == pytest.approx(1 / 3)
    assert out["domains"]["D0"]["MRR"] == pytest.approx(1 / 3)
    assert out["domains"]["D1"]["MRR"] == pytest.approx((1 / 3 + 1) / 2)
    t = evaluate(model, hand, "test", dataclasses.replace(cfg, protocols=["full", "sampled-100"]))
    assert t["full"]["overall"]["MRR"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)
    assert t["sampled-100"]["overall"]["n"] == 3
    # causality, as the model saw it: no history event after its target
    assert model.seen or kind is ByItemIdDot
    for items, mask, ts, tts in model.seen:
        assert (ts[mask] <= tts[:, None].expand_as(ts)[mask]).all()


def test_sampled_ranks_follow_the_stored_rows(hand):
    cfg = EvalConfig(protocols=["sampled-100"], batch_size=2)
    res = rank_targets(ByItemId(hand.n_items), hand, "test", "sampled-100", cfg)
    ng = hand.negatives.filter(pl.col("split") == "test").sort("user_idx", "pos")
    want = [1 + sum(1 for x in neg if x >= it) for (_, _, it, _), neg in zip(TEST, ng["negatives"].to_list())]
    assert res.ranks.tolist() == want
    assert res.n_candidates.tolist() == [1 + len(n) for n in ng["negatives"].to_list()]


def test_single_domain_views_keep_rows_and_negatives_in_line(hand):
    for d in (0, 1):
        view = hand.restrict_to_domain(d)
        for split, want in (("valid", VALID), ("test", TEST)):
            rows = [r for r in want if r[3] == d]
            if not rows:
                assert view.targets.filter(pl.col("split") == split).height == 0
                continue
            ds = EvalDataset(view, split, max_len=10, n_negatives=100)
            b = ds[list(range(len(ds)))]
            assert b["target"].tolist() == [it for _, _, it, _ in rows]
            for r, (u, p, _, _) in enumerate(rows):
                items, doms, _ = USERS[u]
                assert b["items"][r][b["mask"][r]].tolist() == [i for i, dd in zip(items[:p], doms[:p]) if dd == d]
            negs = view.negatives.filter(pl.col("split") == split).sort("user_idx", "pos")
            assert negs["pos"].to_list() == ds.pos.tolist()  # remapped with their targets
        # training prefixes: the domain's events before valid_from
        ends = [sum(1 for dd, t in zip(doms, ts) if dd == d and t < VALID_FROM) for _, doms, ts in USERS]
        assert view.train_ends().tolist() == ends


def test_streamed_negatives_equal_the_in_memory_draw(tmp_path, tiny_root):
    seqs, items = read_sequences(tiny_root / "t" / "processed")
    ts = seqs["timestamps"].explode()
    v, t = int(ts.quantile(0.7)), int(ts.quantile(0.85))
    cfg = make_cfg(split={"scheme": "timestamp", "valid_from": v, "test_from": t, "cutoff_unit": "s",
                          "negatives": {"sampled-100": 100}})
    metas = {}
    for name, cells in (("memory", 1 << 40), ("streamed", 1)):
        (tmp_path / name).mkdir()
        metas[name] = build_and_write_split(seqs, items, cfg, tmp_path / name, stream_cells=cells)
    for f in ("split.parquet", "negatives.parquet"):
        assert pl.read_parquet(tmp_path / "streamed" / f).equals(pl.read_parquet(tmp_path / "memory" / f))
    assert metas["memory"] == metas["streamed"]
    # merged a few users at a time: a user whose targets span several domains (several run
    # files) is read whole by one window, never twice
    targets = pl.read_parquet(tmp_path / "memory" / "split.parquet")
    assert targets.group_by("user_idx", "split").agg(pl.col("domain_idx").n_unique())["domain_idx"].max() > 1
    write_negatives(seqs, targets, items, 100, cfg.split.seed, tmp_path / "small.parquet", merge_cells=300,
                    with_pos=True)
    small = pl.read_parquet(tmp_path / "small.parquet")
    assert small.equals(pl.read_parquet(tmp_path / "memory" / "negatives.parquet"))
    targets = pl.read_parquet(tmp_path / "memory" / "split.parquet")
    assert targets.group_by("user_idx", "split").len()["len"].max() > 1  # several targets per user
    # every event at or after valid_from of a kept user is a target; training never reaches valid_from
    for f in ("sequences.parquet", "items.parquet"):
        shutil.copy(tiny_root / "t" / "processed" / f, tmp_path / "memory" / f)
    data = SplitData.load(tmp_path / "memory")
    lens = np.diff(data.offsets)
    pos = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lens)
    in_train = pos < np.repeat(data.train_ends(), lens)
    assert (data.timestamps[in_train] < v).all() and (data.timestamps[~in_train] >= v).all()
    assert int(data.targets.height) == int((~in_train & np.repeat(data.train_ends() > 0, lens)).sum())
    # ranks through every protocol: the in-domain reference by item id
    res = rank_targets(ByItemId(data.n_items), data, "test", "full", EvalConfig(batch_size=64))
    tt = data.targets.filter(pl.col("split") == "test").sort("user_idx", "pos")
    lo = data.domain_ranges[tt["domain_idx"].to_numpy(), 0]
    hi = data.domain_ranges[tt["domain_idx"].to_numpy(), 1]
    assert res.ranks.tolist() == (hi - tt["item_idx"].to_numpy() + 1).tolist()
    assert res.hist_len.tolist() == tt["pos"].to_list()
    s = rank_targets(ByItemId(data.n_items), data, "test", "sampled-100", EvalConfig(batch_size=64))
    assert len(s) == tt.height


def test_config_checks_and_cutoff_units():
    with pytest.raises(ConfigError, match="only the 'timestamp' scheme takes cut-offs"):
        make_cfg(split={"valid_from": 5})
    with pytest.raises(ConfigError, match="needs both valid_from and test_from"):
        make_cfg(split={"scheme": "timestamp", "valid_from": 5})
    with pytest.raises(ConfigError, match="must come before"):
        make_cfg(split={"scheme": "timestamp", "valid_from": 2000, "test_from": 1000})
    with pytest.raises(ConfigError, match="not an ISO date"):
        make_cfg(split={"scheme": "timestamp", "valid_from": "yesterday", "test_from": "2022-01-01"})
    with pytest.raises(ConfigError):
        make_cfg(split={"scheme": "by-date"})
    release = SplitConfig(scheme="timestamp", valid_from=AMAZON_2023_VALID_FROM_MS, test_from=AMAZON_2023_TEST_FROM_MS)
    assert release.cutoffs() == (1628643414, 1658002729)  # ms floored to the stored second
    dates = SplitConfig(scheme="timestamp", valid_from="2021-08-11", test_from="2022-07-16T20:18:49.837+00:00")
    assert dates.cutoffs() == (1628640000, 1658002729)
    secs = SplitConfig(scheme="timestamp", valid_from=100, test_from=200, cutoff_unit="s")
    assert secs.cutoffs() == (100, 200)


def test_a_split_without_targets_is_refused():
    with pytest.raises(SplitError, match="no test target"):
        timestamp_split(_seqs(), VALID_FROM, 10_000)
    with pytest.raises(SplitError, match="no valid / test target"):
        timestamp_split(_seqs(), 5_000, 10_000)


def test_leave_one_out_output_is_unchanged(tmp_path):
    """The default scheme keeps its columns, row order and split.json keys (the committed
    datasets' md5s in dvc.lock are checked by rebuilding them, see the report of issue 22)."""
    seqs, items = _seqs(), _items()
    targets, negs, meta = build_split(seqs, items, make_cfg(split={"negatives": {"sampled-100": 100}}))
    assert list(meta) == ["scheme", "seed", "protocols", "targets", "short_negative_rows"]
    assert meta["scheme"] == "leave-one-out"
    assert negs.columns == ["user_idx", "split", "negatives", "n_negatives"]
    assert _rows(targets, "test") == [(u, len(it) - 1, it[-1], d[-1]) for u, (it, d, _) in enumerate(USERS)]
    seqs.write_parquet(tmp_path / "sequences.parquet")
    items.write_parquet(tmp_path / "items.parquet")
    build_and_write_split(seqs, items, make_cfg(split={"negatives": {"sampled-100": 100}}), tmp_path)
    data = SplitData.load(tmp_path)
    assert data.train_end is None and data.train_ends().tolist() == [len(u[0]) - 2 for u in USERS]
    assert json.loads((tmp_path / "split.json").read_text())["scheme"] == "leave-one-out"


def test_negatives_without_pos_cannot_serve_several_targets_per_user(hand):
    broken = dataclasses.replace(hand, negatives=hand.negatives.drop("pos"))
    with pytest.raises(ValueError, match="no 'pos' column"):
        EvalDataset(broken, "valid", max_len=10, n_negatives=100)


def _release_files(root, rng) -> list[tuple[str, str, int, str]]:
    """Benchmark files in the release's ``timestamp_w_his`` layout: two categories, each row
    written to the part its timestamp (ms) falls in under the release's cut-offs, with the
    history column. Returns every (user, item, ts_ms, part)."""
    t1, t2 = AMAZON_2023_VALID_FROM_MS, AMAZON_2023_TEST_FROM_MS
    rows = []
    for u in range(30):
        n = int(rng.integers(6, 14))
        # spread over 2019 .. 2023, so users have events on both sides of both cut-offs
        ts = np.sort(rng.integers(1_550_000_000_000, 1_690_000_000_000, n))
        if u == 0:
            ts[-3:] = [t1, t1 + 1, t2]  # exactly on the cut-offs (ms): valid, valid, test
            ts = np.sort(ts)
        if u == 1:
            ts = np.sort(rng.integers(t1 + 1000, 1_690_000_000_000, n))  # nothing to train on
        for k, t in enumerate(ts):
            cat = ("Books", "Movies_and_TV")[int(rng.integers(0, 2))]
            rows.append((f"U{u:03d}", f"{cat[0]}{u:03d}x{k:02d}", int(t), cat))
    out = []
    files: dict[tuple[str, str], list[str]] = {}
    by_user: dict[tuple[str, str], list[str]] = {}
    for user, item, t, cat in sorted(rows, key=lambda r: (r[0], r[2])):
        part = "test" if t >= AMAZON_2023_TEST_FROM_MS else "valid" if t >= AMAZON_2023_VALID_FROM_MS else "train"
        hist = by_user.setdefault((user, cat), [])
        files.setdefault((cat, part), []).append(f'{user},{item},4.0,{t},"{" ".join(hist)}"')
        hist.append(item)
        out.append((user, item, t, part))
    for (cat, part), lines in files.items():
        with gzip.open(root / f"{cat}.{part}.csv.gz", "wt") as fh:
            fh.write("user_id,parent_asin,rating,timestamp,history\n" + "\n".join(lines) + "\n")
    return out


def test_release_files_end_to_end(tmp_path):
    """Ingest the three parts of two categories, build, and find the release's own partition:
    each valid / test row of the files is a target of that split (users without a training
    event aside, counted in split.json); every train row is in a training prefix."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = _release_files(raw, np.random.default_rng(5))
    cfg = make_cfg(sources=[{"format": "amazon-2023-benchmark-csv", "path": str(raw / "*.csv.gz")}],
                   domains=["Books", "Movies_and_TV"], ingest={"max_timestamp": None},
                   split={"scheme": "timestamp", "valid_from": AMAZON_2023_VALID_FROM_MS,
                          "test_from": AMAZON_2023_TEST_FROM_MS, "negatives": {"sampled-100": 100}})
    res = build(cfg, tmp_path / "data", log=lambda s: None)
    assert res["ingest"]["rows_read"] == res["ingest"]["rows_kept"] == len(rows)  # history never counted
    proc = tmp_path / "data" / "t" / "processed"
    data = SplitData.load(proc)
    seqs = pl.read_parquet(proc / "sequences.parquet")
    item_ids = pl.read_parquet(proc / "items.parquet").sort("item_idx")["item_id"].to_list()
    user_ids = seqs.sort("user_idx")["user_id"].to_list()
    got = {(user_ids[u], item_ids[i - 1], s) for u, i, s in data.targets.select("user_idx", "item_idx", "split").rows()}
    trained = {r[0] for r in rows if r[3] == "train"}
    want = {(u, i, p) for u, i, _, p in rows if p != "train" and u in trained}
    assert got == want
    meta = json.loads((proc / "split.json").read_text())
    dropped = [r for r in rows if r[3] != "train" and r[0] not in trained]
    assert meta["timestamp_split"]["dropped_no_training_events"] == {
        "users": len({r[0] for r in dropped}),
        "targets": {s: sum(r[3] == s for r in dropped) for s in ("valid", "test")}}
    lens = np.diff(data.offsets)
    pos = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lens)
    in_train = pos < np.repeat(data.train_ends(), lens)
    ev_user = np.repeat(np.array(user_ids), lens)
    train_pairs = {(u, item_ids[i - 1]) for u, i in zip(ev_user[in_train], data.items[in_train])}
    assert train_pairs == {(u, i) for u, i, _, p in rows if p == "train"}
    for split in ("valid", "test"):  # every protocol runs on several targets per user
        out = evaluate(ByItemId(data.n_items), data, split,
                       EvalConfig(protocols=["full", "full-all", "sampled-100"], batch_size=16))
        assert {p: s["overall"]["n"] for p, s in out.items()} == dict.fromkeys(out, meta["targets"][split])


@pytest.mark.parametrize("variant", ["merged", "single"])
def test_a_model_trains_and_scores_on_a_timestamp_split(tmp_path, tiny_root, in_root, variant):
    """The real training loop (validation on several targets per user, early-stopping state,
    test scoring) on a timestamp split; the training batches never hold an event at or after
    valid_from."""
    from cdsr.config import load_params
    from cdsr.train.run import train_run

    proc = tmp_path / "t" / "processed"
    proc.mkdir(parents=True)
    for f in ("sequences.parquet", "items.parquet"):
        shutil.copy(tiny_root / "t" / "processed" / f, proc / f)
    seqs, items = read_sequences(proc)
    ts = seqs["timestamps"].explode()
    v, t = int(ts.quantile(0.7)), int(ts.quantile(0.85))
    cfg = make_cfg(split={"scheme": "timestamp", "valid_from": v, "test_from": t, "cutoff_unit": "s",
                          "negatives": {"sampled-100": 100}})
    meta = build_and_write_split(seqs, items, cfg, proc)
    data = SplitData.load(proc)
    batch = TrainDataset(data, 20)[np.arange(len(TrainDataset(data, 20)))]
    assert int(batch["target_timestamps"][batch["mask"]].max()) < v
    assert int(batch["timestamps"][batch["mask"]].max()) < v
    params = load_params()
    params["models"]["sasrec"] = {**params["models"].get("sasrec", {}), "d": 16, "layers": 1, "heads": 2, "max_len": 20}
    params["train"] = {**params["train"], "batch_size": 64, "lr": 0.005, "progress": False}
    params["evaluate"] = {"protocols": ["full", "sampled-100"], "max_len": 20}
    m = train_run("t", "sasrec", variant, params, tmp_path / "run", seed=3, epochs=2, data_root=tmp_path)
    assert m["protocols"]["full"]["overall"]["n"] == meta["targets"]["test"]
    assert m["protocols"]["sampled-100"]["overall"]["n"] == meta["targets"]["test"]


@pytest.mark.parametrize("scope", ["history", "train"])
def test_inserted_noise_keeps_targets_and_negatives_in_line(hand, scope):
    """Robustness 'insert' noise moves every target (and its negatives row) with its event, and
    the training prefixes stay before valid_from."""
    from cdsr.evaluate.robustness import perturb

    noisy = perturb(hand, "insert", 0.7, seed=4, scope=scope)
    assert len(noisy.items) > len(hand.items)
    for split, want in (("valid", VALID), ("test", TEST)):
        ds = EvalDataset(noisy, split, max_len=20, n_negatives=100)
        b = ds[list(range(len(ds)))]
        assert b["target"].tolist() == [it for _, _, it, _ in want]
        assert (b["n_negatives"] >= 0).all()
    lens = np.diff(noisy.offsets)
    pos = np.arange(len(noisy.items)) - np.repeat(noisy.offsets[:-1], lens)
    assert (noisy.timestamps[pos < np.repeat(noisy.train_ends(), lens)] < VALID_FROM).all()
