"""Atomic per-run locks, so that concurrent ``run`` processes never train the same point twice.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+), holding JSON
``{"pid", "host", "child_pid", "token", "started"}``. A lock whose host is this machine and whose runner
and trainer processes are both gone is stale and is broken; a lock held on another host is never broken
automatically (its liveness cannot be checked from here): delete the file by hand if that job is dead. The one
exception is a lock left by an earlier incarnation of this Slurm job (same ``SLURM_JOB_ID``, lower
``SLURM_RESTART_COUNT``: the job was requeued, so Slurm killed every process of that incarnation). A lock with
the same job id and the same restart count is *not* stale by that rule: every process of one allocation
(``salloc``, or several ``run`` processes started from one batch script) shares the job id, and those are alive.

Breaking a stale lock is serialized by an advisory ``flock`` on ``ablation.lock.break`` (see ``RunLock._break``),
so a breaker never removes a lock it has not verified as stale, and two processes never both hold the lock.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

LOCK_NAME = "ablation.lock"
BREAK_NAME = LOCK_NAME + ".break"  # flock'ed (filelock) while breaking a stale lock (see RunLock._break)
BREAK_WAIT_S = 5.0  # how long a breaker waits for another breaker before treating the lock as held


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


def _restart_count(value: Any) -> int:
    """``SLURM_RESTART_COUNT`` as an int (unset, absent from an old lock file, or garbage: 0)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def is_stale(info: Optional[dict[str, Any]], host: Optional[str] = None) -> bool:
    if not info or "pid" not in info:
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if (job and info.get("slurm_job") == job
            and _restart_count(info.get("slurm_restart")) < _restart_count(os.environ.get("SLURM_RESTART_COUNT"))):
        # Left by an earlier incarnation of this Slurm job, which was requeued: Slurm killed all of its processes
        # (on whatever node they ran). The same job id with the same restart count is just another process of
        # this allocation, possibly alive: it falls through to the host/pid rule below.
        return True
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
                           "slurm_job": os.environ.get("SLURM_JOB_ID"),
                           "slurm_restart": _restart_count(os.environ.get("SLURM_RESTART_COUNT"))})

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
        """Remove the lock file if it still is ``stale`` (the content judged stale). True: retry creating it.

        Why not rename-aside-and-check: ``rename(lock, aside)`` moves whatever file is at the lock path, which by
        then may be a live lock that a racing breaker took after removing the stale one. Putting it back is not
        atomic with anything: a third process can create a fresh lock in between, and then the one whose file was
        moved away and the third process both hold the lock. POSIX has no "unlink if still this file", so
        breakers are serialized instead, and the check and the unlink happen under one mutex:

        * under an exclusive ``flock`` on ``ablation.lock.break`` (released by the kernel if its holder dies, so it
          can never go stale itself), re-read the lock file and unlink it only if its content equals ``stale``
          (same token, pid, host: tokens are unique, so it is the very file judged stale);
        * between that read and the unlink nobody else can change the file at the lock path: other breakers wait
          on the mutex; its owner, which alone rewrites (``set_child``) or removes (``release``) it, is gone
          (that is what stale means); and ``O_EXCL`` creators only create when the path is free.

        If the content differs (broken and re-taken meanwhile, or released), nothing is removed and the caller
        re-reads and re-judges it. ``filelock`` handles the mutex file's own life cycle (a holder that finds its
        inode unlinked by a releasing peer retries on the new file, so two processes never lock two different
        inodes). If ``flock`` is unsupported here, or another breaker holds the mutex longer
        than ``BREAK_WAIT_S``, the lock is treated as held (never removed unsafely): remove it by hand. Across
        hosts (only the requeue rule breaks another host's lock) this relies on ``flock`` reaching the file
        server (NFS with locking, Lustre ``-o flock``); with node-local locking only the content check guards it.
        """
        mutex = self._break_mutex()
        if mutex is None:
            return False
        try:
            current = read_lock(self.path)
            if current is None:
                return True  # removed meanwhile: retry creating
            if current != stale:
                return True  # not the file judged stale (re-taken, or rewritten): retry, which re-judges it
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            return True
        finally:
            mutex.release()

    def _break_mutex(self):
        """A held ``filelock`` (exclusive ``flock``) on the break mutex, or None if it cannot be had (see ``_break``).

        ``filelock`` does the host-local part: the kernel releases an ``flock`` when its holder dies, so this mutex
        never goes stale. Its soft (marker-file) fallback is switched off: on a file system without ``flock`` the
        lock is treated as held rather than broken under a weaker mutex.
        """
        from filelock import Timeout, UnixFileLock

        path = str(self.path.with_name(BREAK_NAME))
        try:
            mutex = UnixFileLock(path, timeout=BREAK_WAIT_S, fallback_to_soft=False)
        except TypeError:  # filelock < 4 has no soft fallback to switch off
            mutex = UnixFileLock(path, timeout=BREAK_WAIT_S)
        try:
            mutex.acquire(poll_interval=0.01)
        except (Timeout, OSError, NotImplementedError):  # held too long, or flock unsupported (ENOLCK, ENOSYS, ...)
            return None
        return mutex

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
