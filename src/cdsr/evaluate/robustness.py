"""Robustness protocol (docs/protocols.md "Robustness protocol").

Three kinds of seeded, reproducible corruption of a built split (:class:`SplitData`):

``substitute``   an event's item is replaced by a random *different* item of the same domain
``insert``       a random item of the event's domain is inserted just before the event
``domain_flip``  an event's input domain label is replaced by a random *other* domain

and two places to apply them:

* inference-time noise (``scope="history"``): every event except the test targets may be
  corrupted, the validation target included (it is the most recent event of the test history);
  the *clean* model is evaluated on the test split of the noisy data. :func:`inference_curves` sweeps ``p`` per kind and reports
  each metric together with its relative drop against the clean evaluation.
* training-time noise (``scope="train"``): only events inside each user's training prefix may be
  corrupted; a model is trained on the noisy data and evaluated on the clean data (the retrains
  happen elsewhere; :func:`training_rows` formats their results the same way).

This follows DPG-Diff's robustness study (Beyond Negative Transfer: Disentangled
Preference-Guided Diffusion for Cross-Domain Sequential Recommendation, arXiv 2509.00389, RQ3),
which injects 10-30% random item substitutions / insertions into test sequences and reports the
metric degradation; training-time noise and domain-label noise (AutoCDSR+ is known to depend on
the domain labels) are this project's additions (docs/protocols.md "Robustness protocol").

NOTE (choices):
* Noise is Bernoulli per eligible event (independently with probability ``p``), so the corrupted
  fraction is ``p`` in expectation rather than exactly ``p`` per user; this keeps every user's
  expected corruption equal and the whole perturbation one vectorised draw.
* ``insert`` adds at most one event before each eligible event (so "that many" items, ``p`` times
  the eligible count, in expectation). The inserted event takes the timestamp and the domain of
  the event it precedes, so sequences stay time-ordered and the insertion is plausible within the
  domain the user was browsing; its item is uniform over that domain (it may coincide with a
  real item of the user).
* ``domain_flip`` only changes input domain labels: the item stays, so the label no longer matches
  the item's id range. Targets and their domains are never touched. It is an inference-time
  corruption only: in a training prefix every event after the first is also a training target,
  whose domain selects the softmax slice of the loss, so ``scope="train"`` is refused.
* ``substitute`` leaves an event of a one-item domain unchanged (there is no different item).
* The random draw is made for all events at once with ``numpy.random.Generator(PCG64(seed))``;
  :func:`noise_seed` derives a distinct seed per (kind, p) from the configured seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import PROTOCOLS

KINDS = ("substitute", "insert", "domain_flip")
SCOPES = ("history", "train")


def _as_tuple(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"robustness.{name}: expected a list, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class RobustnessConfig:
    p: tuple[float, ...] = (0.1, 0.2, 0.3)
    inference: tuple[str, ...] = ("substitute", "insert", "domain_flip")  # inference-time noise kinds
    train: tuple[str, ...] = ("substitute",)  # training-time noise kinds (each needs a retrain per p)
    # noise fractions of the training-time runs (one retrain each); None: the same as ``p``
    train_p: tuple[float, ...] | None = None
    protocol: str = "full"  # evaluation protocol of the curves
    metrics: tuple[str, ...] = ("NDCG@10", "HR@10", "MRR")
    seed: int = 0

    @property
    def train_levels(self) -> tuple[float, ...]:
        """The p values of the training-time runs."""
        return self.p if self.train_p is None else self.train_p

    def __post_init__(self) -> None:
        for name in ("p", "inference", "train", "metrics"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name)))
        bad_p = [p for p in self.p if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1]
        if bad_p:
            raise ValueError(f"robustness.p: noise fractions must lie strictly between 0 and 1, got {bad_p}")
        object.__setattr__(self, "p", tuple(float(p) for p in self.p))
        if self.train_p is not None:
            tp = _as_tuple("train_p", self.train_p)
            if not all(not isinstance(p, bool) and isinstance(p, (int, float)) and 0 < p < 1 for p in tp) \
                    or len(set(tp)) != len(tp):
                raise ValueError(f"robustness.train_p: distinct fractions strictly between 0 and 1, got {list(tp)}")
            object.__setattr__(self, "train_p", tuple(float(p) for p in tp))
        if len(set(self.p)) != len(self.p):
            raise ValueError(f"robustness.p: duplicate fractions in {list(self.p)}")
        for name in ("inference", "train"):
            kinds = getattr(self, name)
            unknown = [k for k in kinds if k not in KINDS]
            if unknown:
                raise ValueError(f"robustness.{name}: unknown noise kind(s) {unknown}; known: {list(KINDS)}")
            if len(set(kinds)) != len(kinds):
                raise ValueError(f"robustness.{name}: duplicate kinds in {list(kinds)}")
        if "domain_flip" in self.train:
            raise ValueError("robustness.train: 'domain_flip' is an inference-time noise only (flipping the "
                             "labels of training targets breaks the per-domain loss); use it under 'inference'")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"robustness.protocol: unknown protocol {self.protocol!r}; known: {sorted(PROTOCOLS)}")
        if not self.metrics or not all(isinstance(m, str) and m for m in self.metrics):
            raise ValueError(f"robustness.metrics: expected a non-empty list of metric names, got {list(self.metrics)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"robustness.seed: expected an integer, got {self.seed!r}")


def noise_seed(cfg: RobustnessConfig, kind: str, p: float) -> int:
    """The deterministic seed of the (kind, p) perturbation: a hash of (cfg.seed, kind, p), distinct
    across kinds and fractions, the same for the inference and the training curves."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {list(KINDS)}")
    ss = np.random.SeedSequence([int(cfg.seed), KINDS.index(kind), round(float(p) * 1_000_000)])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))  # a non-negative int63


