"""Typed configuration of one dataset: the ``datasets.<name>`` section of params.yaml."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cdsr.config import ConfigError, check_dataset_name, from_dict, load_params


@dataclass(frozen=True)
class SourceConfig:
    """One group of raw files of a single format.

    ``path`` is a file or a glob, relative to the working directory (the project root).
    The domain of a file's rows is, in order of precedence: a domain column of the format,
    ``domain`` (fixed), the ``domain_regex`` group ``domain`` applied to the file name, or the
    file stem without compression/format extensions.
    """

    format: str
    path: str
    domain: str | None = None
    domain_regex: str | None = None
    # interaction-csv: canonical field -> header name (user, item, timestamp, rating?, domain?)
    columns: dict[str, str] = field(default_factory=dict)
    # amazon-2023-jsonl: which field holds the item (parent_asin, falling back to asin)
    item_field: Literal["parent_asin", "asin"] = "parent_asin"
    # abxi-benchmark: JSON maps of the release, and domain names by domain index
    item_map: str | None = None
    user_map: str | None = None
    domain_names: list[str] = field(default_factory=list)
    # seconds (s) or milliseconds (ms) since the epoch; unset: the format's own unit (ms for the
    # Amazon 2023 formats, formats.TIMESTAMP_MS; s for the others). A value given wins.
    timestamp_unit: Literal["s", "ms"] | None = None
    delimiter: str = ","

    def __post_init__(self) -> None:
        """Strings that reach a parser are checked here, so a bad one is a ConfigError naming the
        key rather than a traceback in the middle of an ingest."""
        where = f"source {self.path}"
        if not self.delimiter or any(c in self.delimiter for c in "\r\n"):
            raise ConfigError(f"{where}: delimiter {self.delimiter!r} must be non-empty, without line breaks")
        if self.domain_regex is not None:
            try:
                groups = re.compile(self.domain_regex).groupindex
            except re.error as exc:
                raise ConfigError(f"{where}: domain_regex {self.domain_regex!r} is not a regex: {exc}") from exc
            if "domain" not in groups:
                raise ConfigError(f"{where}: domain_regex {self.domain_regex!r} has no (?P<domain>...) group")


# what DuckDB's memory_limit accepts (a number with a unit, or a share of RAM)
_MEMORY_LIMIT = re.compile(r"\s*\d+(\.\d+)?\s*(%|[KMGT]i?B|B|bytes)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class IngestConfig:
    """Row-level policies of the ingest stage."""

    # exact-duplicate events (same user, item, domain, timestamp, rating): drop all but the first, or keep
    duplicates: Literal["drop", "keep"] = "drop"
    # items seen in two or more domains: drop all their rows (ABXI) or keep the first domain seen
    cross_domain_items: Literal["drop", "keep_first"] = "drop"
    # accepted timestamp range (inclusive, ISO dates or unix seconds); None disables the bound
    min_timestamp: str | int | None = "1995-01-01"
    max_timestamp: str | int | None = "2030-12-31"
    # bytes read per streamed chunk: bounds memory independently of the file size
    chunk_bytes: int = 16 * 1024 * 1024
    # DuckDB memory limit for the whole-file duplicate / cross-domain pass (spills beyond it)
    memory_limit: str = "512MB"

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ConfigError(f"ingest.chunk_bytes: {self.chunk_bytes} must be a positive number of bytes")
        if not _MEMORY_LIMIT.fullmatch(self.memory_limit):
            raise ConfigError(f"ingest.memory_limit: {self.memory_limit!r} is not a size like '512MB', '2GiB' or '50%'")

    def timestamp_bounds(self) -> tuple[int | None, int | None]:
        return _to_unix(self.min_timestamp), _to_unix(self.max_timestamp, end_of_day=True)


def _to_unix(v: str | int | None, end_of_day: bool = False) -> int | None:
    if v is None or isinstance(v, int):
        return v
    try:
        d = dt.datetime.fromisoformat(v)
    except ValueError as exc:
        raise ConfigError(f"timestamp bound {v!r} is not an ISO date or an integer") from exc
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    if end_of_day and len(v) == 10:
        d = d + dt.timedelta(days=1, seconds=-1)
    return int(d.timestamp())


FILTER_OPS = (
    "min_user_domains",  # keep users with events in >= k domains
    "min_item_events",  # keep items with >= n events (over all domains)
    "min_user_events",  # keep users with >= n events in total
    "min_user_domain_events",  # keep users with >= n events in every domain they must have (see domains_required)
    "min_domain_user_events",  # drop a user's events in a domain where they have < n events
    "trim_last",  # keep each user's last n events
)


@dataclass(frozen=True)
class FilterStep:
    op: str
    value: int


@dataclass(frozen=True)
class SequencesConfig:
    """The sequences stage: filters applied in the listed order, then re-indexing."""

    filters: list[FilterStep] = field(default_factory=list)
    # min_user_domain_events applies to every declared domain ("all") or only those a user has
    domains_required: Literal["all", "present"] = "all"
    # order of events with equal timestamps: raw order (declared file order, then line, then
    # position in the line), or item id
    tie_break: Literal["source_order", "item_id"] = "source_order"
    # the build as of this time (ISO date, its end of day, or unix seconds): events after it are
    # left out before the filters, so moving it forward is a data refresh (new users, items and
    # events of known users arrive; a new data version). None: every event
    as_of: str | int | None = None

    def __post_init__(self) -> None:
        self.cutoff()  # a bad value fails when the configuration is read

    def cutoff(self) -> int | None:
        """``as_of`` in unix seconds (None: no cut-off)."""
        return _to_unix(self.as_of, end_of_day=True)


@dataclass(frozen=True)
class SplitConfig:
    """The split scheme and the fixed sampled negatives of the sampled protocols
    (docs/protocols.md "Data split").

    ``scheme``: ``leave-one-out`` (per user: last event test, second last validation) or
    ``timestamp`` (global cut-offs: events at or after ``test_from`` are test targets, events in
    [``valid_from``, ``test_from``) validation targets, training only on events before
    ``valid_from``). A cut-off is an integer (unix time in ``cutoff_unit``, ms by default as the
    Amazon Reviews 2023 release publishes its cut-offs) or an ISO date / date-time string (UTC
    unless it names a zone).
    """

    # protocol name -> number of negatives; draws are nested (sampled-100 is the first 100 of
    # sampled-999's uniformly ordered draw), so one seed fixes both
    negatives: dict[str, int] = field(default_factory=lambda: {"sampled-999": 999, "sampled-100": 100})
    seed: int = 42
    scheme: Literal["leave-one-out", "timestamp"] = "leave-one-out"
    valid_from: int | str | None = None
    test_from: int | str | None = None
    cutoff_unit: Literal["s", "ms"] = "ms"

    def __post_init__(self) -> None:
        given = [k for k in ("valid_from", "test_from") if getattr(self, k) is not None]
        if self.scheme == "leave-one-out":
            if given:  # silently ignoring a cut-off would run another protocol than the one asked for
                raise ConfigError(f"split.{given[0]}: only the 'timestamp' scheme takes cut-offs; "
                                  f"add 'scheme: timestamp' or remove it")
            return
        if len(given) < 2:
            raise ConfigError("split: the 'timestamp' scheme needs both valid_from and test_from "
                              "(e.g. the Amazon Reviews 2023 release's 1628643414042 and 1658002729837, ms)")
        v, t = self.cutoffs()
        if not v < t:
            raise ConfigError(f"split: valid_from {self.valid_from!r} must come before test_from {self.test_from!r} "
                              f"(as unix seconds: {v} >= {t})")

    def cutoffs(self) -> tuple[int, int]:
        """(valid_from, test_from) as unix seconds, the resolution of the stored timestamps: an
        integer in ms is floored to its second (an event stored at that second counts as at or
        after the cut-off; see docs/protocols.md "Data split")."""
        out = []
        for key in ("valid_from", "test_from"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ConfigError(f"split.{key}: expected an integer or an ISO date, got {v!r}")
            if isinstance(v, int):
                out.append(v // 1000 if self.cutoff_unit == "ms" else v)
            else:
                try:
                    out.append(_to_unix(v))
                except ConfigError as exc:
                    raise ConfigError(f"split.{key}: {exc}") from exc
        return out[0], out[1]


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic generator (see cdsr.data.synthetic)."""

    users: int = 2000
    domains: list[str] = field(default_factory=lambda: ["Books", "Movies_and_TV", "CDs_and_Vinyl"])
    items_per_domain: int = 1600
    topics: int = 20
    events_per_user: list[int] = field(default_factory=lambda: [24, 48])
    domain_skip_prob: float = 0.25  # chance a user skips a domain (users overlap but not fully)
    shared_weight: float = 0.7  # weight of the shared (cross-domain) topic preference
    stickiness: float = 0.6  # chance the next event keeps the previous event's topic (any domain)
    zipf_a: float = 1.1
    noise: float = 0.05  # chance an event is a uniformly random item
    malformed_rows: int = 12  # corrupt rows written to the raw files (they must land in quarantine)
    duplicate_rows: int = 20  # exact duplicates written to the raw files
    seed: int = 7
    start: str = "2015-01-01"
    mean_gap_days: float = 9.0


