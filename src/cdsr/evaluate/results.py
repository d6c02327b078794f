"""The result record of a run: ``metrics.json``, with a versioned schema.

One builder (:meth:`RunMetrics.build`) writes it for ``cdsr train`` and the benchmark alike; the
leaderboard, report, promotion, tracking and studies read it through :meth:`RunMetrics.read`.

Schema 1 (the shape files had before the version field; a file without ``schema`` is read as 1):
``dataset, model, variant, seed``; ``protocols`` (test: ``{protocol: summary}``, a summary being
:func:`cdsr.evaluate.protocols.summarise`'s ``{"overall", "domains", "buckets"}``);
``validation`` (the summary under the selection protocol); ``fit`` (per part: best_epoch,
best_val, epochs_run, stopped_early, train_seconds, resumes); ``history`` (per part: the epoch
records); ``parameters``; ``seconds`` (training seconds summed over parts + test scoring); and
``hardware``. The benchmark adds ``method, val_metric, robustness, robustness_protocol,
data_version, git_commit, command, mlflow_run_id``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_BENCHMARK = ("method", "val_metric", "robustness", "robustness_protocol", "data_version", "git_commit", "command",
              "mlflow_run_id")


class ResultsError(ValueError):
    """A metrics file that does not hold a run's result record."""


@dataclass
class RunMetrics:
    dataset: str
    model: str
    variant: str
    seed: int
    protocols: dict[str, dict[str, Any]]
    validation: dict[str, Any]
    fit: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, list[dict]] = field(default_factory=dict)
    parameters: int | None = None
    seconds: float | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    # the benchmark's (None / empty for `cdsr train`)
    method: str | None = None
    val_metric: str | None = None
    robustness: list[dict] | None = None
    robustness_protocol: str | None = None
    data_version: dict[str, str] | None = None
    git_commit: str | None = None
    command: str | None = None
    mlflow_run_id: str | None = None
    schema: int = SCHEMA_VERSION

    @classmethod
    def build(cls, spec: Any, scored: dict[str, Any], fitted: dict[str, Any], score_seconds: float,
              hardware: dict[str, Any]) -> RunMetrics:
        """The record of a trained and scored run: ``scored`` = ``{"protocols", "validation"}``,
        ``fitted`` = ``fit.json`` (``{"fit", "history", "parameters"}``)."""
        seconds = sum(float(f["train_seconds"]) for f in fitted["fit"].values()) + score_seconds
        return cls(spec.dataset, spec.model, spec.variant, spec.seed, scored["protocols"], scored["validation"],
                   fitted["fit"], fitted["history"], fitted["parameters"], round(seconds, 2), hardware)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("schema")
        for k in _BENCHMARK:
            if out[k] is None:
                out.pop(k)
        return {"schema": self.schema, **out}

    @classmethod
    def from_json(cls, d: Any, where: str = "metrics") -> RunMetrics:
        if not isinstance(d, dict):
            raise ResultsError(f"{where}: not a JSON object")
        version = d.get("schema", 1)
        if version != SCHEMA_VERSION:
            raise ResultsError(f"{where}: metrics schema {version!r}; this cdsr reads schema {SCHEMA_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("dataset", "model", "variant", "seed", "protocols", "validation") if k not in d]
        if missing:
            raise ResultsError(f"{where}: missing key(s) {missing}")
        unknown = sorted(set(d) - names)
        if unknown:
            raise ResultsError(f"{where}: unknown key(s) {unknown}")
        if not isinstance(d["protocols"], dict):
            raise ResultsError(f"{where}: 'protocols' is not a mapping")
        return cls(**d)

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ResultsError(f"{path}: unreadable ({exc})") from exc
        return cls.from_json(data, str(path))

    # views ------------------------------------------------------------------------------------
    def overall(self, protocol: str) -> dict[str, float]:
        return self.protocols[protocol]["overall"]

    def domains(self, protocol: str) -> dict[str, dict[str, float]]:
        return self.protocols[protocol].get("domains", {})

    @property
    def epochs_run(self) -> int:
        return sum(int(v.get("epochs_run", 0)) for v in self.fit.values())


def read_tracked(path: str | Path) -> Any:
    """A benchmark's DVC metrics file (``metrics/<dataset>/<method>.json``) completed from the run
    directory it names (``run_dir``): the wall times, machine and MLflow run id that the DVC file
    leaves out so that it is reproducible; what the file holds stands. A file without ``run_dir``, or whose run directory is
    gone, is returned as it is. Raises OSError / ValueError for an unreadable file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("run_dir"), str):
        return data
    full = Path(data["run_dir"]) / "metrics.json"
    try:
        return {**RunMetrics.read(full).to_json(), **data}  # the file's own values stand
    except ResultsError:
        return data
