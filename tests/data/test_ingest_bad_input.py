"""Bad input: corrupted real raw rows land in quarantine with their reason and line, and the
row account is exact; files that cannot be read at all are clear errors."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest
from helpers import make_cfg

from cdsr.data.formats import RawFormatError
from cdsr.data.ingest import ingest

N_REAL = 3000


def _real_csv_lines(shared_data, name="Home_and_Kitchen.csv"):
    lines = (shared_data / "amazon-food-kitchen" / "raw" / name).read_text().splitlines()
    return lines[0], lines[1 : N_REAL + 1]


def test_corrupted_real_csv_rows_are_quarantined_with_reason(tmp_path, shared_data):
    header, rows = _real_csv_lines(shared_data)
    u, i, t = rows[10].split(",")
    corrupt = {  # corruption -> expected reason
        f"{u},,{t}": "empty_item_id",
        f",{i},{t}": "empty_user_id",
        f"{u},{i},notatime": "non_numeric_timestamp",
        f"{u},{i},-5": "timestamp_out_of_range",
        f"{u},{i},99999999999999": "timestamp_out_of_range",
        f"{u},{i}": "wrong_field_count",
        "garbage line without commas": "wrong_field_count",
        f"{u},{i},": "missing_timestamp",
        "": "empty_line",
    }
    lines = list(rows)
    where = {}
    for k, (bad, reason) in enumerate(corrupt.items()):
        at = 100 + 250 * k
        lines.insert(at, bad)
        where[at + 2] = reason  # +1 for 1-based lines, +1 for the header
    lines.append(rows[5])  # an exact duplicate of a real row
    p = tmp_path / "Home_and_Kitchen.csv"
    p.write_text("\n".join([header] + lines) + "\n")
    cfg = make_cfg(sources=[{"format": "interaction-csv", "path": str(p),
                             "columns": {"user": "reviewerID", "item": "asin", "timestamp": "unixReviewTime"}}])
    rep = ingest(cfg, tmp_path / "out")
    assert rep["rows_read"] == N_REAL + len(corrupt) + 1
    assert rep["rows_quarantined"] == len(corrupt)
    assert rep["rows_duplicate"] == 1
    assert rep["rows_kept"] == N_REAL
    assert rep["rows_read"] == rep["rows_kept"] + rep["rows_quarantined"] + rep["rows_duplicate"]
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert dict(zip(q["source_line"].to_list(), q["reason"].to_list())) == where
    assert all(q["source_file"] == str(p))
    assert sum(rep["quarantine_reasons"].values()) == len(corrupt)
    dup = pl.read_parquet(tmp_path / "out" / "duplicates.parquet")
    assert dup["source_line"].to_list() == [len(lines) + 1]


def test_corrupted_real_json_rows_are_quarantined(tmp_path, shared_data):
    src = shared_data / "amazon-2018-5core" / "Gift_Cards_5.json.gz"
    with gzip.open(src, "rt") as fh:
        rows = [next(fh).rstrip("\n") for _ in range(500)]
    obj = json.loads(rows[0])
    bad = {
        rows[1][: len(rows[1]) // 2]: "bad_json",  # truncated line
        json.dumps({k: v for k, v in obj.items() if k != "reviewerID"}): "missing_user_id",
        json.dumps({k: v for k, v in obj.items() if k != "asin"}): "missing_item_id",
        json.dumps({k: v for k, v in obj.items() if k != "unixReviewTime"}): "missing_timestamp",
        json.dumps({**obj, "unixReviewTime": "06 17, 2018"}): "non_numeric_timestamp",
        json.dumps({**obj, "unixReviewTime": 10**15}): "timestamp_out_of_range",
        json.dumps({**obj, "reviewerID": ""}): "empty_user_id",
        json.dumps({**obj, "overall": "five"}): "non_numeric_rating",
        "[1, 2, 3]": "bad_json",
    }
    lines = rows + list(bad)
    p = tmp_path / "Gift_Cards_5.json.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    cfg = make_cfg(sources=[{"format": "amazon-review-json", "path": str(p)}], ingest={"duplicates": "keep"})
    rep = ingest(cfg, tmp_path / "out")
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet").sort("source_line")
    assert q["reason"].to_list() == list(bad.values())
    assert q["source_line"].to_list() == list(range(501, 501 + len(bad)))
    assert rep["rows_read"] == 500 + len(bad) == rep["rows_kept"] + rep["rows_quarantined"] + rep["rows_duplicate"]


def test_item_in_two_domains_policies(tmp_path):
    (tmp_path / "Food.csv").write_text("U1,SHARED,5,1400000000\nU1,F1,5,1400000001\n")
    (tmp_path / "Kitchen.csv").write_text("U2,SHARED,5,1400000002\nU2,K1,5,1400000003\n")
    src = [{"format": "ratings-csv-2014", "path": str(tmp_path / "*.csv")}]
    drop = ingest(make_cfg(sources=src, ingest={"cross_domain_items": "drop"}), tmp_path / "drop")
    assert drop["rows_kept"] == 2 and drop["quarantine_reasons"] == {"item_in_multiple_domains": 2}
    keep = ingest(make_cfg(sources=src, ingest={"cross_domain_items": "keep_first"}), tmp_path / "keep")
    df = pl.read_parquet(tmp_path / "keep" / "interactions.parquet")
    assert keep["rows_kept"] == 3 and ("SHARED", "Food") in df.select("item_id", "domain").rows()


def test_duplicates_keep_policy(tmp_path):
    p = tmp_path / "D.csv"
    p.write_text("U1,I1,5,1400000000\nU1,I1,5,1400000000\nU1,I1,4,1400000000\n")
    drop = ingest(make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(p)}]), tmp_path / "a")
    assert (drop["rows_kept"], drop["rows_duplicate"]) == (2, 1)  # a different rating is not an exact duplicate
    keep = ingest(make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(p)}], ingest={"duplicates": "keep"}), tmp_path / "b")
    assert (keep["rows_kept"], keep["rows_duplicate"]) == (3, 0)


def test_undeclared_domain_file_is_an_error(tmp_path):
    (tmp_path / "Toys.csv").write_text("U1,I1,5,1400000000\n")
    cfg = make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(tmp_path / "*.csv")}], domains=["Food", "Kitchen"])
    with pytest.raises(RawFormatError, match=r"Toys.csv: its domain 'Toys' is not among the declared domains"):
        ingest(cfg, tmp_path / "out")


@pytest.mark.parametrize("case", ["empty", "header_only", "missing_dir", "no_match", "unknown_format", "corrupt_gz"])
def test_unreadable_input_is_a_clear_error(tmp_path, case):
    if case == "empty":
        (tmp_path / "D.csv").write_text("")
        src, match = {"format": "ratings-csv-2014", "path": str(tmp_path / "D.csv")}, r"D.csv: empty file"
    elif case == "header_only":
        (tmp_path / "D.csv").write_text("reviewerID,asin,unixReviewTime\n")
        src = {"format": "interaction-csv", "path": str(tmp_path / "D.csv"),
               "columns": {"user": "reviewerID", "item": "asin", "timestamp": "unixReviewTime"}}
        match = r"D.csv: empty file \(no data rows after the header\)"
    elif case == "missing_dir":
        src, match = {"format": "ratings-csv-2014", "path": str(tmp_path / "nope" / "*.csv")}, r"raw directory .*nope does not exist"
    elif case == "no_match":
        src, match = {"format": "ratings-csv-2014", "path": str(tmp_path / "*.csv")}, r"no raw files match"
    elif case == "unknown_format":
        (tmp_path / "D.csv").write_text("x\n")
        src, match = {"format": "parquet-magic", "path": str(tmp_path / "D.csv")}, r"unknown format 'parquet-magic'.*known formats"
    else:
        (tmp_path / "D.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip" * 10)
        src, match = {"format": "amazon-review-json", "path": str(tmp_path / "D.json.gz")}, r"D.json.gz: cannot read"
    with pytest.raises(RawFormatError, match=match):
        ingest(make_cfg(sources=[src]), tmp_path / "out")


@pytest.mark.parametrize("policies", [{"duplicates": "drop", "cross_domain_items": "drop"},
                                      {"duplicates": "drop", "cross_domain_items": "keep_first"},
                                      {"duplicates": "keep", "cross_domain_items": "drop"}])
def test_narrow_policy_pass_writes_the_same_tables(tmp_path, monkeypatch, policies):
    """Above NARROW_POLICY_ROWS candidates the duplicate / cross-domain pass materialises only
    the dropped rows and streams the kept ones in file order: the same tables and report as the
    full-width pass (here forced on a small file with duplicates, NULL ratings and shared items)."""
    import functools

    import cdsr.data.ingest as ing

    rows = []
    for k in range(400):
        dom = "Food" if k % 3 else "Kitchen"
        rows.append((dom, f"U{k % 37},{dom[0]}{k % 53},{'' if k % 7 == 0 else k % 5 + 1},{1400000000 + k % 11}"))
    rows += [("Food", "U1,SHARED,5,1400000000"), ("Kitchen", "U2,SHARED,,1400000001"), ("Kitchen", "U3,SHARED,4,1400000002")]
    rows += [("Kitchen", "U1,K7,,1400000005")] * 3 + [("Food", ",F1,5,1400000000"), ("Food", "U9,F2,5,notatime")]
    for dom in ("Food", "Kitchen"):
        (tmp_path / f"{dom}.csv").write_text("".join(r + "\n" for d, r in rows if d == dom))
    cfg = make_cfg(sources=[{"format": "ratings-csv-2014", "path": str(tmp_path / "*.csv")}], ingest=policies)
    wide = ingest(cfg, tmp_path / "wide")
    monkeypatch.setattr(ing, "_apply_policies", functools.partial(ing._apply_policies, narrow_from=0))
    narrow = ingest(cfg, tmp_path / "narrow")
    assert narrow == wide and wide["rows_quarantined"] >= 2
    assert (wide["rows_duplicate"] > 0) == (policies["duplicates"] == "drop")
    for f in ("interactions", "duplicates", "quarantine"):
        a, b = (pl.read_parquet(tmp_path / d / f"{f}.parquet") for d in ("wide", "narrow"))
        assert a.equals(b), f
