"""The DPG-Diff study (issue 8): ``cdsr study run dpg --seeds 1,2,3 --variants sasrec,dpg``.

The grid (docs/methods.md "DPG-Diff"; seed 004 Table 3), one config change each:

    sasrec            the merged SASRec baseline
    dpg               DPG-Diff, params.yaml defaults
    dpg-no-cl         without tri-view contrastive learning (lambda_cl = 0); this and the next
                      two: at most 10 epochs
    dpg-no-guidance   the denoiser sees x_t and t only (guidance = none)
    dpg-concat        cross-attention to the guidance replaced by concatenation (guidance = concat)
    dpg-rec-x0        ours, not the seed's: the softmax loss also on x_0 (lambda_rec_x0 = 1)
    dpg-e30           dpg-s<seed> continued to at most 30 epochs (DPG-Diff learns slowly)
    gca-stack         the best method of the earlier studies (the gca study's stack-sig-ln)

Early stopping on validation NDCG@10 under ``full`` (patience 3, at most 20 epochs); test metrics
under ``sampled-999`` and ``full``. The report first computes what a finished run lacks and
caches it in its directory: ``sweep.json`` (each DPG run's best checkpoint re-scored with every
t_inf in ``T_INF``, 0 scoring x_0 itself, timed per test user) and ``robustness-study.json``
(inference-time substitute / insert noise at 10-30% of the test histories on SASRec, DPG-Diff and
GCA_stack; cdsr.evaluate.robustness); then prints the tables.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from cdsr.evaluate.robustness import RobustnessConfig
from cdsr.studies import gca
from cdsr.studies import tables as t
from cdsr.studies.grid import Run, Study, Variant, collect, metrics_of, no_runs

# NOTE: the ablations train for 10 epochs, not 20: a 2-core VM does not fit three more
# 35-minute runs next to the main grid. The report compares them at matched epochs too.
ABLATION_BUDGET = "train.epochs=10"
GRID = {
    "sasrec": Variant("sasrec"),
    "dpg": Variant("dpg"),
    "dpg-no-cl": Variant("dpg", ("model.lambda_cl=0", ABLATION_BUDGET)),
    "dpg-no-guidance": Variant("dpg", ("model.guidance=none", ABLATION_BUDGET)),
    "dpg-concat": Variant("dpg", ("model.guidance=concat", ABLATION_BUDGET)),
    "dpg-rec-x0": Variant("dpg", ("model.lambda_rec_x0=1.0",)),
    # There is no learning-rate schedule and resuming is exact, so continuing a 20-epoch run to 30
    # is the same run as a fresh 30-epoch one, for 10 epochs of work instead of 30.
    "dpg-e30": Variant("dpg", ("train.epochs=30",), continues="dpg"),
    "gca-stack": gca.GRID["stack-sig-ln"],
}
COMMON = gca.COMMON
EPOCHS = 20
BEST_SO_FAR = "gca-stack"
METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR@10")
PROTOCOLS = ("sampled-999", "full")
T_INF = (0, 1, 2, 5, 10, 20)
ROBUST = RobustnessConfig(p=(0.1, 0.2, 0.3), inference=("substitute", "insert"), train=(), protocol="full",
                          metrics=METRICS, seed=0)
ROBUST_VARIANTS = ("sasrec", "dpg", "dpg-e30", BEST_SO_FAR)
MATCHED_EPOCHS = (1, 2, 4, 6, 8, 10)


# -- cached extras ---------------------------------------------------------------------------------

def sweep_run(run: Run, data) -> list[dict]:
    """The best checkpoint re-scored with every t_inf (training unchanged), timed per test user."""
    from cdsr.data.loaders import EvalDataset
    from cdsr.evaluate.protocols import summarise
    from cdsr.train.run import rank_run

    ev = run.dir.spec().evaluate
    [(_, view, net)] = run.dir.load_models(data)
    test = EvalDataset(view, "test", net.cfg.max_len)
    batches = [test[np.arange(s, min(s + ev.batch_size, len(test)))] for s in range(0, len(test), ev.batch_size)]
    rows = []
    net.eval()
    for tinf in T_INF:
        net.cfg = dataclasses.replace(net.cfg, t_inf=tinf)
        row: dict = {"t_inf": tinf}
        with torch.no_grad():  # the user representation alone: encoders + t_inf denoiser calls
            net.represent(batches[0])  # warm-up
            t0 = time.perf_counter()
            for b in batches:
                net.represent(b)
        row["represent_ms_per_user"] = 1000 * (time.perf_counter() - t0) / len(test)
        for proto in PROTOCOLS[::-1]:
            t0 = time.perf_counter()
            res = rank_run([(None, view, net)], "test", proto, ev)
            row[f"{proto}_seconds"] = time.perf_counter() - t0
            row[f"{proto}_ms_per_user"] = 1000 * row[f"{proto}_seconds"] / len(res)
            row[proto] = summarise(res, data.domain_names, ev)
        rows.append(row)
    return rows


def robustness_run(run: Run, data) -> list[dict]:
    """Inference-time substitute / insert noise on the test histories, clean model."""
    from cdsr.evaluate.protocols import summarise
    from cdsr.evaluate.robustness import inference_curves
    from cdsr.train.run import rank_run

    ev = run.dir.spec().evaluate
    models = run.dir.load_models(data)
    return inference_curves(lambda d: summarise(rank_run([(n, d, m) for n, _, m in models], "test", ROBUST.protocol, ev),
                                                d.domain_names, ev)["overall"], data, ROBUST)


def extras(groups: dict[str, list[Run]], dataset: str, data_root: str | Path) -> None:
    """Compute the sweep and robustness caches that finished runs lack."""
    from cdsr.train.run import load_split

    todo = [(r, "sweep.json", sweep_run) for name, rs in groups.items() if GRID[name].model == "dpg" for r in rs]
    todo += [(r, "robustness-study.json", robustness_run) for name, rs in groups.items() if name in ROBUST_VARIANTS
             for r in rs]
    todo = [x for x in todo if x[0].dir.read_json(x[1]) is None]
    data = load_split(dataset, data_root) if todo else None
    for run, cache, compute in todo:
        run.dir.write_json(cache, compute(run, data))


# -- tables ----------------------------------------------------------------------------------------

def _metric_tables(dataset: str, runs: dict, domains: list[str], short: list[str]) -> list[str]:
    lines = []
    for proto in PROTOCOLS:
        rows = [[name, t.seeds(ms), f"{ms[0].parameters or 0:,}", *t.cells(ms, proto, domains, METRICS),
                 t.mean_sd(t.values(ms, proto, None, "NDCG@10"))] for name, ms in runs.items()]
        lines += [f"#### `{dataset}`: test, `{proto}` (mean +- sd over seeds)", "",
                  *t.markdown(["method", "seeds", "parameters", *(f"{k} {s}" for s in short for k in METRICS),
                               "overall NDCG@10"], rows), ""]
    for base in ("sasrec", BEST_SO_FAR):
        if base in runs:
            rows = [[name, *(c for p in PROTOCOLS for c in t.relative(ms, runs[base], p, [*domains, t.OVERALL],
                                                                      ["NDCG@10"]))] for name, ms in runs.items()]
            lines += [f"Relative change of NDCG@10 vs {base} (ratio of seed means):", "",
                      *t.markdown(["method", *(f"{p} {s}" for p in PROTOCOLS for s in [*short, t.OVERALL])], rows), ""]
    return lines


def _training_tables(runs: dict) -> list[str]:
    rows = []
    for name, ms in runs.items():
        ep, spe, best = t.fit_rows(ms)
        terms = ["/".join(f"{rec[k]:.3f}" for k in ("rec", "diff", "cl") if k in rec) for rec in best if "rec" in rec]
        cos = "; ".join(f"{rec['val_cos_guidance']:.2f}" for rec in best if "val_cos_guidance" in rec)
        rows.append([name, ep, f"{spe:.0f}", "; ".join(terms) or "-", cos or "-"])
    lines = t.markdown(["method", "epochs run (best)", "s / epoch (wall, as run)",
                        "loss terms at the best epoch (rec / diff / cl)", "val cos(g_t, g_o) at the best epoch"], rows)
    # matched epochs: the ablations' 10-epoch budget against the other runs' first 10 epochs
    rows = []
    for name, ms in runs.items():
        curves = [[h["val_NDCG@10"] for h in m.history["merged"]] for m in ms]
        cells = [t.mean_sd(c[e - 1] for c in curves) if all(len(c) >= e for c in curves) else "-"
                 for e in MATCHED_EPOCHS]
        rows.append([name, len(ms), *cells, t.mean_sd(max(c[:10]) for c in curves)])
    return [*lines, "", ("Validation NDCG@10 (`full`) after the first epochs (1-based; mean +- sd over seeds; "
            "the ablations' budget is 10 epochs):"), "",
            *t.markdown(["method", "seeds", *(f"epoch {e}" for e in MATCHED_EPOCHS), "best in the first 10"], rows)]


def _sweep_table(groups: dict[str, list[Run]]) -> list[str]:
    sweeps = {name: [s for s in (r.dir.read_json("sweep.json") for r in rs) if s] for name, rs in groups.items()}
    rows = []
    for name, ss in sweeps.items():
        for i, tinf in enumerate(T_INF if ss else ()):
            rr = [s[i] for s in ss]
            rows.append([name, tinf, len(rr), t.mean_sd(r["full"]["overall"]["NDCG@10"] for r in rr),
                         t.mean_sd(r["full"]["overall"]["HR@10"] for r in rr),
                         t.mean_sd(r["sampled-999"]["overall"]["NDCG@10"] for r in rr),
                         *(f"{t.mean(r[k] for r in rr):.3f}" for k in
                           ("represent_ms_per_user", "full_ms_per_user", "sampled-999_ms_per_user"))])
    if not rows:
        return []
    return ["", ("Inference-step sweep (test; t_inf = 0 scores x_0 without denoising; ms per test user "
            "as run, for the user representation alone and for the whole ranking):"), "",
            *t.markdown(["method", "t_inf", "seeds", "full NDCG@10", "full HR@10", "sampled-999 NDCG@10",
                         "representation ms / user", "full ms / user", "sampled-999 ms / user"], rows)]


def _robustness_table(groups: dict[str, list[Run]]) -> list[str]:
    rob = {name: [x for x in (r.dir.read_json("robustness-study.json") for r in rs) if x] for name, rs in groups.items()}
    rows = []
    for name, rr in ((k, v) for k, v in rob.items() if v):
        cells = []
        for kind in ROBUST.inference:
            for p in ROBUST.p:
                v = [next(x for x in r if x["kind"] == kind and abs(x["p"] - p) < 1e-9) for r in rr]
                cells.append(f"{t.mean(x['NDCG@10'] for x in v):.4f} "
                             f"({-100 * t.mean(x['rel_drop_NDCG@10'] for x in v):+.1f}%)")
        clean = [next(x for x in r if x["kind"] == "clean") for r in rr]
        rows.append([name, len(rr), f"{t.mean(x['NDCG@10'] for x in clean):.4f}", *cells])
    if not rows:
        return []
    return ["", ("Robustness (test, `full`, overall NDCG@10 with its relative change against the clean "
            "evaluation; p = fraction of test-history events substituted / preceded by an inserted item):"), "",
            *t.markdown(["method", "seeds", "clean NDCG@10", *(f"{k} {p}" for k in ROBUST.inference for p in ROBUST.p)],
                        rows)]


def report(study: Study, dataset: str, out: Path, data_root: str | Path = "data") -> str:
    groups = collect(study, dataset, out)
    if not groups:
        return no_runs(dataset, out)
    extras(groups, dataset, data_root)
    runs = metrics_of(groups)
    domains = t.domains_of(next(iter(runs.values())), "full")
    short = [d.split("_")[0] for d in domains]
    return "\n".join([*_metric_tables(dataset, runs, domains, short), *_training_tables(runs),
                      *_sweep_table(groups), *_robustness_table(groups)])


STUDY = Study("dpg", __doc__, GRID, report, common=COMMON, epochs=EPOCHS, out="runs/dpg")
