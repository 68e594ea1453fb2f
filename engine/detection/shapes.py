"""A generated COCO-format instance segmentation set for CPU demos and tests: shapes on textured canvases.

``write_shapes_coco(root)`` writes ``root/{train2017,val2017}/*.png`` and ``root/annotations/instances_*.json``
in COCO 2017's layout. Each canvas (80-128 x 96-160 px, a fifth of them portrait) has a noisy two-colour
gradient background and 1-4 filled shapes (circle, square, triangle; category ids 1, 3, 7, so the contiguous
label mapping is exercised) of 16-48 px in random colours. Later shapes occlude earlier ones: every mask is the
*visible* part, its box the mask's extent, its segmentation a compressed RLE; an object less than 40 px visible
is dropped. Deterministic in ``seed``; written once (a marker file records the settings).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.data.errors import DataError

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"})
MARKER = ".fcanet_shapes_complete"


def _draw(kind: str, cx: float, cy: float, r: float, angle: float, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of one shape of 'radius' ``r`` centred at (cx, cy)."""
    w, h = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        n = 4 if kind == "square" else 3
        pts = [(cx + r * np.cos(angle + 2 * np.pi * k / n), cy + r * np.sin(angle + 2 * np.pi * k / n))
               for k in range(n)]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def make_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas: (H, W, 3) uint8 and its objects as ``(category id, visible mask)``."""
    h, w = int(rng.integers(80, 129)), int(rng.integers(96, 161))
    if rng.random() < 0.2:
        h, w = w, h
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, w)[None, :, None]
    img = (c0 * (1 - ramp) + c1 * ramp) + rng.normal(0, 12, (h, w, 3))
    shapes = []
    for _ in range(int(rng.integers(1, 5))):
        cat = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
        r = float(rng.uniform(8, 24))
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        mask = _draw(cat["name"], cx, cy, r, float(rng.uniform(0, 2 * np.pi)), (w, h))
        img[mask] = rng.integers(0, 256, 3) + rng.normal(0, 6, (int(mask.sum()), 3))
        shapes = [(c, m & ~mask) for c, m in shapes] + [(cat["id"], mask)]
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, [(c, m) for c, m in shapes if m.sum() >= 40]


def _split(folder: Path, split: str, count: int, rng: np.random.Generator, first_ann: int) -> dict:
    from faster_coco_eval.core import mask as mask_utils

    (folder / split).mkdir(parents=True)
    images, anns = [], []
    for i in range(count):
        img, objects = make_image(rng)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(folder / split / name)
        images.append({"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
        for cat, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append({"id": first_ann + len(anns), "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x, y, bw, bh], "area": float(mask.sum()),
                         "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATEGORIES]}


def write_shapes_coco(root: str | Path, train_images: int = 600, val_images: int = 150, seed: int = 0) -> Path:
    """Write the shapes set under ``root`` once (atomically: built in a temp folder, then renamed into place).

    Raises:
        DataError: ``root`` exists and holds something else (or shapes written with other settings).
    """
    root = Path(root)
    marker = f"train={train_images} val={val_images} seed={seed}\n"
    if (root / MARKER).is_file():
        if (root / MARKER).read_text() != marker:
            raise DataError(f"data.root: {root} holds a shapes set written with other settings; delete it first")
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"data.root: {root} exists and is not a shapes set written by this project; choose an "
                        "empty or new folder")
    rng = np.random.default_rng(seed)
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    train = _split(tmp, "train2017", train_images, rng, first_ann=1)
    val = _split(tmp, "val2017", val_images, rng, first_ann=len(train["annotations"]) + 1)
    for split, data in (("train2017", train), ("val2017", val)):
        (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (tmp / MARKER).write_text(marker)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()  # empty (checked above)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / MARKER).is_file():
            raise DataError(f"data.root: could not create {root}") from None
    return root
