"""Stop requests (SIGTERM, SIGUSR1: Slurm preemption or time limit, ``scancel``, a torchrun shutdown).

The handler only records the request. The training loop checks it at its sync points (single process: every
step, it is a Python bool) and, under DDP, ORs it over the ranks in the metrics all-reduce, so that every
rank stops at the same step; it then checkpoints and the process exits 0 (a requeued job resumes there).
"""
from __future__ import annotations

import signal


class Preemption:
    """Context manager installing the stop-request handlers (restored on exit)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def _handler(self, signum, frame) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> "Preemption":
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread (e.g. embedded use): no preemption handling
            self._previous = {}
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False
