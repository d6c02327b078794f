"""Ingest stage: raw files -> canonical interactions, quarantine and an exact row account.

Canonical interactions (one row per event)::

    user_id: str, item_id: str, domain: str, timestamp: int64 (unix s), rating: float64 (null),
    source_file: str, source_line: int64 (1-based), source_pos: int32 (event position in a
    sequence-format line, 0 for row formats), ingest_order: int64 (raw order: declared file
    order, then line, then position; the tie-break for equal timestamps)

Quarantine (one row per rejected raw row or event)::

    source_file, source_line, source_pos, reason, raw (the rejected text, at most 2000 characters;
    an invalid UTF-8 line shows its bad bytes as backslash escapes), user_id, item_id, domain,
    raw_bytes (the exact bytes of an ``invalid_utf8`` line, for inspection and replay; else null)

Every raw row ends in exactly one of: interactions, quarantine (with its reason) or duplicates
(exact-duplicate events under ``duplicates: drop``), so
``rows_read = rows_kept + rows_quarantined + rows_duplicate`` holds and is asserted. A line that
is not valid UTF-8 counts as one row read (it cannot be split into events).

Paths and config strings reach DuckDB only as bound settings or quoted literals (``_sql_str``):
a data root may hold any character.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdsr.data.config import DatasetConfig, SourceConfig
from cdsr.data.formats import (
    FORMATS,
    ID_CONTROL_CHARS,
    TIMESTAMP_MS,
    LineChunk,
    LineReader,
    RawFormatError,
    _sql_str,
    check_regular_file,
    file_domain,
)
from cdsr.data.timing import write_timing

log = logging.getLogger(__name__)

INTERACTION_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("domain", pa.string()), ("timestamp", pa.int64()),
    ("rating", pa.float64()), ("source_file", pa.string()), ("source_line", pa.int64()),
    ("source_pos", pa.int32()), ("ingest_order", pa.int64()),
])
INTERACTION_COLUMNS = INTERACTION_SCHEMA.names
QUARANTINE_SCHEMA = pa.schema([
    ("source_file", pa.string()), ("source_line", pa.int64()), ("source_pos", pa.int32()), ("reason", pa.string()),
    ("raw", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()), ("domain", pa.string()),
    ("raw_bytes", pa.binary()),
])
QUARANTINE_COLUMNS = QUARANTINE_SCHEMA.names
RAW_MAX_CHARS = 2000
# temp directories are named after their owner process, so a later ingest can remove the ones a
# killed ingest left behind (they hold spill files of the size of the data)
TMP_PREFIX = "cdsr-ingest-"
_TMP_OWNER = re.compile(rf"{TMP_PREFIX}(\d+)-")
_EXACT_DOUBLE_INT = 2**53  # doubles hold every integer up to here
# candidate rows above which the duplicate / cross-domain pass runs narrow (_narrow_policies)
NARROW_POLICY_ROWS = 4_000_000


def duckdb_connection(cfg: DatasetConfig, temp_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """The DuckDB connection of the data stages: bounded by ``ingest.memory_limit``, spilling to
    ``temp_dir`` beyond it, and keeping the order of a single input stream."""
    return duckdb.connect(config={"temp_directory": str(temp_dir), "memory_limit": cfg.ingest.memory_limit,
                                  "preserve_insertion_order": True})


def resolve_sources(cfg: DatasetConfig) -> list[tuple[SourceConfig, Path]]:
    """Expand each source's path/glob (sorted, so file order is stable) and check formats."""
    out: list[tuple[SourceConfig, Path]] = []
    for src in cfg.sources:
        if src.format not in FORMATS:
            raise RawFormatError(f"dataset '{cfg.name}': unknown format '{src.format}' for {src.path}; "
                                 f"known formats: {sorted(FORMATS)}")
        # a path that exists as written is a file, even if its name holds glob characters
        if any(ch in src.path for ch in "*?[") and not os.path.lexists(src.path):
            parent = Path(src.path).parent
            if not parent.is_dir():
                raise RawFormatError(f"dataset '{cfg.name}': raw directory {parent} does not exist")
            paths = [Path(p) for p in sorted(glob.glob(src.path))]
            if not paths:
                raise RawFormatError(f"dataset '{cfg.name}': no raw files match {src.path}")
        else:
            p = Path(src.path)
            if not p.exists() and not p.is_symlink():  # a broken link is named as such below
                raise RawFormatError(f"dataset '{cfg.name}': raw file {p} does not exist")
            paths = [p]
        for p in paths:
            # a glob lists dangling links and FIFOs like files: refuse them by name, never hang
            if check_regular_file(p).st_size == 0:
                raise RawFormatError(f"{p}: empty file")
            if cfg.domains and src.format in _FILE_DOMAIN_FORMATS and not src.columns.get("domain"):
                d = file_domain(src, p)
                if d not in cfg.domains:
                    raise RawFormatError(f"{p}: its domain '{d}' is not among the declared domains {cfg.domains}")
            out.append((src, p))
    return out


