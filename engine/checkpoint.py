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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engine.config import Config, ConfigError
from engine.errors import CheckpointError
from engine.fileio import atomic_open, write_error

FORMAT = "fcanet-train-checkpoint-v1"    # last.pth / last.prev.pth: everything a resume needs
MODEL_FORMAT = "fcanet-model-v1"         # best.pth: the weights and what they are
REQUIRED = ("format", "model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step",
            "steps_per_epoch", "world_size", "state", "meter", "rng", "config", "arch", "classes")

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
    # The first step of every session (worker start-up, compilation, cuDNN autotuning): timed apart and kept out
    # of the throughput figures (img_per_s, train_img_per_s), reported as warmup_s. Included in the times above.
    warmup_s: float = 0.0
    warmup_images: int = 0
    epoch_warmup_s: float = 0.0
    epoch_warmup_images: int = 0


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


def check_classifier_checkpoint(ckpt: dict, path: str | Path) -> None:
    """The classification trainer's checkpoint: every entry present (``REQUIRED``) and well formed."""
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    check_layout(ckpt, path)


def load_checkpoint(path: str | Path,
                    validate: Callable[[dict, Path], None] = check_classifier_checkpoint) -> dict:
    """Load a training checkpoint and check it with ``validate`` (default: the classification trainer's
    layout, :func:`check_layout`) before anything uses it; raise :class:`CheckpointError` (one line naming the
    file) if it is unusable."""
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
    validate(ckpt, path)
    return ckpt


# ----------------------------------------------------------------------------------------------------
# Validation: every part of a checkpoint is checked before any of it is used (a resume either starts from a
# consistent state or stops with one line; it never fails half-way, after training started).

