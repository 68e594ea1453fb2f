"""COCO data for the detectors: the data set, deterministic aspect-ratio-grouped batches, exact eval shards.

Layout under ``data.root`` (COCO 2017)::

    annotations/instances_train2017.json   annotations/instances_val2017.json
    train2017/<file_name>                  val2017/<file_name>

The index is torchvision's ``CocoDetection`` (pycocotools). Category ids (1..90 with gaps in COCO) map to
contiguous labels 1..C in sorted id order; 0 is the background. Training, as MMDetection: crowd annotations and
boxes under 1 px are dropped, and images left without a box are skipped. Evaluation keeps every image.

Determinism (bitwise resume): the order of an epoch's batches and every image's flip are pure functions of
``(seed, epoch)``; a resumed epoch skips the batches already done and sees the same samples.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from engine.data.errors import DataError


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def load_coco_index(root: str | Path, split: str):
    """torchvision's ``CocoDetection`` for ``root``'s ``split``, checked: the annotation file and image folder
    exist, the file parses, it holds annotations, and no image file name leaves the image folder.

    Raises:
        DataError: one line naming the file and the problem.
    """
    from torchvision.datasets import CocoDetection

    ann, folder = annotation_file(root, split), Path(root) / split
    if not ann.is_file():
        raise DataError(f"data.root: annotation file {ann} not found (expected the COCO 2017 layout: "
                        f"annotations/instances_{split}.json and {split}/ under {root}; see scripts/prepare_coco.py)")
    if not folder.is_dir():
        raise DataError(f"data.root: image folder {folder} not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            index = CocoDetection(str(folder), str(ann))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{ann}: not a COCO annotation file ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                        ) from None
    dataset = index.coco.dataset
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise DataError(f"{ann}: not a COCO annotation file (no '{key}' list)")
    if not dataset["annotations"]:
        raise DataError(f"{ann}: zero annotations (nothing to train or evaluate on)")
    if not dataset["categories"]:
        raise DataError(f"{ann}: zero categories")
    base = folder.resolve()
    for img in dataset["images"]:
        path = (folder / str(img.get("file_name", ""))).resolve()
        if base not in path.parents:
            raise DataError(f"{ann}: image {img.get('id')} has file name {img.get('file_name')!r}, which leaves "
                            f"{folder}; refusing it")
    return index


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask of a COCO annotation: polygons, uncompressed or compressed RLE (faster-coco-eval's mask
    codec, pycocotools' format)."""
    from faster_coco_eval.core import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):  # polygons (one object may have several parts)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


def _usable(ann: dict) -> bool:
    """Trainable annotation: not a crowd region, a box of at least 1 x 1 px (MMDetection's filter)."""
    x, y, w, h = ann["bbox"]
    return not ann.get("iscrowd", 0) and w >= 1 and h >= 1 and ann.get("area", 1) > 0


