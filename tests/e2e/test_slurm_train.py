"""``scripts/slurm_train.sbatch`` on a real Slurm cluster (tests/slurm_cluster.py): the demo config at 2 processes.

Every job runs the script as a user would submit it, from the repository root: one ``torchrun`` per node under
``srun``, c10d rendezvous on the first node, gloo (CPU). The node advertises two GRES "GPUs", so
``--gpus-per-node=2`` gives two processes per node exactly as on a GPU cluster. Reference: the same training
under ``torchrun --standalone`` without Slurm. Checked:

* an uninterrupted job: COMPLETED, and its run directory equals the local run's (the checkpoints' weights,
  optimizer and scheduler state bitwise; config, metrics and summary up to paths and timings);
* a job stopped twice, first by the time-limit signal the script asks Slurm for (``--signal=B:USR1@180``; sent
  here with ``scancel --batch --signal=USR1``), then by ``scontrol requeue`` (what a preemption does): each
  time the trainers checkpoint, the job is requeued and resumes; the final weights equal the local run's;
* deterministic errors (a missing data root; a non-finite loss): FAILED with the trainer's one-line
  ``error:`` in the log, never requeued;
* two nodes (two slurmd on this host), one process each: the same weights as the local 2-process run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:  # imported by pytest as a plugin (pytest_plugins), not here: its asserts are rewritten
    from slurm_cluster import SlurmCluster
pytest_plugins = ("slurm_cluster",)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"
DEMO = ROOT / "configs" / "demo" / "fcanet_digits.yaml"
EPOCHS = 3
TIMING_KEYS = {"img_per_s", "epoch_time_s", "warmup_s", "input_wait_s", "decode_s", "wall_time_s", "train_img_per_s",
               "gpu_hours", "output_dir", "git_commit"}


def demo_overrides(data_root: Path, out: Path, **extra) -> list[str]:
    """The demo config at its smallest useful size: 3 epochs of 11 steps (2 processes x batch 64) on digits;
    metrics (and the preemption flag) reduced every step so that a stop request is honoured at once."""
    opts = {"data.root": data_root, "output_dir": out, "train.epochs": EPOCHS, "train.progress": "false",
            "train.tensorboard": "false", "train.log_every_steps": 1}
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def job_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from engine.data.datasets import write_digits_imagefolder
    return write_digits_imagefolder(tmp_path_factory.mktemp("slurm_data") / "digits")


@pytest.fixture(scope="module")
def local_run(digits, tmp_path_factory) -> Path:
    """The reference: the same 2-process training under ``torchrun --standalone``, no Slurm."""
    out = tmp_path_factory.mktemp("slurm_local") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_imagenet.py"), "--config", str(DEMO), *demo_overrides(digits, out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "summary.json").is_file()
    return out


def submit(cluster: SlurmCluster, out: Path, overrides: list[str], *sbatch_args: str) -> tuple[str, Path]:
    """``sbatch [ARGS] scripts/slurm_train.sbatch DEMO OVERRIDES`` from the repository root; returns the job
    id and its log. The script's own resource lines (8 GPUs, 64 CPUs) are overridden for this node."""
    log = out.parent / f"{out.name}.slurm.log"
    args = [f"--output={log}", f"--job-name=test-{out.name}", "--time=15", *sbatch_args, str(SCRIPT), str(DEMO),
            *overrides]
    # A rendezvous port of its own: jobs of the tests share one host (and other test sessions may run).
    return cluster.sbatch(args, cwd=ROOT, env=job_env(MASTER_PORT=str(cluster.free_port()))), log


def load(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a, b, where: str) -> None:
    import torch
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def strip(d: dict, drop: set[str]) -> dict:
    return {k: v for k, v in d.items() if k not in drop}


def assert_same_run(run: Path, ref: Path, train_metrics: bool = True) -> None:
    """``run`` holds what ``ref`` holds: the same files, bitwise-equal weights and optimizer state, the same
    config, metrics and summary (timings and paths aside)."""
    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    assert files(run) == files(ref)
    last, last_ref = load(run / "checkpoints" / "last.pth"), load(ref / "checkpoints" / "last.pth")
    # Everything but the run's config (its output_dir), timings and the RNG states (consumed differently by a
    # resumed run: the weights are what must match); model and optimizer state at least.
    assert last.keys() == last_ref.keys() and {"model", "optimizer"} <= last.keys()
    for key in last.keys() - {"config", "state", "rng"}:
        assert_same_tensors(last[key], last_ref[key], f"last.pth[{key!r}]")
    assert_same_tensors(load(run / "checkpoints" / "best.pth")["model"],
                        load(ref / "checkpoints" / "best.pth")["model"], "best.pth['model']")
    cfg, cfg_ref = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run, ref))
    assert strip(cfg, {"output_dir"}) == strip(cfg_ref, {"output_dir"})
    drop = set(TIMING_KEYS) | (set() if train_metrics else {"train_loss", "train_top1"})
    rows, rows_ref = ([strip(json.loads(line), drop) for line in (d / "metrics.jsonl").read_text().splitlines()]
                      for d in (run, ref))
    assert rows == rows_ref
    summary, summary_ref = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert strip(summary, TIMING_KEYS) == strip(summary_ref, TIMING_KEYS)


