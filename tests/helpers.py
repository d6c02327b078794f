"""Small builders shared by tests."""

from __future__ import annotations

from typing import Any

from cdsr.data.config import DatasetConfig, dataset_config


def make_cfg(**entry: Any) -> DatasetConfig:
    entry.setdefault("sources", [{"format": "interaction-csv", "path": "unused.csv"}])
    return dataset_config({"datasets": {"t": entry}}, "t")
