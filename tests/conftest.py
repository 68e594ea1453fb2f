"""Shared fixtures: tiny ImageFolder trees and fast training overrides (CPU, seconds).

Stable helpers other tests may use:

* :func:`write_tiny_imagefolder` / the ``tiny_imagefolder`` fixture: ``root/{train,val}/<class>/<n>.png``
  with class-dependent colours (learnable), deterministic.
* :func:`tiny_overrides`: ``KEY=VALUE`` overrides that make any config a seconds-long CPU run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tests exercise the checkout they live in: pytest.ini puts it first on sys.path (pythonpath = .), and this
# does the same for the CLI subprocesses that tests start (`python train_imagenet.py ...`), whether or not the
# project is pip-installed and wherever an installed copy points.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

BASE_CONFIG = ROOT / "configs" / "base" / "imagenet.yaml"


def write_tiny_imagefolder(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                           size: int = 12, seed: int = 0, val_total: int | None = None) -> Path:
    """Write a small learnable ImageFolder: class ``c`` is a noisy image of a class-specific colour.

    ``val_total`` (optional) sets the exact number of val images (spread over the classes), e.g. a prime.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (classes, 3))
    val_counts = [val_per_class] * classes
    if val_total is not None:
        val_counts = [val_total // classes + (1 if c < val_total % classes else 0) for c in range(classes)]
    for split, counts in (("train", [train_per_class] * classes), ("val", val_counts)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[c]):
                noise = rng.integers(-40, 41, (size, size, 3))
                img = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def tiny_overrides(data_root, output_dir, **extra) -> list[str]:
    """Overrides for a seconds-long CPU run of a tiny ResNet-18 layout on a tiny ImageFolder."""
    opts = {
        "model.name": "resnet18", "model.num_classes": 3, "model.kwargs": "{widths: [16, 16, 32, 32]}",
        "data.root": str(data_root), "data.image_size": 32, "data.val_resize": 32, "data.workers": 0,
        "train.batch_size": 4, "train.epochs": 2, "train.warmup_epochs": 1, "train.amp": "off",
        "train.channels_last": "false", "train.progress": "false", "train.tensorboard": "false",
        "train.cpu_threads": 1, "train.checkpoint_every_steps": 0, "train.log_every_steps": 2,
        "optim.base_lr": 0.1, "output_dir": str(output_dir), "seed": 0,
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def subprocess_env() -> dict:
    """Environment for CLI subprocesses: one thread each (2 cores shared), repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def tiny_imagefolder(tmp_path) -> Path:
    return write_tiny_imagefolder(tmp_path / "data")
