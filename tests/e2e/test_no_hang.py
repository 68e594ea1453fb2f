"""No hang, no orphan: a failing run with DataLoader worker processes must end, and take its workers with it.

A corrupt image with the default (non-zero) ``data.workers`` once left the trainer, the evaluator and a
``torchrun`` launch hanging after their one ``error:`` line: the workers ignored every SIGTERM (so that a Slurm
preemption does not kill them), and multiprocessing's exit hook stops daemon children with SIGTERM, then joins
them without a timeout. Every process here runs in its own session under a hard timeout: a hang fails the test
(and the whole session is killed), and so does any process of the session still alive after the launcher exits.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, ROOT, subprocess_env, tiny_overrides, write_tiny_imagefolder

HANG_S = 150  # a normal run of these takes 5-20 s on 2 loaded cores; a hang is forever


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies excluded), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in "ZX":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_bounded(args: list[str], timeout: float = HANG_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` in a new session; fail (not hang) past ``timeout``, and fail if any process of the session
    outlives the launcher by more than a few seconds (orphaned DataLoader workers). Cleans up either way."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"hung: still running after {timeout:.0f} s: {' '.join(args[:3])} ...\n{err[-2000:]}")
    deadline = time.monotonic() + 10.0
    left = _session_pids(proc.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_pids(proc.pid)
    if left:
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in left if Path(f"/proc/{p}/comm").exists()]
        _kill_session(proc.pid)
        pytest.fail(f"{len(left)} orphan process(es) left after exit {proc.returncode}: {names}\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _one_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr[-2000:]


@pytest.fixture(scope="module")
def corrupt_tree(tmp_path_factory) -> Path:
    """A tiny ImageFolder whose train/ and val/ each hold one file that is not an image."""
    root = write_tiny_imagefolder(tmp_path_factory.mktemp("nohang") / "data", classes=3, train_per_class=4,
                                  val_per_class=2)
    (root / "train" / "class1" / "corrupt.png").write_bytes(b"this is not a PNG")
    (root / "val" / "class2" / "corrupt.png").write_bytes(b"this is not a PNG")
    return root


def _overrides(data: Path, out: Path) -> list[str]:
    return tiny_overrides(data, out, **{"data.workers": 2, "train.epochs": 1, "train.warmup_epochs": 0})


@pytest.mark.slow
def test_trainer_with_workers_exits_after_a_corrupt_image(corrupt_tree, tmp_path):
    r = run_bounded([sys.executable, "train_imagenet.py", "--config", str(BASE_CONFIG),
                     *_overrides(corrupt_tree, tmp_path / "run")])
    _one_error(r, "corrupt.png")


@pytest.mark.slow
def test_evaluator_with_workers_exits_after_a_corrupt_image(corrupt_tree, tmp_path):
    import torch

    from engine.builders import build_model
    from engine.config import load_config

    cfg = load_config(BASE_CONFIG, _overrides(corrupt_tree, tmp_path / "run"))
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "w.pth")
    r = run_bounded([sys.executable, "eval_imagenet.py", "--config", str(BASE_CONFIG), "--checkpoint",
                     str(tmp_path / "w.pth"), "--output", str(tmp_path / "eval.json"),
                     *_overrides(corrupt_tree, tmp_path / "run")])
    _one_error(r, "corrupt.png")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_torchrun_one_process_with_workers_exits_after_a_corrupt_image(corrupt_tree, tmp_path):
    r = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=0",
                     "train_imagenet.py", "--config", str(BASE_CONFIG),
                     *_overrides(corrupt_tree, tmp_path / "run")])
    assert r.returncode != 0 and "corrupt.png" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr.split("error:")[0], r.stderr[-2000:]


# A loader with persistent workers, iterated in the main process; then the scenario named on the command line.
_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    import torch
    from engine.data.loader import build_dataloader

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            if i == 5 and sys.argv[1] == "worker_error":
                raise RuntimeError("sample 5 is broken")
            return torch.tensor([i])

    dl = build_dataloader(Slow(), batch_size=2, workers=2)
    it = iter(dl)
    next(it)
    next(it)  # batches alternate between the workers: both have run their worker_init_fn (signals handled)
    pids = [w.pid for w in it._workers]
    if sys.argv[1] == "foreign_sigterm":
        # a SIGTERM from another process (Slurm, scancel) is ignored: the workers keep serving
        for pid in pids:
            subprocess.run(["kill", "-TERM", str(pid)], check=True)
        time.sleep(0.5)
        assert all(w.is_alive() for w in it._workers), "a worker died of a foreign SIGTERM"
        assert len([b for b in it]) == 30
        print("served", flush=True)
    elif sys.argv[1] == "uncaught":
        raise ValueError("a bug in the training loop")
    elif sys.argv[1] == "worker_error":
        for _ in it:
            pass
""")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["uncaught", "worker_error", "foreign_sigterm"])
def test_loader_workers_end_with_their_process(tmp_path, scenario):
    """Any way out of a process holding persistent workers ends them: an uncaught exception (a traceback is
    fine here: a bug), an error raised in a worker, a normal exit after a foreign SIGTERM that the workers had
    to survive (preemption)."""
    script = tmp_path / "loader.py"
    script.write_text(_SCRIPT)
    r = run_bounded([sys.executable, str(script), scenario], timeout=90)
    if scenario == "foreign_sigterm":
        assert r.returncode == 0 and "served" in r.stdout, r.stderr[-2000:]
    else:
        assert r.returncode == 1, r.stderr[-2000:]
        assert ("a bug in the training loop" if scenario == "uncaught" else "sample 5 is broken") in r.stderr
