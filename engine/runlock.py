"""Ownership of a run directory: one trainer at a time.

The lock is an advisory ``flock`` on ``<run_dir>/train.lock`` (through the ``filelock`` package, which
PyTorch depends on), taken without waiting. Beside it, ``train.lock.json`` names the holder (host, pid, start
time) for the message a refused trainer prints.

Stale locks need no cleanup: the kernel releases a ``flock`` when its process dies, however it dies
(``kill -9`` included), so a dead holder never blocks a new trainer; the holder file it left is simply
replaced (with a note naming the dead holder). On network file systems the lock is as
good as their ``flock`` support (NFSv4 and Lustre with ``flock`` mount options provide it).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from engine.config import ConfigError
from engine.fileio import atomic_write_text

LOCK_NAME = "train.lock"
HOLDER_NAME = "train.lock.json"


class RunDirInUseError(ConfigError):
    """Another live trainer owns the run directory (same message on every rank)."""


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (holder unknown)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} (started {when})"


def read_holder(run_dir: str | Path) -> dict | None:
    try:
        data = json.loads((Path(run_dir) / HOLDER_NAME).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class RunDirLock:
    """Hold ``run_dir``'s training lock for the lifetime of one trainer.

    Args:
        run_dir: the run directory (created if missing).
        log: where the note about a replaced stale holder goes.
    """

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.log = log
        self._lock: FileLock | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirInUseError` naming the holder."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot create {self.run_dir}: {e.strerror or e}") from None
        lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirInUseError(
                f"run directory {self.run_dir} is in use by {describe_holder(read_holder(self.run_dir))}: "
                "wait for that trainer to finish (or stop it), or choose another output_dir") from None
        self._lock = lock
        previous = read_holder(self.run_dir)
        host = socket.gethostname()
        if previous and previous.get("pid") != os.getpid():
            # We hold the flock, so its last holder is gone (a kill -9, a crashed node; the kernel released its
            # lock): the file it left is stale, whatever its pid (possibly reused by now) says.
            self.log(f"note: taking over the run directory from {describe_holder(previous)}, which ended "
                     "without releasing it")
        atomic_write_text(self.run_dir / HOLDER_NAME,
                          json.dumps({"host": host, "pid": os.getpid(), "started": time.time()}) + "\n")

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            info = read_holder(self.run_dir)
            if info and info.get("pid") == os.getpid():
                (self.run_dir / HOLDER_NAME).unlink()
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
