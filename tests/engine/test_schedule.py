"""The learning-rate recipe: linear scaling, per-iteration linear warmup, cosine to 0."""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from conftest import BASE_CONFIG

from engine.schedule import WarmupCosineSchedule, lr_at, lr_factor, scaled_lr


def test_linear_scaling():
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.1, 1024) == pytest.approx(0.4)      # 8 GPUs x 128
    assert scaled_lr(0.1, 512) == pytest.approx(0.2)       # 8 GPUs x 64 (ResNet-101/152)
    assert scaled_lr(0.02, 1024) == pytest.approx(0.08)    # the fine-tune ablation lr
    with pytest.raises(ValueError):
        scaled_lr(0.1, 0)


def test_warmup_then_cosine_values():
    w, t = 5, 25
    assert [lr_factor(s, w, t) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, w, t) == pytest.approx(1.0)                       # cosine starts at the peak
    assert lr_factor(15, w, t) == pytest.approx(0.5)                      # half way through the cosine
    assert lr_factor(10, w, t) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(24, w, t) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert lr_factor(25, w, t) == 0.0 and lr_factor(99, w, t) == 0.0
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)                      # no warmup
    assert lr_at(15, 0.4, w, t) == pytest.approx(0.2)
    values = [lr_factor(s, w, t) for s in range(w, t)]
    assert all(a > b for a, b in pairwise(values))                          # strictly decreasing
    with pytest.raises(ValueError):
        lr_factor(0, 11, 10)


def test_schedule_sets_the_lr_of_every_step_and_resumes_by_step_alone():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=123.0)
    sched = WarmupCosineSchedule.from_epochs(0.4, steps_per_epoch=10, epochs=4, warmup_epochs=1)
    assert (sched.warmup_steps, sched.total_steps) == (10, 40)
    seen = []
    for step in range(40):
        assert sched.apply(opt, step) == opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"]
        seen.append(opt.param_groups[0]["lr"])
    # bit-identical to the formula (what a LambdaLR over the peak lr computed): resume is exact
    assert seen == [0.4 * lr_factor(s, 10, 40) for s in range(40)]
    assert seen[9] == 0.4 and seen[10] == 0.4 and seen[39] > 0.0 and sched.lr(40) == 0.0
    # a longer run resumed at step 17 continues on the new cosine (no scheduler state involved)
    longer = WarmupCosineSchedule.from_epochs(0.4, 10, 8, 1)
    assert longer.lr(17) == pytest.approx(lr_at(17, 0.4, 10, 80)) and longer.lr(17) > sched.lr(17)
    with pytest.raises(ValueError):
        WarmupCosineSchedule(0.1, warmup_steps=11, total_steps=10)


def test_schedule_epochs_sets_the_cosine_length_not_the_run_length():
    """train.schedule_epochs=100 with train.epochs=20: the run follows the first 20 epochs of a 100-epoch cosine
    (the authors' fine-tune reading), so its lr never reaches 0."""
    from engine.builders import build_optimization
    from engine.config import load_config
    from engine.distributed import DistInfo
    cfg = load_config(BASE_CONFIG, ["train.epochs=20", "train.schedule_epochs=100", "train.warmup_epochs=5"])
    opt = build_optimization(cfg, torch.nn.Linear(2, 2), DistInfo(), steps_per_epoch=10)
    assert opt.schedule.total_steps == 1000 and opt.schedule.warmup_steps == 50
    assert opt.schedule.lr(199) == pytest.approx(opt.schedule.peak_lr * lr_factor(199, 50, 1000))
    assert opt.schedule.lr(199) > 0.8 * opt.schedule.peak_lr  # 150 of 950 cosine steps in
