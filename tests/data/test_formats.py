"""Readers: each raw format parses into canonical rows; chunking never changes the result."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest
from helpers import ingest_tables, make_cfg

from cdsr.data.formats import RawFormatError, iter_line_chunks, stem_domain
from cdsr.data.ingest import ingest


def test_review_json_gz(tmp_path):
    rows = [
        {"overall": 5.0, "reviewerID": "U1", "asin": "I1", "unixReviewTime": 1400000000, "reviewText": "a, \"b\""},
        {"overall": 3.0, "reviewerID": "U2", "asin": "I2", "unixReviewTime": 1400086400},
    ]
    p = tmp_path / "Beauty_5.json.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": "amazon-review-json", "path": str(p), "domain_regex": r"^(?P<domain>.+?)_5\."}])
    assert rep["rows_read"] == 2 and rep["rows_kept"] == 2
    assert df["domain"].to_list() == ["Beauty", "Beauty"]
    assert df["timestamp"].to_list() == [1400000000, 1400086400]
    assert df["rating"].to_list() == [5.0, 3.0]
    assert df["source_line"].to_list() == [1, 2]


def test_amazon_2023_ms_and_parent_asin(tmp_path):
    p = tmp_path / "Books.jsonl"
    p.write_text(
        json.dumps({"user_id": "U1", "asin": "C1", "parent_asin": "P1", "rating": 4, "timestamp": 1588615855070}) + "\n"
        + json.dumps({"user_id": "U2", "asin": "C2", "rating": 2, "timestamp": 1588615855999}) + "\n")
    _, df, _ = ingest_tables(tmp_path, [{"format": "amazon-2023-jsonl", "path": str(p)}])
    assert df["item_id"].to_list() == ["P1", "C2"]  # parent_asin, falling back to asin
    assert df["timestamp"].to_list() == [1588615855, 1588615855]
    assert df["domain"].to_list() == ["Books", "Books"]


def test_ratings_csv_2014_and_2018_column_orders(tmp_path):
    a = tmp_path / "Food.csv"
    a.write_text("U1,I1,5.0,1400000000\nU2,I2,4.0,1400000001\n")
    b = tmp_path / "Toys.csv"
    b.write_text("I9,U1,1.0,1400000002\r\n")  # CRLF line ends are stripped
    _, df, _ = ingest_tables(tmp_path, [{"format": "ratings-csv-2014", "path": str(a)}, {"format": "ratings-csv-2018", "path": str(b)}])
    assert df.select("user_id", "item_id", "domain").rows() == [("U1", "I1", "Food"), ("U2", "I2", "Food"), ("U1", "I9", "Toys")]
    assert df["ingest_order"].to_list() == [0, 1, 2]


def test_interaction_csv_header_mapping_and_domain_column(tmp_path):
    p = tmp_path / "all.csv"
    p.write_text("ts,who,what,cat\n1400000000,U1,I1,Food\n1400000001,U1,I2,Kitchen\n")
    _, df, _ = ingest_tables(tmp_path, [{"format": "interaction-csv", "path": str(p),
                                 "columns": {"user": "who", "item": "what", "timestamp": "ts", "domain": "cat"}}])
    assert df["domain"].to_list() == ["Food", "Kitchen"]
    assert df["source_line"].to_list() == [2, 3]  # line numbers count the header


def test_interaction_csv_missing_column_is_a_clear_error(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(RawFormatError, match=r"x.csv: line 1: .*no column 'reviewerID'"):
        ingest_tables(tmp_path, [{"format": "interaction-csv", "path": str(p), "columns": {"user": "reviewerID", "item": "b", "timestamp": "c"}}])


def test_abxi_benchmark_keeps_line_order(tmp_path):
    (tmp_path / "items.json").write_text(json.dumps({"A1": [1, 0], "A2": [2, 0], "K1": [3, 1]}))
    (tmp_path / "users.json").write_text(json.dumps({"R0": 0, "R1": 1}))
    seq = tmp_path / "seq.txt"
    seq.write_text("0 3|1400000000 1|1400000000 2|1400000001\n1 2|1400000005 9|1400000006 1|xx 3\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": "abxi-benchmark", "path": str(seq), "item_map": str(tmp_path / "items.json"),
                                   "user_map": str(tmp_path / "users.json"), "domain_names": ["Food", "Kitchen"]}],
                      ingest={"duplicates": "keep"})
    assert df.select("user_id", "item_id", "domain", "source_pos").rows() == [
        ("R0", "K1", "Kitchen", 1), ("R0", "A1", "Food", 2), ("R0", "A2", "Food", 3), ("R1", "A2", "Food", 1)]
    assert sorted(q["reason"].to_list()) == ["bad_event_token", "non_numeric_timestamp", "unknown_item_id"]
    assert rep["rows_read"] == 7


def test_syncrec_and_kuairand_sequence_formats(tmp_path):
    s = tmp_path / "amazon_seq.txt"
    s.write_text("\tuser_id\titem\ttype\tunix_time\tlist_len\n"
                 "0\tU1\tI1,I2\tBooks,Toys\t1400000000,1400000001\t2\n"
                 "1\tU2\tI3\tBooks,Toys\t1400000000\t1\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": "syncrec-seq", "path": str(s)}])
    assert df.select("user_id", "item_id", "domain").rows() == [("U1", "I1", "Books"), ("U1", "I2", "Toys")]
    assert q["reason"].to_list() == ["list_length_mismatch"] and q["source_line"].to_list() == [3]
    k = tmp_path / "seqs.tsv.gz"
    with gzip.open(k, "wt") as fh:
        fh.write("split\tseq_id\titems\tdomains\ntraining\t7\t10 11 12\t9 9 4\n")
    rep, df, _ = ingest_tables(tmp_path, [{"format": "kuairand-seq", "path": str(k)}],
                      ingest={"min_timestamp": None, "max_timestamp": None})
    assert df.select("user_id", "item_id", "domain", "timestamp").rows() == [("7", "10", "9", 1), ("7", "11", "9", 2), ("7", "12", "4", 3)]


def test_chunk_size_does_not_change_the_result(tmp_path):
    lines = [f"U{i % 7},I{i},{1 + i % 5}.0,{1400000000 + i}" for i in range(500)] + ["bad line", "U1,,1.0,1400000000"]
    p = tmp_path / "D.csv"
    p.write_text("\n".join(lines))  # no final newline: the last line still counts
    small = make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(p)}], ingest={"chunk_bytes": 64})
    big = make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(p)}])
    r1, r2 = ingest(small, tmp_path / "a"), ingest(big, tmp_path / "b")
    for k in ("rows_read", "rows_kept", "rows_quarantined", "quarantine_reasons"):
        assert r1[k] == r2[k]
    a = pl.read_parquet(tmp_path / "a" / "interactions.parquet")
    b = pl.read_parquet(tmp_path / "b" / "interactions.parquet")
    assert a.equals(b) and r1["rows_read"] == 502
    q = pl.read_parquet(tmp_path / "a" / "quarantine.parquet")
    assert q.select("source_line", "reason").rows() == [(501, "wrong_field_count"), (502, "empty_item_id")]


def test_line_chunks_are_exact(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"a\nbb\n\nccc\nd")
    got = list(iter_line_chunks(p, 3))
    assert [s for c in got for s in c.lines.to_pylist()] == ["a", "bb", "", "ccc", "d"]
    assert [n for c in got for n in c.line_no.tolist()] == [1, 2, 3, 4, 5]


def test_invalid_utf8_line_is_quarantined(tmp_path):
    p = tmp_path / "D.csv"
    p.write_bytes(b"U1,I1,5.0,1400000000\nU\xff\xfe,I2,5.0,1400000000\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": "ratings-csv-2014", "path": str(p)}])
    assert rep["rows_kept"] == 1 and q["reason"].to_list() == ["invalid_utf8"]


def test_stem_domain():
    from pathlib import Path

    assert stem_domain(Path("Home_and_Kitchen.csv")) == "Home_and_Kitchen"
    assert stem_domain(Path("reviews_Books.json.gz")) == "reviews_Books"
