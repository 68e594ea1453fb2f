"""Shared command-line plumbing for ``train_imagenet.py`` / ``eval_imagenet.py``: one-line errors, exit codes."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

EXIT_ERROR = 2       # bad input (config, data, checkpoint) or a stopped run (non-finite loss)
EXIT_KILLED = 137    # debug.kill_after_steps (what a SIGKILL-ed process reports)

_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")


def one_line(exc: BaseException) -> str:
    """A one-line message for ``exc``. Exceptions re-raised from DataLoader workers carry the worker's
    whole traceback in their message; the original message is its last line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if len(lines) > 1 else lines[0]
    return _PREFIX.sub("", line.strip())


def run_guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn``; turn the project's expected failures into ``error: ...`` on stderr and exit code 2."""
    from engine.checkpoint import CheckpointError
    from engine.config import ConfigError
    from engine.data import CorruptImageError, DataError
    from engine.trainer import NonFiniteLossError, SimulatedKill

    expected = (ConfigError, DataError, CorruptImageError, CheckpointError, NonFiniteLossError)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return fn() or 0
    except expected as e:
        # Config errors are identical on every rank; data errors may differ, so every rank reports those.
        if rank == 0 or not isinstance(e, ConfigError):
            where = f" (rank {rank})" if rank else ""
            print(f"error: {one_line(e)}{where}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except SimulatedKill as e:
        print(f"killed: {e}", file=sys.stderr, flush=True)
        return EXIT_KILLED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