_FILE_DOMAIN_FORMATS = {"amazon-review-json", "amazon-2023-jsonl", "ratings-csv-2014", "ratings-csv-2018", "interaction-csv",
                        "amazon-2023-benchmark-csv"}


def _checks_sql(inner: str, src: SourceConfig, path: Path, bounds: tuple[int | None, int | None],
                domains: list[str], reorders: bool) -> str:
    """Wrap a format query with the shared field checks; first failing check is the reason.
    The raw text is kept for rejected rows only (it is what the quarantine file shows).

    A timestamp is parsed as a DOUBLE, so it must be finite and below 2^53 in magnitude (in its
    own unit) whatever the configured bounds: up to there a double holds every integer exactly,
    beyond it the value would be silently rounded, and beyond 2^63 the BIGINT cast used to raise
    a ConversionException for the whole query. Such a value is ``timestamp_out_of_range``; the
    cast is a ``try_cast`` all the same. Ids holding control characters (NUL, tab, DEL..., also
    from JSON escapes such as \\u0000) are rejected: they print like another id.
    """
    ms = src.timestamp_unit == "ms" if src.timestamp_unit else src.format in TIMESTAMP_MS
    tsd = "(num / 1000.0)" if ms else "num"
    ctrl = _sql_str(ID_CONTROL_CHARS)
    lo, hi = bounds
    range_fail = ["not isfinite(num)", f"abs(num) >= {_EXACT_DOUBLE_INT}"]
    if lo is not None:
        range_fail.append(f"tsd < {int(lo)}")
    if hi is not None:
        range_fail.append(f"tsd > {int(hi)}")
    dom_check = ""
    if domains:
        dom_list = ", ".join("'" + d.replace("'", "''") + "'" for d in domains)
        dom_check = f"when domain not in ({dom_list}) then 'undeclared_domain'"
    return f"""
        with r as ({inner}),
        n as (select *, try_cast(ts_text as DOUBLE) as num from r),
        t as (select *, trim(user_id) as u, trim(item_id) as i, {tsd} as tsd from n),
        v as (
        select u as user_id, i as item_id, domain,
               case when reason_pre is null and isfinite(num) and abs(num) < {_EXACT_DOUBLE_INT}
                    then try_cast(floor(tsd) as BIGINT) end as timestamp,
               try_cast(rating_text as DOUBLE) as rating,
               source_line, source_pos::INTEGER as source_pos, raw,
               case when reason_pre is not null then reason_pre
                    when user_id is null then 'missing_user_id'
                    when u = '' then 'empty_user_id'
                    when regexp_matches(u, {ctrl}) then 'control_char_in_user_id'
                    when item_id is null then 'missing_item_id'
                    when i = '' then 'empty_item_id'
                    when regexp_matches(i, {ctrl}) then 'control_char_in_item_id'
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

    Outputs: interactions.parquet, quarantine.parquet, duplicates.parquet, ingest_report.json
    (returned; the same bytes for the same input) and ingest_timing.json (the wall time, which
    DVC does not track: cdsr.data.timing).
    Raises RawFormatError for a file that cannot be read at all.
    """
    t0 = time.time()
    files = resolve_sources(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir)
    bounds = cfg.ingest.timestamp_bounds()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out_dir))
    con: duckdb.DuckDBPyConnection | None = None
    writers: dict[Path, pq.ParquetWriter] = {}
    try:
        # settings are bound values, not SQL text; a bounded memory limit makes DuckDB spill the
        # whole-file policy pass to disk, so peak memory stays flat in the file size
        con = duckdb_connection(cfg, tmp)
        cand_path = tmp / "candidates.parquet"
        qpath = tmp / "quarantine_rows.parquet"
        per_file = []
        order = 0
        for src, path in files:
            reader = FORMATS[src.format](src, path)
            for name, table in (reader.tables or {}).items():
                con.register(name, table)
            sql = _checks_sql(reader.query, src, path, bounds, cfg.domains, reader.reorders)
            stats = {"file": str(path), "format": src.format, "rows_read": 0, "rows_rejected": 0}
            lines = LineReader(path, cfg.ingest.chunk_bytes)
            for chunk in lines:
                chunk = chunk.after(reader.skip_lines)
                if len(chunk.bad_line_no):  # one quarantined row each, never seen by the format query
                    _write(writers, qpath, _invalid_utf8_rows(path, chunk))
                    stats["rows_read"] += len(chunk.bad_line_no)
                    stats["rows_rejected"] += len(chunk.bad_line_no)
                if len(chunk.lines) == 0:
                    continue
                con.register("chunk", pa.table({"line": chunk.lines, "source_line": pa.array(chunk.line_no)}))
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
                    _write(writers, cand_path, good.select(INTERACTION_COLUMNS).cast(INTERACTION_SCHEMA))
                if bad.num_rows:
                    bad = bad.select(QUARANTINE_COLUMNS[:-1])
                    _write(writers, qpath, bad.append_column("raw_bytes", pa.nulls(bad.num_rows, pa.binary()))
                           .cast(QUARANTINE_SCHEMA))
            if stats["rows_read"] == 0:
                raise RawFormatError(f"{path}: empty file (no data rows{' after the header' if reader.skip_lines else ''})")
            stats["line_endings"] = lines.line_endings
            stats["utf8_bom"] = lines.utf8_bom
            per_file.append(stats)
        for w in writers.values():
            w.close()
        report = _apply_policies(con, cfg, cand_path, qpath, out_dir)
    finally:
        for w in writers.values():
            w.close()  # a no-op once closed; on an error, before the directory goes
        if con is not None:
            con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report["files"] = per_file
    report["policies"] = {"duplicates": cfg.ingest.duplicates, "cross_domain_items": cfg.ingest.cross_domain_items,
                          "timestamp_bounds": list(bounds)}
    if report["rows_read"] != report["rows_kept"] + report["rows_quarantined"] + report["rows_duplicate"]:
        raise AssertionError(f"row accounting broken: {report}")  # a bug, never bad input
    (out_dir / "ingest_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_timing(out_dir / "ingest_timing.json", t0)
    return report


def _write(writers: dict[Path, pq.ParquetWriter], path: Path, table: pa.Table) -> None:
    """Append ``table`` to the Parquet file at ``path`` (opened on first use)."""
    if path not in writers:
        writers[path] = pq.ParquetWriter(path, table.schema)
    writers[path].write_table(table)


def _invalid_utf8_rows(path: Path, chunk: LineChunk) -> pa.Table:
    """Quarantine rows for the chunk's lines that are not valid UTF-8: ``raw`` readable (bad
    bytes as backslash escapes), ``raw_bytes`` the exact line, so nothing is lost or altered."""
    n = len(chunk.bad_line_no)
    text = [b.decode("utf-8", "backslashreplace")[:RAW_MAX_CHARS] for b in chunk.bad_bytes.to_pylist()]
    return pa.table({
        "source_file": pa.array([str(path)] * n, pa.string()),
        "source_line": pa.array(chunk.bad_line_no, pa.int64()),
        "source_pos": pa.array(np.zeros(n, dtype=np.int32)),
        "reason": pa.array(["invalid_utf8"] * n, pa.string()),
        "raw": pa.array(text, pa.string()),
        "user_id": pa.nulls(n, pa.string()),
        "item_id": pa.nulls(n, pa.string()),
        "domain": pa.nulls(n, pa.string()),
        "raw_bytes": chunk.bad_bytes.cast(pa.binary()),
    }, schema=QUARANTINE_SCHEMA)


def _remove_stale_tmp(out_dir: Path) -> None:
    """Remove temp directories left in ``out_dir`` by ingests that were killed (their owner
    process is gone); those of a live process (a concurrent run) are left alone."""
    for d in out_dir.glob(f"{TMP_PREFIX}*"):
        m = _TMP_OWNER.match(d.name)
        if m and d.is_dir() and not d.is_symlink() and not _pid_alive(int(m.group(1))):
            log.info("removing %s, left behind by a killed ingest", d)
            shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def _empty_quarantine() -> pa.Table:
    return QUARANTINE_SCHEMA.empty_table()


def _apply_policies(con: duckdb.DuckDBPyConnection, cfg: DatasetConfig, cand: Path, qrows: Path, out_dir: Path,
                    narrow_from: int = NARROW_POLICY_ROWS) -> dict:
    """Duplicate and cross-domain-item policies over all candidate rows (out of core).

    Up to ``narrow_from`` candidate rows the policies label a full-width copy of the candidates
    and sort the kept rows (the files of the committed datasets come from this path, byte for
    byte); beyond, :func:`_narrow_policies` writes the same tables without that copy."""
    out_inter, out_dup, out_q = (_sql_str(str(out_dir / f)) for f in
                                 ("interactions.parquet", "duplicates.parquet", "quarantine.parquet"))
    if cand.exists():
        con.execute(f"create view cand as select * from read_parquet({_sql_str(str(cand))})")
    else:  # every row was rejected
        con.execute("""create view cand as select NULL::VARCHAR user_id, NULL::VARCHAR item_id, NULL::VARCHAR domain,
                       NULL::BIGINT timestamp, NULL::DOUBLE rating, NULL::VARCHAR source_file, NULL::BIGINT source_line,
                       NULL::INTEGER source_pos, NULL::BIGINT ingest_order where false""")
    if qrows.exists():
        con.execute(f"create view qrows as select * from read_parquet({_sql_str(str(qrows))})")
    else:
        con.register("qrows", _empty_quarantine())
    if cand.exists() and pq.ParquetFile(cand).metadata.num_rows > narrow_from:
        return _narrow_policies(con, cfg, cand, out_inter, out_dup, out_q, out_dir)
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
                    f"to {out_inter} (format parquet)")
    con.execute(f"copy (select {cols} from labelled where fate = 'duplicate' order by ingest_order) "
                f"to {out_dup} (format parquet)")
    con.execute(f"""copy (
        select source_file, source_line, source_pos, reason, raw, user_id, item_id, domain, raw_bytes from qrows
        union all
        select source_file, source_line, source_pos, fate, NULL, user_id, item_id, domain, NULL::BLOB
        from labelled where fate = 'item_in_multiple_domains'
        order by source_file, source_line, source_pos) to {out_q} (format parquet)""")
    kept = con.execute("select count(*) from labelled where fate is null").fetchone()[0]
    dups = con.execute("select count(*) from labelled where fate = 'duplicate'").fetchone()[0]
    n_cand = con.execute("select count(*) from cand").fetchone()[0]
    return _policy_report(con, out_q, n_cand, kept, dups)


