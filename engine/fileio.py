"""The engine's one way to write files: atomic replace, fsync-ed appends, one-line write errors.

* :func:`atomic_open` / :func:`atomic_write_text` / :func:`atomic_save`: write a hidden temp file beside the
  target (``.<name>.tmp<pid>``), flush and ``fsync`` it, ``os.replace`` it over the target, then ``fsync`` the
  folder. A crash at any point leaves either the old file or the new one, never half of one.
* :func:`append_line`: append one line and ``fsync`` it (``metrics.jsonl``); a crash can at worst leave a
  torn *last* line, which :func:`read_jsonl` drops with a warning.
* A failed write (disk full, quota, read-only file system) raises :class:`WriteError`, whose message is one
  line naming the path and the errno, e.g. ``cannot write runs/x/checkpoints/last.pth: [Errno 28] No space
  left on device``; the temp file is removed and the target is untouched.
* :func:`remove_temp_files`: temp files left by a process killed during a write (removed by the next run
  that owns the folder).
"""
from __future__ import annotations

import contextlib
import errno as errno_lib
import json
import os
import re
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

TEMP_RE = re.compile(r"^\..+\.tmp\d*$")  # .<name>.tmp<pid> (written by atomic_open)


class WriteError(OSError):
    """A file could not be written (one-line message naming the path and the errno)."""

    def __str__(self) -> str:  # the message alone: it names the errno already ("[Errno 28] ..." only once)
        return self.strerror or super().__str__()


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one in its cause/context chain (``torch.save`` reports a failed
    write as ``RuntimeError: [enforce fail at inline_container.cc] ...`` raised while handling the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: str | Path, exc: BaseException) -> WriteError | None:
    """A :class:`WriteError` for a failed write of ``path``, or None when ``exc`` is not an I/O failure."""
    os_err = _os_error_in(exc)
    if os_err is None:
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):  # torch.save lost its OSError
            return WriteError(errno_lib.EIO, f"cannot write {path}: the write failed ({str(exc).splitlines()[0]})")
        return None
    reason = os.strerror(os_err.errno) if os_err.errno else str(os_err)
    return WriteError(os_err.errno, f"cannot write {path}: [Errno {os_err.errno}] {reason}")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system supports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb",
                before_replace: Callable[[], None] | None = None) -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path`` (the old file survives
    any crash), on failure remove it. Write failures become :class:`WriteError`. ``before_replace`` runs once
    the new content is safely on disk, just before the rename (e.g. keep the old file as a backup)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        err = write_error(path, e) if isinstance(e, Exception) else None
        if err is not None:
            raise err from None
        raise
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_open`)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (no newline in it) plus a newline to ``path`` and fsync it. If the file does not end in
    a newline (an earlier append cut short), one is written first: the new row must not be glued to that
    one, which would turn both into a single unreadable (torn) line."""
    path = Path(path)
    try:
        with open(path, "a+b") as f:  # appends always go to the end; "+" lets us read the last byte
            end = f.seek(0, os.SEEK_END)
            cut_short = False
            if end > 0:
                f.seek(end - 1)
                cut_short = f.read(1) != b"\n"
            f.write((("\n" if cut_short else "") + line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None


def read_jsonl(path: str | Path, warn: Callable[[str], None] = print) -> tuple[list[dict], bool]:
    """Rows of a JSON-lines file, and whether a torn last line (a crash or a full disk during the append) was
    dropped (with a warning). A bad line anywhere else is an error naming the file and line number."""
    path = Path(path)
    lines = path.read_text(errors="replace").split("\n")
    rows, torn = [], False
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if i == last:
                warn(f"warning: {path}: dropping a torn last line ({ln[:40]!r}...), left by an interrupted write")
                torn = True
                continue
            raise ValueError(f"{path}, line {i + 1}: not a JSON object: {ln[:60]!r}") from None
        rows.append(row)
    return rows, torn


def remove_temp_files(folder: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Delete the temp files (``.<name>.tmp<pid>``) a process killed during a write left in ``folder``.
    Only call this while owning the folder (the run-dir lock): a live writer's temp file looks the same."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if TEMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    if removed:
        log(f"removed {len(removed)} partial file(s) left by an interrupted write in {folder}: "
            f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return removed
