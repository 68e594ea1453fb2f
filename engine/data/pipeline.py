"""The one input-pipeline factory: the only place that knows the ``fast``, ``torchvision`` and ``gpu``
pipelines (``data.pipeline``) and turns ``cfg.data`` into data sets and loaders."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from engine.data import gpu_decode
from engine.data import loader as loader_lib
from engine.data.datasets import RobustImageFolder, SyntheticDataset, collate
from engine.data.errors import DataError
from engine.data.transforms import (CROP_RECIPES, IMAGENET_MEAN, IMAGENET_STD, PIPELINES, FastTrainTransform,
                                    FastValTransform, encoded_loader, pil_loader)


# ------------------------------------------------------------------------------------------------- builders
def _check(image_size: int, pipeline: str, crop: Optional[str] = None, resize: Optional[int] = None) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown data pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    if crop is not None and crop not in CROP_RECIPES:
        raise ValueError(f"unknown crop recipe {crop!r}; expected one of {', '.join(CROP_RECIPES)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if resize is not None and (not isinstance(resize, int) or resize < image_size):
        raise ValueError(f"resize must be an int >= image_size={image_size}, got {resize!r}")


def build_train_transform(image_size: int, crop: str = "fcanet", pipeline: str = "fast"
                          ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for training: random-resized crop to ``image_size`` + horizontal flip.

    The ``fast`` transform returns uint8 (3, S, S); the ``torchvision`` one a normalized float tensor; the
    ``gpu`` one a not-yet-decoded sample (:mod:`engine.data.gpu_decode`) that :func:`to_model_input` finishes.
    """
    _check(image_size, pipeline, crop)
    recipe = CROP_RECIPES[crop]
    if pipeline == "fast":
        return encoded_loader, FastTrainTransform(image_size, **recipe)
    if pipeline == "gpu":
        return gpu_decode.gpu_loader, gpu_decode.GpuTransform(FastTrainTransform(image_size, **recipe))
    return pil_loader, T.Compose([
        T.RandomResizedCrop(image_size, **recipe), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_val_transform(image_size: int, resize: int, pipeline: str = "fast"
                        ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for evaluation: resize the shorter side to ``resize``, center-crop."""
    _check(image_size, pipeline, resize=resize)
    if pipeline == "fast":
        return encoded_loader, FastValTransform(image_size, resize)
    if pipeline == "gpu":
        return gpu_decode.gpu_loader, gpu_decode.GpuTransform(FastValTransform(image_size, resize))
    return pil_loader, T.Compose([
        T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _imagefolder(root: Path, split: str, transform: Callable, loader: Callable, skip: bool) -> RobustImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root: {root} has no {split}/ folder (expected an ImageFolder tree "
                        f"{root}/{{train,val}}/<class>/<image>)")
    try:
        return RobustImageFolder(str(folder), transform=transform, loader=loader, skip_corrupt=skip)
    except (FileNotFoundError, OSError) as e:  # e.g. no class folders / no images
        raise DataError(f"data.root: cannot use {folder}: {str(e).splitlines()[0]}") from None


def build_datasets(cfg, num_classes: int, need_train: bool = True) -> tuple[Dataset | None, Dataset]:
    """Return ``(train set or None, val set)`` for ``cfg.data``."""
    d = cfg.data
    if d.source == "synthetic":
        train = (SyntheticDataset(d.synthetic_train_size, d.image_size, num_classes, seed=cfg.seed)
                 if need_train else None)
        return train, SyntheticDataset(d.synthetic_val_size, d.image_size, num_classes, seed=cfg.seed + 1)
    root = Path(d.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist or is not a directory")
    if d.pipeline == "gpu":
        gpu_decode.check_available()  # one-line ConfigError on a machine without CUDA / nvjpeg
    train = None
    if need_train:
        loader, tf = build_train_transform(d.image_size, crop=d.crop, pipeline=d.pipeline)
        train = _imagefolder(root, "train", tf, loader, d.skip_corrupt)
    loader, tf = build_val_transform(d.image_size, d.val_resize, pipeline=d.pipeline)
    val = _imagefolder(root, "val", tf, loader, d.skip_corrupt)
    for ds in (train, val):
        if ds is not None and len(ds.classes) > num_classes:
            raise DataError(f"model.num_classes={num_classes} but {ds.root} has {len(ds.classes)} class folders")
    if train is not None and train.class_to_idx != val.class_to_idx:
        raise DataError(f"data.root: {root}/train and {root}/val have different class folders")
    if train is None and (root / "train").is_dir():
        # Evaluation only: a class folder missing from val/ (an interrupted preparation) would shift every
        # later label and silently give a wrong accuracy. train/ defines the label order; check against it.
        train_classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
        if train_classes != val.classes:
            missing = sorted(set(train_classes) - set(val.classes))[:3]
            raise DataError(f"data.root: {root}/val has {len(val.classes)} class folders, {root}/train "
                            f"{len(train_classes)}" + (f" (val lacks e.g. {', '.join(missing)})" if missing else ""))
    return train, val


def make_loader(dataset: Dataset, batch_sampler: Sampler, workers: int | None, device: torch.device) -> DataLoader:
    """The trainer's DataLoader: :func:`engine.data.loader.build_dataloader` with its batch samplers and :func:`collate`
    (``workers=None``: one per CPU of this process's share of the node, see ``default_workers``)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return loader_lib.build_dataloader(dataset, batch_sampler=batch_sampler, workers=workers, device=device,
                                  collate_fn=collate, local_world_size=local_world)
