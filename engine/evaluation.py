"""Exact evaluation: top-1/top-5/loss over every validation image once, for any world size."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from engine import distributed as dist_lib
from engine.builders import build_model
from engine.config import Config, ConfigError
from engine.data.errors import DataError
from engine.data.datasets import ExactEvalBatchSampler
from engine.data.pipeline import build_datasets, make_loader
from engine.data.loader import DevicePrefetcher, shutdown_workers
from engine.meter import Meter
from engine.progress import Progress

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "off", channels_last: bool = False,
             desc: str | None = None) -> dict:
    """Exact top-1/top-5/loss over the loader's samples, summed over all ranks.

    With :class:`ExactEvalBatchSampler` every image is counted exactly once for any world size. The
    loss is plain cross-entropy (no label smoothing), averaged over images. ``desc``: label of a progress bar
    (drawn only on a terminal), None for none.
    """
    was_training = model.training
    model.eval()
    meter = Meter(device)
    crit = nn.CrossEntropyLoss(reduction="mean")
    progress = Progress(total=len(loader), desc=desc or "", enabled=desc is not None)
    try:
        for x, y, skipped in DevicePrefetcher(loader, device, channels_last):  # x: (N, 3, H, W), y: (N,)
            progress.update()
            if x is None:  # a batch of only unreadable images (data.skip_corrupt)
                meter.add_skipped(skipped)
                continue
            # A compiled model compiles one graph for every batch size (the last partial batch included)
            torch._dynamo.maybe_mark_dynamic(x, 0)
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
                logits = model(x)
            loss = crit(logits.float(), y)
            meter.add(loss, logits.float(), y, skipped)
    finally:
        progress.close()
    model.train(was_training)
    r = meter.reduce()
    if r.count == 0:
        raise DataError(f"no validation image could be evaluated ({r.skipped} unreadable and skipped)")
    return {"top1": r.top1, "top5": r.top5, "loss": r.loss, "count": r.count, "correct1": r.correct1,
            "correct5": r.correct5, "skipped": r.skipped}


def evaluate_checkpoint(cfg: Config, checkpoint: str, allow_new: bool = False) -> dict:
    """Exact (distributed) evaluation of ``checkpoint`` (ours, the authors' ``.pth``, torchvision's) on
    ``cfg.data``'s val set."""
    import models

    info = dist_lib.init_distributed()
    try:
        if cfg.train.amp == "fp16" and info.device.type != "cuda":
            raise ConfigError("config key 'train.amp': fp16 needs a CUDA device; use bf16 or off on CPU")
        model = build_model(cfg)
        try:
            report = models.load_weights(model, checkpoint)
        except (ValueError, FileNotFoundError, OSError) as e:
            msg = str(e).splitlines()[0]
            # read_state_dict's messages start with "checkpoint <path>" already
            raise ConfigError(f"--checkpoint: {msg}" if str(checkpoint) in msg else
                              f"--checkpoint {checkpoint}: {msg}") from None
        if report.new and not allow_new:
            raise ConfigError(f"--checkpoint {checkpoint}: lacks {len(report.new)} attention weight(s) of "
                              f"{cfg.model.name} (e.g. {report.new[0]}): evaluating fresh attention is meaningless; "
                              "check model.name")
        model.to(info.device)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        _, val_set = build_datasets(cfg, cfg.model.num_classes, need_train=False)
        bs = cfg.data.val_batch_size or cfg.train.batch_size
        loader = make_loader(val_set, ExactEvalBatchSampler(len(val_set), bs, info.world_size, info.rank),
                             cfg.data.workers, info.device)
        t0 = time.time()
        try:
            out = evaluate(model, loader, info.device, cfg.train.amp, cfg.train.channels_last,
                           desc="eval" if (info.is_main and cfg.train.progress) else None)
        finally:
            shutdown_workers(loader)
        out.update({"checkpoint": str(checkpoint), "model": cfg.model.name, "world_size": info.world_size,
                    "time_s": time.time() - t0, "is_main": info.is_main})
        return out
    finally:
        dist_lib.cleanup()
