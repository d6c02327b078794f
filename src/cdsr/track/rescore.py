"""The champion re-scored on a new build of its dataset (a data refresh).

A refresh (new users, new items, new events) changes the data version (MD5 of ``split.parquet``),
so the champion's logged validation value and the challengers' would come from different
splits. Promotion therefore re-scores the champion first: its registered model, loaded as it is
served (the pyfunc's own item vocabulary and checkpoint), ranks the new build's validation
targets under the basis protocol and metric, and the value is logged to the tracking store as a
run of kind ``rescore`` (tags ``dataset``, ``data_version``, ``val_metric``, ``val_protocol``,
``model_version``, ``model_run_id``). The gate reads it from there like any other value, and a
second promotion on the same build reuses it.

What the champion never saw is handled as serving handles it:

- history items outside its vocabulary are dropped from the input window (serving reports them
  as ``unknown_items`` and drops them);
- candidates outside it score -inf: it cannot recommend them, so they never rank above a target
  (they still count as candidates, so ``full`` keeps the new build's catalogue);
- a target outside it (or in a domain it does not know) is a miss: it ranks last.

The counts (targets, unseen targets, unseen items of the new catalogue, dropped history events)
are logged as metrics of the run and returned with the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import torch
from torch import nn

from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig, rank_targets, summarise
from cdsr.track import tracking

KIND = "rescore"


@dataclass(frozen=True)
class Rescore:
    """A registered model's value on a build of the data, and what it had never seen there."""

    value: float
    run_id: str
    targets: int
    unseen_targets: int
    unseen_items: int
    dropped_history_events: int


class _InNewIds(nn.Module):
    """The served model seen through the new build's item ids: ``score(batch, candidates)`` as
    :meth:`cdsr.models.base.SeqRecModel.score`, in the new ids (see the module docstring)."""

    def __init__(self, rec, new_items: pd.DataFrame, new_domains: list[str]):
        super().__init__()
        self.rec = rec
        self.to_old, self.dom_to_old = rec.own_ids(new_items, new_domains)  # 0 / -1: never seen
        self.dropped = 0

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor | None = None) -> torch.Tensor:
        items = batch["items"].numpy()
        old = self.to_old[items]
        keep = batch["mask"].numpy() & (old > 0)
        self.dropped += int((batch["mask"].numpy() & (old == 0)).sum())
        doms = self.dom_to_old[batch["domains"].numpy()]
        ts = batch["timestamps"].numpy()
        tdom = self.dom_to_old[batch["target_domain"].numpy()]
        known = tdom >= 0
        out = torch.full((len(items), len(self.to_old)), float("-inf"))
        rows = np.flatnonzero(known)
        if len(rows):
            hist = [(old[r][keep[r]], doms[r][keep[r]], ts[r][keep[r]]) for r in rows]
            s_old = self.rec._scores(hist, tdom[rows])  # [n, n_old + 1], as served
            seen = torch.from_numpy(self.to_old > 0)
            s_new = s_old[:, torch.from_numpy(self.to_old)].masked_fill(~seen, float("-inf"))
            out[torch.from_numpy(rows)] = s_new
        return out if candidates is None else out.gather(1, candidates)


def rescore(rec, processed: Path, protocol: str, metric: str, cfg: EvalConfig) -> tuple[float, dict[str, int]]:
    """``rec`` (a loaded :class:`cdsr.track.pyfunc.CDSRRecommender`) on the validation split of
    the build in ``processed`` -> (its overall ``metric`` under ``protocol``, the counts)."""
    data = SplitData.load(processed)
    items = pd.read_parquet(processed / "items.parquet", columns=["item_idx", "item_id"])
    model = _InNewIds(rec, items, data.domain_names)
    cfg = replace(cfg, protocols=[protocol], max_len=rec.max_len)
    res = rank_targets(model, data, "valid", protocol, cfg)
    overall = summarise(res, data.domain_names, cfg)["overall"]
    if metric not in overall:
        raise KeyError(f"metric {metric!r} is not computed under {protocol} (known: {sorted(overall)})")
    targets = data.targets.filter(pl.col("split") == "valid")["item_idx"].to_numpy()
    counts = {"targets": int(len(targets)), "unseen_targets": int((model.to_old[targets] == 0).sum()),
              "unseen_items": int((model.to_old[1:] == 0).sum()), "dropped_history_events": model.dropped}
    return float(overall[metric]), counts


def _logged(client, experiment_id: str, version: str, data_version: str, metric: str, protocol: str):
    """The finished ``rescore`` run of this model version, build, metric and protocol, or None."""
    flt = (f"tags.`cdsr.kind` = '{KIND}' AND tags.model_version = '{version}' AND tags.data_version = "
           f"'{data_version}' AND tags.val_metric = '{metric}' AND tags.val_protocol = '{protocol}' "
           "AND attributes.status = 'FINISHED'")
    runs = client.search_runs([experiment_id], flt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def rescored(client, name: str, version, dataset: str, data_root: str | Path, data_version: str, metric: str,
             protocol: str, cfg: EvalConfig, tcfg: tracking.TrackingConfig | None = None) -> Rescore:
    """The registered ``version`` of ``name`` on build ``data_version`` of ``dataset``: read from
    its ``rescore`` run when one is logged, else computed and logged now (a killed re-score
    leaves no FINISHED run, so it is computed again)."""
    import mlflow

    key = f"valid/{protocol}/overall/{tracking.metric_key(metric)}"
    exp = tracking.use_experiment(dataset, tcfg)
    run = _logged(client, exp, str(version.version), data_version, metric, protocol)
    if run is None:
        rec = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model()
        value, counts = rescore(rec, Path(data_root) / dataset / "processed", protocol, metric, cfg)
        tags = {"cdsr.kind": KIND, "dataset": dataset, "data_version": data_version, "val_metric": metric,
                "val_protocol": protocol, "model_version": str(version.version), "model_run_id": version.run_id,
                "registered_model": name}
        with mlflow.start_run(experiment_id=exp, run_name=f"rescore-v{version.version}-{data_version[:8]}",
                              tags=tags) as r:
            mlflow.log_metrics({key: value, **{f"rescore/{k}": float(v) for k, v in counts.items()}})
        run = client.get_run(r.info.run_id)
    m = run.data.metrics
    value = float(m[key])
    if not math.isfinite(value):
        raise ValueError(f"rescore run {run.info.run_id}: {key} is {value}")
    return Rescore(value, run.info.run_id, *(int(m.get(f"rescore/{k}", 0)) for k in
                                             ("targets", "unseen_targets", "unseen_items", "dropped_history_events")))
