"""Data validation layer (cdsr.data.validate): pandera + Great Expectations on small frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cdsr  # noqa: F401  (offline env vars before great_expectations is imported)
from cdsr.data.config import DatasetConfig, dataset_config
from cdsr.data.schemas import user_constraints
from cdsr.data.validate import ValidationFailed, validate_interactions, validate_sequences


def make_cfg(filters: list[dict] | None = None, domains_required: str = "all", duplicates: str = "drop") -> DatasetConfig:
    return dataset_config({"datasets": {"t": {
        "sources": [{"format": "interaction-csv", "path": "x.csv"}],
        "domains": ["A", "B"],
        "ingest": {"duplicates": duplicates, "min_timestamp": "2000-01-01", "max_timestamp": "2030-12-31"},
        "sequences": {"filters": filters if filters is not None else [{"min_user_domain_events": 2}],
                      "domains_required": domains_required},
    }}}, "t")


T0 = 1_400_000_000  # 2014


def interactions() -> pd.DataFrame:
    rows = [  # user, item, domain, timestamp, rating
        ("u1", "a1", "A", T0, 5.0), ("u1", "b1", "B", T0 + 10, np.nan), ("u1", "a2", "A", T0 + 20, 4.0),
        ("u2", "a1", "A", T0 + 5, np.nan), ("u2", "b2", "B", T0 + 6, 3.0), ("u2", "b1", "B", T0 + 7, 1.0),
    ]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "domain", "timestamp", "rating"])
    n = len(df)
    return df.assign(
        timestamp=df["timestamp"].astype("int64"),
        rating=df["rating"].astype("float64"),
        source_file="raw/x.csv",
        source_line=np.arange(2, n + 2, dtype="int64"),
        source_pos=np.zeros(n, dtype="int32"),
        ingest_order=np.arange(n, dtype="int64"),
    )


def items() -> pd.DataFrame:
    return pd.DataFrame({
        "item_idx": np.array([1, 2, 3, 4], dtype="int64"),
        "item_id": ["a1", "a2", "b1", "b2"],
        "domain_idx": np.array([0, 0, 1, 1], dtype="int64"),
        "domain": ["A", "A", "B", "B"],
    })


def seq_long(seqs: dict[int, list[int]] | None = None) -> pd.DataFrame:
    """One row per event from {user_idx: [item_idx, ...]}, domains from items(), times increasing."""
    seqs = seqs or {0: [1, 3, 2, 4], 1: [2, 1, 4, 3]}
    dom = dict(zip(items()["item_idx"], items()["domain_idx"]))
    rows = [(u, p, i, dom[i], T0 + 100 * u + p) for u, s in seqs.items() for p, i in enumerate(s)]
    return pd.DataFrame(rows, columns=["user_idx", "pos", "item_idx", "domain_idx", "timestamp"]).astype("int64")


def fails(fn, *args, check: str) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as ei:
        fn(*args)
    assert check in str(ei.value), str(ei.value)
    return ei.value


# --------------------------------------------------------------------------- interactions


def test_valid_interactions_pass_and_write_report_and_docs(tmp_path: Path) -> None:
    report = validate_interactions(interactions(), make_cfg(), tmp_path)
    assert report["success"] and report["rows"] == 6 and report["table"] == "interactions"
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["success"] is True
    assert all(v == "ok" for v in saved["pandera"].values())
    assert saved["great_expectations"] and all(v["success"] for v in saved["great_expectations"].values())
    assert "interactions.no_exact_duplicates" in saved["pandera"]
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_null_user_fails_and_still_writes_outputs(tmp_path: Path) -> None:
    df = interactions()
    df.loc[1, "user_id"] = None
    exc = fails(validate_interactions, df, make_cfg(), tmp_path, check="user_id:not_null")
    assert "raw/x.csv:3" in str(exc)  # the example row cites its raw line
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["success"] is False and saved["pandera"]["interactions.user_id:not_null"] == 1
    assert saved["great_expectations"]["interactions.user_id:not_null"]["unexpected_count"] == 1
    assert (tmp_path / "data_docs" / "index.html").is_file()


def test_wall_time_goes_to_the_timing_file_not_the_report(tmp_path: Path) -> None:
    """validation.json and the Data Docs are a DVC output: the same bytes for the same table
    (the wall time is in the timing file, written also when validation fails)."""
    df = interactions()
    validate_interactions(df, make_cfg(), tmp_path / "a", timing_file=tmp_path / "a_timing.json")
    validate_interactions(df, make_cfg(), tmp_path / "b")
    timing = json.loads((tmp_path / "a_timing.json").read_text())
    assert timing["elapsed_s"] >= 0 and timing["started_at"].endswith("Z")
    assert not (tmp_path / "b_timing.json").exists()
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert a == b and "elapsed_s" not in json.loads(a[Path("validation.json")])
    fails(validate_sequences, seq_long({0: [1, 3, 2, 4], 1: [2, 1]}), items(), make_cfg([]), tmp_path / "c",
          tmp_path / "c_timing.json", check="leave_one_out_min_events")
    assert json.loads((tmp_path / "c_timing.json").read_text())["elapsed_s"] >= 0


def test_empty_item_fails(tmp_path: Path) -> None:
    df = interactions()
    df.loc[2, "item_id"] = "  "
    fails(validate_interactions, df, make_cfg(), tmp_path, check="item_id:non_empty")


@pytest.mark.parametrize("col,value", [("user_id", "u\x00 1"), ("item_id", "b\t1"), ("item_id", "a2\x7f")])
def test_control_character_in_id_fails_both_layers(tmp_path: Path, col: str, value: str) -> None:
    """Ingest quarantines such ids; validation catches them too (defence in depth)."""
    df = interactions()
    df.loc[5, col] = value
    exc = fails(validate_interactions, df, make_cfg(), tmp_path, check=f"{col}:no_control_chars")
    assert exc.report["pandera"][f"interactions.{col}:no_control_chars"] == 1
    assert exc.report["great_expectations"][f"interactions.{col}:no_control_chars"]["unexpected_count"] == 1
    assert "raw/x.csv:7" in str(exc) and repr(value) in str(exc)


def test_undeclared_domain_fails(tmp_path: Path) -> None:
    df = interactions()
    df.loc[0, ["item_id", "domain"]] = ["c1", "C"]
    exc = fails(validate_interactions, df, make_cfg(), tmp_path, check="domain:declared_domain")
    assert "raw/x.csv:2" in str(exc)


def test_timestamp_out_of_range_fails(tmp_path: Path) -> None:
    df = interactions()
    df.loc[3, "timestamp"] = 100  # 1970
    fails(validate_interactions, df, make_cfg(), tmp_path, check="timestamp:within_bounds")


def test_item_in_two_domains_fails(tmp_path: Path) -> None:
    df = interactions()
    df.loc[4, "item_id"] = "a1"  # a1 is an A item; this row is in B
    exc = fails(validate_interactions, df, make_cfg(), tmp_path, check="item_in_one_domain")
    # pandera flags every row of the item (3 rows); GX flags the item once on the per-item frame
    assert exc.report["pandera"]["interactions.item_in_one_domain"] == 3
    assert exc.report["great_expectations"]["interaction_items.item_in_one_domain"]["unexpected_count"] == 1


def test_exact_duplicate_fails_under_drop_but_not_keep(tmp_path: Path) -> None:
    df = interactions()
    dup = df.iloc[[1]].assign(source_line=np.int64(99), ingest_order=np.int64(99))  # NaN rating: still equal
    df = pd.concat([df, dup], ignore_index=True)
    exc = fails(validate_interactions, df, make_cfg(), tmp_path / "drop", check="no_exact_duplicates")
    assert exc.report["pandera"]["interactions.no_exact_duplicates"] == 2
    assert "raw/x.csv:99" in str(exc)
    assert validate_interactions(df, make_cfg(duplicates="keep"), tmp_path / "keep")["success"]


def test_wrong_dtype_and_missing_column_fail(tmp_path: Path) -> None:
    df = interactions().assign(timestamp=lambda d: d["timestamp"].astype("float64")).drop(columns="ingest_order")
    exc = fails(validate_interactions, df, make_cfg(), tmp_path, check="timestamp:dtype")
    assert "interactions.ingest_order:present" in str(exc)


def test_no_rows_fails(tmp_path: Path) -> None:
    fails(validate_interactions, interactions().iloc[:0], make_cfg(), tmp_path, check="at_least_one_row")


# --------------------------------------------------------------------------- sequences


def test_valid_sequences_pass(tmp_path: Path) -> None:
    report = validate_sequences(seq_long(), items(), make_cfg(), tmp_path)
    assert report["success"] and report["rows"] == 8 and report["users"] == 2 and report["items"] == 4
    assert report["user_constraints"]["min_events_every_domain"] == 2
    assert "users.min_domain_events_all:min_user_domain_events" in report["pandera"]
    assert (tmp_path / "validation.json").is_file() and (tmp_path / "data_docs" / "index.html").is_file()


def test_out_of_order_timestamps_fail(tmp_path: Path) -> None:
    s = seq_long()
    s.loc[2, "timestamp"] = T0 - 1  # user 0's third event is older than the second
    exc = fails(validate_sequences, s, items(), make_cfg(), tmp_path, check="time_ordered")
    assert exc.report["pandera"]["seq_long.time_ordered"] == 1
    assert exc.report["pandera"]["users.time_ordered:time_ordered"] == 1


def test_non_contiguous_item_index_fails(tmp_path: Path) -> None:
    it = items()
    it.loc[3, "item_idx"] = 5  # 1, 2, 3, 5: a gap at 4
    s = seq_long()
    s.loc[s["item_idx"] == 4, "item_idx"] = 5
    fails(validate_sequences, s, it, make_cfg(), tmp_path, check="item_idx_contiguous")


def test_domains_not_in_slices_fail(tmp_path: Path) -> None:
    it = items().iloc[[0, 2, 1, 3]].reset_index(drop=True).assign(item_idx=np.arange(1, 5, dtype="int64"))
    s = seq_long()  # item_idx 1..4 now mean a1, b1, a2, b2: domains 0, 1, 0, 1
    s["domain_idx"] = s["item_idx"].map(dict(zip(it["item_idx"], it["domain_idx"])))
    fails(validate_sequences, s, it, make_cfg(), tmp_path, check="domain_contiguous")


def test_item_domain_mismatch_fails(tmp_path: Path) -> None:
    s = seq_long()
    s.loc[0, "domain_idx"] = 1  # item 1 is in domain 0
    exc = fails(validate_sequences, s, items(), make_cfg(), tmp_path, check="item_domain_matches")
    assert exc.report["great_expectations"]["seq_long.item_domain_matches"]["unexpected_count"] == 1


def test_unknown_item_fails(tmp_path: Path) -> None:
    s = seq_long()
    s.loc[0, "item_idx"] = 9
    fails(validate_sequences, s, items(), make_cfg(), tmp_path, check="item_known")


def test_too_few_events_in_a_domain_fails(tmp_path: Path) -> None:
    s = seq_long({0: [1, 3, 2, 4], 1: [2, 1, 1, 3]})  # user 1 has a single B event
    exc = fails(validate_sequences, s, items(), make_cfg([{"min_user_domain_events": 2}]), tmp_path,
                check="min_user_domain_events")
    assert exc.report["pandera"]["users.min_domain_events_all:min_user_domain_events"] == 1
    assert "user_idx=1" in str(exc)
    # domains_required: present only looks at the user's domains; 1 event in B still fails
    fails(validate_sequences, s, items(), make_cfg([{"min_user_domain_events": 2}], "present"), tmp_path,
          check="min_user_domain_events")


def test_missing_domain_fails_only_under_all(tmp_path: Path) -> None:
    s = seq_long({0: [1, 3, 2, 4], 1: [2, 1, 2]})  # user 1 has no B event at all
    fails(validate_sequences, s, items(), make_cfg([{"min_user_domain_events": 2}], "all"), tmp_path / "all",
          check="min_user_domain_events")
    assert validate_sequences(s, items(), make_cfg([{"min_user_domain_events": 2}], "present"),
                              tmp_path / "present")["success"]


def test_short_user_and_bad_positions_fail(tmp_path: Path) -> None:
    s = seq_long({0: [1, 3, 2, 4], 1: [2, 1]})
    s.loc[s["user_idx"] == 0, "pos"] = [0, 1, 2, 4]  # a hole in user 0's positions
    exc = fails(validate_sequences, s, items(), make_cfg([]), tmp_path, check="leave_one_out_min_events")
    assert "pos_contiguous" in str(exc)


def test_user_constraints_follow_filter_order() -> None:
    c = user_constraints(make_cfg([{"min_user_domains": 2}, {"min_item_events": 3}, {"trim_last": 50},
                                   {"min_user_domain_events": 5}], "all"))
    # min_user_domains precedes event-removing steps: not re-checked on the final table
    assert (c.min_domains, c.min_events_every_domain, c.min_events_present_domain, c.min_events) == (None, 5, None, 3)
    c = user_constraints(make_cfg([{"min_user_events": 10}, {"min_user_domains": 2}], "present"))
    assert (c.min_events, c.min_domains) == (10, 2)
    c = user_constraints(make_cfg([{"min_user_domain_events": 2}, {"trim_last": 5}], "present"))
    assert c.min_events_present_domain is None


def test_gx_reports_time_order_row_by_row(tmp_path: Path) -> None:
    s = seq_long()
    s.loc[5, "timestamp"] = T0  # user 1's second event is older than their first
    exc = fails(validate_sequences, s, items(), make_cfg(), tmp_path, check="seq_long.time_ordered")
    assert exc.report["great_expectations"]["seq_long.time_ordered"]["unexpected_count"] == 1
    assert exc.report["great_expectations"]["users.time_ordered"]["unexpected_count"] == 1


# --------------------------------------------------------------------------- batched (large tables)


def _batched_equals_whole(whole_dir: Path, batched_dir: Path) -> dict:
    """The batched run's report equals the whole-table run's (failures in any order)."""
    a = json.loads((whole_dir / "validation.json").read_text())
    b = json.loads((batched_dir / "validation.json").read_text())
    def by_check(r: dict) -> list:
        return sorted(r["failures"], key=lambda f: (f["layer"], f["check"]))

    assert by_check(b) == by_check(a)
    assert {k: v for k, v in b.items() if k != "failures"} == {k: v for k, v in a.items() if k != "failures"}
    assert (batched_dir / "data_docs" / "index.html").is_file()
    return a


@pytest.mark.parametrize("broken", [False, True])
def test_interactions_in_batches_report_as_whole(tmp_path: Path, broken: bool) -> None:
    """validate_interactions_file with tiny batches: the same report as one whole-table run, also
    for cross-row failures that span batches (a repeated ingest_order, exact duplicates, an item
    in two domains) and row failures in several batches."""
    import polars as pl

    from cdsr.data.validate import validate_interactions_file

    df = pd.concat([interactions()] * 3, ignore_index=True)
    df["user_id"] = df["user_id"] + pd.Series(np.arange(len(df)) // 6, dtype="int64").astype(str)
    df["ingest_order"] = np.arange(len(df), dtype="int64")
    if broken:
        df.loc[[1, 13], "ingest_order"] = 7  # rows 1, 7, 13 share one ingest_order (3 batches)
        df.loc[11] = df.loc[2]  # an exact duplicate across batches (and ingest_order 2 again)
        df.loc[[4, 9, 16], "item_id"] = ["", " ", "\x00x"]  # row failures in 3 batches
        df.loc[15, "domain"] = "B"  # item a1 of user 2 in domain B: a1 is now in two domains
    path = tmp_path / "interactions.parquet"
    pl.from_pandas(df).write_parquet(path)
    cfg = make_cfg()
    whole = pl.read_parquet(path).to_pandas()
    runs = {}
    for name, call in (("whole", lambda d: validate_interactions(whole, cfg, d)),
                       ("batched", lambda d: validate_interactions_file(path, cfg, d, batch_rows=5))):
        try:
            runs[name] = call(tmp_path / name)
        except ValidationFailed as exc:
            runs[name] = exc.report
    report = _batched_equals_whole(tmp_path / "whole", tmp_path / "batched")
    assert report["success"] is not broken
    if broken:
        assert report["pandera"]["interactions.ingest_order:unique"] == 5  # 1, 7, 13 and 2, 11
        assert report["pandera"]["interactions.no_exact_duplicates"] == 2
        assert report["great_expectations"]["interactions.item_id:non_empty"]["unexpected_count"] == 2
        fail = {f["check"]: f for f in report["failures"] if f["layer"] == "pandera"}
        assert fail["interactions.no_exact_duplicates"]["examples"][0].startswith("raw/x.csv:4: ")


@pytest.mark.parametrize("broken", [False, True])
def test_sequences_in_batches_report_as_whole(tmp_path: Path, broken: bool) -> None:
    """validate_sequence_tables with batches of a few users: the same report as one run on the
    exploded table, and a user order broken across a batch boundary is caught."""
    import polars as pl

    from cdsr.data.sequences import explode_sequences
    from cdsr.data.validate import validate_sequence_tables

    its = [[1, 3, 2, 4], [2, 1, 4, 3], [1, 3, 4], [2, 4, 1, 3, 2], [3, 1, 4, 2]]
    users = [0, 1, 2, 3, 4] if not broken else [0, 1, 3, 2, 4]
    dom = dict(zip(items()["item_idx"], items()["domain_idx"]))
    ts = [[T0 + 100 * u + p for p in range(len(s))] for u, s in zip(users, its)]
    if broken:
        ts[1][2] = T0  # out of time order inside user 1
    seqs = pl.DataFrame({"user_idx": users, "user_id": [f"u{u}" for u in users], "items": its,
                         "domains": [[dom[i] for i in s] for s in its], "timestamps": ts},
                        schema={"user_idx": pl.Int64, "user_id": pl.String, "items": pl.List(pl.Int64),
                                "domains": pl.List(pl.Int64), "timestamps": pl.List(pl.Int64)})
    it = pl.from_pandas(items())
    cfg = make_cfg([{"min_user_domain_events": 1}])
    for name, call in (("whole", lambda d: validate_sequences(explode_sequences(seqs).to_pandas(), items(), cfg, d)),
                       ("batched", lambda d: validate_sequence_tables(seqs, it, cfg, d, batch_rows=6))):
        try:
            call(tmp_path / name)
        except ValidationFailed:
            pass
    report = _batched_equals_whole(tmp_path / "whole", tmp_path / "batched")
    assert report["success"] is not broken
    if broken:
        assert report["pandera"]["seq_long.sorted_by_user_pos"] == 1
        assert report["great_expectations"]["seq_long.user_idx:sorted"]["unexpected_count"] == 1
