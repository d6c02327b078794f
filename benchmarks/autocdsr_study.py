"""The AutoCDSR study (issue 5): compare trained runs, read their attention, stress their domain labels.

    # 1. train (resumable; `benchmarks/quality.py`, one run directory per model x seed):
    Q="python benchmarks/quality.py --dataset amazon-food-kitchen-benchmark --out runs/autocdsr \
       --variants merged --set train.patience=3"
    $Q --models sasrec autocdsr_sasrec bert4rec autocdsr_bert4rec autocdsr_plus --seeds 1 2 3
    $Q --models autocdsr_bert4rec --seeds 1 --tag fixed-alpha0.1 --set model.mode=fixed --set model.alpha=0.1
    $Q --models autocdsr_plus --seeds 1 --tag labelnoise0.2 --set model.label_noise=0.2
    # 2. this report (computes what a run lacks and caches it in <run>/study.json):
    python benchmarks/autocdsr_study.py --root runs/autocdsr/amazon-food-kitchen-benchmark

Prints markdown tables: test Recall@10 (= HR@10: one relevant item per query) and NDCG@10 per
protocol and domain (mean +- sample sd over seeds); the relative change of each AutoCDSR variant
against its backbone, beside the paper's claims; the cross-domain attention mass of each best
checkpoint (backbones are read through their AutoCDSR subclass, same parameters); the Pareto
ratio per step (from steps.csv); seconds per training epoch as the runs went (wall time: not a
speed measurement when runs share the machine; `benchmarks/train_speed.py` measures step time);
and the domain-label noise results:
inference-time ``domain_flip`` of the test histories (clean models) and training with a
mislabelled catalogue (``model.label_noise``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

import cdsr  # noqa: F401
from cdsr.data.loaders import SplitData, TrainDataset
from cdsr.evaluate.protocols import EvalConfig, summarise
from cdsr.evaluate.robustness import RobustnessConfig, inference_curves
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.train.run import load_run_models, load_split, rank_run

# the AutoCDSR model that reads a run's attention mass (same state dict as the run's model)
MEASURED_AS = {"sasrec": "autocdsr_sasrec", "bert4rec": "autocdsr_bert4rec", "autocdsr_sasrec": "autocdsr_sasrec",
               "autocdsr_bert4rec": "autocdsr_bert4rec", "autocdsr_plus": "autocdsr_plus"}
BACKBONE = {"autocdsr_sasrec": "sasrec-merged", "autocdsr_bert4rec": "bert4rec-merged",
            "autocdsr_plus": "bert4rec-merged"}
# seed 000, Table 2 / abstract: relative Recall@10 and NDCG@10 gains over the merged backbone
PAPER = {"sasrec-merged": {"HR@10": 9.8, "NDCG@10": 12.0}, "bert4rec-merged": {"HR@10": 16.0, "NDCG@10": 16.7}}
FLIP_P = (0.1, 0.2, 0.3)
METRICS = ("HR@10", "NDCG@10")
STUDY_VERSION = 1


def group_of(run: Path) -> str:
    return run.name.rsplit("-s", 1)[0]  # <model>-<variant>[-<tag>]


def attention_mass(run: Path, data: SplitData, batch_size: int = 512, n_users: int = 8192) -> dict[str, float]:
    """Mean attention mass of the run's best checkpoint on the training prefixes of ``n_users``
    users drawn with a fixed seed (the same for every run; all when fewer), eval mode:
    ``cd``: onto items of another domain (AutoCDSR's L_cd); for AutoCDSR+ ``ib``: onto IB tokens."""
    config = json.loads((run / "config.json").read_text())
    name = config["model"]
    as_model = MEASURED_AS[name]
    cfg = dict(config["model_config"])
    cfg.setdefault("mode", "fixed")
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    net = build_model(as_model, model_config(as_model, cfg, "merged"), vocab)
    net.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])
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


def flip_curves(run: Path, data: SplitData) -> list[dict]:
    """Inference-time domain-label noise (``domain_flip`` of the test histories) on a clean model."""
    config = json.loads((run / "config.json").read_text())
    ev = EvalConfig(**{**config["evaluate"], "protocols": ["full"]})
    rc = RobustnessConfig(p=FLIP_P, inference=("domain_flip",), train=(), protocol="full", metrics=METRICS)
    nets = [net.eval() for _, _, net in load_run_models(run, data)]

    def evaluate(d: SplitData) -> dict[str, float]:
        with torch.no_grad():
            return summarise(rank_run([(None, d, n) for n in nets], "test", "full", ev), d.domain_names, ev)["overall"]

    return inference_curves(evaluate, data, rc)


