"""Data-parallel training over several processes: torch.distributed, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 -m cdsr train --dataset D --model M   # or: cdsr train --nproc 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
             --nproc-per-node 8 -m cdsr train ...                                  # several machines

gloo on CPU, NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``). How a run is split:

- **Batches.** Every rank draws the same global batch order from (seed, epoch) (the order of a
  one-process run with the same ``train.batch_size``, the *global* batch) and takes its share
  ``batch[rank::world]`` of each global batch. A rank whose share is empty (a last batch smaller
  than the world) runs the batch's first example with weight 0, so every rank takes part in every
  collective.
- **Gradients.** After the backward pass, rank r's gradients enter ``sum_r (n_r / N) g_r`` (n_r of
  the global batch's N examples on rank r): one all_reduce of one flat buffer per step. For a loss
  averaged over examples this is the gradient of the global batch. Clipping and the optimiser step
  then run on identical gradients on every rank, so the replicas stay identical.
- **Pareto (AutoCDSR).** The MGDA solve needs the gradients of the global batch: g_rec and g_cd
  (and the two loss values) are reduced *before* the Gram matrix is formed, so every rank solves
  the same problem and gets the same ratio (see :class:`cdsr.train.pareto.ParetoStrategy`).
- **Rank 0** validates, early-stops, writes the checkpoints, the step log and the run's files,
  and broadcasts its decisions; a resumed run's ``last.pt`` is read by rank 0 and broadcast, so
  only the node of rank 0 needs the run directory. ``last.pt`` holds every rank's RNG state, so a
  run killed on any rank and restarted (torchrun ``--max-restarts``, or the same command again)
  continues exactly as if never stopped.

NOTE (why not ``torch.nn.parallel.DistributedDataParallel``): its reducer averages the gradients
that ``.backward()`` accumulates, with equal weights per rank. The Pareto step takes one of its
two gradients with ``torch.autograd.grad`` (which bypasses those hooks) and both must be reduced
before the solve; equal weights are wrong for a last partial batch; and several models leave
parameters without a gradient in some steps (``find_unused_parameters``). The one flat all_reduce
here is what DDP's reducer does per bucket; at these model sizes (at most a few million
parameters) a single bucket costs one collective per step and no overlap is lost worth the name.
NOTE (models with in-batch terms): contrastive losses over the batch (DPG-Diff's tri-view InfoNCE)
see the rank's share of the batch, not the global batch: their negatives are per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)  # rank 0 validates (and scores) while the others wait


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The rank and world torchrun puts in the environment (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group (once per process; gloo on CPU, NCCL on CUDA) and return this
    process's place and device (``cuda:LOCAL_RANK`` under several processes on CUDA)."""
    d = from_env()
    if not d.active:
        return d, device
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"data-parallel training runs on cpu (gloo) or cuda (nccl), not {device.type}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=_attempt_store(d), rank=d.rank, world_size=d.world, timeout=TIMEOUT)
        else:
            dist.init_process_group(backend, timeout=TIMEOUT)
    return d, device


def _attempt_store(d: Dist) -> dist.Store:
    """torchrun's store, under a prefix of its own per restart.

    NOTE: torchrun keeps one store across the restarts of its workers (``--max-restarts``) and
    torch's env:// set-up puts no restart in its keys, so a restarted gloo group could read the
    dead workers' addresses and fail to connect (seen here 2 times in 3); a prefix per restart
    count keeps every attempt's keys apart."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), d.world, is_master=False,
                          timeout=TIMEOUT)
    return dist.PrefixStore(f"cdsr/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value; tensors inside keep their device)."""
    if not d.active:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def replicate(model: torch.nn.Module, d: Dist) -> None:
    """Rank 0's parameters and buffers on every rank (every rank builds the model from the same
    seed; this makes the replicas identical whatever the initialisation did)."""
    if d.active:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def shard(batch: list[int], d: Dist) -> tuple[list[int], float]:
    """This rank's share of a global batch and its weight n_r / N (see the module docstring)."""
    if not d.active:
        return batch, 1.0
    mine = batch[d.rank::d.world]
    if not mine:
        return batch[:1], 0.0
    return mine, len(mine) / len(batch)


class GradSync:
    """Combines one step's gradients and scalars across ranks as ``sum_r weight_r * x_r``.

    In one process every method returns its input untouched, so a one-process run computes
    exactly what it computed before data parallelism existed.
    """

    def __init__(self, d: Dist = SINGLE, weight: float = 1.0, device: torch.device | None = None):
        self.d, self.weight, self.device = d, weight, device or torch.device("cpu")  # NCCL reduces on the GPU

    def reduce(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat float tensor's weighted sum over ranks (in place; returned)."""
        if self.d.active:
            flat.mul_(self.weight)
            dist.all_reduce(flat)
        return flat

    def values(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scalar tensors' weighted sums over ranks (one process: the tensors themselves)."""
        if not self.d.active:
            return values
        return tuple(self.reduce(torch.stack([v.float() for v in values])).unbind())

    def grad_list(self, grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Reduced gradients of ``params``: a parameter keeps ``None`` only where no rank has a
        gradient for it (AdamW treats None and a zero gradient differently)."""
        if not self.d.active:
            return grads
        has = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=params[0].device)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
        flat = self.reduce(torch.cat([flat, has]))  # flags > 0: some working rank has the gradient
        used = flat[-len(params):].tolist()
        out, at = [], 0
        for p, u in zip(params, used):
            n = p.numel()
            out.append(flat[at:at + n].view_as(p).to(p.dtype) if u > 0 else None)
            at += n
        return out

    def grads(self, params: list[torch.Tensor]) -> None:
        """Replace every parameter's ``.grad`` with its reduced gradient."""
        if not self.d.active:
            return
        for p, g in zip(params, self.grad_list([p.grad for p in params], params)):
            p.grad = g

    def stats(self, stats: dict[str, float]) -> dict[str, float]:
        """The weighted mean over ranks of a step's logged scalars (same keys on every rank)."""
        if not self.d.active:
            return stats
        keys = sorted(stats)
        vals = self.reduce(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device))
        return dict(zip(keys, vals.tolist()))


NO_SYNC = GradSync()
