"""Split (leave-one-out, sampled negatives) and the torch loaders built on it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from helpers import items_table, make_cfg

from cdsr.data.loaders import EvalDataset, SplitData, TrainDataset, make_loader
from cdsr.data.split import SplitError, build_split, leave_one_out, sample_negatives


def _seqs(lists, domains):
    return pl.DataFrame({"user_idx": list(range(len(lists))), "user_id": [f"u{i}" for i in range(len(lists))],
                         "items": lists, "domains": domains,
                         "timestamps": [list(range(len(x))) for x in lists]})


def test_leave_one_out_positions():
    seqs = _seqs([[1, 5, 2, 6], [3, 4, 7]], [[0, 1, 0, 1], [0, 0, 1]])
    t = leave_one_out(seqs)
    assert t.filter(pl.col("split") == "test").select("user_idx", "pos", "item_idx", "domain_idx").rows() == [(0, 3, 6, 1), (1, 2, 7, 1)]
    assert t.filter(pl.col("split") == "valid").select("user_idx", "pos", "item_idx", "domain_idx").rows() == [(0, 2, 2, 0), (1, 1, 4, 0)]
    with pytest.raises(SplitError, match="fewer than 3 events"):
        leave_one_out(_seqs([[1, 2]], [[0, 0]]))


@pytest.mark.parametrize("n_items,k", [(30, 10), (400, 10)])  # exact Gumbel path / rejection path
def test_negatives_valid_deterministic_and_uniform(n_items, k):
    rng = np.random.default_rng(0)
    n_users = 3000
    lists = [sorted(rng.choice(np.arange(1, n_items + 1), size=6, replace=False).tolist()) for _ in range(n_users)]
    seqs = _seqs(lists, [[0] * 6] * n_users)
    items = items_table([n_items])
    targets = leave_one_out(seqs)
    a = sample_negatives(seqs, targets, items, k, seed=1)
    b = sample_negatives(seqs, targets, items, k, seed=1)
    c = sample_negatives(seqs, targets, items, k, seed=2)
    assert a.equals(b) and not a.equals(c)
    negs = a["negatives"].to_list()
    assert all(len(n) == k == len(set(n)) for n in negs)
    hist = {u: set(x) for u, x in zip(seqs["user_idx"].to_list(), lists)}
    assert all(not (set(n) & hist[u]) for u, n in zip(a["user_idx"].to_list(), negs))
    assert all(1 <= x <= n_items for n in negs for x in n)
    # uniform: every item is drawn about equally often (given it is not in the history)
    counts = np.bincount(np.concatenate(negs), minlength=n_items + 1)[1:]
    exposure = np.array([sum(i + 1 not in h for h in hist.values()) for i in range(n_items)]) * 2  # two splits
    rate = counts / exposure
    assert rate.std() / rate.mean() < 0.12
    # the first slots are uniform too (sampled-100 takes a prefix of the sampled-999 draw)
    first = np.bincount([n[0] for n in negs], minlength=n_items + 1)[1:]
    assert first.min() > 0


def test_negatives_stay_in_the_target_domain_and_short_domains_are_counted():
    seqs = _seqs([[1, 2, 6, 7], [3, 8, 4, 9]], [[0, 0, 1, 1], [0, 1, 0, 1]])
    items = items_table([5, 5])  # domain 0: 1..5, domain 1: 6..10
    targets = leave_one_out(seqs)
    negs = sample_negatives(seqs, targets, items, 999, seed=0).join(targets, on=["user_idx", "split"])
    for row in negs.iter_rows(named=True):
        lo, hi = (1, 5) if row["domain_idx"] == 0 else (6, 10)
        assert all(lo <= x <= hi for x in row["negatives"])
        assert row["n_negatives"] == len(row["negatives"]) < 999  # fewer items than asked: counted, not padded
    cfg = make_cfg()
    _, _, meta = build_split(seqs, items, cfg)
    assert meta["short_negative_rows"] == {"sampled-999": 4, "sampled-100": 4}


@pytest.mark.parametrize("n_items", [30, 400])  # exact Gumbel path / rejection path
def test_streamed_negatives_equal_the_in_memory_draw(tmp_path, n_items):
    """write_negatives (the split stage above STREAM_NEGATIVES_CELLS) writes the rows of
    sample_negatives, same draws and order, with small chunks and merge windows; the stage's
    files are the same tables on either path."""
    from cdsr.data.split import build_and_write_split, write_negatives

    rng = np.random.default_rng(1)
    n_users = 700
    dom = rng.integers(0, 2, size=(n_users, 8))
    lists = [[int(rng.integers(1, n_items + 1)) + d * n_items for d in row] for row in dom]
    seqs = _seqs(lists, dom.tolist())
    items = items_table([n_items, n_items])
    targets = leave_one_out(seqs)
    want = sample_negatives(seqs, targets, items, 20, seed=3, max_cells=3000)
    counts = write_negatives(seqs, targets, items, 20, seed=3, path=tmp_path / "n.parquet", max_cells=3000,
                             merge_cells=20 * 37)
    got = pl.read_parquet(tmp_path / "n.parquet")
    assert got.equals(want) and counts.tolist() == want["n_negatives"].to_list()
    assert not list(tmp_path.glob("cdsr-negatives-*"))  # temp runs removed
    cfg = make_cfg()
    for name, cells in (("memory", 1 << 40), ("streamed", 1)):
        (tmp_path / name).mkdir()
        build_and_write_split(seqs, items, cfg, tmp_path / name, stream_cells=cells)
    for f in ("split.parquet", "negatives.parquet"):
        assert pl.read_parquet(tmp_path / "streamed" / f).equals(pl.read_parquet(tmp_path / "memory" / f))
    assert (tmp_path / "streamed" / "split.json").read_text() == (tmp_path / "memory" / "split.json").read_text()


@pytest.fixture(scope="module")
def built(tiny_root):
    return SplitData.load(tiny_root / "t" / "processed")


def test_train_batch_is_right_aligned_and_shifted(built):
    ds = TrainDataset(built, max_len=8)
    b = ds[[0, 1, 2]]
    for r in range(3):
        u = int(b["user_idx"][r])
        s, e = built.offsets[u], built.offsets[u + 1] - 2  # training prefix excludes valid + test
        full = built.items[s:e]
        m = b["mask"][r].numpy()
        assert m[-1] and (np.diff(m.astype(int)) >= 0).all()  # padding on the left only
        assert b["items"][r][m].tolist() == full[:-1][-8:].tolist()
        assert b["targets"][r][m].tolist() == full[1:][-8:].tolist()
        assert int(b["target_domain"][r]) == built.domains[e - 1]
        assert (b["items"][r][~m] == 0).all()


def test_eval_history_stops_before_the_target(built):
    ds = EvalDataset(built, "test", max_len=10, n_negatives=100)
    b = ds[list(range(len(ds)))]
    pos = ds.pos
    for r in range(len(ds)):
        u = int(b["user_idx"][r])
        seq = built.items[built.offsets[u] : built.offsets[u + 1]]
        assert int(b["target"][r]) == seq[pos[r]] == seq[-1]
        assert b["items"][r][b["mask"][r]].tolist() == seq[: pos[r]][-10:].tolist()  # nothing at or after the target
        assert int(b["target"][r]) not in b["negatives"][r].tolist()
    valid = EvalDataset(built, "valid", max_len=10)
    vb = valid[[0]]
    u = int(vb["user_idx"][0])
    seq = built.items[built.offsets[u] : built.offsets[u + 1]]
    assert int(vb["target"][0]) == seq[-2]
    assert vb["items"][0][vb["mask"][0]].tolist() == seq[:-2][-10:].tolist()  # neither valid nor test target


def test_eval_inputs_cut_to_the_training_window(built):
    """input_window: train keeps at most as many events as the longest training input, right-
    aligned in the same window; max_len keeps the window's worth."""
    from cdsr.evaluate.protocols import EvalConfig, input_events

    longest = int(built.train_ends().max()) - 1
    L = longest + 3
    assert input_events(built, EvalConfig(max_len=L)) == L
    assert input_events(built, EvalConfig(max_len=L, input_window="train")) == longest
    assert input_events(built, EvalConfig(max_len=longest - 2, input_window="train")) == longest - 2
    for split in ("valid", "test"):
        cut = EvalDataset(built, split, max_len=L, max_events=longest)
        full = EvalDataset(built, split, max_len=L)
        b, f = cut[list(range(len(cut)))], full[list(range(len(full)))]
        assert b["items"].shape == f["items"].shape == (len(cut), L)
        assert int(b["mask"].sum(1).max()) == longest < int(f["mask"].sum(1).max())
        for r in range(len(cut)):
            keep = f["items"][r][f["mask"][r]].tolist()[-longest:]
            assert b["items"][r][b["mask"][r]].tolist() == keep
            assert b["mask"][r][-len(keep):].all() and not b["mask"][r][:L - len(keep)].any()
        assert torch.equal(b["target"], f["target"])


