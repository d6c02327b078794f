"""The command line shared by the method-study scripts (hstu_cd_study.py, gca_study.py):
train the selected variants of a grid for some seeds, then print the report."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def study_main(doc: str, grid: dict, run_grid: Callable[[str, list[int], Path, list[str], list[str]], None],
               report: Callable[[str, Path], str], out: str, dataset: str = "amazon-food-kitchen-benchmark") -> int:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=dataset)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--variants", nargs="+", default=list(grid), choices=list(grid))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override, e.g. train.lr=0.001")
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        run_grid(args.dataset, args.seeds, args.out, args.sets, args.variants)
    print(report(args.dataset, args.out))
    return 0


def train_grid(grid: dict[str, tuple[str, tuple[str, ...]]], common: tuple[str, ...], epochs: int,
               dataset: str, seeds: list[int], out: Path, sets: list[str], variants: list[str],
               protocol: str = "sampled-999") -> None:
    """Train every (seed, variant) of ``grid`` (variant -> (model, its --set overrides)) that has no
    ``metrics.json`` yet into ``<out>/<dataset>/<variant>-s<seed>`` (an interrupted run resumes)."""
    from cdsr.config import load_params
    from cdsr.train.run import apply_overrides, train_run

    for seed in seeds:
        for name in variants:
            model, own = grid[name]
            run_dir = out / dataset / f"{name}-s{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            t0 = time.time()
            # the study's budget first, so a variant's or --set train.epochs=N applies over it
            params = apply_overrides(load_params(), model, [f"train.epochs={epochs}", *common, *own, *sets])
            m = train_run(dataset, model, "merged", params, run_dir, seed=seed)
            print(f"{dataset} {name}-s{seed}: {time.time() - t0:.0f} s, {protocol} NDCG@10 "
                  f"{m['protocols'][protocol]['overall']['NDCG@10']:.4f}", flush=True)


def fit_rows(runs: list[dict]) -> tuple[str, float, list[dict]]:
    """For the metrics.json of a variant's runs: "epochs run (1-based best), ...", mean wall
    seconds per epoch, and each run's epoch record at its best epoch ({} if absent)."""
    fits = [r["fit"]["merged"] for r in runs]
    epochs = ", ".join(f"{f['epochs_run']} ({f['best_epoch'] + 1})" for f in fits)
    per_epoch = sum(f["train_seconds"] / max(f["epochs_run"], 1) for f in fits) / len(fits)
    best = [next((h for h in r["history"]["merged"] if h["epoch"] == f["best_epoch"]), {}) for r, f in zip(runs, fits)]
    return epochs, per_epoch, best
