"""Serve a training run as an MLflow pyfunc model: a user's recent history -> top-k item ids.

:func:`log_pyfunc` logs a run directory written by :func:`cdsr.train.run.train_run` under the
active MLflow run: ``config.json``, the best checkpoint(s) (``best.pt``, or
``domain-<name>/best.pt`` per domain for the ``single`` variant), a compact item table and the
``cdsr`` source (``code_paths``), so the model loads where the package is not installed.

Input: a DataFrame, one row per request (REST: ``{"dataframe_records": [...]}``)

    item_ids       list[str]  the user's recent history (raw item ids), oldest first
    domains        list[str]  domain name of each event (the domain label the model sees)
    timestamps     list[int]  unix seconds of each event (stable-sorted before use; an
                              integral number such as 1.6e9 is taken as that integer)
    target_domain  str        the domain to recommend in
    k              int        how many items, 1..1000 (optional, default 10)

Every element is checked here: a ``null``, number or list inside ``item_ids`` / ``domains``, or
a ``null``, boolean, string or fractional number inside ``timestamps``, is an error naming the
row, the column and the position. (The signature declares the three lists as ``Array(Any)`` on
purpose: with ``Array(string)`` MLflow's schema enforcement, both when the scoring server parses
the JSON and again in ``PyFuncModel.predict``, silently turns ``[null, "B"]`` into
``["n", "B"]``, ``[1, true]`` into ``["1", "True"]`` and an object into its repr.)

Limits (:class:`cdsr.track.serve.ServeConfig`, logged with the model as ``model_config`` and
overridden where it is loaded by ``CDSR_SERVE_MAX_RECORDS`` / ``CDSR_SERVE_MAX_HISTORY``): more
than ``max_records`` rows is HTTP 413, a history longer than ``max_history`` events is HTTP 400
(the model reads only its last ``max_len`` events anyway).

Output: one row per request: ``item_ids`` (top-k raw ids of the target domain, best first),
``scores`` (their model scores) and ``unknown_items`` (history ids not in the vocabulary: they
are dropped from the history and reported). A history with no known item is allowed: the model
then scores from a fully padded window.

Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``: the scoring server answers
HTTP 400 with the message (prefixed by MLflow with ``Failed to predict data ...``).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

from cdsr.runs import RunDir
from cdsr.track.serve import ServeConfig, env_name, limit_hint

REQUIRED = ("item_ids", "domains", "timestamps", "target_domain")
DEFAULT_K = 10
MAX_K = 1000
CHUNK = 256  # requests scored per forward pass
ITEM_COLUMNS = ["item_idx", "item_id", "domain_idx", "domain"]
# distributions the logged model needs (the cdsr source itself travels as code_paths)
REQUIREMENTS = ("torch", "numpy", "pandas", "polars", "pyarrow", "pyyaml", "cloudpickle", "mlflow")

LIMITS = ("max_records", "max_history")  # the ServeConfig keys the model enforces itself
INT64 = (-(2**63), 2**63 - 1)

INPUT_SCHEMA = Schema([
    # Array(Any), not Array(string) / Array(long): MLflow coerces the elements of a typed array
    # (None -> "n" or "None", 1 -> "1", true -> "True"); predict checks every element itself
    ColSpec(Array(AnyType()), "item_ids"),
    ColSpec(Array(AnyType()), "domains"),
    ColSpec(Array(AnyType()), "timestamps"),
    ColSpec(DataType.string, "target_domain"),
    # "any", not long: with records that give k and records that do not, pandas makes the column
    # float64 with NaN, which a long column would reject; predict validates k itself
    ColSpec(AnyType(), "k", required=False),
])
OUTPUT_SCHEMA = Schema([
    ColSpec(Array(DataType.string), "item_ids"),
    ColSpec(Array(DataType.double), "scores"),
    ColSpec(Array(DataType.string), "unknown_items"),
])


def _bad(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class RequestLimitExceeded(MlflowException):
    """A request past a size limit: HTTP 413 from the scoring server (MLflow maps no error code
    to 413, so the status is set here; the JSON error shape stays MLflow's)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=REQUEST_LIMIT_EXCEEDED)

    def get_http_status_code(self) -> int:
        return 413


def _describe(value: Any) -> str:
    """A request value as a JSON reader would name it: ``null``, ``boolean true``, ``string "1"``..."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    kinds = ((bool, np.bool_, "boolean"), (int, np.integer, "integer"), (float, np.floating, "number"),
             (str, str, "string"), (list, tuple, "array"), (dict, dict, "object"))
    for a, b, kind in kinds:
        if isinstance(value, (a, b)):
            try:
                text = json.dumps(value.item() if isinstance(value, np.generic) else value)
            except (TypeError, ValueError):
                text = repr(value)
            break
    else:
        kind, text = type(value).__name__, repr(value)
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"


def _as_list(value: Any, column: str, row: int) -> list:
    """A request list (list, tuple or 1-d array) as a Python list; anything else is an error."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()  # numpy scalars -> Python ones
    if not isinstance(value, (list, tuple)):
        raise _bad(f"row {row}: '{column}' must be a list, got {_describe(value)}")
    return list(value)


def _strings(values: list, column: str, row: int) -> list[str]:
    for i, x in enumerate(values):
        if not isinstance(x, str):
            raise _bad(f"row {row}: '{column}'[{i}] must be a string, got {_describe(x)}")
    return values


def _timestamps(values: list, row: int) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, x in enumerate(values):
        if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
            v = int(x)
        elif isinstance(x, (float, np.floating)) and math.isfinite(x) and float(x).is_integer():
            v = int(x)
        else:
            raise _bad(f"row {row}: 'timestamps'[{i}] must be an integer (unix seconds), got {_describe(x)}")
        if not INT64[0] <= v <= INT64[1]:
            raise _bad(f"row {row}: 'timestamps'[{i}] is out of the 64-bit integer range, got {_describe(x)}")
        out[i] = v
    return out


def model_limits(model_config: dict | None, env: dict | None = None) -> dict[str, int]:
    """The model's limits: ServeConfig defaults <- ``model_config`` (logged with the model, or given
    to ``load_model``) <- ``CDSR_SERVE_MAX_RECORDS`` / ``CDSR_SERVE_MAX_HISTORY``."""
    env = os.environ if env is None else env
    defaults = ServeConfig()
    out = {}
    for key in LIMITS:
        value: Any = (model_config or {}).get(key, getattr(defaults, key))
        where = f"model_config {key}"
        if env.get(env_name(key), "").strip():
            value, where = env[env_name(key)].strip(), env_name(key)
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if isinstance(value, bool) or number < 1 or (isinstance(value, float) and value != number):
            raise MlflowException(f"{where}: expected a positive integer, got {value!r}",
                                  error_code=INVALID_PARAMETER_VALUE)
        out[key] = number
    return out


class CDSRRecommender(mlflow.pyfunc.PythonModel):
    """History -> top-k items of a requested domain, from the run's best checkpoint(s)."""

    def load_context(self, context) -> None:
        from cdsr.models.base import Vocab

        run = Path(context.artifacts["run"])
        spec = RunDir(run).spec()
        limits = model_limits(getattr(context, "model_config", None))
        self.max_records, self.max_history = limits["max_records"], limits["max_history"]
        items = pd.read_parquet(run / "items.parquet", columns=ITEM_COLUMNS).sort_values("item_idx")
        doms = items.groupby("domain_idx").agg(lo=("item_idx", "min"), hi=("item_idx", "max"),
                                               name=("domain", "first")).sort_index()
        self.names: list[str] = [str(n) for n in doms["name"]]
        self.dom_of_name = {n: d for d, n in enumerate(self.names)}
        self.ranges = doms[["lo", "hi"]].to_numpy(dtype=np.int64)
        self.max_len = spec.evaluate.max_len
        self.variant = spec.variant
        n_items = int(self.ranges[:, 1].max())
        self.item_id = np.full(n_items + 1, "", dtype=object)  # item_idx -> raw id (0 = padding)
        self.item_id[items["item_idx"].to_numpy()] = items["item_id"].astype(str).to_numpy()
        self.idx_of_id = dict(zip(items["item_id"].astype(str), items["item_idx"].astype(int)))

        nets = RunDir(run).load_nets(spec, Vocab.from_ranges(self.ranges, self.names), self.names, torch.device("cpu"))
        self.nets = {None if name is None else self.dom_of_name[name]: net.eval() for name, net in nets.items()}

    def own_ids(self, items: pd.DataFrame, domain_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Another build's ids in this model's: ``items`` (item_idx, item_id) -> [max item_idx + 1]
        this model's item index of each (0: never seen), and ``domain_names`` -> this model's
        domain index of each (-1: unknown). Raw ids are the link, as in a request."""
        to_own = np.zeros(int(items["item_idx"].max()) + 1, dtype=np.int64)
        to_own[items["item_idx"].to_numpy()] = [self.idx_of_id.get(i, 0) for i in items["item_id"].astype(str)]
        return to_own, np.array([self.dom_of_name.get(n, -1) for n in domain_names], dtype=np.int64)

    # -- input --------------------------------------------------------------------------
    def _parse(self, df: pd.DataFrame):
        """-> per-row (item idx list, domain idx list, timestamps), target domains, ks, unknowns."""
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise _bad(f"missing required column(s) {missing}; expected {list(REQUIRED)} and optional 'k'")
        if len(df) > self.max_records:
            raise RequestLimitExceeded(f"request has {len(df)} records, over the limit of {self.max_records} "
                                       f"per request; send them in several requests or {limit_hint('max_records')}")
        known = ", ".join(self.names)
        histories, targets, ks, unknowns = [], [], [], []
        for row, rec in enumerate(df.to_dict("records")):
            lists = {c: _as_list(rec[c], c, row) for c in ("item_ids", "domains", "timestamps")}
            for column, values in lists.items():
                if len(values) > self.max_history:
                    raise _bad(f"row {row}: '{column}' has {len(values)} events, over the history limit of "
                               f"{self.max_history} (the model reads only the last {self.max_len}); send the "
                               f"most recent events only or {limit_hint('max_history')}")
            ids, labels, stamps = lists["item_ids"], lists["domains"], lists["timestamps"]
            if not len(ids) == len(labels) == len(stamps):
                raise _bad(f"row {row}: item_ids, domains and timestamps must have the same length, "
                           f"got {len(ids)}, {len(labels)} and {len(stamps)}")
            _strings(ids, "item_ids", row)
            _strings(labels, "domains", row)
            ts = _timestamps(stamps, row)
            target = rec["target_domain"]
            if not isinstance(target, str) or target not in self.dom_of_name:
                raise _bad(f"row {row}: unknown target_domain {target!r}; known domains: {known}")
            bad_labels = sorted({x for x in labels if x not in self.dom_of_name})
            if bad_labels:
                raise _bad(f"row {row}: unknown domain label(s) {bad_labels} in 'domains'; known domains: {known}")
            k = rec.get("k", DEFAULT_K)
            if k is None or (isinstance(k, float) and math.isnan(k)):
                k = DEFAULT_K
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer, float, np.floating)) \
                    or not math.isfinite(k) or float(k) != int(k) or not 1 <= int(k) <= MAX_K:
                raise _bad(f"row {row}: k must be an integer in 1..{MAX_K}, got {k!r}")
            order = np.argsort(ts, kind="stable")
            idx = np.array([self.idx_of_id.get(i, 0) for i in ids], dtype=np.int64)[order]
            dom = np.array([self.dom_of_name[x] for x in labels], dtype=np.int64)[order]
            keep = idx > 0
            histories.append((idx[keep], dom[keep], ts[order][keep]))
            targets.append(self.dom_of_name[target])
            ks.append(int(k))
            unknowns.append(list(dict.fromkeys(i for i in ids if i not in self.idx_of_id)))
        return histories, np.asarray(targets, dtype=np.int64), ks, unknowns

    def _batch(self, histories, targets: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-aligned [B, L] windows of the last L events (padding 0 / False on the left)."""
        B, L = len(histories), self.max_len
        items = np.zeros((B, L), np.int64)
        doms = np.zeros((B, L), np.int64)
        ts = np.zeros((B, L), np.int64)
        for b, (i, d, t) in enumerate(histories):
            n = min(len(i), L)
            if n:
                items[b, L - n:], doms[b, L - n:], ts[b, L - n:] = i[-n:], d[-n:], t[-n:]
        return self.window_batch(items, doms, ts, targets)

    @staticmethod
    def window_batch(items: np.ndarray, doms: np.ndarray, ts: np.ndarray, targets: np.ndarray) -> dict[str, torch.Tensor]:
        """Right-aligned [B, L] windows (item 0: padding) -> the model's batch."""
        return {"items": torch.from_numpy(items), "domains": torch.from_numpy(doms),
                "timestamps": torch.from_numpy(ts), "mask": torch.from_numpy(items > 0),
                "target_domain": torch.from_numpy(targets), "user_idx": torch.zeros(len(items), dtype=torch.long)}

    # -- scoring ------------------------------------------------------------------------
    def _scores(self, histories, targets: np.ndarray) -> torch.Tensor:
        """[B, n_items + 1] scores; the single variant runs each target domain's own model on
        the history events of that domain only (as SplitData.restrict_to_domain)."""
        with torch.no_grad():
            if self.variant == "merged":
                return self.nets[None].score(self._batch(histories, targets), None).float()
            out = torch.empty(len(targets), int(self.ranges[:, 1].max()) + 1)
            for d in np.unique(targets):
                rows = np.flatnonzero(targets == d)
                sub = [tuple(a[h[1] == d] for a in h) for h in (histories[r] for r in rows)]
                out[torch.from_numpy(rows)] = self.nets[int(d)].score(self._batch(sub, targets[rows]), None).float()
            return out

    def _topk(self, histories, targets: np.ndarray, ks: list[int]) -> tuple[list, list]:
        scores = self._scores(histories, targets)
        # keep only the target domain's columns, then one top-k for the whole batch
        cols = torch.arange(scores.shape[1])
        lo = torch.from_numpy(self.ranges[targets, 0])[:, None]
        hi = torch.from_numpy(self.ranges[targets, 1])[:, None]
        sizes = (hi - lo + 1)[:, 0]
        top = min(max(ks), int(sizes.max()))
        val, idx = scores.masked_fill((cols[None] < lo) | (cols[None] > hi), float("-inf")).topk(top, dim=1)
        out_ids, out_scores = [], []
        for b, k in enumerate(ks):
            n = min(k, int(sizes[b]))
            v = val[b, :n]
            if not torch.isfinite(v).all():
                why = "no known items in history" if len(histories[b][0]) == 0 else "check the checkpoint"
                raise _bad(f"the model gave non-finite scores for a request ({why})")
            out_ids.append(self.item_id[idx[b, :n].numpy()].tolist())
            out_scores.append([float(x) for x in v.tolist()])
        return out_ids, out_scores

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        histories, targets, ks, unknowns = self._parse(df)
        out_ids, out_scores = [], []
        for a in range(0, len(histories), CHUNK):  # bounds the [rows, n_items + 1] score matrix
            ids, scores = self._topk(histories[a:a + CHUNK], targets[a:a + CHUNK], ks[a:a + CHUNK])
            out_ids += ids
            out_scores += scores
        return pd.DataFrame({"item_ids": out_ids, "scores": out_scores, "unknown_items": unknowns})


# -- logging ------------------------------------------------------------------------------
def _requirements() -> list[str]:
    out = []
    for dist in REQUIREMENTS:
        version = importlib.metadata.version(dist).split("+")[0]  # 2.13.0+cpu -> 2.13.0
        out.append(f"{dist}=={version}")
    return out


def _input_example(items: pd.DataFrame) -> pd.DataFrame:
    """One request: the first two items of every domain as history, the first domain as target."""
    first = items.sort_values(["domain_idx", "item_idx"]).groupby("domain_idx").head(2)
    return pd.DataFrame([{
        "item_ids": first["item_id"].astype(str).tolist(),
        "domains": first["domain"].astype(str).tolist(),
        "timestamps": list(range(1_600_000_000, 1_600_000_000 + len(first))),
        "target_domain": str(first["domain"].iloc[0]),
        "k": 5,
    }])


def log_pyfunc(run_dir: Path, items_parquet: Path, name: str = "model",
               serve: ServeConfig | None = None) -> mlflow.models.model.ModelInfo:
    """Log ``run_dir`` (a :func:`cdsr.train.run.train_run` output) as a pyfunc model under the
    active MLflow run; ``items_parquet`` is the dataset's processed ``items.parquet``. The request
    limits of ``serve`` (default: :class:`ServeConfig`'s) are logged with it as ``model_config``."""
    import cdsr

    serve = serve or ServeConfig()
    run_dir, items_parquet = Path(run_dir), Path(items_parquet)
    rd = RunDir(run_dir)
    variant = rd.spec().variant
    items = pd.read_parquet(items_parquet, columns=ITEM_COLUMNS).sort_values("item_idx").reset_index(drop=True)
    names = items.drop_duplicates("domain_idx").sort_values("domain_idx")["domain"].astype(str).tolist()
    with tempfile.TemporaryDirectory(prefix="cdsr-pyfunc-") as tmp:
        stage = Path(tmp) / "run"
        stage.mkdir()
        shutil.copy2(rd.file(RunDir.CONFIG), RunDir(stage).file(RunDir.CONFIG))
        for domain in [None] if variant == "merged" else names:
            part = RunDir(stage).part(domain)
            part.path.mkdir(exist_ok=True)
            shutil.copy2(rd.part(domain).file(RunDir.BEST), part.file(RunDir.BEST))
        items.to_parquet(stage / "items.parquet", index=False)
        code = Path(tmp) / "code" / "cdsr"
        shutil.copytree(Path(cdsr.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models-from-code: no pickle
            artifacts={"run": str(stage)},
            code_paths=[str(code)],
            pip_requirements=_requirements(),
            signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
            input_example=_input_example(items),
            model_config={key: getattr(serve, key) for key in LIMITS},
        )
