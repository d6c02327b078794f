"""On-demand benchmark of data-parallel training (not a test): the same run with 1 and with N
processes (``cdsr train --nproc N``, torchrun, gloo on CPU / NCCL on GPU), same global batch.

Per process count it prints the training throughput (examples/s over the training seconds that
``fit.json`` records, validation excluded), its ratio to one process, the wall time of the whole
command, and the test NDCG@10 / HR@10 (full ranking) beside the one-process run's.

The cores are split evenly: one process gets every core as torch threads, N processes get
cores / N threads each (OMP_NUM_THREADS), so on a CPU the question is whether N processes keep the
throughput of one (target: within 10% for 2 processes); on a machine with N GPUs (``--device
cuda``) each process drives its own GPU and the target is near-linear scaling.

    .venv/bin/python benchmarks/ddp_scaling.py                        # synthetic, sasrec, 1 vs 2
    .venv/bin/python benchmarks/ddp_scaling.py --model autocdsr_sasrec --epochs 3
    .venv/bin/python benchmarks/ddp_scaling.py --dataset amazon-food-kitchen --device cuda --nprocs 1,2,4,8

Runs go to ``--workdir`` (default: a temporary folder, removed at the end). Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace, nproc: int, out: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 1
    cmd = [sys.executable, "-m", "cdsr", "train", "--dataset", args.dataset, "--model", args.model,
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(out), "--nproc", str(nproc),
           "--root", args.root, "--set", f"train.batch_size={args.batch_size}", "--set", "train.progress=false",
           "--set", f"train.device={args.device}", "--set", f"train.patience={args.epochs + 1}", *args.set]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(f"nproc {nproc}: failed\n{res.stderr[-2000:]}")
        return {}
    fit = json.loads((out / "fit.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return {"threads": threads, "wall": wall, "train_seconds": sum(f["train_seconds"] for f in fit["fit"].values()),
            "full": metrics["protocols"]["full"]["overall"] if "full" in metrics["protocols"] else {}}


def examples_per_epoch(dataset: str, root: str, max_len: int = 50) -> int:
    from cdsr.data.loaders import TrainDataset
    from cdsr.train.run import load_split

    return len(TrainDataset(load_split(dataset, Path(root)), max_len))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--root", default=str(ROOT / "data"))
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--set", action="append", default=[], help="extra --set for cdsr train (repeatable)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args(argv)
    args.set = [x for s in args.set for x in ("--set", s)]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cdsr-ddp-"))
    n_ex = examples_per_epoch(args.dataset, args.root) * args.epochs
    print(f"{args.dataset} / {args.model}: {args.epochs} epochs x global batch {args.batch_size}, {n_ex} examples; "
          f"{os.cpu_count()} cores, device {args.device}")
    print(f"{'procs':>5} {'threads':>7} {'train s':>8} {'ex/s':>9} {'ratio':>6} {'wall s':>7} {'NDCG@10':>8} {'HR@10':>7}")
    base = None
    results = {}
    for n in [int(x) for x in args.nprocs.split(",")]:
        r = run(args, n, work / f"n{n}")
        if not r:
            continue
        rate = n_ex / max(r["train_seconds"], 1e-9)
        base = base or rate
        results[n] = rate / base
        print(f"{n:>5} {r['threads']:>7} {r['train_seconds']:>8.2f} {rate:>9.0f} {rate / base:>6.2f} {r['wall']:>7.1f} "
              f"{r['full'].get('NDCG@10', float('nan')):>8.4f} {r['full'].get('HR@10', float('nan')):>7.4f}")
    if args.device == "cpu" and 2 in results:
        verdict = "MET" if results[2] >= 0.9 else "NOT MET"
        print(f"target (CPU): 2 processes within 10% of 1 process's throughput: {results[2]:.2f} -> {verdict}")
    elif args.device == "cuda":
        for n, ratio in results.items():
            print(f"scaling on {n} GPU(s): {ratio:.2f} x one GPU (ideal {n})")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
