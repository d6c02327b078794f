"""Ingest stage: raw files -> canonical interactions, quarantine and an exact row account.

Canonical interactions (one row per event)::

    user_id: str, item_id: str, domain: str, timestamp: int64 (unix s), rating: float64 (null),
    source_file: str, source_line: int64 (1-based), source_pos: int32 (event position in a
    sequence-format line, 0 for row formats), ingest_order: int64 (raw order: declared file
    order, then line, then position; the tie-break for equal timestamps)

Every raw row ends in exactly one of: interactions, quarantine (with its reason) or duplicates
(exact-duplicate events under ``duplicates: drop``), so
``rows_read = rows_kept + rows_quarantined + rows_duplicate`` holds and is asserted.
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdsr.data.config import DatasetConfig, SourceConfig
from cdsr.data.formats import FORMATS, TIMESTAMP_MS, RawFormatError, _sql_str, file_domain, iter_line_chunks

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = [
    "user_id", "item_id", "domain", "timestamp", "rating",
    "source_file", "source_line", "source_pos", "ingest_order",
]
QUARANTINE_COLUMNS = ["source_file", "source_line", "source_pos", "reason", "raw", "user_id", "item_id", "domain"]
RAW_MAX_CHARS = 2000


def resolve_sources(cfg: DatasetConfig) -> list[tuple[SourceConfig, Path]]:
    """Expand each source's path/glob (sorted, so file order is stable) and check formats."""
    out: list[tuple[SourceConfig, Path]] = []
    for src in cfg.sources:
        if src.format not in FORMATS:
            raise RawFormatError(f"dataset '{cfg.name}': unknown format '{src.format}' for {src.path}; "
                                 f"known formats: {sorted(FORMATS)}")
        if any(ch in src.path for ch in "*?["):
            parent = Path(src.path).parent
            if not parent.is_dir():
                raise RawFormatError(f"dataset '{cfg.name}': raw directory {parent} does not exist")
            paths = [Path(p) for p in sorted(glob.glob(src.path))]
            if not paths:
                raise RawFormatError(f"dataset '{cfg.name}': no raw files match {src.path}")
        else:
            p = Path(src.path)
            if not p.exists():
                raise RawFormatError(f"dataset '{cfg.name}': raw file {p} does not exist")
            paths = [p]
        for p in paths:
            if p.is_dir():
                raise RawFormatError(f"{p}: is a directory, expected a raw file (use a glob like {p}/*.csv)")
            if p.stat().st_size == 0:
                raise RawFormatError(f"{p}: empty file")
            if cfg.domains and src.format in _FILE_DOMAIN_FORMATS and not src.columns.get("domain"):
                d = file_domain(src, p)
                if d not in cfg.domains:
                    raise RawFormatError(f"{p}: its domain '{d}' is not among the declared domains {cfg.domains}")
            out.append((src, p))
    return out


_FILE_DOMAIN_FORMATS = {"amazon-review-json", "amazon-2023-jsonl", "ratings-csv-2014", "ratings-csv-2018", "interaction-csv"}


def _checks_sql(inner: str, src: SourceConfig, path: Path, bounds: tuple[int | None, int | None],
                domains: list[str], reorders: bool) -> str:
    """Wrap a format query with the shared field checks; first failing check is the reason.
    The raw text is kept for rejected rows only (it is what the quarantine file shows)."""
    ms = src.format in TIMESTAMP_MS or src.timestamp_unit == "ms"
    tsd = "(try_cast(ts_text as DOUBLE) / 1000.0)" if ms else "try_cast(ts_text as DOUBLE)"
    lo, hi = bounds
    range_fail = ["not isfinite(tsd)"]
    if lo is not None:
        range_fail.append(f"tsd < {lo}")
    if hi is not None:
        range_fail.append(f"tsd > {hi}")
    dom_check = ""
    if domains:
        dom_list = ", ".join("'" + d.replace("'", "''") + "'" for d in domains)
        dom_check = f"when domain not in ({dom_list}) then 'undeclared_domain'"
    return f"""
        with r as ({inner}),
        t as (select *, trim(user_id) as u, trim(item_id) as i, {tsd} as tsd from r),
        v as (
        select u as user_id, i as item_id, domain,
               case when reason_pre is null and tsd is not null and isfinite(tsd)
                    then floor(tsd)::BIGINT end as timestamp,
               try_cast(rating_text as DOUBLE) as rating,
               source_line, source_pos::INTEGER as source_pos, raw,
               case when reason_pre is not null then reason_pre
                    when user_id is null then 'missing_user_id'
                    when u = '' then 'empty_user_id'
                    when item_id is null then 'missing_item_id'
                    when i = '' then 'empty_item_id'
                    when domain is null or domain = '' then 'missing_domain'
                    {dom_check}
                    when ts_text is null or trim(ts_text) = '' then 'missing_timestamp'
                    when tsd is null then 'non_numeric_timestamp'
                    when {' or '.join(range_fail)} then 'timestamp_out_of_range'
                    when rating_text is not null and trim(rating_text) <> ''
                         and try_cast(rating_text as DOUBLE) is null then 'non_numeric_rating'
               end as reason
        from t)
        select user_id, item_id, domain, timestamp, rating, {_sql_str(str(path))} as source_file,
               source_line, source_pos, case when reason is not null then left(raw, {RAW_MAX_CHARS}) end as raw, reason
        from v {'order by source_line, source_pos' if reorders else ''}"""


