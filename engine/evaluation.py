"""Exact evaluation: top-1/top-5/loss over every validation image once, for any world size."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
import torch.nn as nn

from engine import distributed as dist_lib
from engine.builders import build_model, check_device
from engine.config import Config, ConfigError
from engine.data.errors import DataError
from engine.errors import NonFiniteOutputError
from engine.data.datasets import ExactEvalBatchSampler
from engine.data.pipeline import build_datasets, make_loader
from engine.data.loader import DevicePrefetcher, shutdown_workers
from engine.meter import Meter
from engine.progress import Progress, log_line

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
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # images with a NaN/inf logit
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
            nonfinite += (~torch.isfinite(logits).all(dim=1)).sum()  # on the device: no host sync per batch
    finally:
        progress.close()
    model.train(was_training)
    r = meter.reduce()
    if r.count == 0:
        raise DataError(f"no validation image could be evaluated ({r.skipped} unreadable and skipped)")
    bad = int(dist_lib.all_reduce_sum(nonfinite).item())
    if bad:
        raise NonFiniteOutputError(f"the model's outputs are NaN/inf for {bad} of {r.count} validation images: its "
                                   "weights (or the precision, train.amp) cannot give an accuracy")
    return {"top1": r.top1, "top5": r.top5, "loss": r.loss, "count": r.count, "correct1": r.correct1,
            "correct5": r.correct5, "skipped": r.skipped}


def _read_checkpoint(path: str) -> Any:
    """The object saved in ``path`` (loaded safely: tensors and plain values only), or a one-line error."""
    from models.weights import load_failure_reason, torch_load_quiet

    if not Path(path).is_file():
        raise ConfigError(f"--checkpoint: checkpoint not found: {path}")
    try:
        return torch_load_quiet(path)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, wrong file type, foreign pickle
        raise ConfigError(f"--checkpoint: checkpoint {path} {load_failure_reason(path, e)}") from None


def follow_classes(dataset: Any, classes: list[str], where: str, log: Callable[[str], None] = log_line) -> None:
    """Label ``dataset`` (an ImageFolder) with the class indices a checkpoint was trained with (``classes``, in
    label order) instead of its own folder order: a val root lacking a class folder would otherwise shift every
    later label. A folder the checkpoint does not know is a one-line :class:`DataError`."""
    if list(dataset.classes) == list(classes):
        return
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise DataError(f"data.root: {where} has class folders the checkpoint was not trained on: "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''} (it knows {len(classes)} "
                        f"classes, e.g. {', '.join(classes[:2])})")
    index = {c: i for i, c in enumerate(classes)}
    remap = [index[c] for c in dataset.classes]
    dataset.samples = [(path, remap[t]) for path, t in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    dataset.class_to_idx = {c: index[c] for c in dataset.classes}
    missing = [c for c in classes if c not in dataset.classes]
    log(f"note: {where} lacks {len(missing)} of the checkpoint's {len(classes)} classes (e.g. {missing[0]}): its "
        "images are labelled with the checkpoint's class indices")


def evaluate_checkpoint(cfg: Config, checkpoint: str, allow_new: bool = False) -> dict:
    """Exact (distributed) evaluation of ``checkpoint`` (ours, the authors' ``.pth``, torchvision's) on
    ``cfg.data``'s val set. Our checkpoints carry their class names: the val images are labelled by them
    (:func:`follow_classes`). Non-finite weights or outputs are refused (:class:`NonFiniteOutputError`)."""
    import models

    info = dist_lib.init_distributed()
    try:
        check_device(cfg, info.device)
        model = build_model(cfg)
        saved = _read_checkpoint(checkpoint)
        try:
            report = models.load_weights(model, saved)
        except ValueError as e:
            raise ConfigError(f"--checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
        if report.new and not allow_new:
            raise ConfigError(f"--checkpoint {checkpoint}: lacks {len(report.new)} attention weight(s) of "
                              f"{cfg.model.name} (e.g. {report.new[0]}): evaluating fresh attention is meaningless; "
                              "check model.name")
        broken = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()),
                      None)
        if broken is not None:
            raise NonFiniteOutputError(f"--checkpoint {checkpoint}: weight {broken} holds NaN/inf values; refusing to "
                                       "evaluate it")
        model.to(info.device)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        _, val_set = build_datasets(cfg, cfg.model.num_classes, need_train=False)
        classes = saved.get("classes") if isinstance(saved, dict) else None
        if isinstance(classes, list) and cfg.data.source == "imagefolder":
            follow_classes(val_set, classes, f"{cfg.data.root}/val", log=log_line if info.is_main else lambda m: None)
        bs = cfg.data.val_batch_size or cfg.train.batch_size
        loader = make_loader(val_set, ExactEvalBatchSampler(len(val_set), bs, info.world_size, info.rank),
                             cfg.data.workers, info.device)
        t0 = time.time()
        try:
            out = evaluate(model, loader, info.device, cfg.train.amp, cfg.train.channels_last,
                           desc="eval" if (info.is_main and cfg.train.progress) else None)
        except NonFiniteOutputError as e:
            raise NonFiniteOutputError(f"--checkpoint {checkpoint}: {e}") from None
        finally:
            shutdown_workers(loader)
        out.update({"checkpoint": str(checkpoint), "model": cfg.model.name, "world_size": info.world_size,
                    "time_s": time.time() - t0, "is_main": info.is_main})
        return out
    finally:
        dist_lib.cleanup()
