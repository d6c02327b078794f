"""Data-parallel training under torchrun (gloo, 2 CPU processes), for real: processes started by
``cdsr train --nproc 2`` (torchrun --standalone) on the tiny dataset.

- 2 processes and 1 process with the same global batch reach the same metrics (tolerance below);
- every registered model, the Pareto strategy and the models with auxiliary losses included,
  trains with its replicas bit-identical across ranks (a last global batch of one example leaves
  rank 1 idle: its weight is 0);
- a kill -9 of rank 1 or of rank 0 mid-run: torchrun restarts both processes, they resume from the last
  checkpoint, and the run ends exactly where an uninterrupted 2-process run ends;
- the gradient combination itself, against hand-computed weighted sums.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from servers import descendants

from cdsr.train.distributed import SINGLE, Dist, GradSync, shard

HERE = Path(__file__).resolve().parent
# 2 vs 1 process, dropout 0, float32: the runs differ only where the loss of a model is a mean over
# target positions rather than examples (the gradient of 2 shares, weighted by examples, is then
# not exactly the gradient of the union) and in the order of float sums.
LOSS_RTOL = 0.01  # every logged step's loss
METRIC_ATOL = 0.01  # test NDCG@10 / HR@10, full ranking


def _train(tiny_root, tiny_params, out: Path, model: str, nproc: int, *extra: str, epochs: int = 2,
           env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "cdsr", "train", "--dataset", "t", "--model", model, "--params", str(tiny_params),
           "--root", str(tiny_root), "--out", str(out), "--epochs", str(epochs), "--seed", "3", "--nproc", str(nproc),
           "--set", "train.amp=false", "--set", "train.progress=false", "--set", "train.patience=10",
           "--set", "model.dropout=0.0", "--set", "model.d=16", "--set", "model.max_len=20",
           "--set", "evaluate.max_len=20", "--set", "evaluate.protocols=[full]", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _losses(run: Path) -> list[float]:
    with (run / "steps.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("model", ["sasrec", "autocdsr_sasrec"])  # the standard step and the Pareto step
def test_two_processes_reach_the_metrics_of_one_with_the_same_global_batch(tmp_path, tiny_root, tiny_params, model):
    one = _train(tiny_root, tiny_params, tmp_path / "one", model, 1, "--set", "train.batch_size=32")
    two = _train(tiny_root, tiny_params, tmp_path / "two", model, 2, "--set", "train.batch_size=32")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) > 8  # the same number of optimiser steps: the batch is global
    assert b == pytest.approx(a, rel=LOSS_RTOL)
    for k in ("NDCG@10", "HR@10"):
        assert two["protocols"]["full"]["overall"][k] == pytest.approx(one["protocols"]["full"]["overall"][k],
                                                                       abs=METRIC_ATOL), k
    assert two["protocols"]["full"]["overall"]["n"] == one["protocols"]["full"]["overall"]["n"]
    hist = json.loads((tmp_path / "two" / "fit.json").read_text())["history"]["merged"]
    assert len(hist) == 2 and all("val_selection" in h for h in hist)  # rank 0 validated each epoch
    if model == "autocdsr_sasrec":  # every solve step solved once per global batch, and logged it
        with (tmp_path / "two" / "steps.csv").open() as f:
            assert all(float(r["pareto_solved"]) == 1.0 for r in csv.DictReader(f))


def test_every_model_keeps_identical_replicas(tmp_path, tiny_root):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "ddp_models.py"), str(tiny_root), str(tmp_path)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["examples"] % r0["batch_size"] == 1  # the idle-rank step was exercised
    from cdsr.models.registry import MODELS
    assert set(r0["models"]) == set(MODELS)
    for name, m in r0["models"].items():
        assert m["finite"], name
        assert m["digest"] == r1["models"][name]["digest"], f"{name}: the replicas differ after training"
        assert m["history"] == r1["models"][name]["history"], name  # rank 0's validation, broadcast
        assert m["history"][0]["val_NDCG@10"] > 0, name


def _rank_pid(root_pid: int, rank: int) -> int | None:
    """The process torchrun started as ``rank`` (its environment says so)."""
    for pid in descendants(root_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


KILL_ARGS = ("--set", "train.batch_size=8", "--set", "train.checkpoint_every_steps=3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_root, tiny_params_module):
    """The 2-process run that a killed and restarted one must end exactly like."""
    out = tmp_path_factory.mktemp("ddp") / "ref"
    return out, _train(tiny_root, tiny_params_module, out, "sasrec", 2, *KILL_ARGS, epochs=3)


@pytest.mark.parametrize("rank", [1, 0])  # a worker, and the rank that validates and checkpoints
def test_a_killed_rank_is_restarted_and_resumes_exactly(tmp_path, tiny_root, tiny_params, uninterrupted, rank):
    ref_dir, ref = uninterrupted
    args = KILL_ARGS
    run = tmp_path / "run"
    proc = _train(tiny_root, tiny_params, run, "sasrec", 2, *args, "--max-restarts", "1", epochs=3, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():  # the first checkpoint: rank 1 is mid-run
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.01)
        pid = _rank_pid(proc.pid, rank)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out.decode()[-3000:]
    fit = json.loads((run / "fit.json").read_text())["fit"]["merged"]
    assert fit["resumes"], "the restarted processes did not resume from the checkpoint"
    got = json.loads((run / "metrics.json").read_text())
    assert got["protocols"] == ref["protocols"]
    assert _losses(run) == _losses(ref_dir)  # every step logged once, with the same loss
    a = torch.load(run / "best.pt", weights_only=True)["model"]
    b = torch.load(ref_dir / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shares_and_weights_of_a_global_batch():
    assert shard([5, 6, 7, 8, 9], SINGLE) == ([5, 6, 7, 8, 9], 1.0)
    assert shard([5, 6, 7, 8, 9], Dist(0, 2)) == ([5, 7, 9], 0.6)
    assert shard([5, 6, 7, 8, 9], Dist(1, 2)) == ([6, 8], 0.4)
    assert shard([5], Dist(1, 2)) == ([5], 0.0)  # idle rank: runs the example, contributes nothing
    assert shard([5, 6, 7], Dist(2, 3)) == ([7], 1 / 3)


def test_one_process_leaves_gradients_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    g = p.grad
    GradSync().grads([p])
    assert p.grad is g
    assert GradSync().stats({"loss": 2.5}) == {"loss": 2.5}


def _reduce_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    d = Dist(rank, 2)
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad = torch.tensor([1.0, 2.0]) * (rank + 1)  # rank 0: [1, 2], rank 1: [2, 4]
    if rank == 1:
        b.grad = torch.tensor([10.0, 10.0])  # only rank 1 has a gradient for b; nobody for c
    sync = GradSync(d, weight=[0.75, 0.25][rank])
    sync.grads([a, b, c])
    stats = sync.stats({"loss": [4.0, 8.0][rank]})
    torch.save({"a": a.grad, "b": b.grad, "c": c.grad, "loss": stats["loss"]}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_the_weighted_sum_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.allclose(got["a"], torch.tensor([0.75 * 1 + 0.25 * 2, 0.75 * 2 + 0.25 * 4]))
        assert torch.allclose(got["b"], torch.tensor([2.5, 2.5]))  # rank 0 counts as zero
        assert got["c"] is None  # no rank had one: AdamW must still skip it
        assert got["loss"] == pytest.approx(0.75 * 4 + 0.25 * 8)
