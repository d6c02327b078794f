"""Throughput of batch recommendations (users per second), on demand.

    python benchmarks/batch_recommend.py --model models:/cdsr-synthetic@champion --dataset synthetic
                                          [--k 10] [--threads 2]

Runs :func:`cdsr.track.batch.recommend_all` (every user, every domain the model knows) twice and
prints the second run's seconds and users per second, with the CPU and threads (the model is
scored in float32, as served).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--root", default="data")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch

    import cdsr  # noqa: F401
    from cdsr.config import load_params
    from cdsr.track import tracking
    from cdsr.track.batch import recommend_all
    from cdsr.train.run import cpu_info

    if args.threads:
        torch.set_num_threads(args.threads)
    tcfg = tracking.tracking_config(load_params())
    with tempfile.TemporaryDirectory() as tmp:
        recommend_all(args.model, args.dataset, args.root, args.k, Path(tmp) / "warm.parquet", tcfg)
        meta = recommend_all(args.model, args.dataset, args.root, args.k, Path(tmp) / "recs.parquet", tcfg)
    cpu = cpu_info()
    print(f"{args.dataset}: {meta['users']} users x {meta['rows'] // max(meta['users'], 1)} domains, k {args.k}: "
          f"{meta['seconds']} s, {meta['users_per_second']} users/s ({meta['model_uri']}); {cpu['cpu']} "
          f"[{' '.join(cpu['cpu_flags'])}], {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
