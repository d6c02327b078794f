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

Before any format sees a line, the byte level is settled here, the same for every format: a
leading UTF-8 byte order mark is dropped (a UTF-16/UTF-32 one is a RawFormatError), CR-only
line ends (classic Mac OS) are read as line breaks, and lines that are not valid UTF-8 are taken
out of the chunk with their exact bytes (the ingest stage quarantines them as ``invalid_utf8``).
"""

from __future__ import annotations

import dataclasses

import errno
import itertools
import json
import os
import queue
import re
import stat
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    if src.format == "amazon-2023-benchmark-csv":
        return benchmark_domain(path)
    return stem_domain(path)


def _open(path: Path):
    if path.suffix == ".gz":
        # ISA-L's gzip reader decompresses about 2.5x faster than the standard library's
        return igzip.open(path, "rb")
    return open(path, "rb")


def check_regular_file(path: Path, what: str = "raw file") -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file, naming it and what is wrong: a
    dangling symlink or a symlink loop (a glob lists them like files, and ``stat`` fails on them
    with a bare OSError), a directory, a FIFO or a device (reading one blocks or never ends)."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RawFormatError(f"{path}: symlink loop (following the link leads back to it)") from exc
        if path.is_symlink():
            raise RawFormatError(f"{path}: dangling symlink (its target {os.readlink(path)} does not exist)") from exc
        if isinstance(exc, FileNotFoundError):
            raise RawFormatError(f"{path}: {what} does not exist") from exc
        raise RawFormatError(f"{path}: cannot stat the {what}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise RawFormatError(f"{path}: is a directory, expected a {what} (use a glob like {path}/*.csv)")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise RawFormatError(f"{path}: not a regular file ({kind}); expected a {what}")
    return st


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO / named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))

# An id holding a C0 control character (NUL, tab, newline...) or DEL is rejected: it prints like
# another id ('U\x00036' next to 'U036') and breaks tab-separated exports. One pattern read the
# same way by RE2 (the ingest's DuckDB check) and Python's re (the validation layers).
ID_CONTROL_CHARS = r"[\x00-\x1f\x7f]"

UTF8_BOM = b"\xef\xbb\xbf"
# byte order marks of encodings we do not read (longest first: UTF-32 LE's starts with UTF-16 LE's)
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "UTF-32 BE"),
               (b"\xff\xfe", "UTF-16 LE"), (b"\xfe\xff", "UTF-16 BE"))
# A file is CR-only when its first DETECT_BYTES (extended through its first line break if that
# comes later) hold a CR but no LF. A fixed window, not the first chunk, so the verdict (and so
# every line number) does not depend on chunk_bytes, and a header read agrees with the ingest.
DETECT_BYTES = 1 << 16


@dataclass
class LineChunk:
    """Consecutive lines of a raw file, line ends removed.

    ``lines`` holds the lines that are valid UTF-8 and ``line_no`` their 1-based numbers. Lines
    that are not valid UTF-8 are held apart, as their exact bytes (``bad_bytes``, numbered
    ``bad_line_no``): no format query sees them, and the quarantine keeps them for replay.
    """

    lines: pa.LargeStringArray
    line_no: np.ndarray
    bad_line_no: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bad_bytes: pa.LargeBinaryArray = field(default_factory=lambda: pa.array([], pa.large_binary()))

    @property
    def n_lines(self) -> int:
        return len(self.line_no) + len(self.bad_line_no)

    def after(self, skip: int) -> LineChunk:
        """The chunk without its lines numbered ``<= skip`` (a header)."""
        k = int(np.searchsorted(self.line_no, skip, side="right"))
        b = int(np.searchsorted(self.bad_line_no, skip, side="right"))
        if k == b == 0:
            return self
        return LineChunk(self.lines.slice(k), self.line_no[k:], self.bad_line_no[b:], self.bad_bytes.slice(b))


def _line_chunk(body: bytes, first: int) -> LineChunk:
    """The newline-terminated lines of ``body``, numbered from ``first``.

    The line ends ('\\n' or '\\r\\n') are dropped with one numpy mask and the text is checked as
    UTF-8 by one Arrow call, so a valid chunk makes no Python object per line. Only a chunk
    holding invalid UTF-8 takes a slower (still vectorised) path to find the invalid lines.
    """
    buf = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl[:-1] + 1])
    cr = (nl > starts) & (buf[np.maximum(nl - 1, 0)] == 13)
    drop = np.zeros(len(buf), dtype=bool)
    drop[nl] = True
    drop[nl[cr] - 1] = True
    lengths = nl - starts - cr
    offsets = pa.py_buffer(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    data = pa.py_buffer(buf[~drop])
    numbers = np.arange(first, first + len(nl), dtype=np.int64)
    arr = pa.LargeStringArray.from_buffers(len(nl), offsets, data)
    try:
        arr.validate(full=True)
        return LineChunk(arr, numbers)
    except pa.ArrowInvalid:
        pass
    raw = pa.Array.from_buffers(pa.large_binary(), len(nl), [None, offsets, data])
    ok = np.ones(len(nl), dtype=bool)
    ok[_invalid_lines(body)] = False
    return LineChunk(raw.filter(pa.array(ok)).cast(pa.large_string()), numbers[ok], numbers[~ok],
                     raw.filter(pa.array(~ok)))


def _invalid_lines(body: bytes) -> np.ndarray:
    """Indices of the lines of ``body`` that are not valid UTF-8, with no Python step per line.

    The body is decoded once, line ends in place (so a multi-byte sequence cut by a line end
    fails on both lines; without them the halves would join into a valid character), with
    undecodable bytes turned into the escapes U+DC80..U+DCFF, which valid UTF-8 never yields.
    As code points in a numpy array, the escapes' lines are one ``searchsorted`` away.
    """
    text = body.decode("utf-8", "surrogateescape")
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    del text
    escapes = np.flatnonzero((cps >= 0xDC80) & (cps <= 0xDCFF))
    return np.unique(np.searchsorted(np.flatnonzero(cps == 10), escapes))


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
    """Run ``it`` on a background thread (zlib and file reads release the GIL), ``depth`` ahead.

    A consumer that stops early (a header read, a RawFormatError) stops the thread and so closes
    the file, instead of leaving a thread blocked on a full queue with the file open.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in it:
                if not put(x):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


