"""The run directory's own checks: a relaunch on a read-only file system (or a run directory that cannot be
created) is one line before anything runs; Ctrl-C's handler (checkpoint first, a second one stops at once)."""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import signal
from pathlib import Path

import pytest

from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from engine.config import load_config
from engine.entrypoints import train_main
from engine.preemption import Preemption
from engine.trainer import fit

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@contextlib.contextmanager
def read_only(monkeypatch, root: Path):
    """Every write under ``root`` fails with EROFS, as on a file system mounted read-only (reads still work)."""
    root = str(root)

    def refuse(path) -> None:
        if os.path.abspath(os.fspath(path)).startswith(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def wrap(fn, writes=lambda *a, **k: True):
        def guarded(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and writes(*args, **kwargs):
                refuse(path)
            return fn(path, *args, **kwargs)
        return guarded

    def open_writes(mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    def os_open_writes(flags, *a, **k):
        return bool(flags & WRITE_FLAGS)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", wrap(builtins.open, open_writes))
        m.setattr(io, "open", wrap(io.open, open_writes))
        m.setattr(os, "open", wrap(os.open, os_open_writes))
        for name in ("mkdir", "unlink", "remove", "rmdir"):
            m.setattr(os, name, wrap(getattr(os, name)))
        for name in ("replace", "rename"):
            real = getattr(os, name)
            m.setattr(os, name, lambda src, dst, *a, _real=real, **k: (refuse(src), refuse(dst), _real(src, dst))[2])
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("rundir")
    data = write_tiny_imagefolder(tmp / "data")
    fit(load_config(BASE_CONFIG, tiny_overrides(data, tmp / "run", **{"train.epochs": 1})))
    return data, tmp / "run"


def test_relaunch_on_a_read_only_file_system_is_one_line(finished, tmp_path, monkeypatch, capsys):
    data, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    args = ["--config", str(BASE_CONFIG)] + tiny_overrides(data, out, **{"train.epochs": 2})
    with read_only(monkeypatch, out):
        assert train_main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: cannot write {out}: [Errno 30] Read-only file system"]
    assert "Traceback" not in captured.out and "start training" not in captured.out


def test_a_run_directory_that_cannot_be_created_is_one_line(finished, tmp_path, monkeypatch, capsys):
    data, _ = finished
    out = tmp_path / "ro" / "run"
    args = ["--config", str(BASE_CONFIG)] + tiny_overrides(data, out)
    with read_only(monkeypatch, tmp_path / "ro"):
        assert train_main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: config key 'output_dir': cannot create {out}: [Errno 30] Read-only file system"]


def test_ctrl_c_asks_to_stop_once_and_a_second_one_stops_at_once():
    with Preemption() as p:
        with pytest.raises(KeyboardInterrupt):  # before training: nothing to save, stop now
            os.kill(os.getpid(), signal.SIGINT)
        p.training = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested and p.name == "SIGTERM" and not p.interrupted
        os.kill(os.getpid(), signal.SIGINT)
        assert p.requested and p.interrupted and p.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.interrupted  # Ctrl-C decides how the run ends
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