def _target_index(data: SplitData, split: str | None = None) -> np.ndarray:
    """Global flat index of every target row's event (row order of ``data.targets``), or of the
    rows of one ``split`` only."""
    t = data.targets if split is None else data.targets.filter(pl.col("split") == split)
    user = t["user_idx"].to_numpy().astype(np.int64)
    pos = t["pos"].to_numpy().astype(np.int64)
    lens = np.diff(data.offsets)
    bad = (pos < 0) | (pos >= lens[user])
    if bad.any():
        raise ValueError(f"{int(bad.sum())} target rows point outside their user's sequence")
    return data.offsets[user] + pos


def _eligible(data: SplitData, scope: str) -> np.ndarray:
    """[E] bool: events that noise may touch. ``history``: all but the test targets (the
    validation target is the most recent event of the test history, and the most informative one:
    sparing it would hide most of the noise); ``train``: the training prefixes."""
    n = len(data.items)
    lens = np.diff(data.offsets)
    ok = np.ones(n, dtype=bool)
    if scope == "train":
        user = np.repeat(np.arange(len(lens)), lens)
        pos = np.arange(n) - np.repeat(data.offsets[:-1], lens)
        ok = pos < data.train_ends()[user]
    ok[_target_index(data, "test" if scope == "history" else None)] = False
    return ok


def perturb(data: SplitData, kind: str, p: float, seed: int, scope: str = "history") -> SplitData:
    """Return a NEW SplitData (the input is not modified) with noise ``kind`` at rate ``p``.

    scope="history": every event except the test targets is eligible (the validation target is
    part of the test history): inference-time noise; evaluate a clean model on the result's
    *test* split (its validation targets may be corrupted).
    scope="train": only events inside each user's training prefix (positions < ``train_ends()``)
    are eligible: train a model on the result, evaluate on the clean data.

    substitute: each eligible event, with probability p, gets a uniformly random different item of
    its domain (domain label and timestamp unchanged).
    insert: before each eligible event, with probability p, one new event is inserted: a uniformly
    random item of that event's domain, with its domain label and timestamp. Offsets, target ``pos``
    and ``train_end`` are remapped: each target row points at the same original event, and each
    training prefix holds its original events plus the insertions made before them.
    domain_flip: each eligible event, with probability p, gets a uniformly random other domain
    label (item unchanged); not allowed with scope="train" (see the module NOTE).

    Seeded: the same (data, kind, p, seed, scope) gives the same result. ``negatives``,
    ``domain_ranges`` and ``domain_names`` are shared with the input (never modified).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known: {list(KINDS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown noise scope {scope!r}; known: {list(SCOPES)}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"noise fraction p must lie in [0, 1], got {p}")
    if kind == "domain_flip" and scope == "train":
        raise ValueError("domain_flip is an inference-time noise: with scope='train' it would relabel training "
                         "targets, whose domain selects the per-domain loss")
    n_dom = len(data.domain_ranges)
    if kind == "domain_flip" and n_dom < 2:
        raise ValueError("domain_flip needs at least two domains")

    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(data.items)
    lo = data.domain_ranges[:, 0].astype(np.int64)
    size = (data.domain_ranges[:, 1] - data.domain_ranges[:, 0] + 1).astype(np.int64)
    hit = _eligible(data, scope) & (rng.random(n) < float(p))
    train_end = None if data.train_end is None else np.array(data.train_end, dtype=np.int64)

    if kind == "substitute":
        hit &= size[data.domains] > 1
        d = data.domains[hit]
        shift = rng.integers(1, size[d])  # 1 .. size - 1: never the same item
        items = data.items.copy()
        items[hit] = lo[d] + (data.items[hit] - lo[d] + shift) % size[d]
        return SplitData(items=items, domains=data.domains.copy(), timestamps=data.timestamps.copy(),
                         offsets=data.offsets.copy(), targets=data.targets, negatives=data.negatives,
                         domain_ranges=data.domain_ranges, domain_names=data.domain_names, train_end=train_end)

    if kind == "domain_flip":
        domains = data.domains.copy()
        domains[hit] = (data.domains[hit] + rng.integers(1, n_dom, size=int(hit.sum()))) % n_dom
        return SplitData(items=data.items.copy(), domains=domains, timestamps=data.timestamps.copy(),
                         offsets=data.offsets.copy(), targets=data.targets, negatives=data.negatives,
                         domain_ranges=data.domain_ranges, domain_names=data.domain_names, train_end=train_end)

    return _insert(data, hit, rng, lo, size)


def _insert(data: SplitData, hit: np.ndarray, rng: np.random.Generator, lo: np.ndarray, size: np.ndarray) -> SplitData:
    """:func:`perturb`'s ``insert``: one random same-domain event before each ``hit`` event."""
    n = len(data.items)
    # insert: C[j] = insertions before original event j (exclusive prefix count, length E + 1)
    c = np.concatenate([[0], np.cumsum(hit)]).astype(np.int64)
    new_at = np.arange(n, dtype=np.int64) + c[1:]  # new flat index of each original event
    total = n + int(c[-1])
    d = data.domains[hit]
    slot = new_at[hit] - 1  # the inserted event sits just before its neighbour
    items = np.empty(total, np.int64)
    domains = np.empty(total, np.int64)
    timestamps = np.empty(total, np.int64)
    items[new_at], domains[new_at], timestamps[new_at] = data.items, data.domains, data.timestamps
    items[slot] = lo[d] + rng.integers(0, size[d])
    domains[slot] = d
    timestamps[slot] = data.timestamps[hit]
    offsets = (data.offsets + c[data.offsets]).astype(np.int64)
    starts = data.offsets[:-1]
    te = data.train_ends().astype(np.int64)
    train_end = te + c[starts + te] - c[starts]
    t_user = data.targets["user_idx"].to_numpy().astype(np.int64)
    t_new = new_at[_target_index(data)] - offsets[t_user]
    targets = data.targets.with_columns(pl.Series("pos", t_new, dtype=data.targets.schema["pos"]))
    negatives = data.negatives
    if negatives is not None and "pos" in negatives.columns:
        # timestamp split: a negatives row is keyed by its target's pos, which moved with it
        key = data.targets.select("user_idx", "split", "pos", pl.Series("new_pos", t_new, dtype=negatives.schema["pos"]))
        negatives = (negatives.join(key, on=["user_idx", "split", "pos"], how="left")
                     .with_columns(pl.col("new_pos").alias("pos")).select(negatives.columns))
    return SplitData(items=items, domains=domains, timestamps=timestamps, offsets=offsets, targets=targets,
                     negatives=negatives, domain_ranges=data.domain_ranges, domain_names=data.domain_names,
                     train_end=train_end)


