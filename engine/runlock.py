"""One lock for owning a directory: the trainer's run directory (``train.lock``) and each ablation point
(``ablation.lock``) use :class:`RunLock`.

A lock is a file created with ``O_CREAT | O_EXCL`` holding a JSON record (pid, host, start, Slurm job and
restart count, boot id); its holder keeps an exclusive ``flock`` on it while it, or a child that inherited the
descriptor, lives. An existing lock is stale, and broken, when it was left by an earlier incarnation of this
Slurm job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``: requeued, so Slurm killed it on every node);
or is on this host and its ``flock`` is free (the kernel drops it when the holder dies, ``kill -9`` included;
records without one fall back to the pids; an earlier boot is stale); or is unreadable (empty, garbage) and
older than ``LOCK_GRACE_S`` with no ``flock`` held. A lock held on another host is never broken automatically.

Across nodes, exclusion rests on ``O_EXCL`` alone (atomic on NFSv3+, Lustre, GPFS, BeeGFS, CephFS), never on
``flock`` reaching the file server, which mount options can make node-local; ``flock`` answers only same-host
questions, where one kernel answers exactly. Breakers are serialized by a ``flock`` on ``<name>.break``.
I/O failures raise :class:`LockError`, one line naming the path; a failed write leaves no lock file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from engine.config import ConfigError

TRAIN_LOCK = "train.lock"
LOCK_GRACE_S = 60.0  # an unreadable lock younger than this may be one being written: treated as held
BREAK_WAIT_S = 5.0   # how long a breaker waits for another breaker before treating the lock as held
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # flock unsupported on this file system


class LockError(ConfigError):
    """A lock file could not be created, written, read or removed (one line naming the path and the errno)."""


class RunDirInUseError(ConfigError):
    """Another live trainer owns the run directory (same message on every rank)."""


def _error(action: str, path: Path | str, e: OSError) -> LockError:
    return LockError(f"cannot {action} lock file {path}: [Errno {e.errno}] {e.strerror or e}")


@functools.cache
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    except (OSError, IndexError):
        pass
    return True


def _restart_count(value: Any) -> int:
    """``SLURM_RESTART_COUNT`` as an int (unset, absent from an old lock file, or garbage: 0)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_record(raw: bytes) -> dict[str, Any]:
    """A lock file's record, or ``{}`` if it is not one (empty, being written, garbage)."""
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    ok = isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)
    return info if ok else {}


def _probe(fd: int) -> bool | None:
    """Whether some process holds an exclusive ``flock`` on ``fd``'s file (None: ``flock`` unsupported)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


@dataclass(frozen=True)
class Snapshot:
    """One look at a lock file. ``info``: its record (``{}`` if unreadable); ``ident``: (device, inode, mtime,
    size); ``age``: seconds since it was written; ``held``: a process holds its ``flock`` (None: unsupported)."""
    info: dict[str, Any]
    raw: bytes
    ident: tuple[int, int, int, int]
    age: float
    held: bool | None


def inspect(path: Path | str) -> Snapshot | None:
    """The lock file at ``path`` (None if there is none). Raises :class:`LockError` if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _error("read", path, e) from None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)  # a record is a few hundred bytes
        held = _probe(fd)
    except OSError as e:
        raise _error("read", path, e) from None
    finally:
        os.close(fd)
    return Snapshot(parse_record(raw), raw, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size),
                    max(0.0, time.time() - st.st_mtime), held)


def stale_reason(info: dict[str, Any], host: str | None = None, *, held: bool | None = None,
                 age: float = 0.0) -> str | None:
    """Why the lock with record ``info`` is stale (the rules in the module docstring), or None if it may be live.
    ``held`` and ``age`` come from :func:`inspect`; without them a record is judged by its pids."""
    if not info:
        if held or age < LOCK_GRACE_S:
            return None
        return "which no process holds"
    job = os.environ.get("SLURM_JOB_ID")
    if (job and info.get("slurm_job") == job
            and _restart_count(info.get("slurm_restart")) < _restart_count(os.environ.get("SLURM_RESTART_COUNT"))):
        # Same job id with the same restart count is another process of this allocation (salloc, or several
        # runners in one batch script), possibly alive: it falls through to the host rules.
        return f"an earlier run of Slurm job {job}, which was requeued"
    if info.get("host") != (host or socket.gethostname()):
        return None
    if info.get("boot") and _boot_id() and info["boot"] != _boot_id():
        return "which ended when its host rebooted"
    if info.get("flock") and held is not None:
        return None if held else "which ended without releasing it"
    if _pid_alive(info.get("pid")) or _pid_alive(info.get("child_pid")):
        return None
    return "which ended without releasing it"