class LineReader:
    """A (gzipped) text file as LineChunks of about ``chunk_bytes`` each.

    Settled here for every format: a leading UTF-8 byte order mark is dropped (``utf8_bom``); a
    UTF-16 / UTF-32 one is a RawFormatError (we read UTF-8 only); a CR-only file (classic Mac OS
    line ends) has its line ends read as line breaks (``line_endings`` 'cr', else 'lf' for LF or
    CRLF), so it streams in chunks like any other file instead of being one line. Both
    attributes are known once the first chunk is out.
    """

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes
        self.line_endings = "lf"
        self.utf8_bom = False

    def __iter__(self) -> Iterator[LineChunk]:
        line_no = 1
        carry = b""
        for block in self._text_blocks():
            data = carry + block if carry else block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            body, carry = data[: cut + 1], data[cut + 1 :]
            chunk = _line_chunk(body, line_no)
            yield chunk
            line_no += chunk.n_lines
        if carry:
            yield _line_chunk(carry + b"\n", line_no)

    def _text_blocks(self) -> Iterator[bytes]:
        """The file's bytes without a UTF-8 BOM and, in a CR-only file, with every line end made
        '\\n' (CRLF and LF too, so a stray LF later cannot join two lines)."""
        blocks = _prefetch(_blocks(self.path, self.chunk_bytes))
        head = bytearray()
        first_break = -1
        for block in blocks:  # read the detection window (and 4 bytes for a BOM)
            if first_break < 0:
                hits = [i for i in (block.find(b"\n"), block.find(b"\r")) if i >= 0]
                first_break = len(head) + min(hits) if hits else -1
            head += block
            if first_break >= 0 and len(head) >= max(DETECT_BYTES, first_break + 2) + len(UTF8_BOM):
                break
        text = self._drop_bom(bytes(head))
        del head
        breaks = [i for i in (text.find(b"\n"), text.find(b"\r")) if i >= 0]
        window = text[: max(DETECT_BYTES, min(breaks) + 2)] if breaks else b""
        if not (b"\r" in window and b"\n" not in window):
            yield text
            yield from blocks
            return
        self.line_endings = "cr"
        pending = b""  # a CR that ends a block may be the first half of a CRLF
        for block in itertools.chain([text], blocks):
            block = pending + block
            pending = b"\r" if block.endswith(b"\r") else b""
            yield (block[:-1] if pending else block).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if pending:
            yield b"\n"

    def _drop_bom(self, head: bytes) -> bytes:
        for bom, name in _OTHER_BOMS:
            if head.startswith(bom):
                raise RawFormatError(f"{self.path}: starts with a {name} byte order mark: the {name[:6]} encoding is "
                                     f"not supported; convert the file to UTF-8 (e.g. iconv -f {name[:6]} -t UTF-8)")
        if head.startswith(UTF8_BOM):
            self.utf8_bom = True
            return head[len(UTF8_BOM) :]
        return head


def iter_line_chunks(path: Path, chunk_bytes: int) -> Iterator[LineChunk]:
    """Yield the LineChunks of a (gzipped) text file, in order (see LineReader)."""
    yield from LineReader(path, chunk_bytes)


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
    for chunk in iter_line_chunks(path, 1 << 16):
        if chunk.n_lines == 0:
            continue
        if len(chunk.bad_line_no) and chunk.bad_line_no[0] == 1:
            raise RawFormatError(f"{path}: line 1: header is not valid UTF-8")
        return [h.strip().strip('"') for h in chunk.lines[0].as_py().rstrip("\r\n").split(delim)]
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


