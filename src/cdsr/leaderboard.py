"""The leaderboard: every trained configuration of a dataset, over its seeds, beside the best
published numbers (`cdsr leaderboard`, and the leaderboard section of `cdsr report --runs`).

Sources are the results store (``results/``, :mod:`cdsr.store`: the records of finished runs,
kept in git; the default) and run directories (``metrics.json`` written by ``cdsr train`` /
the study scripts, the benchmark's runs and their robustness retrains) found under the given
roots. Runs
are grouped by their path below the root without the seed suffix (``abxi-fast-s1`` ->
``abxi-fast``, ``sasrec/train-noise-substitute-p0.2`` stays itself); a group also has to agree
on dataset, model and variant, so a name reused for another model is refused rather than
averaged. For each group and protocol: the mean and sample standard deviation over
seeds of each metric per target domain, the seeds, the epochs run, the wall time per run and the
parameter count. Tuning studies (``tuned/<dataset>/<model>.json`` written by ``cdsr tune``) are
listed with their trial counts, best validation value and wall time.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from cdsr.config import ConfigError
from cdsr.evaluate.results import ResultsError, RunMetrics

# ABXI's published Food-Kitchen numbers (official code README v2.1, mean of 5 seeds, sampled-999
# with negatives redrawn per evaluation and ties in the target's favour;
# docs/protocols.md "Published reference numbers").
PUBLISHED = {
    "amazon-food-kitchen-benchmark": {
        "name": "ABXI (published, 5 seeds)", "protocol": "sampled-999",
        "domains": {"Grocery_and_Gourmet_Food": {"HR@5": 0.2519, "HR@10": 0.3243, "NDCG@10": 0.1971, "MRR": 0.1655},
                    "Home_and_Kitchen": {"HR@5": 0.1745, "HR@10": 0.2438, "NDCG@10": 0.1427, "MRR": 0.1219}},
    },
}
METRICS = ("HR@10", "NDCG@10", "MRR")
PROTOCOLS = ("full", "sampled-999", "sampled-100")
_SEED = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


def seed_stats(xs: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation over seeds (sd None for one value)."""
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None}


