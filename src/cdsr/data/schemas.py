"""pandera schemas of the data tables, and the derived per-item / per-user frames they share
with the Great Expectations suites (cdsr.data.expectations).

Tables (layouts in cdsr.data.ingest and cdsr.data.sequences):

* ``interactions``: one row per kept raw event (the ingest stage's output).
* ``seq_long``: the sequences exploded to one row per event, sorted by (user_idx, pos).
* ``items``: the item index (item_idx 1..N, contiguous per domain; 0 is padding).
* ``users``: derived here from ``seq_long`` (:func:`user_summary`), one row per user, so the
  per-user constraints (length, time order, filter thresholds) are plain column checks.

Every check has a stable ``name``; the validation report keys are ``<table>.<column>:<name>``
for column checks and ``<table>.<name>`` for table checks, and the GX suites use the same names
so a failure reads the same in both layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa

from cdsr.data.config import DatasetConfig
from cdsr.data.formats import ID_CONTROL_CHARS

# a user needs a validation target, a test target and at least one training event
MIN_SEQUENCE_EVENTS = 3

# Filter steps that remove events of users who stay (as opposed to removing whole users): a
# per-user threshold established earlier in the filter list can be broken by one of these later.
_EVENT_REMOVING_FILTERS = frozenset({"min_item_events", "min_domain_user_events", "trim_last"})

# Per-user thresholds whose guarantee survives to the final table if no event-removing step
# follows them (min_item_events is per item and not re-checked).
_USER_FILTERS = ("min_user_events", "min_user_domains", "min_user_domain_events", "min_domain_user_events")

DUPLICATE_KEY = ["user_id", "item_id", "domain", "timestamp", "rating"]
SEQ_LONG_COLUMNS = ["user_idx", "pos", "item_idx", "domain_idx", "timestamp"]
ITEM_COLUMNS = ["item_idx", "item_id", "domain_idx", "domain"]


# --------------------------------------------------------------------------- helpers


def _non_blank(s: pd.Series) -> pd.Series:
    """True where a string holds a non-whitespace character (nulls pass: not_null reports them)."""
    return s.isna() | (s.astype("str").str.strip().str.len() > 0)


def _no_control_chars(s: pd.Series) -> pd.Series:
    """True where a string holds no C0 control character or DEL (nulls pass: not_null reports them).
    Ingest quarantines such ids; this is the same rule one layer later (defence in depth)."""
    return s.isna() | ~s.astype("str").str.contains(ID_CONTROL_CHARS, regex=True)


def _sorted_view(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows with non-null keys sorted by keys (stable), so per-group diffs are one vector op."""
    return df.dropna(subset=keys).sort_values(keys, kind="stable")


def _back_on(mask: np.ndarray, view: pd.DataFrame, df: pd.DataFrame) -> pd.Series:
    """A boolean result computed on a sorted view, aligned back to ``df``'s rows (others pass)."""
    return pd.Series(mask, index=view.index).reindex(df.index, fill_value=True).astype(bool)


# --------------------------------------------------------------------------- interactions


def interactions_schema(cfg: DatasetConfig, whole_table: bool = True) -> pa.DataFrameSchema:
    """The canonical interactions table of the ingest stage.

    Guards: the column layout and dtypes the later stages read; no nulls except ``rating``;
    non-blank ids without control characters; only declared domains; timestamps inside the configured bounds; 1-based
    source lines (every row traces back to its raw line); a unique raw order (the tie-break for
    equal timestamps); each item in exactly one domain (the cross-domain-items policy ran);
    no exact duplicate events under ``duplicates: drop``; at least one row.

    ``whole_table=False`` leaves out the checks that compare rows with each other (ingest_order
    unique, item_in_one_domain, no_exact_duplicates), for a table validated batch by batch:
    those run over the whole table in DuckDB (cdsr.data.validate), under the same names.
    """
    lo, hi = cfg.ingest.timestamp_bounds()
    ts_checks = []
    if lo is not None or hi is not None:
        ts_checks.append(pa.Check.in_range(lo if lo is not None else np.iinfo(np.int64).min,
                                           hi if hi is not None else np.iinfo(np.int64).max,
                                           name="within_bounds"))
    domain_checks = [pa.Check.isin(list(cfg.domains), name="declared_domain")] if cfg.domains else []
    id_checks = [pa.Check(_non_blank, name="non_empty"), pa.Check(_no_control_chars, name="no_control_chars")]
    table_checks = [pa.Check(lambda df: len(df) > 0, name="at_least_one_row")]
    if whole_table:
        table_checks.append(pa.Check(_item_in_one_domain, name="item_in_one_domain"))
    if whole_table and cfg.ingest.duplicates == "drop":
        table_checks.append(pa.Check(_no_exact_duplicates, name="no_exact_duplicates"))
    return pa.DataFrameSchema(
        {
            "user_id": pa.Column(str, checks=id_checks),
            "item_id": pa.Column(str, checks=id_checks),
            "domain": pa.Column(str, checks=domain_checks),
            "timestamp": pa.Column("int64", checks=ts_checks),
            "rating": pa.Column("float64", nullable=True),
            "source_file": pa.Column(str),
            "source_line": pa.Column("int64", checks=pa.Check.ge(1, name="ge_1")),
            "source_pos": pa.Column("int32", checks=pa.Check.ge(0, name="ge_0")),
            "ingest_order": pa.Column("int64", unique=whole_table),
        },
        checks=table_checks,
        name="interactions",
    )


