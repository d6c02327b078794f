"""Roofline of one training epoch per model: FLOPs counted, a full epoch timed, against the
machine's measured matmul peak.

    python benchmarks/roofline.py [--dataset amazon-food-kitchen-benchmark] [--models sasrec hstu]
                                  [--settings params large] [--batch-size 256] [--device auto]
                                  [--set train.amp=false] [--json out.json]

For each (model, setting), in a subprocess of its own (so that its peak memory is its own):

- the FLOPs of one real epoch, forward and backward (matrix products and attention, as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them: every GEMM of the encoder, the
  attention and the loss logits, the sampled softmax's sparse table gradient as 2 x nnz x d;
  element-wise work and embedding gathers are not FLOPs here),
  counted over a whole first epoch, which also warms up;
- a second whole epoch, timed, split into data (batch building), forward, loss, backward and
  optimiser (the loss is the time inside the models' loss functions; the fused full-softmax
  cross-entropy computes its own gradient there, so its backward is in "loss"; a model trained
  by the Pareto strategy is timed as whole steps, in "forward"), then one ``full`` validation
  ranking of every user;
- peak memory (the process' maximum RSS on the CPU, ``max_memory_allocated`` on CUDA).

The machine's peaks come from 2048^3 GEMMs in float32 and bfloat16 and a 256 MiB copy (memory
bandwidth), measured before and after the models; the fraction of peak is FLOPs / epoch time /
peak; the bytes every op reads and writes are counted in the same first epoch
(:func:`bytes_counter`), and an epoch's bound is the larger of FLOPs / the GEMM peak of its
precision and bytes / the copy bandwidth. Settings: ``params`` (params.yaml's model section, batch ``--batch-size``) and ``large``
(d=256, one layer, 256 sampled negatives per position where the model has a sampled loss, else
its full softmax). The training precision is the loop's (``train.amp``: bf16 autocast where the
device has native bf16), shown in the table; ``--set train.amp=false`` times float32.
Ratios within one run are what count on a noisy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LARGE = ["model.d=256", "model.layers=1"]


def gemm_peak(dtype_name: str, device: str, n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of an n^3 matrix product (after two warm-up products)."""
    import torch

    dt = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def bandwidth(device: str, mib: int = 256, reps: int = 5) -> float:
    """GB/s of a large tensor copy (read + write)."""
    import torch

    src = torch.empty(mib * 2 ** 18, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def setting_overrides(model: str, setting: str) -> list[str]:
    """--set overrides of a setting: ``large`` asks for 256 sampled negatives where the model's
    config has a sampled loss (``loss: sampled`` / ``n_negatives``), else keeps its softmax."""
    if setting == "params":
        return []
    import dataclasses

    from cdsr.models.registry import MODELS

    fields = {f.name for f in dataclasses.fields(MODELS[model].config)}
    out = [s for s in LARGE if s.split("=")[0].removeprefix("model.") in fields]  # abxi has no `layers`
    if "loss" in fields:
        out.append("model.loss=sampled")
    if "n_negatives" in fields:
        out.append("model.n_negatives=256")
    return out


def sparse_aware_flop_counter():
    """``FlopCounterMode`` that counts a sparse x dense product (the sampled softmax's table
    gradient, a CSR SpMM) as 2 * nnz * n FLOPs; by shape alone it would count it as dense."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def mm(a, b, *_, out_val=None, **__):
        if a.layout != torch.strided:
            return 2 * int(a._nnz()) * b.shape[-1]
        return fc.mm_flop(a.shape, b.shape)

    def addmm(c, a, b, *_, out_val=None, **__):
        if a.layout != torch.strided:
            return 2 * int(a._nnz()) * b.shape[-1]
        return fc.addmm_flop(c.shape, a.shape, b.shape)

    mm._get_raw = addmm._get_raw = True
    return fc.FlopCounterMode(display=False, custom_mapping={aten.mm: mm, aten.addmm: addmm})


def bytes_counter():
    """A dispatch mode that adds up the bytes every aten op reads and writes: its tensor inputs
    and outputs once each (views move nothing and are skipped; a gather reads the rows it
    returns, not its whole table). A lower bound of the epoch's memory traffic: what did not
    stay in cache moved at least once."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    gathers = {aten.index_select.default, aten.embedding.default, aten.gather.default, aten.index.Tensor}

    def size(t) -> int:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return 0
        try:
            return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            return t.numel() * t.element_size()

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False):
                return out
            outs = out if isinstance(out, (tuple, list)) else [out]
            written = sum(size(t) for t in outs)
            if func in gathers:
                read = written + sum(size(a) for a in args[1:] if isinstance(a, torch.Tensor))
            else:
                seen, read = set(), 0
                for a in [*args, *(kwargs or {}).values()]:
                    for t in (a if isinstance(a, (tuple, list)) else [a]):
                        if isinstance(t, torch.Tensor) and id(t) not in seen:
                            seen.add(id(t))
                            read += size(t)
            Bytes.total += read + written
            return out

    return Bytes()


