"""Gated promotion in the MLflow model registry: ``models:/cdsr-<dataset>@champion``.

The candidate is the benchmark method with the best validation metric (``train.val_metric``
under ``train.val_protocol``, computed on the best checkpoint); its logged pyfunc model is
registered as a version of ``cdsr-<dataset>`` (once per MLflow run: a rerun finds the existing
version). It becomes ``champion`` only if

- the dataset's data validation (interactions and sequences) passed, and
- there is no champion, or candidate > champion + ``margin`` (``relative``: champion x (1 + margin)).

Every decision is recorded as tags on the candidate version (``promotion.decision``,
``promotion.reason``, ``promotion.candidate_value``, ``promotion.champion_value``, ...) and
returned; promoting again with the same inputs changes nothing (idempotent).

NOTE: the champion's stored validation value is compared as is. When the data version changed
between the two, the numbers come from different validation sets; the decision records both
data versions (``promotion.champion_data_version``) so this is visible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdsr.track import tracking

ALIAS = "champion"


@dataclass(frozen=True)
class PromoteConfig:
    """The ``promote:`` section of params.yaml."""

    margin: float = 0.0  # the candidate must beat the champion by more than this
    relative: bool = False  # margin as a fraction of the champion's value
    require_validation: bool = True  # refuse candidates whose dataset failed data validation
    methods: list[str] | None = None  # restrict candidates (None: every metrics/<dataset>/*.json)


@dataclass
class Candidate:
    method: str
    run_id: str
    value: float
    metric: str
    data_version: str


def candidates(metrics_dir: Path, dataset: str, methods: list[str] | None = None) -> list[Candidate]:
    """Benchmark results with a tracked MLflow run, best validation value first."""
    out = []
    for f in sorted((metrics_dir / dataset).glob("*.json")):
        m = json.loads(f.read_text())
        if methods and f.stem not in methods:
            continue
        if not m.get("mlflow_run_id"):
            continue
        metric = m.get("val_metric", "NDCG@10")
        out.append(Candidate(f.stem, m["mlflow_run_id"], float(m["validation"]["overall"][metric]), metric,
                             m.get("data_version", {}).get("split.parquet", "unknown")))
    return sorted(out, key=lambda c: (-c.value, c.method))


def _version_for_run(client, name: str, run_id: str):
    for v in client.search_model_versions(f"name='{name}'"):
        if v.run_id == run_id:
            return v
    return None


def promote(dataset: str, cfg: PromoteConfig, metrics_dir: Path = Path("metrics"), data_root: str | Path = "data",
            tcfg: tracking.TrackingConfig | None = None, candidate: Candidate | None = None) -> dict[str, Any]:
    """Register the best candidate and move ``champion`` to it if it passes the gate."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.setup(tcfg)
    client = MlflowClient()
    name = tracking.registered_model_name(dataset, tcfg)
    if candidate is None:
        found = candidates(metrics_dir, dataset, cfg.methods)
        if not found:
            raise FileNotFoundError(f"no tracked benchmark results in {metrics_dir / dataset}: run the benchmark first")
        candidate = found[0]
    valid_ok, valid_msg = tracking.validation_passed(dataset, data_root)

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"cdsr next-item recommender for dataset '{dataset}'")
    version = _version_for_run(client, name, candidate.run_id)
    if version is None:
        version = mlflow.register_model(f"runs:/{candidate.run_id}/model", name,
                                        tags={"method": candidate.method, "val_metric": candidate.metric,
                                              "val_value": str(candidate.value), "data_version": candidate.data_version})
    try:
        champ = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        champ = None

    decision: dict[str, Any] = {"dataset": dataset, "registered_model": name, "candidate_method": candidate.method,
                                "candidate_version": str(version.version), "candidate_run_id": candidate.run_id,
                                "metric": candidate.metric, "candidate_value": candidate.value,
                                "margin": cfg.margin, "relative": cfg.relative, "data_validation": valid_msg}
    if champ is not None:
        champ_value = float(champ.tags.get("val_value", "nan"))
        decision.update(champion_version=str(champ.version), champion_value=champ_value,
                        champion_data_version=champ.tags.get("data_version", "unknown"))
    if champ is not None and str(champ.version) == str(version.version):
        decision.update(promoted=False, decision="already-champion", reason="the candidate is the champion")
    elif cfg.require_validation and not valid_ok:
        decision.update(promoted=False, decision="rejected", reason=f"data validation failed: {valid_msg}")
    elif champ is None:
        decision.update(promoted=True, decision="promoted", reason="no champion yet")
    else:
        bar = champ_value * (1 + cfg.margin) if cfg.relative else champ_value + cfg.margin
        better = candidate.value > bar
        decision.update(promoted=better, decision="promoted" if better else "rejected", threshold=bar,
                        reason=(f"{candidate.metric} {candidate.value:.4f} {'>' if better else '<='} champion "
                                f"{champ_value:.4f} + margin = {bar:.4f}"))
    if decision["promoted"]:
        client.set_registered_model_alias(name, ALIAS, version.version)
        if champ is not None:
            client.set_model_version_tag(name, champ.version, "promotion.replaced_by", str(version.version))
    if decision["decision"] == "already-champion":
        return decision  # keep the tags of the decision that made it champion
    for k, v in decision.items():
        if k not in {"dataset", "registered_model"}:
            client.set_model_version_tag(name, version.version, f"promotion.{k}", str(v))
    return decision