class CocoDetectionSet(Dataset):
    """One COCO split. Item ``(index, seed)`` in training (``seed``: this sample's flip draw) or ``index``.

    Returns ``(image, target)``: ``image`` (3, H, W) uint8 RGB at the file's size; ``target`` with ``boxes``
    (N, 4) float32 xyxy in pixels, ``labels`` (N,) int64 in 1..C, ``masks`` (N, H, W) uint8 (``with_masks``),
    ``image_id`` and ``index``.

    Args:
        root / split: the COCO tree and split name (``train2017``).
        train: training filters and random flip; otherwise every image, all its (crowd included) annotations.
        with_masks: decode instance masks (Mask R-CNN).
        flip: probability of a horizontal flip (training).
        max_images: keep the first N images (by image id) only.
    """

    def __init__(self, root: str | Path, split: str, train: bool, with_masks: bool = False, flip: float = 0.5,
                 max_images: int | None = None):
        self.root, self.split, self.train, self.with_masks, self.flip = Path(root), split, train, with_masks, flip
        self.index = load_coco_index(root, split)
        coco = self.index.coco
        self.coco = coco
        self.cat_ids = sorted(c["id"] for c in coco.dataset["categories"])
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ann_file = annotation_file(root, split)
        for a in coco.dataset["annotations"]:  # malformed entries: one line here, not a traceback mid-epoch
            if a.get("category_id") not in self.cat_to_label:
                raise DataError(f"{ann_file}: annotation {a.get('id')} has category {a.get('category_id')!r}, which "
                                "is not among the file's categories")
            if not isinstance(a.get("bbox"), list) or len(a["bbox"]) != 4 or a.get("image_id") not in coco.imgs:
                raise DataError(f"{ann_file}: annotation {a.get('id')} lacks a 4-number bbox or a known image_id")
            if with_masks and train and "segmentation" not in a:
                raise DataError(f"{ann_file}: annotation {a.get('id')} has no segmentation (Mask R-CNN trains on "
                                "masks)")
        ids = sorted(coco.imgs)
        if train:
            ids = [i for i in ids if any(_usable(a) for a in coco.imgToAnns.get(i, []))]
            if not ids:
                raise DataError(f"{annotation_file(root, split)}: no image has a usable (non-crowd, >= 1 px) box")
        self.ids = ids[:max_images] if max_images else ids

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def landscape(self) -> np.ndarray:
        """(len,) bool: width > height per image, from the annotation file (aspect-ratio grouping)."""
        return np.array([self.coco.imgs[i]["width"] > self.coco.imgs[i]["height"] for i in self.ids], dtype=bool)

    def image_path(self, index: int) -> Path:
        return self.root / self.split / self.coco.imgs[self.ids[index]]["file_name"]

    def _load_image(self, index: int) -> torch.Tensor:
        path = self.image_path(index)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DataError(f"image {path} (id {self.ids[index]}) listed in {annotation_file(self.root, self.split)} "
                            "is missing") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"image {path} cannot be decoded ({str(e).splitlines()[0][:100]})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W) uint8

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, dict]:
        index, seed = item if isinstance(item, (tuple, list)) else (item, None)
        image = self._load_image(index)
        img_id = self.ids[index]
        h, w = image.shape[-2:]
        anns = self.coco.imgToAnns.get(img_id, [])
        if self.train:
            anns = [a for a in anns if _usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "image_id": img_id, "index": index}
        if self.with_masks and self.train:
            info = self.coco.imgs[img_id]
            masks = [ann_to_mask(a, info["height"], info["width"]) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))
            if target["masks"].shape[-2:] != (h, w):
                raise DataError(f"image {self.image_path(index)} is {w}x{h} px but its annotation says "
                                f"{self.coco.imgs[img_id]['width']}x{self.coco.imgs[img_id]['height']}")
        if self.train and seed is not None and np.random.default_rng(seed).random() < self.flip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: list) -> list:
    """Detection batches stay lists of ``(image, target)`` (images differ in size)."""
    return batch


class GroupedTrainBatchSampler(Sampler):
    """Deterministic, resumable, sharded training batches of ``(index, flip seed)``.

    Epoch ``e``: a permutation and per-position seeds from ``(seed, e)``. With ``group``, landscape and portrait
    images are batched apart (MMDetection's ``GroupSampler``: a fixed canvas or the 32-padding then wastes
    little); each group is padded cyclically to a multiple of the global batch (``batch_size x world_size``),
    cut into global batches, and the batches of both groups are shuffled together. Rank ``r`` takes its slice of
    every global batch, so all ranks run the same number of steps. ``set_epoch(e, start_step)`` resumes
    mid-epoch.
    """

    def __init__(self, landscape: np.ndarray, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 group: bool = True, max_steps: int | None = None):
        self.groups = np.asarray(landscape, dtype=bool) if group else np.zeros(len(landscape), dtype=bool)
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        per = batch_size * world_size
        sizes = [int((self.groups == g).sum()) for g in (False, True)]
        steps = sum(math.ceil(n / per) for n in sizes)
        self.steps = steps if max_steps is None else min(steps, max_steps)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Every global batch of ``epoch`` in order (a pure function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.groups))
        seeds = rng.integers(0, 2**62, len(self.groups))
        per = self.batch_size * self.world_size
        batches = []
        for g in (False, True):
            members = np.flatnonzero(self.groups[perm] == g)  # positions in the permutation
            if len(members) == 0:
                continue
            members = np.resize(members, math.ceil(len(members) / per) * per)  # cyclic padding
            batches += [members[i:i + per] for i in range(0, len(members), per)]
        order = rng.permutation(len(batches))
        return [[(int(perm[p]), int(seeds[p])) for p in batches[i]] for i in order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.plan(self.epoch)
        b = self.batch_size
        for step in range(self.start_step, self.steps):
            yield plan[step][self.rank * b:(self.rank + 1) * b]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def make_loader(dataset: Dataset, batch_sampler: Sampler, workers: int | None) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batch_sampler`` (``workers=None``: the CPUs of this process's share, minus one)."""
    import os

    if workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                      // local - 1)
    kwargs: dict = {"persistent_workers": True, "prefetch_factor": 4} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                                       **kwargs)
