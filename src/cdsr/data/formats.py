"""Raw-file readers: one parser per raw format, all streaming.

A file is read in byte chunks (``chunk_bytes``); each chunk is cut at its last newline and
turned into an Arrow string array with numpy (no Python object per line), so memory stays flat
in the file size and line numbers are exact. Each format is a DuckDB query over such a chunk
(table ``chunk``: ``line``, ``source_line``) that yields *candidate rows* with text fields:

    user_id, item_id, domain, ts_text, rating_text, source_pos, reason_pre

``reason_pre`` is a format-level rejection (bad JSON, wrong field count...); the field-level
checks (empty ids, non-numeric or out-of-range timestamps...) are shared and live in
``cdsr.data.ingest``. Row formats give one row per line (``source_pos`` = 0); sequence formats
(benchmark releases with one user per line) give one row per event, ``source_pos`` = 1-based
position of the event in its line.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from isal import igzip, isal_zlib

from cdsr.data.config import SourceConfig


class RawFormatError(ValueError):
    """A raw file that cannot be read at all (missing, empty, wrong format)."""


_EXTENSIONS = (".gz", ".json", ".jsonl", ".csv", ".tsv", ".txt")


def stem_domain(path: Path) -> str:
    name = path.name
    changed = True
    while changed:
        changed = False
        for ext in _EXTENSIONS:
            if name.lower().endswith(ext):
                name, changed = name[: -len(ext)], True
    return name


def file_domain(src: SourceConfig, path: Path) -> str:
    if src.domain:
        return src.domain
    if src.domain_regex:
        m = re.search(src.domain_regex, path.name)
        if not m or "domain" not in m.groupdict():
            raise RawFormatError(f"{path}: domain_regex {src.domain_regex!r} has no 'domain' group match")
        return m.group("domain")
    return stem_domain(path)


def _open(path: Path):
    if path.suffix == ".gz":
        # ISA-L's gzip reader decompresses about 2.5x faster than the standard library's
        return igzip.open(path, "rb")
    return open(path, "rb")


def _lines_array(body: bytes) -> pa.LargeStringArray:
    """Arrow strings for the newline-terminated lines of ``body``, without their line ends
    ('\\n' or '\\r\\n'): the terminator bytes are dropped with one numpy mask, so no Python
    object is made per line."""
    buf = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl[:-1] + 1])
    cr = (nl > starts) & (buf[np.maximum(nl - 1, 0)] == 13)
    drop = np.zeros(len(buf), dtype=bool)
    drop[nl] = True
    drop[nl[cr] - 1] = True
    lengths = nl - starts - cr
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = buf[~drop]
    arr = pa.LargeStringArray.from_buffers(len(nl), pa.py_buffer(offsets), pa.py_buffer(data.tobytes()))
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        # rare path: replace undecodable lines by a marker the parsers reject as invalid UTF-8
        fixed = []
        for i in range(len(nl)):
            raw = data[offsets[i] : offsets[i + 1]].tobytes()
            try:
                fixed.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                fixed.append(INVALID_UTF8)
        arr = pa.array(fixed, type=pa.large_string())
    return arr


INVALID_UTF8 = "\x00<invalid utf-8>\x00"


def _blocks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    try:
        fh = _open(path)
    except OSError as exc:
        raise RawFormatError(f"{path}: cannot open: {exc}") from exc
    with fh:
        while True:
            try:
                block = fh.read(chunk_bytes)
            except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:  # BadGzipFile is an OSError
                raise RawFormatError(f"{path}: cannot read (corrupt or not {path.suffix or 'text'}?): {exc}") from exc
            if not block:
                return
            yield block


def _prefetch(it: Iterator[bytes], depth: int = 2) -> Iterator[bytes]:
    """Run ``it`` on a background thread (zlib and file reads release the GIL), ``depth`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for x in it:
                q.put(x)
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    threading.Thread(target=work, daemon=True).start()
    while True:
        x = q.get()
        if x is done:
            return
        if isinstance(x, BaseException):
            raise x
        yield x


def iter_line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, pa.LargeStringArray]]:
    """Yield ``(first_line_number, lines)`` for consecutive chunks of a (gzipped) text file."""
    line_no = 1
    carry = b""
    for block in _prefetch(_blocks(path, chunk_bytes)):
        data = carry + block
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        body, carry = data[: cut + 1], data[cut + 1 :]
        arr = _lines_array(body)
        yield line_no, arr
        line_no += len(arr)
    if carry:
        yield line_no, _lines_array(carry + b"\n")


# --- format queries -------------------------------------------------------------------------
# Each returns SQL over table ``chunk(line, source_line)`` with columns
# user_id, item_id, domain, ts_text, rating_text, source_line, source_pos, reason_pre, raw.
# ``L`` is the line without its line end.

_L = "line"  # line ends are already stripped


def _base(select: str, where: str = "") -> str:
    return f"""
        with c as (select {_L} as L, source_line from chunk)
        select {select} from c {where}"""


def _json_rows(fields: dict[str, str], domain: str) -> str:
    """JSON lines: ``fields`` maps canonical names to JSON keys ('a|b': first present wins).
    Each line is parsed once for validity and once for all fields together."""
    keys: list[str] = []
    for spec in fields.values():
        keys += [k.strip() for k in spec.split("|") if k.strip() not in keys]
    paths = ", ".join(f"'$.{k}'" for k in keys)

    def pick(spec: str) -> str:
        opts = [f"V[{keys.index(k.strip()) + 1}]" for k in spec.split("|")]
        return opts[0] if len(opts) == 1 else f"coalesce({', '.join(opts)})"

    rating = pick(fields["rating"]) if "rating" in fields else "NULL"
    return f"""
        with c as (select {_L} as L, source_line from chunk),
        j as (select L, source_line,
                     case when L = '' then 'empty_line'
                          when L = '{INVALID_UTF8}' then 'invalid_utf8'
                          when not json_valid(L) or left(ltrim(L), 1) <> '{{' then 'bad_json' end as reason_pre
              from c),
        k as (select *, case when reason_pre is null then json_extract_string(L, [{paths}]) end as V from j)
        select {pick(fields['user'])} as user_id, {pick(fields['item'])} as item_id,
               {domain} as domain, {pick(fields['timestamp'])} as ts_text, {rating} as rating_text,
               source_line, 0 as source_pos, reason_pre, L as raw
        from k"""


def _csv_rows(cols: dict[str, int], n_fields: int, domain: str, delim: str) -> str:
    """Delimited lines without quoting (Amazon ids hold no delimiter); a field count other than
    ``n_fields`` rejects the row. Quoted fields have their surrounding quotes removed."""
    d = delim.replace("'", "''")

    def field(i: int) -> str:
        return f"trim(F[{i + 1}], '\"')"

    parts = {k: (field(v) if v is not None else "NULL") for k, v in cols.items()}
    dom = parts.get("domain") or domain
    return f"""
        with c as (select {_L} as L, source_line from chunk),
        s as (select L, source_line, string_split(L, '{d}') as F from c)
        select {parts['user']} as user_id, {parts['item']} as item_id, {dom} as domain,
               {parts['timestamp']} as ts_text, {parts.get('rating', 'NULL')} as rating_text,
               source_line, 0 as source_pos,
               case when L = '' then 'empty_line'
                    when L = '{INVALID_UTF8}' then 'invalid_utf8'
                    when len(F) <> {n_fields} then 'wrong_field_count' end as reason_pre,
               L as raw
        from s"""


@dataclass
class FileReader:
    """How to read one raw file: the query per chunk, and lines to skip (a header)."""

    query: str
    skip_lines: int = 0
    tables: dict[str, pa.Table] | None = None  # side tables a query joins (id maps)
    reorders: bool = False  # the query's joins/unions do not keep line order: sort its output


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _read_header(path: Path, delim: str) -> list[str]:
    for _, arr in iter_line_chunks(path, 1 << 16):
        if len(arr) == 0:
            continue
        return [h.strip().strip('"') for h in arr[0].as_py().rstrip("\r\n").split(delim)]
    raise RawFormatError(f"{path}: empty file (no header line)")


def amazon_review_json(src: SourceConfig, path: Path) -> FileReader:
    """Amazon 2014/2018 review JSON lines: reviewerID, asin, unixReviewTime, overall."""
    fields = {"user": "reviewerID", "item": "asin", "timestamp": "unixReviewTime", "rating": "overall"}
    return FileReader(_json_rows(fields, _sql_str(file_domain(src, path))))


def amazon_2023_jsonl(src: SourceConfig, path: Path) -> FileReader:
    """Amazon 2023 reviews JSONL: user_id, parent_asin (or asin), rating, timestamp in ms."""
    item = src.item_field if src.item_field == "asin" else f"{src.item_field}|asin"
    fields = {"user": "user_id", "item": item, "timestamp": "timestamp", "rating": "rating"}
    return FileReader(_json_rows(fields, _sql_str(file_domain(src, path))))


def ratings_csv_2014(src: SourceConfig, path: Path) -> FileReader:
    """Amazon 2014 ratings-only CSV, headerless: user,item,rating,timestamp."""
    cols = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    return FileReader(_csv_rows(cols, 4, _sql_str(file_domain(src, path)), ","))


def ratings_csv_2018(src: SourceConfig, path: Path) -> FileReader:
    """Amazon 2018 ratings-only CSV, headerless: item,user,rating,timestamp."""
    cols = {"item": 0, "user": 1, "rating": 2, "timestamp": 3}
    return FileReader(_csv_rows(cols, 4, _sql_str(file_domain(src, path)), ","))


def interaction_csv(src: SourceConfig, path: Path) -> FileReader:
    """Delimited interactions with a header; ``columns`` maps user/item/timestamp[/rating/domain]
    to header names."""
    header = _read_header(path, src.delimiter)
    want = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", **src.columns}
    cols: dict[str, int] = {}
    for key, name in want.items():
        if name not in header:
            raise RawFormatError(f"{path}: line 1: header {header} has no column '{name}' (for {key})")
        cols[key] = header.index(name)
    for opt in ("rating", "domain"):
        if opt not in cols and opt in header:
            cols[opt] = header.index(opt)
    return FileReader(_csv_rows(cols, len(header), _sql_str(file_domain(src, path)), src.delimiter), skip_lines=1)


def abxi_benchmark(src: SourceConfig, path: Path) -> FileReader:
    """ABXI's released sequences: ``uid item|ts item|ts ...`` with JSON id maps
    (ASIN -> [item id, domain index], reviewerID -> uid). Rows come back with raw ids."""
    if not (src.item_map and src.user_map and src.domain_names):
        raise RawFormatError(f"{path}: abxi-benchmark needs item_map, user_map and domain_names")
    try:
        imap = json.loads(Path(src.item_map).read_text())
        umap = json.loads(Path(src.user_map).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RawFormatError(f"abxi-benchmark id maps: {exc}") from exc
    items = pa.table({
        "iid": pa.array([str(v[0]) for v in imap.values()]),
        "asin": pa.array(list(imap.keys())),
        "dom": pa.array([src.domain_names[v[1]] for v in imap.values()]),
    })
    users = pa.table({"uid": pa.array([str(v) for v in umap.values()]), "rid": pa.array(list(umap.keys()))})
    query = f"""
        with c as (select {_L} as L, source_line from chunk),
        t as (select L, source_line, string_split(L, ' ') as T from c),
        e as (select source_line, T[1] as uid, unnest(T[2:]) as tok,
                     unnest(generate_series(1, len(T) - 1)) as source_pos from t where len(T) > 1),
        p as (select *, string_split(tok, '|') as P from e)
        select u.rid as user_id, i.asin as item_id, i.dom as domain,
               case when len(P) = 2 then P[2] end as ts_text, NULL as rating_text,
               source_line, source_pos,
               case when len(P) <> 2 then 'bad_event_token'
                    when u.rid is null then 'unknown_user_id'
                    when i.asin is null then 'unknown_item_id' end as reason_pre,
               tok as raw
        from p left join users u on u.uid = p.uid left join items i on i.iid = P[1]
        union all
        select NULL, NULL, NULL, NULL, NULL, source_line, 0,
               case when L = '' then 'empty_line' else 'no_events' end, L
        from t where len(T) <= 1"""
    return FileReader(query, tables={"items": items, "users": users}, reorders=True)


def syncrec_seq(src: SourceConfig, path: Path) -> FileReader:
    """SyNCRec's amazon_seq.txt: TSV ``<index> user_id item type unix_time list_len`` with
    comma-separated, time-ordered item / domain / time lists."""
    header = _read_header(path, "\t")
    need = ["user_id", "item", "type", "unix_time"]
    if any(n not in header for n in need):
        raise RawFormatError(f"{path}: line 1: header {header} lacks one of {need}")
    u, it, ty, tm = (header.index(n) + 1 for n in need)
    query = f"""
        with c as (select {_L} as L, source_line from chunk),
        s as (select L, source_line, string_split(L, chr(9)) as F from c),
        l as (select L, source_line, F[{u}] as uid, string_split(F[{it}], ',') as I,
                     string_split(F[{ty}], ',') as D, string_split(F[{tm}], ',') as S
              from s where len(F) = {len(header)}),
        ok as (select * from l where len(I) = len(D) and len(I) = len(S))
        select uid as user_id, unnest(I) as item_id, unnest(D) as domain, unnest(S) as ts_text,
               NULL as rating_text, source_line, unnest(generate_series(1, len(I))) as source_pos,
               NULL as reason_pre, NULL as raw
        from ok
        union all
        select NULL, NULL, NULL, NULL, NULL, source_line, 0, 'list_length_mismatch', L from l
        where not (len(I) = len(D) and len(I) = len(S))
        union all
        select NULL, NULL, NULL, NULL, NULL, source_line, 0,
               case when L = '' then 'empty_line' else 'wrong_field_count' end, L
        from s where len(F) <> {len(header)}"""
    return FileReader(query, skip_lines=1, reorders=True)


def kuairand_seq(src: SourceConfig, path: Path) -> FileReader:
    """KuaiRand-1K as released with AutoCDSR: TSV ``split seq_id items domains``.

    NOTE: the release has no timestamps; the event's position in its sequence (1-based) is used
    as its timestamp, so order is preserved and time-gap features are uninformative.
    """
    query = f"""
        with c as (select {_L} as L, source_line from chunk),
        s as (select L, source_line, string_split(L, chr(9)) as F from c),
        l as (select L, source_line, F[2] as uid, string_split(F[3], ' ') as I,
                     string_split(F[4], ' ') as D from s where len(F) = 4),
        ok as (select * from l where len(I) = len(D))
        select uid as user_id, unnest(I) as item_id, unnest(D) as domain,
               unnest(generate_series(1, len(I)))::VARCHAR as ts_text, NULL as rating_text,
               source_line, unnest(generate_series(1, len(I))) as source_pos,
               NULL as reason_pre, NULL as raw
        from ok
        union all
        select NULL, NULL, NULL, NULL, NULL, source_line, 0, 'list_length_mismatch', L from l
        where len(I) <> len(D)
        union all
        select NULL, NULL, NULL, NULL, NULL, source_line, 0,
               case when L = '' then 'empty_line' else 'wrong_field_count' end, L
        from s where len(F) <> 4"""
    return FileReader(query, skip_lines=1, reorders=True)


# The registry of raw formats (name -> reader factory). Timestamp unit is seconds unless listed
# in TIMESTAMP_MS.
FORMATS: dict[str, Callable[[SourceConfig, Path], FileReader]] = {
    "amazon-review-json": amazon_review_json,
    "amazon-2023-jsonl": amazon_2023_jsonl,
    "ratings-csv-2014": ratings_csv_2014,
    "ratings-csv-2018": ratings_csv_2018,
    "interaction-csv": interaction_csv,
    "abxi-benchmark": abxi_benchmark,
    "syncrec-seq": syncrec_seq,
    "kuairand-seq": kuairand_seq,
}
TIMESTAMP_MS = {"amazon-2023-jsonl"}
