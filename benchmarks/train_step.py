"""Time of one training step of a model on real batches, and where it goes (torch profiler).

    python benchmarks/train_step.py --model abxi [--threads 2] [--fp32] [--set model.packed=false]
                                    [--dataset amazon-food-kitchen-benchmark] [--profile]

Builds the model at its params.yaml settings (plus ``--set model.X=...``), takes 8 seeded
batches of 256 training sequences, runs 2 warm-up steps and times 6 with the model's own
training strategy (bf16 autocast where the CPU has it, unless ``--fp32``); prints the mean step
time, the epoch it implies, the CPU, its flags and the precision; ``--profile`` adds the
profiler's table of the 3 steps after. Compare settings within one run of the machine: A/B
figures taken minutes apart on a shared machine are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="abxi")
    ap.add_argument("--dataset", default="amazon-food-kitchen-benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--fp32", action="store_true", help="float32 (train.amp=false)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="model.X=value")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import torch

    import cdsr  # noqa: F401
    from cdsr.config import load_params
    from cdsr.data.loaders import TrainDataset
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.runs import apply_overrides
    from cdsr.train.config import TrainConfig, amp_dtype
    from cdsr.train.run import cpu_info, load_split, set_seed
    from cdsr.train.strategy import select_strategy

    if args.threads:
        torch.set_num_threads(args.threads)
    params = apply_overrides(load_params(), args.model, args.sets)
    data = load_split(args.dataset)
    set_seed(1)
    cfg = model_config(args.model, (params.get("models") or {}).get(args.model), "merged")
    net = build_model(args.model, cfg, Vocab.from_ranges(data.domain_ranges, data.domain_names))
    ds = TrainDataset(data, getattr(cfg, "max_len", 50))
    tc = TrainConfig(lr=1e-3, grad_clip=0)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr)
    strategy = select_strategy(net, tc)
    amp = None if args.fp32 else amp_dtype(torch.device("cpu"))

    def autocast():
        return torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()

    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    bs = args.batch_size
    batches = [ds[perm[i * bs:(i + 1) * bs].numpy()] for i in range(8)]
    net.train()
    for b in batches[:2]:
        strategy.step(net, b, opt, tc, autocast)
    t = time.perf_counter()
    for b in batches[2:]:
        strategy.step(net, b, opt, tc, autocast)
    step = (time.perf_counter() - t) / 6
    cpu = cpu_info()
    steps = -(-len(ds) // bs)
    print(f"{args.model} {' '.join(args.sets)}: step {step * 1000:.0f} ms, epoch of {steps} steps ~{step * steps:.1f} s; "
          f"{'bf16' if amp is not None else 'fp32'}, {torch.get_num_threads()} threads, {cpu['cpu']} "
          f"[{' '.join(cpu['cpu_flags'])}]")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[2:5]:
                strategy.step(net, b, opt, tc, autocast)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