def is_stale(info: dict[str, Any] | None, host: str | None = None, **seen: Any) -> bool:
    return info is not None and stale_reason(info, host, **seen) is not None


def held_by(path: Path | str) -> Snapshot | None:
    """The lock file at ``path`` if a live (not stale) process may hold it, else None."""
    snap = inspect(path)
    if snap is None or is_stale(snap.info, held=snap.held, age=snap.age):
        return None
    return snap


def describe(info: dict[str, Any] | None, age: float | None = None) -> str:
    if not info:
        return "an unreadable lock file" + (f" written {age:.0f} s ago" if age is not None else "")
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    job = f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""
    return f"pid {info.get('pid')} on host {info.get('host')} (started {when}{job})"


def _write_all(fd: int, data: bytes, offset: int = 0) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class RunLock:
    """The lock ``directory/name``, held by at most one process: ``with RunLock(d, "x.lock") as lock: if
    lock.acquired: ...``, or :meth:`try_acquire` / :meth:`release`.

    After a refused :meth:`try_acquire`, ``holder`` is the live holder's record (``{}``: an unreadable lock) and
    :meth:`describe_holder` says who it is; after a successful one, ``took_over`` is the stale lock it broke and
    why (None if there was none). I/O failures raise :class:`LockError`.
    """

    def __init__(self, directory: Path | str, name: str):
        self.path = Path(directory) / name
        self.break_path = self.path.with_name(name + ".break")
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.acquired = False
        self.holder: dict[str, Any] | None = None
        self.took_over: tuple[Snapshot, str] | None = None
        self._seen: Snapshot | None = None   # the refusing lock file, for describe_holder
        self._why_kept = ""                  # why a lock that looked stale was kept (no flock, busy breaker)
        self._fd: int | None = None
        self._flock = False
        self._child: int | None = None

    def _record(self) -> bytes:
        return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "child_pid": self._child,
                            "token": self.token, "started": self.started,
                            "slurm_job": os.environ.get("SLURM_JOB_ID"),
                            "slurm_restart": _restart_count(os.environ.get("SLURM_RESTART_COUNT")),
                            "boot": _boot_id(), "flock": self._flock}) + "\n").encode()

    def try_acquire(self) -> bool:
        """Take the lock (True), or find it held by a live process (False). Stale locks are broken first."""
        if self.acquired:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LockError(f"cannot create the directory of lock file {self.path}: [Errno {e.errno}] "
                            f"{e.strerror or e}") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                snap = inspect(self.path)
                if snap is None:
                    continue  # released meanwhile
                reason = stale_reason(snap.info, held=snap.held, age=snap.age)
                if reason and self._break(snap, reason):
                    continue
                self.holder, self._seen = snap.info, snap
                return False
            except OSError as e:
                raise _error("create", self.path, e) from None
            self._own(fd)
            return True
        self._seen = inspect(self.path)
        self.holder = self._seen.info if self._seen else {}
        return False

    def _own(self, fd: int) -> None:
        """Lock and fill a lock file just created; on failure remove it, so no empty lock is left behind."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a contender's probe holds LOCK_SH for an instant: wait for it
                self._flock = True
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
            _write_all(fd, self._record())
            os.fsync(fd)
        except OSError as e:
            # Ours alone: a contender breaks neither a young unreadable file nor one whose flock is held.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)
            raise _error("write", self.path, e) from None
        self._fd, self.acquired = fd, True

    def _break(self, snap: Snapshot, reason: str) -> bool:
        """Remove the lock file judged stale in ``snap``, if it still is that file and still stale. True: try
        to create it again (removed, or changed meanwhile, which the caller judges anew); False: keep it.

        POSIX has no "unlink if still this file", so breakers are serialized by an exclusive ``flock`` on
        ``<name>.break`` (the kernel drops it if its holder dies, so it never goes stale) and re-check under it.
        Nobody else changes the file between that check and the unlink: other breakers wait on the mutex, its
        owner is gone (that is what stale means), and ``O_EXCL`` creators only create a missing file. Without
        ``flock``, or after waiting ``BREAK_WAIT_S`` for another breaker, the lock is treated as held.
        """
        try:
            mutex = os.open(self.break_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _error("create", self.break_path, e) from None
        try:
            deadline = time.monotonic() + BREAK_WAIT_S
            while True:
                try:
                    fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self._why_kept = f"another process has been breaking it for {BREAK_WAIT_S:g} s"
                        return False
                    time.sleep(0.01)
                except OSError as e:
                    if e.errno not in _NO_FLOCK:
                        raise _error("lock", self.break_path, e) from None
                    self._why_kept = f"it looks stale ({reason}), but without flock here it is not broken " \
                                     f"automatically: delete {self.path} if its holder has ended"
                    return False
            current = inspect(self.path)
            if current is None:
                return True
            if (current.ident, current.raw) != (snap.ident, snap.raw) or not is_stale(
                    current.info, held=current.held, age=current.age):
                return True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _error("remove stale", self.path, e) from None
            self.took_over = (snap, reason)
            return True
        finally:
            os.close(mutex)  # releases the flock

    def describe_holder(self) -> str:
        """Who holds the lock, after a refused :meth:`try_acquire` (one line, with what to do if not obvious)."""
        snap = self._seen
        text = describe(self.holder, snap.age if snap else None)
        if snap is not None and not snap.info:
            text += f", broken once {LOCK_GRACE_S:.0f} s old if no process holds it"
        elif self._why_kept:
            text += f"; {self._why_kept}"
        elif self.holder and self.holder.get("host") != socket.gethostname():
            text += f"; another host, not checked from here: delete {self.path} if that process has ended"
        elif snap is not None and snap.held and not any(_pid_alive(self.holder.get(k)) for k in ("pid", "child_pid")):
            text += "; that process has ended, but a child that inherited the lock still runs"
        return text

    def fileno(self) -> int | None:
        """The held lock file's descriptor: pass it to a child (``pass_fds``) to keep the lock live while the
        child runs, even if this process dies first."""
        return self._fd

    def set_child(self, child_pid: int) -> None:
        """Record the child that works under this lock (shown to users, and the liveness fallback without
        ``flock``). Best effort: the record is rewritten in place (the ``flock`` stays on this file)."""
        if not self.acquired:
            return
        self._child = child_pid
        data = self._record()
        with contextlib.suppress(OSError):
            _write_all(self._fd, data)
            os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the ``flock``."""
        if not self.acquired:
            return
        try:
            mine = os.fstat(self._fd)
            here = os.stat(self.path)
            if (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino):
                os.unlink(self.path)  # before dropping the flock: nobody may judge it stale while it is ours
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd, self.acquired = None, False

    def __enter__(self) -> RunLock:
        self.try_acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirLock:
    """One trainer per run directory: ``run_dir/train.lock`` held for the trainer's lifetime.

    Args:
        run_dir: the run directory (created if missing).
        log: where the note about a replaced stale lock goes.
    """

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.log = log
        self._lock = RunLock(self.run_dir, TRAIN_LOCK)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirInUseError` naming the holder (:class:`LockError` on I/O)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot create {self.run_dir}: {e.strerror or e}") from None
        if not self._lock.try_acquire():
            raise RunDirInUseError(
                f"run directory {self.run_dir} is in use by {self._lock.describe_holder()}: wait for that trainer "
                "to finish (or stop it), or choose another output_dir")
        if self._lock.took_over:
            snap, reason = self._lock.took_over
            self.log(f"note: taking over the run directory from {describe(snap.info, snap.age)}, {reason}")

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
