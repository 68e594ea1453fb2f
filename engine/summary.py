"""``summary.json``: the result of a finished run, the one file other tools read (``python -m ablation``).

Declared once here. Keys are never renamed; new ones are added with a ``schema_version`` bump.
Version history: 1 = the first declared schema (the keys before it, plus ``schema_version``); 2 = provenance
(``torch_version``, ``cuda_version``, ``cpu_model``, ``cpu_count``, ``threads``: CPU numerics differ across
processors, builds and thread counts, so a result names the machine and build that produced it).
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEMA_VERSION = 2
FILE_NAME = "summary.json"


@dataclass
class RunSummary:
    status: str                  # "complete" (only finished runs write a summary)
    model: str                   # model.name
    epochs: int                  # epochs trained
    best_top1: float             # best val top-1 (%) over the evaluated epochs ...
    best_epoch: int              # ... and its epoch (1-based)
    final_top1: float | None  # val top-1 / top-5 (%) and loss of the last evaluated (= final) epoch
    final_top5: float | None
    final_loss: float | None
    val_count: int | None     # val images evaluated (every image exactly once)
    global_steps: int
    train_img_per_s: float       # training throughput over all ranks, evaluation excluded
    wall_time_s: float           # over all sessions (resumes add up)
    gpu_hours: float             # wall_time_s x GPUs (0 on CPU)
    world_size: int
    device: str                  # CUDA device name, or "cpu"
    global_batch: int
    peak_lr: float
    git_commit: str | None    # HEAD of this checkout ("-dirty" with local changes), None outside git
    output_dir: str
    torch_version: str | None = None  # torch.__version__, e.g. "2.14.1+cpu"
    cuda_version: str | None = None   # torch.version.cuda of the build (None: a CPU-only build)
    cpu_model: str | None = None      # /proc/cpuinfo "model name" (platform.processor() elsewhere)
    cpu_count: int | None = None      # logical CPUs of the machine
    threads: int | None = None        # torch intra-op threads of the run (numerics depend on them on CPU)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


KEYS = tuple(f.name for f in fields(RunSummary))


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", read from /proc/cpuinfo), else platform's guess."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The :class:`RunSummary` provenance fields of this process (torch is imported by then)."""
    import os

    import torch
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda, "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def read_summary(path: str | Path) -> dict | None:
    """A run directory's (or file's) summary as a dict; None if absent or unreadable (e.g. torn)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, ``-dirty`` with local changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
