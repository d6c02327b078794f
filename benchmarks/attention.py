"""Attention efficiency of one HSTU layer: dense vs intra-domain (issue 6; docs/methods.md "HSTU-CD").

    python benchmarks/attention.py                       # synthetic balanced domains, CPU
    python benchmarks/attention.py --kuairand            # real KuaiRand-1K windows (needs the build)
    python benchmarks/attention.py --device cuda         # the same on a GPU
    python benchmarks/attention.py --blocks              # tile-size sweep (what auto_block is based on)

For each sequence length S and number of domains D (events drawn uniformly from D domains, so
delta = sum_d s_d^2 / S^2 is near 1/D), batches of ``--tokens`` events (B = tokens // S rows)
go through:

- ``dense``: the HSTU layer with its dense causal attention (scores for all S x S pairs, then
  the mask: the reference implementation's cost);
- ``intra``: the same layer with the block-sparse intra-domain attention
  (:func:`cdsr.models.intra_attention.tiled_plan`, tile size from ``auto_block``);
- ``causal-tiled``: the same block-sparse kernel with the causal mask only. Dense attention could
  skip the upper triangle too, so ``causal-tiled / intra`` isolates what the domain grouping saves.

Times are forward + backward (sum of the outputs), medians over ``--repeats``. The candidates run
in turn inside each repeat, so slow drift of the machine hits all of them alike. ``dense`` and
``causal-tiled`` do not depend on the domains: they are measured once per length (on the first D)
and compared with every D's ``intra``. Two timings are printed:
- ``attn``: the attention alone, with the plan (mask, bias, tiles) built beforehand. The plan is
  built once per forward and shared by all layers;
- ``layer``: the whole layer (projections, LayerNorms, attention) plus building the plan.

``ideal`` is 1/delta, computed over the batch (sum of S^2 / sum of sum_d s_d^2). ``eff`` is the
measured attention speedup divided by the ideal; the target is >= 0.8 for S >= 800. Peak memory
is the extra resident memory of one forward + backward of the layer. On CPU it is measured in a
fresh process (peak RSS of a step above the RSS before it, after a warm-up step); on CUDA with
``torch.cuda.max_memory_allocated``.
Every configuration also checks that intra-tiled and the dense intra-domain reference agree.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cdsr  # noqa: F401
from cdsr.models.hstu import HSTUConfig, HSTULayer, RelativeBias
from cdsr.models.intra_attention import auto_block, dense_plan, domain_delta, intra_domain_mask, tiled_plan

IMPLS = ("dense", "intra", "causal-tiled")


def synthetic_batch(S: int, D: int, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, D, (B, S), generator=g)
    ts = torch.cumsum(torch.randint(1, 3600, (B, S), generator=g), 1)
    return dom, torch.ones(B, S, dtype=torch.bool), ts


def kuairand_batches(S: int, B: int, n_batches: int, seed: int, root: Path) -> list[tuple]:
    """Windows of the last S events of users with >= S events (no padding), B users a batch."""
    from cdsr.data.loaders import SplitData

    data = SplitData.load(root / "kuairand-1k" / "processed")
    lens = np.diff(data.offsets)
    users = np.flatnonzero(lens >= S)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        pick = rng.choice(users, size=min(B, len(users)), replace=False)
        idx = data.offsets[pick + 1][:, None] - S + np.arange(S)[None]
        out.append((torch.from_numpy(data.domains[idx]), torch.ones(len(pick), S, dtype=torch.bool),
                    torch.from_numpy(data.timestamps[idx])))
    return out


class Case:
    """One (batch, layer) configuration: builds the plans and runs each candidate."""

    def __init__(self, dom, valid, ts, device, block=0):
        self.dom, self.valid, self.ts = dom.to(device), valid.to(device), ts.to(device)
        B, S = dom.shape
        torch.manual_seed(0)
        self.layer = HSTULayer(HSTUConfig(d=64, heads=2, d_qk=32, d_v=32, max_len=S, dropout=0.0)).to(device)
        self.rab = RelativeBias(S, True, True).to(device)
        self.qt = torch.cat([self.ts[:, 1:], self.ts[:, -1:]], 1)
        self.x = torch.randn(B, S, 64, device=device)
        self.qkv = [torch.randn(B, 2, S, 32, device=device) for _ in range(3)]
        self.block = block
        self.device = device
        self.S = S

    def plan(self, impl: str):
        fn = self.rab.pair_fn(self.ts, self.qt)
        if impl == "dense":
            return dense_plan(intra_domain_mask(self.dom, self.valid, same_domain=False), fn, float(self.S))
        if impl == "intra-dense":
            return dense_plan(intra_domain_mask(self.dom, self.valid), fn, float(self.S))
        return tiled_plan(self.dom, self.valid, fn, float(self.S), self.block, same_domain=impl == "intra")

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def attn(self, impl: str, plan=None) -> float:
        with torch.no_grad():
            plan = plan if plan is not None else self.plan(impl)
        q, k, v = (t.clone().requires_grad_() for t in self.qkv)
        self._sync()
        t0 = time.perf_counter()
        plan.attend(q, k, v).sum().backward()
        self._sync()
        return time.perf_counter() - t0

    def layer_step(self, impl: str) -> float:
        x = self.x.clone().requires_grad_()
        self.layer.zero_grad(set_to_none=True)
        self._sync()
        t0 = time.perf_counter()
        self.layer(x, self.plan(impl)).sum().backward()
        self._sync()
        return time.perf_counter() - t0

    def agree(self) -> float:
        with torch.no_grad():
            a = self.plan("intra").attend(*self.qkv)
            b = self.plan("intra-dense").attend(*self.qkv)
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def peak_mb(case: Case, impl: str) -> float:
    """Extra peak memory (MiB) of one layer forward + backward. CUDA: allocator statistics. CPU:
    a fresh interpreter (a fork would inherit, and can deadlock in, the OpenMP thread pool)
    rebuilds the case, runs one warm-up step, resets its peak RSS and reports the peak of a second
    step above the RSS before it."""
    if case.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case.layer_step(impl)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "case.pt"
        torch.save({"dom": case.dom, "valid": case.valid, "ts": case.ts, "block": case.block}, f)
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(f), impl], capture_output=True,
                             text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(path: str, impl: str) -> None:
    c = torch.load(path)
    case = Case(c["dom"], c["valid"], c["ts"], torch.device("cpu"), c["block"])
    case.layer_step(impl)  # warm-up (lazy initialisation), then measure a second step from a reset peak
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    rss0 = _status_kib("VmRSS")
    case.layer_step(impl)
    print(f"{(_status_kib('VmHWM') - rss0) / 1024:.1f}")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(cases: list[Case], repeats: int, memory: bool) -> list[dict]:
    """Time ``intra`` on every case, and ``dense`` / ``causal-tiled`` (which do not depend on the
    domains) on the first case only: their cost is the same for every case of one length, so one
    pooled measurement serves all of them."""
    ref = cases[0]
    with torch.no_grad():
        ref_plans = {i: ref.plan(i) for i in ("dense", "causal-tiled")}
        intra_plans = [c.plan("intra") for c in cases]
    t_ref = {i: {"attn": [], "layer": []} for i in ref_plans}
    t_intra = [{"attn": [], "layer": []} for _ in cases]
    for r in range(repeats + 1):  # the first round warms up
        for i, plan in ref_plans.items():
            a, b = ref.attn(i, plan), ref.layer_step(i)
            if r:
                t_ref[i]["attn"].append(a)
                t_ref[i]["layer"].append(b)
        for c, plan, t in zip(cases, intra_plans, t_intra):
            a, b = c.attn("intra", plan), c.layer_step("intra")
            if r:
                t["attn"].append(a)
                t["layer"].append(b)
    mem_ref = peak_mb(ref, "dense") if memory else float("nan")
    out = []
    for c, plan, t in zip(cases, intra_plans, t_intra):
        res = {kind: {"intra": statistics.median(t[kind]),
                      **{i: statistics.median(t_ref[i][kind]) for i in t_ref}} for kind in ("attn", "layer")}
        res.update(tiles=plan.n_tiles, block=plan.block, agree=c.agree())
        if memory:
            res["mem"] = {"dense": mem_ref, "intra": peak_mb(c, "intra")}
        out.append(res)
    return out


def row(name: str, dom, valid, res: dict) -> str:
    c = torch.stack([((dom == d) & valid).sum(1) for d in range(int(dom.max()) + 1)], 1).double()
    ideal = float(valid.sum(1).double().pow(2).sum() / c.pow(2).sum())
    delta = float(domain_delta(dom, valid).mean())
    a, lay = res["attn"], res["layer"]
    sp = a["dense"] / a["intra"]
    mem = res.get("mem", {})
    return (f"| {name} | {delta:.3f} | {ideal:.2f} | {res['block']} | {1e3 * a['dense']:.1f} | {1e3 * a['intra']:.1f} | "
            f"{sp:.2f} | {sp / ideal:.2f} | {1e3 * a['causal-tiled']:.1f} | {a['causal-tiled'] / a['intra']:.2f} | "
            f"{1e3 * lay['dense']:.1f} | {1e3 * lay['intra']:.1f} | {lay['dense'] / lay['intra']:.2f} | "
            f"{mem.get('dense', float('nan')):.0f} | {mem.get('intra', float('nan')):.0f} | {res['agree']:.1e} |")


HEAD = ("| case | delta | ideal 1/delta | tile | attn dense ms | attn intra ms | speedup | eff (speedup/ideal) | "
        "attn causal-tiled ms | causal-tiled/intra | layer dense ms | layer intra ms | layer speedup | "
        "peak dense MiB | peak intra MiB | max rel diff |\n|" + "---|" * 16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256, 512, 800, 1024, 2048, 4096])
    ap.add_argument("--domains", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, default=8192, help="events per batch (B = tokens // S, at least 1)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--kuairand", action="store_true", help="real KuaiRand-1K windows instead of synthetic")
    ap.add_argument("--data-root", type=Path, default=Path("data"))
    ap.add_argument("--blocks", action="store_true", help="sweep the tile size: intra attention time per block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.tokens} events a batch, "
          f"median of {args.repeats}, torch {torch.__version__}")
    if args.blocks:
        print("| S | D | tile | attn intra ms |\n|---|---|---|---|")
        for S in args.lengths:
            for D in args.domains:
                dom, valid, ts = synthetic_batch(S, D, max(1, args.tokens // S), args.seed)
                counts = torch.stack([(dom == d).sum(1) for d in range(D)], 1)
                for T in (16, 32, 64, 128, 256):
                    case = Case(dom, valid, ts, device, block=T)
                    with torch.no_grad():
                        plan = case.plan("intra")
                    t = statistics.median([case.attn("intra", plan) for _ in range(args.repeats + 1)][1:])
                    mark = " (auto)" if T == auto_block(counts) else ""
                    print(f"| {S} | {D} | {T}{mark} | {1e3 * t:.1f} |", flush=True)
        return 0
    print(HEAD)
    if args.kuairand:
        for S in [s for s in args.lengths if s <= 800] or [800]:
            for k, (dom, valid, ts) in enumerate(kuairand_batches(S, max(1, args.tokens // S), 3, args.seed,
                                                                   args.data_root)):
                (res,) = measure([Case(dom, valid, ts, device)], args.repeats, not args.no_memory)
                print(row(f"KuaiRand S={S} B={dom.shape[0]} #{k}", dom, valid, res), flush=True)
        return 0
    for S in args.lengths:
        batches = [synthetic_batch(S, D, max(1, args.tokens // S), args.seed) for D in args.domains]
        results = measure([Case(*b, device) for b in batches], args.repeats, not args.no_memory)
        for D, (dom, valid, _), res in zip(args.domains, batches, results):
            print(row(f"S={S} D={D} B={dom.shape[0]}", dom, valid, res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
