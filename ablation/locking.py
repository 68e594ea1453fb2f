"""Atomic per-run locks, so that concurrent ``run`` processes never train the same point twice.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+), holding JSON
``{"pid", "host", "child_pid", "token", "started"}``. A lock whose host is this machine and whose runner
and trainer processes are both gone is stale and is broken; a lock held on another host is never broken
automatically (its liveness cannot be checked from here): delete the file by hand if that job is dead. The one
exception is a lock left by the same Slurm job id (a requeued job): its earlier incarnation is gone.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

LOCK_NAME = "ablation.lock"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # a zombie child of ours counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    except (OSError, IndexError):
        pass
    return True


def read_lock(path: Path) -> Optional[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}  # being written, or garbage: treated as held (not provably stale)


def describe(info: Optional[dict[str, Any]]) -> str:
    if not info:
        return "an unknown process"
    return f"pid {info.get('pid')} on {info.get('host')}"


def is_stale(info: Optional[dict[str, Any]], host: Optional[str] = None) -> bool:
    if not info or "pid" not in info:
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job") == job:
        return True  # left by an earlier incarnation of this (requeued) Slurm job
    if info.get("host") != (host or socket.gethostname()):
        return False
    return not (_pid_alive(info.get("pid")) or _pid_alive(info.get("child_pid")))


class RunLock:
    """``with RunLock(run_dir) as lock: if lock.acquired: ...``."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.acquired = False
        self.holder: Optional[dict[str, Any]] = None
        self.started = time.time()

    def _content(self, child_pid: Optional[int] = None) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "child_pid": child_pid,
                           "token": self.token, "started": self.started,
                           "slurm_job": os.environ.get("SLURM_JOB_ID")})

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.path)
                if info is None:
                    continue  # released meanwhile
                if is_stale(info) and self._break(info):
                    continue
                self.holder = info
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
            self.acquired = True
            return True
        self.holder = read_lock(self.path)
        return False

    def _break(self, stale: dict[str, Any]) -> bool:
        """Remove a stale lock; safe against a racing breaker that already replaced it with a live one."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else broke it; retry creating
        moved = read_lock(aside)
        if moved == stale:
            aside.unlink(missing_ok=True)
            return True
        # We moved a fresh lock taken by a racing process in between: put it back if the slot is still free.
        try:
            os.link(aside, self.path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        aside.unlink(missing_ok=True)
        return False

    def set_child(self, child_pid: int) -> None:
        """Record the trainer's pid, so that the lock stays live while an orphaned trainer still runs."""
        if not self.acquired:
            return
        tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{self.token}")
        tmp.write_text(self._content(child_pid))
        os.replace(tmp, self.path)

    def release(self) -> None:
        if not self.acquired:
            return
        info = read_lock(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.acquired = False

    def __enter__(self) -> "RunLock":
        self.try_acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