def test_loader_is_deterministic_for_a_seed(built):
    ds = TrainDataset(built, max_len=8)
    first = [b["user_idx"] for b in make_loader(ds, 16, shuffle=True, seed=3)]
    again = [b["user_idx"] for b in make_loader(ds, 16, shuffle=True, seed=3)]
    other = [b["user_idx"] for b in make_loader(ds, 16, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sorted(torch.cat(first).tolist()) == sorted(ds.users.tolist())


def test_single_domain_view_keeps_targets_and_never_trains_on_them(built):
    for dom in range(len(built.domain_names)):
        view = built.restrict_to_domain(dom)
        assert (view.domains == dom).all()
        ev = EvalDataset(view, "test", max_len=50)
        b = ev[list(range(len(ev)))]
        want = built.targets.filter((pl.col("domain_idx") == dom) & (pl.col("split") == "test")).sort("user_idx")
        assert b["target"].tolist() == want["item_idx"].to_list()
        assert (b["domains"][b["mask"]] == dom).all()
        for r in range(len(ev)):  # history = the user's domain events before the merged target
            u = int(b["user_idx"][r])
            s = built.offsets[u]
            merged_pos = int(want["pos"][r])
            hist = [it for it, d in zip(built.items[s:s + merged_pos], built.domains[s:s + merged_pos]) if d == dom]
            assert b["items"][r][b["mask"][r]].tolist() == hist[-50:]
        # training prefixes: the domain's events among the merged training prefix only
        ends = view.train_ends()
        for u in range(0, len(ends), 17):
            s = built.offsets[u]
            n = built.offsets[u + 1] - s
            assert ends[u] == int((built.domains[s:s + n - 2] == dom).sum())
