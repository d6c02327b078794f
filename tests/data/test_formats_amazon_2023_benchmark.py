"""The Amazon Reviews 2023 benchmark CSVs (format ``amazon-2023-benchmark-csv``): header-driven,
ms timestamps, the category from ``<Category>.<part>.csv[.gz]``, the ``history`` column of the
``_w_his`` variants parsed but never read as events, bad rows quarantined with file and line."""

from __future__ import annotations

import gzip

import polars as pl
import pytest
from helpers import ingest_tables

from cdsr.data.formats import RawFormatError, benchmark_domain

FMT = "amazon-2023-benchmark-csv"
HEADER = "user_id,parent_asin,rating,timestamp"
ROWS = ["AGK,B006,3.0,1452647382000", "AGK,B00T,4.0,1454675785999", "AZZ,B006,5.0,1628643414042"]


@pytest.mark.parametrize("name,domain", [
    ("Toys_and_Games.train.csv", "Toys_and_Games"), ("Toys_and_Games.valid.csv.gz", "Toys_and_Games"),
    ("All_Beauty.test.csv", "All_Beauty"), ("Toys_and_Games.csv", "Toys_and_Games"),  # rating_only
    ("Health_and_Personal_Care.other.csv", "Health_and_Personal_Care.other"),  # not a split part: the stem
])
def test_benchmark_domain_from_the_file_name(tmp_path, name, domain):
    assert benchmark_domain(tmp_path / name) == domain


def test_good_file_ms_timestamps_and_category(tmp_path):
    p = tmp_path / "Toys_and_Games.train.csv"
    p.write_text("\n".join([HEADER, *ROWS]) + "\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": FMT, "path": str(p)}])
    assert q.height == 0 and rep["rows_read"] == rep["rows_kept"] == 3
    assert df.select("user_id", "item_id", "domain").rows() == [
        ("AGK", "B006", "Toys_and_Games"), ("AGK", "B00T", "Toys_and_Games"), ("AZZ", "B006", "Toys_and_Games")]
    assert df["timestamp"].to_list() == [1452647382, 1454675785, 1628643414]  # ms -> s, floored
    assert df["rating"].to_list() == [3.0, 4.0, 5.0]
    assert df["source_line"].to_list() == [2, 3, 4]  # the header is line 1


@pytest.mark.parametrize("unit,want", [(None, [1452647, 1454675, 1628643]), ("ms", [1452647, 1454675, 1628643]),
                                       ("s", [1452647382, 1454675785, 1628643414])])
def test_a_given_timestamp_unit_wins_over_the_formats_own(tmp_path, unit, want):
    """ms is the format's own unit; ``timestamp_unit: s`` (a copy of the files converted to
    seconds) is honoured rather than silently ignored."""
    p = tmp_path / "Toys_and_Games.train.csv"
    p.write_text("\n".join([HEADER, "AGK,B006,3.0,1452647382", "AGK,B00T,4.0,1454675785",
                              "AZZ,B006,5.0,1628643414"]) + "\n")
    src = {"format": FMT, "path": str(p)} | ({"timestamp_unit": unit} if unit else {})
    rep, df, q = ingest_tables(tmp_path, [src], ingest={"min_timestamp": None})
    assert q.height == 0 and df["timestamp"].to_list() == want


def test_gz_parts_of_two_categories_and_declared_domains(tmp_path):
    """All three parts of a category are one domain; a declared domain list is checked against
    the category, not the file stem."""
    for cat, part, rows in (("Toys_and_Games", "train", ROWS[:2]), ("Toys_and_Games", "test", ROWS[2:]),
                            ("All_Beauty", "valid", ["AGK,C1,1.0,1500000000000"])):
        with gzip.open(tmp_path / f"{cat}.{part}.csv.gz", "wt") as fh:
            fh.write("\n".join([HEADER, *rows]) + "\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": FMT, "path": str(tmp_path / "*.csv.gz")}],
                      domains=["Toys_and_Games", "All_Beauty"])
    assert q.height == 0 and rep["rows_kept"] == 4
    assert sorted(set(df["domain"].to_list())) == ["All_Beauty", "Toys_and_Games"]
    assert df.filter(pl.col("domain") == "Toys_and_Games").height == 3