def pareto_steps(run: Path) -> dict[str, float] | None:
    f = run / "steps.csv"
    if not f.exists():
        return None
    rows = list(csv.DictReader(f.open()))
    if not rows or "pareto_ratio" not in rows[0]:
        return None
    r = np.array([float(x["pareto_ratio"]) for x in rows])
    w = np.array([float(x["pareto_w_cd"]) for x in rows])
    cd = np.array([float(x["cd"]) for x in rows])
    last = slice(max(len(rows) - 200, 0), None)
    return {"steps": len(rows), "ratio_mean": float(r.mean()), "ratio_zero": float((r == 0).mean()),
            "ratio_last200": float(r[last].mean()), "w_cd_negative": float((w < 0).mean()),
            "cd_first": float(cd[:50].mean()), "cd_last200": float(cd[last].mean())}


def study(run: Path, data: SplitData, flips: bool) -> dict:
    """Everything this report needs of one run, cached in ``<run>/study.json``."""
    cache = run / "study.json"
    out = json.loads(cache.read_text()) if cache.exists() else {}
    if out.get("version") != STUDY_VERSION or out.get("best_mtime") != (run / "best.pt").stat().st_mtime:
        out = {"version": STUDY_VERSION, "best_mtime": (run / "best.pt").stat().st_mtime}
    changed = False
    if "mass" not in out:
        out["mass"], changed = attention_mass(run, data), True
    if flips and "flip" not in out:
        out["flip"], changed = flip_curves(run, data), True
    if changed:
        cache.write_text(json.dumps(out, indent=1) + "\n")
    out["pareto"] = pareto_steps(run)
    return out


def ms(xs: list[float], fmt: str = "{:.4f}") -> str:
    if not xs:
        return ""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} +- {fmt.format(statistics.stdev(xs))}"


