"""Learning-rate recipe as pure functions (the authors' code: linear scaling, linear warmup, cosine to 0).

The lr is set before every optimizer step (per iteration, not per epoch) from :class:`WarmupCosineSchedule`,
a pure function of the step, as ffcv's ImageNet example does. ``step`` counts the optimizer steps already
taken: the lr used for the first step is ``lr_factor(0, ...)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr`` is the lr for ``reference_batch`` images per step."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return base_lr * global_batch / reference_batch


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step already moves,
    and the last warmup step reaches the peak). Then a half cosine from 1 at ``warmup_steps`` to 0 at
    ``total_steps``. Steps past the end stay at 0.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    return peak_lr * lr_factor(step, warmup_steps, total_steps)


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """The run's lr as a pure function of the optimizer step (no scheduler state to save or patch on resume:
    a resumed run simply continues at ``global_step``, with the shape taken from the current config).

    Args:
        peak_lr: lr at the end of warmup (``scaled_lr(base_lr, global_batch)``).
        warmup_steps: linear warmup length in optimizer steps.
        total_steps: steps of the whole run (``steps_per_epoch * epochs``); the cosine reaches 0 there.
    """
    peak_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self):
        lr_factor(0, self.warmup_steps, self.total_steps)  # validate now, not at the first step

    @classmethod
    def from_epochs(cls, peak_lr: float, steps_per_epoch: int, epochs: int,
                    warmup_epochs: float) -> WarmupCosineSchedule:
        total = steps_per_epoch * epochs
        return cls(peak_lr, min(total, int(round(warmup_epochs * steps_per_epoch))), total)

    def lr(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0-based: the steps already taken)."""
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for optimizer step ``step``; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
