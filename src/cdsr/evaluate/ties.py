"""Sampled-metric estimators compared on one trained model: cdsr's ``sampled-K`` against ABXI's.

cdsr's ``sampled-K`` ranks each target against the first K negatives of one stored, seeded draw
and counts a tie against the target. ABXI redraws its K negatives at every evaluation and counts
a tie in the target's favour (rank = #negatives scoring strictly higher + 1). For continuous
scores ties have probability zero and a fixed draw is one sample of the same random draw ABXI
repeats, so both estimate the same expectation; :func:`compare_estimators` measures it on a
trained run:

- ``stored/pessimistic``: cdsr's protocol, exactly as the benchmark reports it;
- ``stored/optimistic``: the same scores with ABXI's tie rule (isolates the tie rule);
- ``redraw/optimistic``: ABXI's estimator: ``draws`` fresh draws (same sampler as the split
  stage: uniform over the target's domain without replacement, excluding the user's items of
  that domain), each with its own seed, mean and standard deviation over draws;
- the number of rows where some negative ties the target.

Every candidate set is scored once per draw; both tie rules read the same scores.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from cdsr.data.loaders import EvalDataset
from cdsr.data.split import sample_negatives
from cdsr.evaluate.metrics import metrics_from_ranks, ranks_sampled
from cdsr.evaluate.protocols import EvalConfig, _check_negatives, input_events

METRICS = ("HR@5", "HR@10", "NDCG@10", "MRR")


def _ranks(models, split: str, k: int, ev: EvalConfig) -> dict[str, torch.Tensor]:
    """Both tie rules' ranks for every ``split`` target of a run's models (pooled), the target
    domain of each row and whether some negative ties the target."""
    out: dict[str, list[torch.Tensor]] = {"pess": [], "opt": [], "domain": [], "tied": [], "n": []}
    for _, view, net in models:
        dev = next(net.parameters()).device
        ds = EvalDataset(view, split, ev.max_len, n_negatives=k, max_events=input_events(view, ev))
        _check_negatives(view, ds, k, f"sampled-{k}")
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(ds), ev.batch_size):
                    b = {key: v.to(dev) for key, v in ds[np.arange(start, min(start + ev.batch_size, len(ds)))].items()}
                    cands = torch.cat([b["target"][:, None], b["negatives"]], 1)
                    s = net.score(b, cands).float()
                    n = b["n_negatives"]
                    pess, opt = ranks_sampled(s, n, "pessimistic"), ranks_sampled(s, n, "optimistic")
                    out["pess"].append(pess.cpu())
                    out["opt"].append(opt.cpu())
                    out["tied"].append((pess != opt).cpu())
                    out["domain"].append(b["target_domain"].cpu())
                    out["n"].append((1 + n).cpu())
        finally:
            net.train(was)
    return {key: torch.cat(v) for key, v in out.items()}


def _per_domain(ranks: torch.Tensor, n_cand: torch.Tensor, domain: torch.Tensor, names: list[str]) -> dict:
    res = {}
    for d, name in enumerate(names):
        sel = domain == d
        if bool(sel.any()):
            m = metrics_from_ranks(ranks[sel], n_cand[sel])
            res[name] = {key: m[key] for key in METRICS}
    return res


def compare_estimators(run_dir: Path, split: str = "test", k: int = 999, draws: int = 5, seed: int = 1000) -> dict[str, Any]:
    """The three estimators on ``run_dir``'s best checkpoint (see the module docstring). The
    checkpoint(s) are loaded once; each fresh draw only replaces the data's negatives."""
    from cdsr.runs import RunDir, views
    from cdsr.train.run import load_split

    rd = RunDir(run_dir)
    spec = rd.spec()
    data = load_split(spec.dataset, spec.data_root)
    processed = Path(spec.data_root) / spec.dataset / "processed"
    ev = spec.evaluate
    names = data.domain_names
    models = rd.load_models(data)

    stored = _ranks(models, split, k, ev)
    out: dict[str, Any] = {
        "run": str(run_dir), "dataset": spec.dataset, "model": spec.model, "split": split, "k": k,
        "rows": len(stored["pess"]),
        "stored_pessimistic": _per_domain(stored["pess"], stored["n"], stored["domain"], names),
        "stored_optimistic": _per_domain(stored["opt"], stored["n"], stored["domain"], names),
        "stored_tied_rows": int(stored["tied"].sum()),
        "redraw_seeds": [seed + r for r in range(draws)],
    }
    # the sampler's inputs, as the split stage reads them (read once for every draw)
    seqs = pl.read_parquet(processed / "sequences.parquet").select("user_idx", "items")
    items = pl.read_parquet(processed / "items.parquet")
    per_draw, tied = [], 0
    for r in range(draws):
        # a timestamp split keys its draws by (user, split, pos): several targets per user
        with_pos = data.negatives is not None and "pos" in data.negatives.columns
        fresh = dataclasses.replace(data, negatives=sample_negatives(seqs, data.targets, items, k, seed + r,
                                                                     with_pos=with_pos))
        redrawn = [(name, view, net) for (_, _, net), (name, view) in zip(models, views(fresh, spec.variant))]
        ranks = _ranks(redrawn, split, k, ev)
        per_draw.append(_per_domain(ranks["opt"], ranks["n"], ranks["domain"], names))
        tied += int(ranks["tied"].sum())
    out["redraw_optimistic"] = {
        name: {m: {"mean": float(np.mean([p[name][m] for p in per_draw])),
                   "std": float(np.std([p[name][m] for p in per_draw], ddof=1)) if draws > 1 else math.nan}
               for m in METRICS} for name in per_draw[0]}
    out["redraw_tied_rows"] = tied
    gaps = [(abs(out["stored_pessimistic"][n][m] - r["mean"]), r["std"])
            for n, ms in out["redraw_optimistic"].items() for m, r in ms.items()]
    out["max_abs_diff"] = max(g for g, _ in gaps)
    # in units of the draw-to-draw spread (None when a draw is the whole domain: no spread)
    scaled = [g / sd for g, sd in gaps if sd > 0]
    out["max_abs_diff_in_draw_std"] = max(scaled) if scaled else None
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [(f"{res['model']} {res['run']} ({res['split']}, K={res['k']}, {res['rows']} rows; tied rows: stored "
             f"{res['stored_tied_rows']}, redraws {res['redraw_tied_rows']})"),
             f"{'domain':28s} {'metric':8s} {'stored/pess':>11s} {'stored/opt':>11s} {'redraw/opt mean +- std':>24s}"]
    for name, ms in res["redraw_optimistic"].items():
        for m in METRICS:
            r = ms[m]
            lines.append(f"{name:28s} {m:8s} {res['stored_pessimistic'][name][m]:11.4f} "
                         f"{res['stored_optimistic'][name][m]:11.4f} {r['mean']:15.4f} +- {r['std']:.4f}")
    sd = res["max_abs_diff_in_draw_std"]
    lines.append(f"largest |stored/pess - redraw mean|: {res['max_abs_diff']:.4f}"
                 + (f" ({sd:.2f} draw standard deviations)" if sd is not None else ""))
    return "\n".join(lines)
