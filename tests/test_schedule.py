"""The learning-rate recipe: linear scaling, per-iteration linear warmup, cosine to 0."""
from __future__ import annotations

import math

import pytest
import torch

from engine.schedule import build_scheduler, lr_at, lr_factor, scaled_lr


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
    assert all(a > b for a, b in zip(values, values[1:]))                 # strictly decreasing
    with pytest.raises(ValueError):
        lr_factor(0, 11, 10)


def test_torch_scheduler_follows_pure_function_per_iteration():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = build_scheduler(opt, steps_per_epoch=10, epochs=4, warmup_epochs=1)
    seen = []
    for _ in range(40):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, 0.4, 10, 40) for s in range(40)])
    # state_dict round trip continues the same schedule (resume)
    opt2 = torch.optim.SGD([p], lr=0.4)
    sched2 = build_scheduler(opt2, steps_per_epoch=10, epochs=4, warmup_epochs=1)
    p2 = torch.nn.Parameter(torch.zeros(1))
    opt3 = torch.optim.SGD([p2], lr=0.4)
    sched3 = build_scheduler(opt3, 10, 4, 1)
    for _ in range(17):
        opt3.step()
        sched3.step()
    opt2.load_state_dict(opt3.state_dict())
    sched2.load_state_dict(sched3.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(17, 0.4, 10, 40))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(18, 0.4, 10, 40))
