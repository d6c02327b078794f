"""Seconds of one ``full`` ranking of every validation user, per registered model.

    python benchmarks/eval_speed.py [--threads 2] [--dataset amazon-food-kitchen-benchmark]
                                    [--models abxi sasrec] [--split valid] [--protocol full]

Each model is built at its params.yaml settings (untrained: speed does not depend on the
weights), ranks once to warm up and once timed. Ranking runs in float32 (evaluation never uses
autocast, so bf16 rounding cannot add ties). Prints the CPU, its flags, the threads and whether
cdsr's allocator settings are on (``CDSR_MALLOC_TUNING=0`` turns them off; compare both in one
sitting: the machine is noisy).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-food-kitchen-benchmark")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--protocol", default="full")
    args = ap.parse_args()

    import torch

    import cdsr  # noqa: F401
    from cdsr import env
    from cdsr.config import from_dict, load_params
    from cdsr.evaluate.protocols import EvalConfig, rank_targets
    from cdsr.models.base import Vocab
    from cdsr.models.registry import MODELS, build_model, model_config
    from cdsr.train.run import cpu_info, load_split

    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params()
    data = load_split(args.dataset)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    ev = from_dict(EvalConfig, params.get("evaluate"), "evaluate")
    cpu = cpu_info()
    print(f"{args.dataset} {args.split} {args.protocol}; {cpu['cpu']} [{' '.join(cpu['cpu_flags'])}], "
          f"{torch.get_num_threads()} threads, float32, allocator tuning {'on' if env.ALLOCATOR_TUNED else 'off'}")
    for name in args.models or list(MODELS):
        torch.manual_seed(0)
        net = build_model(name, model_config(name, (params.get("models") or {}).get(name), "merged"), vocab).eval()
        rank_targets(net, data, args.split, args.protocol, ev, torch.device("cpu"))
        t = time.perf_counter()
        rank_targets(net, data, args.split, args.protocol, ev, torch.device("cpu"))
        print(f"  {name:20s} {time.perf_counter() - t:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