def relative_drop(clean: float, noisy: float) -> float:
    """(clean - noisy) / clean; 0.0 when the clean metric is 0."""
    clean, noisy = float(clean), float(noisy)
    return 0.0 if clean == 0.0 else (clean - noisy) / clean


def _row(scope: str, kind: str, p: float, clean: dict[str, float], value: dict[str, float],
         cfg: RobustnessConfig) -> dict:
    missing = [m for m in cfg.metrics if m not in value or m not in clean]
    if missing:
        raise KeyError(f"metric(s) {missing} missing from the evaluation result (have {sorted(value)})")
    row: dict = {"scope": scope, "kind": kind, "p": float(p)}
    row.update({m: float(value[m]) for m in cfg.metrics})
    row.update({f"rel_drop_{m}": relative_drop(clean[m], value[m]) for m in cfg.metrics})
    return row


def inference_curves(evaluate_fn: Callable[[SplitData], dict[str, float]], data: SplitData,
                     cfg: RobustnessConfig) -> list[dict]:
    """Inference-time noise curves of one trained model.

    ``evaluate_fn(data)`` returns the overall test metrics of the model on ``data`` (e.g.
    ``summarise(...)["overall"]`` under ``cfg.protocol``). Rows: the clean evaluation (kind
    "clean", p 0.0, relative drops 0.0), then for each kind of ``cfg.inference`` and each p the
    metrics on ``perturb(data, kind, p, noise_seed(cfg, kind, p), scope="history")`` with their
    relative drops against the clean values.
    """
    clean = evaluate_fn(data)
    rows = [_row("inference", "clean", 0.0, clean, clean, cfg)]
    for kind in cfg.inference:
        for p in cfg.p:
            noisy = perturb(data, kind, p, noise_seed(cfg, kind, p), scope="history")
            rows.append(_row("inference", kind, p, clean, evaluate_fn(noisy), cfg))
    return rows


def training_rows(clean: dict[str, float], noisy: dict[tuple[str, float], dict[str, float]],
                  cfg: RobustnessConfig) -> list[dict]:
    """Training-time noise rows (scope "train"), same format as :func:`inference_curves`.

    ``clean``: overall test metrics of the model trained on clean data; ``noisy[(kind, p)]``: those
    of the model trained on ``perturb(data, kind, p, noise_seed(cfg, kind, p), scope="train")``,
    for every kind of ``cfg.train`` and p of ``cfg.p``.
    """
    missing = [(k, p) for k in cfg.train for p in cfg.train_levels if (k, p) not in noisy]
    if missing:
        raise KeyError(f"training-noise results missing for {missing}")
    rows = [_row("train", "clean", 0.0, clean, clean, cfg)]
    rows += [_row("train", k, p, clean, noisy[(k, p)], cfg) for k in cfg.train for p in cfg.train_levels]
    return rows
