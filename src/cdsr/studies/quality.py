"""The quality benchmark: model x variant (merged / single) on one dataset, over seeds.

    cdsr study run quality --dataset amazon-food-kitchen-benchmark --seeds 1 --set train.epochs=30
    cdsr study run quality --variants sasrec-merged,hstu-merged --seeds 2,3
    cdsr study report quality

Runs are ``<model>-<variant>-s<seed>`` under ``runs/quality/<dataset>/`` (params.yaml's
settings). The report prints, per protocol, test HR@5, HR@10, NDCG@10 and MRR per domain (mean +-
sd over seeds) with ABXI's published sampled-999 numbers beside them for Food-Kitchen, the run
time per run, and a popularity reference under ``full``: every item of the target domain ranked
by its number of training-prefix events, the floor a sequential model should clear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdsr.leaderboard import PUBLISHED
from cdsr.models.base import SeqRecModel, Vocab
from cdsr.studies import tables as t
from cdsr.studies.grid import Study, Variant, collect, metrics_of, no_runs

MODELS = ("sasrec", "hstu", "bert4rec")
GRID = {f"{m}-{v}": Variant(m, variant=v) for m in MODELS for v in ("merged", "single")}
COLS = ("HR@5", "HR@10", "NDCG@10", "MRR")


class Popularity(SeqRecModel):
    """Scores every item by its count of training-prefix events."""

    def __init__(self, counts: np.ndarray, vocab: Vocab):
        super().__init__(vocab)
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def score(self, batch, candidates=None):
        s = self.counts[None].expand(len(batch["items"]), -1)
        return s if candidates is None else s.gather(1, candidates)


def popularity(data) -> dict[str, float]:
    """The popularity reference's overall test metrics under ``full``."""
    from cdsr.data.loaders import TrainDataset
    from cdsr.evaluate.protocols import EvalConfig, rank_targets, summarise

    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    ds = TrainDataset(data, 50)
    batch = ds[np.arange(len(ds))]
    counts = np.bincount(batch["items"][batch["mask"]].numpy(), minlength=vocab.n_items + 1)
    counts = np.concatenate([[-1], counts[1:]]).astype(np.float32)
    ev = EvalConfig(protocols=["full"])
    return summarise(rank_targets(Popularity(counts, vocab), data, "test", "full", ev), data.domain_names, ev)["overall"]


def _published(dataset: str, protocol: str, domains: list[str]) -> list[list[str]]:
    pub = PUBLISHED.get(dataset)
    if not pub or pub["protocol"] != protocol or set(pub["domains"]) != set(domains):
        return []
    return [[pub["name"], "", "", "", "", *(f"{pub['domains'][d][c]:.4f}" for d in domains for c in COLS)]]


def report(study: Study, dataset: str, out: Path, data_root: str | Path = "data") -> str:
    from cdsr.train.run import load_split

    pop = popularity(load_split(dataset, data_root))
    reference = f"Popularity reference (full, test): NDCG@10 {pop['NDCG@10']:.4f} HR@10 {pop['HR@10']:.4f}"
    runs = metrics_of(collect(study, dataset, out))
    if not runs:
        return f"{no_runs(dataset, out)}\n{reference}"
    first = next(iter(runs.values()))
    text = [f"Dataset `{dataset}`, test split, hardware: {first[0].hardware}", ""]
    for p in first[0].protocols:
        domains = t.domains_of(first, p)
        rows = [[name, ms[0].model, ms[0].variant, t.seeds(ms), ", ".join(f"{m.epochs_run}" for m in ms),
                 *t.cells(ms, p, domains, COLS)] for name, ms in runs.items() if p in ms[0].protocols]
        text += [f"### {p} (mean +- sd over seeds)", "",
                 *t.markdown(["run", "model", "variant", "seeds", "epochs",
                              *(f"{d[:12]} {c}" for d in domains for c in COLS)], rows + _published(dataset, p, domains)),
                 ""]
    text.append("Run time per run (s): " + ", ".join(f"{name}-s{m.seed} {m.seconds or 0:.0f}"
                                                     for name, ms in runs.items() for m in ms))
    return "\n".join([*text, reference])


STUDY = Study("quality", __doc__, GRID, report, out="runs/quality")