class _Malformed(ValueError):
    """One problem of a checkpoint's layout (its message completes "checkpoint X is malformed: ...")."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _int(value: Any, what: str, minimum: int = 0) -> int:
    _expect(isinstance(value, int) and not isinstance(value, bool), f"{what} is {_short(value)}, not an integer")
    _expect(value >= minimum, f"{what} is {value}, must be >= {minimum}")
    return value


def _tensor(value: Any, what: str, shape: tuple | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    _expect(isinstance(value, torch.Tensor), f"{what} is not a tensor")
    _expect(shape is None or tuple(value.shape) == shape, f"{what} has shape {tuple(value.shape)}, not {shape}")
    _expect(dtype is None or value.dtype == dtype, f"{what} is {value.dtype}, not {dtype}")
    return value


def _check_state(state: Any, ckpt: dict) -> None:
    _expect(isinstance(state, dict), "state is not a mapping")
    names = [f.name for f in fields(TrainState)]
    unknown = [k for k in state if k not in names]
    _expect(not unknown, f"state has an unknown entry {_short(unknown[0]) if unknown else ''}")
    missing = [k for k in names if k not in state]
    _expect(not missing, f"state lacks {', '.join(missing)}")
    for f in fields(TrainState):
        value = state[f.name]
        if f.type in ("int", int):
            _int(value, f"state.{f.name}")
        elif f.type in ("float", float):
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value),
                    f"state.{f.name} is {_short(value)}, not a finite number")
        else:
            _expect(isinstance(value, dict), f"state.{f.name} is not a mapping")
    for key in ("epoch", "step_in_epoch", "global_step"):
        _expect(state[key] == ckpt[key], f"state.{key}={state[key]} disagrees with {key}={ckpt[key]}")


def _check_optimizer(opt: Any) -> None:
    _expect(isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list),
            "optimizer is not an optimizer state (state, param_groups)")
    for i, group in enumerate(opt["param_groups"]):
        _expect(isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(isinstance(p, int) for p in group["params"]), f"optimizer param group {i} has no param list")
    for idx, entry in opt["state"].items():
        _expect(isinstance(entry, dict), f"optimizer state of parameter {idx} is not a mapping")


def _check_rng(state: Any, rank: int) -> None:
    """Restore each generator's state into a scratch generator: whatever the real restore would reject fails
    here, before anything was changed."""
    what = f"rng of rank {rank}"
    names = {"python", "numpy", "torch"}
    _expect(isinstance(state, dict) and names <= set(state) <= names | {"cuda"},
            f"{what} is not a state of the python, numpy and torch generators")
    try:
        version, internal, gauss_next = state["python"]
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (TypeError, ValueError) as e:
        raise _Malformed(f"{what}: bad python state ({e})") from None
    try:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state((name, _tensor(keys, "keys").numpy().astype(np.uint32), pos, has_gauss,
                                           cached))
    except (TypeError, ValueError) as e:
        raise _Malformed(f"{what}: bad numpy state ({e})") from None
    try:
        torch.Generator().set_state(_tensor(state["torch"], "torch", dtype=torch.uint8))
    except (TypeError, ValueError, RuntimeError) as e:
        raise _Malformed(f"{what}: bad torch state ({str(e).splitlines()[0]})") from None
    if "cuda" in state:
        _tensor(state["cuda"], f"{what}: cuda state", dtype=torch.uint8)


def _check_meter(meter: Any, i: int) -> None:
    _expect(isinstance(meter, dict) and set(meter) == {"sums", "first_bad"}, f"meter of rank {i} is not a meter state")
    _tensor(meter["sums"], f"meter of rank {i}: sums", shape=(5,), dtype=torch.float64)
    _tensor(meter["first_bad"], f"meter of rank {i}: first_bad", shape=(), dtype=torch.int64)


def check_layout(ckpt: dict, path: str | Path) -> None:
    """Check every entry of a training checkpoint (types, shapes of the per-rank states, counters >= 0, a
    consistent state) without a model; raise :class:`CheckpointError` naming the first problem."""
    try:
        unknown = [k for k in ckpt if k not in REQUIRED]
        _expect(not unknown, f"unknown entry {_short(unknown[0]) if unknown else ''}")
        for key in ("epoch", "step_in_epoch", "global_step"):
            _int(ckpt[key], key)
        for key in ("steps_per_epoch", "world_size"):
            _int(ckpt[key], key, minimum=1)
        _expect(ckpt["step_in_epoch"] <= ckpt["steps_per_epoch"],
                f"step_in_epoch={ckpt['step_in_epoch']} exceeds steps_per_epoch={ckpt['steps_per_epoch']}")
        _expect(isinstance(ckpt["model"], dict) and ckpt["model"]
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()),
                "model is not a state dict of tensors")
        _check_optimizer(ckpt["optimizer"])
        for key in ("scaler", "config"):
            _expect(isinstance(ckpt[key], dict), f"{key} is not a mapping")
        _check_state(ckpt["state"], ckpt)
        world = ckpt["world_size"]
        for key, check in (("meter", _check_meter), ("rng", _check_rng)):
            _expect(isinstance(ckpt[key], list) and len(ckpt[key]) == world,
                    f"{key} is not a list of one state per rank ({world})")
            for i, entry in enumerate(ckpt[key]):
                check(entry, i)
        arch = ckpt["arch"]
        _expect(isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs"), dict)
                and isinstance(arch.get("num_classes"), int), "arch is not a model description (name, num_classes, "
                "kwargs)")
        classes = ckpt["classes"]
        _expect(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)),
                "classes is not a list of class names")
    except _Malformed as e:
        raise CheckpointError(f"checkpoint {path} is malformed: {e}") from None


def _fixed_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's buffers that its construction fixes (e.g. FCA's DCT filters), i.e. every persistent buffer
    but the normalisation layers' running statistics."""
    running = {f"{name}.{b}" if name else b for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._NormBase) for b, _ in m.named_buffers(recurse=False)}
    persistent = model.state_dict()
    return {k: v for k, v in model.named_buffers() if k not in running and k in persistent}


