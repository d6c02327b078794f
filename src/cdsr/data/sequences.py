"""Sequences stage: canonical interactions -> one time-ordered multi-domain sequence per user.

Order of events inside a user (the documented, stable tie-break): by ``timestamp``; equal
timestamps keep raw order (``tie_break: source_order``: declared file order, then line, then
position in the line; so with Food declared before Kitchen, a same-day Food event comes first)
or are ordered by item id (``tie_break: item_id``), then raw order.

Filters run in the order written in params.yaml (ABXI's order for Food-Kitchen: users in both
domains -> item threshold -> trim to last 50 -> >= 5 events per domain); each step's effect is
logged in stats.json. Re-indexing is contiguous per domain: domain d's items are
``item_idx in [offset_d + 1, offset_d + V_d]`` (0 = padding), items sorted by id inside a
domain, domains in declared order.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from cdsr.data.config import DatasetConfig, FilterStep
from cdsr.data.formats import _sql_str
from cdsr.data.ingest import duckdb_connection

log = logging.getLogger(__name__)


class SequenceBuildError(ValueError):
    """Filters left nothing usable, or the data cannot form sequences."""


def order_events(df: pl.DataFrame, tie_break: str) -> pl.DataFrame:
    keys = ["user_id", "timestamp"] + (["item_id"] if tie_break == "item_id" else []) + ["ingest_order"]
    return df.sort(keys)


def _user_domain_counts(df: pl.DataFrame) -> pl.DataFrame:
    return df.group_by("user_id", "domain").agg(pl.len().alias("n"))


def apply_filter(df: pl.DataFrame, step: FilterStep, domains: list[str], domains_required: str) -> pl.DataFrame:
    """One filter step on time-ordered events (order is preserved)."""
    op, v = step.op, step.value
    if op == "min_user_domains":
        keep = df.group_by("user_id").agg(pl.col("domain").n_unique().alias("k")).filter(pl.col("k") >= v)
        return df.join(keep.select("user_id"), on="user_id", how="semi", maintain_order="left")
    if op == "min_item_events":
        keep = df.group_by("item_id").agg(pl.len().alias("n")).filter(pl.col("n") >= v)
        return df.join(keep.select("item_id"), on="item_id", how="semi", maintain_order="left")
    if op == "min_user_events":
        return df.filter(pl.len().over("user_id") >= v)
    if op == "min_user_domain_events":
        counts = _user_domain_counts(df)
        if domains_required == "all":
            full = counts.filter(pl.col("n") >= v).group_by("user_id").agg(pl.len().alias("k"))
            keep = full.filter(pl.col("k") == len(domains)).select("user_id")
        else:
            bad = counts.filter(pl.col("n") < v).select("user_id").unique()
            keep = counts.select("user_id").unique().join(bad, on="user_id", how="anti")
        return df.join(keep, on="user_id", how="semi", maintain_order="left")
    if op == "min_domain_user_events":
        return df.filter(pl.len().over("user_id", "domain") >= v)
    if op == "trim_last":
        # rows are time-ordered per user, so the last v rows of each user are the latest events
        # (cast: pl.len() is unsigned, and len - v must go negative for short users)
        return df.filter(pl.int_range(pl.len()).over("user_id") >= pl.len().over("user_id").cast(pl.Int64) - v)
    raise SequenceBuildError(f"unknown filter '{op}'")


@dataclass
class SequenceTables:
    sequences: pl.DataFrame  # user_idx, user_id, items, domains, timestamps (lists)
    items: pl.DataFrame  # item_idx, item_id, domain_idx, domain, n_events
    users: pl.DataFrame  # user_idx, user_id, length, n_domains
    stats: dict


def build_sequences(interactions: pl.DataFrame | str | Path, cfg: DatasetConfig,
                    work_dir: str | Path | None = None) -> SequenceTables:
    """Pure function: filtered, re-indexed sequences and their statistics.

    ``interactions`` is a frame or the path of interactions.parquet (read by DuckDB, only the
    columns needed). The string ids never enter the per-event frame: DuckDB numbers users and
    items in id order (so an order on the codes is the order on the ids) and sorts the events
    into sequence order out of core, spilling to ``work_dir`` (a temp directory by default) past
    ``ingest.memory_limit``; the filters and the re-indexing run in polars on integer columns,
    and the ids are put back on the small per-user and per-item tables only.
    """
    with tempfile.TemporaryDirectory(prefix="cdsr-sequences-", dir=work_dir) as tmp:
        df, user_ids, item_ids, seen_domains = _encode_events(interactions, cfg, Path(tmp))
    domains = list(cfg.domains) or seen_domains
    log_rows = [{"step": "input", "users": df["user_id"].n_unique(), "events": df.height}]
    if (cutoff := cfg.sequences.cutoff()) is not None:  # a build as of a time: later events wait
        df = df.filter(pl.col("timestamp") <= cutoff)
        log_rows.append({"step": f"as_of: {cfg.sequences.as_of}", "users": df["user_id"].n_unique(), "events": df.height})
    for step in cfg.sequences.filters:
        df = apply_filter(df, step, domains, cfg.sequences.domains_required)
        log_rows.append({"step": f"{step.op}: {step.value}", "users": df["user_id"].n_unique(), "events": df.height})
    if df.height == 0:
        raise SequenceBuildError(f"dataset '{cfg.name}': the filters left no events ({log_rows})")

    # ``domain`` holds the index of the event's domain in ``domains`` (undeclared domains, which
    # validation rejects, get indices past the declared ones and drop out here as before)
    dom_idx = pl.DataFrame({"domain": list(range(len(domains))), "domain_idx": list(range(len(domains)))},
                           schema={"domain": df.schema["domain"], "domain_idx": pl.Int64})
    names = pl.Series("domain", domains, dtype=pl.String)
    items = (df.group_by("item_id", "domain").agg(pl.len().alias("n_events"))
             .join(dom_idx, on="domain").sort("domain_idx", "item_id")
             .with_columns(item_idx=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)))
    users = (df.select("user_id").unique().sort("user_id")
             .with_columns(user_idx=pl.int_range(pl.len(), dtype=pl.Int64)))
    ev = (df.join(items.select("item_id", "domain", "item_idx", "domain_idx"), on=["item_id", "domain"],
                  maintain_order="left")
          .join(users, on="user_id", maintain_order="left")
          .select("user_idx", "item_idx", "domain_idx", "timestamp"))
    del df
    items = items.select("item_idx", item_ids.gather(items["item_id"]).alias("item_id"), "domain_idx",
                         names.gather(items["domain_idx"]).alias("domain"), "n_events")
    seqs = (ev.group_by("user_idx", maintain_order=True)
            .agg(pl.col("item_idx").alias("items"), pl.col("domain_idx").alias("domains"),
                 pl.col("timestamp").alias("timestamps"))
            .sort("user_idx"))
    names_of_users = users.select("user_idx", user_ids.gather(users["user_id"]).alias("user_id"))
    seqs = seqs.join(names_of_users, on="user_idx", maintain_order="left").select(
        "user_idx", "user_id", "items", "domains", "timestamps")
    per_user = (ev.group_by("user_idx", "domain_idx").agg(pl.len().alias("s"))
                .group_by("user_idx").agg(pl.col("s").pow(2).sum().alias("ss"), pl.col("s").sum().alias("S"),
                                          pl.len().alias("n_domains")).sort("user_idx"))
    users_t = (seqs.select("user_idx", "user_id", pl.col("items").list.len().alias("length"))
               .join(per_user.select("user_idx", "n_domains"), on="user_idx"))
    delta = float((per_user["ss"] / per_user["S"].pow(2)).mean())
    ev_counts = ev.group_by("domain_idx").agg(pl.len().alias("n"))
    ev_counts = ev_counts.with_columns(names.gather(ev_counts["domain_idx"]).alias("domain"))
    it_counts = items.group_by("domain").agg(pl.len().alias("n"))
    lengths = users_t["length"]
    offsets = items.group_by("domain_idx").agg(pl.col("item_idx").min().alias("lo"), pl.col("item_idx").max().alias("hi")).sort("domain_idx")
    stats = {
        "dataset": cfg.name,
        "users": int(users_t.height),
        "items": int(items.height),
        "events": int(ev.height),
        "domains": domains,
        "items_per_domain": {d: int(_lookup(it_counts, d)) for d in domains},
        "events_per_domain": {d: int(_lookup(ev_counts, d)) for d in domains},
        "item_index_ranges": {domains[r["domain_idx"]]: [int(r["lo"]), int(r["hi"])] for r in offsets.iter_rows(named=True)},
        "mean_length": float(lengths.mean()),
        "median_length": float(lengths.median()),
        "max_length": int(lengths.max()),
        "min_length": int(lengths.min()),
        "delta": delta,
        "ideal_intra_domain_speedup": 1.0 / delta,
        "timestamp_range": [int(ev["timestamp"].min()), int(ev["timestamp"].max())],
        "tie_break": cfg.sequences.tie_break,
        "filter_log": log_rows,
    }
    return SequenceTables(seqs, items, users_t, stats)


def _encode_events(interactions: pl.DataFrame | str | Path, cfg: DatasetConfig,
                   tmp: Path) -> tuple[pl.DataFrame, pl.Series, pl.Series, list[str]]:
    """The events as integer codes in sequence order (see order_events), out of core.

    Returns (events: user_id, item_id, domain as Int32 codes and timestamp, sorted by user, then
    the tie-break; the ids of the user codes and item codes; the sorted domains seen). A code
    is the rank of the id in byte order, the order polars sorts strings in.
    """
    con = duckdb_connection(cfg, tmp)
    try:
        cols = "user_id, item_id, domain, timestamp, ingest_order"
        if isinstance(interactions, pl.DataFrame):
            con.register("src_frame", interactions.select(cols.split(", ")).to_arrow())
            con.execute(f"create view src as select {cols} from src_frame")
        else:
            con.execute(f"create view src as select {cols} from read_parquet({_sql_str(str(interactions))})")
        for what in ("user_id", "item_id", "domain"):
            con.execute(f"""create temp table d_{what} as select {what} as id,
                            (row_number() over (order by {what}) - 1)::INTEGER as code
                            from (select distinct {what} from src)""")
        seen = [r[0] for r in con.execute("select id from d_domain order by code").fetchall()]
        declared = list(cfg.domains)
        order = declared + [d for d in seen if d not in declared] if declared else seen
        con.register("dom_order", pa.table({"id": pa.array(order, pa.string()),
                                            "idx": pa.array(range(len(order)), pa.int32())}))
        keys = "u.code, s.timestamp, " + ("i.code, " if cfg.sequences.tie_break == "item_id" else "") + "s.ingest_order"
        out = tmp / "events.parquet"
        con.execute(f"""copy (select u.code as user_id, i.code as item_id, o.idx as domain, s.timestamp
                              from src s join d_user_id u on s.user_id = u.id join d_item_id i on s.item_id = i.id
                              join dom_order o on s.domain = o.id
                              order by {keys}) to {_sql_str(str(out))} (format parquet)""")
        user_ids = pl.from_arrow(con.sql("select id from d_user_id order by code").to_arrow_table()["id"])
        item_ids = pl.from_arrow(con.sql("select id from d_item_id order by code").to_arrow_table()["id"])
    finally:
        con.close()
    events = pl.read_parquet(out)
    return events, user_ids.cast(pl.String).rename("user_id"), item_ids.cast(pl.String).rename("item_id"), seen


def _lookup(counts: pl.DataFrame, domain: str) -> int:
    row = counts.filter(pl.col("domain") == domain)
    return int(row["n"][0]) if row.height else 0


def explode_sequences(seqs: pl.DataFrame) -> pl.DataFrame:
    """One row per event: user_idx, pos (0-based), item_idx, domain_idx, timestamp."""
    return (seqs.select("user_idx", "items", "domains", "timestamps")
            .explode("items", "domains", "timestamps")
            .rename({"items": "item_idx", "domains": "domain_idx", "timestamps": "timestamp"})
            .with_columns(pos=pl.int_range(pl.len(), dtype=pl.Int64).over("user_idx"))
            .select("user_idx", "pos", "item_idx", "domain_idx", "timestamp"))


def write_sequences(tables: SequenceTables, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tables.sequences.write_parquet(out_dir / "sequences.parquet")
    tables.items.write_parquet(out_dir / "items.parquet")
    tables.users.write_parquet(out_dir / "users.parquet")
    (out_dir / "stats.json").write_text(json.dumps(tables.stats, indent=2) + "\n")


def read_sequences(processed: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(processed / "sequences.parquet"), pl.read_parquet(processed / "items.parquet")
