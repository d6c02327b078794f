"""Data validation of the pipeline's tables: pandera schemas + Great Expectations suites.

Two entry points, called by the pipeline stages after they write a table:

* :func:`validate_interactions`: the ingest stage's canonical interactions.
* :func:`validate_sequences`: the sequences stage's exploded sequences and item index.

Each runs both layers (pandera for exact row-level failures with examples, GX for the
human-readable Data Docs), always writes ``out_dir/validation.json`` and ``out_dir/data_docs/``
(open ``index.html``), then raises :class:`ValidationFailed` if any check failed. Both are the
same bytes for the same tables (``out_dir`` is a DVC output); the wall time goes to
``timing_file`` when one is given (cdsr.data.timing), and to the log.

Tables larger than ``batch_rows`` (:data:`BATCH_ROWS`) are validated in batches, so memory
stays bounded at any size (:func:`validate_interactions_file`, :func:`validate_sequence_tables`,
called by the stages): every row goes through both layers' row checks batch by batch, and the
checks that compare rows across the whole table (uniqueness, duplicates, an item's domains)
run over the whole table in DuckDB, out of core. The report has the same keys, counts and
example rows as a whole-table run; Data Docs show the totals over the batches.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pandera.pandas as pa
import polars as pl
import pyarrow.parquet as pq
from pandera.errors import SchemaErrors

from cdsr.data import expectations as gxs
from cdsr.data import schemas
from cdsr.data.config import DatasetConfig
from cdsr.data.formats import _sql_str
from cdsr.data.ingest import duckdb_connection
from cdsr.data.timing import write_timing

log = logging.getLogger(__name__)

__all__ = ["ValidationFailed", "validate_interactions", "validate_interactions_file", "validate_sequence_tables",
           "validate_sequences"]

MAX_EXAMPLES = 3
# rows per batch above which a table is validated batch by batch (about 1 GB of pandas per
# batch of interactions, whose ids are Python strings)
BATCH_ROWS = 2_000_000


class ValidationFailed(Exception):
    """A table broke one or more checks.

    ``str(exc)`` is a readable summary: the table, each failing check with its failure count
    and a few example rows (``source_file:source_line`` for interactions). ``exc.report`` is
    the dict written to validation.json; ``exc.out_dir`` holds it and the Data Docs.
    """

    def __init__(self, message: str, report: dict[str, Any], out_dir: Path) -> None:
        super().__init__(message)
        self.report = report
        self.out_dir = out_dir


# --------------------------------------------------------------------------- pandera layer


def _pandera_keys(table: str, schema: pa.DataFrameSchema) -> list[str]:
    """Every check of a schema as a report key (so passing checks show up as "ok")."""
    keys = []
    for col, c in schema.columns.items():
        keys += [f"{table}.{col}:present", f"{table}.{col}:dtype"]
        if not c.nullable:
            keys.append(f"{table}.{col}:not_null")
        if c.unique:
            keys.append(f"{table}.{col}:unique")
        keys += [f"{table}.{col}:{ch.name}" for ch in c.checks]
    keys += [f"{table}.{ch.name}" for ch in schema.checks]
    return keys


def _failure_key(table: str, schema: pa.DataFrameSchema, context: str, column: Any, check: Any, number: Any) -> str:
    """Map one group of pandera failure cases to its report key."""
    check = str(check)
    if check == "column_in_dataframe":
        return ""  # keyed per missing column by the caller (the column name is the failure case)
    has_num = number is not None and not pd.isna(number)
    if context == "DataFrameSchema" and has_num:
        return f"{table}.{schema.checks[int(number)].name}"
    if column is not None and not pd.isna(column) and column in schema.columns:
        if has_num:
            return f"{table}.{column}:{schema.columns[column].checks[int(number)].name}"
        if check == "not_nullable":
            return f"{table}.{column}:not_null"
        if check == "field_uniqueness":
            return f"{table}.{column}:unique"
        if check.startswith("dtype("):
            return f"{table}.{column}:dtype"
        return f"{table}.{column}:{check}"
    return f"{table}.{check}"


def run_pandera(table: str, df: pd.DataFrame, schema: pa.DataFrameSchema) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate lazily (all failures at once).

    Returns ``({key: "ok" | failure count}, [failure details])``; a detail holds the failing
    row labels (``index``) or, for failures without rows (dtype, missing column), ``detail``.
    """
    results: dict[str, Any] = {k: "ok" for k in _pandera_keys(table, schema)}
    try:
        schema.validate(df, lazy=True, inplace=True)
        return results, []
    except SchemaErrors as exc:
        fc = exc.failure_cases
    failures: dict[str, dict[str, Any]] = {}
    group_cols = ["schema_context", "column", "check", "check_number"]
    for (context, column, check, number), g in fc.groupby(group_cols, dropna=False, sort=False):
        if str(check) == "column_in_dataframe":
            keys = [(f"{table}.{c}:present", g.iloc[[i]]) for i, c in enumerate(g["failure_case"])]
        else:
            keys = [(_failure_key(table, schema, context, column, check, number), g)]
        for key, rows in keys:
            f = failures.setdefault(key, {"layer": "pandera", "check": key, "index": [], "detail": []})
            idx = rows["index"].dropna()
            if len(idx):
                f["index"].extend(idx.tolist())
            else:
                expected = (f" (expected {schema.columns[column].dtype})"
                            if key.endswith(":dtype") and column in schema.columns else "")
                f["detail"].extend(f"{v}{expected}" for v in rows["failure_case"].astype(str).unique()[:MAX_EXAMPLES])
    out = []
    for key, f in failures.items():
        f["index"] = sorted(set(f["index"]), key=_sort_label)
        f["count"] = len(f["index"]) or max(len(f["detail"]), 1)
        results[key] = f["count"]
        out.append(f)
    return results, out


