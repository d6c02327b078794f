"""Versions of what a run's numbers depend on, and the fingerprints that keep them honest.

A results record (:mod:`cdsr.store`) is identified by its configuration, seed, data version and
these versions: ``pipeline`` (training loop, loaders, evaluation) and one per model. A change
that changes no number keeps every record valid, however much code it moves; a change that
changes numbers must bump a version, which marks the records of the older version stale
(listed as such, never averaged with current ones).

What enforces it: ``behaviour.json`` beside this file holds, per model and per preset, the
losses of three seeded training steps and the scores that follow on a fixed batch, computed in
float32 on one CPU thread (:func:`fingerprint`), and the pipeline's figures on the test suite's
tiny dataset. ``tests/test_behaviour.py`` recomputes them; when they differ beyond float noise
the test fails and says which version to bump (then ``python -m cdsr.behaviour --write``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch

FILE = Path(__file__).with_name("behaviour.json")
# relative tolerance of a fingerprint: float32 across CPUs (AVX2 / AVX-512 reductions) differs by
# ~1e-6 after three steps; any change of the math moves these numbers by far more
RTOL, ATOL = 1e-3, 1e-5


@functools.lru_cache(maxsize=1)
def load() -> dict[str, Any]:
    """``behaviour.json`` (read once per process: readers ask for every record's versions)."""
    return json.loads(FILE.read_text())


def versions(model: str) -> dict[str, int]:
    """The behaviour versions a run of ``model`` records: ``{"pipeline": n, "model": m}``."""
    b = load()
    if model not in b["models"]:
        raise KeyError(f"{FILE}: no behaviour version for model {model!r}; add it (python -m cdsr.behaviour --write)")
    return {"pipeline": int(b["pipeline"]["version"]), "model": int(b["models"][model]["version"])}


def _batch(D: int, n_items: int, B: int = 4, L: int = 12) -> dict[str, torch.Tensor]:
    """A fixed merged batch: right-aligned rows with padding, D domains of n_items / D items."""
    g = torch.Generator().manual_seed(0)
    per = n_items // D
    doms = torch.randint(0, D, (B, L), generator=g)
    items = doms * per + torch.randint(1, per + 1, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, :8] = False
    items, doms = items * mask, doms * mask
    ts = (torch.cumsum(torch.randint(0, 3, (B, L), generator=g) * 86400, 1) + 1_400_000_000) * mask
    tdom = torch.roll(doms, -1, 1)
    tdom[:, -1] = torch.randint(0, D, (B,), generator=g)
    targets = (tdom * per + torch.randint(1, per + 1, (B, L), generator=g)) * mask
    return {"items": items, "domains": doms, "timestamps": ts, "mask": mask, "targets": targets,
            "target_domains": tdom * mask, "target_domain": tdom[:, -1], "target": targets[:, -1],
            "user_idx": torch.arange(B), "target_timestamps": ts, "target_timestamp": ts[:, -1]}


def fingerprint(model: str, section: dict[str, Any]) -> dict[str, list[float]]:
    """The step statistics (losses, Pareto weights) of three AdamW steps (lr 1e-2, the model's
    own training strategy) of ``model`` at config ``section`` on a fixed
    2-domain batch (60 items, windows of 12), then its scores of the batch's last positions
    against every item: the numbers any change of the model's math moves."""
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.train.config import TrainConfig
    from cdsr.train.strategy import select_strategy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = model_config(model, {**section, "max_len": 12}, "merged")
        vocab = Vocab(60, ((1, 30), (31, 60)), ("A", "B"))
        torch.manual_seed(0)
        net = build_model(model, cfg, vocab)
        b = _batch(2, 60)
        tc = TrainConfig(lr=1e-2)
        opt = torch.optim.AdamW(net.parameters(), lr=tc.lr)
        strategy = select_strategy(net, tc)  # the model's own update (AutoCDSR: the Pareto step)
        losses = []
        net.train()
        for _ in range(3):
            stats = strategy.step(net, b, opt, tc, contextlib.nullcontext)
            losses += [float(stats[k]) for k in sorted(stats)]
        net.eval()
        with torch.no_grad():
            s = net.score(b)[:, 1:].float()
        return {"losses": losses, "scores": [float(x) for x in s[:, :8].flatten()] + [float(s.sum())]}
    finally:
        torch.set_num_threads(threads)


def tiny_split(users: int = 48, per_domain: int = 30, seed: int = 0):
    """A small in-memory leave-one-out split of 2 domains (sequences of 5-20 events; every
    other item of the target's domain stored as its sampled negatives)."""
    import numpy as np
    import polars as pl

    from cdsr.data.loaders import SplitData

    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 21, users)
    doms = rng.integers(0, 2, lens.sum())
    items = doms * per_domain + rng.integers(1, per_domain + 1, lens.sum())
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    rows, negs = [], []
    for split, back in (("valid", 2), ("test", 1)):
        pos = lens - back
        at = offsets[:-1] + pos
        for u in range(users):
            d, tgt = int(doms[at[u]]), int(items[at[u]])
            rows.append((u, split, int(pos[u]), tgt, d))
            negs.append((u, split, [i for i in range(d * per_domain + 1, (d + 1) * per_domain + 1) if i != tgt]))
    targets = pl.DataFrame(rows, schema=["user_idx", "split", "pos", "item_idx", "domain_idx"], orient="row")
    negatives = pl.DataFrame(negs, schema=["user_idx", "split", "negatives"], orient="row")
    return SplitData(items=items.astype(np.int64), domains=doms.astype(np.int64),
                     timestamps=(np.arange(lens.sum()) * 3600 + 1_400_000_000).astype(np.int64), offsets=offsets,
                     targets=targets, negatives=negatives,
                     domain_ranges=np.array([[1, per_domain], [per_domain + 1, 2 * per_domain]], dtype=np.int64),
                     domain_names=["A", "B"])


