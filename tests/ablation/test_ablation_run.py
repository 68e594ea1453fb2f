"""`python -m ablation run`: idempotence, kill + resume, concurrent runners, dependencies, locks.

A fake trainer (this file run as a script, injected with --trainer-cmd) stands in for train_imagenet.py: it
"trains" ``train.epochs x FAKE_STEPS`` steps, checkpoints every step atomically, resumes from its checkpoint,
and records every completed step and every completion, so the tests can check that each point was trained
exactly once and that a killed run lost at most the step in flight.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE = f"{sys.executable} {Path(__file__).resolve()}"
KS = (1, 2, 4, 8, 16)  # the k values of scratch_lowk()


def load_preset(name):
    from ablation.preset import load_preset as load
    return load(name)[0]


def scratch_lowk(tmp_path) -> str:
    """The mini preset with a Low-k study trained from scratch (8 epochs, k up to 16): one run per k and seed,
    no base, no shared run, for the runner's own tests."""
    import yaml
    data = yaml.safe_load((REPO / "configs/ablation/mini.yaml").read_text())
    data["studies"]["lowk"].update(start="scratch", epochs=8, ks=list(KS))
    path = tmp_path / "mini_lowk.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def fake_trainer(argv):
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    out = Path(overrides["output_dir"])
    steps_total = int(overrides["train.epochs"]) * int(os.environ.get("FAKE_STEPS", "3"))
    delay = float(os.environ.get("FAKE_SLEEP", "0"))
    out.mkdir(parents=True, exist_ok=True)
    # A second trainer on the same run directory while one is alive is the bug these tests look for.
    running = out / "fake.running"
    if running.exists():
        pid = int(running.read_text() or 0)
        try:  # alive and not a zombie (a killed orphan may stay a zombie in a container)
            alive = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
        except OSError:
            alive = False
        if alive:
            (out.parent / "CONCURRENT").write_text(str(out))
            return 3
    running.write_text(str(os.getpid()))
    ckpt = out / "checkpoints" / "last.pth"
    ckpt.parent.mkdir(exist_ok=True)
    state = json.loads(ckpt.read_text()) if ckpt.exists() else {"done": []}
    with open(out / "invocations.log", "a") as f:
        f.write(f"{os.getpid()} start_step={len(state['done'])}\n")
    for step in range(len(state["done"]), steps_total):
        time.sleep(delay)
        state["done"].append(step)
        tmp = ckpt.with_name("last.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, ckpt)
    freq = json.loads(overrides.get("model.freq", "null")) or [[0, 0]]  # the base run sets model.freq=null
    top1 = 90.0 - sum(u + 0.1 * v for u, v in freq) / len(freq)
    (out / "summary.json").write_text(json.dumps({"final_top1": top1, "final_top5": 99.0, "best_top1": top1,
                                                  "epochs": int(overrides["train.epochs"]), "steps": state["done"]}))
    with open(out.parent / "completions.log", "a") as f:
        f.write(out.name + "\n")
    running.unlink()
    return 0


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def ablation(*args, env=None):
    """``python -m ablation ARGS`` in this process (the CLI's main), with a temporary environment."""
    import contextlib
    import io

    from ablation.cli import main
    saved = dict(os.environ)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(rc, out.getvalue(), err.getvalue())


def summaries(root: Path):
    return sorted(root.rglob("summary.json"))


@pytest.mark.slow
def test_single_freq_dependency_then_measured_topk(tmp_path):
    out = tmp_path / "res"
    p = ablation("run", "--study", "single_freq", "--preset", "mini", "--runs-dir", str(out), "--trainer-cmd", FAKE,
                 "--quiet", "--seeds", "1", env={"FAKE_STEPS": "1"})
    assert p.returncode == 0, p.stderr
    sf = out / "single_freq"
    assert len(summaries(sf)) == 18  # base, control and the 16 points of the mini preset's 4x4 grid
    assert sorted((sf / "completions.log").read_text().split()) == sorted(
        ["base-s0", "control-s0"] + [f"u{u}v{v}-s0" for u in range(4) for v in range(4)])
    # --quiet: one short line per run, with its result, and the summary line
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 19 and all(len(line) < 120 for line in lines)
    assert all(line.startswith("[ablation] done ") and " top-1 " in line and "(best " in line for line in lines[:-1])
    meta = json.loads((sf / "u2v3-s0" / "ablation.json").read_text())
    assert meta["frequencies"] == [[2, 3]] and meta["init_checkpoint"].endswith("base-s0/checkpoints/last.pth")
    assert meta["settings"]["optim"]["base_lr"] == load_preset("mini").studies.single_freq.overrides["optim.base_lr"]
    # complete grid -> Top-k from our measurements: the fake accuracy falls with u + v/10, so (0,0),(0,1),...
    p = ablation("plan", "--study", "topk", "--preset", "mini", "--runs-dir", str(out), "--seeds", "1")
    assert "# frequency source: measured" in p.stdout and "topk/measured/top4-s0" in p.stdout
    assert "top4: (0,0) (0,1) (0,2) (0,3)" in p.stdout
    # a re-run does nothing
    p = ablation("run", "--study", "single_freq", "--preset", "mini", "--runs-dir", str(out), "--trainer-cmd", FAKE,
                 "--seeds", "1")
    assert p.returncode == 0 and "complete 18, ran 0" in p.stdout


@pytest.mark.slow
def test_kill_mid_study_and_resume_trains_each_point_once(tmp_path):
    out = tmp_path / "res"
    args = ("run", "--study", "lowk", "--preset", scratch_lowk(tmp_path), "--runs-dir", str(out), "--trainer-cmd",
            FAKE, "--quiet",
            "--seeds", "1")
    env = {**os.environ, "FAKE_STEPS": "10", "FAKE_SLEEP": "0.02"}  # epochs x 10 steps x 0.02 s per run
    proc = subprocess.Popen([sys.executable, "-m", "ablation", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = out / "lowk" / "published"
    epochs = 8
    deadline = time.time() + 60
    # wait until two runs are complete and the third is part-way through
    while time.time() < deadline:
        third = root / "low4-s0" / "checkpoints" / "last.pth"
        if (len(summaries(root)) >= 2 and third.exists()
                and 3 <= len(json.loads(third.read_text())["done"]) < epochs * 10 - 5):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # runner and trainer die without cleanup
    proc.wait()
    assert (root / "low4-s0" / "ablation.lock").exists()  # a stale lock of dead processes
    assert not (root / "low4-s0" / "summary.json").exists()
    p = ablation(*args, env={"FAKE_STEPS": "10"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "complete 2, ran 3" in p.stdout
    assert sorted((root / "completions.log").read_text().split()) == sorted(f"low{k}-s0" for k in KS)
    for k in KS:
        summary = json.loads((root / f"low{k}-s0" / "summary.json").read_text())
        assert summary["steps"] == list(range(epochs * 10))  # every step exactly once, none repeated after the kill
        assert not (root / f"low{k}-s0" / "ablation.lock").exists()
    invocations = (root / "low4-s0" / "invocations.log").read_text().splitlines()
    assert len(invocations) == 2 and invocations[0].endswith("start_step=0") and not invocations[1].endswith("=0")
    assert not (root / "CONCURRENT").exists()


@pytest.mark.slow
def test_two_concurrent_runners_never_train_a_point_twice(tmp_path):
    out = tmp_path / "res"
    args = [sys.executable, "-m", "ablation", "run", "--study", "lowk", "--preset", scratch_lowk(tmp_path), "--seeds",
            "2", "--runs-dir", str(out), "--trainer-cmd", FAKE, "--quiet"]
    env = {**os.environ, "FAKE_STEPS": "2", "FAKE_SLEEP": "0.05"}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    root = out / "lowk" / "published"
    done = (root / "completions.log").read_text().split()
    assert sorted(done) == sorted(f"low{k}-s{s}" for k in KS for s in (0, 1))  # each once
    assert not (root / "CONCURRENT").exists()
    ran = [int(o.split(" ran ")[1].split(",")[0]) for o in outputs if " ran " in o]
    assert sum(ran) == 2 * len(KS)


def test_stale_and_live_locks(tmp_path):
    from ablation.runner import LOCK_NAME
    from engine import runlock
    from engine.runlock import is_stale

    def RunLock(run_dir):  # noqa: N802
        return runlock.RunLock(run_dir, LOCK_NAME)
    run_dir = tmp_path / "r"
    a = RunLock(run_dir)
    assert a.try_acquire()
    b = RunLock(run_dir)
    assert not b.try_acquire() and b.holder["pid"] == os.getpid()  # live holder: not broken
    a.release()
    assert b.try_acquire()
    b.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"pid": dead.pid, "host": __import__("socket").gethostname(), "child_pid": None, "token": "x"}
    (run_dir / "ablation.lock").write_text(json.dumps(info))
    assert is_stale(info)
    c = RunLock(run_dir)
    assert c.try_acquire()  # a dead local holder's lock is broken
    c.release()
    other = dict(info, host="some-other-node")
    (run_dir / "ablation.lock").write_text(json.dumps(other))
    assert not RunLock(run_dir).try_acquire()  # another host's lock is never broken automatically


def test_run_corrupt_summary_and_failed_trainer(tmp_path):
    out = tmp_path / "res"
    bad = out / "lowk" / "published" / "low1-s0" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[1, 2")
    preset = scratch_lowk(tmp_path)
    p = ablation("run", "--study", "lowk", "--preset", preset, "--runs-dir", str(out), "--trainer-cmd", FAKE)
    assert p.returncode == 2 and p.stderr.startswith("error: corrupt summary file") and "Traceback" not in p.stderr
    assert bad.read_text() == "[1, 2"  # left alone
    bad.unlink()
    p = ablation("run", "--study", "lowk", "--preset", preset, "--runs-dir", str(out), "--limit", "1",
                 "--trainer-cmd", f"{sys.executable} -c 'import sys; sys.exit(5)'")
    assert p.returncode == 1 and "failed: lowk/published/low1-s0" in p.stderr
    assert not (bad.parent / "ablation.lock").exists()


@pytest.mark.slow
def test_submitit_jobs_run_through_the_same_locks(tmp_path):
    import pytest
    pytest.importorskip("submitit")
    out = tmp_path / "res"
    # submitit's local executor stands in for Slurm (same job pickling, same SlurmRun entry point)
    p = ablation("run", "--study", "lowk", "--preset", scratch_lowk(tmp_path), "--runs-dir", str(out), "--slurm",
                 "--slurm-cluster",
                 "local", "--limit", "1", "--trainer-cmd", FAKE)
    assert p.returncode == 0 and "submitted lowk/published/low1-s0: job" in p.stdout, p.stderr
    summary = out / "lowk" / "published" / "low1-s0" / "summary.json"
    deadline = time.time() + 90
    while not summary.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert summary.exists()
    assert json.loads((summary.parent / "ablation.json").read_text())["frequencies"] == [[0, 0]]


@pytest.mark.slow
def test_jobs_runs_in_parallel_each_point_once_after_the_base(tmp_path):
    out = tmp_path / "res"
    args = [sys.executable, "-m", "ablation", "run", "--study", "single_freq", "--preset", "mini", "--seeds", "1",
            "--runs-dir", str(out), "--trainer-cmd", FAKE, "--quiet", "--jobs", "2"]
    env = {**os.environ, "FAKE_STEPS": "2", "FAKE_SLEEP": "0.02"}
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    sf = out / "single_freq"
    done = (sf / "completions.log").read_text().split()
    assert done[0] == "base-s0" and sorted(done) == sorted(["base-s0", "control-s0"]
                                                           + [f"u{u}v{v}-s0" for u in range(4) for v in range(4)])
    assert not (sf / "CONCURRENT").exists() and "18/18 runs complete" in p.stdout
    starts = [line for line in p.stdout.splitlines() if line.startswith("[ablation] done")]
    assert len(starts) == 18  # every run reported once, by the runner that trained it


def test_bad_base_checkpoint_fails_once_at_planning(tmp_path):
    import torch
    out = tmp_path / "res"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    fca = tmp_path / "fca.pth"
    import models
    kw = dict(widths=[16, 16, 32, 32], stem="cifar")
    fca_kw = dict(kw, input_size=32, grid=4, reduction=4)
    torch.save(models.create_model("fcanet10", num_classes=10, freq=[[0, 0]], **fca_kw).state_dict(), fca)
    classes = tmp_path / "r5.pth"
    torch.save({"model": models.create_model("resnet10", num_classes=5, **kw).state_dict()}, classes)
    good = tmp_path / "r10.pth"
    torch.save({"model": models.create_model("resnet10", num_classes=10, **kw).state_dict()}, good)
    for path, needle in ((junk, "not a PyTorch checkpoint"), (fca, "holds attention weights"),
                         (classes, "does not fit the preset's network"), (tmp_path / "nope.pth", "file not found")):
        p = ablation("run", "--study", "single_freq", "--preset", "mini", "--runs-dir", str(out), "--trainer-cmd", FAKE,
                     "--base-checkpoint", str(path))
        assert p.returncode == 2 and p.stdout == "", (path, p.stdout)
        assert p.stderr.startswith("error: --base-checkpoint") and needle in p.stderr and p.stderr.count("\n") == 1
        assert "weights_only=False" not in p.stderr and "set to `False`" not in p.stderr  # never advise unsafe loads
        assert not (out / "single_freq").exists()  # nothing started
    p = ablation("plan", "--study", "single_freq", "--preset", "mini", "--runs-dir", str(out),
                 "--base-checkpoint", str(good))
    assert p.returncode == 0 and "# base checkpoint:" in p.stdout and "dependency" not in p.stdout


def test_emit_sbatch(tmp_path):
    script = tmp_path / "sf.sbatch"
    p = ablation("run", "--study", "single_freq", "--preset", "imagenet", "--runs-dir", str(tmp_path), "--gpus", "8",
                 "--seeds", "2", "--emit-sbatch", str(script))
    assert p.returncode == 0, p.stderr
    text = script.read_text()
    # every seed's base first (tasks 0-1), then the controls and fine-tunes (2 x 50) once all bases are done
    assert "#SBATCH --gpus-per-node=8" in text and "--array=0-1 " in text and "--array=2-101%8" in text
    assert "--index \"$SLURM_ARRAY_TASK_ID\"" in text and "--seeds 2" in text
    assert "#   0: single_freq/base-s0" in text and "#   2: single_freq/control-s0" in text
    assert "#   101: single_freq/u6v6-s1" in text


if __name__ == "__main__":
    sys.exit(fake_trainer(sys.argv[1:]))
