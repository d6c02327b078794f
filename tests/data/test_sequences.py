"""Sequences stage: filter order, tie-break, contiguous re-indexing and statistics."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import polars as pl
import pytest
from helpers import make_cfg

from cdsr.data.config import SyntheticConfig
from cdsr.data.sequences import build_sequences, explode_sequences
from cdsr.data.synthetic import generate_events

ABXI = [{"min_user_domains": 2}, {"min_item_events": 3}, {"trim_last": 15}, {"min_user_domain_events": 2}]


def _synthetic_interactions(seed=3, users=300) -> pl.DataFrame:
    ev = generate_events(SyntheticConfig(users=users, items_per_domain=150, topics=8, events_per_user=[5, 30],
                                         domain_skip_prob=0.3, seed=seed))
    n = len(ev["user"])
    return pl.DataFrame({
        "user_id": [f"U{u:04d}" for u in ev["user"]], "item_id": [f"D{d}I{i:04d}" for d, i in zip(ev["domain"], ev["item"])],
        "domain": [f"D{d}" for d in ev["domain"]], "timestamp": ev["timestamp"], "ingest_order": np.arange(n),
    })


def _reference(df: pl.DataFrame, steps: list[dict], domains: list[str]) -> dict[str, list[str]]:
    """Plain-Python reference of the filters, step by step as ABXI describes them."""
    seq = defaultdict(list)
    for u, i, d, _t, _o in df.sort("user_id", "timestamp", "ingest_order").iter_rows():
        seq[u].append((i, d))
    for step in steps:
        (op, v), = step.items()
        if op == "min_user_domains":
            seq = {u: s for u, s in seq.items() if len({d for _, d in s}) >= v}
        elif op == "min_item_events":
            c = Counter(i for s in seq.values() for i, _ in s)
            seq = {u: [e for e in s if c[e[0]] >= v] for u, s in seq.items()}
            seq = {u: s for u, s in seq.items() if s}
        elif op == "trim_last":
            seq = {u: s[-v:] for u, s in seq.items()}
        elif op == "min_user_domain_events":
            seq = {u: s for u, s in seq.items() if all(sum(d == x for _, x in s) >= v for d in domains)}
    return {u: [i for i, _ in s] for u, s in seq.items()}


def _result(tables) -> dict[str, list[str]]:
    id_of = dict(zip(tables.items["item_idx"].to_list(), tables.items["item_id"].to_list()))
    return {u: [id_of[i] for i in its] for u, its in zip(tables.sequences["user_id"].to_list(), tables.sequences["items"].to_list())}


def test_abxi_filter_order_matches_reference_on_synthetic_data():
    df = _synthetic_interactions()
    domains = ["D0", "D1", "D2"]
    cfg = make_cfg(domains=domains, sequences={"filters": ABXI, "domains_required": "all"})
    got = _result(build_sequences(df, cfg))
    want = _reference(df, ABXI, domains)
    assert got == want and len(got) > 20
    # the order is part of the definition: trimming before the item threshold gives another dataset
    swapped = [ABXI[0], ABXI[2], ABXI[1], ABXI[3]]
    other = _result(build_sequences(df, make_cfg(domains=domains, sequences={"filters": swapped})))
    assert other == _reference(df, swapped, domains) and other != got


def test_trim_last_keeps_short_users_whole():
    df = pl.DataFrame({"user_id": ["a"] * 3 + ["b"] * 6, "item_id": [f"i{k}" for k in range(9)], "domain": ["X"] * 9,
                       "timestamp": list(range(9)), "ingest_order": list(range(9))})
    t = build_sequences(df, make_cfg(domains=["X"], sequences={"filters": [{"trim_last": 4}]}))
    assert t.sequences["items"].list.len().to_list() == [3, 4]
    assert _result(t)["b"] == ["i5", "i6", "i7", "i8"]  # the latest four


def test_tie_break_source_order_and_item_id():
    df = pl.DataFrame({"user_id": ["u"] * 4, "item_id": ["k2", "f9", "f1", "k1"], "domain": ["K", "F", "F", "K"],
                       "timestamp": [5, 5, 5, 1], "ingest_order": [0, 1, 2, 3]})
    src = _result(build_sequences(df, make_cfg(domains=["F", "K"])))
    assert src["u"] == ["k1", "k2", "f9", "f1"]  # equal timestamps keep raw order
    by_id = _result(build_sequences(df, make_cfg(domains=["F", "K"], sequences={"tie_break": "item_id"})))
    assert by_id["u"] == ["k1", "f1", "f9", "k2"]


def test_reindex_is_contiguous_per_domain_and_stats_are_exact():
    df = pl.DataFrame({"user_id": ["a", "a", "a", "b", "b", "b", "b"], "item_id": ["k1", "f1", "f2", "f1", "k2", "k1", "k1"],
                       "domain": ["K", "F", "F", "F", "K", "K", "K"], "timestamp": [1, 2, 3, 1, 2, 3, 4],
                       "ingest_order": list(range(7))})
    t = build_sequences(df, make_cfg(domains=["F", "K"]))
    assert t.items.select("item_idx", "item_id", "domain_idx").rows() == [(1, "f1", 0), (2, "f2", 0), (3, "k1", 1), (4, "k2", 1)]
    assert t.stats["item_index_ranges"] == {"F": [1, 2], "K": [3, 4]}
    assert t.stats["items_per_domain"] == {"F": 2, "K": 2} and t.stats["events_per_domain"] == {"F": 3, "K": 4}
    # delta = mean_u sum_d s_d^2 / S^2: a = (2^2 + 1^2) / 9, b = (1 + 9) / 16
    assert t.stats["delta"] == pytest.approx(((4 + 1) / 9 + (1 + 9) / 16) / 2)
    assert t.stats["mean_length"] == 3.5
    long = explode_sequences(t.sequences)
    assert long.filter(pl.col("user_idx") == 0)["item_idx"].to_list() == [3, 1, 2]
    assert long["pos"].to_list() == [0, 1, 2, 0, 1, 2, 3]


def test_min_user_domain_events_all_vs_present():
    df = pl.DataFrame({"user_id": ["a"] * 4 + ["b"] * 2, "item_id": ["f1", "f2", "k1", "k2", "f1", "f2"],
                       "domain": ["F", "F", "K", "K", "F", "F"], "timestamp": list(range(6)), "ingest_order": list(range(6))})
    step = [{"min_user_domain_events": 2}]
    assert build_sequences(df, make_cfg(domains=["F", "K"], sequences={"filters": step, "domains_required": "all"})).stats["users"] == 1
    assert build_sequences(df, make_cfg(domains=["F", "K"], sequences={"filters": step, "domains_required": "present"})).stats["users"] == 2


def test_parquet_input_and_byte_order_of_ids(tmp_path):
    """build_sequences reads interactions.parquet out of core (DuckDB numbers users and items,
    the filters run on integer codes): the same tables as from the frame, and ids ordered as
    polars orders strings (bytes: upper case before lower case, non-ASCII last)."""
    users = ["b", "B", "é", "a", "Z", "ä"]
    rows = []
    for k, u in enumerate(users):
        for j in range(4):
            item = ["x1", "X1", "ü", "x10"][(k + j) % 4]
            rows.append((u, item + ("K" if j % 2 else "F"), "K" if j % 2 else "F", 100 + j * 10 + k))
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "domain", "timestamp"], orient="row").with_row_index(
        "ingest_order").with_columns(pl.col("ingest_order").cast(pl.Int64))
    path = tmp_path / "interactions.parquet"
    df.write_parquet(path)
    cfg = make_cfg(domains=["F", "K"], sequences={"filters": [{"min_item_events": 2}]})
    a, b = build_sequences(df, cfg), build_sequences(path, cfg, work_dir=tmp_path)
    for x, y in ((a.sequences, b.sequences), (a.items, b.items), (a.users, b.users)):
        assert x.equals(y)
    assert a.stats == b.stats
    assert a.users["user_id"].to_list() == sorted(users, key=lambda s: s.encode())
    for d in ("F", "K"):
        ids = a.items.filter(pl.col("domain") == d)["item_id"].to_list()
        assert ids == sorted(ids, key=lambda s: s.encode()) and ids == pl.Series(ids).sort().to_list()
    assert not list(tmp_path.glob("cdsr-sequences-*"))  # the spill directory is removed


def test_a_build_as_of_a_time_then_a_refresh(tiny_root, tmp_path):
    """``sequences.as_of`` keeps the events up to a time; moving it forward is a refresh: new users,
    new items and new events of known users arrive, and the data version changes."""
    import json

    import polars as pl
    from helpers import TINY, make_cfg

    from cdsr.data.build import build
    from cdsr.track.tracking import data_version

    lo, hi = json.loads((tiny_root / "t" / "processed" / "stats.json").read_text())["timestamp_range"]
    builds = {}
    for name, frac in (("early", 0.6), ("later", 0.8)):
        seqs = {**TINY["sequences"], "as_of": int(lo + frac * (hi - lo))}
        root = tmp_path / name
        build(make_cfg(**{**TINY, "sequences": seqs}), root, log=lambda s: None)
        stats = json.loads((root / "t" / "processed" / "stats.json").read_text())
        assert stats["timestamp_range"][1] <= seqs["as_of"]
        assert any(r["step"] == f"as_of: {seqs['as_of']}" for r in stats["filter_log"])
        builds[name] = (root, pl.read_parquet(root / "t" / "processed" / "sequences.parquet"))
    (r1, early), (r2, later) = builds["early"], builds["later"]
    e_users, l_users = set(early["user_id"]), set(later["user_id"])
    assert l_users - e_users, "new users arrive"
    lens = dict(zip(later["user_id"], later["items"].list.len()))
    assert any(lens[u] > n for u, n in zip(early["user_id"], early["items"].list.len()) if u in lens), \
        "known users get new events"
    items = lambda r: set(pl.read_parquet(r / "t" / "processed" / "items.parquet")["item_id"])  # noqa: E731
    assert items(r2) - items(r1), "new items arrive"
    assert data_version("t", r1)["split.parquet"] != data_version("t", r2)["split.parquet"]


def test_a_bad_as_of_is_a_config_error():
    from helpers import TINY, make_cfg

    from cdsr.config import ConfigError

    with pytest.raises(ConfigError, match="not an ISO date"):
        make_cfg(**{**TINY, "sequences": {**TINY["sequences"], "as_of": "next tuesday"}})
