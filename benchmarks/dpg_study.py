"""The DPG-Diff study (issue 8): train the grid on Food-Kitchen, sweep the inference steps,
stress-test robustness, then report.

    python benchmarks/dpg_study.py --seeds 1 2 3 --variants sasrec dpg     # train (resumable)
    python benchmarks/dpg_study.py --seeds 1 --variants gca-stack
    python benchmarks/dpg_study.py --seeds 1 2 --variants dpg-e30   # continues dpg-s1, dpg-s2
    python benchmarks/dpg_study.py --seeds 1 --variants dpg-no-cl dpg-no-guidance dpg-concat
    python benchmarks/dpg_study.py --sweep          # t_inf in {1, 2, 5, 10, 20} on every dpg run
    python benchmarks/dpg_study.py --robustness     # substitute / insert 10-30% on test histories
    python benchmarks/dpg_study.py --report-only

The grid (METHODS.md "DPG-Diff"; seed 004 Table 3), one config change each:

    sasrec            the merged SASRec baseline
    dpg               DPG-Diff, params.yaml defaults
    dpg-no-cl         without tri-view contrastive learning (lambda_cl = 0); this and the next
                      two: at most 10 epochs
    dpg-no-guidance   the denoiser sees x_t and t only (guidance = none)
    dpg-concat        cross-attention to the guidance replaced by concatenation (guidance = concat)
    dpg-rec-x0        ours, not the seed's: the softmax loss also on x_0 (lambda_rec_x0 = 1)
    dpg-e30           dpg-s<seed> continued to at most 30 epochs (DPG-Diff learns slowly)
    gca-stack         the best method of the earlier studies (GCA_stack; gca_study.py stack-sig-ln)

Each run is ``cdsr.train.run.train_run`` (what
``cdsr train`` calls) into ``<out>/<dataset>/<variant>-s<seed>``: early stopping on validation
NDCG@10 under ``full`` (patience 3, at most 20 epochs); test metrics under ``sampled-999`` and
``full``. ``--sweep`` re-scores each finished DPG run's best checkpoint with every t_inf (and 0:
x_0 itself) and times it per test user; ``--robustness`` runs the robustness protocol's
inference-time noise (cdsr.evaluate.robustness) on the baselines and DPG-Diff. Both cache their
results in the run directory (``sweep.json``, ``robustness-study.json``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


import numpy as np
import torch

import cdsr  # noqa: F401
from _study import fit_rows, study_main, train_grid
from gca_study import GRID as GCA_GRID
from cdsr.config import from_dict
from cdsr.data.loaders import EvalDataset
from cdsr.evaluate.protocols import EvalConfig, summarise
from cdsr.evaluate.robustness import RobustnessConfig, inference_curves
from cdsr.train.run import load_run_models, load_split, rank_run

ABLATION_BUDGET = "train.epochs=10"
GRID: dict[str, tuple[str, tuple[str, ...]]] = {
    "sasrec": ("sasrec", ()),
    "dpg": ("dpg", ()),
    # NOTE: the ablations train for 10 epochs, not 20: a 2-core VM does not fit three more
    # 35-minute runs next to the main grid. The report compares them at matched epochs too.
    "dpg-no-cl": ("dpg", ("model.lambda_cl=0", ABLATION_BUDGET)),
    "dpg-no-guidance": ("dpg", ("model.guidance=none", ABLATION_BUDGET)),
    "dpg-concat": ("dpg", ("model.guidance=concat", ABLATION_BUDGET)),
    "dpg-rec-x0": ("dpg", ("model.lambda_rec_x0=1.0",)),
    # DPG-Diff given 30 epochs: dpg-s<seed> continued from its last epoch (see CONTINUES)
    "dpg-e30": ("dpg", ("train.epochs=30",)),
    # the best method of the earlier studies
    "gca-stack": GCA_GRID["stack-sig-ln"],
}
COMMON = ("evaluate.protocols=[sampled-999,full]", "train.patience=3")  # as benchmarks/gca_study.py
EPOCHS = 20
BEST_SO_FAR = "gca-stack"
METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@10")
T_INF = (0, 1, 2, 5, 10, 20)
ROBUST = RobustnessConfig(p=(0.1, 0.2, 0.3), inference=("substitute", "insert"), train=(), protocol="full",
                          metrics=METRICS, seed=0)


# variant -> the variant whose finished run it continues. There is no learning-rate schedule and
# resuming is exact, so continuing a 20-epoch run to 30 is the same run as a fresh 30-epoch one,
# for 10 epochs of work instead of 30.
CONTINUES = {"dpg-e30": "dpg"}


def run_grid(dataset: str, seeds: list[int], out: Path, sets: list[str], variants: list[str]) -> None:
    for seed in seeds:
        for name in variants:
            if name in CONTINUES:
                src, dst = out / dataset / f"{CONTINUES[name]}-s{seed}", out / dataset / f"{name}-s{seed}"
                if not (dst / "last.pt").exists():
                    if not (src / "metrics.json").exists():
                        raise SystemExit(f"{name}-s{seed} continues {src}: train that run first")
                    dst.mkdir(parents=True, exist_ok=True)
                    for f in ("last.pt", "best.pt", "steps.csv", "history.json"):
                        shutil.copy2(src / f, dst / f)
            train_grid(GRID, COMMON, EPOCHS, dataset, [seed], out, sets, [name], "full")


def _runs(dataset: str, out: Path) -> dict[str, list[Path]]:
    """variant -> its finished run directories."""
    found: dict[str, list[Path]] = {}
    for name in GRID:
        found[name] = sorted(p.parent for p in (out / dataset).glob(f"{name}-s*/metrics.json")
                             if p.parent.name.rsplit("-s", 1)[0] == name)
    return {k: v for k, v in found.items() if v}


def _eval_cfg(run: Path) -> EvalConfig:
    return from_dict(EvalConfig, json.loads((run / "config.json").read_text())["evaluate"], "evaluate")


def _todo(dataset: str, out: Path, keep, cache: str):
    """(run, its eval config, cache path) of the finished runs of the variants ``keep(name)``
    accepts that have no ``cache`` file yet."""
    for name, runs in _runs(dataset, out).items():
        if keep(name):
            for run in runs:
                if not (run / cache).exists():
                    yield run, _eval_cfg(run), run / cache


def sweep(dataset: str, out: Path) -> None:
    """t_inf sweep on every finished DPG run (the best checkpoint, re-scored; training unchanged)."""
    data = load_split(dataset)
    for run, ev, cache in _todo(dataset, out, lambda n: GRID.get(n, ("",))[0] == "dpg", "sweep.json"):
        [(_, view, net)] = load_run_models(run, data)
        test = EvalDataset(view, "test", net.cfg.max_len)
        batches = [test[np.arange(s, min(s + ev.batch_size, len(test)))] for s in range(0, len(test), ev.batch_size)]
        rows = []
        net.eval()  # rank_run restores the flag it finds
        for t in T_INF:
            net.cfg = dataclasses.replace(net.cfg, t_inf=t)
            row = {"t_inf": t}
            with torch.no_grad():  # the user representation alone: encoders + t_inf denoiser calls
                net.represent(batches[0])  # warm-up
                t0 = time.perf_counter()
                for b in batches:
                    net.represent(b)
            row["represent_ms_per_user"] = 1000 * (time.perf_counter() - t0) / len(test)
            for proto in ("full", "sampled-999"):
                t0 = time.perf_counter()
                res = rank_run([(None, view, net)], "test", proto, ev)
                row[f"{proto}_seconds"] = time.perf_counter() - t0
                row[f"{proto}_ms_per_user"] = 1000 * row[f"{proto}_seconds"] / len(res)
                row[proto] = summarise(res, data.domain_names, ev)
            rows.append(row)
            print(f"{run.name} t_inf={t}: full NDCG@10 {row['full']['overall']['NDCG@10']:.4f}, "
                  f"{row['full_ms_per_user']:.3f} ms / user", flush=True)
        cache.write_text(json.dumps(rows, indent=1) + "\n")


def robustness(dataset: str, out: Path) -> None:
    """Inference-time substitute / insert noise at 10-30% of the test histories, clean models."""
    data = load_split(dataset)
    for run, ev, cache in _todo(dataset, out, lambda n: n in ("sasrec", "dpg", "dpg-e30", BEST_SO_FAR), "robustness-study.json"):
        models = load_run_models(run, data)
        t0 = time.time()
        rows = inference_curves(lambda d: summarise(rank_run([(n, d, m) for n, _, m in models], "test", ROBUST.protocol, ev),
                                                    d.domain_names, ev)["overall"], data, ROBUST)
        cache.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"{run.name}: robustness in {time.time() - t0:.0f} s", flush=True)


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs):.4f}"


def report(dataset: str, out: Path) -> str:
    runs = _runs(dataset, out)
    if not runs:
        return f"no runs under {out / dataset}"
    ms = {k: [json.loads((r / "metrics.json").read_text()) for r in v] for k, v in runs.items()}
    domains = list(next(iter(ms.values()))[0]["protocols"]["full"]["domains"])
    short = [d.split("_")[0] for d in domains]
    lines = []
    for proto in ("sampled-999", "full"):
        head = [f"{k} {s}" for s in short for k in METRICS]
        lines += [f"#### `{dataset}`: test, `{proto}` (mean +- sd over seeds)", "",
                  "| method | seeds | parameters | " + " | ".join(head) + " | overall NDCG@10 |", "|" + "---|" * (4 + len(head))]
        for name, rs in ms.items():
            cells = [_ms([r["protocols"][proto]["domains"][d][k] for r in rs]) for d in domains for k in METRICS]
            lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {rs[0].get('parameters', 0):,} | "
                         + " | ".join(cells) + f" | {_ms([r['protocols'][proto]['overall']['NDCG@10'] for r in rs])} |")
        lines.append("")
    for base in ("sasrec", BEST_SO_FAR):
        if base not in ms:
            continue
        lines += [f"Relative change of NDCG@10 vs {base} (ratio of seed means):", "",
                  "| method | " + " | ".join(f"{p} {s}" for p in ("sampled-999", "full") for s in [*short, "overall"]) + " |",
                  "|" + "---|" * (1 + 2 * (len(short) + 1))]
        for name, rs in ms.items():
            cells = []
            for p in ("sampled-999", "full"):
                for d in [*domains, "overall"]:
                    get = (lambda r, p=p: r["protocols"][p]["overall"]) if d == "overall" else \
                        (lambda r, p=p, d=d: r["protocols"][p]["domains"][d])
                    a = statistics.mean(get(r)["NDCG@10"] for r in rs)
                    b = statistics.mean(get(r)["NDCG@10"] for r in ms[base])
                    cells.append(f"{100 * (a / b - 1):+.1f}%")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| method | epochs run (best) | s / epoch (wall, as run) | loss terms at the best epoch (rec / diff / cl) "
              "| val cos(g_t, g_o) at the best epoch |",
              "|---|---|---|---|---|"]
    for name, rs in ms.items():
        ep, spe, best = fit_rows(rs)
        terms = []
        for rec in best:
            if "rec" in rec:
                terms.append("/".join(f"{rec[k]:.3f}" for k in ("rec", "diff", "cl") if k in rec))
        cos = "; ".join(f"{rec['val_cos_guidance']:.2f}" for rec in best if "val_cos_guidance" in rec)
        lines.append(f"| {name} | {ep} | {spe:.0f} | {'; '.join(terms) or '-'} | {cos or '-'} |")
    # matched epochs: the ablations' 10-epoch budget against the other runs' first 10 epochs
    at = (1, 2, 4, 6, 8, 10)
    lines += ["", "Validation NDCG@10 (`full`) after the first epochs (1-based; mean +- sd over seeds; "
              "the ablations' budget is 10 epochs):", "",
              "| method | seeds | " + " | ".join(f"epoch {e}" for e in at) + " | best in the first 10 |",
              "|" + "---|" * (3 + len(at))]
    for name, rs in ms.items():
        curves = [[h["val_NDCG@10"] for h in r["history"]["merged"]] for r in rs]
        cells = [_ms([c[e - 1] for c in curves]) if all(len(c) >= e for c in curves) else "-" for e in at]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {_ms([max(c[:10]) for c in curves])} |")
    # inference-step sweep
    sweeps = {name: [json.loads((r / "sweep.json").read_text()) for r in rs if (r / "sweep.json").exists()]
              for name, rs in runs.items()}
    sweeps = {k: v for k, v in sweeps.items() if v}
    if sweeps:
        lines += ["", "Inference-step sweep (test; t_inf = 0 scores x_0 without denoising; ms per test user "
                  "as run, for the user representation alone and for the whole ranking):", "",
                  "| method | t_inf | seeds | full NDCG@10 | full HR@10 | sampled-999 NDCG@10 | representation ms / user "
                  "| full ms / user | sampled-999 ms / user |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, ss in sweeps.items():
            for i, t in enumerate(T_INF):
                rows = [s[i] for s in ss]
                lines.append(f"| {name} | {t} | {len(rows)} | {_ms([r['full']['overall']['NDCG@10'] for r in rows])} | "
                             f"{_ms([r['full']['overall']['HR@10'] for r in rows])} | "
                             f"{_ms([r['sampled-999']['overall']['NDCG@10'] for r in rows])} | "
                             f"{statistics.mean(r['represent_ms_per_user'] for r in rows):.3f} | "
                             f"{statistics.mean(r['full_ms_per_user'] for r in rows):.3f} | "
                             f"{statistics.mean(r['sampled-999_ms_per_user'] for r in rows):.3f} |")
    rob = {name: [json.loads((r / "robustness-study.json").read_text()) for r in rs
                  if (r / "robustness-study.json").exists()] for name, rs in runs.items()}
    rob = {k: v for k, v in rob.items() if v}
    if rob:
        lines += ["", "Robustness (test, `full`, overall NDCG@10 with its relative change against the clean "
                  "evaluation; p = fraction of test-history events substituted / preceded by an inserted item):", "",
                  "| method | seeds | clean NDCG@10 | " + " | ".join(f"{k} {p}" for k in ROBUST.inference for p in ROBUST.p) + " |",
                  "|" + "---|" * (3 + len(ROBUST.inference) * len(ROBUST.p))]
        for name, rr in rob.items():
            cells = []
            for k in ROBUST.inference:
                for p in ROBUST.p:
                    v = [next(x for x in r if x["kind"] == k and abs(x["p"] - p) < 1e-9) for r in rr]
                    cells.append(f"{statistics.mean(x['NDCG@10'] for x in v):.4f} "
                                 f"({-100 * statistics.mean(x['rel_drop_NDCG@10'] for x in v):+.1f}%)")
            clean = [next(x for x in r if x["kind"] == "clean") for r in rr]
            lines.append(f"| {name} | {len(rr)} | {statistics.mean(x['NDCG@10'] for x in clean):.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ds = sys.argv[sys.argv.index("--dataset") + 1] if "--dataset" in sys.argv else "amazon-food-kitchen-benchmark"
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path("runs/dpg")
    if "--sweep" in sys.argv:
        sweep(ds, out)
        print(report(ds, out))
        return 0
    if "--robustness" in sys.argv:
        robustness(ds, out)
        print(report(ds, out))
        return 0
    return study_main(__doc__, GRID, run_grid, report, "runs/dpg")


if __name__ == "__main__":
    sys.exit(main())
