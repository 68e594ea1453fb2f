"""Named builders for what a training run is made of (as in ConvNeXt's ``main.py``): data, model,
optimization, and the DDP / ``torch.compile`` wrapping. The :class:`~engine.trainer.Trainer` receives the built
objects and only holds state and runs the loops.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from engine import distributed as dist_lib
from engine.config import Config, ConfigError
from engine.data.datasets import ExactEvalBatchSampler, TrainBatchSampler, write_digits_imagefolder
from engine.data.pipeline import build_datasets, make_loader
from engine.schedule import WarmupCosineSchedule, scaled_lr


# ----------------------------------------------------------------------------------------------------- data

@dataclass
class DataBundle:
    """Loaders of one process (its shard of every global batch)."""
    train_loader: Any
    val_loader: Any
    train_sampler: TrainBatchSampler
    steps_per_epoch: int
    train_size: int
    val_size: int
    classes: list[str]  # class names in label order (the train set's folders)


def build_data(cfg: Config, info: dist_lib.DistInfo) -> DataBundle:
    """Prepare the data set if asked (rank 0 writes, the others wait), then this rank's train / val loaders:
    seeded, resumable train batches and exact evaluation batches (every val image once over all ranks)."""
    if cfg.data.prepare == "digits":
        if info.is_main:
            write_digits_imagefolder(cfg.data.root, seed=0)
        dist_lib.barrier()
    train_set, val_set = build_datasets(cfg, cfg.model.num_classes)
    sampler = TrainBatchSampler(len(train_set), cfg.train.batch_size, info.world_size, info.rank, seed=cfg.seed,
                                max_steps=cfg.train.max_steps_per_epoch)
    val_bs = cfg.data.val_batch_size or cfg.train.batch_size
    train_loader = make_loader(train_set, sampler, cfg.data.workers, info.device)
    val_loader = make_loader(val_set, ExactEvalBatchSampler(len(val_set), val_bs, info.world_size, info.rank),
                             cfg.data.workers, info.device)
    return DataBundle(train_loader, val_loader, sampler, sampler.steps, len(train_set), len(val_set),
                      list(train_set.classes))


# ---------------------------------------------------------------------------------------------------- model

def check_device(cfg: Config, device: torch.device, distributed: bool = False) -> None:
    """Refuse what ``cfg`` asks of a device this machine lacks (one-line ConfigError)."""
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'train.amp': fp16 (with GradScaler) needs a CUDA device; use bf16 or off on CPU")
    if cfg.train.sync_bn and distributed and device.type != "cuda":
        raise ConfigError("config key 'train.sync_bn': SyncBatchNorm needs CUDA devices; "
                          "set train.sync_bn=false on CPU")


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at construction)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def model_arguments(cfg: Config) -> dict:
    """``models.create_model``'s arguments for ``cfg`` (``name``, ``num_classes``, ``kwargs``; ``input_size``
    defaults to ``data.image_size``). Checkpoints store them, so a model can be rebuilt from its file alone
    (``models.load_checkpoint``)."""
    from models import registry

    kwargs = dict(cfg.model.kwargs)
    if "input_size" in registry.model_options(cfg.model.name):  # the models whose sizes derive from it (FCA)
        kwargs.setdefault("input_size", cfg.data.image_size)
    if cfg.model.freq is not None:
        kwargs["freq"] = cfg.model.freq
    return {"name": cfg.model.name, "num_classes": cfg.model.num_classes, "kwargs": kwargs}


def build_model(cfg: Config) -> nn.Module:
    """``models.create_model`` with the config's model section (its options already checked by the config
    layer); a value the model's constructor refuses (e.g. a k that does not divide the channels) is a
    one-line :class:`ConfigError`."""
    import models

    args = model_arguments(cfg)
    try:
        return models.create_model(args["name"], num_classes=args["num_classes"], **args["kwargs"])
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e).strip("'\"").splitlines()[0]
        raise ConfigError(f"config key 'model.kwargs': cannot build {cfg.model.name!r}: {msg}") from None


def new_model(cfg: Config) -> nn.Module:
    """The run's freshly initialised model on the CPU: seeded (:func:`seed_everything`), so every rank and
    every launch of ``cfg`` starts from the same weights."""
    seed_everything(cfg.seed)
    return build_model(cfg)


def init_from_checkpoint(model: nn.Module, path: str, log: Callable[[str], None] = print) -> Any:
    """Fine-tune initialisation: copy matching weights from ``path`` (ours, torchvision's, the authors', or a
    plain ResNet for an attention model; attention stays fresh, paper Sec. 4.2). The classifier is skipped
    when its shape differs (a different number of classes)."""
    import models

    try:
        state = models.read_state_dict(path)
        target = model.state_dict()
        ignore = ()
        if "fc.weight" in state and "fc.weight" in target and state["fc.weight"].shape != target["fc.weight"].shape:
            ignore = ("fc.",)
            log(f"init: classifier shape differs ({tuple(state['fc.weight'].shape)} vs "
                f"{tuple(target['fc.weight'].shape)}): fc is re-initialised")
        report = models.load_weights(model, state, ignore=ignore)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"config key 'model.init_checkpoint': {path}: {str(e).splitlines()[0]}") from None
    log(f"init: {path}: {report.summary()}")
    return report


def prepare_model(cfg: Config, info: dist_lib.DistInfo, model: nn.Module, init_checkpoint: bool,
                  log: Callable[[str], None] = print) -> nn.Module:
    """``model`` (from :func:`new_model`) made ready to train: optional fine-tune initialisation
    (``init_checkpoint``: only for a run that does not resume), SyncBN under DDP, on its device, channels_last."""
    if init_checkpoint and cfg.model.init_checkpoint:
        init_from_checkpoint(model, cfg.model.init_checkpoint, log)
    if cfg.train.sync_bn and info.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------- optimization

@dataclass
class Optimization:
    """Optimizer, fp16 loss scaler (a no-op for bf16/off), loss and the per-step lr function."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    schedule: WarmupCosineSchedule


