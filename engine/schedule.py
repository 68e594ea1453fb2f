"""Learning-rate recipe as pure functions (the authors' code: linear scaling, linear warmup, cosine to 0).

The schedule is stepped once per optimizer step (per iteration, not per epoch). ``step`` counts the
optimizer steps already taken: the lr used for the first step is ``lr_factor(0, ...)``.
"""
from __future__ import annotations

import math

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


class WarmupCosine:
    """Picklable ``LambdaLR`` multiplier (a plain closure would not survive ``state_dict``)."""

    def __init__(self, warmup_steps: int, total_steps: int):
        lr_factor(0, warmup_steps, total_steps)  # validate now, not at the first step
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps)


def _warmup_cosine(steps_per_epoch: int, epochs: int, warmup_epochs: float) -> WarmupCosine:
    total = steps_per_epoch * epochs
    return WarmupCosine(min(total, int(round(warmup_epochs * steps_per_epoch))), total)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                    warmup_epochs: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warmup + cosine as a torch ``LambdaLR`` over the optimizer's (peak) lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps_per_epoch, epochs, warmup_epochs))


def reshape_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lr: float, steps_per_epoch: int,
                     epochs: int, warmup_epochs: float) -> None:
    """After ``load_state_dict`` on resume: keep the step count but take the schedule's shape (epochs,
    warmup, peak lr) from the current config, so that e.g. extending ``train.epochs`` really trains on
    instead of running the extra epochs at lr 0. With an unchanged config the lrs are bit-identical."""
    scheduler.lr_lambdas = [_warmup_cosine(steps_per_epoch, epochs, warmup_epochs) for _ in scheduler.lr_lambdas]
    scheduler.base_lrs = [peak_lr for _ in scheduler.base_lrs]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
        group["initial_lr"] = peak_lr
    scheduler._last_lr = lrs
