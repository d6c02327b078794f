"""The training loop: resume after a mid-epoch kill reproduces an uninterrupted run exactly;
early stopping; weights-only checkpoints; one short real run per model and variant."""

from __future__ import annotations

import json

import pytest
import torch

from cdsr.config import ConfigError, load_params
from cdsr.data.loaders import SplitData
from cdsr.evaluate.protocols import EvalConfig
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.train.config import TrainConfig
from cdsr.train.loop import TrainingInterrupted, fit
from cdsr.train.run import set_seed, train_run

SMALL = {"d": 16, "layers": 1, "heads": 2, "max_len": 20, "dropout": 0.2}


@pytest.fixture(scope="module")
def data(tiny_root):
    return SplitData.load(tiny_root / "t" / "processed")


def _fit(data, run_dir, name="sasrec", stop_at=None, epochs=3, ema=0.0):
    set_seed(5)
    model = build_model(name, model_config(name, SMALL, "merged"), Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(epochs=epochs, batch_size=32, checkpoint_every_steps=2, patience=50, progress=False, ema=ema)

    def on_step(step):
        if stop_at is not None and step == stop_at:
            raise TrainingInterrupted("simulated kill")

    res = fit(model, data, cfg, seed=5, run_dir=run_dir, eval_cfg=EvalConfig(protocols=["full"], max_len=20), on_step=on_step)
    return model, res


@pytest.mark.parametrize(("name", "ema"), [("sasrec", 0.0), ("hstu", 0.0), ("sasrec", 0.9)])
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, data, name, ema):
    """HSTU also draws random negatives each step; with a weight average, that resumes too."""
    ref_model, ref = _fit(data, tmp_path / "ref", name, ema=ema)
    steps_per_epoch = -(-len(__import__("cdsr.data.loaders", fromlist=["TrainDataset"]).TrainDataset(data, 20)) // 32)
    kill = steps_per_epoch + 3  # inside the second epoch, one step after a mid-epoch checkpoint
    with pytest.raises(TrainingInterrupted):
        _fit(data, tmp_path / "run", name, stop_at=kill, ema=ema)
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["state"]["epoch"] == 1 and ck["state"]["step"] == 2 and ("ema" in ck) == bool(ema)
    model, res = _fit(data, tmp_path / "run", name, ema=ema)  # resumes from last.pt
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_NDCG@10"] for h in res.history] == [h["val_NDCG@10"] for h in ref.history]
    assert res.best_epoch == ref.best_epoch
    best = [torch.load(tmp_path / r / "best.pt", weights_only=True)["model"]["item_emb.weight"] for r in ("ref", "run")]
    assert torch.equal(*best)  # best.pt (the average, with ema): the same weights either way


def test_weight_average_is_what_validation_ranks_and_best_keeps(tmp_path, data, monkeypatch):
    """With train.ema the best checkpoint holds the average, which follows
    a <- d a + (1 - d) w after every step (the first step copies w), not the last weights."""
    from cdsr.train import loop

    d, seen = 0.5, []
    real_step = loop._Session._step

    def step(self, idx):  # the weights after every step, in order
        out = real_step(self, idx)
        seen.append(self.model.item_emb.weight.detach().clone())
        return out

    monkeypatch.setattr(loop._Session, "_step", step)
    model, res = _fit(data, tmp_path / "ema", epochs=1, ema=d)
    monkeypatch.undo()
    avg = seen[0]
    for w in seen[1:]:
        avg = d * avg + (1 - d) * w
    best = torch.load(tmp_path / "ema" / "best.pt", weights_only=True)["model"]["item_emb.weight"]
    assert torch.allclose(best, avg, atol=1e-6) and not torch.allclose(best, model.item_emb.weight, atol=1e-4)
    _fit(data, tmp_path / "plain", epochs=1)
    with pytest.raises(ValueError, match="without train.ema"):  # a run started without the average
        _fit(data, tmp_path / "plain", epochs=2, ema=d)
    with pytest.raises(ConfigError, match=r"train.ema must be in \[0, 1\)"):
        TrainConfig(ema=1.0)


def test_early_stopping_and_best_checkpoint(tmp_path, data):
    set_seed(1)
    model = build_model("sasrec", model_config("sasrec", SMALL, "merged"), Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(epochs=50, batch_size=64, lr=0.05, patience=2, progress=False)  # a high lr overfits fast
    res = fit(model, data, cfg, seed=1, run_dir=tmp_path, eval_cfg=EvalConfig(protocols=["full"], max_len=20))
    assert res.stopped_early and res.epochs_run == res.best_epoch + 1 + 2
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch and best["metric"] == pytest.approx(res.best_metric)


@pytest.mark.parametrize(("name", "variant", "extra"), [
    *((n, v, {}) for n in ("sasrec", "bert4rec", "hstu") for v in ("merged", "single")),
    ("hstu_cd", "merged", {"attention": "tiled"}),  # the block-sparse path through the real loop
])
def test_short_training_run_beats_random(tmp_path, tiny_root, in_root, name, variant, extra):
    params = load_params()
    params["models"][name] = {**params["models"].get(name, {}), **SMALL, **extra}
    params["train"] = {**params["train"], "batch_size": 64, "lr": 0.005, "patience": 3, "progress": False}
    params["evaluate"] = {"protocols": ["full", "sampled-100"], "max_len": 20}
    m = train_run("t", name, variant, params, tmp_path / "run", seed=3, epochs=4, data_root=tiny_root)
    assert set(m["protocols"]) == {"full", "sampled-100"}
    assert set(m["protocols"]["full"]["domains"]) == {"Books", "Movies_and_TV", "CDs_and_Vinyl"}
    # random HR@10 among 101 candidates is ~0.1; a trained model is clearly better
    assert m["protocols"]["sampled-100"]["overall"]["HR@10"] > 0.15, m["protocols"]["sampled-100"]["overall"]
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["protocols"]["full"]["overall"]["NDCG@10"] == m["protocols"]["full"]["overall"]["NDCG@10"]
    if variant == "single":
        assert all((tmp_path / "run" / f"domain-{d}" / "best.pt").exists() for d in ("Books", "Movies_and_TV", "CDs_and_Vinyl"))


def test_step_log_keeps_exactly_the_checkpointed_steps(tmp_path):
    """steps.csv is appended at checkpoints; a resume drops rows written past its checkpoint (a
    kill between the append and the checkpoint write) so that no step appears twice."""
    import csv

    from cdsr.runs import StepLog

    log = StepLog(tmp_path / "steps.csv")
    for s in range(1, 6):
        log.add(s, 0, {"loss": s / 10, "pareto_ratio": 0.5})
    log.flush()
    log.flush()  # nothing pending: no duplicate header or rows
    rows = list(csv.DictReader((tmp_path / "steps.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"] and float(rows[2]["loss"]) == 0.3
    StepLog(tmp_path / "steps.csv").truncate(3)
    log = StepLog(tmp_path / "steps.csv")
    log.add(4, 0, {"loss": 0.4, "pareto_ratio": 0.5})
    log.flush()
    assert [r["step"] for r in csv.DictReader((tmp_path / "steps.csv").open())] == ["1", "2", "3", "4"]
    StepLog(tmp_path / "steps.csv").truncate(None)  # a checkpoint that predates the log
    assert not (tmp_path / "steps.csv").exists()
