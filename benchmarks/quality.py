"""Quality benchmark: train model x variant x seed on one dataset and write a result table.

    python benchmarks/quality.py --dataset amazon-food-kitchen-benchmark \
        --models sasrec hstu bert4rec --variants merged single --seeds 1 --epochs 30

Each run is `cdsr.train.run.train_run` (what `cdsr train` calls) into
``runs/quality/<dataset>/<model>-<variant>-s<seed>``; a run whose metrics.json exists is not
retrained, and an interrupted run resumes from its checkpoint, so the command can be re-run.
Prints a markdown table (and writes it with --table) of test metrics per protocol and domain,
with ABXI's published sampled-999 numbers beside them for Food-Kitchen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cdsr  # noqa: F401
from cdsr.config import load_params
from cdsr.leaderboard import PUBLISHED
from cdsr.train.run import apply_overrides, hardware, train_run

ABXI = PUBLISHED["amazon-food-kitchen-benchmark"]["domains"]  # official code README v2.1, 5 seeds, sampled-999
COLS = ("HR@5", "HR@10", "NDCG@10", "MRR")


def table(rows: list[dict], protocol: str, dataset: str) -> str:
    domains = list(rows[0]["protocols"][protocol]["domains"]) if rows else []
    head = "| model | variant | seed | epochs (best) | " + " | ".join(f"{d[:12]} {c}" for d in domains for c in COLS) + " |"
    out = [head, "|" + "---|" * (4 + len(domains) * len(COLS))]
    for m in rows:
        dom = m["protocols"][protocol]["domains"]
        fit = m["fit"]
        ep = ", ".join(f"{v['epochs_run']} ({v['best_epoch'] + 1})" for v in fit.values())
        out.append(f"| {m['model']} | {m['variant']} | {m['seed']} | {ep} | "
                   + " | ".join(f"{dom[d][c]:.4f}" for d in domains for c in COLS) + " |")
    if protocol == "sampled-999" and dataset.startswith("amazon-food-kitchen") and set(domains) == set(ABXI):
        out.append("| ABXI (published, 5 seeds) | | | | " + " | ".join(f"{ABXI[d][c]:.4f}" for d in domains for c in COLS) + " |")
    return "\n".join(out)


def summary(root: Path, protocols: tuple[str, ...] = ("full", "sampled-999"), metric: str = "NDCG@10") -> str:
    """Mean +- sample sd over every seed found under ``root`` (one metrics.json per run)."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for f in sorted(root.glob("*/metrics.json")):
        m = json.loads(f.read_text())
        groups.setdefault(f.parent.name.rsplit("-s", 1)[0], []).append(m)  # <model>-<variant>[-<tag>]
    if not groups:
        return "no runs found"
    domains = list(next(iter(groups.values()))[0]["protocols"][protocols[0]]["domains"])
    head = "| run | seeds | " + " | ".join(f"{p} {metric} {d[:12]}" for p in protocols for d in domains) + " |"
    out = [head, "|" + "---|" * (2 + len(protocols) * len(domains))]
    for name, runs in groups.items():
        cells = []
        for p in protocols:
            for d in domains:
                xs = [r["protocols"][p]["domains"][d][metric] for r in runs]
                sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
                cells.append(f"{statistics.mean(xs):.4f} +- {sd:.4f}" if len(xs) > 1 else f"{xs[0]:.4f}")
        out.append(f"| {name} | {','.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-food-kitchen-benchmark")
    ap.add_argument("--models", nargs="+", default=["sasrec", "hstu", "bert4rec"])
    ap.add_argument("--variants", nargs="+", default=["merged", "single"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="param override, e.g. train.patience=5")
    ap.add_argument("--tag", default="", help="run-name suffix for a variant of the settings, e.g. alpha0.1 "
                    "(runs are <model>-<variant>[-<tag>]-s<seed>)")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--table", type=Path, default=None, help="write the markdown tables here")
    ap.add_argument("--summary", action="store_true", help="only print mean +- sd over all seeds already run")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.out / args.dataset))
        return 0
    rows = []
    for model in args.models:
        for variant in args.variants:
            for seed in args.seeds:
                name = f"{model}-{variant}" + (f"-{args.tag}" if args.tag else "")
                run_dir = args.out / args.dataset / f"{name}-s{seed}"
                if (run_dir / "metrics.json").exists():
                    rows.append(json.loads((run_dir / "metrics.json").read_text()))
                    continue
                t0 = time.time()
                params = apply_overrides(load_params(), model, args.sets)
                m = train_run(args.dataset, model, variant, params, run_dir, seed=seed, epochs=args.epochs)
                rows.append(m)
                full = m["protocols"]["full"]["overall"]
                print(f"{name}-s{seed}: {time.time() - t0:.0f} s, full NDCG@10 {full['NDCG@10']:.4f}", flush=True)
    protocols = list(rows[0]["protocols"]) if rows else []
    text = [f"Dataset `{args.dataset}`, test split, hardware: {json.dumps(hardware())}", ""]
    for p in protocols:
        text += [f"### {p}", "", table(rows, p, args.dataset), ""]
    text.append("Run time per run (s): " + ", ".join(f"{r['model']}-{r['variant']}-s{r['seed']} {r['seconds']:.0f}" for r in rows))
    out = "\n".join(text) + "\n"
    print(out)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