def _sort_label(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


# --------------------------------------------------------------------------- report


def _as_pandas(df: Any) -> pd.DataFrame:
    """Accept a polars frame too; give every row a unique label (failure cases cite labels)."""
    if not isinstance(df, pd.DataFrame) and hasattr(df, "to_pandas"):
        df = df.to_pandas()
    if not df.index.is_unique:
        df = df.reset_index(drop=True)
    return df


def _example(table: str, frame: pd.DataFrame, label: Any) -> str:
    try:
        row = frame.loc[label]
    except KeyError:
        return f"row {label}"
    if isinstance(row, pd.DataFrame):
        row = row.iloc[0]
    if table == "interactions" and {"source_file", "source_line"} <= set(row.index):
        pos = row.get("source_pos")
        where = f"{row['source_file']}:{row['source_line']}" + (f" (event {pos})" if pd.notna(pos) and pos else "")
        fields = ", ".join(f"{c}={_scalar(row[c])!r}" for c in ("user_id", "item_id", "domain", "timestamp", "rating")
                           if c in row.index)
        return f"{where}: {fields}"
    return ", ".join(f"{c}={_scalar(v)!r}" for c, v in row.items())


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _finish(table: str, cfg: DatasetConfig, out_dir: Path, rows: int, frames: dict[str, pd.DataFrame],
            pandera_results: dict[str, Any], pandera_failures: list[dict[str, Any]],
            gx_results: dict[str, dict[str, Any]], extra: dict[str, Any], t0: float,
            timing_file: Path | None) -> dict[str, Any]:
    """Write validation.json and the timing file (always), log, and raise ValidationFailed on
    any failure."""
    gx_failed = {k: v for k, v in gx_results.items() if not v["success"]}
    failures: list[dict[str, Any]] = []
    for f in pandera_failures:
        tname = f["check"].split(".", 1)[0]
        frame = frames.get(tname)
        examples = f.get("examples") or ([_example(tname, frame, lab) for lab in f["index"][:MAX_EXAMPLES]]
                                         if frame is not None else []) or f["detail"]
        failures.append({"layer": "pandera", "check": f["check"], "count": f["count"], "examples": examples})
    for k, v in gx_failed.items():
        examples = [v["error"]] if v.get("error") else [repr(x) for x in v["partial_unexpected"][:MAX_EXAMPLES]]
        failures.append({"layer": "great_expectations", "check": k, "expectation": v["expectation"],
                         "count": v["unexpected_count"], "examples": examples})
    report = {
        "table": table,
        "dataset": cfg.name,
        "success": not failures,
        "rows": int(rows),
        **extra,
        "pandera": pandera_results,
        "great_expectations": {k: {"expectation": v["expectation"], "success": v["success"],
                                   "unexpected_count": v["unexpected_count"],
                                   **({"error": v["error"]} if v.get("error") else {})}
                               for k, v in gx_results.items()},
        "failures": failures,
        "data_docs": "data_docs/index.html",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    elapsed = write_timing(Path(timing_file), t0)["elapsed_s"] if timing_file is not None else time.time() - t0
    n_checks = len(pandera_results) + len(gx_results)
    if not failures:
        log.info("%s of dataset '%s': %d checks passed on %d rows (%.1fs)", table, cfg.name, n_checks, rows, elapsed)
        return report
    raise ValidationFailed(_message(report, out_dir), report, out_dir)


def _message(report: dict[str, Any], out_dir: Path) -> str:
    fs = report["failures"]
    lines = [f"{report['table']} of dataset '{report['dataset']}' failed validation ({report['rows']} rows): "
             f"{len(fs)} failing check(s)"]
    for f in fs:
        what = "failed" if f["count"] is None else (
            f"{f['count']} failing row(s)" if f["layer"] == "pandera" else f"{f['count']} unexpected value(s)")
        exp = f" [{f['expectation']}]" if f.get("expectation") else ""
        lines.append(f"  {f['layer']} {f['check']}{exp}: {what}")
        lines += [f"      e.g. {e}" for e in f["examples"][:MAX_EXAMPLES]]
    lines.append(f"  report: {out_dir / 'validation.json'}; Data Docs: {out_dir / 'data_docs' / 'index.html'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def validate_interactions(df: pd.DataFrame, cfg: DatasetConfig, out_dir: Path, timing_file: Path | None = None) -> dict:
    """Validate the canonical interactions table (layout in cdsr.data.ingest).

    Writes ``out_dir/validation.json``, ``out_dir/data_docs/`` and ``timing_file`` if given;
    returns the report, or raises :class:`ValidationFailed` (after writing them) if any check
    failed.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    df = _as_pandas(df)
    p_res, p_fail = run_pandera("interactions", df, schemas.interactions_schema(cfg))
    tables = [gxs.GxTable("interactions", df, gxs.interactions_expectations(cfg))]
    if {"item_id", "domain"} <= set(df.columns):
        tables.append(gxs.GxTable("interaction_items", schemas.item_domains(df), gxs.item_domain_expectations()))
    g_res = gxs.run_suites(tables, out_dir / "data_docs")
    extra = {"policies": {"duplicates": cfg.ingest.duplicates, "domains": list(cfg.domains),
                          "timestamp_bounds": list(cfg.ingest.timestamp_bounds())}}
    return _finish("interactions", cfg, out_dir, len(df), {"interactions": df}, p_res, p_fail, g_res, extra, t0,
                   timing_file)


def validate_sequences(seq_long: pd.DataFrame, items: pd.DataFrame, cfg: DatasetConfig, out_dir: Path,
                       timing_file: Path | None = None) -> dict:
    """Validate the exploded sequences and the item index (layouts in cdsr.data.sequences).

    Besides the row checks of both tables, a per-user summary (schemas.user_summary) carries
    the per-user constraints: >= 3 events, time order, contiguous positions and the filter
    thresholds that must hold on the final table (schemas.user_constraints).
    Writes ``out_dir/validation.json``, ``out_dir/data_docs/`` and ``timing_file`` if given;
    returns the report, or raises :class:`ValidationFailed` (after writing them) if any check
    failed.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    seq_long, items = _as_pandas(seq_long), _as_pandas(items)
    n_domains = schemas.n_domains_of(cfg, items)
    constraints = schemas.user_constraints(cfg)
    frames: dict[str, pd.DataFrame] = {"seq_long": seq_long, "items": items}
    p_res, p_fail = run_pandera("seq_long", seq_long, schemas.seq_long_schema(items, n_domains))
    r, f = run_pandera("items", items, schemas.items_schema(cfg, n_domains))
    p_res.update(r)
    p_fail += f

    # GX sees seq_long with two derived columns, so the cross-table and cross-row checks are
    # column expectations that show row-level results in Data Docs
    tables = []
    seq_gx = seq_long.copy(deep=False)
    if {"item_idx", "domain_idx"} <= set(items.columns) and "item_idx" in seq_long.columns:
        item_dom = items.dropna(subset=["item_idx"]).drop_duplicates("item_idx").set_index("item_idx")["domain_idx"]
        seq_gx["item_domain_idx"] = seq_long["item_idx"].map(item_dom)
    if {"user_idx", "pos", "timestamp"} <= set(seq_long.columns):
        seq_gx["previous_timestamp"] = schemas.previous_timestamp(seq_long)
    tables.append(gxs.GxTable("seq_long", seq_gx, gxs.seq_long_expectations(n_domains)))
    items_sorted = items.sort_values("item_idx", kind="stable") if "item_idx" in items.columns else items
    tables.append(gxs.GxTable("items", items_sorted, gxs.items_expectations(cfg, len(items), n_domains)))
    skipped = []
    if set(schemas.SEQ_LONG_COLUMNS) <= set(seq_long.columns):
        users = schemas.user_summary(seq_long, n_domains)
        frames["users"] = users
        r, f = run_pandera("users", users, schemas.users_schema(constraints))
        p_res.update(r)
        p_fail += f
        tables.append(gxs.GxTable("users", users, gxs.users_expectations(constraints)))
    else:  # the missing columns are reported by the seq_long schema
        skipped.append("users (seq_long lacks columns)")
    g_res = gxs.run_suites(tables, out_dir / "data_docs")
    extra = {"items": int(len(items)), "users": int(len(frames["users"])) if "users" in frames else None,
             "domains": n_domains, "user_constraints": constraints.describe(),
             "domains_required": cfg.sequences.domains_required, "skipped": skipped}
    return _finish("sequences", cfg, out_dir, len(seq_long), frames, p_res, p_fail, g_res, extra, t0, timing_file)


# --------------------------------------------------------------------------- batched


class _PanderaTotals:
    """pandera results of a table validated batch by batch, added up as one whole-table run:
    the same keys, failing-row counts and first example rows (batches come in row order)."""

    def __init__(self, table: str, schema: pa.DataFrameSchema) -> None:
        self.table = table
        self.results: dict[str, Any] = {k: "ok" for k in _pandera_keys(table, schema)}
        self.failures: dict[str, dict[str, Any]] = {}

    def add(self, results: dict[str, Any], failures: list[dict[str, Any]], frame: pd.DataFrame) -> None:
        for f in failures:
            agg = self._entry(f["check"])
            agg["n_rows"] += len(f["index"])
            room = MAX_EXAMPLES - len(agg["examples"])
            if room > 0 and f["index"]:
                agg["examples"] += [_example(self.table, frame, lab) for lab in f["index"][:room]]
            agg["detail"] += [d for d in f["detail"] if d not in agg["detail"]]

    def add_rows(self, key: str, n_rows: int, examples: list[str]) -> None:
        """Failing rows found outside pandera (a whole-table check, a batch boundary)."""
        if n_rows:
            agg = self._entry(key)
            agg["n_rows"] += n_rows
            agg["examples"] += examples[: MAX_EXAMPLES - len(agg["examples"])]

    def _entry(self, key: str) -> dict[str, Any]:
        return self.failures.setdefault(key, {"layer": "pandera", "check": key, "n_rows": 0, "examples": [],
                                              "detail": [], "index": []})

    def finish(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        out = []
        for key, f in self.failures.items():
            f["count"] = f.pop("n_rows") or max(len(f["detail"]), 1)
            f["detail"] = f["detail"][:MAX_EXAMPLES] if not f["examples"] else f["detail"]
            self.results[key] = f["count"]
            out.append(f)
        return self.results, out


def validate_interactions_file(path: Path, cfg: DatasetConfig, out_dir: Path, timing_file: Path | None = None,
                               batch_rows: int = BATCH_ROWS) -> dict:
    """:func:`validate_interactions` of interactions.parquet, in batches when it has more than
    ``batch_rows`` rows. The row checks of both layers run batch by batch (row labels are
    row numbers in the file, as in a whole-table run); ingest_order uniqueness, exact
    duplicates and an item's domains are checked over the whole file in DuckDB, and the derived
    per-item frame (item_id, n_domains) is built there too."""
    path = Path(path)
    n = pq.ParquetFile(path).metadata.num_rows
    if n <= batch_rows:
        return validate_interactions(pl.read_parquet(path).to_pandas(), cfg, out_dir, timing_file)
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    row_schema = schemas.interactions_schema(cfg, whole_table=False)
    pandera_totals = _PanderaTotals("interactions", schemas.interactions_schema(cfg))
    expectations = gxs.interactions_expectations(cfg)
    with gxs.SuiteRunner() as gx_runner, tempfile.TemporaryDirectory(prefix="cdsr-validate-", dir=out_dir.parent) as tmp:
        off = 0
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            batch = pl.from_arrow(record_batch).to_pandas()
            del record_batch
            batch.index = pd.RangeIndex(off, off + len(batch))
            off += len(batch)
            r, f = run_pandera("interactions", batch, row_schema)
            pandera_totals.add(r, f, batch)
            gx_runner.run("interactions", batch, expectations)
            del batch
        con = duckdb_connection(cfg, tmp)
        try:
            gx_overrides, item_domains = _interactions_whole_table(con, path, cfg, pandera_totals)
        finally:
            con.close()
        gx_runner.run("interaction_items", item_domains, gxs.item_domain_expectations())
        g_res = gx_runner.finish(out_dir / "data_docs", gx_overrides)
    p_res, p_fail = pandera_totals.finish()
    extra = {"policies": {"duplicates": cfg.ingest.duplicates, "domains": list(cfg.domains),
                          "timestamp_bounds": list(cfg.ingest.timestamp_bounds())}}
    return _finish("interactions", cfg, out_dir, n, {}, p_res, p_fail, g_res, extra, t0, timing_file)


def _interactions_whole_table(con: duckdb.DuckDBPyConnection, path: Path, cfg: DatasetConfig,
                              totals: _PanderaTotals) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """The cross-row checks of interactions over the whole file (what pandera's unique column
    and table checks and GX's uniqueness expectations do on a whole frame): failing rows are
    every row of a repeated value / duplicate group / multi-domain item, as there."""
    con.execute(f"create view t as select *, file_row_number as row from read_parquet({_sql_str(str(path))}, "
                "file_row_number = true)")
    overrides: dict[str, dict[str, Any]] = {}

    def failing(name: str, groups_sql: str, join: str, gx_key: str | None, gx_cols: list[str], gx_where: str = "true"):
        con.execute(f"create temp table {name} as {groups_sql}")
        if con.sql(f"select count(*) from {name}").fetchall()[0][0] == 0:
            n_rows, examples, gx_n, gx_vals = 0, [], 0, []
        else:
            rows = f"select t.* from t join {name} g on {join}"
            n_rows = con.sql(f"select count(*) from ({rows})").fetchall()[0][0]
            first = con.sql(f"{rows} order by t.row limit {MAX_EXAMPLES}").df().set_index("row")
            examples = [_example("interactions", first, lab) for lab in first.index]
            gx_n, gx_vals = 0, []
            if gx_key is not None:
                gx_n = con.sql(f"select count(*) from ({rows}) where {gx_where}").fetchall()[0][0]
                vals = con.sql(f"select {', '.join(gx_cols)} from ({rows}) where {gx_where} order by row limit 5").df()
                gx_vals = [gxs._plain(v if len(gx_cols) > 1 else v[gx_cols[0]]) for v in vals.to_dict("records")]
        totals.add_rows(f"interactions.{name}" if name != "ingest_order_unique" else "interactions.ingest_order:unique",
                        n_rows, examples)
        if gx_key is not None:
            overrides[gx_key] = {"success": gx_n == 0, "unexpected_count": gx_n, "partial_unexpected": gx_vals}

    failing("ingest_order_unique", "select ingest_order from t group by ingest_order having count(*) > 1",
            "t.ingest_order is not distinct from g.ingest_order", "interactions.ingest_order:unique", ["ingest_order"],
            "ingest_order is not null")
    failing("item_in_one_domain", "select item_id from t group by item_id having count(distinct domain) > 1",
            "t.item_id is not distinct from g.item_id", None, [])
    if cfg.ingest.duplicates == "drop":
        key = schemas.DUPLICATE_KEY
        failing("no_exact_duplicates", f"select {', '.join(key)} from t group by all having count(*) > 1",
                " and ".join(f"t.{c} is not distinct from g.{c}" for c in key), "interactions.no_exact_duplicates",
                key, " or ".join(f"{c} is not null" for c in key))
    item_domains = pl.from_arrow(con.sql(
        "select item_id, (count(distinct domain) + max(case when domain is null then 1 else 0 end))::BIGINT "
        "as n_domains from t group by item_id order by item_id nulls last").to_arrow_table()).to_pandas()
    return overrides, item_domains


def validate_sequence_tables(seqs: pl.DataFrame, items: pl.DataFrame, cfg: DatasetConfig, out_dir: Path,
                             timing_file: Path | None = None, batch_rows: int = BATCH_ROWS) -> dict:
    """:func:`validate_sequences` of the sequences stage's tables (one row per user with list
    columns, and the item index), exploded to one row per event batch by batch when there are
    more than ``batch_rows`` events. A batch holds whole users, so the per-user checks (time
    order, positions, the per-user summary) see every event of a user; the order of users
    across batches is checked at each batch boundary, and the per-user summary (one row per
    user) and the item index are validated whole."""
    from cdsr.data.sequences import explode_sequences

    lengths = seqs["items"].list.len().to_numpy().astype(np.int64) if seqs.height else np.zeros(0, np.int64)
    total = int(lengths.sum())
    if total <= batch_rows:
        return validate_sequences(explode_sequences(seqs).to_pandas(), items.to_pandas(), cfg, out_dir, timing_file)
    t0 = time.time()
    out_dir = Path(out_dir)
    items_pd = _as_pandas(items.to_pandas())
    n_domains = schemas.n_domains_of(cfg, items_pd)
    constraints = schemas.user_constraints(cfg)
    seq_schema = schemas.seq_long_schema(items_pd, n_domains)
    seq_totals = _PanderaTotals("seq_long", seq_schema)
    item_dom = (items_pd.dropna(subset=["item_idx"]).drop_duplicates("item_idx").set_index("item_idx")["domain_idx"]
                if {"item_idx", "domain_idx"} <= set(items_pd.columns) else None)
    ends = np.cumsum(lengths)
    users_parts = []
    boundary_bad: list[int] = []  # user_idx values that decrease across a batch boundary
    prev: tuple[int, int] | None = None
    with gxs.SuiteRunner() as gx_runner:
        a, off = 0, 0
        while a < seqs.height:
            b = max(a + 1, int(np.searchsorted(ends, off + batch_rows, side="right")))
            long = explode_sequences(seqs.slice(a, b - a)).to_pandas()
            long.index = pd.RangeIndex(off, off + len(long))
            r, f = run_pandera("seq_long", long, seq_schema)
            seq_totals.add(r, f, long)
            if prev is not None and len(long):  # the row before the batch is the previous batch's last
                first = (int(long["user_idx"].iloc[0]), int(long["pos"].iloc[0]))
                if not (first[0] > prev[0] or (first[0] == prev[0] and first[1] > prev[1])):
                    if first[0] < prev[0]:
                        boundary_bad.append(first[0])
                    seq_totals.add_rows("seq_long.sorted_by_user_pos", 1, [_example("seq_long", long, off)])
            seq_gx = long.copy(deep=False)
            if item_dom is not None:
                seq_gx["item_domain_idx"] = long["item_idx"].map(item_dom)
            seq_gx["previous_timestamp"] = schemas.previous_timestamp(long)
            gx_runner.run("seq_long", seq_gx, gxs.seq_long_expectations(n_domains))
            users_parts.append(schemas.user_summary(long, n_domains))
            if len(long):
                prev = (int(long["user_idx"].iloc[-1]), int(long["pos"].iloc[-1]))
            off += len(long)
            a = b
            del long, seq_gx
        p_res, p_fail = seq_totals.finish()
        r, f = run_pandera("items", items_pd, schemas.items_schema(cfg, n_domains))
        p_res.update(r)
        p_fail += f
        items_sorted = items_pd.sort_values("item_idx", kind="stable") if "item_idx" in items_pd.columns else items_pd
        gx_runner.run("items", items_sorted, gxs.items_expectations(cfg, len(items_pd), n_domains))
        users = pd.concat(users_parts, ignore_index=True)
        r, f = run_pandera("users", users, schemas.users_schema(constraints))
        p_res.update(r)
        p_fail += f
        gx_runner.run("users", users, gxs.users_expectations(constraints))
        overrides = {}
        if boundary_bad:  # user_idx decreased from one batch to the next
            e = gx_runner.out["seq_long.user_idx:sorted"]
            overrides["seq_long.user_idx:sorted"] = {
                "success": False, "unexpected_count": (e["unexpected_count"] or 0) + len(boundary_bad),
                "partial_unexpected": sorted(e["partial_unexpected"] + boundary_bad)[:5]}
        g_res = gx_runner.finish(out_dir / "data_docs", overrides)
    extra = {"items": len(items_pd), "users": len(users), "domains": n_domains,
             "user_constraints": constraints.describe(), "domains_required": cfg.sequences.domains_required,
             "skipped": []}
    return _finish("sequences", cfg, out_dir, total, {"items": items_pd, "users": users}, p_res, p_fail, g_res,
                   extra, t0, timing_file)
