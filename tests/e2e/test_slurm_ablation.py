"""The ablation tool on a real Slurm cluster (tests/slurm_cluster.py): the mini preset's ``single_freq`` study,
reduced to its base network and the first fine-tunes with ``--limit``, each run shortened by a trainer wrapper
(``--trainer-cmd``) that caps every epoch at a few steps.

* ``run --slurm`` (submitit): one job per run, the fine-tunes ``afterok`` on the base job; all complete, the
  fine-tunes start only after the base finished, and ``collect`` writes the same table as a local ``run``
  of the same points on this machine (the weights are bitwise equal too).
* ``run --emit-sbatch``: the script's own two ``sbatch`` commands (index 0, then the dependent array ``1-N%k``,
  here cut to the same points) complete with the same table; a base job killed mid-run (SIGKILL to its runner
  and trainer: the lock stays behind) and resubmitted finishes from its checkpoint with the uninterrupted
  weights; resubmitting everything trains nothing again; two jobs started together on one point train it once.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by pytest as a plugin (pytest_plugins), not here: its asserts are rewritten
    from slurm_cluster import SlurmCluster

pytest_plugins = ("slurm_cluster",)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STUDY, PRESET = "single_freq", "mini"
SEEDS = ("--seeds", "1")  # one replicate: its base, then its control and fine-tunes
LIMIT = 3          # the base network, the no-attention control and the first fine-tune
STEPS = 2          # training steps per epoch (the mini preset's epochs have 23)
TABLES = ("table.csv", "table.md")  # runs.csv differs by design: it lists each run's directory


def base_env(cluster: SlurmCluster) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), cluster.env["PATH"]]),
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               SLURM_CONF=cluster.env["SLURM_CONF"])
    return env


def ablation(cluster: SlurmCluster, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "ablation", *args], cwd=ROOT, env=base_env(cluster),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"ablation {shlex.join(args)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def plan_runs(runs_dir: Path):
    from ablation.studies import build_plan
    return build_plan(STUDY, PRESET, runs_root=runs_dir, seeds=1).runs


def read_tables(out: Path) -> dict[str, str]:
    return {name: (out / STUDY / name).read_text() for name in TABLES}


def model_state(run_dir: Path) -> dict:
    import torch
    return torch.load(run_dir / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(run_dir: Path, ref_dir: Path) -> None:
    import torch
    a, b = model_state(run_dir), model_state(ref_dir)
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{run_dir.name}: {len(bad)} tensors differ from {ref_dir}, e.g. {bad[0]}"


def launches(run_dir: Path) -> int:
    """How many times the runner started the trainer for this run (one header line in train.log each)."""
    log = run_dir / "train.log"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.startswith("# ") and "--config" in line)


@pytest.fixture(scope="module")
def trainer_cmd(tmp_path_factory) -> str:
    """The repository's trainer with every epoch capped at STEPS steps and one evaluation, at the end."""
    path = tmp_path_factory.mktemp("slurm_abl_bin") / "short_trainer.sh"
    path.write_text("#!/bin/sh\n"
                    f"exec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'train_imagenet.py'))} \"$@\" "
                    f"train.max_steps_per_epoch={STEPS} train.eval_every_epochs=1000\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def local(slurm_cluster, trainer_cmd, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The reference: the same points run locally, one after another; returns (runs dir, tables)."""
    tmp = tmp_path_factory.mktemp("slurm_abl_local")
    runs, out = tmp / "runs", tmp / "results"
    ablation(slurm_cluster, "run", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
             "--limit", str(LIMIT), "--trainer-cmd", trainer_cmd, "--quiet")
    ablation(slurm_cluster, "collect", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
             "--output", str(out))
    return runs, read_tables(out)


@pytest.fixture(scope="module")
def submitit_submission(slurm_cluster, trainer_cmd, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """``run --slurm`` submitted before the local reference trains, so that both run at once. Returns the runs
    dir, the CLI's output and each submitted job's ``Dependency`` read right after submission (while the base
    job is still pending or running: Slurm clears a dependency once it is satisfied)."""
    runs = tmp_path_factory.mktemp("slurm_abl_submitit") / "runs"
    stdout = ablation(slurm_cluster, "run", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
                      "--slurm", "--limit", str(LIMIT), "--trainer-cmd", trainer_cmd, "--slurm-cpus-per-gpu", "1",
                      "--slurm-time", "15")
    deps = {job: slurm_cluster.job(job)["Dependency"]
            for job in re.findall(r"^submitted \S+: job (\d+)$", stdout, re.M)}
    return runs, stdout, deps


def test_submitit_base_then_finetunes_same_table_as_local(slurm_cluster, submitit_submission, local, tmp_path):
    runs, stdout, deps = submitit_submission
    out = tmp_path / "results"
    submitted = re.findall(r"^submitted (\S+): job (\d+)$", stdout, re.M)
    planned = plan_runs(runs)[:LIMIT]
    assert [name for name, _ in submitted] == [r.name for r in planned], stdout
    base_job = submitted[0][1]
    assert deps[base_job] == "(null)"
    for _, job in submitted[1:]:
        assert deps[job].startswith(f"afterok:{base_job}"), deps
    for _, job in submitted:
        info = slurm_cluster.wait(job, timeout=400)
        assert info["JobState"] == "COMPLETED", (info, list((runs / "slurm").rglob("*.err")))
    base_done = (planned[0].run_dir / "summary.json").stat().st_mtime
    for run in planned[1:]:  # a fine-tune's runner starts (writes ablation.json) after the base finished
        assert (run.run_dir / "ablation.json").stat().st_mtime >= base_done
    ablation(slurm_cluster, "collect", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
             "--output", str(out))
    assert read_tables(out) == local[1]
    local_runs = {r.name: r.run_dir for r in plan_runs(local[0])}
    for run in planned:
        assert_same_weights(run.run_dir, local_runs[run.name])


def sbatch_commands(script: Path, n_runs: int) -> tuple[list[str], list[str]]:
    """The two submit commands of the emitted script's header, as argument lists (THIS_SCRIPT filled in)."""
    header = [line[1:].strip() for line in script.read_text().splitlines() if line.startswith("#   ")]
    first = next(line for line in header if "--array=0 " in line)
    second = next(line for line in header if "--dependency=afterok:$jid" in line)
    assert re.search(rf"--array=1-{n_runs - 1}%\d+ ", second), second
    m = re.fullmatch(r"jid=\$\((sbatch .*)\)(?:\s+#.*)?", first)
    assert m, first
    first_args = shlex.split(m.group(1).replace("THIS_SCRIPT", str(script)))
    second_args = shlex.split(second.split("#")[0].replace("THIS_SCRIPT", str(script)))
    return first_args, second_args


def test_emit_sbatch_kill_resubmit_and_locks(slurm_cluster, trainer_cmd, local, tmp_path):
    runs, out, script = tmp_path / "runs", tmp_path / "results", tmp_path / "ablation.sbatch"
    ablation(slurm_cluster, "run", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
             "--emit-sbatch", str(script), "--trainer-cmd", trainer_cmd, "--slurm-cpus-per-gpu", "1",
             "--slurm-time", "15")
    planned = plan_runs(runs)
    first, second = sbatch_commands(script, len(planned))
    assert first[:3] == ["sbatch", "--parsable", "--array=0"]
    # The dependent array over the points --limit would run (1..LIMIT-1), with the script's own throttle.
    second = [re.sub(r"^--array=1-\d+%", f"--array=1-{LIMIT - 1}%", a) for a in second]
    base = planned[0].run_dir

    def submit_both() -> tuple[str, str]:
        jid = slurm_cluster.sbatch(first[2:], cwd=tmp_path)
        dep = slurm_cluster.sbatch([a.replace("$jid", jid) for a in second[1:]], cwd=tmp_path)
        return jid, dep

    # 1. The base job, killed outright once it has written two epochs' checkpoints: SIGKILL to its runner and
    #    trainer (their pids are in the run's lock file), as when a node dies. Nothing is saved on the way out
    #    and the lock file stays behind. (`scancel` would let the trainer checkpoint first.)
    jid = slurm_cluster.sbatch(first[2:], cwd=tmp_path)
    deadline = time.time() + 300
    while not ((base / "metrics.jsonl").exists() and len((base / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert time.time() < deadline and slurm_cluster.state(jid) in ("PENDING", "RUNNING"), \
            f"base did not reach epoch 2: {slurm_cluster.job(jid)}\n{slurm_cluster.log_tails()}"
        time.sleep(0.2)
    lock = json.loads((base / "ablation.lock").read_text())
    assert lock["slurm_job"] == jid
    for pid in (lock["child_pid"], lock["pid"]):
        os.kill(pid, signal.SIGKILL)
    info = slurm_cluster.wait(jid, timeout=120)
    assert info["JobState"] == "FAILED", info
    assert not (base / "summary.json").exists(), "the base finished before it was killed"
    assert (base / "ablation.lock").exists()

    # 2. Both commands again: the base resumes from its checkpoint, then the fine-tunes run.
    jid, dep = submit_both()
    for job in (jid, dep):
        info = slurm_cluster.wait(job, timeout=400)
        assert info["JobState"] == "COMPLETED", (info, slurm_cluster.log_tails())
    assert "resumed from" in (base / "train.log").read_text()
    assert launches(base) == 2
    local_runs = {r.name: r.run_dir for r in plan_runs(local[0])}
    assert_same_weights(base, local_runs[planned[0].name])
    ablation(slurm_cluster, "collect", "--study", STUDY, "--preset", PRESET, *SEEDS, "--runs-dir", str(runs),
             "--output", str(out))
    assert read_tables(out) == local[1]

    # 3. Resubmitting everything trains nothing again: logs and checkpoints untouched.
    def snapshot() -> dict:
        return {r.name: ((r.run_dir / "train.log").read_bytes(),
                         (r.run_dir / "checkpoints" / "last.pth").stat().st_mtime_ns) for r in planned[:LIMIT]}
    before = snapshot()
    for job in submit_both():
        assert slurm_cluster.wait(job, timeout=300)["JobState"] == "COMPLETED"
    assert snapshot() == before

    # 4. Two jobs started at the same moment on one untrained point: one trains it, the other finds it locked.
    index = LIMIT
    held = [slurm_cluster.sbatch(["--hold", f"--array={index}", str(script)], cwd=tmp_path) for _ in range(2)]
    slurm_cluster.run(["scontrol", "release", *held])
    for job in held:
        assert slurm_cluster.wait(job, timeout=400)["JobState"] == "COMPLETED"
    logs = [(runs / "slurm" / STUDY / f"{job}_{index}.out").read_text() for job in held]
    point = planned[index]
    assert launches(point.run_dir) == 1
    # The runner's closing line counts its outcomes ("complete 0, ran 1, locked 0, ...").
    assert sorted(bool(re.search(r"\bran 1\b", text)) for text in logs) == [False, True], logs
    locked = [text for text in logs if re.search(r"\blocked 1\b", text)]
    assert len(locked) == 1 and f"skip {point.name}: locked by" in locked[0], logs
    assert (point.run_dir / "summary.json").exists() and not (point.run_dir / "ablation.lock").exists()
