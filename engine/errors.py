"""Error types of the training engine that the entry points report as one ``error:`` line (a leaf: imports
nothing, so that ``engine.cli`` can name them without importing torch).

The config's :class:`engine.config.ConfigError`, the data pipeline's :mod:`engine.data.errors` and
:class:`engine.fileio.WriteError` complete the set.
"""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A missing, truncated, malformed or otherwise unusable checkpoint (one-line message naming the file)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf."""


class NonFiniteOutputError(RuntimeError):
    """A model produced NaN/inf outputs, or a checkpoint holds NaN/inf weights."""


class SimulatedKill(BaseException):
    """Raised by ``debug.kill_after_steps``: leave immediately, saving nothing (like SIGKILL).

    A BaseException so that no ``except Exception`` on the way out can swallow it."""
