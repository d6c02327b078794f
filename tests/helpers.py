"""Small builders shared by tests."""

from __future__ import annotations

from typing import Any

from cdsr.data.config import DatasetConfig, dataset_config

# The tiny synthetic dataset 't' of the tests (built once per session by the tiny_root fixture)
TINY = {
    "generator": {"users": 200, "items_per_domain": 150, "topics": 6, "malformed_rows": 3, "duplicate_rows": 2},
    "sources": [{"format": "ratings-csv-2014", "path": "{data_root}/t/raw/*.csv"},
                {"format": "amazon-review-json", "path": "{data_root}/t/raw/*.json.gz"}],
    "domains": ["Books", "Movies_and_TV", "CDs_and_Vinyl"],
    "sequences": {"filters": [{"min_user_domains": 2}, {"min_user_events": 5}], "domains_required": "present"},
    "split": {"negatives": {"sampled-100": 100}},
}


def make_cfg(**entry: Any) -> DatasetConfig:
    entry.setdefault("sources", [{"format": "interaction-csv", "path": "unused.csv"}])
    return dataset_config({"datasets": {"t": entry}}, "t")


def ingest_tables(tmp_path, sources: list[dict], **entry: Any):
    """Ingest ``sources`` (a dataset entry's other keys in ``entry``) into ``tmp_path/out``:
    (report, interactions, quarantine)."""
    import polars as pl

    from cdsr.data.ingest import ingest

    rep = ingest(make_cfg(sources=sources, **entry), tmp_path / "out")
    return (rep, pl.read_parquet(tmp_path / "out" / "interactions.parquet"),
            pl.read_parquet(tmp_path / "out" / "quarantine.parquet"))


def items_table(n_per_domain):
    """An items table (item_idx, item_id, domain_idx, domain): n_per_domain[d] items in domain
    d, numbered 1.. across domains in domain order."""
    import polars as pl

    rows, idx = [], 1
    for d, n in enumerate(n_per_domain):
        for _ in range(n):
            rows.append((idx, f"i{idx}", d, f"D{d}"))
            idx += 1
    return pl.DataFrame(rows, schema=["item_idx", "item_id", "domain_idx", "domain"], orient="row")


def fit_batch(model, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam steps on one fixed batch (a seeded draw per step); returns the losses. For "the model
    can fit" tests: every part of the model gets a gradient."""
    import torch

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = model.loss(batch)["loss"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses
