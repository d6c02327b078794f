"""The tables of the method studies: mean +- sd over seeds, markdown tables, the relative change
against a reference variant and the training-cost rows.

The values come from :class:`cdsr.evaluate.results.RunMetrics` records (one per seed); the
mean and sample standard deviation are :mod:`cdsr.leaderboard`'s.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from cdsr.evaluate.results import RunMetrics
from cdsr.leaderboard import seed_stats

OVERALL = "overall"


def mean_sd(xs: Iterable[float], fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    """``mean +- sd`` of ``xs`` (times ``scale``); one value alone; empty for none."""
    xs = [x * scale for x in xs]
    if not xs:
        return ""
    s = seed_stats(xs)
    return fmt.format(s["mean"]) if s["sd"] is None else f"{fmt.format(s['mean'])} +- {fmt.format(s['sd'])}"


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else math.nan


def change(a: float, b: float) -> str:
    """The relative change of ``a`` against ``b``, in percent (``n/a`` against 0 or nan)."""
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{100 * (a / b - 1):+.1f}%"


def markdown(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table: header, separator, one line per row."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def value(m: RunMetrics, protocol: str, domain: str | None, key: str) -> float:
    """A test metric of one run: of a target domain, or ``overall`` (``domain`` None or "overall")."""
    block = m.overall(protocol) if domain in (None, OVERALL) else m.domains(protocol)[domain]
    return block[key]


def values(ms: Sequence[RunMetrics], protocol: str, domain: str | None, key: str) -> list[float]:
    return [value(m, protocol, domain, key) for m in ms]


def cells(ms: Sequence[RunMetrics], protocol: str, domains: Sequence[str | None], keys: Sequence[str],
          fmt: str = "{:.4f}", scale: float = 1.0) -> list[str]:
    """``mean +- sd`` over the runs for each domain, then each key."""
    return [mean_sd(values(ms, protocol, d, k), fmt, scale) for d in domains for k in keys]


def relative(ms: Sequence[RunMetrics], ref: Sequence[RunMetrics], protocol: str, domains: Sequence[str | None],
             keys: Sequence[str]) -> list[str]:
    """The change of ``ms`` against ``ref`` (ratio of the seed means) for each domain, then each key."""
    return [change(mean(values(ms, protocol, d, k)), mean(values(ref, protocol, d, k))) for d in domains for k in keys]


def seeds(ms: Sequence[RunMetrics]) -> str:
    return ",".join(str(m.seed) for m in ms)


def domains_of(ms: Sequence[RunMetrics], protocol: str) -> list[str]:
    return list(ms[0].domains(protocol)) if ms else []


def epochs(ms: Sequence[RunMetrics], part: str = "merged") -> str:
    """``epochs run (1-based best epoch)`` of each run."""
    return ", ".join(f"{m.fit[part]['epochs_run']} ({m.fit[part]['best_epoch'] + 1})" for m in ms)


def fit_rows(ms: Sequence[RunMetrics], part: str = "merged") -> tuple[str, float, list[dict]]:
    """For a variant's runs: "epochs run (1-based best), ...", the mean wall seconds per epoch,
    and each run's epoch record at its best epoch ({} if absent)."""
    fits = [m.fit[part] for m in ms]
    per_epoch = mean(f["train_seconds"] / max(f["epochs_run"], 1) for f in fits)
    best = [next((h for h in m.history.get(part, []) if h["epoch"] == f["best_epoch"]), {}) for m, f in zip(ms, fits)]
    return epochs(ms, part), per_epoch, best
