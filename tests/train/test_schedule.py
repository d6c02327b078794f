"""Learning-rate schedules (train.schedule): the rate per step against hand values, the
plateau cut driven by validation, exact resume of a scheduled run, and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from cdsr.config import ConfigError, from_dict
from cdsr.data.loaders import SplitData, TrainDataset
from cdsr.evaluate.protocols import EvalConfig
from cdsr.models.base import Vocab
from cdsr.models.registry import build_model, model_config
from cdsr.train.config import ScheduleConfig, TrainConfig, lr_multiplier
from cdsr.train.loop import TrainingInterrupted, fit
from cdsr.train.run import set_seed

SMALL = {"d": 16, "layers": 1, "heads": 2, "max_len": 20, "dropout": 0.2}


def test_warmup_and_cosine_by_hand():
    c = ScheduleConfig(kind="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    # 4 steps per epoch, 3 epochs: warm-up over steps 0..3, then cosine over the 8 remaining
    assert [lr_multiplier(c, s, 4, 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(c, 4, 4, 3) == pytest.approx(1.0)
    assert lr_multiplier(c, 8, 4, 3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_multiplier(c, 12, 4, 3) == pytest.approx(0.1)  # past the end: the floor
    assert lr_multiplier(ScheduleConfig(), 7, 4, 3) == 1.0
    assert lr_multiplier(ScheduleConfig(kind="plateau", min_lr_ratio=0.2), 7, 4, 3, plateau_scale=0.125) == 0.2


def test_schedule_config_errors():
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"schedule": {"kind": "step"}}, "train")
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"schedule": {"factor": 1.5}}, "train")
    cfg = from_dict(TrainConfig, {"schedule": {"kind": "cosine", "warmup_epochs": 1}}, "train")
    assert cfg.schedule.kind == "cosine" and not cfg.schedule.trivial and TrainConfig().schedule.trivial


@pytest.fixture(scope="module")
def data(tiny_root):
    return SplitData.load(tiny_root / "t" / "processed")


def _fit(data, run_dir, schedule, stop_at=None, epochs=3, lr=0.005):
    set_seed(5)
    model = build_model("sasrec", model_config("sasrec", SMALL, "merged"),
                        Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr, checkpoint_every_steps=2, patience=50, progress=False,
                      schedule=schedule)

    def on_step(step):
        if stop_at is not None and step == stop_at:
            raise TrainingInterrupted("simulated kill")

    res = fit(model, data, cfg, seed=5, run_dir=run_dir, eval_cfg=EvalConfig(protocols=["full"], max_len=20),
              on_step=on_step)
    return model, res


def test_cosine_rates_reach_the_optimiser_and_resume_exactly(tmp_path, data):
    sched = ScheduleConfig(kind="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    ref_model, ref = _fit(data, tmp_path / "ref", sched)
    spe = -(-len(TrainDataset(data, 20)) // 32)
    assert [h["lr"] for h in ref.history] == pytest.approx(
        [0.005 * lr_multiplier(sched, (e + 1) * spe - 1, spe, 3) for e in range(3)])
    assert ref.history[0]["lr"] == pytest.approx(0.005)
    assert 0.005 > ref.history[1]["lr"] > ref.history[2]["lr"] > 0.0005
    with pytest.raises(TrainingInterrupted):
        _fit(data, tmp_path / "run", sched, stop_at=spe + 3)
    model, res = _fit(data, tmp_path / "run", sched)
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["val_NDCG@10"] for h in res.history] == [h["val_NDCG@10"] for h in ref.history]


def test_a_schedule_changes_training_and_a_flat_one_changes_nothing(tmp_path, data):
    plain, _ = _fit(data, tmp_path / "a", ScheduleConfig(), epochs=1)
    # a flat cosine (floor 1.0) goes through the per-step path and must change nothing
    same, _ = _fit(data, tmp_path / "b", ScheduleConfig(kind="cosine", min_lr_ratio=1.0), epochs=1)
    warm, _ = _fit(data, tmp_path / "c", ScheduleConfig(warmup_epochs=1), epochs=1)
    a, b, c = (torch.cat([p.flatten() for p in m.parameters()]) for m in (plain, same, warm))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_plateau_cuts_the_rate_after_its_patience(tmp_path, data):
    # lr 0.05 overfits the tiny data within a few epochs, so validation stops improving
    _, res = _fit(data, tmp_path / "p", ScheduleConfig(kind="plateau", factor=0.5, plateau_patience=1), epochs=8,
                  lr=0.05)
    lrs = [h["lr"] for h in res.history]
    vals = [h["val_NDCG@10"] for h in res.history]
    scale, best, expect = 1.0, -math.inf, []
    for v in vals:  # the rule, replayed by hand on the validation values
        if v > best:
            best = v
        else:
            scale *= 0.5
        expect.append(0.05 * scale)
    assert lrs == pytest.approx(expect) and min(lrs) < 0.05


def test_epoch_warmup_is_abxis_linear_lr_stepped_per_epoch():
    """torch's LinearLR(start_factor=1e-5, total_iters=10) stepped once per epoch, as ABXI's code."""
    c = ScheduleConfig(kind="plateau", warmup_epochs=10, warmup_unit="epoch", warmup_start=1e-5)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-5, total_iters=10)
    for epoch in range(13):
        for step in range(epoch * 4, epoch * 4 + 4):  # 4 steps per epoch: one rate within an epoch
            assert lr_multiplier(c, step, 4, 500) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step()
    with pytest.raises(ConfigError, match="whole"):
        from_dict(TrainConfig, {"schedule": {"warmup_epochs": 1.5, "warmup_unit": "epoch"}}, "train")
    with pytest.raises(ConfigError, match="validate_in_warmup"):
        from_dict(TrainConfig, {"epochs": 3, "validate_in_warmup": False, "schedule": {"warmup_epochs": 3}}, "train")


def _fit_cfg(data, run_dir, **train):
    set_seed(5)
    model = build_model("sasrec", model_config("sasrec", SMALL, "merged"),
                        Vocab.from_ranges(data.domain_ranges, data.domain_names))
    cfg = TrainConfig(batch_size=32, progress=False, **train)
    return fit(model, data, cfg, seed=5, run_dir=run_dir, eval_cfg=EvalConfig(protocols=["full"], max_len=20))


def test_no_validation_during_warmup_and_ties_count_as_gains(tmp_path, data):
    sched = ScheduleConfig(warmup_epochs=2, warmup_unit="epoch")
    res = _fit_cfg(data, tmp_path / "w", epochs=4, lr=0.005, patience=50, validate_in_warmup=False, schedule=sched)
    assert ["val_selection" in h for h in res.history] == [False, False, True, True]
    assert [h["lr"] for h in res.history] == pytest.approx([0.005 * 1e-5, 0.005 * (1e-5 + (1 - 1e-5) / 2), 0.005, 0.005])
    assert res.best_epoch >= 2
    # lr ~ 0 (no learning): every validation value is the first one again, a tie
    tiny = dict(epochs=4, lr=1e-30, patience=2)
    strict = _fit_cfg(data, tmp_path / "s", **tiny)
    ties = _fit_cfg(data, tmp_path / "t", ties_improve=True, **tiny)
    vals = {h["val_selection"] for h in strict.history}
    assert len(vals) == 1
    assert (strict.best_epoch, strict.epochs_run, strict.stopped_early) == (0, 3, True)
    assert (ties.best_epoch, ties.epochs_run, ties.stopped_early) == (3, 4, False)
