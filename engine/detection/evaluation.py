"""Exact COCO evaluation at any world size.

Every rank predicts its shard of the val images (rank ``r`` of ``w``: images ``r, r + w, ...``, no padding);
the detections of all ranks are gathered, sorted by image (and by rank within the image), and evaluated once on
rank 0 with COCO's protocol; the metrics are broadcast. With one image per forward (``data.val_batch_size: 1``,
MMDetection's test setting) an image's detections do not depend on which other images a rank sees, so the
metrics are the same at every world size. (With larger eval batches the zero padding of a batch depends on its
other images, which the attention's global pooling sees, unless a fixed canvas is used.)

The evaluator is faster-coco-eval (a C++ COCOeval) or pycocotools; tests check that they agree.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings
from typing import Any

import numpy as np
import torch

from engine import distributed as dist_lib
from engine.progress import Progress

# COCOeval.stats[0:6]: AP@[.5:.95], AP50, AP75, AP small / medium / large (in %, like the paper's tables).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_coco_results(det: dict, image_id: int, cat_ids: list[int]) -> list[dict]:
    """One image's detections (the model's eval output, in original-image pixels) as COCO result dicts:
    ``bbox`` [x, y, w, h], ``score``, ``category_id``, and for masks a compressed RLE ``segmentation`` of the
    mask probabilities thresholded at 0.5 (MMDetection's ``mask_thr_binary``)."""
    boxes = det["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = det["scores"].float().cpu().tolist()
    labels = det["labels"].cpu().tolist()
    out = [{"image_id": int(image_id), "category_id": int(cat_ids[label - 1]), "bbox": [float(v) for v in box],
            "score": float(score)} for box, score, label in zip(xywh, scores, labels, strict=True)]
    if "masks" in det and len(out):
        from faster_coco_eval.core import mask as mask_utils

        binary = (det["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for r, rle in zip(out, rles, strict=True):
            r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return out


def coco_evaluate(gt_dataset: dict, results: list[dict], iou_type: str, image_ids: list[int],
                  evaluator: str = "faster_coco_eval") -> dict[str, float]:
    """COCO metrics (``AP``, ``AP50``, ... in %; None for a size range without ground truth) of ``results``
    against the annotation dict ``gt_dataset`` on ``image_ids`` only. No detections at all gives 0 for every
    metric (COCO's loadRes refuses an empty list)."""
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    results = copy.deepcopy(results)  # loadRes adds keys (area, id) to the dicts it is given
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # pycocotools' C extension predates NumPy 2's __array__(copy=...) protocol and warns on every mask call.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        if evaluator == "faster_coco_eval":
            from faster_coco_eval import COCO, COCOeval_faster as COCOeval
            gt = COCO(copy.deepcopy(gt_dataset))
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
            gt = COCO()
            gt.dataset = copy.deepcopy(gt_dataset)
            gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCO reports -1 where a size range has no ground truth: None (JSON null) here.
    return {name: (float(v) * 100.0 if v >= 0 else None) for name, v in zip(STAT_NAMES, ev.stats[:6], strict=True)}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, cat_ids: list[int], amp: str = "off",
            desc: str | None = None) -> list[tuple[int, list[dict]]]:
    """This rank's ``(dataset index, COCO results)`` for every image of ``loader``."""
    was_training = model.training
    model.eval()
    out = []
    progress = Progress(total=len(loader), desc=desc or "", enabled=desc is not None)
    try:
        for batch in loader:
            images = [img.to(device, non_blocking=True).float().div_(255) for img, _ in batch]
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
                dets = model(images)
            for (_, target), det in zip(batch, dets, strict=True):
                out.append((int(target["index"]), to_coco_results(det, target["image_id"], cat_ids)))
            progress.update()
    finally:
        progress.close()
        model.train(was_training)
    return out


def gather_and_evaluate(local: list[tuple[int, list[dict]]], gt_dataset: dict, image_ids: list[int],
                        iou_types: tuple[str, ...], evaluator: str = "faster_coco_eval") -> dict[str, Any]:
    """Gather every rank's ``(index, results)``, check each image came exactly once, evaluate once (rank 0) and
    return the same metrics on every rank: ``bbox_AP``, ``bbox_AP50``, ... and ``segm_*`` for masks."""
    gathered = [item for part in dist_lib.all_gather_object(local) for item in part]
    metrics: dict[str, Any] | None = None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        indices = sorted(i for i, _ in gathered)
        if indices != list(range(len(image_ids))):
            raise RuntimeError(f"evaluation covered {len(indices)} predictions for {len(image_ids)} images "
                               "(each image must be predicted exactly once)")
        results = [r for _, rs in sorted(gathered, key=lambda t: t[0]) for r in rs]
        metrics = {"images": len(image_ids), "detections": len(results)}
        t0 = time.time()
        for iou in iou_types:
            stats = coco_evaluate(gt_dataset, results, iou, image_ids, evaluator)
            metrics.update({f"{iou}_{k}": v for k, v in stats.items()})
        metrics["coco_eval_s"] = time.time() - t0
    return dist_lib.broadcast_object(metrics)
