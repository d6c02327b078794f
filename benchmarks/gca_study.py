"""The GCA study (issue 7): train the grid on Food-Kitchen, then report it.

    python benchmarks/gca_study.py --seeds 1 2 3 --variants host early-sig-ln matched-early
    python benchmarks/gca_study.py --report-only
    python benchmarks/gca_study.py --parameters     # parameter counts of the host, GCA and matched hosts

The grid (METHODS.md "Gated Cross-Attention"; seeds 002/003 Table 1), one config change each:

    host             dual_stream: the host without GCA
    early-sig-ln     gca, GCA[0], sigmoid gate, LayerNorm  (the paper's best single module)
    early-sig        gca, GCA[0], sigmoid gate, no LayerNorm
    early-tanh-ln    gca, GCA[0], tanh gate, LayerNorm
    early-tanh       gca, GCA[0], tanh gate, no LayerNorm
    stack-sig-ln     gca, GCA[0, 1, 2] (after the embeddings and after each of the 2 blocks)
    stack-tanh-ln    gca, GCA[0, 1, 2], tanh gate
    matched-early    dual_stream sized to host + GCA[0]'s parameter count (param_match)
    matched-stack    dual_stream sized to host + GCA[0, 1, 2]'s parameter count

Each run is ``cdsr.train.run.train_run`` (what ``cdsr train`` calls) into
``<out>/<dataset>/<variant>-s<seed>``; a finished run is not retrained and an interrupted one
resumes. Early stopping on validation NDCG@10 under ``full`` (patience 3, at most 20 epochs).
The report prints test metrics under ``sampled-999`` (the paper's protocol: NDCG@1, NDCG@10, AUC
per domain) and ``full`` (mean +- sd over seeds), parameter counts, the change against the host
and the matched host, and the |cos(X, X')| analysis (``cdsr.analysis``) over all GCA runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import cdsr  # noqa: F401
from _study import fit_rows, study_main, train_grid
from cdsr.analysis import curves_from_dirs, write_analysis
from cdsr.config import load_params

GRID: dict[str, tuple[str, tuple[str, ...]]] = {
    "host": ("dual_stream", ()),
    "early-sig-ln": ("gca", ("model.gca_layers=[0]", "model.gate=sigmoid", "model.gca_ln=true")),
    "early-sig": ("gca", ("model.gca_layers=[0]", "model.gate=sigmoid", "model.gca_ln=false")),
    "early-tanh-ln": ("gca", ("model.gca_layers=[0]", "model.gate=tanh", "model.gca_ln=true")),
    "early-tanh": ("gca", ("model.gca_layers=[0]", "model.gate=tanh", "model.gca_ln=false")),
    "stack-sig-ln": ("gca", ("model.gca_layers=[0,1,2]", "model.gate=sigmoid", "model.gca_ln=true")),
    "stack-tanh-ln": ("gca", ("model.gca_layers=[0,1,2]", "model.gate=tanh", "model.gca_ln=true")),
    "matched-early": ("dual_stream", ("model.param_match=[0]",)),
    "matched-stack": ("dual_stream", ("model.param_match=[0,1,2]",)),
}
COMMON = ("evaluate.protocols=[sampled-999,full]", "train.patience=3")
EPOCHS = 20
SAMPLED = ("NDCG@1", "NDCG@10", "HR@10", "AUC")
FULL = ("HR@10", "NDCG@10", "MRR")
# EVALUATION.md: the GCA paper's Food-Kitchen numbers (sampled-999), ABXI and ABXI + GCA_early
PAPER = {"ABXI (their run)": (0.0593, 0.1541, 0.7205, 0.0416, 0.1093, 0.7180),
         "ABXI + GCA_early": (0.0703, 0.1757, 0.7317, 0.0548, 0.1327, 0.7150),
         "ABXI + GCA_stack": (0.0882, 0.1853, 0.7148, 0.0527, 0.1282, 0.6924)}


def run_grid(dataset: str, seeds: list[int], out: Path, sets: list[str], variants: list[str]) -> None:
    train_grid(GRID, COMMON, EPOCHS, dataset, seeds, out, sets, variants, "sampled-999")


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} +- {statistics.stdev(xs):.4f}"


def _load(dataset: str, out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for name in GRID:
        for f in sorted((out / dataset).glob(f"{name}-s*/metrics.json")):
            if f.parent.name.rsplit("-s", 1)[0] == name:
                runs.setdefault(name, []).append(json.loads(f.read_text()))
    return runs


def report(dataset: str, out: Path) -> str:
    runs = _load(dataset, out)
    if not runs:
        return f"no runs under {out / dataset}"
    domains = list(next(iter(runs.values()))[0]["protocols"]["sampled-999"]["domains"])
    short = [d.split("_")[0] for d in domains]
    head = [f"{k} {s}" for s in short for k in ("NDCG@1", "NDCG@10", "AUC")]
    lines = [f"#### `{dataset}`: test, `sampled-999` (the paper's protocol; mean +- sd over seeds)", "",
             "| variant | seeds | parameters | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(head))]
    for name, rs in runs.items():
        cells = [_ms([r["protocols"]["sampled-999"]["domains"][d][k] for r in rs])
                 for d in domains for k in ("NDCG@1", "NDCG@10", "AUC")]
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {rs[0]['parameters']:,} | " + " | ".join(cells) + " |")
    for paper, vals in PAPER.items():
        lines.append(f"| *{paper}, paper* | 5 | | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    lines += ["", f"#### `{dataset}`: test, `full` (all items of the target domain)", "",
              "| variant | " + " | ".join(f"{k} {s}" for s in [*short, "overall"] for k in FULL) + " |",
              "|" + "---|" * (1 + 3 * len(FULL))]
    for name, rs in runs.items():
        cells = []
        for d in [*domains, "overall"]:
            block = (lambda r: r["protocols"]["full"]["overall"]) if d == "overall" else \
                (lambda r, d=d: r["protocols"]["full"]["domains"][d])
            cells += [_ms([block(r)[k] for r in rs]) for k in FULL]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = {b: {d: statistics.mean(r["protocols"]["sampled-999"]["domains"][d]["NDCG@10"] for r in runs[b]) for d in domains}
            for b in ("host", "matched-early", "matched-stack") if b in runs}
    if base:
        lines += ["", "Relative change of sampled-999 NDCG@10 per domain (ratio of seed means):", "",
                  "| variant | " + " | ".join(f"vs {b} {s}" for b in base for s in short) + " |",
                  "|" + "---|" * (1 + len(base) * len(domains))]
        for name, rs in runs.items():
            m = {d: statistics.mean(r["protocols"]["sampled-999"]["domains"][d]["NDCG@10"] for r in rs) for d in domains}
            lines.append(f"| {name} | " + " | ".join(f"{100 * (m[d] / base[b][d] - 1):+.1f}%" for b in base for d in domains) + " |")
    lines += ["", "| variant | epochs run (best) | s / epoch (wall, as run) | best-epoch |cos(X, X')| per module, domain |",
              "|---|---|---|---|"]
    for name, rs in runs.items():
        ep, spe, best = fit_rows(rs)
        cos = []
        for rec in best:
            cos.append(" ".join(f"{k[len('val_cos_'):]}={v:.3f}" for k, v in rec.items()
                                if k.startswith("val_cos_gca") and k.count("_") > 2))
        lines.append(f"| {name} | {ep} | {spe:.0f} | {'; '.join(c for c in cos if c) or '-'} |")
    curves = curves_from_dirs([out / dataset], "NDCG@10")
    if curves:
        s = write_analysis(curves, "NDCG@10", out / dataset / "orthogonality")
        a, e = s["across_runs"], s["all_epochs"]
        lines += ["", f"|cos(X, X')| vs validation NDCG@10 over {s['runs']} GCA runs: across runs (best epochs) "
                  f"Spearman {a['spearman']:.2f}, Pearson {a['pearson']:.2f}; all (run, epoch) points Spearman "
                  f"{e['spearman']:.2f} (n={e['n']}); mean within-run Spearman {s['within_runs_mean_spearman']:.2f} "
                  f"over {s['within_runs_n']} runs; mean |cos| first epoch {s['cos_first_epoch_mean']:.3f}, "
                  f"best epoch {s['cos_best_epoch_mean']:.3f}. Figure: {out / dataset / 'orthogonality' / 'orthogonality.png'}"]
        traj = ["", "|cos| trajectory (mean over modules and domains, per epoch) and validation NDCG@10:", ""]
        for c in sorted(curves, key=lambda c: c.name):
            traj.append(f"- {Path(c.name).name}: " + ", ".join(f"{x:.3f}/{m:.4f}" for x, m in zip(c.cos, c.metric)))
        lines += traj
    return "\n".join(lines)


def parameter_table(dataset: str) -> str:
    """Parameter counts of the host, host + GCA and the matched hosts of each family (meta device)."""
    import dataclasses

    from cdsr.models.base import Vocab
    from cdsr.models.gca import matched_config, n_parameters
    from cdsr.models.registry import model_config
    from cdsr.train.run import load_split

    data = load_split(dataset)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    params = load_params()["models"]
    host = model_config("dual_stream", params["dual_stream"], "merged")
    gca = model_config("gca", params["gca"], "merged")
    lines = [f"host: {n_parameters(host, vocab):,} parameters ({(vocab.n_items + 1) * host.d:,} in the item table)", "",
             "| GCA layers | host + GCA | matched (auto) | ffn | width | depth |", "|---|---|---|---|---|---|"]
    for layers in ((0,), (0, 1, 2)):
        cells = []
        for by in ("auto", "ffn", "width", "depth"):
            m = matched_config(dataclasses.replace(host, param_match=layers, param_match_by=by), vocab)
            cells.append(f"{n_parameters(m, vocab):,} (d {m.d}, {m.layers} layers, FFN {m.ffn_dim or 4 * m.d})")
        lines.append(f"| {list(layers)} | {n_parameters(dataclasses.replace(gca, gca_layers=layers), vocab):,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    if "--parameters" in sys.argv:  # python benchmarks/gca_study.py --parameters [--dataset D]
        ds = sys.argv[sys.argv.index("--dataset") + 1] if "--dataset" in sys.argv else "amazon-food-kitchen-benchmark"
        print(parameter_table(ds))
        return 0
    return study_main(__doc__, GRID, run_grid, report, "runs/gca")


if __name__ == "__main__":
    sys.exit(main())
