"""Batch recommendations: a served model's top-k for every user of a build, to one Parquet file.

:func:`recommend_all` loads the model as it is served (``models:/cdsr-<dataset>@champion``, the
pyfunc's own vocabulary and checkpoint), reads the build in ``<data_root>/<dataset>/processed``
and writes one row per user and domain: ``user_id``, ``target_domain``, ``item_ids`` (the top-k of
that domain, best first, raw ids) and ``scores``. A user's input is the last ``max_len`` events of
their whole history in the build, with the items the model never saw dropped (as serving drops
them; their count is in the file's metadata). The file's key-value metadata holds the model URI,
its registered version (when it has one), the data version (MD5 of ``split.parquet``), k and the
counts. ``flows/recommend.py`` runs it as a Prefect flow (deployment ``recommend-synthetic``);
``benchmarks/batch_recommend.py`` gives its throughput.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cdsr.data.loaders import SplitData

BATCH = 1024  # users per forward pass


def windows(data: SplitData, to_model: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's last ``max_len`` events the model knows (``to_model``: build item id -> the
    model's, 0 unseen), right-aligned -> (model item ids [U, L], event indices [U, L] into the
    build's flat arrays, valid [U, L])."""
    known = to_model[data.items] > 0
    kidx = np.flatnonzero(known)
    lens = np.diff(data.offsets)
    user = np.repeat(np.arange(len(lens)), lens)
    n_known = np.bincount(user[known], minlength=len(lens))
    end = np.cumsum(n_known)  # exclusive end of each user's known events in kidx
    cols = end[:, None] - max_len + np.arange(max_len)[None, :]
    valid = cols >= (end - n_known)[:, None]
    ev = kidx[np.clip(cols, 0, max(len(kidx) - 1, 0))] if len(kidx) else np.zeros_like(cols)
    return np.where(valid, to_model[data.items[ev]], 0), ev, valid


def _scores(rec, ids, doms, ts, valid, d: int) -> torch.Tensor:
    """[n, n_items + 1] scores for target domain ``d`` of right-aligned windows, as served: the
    merged model takes them as one batch; the single variant goes through the pyfunc's own
    per-domain path."""
    target = np.full(len(ids), d, dtype=np.int64)
    if rec.variant == "merged":  # ids are 0 exactly where a window has no event
        return rec.nets[None].score(rec.window_batch(ids, doms, ts, target), None).float()
    return rec._scores([(i[v], dm[v], t[v]) for i, dm, t, v in zip(ids, doms, ts, valid)], target)


def recommend(rec, processed: Path, k: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``rec`` (a loaded :class:`cdsr.track.pyfunc.CDSRRecommender`) on the build in ``processed``
    -> (one row per user and domain the model knows, the counts)."""
    data = SplitData.load(processed)
    items = pd.read_parquet(processed / "items.parquet", columns=["item_idx", "item_id"])
    users = pd.read_parquet(processed / "users.parquet", columns=["user_idx", "user_id"]).sort_values("user_idx")
    to_model, dom_to_model = rec.own_ids(items, data.domain_names)
    ids, ev, valid = windows(data, to_model, rec.max_len)
    doms = np.where(valid, dom_to_model[data.domains[ev]], 0)
    ts = np.where(valid, data.timestamps[ev], 0)
    U, out = len(ids), []
    for d, name in enumerate(rec.names):
        lo, hi = (int(x) for x in rec.ranges[d])
        top = min(k, hi - lo + 1)
        for a in range(0, U, BATCH):
            sl = slice(a, min(a + BATCH, U))
            scores = _scores(rec, ids[sl], doms[sl], ts[sl], valid[sl], d)[:, lo:hi + 1]
            val, idx = scores.topk(top, dim=1)
            out.append(pd.DataFrame({"user_idx": np.arange(sl.start, sl.stop), "target_domain": name,
                                     "item_ids": list(rec.item_id[(idx + lo).numpy()]),
                                     "scores": list(val.numpy().astype(np.float32))}))
    df = pd.concat(out, ignore_index=True)
    df.insert(0, "user_id", users["user_id"].to_numpy()[df.pop("user_idx").to_numpy()])
    counts = {"users": U, "rows": len(df), "dropped_history_events": int((to_model[data.items] == 0).sum()),
              "unseen_items": int((to_model[1:] == 0).sum())}
    return df, counts


def recommend_all(model_uri: str, dataset: str, data_root: str | Path, k: int, out: Path,
                  tcfg=None) -> dict[str, Any]:
    """Write ``out`` (Parquet, atomically) for ``model_uri`` on the current build of ``dataset``;
    returns the file's metadata (model and data versions, counts, seconds, users per second)."""
    import mlflow

    from cdsr.track import tracking
    from cdsr.track.serve import alias_of

    if not 1 <= k <= 1000:
        raise ValueError(f"k must be in 1..1000, got {k}")
    tracking.setup(tcfg)
    version = None
    if (alias := alias_of(model_uri)) is not None:  # pin the version: the alias may move meanwhile
        version = str(mlflow.MlflowClient().get_model_version_by_alias(*alias).version)
        model_uri = f"models:/{alias[0]}/{version}"
    elif model_uri.startswith("models:/") and model_uri.rsplit("/", 1)[-1].isdigit():
        version = model_uri.rsplit("/", 1)[-1]
    rec = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    processed = Path(data_root) / dataset / "processed"
    t0 = time.perf_counter()
    with torch.no_grad():
        df, counts = recommend(rec, processed, k)
    seconds = time.perf_counter() - t0
    meta = {"model_uri": model_uri, "model_version": version, "dataset": dataset, "k": k,
            "data_version": tracking.data_version(dataset, data_root).get("split.parquet", "unknown"),
            **counts, "seconds": round(seconds, 3), "users_per_second": round(counts["users"] / max(seconds, 1e-9), 1)}
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"cdsr": json.dumps(meta).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")  # a kill leaves the old file or the new one, never half
    pq.write_table(table, tmp)
    tmp.replace(out)
    return meta


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``cdsr`` metadata of a file :func:`recommend_all` wrote."""
    return json.loads(pq.read_schema(path).metadata[b"cdsr"])
