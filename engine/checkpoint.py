"""Atomic, verifiable training checkpoints.

A checkpoint is written to a temp file in the same folder, fsync-ed, then renamed over the target, so
a crash during the save never leaves a half-written ``last.pth``. Before ``last.pth`` is replaced the
previous one becomes ``last.prev.pth``; a truncated or corrupt ``last.pth`` (detected on load) makes
auto-resume fall back to it.

Everything is stored as tensors / plain Python values so it loads with ``weights_only=True``
(no pickled code is ever executed on resume).
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "fcanet-train-checkpoint-v1"
REQUIRED = ("format", "model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "global_step",
            "steps_per_epoch", "world_size", "state", "rng", "config")


class CheckpointError(RuntimeError):
    """A missing, truncated or otherwise unusable checkpoint (one-line message naming the file)."""


def _fsync_dir(folder: Path) -> None:
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


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Open a temp file beside ``path``; on success fsync and rename it over ``path`` (the old file
    survives any crash), on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def save_last(obj: Any, folder: str | Path, name: str = "last.pth") -> Path:
    """Save ``obj`` as ``folder/last.pth``, keeping the previous one as ``folder/last.prev.pth``."""
    folder = Path(folder)
    path, prev = folder / name, folder / name.replace(".pth", ".prev.pth")
    # Write the new file completely before touching the old ones: a crash at any point leaves at least
    # one complete checkpoint (last.pth, or last.prev.pth between the two renames).
    tmp = folder / f".{name}.new{os.getpid()}"
    atomic_save(obj, tmp)
    if path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(folder)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a training checkpoint; raise :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, wrong file type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint of this project "
                              f"(use model.init_checkpoint to start from foreign weights)")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return ckpt


def find_resumable(folder: str | Path, log=print, quarantine: bool = True) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint in ``folder`` (``last.pth``, else ``last.prev.pth``), or None.

    ``quarantine``: move an unusable ``last.pth`` aside (only one process of a DDP job may do it; the others
    then simply find it gone, with the same result)."""
    folder = Path(folder)
    errors = []
    for name in ("last.pth", "last.prev.pth"):
        path = folder / name
        if not path.exists():
            continue
        try:
            found = load_checkpoint(path), path
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors and quarantine and (folder / "last.pth").exists():
            # Move the unusable last.pth aside (kept for inspection): otherwise the next save would rotate
            # it onto the good last.prev.pth we are resuming from.
            os.replace(folder / "last.pth", folder / "last.corrupt.pth")
            log(f"warning: moved the unusable checkpoint to {folder / 'last.corrupt.pth'}")
        return found
    if errors:
        raise CheckpointError(f"no usable checkpoint in {folder}: {'; '.join(errors)}")
    return None


# ----------------------------------------------------------------------------------------------------
# RNG states (stored as tensors / ints so that weights_only loading works)

def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
