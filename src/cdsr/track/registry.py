"""Gated promotion in the MLflow model registry: ``models:/cdsr-<dataset>@champion``.

The registry makes one promise: a model that is worse than the champion on the champion's own
terms never becomes champion. The terms (the *basis* of the comparison) are one metric, under
one evaluation protocol, on the validation split of one version of the data:

- with a champion, the basis is the champion's: the ``val_metric``, ``val_protocol`` and
  ``data_version`` tags of the champion's MLflow run; when the data has been rebuilt since (a
  refresh: another ``data_version``), the champion's registered model is first re-scored on the
  current build's validation split under that metric and protocol (:mod:`cdsr.track.rescore`,
  logged to the tracking store), and that value on the current version is the basis;
- without one, the candidates' own (they must agree) on the current build of the dataset.

Every number in the decision is read from the tracking store (the ``valid/<protocol>/overall/
<metric>`` metrics each benchmark run logs), never from an editable side file: the benchmark's
``metrics/<dataset>/*.json`` only say which runs are candidates. A candidate is compared only
if its run is a finished benchmark run of this dataset, trained on the basis' data version, with
the basis metric logged under the basis protocol; otherwise it is left out with its reason, and
when no candidate is comparable promotion is refused with the reasons. A metrics file whose
value disagrees with the store is reported in the decision (the store's value is used).

The best comparable candidate's logged pyfunc model is registered as a version of
``cdsr-<dataset>`` (once per MLflow run) and becomes ``champion`` only if

- the dataset's data validation (interactions and sequences) passed, and
- there is no champion, or candidate > champion + ``margin`` (``relative``: champion x
  (1 + margin)); ``margin`` is never negative.

Every decision on a registered version is recorded as tags on it (``promotion.decision``,
``promotion.reason``, ``promotion.candidate_value``, ``promotion.champion_value``,
``promotion.basis``...) and returned; promoting again with the same inputs changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdsr.config import ConfigError, check_dataset_name
from cdsr.evaluate.protocols import EvalConfig
from cdsr.evaluate.results import read_tracked
from cdsr.track import tracking

ALIAS = "champion"
SPLIT = "valid"  # promotion compares validation numbers; test numbers stay unseen by selection


@dataclass(frozen=True)
class PromoteConfig:
    """The ``promote:`` section of params.yaml."""

    margin: float = 0.0  # the candidate must beat the champion by more than this (>= 0)
    relative: bool = False  # margin as a fraction of the champion's value
    require_validation: bool = True  # refuse candidates whose dataset failed data validation
    methods: list[str] | None = None  # restrict candidates (None: every metrics/<dataset>/*.json)

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not math.isfinite(self.margin) or self.margin < 0:
            raise ConfigError(f"promote.margin must be a finite number >= 0, got {self.margin!r}: a negative "
                              "margin would let a model worse than the champion be promoted")


@dataclass(frozen=True)
class Basis:
    """What values are compared on: ``metric`` under ``protocol`` on the validation split of
    the data version ``data_version`` (MD5 of ``split.parquet``)."""

    metric: str
    protocol: str
    data_version: str

    @property
    def key(self) -> str:
        """The MLflow metric holding it (see ``tracking.final_metrics``)."""
        return f"{SPLIT}/{self.protocol}/overall/{tracking.metric_key(self.metric)}"

    def __str__(self) -> str:
        return f"{self.metric} ({self.protocol}, {SPLIT} split, data {self.data_version[:8]})"


@dataclass
class Candidate:
    """A benchmark run offered for promotion: its value on the basis (from the tracking store),
    or the reason it cannot be compared."""

    method: str
    run_id: str
    value: float | None = None
    problem: str | None = None
    file_value: float | None = None  # what metrics/<dataset>/<method>.json claims (not trusted)
    file_metric: str | None = None


def listed(metrics_dir: Path, dataset: str, methods: list[str] | None = None) -> list[Candidate]:
    """The benchmark's candidates: one per ``metrics/<dataset>/<method>.json`` with an MLflow run
    id. Only the run id is taken from the file; values come from the tracking store."""
    out = []
    for f in sorted((metrics_dir / dataset).glob("*.json")):
        if methods and f.stem not in methods:
            continue
        try:
            m = read_tracked(f)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{f}: not a readable benchmark metrics file: {exc}") from exc
        if not isinstance(m, dict) or not isinstance(m.get("mlflow_run_id"), str) or not m["mlflow_run_id"]:
            continue
        metric = m.get("val_metric")
        claimed = (m.get("validation") or {}).get("overall", {}).get(metric) if isinstance(metric, str) else None
        out.append(Candidate(f.stem, m["mlflow_run_id"], file_value=claimed if isinstance(claimed, (int, float)) else None,
                             file_metric=metric if isinstance(metric, str) else None))
    return out


def _run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def run_basis(run) -> Basis:
    """The basis a benchmark run was selected on (its own training's validation settings)."""
    tags = run.data.tags
    return Basis(tags.get("val_metric", "?"), tags.get("val_protocol", "?"), tags.get("data_version", "unknown"))


def assess(client, cand: Candidate, dataset: str, basis: Basis | None) -> Candidate:
    """Fill ``cand.value`` from the store on ``basis`` (the run's own basis when None), or
    ``cand.problem``."""
    run = _run(client, cand.run_id)
    if run is None:
        cand.problem = f"run {cand.run_id} is not in the tracking store"
        return cand
    tags = run.data.tags
    basis = basis or run_basis(run)
    if tags.get("dataset") != dataset or tags.get("cdsr.kind") != "benchmark":
        cand.problem = (f"run {cand.run_id} is not a benchmark run of dataset '{dataset}' "
                        f"(dataset={tags.get('dataset')!r}, kind={tags.get('cdsr.kind')!r})")
    elif run.info.status != "FINISHED":
        cand.problem = f"run {cand.run_id} is {run.info.status}, not FINISHED"
    elif tags.get("data_version") != basis.data_version:
        cand.problem = (f"trained on data version {tags.get('data_version', 'unknown')[:8]}, the comparison is on "
                        f"{basis.data_version[:8]}: its validation numbers come from another split")
    elif basis.key not in run.data.metrics:
        cand.problem = (f"its run has no {basis.metric} under protocol '{basis.protocol}' (it was validated under "
                        f"'{tags.get('val_protocol')}'): not comparable like for like")
    else:
        cand.value = float(run.data.metrics[basis.key])
        if not math.isfinite(cand.value):
            cand.value, cand.problem = None, f"its {basis.metric} in the tracking store is {run.data.metrics[basis.key]}"
    return cand


def _version_for_run(client, name: str, run_id: str):
    for v in client.search_model_versions(f"name='{name}'"):
        if v.run_id == run_id:
            return v
    return None


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def _file_disagreements(cands: list[Candidate], client) -> list[str]:
    """Metrics files whose claimed validation value is not what the store holds for that run."""
    out = []
    for c in cands:
        if c.file_value is None or not c.file_metric:
            continue
        run = _run(client, c.run_id)
        if run is None:
            continue
        stored = run.data.metrics.get(Basis(c.file_metric, run.data.tags.get("val_protocol", "?"), "").key)
        if stored is None or not math.isclose(stored, c.file_value, rel_tol=1e-6, abs_tol=1e-9):
            out.append(f"metrics file of {c.method} claims {c.file_metric} {c.file_value} but the tracking store "
                       f"holds {stored} for run {c.run_id}; the store's value is used")
    return out


def _basis(client, name: str, cands: list[Candidate], current: str, decision: dict[str, Any], ctx: dict[str, Any]):
    """``(champion version or None, its value, the basis to compare on, None)``, or
    ``(..., reason)`` when nothing can be compared like for like (adds the champion's figures to
    ``decision``). A champion validated on another build of the data is re-scored on this one
    (``ctx``: dataset, data_root, eval_cfg, tcfg)."""
    champ = _champion(client, name)
    if champ is None:
        bases = {}
        for c in cands:
            run = _run(client, c.run_id)
            if run is not None:
                b = run_basis(run)
                bases.setdefault((b.metric, b.protocol), []).append(c.method)
        if len(bases) > 1:
            return None, None, None, ("there is no champion and the candidates were validated on different metrics or "
                                      f"protocols ({ {f'{m} / {p}': ms for (m, p), ms in bases.items()} }): no common basis")
        metric, protocol = next(iter(bases)) if bases else ("?", "?")
        return None, None, Basis(metric, protocol, current), None
    champ_run = _run(client, champ.run_id)
    if champ_run is None:
        return champ, None, None, (f"the champion (version {champ.version}) has no run {champ.run_id} in the tracking "
                                   "store: its value cannot be read, so nothing can be compared with it")
    basis = run_basis(champ_run)
    value = champ_run.data.metrics.get(basis.key)
    decision.update(champion_version=str(champ.version), champion_value=value, champion_data_version=basis.data_version)
    if value is None:
        return champ, None, basis, f"the champion's run {champ.run_id} has no {basis.key} metric in the tracking store"
    if basis.data_version != current:
        return _rescored_basis(client, name, champ, basis, value, current, ctx, decision)
    return champ, value, basis, None


def _rescored_basis(client, name: str, champ, basis: Basis, value: float, current: str, ctx: dict[str, Any],
                    decision: dict[str, Any]):
    """A champion validated on another build: its value re-scored on the current one
    (:mod:`cdsr.track.rescore`), which becomes the basis; ``decision`` keeps both values."""
    from cdsr.track.rescore import rescored

    try:
        r = rescored(client, name, champ, ctx["dataset"], ctx["data_root"], current, basis.metric, basis.protocol,
                     ctx["eval_cfg"], ctx["tcfg"])
    except Exception as exc:  # noqa: BLE001 (any failure to load or score the model refuses, with its reason)
        return champ, value, basis, (
            f"the champion (version {champ.version}) was validated on data version {basis.data_version[:8]} and "
            f"could not be re-scored on {current[:8]} ({type(exc).__name__}: {exc}): nothing can be compared with it")
    decision.update(champion_value=r.value, champion_data_version=current, champion_value_at_promotion=value,
                    champion_promoted_on_data_version=basis.data_version, champion_rescore_run_id=r.run_id,
                    champion_rescore={"targets": r.targets, "unseen_targets": r.unseen_targets,
                                      "unseen_items": r.unseen_items,
                                      "dropped_history_events": r.dropped_history_events})
    client.set_model_version_tag(name, champ.version, f"rescore.{current[:8]}", f"{r.value} (run {r.run_id})")
    return champ, r.value, Basis(basis.metric, basis.protocol, current), None


def _register(client, name: str, dataset: str, best: Candidate, basis: Basis, data_root: str | Path = "data"):
    """The model version of ``best``'s run (registered now unless it already is, with its model
    card as the version's description and the run's ``model_card.md``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cdsr.track.model_card import model_card

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"cdsr next-item recommender for dataset '{dataset}'")
    version = _version_for_run(client, name, best.run_id)
    if version is None:
        version = mlflow.register_model(f"runs:/{best.run_id}/model", name,
                                        tags={"method": best.method, "val_metric": basis.metric,
                                              "val_protocol": basis.protocol, "val_value": str(best.value),
                                              "data_version": basis.data_version})
        card = model_card(client.get_run(best.run_id), name, str(version.version), data_root)
        client.update_model_version(name, version.version, description=card)
        client.log_text(best.run_id, card, "model_card.md")
    return version


def _gate(decision: dict[str, Any], cfg: PromoteConfig, champ, champ_value: float | None, best: Candidate,
          version, basis: Basis, valid: tuple[bool, str]) -> None:
    """Fill in ``promoted``, ``decision`` and ``reason``: the gate itself."""
    if champ is not None and str(champ.version) == str(version.version):
        decision.update(promoted=False, decision="already-champion", reason="the candidate is the champion")
    elif cfg.require_validation and not valid[0]:
        decision.update(promoted=False, decision="rejected", reason=f"data validation failed: {valid[1]}")
    elif champ is None:
        decision.update(promoted=True, decision="promoted", reason=f"no champion yet; best on {basis}")
    else:
        bar = champ_value * (1 + cfg.margin) if cfg.relative else champ_value + cfg.margin
        better = best.value > bar
        decision.update(promoted=better, decision="promoted" if better else "rejected", threshold=bar,
                        reason=(f"{basis.metric} ({basis.protocol}) {best.value:.4f} {'>' if better else '<='} "
                                f"champion {champ_value:.4f} + margin = {bar:.4f}"))


def promote(dataset: str, cfg: PromoteConfig, metrics_dir: Path = Path("metrics"), data_root: str | Path = "data",
            tcfg: tracking.TrackingConfig | None = None, eval_cfg: EvalConfig | None = None) -> dict[str, Any]:
    """Register the best comparable candidate and move ``champion`` to it if it passes the gate.

    Returns the decision; ``decision`` is ``promoted``, ``rejected`` (compared and not better by
    the margin, or data validation failed), ``already-champion`` or ``refused`` (nothing could be
    compared like for like: no version is registered)."""
    from mlflow import MlflowClient

    check_dataset_name(dataset)
    tracking.setup(tcfg)
    client = MlflowClient()
    name = tracking.registered_model_name(dataset, tcfg)
    cands = listed(metrics_dir, dataset, cfg.methods)
    if not cands:
        raise FileNotFoundError(f"no tracked benchmark results in {metrics_dir / dataset}: run the benchmark first")
    current = tracking.data_version(dataset, data_root).get("split.parquet", "unknown")
    valid = tracking.validation_passed(dataset, data_root)
    decision: dict[str, Any] = {"dataset": dataset, "registered_model": name, "margin": cfg.margin,
                                "relative": cfg.relative, "data_validation": valid[1], "data_version": current}
    notes = _file_disagreements(cands, client)
    if notes:
        decision["warnings"] = notes

    def refuse(reason: str) -> dict[str, Any]:
        decision.update(promoted=False, decision="refused", reason=reason, candidate_method=None,
                        candidate_version=None, candidates=[_summary(c) for c in cands])
        return decision

    ctx = {"dataset": dataset, "data_root": data_root, "eval_cfg": eval_cfg or EvalConfig(), "tcfg": tcfg}
    champ, champ_value, basis, problem = _basis(client, name, cands, current, decision, ctx)
    if problem is not None:
        return refuse(problem)
    decision.update(metric=basis.metric, basis=asdict(basis) | {"split": SPLIT})
    for c in cands:
        assess(client, c, dataset, basis)
    comparable = sorted((c for c in cands if c.problem is None), key=lambda c: (-c.value, c.method))
    if not comparable:
        return refuse(f"no candidate can be compared on {basis}: " + "; ".join(f"{c.method}: {c.problem}" for c in cands))
    best = comparable[0]
    decision["candidates"] = [_summary(c) for c in cands]
    version = _register(client, name, dataset, best, basis, data_root)
    decision.update(candidate_method=best.method, candidate_version=str(version.version), candidate_run_id=best.run_id,
                    candidate_value=best.value)
    _gate(decision, cfg, champ, champ_value, best, version, basis, valid)
    if decision["promoted"]:
        client.set_registered_model_alias(name, ALIAS, version.version)
        if champ is not None:
            client.set_model_version_tag(name, champ.version, "promotion.replaced_by", str(version.version))
    if decision["decision"] == "already-champion":
        return decision  # keep the tags of the decision that made it champion
    for k, v in decision.items():
        if k not in {"dataset", "registered_model", "candidates", "warnings"}:
            client.set_model_version_tag(name, version.version, f"promotion.{k}", str(v)[:5000])
    return decision


def _summary(c: Candidate) -> dict[str, Any]:
    return {"method": c.method, "run_id": c.run_id, "value": c.value, "problem": c.problem}
