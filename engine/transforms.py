"""Image loading and augmentation for ImageNet-style ImageFolder data.

Two pipelines behind one interface (``data.pipeline`` in the config):

* ``torchvision``: the reference recipe: PIL decode, float transforms, ``Normalize`` on the CPU.
* ``fast``: decode to uint8 (``torchvision.io.decode_jpeg``), augment on uint8, ship uint8 to the device
  and convert/normalize there (:func:`to_model_input`).

Both produce the same augmentation distribution for a given ``crop`` recipe:
``fcanet`` (the authors' code: area scale in [0.1, 1], aspect ratio in [0.8, 1.25]) or ``torchvision``
(area scale in [0.08, 1], aspect ratio in [3/4, 4/3]).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RECIPES = {
    "fcanet": {"scale": (0.1, 1.0), "ratio": (0.8, 1.25)},
    "torchvision": {"scale": (0.08, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)},
}
PIPELINES = ("fast", "torchvision")


def pil_loader(path: str) -> Image.Image:
    """Decode an image file to an RGB PIL image (the reference path)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def uint8_loader(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W) (JPEG via libjpeg-turbo, PNG, ...)."""
    data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB)


def _check(pipeline: str, crop: str | None = None) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown data pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    if crop is not None and crop not in CROP_RECIPES:
        raise ValueError(f"unknown crop recipe {crop!r}; expected one of {', '.join(CROP_RECIPES)}")


def build_train_transform(image_size: int, crop: str = "fcanet", pipeline: str = "fast"
                          ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for training: random-resized crop to ``image_size`` + horizontal flip.

    The ``fast`` transform returns uint8 (3, S, S); the ``torchvision`` one a normalized float tensor.
    """
    _check(pipeline, crop)
    rrc = dict(size=(image_size, image_size), antialias=True, **CROP_RECIPES[crop])
    if pipeline == "fast":
        return uint8_loader, v2.Compose([v2.RandomResizedCrop(**rrc), v2.RandomHorizontalFlip()])
    return pil_loader, v2.Compose([
        v2.RandomResizedCrop(**rrc), v2.RandomHorizontalFlip(), v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_val_transform(image_size: int, resize: int, pipeline: str = "fast"
                        ) -> tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]:
    """Return ``(loader, transform)`` for evaluation: resize the shorter side to ``resize``, center-crop."""
    _check(pipeline)
    if pipeline == "fast":
        return uint8_loader, v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return pil_loader, v2.Compose([
        v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def to_model_input(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch to ``device`` and make it model-ready (N, 3, H, W) float32.

    uint8 batches (the ``fast`` pipeline) are converted and normalized on the device, so the host ships
    4x fewer bytes; float batches (the ``torchvision`` pipeline) are already normalized.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        images = (images.float() - mean) / std
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
