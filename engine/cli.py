"""Shared command-line plumbing for ``train_imagenet.py`` / ``eval_imagenet.py``: one-line errors, exit codes.

Every expected failure ends the process with one ``error: ...`` line on stderr and exit code 2, never a
traceback. Under DDP (torchrun) every rank ends with one line: the failing rank prints its error (with
``(rank R)`` when R > 0), the others ``error: stopped: rank R failed (rank r)``. Errors that are the same on
every rank (config, run directory in use, structural change on resume) are printed once, by rank 0.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable

EXIT_ERROR = 2       # bad input (config, data, checkpoint), a full disk, or a stopped run (non-finite loss)
EXIT_KILLED = 137    # debug.kill_after_steps (what a SIGKILL-ed process reports)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it; the trainer checkpoints first

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


def _is_collective_failure(exc: BaseException) -> bool:
    """A broken collective: another rank left the job (gloo: connection closed/reset; NCCL: a DistError)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Connection closed", "Connection reset",
                                                                     "NCCL", "Broken pipe"))


class Once:
    """``claim()`` is True exactly once (thread-safe): who gets it prints the process's one closing line."""

    def __init__(self):
        self._lock = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True


def _report_expected(e: Exception, rank: int, world: int, where: str) -> None:
    """The one ``error: ...`` line of an expected failure. Config errors are identical on every rank, so only
    rank 0 prints them; data errors may differ, so every rank reports those (and, under DDP, announces its
    failure so the other ranks stop instead of waiting in a collective)."""
    from engine.config import ConfigError

    if isinstance(e, ConfigError):
        if rank == 0:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return
    if world > 1:
        from engine import distributed as dist_lib
        dist_lib.announce_failure(rank)
    print(f"error: {one_line(e)}{where}", file=sys.stderr, flush=True)


def _report_collective_failure(e: Exception, rank: int, where: str) -> None:
    """The one line of a broken collective: the rank that failed first when known, else the error itself."""
    from engine import distributed as dist_lib

    failed = dist_lib.failed_rank()
    if failed is not None and failed != rank:
        print(f"error: stopped: rank {failed} failed{where}", file=sys.stderr, flush=True)
    else:
        print(f"error: stopped: another rank left the job ({one_line(e)[:160]}){where}", file=sys.stderr,
              flush=True)


def run_guarded(fn: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run ``fn``; turn the project's expected failures into ``error: ...`` on stderr and exit code 2, and a
    ``KeyboardInterrupt`` into ``error: <interrupted>`` and exit code 130."""
    # Nothing here imports torch for a single process (a bad config answers at once); DDP needs it anyway.
    from engine.config import ConfigError
    from engine.data.errors import CorruptImageError, DataError
    from engine.errors import CheckpointError, NonFiniteLossError, NonFiniteOutputError, SimulatedKill
    from engine.fileio import WriteError

    expected = (ConfigError, DataError, CorruptImageError, CheckpointError, NonFiniteLossError, NonFiniteOutputError,
                WriteError)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from engine import distributed as dist_lib
    where = f" (rank {rank})" if rank else ""

    def quiet_exit() -> None:
        # torchrun stops the other workers with SIGTERM as soon as one exits non-zero: finish the one line.
        if world > 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    final_line = Once()

    def stopped_by(failed: int) -> None:  # another rank failed while this one may be blocked in a collective
        if final_line.claim():
            quiet_exit()
            print(f"error: stopped: rank {failed} failed{where}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_ERROR)  # files are written atomically: ending here cannot leave half of one

    watch = dist_lib.FailureWatch(rank, stopped_by).start() if world > 1 else None
    try:
        return fn() or 0
    except expected as e:
        quiet_exit()
        if final_line.claim():
            _report_expected(e, rank, world, where)
        return EXIT_ERROR
    except SimulatedKill as e:
        print(f"killed: {e}", file=sys.stderr, flush=True)
        return EXIT_KILLED
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - only a broken collective is handled; anything else is a bug
        if world <= 1 or not _is_collective_failure(e):
            raise
        quiet_exit()
        if final_line.claim():
            _report_collective_failure(e, rank, where)
        return EXIT_ERROR
    finally:
        if watch is not None:
            watch.stop()
