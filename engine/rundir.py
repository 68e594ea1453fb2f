"""A run directory (``output_dir``) and the files in it; the trainer's loops call this module for every file.

::

    <output_dir>/
      config.yaml                the resolved config the weights beside it were trained with
      config.<n>.yaml            earlier, different versions of it (n = 1, 2, ...; highest = most recent)
      metrics.jsonl              one JSON row per finished epoch (rows past the resumed checkpoint are trimmed)
      summary.json               the finished run's result (:mod:`engine.summary`)
      checkpoints/last.pth       the newest training checkpoint (:mod:`engine.checkpoint`) ...
      checkpoints/last.prev.pth  ... and the one before it (auto-resume falls back to it)
      checkpoints/best.pth       the weights of the best evaluated epoch
      train.lock(.json)          the lock of the trainer that owns the directory (:mod:`engine.runlock`)
      tb/                        TensorBoard events (``train.tensorboard``)

Only rank 0 writes. Every write is atomic (or an fsync-ed append) and a failure is a one-line
:class:`engine.fileio.WriteError` that leaves the earlier file as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any
from collections.abc import Callable

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine import fileio
from engine.config import ConfigError, diff_configs
from engine.data.errors import DataError
from engine.runlock import RunDirLock
from engine.summary import FILE_NAME as SUMMARY_NAME, RunSummary, read_summary

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"


def write_config(run_dir: str | Path, text: str, log: Callable[[str], None] = print) -> None:
    """Write ``run_dir/config.yaml``, keeping a different earlier one as ``config.<n>.yaml`` (n = 1, 2, ...).

    The copy is written (atomically) before config.yaml is replaced (atomically), so at every moment
    config.yaml exists, and a failure (disk full, ...) is a one-line :class:`engine.fileio.WriteError`
    that leaves config.yaml as it was."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    except OSError as e:
        raise fileio.WriteError(e.errno, f"cannot keep the previous {path}: [Errno {e.errno}] "
                                f"{os.strerror(e.errno) if e.errno else e}") from None
    if old is not None:
        n = 1 + max([int(p.name.split(".")[1]) for p in Path(run_dir).glob("config.*.yaml")
                     if p.name.split(".")[1].isdigit()], default=0)
        with fileio.atomic_open(Path(run_dir) / f"config.{n}.yaml", "wb") as f:
            f.write(old)
        log(f"config changed: the previous config.yaml is kept as config.{n}.yaml")
    fileio.atomic_write_text(path, text)


def check_writable(folder: Path) -> None:
    """Create and remove a temp file in ``folder``: a read-only file system or a missing permission is one
    :class:`engine.fileio.WriteError` line now, not a failure at the first checkpoint hours later."""
    probe = fileio.temp_path(folder / ".write-test")
    try:
        with open(probe, "w"):
            pass
    except OSError as e:
        raise fileio.write_error(folder, e) from None
    with contextlib.suppress(OSError):
        probe.unlink()