def report(root: Path, flip_models: tuple[str, ...]) -> str:
    runs = sorted(p.parent for p in root.glob("*/metrics.json"))
    if not runs:
        return f"no finished runs under {root}"
    data = load_split(json.loads((runs[0] / "config.json").read_text())["dataset"])
    metrics = {r: json.loads((r / "metrics.json").read_text()) for r in runs}
    groups: dict[str, list[Path]] = {}
    for r in runs:
        groups.setdefault(group_of(r), []).append(r)
    extra = {r: study(r, data, metrics[r]["model"] in flip_models) for r in runs}
    domains = list(data.domain_names)
    protocols = ("sampled-999", "full")
    out: list[str] = [f"Runs under `{root}` (test split; mean +- sample sd over seeds).", ""]

    def val(r: Path, p: str, d: str | None, m: str) -> float:
        prot = metrics[r]["protocols"][p]
        return prot["overall"][m] if d is None else prot["domains"][d][m]

    # 1. test metrics
    for p in protocols:
        out += [f"#### {p}: Recall@10 / NDCG@10", "",
                "| run | seeds | epochs (best) | " + " | ".join(f"{d[:14]} {m}" for d in domains for m in METRICS)
                + " | overall NDCG@10 |", "|" + "---|" * (4 + 2 * len(domains))]
        for g, rs in groups.items():
            eps = ", ".join(f"{metrics[r]['fit']['merged']['epochs_run']} ({metrics[r]['fit']['merged']['best_epoch'] + 1})"
                            for r in rs)
            cells = [ms([val(r, p, d, m) for r in rs]) for d in domains for m in METRICS]
            out.append(f"| {g} | {','.join(str(metrics[r]['seed']) for r in rs)} | {eps} | " + " | ".join(cells)
                       + f" | {ms([val(r, p, None, 'NDCG@10') for r in rs])} |")
        out.append("")

    # 2. relative change against the backbone (ratio of the seed means)
    out += ["#### Relative change vs the merged backbone (ratio of seed means; paper: Recall@10 / NDCG@10)", "",
            "| run | vs | " + " | ".join(f"{p} {d[:14]} {m}" for p in protocols for d in domains for m in METRICS)
            + " | paper |", "|" + "---|" * (3 + len(protocols) * len(domains) * len(METRICS))]
    for g, rs in groups.items():
        model = metrics[rs[0]]["model"]
        base = BACKBONE.get(model)
        if base is None or base not in groups:
            continue
        cells = []
        for p in protocols:
            for d in domains:
                for m in METRICS:
                    a = statistics.mean(val(r, p, d, m) for r in rs)
                    b = statistics.mean(val(r, p, d, m) for r in groups[base])
                    cells.append(f"{100 * (a / b - 1):+.1f}%")
        claim = PAPER[base]
        out.append(f"| {g} | {base} | " + " | ".join(cells) + f" | +{claim['HR@10']}% / +{claim['NDCG@10']}% |")
    out.append("")

    # 3. attention mass, Pareto ratio, epoch time
    out += ["#### Attention mass of the best checkpoints, Pareto weights, training time", "",
            ("| run | cross-domain mass | IB-token mass | mean ratio w_cd/w_rec | steps with ratio 0 | "
            "L_cd first 50 -> last 200 steps | s / epoch (wall, as run) |"), "|---|---|---|---|---|---|---|"]
    spe = {g: statistics.mean(metrics[r]["fit"]["merged"]["train_seconds"] / metrics[r]["fit"]["merged"]["epochs_run"]
                              for r in rs) for g, rs in groups.items()}
    for g, rs in groups.items():
        ex = [extra[r] for r in rs]
        par = [e["pareto"] for e in ex if e["pareto"]]
        out.append(f"| {g} | {ms([e['mass']['cd'] for e in ex if 'cd' in e['mass']])} | "
                   f"{ms([e['mass']['ib'] for e in ex if 'ib' in e['mass']])} | "
                   f"{ms([q['ratio_mean'] for q in par], '{:.3f}')} | {ms([q['ratio_zero'] for q in par], '{:.2f}')} | "
                   + (f"{ms([q['cd_first'] for q in par])} -> {ms([q['cd_last200'] for q in par])}" if par else "")
                   + f" | {spe[g]:.0f} |")
    out.append("")

    # 4. domain-label noise
    flipped = {g: rs for g, rs in groups.items() if all("flip" in extra[r] for r in rs)}
    if flipped:
        out += [("#### Inference-time domain-label noise (`domain_flip` of the test histories, `full`): "
                "NDCG@10 and relative drop"), "",
                "| run | clean | " + " | ".join(f"p={p}" for p in FLIP_P) + " |", "|" + "---|" * (2 + len(FLIP_P))]
        for g, rs in flipped.items():
            rows = [{(x["kind"], x["p"]): x for x in extra[r]["flip"]} for r in rs]
            cells = [ms([row[("clean", 0.0)]["NDCG@10"] for row in rows])]
            for p in FLIP_P:
                cells.append(f"{ms([row[('domain_flip', p)]['NDCG@10'] for row in rows])} "
                             f"({ms([100 * row[('domain_flip', p)]['rel_drop_NDCG@10'] for row in rows], '{:.1f}')}%)")
            out.append(f"| {g} | " + " | ".join(cells) + " |")
        out.append("")
    noisy = {g: rs for g, rs in groups.items() if "labelnoise" in g}
    if noisy:
        out += [("#### Training with a mislabelled catalogue (`model.label_noise`): test NDCG@10 (`full`, `sampled-999`) "
                "against the clean-label runs of the same seeds"), "",
                "| run | seeds | full NDCG@10 | clean-label | change | sampled-999 NDCG@10 | clean-label | change |",
                "|---|---|---|---|---|---|---|---|"]
        for g, rs in noisy.items():
            clean_g = g.rsplit("-labelnoise", 1)[0]
            seeds = {metrics[r]["seed"] for r in rs}
            clean = [r for r in groups.get(clean_g, []) if metrics[r]["seed"] in seeds]
            cells = []
            for p in ("full", "sampled-999"):
                a = statistics.mean(val(r, p, None, "NDCG@10") for r in rs)
                b = statistics.mean(val(r, p, None, "NDCG@10") for r in clean) if clean else float("nan")
                cells += [f"{a:.4f}", f"{b:.4f}", f"{100 * (a / b - 1):+.1f}%"]
            out.append(f"| {g} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs/autocdsr/amazon-food-kitchen-benchmark"))
    ap.add_argument("--flip-models", nargs="*", default=["bert4rec", "autocdsr_bert4rec", "autocdsr_plus"],
                    help="models whose clean runs get the inference-time domain_flip curves")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()
    text = report(args.root, tuple(args.flip_models))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
