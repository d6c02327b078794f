"""The GCA study (issue 7): ``cdsr study run gca --seeds 1,2,3 --variants host,early-sig-ln``.

The grid (docs/methods.md "Gated Cross-Attention and orthogonal alignment"; seeds 002/003
Table 1), one config change each:

    host             dual_stream: the host without GCA
    early-sig-ln     gca, GCA[0], sigmoid gate, LayerNorm  (the paper's best single module)
    early-sig        gca, GCA[0], sigmoid gate, no LayerNorm
    early-tanh-ln    gca, GCA[0], tanh gate, LayerNorm
    early-tanh       gca, GCA[0], tanh gate, no LayerNorm
    stack-sig-ln     gca, GCA[0, 1, 2] (after the embeddings and after each of the 2 blocks)
    stack-tanh-ln    gca, GCA[0, 1, 2], tanh gate
    matched-early    dual_stream sized to host + GCA[0]'s parameter count (param_match)
    matched-stack    dual_stream sized to host + GCA[0, 1, 2]'s parameter count

Early stopping on validation NDCG@10 under ``full`` (patience 3, at most 20 epochs). The report
prints test metrics under ``sampled-999`` (the paper's protocol: NDCG@1, NDCG@10, AUC per
domain) and ``full`` (mean +- sd over seeds), parameter counts, the change against the host and
the matched hosts, the |cos(X, X')| analysis (``cdsr.analysis``) over all GCA runs, and the
parameter-matching table (host, host + GCA and the matched hosts of each family).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cdsr.studies import tables as t
from cdsr.studies.grid import Run, Study, Variant, collect, metrics_of, no_runs

GRID = {
    "host": Variant("dual_stream"),
    "early-sig-ln": Variant("gca", ("model.gca_layers=[0]", "model.gate=sigmoid", "model.gca_ln=true")),
    "early-sig": Variant("gca", ("model.gca_layers=[0]", "model.gate=sigmoid", "model.gca_ln=false")),
    "early-tanh-ln": Variant("gca", ("model.gca_layers=[0]", "model.gate=tanh", "model.gca_ln=true")),
    "early-tanh": Variant("gca", ("model.gca_layers=[0]", "model.gate=tanh", "model.gca_ln=false")),
    "stack-sig-ln": Variant("gca", ("model.gca_layers=[0,1,2]", "model.gate=sigmoid", "model.gca_ln=true")),
    "stack-tanh-ln": Variant("gca", ("model.gca_layers=[0,1,2]", "model.gate=tanh", "model.gca_ln=true")),
    "matched-early": Variant("dual_stream", ("model.param_match=[0]",)),
    "matched-stack": Variant("dual_stream", ("model.param_match=[0,1,2]",)),
}
COMMON = ("evaluate.protocols=[sampled-999,full]", "train.patience=3")
EPOCHS = 20
SAMPLED = ("NDCG@1", "NDCG@10", "AUC")
FULL = ("HR@10", "NDCG@10", "MRR")
BASES = ("host", "matched-early", "matched-stack")
# The GCA paper's Food-Kitchen numbers (sampled-999), ABXI and ABXI + GCA_early / GCA_stack;
# docs/protocols.md "Published reference numbers"
PAPER = {"ABXI (their run)": (0.0593, 0.1541, 0.7205, 0.0416, 0.1093, 0.7180),
         "ABXI + GCA_early": (0.0703, 0.1757, 0.7317, 0.0548, 0.1327, 0.7150),
         "ABXI + GCA_stack": (0.0882, 0.1853, 0.7148, 0.0527, 0.1282, 0.6924)}


def _metric_tables(dataset: str, runs: dict, domains: list[str], short: list[str]) -> list[str]:
    head = [f"{k} {s}" for s in short for k in SAMPLED]
    rows = [[name, t.seeds(ms), f"{ms[0].parameters:,}", *t.cells(ms, "sampled-999", domains, SAMPLED)]
            for name, ms in runs.items()]
    rows += [[f"*{paper}, paper*", 5, "", *(f"{v:.4f}" for v in vals)] for paper, vals in PAPER.items()]
    full = [[name, *t.cells(ms, "full", [*domains, t.OVERALL], FULL)] for name, ms in runs.items()]
    lines = [f"#### `{dataset}`: test, `sampled-999` (the paper's protocol; mean +- sd over seeds)", "",
             *t.markdown(["variant", "seeds", "parameters", *head], rows),
             "", f"#### `{dataset}`: test, `full` (all items of the target domain)", "",
             *t.markdown(["variant", *(f"{k} {s}" for s in [*short, t.OVERALL] for k in FULL)], full)]
    bases = [b for b in BASES if b in runs]
    if bases:
        rel = [[name, *(c for b in bases for c in t.relative(ms, runs[b], "sampled-999", domains, ["NDCG@10"]))]
               for name, ms in runs.items()]
        lines += ["", "Relative change of sampled-999 NDCG@10 per domain (ratio of seed means):", "",
                  *t.markdown(["variant", *(f"vs {b} {s}" for b in bases for s in short)], rel)]
    return lines


def _cos_rows(runs: dict) -> list[str]:
    rows = []
    for name, ms in runs.items():
        ep, spe, best = t.fit_rows(ms)
        cos = [" ".join(f"{k[len('val_cos_'):]}={v:.3f}" for k, v in rec.items()
                        if k.startswith("val_cos_gca") and k.count("_") > 2) for rec in best]
        rows.append([name, ep, f"{spe:.0f}", "; ".join(c for c in cos if c) or "-"])
    return t.markdown(["variant", "epochs run (best)", "s / epoch (wall, as run)",
                       "best-epoch |cos(X, X')| per module, domain"], rows)


def _orthogonality(groups: dict[str, list[Run]], where: Path) -> list[str]:
    from cdsr.analysis import curves_from_dirs, write_analysis

    curves = curves_from_dirs([r.dir.path for rs in groups.values() for r in rs], "NDCG@10")
    if not curves:
        return []
    s = write_analysis(curves, "NDCG@10", where)
    a, e = s["across_runs"], s["all_epochs"]
    lines = ["", (f"|cos(X, X')| vs validation NDCG@10 over {s['runs']} GCA runs: across runs (best epochs) "
             f"Spearman {a['spearman']:.2f}, Pearson {a['pearson']:.2f}; all (run, epoch) points Spearman "
             f"{e['spearman']:.2f} (n={e['n']}); mean within-run Spearman {s['within_runs_mean_spearman']:.2f} "
             f"over {s['within_runs_n']} runs; mean |cos| first epoch {s['cos_first_epoch_mean']:.3f}, "
             f"best epoch {s['cos_best_epoch_mean']:.3f}. Figure: {where / 'orthogonality.png'}"),
             "", "|cos| trajectory (mean over modules and domains, per epoch) and validation NDCG@10:", ""]
    for c in sorted(curves, key=lambda c: c.name):
        lines.append(f"- {Path(c.name).name}: " + ", ".join(f"{x:.3f}/{m:.4f}" for x, m in zip(c.cos, c.metric)))
    return lines


def parameter_table(dataset: str, data_root: str | Path = "data", base: dict | None = None) -> str:
    """Parameter counts of the host, host + GCA and the matched hosts of each family (meta device)."""
    from cdsr.config import load_params
    from cdsr.models.base import Vocab
    from cdsr.models.gca import matched_config, n_parameters
    from cdsr.models.registry import model_config
    from cdsr.train.run import load_split

    data = load_split(dataset, data_root)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    params = (base or load_params())["models"]
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


def report(study: Study, dataset: str, out: Path, data_root: str | Path = "data") -> str:
    groups = collect(study, dataset, out)
    if not groups:
        return no_runs(dataset, out)
    runs = metrics_of(groups)
    domains = t.domains_of(next(iter(runs.values())), "sampled-999")
    short = [d.split("_")[0] for d in domains]
    lines = [*_metric_tables(dataset, runs, domains, short), "", *_cos_rows(runs),
             *_orthogonality(groups, Path(out) / dataset / "orthogonality"),
             "", "#### Parameter matching (host, host + GCA, matched hosts)", "", parameter_table(dataset, data_root)]
    return "\n".join(lines)


STUDY = Study("gca", __doc__, GRID, report, common=COMMON, epochs=EPOCHS, out="runs/gca",
              progress=("sampled-999", "NDCG@10"))