# The parts of a benchmark split file name: <Category>.<part>.csv[.gz]
_BENCHMARK_PARTS = ("train", "valid", "test")
_BENCHMARK_COLUMNS = {"user": "user_id", "item": "parent_asin", "rating": "rating", "timestamp": "timestamp"}


def benchmark_domain(path: Path) -> str:
    """``Toys_and_Games.train.csv.gz`` -> ``Toys_and_Games``: the file stem without the split
    part (train / valid / test). A name without a part (``rating_only/<Category>.csv``, same
    columns) is its stem."""
    stem = stem_domain(path)
    head, dot, part = stem.rpartition(".")
    return head if dot and head and part in _BENCHMARK_PARTS else stem


def amazon_2023_benchmark_csv(src: SourceConfig, path: Path) -> FileReader:
    """The Amazon Reviews 2023 benchmark CSVs (``benchmark/5core/{last_out,timestamp}[_w_his]/
    <Category>.{train,valid,test}.csv[.gz]``, also ``rating_only/<Category>.csv``).

    Header-driven: the header must name ``user_id``, ``parent_asin``, ``rating`` and
    ``timestamp`` (ms since the epoch, as in amazon-2023-jsonl), in any order; other columns are
    carried in the field count only. The ``_w_his`` variants add ``history``, the space-separated
    parent_asins of the user's earlier items: it is NOT read as events. Every earlier item of the
    user is a row of the same category's train / valid / test files, so counting the history
    again would duplicate events; ingest all three parts of a category and let the split stage
    re-derive the split (``split.scheme``). A history field may be quoted (quotes are removed like
    any field's); it never holds a comma, so the field count stays exact.

    The domain is the category from the file name (``<Category>.<part>.csv[.gz]`` ->
    ``<Category>``, see :func:`benchmark_domain`) unless ``domain`` / ``domain_regex`` is set.
    """
    header = _read_header(path, src.delimiter)
    missing = [name for name in _BENCHMARK_COLUMNS.values() if name not in header]
    if missing:
        raise RawFormatError(f"{path}: line 1: header {header} lacks column(s) {missing}; an Amazon 2023 benchmark "
                             f"CSV has the header user_id,parent_asin,rating,timestamp[,history]")
    # an interaction CSV with fixed column names (the domain still comes from file_domain)
    return interaction_csv(dataclasses.replace(src, columns=_BENCHMARK_COLUMNS), path)


def abxi_benchmark(src: SourceConfig, path: Path) -> FileReader:
    """ABXI's released sequences: ``uid item|ts item|ts ...`` with JSON id maps
    (ASIN -> [item id, domain index], reviewerID -> uid). Rows come back with raw ids."""
    if not (src.item_map and src.user_map and src.domain_names):
        raise RawFormatError(f"{path}: abxi-benchmark needs item_map, user_map and domain_names")
    items, users = _abxi_maps(Path(src.item_map), Path(src.user_map), src.domain_names)
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


def _abxi_maps(item_map: Path, user_map: Path, domain_names: list[str]) -> tuple[pa.Table, pa.Table]:
    """The id maps as join tables. They must be one-to-one: a join on a repeated id would
    multiply events, silently, past the row account."""
    maps = []
    for p in (item_map, user_map):
        check_regular_file(p, "id map")  # a FIFO would block the read below
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise RawFormatError(f"{p}: abxi-benchmark id map cannot be read: {exc}") from exc
        if not isinstance(m, dict):
            raise RawFormatError(f"{p}: abxi-benchmark id map must be a JSON object")
        maps.append(m)
    imap, umap = maps
    n_dom = len(domain_names)
    bad = next((k for k, v in imap.items() if not (isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)
                                                    and 0 <= v[1] < n_dom)), None)
    if bad is not None:
        raise RawFormatError(f"{item_map}: entry {bad!r}: {imap[bad]!r} is not [item id, domain index < {n_dom}]")
    items = pa.table({
        "iid": pa.array([str(v[0]) for v in imap.values()]),
        "asin": pa.array(list(imap.keys())),
        "dom": pa.array([domain_names[v[1]] for v in imap.values()]),
    })
    users = pa.table({"uid": pa.array([str(v) for v in umap.values()]), "rid": pa.array(list(umap.keys()))})
    for p, ids in ((item_map, items["iid"]), (user_map, users["uid"])):
        if pc.count_distinct(ids).as_py() != len(ids):
            raise RawFormatError(f"{p}: abxi-benchmark id map gives one id to two keys; it must be one-to-one")
    return items, users


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
    "amazon-2023-benchmark-csv": amazon_2023_benchmark_csv,
    "abxi-benchmark": abxi_benchmark,
    "syncrec-seq": syncrec_seq,
    "kuairand-seq": kuairand_seq,
}
TIMESTAMP_MS = {"amazon-2023-jsonl", "amazon-2023-benchmark-csv"}