def collect(roots: list[Path], dataset: str, stale: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The groups of finished runs of ``dataset`` under ``roots`` (see the module docstring).

    A directory holding a results record (:mod:`cdsr.store`) is read as one: named by its record
    name; a ``partial`` record (an unfinished run's best checkpoint so far) forms a group of its
    own, marked so; a stale record (older behaviour versions) is never averaged and is appended
    to ``stale`` instead. The same run found twice (a record and its run directory) counts once,
    the record winning."""
    found: dict[str, dict[int, tuple[RunMetrics, bool]]] = {}
    for root in map(Path, roots):
        for f in sorted(root.rglob("metrics.json")):
            read = _read(f, root, dataset, stale)
            if read is None:
                continue
            rel, m, from_store = read
            hit = _SEED.match(rel)
            name, seed = (hit["name"], int(hit["seed"])) if hit else (rel, int(m.seed))
            runs_of = found.setdefault(name, {})
            if seed not in runs_of or (from_store and not runs_of[seed][1]):
                runs_of[seed] = (m, from_store)
    groups = []
    by_name = {name: [(seed, m) for seed, (m, _) in sorted(by_seed.items())] for name, by_seed in found.items()}
    for name, runs in sorted(by_name.items()):
        kinds = {(m.model, m.variant) for _, m in runs}
        if len(kinds) > 1:
            raise ValueError(f"runs named {name!r} are of different models/variants {sorted(kinds)}: rename one")
        model, variant = kinds.pop()
        protos = {}
        for p in PROTOCOLS:
            have = [m.protocols[p] for _, m in runs if p in m.protocols]
            if len(have) != len(runs):
                continue
            domains = {d: {k: seed_stats([h["domains"][d][k] for h in have]) for k in ("HR@5", *METRICS)}
                       for d in have[0]["domains"] if all(d in h["domains"] for h in have)}
            protos[p] = domains
        groups.append({
            "name": name, "model": model, "variant": variant, "seeds": [s for s, _ in runs],
            "parameters": runs[0][1].parameters,
            "seconds": seed_stats([float(m.seconds if m.seconds is not None else float("nan")) for _, m in runs]),
            "epochs": [m.epochs_run for _, m in runs],
            "protocols": protos,
        })
    return groups


def _read(f: Path, root: Path, dataset: str, stale: list[dict[str, Any]] | None
          ) -> tuple[str, RunMetrics, bool] | None:
    """``(name with seed suffix, metrics, from the store)`` of one metrics.json of ``dataset``;
    None for another dataset, a file that is no run's record, or a stale record (appended to
    ``stale``). A partial record's name says so."""
    from cdsr.store import RECORD, Record, StoreError

    try:
        if not (f.parent / RECORD).exists():
            m = RunMetrics.read(f)
            rel = f.parent.relative_to(root).as_posix() if f.parent != root else f.parent.name
            return (rel, m, False) if m.dataset == dataset else None
        rec = Record.read(f.parent)
    except (ResultsError, StoreError):  # not a run's record (e.g. another tool's metrics.json)
        return None
    if rec.metrics.dataset != dataset:
        return None
    if rec.stale:
        if stale is not None:
            stale.append({"name": rec.name, "key": rec.key, "behaviour": rec.meta.get("behaviour")})
        return None
    hit = _SEED.match(rec.name)
    if rec.status != "finished":  # its own group: "<name> (partial: N epochs)-s<seed>"
        base, suffix = (hit["name"], f"-s{hit['seed']}") if hit else (rec.name, "")
        return f"{base} (partial: {rec.metrics.epochs_run} epochs){suffix}", rec.metrics, True
    return rec.name, rec.metrics, True


def studies(tuned_dir: Path, dataset: str) -> list[dict[str, Any]]:
    """``cdsr tune``'s result per model of ``dataset``: trials by state, best value, wall time."""
    out = []
    from cdsr.tune import read_tuned

    for f in sorted((Path(tuned_dir) / dataset).glob("*.json")):
        try:
            b = read_tuned(f)
        except ConfigError:
            continue
        if "value" not in b:
            continue
        t = b.get("trials", {})
        out.append({"model": f.stem, "complete": t.get("COMPLETE", 0), "pruned": t.get("PRUNED", 0),
                    "failed": t.get("FAIL", 0), "best_value": b["value"], "best_trial": b.get("trial"),
                    "wall_seconds": b.get("wall_seconds"), "params": b.get("params", {})})
    return out


def build(roots: list[Path], dataset: str, tuned_dir: Path = Path("tuned")) -> dict[str, Any]:
    stale: list[dict[str, Any]] = []
    groups = collect(roots, dataset, stale)
    return {"dataset": dataset, "groups": groups, "published": PUBLISHED.get(dataset),
            "studies": studies(tuned_dir, dataset), "stale": stale}


def _cell(s: dict[str, float | None]) -> str:
    return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s["sd"] is not None else "")


def tables(lb: dict[str, Any], protocols: tuple[str, ...] = PROTOCOLS, metrics: tuple[str, ...] = METRICS
           ) -> list[dict[str, Any]]:
    """Per protocol ``{"protocol", "columns", "rows": [[cell, ...]]}`` (the published row last),
    for the markdown and HTML renderings."""
    out = []
    for p in protocols:
        rows = [g for g in lb["groups"] if p in g["protocols"]]
        pub = lb["published"] if lb["published"] and lb["published"]["protocol"] == p else None
        if not rows and not pub:
            continue
        domains = list(rows[0]["protocols"][p]) if rows else list(pub["domains"])
        t = {"protocol": p, "columns": ["run", "seeds", "epochs", "s / run", "params"]
             + [f"{d} {k}" for d in domains for k in metrics], "rows": []}
        for g in rows:
            cells = [_cell(g["protocols"][p][d][k]) if d in g["protocols"][p] else "n/a" for d in domains for k in metrics]
            t["rows"].append([g["name"], ",".join(map(str, g["seeds"])), ",".join(map(str, g["epochs"])),
                              f"{g['seconds']['mean']:.0f}", str(g["parameters"] or "n/a"), *cells])
        if pub:
            t["rows"].append([pub["name"], "", "", "", "", *(f"{pub['domains'][d][k]:.4f}" if d in pub["domains"]
                                                            else "n/a" for d in domains for k in metrics)])
        out.append(t)
    return out