def _policy_report(con: duckdb.DuckDBPyConnection, out_q: str, n_cand: int, kept: int, dups: int) -> dict:
    """The row account of the policy pass: read = kept + quarantined + duplicate."""
    reasons = dict(con.execute(f"select reason, count(*) from read_parquet({out_q}) "
                               "group by reason order by 2 desc, 1").fetchall())
    return {
        "rows_read": int(n_cand + con.execute("select count(*) from qrows").fetchone()[0]),
        "rows_kept": int(kept),
        "rows_quarantined": int(sum(reasons.values())),
        "rows_duplicate": int(dups),
        "quarantine_reasons": {k: int(v) for k, v in reasons.items()},
    }


def _narrow_policies(con: duckdb.DuckDBPyConnection, cfg: DatasetConfig, cand: Path, out_inter: str, out_dup: str,
                     out_q: str, out_dir: Path) -> dict:
    """The policies of :func:`_apply_policies` for tens of millions of rows: the same tables and
    report, with memory and temp disk bounded by the rows that a policy drops."""
    # Only the rows that a policy drops are materialised (by ingest_order), never a full-width
    # copy of the candidates (at 50M rows that copy spilled more than the data itself to disk).
    # Exact duplicates are found in two steps: rows whose key hash repeats (a narrow
    # aggregation), then the exact key among those rows only (NULL ratings are equal).
    key = "user_id, item_id, domain, timestamp, rating"
    if cfg.ingest.duplicates == "drop":
        con.execute(f"""
            create temp table dup_rows as
            with h as (select hash({key}) as h from cand group by 1 having count(*) > 1),
            c as (select ingest_order, {key} from cand where hash({key}) in (select h from h))
            select ingest_order from (
                select ingest_order, row_number() over (partition by {key} order by ingest_order) as dup_rank from c)
            where dup_rank > 1""")
    else:
        con.execute("create temp table dup_rows as select NULL::BIGINT as ingest_order where false")
    keep_first = cfg.ingest.cross_domain_items == "keep_first"
    con.execute("""
        create temp table multi as
        select item_id, first_domain from (
            select item_id, count(distinct domain) as n_domains, arg_min(domain, ingest_order) as first_domain
            from cand where ingest_order not in (select ingest_order from dup_rows) group by item_id)
        where n_domains > 1""")
    con.execute(f"""
        create temp table cross_rows as
        select c.ingest_order from cand c join multi m on c.item_id = m.item_id
        where c.ingest_order not in (select ingest_order from dup_rows)
              {'and c.domain <> m.first_domain' if keep_first else ''}""")
    cols = ", ".join(INTERACTION_COLUMNS)
    dups = con.sql("select count(*) from dup_rows").fetchall()[0][0]
    n_cross = con.sql("select count(*) from cross_rows").fetchall()[0][0]
    n_cand = con.sql("select count(*) from cand").fetchall()[0][0]
    if dups == n_cross == 0:  # nothing dropped: the candidates (written in order) are the output
        shutil.copyfile(cand, out_dir / "interactions.parquet")
    else:
        # the candidates are in ingest_order already: they stream through in file order, less the
        # dropped rows, rather than being sorted again at full width (DuckDB keeps the order of a
        # single stream; checked below)
        dropped = np.unique(np.concatenate([
            con.sql("select ingest_order from dup_rows").fetchnumpy()["ingest_order"],
            con.sql("select ingest_order from cross_rows").fetchnumpy()["ingest_order"]]).astype(np.int64))
        kept_stream = pa.RecordBatchReader.from_batches(INTERACTION_SCHEMA, _without(cand, dropped))
        con.register("kept_stream", kept_stream)
        con.execute(f"copy (select {cols} from kept_stream) to {out_inter} (format parquet)")
        con.unregister("kept_stream")
        _check_increasing(out_dir / "interactions.parquet")
    con.execute(f"copy (select {cols} from cand where ingest_order in (select ingest_order from dup_rows) "
                f"order by ingest_order) to {out_dup} (format parquet)")
    con.execute(f"""copy (
        select source_file, source_line, source_pos, reason, raw, user_id, item_id, domain, raw_bytes from qrows
        union all
        select source_file, source_line, source_pos, 'item_in_multiple_domains', NULL, user_id, item_id, domain, NULL::BLOB
        from cand where ingest_order in (select ingest_order from cross_rows)
        order by source_file, source_line, source_pos) to {out_q} (format parquet)""")
    return _policy_report(con, out_q, n_cand, n_cand - dups - n_cross, dups)


def _without(path: Path, dropped: np.ndarray):
    """The rows of a Parquet file sorted by ingest_order, less those in ``dropped`` (sorted)."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16):
        io = batch.column("ingest_order").to_numpy()
        at = np.minimum(np.searchsorted(dropped, io), max(len(dropped) - 1, 0))
        drop = dropped[at] == io if len(dropped) else np.zeros(len(io), dtype=bool)
        yield batch.filter(pa.array(~drop)).cast(INTERACTION_SCHEMA)


def _check_increasing(path: Path) -> None:
    """ingest_order strictly increases down the file (read one column, batch by batch)."""
    last = -1
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20, columns=["ingest_order"]):
        a = batch.column(0).to_numpy()
        if len(a) and (a[0] <= last or (len(a) > 1 and bool((a[1:] <= a[:-1]).any()))):
            raise AssertionError(f"{path}: rows out of ingest order")  # a bug, never bad input
        last = int(a[-1]) if len(a) else last


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
