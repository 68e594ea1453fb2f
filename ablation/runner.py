"""Executing a plan: locally one run after another, or on Slurm (submitit, or an sbatch array script).

Every run is ``<trainer> --config CONFIG KEY=VALUE ...`` with ``output_dir`` set to the run's directory; the
trainer resumes by itself from ``<run_dir>/checkpoints/last.pth``. A run is complete once its ``summary.json``
reports the planned epochs; complete runs are skipped, so ``run`` is idempotent. Each run is guarded by a
lock file, ``<run_dir>/ablation.lock`` (:mod:`engine.runlock`, the trainer's lock), so concurrent ``run``
processes (or Slurm jobs) never train the same point twice.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from engine.runlock import RunLock, held_by

from .errors import AblationError
from .preset import REPO
from .studies import Plan, Run, expand, stale_reason
from .summaries import is_complete, read_summary

TRAINER_ENV = "FCANET_ABLATION_TRAINER"
LOCK_NAME = "ablation.lock"  # a point's lock, held by its runner and (inherited) its trainer


def trainer_command(trainer_cmd: str | None = None, gpus: int = 1) -> list[str]:
    """The command prefix a run is appended to (``--config ... KEY=VALUE ...`` follow).

    ``--trainer-cmd`` or the ``FCANET_ABLATION_TRAINER`` environment variable replace it (tests use a fake
    trainer this way); otherwise ``python train_imagenet.py``, under ``torchrun`` when ``gpus > 1``.
    """
    custom = trainer_cmd or os.environ.get(TRAINER_ENV)
    if custom:
        return shlex.split(custom)
    script = str(REPO / "train_imagenet.py")
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", script]
    return [sys.executable, script]


def write_json_atomic(path: Path, data) -> None:
    from engine.fileio import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def machine_name() -> str:
    """The CPU model and core count, recorded with every run: CPU numerics differ across processors, so results
    are tied to the machine that produced them (the trainer's summary.json records the torch build too)."""
    from engine.summary import cpu_model
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs"


def run_command(run: Run, prefix: Sequence[str]) -> list[str]:
    return list(prefix) + ["--config", str(REPO / run.config)] + run.override_args()


def _check_meta(run: Run) -> None:
    """Refuse to skip or continue a run directory made for another plan (its result would be mislabelled)."""
    reason = stale_reason(run)
    if reason:
        raise AblationError(f"run directory {run.run_dir} does not match the plan: {reason}; move it away to "
                            f"re-run that point (or pass the --freq-source / --base-checkpoint it was run with)")


# ------------------------------------------------------------------------------------- fork launcher
_TRAINER_MAIN = None


def _preload_trainer():
    """Import the trainer's ``train_main`` and the training engine once in this process (the fork launcher)."""
    global _TRAINER_MAIN
    if _TRAINER_MAIN is None:
        from engine.entrypoints import train_main
        import engine.cli, engine.trainer  # noqa: F401,E401  (the heavy imports, done once)
        _TRAINER_MAIN = train_main
    return _TRAINER_MAIN


def _fork_child(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    """Child of the fork launcher: the trainer's ``train_main(argv)`` with stdout/stderr into the run's log."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is not the trainer's business
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    if env.get("OMP_NUM_THREADS"):
        import torch
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        rc = _TRAINER_MAIN(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc or 0))


class _Terminated(KeyboardInterrupt):
    """SIGTERM while a run trains: stop the trainer, release the lock, exit like an interrupt."""


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def run_one(run: Run, prefix: Sequence[str], quiet: bool = False, launcher: str = "subprocess",
            env: dict | None = None) -> str:
    """Train one run unless complete or locked. Returns 'complete', 'locked', 'ran' or 'failed'.

    ``launcher``: ``subprocess`` (a fresh ``prefix`` process per run; the only choice for torchrun / custom
    commands) or ``fork`` (fork this process, which imported the trainer once, and call its ``main``: saves
    the interpreter and import start-up of every run; CPU presets). ``env``: extra environment for the run.
    """
    env = {str(k): str(v) for k, v in (env or {}).items()}
    _check_meta(run)
    if is_complete(run.run_dir, run.epochs):
        return "complete"
    lock = RunLock(run.run_dir, LOCK_NAME)
    if not lock.try_acquire():
        print(f"[ablation] skip {run.name}: locked by {lock.describe_holder()} ({lock.path})", flush=True)
        return "locked"
    proc = None
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        if is_complete(run.run_dir, run.epochs):  # finished by another process between check and lock
            return "complete"
        _check_meta(run)
        # what the run is trained with: `run` and `collect` refuse it once the preset gives something else
        meta = dict(run.meta, name=run.name, config=run.config, epochs=run.epochs, machine=machine_name(),
                    overrides={k: v for k, v in run.overrides.items()}, settings=run.settings)
        write_json_atomic(run.run_dir / "ablation.json", meta)
        cmd = run_command(run, prefix)
        log_path = run.run_dir / "train.log"
        if not quiet:
            print(f"[ablation] run {run.name}: {shlex.join(cmd)}", flush=True)
        if threading_main():
            signal.signal(signal.SIGTERM, _raise_terminated)
        start, cpu_start = time.time(), _children_cpu()
        with open(log_path, "a") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            if launcher == "fork":
                import multiprocessing
                _preload_trainer()
                proc = multiprocessing.get_context("fork").Process(
                    target=_fork_child, args=(cmd[len(prefix):], str(log_path), env), daemon=False)
                proc.start()
                lock.set_child(proc.pid)
                proc.join()
                rc = proc.exitcode
                if not quiet:
                    log.flush()
                    tail = log_path.read_text().splitlines()[-3:]
                    sys.stdout.write("".join(f"    {line}\n" for line in tail))
            else:
                # The trainer inherits the lock's descriptor (and its flock): the point stays locked while it
                # runs, even if this runner dies first. The fork launcher's child inherits it anyway.
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, env={**os.environ, **env}, pass_fds=(lock.fileno(),))
                lock.set_child(proc.pid)
                for line in proc.stdout:
                    log.write(line)
                    if not quiet:
                        sys.stdout.write(line)
                rc = proc.wait()
                proc.stdout.close()
        elapsed = time.time() - start
        if rc != 0:
            print(f"[ablation] FAILED {run.name}: trainer exit status {rc}; log: {log_path}", flush=True)
            return "failed"
        if not is_complete(run.run_dir, run.epochs):
            print(f"[ablation] FAILED {run.name}: trainer exited 0 but {run.run_dir / 'summary.json'} does not "
                  f"report {run.epochs} epochs; log: {log_path}", flush=True)
            return "failed"
        cpu = _children_cpu() - cpu_start
        print(f"[ablation] done {run.name}: {result_text(run.run_dir)} in {elapsed:.0f} s (CPU {cpu:.0f} s)",
              flush=True)
        return "ran"
    except (KeyboardInterrupt, _Terminated):
        if proc is not None:
            _stop(proc)
        raise
    finally:
        if threading_main():
            signal.signal(signal.SIGTERM, old_term)
        lock.release()


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (the trainers): a run's cost in core-seconds,
    which, unlike its wall time, does not grow when other jobs share the cores."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def result_text(run_dir: Path) -> str:
    """``top-1 97.50 (best 97.78)``: the run's final and best-epoch top-1 from its summary.json."""
    summary = read_summary(run_dir) or {}
    text = f"top-1 {summary.get('final_top1', float('nan')):.2f}"
    best = summary.get("best_top1")
    if isinstance(best, (int, float)) and not isinstance(best, bool):
        text += f" (best {best:.2f})"
    return text


def _stop(proc) -> None:
    """Terminate a trainer (Popen or multiprocessing.Process): SIGTERM, then SIGKILL after 60 s."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def select_runs(plan: Plan, index: int | None = None, only: Sequence[int] | None = None,
                rotate: int = 0) -> list[Run]:
    """The runs a runner goes through, in order: run ``index`` alone; or the runs numbered ``only``; or all.
    ``rotate``: runner i of ``--jobs N`` starts at the i-th seed (and wraps around), so parallel runners train
    different seeds' bases and runs instead of waiting for one another."""
    if index is not None:
        if not 0 <= index < len(plan.runs):
            raise AblationError(f"--index {index} out of range: the plan has {len(plan.runs)} runs "
                                f"(0..{len(plan.runs) - 1})")
        return [plan.runs[index]]
    runs = [plan.runs[i] for i in only if 0 <= i < len(plan.runs)] if only is not None else list(plan.runs)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    if rotate and seeds:
        first = seeds[rotate % len(seeds)]
        runs = [r for r in runs if (r.seed or 0) >= first] + [r for r in runs if (r.seed or 0) < first]
    return runs


def prepare_data(plan: Plan, timeout_s: float = 600.0) -> None:
    """Write a preset's built-in data set once (``prepare: digits``), under a lock, before any run starts,
    so that concurrent trainers never build the same tree at the same time."""
    if plan.preset.prepare != "digits":  # the schema allows no other value
        return
    root = Path(expand(plan.preset.data_root, plan.runs_root))
    lock = RunLock(root.parent / f".{root.name}-prepare", LOCK_NAME)
    deadline = time.time() + timeout_s
    while not lock.try_acquire():
        if time.time() > deadline:
            raise AblationError(f"data preparation of {root} is locked by {lock.describe_holder()} ({lock.path})")
        time.sleep(0.5)
    try:
        from engine.data.datasets import write_digits_imagefolder
        write_digits_imagefolder(root)
    finally:
        lock.release()


def run_local(plan: Plan, prefix: Sequence[str], limit: int | None = None, index: int | None = None,
              quiet: bool = False, launcher: str = "subprocess", prepare: bool = True,
              only: Sequence[int] | None = None, rotate: int = 0) -> dict[str, list[str]]:
    """Run the plan's incomplete runs one after another. Returns run names by outcome.

    ``prepare``: write the preset's built-in data first (off with a custom trainer command, which brings its own).
    ``only`` / ``rotate``: see :func:`select_runs`.
    """
    env = plan.preset.env
    by_name = {r.name: r for r in plan.runs}
    outcome: dict[str, list[str]] = {k: [] for k in ("complete", "ran", "locked", "failed", "blocked")}
    started = 0
    selected = select_runs(plan, index, only, rotate)
    for run in selected:  # before anything starts: a run directory made with other settings is never reused
        _check_meta(run)
    if prepare and any(not is_complete(r.run_dir, r.epochs) for r in selected):
        prepare_data(plan)
    for run in selected:
        if is_complete(run.run_dir, run.epochs):
            outcome["complete"].append(run.name)
            continue
        if limit is not None and started >= limit:
            break
        pending = [d for d in run.depends if not _wait_while_running(by_name[d])]
        if pending:
            print(f"[ablation] skip {run.name}: waiting for {', '.join(pending)}", flush=True)
            outcome["blocked"].append(run.name)
            continue
        started += 1
        outcome[run_one(run, prefix, quiet, launcher, env)].append(run.name)
    return outcome


def _wait_while_running(run: Run, poll_s: float = 1.0) -> bool:
    """True once ``run`` is complete. While another live runner holds its lock (e.g. the base run that a
    parallel runner of ``--jobs N`` trains), wait for it; False if it is neither complete nor running."""
    while not is_complete(run.run_dir, run.epochs):
        if held_by(run.run_dir / LOCK_NAME) is None:
            return False
        time.sleep(poll_s)
    return True


def run_parallel(argv: Sequence[str], jobs: int) -> int:
    """``run --jobs N``: N runner processes on the same plan (each ``run ... --jobs 1``, runner i starting at
    the i-th seed); the per-run locks hand every point to exactly one of them, and fine-tunes wait for the
    base run another one trains. Returns the worst exit status."""
    cmd = [sys.executable, "-m", "ablation", *argv, "--jobs", "1"]
    # same cwd: relative --runs-dir paths keep their meaning
    procs = [subprocess.Popen(cmd + ["--runner-index", str(i)]) for i in range(jobs)]
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            _stop(p)
        raise
    return max(codes)


# ------------------------------------------------------------------------------------------------ Slurm
class SlurmRun:
    """A submitit job: one run (requeued from its last checkpoint on preemption or timeout)."""

    def __init__(self, run: Run, prefix: Sequence[str], env: dict | None = None):
        self.run, self.prefix, self.env = run, list(prefix), dict(env or {})

    def __call__(self) -> str:
        status = run_one(self.run, self.prefix, quiet=False, env=self.env)
        if status == "failed":
            raise RuntimeError(f"run {self.run.name} failed; see {self.run.run_dir / 'train.log'}")
        return status

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(SlurmRun(self.run, self.prefix, self.env))


def submit_slurm(plan: Plan, prefix: Sequence[str], gpus: int, partition: str | None, time_min: int,
                 cpus_per_gpu: int, mem_gb: int | None, account: str | None, cluster: str | None = None,
                 limit: int | None = None, prepare: bool = True) -> list[tuple[str, str]]:
    """Submit every incomplete run as one Slurm job (submitit); dependents wait on the base run (afterok)."""
    try:
        import submitit
    except ImportError:
        raise AblationError("--slurm needs the 'submitit' package (pip install submitit), "
                            "or use --emit-sbatch") from None
    for run in plan.runs:
        _check_meta(run)
    if prepare:
        prepare_data(plan)
    folder = plan.runs_root / "slurm" / plan.study
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(name=f"fca-{plan.study}", timeout_min=time_min, nodes=1, tasks_per_node=1,
                  gpus_per_node=gpus, cpus_per_task=max(1, cpus_per_gpu * gpus))
    slurm = {}
    if partition:
        slurm["slurm_partition"] = partition
    if mem_gb:
        slurm["mem_gb"] = mem_gb
    if account:
        slurm["slurm_account"] = account
    executor.update_parameters(**params, **slurm)
    jobs: dict[str, object] = {}
    submitted = []
    for run in plan.runs:
        if is_complete(run.run_dir, run.epochs):
            continue
        if limit is not None and len(submitted) >= limit:
            break
        deps = [jobs[d].job_id for d in run.depends if d in jobs]
        extra = {"slurm_additional_parameters": {"dependency": "afterok:" + ":".join(deps)}} if deps else {}
        if deps and (cluster in (None, "slurm")):
            executor.update_parameters(**extra)
        job = executor.submit(SlurmRun(run, prefix, plan.preset.env))
        if deps and (cluster in (None, "slurm")):
            executor.update_parameters(slurm_additional_parameters={})
        jobs[run.name] = job
        submitted.append((run.name, str(job.job_id)))
    return submitted


def sbatch_script(plan: Plan, cli_args: Sequence[str], gpus: int, partition: str | None, time_min: int,
                  cpus_per_gpu: int, parallel: int = 8) -> str:
    """An sbatch array script: task i runs ``python -m ablation run ... --index i`` (the i-th run of `plan`)."""
    n = len(plan.runs)
    first_dep = next((i for i, r in enumerate(plan.runs) if r.role != "base"), n)  # the bases come first
    part = f"#SBATCH --partition={partition}\n" if partition else ""
    args = shlex.join(list(cli_args))
    lines = [
        "#!/bin/bash",
        f"# Slurm array for study {plan.study!r} (preset {plan.preset.name!r}), {n} runs: index -> run",
        *[f"#   {i}: {r.name}" for i, r in enumerate(plan.runs)],
        "# Submit (runs already complete exit at once; rerunning the array resumes the rest):",
    ]
    if first_dep:
        bases = "0" if first_dep == 1 else f"0-{first_dep - 1}"
        lines += [f"#   jid=$(sbatch --parsable --array={bases} THIS_SCRIPT)       # the base networks first",
                  f"#   sbatch --dependency=afterok:$jid --array={first_dep}-{n - 1}%{parallel} THIS_SCRIPT"]
    else:
        lines += [f"#   sbatch --array=0-{n - 1}%{parallel} THIS_SCRIPT"]
    lines += [
        f"#SBATCH --job-name=fca-{plan.study}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --cpus-per-task={max(1, cpus_per_gpu * gpus)}",
        f"#SBATCH --time={time_min // 60}:{time_min % 60:02d}:00",
        "#SBATCH --requeue",
        f"#SBATCH --output={plan.runs_root}/slurm/{plan.study}/%A_%a.out",
    ]
    if part:
        lines.append(part.rstrip("\n"))
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"exec {shlex.quote(sys.executable)} -m ablation run {args} --gpus {gpus} --index \"$SLURM_ARRAY_TASK_ID\"",
        "",
    ]
    return "\n".join(lines)