def make_sgd(model: nn.Module, lr: float, device: torch.device, momentum: float = 0.9, weight_decay: float = 1e-4,
             nesterov: bool = False) -> torch.optim.SGD:
    """The trainer's SGD for ``model`` on ``device`` (the benchmarks time this same optimizer). Fused on CUDA:
    one kernel, and with the fp16 GradScaler no per-step host sync on found_inf (the for-each step makes the
    scaler read found_inf on the host every step)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, fused=torch.device(device).type == "cuda" or None)


def make_scaler(amp: str) -> torch.amp.GradScaler:
    """The loss scaler for ``train.amp`` (``fp16``, ``bf16`` or ``off``): fp16 needs loss scaling; bf16/off run
    the same code with the scaler disabled (a no-op)."""
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16")


def build_optimization(cfg: Config, model: nn.Module, info: dist_lib.DistInfo,
                       steps_per_epoch: int) -> Optimization:
    """SGD (momentum, weight decay) at the linearly scaled peak lr, warmup + cosine per step (the paper's
    recipe, Sec. 4.1), label-smoothed cross-entropy."""
    peak = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size * info.world_size)
    schedule = WarmupCosineSchedule.from_epochs(peak, steps_per_epoch, cfg.train.schedule_epochs or cfg.train.epochs,
                                                cfg.train.warmup_epochs)
    optimizer = make_sgd(model, schedule.lr(0), info.device, momentum=cfg.optim.momentum,
                         weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scaler = make_scaler(cfg.train.amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    return Optimization(optimizer, scaler, criterion, schedule)


# How an optimizer computes its step (not what it computes): chosen for this machine when it is built.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "differentiable", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping ``optimizer``'s own implementation flags
    (:data:`IMPLEMENTATION_FLAGS`). ``load_state_dict`` restores every param-group key, these included: a
    checkpoint written on the CPU would turn this machine's fused CUDA SGD into the for-each one (slower; with
    the fp16 GradScaler its first step fails, as only the fused step takes the scaler's arguments)."""
    keep = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep, strict=True):
        group.update(flags)


# ------------------------------------------------------------------------------------------------- wrapping

@dataclass
class Wrapped:
    """The modules the loops call: ``train_model`` (DDP and/or compiled) and ``eval_model`` (compiled, no DDP)."""
    train_model: nn.Module
    eval_model: nn.Module


def wrap_model(cfg: Config, model: nn.Module, info: dist_lib.DistInfo) -> Wrapped:
    """DDP (one device per process) and ``torch.compile``, as configured."""
    train_model: nn.Module = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        # No buffer sync at every forward (public DDP options; buffers are still synced once at construction):
        # DDP would otherwise copy rank 0's buffers to every rank before each forward, the fixed DCT filters
        # included (identical on every rank by construction). Rank 0's BN statistics are the same either way (a
        # broadcast never changes its source); the other ranks' copies are only used after
        # engine.distributed.broadcast_buffers before each evaluation, and only rank 0's are saved.
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
    eval_model: nn.Module = model
    if cfg.train.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model)
    return Wrapped(train_model, eval_model)
