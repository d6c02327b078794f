"""A model card for a registered version, generated from its run's records in the tracking store.

:func:`model_card` reads one benchmark run (tags, logged configuration, final metrics) and the
dataset's build (``processed/stats.json``) and writes Markdown: the data version and its
provenance, the selection basis, metrics per protocol with the seed, robustness, intended use and
limitations. :mod:`cdsr.track.registry` puts it in the version's description and logs it as the
run's ``model_card.md`` artifact when it registers the version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cdsr.track.tracking import metric_key

HEADLINE = ("HR@10", "NDCG@10", "MRR")
_ROBUST = re.compile(r"^robust/(?P<scope>[^/]+)/(?P<kind>[^/]+)/p(?P<p>[^/]+)/rel_drop_(?P<metric>.+)$")


def _metric_rows(metrics: dict[str, float], split: str) -> list[str]:
    protos = sorted({k.split("/")[1] for k in metrics if k.startswith(f"{split}/") and "/overall/" in k})
    rows = []
    for proto in protos:
        vals = [metrics.get(f"{split}/{proto}/overall/{metric_key(m)}") for m in HEADLINE]
        rows.append(f"| {split} | `{proto}` | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return rows


def _robust_rows(metrics: dict[str, float]) -> list[str]:
    rows = []
    for k in sorted(metrics):
        m = _ROBUST.match(k)
        if m:
            rows.append(f"| {m['scope']} | {m['kind']} | {m['p']} | {m['metric'].replace('_', '@')} | "
                        f"{metrics[k]:+.1%} |")
    return rows


def model_card(run, name: str, version: str, data_root: str | Path = "data") -> str:
    """Markdown for version ``version`` of registered model ``name``, logged from MLflow ``run``."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    dataset = tags.get("dataset", "?")
    stats_path = Path(data_root) / dataset / "processed" / "stats.json"
    stats: dict[str, Any] = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    size = ", ".join(f"{k} {stats[k]:,}" for k in ("users", "items", "events") if isinstance(stats.get(k), int))
    if stats.get("timestamp_range"):
        size += f", timestamps {stats['timestamp_range']}"
    size = size or "not recorded"
    lines = [
        f"# {name} version {version}: {tags.get('method', tags.get('model', '?'))}",
        "",
        "## Data",
        f"- Dataset `{dataset}`, data version `{tags.get('data_version', 'unknown')}` (MD5 of its built "
        "`split.parquet`, as `dvc.lock` records it); the build's own hashes are the run's `data_version.json`.",
        f"- Provenance: built by `cdsr data build --dataset {dataset}` (the `dvc repro` stages) from the raw "
        f"files params.yaml declares for it; the build as registered: {size}.",
        "",
        "## Training",
        f"- Model `{tags.get('model', '?')}` ({tags.get('variant', '?')}), seed {params.get('seed', '?')}, "
        f"cdsr commit `{tags.get('git_commit', 'unknown')}`, MLflow run `{run.info.run_id}`.",
        f"- Selected on validation `{tags.get('val_metric', '?')}` under `{tags.get('val_protocol', '?')}` "
        f"(value {metrics.get('val_metric', float('nan')):.4f}); test numbers played no part in selection.",
        "",
        "## Metrics (one seed)",
        "| split | protocol | " + " | ".join(HEADLINE) + " |",
        "|---|---|" + "---|" * len(HEADLINE),
        *(_metric_rows(metrics, "valid") + _metric_rows(metrics, "test")),
        "",
        "## Robustness (relative change of the metric under input noise)",
    ]
    robust = _robust_rows(metrics)
    lines += (["| scope | noise | p | metric | change |", "|---|---|---|---|---|", *robust] if robust
              else ["Not measured for this run."])
    lines += [
        "",
        "## Intended use",
        "Ranking the next item of a requested domain for a user with a time-ordered history over the "
        "dataset's domains, in the catalogue it was trained on; offline comparison with other cdsr models "
        "under the protocols above.",
        "",
        "## Limitations",
        "- It recommends only items seen in training; unseen history items are dropped (serving reports them).",
        "- It reads only the last `max_len` events of a history.",
        "- One seed on one split: differences between models smaller than the seed spread are not established.",
        "- `sampled-*` protocols estimate ranks against stored random negatives; `full` ranks the whole domain.",
        "- Offline metrics only: no online, fairness or popularity-bias evaluation was run.",
    ]
    return "\n".join(lines) + "\n"