def _item_in_one_domain(df: pd.DataFrame) -> pd.Series:
    """Rows whose item appears under two or more domains fail (all of that item's rows)."""
    n = df.groupby("item_id", dropna=False, sort=False)["domain"].transform("nunique")
    return n <= 1


def _no_exact_duplicates(df: pd.DataFrame) -> pd.Series:
    """Every row of a group of exact-duplicate events fails (NaN ratings compare equal)."""
    return ~df.duplicated(DUPLICATE_KEY, keep=False)


def item_domains(interactions: pd.DataFrame) -> pd.DataFrame:
    """Derived frame (item_id, n_domains): one row per item, for the GX item-domain check."""
    g = interactions.groupby("item_id", dropna=False, sort=True)["domain"].nunique(dropna=False)
    return g.rename("n_domains").astype("int64").reset_index()


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class UserConstraints:
    """Per-user thresholds that must hold on the final sequences (from the config filters)."""

    min_events: int = MIN_SEQUENCE_EVENTS  # leave-one-out, raised by min_user_events
    min_domains: int | None = None  # min_user_domains
    min_events_every_domain: int | None = None  # min_user_domain_events, domains_required: all
    min_events_present_domain: int | None = None  # min_user_domain_events (present), min_domain_user_events

    def describe(self) -> dict[str, int | None]:
        return {"min_events": self.min_events, "min_domains": self.min_domains,
                "min_events_every_domain": self.min_events_every_domain,
                "min_events_present_domain": self.min_events_present_domain}


def user_constraints(cfg: DatasetConfig) -> UserConstraints:
    """Thresholds of the filter steps whose guarantee must still hold on the final table.

    The sequences stage runs the filters once, in order. A per-user step's guarantee survives
    to the end unless a later step removes events of surviving users (min_item_events,
    min_domain_user_events, trim_last); steps that drop whole users never break it. So e.g.
    ``min_user_domains: 2`` before ``trim_last: 50`` is not re-checked (trimming may cut a
    domain), while a final ``min_user_domain_events: 5`` is.
    """
    steps = cfg.sequences.filters
    min_events = MIN_SEQUENCE_EVENTS
    min_domains = every = present = None
    for i, step in enumerate(steps):
        if step.op not in _USER_FILTERS:
            continue
        if any(later.op in _EVENT_REMOVING_FILTERS for later in steps[i + 1:]):
            continue
        v = step.value
        if step.op == "min_user_events":
            min_events = max(min_events, v)
        elif step.op == "min_user_domains":
            min_domains = max(min_domains or 0, v)
        elif step.op == "min_user_domain_events" and cfg.sequences.domains_required == "all":
            every = max(every or 0, v)
        else:  # min_user_domain_events (present) and min_domain_user_events: domains the user has
            present = max(present or 0, v)
    return UserConstraints(min_events, min_domains, every, present)


def n_domains_of(cfg: DatasetConfig, items: pd.DataFrame) -> int:
    """D: the declared domains (their order defines domain_idx), else the items' domains."""
    if cfg.domains:
        return len(cfg.domains)
    idx = pd.to_numeric(items.get("domain_idx", pd.Series(dtype="int64")), errors="coerce").dropna()
    return int(idx.max()) + 1 if len(idx) else 0


