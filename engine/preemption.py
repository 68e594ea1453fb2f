"""Stop requests: SIGTERM, SIGUSR1 (Slurm preemption or time limit, ``scancel``, a torchrun shutdown) and SIGINT
(Ctrl-C).

The handler only records the request. The training loop checks it at its sync points (single process: every
step, it is a Python bool) and, under DDP, ORs it over the ranks in the metrics all-reduce, so that every
rank stops at the same step; it then checkpoints and the process exits (0 for SIGTERM/SIGUSR1, so that a
requeued job resumes there; 130 for Ctrl-C). Before training starts (:attr:`Preemption.training` False) and at
a second Ctrl-C, SIGINT raises ``KeyboardInterrupt`` at once instead: there is nothing to save yet, or the user
does not want to wait for it.
"""
from __future__ import annotations

import signal


class Preemption:
    """Context manager installing the stop-request handlers (restored on exit)."""

    SIGNALS = tuple(s for s in (getattr(signal, name, None) for name in ("SIGTERM", "SIGUSR1", "SIGINT")) if s)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self.training = False  # set by the trainer once a stop request can end in a checkpoint
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    @property
    def interrupted(self) -> bool:
        """The stop was asked with Ctrl-C (SIGINT), not by a scheduler."""
        return self.signum == signal.SIGINT

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and (self.interrupted or not self.training):
            raise KeyboardInterrupt
        self.requested = True
        if not self.interrupted:  # Ctrl-C decides how the run ends, whatever came before it
            self.signum = signum

    def __enter__(self) -> Preemption:
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