def child(args: argparse.Namespace) -> dict:
    """One (model, setting): count, time, measure; returns the row."""
    import torch
    import torch.nn.functional as F

    import cdsr  # noqa: F401
    from cdsr.config import from_dict, load_params
    from cdsr.data.loaders import TrainDataset
    from cdsr.evaluate.protocols import EvalConfig, rank_targets
    from cdsr.models import layers
    from cdsr.models.base import Vocab
    from cdsr.models.registry import build_model, model_config
    from cdsr.train.loop import TrainConfig, _batch_order, pick_device, select_strategy, to_device
    try:
        from cdsr.train.loop import amp_dtype
    except ImportError:  # code from before bf16 on the CPU (for a "before" table): autocast on CUDA only
        def amp_dtype(device):
            return torch.bfloat16 if device.type == "cuda" else None
    from cdsr.runs import apply_overrides
    from cdsr.train.run import load_split

    sets = setting_overrides(args.model, args.setting) + list(args.sets)
    params = apply_overrides(load_params(), args.model, sets)
    cfg = from_dict(TrainConfig, params.get("train"), "train")
    data = load_split(args.dataset)
    vocab = Vocab.from_ranges(data.domain_ranges, data.domain_names)
    device = pick_device(args.device)
    torch.manual_seed(0)
    mcfg = model_config(args.model, (params.get("models") or {}).get(args.model), "merged")
    model = build_model(args.model, mcfg, vocab).to(device)
    ds = TrainDataset(data, getattr(mcfg, "max_len", 50))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    strategy = select_strategy(model, cfg)
    standard = type(strategy).__name__ == "StandardStrategy"
    amp = amp_dtype(device) if cfg.amp else None

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    # time spent in the loss functions (the models call them through these module attributes)
    spent = {"loss": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            _sync(str(device))
            t = time.perf_counter()
            out = fn(*a, **k)
            _sync(str(device))
            spent["loss"] += time.perf_counter() - t
            return out
        return wrapper

    for loss_fn in ("domain_softmax_loss", "sampled_softmax_loss"):  # the fused losses (absent in older code)
        fn = getattr(layers, loss_fn, None)
        for name in [m for m in sys.modules if m.startswith("cdsr.models.")]:
            if fn is not None and getattr(sys.modules[name], loss_fn, None) is fn:
                setattr(sys.modules[name], loss_fn, timed(fn))
    F.cross_entropy = timed(F.cross_entropy)  # the sampled losses (HSTU, SASRec sampled, DPG's InfoNCE)

    def epoch(epoch_no: int, timers: dict | None) -> int:
        model.train()
        steps = 0
        for idx in _batch_order(len(ds), args.batch_size, 0, epoch_no):
            t0 = time.perf_counter()
            batch = to_device(ds[idx], device)
            _sync(str(device))
            t1 = time.perf_counter()
            before = spent["loss"]
            if standard:
                with autocast():
                    out = model.loss(batch)
                _sync(str(device))
                t2 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                _sync(str(device))
                t3 = time.perf_counter()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            else:
                strategy.step(model, batch, opt, cfg, autocast)
                _sync(str(device))
                t2 = t3 = time.perf_counter()
            _sync(str(device))
            t4 = time.perf_counter()
            if timers is not None:
                loss_t = spent["loss"] - before
                timers["data"] += t1 - t0
                timers["forward"] += t2 - t1 - loss_t
                timers["loss"] += loss_t
                timers["backward"] += t3 - t2
                timers["optimiser"] += t4 - t3
            steps += 1
        return steps

    counter, moved = sparse_aware_flop_counter(), bytes_counter()
    with counter, moved:
        epoch(0, None)
    flops = counter.get_total_flops()
    timers = dict.fromkeys(("data", "forward", "loss", "backward", "optimiser"), 0.0)
    t = time.perf_counter()
    steps = epoch(1, timers)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    rank_targets(model, data, "valid", "full", from_dict(EvalConfig, params.get("evaluate"), "evaluate"), device)
    _sync(str(device))
    eval_s = time.perf_counter() - t
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": args.model, "setting": args.setting, "overrides": sets, "device": device.type,
            "precision": str(amp).replace("torch.", "") if amp is not None else "float32",
            "threads": torch.get_num_threads(), "users": len(ds), "steps": steps, "batch_size": args.batch_size,
            "flops": flops, "bytes": type(moved).total, "epoch_s": train_s, "eval_s": eval_s, "peak_mb": peak_mb,
            **{f"{k}_s": v for k, v in timers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="amazon-food-kitchen-benchmark")
    ap.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    ap.add_argument("--settings", nargs="+", default=["params", "large"], choices=["params", "large"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override, e.g. train.amp=false")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and peaks as JSON")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model, args.setting = args.child
        print("ROW " + json.dumps(child(args)), flush=True)
        return

    import torch

    import cdsr  # noqa: F401
    from cdsr.models.registry import MODELS
    from cdsr.train.loop import pick_device

    device = str(pick_device(args.device))
    models = args.models or list(MODELS)

    def peaks() -> dict:
        return {"fp32": gemm_peak("float32", device), "bf16": gemm_peak("bfloat16", device),
                "bandwidth": bandwidth(device)}

    before = peaks()
    rows = []
    for model in models:
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--child", model, setting, "--dataset", args.dataset,
                   "--batch-size", str(args.batch_size), "--device", args.device,
                   *[x for s in args.sets for x in ("--set", s)]]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
            row = next((json.loads(line[4:]) for line in res.stdout.splitlines() if line.startswith("ROW ")), None)
            if row is None:
                print(f"{model} {setting}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(row)
            print(f"  {model:18s} {setting:6s} epoch {row['epoch_s']:.1f} s", file=sys.stderr, flush=True)
    after = peaks()
    peak = {k: (before[k] + after[k]) / 2 for k in before}
    from cdsr.train.run import cpu_info

    cpu = cpu_info()
    print(f"device {device} ({cpu['cpu']}; flags {' '.join(cpu['cpu_flags']) or 'none of note'}), "
          f"{torch.get_num_threads()} threads; GEMM peak fp32 {peak['fp32']:.0f} GFLOP/s, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s; copy bandwidth {peak['bandwidth']:.1f} GB/s "
          f"(before / after: fp32 {before['fp32']:.0f} / {after['fp32']:.0f}, bf16 {before['bf16']:.0f} / {after['bf16']:.0f})")
    print(f"dataset {args.dataset}, batch {args.batch_size}; bound = max(FLOPs / the GEMM peak of the run's precision, "
          "bytes moved / copy bandwidth); time split: data / forward / loss / backward / optimiser (s)")
    head = ("| model | setting | precision | TFLOP/epoch | GB/epoch | epoch s | FLOP bound s | bytes bound s | "
            "epoch / bound | % of its GEMM peak | data / fwd / loss / bwd / opt | eval s | peak MB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        gemm = peak["bf16" if r["precision"] == "bfloat16" else "fp32"]
        flop_bound = r["flops"] / (gemm * 1e9)
        byte_bound = r.get("bytes", 0) / (peak["bandwidth"] * 1e9)
        bound = max(flop_bound, byte_bound)
        rate = r["flops"] / r["epoch_s"] / 1e9
        split = " / ".join(f"{r[k + '_s']:.1f}" for k in ("data", "forward", "loss", "backward", "optimiser"))
        print(f"| {r['model']} | {r['setting']} | {r['precision']} | {r['flops'] / 1e12:.3f} | {r.get('bytes', 0) / 1e9:.1f} | "
              f"{r['epoch_s']:.1f} | {flop_bound:.1f} | {byte_bound:.1f} | {r['epoch_s'] / bound:.2f} | "
              f"{100 * rate / gemm:.0f}% | {split} | {r['eval_s']:.2f} | {r['peak_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"peaks": {"before": before, "after": after}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