def test_history_column_is_parsed_not_counted(tmp_path):
    """A _w_his file: the history (quoted or not, empty for a first item) is not read as events:
    the earlier items are rows of their own (here of the train part)."""
    p = tmp_path / "Toys_and_Games.valid.csv"
    p.write_text("user_id,parent_asin,rating,timestamp,history\n"
                 "AGK,B006,3.0,1452647382000,\n"
                 "AGK,B00T,4.0,1454675785000,B006\n"
                 'AGK,B00S,3.0,1454676014000,"B006 B00T"\n'
                 "AGK,B00M,3.0,1471541996000,B006 B00T B00S\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": FMT, "path": str(p)}])
    assert q.height == 0 and rep["rows_read"] == rep["rows_kept"] == 4
    assert df["item_id"].to_list() == ["B006", "B00T", "B00S", "B00M"]
    assert df["domain"].unique().to_list() == ["Toys_and_Games"]


def test_columns_found_by_header_name(tmp_path):
    p = tmp_path / "Books.test.csv"
    p.write_text("timestamp,rating,parent_asin,user_id,history\n1500000000000,2.0,P1,U1,\n")
    _, df, _ = ingest_tables(tmp_path, [{"format": FMT, "path": str(p)}])
    assert df.select("user_id", "item_id", "timestamp", "rating").rows() == [("U1", "P1", 1500000000, 2.0)]


def test_bad_rows_are_quarantined_with_file_line_and_reason(tmp_path):
    p = tmp_path / "Toys_and_Games.test.csv.gz"
    lines = [HEADER,
             ROWS[0],
             ",B006,3.0,1452647382000",  # line 3: missing user
             "AGK,B007,3.0,yesterday",  # line 4: non-numeric timestamp
             "AGK,B008,3.0",  # line 5: a field short
             "AGK,B009,3.0,1452647382000,extra",  # line 6: a field too many (no history in this header)
             "AGK,,3.0,1452647382000",  # line 7: missing item
             "AGK,B00A,five,1452647382000",  # line 8: non-numeric rating
             ROWS[0],  # line 9: exact duplicate of line 2
             ROWS[1]]
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    rep, df, q = ingest_tables(tmp_path, [{"format": FMT, "path": str(p)}])
    q = q.sort("source_line")
    assert q.select("source_line", "reason").rows() == [
        (3, "empty_user_id"), (4, "non_numeric_timestamp"), (5, "wrong_field_count"), (6, "wrong_field_count"),
        (7, "empty_item_id"), (8, "non_numeric_rating")]
    assert all(q["source_file"] == str(p))
    assert q["raw"].to_list()[1] == "AGK,B007,3.0,yesterday"
    assert (rep["rows_read"], rep["rows_kept"], rep["rows_quarantined"], rep["rows_duplicate"]) == (9, 2, 6, 1)
    assert rep["rows_read"] == rep["rows_kept"] + rep["rows_quarantined"] + rep["rows_duplicate"]
    assert df["source_line"].to_list() == [2, 10]


@pytest.mark.parametrize("first_line", [
    "user_id,asin,rating,timestamp",  # no parent_asin
    "user_id,parent_asin,timestamp",  # no rating
    "AGK,B006,3.0,1452647382000",  # headerless
])
def test_header_without_the_required_columns_names_the_file(tmp_path, first_line):
    p = tmp_path / "Toys_and_Games.train.csv"
    p.write_text(first_line + "\n" + ROWS[0] + "\n")
    with pytest.raises(RawFormatError, match=r"Toys_and_Games\.train\.csv: line 1: header .* lacks column"):
        ingest_tables(tmp_path, [{"format": FMT, "path": str(p)}])


def test_chunking_does_not_change_the_result(tmp_path):
    p = tmp_path / "Toys_and_Games.train.csv"
    rows = [f"U{i % 7},I{i},{1 + i % 5}.0,{1500000000000 + 1000 * i},I{i - 1} I{i - 2}" for i in range(300)]
    p.write_text("user_id,parent_asin,rating,timestamp,history\n" + "\n".join(rows) + "\n")
    ref = ingest_tables(tmp_path / "a", [{"format": FMT, "path": str(p)}])[1]
    small = ingest_tables(tmp_path / "b", [{"format": FMT, "path": str(p)}], ingest={"chunk_bytes": 97})[1]
    assert ref.height == 300 and ref.equals(small)