def seq_long_schema(items: pd.DataFrame, n_domains: int) -> pa.DataFrameSchema:
    """The exploded sequences (one row per event).

    Guards: int64 columns without nulls; positions from 0, real items only (item_idx >= 1; 0 is
    padding), domain indices in 0..D-1; rows sorted by (user_idx, pos); timestamps
    non-decreasing along each user's sequence (models read the sequence as time order and the
    leave-one-out split takes the last events as targets); every item_idx exists in the items
    table with the same domain_idx (domain slicing of the item index relies on it).
    """
    item_dom = (items.dropna(subset=["item_idx"]).drop_duplicates("item_idx").set_index("item_idx")["domain_idx"]
                if {"item_idx", "domain_idx"} <= set(items.columns) else pd.Series(dtype="int64"))

    def item_known(df: pd.DataFrame) -> pd.Series:
        return df["item_idx"].isin(item_dom.index)

    def item_domain_matches(df: pd.DataFrame) -> pd.Series:
        mapped = df["item_idx"].map(item_dom)
        return mapped.isna() | (mapped == df["domain_idx"])  # unknown items are item_known's failure

    return pa.DataFrameSchema(
        {
            "user_idx": pa.Column("int64", checks=pa.Check.ge(0, name="ge_0")),
            "pos": pa.Column("int64", checks=pa.Check.ge(0, name="ge_0")),
            "item_idx": pa.Column("int64", checks=pa.Check.ge(1, name="not_padding")),
            "domain_idx": pa.Column("int64", checks=pa.Check.in_range(0, max(n_domains - 1, 0), name="in_range")),
            "timestamp": pa.Column("int64"),
        },
        checks=[
            pa.Check(lambda df: len(df) > 0, name="at_least_one_row"),
            pa.Check(_sorted_by_user_pos, name="sorted_by_user_pos"),
            pa.Check(_time_ordered, name="time_ordered"),
            pa.Check(item_known, name="item_known"),
            pa.Check(item_domain_matches, name="item_domain_matches"),
        ],
        name="seq_long",
    )


def _sorted_by_user_pos(df: pd.DataFrame) -> pd.Series:
    """A row fails if its (user_idx, pos) is not greater than the previous row's."""
    u, p = df["user_idx"], df["pos"]
    pu, pp = u.shift(), p.shift()
    ok = (u > pu) | ((u == pu) & (p > pp))
    # the first row, and rows next to a null key (not_null reports those), pass
    return (ok | u.isna() | p.isna() | pu.isna() | pp.isna()).astype(bool)


def _time_ordered(df: pd.DataFrame) -> pd.Series:
    """An event fails if it is older than the previous event of the same user (by pos)."""
    v = _sorted_view(df, ["user_idx", "pos"])
    u, ts = v["user_idx"].to_numpy(), v["timestamp"].to_numpy()
    back = np.zeros(len(v), dtype=bool)
    if len(v) > 1:
        back[1:] = (u[1:] == u[:-1]) & (ts[1:] < ts[:-1])
    return _back_on(~back, v, df)


def previous_timestamp(seq_long: pd.DataFrame) -> pd.Series:
    """Derived column: timestamp of the same user's previous event (by pos); NaN for a first event.

    Lets GX check time order row by row as a column pair (timestamp >= previous_timestamp).
    """
    v = _sorted_view(seq_long[["user_idx", "pos", "timestamp"]], ["user_idx", "pos", "timestamp"])
    prev = v["timestamp"].shift().where(v["user_idx"].eq(v["user_idx"].shift()))
    return prev.reindex(seq_long.index)


def items_schema(cfg: DatasetConfig, n_domains: int) -> pa.DataFrameSchema:
    """The item index.

    Guards: item_idx is exactly 1..N (0 is reserved for padding, no gaps: embedding tables are
    sized N+1); unique item ids; domain indices in 0..D-1 and non-decreasing along item_idx (so
    domain d's items are one slice, which per-domain scoring relies on); domain names declared
    and consistent with domain_idx (declared order when declared, else one-to-one).
    """
    domain_checks = [pa.Check.isin(list(cfg.domains), name="declared_domain")] if cfg.domains else []
    declared = list(cfg.domains)

    def domain_name_matches_index(df: pd.DataFrame) -> pd.Series:
        if declared:
            names = pd.Series(declared, index=range(len(declared)))
            return df["domain_idx"].map(names).eq(df["domain"]).fillna(False).astype(bool)
        per_idx = df.groupby("domain_idx", dropna=False)["domain"].transform("nunique")
        per_name = df.groupby("domain", dropna=False)["domain_idx"].transform("nunique")
        return (per_idx <= 1) & (per_name <= 1)

    return pa.DataFrameSchema(
        {
            "item_idx": pa.Column("int64", checks=pa.Check.ge(1, name="not_padding"), unique=True),
            "item_id": pa.Column(str, checks=pa.Check(_non_blank, name="non_empty"), unique=True),
            "domain_idx": pa.Column("int64", checks=pa.Check.in_range(0, max(n_domains - 1, 0), name="in_range")),
            "domain": pa.Column(str, checks=domain_checks),
        },
        checks=[
            pa.Check(lambda df: len(df) > 0, name="at_least_one_row"),
            pa.Check(_item_idx_contiguous, name="item_idx_contiguous"),
            pa.Check(_domain_blocks, name="domain_contiguous"),
            pa.Check(domain_name_matches_index, name="domain_name_matches_index"),
        ],
        name="items",
    )


