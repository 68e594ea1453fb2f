"""The run lock under real I/O failures, as whole processes: one ``error:`` line, exit 2, no lock left behind.

* ``ablation run`` whose writes fail (a file-size limit: every write past 100 bytes fails with EFBIG, as a
  full disk fails with ENOSPC) while it takes a point's lock; an empty lock left by such a failure (or by an
  older version) does not block the point for ever.
* the trainer relaunched on an existing run directory on a read-only file system (a read-only bind mount in a
  private mount namespace: ``unshare``; skipped where namespaces are not available).
"""
from __future__ import annotations

import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BASE_CONFIG, ROOT, subprocess_env, tiny_overrides, write_tiny_imagefolder

FAKE = f"{sys.executable} {ROOT / 'tests' / 'ablation' / 'test_ablation_run.py'}"  # its fake trainer
LOCK_GRACE_S = 60.0  # engine.runlock.LOCK_GRACE_S


def run_args(out) -> list[str]:
    return ["run", "--study", "lowk", "--preset", "mini", "--seeds", "1", "--runs-dir", str(out), "--trainer-cmd", FAKE,
            "--limit", "1"]


@pytest.mark.slow  # about 2 s of CPU (three runs, each with a fake trainer); 7 s wall on a loaded machine
def test_ablation_run_with_failing_writes_leaves_no_lock(tmp_path, capsys):
    from ablation.cli import main

    out = tmp_path / "res"
    point = out / "single_freq" / "base-s0"  # the first run of a seed: its base network
    p = subprocess.run([sys.executable, "-m", "ablation", *run_args(out)], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120,  # Python ignores SIGXFSZ: writes get EFBIG
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr == f"error: cannot write lock file {point / 'ablation.lock'}: [Errno 27] File too large\n"
    assert not (point / "ablation.lock").exists() and not (point / "summary.json").exists()
    # an empty lock (what the failure used to leave): held while it may be one being written ...
    (point / "ablation.lock").write_bytes(b"")
    assert main(run_args(out)) == 0
    text = capsys.readouterr().out
    assert "locked 1" in text and "locked by an unreadable lock file written 0 s ago, broken once 60 s old if " \
        "no process holds it" in text
    # ... and broken once it is older than the grace period: the point is trained
    t = time.time() - LOCK_GRACE_S - 1
    os.utime(point / "ablation.lock", (t, t))
    assert main(run_args(out)) == 0
    assert "ran 1" in capsys.readouterr().out
    assert (point / "summary.json").exists() and not (point / "ablation.lock").exists()


@pytest.mark.slow
def test_trainer_relaunch_on_a_read_only_file_system_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")  # an existing run directory
    d = shlex.quote(str(run))
    read_only = ["unshare", "-rm", "sh", "-c",
                 f"mount --bind {d} {d} && mount -o remount,ro,bind {d} {d} && exec \"$@\"", "sh"]
    if not shutil.which("unshare") or subprocess.run(read_only + ["true"], capture_output=True).returncode != 0:
        pytest.skip("no read-only bind mount here (needs unshare and user/mount namespaces)")
    data = write_tiny_imagefolder(tmp_path / "data")
    train = [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(BASE_CONFIG), *tiny_overrides(data, run)]
    p = subprocess.run(read_only + train, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 2, p.stderr
    # the run directory is checked for writing before the lock is taken (engine.rundir)
    assert p.stderr == f"error: cannot write {run}: [Errno 30] Read-only file system\n"
    assert sorted(os.listdir(run)) == ["config.yaml"]
