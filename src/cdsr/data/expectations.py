"""Great Expectations suites of the data tables, run in a file-backed context for Data Docs.

GX expresses column-level expectations naturally, so the cross-row constraints run on derived
frames built by cdsr.data.schemas (one row per item / per user); every expectation carries the
same check name as its pandera counterpart in ``meta["check"]`` and a note (shown in Data Docs)
saying what it guards.

:func:`run_suites` builds one temporary context per call: a pandas datasource, one dataframe
asset + whole-dataframe batch definition + suite + ValidationDefinition + Checkpoint per table,
runs them, then builds Data Docs once (what UpdateDataDocsAction does per checkpoint, but one
build for all tables) and copies the static site to ``docs_dir``.

The Data Docs are part of a DVC output (the stages' validation folders), so two runs on the same
data write the same bytes: every checkpoint runs under one fixed run id (:data:`RUN_NAME` at
:data:`RUN_TIME`, the Unix epoch, also the batches' load time; when a validation really ran is
in the stage's timing file, cdsr.data.timing), the site lists suites and results in sorted
order rather than the file system's, and :func:`_normalise_docs` renumbers the random ids GX
writes into the pages and drops the render time from the logo's URL.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.store import TupleFilesystemStoreBackend
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation import Expectation

import cdsr  # noqa: F401  (offline env vars before great_expectations is imported)
from cdsr.data.config import DatasetConfig
from cdsr.data.formats import ID_CONTROL_CHARS
from cdsr.data.schemas import MIN_SEQUENCE_EVENTS, UserConstraints

INTERACTION_TYPES = {
    "user_id": "str", "item_id": "str", "domain": "str", "timestamp": "int64", "rating": "float64",
    "source_file": "str", "source_line": "int64", "source_pos": "int32", "ingest_order": "int64",
}
SEQ_LONG_TYPES = {"user_idx": "int64", "pos": "int64", "item_idx": "int64", "domain_idx": "int64", "timestamp": "int64"}
ITEM_TYPES = {"item_idx": "int64", "item_id": "str", "domain_idx": "int64", "domain": "str"}

# the run id of every checkpoint (GX's default is the wall clock, which would change the pages,
# their paths and the run/validation times they show on every run)
RUN_NAME = "cdsr"
RUN_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass
class GxTable:
    """One frame to validate: a dataframe asset named ``asset`` with its expectations."""

    asset: str
    frame: pd.DataFrame
    expectations: list[Expectation] = field(default_factory=list)


def _x(cls: type[Expectation], check: str, note: str, **kwargs: Any) -> Expectation:
    """An expectation tagged with its check name (report key) and a Data Docs note."""
    return cls(meta={"check": check}, notes=note, **kwargs)


def _types_and_nulls(types: dict[str, str], nullable: tuple[str, ...] = ()) -> list[Expectation]:
    out: list[Expectation] = []
    for col, t in types.items():
        out.append(_x(gxe.ExpectColumnValuesToBeOfType, f"{col}:dtype", f"{col} has dtype {t}.", column=col, type_=t))
        if col not in nullable:
            out.append(_x(gxe.ExpectColumnValuesToNotBeNull, f"{col}:not_null", f"{col} is never null.", column=col))
    return out


def _at_least_one_row() -> Expectation:
    return _x(gxe.ExpectTableRowCountToBeBetween, "at_least_one_row", "The table is not empty.", min_value=1)


# --------------------------------------------------------------------------- interactions


def interactions_expectations(cfg: DatasetConfig) -> list[Expectation]:
    """Column-level expectations of the canonical interactions table (see schemas.interactions_schema)."""
    ex = [_at_least_one_row()] + _types_and_nulls(INTERACTION_TYPES, nullable=("rating",))
    for col in ("user_id", "item_id"):
        ex.append(_x(gxe.ExpectColumnValuesToNotMatchRegex, f"{col}:non_empty",
                     f"{col} is not empty or blank (ids are trimmed at ingest).", column=col, regex=r"^\s*$"))
        ex.append(_x(gxe.ExpectColumnValuesToNotMatchRegex, f"{col}:no_control_chars",
                     f"{col} holds no control character (NUL, tab, DEL...): such an id prints like another one.",
                     column=col, regex=ID_CONTROL_CHARS))
    if cfg.domains:
        ex.append(_x(gxe.ExpectColumnValuesToBeInSet, "domain:declared_domain",
                     "Only the domains declared in params.yaml.", column="domain", value_set=list(cfg.domains)))
    lo, hi = cfg.ingest.timestamp_bounds()
    if lo is not None or hi is not None:
        ex.append(_x(gxe.ExpectColumnValuesToBeBetween, "timestamp:within_bounds",
                     f"Timestamps (unix s) within the configured bounds [{lo}, {hi}].",
                     column="timestamp", min_value=lo, max_value=hi))
    ex += [
        _x(gxe.ExpectColumnValuesToBeBetween, "source_line:ge_1", "Source lines are 1-based (traceable to the raw file).",
           column="source_line", min_value=1),
        _x(gxe.ExpectColumnValuesToBeBetween, "source_pos:ge_0", "Event positions inside a raw line are >= 0.",
           column="source_pos", min_value=0),
        _x(gxe.ExpectColumnValuesToBeUnique, "ingest_order:unique",
           "The raw order is unique: it is the tie-break of events with equal timestamps.", column="ingest_order"),
    ]
    if cfg.ingest.duplicates == "drop":
        ex.append(_x(gxe.ExpectCompoundColumnsToBeUnique, "no_exact_duplicates",
                     "duplicates: drop ran: no two events share user, item, domain, timestamp and rating.",
                     column_list=["user_id", "item_id", "domain", "timestamp", "rating"]))
    return ex


def item_domain_expectations() -> list[Expectation]:
    """On the per-item frame (item_id, n_domains): the cross-domain-items policy ran."""
    return [_x(gxe.ExpectColumnValuesToBeBetween, "item_in_one_domain",
               "Every item belongs to exactly one domain (one row per item, n_domains = 1).",
               column="n_domains", min_value=1, max_value=1)]


# --------------------------------------------------------------------------- sequences


def seq_long_expectations(n_domains: int) -> list[Expectation]:
    """On seq_long plus derived columns ``item_domain_idx`` (the items table's domain of the
    event's item_idx) and ``previous_timestamp`` (the same user's previous event's timestamp)."""
    return [_at_least_one_row()] + _types_and_nulls(SEQ_LONG_TYPES) + [
        _x(gxe.ExpectColumnValuesToBeBetween, "pos:ge_0", "Positions are 0-based.", column="pos", min_value=0),
        _x(gxe.ExpectColumnValuesToBeBetween, "item_idx:not_padding", "Events hold real items (0 is padding).",
           column="item_idx", min_value=1),
        _x(gxe.ExpectColumnValuesToBeBetween, "domain_idx:in_range", f"Domain indices in 0..{n_domains - 1}.",
           column="domain_idx", min_value=0, max_value=max(n_domains - 1, 0)),
        _x(gxe.ExpectColumnValuesToBeIncreasing, "user_idx:sorted", "Rows are grouped by user, in user_idx order.",
           column="user_idx"),
        _x(gxe.ExpectColumnPairValuesAToBeGreaterThanB, "time_ordered",
           "Timestamps never decrease along a user's sequence (timestamp >= the previous event's).",
           column_A="timestamp", column_B="previous_timestamp", or_equal=True,
           ignore_row_if="either_value_is_missing"),
        _x(gxe.ExpectColumnValuesToNotBeNull, "item_known",
           "Every event's item_idx exists in the items table (derived column item_domain_idx).",
           column="item_domain_idx"),
        _x(gxe.ExpectColumnPairValuesToBeEqual, "item_domain_matches",
           "An event's domain_idx equals its item's domain_idx in the items table.",
           column_A="domain_idx", column_B="item_domain_idx", ignore_row_if="either_value_is_missing"),
    ]


def items_expectations(cfg: DatasetConfig, n_items: int, n_domains: int) -> list[Expectation]:
    """On the items table sorted by item_idx."""
    ex = [_at_least_one_row()] + _types_and_nulls(ITEM_TYPES) + [
        _x(gxe.ExpectColumnValuesToBeUnique, "item_idx:unique", "One row per item index.", column="item_idx"),
        _x(gxe.ExpectColumnValuesToBeUnique, "item_id:unique", "One index per item id.", column="item_id"),
        _x(gxe.ExpectColumnValuesToBeBetween, "item_idx_contiguous",
           f"item_idx in 1..N (N = {n_items} rows; unique, so exactly 1..N with no gaps; 0 is padding).",
           column="item_idx", min_value=1, max_value=max(n_items, 1)),
        _x(gxe.ExpectColumnValuesToBeBetween, "domain_idx:in_range", f"Domain indices in 0..{n_domains - 1}.",
           column="domain_idx", min_value=0, max_value=max(n_domains - 1, 0)),
        _x(gxe.ExpectColumnValuesToBeIncreasing, "domain_contiguous",
           "In item_idx order domain_idx never decreases: each domain is one slice of the index.",
           column="domain_idx"),
    ]
    if cfg.domains:
        ex.append(_x(gxe.ExpectColumnValuesToBeInSet, "domain:declared_domain", "Only declared domains.",
                     column="domain", value_set=list(cfg.domains)))
    return ex


def users_expectations(c: UserConstraints) -> list[Expectation]:
    """On the per-user summary (schemas.user_summary)."""
    ex = [
        _x(gxe.ExpectColumnValuesToBeUnique, "user_idx:unique", "One summary row per user.", column="user_idx"),
        _x(gxe.ExpectColumnValuesToBeBetween, "leave_one_out_min_events",
           f"Every user has >= {MIN_SEQUENCE_EVENTS} events (train, validation and test targets).",
           column="n_events", min_value=MIN_SEQUENCE_EVENTS),
        _x(gxe.ExpectColumnValuesToBeInSet, "time_ordered", "Timestamps never decrease along a sequence.",
           column="time_ordered", value_set=[True]),
        _x(gxe.ExpectColumnValuesToBeInSet, "pos_contiguous", "Positions are 0..len-1 in row order.",
           column="pos_contiguous", value_set=[True]),
    ]
    if c.min_events > MIN_SEQUENCE_EVENTS:
        ex.append(_x(gxe.ExpectColumnValuesToBeBetween, "min_user_events",
                     f"Every user has >= {c.min_events} events (filter min_user_events).",
                     column="n_events", min_value=c.min_events))
    if c.min_domains is not None:
        ex.append(_x(gxe.ExpectColumnValuesToBeBetween, "min_user_domains",
                     f"Every user has events in >= {c.min_domains} domains (filter min_user_domains).",
                     column="n_domains", min_value=c.min_domains))
    if c.min_events_every_domain is not None:
        ex.append(_x(gxe.ExpectColumnValuesToBeBetween, "min_user_domain_events",
                     f"Every user has >= {c.min_events_every_domain} events in every domain "
                     "(filter min_user_domain_events, domains_required: all).",
                     column="min_domain_events_all", min_value=c.min_events_every_domain))
    if c.min_events_present_domain is not None:
        ex.append(_x(gxe.ExpectColumnValuesToBeBetween, "min_user_domain_events",
                     f"Every domain a user has holds >= {c.min_events_present_domain} of their events "
                     "(filter min_user_domain_events, domains_required: present / min_domain_user_events).",
                     column="min_domain_events", min_value=c.min_events_present_domain))
    return ex


# --------------------------------------------------------------------------- running


def run_suites(tables: list[GxTable], docs_dir: Path, result_format: str = "SUMMARY") -> dict[str, dict[str, Any]]:
    """Validate every table in one temporary file-backed context; copy Data Docs to ``docs_dir``.

    Returns ``{"<asset>.<check>": {"expectation", "success", "unexpected_count",
    "partial_unexpected", ["error"]}}``. Always writes the docs (also when expectations fail).
    """
    with SuiteRunner(result_format) as runner:
        for t in tables:
            runner.run(t.asset, t.frame, t.expectations)
        return runner.finish(docs_dir)


class SuiteRunner:
    """One temporary file-backed GX context: tables are validated whole or batch by batch
    (``run`` called once per batch of the same asset), Data Docs are built once by ``finish``.

    Batches of one asset run the same suite; their results add up (unexpected counts, element
    counts, the first unexpected values), and the stored validation result of the asset (what
    Data Docs show) is rewritten with the totals. ``finish(overrides=...)`` replaces the result of
    a check with one computed over the whole table elsewhere (a uniqueness that spans batches).
    """

    def __init__(self, result_format: str = "SUMMARY") -> None:
        self.result_format = result_format
        self._tmp = tempfile.TemporaryDirectory(prefix="cdsr-gx-")
        self.ctx = gx.get_context(mode="file", project_root_dir=self._tmp.name)
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        for name, site in (self.ctx.variables.data_docs_sites or {}).items():  # index in sorted order
            site["store_backend"] = {**site["store_backend"], "module_name": __name__,
                                     "class_name": SortedTupleFilesystemStoreBackend.__name__}
            self.ctx.update_data_docs_site(name, site)
        self.ds = self.ctx.data_sources.add_pandas("cdsr")
        self.run_id = RunIdentifier(run_name=RUN_NAME, run_time=RUN_TIME)
        self.out: dict[str, dict[str, Any]] = {}
        self._assets: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def run(self, asset: str, frame: pd.DataFrame, expectations: list[Expectation]) -> None:
        """Validate ``frame`` (the whole table, or its next batch) against the asset's suite."""
        st = self._assets.get(asset)
        if st is None:
            a = self.ds.add_dataframe_asset(asset)
            batch = a.add_batch_definition_whole_dataframe("whole_table")
            suite = self.ctx.suites.add(gx.ExpectationSuite(name=asset, expectations=list(expectations)))
            vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=asset, data=batch, suite=suite))
            # results go to the context's validation store; the docs are built once in finish
            # (each site build recompiles GX's templates, ~0.7 s, so not one build per table)
            cp = self.ctx.checkpoints.add(gx.Checkpoint(name=asset, validation_definitions=[vd], actions=[],
                                                        result_format={"result_format": self.result_format}))
            st = self._assets[asset] = {"cp": cp, "batches": 0, "keys": {}, "counts": {}, "stored": []}
        res = st["cp"].run(batch_parameters={"dataframe": frame}, run_id=self.run_id)
        st["batches"] += 1
        for result_id, vr in res.run_results.items():
            markers = vr.meta.get("batch_markers") or {}
            if "ge_load_time" in markers:  # when the frame was loaded: fixed like the run time
                markers["ge_load_time"] = result_id.run_id.to_tuple()[1]
                self.ctx.validation_results_store.set(result_id, vr)
            st["stored"] = [(result_id, vr)]
            local: set[str] = set()
            for r in vr.results:
                cfg = r.expectation_config
                key = f"{asset}.{(cfg.meta or {}).get('check', cfg.type)}"
                while key in local:  # two expectations with one check name: keep both
                    key += "'"
                local.add(key)
                info = r.exception_info or {}
                entry: dict[str, Any] = {
                    "expectation": cfg.type,
                    "success": bool(r.success),
                    "unexpected_count": r.result.get("unexpected_count"),
                    "partial_unexpected": [_plain(v) for v in (r.result.get("partial_unexpected_list") or [])[:5]],
                }
                if info.get("raised_exception"):
                    entry["error"] = str(info.get("exception_message"))
                counts = st["counts"].setdefault(key, {"element_count": 0, "missing_count": 0})
                for c in counts:
                    counts[c] += int(r.result.get(c) or 0)
                prev = self.out.get(key)
                self.out[key] = entry if prev is None else _add_up(prev, entry)

    def finish(self, docs_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Apply ``overrides``, store the batch totals for Data Docs, build them into ``docs_dir``."""
        for key, entry in (overrides or {}).items():
            self.out[key] = {**self.out.get(key, {}), **entry}
        for asset, st in self._assets.items():
            if st["batches"] > 1 or any(k.startswith(asset + ".") for k in (overrides or {})):
                for result_id, vr in st["stored"]:
                    self._store_totals(asset, st, result_id, vr)
        self.ctx.build_data_docs()  # every stored suite and validation result, plus the index
        site = Path(self._tmp.name) / "gx" / "uncommitted" / "data_docs" / "local_site"
        if docs_dir.exists():
            shutil.rmtree(docs_dir)
        shutil.copytree(site, docs_dir)
        _normalise_docs(docs_dir)
        return self.out

    def _store_totals(self, asset: str, st: dict[str, Any], result_id: Any, vr: Any) -> None:
        """Rewrite the last batch's stored result with the totals over all batches."""
        local: set[str] = set()
        ok = 0
        for r in vr.results:
            cfg = r.expectation_config
            key = f"{asset}.{(cfg.meta or {}).get('check', cfg.type)}"
            while key in local:
                key += "'"
            local.add(key)
            e = self.out[key]
            r.success = e["success"]
            ok += bool(e["success"])
            res = r.result
            if res is None:
                continue
            n = st["counts"][key]["element_count"]
            res["element_count"] = n
            if "missing_count" in res:
                res["missing_count"] = st["counts"][key]["missing_count"]
                res["missing_percent"] = 100.0 * res["missing_count"] / n if n else None
            if "unexpected_count" in res:
                u = e["unexpected_count"]
                res["unexpected_count"] = u
                res["partial_unexpected_list"] = list(e["partial_unexpected"])
                nonmissing = n - int(res.get("missing_count") or 0)
                for k, base in (("unexpected_percent", nonmissing), ("unexpected_percent_total", n),
                                ("unexpected_percent_nonmissing", nonmissing)):
                    if k in res:
                        res[k] = 100.0 * u / base if u is not None and base else 0.0
                res.pop("partial_unexpected_counts", None)
                res.pop("partial_unexpected_index_list", None)
        vr.success = ok == len(vr.results)
        if vr.statistics:
            vr.statistics["successful_expectations"] = ok
            vr.statistics["unsuccessful_expectations"] = len(vr.results) - ok
            vr.statistics["success_percent"] = 100.0 * ok / len(vr.results) if vr.results else None
        self.ctx.validation_results_store.set(result_id, vr)


def _add_up(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The result of one check over two batches."""
    ua, ub = a["unexpected_count"], b["unexpected_count"]
    out = {**a, "success": a["success"] and b["success"],
           "unexpected_count": ua + ub if ua is not None and ub is not None else (ua if ub is None else ub),
           "partial_unexpected": (a["partial_unexpected"] + b["partial_unexpected"])[:5]}
    if "error" not in a and "error" in b:
        out["error"] = b["error"]
    return out


class SortedTupleFilesystemStoreBackend(TupleFilesystemStoreBackend):
    """GX's file store, listing its keys sorted: Data Docs' index lists suites and validation
    results in this order, which for the stock backend is the file system's (os.walk)."""

    def list_keys(self, prefix: tuple = ()) -> list[tuple]:
        return sorted(super().list_keys(prefix))


# the random ids GX writes into the pages: HTML element ids of collapsible blocks (a uuid4 per
# render) and the context's id in the logo's URL (with the render time), nothing taken from data
_RANDOM_ID = re.compile(r"(collapse-body-|dataContextId=)([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_RENDER_TIME = re.compile(r"(logo-long\.png)\?d=\d{8}T\d{6}\.\d{6}Z(&?)")  # ...png?d=<now>&dataContextId=...


def _normalise_docs(docs_dir: Path) -> None:
    """Make the Data Docs pages a function of the data alone: the random ids GX writes into
    them are renumbered in order of first appearance over the pages in sorted path order (one
    id shared by several pages stays one id), and the render time in the logo's URL is dropped."""
    ids: dict[str, str] = {}

    def renumber(m: re.Match[str]) -> str:
        return m.group(1) + ids.setdefault(m.group(2), f"00000000-0000-4000-8000-{len(ids):012x}")

    for page in sorted(docs_dir.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        new = _RANDOM_ID.sub(renumber, _RENDER_TIME.sub(lambda m: m.group(1) + ("?" if m.group(2) else ""), text))
        if new != text:
            page.write_text(new, encoding="utf-8")


def _plain(v: Any) -> Any:
    """JSON-friendly example values (numpy scalars, NaN)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
