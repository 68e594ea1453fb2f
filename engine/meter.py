"""Training/evaluation metrics accumulated on the device, read only at sync points."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import distributed as dist_lib

NO_BAD_STEP = 2 ** 62  # "no non-finite loss yet" sentinel of the on-device first-bad-step tracker

# Slots of the sums vector (one tensor, so that one all-reduce covers all of them).
LOSS_SUM, CORRECT1, CORRECT5, COUNT, SKIPPED = range(5)


@dataclass(frozen=True)
class MeterReading:
    """All-reduced metrics since the last reset (averages over ``count`` images of every rank)."""
    loss: float
    top1: float                 # percent
    top5: float                 # percent
    count: int                  # images seen
    correct1: int
    correct5: int
    skipped: int                # unreadable images skipped (data.skip_corrupt)
    stop_requested: bool        # a stop (SIGTERM/SIGUSR1) was requested on any rank
    first_bad_step: int | None  # first global step with a non-finite loss on any rank, or None


class Meter:
    """Running sums kept on the device; :meth:`reduce` is the only place that syncs (and all-reduces).

    Args:
        device: where the sums live (the training device, so that :meth:`add` never syncs).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # see the slot names above
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=self.device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, skipped: int = 0,
            step: int | None = None) -> None:
        """Count one batch: ``loss`` (scalar, batch mean), ``logits`` (N, classes), ``target`` (N,).
        ``step``: the global step, to remember the first one with a non-finite loss."""
        # Only device-side ops with Python scalars here: creating a tensor from host data would sync.
        n = target.numel()
        k = min(5, logits.shape[1])
        top = logits.detach().topk(k, dim=1).indices        # (N, k)
        hit = top.eq(target.view(-1, 1))                    # (N, k): hit[:, 0] is a top-1 hit
        self.sums[LOSS_SUM] += loss.detach().double() * n
        self.sums[CORRECT1] += hit[:, 0].sum()
        self.sums[CORRECT5] += hit.any(1).sum()
        self.sums[COUNT] += n
        self.add_skipped(skipped)
        if step is not None:
            bad = ~torch.isfinite(loss.detach())
            self.first_bad = torch.where(bad & (self.first_bad == NO_BAD_STEP), self.first_bad.new_full((), step),
                                         self.first_bad)

    def add_skipped(self, skipped: int) -> None:
        """Count images that were unreadable and skipped."""
        if skipped:
            self.sums[SKIPPED] += skipped

    def state(self) -> dict:
        return {"sums": self.sums.cpu(), "first_bad": self.first_bad.cpu()}

    def load(self, state: dict) -> None:
        self.sums = state["sums"].to(self.device)
        self.first_bad = state["first_bad"].to(self.device)

    def reduce(self, stop_requested: bool = False) -> MeterReading:
        """All-reduce and read the sums (a sync point). ``stop_requested`` (this rank's) is OR-ed over ranks,
        so that every rank learns at the same step that one of them was asked to stop."""
        sums = torch.cat([self.sums, torch.tensor([float(stop_requested)], dtype=torch.float64, device=self.device)])
        dist_lib.all_reduce_sum(sums)
        bad = -self.first_bad.clone()  # the MIN over ranks, as the MAX of the negation
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        loss_sum, c1, c5, count, skipped, stops = sums.tolist()
        first_bad = -int(bad.item())
        n = max(count, 1.0)
        return MeterReading(loss=loss_sum / n, top1=100.0 * c1 / n, top5=100.0 * c5 / n, count=int(round(count)),
                            correct1=int(round(c1)), correct5=int(round(c5)), skipped=int(round(skipped)),
                            stop_requested=stops > 0, first_bad_step=None if first_bad >= NO_BAD_STEP else first_bad)
