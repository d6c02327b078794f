"""Diagnostics of a benchmarked dataset: a popularity reference and the cross-domain attention mass.

    python benchmarks/diagnostics.py --dataset synthetic

- Popularity: every item of the target domain ranked by its number of training-prefix events
  (`full` protocol, test targets): the floor a sequential model should clear.
- Cross-domain attention mass (METHODS.md, AutoCDSR) of each benchmark run's best checkpoint
  (``metrics/<dataset>/<method>.json`` -> the run directory that logged it), on all training prefixes, eval mode:
  the backbones are loaded into their AutoCDSR subclass (same parameters) to read the mass.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from autocdsr_study import (  # benchmarks/ is on sys.path when run as a script
    MEASURED_AS,
    attention_mass,
)

import cdsr  # noqa: F401
from cdsr.data.loaders import TrainDataset
from cdsr.evaluate.protocols import EvalConfig, rank_targets, summarise
from cdsr.models.base import SeqRecModel, Vocab
from cdsr.train.run import load_split


class Popularity(SeqRecModel):
    def __init__(self, counts: np.ndarray, vocab: Vocab):
        super().__init__(vocab)
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def score(self, batch, candidates=None):
        s = self.counts[None].expand(len(batch["items"]), -1)
        return s if candidates is None else s.gather(1, candidates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--metrics-dir", default="metrics")
    ap.add_argument("--runs-dir", default="runs/benchmark")
    args = ap.parse_args()
    data = load_split(args.dataset)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    ds = TrainDataset(data, 50)
    batch = ds[np.arange(len(ds))]
    counts = np.bincount(batch["items"][batch["mask"]].numpy(), minlength=vocab.n_items + 1)
    counts = np.concatenate([[-1], counts[1:]]).astype(np.float32)
    ev = EvalConfig(protocols=["full"])
    pop = summarise(rank_targets(Popularity(counts, vocab), data, "test", "full", ev), data.domain_names, ev)
    print(f"popularity (full, test): NDCG@10 {pop['overall']['NDCG@10']:.4f} HR@10 {pop['overall']['HR@10']:.4f}")
    for f in sorted(Path(args.metrics_dir, args.dataset).glob("*.json")):
        m = json.loads(f.read_text())
        # the run directory whose tracking.json holds this result's MLflow run
        run = next((t.parent for t in Path(args.runs_dir, args.dataset, m["method"]).glob("*/tracking.json")
                    if json.loads(t.read_text())["run_id"] == m.get("mlflow_run_id")), None)
        if m["method"] not in MEASURED_AS or run is None:
            continue
        mass = attention_mass(run, data)
        kind, value = ("IB-token", mass["ib"]) if "ib" in mass else ("cross-domain", mass["cd"])
        print(f"{m['method']:18s} {kind} attention mass {value:.4f}")


if __name__ == "__main__":
    main()
