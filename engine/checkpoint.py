"""Atomic, verifiable training checkpoints.

A checkpoint is written to a temp file in the same folder, fsync-ed, then renamed over the target, so
a crash during the save never leaves a half-written ``last.pth``. Before ``last.pth`` is replaced the
previous one becomes ``last.prev.pth``; a truncated or corrupt ``last.pth`` (detected on load) makes
auto-resume fall back to it.

Everything is stored as tensors / plain Python values so it loads with ``weights_only=True``
(no pickled code is ever executed on resume).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import Config, ConfigError
from engine.errors import CheckpointError
from engine.fileio import atomic_open

FORMAT = "fcanet-train-checkpoint-v1"    # last.pth / last.prev.pth: everything a resume needs
MODEL_FORMAT = "fcanet-model-v1"         # best.pth: the weights and what they are
REQUIRED = ("format", "model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step",
            "steps_per_epoch", "world_size", "state", "meter", "rng", "config")

# Config keys that define what the checkpoint's weights mean: a resume that changes one is refused.
STRUCTURAL_KEYS = ("model.name", "model.num_classes", "model.freq", "model.kwargs", "data.image_size", "data.crop")


@dataclass
class TrainState:
    """Everything about the run's progress that a checkpoint must restore (besides weights, optimizer, RNG)."""
    epoch: int = 0            # current epoch (0-based); == epochs when training is done
    step_in_epoch: int = 0    # optimizer steps done in the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    last_val: dict = field(default_factory=dict)
    elapsed_s: float = 0.0    # training wall time over all sessions (resumes add up)
    train_images: int = 0     # images trained on (all ranks), for throughput
    train_time_s: float = 0.0  # time spent in training steps (all sessions)
    epoch_time_s: float = 0.0  # time spent in the current epoch so far
    epoch_images: int = 0


class StructureChangedError(ConfigError):
    """Resuming would load weights into a model they were not trained as (same message on every rank)."""


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_structure(saved: dict, cfg: Config, path: str | Path) -> None:
    """Refuse resuming ``path`` (whose resolved config is ``saved``) under a config that changes what its weights
    mean (:data:`STRUCTURAL_KEYS`)."""
    now = cfg.to_dict()

    def get(d: dict, key: str) -> Any:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    def same(key: str) -> bool:
        a, b = get(saved, key), get(now, key)
        if key == "model.freq" and a != b:  # null, 'top16' and its explicit (u, v) list are one selection
            from models.dct import parse_frequencies
            try:
                return [tuple(f) for f in parse_frequencies(a)] == [tuple(f) for f in parse_frequencies(b)]
            except (ValueError, TypeError):
                return False
        return a == b

    changed = [k for k in STRUCTURAL_KEYS if not same(k)]
    if changed:
        what = ", ".join(f"{k}={_short(get(saved, k))} (now {_short(get(now, k))})" for k in changed)
        raise StructureChangedError(
            f"cannot resume {path}: its weights were trained with {what}; to train these settings start a new run "
            "(another output_dir), or set them back to continue this one")


def save_last(obj: Any, folder: str | Path, name: str = "last.pth") -> Path:
    """Save ``obj`` as ``folder/last.pth``, keeping the previous one as ``folder/last.prev.pth``.

    The new file is written completely (temp file, fsync) before the old ones are touched: a crash at any
    point leaves at least one complete checkpoint (``last.pth``, or ``last.prev.pth`` between the two renames).
    A failed write (e.g. a full disk) raises :class:`~engine.fileio.WriteError` and changes nothing."""
    folder = Path(folder)
    path, prev = folder / name, folder / name.replace(".pth", ".prev.pth")

    def rotate() -> None:
        if path.exists():
            os.replace(path, prev)

    with atomic_open(path, "wb", before_replace=rotate) as f:
        torch.save(obj, f)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a training checkpoint; raise :class:`CheckpointError` if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    from models.weights import load_failure_reason, torch_load_quiet

    try:
        ckpt = torch_load_quiet(path)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, wrong file type, foreign pickle
        raise CheckpointError(f"checkpoint {path} {load_failure_reason(path, e)}") from None
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