@dataclass(frozen=True)
class FetchSpec:
    """Which files of an official Amazon release `cdsr data fetch` downloads for a dataset, into
    ``<root>/<dataset>/raw/`` (cdsr.data.fetch; the releases are in cdsr.data.catalogue)."""

    release: str
    categories: list[str]
    files: list[str]

    def __post_init__(self) -> None:
        from cdsr.data.catalogue import CatalogueError, paths

        try:
            paths(self.release, self.categories, self.files)
        except CatalogueError as exc:
            raise ConfigError(f"fetch: {exc}") from exc


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    sources: list[SourceConfig]
    description: str = ""
    # declared domain set, in index order; empty = the sorted set of domains seen
    domains: list[str] = field(default_factory=list)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    generator: SyntheticConfig | None = None
    # downloadable from an official release (`cdsr data fetch NAME`); None: raw files are local
    fetch: FetchSpec | None = None

    def dir(self, root: str | Path = "data") -> Path:
        return Path(root) / self.name


def _parse_filters(raw: Any, where: str) -> list[dict[str, Any]]:
    """Filters are written as a list of one-key mappings, e.g. ``- trim_last: 50``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of '- op: value' entries")
    out = []
    for i, step in enumerate(raw):
        if not (isinstance(step, dict) and len(step) == 1):
            raise ConfigError(f"{where}[{i}]: expected one 'op: value' pair, got {step!r}")
        (op, value), = step.items()
        if op not in FILTER_OPS:
            raise ConfigError(f"{where}[{i}]: unknown filter '{op}'; known: {list(FILTER_OPS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}[{i}]: {op} needs a non-negative integer, got {value!r}")
        out.append({"op": op, "value": value})
    return out


def dataset_config(params: dict[str, Any], name: str) -> DatasetConfig:
    """Build the typed config of dataset ``name`` from the params mapping."""
    datasets = params.get("datasets") or {}
    if name not in datasets:
        raise ConfigError(f"dataset '{name}' is not declared under 'datasets:' (declared: {sorted(datasets)})")
    check_dataset_name(name)
    raw = dict(datasets[name] or {})
    where = f"datasets.{name}"
    seq = dict(raw.get("sequences") or {})
    seq["filters"] = _parse_filters(seq.get("filters"), f"{where}.sequences.filters")
    raw["sequences"] = seq
    raw["name"] = name
    cfg = from_dict(DatasetConfig, raw, where)
    if not cfg.sources and cfg.generator is None:
        raise ConfigError(f"{where}: no sources declared")
    cfg.ingest.timestamp_bounds()  # fail early on a bad date
    return cfg


def load_dataset_config(name: str, params_path: str | Path | None = None) -> DatasetConfig:
    return dataset_config(load_params(params_path), name)
