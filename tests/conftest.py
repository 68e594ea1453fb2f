"""Shared fixtures and helpers: tiny ImageFolder trees, fast training overrides (CPU, seconds), the entry points
as subprocesses or in process, and the one-line error contract.

Stable helpers other tests may use:

* :func:`write_tiny_imagefolder` / the ``tiny_imagefolder`` fixture: ``root/{train,val}/<class>/<n>.png``
  with class-dependent colours (learnable), deterministic.
* :func:`tiny_overrides` / :func:`train_args`: ``KEY=VALUE`` overrides that make any config a seconds-long CPU run.
* the session fixtures ``tiny_data`` and ``tiny_run``: one tiny tree and one finished 2-epoch run on it, shared
  by every test that only reads them (copy the run directory before changing anything in it).
* :func:`run_cli` / :func:`torchrun`: ``train_imagenet.py`` or ``eval_imagenet.py`` as a subprocess (one process,
  or DDP under ``torchrun --standalone``); :func:`run_main`: the same entry point in this process (seconds
  faster: no torch import), with the same result type.
* :func:`assert_refused` (exit status 2, exactly one ``error:`` line, no traceback), :func:`error_lines`,
  :func:`checksums` (sha256 of every file under a folder: "nothing already written changed").

Parallel runs (pytest-xdist, see pytest.ini): each test file runs in one worker (its module fixtures are built
once), the Slurm files share one worker (one cluster), and the longest files start first.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

# One intra-op thread per test process (and per subprocess it starts), set before numpy or torch is imported: the
# tests' tensors are tiny, where a second thread only spins at every op's barrier, and the parallel workers (and
# the other jobs of a shared machine) already occupy the cores. (Measured: test_models.py took 121 s of CPU with
# two threads per process on two loaded cores.)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Tests exercise the checkout they live in: pytest.ini puts it first on sys.path (pythonpath = .), and this
# does the same for the CLI subprocesses that tests start (`python train_imagenet.py ...`), whether or not the
# project is pip-installed and wherever an installed copy points.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

BASE_CONFIG = ROOT / "configs" / "base" / "imagenet.yaml"


def write_tiny_imagefolder(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                           size: int = 12, seed: int = 0, val_total: int | None = None) -> Path:
    """Write a small learnable ImageFolder: class ``c`` is a noisy image of a class-specific colour.

    ``val_total`` (optional) sets the exact number of val images (spread over the classes), e.g. a prime.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    val_counts = [val_per_class] * classes
    if val_total is not None:
        val_counts = [val_total // classes + (1 if c < val_total % classes else 0) for c in range(classes)]
    for split, counts in (("train", [train_per_class] * classes), ("val", val_counts)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[c]):
                noise = rng.integers(-40, 41, (size, size, 3))
                img = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of a tiny ResNet-18 layout on a tiny ImageFolder."""
    opts = {
        "model.name": "resnet18", "model.num_classes": 3, "model.kwargs": "{widths: [16, 16, 32, 32]}",
        "data.root": str(data_root), "data.image_size": 32, "data.val_resize": 32, "data.workers": 0,
        "train.batch_size": 4, "train.epochs": 2, "train.warmup_epochs": 1, "train.amp": "off",
        "train.channels_last": "false", "train.progress": "false", "train.tensorboard": "false",
        "train.cpu_threads": 1, "train.checkpoint_every_steps": 0, "train.log_every_steps": 2,
        "optim.base_lr": 0.1, "output_dir": str(output_dir), "seed": 0,
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: one thread each (2 cores shared), repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def tiny_imagefolder(tmp_path) -> Path:
    return write_tiny_imagefolder(tmp_path / "data")


def train_args(data_root, output_dir, **extra) -> list[str]:
    """``--config <base config>`` and :func:`tiny_overrides`: the arguments of a seconds-long training run."""
    return ["--config", str(BASE_CONFIG)] + tiny_overrides(data_root, output_dir, **extra)


# ------------------------------------------------------------------------------------------- entry points

def run_cli(script: str, args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python <script> ARGS`` (a path relative to the repository root) from the root, text output captured."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def torchrun(nproc: int, script: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=NPROC <script> ARGS`` (gloo on CPU). ``--standalone`` binds its
    rendezvous to a free port, so parallel test workers do not collide."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_main(script: str, args: list[str], capsys) -> subprocess.CompletedProcess:
    """The entry point of ``script`` (``train_imagenet.py`` / ``eval_imagenet.py``) called in this process
    (:func:`engine.entrypoints.train_main` / ``eval_main``), as a :class:`subprocess.CompletedProcess`: its
    return value is the exit status, stdout/stderr what it printed. What a subprocess adds (the torch import,
    ``sys.exit``) is tested once per kind of exit by the tests that start one."""
    from engine.entrypoints import eval_main, train_main

    main = {"train_imagenet.py": train_main, "eval_imagenet.py": eval_main}[script]
    capsys.readouterr()  # drop what earlier calls printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], rc, out, err)


# ------------------------------------------------------------------------------------- the error contract

def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one ``error:`` line containing every needle, no traceback and no terminal escape
    codes; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def checksums(*roots: Path, skip: tuple[str, ...] = ("train.lock", "train.lock.break")) -> dict[str, str]:
    """sha256 of every regular file under ``roots`` (folders or files), except symlinks and names matching a
    glob in ``skip`` (by default the run-directory lock and its break mutex, which launches create and remove).
    Keyed by the path relative to the folder when ``roots`` is one folder, else by the full path."""
    relative = len(roots) == 1 and Path(roots[0]).is_dir()
    out = {}
    for root in map(Path, roots):
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file() and not p.is_symlink() and not any(p.match(g) for g in skip):
                out[str(p.relative_to(root)) if relative else str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------ the shared finished run

# The settings of ``tiny_run`` beyond tiny_overrides: 24 train images / batch 4 = 6 steps per epoch, 2 epochs, a
# checkpoint every 2 steps (last.pth and last.prev.pth both exist).
TINY_RUN = {"train.epochs": 2, "train.checkpoint_every_steps": 2}


class TinyRun(NamedTuple):
    data: Path      # the tiny_data tree
    dir: Path       # the finished run directory (read only)
    summary: dict   # what fit() returned


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The default :func:`write_tiny_imagefolder` tree (3 classes, 24 train / 12 val images), read only."""
    return write_tiny_imagefolder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One finished run (in process) on ``tiny_data`` with the :data:`TINY_RUN` settings, shared by the tests
    that read a finished run; copy it (:func:`copy_run`) to change it. Checked unchanged at the end."""
    from engine.config import load_config
    from engine.trainer import fit

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    summary = fit(load_config(BASE_CONFIG, tiny_overrides(tiny_data, out, **TINY_RUN)))
    before = checksums(out), checksums(tiny_data)
    yield TinyRun(tiny_data, out, summary)
    assert (checksums(out), checksums(tiny_data)) == before, "a test changed the shared tiny_run or tiny_data"


def copy_run(run_dir: Path, dst: Path) -> Path:
    """A copy of a run directory at ``dst`` (created), to damage or train on."""
    shutil.copytree(run_dir, dst)
    return dst


# ------------------------------------------------------------------------------ parallel runs (xdist)

# Test files that take longest (seconds of CPU each, measured on 2 cores), started first so that no long file is
# left to run alone at the end; the others follow in collection order. Patterns are matched against the path
# relative to tests/.
LONGEST_FIRST = ("e2e/test_slurm_*.py", "detection/test_coco_train.py", "ablation/test_ablation_mini.py",
                 "engine/test_compile.py", "e2e/test_faults_train.py", "ablation/test_ablation_run.py",
                 "e2e/test_faults_round2.py", "e2e/test_no_hang.py", "models/test_models.py",
                 "scripts/test_bench.py", "detection/test_coco_eval.py", "e2e/test_trainer_demo.py")


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the CPU quota of its cgroup or any parent (a
    container limited to 2 CPUs on a large host still lists every host CPU in its affinity mask)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    for quota, period in _cgroup_quotas():
        cpus = min(cpus, max(1, -(-quota // period)))
    return cpus


def _cgroup_quotas() -> list[tuple[int, int]]:
    """(quota, period) of every CPU limit from this process's cgroup up to the root (cgroup v2 ``cpu.max``,
    v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); unlimited levels and unreadable files are skipped."""
    found = []
    for line in _read_lines("/proc/self/cgroup"):  # "0::/path" (v2) or "N:cpu,cpuacct:/path" (v1)
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            roots, read = [Path("/sys/fs/cgroup")], _v2_quota
        elif "cpu" in controllers.split(","):
            roots, read = [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")], _v1_quota
        else:
            continue
        for root in roots:
            level = root / path.strip("/")
            while True:
                quota = read(level)
                if quota:
                    found.append(quota)
                if level == root or root not in level.parents:
                    break
                level = level.parent
    return found


def _v2_quota(folder: Path) -> tuple[int, int] | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return (int(quota), int(period)) if quota != "max" and int(period) > 0 else None
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> tuple[int, int] | None:
    try:
        quota, period = (int((folder / f).read_text()) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return (quota, period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pytest.ini): one worker per usable CPU (not per physical core: a 2-vCPU VM reports one), at
    most 4. Many tests start subprocesses of their own (torchrun, Slurm jobs), and the longest single file
    bounds the run anyway."""
    return max(1, min(usable_cpus(), 4))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line naming the machine (also under ``-q``): suite timings are only comparable on the same one."""
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), "unknown CPU")
    workers = getattr(config.option, "numprocesses", None) or 0
    if getattr(config.option, "maxprocesses", None):
        workers = min(workers, config.option.maxprocesses)
    terminalreporter.write_line(f"machine: {model}; {os.cpu_count()} CPUs listed, {usable_cpus()} usable; "
                                f"xdist workers: {workers}")


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _test_path(item) -> str:
    path = Path(str(item.path))
    return path.relative_to(ROOT / "tests").as_posix() if path.is_relative_to(ROOT / "tests") else path.as_posix()


def pytest_collection_modifyitems(config, items) -> None:
    """The files listed in :data:`LONGEST_FIRST` first: xdist hands out files in collection order (pytest.ini
    keeps it from reordering them by their number of tests)."""
    import fnmatch

    def rank(item) -> int:
        rel = _test_path(item)
        return next((i for i, pat in enumerate(LONGEST_FIRST) if fnmatch.fnmatch(rel, pat)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within a file and among unlisted files is kept


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (pytest.ini), except that the Slurm test files are one unit of work together: the
    Slurm cluster is a session fixture, so one worker starts one cluster for both. (xdist's own ``loadgroup``
    marks cannot express this with pytest 9, whose node ids they fail to rewrite.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesSlurmTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "slurm" if Path(path).name.startswith("test_slurm_") else path

    return FilesSlurmTogether(config, log)
