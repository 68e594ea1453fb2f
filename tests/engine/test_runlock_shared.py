"""engine.runlock: the one lock of run directories (trainer) and ablation points.

Holders are real processes where liveness matters (a child that takes the lock, then is released, killed
with SIGKILL, or exits leaving a grandchild that inherited the descriptor); Slurm is simulated with
SLURM_JOB_ID / SLURM_RESTART_COUNT and another node by the host name in a lock record; full disks and
read-only file systems by failing the write or the create (a real read-only mount is in tests/e2e).
"""
from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine.config import ConfigError
from engine.runlock import LOCK_GRACE_S, LockError, RunDirInUseError, RunDirLock, RunLock, held_by

HOST = socket.gethostname()
NAME = "x.lock"

# A lock holder in its own process: takes the lock, says so, then waits for one command on stdin.
HOLDER = r"""
import os, subprocess, sys
from engine.runlock import RunLock
lock = RunLock(sys.argv[1], sys.argv[2])
print("held" if lock.try_acquire() else "refused", flush=True)
if sys.argv[3:] == ["child"]:  # start a child that inherits the lock (as the ablation runner's trainer does)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock.fileno(),))
    print(child.pid, flush=True)
command = sys.stdin.readline().strip()
if command == "exit":  # die without releasing it
    os._exit(0)
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def holder(tmp_path):
    """``holder(directory, *extra, name=, env=)``: a process holding ``directory/name``; killed at teardown."""
    procs = []

    def start(directory, *extra, name=NAME, env=None):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), name, *extra], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


def record(directory):
    return json.loads((directory / NAME).read_text())


def write_record(directory, **info):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / NAME).write_text(json.dumps({"token": "t", "started": 0.0, "child_pid": None, **info}))


def age_by(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_take_and_release(tmp_path, no_slurm):
    d = tmp_path / "run"
    a = RunLock(d, NAME)
    assert a.try_acquire() and a.took_over is None
    info = record(d)
    assert info["pid"] == os.getpid() and info["host"] == HOST and info["token"] == a.token
    assert info["flock"] is True and info["slurm_job"] is None and info["started"] <= time.time()
    b = RunLock(d, NAME)  # another holder in this process is refused like any other
    assert not b.try_acquire() and b.holder["token"] == a.token
    assert b.describe_holder().startswith(f"pid {os.getpid()} on host {HOST} (started ")
    assert held_by(d / NAME).info["token"] == a.token
    a.set_child(4321)
    assert record(d)["child_pid"] == 4321 and record(d)["token"] == a.token
    a.release()
    assert os.listdir(d) == [] and held_by(d / NAME) is None  # nothing left behind
    with RunLock(d, NAME) as c:
        assert c.acquired and record(d)["token"] == c.token
    assert os.listdir(d) == []


def _race(directory, start, out):
    lock = RunLock(directory, NAME)
    start.wait()
    out.put(lock.try_acquire())
    start.wait()  # hold it until every contender has tried


def test_contending_processes_get_one_holder(tmp_path, no_slurm):
    ctx = multiprocessing.get_context("fork")
    n = 4
    for round_ in range(4):
        start, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(tmp_path / f"r{round_}", start, out)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [out.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(timeout=30)
        assert sum(got) == 1, got


def test_live_holder_in_another_process_is_never_broken(tmp_path, holder, no_slurm):
    p = holder(tmp_path)
    lock = RunLock(tmp_path, NAME)
    assert not lock.try_acquire() and lock.holder["pid"] == p.pid
    assert lock.describe_holder().startswith(f"pid {p.pid} on host {HOST} (started ")
    # the trainer's lock is the same, with its one-line message
    run = tmp_path / "run"
    trainer = holder(run, name="train.lock")
    with pytest.raises(RunDirInUseError) as exc:
        RunDirLock(run).acquire()
    text = str(exc.value)
    assert text.startswith(f"run directory {run} is in use by pid {trainer.pid} on host {HOST} (started ")
    assert text.endswith("): wait for that trainer to finish (or stop it), or choose another output_dir")
    assert "\n" not in text
    p.stdin.write("release\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "released"
    assert lock.try_acquire()
    lock.release()


def test_killed_holder_is_taken_over_whatever_its_pid_names(tmp_path, holder, no_slurm):
    p = holder(tmp_path)
    p.kill()
    p.wait()
    assert record(tmp_path)["pid"] == p.pid  # left behind by kill -9
    with RunLock(tmp_path, NAME) as lock:
        assert lock.acquired and lock.took_over[1] == "which ended without releasing it"
    # the same, when the dead holder's pid names a live process by now (pid reuse): its free flock decides
    p = holder(tmp_path)
    p.kill()
    p.wait()
    info = dict(record(tmp_path), pid=os.getppid())
    (tmp_path / NAME).write_text(json.dumps(info))
    lock = RunLock(tmp_path, NAME)
    assert lock.try_acquire() and lock.took_over[0].info["pid"] == os.getppid()
    lock.release()


def test_a_child_that_inherited_the_lock_keeps_it_after_its_parent_dies(tmp_path, holder, no_slurm):
    p = holder(tmp_path, "child")
    child = int(p.stdout.readline())
    p.stdin.write("exit\n")
    p.stdin.flush()
    p.wait()
    lock = RunLock(tmp_path, NAME)
    assert not lock.try_acquire() and lock.holder["pid"] == p.pid  # the runner is gone, its trainer is not
    assert lock.describe_holder().endswith("; that process has ended, but a child that inherited the lock still runs")
    os.kill(child, signal.SIGKILL)
    deadline = time.time() + 10
    while not lock.try_acquire():
        assert time.time() < deadline, lock.describe_holder()
        time.sleep(0.05)
    assert lock.took_over[0].info["pid"] == p.pid
    lock.release()


def test_slurm_requeue_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch, holder, no_slurm):
    theirs = dict(pid=4242, host="node-b", slurm_job="77", slurm_restart=0, flock=True)
    write_record(tmp_path, **theirs)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    lock = RunLock(tmp_path, NAME)  # same incarnation on another node: alive as far as we can tell
    assert not lock.try_acquire()
    text = lock.describe_holder()
    assert "pid 4242 on host node-b" in text and "Slurm job 77" in text and f"delete {tmp_path / NAME}" in text
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: never broken by the requeue rule
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert not RunLock(tmp_path, NAME).try_acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the requeued job: Slurm killed the earlier incarnation
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path, NAME)
    assert lock.try_acquire() and lock.took_over[1] == "an earlier run of Slurm job 77, which was requeued"
    assert record(tmp_path)["slurm_job"] == "77" and record(tmp_path)["slurm_restart"] == 1
    lock.release()
    # a live process of this very incarnation (another runner of the allocation) keeps its lock
    p = holder(tmp_path / "same", env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"})
    lock = RunLock(tmp_path / "same", NAME)
    assert not lock.try_acquire() and lock.holder["pid"] == p.pid


def test_trainer_requeued_by_slurm_takes_over_with_a_note(tmp_path, monkeypatch, no_slurm):
    (tmp_path / "train.lock").write_text(json.dumps(dict(pid=99, host="node-b", slurm_job="5", slurm_restart=2,
                                                         started=0.0, token="t", flock=True)))
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    notes = []
    with RunDirLock(tmp_path, log=notes.append):
        pass
    assert len(notes) == 1 and notes[0].startswith("note: taking over the run directory from pid 99 on host node-b")
    assert notes[0].endswith("an earlier run of Slurm job 5, which was requeued")


@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\x00\xff garbage", b"[1, 2]", b'{"host": "h"}'])
def test_empty_or_garbage_lock_is_broken_once_old(tmp_path, content, no_slurm):
    path = tmp_path / NAME
    path.write_bytes(content)
    lock = RunLock(tmp_path, NAME)
    assert not lock.try_acquire()  # may be a lock being written right now
    assert lock.describe_holder() == (f"an unreadable lock file written 0 s ago, broken once {LOCK_GRACE_S:.0f} s "
                                      "old if no process holds it")
    age_by(path, LOCK_GRACE_S + 5)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # still flocked by a (live) writer: held, however old
        assert not RunLock(tmp_path, NAME).try_acquire()
    finally:
        os.close(fd)
    assert lock.try_acquire() and lock.took_over[1] == "which no process holds"
    assert record(tmp_path)["token"] == lock.token
    lock.release()
    assert not path.exists()


def test_trainer_breaks_an_old_empty_lock_with_a_note(tmp_path, no_slurm):
    (tmp_path / "train.lock").write_bytes(b"")
    with pytest.raises(RunDirInUseError, match="in use by an unreadable lock file written 0 s ago, broken once"):
        RunDirLock(tmp_path).acquire()
    age_by(tmp_path / "train.lock", LOCK_GRACE_S + 1)
    notes = []
    with RunDirLock(tmp_path, log=notes.append):
        pass
    assert notes == [f"note: taking over the run directory from an unreadable lock file written "
                     f"{LOCK_GRACE_S + 1:.0f} s ago, which no process holds"]


@pytest.mark.parametrize("failing", ["pwrite", "fsync"])
def test_full_disk_while_taking_the_lock_leaves_nothing_and_one_line(tmp_path, monkeypatch, failing, no_slurm):
    real = getattr(os, failing)

    def full_disk(fd, *args):
        if failing == "pwrite" and args[1] == 0:  # the first write gets half of the record through
            return real(fd, args[0][:len(args[0]) // 2], 0)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    takes = {NAME: lambda: RunLock(tmp_path, NAME).try_acquire(), "train.lock": lambda: RunDirLock(tmp_path).acquire()}
    for name, take in takes.items():
        with monkeypatch.context() as m:
            m.setattr(os, failing, full_disk)
            with pytest.raises(LockError) as exc:
                take()
        assert isinstance(exc.value, ConfigError)  # the trainer prints it as one `error:` line, exit 2
        assert str(exc.value) == f"cannot write lock file {tmp_path / name}: [Errno 28] No space left on device"
        assert os.listdir(tmp_path) == []  # no empty or partial lock left to block the next run
    with RunLock(tmp_path, NAME) as lock:  # space freed: the next attempt just works
        assert lock.acquired and lock.took_over is None


def test_read_only_directory_is_one_line(tmp_path, monkeypatch, no_slurm):
    real_open = os.open

    def read_only(path, flags, *args):  # what Linux answers on a read-only mount (O_EXCL on a file: EEXIST)
        if flags & os.O_CREAT and not (flags & os.O_EXCL and os.path.exists(path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LockError, match=rf"^cannot create lock file {tmp_path / 'train.lock'}: \[Errno 30\] "
                                        r"Read-only file system$"):
        RunDirLock(tmp_path).acquire()
    assert os.listdir(tmp_path) == []
    # a stale lock on a read-only file system cannot be broken either: one line again, naming the file
    monkeypatch.setattr(os, "open", real_open)
    write_record(tmp_path, pid=2 ** 22 + 7, host=HOST)
    age_by(tmp_path / NAME, 10)
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LockError, match=r"^cannot create lock file .*x\.lock\.break: \[Errno 30\] Read-only"):
        RunLock(tmp_path, NAME).try_acquire()
    assert os.listdir(tmp_path) == [NAME]