def check_fits(ckpt: dict, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               steps_per_epoch: int) -> None:
    """Check a training checkpoint (its layout already checked) against this launch's freshly built ``model``
    and ``optimizer`` before loading any of it: the same weight names and shapes, finite weights, the fixed
    buffers the config builds (a resume must not swap the model's DCT filters), an optimizer state of the
    same parameters, and the same number of steps per epoch. Raises :class:`CheckpointError`."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"cannot resume {path}: {what}")

    if ckpt["steps_per_epoch"] != steps_per_epoch:
        raise refuse(f"it was written with {ckpt['steps_per_epoch']} steps/epoch (world size {ckpt['world_size']}); "
                     f"this launch has {steps_per_epoch}: resume with the same world size x train.batch_size and "
                     "data")
    saved, target = ckpt["model"], model.state_dict()
    missing = [k for k in target if k not in saved]
    unexpected = [k for k in saved if k not in target]
    if missing or unexpected:
        which = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which the model lacks"
        raise refuse(f"its weights do not fit {ckpt['arch']['name']}: it {which} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected)")
    for k, v in target.items():
        if tuple(saved[k].shape) != tuple(v.shape):
            raise refuse(f"weight {k} has shape {tuple(saved[k].shape)}, the model's {tuple(v.shape)}")
        if saved[k].is_floating_point() != v.is_floating_point():
            raise refuse(f"weight {k} is {saved[k].dtype}, the model's {v.dtype}")
        if saved[k].is_floating_point() and not torch.isfinite(saved[k]).all():
            raise refuse(f"weight {k} holds NaN/inf")
    for k, v in _fixed_buffers(model).items():
        theirs, ours = saved[k].detach().cpu(), v.detach().cpu()
        same = (torch.allclose(theirs.float(), ours.float(), rtol=1e-5, atol=1e-6) if ours.is_floating_point()
                else torch.equal(theirs, ours))
        if not same:
            raise refuse(f"its buffer {k} differs from the one this config builds (fixed at construction, e.g. FCA's "
                         "DCT filters): its weights were trained with other filters; start a new run (another "
                         "output_dir) or resume with the config and code it was trained with")
    groups, saved_groups = optimizer.param_groups, ckpt["optimizer"]["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if [len(g["params"]) for g in saved_groups] != sizes:
        raise refuse(f"its optimizer state covers parameter groups of {[len(g['params']) for g in saved_groups]} "
                     f"parameters, this model's optimizer {sizes}")
    shapes = [tuple(p.shape) for g in groups for p in g["params"]]
    index = {i: n for n, i in enumerate(p for g in saved_groups for p in g["params"])}
    for idx, entry in ckpt["optimizer"]["state"].items():
        if idx not in index:
            raise refuse(f"its optimizer state names parameter {_short(idx)}, which no parameter group holds")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[index[idx]]:
                raise refuse(f"its optimizer's {name} of parameter {index[idx]} has shape {tuple(value.shape)}, the "
                             f"parameter {shapes[index[idx]]}")


def check_classes(saved: list[str] | None, now: list[str], path: str | Path) -> None:
    """Refuse resuming a checkpoint whose labels mean other classes: ``saved`` (the checkpoint's class names, in
    label order) must be this launch's ``now``."""
    if saved is None or saved == now:
        return
    gone, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
    detail = (f"data.root lacks {', '.join(gone[:3])}" if gone else f"data.root adds {', '.join(new[:3])}" if new
              else "the same names in another order")
    raise CheckpointError(f"cannot resume {path}: it was trained on {len(saved)} classes, data.root has {len(now)} "
                          f"({detail}): its labels would mean other classes; use the data it was trained on")


def best_epoch_of(path: str | Path) -> int | None:
    """The epoch a ``best.pth`` holds, or None if the file is not one of ours."""
    from models.weights import torch_load_quiet

    try:
        obj = torch_load_quiet(path)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not that epoch's best.pth
        return None
    epoch = obj.get("epoch") if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT else None
    return epoch if isinstance(epoch, int) else None


def merge_meters(meters: list[dict]) -> dict:
    """One meter state holding the running sums of every rank's (first non-finite step: the earliest)."""
    return {"sums": torch.stack([m["sums"] for m in meters]).sum(0),
            "first_bad": torch.stack([m["first_bad"] for m in meters]).min()}


def find_resumable(folder: str | Path, log=print, quarantine: bool = True,
                   validate: Callable[[dict, Path], None] = check_classifier_checkpoint) -> tuple[dict, Path] | None:
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
            found = load_checkpoint(path, validate), path
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors and quarantine and (folder / "last.pth").exists():
            # Move the unusable last.pth aside (kept for inspection): otherwise the next save would rotate
            # it onto the good last.prev.pth we are resuming from.
            try:
                os.replace(folder / "last.pth", folder / "last.corrupt.pth")
            except OSError as e:
                raise write_error(folder / "last.corrupt.pth", e) from None
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
