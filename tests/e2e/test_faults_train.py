"""Faults a user or an operator causes, driven through the real entry points (``train_imagenet.py``,
``eval_imagenet.py``) on tiny generated data.

Every refused case must end with exit status 2, exactly one ``error:`` line and no traceback, and leave every
file that was there before byte-identical (nothing lost). Covered: run-directory ownership, structural changes
on resume, a full disk, torn files (checkpoint, metrics, summary, config, temp files of an interrupted save),
user errors under DDP at 2 processes, checkpoint garbage and foreign pickles, ``kill -9`` at random points
followed by a bitwise-equal resume, SIGTERM under torchrun.

The entry points run in this process (``run_main``: the same function the scripts call, seconds faster) where
only their message and files are checked; a subprocess where the process itself matters: a second process
holding the run directory, an exit status 2 from the script, ``kill -9``, torchrun (DDP errors, SIGTERM).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, TINY_RUN, assert_refused, checksums, copy_run, error_lines, run_cli, run_main,
                      subprocess_env, torchrun, train_args)


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pth", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


# The shared finished run (conftest.tiny_run): 6 steps per epoch, 2 epochs, a checkpoint every 2 steps (last.pth
# and last.prev.pth exist). A relaunch that trains on asks for a third epoch.
MORE = {**TINY_RUN, "train.epochs": 3}


@pytest.fixture
def data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture
def finished(tiny_run) -> Path:
    return tiny_run.dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return copy_run(finished, tmp_path / "run")


# ---------------------------------------------------------------------------------------------- run dir owner

@pytest.mark.slow
def test_second_trainer_on_a_run_directory_is_refused_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_imagenet.py")]
                             + train_args(data, out, **{"train.epochs": 500}),
                             cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("start training"):
                break
        before = (out / "config.yaml").read_bytes()
        second = run_main("train_imagenet.py", train_args(data, out, **{"train.epochs": 500, "optim.base_lr": 0.5}),
                          capsys)
        line = assert_refused(second, f"run directory {out} is in use by pid {first.pid} on host",
                              "choose another output_dir")
        assert "started" in line
        assert (out / "config.yaml").read_bytes() == before  # the refused launch wrote nothing
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert not (out / "train.lock").exists()  # released on exit
    metrics = out / "metrics.jsonl"
    rows = [json.loads(r) for r in metrics.read_text().splitlines()] if metrics.exists() else []
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # each epoch once


def test_run_dir_lock_in_process(tmp_path):
    from engine.runlock import RunDirInUseError, RunDirLock

    notes = []
    with RunDirLock(tmp_path, log=notes.append):
        info = json.loads((tmp_path / "train.lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started"] <= time.time()
        with pytest.raises(RunDirInUseError, match=rf"in use by pid {os.getpid()} on host"):
            RunDirLock(tmp_path).acquire()
    assert not (tmp_path / "train.lock").exists()
    # a lock left by a dead process (kill -9) does not block
    (tmp_path / "train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 7,
                                                     "started": 0}))
    with RunDirLock(tmp_path, log=notes.append):
        assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    assert any("taking over the run directory from pid 4194311" in n for n in notes)
    # the stale file's pid may name a live process by now (pids are reused): the free flock still proves the
    # holder gone, and the take-over is noted
    (tmp_path / "train.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(),
                                                     "started": 0, "flock": True}))
    with RunDirLock(tmp_path, log=notes.append):
        pass
    assert any(f"taking over the run directory from pid {os.getppid()}" in n for n in notes)


# ------------------------------------------------------------------------------------ structural change, reruns

@pytest.mark.parametrize("change, key", [
    ({"model.num_classes": 4}, "model.num_classes"),
    ({"model.name": "fcanet18"}, "model.name"),
    ({"data.image_size": 48, "data.val_resize": 48}, "data.image_size"),
    ({"model.kwargs": "{widths: [16, 16, 32, 64]}"}, "model.kwargs"),
])
def test_structural_change_on_resume_is_refused(data, run_copy, change, key, capsys):
    before = checksums(run_copy)
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **{**MORE, **change}), capsys)
    assert_refused(proc, f"cannot resume {run_copy}/checkpoints/last.pth", key, "start a new run")
    assert checksums(run_copy) == before


def test_freq_on_a_model_without_fca_is_refused(data, tmp_path, finished, capsys):
    proc = run_main("train_imagenet.py", train_args(data, tmp_path / "r", **{"model.freq": "low4"}), capsys)
    assert_refused(proc, "model.freq", "resnet18 has no frequency channel attention")
    assert not (tmp_path / "r").exists()
    proc = run_main("eval_imagenet.py", train_args(data, tmp_path / "r", **{"model.freq": "low4"})
                    + ["--checkpoint", str(finished / "checkpoints/best.pth")], capsys)
    assert_refused(proc, "model.freq")


def test_rerunning_a_finished_run_says_so_and_changes_nothing(data, run_copy, capsys):
    before = checksums(run_copy)
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **TINY_RUN), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout and "choose a new output_dir" in proc.stdout
    assert "start training" not in proc.stdout
    assert checksums(run_copy) == before


def test_failed_relaunch_keeps_config_and_a_changed_one_is_versioned(data, run_copy, capsys):
    before = checksums(run_copy)
    # lr 1e30: the loss diverges at once; the run stops before any checkpoint of the new config
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **{**MORE, "optim.base_lr": 1e30}), capsys)
    assert_refused(proc, "non-finite training loss")
    assert checksums(run_copy) == before
    # a relaunch that really trains on: config.yaml describes the new weights, the old one is kept
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **MORE), capsys)
    assert proc.returncode == 0, proc.stderr
    old = (run_copy / "config.1.yaml").read_text()
    assert hashlib.sha256(old.encode()).hexdigest() == before["config.yaml"]
    assert "epochs: 3" in (run_copy / "config.yaml").read_text() and "epochs: 2" in old


# ---------------------------------------------------------------------------------------------------- disk full

def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_while_checkpointing_is_one_line_and_loses_nothing(data, finished, tmp_path, capsys):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, 4096):
        pytest.skip("cannot mount a tmpfs here (needs root); test_injected_enospc covers the same path")
    try:
        out = mnt / "run"
        shutil.copytree(finished, out)
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(free - 48 * 1024, 0))  # room for a metrics row, not a checkpoint
        before = {k: v for k, v in checksums(out).items() if k != "metrics.jsonl"}
        proc = run_main("train_imagenet.py", train_args(data, out, **MORE), capsys)
        line = assert_refused(proc, f"cannot write {out}/checkpoints/", "[Errno 28] No space left on device")
        assert "inline_container" not in line
        after = checksums(out)
        assert {k: after[k] for k in before} == before                  # every checkpoint intact
        assert not [p for p in (out / "checkpoints").iterdir() if ".tmp" in p.name]  # no partial file left
        (mnt / "filler").unlink()
        proc = run_main("train_imagenet.py", train_args(data, out, **MORE), capsys)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows == [1, 2, 3]  # the row of the failed session was dropped on resume
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_injected_enospc_names_path_and_errno(data, run_copy, monkeypatch, capsys):
    """The same failure without a real full disk: torch.save reports ENOSPC the way it does (a RuntimeError
    from the zip writer, raised while handling the OSError)."""
    from engine.entrypoints import train_main as main

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            f.write(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0") from None

    before = {k: v for k, v in checksums(run_copy).items() if k != "metrics.jsonl"}
    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    rc = main(train_args(data, run_copy, **MORE))
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert rc == 2 and len(error_lines(err)) == 1 and "Traceback" not in err
    assert f"cannot write {run_copy}/checkpoints/" in err and "[Errno 28] No space left on device" in err
    after = checksums(run_copy)
    assert {k: after[k] for k in before} == before
    assert not [p for p in (run_copy / "checkpoints").iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------------- torn files

def test_torn_last_checkpoint_falls_back_bitwise(data, finished, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_main("train_imagenet.py", train_args(data, out, **TINY_RUN, **{"debug.kill_after_steps": 9}), capsys)
    assert proc.returncode == 137
    last = out / "checkpoints/last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # torn: step 8's checkpoint; last.prev.pth holds step 6
    proc = run_main("train_imagenet.py", train_args(data, out, **TINY_RUN), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "last.pth is truncated or corrupt" in proc.stdout and "resumed from" in proc.stdout
    assert (out / "checkpoints/last.corrupt.pth").exists()  # kept for inspection
    assert_bitwise_equal(weights(out), weights(finished))  # the uninterrupted run


def test_torn_metrics_summary_config_and_temp_files(data, run_copy, capsys):
    good_summary = json.loads((run_copy / "summary.json").read_text())
    # an interrupted save of the previous session left temp files; a crash tore the other files
    (run_copy / "checkpoints/.last.pth.tmp4242").write_bytes(b"PK\x03\x04part")
    (run_copy / "checkpoints/..last.pth.new4242.tmp4242").write_bytes(b"PK")  # the older naming
    (run_copy / ".summary.json.tmp4242").write_text("{")
    (run_copy / "summary.json").write_text('{"status": "comp')
    # a rerun of the complete run rewrites the torn summary from the checkpoint, and removes the temp files
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **TINY_RUN), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "removed 2 partial file(s)" in proc.stdout and "removed 1 partial file(s)" in proc.stdout
    assert not [p for p in run_copy.rglob("*") if ".tmp" in p.name]
    summary = json.loads((run_copy / "summary.json").read_text())
    for key in ("best_top1", "final_top1", "final_top5", "epochs", "global_steps", "val_count"):
        assert summary[key] == good_summary[key], key
    from engine.summary import SCHEMA_VERSION
    assert summary["schema_version"] == SCHEMA_VERSION and summary["torch_version"] and summary["threads"] >= 1
    # torn metrics.jsonl and config.yaml: training on drops the torn row (with a warning), keeps the torn config
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    (run_copy / "config.yaml").write_text("model:\n  name: resn")
    proc = run_main("train_imagenet.py", train_args(data, run_copy, **MORE), capsys)
    assert proc.returncode == 0, proc.stderr
    assert "dropping a torn last line" in proc.stdout
    assert [json.loads(r)["epoch"] for r in (run_copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run_copy / "config.1.yaml").read_text() == "model:\n  name: resn"
    from engine.config import load_config
    assert load_config(run_copy / "config.yaml").train.epochs == 3


# ------------------------------------------------------------------------------------- checkpoints from outside

def _foreign_files(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)

    class Opens:  # unpickling it would call open(marker, "w"): the marker file must never appear
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files = {"random": folder / "random.pth", "pickle": folder / "pickle.pth", "torch_pickle": folder / "tp.pth",
             "empty": folder / "empty.pth", "truncated": folder / "trunc.pth"}
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["pickle"].write_bytes(pickle.dumps({"model": Opens()}))
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Opens()}, files["torch_pickle"])
    files["empty"].write_bytes(b"")
    buf = folder / "whole.pth"
    torch.save({"w": torch.zeros(1000)}, buf)
    files["truncated"].write_bytes(buf.read_bytes()[:2000])
    return files


UNSAFE = "contains non-tensor Python objects (e.g. io.open); refused as unsafe (unpickling it could run code)"
EXPECTED = {"random": "is not a PyTorch checkpoint", "empty": "is empty, not a PyTorch checkpoint",
            "pickle": UNSAFE, "torch_pickle": UNSAFE, "truncated": "is truncated or corrupt"}


def test_checkpoint_garbage_and_foreign_pickles_in_process(tmp_path):
    from engine.checkpoint import load_checkpoint
    from engine.errors import CheckpointError
    from models import read_state_dict

    marker = tmp_path / "pwned"
    for kind, path in _foreign_files(tmp_path, marker).items():
        for loader, exc in ((load_checkpoint, CheckpointError), (read_state_dict, ValueError)):
            with pytest.raises(exc) as info:
                loader(path)
            msg = str(info.value)
            assert msg == f"checkpoint {path} {EXPECTED[kind]}" or (kind == "truncated" and EXPECTED[kind] in msg), msg
            assert "weights_only" not in msg and "\x1b" not in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.slow
def test_checkpoint_garbage_through_the_entry_points(data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    files = _foreign_files(tmp_path / "files", marker)
    # The script as a process (its exit status 2 and one line; nothing unpickled) ...
    proc = run_cli("eval_imagenet.py", train_args(data, tmp_path / "e") + ["--checkpoint", str(files["pickle"])])
    assert_refused(proc, f"--checkpoint: checkpoint {files['pickle']} {EXPECTED['pickle']}")
    assert "weights_only" not in proc.stderr and not marker.exists()
    # ... and every other way in, through the same entry points in this process
    for kind in ("random", "torch_pickle"):
        proc = run_main("eval_imagenet.py", train_args(data, tmp_path / "e") + ["--checkpoint", str(files[kind])],
                        capsys)
        assert_refused(proc, f"--checkpoint: checkpoint {files[kind]} {EXPECTED[kind]}")
        assert "weights_only" not in proc.stderr
    out = tmp_path / "resume"
    proc = run_main("train_imagenet.py", train_args(data, out) + ["--resume", str(files["pickle"])], capsys)
    assert_refused(proc, f"checkpoint {files['pickle']} contains non-tensor Python objects")
    proc = run_main("train_imagenet.py", train_args(data, out, **{"model.init_checkpoint": str(files["random"])}),
                    capsys)
    assert_refused(proc, "model.init_checkpoint", "is not a PyTorch checkpoint")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_several_kill_9_at_random_points_then_resume_is_bitwise_equal(data, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    settings = {"train.epochs": 8, "train.checkpoint_every_steps": 1, "train.log_every_steps": 1}
    assert run_main("train_imagenet.py", train_args(data, ref, **settings), capsys).returncode == 0
    rng = random.Random(1234)
    kills, took_over = 0, False
    for _attempt in range(8):
        if kills == 3:
            break
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_imagenet.py")] + train_args(data, out, **settings),
                                cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("start training", "epoch ")):
                time.sleep(rng.uniform(0.0, 0.25))  # somewhere in the steps / checkpoint writes that follow
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        took_over |= any("taking over the run directory" in ln for ln in lines)
        kills += proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    assert kills == 3
    assert took_over  # the holder file of a killed trainer did not block its successor
    proc = run_main("train_imagenet.py", train_args(data, out, **settings), capsys)
    assert proc.returncode == 0, proc.stderr
    assert_bitwise_equal(weights(out), weights(ref))
    assert json.loads((out / "summary.json").read_text())["final_top1"] == \
        json.loads((ref / "summary.json").read_text())["final_top1"]
    assert [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


# ------------------------------------------------------------------------------------------------------ DDP

@pytest.mark.slow
def test_ddp_user_error_on_one_rank_ends_every_rank_with_one_line(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "train/class0/000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # read in the first batches
    out = tmp_path / "run"
    t0 = time.time()
    proc = torchrun(2, "train_imagenet.py", train_args(bad, out, **{"train.batch_size": 3, "train.epochs": 1}))
    assert time.time() - t0 < 120  # no hang
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 2, proc.stderr
    failing = [e for e in errors if "corrupt or unreadable image" in e and "000.png" in e]
    stopped = [e for e in errors if e.startswith("error: stopped: rank ")]
    assert len(failing) == 1 and len(stopped) == 1, errors
    failed_rank = 1 if failing[0].endswith("(rank 1)") else 0
    assert stopped[0] == f"error: stopped: rank {failed_rank} failed" + (" (rank 1)" if failed_rank == 0 else "")
    # no worker traceback: only torchrun's own ChildFailedError report (its frames are torch/distributed's)
    frames = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File ")]
    assert all("torch/distributed" in f or "<frozen runpy>" in f for f in frames), frames
    assert "gloo" not in proc.stderr.lower()


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_worker(data, tmp_path):
    """What torchrun does on SIGTERM (documented in the README): it forwards SIGTERM to the workers, which
    checkpoint and exit 0, then torchrun itself exits 1 (``SignalException``)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_imagenet.py")] + train_args(data, out, **{"train.batch_size": 3, "train.epochs": 300})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/"):
                break
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "SIGTERM received: checkpointed at epoch" in rest and "exiting for requeue" in rest
    assert "SignalException" in err and not error_lines(err)
    ck = weights(out)
    assert ck["global_step"] >= 8 and len(ck["rng"]) == 2 and not (out / "summary.json").exists()
    assert not (out / "train.lock").exists()


def test_failure_announcement_reaches_the_other_ranks(monkeypatch):
    """The rank that fails records itself in the job's store; a watcher thread on every other rank learns it even
    while that rank's main thread is blocked in a collective."""
    import threading
    from datetime import timedelta

    from engine import distributed as dist_lib

    server = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10),
                                        wait_for_workers=False)  # the store torchrun's agent hosts
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test{os.getpid()}")
    assert dist_lib.failed_rank(wait_s=0.0) is None
    seen, done = [], threading.Event()
    watch = dist_lib.FailureWatch(0, lambda r: (seen.append(r), done.set()), interval_s=0.05).start()
    own = dist_lib.FailureWatch(2, lambda r: seen.append(("own", r)), interval_s=0.05)
    dist_lib.announce_failure(2)
    dist_lib.announce_failure(1)  # a later failure does not replace the first
    own.start()
    assert done.wait(10.0)
    time.sleep(0.3)
    watch.stop(), own.stop()
    assert seen == [2] and dist_lib.failed_rank(wait_s=0.0) == 2  # rank 2 ignores its own announcement
    from engine.cli import Once
    once = Once()
    assert [once.claim() for _ in range(3)] == [True, False, False]