class RunDir:
    """The files of one run directory, as one trainer (all its ranks) sees them.

    Args:
        path: the run directory (``cfg.output_dir``).
        is_main: whether this process writes (rank 0); other ranks only read.
        log: where notes and warnings go (rank 0's log).
    """

    def __init__(self, path: str | Path, is_main: bool = True, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.is_main = is_main
        self.log = log
        self._lock: RunDirLock | None = None
        self._config_pending: str | None = None  # config.yaml text to write with the next checkpoint

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pth"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pth"

    # -- ownership --------------------------------------------------------------------------------------------
    def own(self) -> None:
        """Collective: rank 0 creates the directory, checks it can write there, takes its lock and removes the
        partial files an interrupted write left; every rank learns whether that worked (and fails with the
        same one-line message if not)."""
        error = None
        if self.is_main:
            try:
                self._create()
                check_writable(self.path)
                lock = RunDirLock(self.path, log=self.log)
                lock.acquire()
                self._lock = lock
                for folder in (self.path, self.checkpoints):
                    fileio.remove_temp_files(folder, log=self.log)
            except (ConfigError, OSError) as e:  # OSError: the lock's own failures (e.g. a read-only lock file)
                self.release()
                error = str(e)
        error = dist_lib.broadcast_object(error)
        if error is not None:
            raise ConfigError(error)  # one line, the same on every rank

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise ConfigError(f"config key 'output_dir': cannot create {self.path}: [Errno {e.errno}] {reason}"
                              ) from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def find_checkpoint(self, resume: str | None = None) -> tuple[dict, Path] | None:
        """The checkpoint to resume: ``resume``'s (``--resume``), else this directory's newest usable one
        (``last.pth``, else ``last.prev.pth``; rank 0 moves an unusable ``last.pth`` aside), else None."""
        if resume is not None:
            return ckpt_lib.load_checkpoint(resume), Path(resume)
        return ckpt_lib.find_resumable(self.checkpoints, log=self.log, quarantine=self.is_main)

    def is_own(self, checkpoint: str | Path) -> bool:
        """Whether ``checkpoint`` is one of this directory's checkpoints (not another run's ``--resume``)."""
        return Path(checkpoint).resolve().parent == self.checkpoints.resolve()

    def save_last(self, obj: Any) -> None:
        """Rank 0: write ``last.pth`` (the previous one kept as ``last.prev.pth``), then a config.yaml waiting
        for it (:meth:`sync_config`)."""
        if not self.is_main:
            return
        ckpt_lib.save_last(obj, self.checkpoints)
        if self._config_pending is not None:
            write_config(self.path, self._config_pending, log=self.log)
            self._config_pending = None

    def save_best(self, obj: Any) -> None:
        if self.is_main:
            fileio.atomic_save(obj, self.best)

    def adopt_best(self, source: Path, best_epoch: int) -> bool:
        """Rank 0, resuming another run's checkpoint ``source`` into this directory: copy that run's
        ``best.pth`` (beside ``source``) here when it holds epoch ``best_epoch``. Returns whether it did."""
        theirs = Path(source).parent / "best.pth"
        if not self.is_main or not theirs.is_file() or ckpt_lib.best_epoch_of(theirs) != best_epoch:
            return False
        with fileio.atomic_open(self.best, "wb") as f, open(theirs, "rb") as src:
            shutil.copyfileobj(src, f)
        return True

    # -- config.yaml ------------------------------------------------------------------------------------------
    def sync_config(self, text: str, now: dict, resumed: dict | None) -> None:
        """Rank 0: make config.yaml describe the weights beside it. A fresh run (or an unchanged config) writes
        ``text`` now; a resume whose checkpoint was trained with another config (``resumed``) writes it with
        this session's first checkpoint, i.e. once training really continued under it (a relaunch that fails
        first leaves the old one in place)."""
        if not self.is_main:
            return
        try:
            current = (self.path / CONFIG_NAME).read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current == text:
            return
        if resumed is None or not diff_configs(resumed, now):
            write_config(self.path, text, log=self.log)
        else:
            self._config_pending = text

    # -- metrics.jsonl ----------------------------------------------------------------------------------------
    def trim_metrics(self, epoch: int) -> None:
        """Rank 0, on resume at (0-based) ``epoch``: drop rows a crashed session wrote after the checkpoint it
        left (epochs > ``epoch``), and a torn last line (a crash or a full disk during the append)."""
        path = self.path / METRICS_NAME
        if not self.is_main or not path.exists():
            return
        try:
            rows, torn = fileio.read_jsonl(path, warn=self.log)
        except ValueError as e:
            raise DataError(f"{e}; move the file aside to continue") from None
        keep = [r for r in rows if r.get("epoch", 0) <= epoch]
        if torn or len(keep) != len(rows):
            fileio.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def append_metrics(self, row: dict) -> None:
        """Rank 0: append one epoch's row."""
        if self.is_main:
            fileio.append_line(self.path / METRICS_NAME, json.dumps(row))

    # -- summary.json -----------------------------------------------------------------------------------------
    def write_summary(self, summary: RunSummary) -> Path:
        path = self.path / SUMMARY_NAME
        if self.is_main:
            fileio.atomic_write_text(path, summary.to_json())
        return path

    def read_summary(self) -> dict | None:
        return read_summary(self.path)

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"