def versus_published(lb: dict[str, Any]) -> dict[str, Any] | None:
    """Each group beside the published row on the published protocol: the seed mean of all its
    metrics per domain (HR@5 included, the published set) and the range of mean / published over
    them; None when the dataset has no published row or no group has its protocol.
    ``{"columns", "rows"}`` (the published row last)."""
    pub = lb["published"]
    if not pub:
        return None
    p, keys = pub["protocol"], [(d, k) for d, ms in pub["domains"].items() for k in ms]
    t = {"columns": ["run", "seeds", *(f"{d} {k}" for d, k in keys), "mean / published"], "rows": []}
    for g in lb["groups"]:
        got = g["protocols"].get(p, {})
        if not all(d in got for d, _ in keys):
            continue
        ratios = [got[d][k]["mean"] / pub["domains"][d][k] for d, k in keys]
        t["rows"].append([g["name"], ",".join(map(str, g["seeds"])), *(f"{got[d][k]['mean']:.4f}" for d, k in keys),
                          f"{min(ratios):.2f}-{max(ratios):.2f}"])
    if not t["rows"]:
        return None
    t["rows"].append([pub["name"], "", *(f"{pub['domains'][d][k]:.4f}" for d, k in keys), "1"])
    return t


PARTS = ("tables", "versus", "studies", "stale")


def markdown(lb: dict[str, Any], protocols: tuple[str, ...] = PROTOCOLS, metrics: tuple[str, ...] = METRICS,
             parts: tuple[str, ...] = PARTS) -> str:
    """Markdown tables: one per protocol (groups x domain metrics), the groups against the
    published row (:func:`versus_published`), then the studies and the stale records; ``parts``
    picks among these four."""
    out = []
    for t in tables(lb, protocols, metrics) if "tables" in parts else []:
        out += [f"#### {t['protocol']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
        out += ["| " + " | ".join(r) + " |" for r in t["rows"]]
        out.append("")
    vs = versus_published(lb) if "versus" in parts else None
    if vs:
        out += [f"#### Against {lb['published']['name']}, {lb['published']['protocol']} (seed means)", "",
                "| " + " | ".join(vs["columns"]) + " |", "|" + "---|" * len(vs["columns"])]
        out += ["| " + " | ".join(r) + " |" for r in vs["rows"]]
        out.append("")
    if lb["studies"] and "studies" in parts:
        out += ["#### Tuning studies", "", "| model | complete | pruned | failed | best value | best trial | wall s |",
                "|---|---|---|---|---|---|---|"]
        for s in lb["studies"]:
            wall = f"{s['wall_seconds']:.0f}" if s["wall_seconds"] is not None else "n/a"
            out.append(f"| {s['model']} | {s['complete']} | {s['pruned']} | {s['failed']} | {s['best_value']:.4f} | "
                       f"{s['best_trial']} | {wall} |")
        out.append("")
    if lb.get("stale") and "stale" in parts:
        out += ["#### Stale records (written under older behaviour versions; not averaged, rerun to refresh)", ""]
        out += [f"- {r['name']} (key {r['key']}, behaviour {r['behaviour']})" for r in lb["stale"]]
        out.append("")
    return "\n".join(out) if out else "no finished runs of this dataset found"