def _item_idx_contiguous(df: pd.DataFrame) -> pd.Series:
    """In item_idx order the k-th item (0-based) must have item_idx k+1: no gap, no offset."""
    v = df.sort_values("item_idx", kind="stable")
    ok = v["item_idx"].to_numpy() == np.arange(1, len(v) + 1)
    return _back_on(ok, v, df)


def _domain_blocks(df: pd.DataFrame) -> pd.Series:
    """In item_idx order domain_idx never decreases, so every domain is one contiguous slice."""
    v = _sorted_view(df, ["item_idx"])
    d = v["domain_idx"].to_numpy()
    ok = np.ones(len(v), dtype=bool)
    if len(v) > 1:
        ok[1:] = ~(d[1:] < d[:-1])
    return _back_on(ok, v, df)


def user_summary(seq_long: pd.DataFrame, n_domains: int) -> pd.DataFrame:
    """Derived frame, one row per user of ``seq_long``.

    Columns: user_idx, n_events, n_domains (domains with events), min_domain_events (fewest
    events in a domain the user has), min_domain_events_all (fewest over all D domains, 0 when
    one is missing), time_ordered, pos_contiguous (pos is 0..n_events-1 in row order).
    Rows with a null key are left out (the seq_long schema reports them).
    """
    v = _sorted_view(seq_long[SEQ_LONG_COLUMNS], SEQ_LONG_COLUMNS[:2] + ["domain_idx", "timestamp"])
    v = v.sort_values(["user_idx", "pos"], kind="stable")
    u, ts = v["user_idx"].to_numpy(), v["timestamp"].to_numpy()
    back = np.zeros(len(v), dtype=bool)
    if len(v) > 1:
        back[1:] = (u[1:] == u[:-1]) & (ts[1:] < ts[:-1])
    g = v.groupby("user_idx", sort=True)
    pos_bad = v["pos"].to_numpy() != g.cumcount().to_numpy()
    counts = v.groupby(["user_idx", "domain_idx"], sort=True).size().unstack(fill_value=0)
    every = counts.reindex(columns=range(n_domains), fill_value=0) if n_domains else counts
    out = pd.DataFrame({
        "n_events": g.size().astype("int64"),
        "n_domains": (counts > 0).sum(axis=1).astype("int64"),
        "min_domain_events": counts.where(counts > 0).min(axis=1).fillna(0).astype("int64"),
        "min_domain_events_all": every.min(axis=1).astype("int64") if every.shape[1] else 0,
        "time_ordered": ~pd.Series(back, index=v["user_idx"]).groupby(level=0).any(),
        "pos_contiguous": ~pd.Series(pos_bad, index=v["user_idx"]).groupby(level=0).any(),
    })
    out.index.name = "user_idx"
    return out.reset_index().astype({"user_idx": "int64", "time_ordered": bool, "pos_contiguous": bool})


def users_schema(c: UserConstraints) -> pa.DataFrameSchema:
    """The per-user summary (:func:`user_summary`).

    Guards: every user has >= 3 events (leave-one-out needs a training, a validation and a
    test event) and the thresholds of the config filters that must hold on the final table
    (:func:`user_constraints`); each sequence is time-ordered with positions 0..len-1.
    """
    n_events = [pa.Check.ge(MIN_SEQUENCE_EVENTS, name="leave_one_out_min_events")]
    if c.min_events > MIN_SEQUENCE_EVENTS:
        n_events.append(pa.Check.ge(c.min_events, name="min_user_events"))
    cols = {
        "user_idx": pa.Column("int64", unique=True),
        "n_events": pa.Column("int64", checks=n_events),
        "n_domains": pa.Column("int64", checks=(
            [pa.Check.ge(c.min_domains, name="min_user_domains")] if c.min_domains is not None else [])),
        "min_domain_events": pa.Column("int64", checks=(
            [pa.Check.ge(c.min_events_present_domain, name="min_user_domain_events")]
            if c.min_events_present_domain is not None else [])),
        "min_domain_events_all": pa.Column("int64", checks=(
            [pa.Check.ge(c.min_events_every_domain, name="min_user_domain_events")]
            if c.min_events_every_domain is not None else [])),
        "time_ordered": pa.Column(bool, checks=pa.Check.eq(True, name="time_ordered")),
        "pos_contiguous": pa.Column(bool, checks=pa.Check.eq(True, name="pos_contiguous")),
    }
    return pa.DataFrameSchema(cols, name="users")