def pipeline_fingerprint(run_dir: Path) -> dict[str, list[float]]:
    """The training loop, loaders and evaluation end to end: SASRec (d 16) trained 3 epochs on
    :func:`tiny_split` (warm-up, plateau schedule, validation each epoch), then its test metrics
    under ``full`` and ``sampled-100``."""
    from cdsr.evaluate.protocols import EvalConfig, rank_targets, summarise
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.train.config import ScheduleConfig, TrainConfig
    from cdsr.train.loop import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tiny_split()
        torch.manual_seed(0)
        net = build_model("sasrec", model_config("sasrec", {"d": 16, "layers": 1, "max_len": 16}, "merged"),
                          Vocab(60, ((1, 30), (31, 60)), ("A", "B")))
        cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, amp=False, progress=False, device="cpu",
                          schedule=ScheduleConfig(kind="plateau", warmup_epochs=1, plateau_patience=1))
        ev = EvalConfig(protocols=["full", "sampled-100"], max_len=16)
        res = fit(net, data, cfg, seed=0, run_dir=run_dir, eval_cfg=ev)
        out = {"history": [float(h[k]) for h in res.history for k in ("loss", "val_selection")]}
        for p in ev.protocols:
            overall = summarise(rank_targets(net, data, "test", p, ev), data.domain_names, ev)["overall"]
            out[p] = [float(overall[k]) for k in sorted(overall) if k != "n"]
        return out
    finally:
        torch.set_num_threads(threads)


def configurations(params: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """What is fingerprinted: each registered model at its params.yaml section, and each preset
    at its model settings (``preset:<name>``); d is capped at 32 to keep it fast."""
    from cdsr.models.registry import MODELS
    from cdsr.presets import presets
    from cdsr.runs import apply_overrides

    models = params.get("models") or {}
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for m in sorted(MODELS):
        out[m] = (m, dict(models.get(m) or {}))
    for name, p in sorted(presets(params).items()):
        sets = [s for s in p.set if s.startswith("model.")]
        out[f"preset:{name}"] = (p.model, apply_overrides(params, p.model, sets)["models"].get(p.model) or {})
    for key, (m, sec) in out.items():
        if int(sec.get("d", 32)) > 32:
            out[key] = (m, {**sec, "d": 32})
    return out


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= ATOL + RTOL * abs(y) for x, y in zip(a, b))


def compute_all(params: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    return {key: fingerprint(m, sec) for key, (m, sec) in configurations(params).items()}


def write(params: dict[str, Any]) -> None:
    """Refresh the fingerprints in ``behaviour.json`` keeping (or starting at 1) the versions."""
    import tempfile

    from cdsr.models.registry import MODELS

    old = load() if FILE.exists() else {"pipeline": {"version": 1}, "models": {}}
    models = {m: {"version": int(old["models"].get(m, {}).get("version", 1))} for m in sorted(MODELS)}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = pipeline_fingerprint(Path(tmp))
    data = {"pipeline": {"version": int(old["pipeline"]["version"]), "fingerprint": pipeline},
            "models": models, "fingerprints": compute_all(params)}
    text = json.dumps(data, indent=1)
    # one line per list of numbers: a changed fingerprint is one changed line in a diff
    text = re.sub(r"\[[^\[\]{}]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    FILE.write_text(text + "\n")
    load.cache_clear()


if __name__ == "__main__":  # python -m cdsr.behaviour --write
    import sys

    import yaml

    if "--write" not in sys.argv:
        raise SystemExit("usage: python -m cdsr.behaviour --write   (after bumping a version in behaviour.json)")
    write(yaml.safe_load(Path("params.yaml").read_text()))
    print(f"wrote {FILE}")