def wait_for(pred, timeout: float, what: str, cluster: SlurmCluster, log: Path) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            text = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            raise AssertionError(f"timed out waiting for {what}\n--- job log:\n{text}\n{cluster.log_tails()}")
        time.sleep(0.2)


def metric_rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def jobs(slurm_cluster, digits, tmp_path_factory) -> dict[str, tuple[str, Path, Path]]:
    """The jobs that need no intervention, submitted together at the start (name -> job id, log, run dir), so
    that they run while the local reference trains: one node x 2 processes; two nodes x 1 process (when this
    host runs several slurmd); two deterministic failures, at 1 process each."""
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    cpus = f"--cpus-per-task={slurm_cluster.cpus}"
    specs = {
        "one_node": ({}, ["--gpus-per-node=2", cpus]),
        # A data root that does not exist (and is not to be prepared): fails at start-up.
        "bad_data_root": ({"data.root": tmp / "no_such_dir", "data.prepare": "null"},
                          ["--gpus-per-node=1", "--cpus-per-task=1"]),
        # A non-finite loss (the trainer stops with exit status 2): the old script requeued this one forever.
        "non_finite_loss": ({"optim.base_lr": 1e12}, ["--gpus-per-node=1", "--cpus-per-task=1"]),
    }
    if slurm_cluster.multi_nodes:
        specs["two_nodes"] = ({}, ["--partition=multi", "--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1"])
    out = {}
    for name, (extra, args) in specs.items():
        run = tmp / name
        job, log = submit(slurm_cluster, run, demo_overrides(digits, run, **extra), *args)
        out[name] = (job, log, run)
    return out


def test_job_completes_like_a_local_run(slurm_cluster, jobs, local_run):
    job, log, run = jobs["one_node"]
    info = slurm_cluster.wait(job, timeout=400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert info["Restarts"] == "0"
    assert "1 node(s) x 2 process(es)" in text and "run complete" in text
    assert_same_run(run, local_run)


def test_two_nodes_one_process_each(slurm_cluster, jobs, local_run):
    if "two_nodes" not in jobs:
        pytest.skip(f"no second node: {slurm_cluster.multi_reason}")
    job, log, run = jobs["two_nodes"]
    info = slurm_cluster.wait(job, timeout=400)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "2 node(s) x 1 process(es)" in text
    nodes = slurm_cluster.run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()
    assert nodes == slurm_cluster.multi_nodes
    assert_same_run(run, local_run)


@pytest.mark.parametrize("name, message", [("bad_data_root", "data"),
                                           ("non_finite_loss", "non-finite training loss")])
def test_deterministic_errors_fail_without_requeue(slurm_cluster, jobs, name, message):
    job, log, _ = jobs[name]
    info = slurm_cluster.wait(job, timeout=400)
    text = log.read_text()
    assert info["JobState"] == "FAILED", f"{info['JobState']}\n{text[-3000:]}"
    assert info["Restarts"] == "0" and "requeue" not in text.replace("not requeueing", ""), text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and all(message in line for line in errors), text[-3000:]
    assert "training failed (exit status" in text and "not requeueing" in text
    time.sleep(2)  # and it does not come back later
    assert slurm_cluster.job(job)["JobState"] == "FAILED"


def test_time_limit_signal_and_preemption_requeue_and_resume_bitwise(slurm_cluster, digits, local_run, tmp_path):
    out = tmp_path / "run"
    job, log = submit(slurm_cluster, out, demo_overrides(digits, out), "--gpus-per-node=2",
                      f"--cpus-per-task={slurm_cluster.cpus}")
    # 1. The time-limit warning (--signal=B:USR1@180 sends USR1 to the batch shell) once epoch 1 is done.
    wait_for(lambda: metric_rows(out) >= 1, 400, "epoch 1", slurm_cluster, log)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])
    # 2. A preemption-style requeue (Slurm SIGTERMs every process of the job) once the requeued job trains again.
    wait_for(lambda: log.read_text().count("start training") >= 2, 300, "the first restart", slurm_cluster, log)
    slurm_cluster.run(["scontrol", "requeue", job])
    info = slurm_cluster.wait(job, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert info["Restarts"] == "2", text[-3000:]
    assert text.count("SIGTERM received: checkpointed at") == 2, text[-3000:]  # mid-run, not at a finished run
    assert "time limit near: requeueing job" in text
    assert "SIGTERM (preemption, requeue or cancellation)" in text
    assert text.count("resumed from") == 2
    # every rank's running train-loss/top-1 sums travel in the checkpoint: the resumed epoch's averages match too
    assert_same_run(out, local_run)