def ingest(cfg: DatasetConfig, out_dir: Path) -> dict:
    """Run the ingest stage for one dataset; writes into ``out_dir`` (``data/<name>/interim``).

    Outputs: interactions.parquet, quarantine.parquet, duplicates.parquet, ingest_report.json.
    Raises RawFormatError for a file that cannot be read at all.
    """
    t0 = time.time()
    files = resolve_sources(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    bounds = cfg.ingest.timestamp_bounds()
    tmp = Path(tempfile.mkdtemp(prefix="cdsr-ingest-", dir=out_dir))
    con = duckdb.connect()
    # a bounded memory limit makes DuckDB spill the whole-file policy pass to disk, so peak
    # memory stays flat in the file size
    con.execute(f"SET temp_directory='{tmp}'; SET memory_limit='{cfg.ingest.memory_limit}'; "
                "SET preserve_insertion_order=true")
    try:
        cand_path = tmp / "candidates.parquet"
        qpath = tmp / "quarantine_rows.parquet"
        per_file = []
        order = 0
        cand_writer = q_writer = None
        for src, path in files:
            reader = FORMATS[src.format](src, path)
            for name, table in (reader.tables or {}).items():
                con.register(name, table)
            sql = _checks_sql(reader.query, src, path, bounds, cfg.domains, reader.reorders)
            stats = {"file": str(path), "format": src.format, "rows_read": 0, "rows_rejected": 0}
            for first, lines in iter_line_chunks(path, cfg.ingest.chunk_bytes):
                if first <= reader.skip_lines:
                    drop = reader.skip_lines - first + 1
                    lines, first = lines.slice(drop), first + drop
                if len(lines) == 0:
                    continue
                chunk = pa.table({"line": lines, "source_line": pa.array(np.arange(first, first + len(lines)))})
                con.register("chunk", chunk)
                res = con.sql(sql).to_arrow_table()
                con.unregister("chunk")
                n = res.num_rows
                res = res.append_column("ingest_order", pa.array(np.arange(order, order + n, dtype=np.int64)))
                order += n
                bad = res.filter(pa.compute.is_valid(res["reason"]))
                good = res.filter(pa.compute.is_null(res["reason"]))
                stats["rows_read"] += n
                stats["rows_rejected"] += bad.num_rows
                if good.num_rows:
                    good = good.select(INTERACTION_COLUMNS)
                    cand_writer = cand_writer or pq.ParquetWriter(cand_path, good.schema)
                    cand_writer.write_table(good)
                if bad.num_rows:
                    bad = bad.select(QUARANTINE_COLUMNS)
                    q_writer = q_writer or pq.ParquetWriter(qpath, bad.schema)
                    q_writer.write_table(bad)
            if stats["rows_read"] == 0:
                raise RawFormatError(f"{path}: empty file (no data rows{' after the header' if reader.skip_lines else ''})")
            per_file.append(stats)
        for w in (cand_writer, q_writer):
            if w is not None:
                w.close()
        report = _apply_policies(con, cfg, cand_path, qpath, out_dir)
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report["files"] = per_file
    report["policies"] = {"duplicates": cfg.ingest.duplicates, "cross_domain_items": cfg.ingest.cross_domain_items,
                          "timestamp_bounds": list(bounds)}
    report["elapsed_s"] = round(time.time() - t0, 3)
    if report["rows_read"] != report["rows_kept"] + report["rows_quarantined"] + report["rows_duplicate"]:
        raise AssertionError(f"row accounting broken: {report}")  # a bug, never bad input
    (out_dir / "ingest_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _empty_quarantine() -> pa.Table:
    return pa.table({c: pa.array([], pa.int32() if c == "source_pos" else pa.int64() if c == "source_line" else pa.string())
                     for c in QUARANTINE_COLUMNS})


def _apply_policies(con: duckdb.DuckDBPyConnection, cfg: DatasetConfig, cand: Path, qrows: Path, out_dir: Path) -> dict:
    """Duplicate and cross-domain-item policies over all candidate rows (out of core)."""
    if cand.exists():
        con.execute(f"create view cand as select * from read_parquet('{cand}')")
    else:  # every row was rejected
        con.execute("""create view cand as select NULL::VARCHAR user_id, NULL::VARCHAR item_id, NULL::VARCHAR domain,
                       NULL::BIGINT timestamp, NULL::DOUBLE rating, NULL::VARCHAR source_file, NULL::BIGINT source_line,
                       NULL::INTEGER source_pos, NULL::BIGINT ingest_order where false""")
    if qrows.exists():
        con.execute(f"create view qrows as select * from read_parquet('{qrows}')")
    else:
        con.register("qrows", _empty_quarantine())
    dup = cfg.ingest.duplicates == "drop"
    con.execute(f"""
        create temp table ranked as
        select *, {'row_number() over (partition by user_id, item_id, domain, timestamp, rating order by ingest_order)' if dup else '1'} as dup_rank
        from cand""")
    keep_first = cfg.ingest.cross_domain_items == "keep_first"
    con.execute("""
        create temp table item_dom as
        select item_id, count(distinct domain) as n_domains,
               arg_min(domain, ingest_order) as first_domain
        from ranked where dup_rank = 1 group by item_id""")
    con.execute(f"""
        create temp table labelled as
        select r.*, case when r.dup_rank > 1 then 'duplicate'
                         when d.n_domains > 1 and {'r.domain <> d.first_domain' if keep_first else 'true'}
                         then 'item_in_multiple_domains' end as fate
        from ranked r join item_dom d using (item_id)""")
    cols = ", ".join(INTERACTION_COLUMNS)
    untouched = con.execute("select count(*) from labelled where fate is not null").fetchone()[0] == 0
    if untouched and cand.exists():  # nothing dropped: the candidates (written in order) are the output
        shutil.copyfile(cand, out_dir / "interactions.parquet")
    else:
        con.execute(f"copy (select {cols} from labelled where fate is null order by ingest_order) "
                    f"to '{out_dir / 'interactions.parquet'}' (format parquet)")
    con.execute(f"copy (select {cols} from labelled where fate = 'duplicate' order by ingest_order) "
                f"to '{out_dir / 'duplicates.parquet'}' (format parquet)")
    con.execute(f"""copy (
        select source_file, source_line, source_pos, reason, raw, user_id, item_id, domain from qrows
        union all
        select source_file, source_line, source_pos, fate, NULL, user_id, item_id, domain
        from labelled where fate = 'item_in_multiple_domains'
        order by source_file, source_line, source_pos) to '{out_dir / 'quarantine.parquet'}' (format parquet)""")
    kept = con.execute("select count(*) from labelled where fate is null").fetchone()[0]
    dups = con.execute("select count(*) from labelled where fate = 'duplicate'").fetchone()[0]
    reasons = dict(con.execute(f"select reason, count(*) from read_parquet('{out_dir / 'quarantine.parquet'}') "
                               "group by reason order by 2 desc, 1").fetchall())
    n_cand = con.execute("select count(*) from cand").fetchone()[0]
    n_q = sum(reasons.values())
    return {
        "rows_read": int(n_cand + con.execute("select count(*) from qrows").fetchone()[0]),
        "rows_kept": int(kept),
        "rows_quarantined": int(n_q),
        "rows_duplicate": int(dups),
        "quarantine_reasons": {k: int(v) for k, v in reasons.items()},
    }


def quarantine_summary(out_dir: Path, limit: int = 5) -> list[str]:
    """Human-readable lines 'file:line: reason' for the first quarantined rows."""
    qp = out_dir / "quarantine.parquet"
    if not qp.exists():
        return []
    t = pq.read_table(qp).slice(0, limit).to_pylist()
    out = []
    for r in t:
        pos = f" (event {r['source_pos']})" if r["source_pos"] else ""
        raw = f": {r['raw'][:80]!r}" if r.get("raw") else ""
        out.append(f"{r['source_file']}:{r['source_line']}{pos}: {r['reason']}{raw}")
    return out
