"""The AutoCDSR study (issue 5): compare trained runs, read their attention, stress their domain labels.

    cdsr study run autocdsr --seeds 1,2,3 --variants sasrec-merged,autocdsr_sasrec-merged \
        --variants bert4rec-merged,autocdsr_bert4rec-merged,autocdsr_plus-merged
    cdsr study run autocdsr --seeds 1 --variants autocdsr_sasrec-merged-fixed-alpha0.1 \
        --variants autocdsr_sasrec-merged-fixed-alpha1.0
    cdsr study report autocdsr

Runs are ``<model>-<variant>[-<tag>]-s<seed>`` under ``runs/autocdsr/<dataset>/`` (the SASRec
family: patience 3, params.yaml's epochs; the BERT4Rec family: patience 10, at most 40 epochs).
The report computes what a run lacks and caches it in ``<run>/study.json``, then prints markdown tables: test Recall@10 (= HR@10: one relevant item per
query) and NDCG@10 per protocol and domain (mean +- sample sd over seeds); the relative change of
each AutoCDSR variant against its backbone, beside the paper's claims; the cross-domain attention
mass of each best checkpoint (backbones are read through their AutoCDSR subclass, same
parameters); the Pareto ratio per step (from steps.csv); seconds per training epoch as the runs
went (wall time; `benchmarks/train_speed.py` measures step time); and the domain-label noise
results: inference-time ``domain_flip`` of the test histories (clean models of ``FLIP_MODELS``)
and training with a mislabelled catalogue (``model.label_noise``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from cdsr.runs import RunDir
from cdsr.studies import tables as t
from cdsr.studies.grid import Run, Study, Variant, collect, metrics_of, no_runs

# The BERT4Rec family: its validation NDCG@10 sits on a plateau for the first 8-12 epochs, so
# patience 10 and at most 40 epochs (docs/results.md); the SASRec family: patience 3 (COMMON).
BERT4REC_FAMILY = ("train.patience=10", "train.epochs=40")
GRID = {
    "sasrec-merged": Variant("sasrec"),
    "autocdsr_sasrec-merged": Variant("autocdsr_sasrec"),
    "bert4rec-merged": Variant("bert4rec", BERT4REC_FAMILY),
    "autocdsr_bert4rec-merged": Variant("autocdsr_bert4rec", BERT4REC_FAMILY),
    "autocdsr_plus-merged": Variant("autocdsr_plus", BERT4REC_FAMILY),
    # the fixed-weight baseline (paper Figure 4)
    "autocdsr_sasrec-merged-fixed-alpha0.1": Variant("autocdsr_sasrec", ("model.mode=fixed", "model.alpha=0.1")),
    "autocdsr_sasrec-merged-fixed-alpha1.0": Variant("autocdsr_sasrec", ("model.mode=fixed", "model.alpha=1.0")),
    # issue 19: L_cd scaled per attention cell (the reference code) instead of per query
    "autocdsr_sasrec-merged-cell": Variant("autocdsr_sasrec", ("model.cd_scale=cell",)),
    # training with a mislabelled catalogue, against autocdsr_plus-merged of the same seeds
    "autocdsr_plus-merged-labelnoise0.2": Variant("autocdsr_plus", (*BERT4REC_FAMILY, "model.label_noise=0.2")),
}
COMMON = ("train.patience=3",)
# the AutoCDSR model that reads a run's attention mass (same state dict as the run's model)
MEASURED_AS = {"sasrec": "autocdsr_sasrec", "bert4rec": "autocdsr_bert4rec", "autocdsr_sasrec": "autocdsr_sasrec",
               "autocdsr_bert4rec": "autocdsr_bert4rec", "autocdsr_plus": "autocdsr_plus"}
BACKBONE = {"autocdsr_sasrec": "sasrec-merged", "autocdsr_bert4rec": "bert4rec-merged",
            "autocdsr_plus": "bert4rec-merged"}
# seed 000, Table 2 / abstract: relative Recall@10 and NDCG@10 gains over the merged backbone
PAPER = {"sasrec-merged": {"HR@10": 9.8, "NDCG@10": 12.0}, "bert4rec-merged": {"HR@10": 16.0, "NDCG@10": 16.7}}
FLIP_P = (0.1, 0.2, 0.3)
FLIP_MODELS = ("bert4rec", "autocdsr_bert4rec", "autocdsr_plus")
METRICS = ("HR@10", "NDCG@10")
PROTOCOLS = ("sampled-999", "full")
STUDY_VERSION = 1


def attention_mass(run: Run, data, batch_size: int = 512, n_users: int = 8192) -> dict[str, float]:
    """Mean attention mass of the run's best checkpoint on the training prefixes of ``n_users``
    users drawn with a fixed seed (the same for every run; all when fewer), eval mode:
    ``cd``: onto items of another domain (AutoCDSR's L_cd); for AutoCDSR+ ``ib``: onto IB tokens."""
    from cdsr.data.loaders import TrainDataset
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config

    config = run.dir.config()
    as_model = MEASURED_AS[config["model"]]
    cfg = {"mode": "fixed", **config["model_config"]}
    net = build_model(as_model, model_config(as_model, cfg, "merged"), Vocab.from_ranges(data.domain_ranges, data.domain_names))
    net.load_state_dict(run.dir.load_best()["model"])
    net.eval()
    ds = TrainDataset(data, cfg.get("max_len", 50))
    rows = np.sort(np.random.default_rng(0).permutation(len(ds))[:n_users])
    torch.manual_seed(0)  # BERT4Rec's Cloze masking
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            batch = ds[rows[lo: lo + batch_size]]
            w = float(batch["mask"].sum())
            total += float(net.aux_objectives(batch)["cd"]) * w
            weight += w
    return {"ib" if as_model == "autocdsr_plus" else "cd": total / max(weight, 1.0)}


def flip_curves(run: Run, data) -> list[dict]:
    """Inference-time domain-label noise (``domain_flip`` of the test histories) on a clean model."""
    import dataclasses

    from cdsr.evaluate.protocols import summarise
    from cdsr.evaluate.robustness import RobustnessConfig, inference_curves
    from cdsr.train.run import rank_run

    ev = dataclasses.replace(run.dir.spec().evaluate, protocols=["full"])
    rc = RobustnessConfig(p=FLIP_P, inference=("domain_flip",), train=(), protocol="full", metrics=METRICS)
    nets = [net.eval() for _, _, net in run.dir.load_models(data)]

    def evaluate(d) -> dict[str, float]:
        with torch.no_grad():
            return summarise(rank_run([(None, d, n) for n in nets], "test", "full", ev), d.domain_names, ev)["overall"]

    return inference_curves(evaluate, data, rc)


def pareto_steps(run: Run) -> dict[str, float] | None:
    files = run.dir.steps_files()
    if not files:
        return None
    rows = list(csv.DictReader(files[0].open()))
    if not rows or "pareto_ratio" not in rows[0]:
        return None
    r, w, cd = (np.array([float(x[k]) for x in rows]) for k in ("pareto_ratio", "pareto_w_cd", "cd"))
    last = slice(max(len(rows) - 200, 0), None)
    return {"steps": len(rows), "ratio_mean": float(r.mean()), "ratio_zero": float((r == 0).mean()),
            "ratio_last200": float(r[last].mean()), "w_cd_negative": float((w < 0).mean()),
            "cd_first": float(cd[:50].mean()), "cd_last200": float(cd[last].mean())}


def extras(run: Run, data, flips: bool) -> dict:
    """Everything this report needs of one run, cached in ``<run>/study.json``."""
    best = run.dir.file(RunDir.BEST).stat().st_mtime
    out = run.dir.read_json("study.json") or {}
    if out.get("version") != STUDY_VERSION or out.get("best_mtime") != best:
        out = {"version": STUDY_VERSION, "best_mtime": best}
    changed = False
    if "mass" not in out:
        out["mass"], changed = attention_mass(run, data), True
    if flips and "flip" not in out:
        out["flip"], changed = flip_curves(run, data), True
    if changed:
        run.dir.write_json("study.json", out)
    return {**out, "pareto": pareto_steps(run)}


def _metric_tables(runs: dict, domains: list[str]) -> list[str]:
    out = []
    for p in PROTOCOLS:
        rows = [[g, t.seeds(ms), t.epochs(ms), *t.cells(ms, p, domains, METRICS), t.mean_sd(t.values(ms, p, None, "NDCG@10"))]
                for g, ms in runs.items()]
        out += [f"#### {p}: Recall@10 / NDCG@10", "",
                *t.markdown(["run", "seeds", "epochs (best)", *(f"{d[:14]} {m}" for d in domains for m in METRICS),
                             "overall NDCG@10"], rows), ""]
    rows = []
    for g, ms in runs.items():
        base = BACKBONE.get(ms[0].model)
        if base in runs:
            claim = PAPER[base]
            rows.append([g, base, *(c for p in PROTOCOLS for c in t.relative(ms, runs[base], p, domains, METRICS)),
                         f"+{claim['HR@10']}% / +{claim['NDCG@10']}%"])
    return [*out, "#### Relative change vs the merged backbone (ratio of seed means; paper: Recall@10 / NDCG@10)", "",
            *t.markdown(["run", "vs", *(f"{p} {d[:14]} {m}" for p in PROTOCOLS for d in domains for m in METRICS),
                         "paper"], rows), ""]


def _mass_table(runs: dict, extra: dict[str, list[dict]]) -> list[str]:
    rows = []
    for g, ms in runs.items():
        ex = extra[g]
        par = [e["pareto"] for e in ex if e["pareto"]]
        cd = f"{t.mean_sd(q['cd_first'] for q in par)} -> {t.mean_sd(q['cd_last200'] for q in par)}" if par else ""
        rows.append([g, t.mean_sd(e["mass"]["cd"] for e in ex if "cd" in e["mass"]),
                     t.mean_sd(e["mass"]["ib"] for e in ex if "ib" in e["mass"]),
                     t.mean_sd((q["ratio_mean"] for q in par), "{:.3f}"), t.mean_sd((q["ratio_zero"] for q in par), "{:.2f}"),
                     cd, f"{t.fit_rows(ms)[1]:.0f}"])
    return ["#### Attention mass of the best checkpoints, Pareto weights, training time", "",
            *t.markdown(["run", "cross-domain mass", "IB-token mass", "mean ratio w_cd/w_rec", "steps with ratio 0",
                         "L_cd first 50 -> last 200 steps", "s / epoch (wall, as run)"], rows), ""]


def _noise_tables(runs: dict, extra: dict[str, list[dict]]) -> list[str]:
    out, rows = [], []
    for g in (g for g, ex in extra.items() if all("flip" in e for e in ex)):
        flips = [{(x["kind"], x["p"]): x for x in e["flip"]} for e in extra[g]]
        rows.append([g, t.mean_sd(f[("clean", 0.0)]["NDCG@10"] for f in flips),
                     *(f"{t.mean_sd(f[('domain_flip', p)]['NDCG@10'] for f in flips)} "
                       f"({t.mean_sd((100 * f[('domain_flip', p)]['rel_drop_NDCG@10'] for f in flips), '{:.1f}')}%)"
                       for p in FLIP_P)])
    if rows:
        out += [("#### Inference-time domain-label noise (`domain_flip` of the test histories, `full`): "
                "NDCG@10 and relative drop"), "", *t.markdown(["run", "clean", *(f"p={p}" for p in FLIP_P)], rows), ""]
    rows = []
    for g, ms in ((g, ms) for g, ms in runs.items() if "labelnoise" in g):
        wanted = {m.seed for m in ms}
        clean = [m for m in runs.get(g.rsplit("-labelnoise", 1)[0], []) if m.seed in wanted]
        cells = []
        for p in ("full", "sampled-999"):
            a, b = t.mean(t.values(ms, p, None, "NDCG@10")), t.mean(t.values(clean, p, None, "NDCG@10"))
            cells += [f"{a:.4f}", f"{b:.4f}", t.change(a, b)]
        rows.append([g, ",".join(map(str, sorted(wanted))), *cells])
    if rows:
        out += [("#### Training with a mislabelled catalogue (`model.label_noise`): test NDCG@10 (`full`, `sampled-999`) "
                "against the clean-label runs of the same seeds"), "",
                *t.markdown(["run", "seeds", "full NDCG@10", "clean-label", "change", "sampled-999 NDCG@10",
                             "clean-label", "change"], rows), ""]
    return out


def report(study: Study, dataset: str, out: Path, data_root: str | Path = "data") -> str:
    from cdsr.train.run import load_split

    groups = collect(study, dataset, out)
    if not groups:
        return no_runs(dataset, out)
    data = load_split(dataset, data_root)
    extra = {g: [extras(r, data, r.metrics.model in FLIP_MODELS) for r in rs] for g, rs in groups.items()}
    runs = metrics_of(groups)
    lines = [f"Runs under `{Path(out) / dataset}` (test split; mean +- sample sd over seeds).", "",
             *_metric_tables(runs, list(data.domain_names)), *_mass_table(runs, extra), *_noise_tables(runs, extra)]
    return "\n".join(lines)


STUDY = Study("autocdsr", __doc__, GRID, report, common=COMMON, out="runs/autocdsr")
