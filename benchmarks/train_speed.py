"""Training and evaluation throughput per model on one built dataset.

    python benchmarks/train_speed.py --dataset amazon-food-kitchen-benchmark [--steps 8] [--device auto]

Training: sequences/s over ``--steps`` optimiser steps (after one warm-up step) at the params.yaml
settings of each model, and the implied time of one epoch over all training users.
Evaluation: users/s under the ``full`` protocol over all test users (scores of every item of the
target domain), and the total time. Targets (2-block d=64 SASRec, Food-Kitchen, 2 CPU cores):
an epoch in under 30 s, full evaluation of all users in under 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

import cdsr  # noqa: F401
from cdsr.config import from_dict, load_params
from cdsr.data.loaders import TrainDataset
from cdsr.evaluate.protocols import EvalConfig, rank_targets
from cdsr.models.base import Vocab
from cdsr.models.registry import MODELS, build_model, model_config
from cdsr.train.loop import TrainConfig, amp_dtype, pick_device, select_strategy, to_device
from cdsr.train.run import apply_overrides, load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-food-kitchen-benchmark")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every model (for ratios)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. model.loss=bce")
    args = ap.parse_args()
    data = load_split(args.dataset)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    device = pick_device(args.device)
    ds = TrainDataset(data, 50)
    print(f"dataset {args.dataset}: {len(ds)} training users, {vocab.n_items} items; device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':10s} {'train seq/s':>12s} {'epoch s':>8s} {'eval users/s':>13s} {'eval s':>7s}")
    for rep, name in [(r, n) for r in range(args.repeats) for n in args.models]:
        params = apply_overrides(load_params(), name, args.sets)
        torch.manual_seed(0)
        model = build_model(name, model_config(name, params["models"].get(name), "merged"), vocab).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = from_dict(TrainConfig, params.get("train"), "train")
        strategy = select_strategy(model, cfg)  # e.g. AutoCDSR's Pareto step: timed as it trains
        amp = amp_dtype(device) if cfg.amp else None  # the training loop's precision

        def autocast(amp=amp):
            return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        model.train()
        order = torch.randperm(len(ds)).tolist()
        times = []
        for k in range(args.steps + 1):
            idx = order[(k * args.batch_size) % len(ds):][: args.batch_size]
            t = time.perf_counter()
            batch = to_device(ds[idx], device)
            strategy.step(model, batch, opt, cfg, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t)
        seq_s = args.batch_size * len(times) / sum(times)
        if rep:  # evaluation once per model
            print(f"{name:10s} {seq_s:12.0f} {len(ds) / seq_s:8.1f}")
            continue
        t = time.perf_counter()
        res = rank_targets(model, data, "test", "full", EvalConfig(protocols=["full"]), device)
        ev = time.perf_counter() - t
        print(f"{name:10s} {seq_s:12.0f} {len(ds) / seq_s:8.1f} {len(res.ranks) / ev:13.0f} {ev:7.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process, data included): {peak:.0f} MB")


if __name__ == "__main__":
    main()
