"""The ablation tool's per-point lock (engine.runlock): Slurm requeue rule (same job id, restart count) and
lock-breaking races. No real Slurm.

Live holders are simulated with this process or a sleeping child (records without a flock are judged by their
pids), Slurm with SLURM_JOB_ID/SLURM_RESTART_COUNT, and racing processes by hooks that run another RunLock's
try_acquire at the worst moment.
"""
import fcntl
import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from ablation.runner import LOCK_NAME
from engine import runlock
from engine.runlock import is_stale

BREAK_NAME = LOCK_NAME + ".break"

HOST = socket.gethostname()


@pytest.fixture
def slurm(monkeypatch):
    """``slurm(job, restart)``: pretend to run in Slurm job ``job`` at restart count ``restart`` (None: unset)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)

    def set_env(job, restart=None):
        monkeypatch.setenv("SLURM_JOB_ID", str(job))
        if restart is None:
            monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        else:
            monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    return set_env


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def RunLock(run_dir):  # noqa: N802 - the ablation runner's lock on a point
    return runlock.RunLock(run_dir, LOCK_NAME)


def write_lock(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"child_pid": None, "token": "t-" + str(info.get("pid")), "started": 0.0, **info}
    (run_dir / LOCK_NAME).write_text(json.dumps(info))
    return info


def lock_token(run_dir):
    return json.loads((run_dir / LOCK_NAME).read_text())["token"]


@pytest.mark.parametrize("restart", [None, 0, 3])
def test_same_slurm_job_and_restart_count_never_breaks_a_live_lock(tmp_path, slurm, restart):
    # several `run` processes of one allocation (salloc, one per GPU in a batch script) share the job id
    slurm(4242, restart)
    a = RunLock(tmp_path / "r")
    assert a.try_acquire()
    info = json.loads(a.path.read_text())
    assert info["slurm_job"] == "4242" and info["slurm_restart"] == (restart or 0)
    b = RunLock(tmp_path / "r")
    assert not b.try_acquire() and b.holder["token"] == a.token
    assert lock_token(tmp_path / "r") == a.token
    a.release()
    assert b.try_acquire()
    b.release()


def test_same_slurm_job_and_restart_count_keeps_other_live_holders(tmp_path, slurm, live_pid):
    slurm(4242, 1)
    # a live holder on this host (another process of the allocation)
    info = write_lock(tmp_path / "a", pid=live_pid, host=HOST, slurm_job="4242", slurm_restart=1)
    assert not is_stale(info) and not RunLock(tmp_path / "a").try_acquire()
    # a holder on another node of the same allocation: liveness unknown, never broken
    info = write_lock(tmp_path / "b", pid=live_pid, host="other-node", slurm_job="4242", slurm_restart=1)
    assert not is_stale(info) and not RunLock(tmp_path / "b").try_acquire()
    # a dead holder of the same incarnation on this host: the ordinary host/pid rule breaks it
    info = write_lock(tmp_path / "c", pid=dead_pid(), host=HOST, slurm_job="4242", slurm_restart=1)
    assert is_stale(info) and RunLock(tmp_path / "c").try_acquire()
    # a newer restart count in the lock than ours (cannot happen, but must not break it)
    info = write_lock(tmp_path / "d", pid=live_pid, host=HOST, slurm_job="4242", slurm_restart=2)
    assert not is_stale(info)


def test_requeued_slurm_job_breaks_its_earlier_incarnations_lock(tmp_path, slurm, live_pid):
    # even a "live" pid on this or another host: the old incarnation's processes are gone after a requeue
    slurm(4242, 1)
    for name, host in (("a", HOST), ("b", "other-node")):
        info = write_lock(tmp_path / name, pid=live_pid, host=host, slurm_job="4242", slurm_restart=0)
        assert is_stale(info)
        c = RunLock(tmp_path / name)
        assert c.try_acquire() and lock_token(tmp_path / name) == c.token
        c.release()
    # a lock written before restart counts were stored counts as restart 0
    info = write_lock(tmp_path / "c", pid=live_pid, host="other-node", slurm_job="4242")
    assert is_stale(info) and RunLock(tmp_path / "c").try_acquire()
    slurm(4242, 0)
    info = write_lock(tmp_path / "d", pid=live_pid, host="other-node", slurm_job="4242")
    assert not is_stale(info) and not RunLock(tmp_path / "d").try_acquire()
    # another job's lock is never broken by the requeue rule
    slurm(999, 5)
    info = write_lock(tmp_path / "e", pid=live_pid, host="other-node", slurm_job="4242", slurm_restart=0)
    assert not is_stale(info) and not RunLock(tmp_path / "e").try_acquire()


def test_racing_breakers_never_remove_a_live_lock(tmp_path, monkeypatch, slurm):
    """B judges a lock stale; A breaks it first and takes it; then, while B is breaking, C tries too.

    The old rename-aside code moved A's live lock away, C created its own in the gap, and B deleted A's: two
    holders. Now exactly A holds it, and its file is never touched.
    """
    slurm(1, 0)
    run_dir = tmp_path / "r"
    stale = write_lock(run_dir, pid=dead_pid(), host=HOST)
    a, b, c = RunLock(run_dir), RunLock(run_dir), RunLock(run_dir)
    real_stale_reason, real_inspect = runlock.stale_reason, runlock.inspect
    actor, in_b_break, c_tried = ["b"], [False], [False]

    def hooked_stale_reason(info, host=None, **seen):
        result = real_stale_reason(info, host, **seen)
        if actor[0] == "b" and result and not a.acquired:  # B has judged it stale: A breaks it first
            actor[0] = "a"
            assert a.try_acquire()
            actor[0] = "b"
        return result

    def hooked_inspect(path):
        if actor[0] == "b" and in_b_break[0] and not c_tried[0]:  # B is breaking: C tries right now
            c_tried[0] = True
            actor[0] = "c"
            c.try_acquire()
            actor[0] = "b"
        return real_inspect(path)

    real_break = b._break

    def hooked_break(snap, reason):
        assert snap.info == stale
        in_b_break[0] = True
        try:
            return real_break(snap, reason)
        finally:
            in_b_break[0] = False

    monkeypatch.setattr(runlock, "stale_reason", hooked_stale_reason)
    monkeypatch.setattr(runlock, "inspect", hooked_inspect)
    monkeypatch.setattr(b, "_break", hooked_break)
    assert not b.try_acquire()
    assert a.acquired and c_tried[0] and not c.acquired and not b.acquired
    assert lock_token(run_dir) == a.token and b.holder["token"] == a.token
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([LOCK_NAME, BREAK_NAME])  # nothing moved aside
    a.release()
    assert not (run_dir / LOCK_NAME).exists()


def test_break_removes_only_the_content_judged_stale(tmp_path, slurm):
    slurm(1, 0)
    run_dir = tmp_path / "r"
    write_lock(run_dir, pid=dead_pid(), host=HOST)
    stale = runlock.inspect(run_dir / LOCK_NAME)
    (run_dir / LOCK_NAME).unlink()
    a = RunLock(run_dir)
    assert a.try_acquire()
    assert RunLock(run_dir)._break(stale, "dead")  # A's live lock is not the file judged stale: it stays
    assert lock_token(run_dir) == a.token
    a.release()


def test_break_waits_for_the_break_mutex(tmp_path, monkeypatch, slurm):
    slurm(1, 0)
    monkeypatch.setattr(runlock, "BREAK_WAIT_S", 0.2)
    run_dir = tmp_path / "r"
    stale = write_lock(run_dir, pid=dead_pid(), host=HOST)
    fd = os.open(run_dir / BREAK_NAME, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another breaker is inside its critical section
        b = RunLock(run_dir)
        assert not b.try_acquire() and b.holder == stale  # treated as held, not removed unchecked
        assert json.loads((run_dir / LOCK_NAME).read_text()) == stale
    finally:
        os.close(fd)
    b = RunLock(run_dir)
    assert b.try_acquire() and lock_token(run_dir) == b.token
    b.release()


def _contender(run_dir, start, tried, out):
    lock = RunLock(run_dir)
    start.wait()
    got = lock.try_acquire()
    out.put(got)
    tried.wait()  # hold it until everyone has tried
    lock.release()


def test_many_processes_breaking_one_stale_lock_get_one_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    ctx = multiprocessing.get_context("fork")
    n = 6
    for round_ in range(8):
        run_dir = tmp_path / f"r{round_}"
        write_lock(run_dir, pid=dead_pid(), host=HOST)
        start, tried, out = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(run_dir, start, tried, out)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [out.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert sum(got) == 1, got
        assert not (run_dir / LOCK_NAME).exists()
