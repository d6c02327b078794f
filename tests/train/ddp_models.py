"""Started by test_distributed.py under torchrun (2 processes): every registered model trains one
epoch through the shared loop, and each rank writes a digest of its final parameters, the epoch
record and the global batch size used. Not a test module itself (no ``test_`` prefix)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from cdsr.data.loaders import SplitData, TrainDataset
from cdsr.evaluate.protocols import EvalConfig
from cdsr.models.base import Vocab
from cdsr.models.registry import MODELS, build_model, model_config
from cdsr.train import distributed
from cdsr.train.config import TrainConfig
from cdsr.train.loop import fit
from cdsr.train.run import set_seed

SMALL = {"d": 16, "layers": 1, "heads": 2, "max_len": 20, "dropout": 0.2}


def main(root: Path, out: Path, names: list[str]) -> None:
    data = SplitData.load(root / "t" / "processed")
    n = len(TrainDataset(data, 20))
    batch = next(b for b in range(24, n) if n % b == 1)  # the last global batch leaves rank 1 idle
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    rank = distributed.from_env().rank
    result = {"batch_size": batch, "examples": n, "models": {}}
    for name in names:
        set_seed(5)
        model = build_model(name, model_config(name, {k: v for k, v in SMALL.items()
                                                      if k in model_config(name, {}, "merged").__dataclass_fields__},
                                                "merged"), vocab)
        cfg = TrainConfig(epochs=1, batch_size=batch, patience=5, progress=False, amp=False)
        res = fit(model, data, cfg, seed=5, run_dir=out / name, eval_cfg=EvalConfig(protocols=["full"], max_len=20))
        flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
        result["models"][name] = {"digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
                                  "finite": bool(torch.isfinite(flat).all()), "history": res.history}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else list(MODELS))
