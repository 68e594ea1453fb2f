"""COCO evaluation: faster-coco-eval agrees with pycocotools; distributed evaluation is exact."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from engine.detection.data import CocoDetectionSet
from engine.detection.evaluation import coco_evaluate


def _noisy_results(gt: dict, seed: int = 0) -> list[dict]:
    """Detections near the ground truth (jittered boxes, the true masks) plus wrong-class false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        box = (np.array(a["bbox"]) + rng.normal(0, 2, 4)).tolist()
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box,
                    "score": float(rng.random()), "segmentation": a["segmentation"]})
        out.append({"image_id": a["image_id"], "category_id": 1, "bbox": [v * 1.3 for v in box],
                    "score": float(rng.random() * 0.5), "segmentation": a["segmentation"]})
    return out


@pytest.mark.parametrize("iou", ["bbox", "segm"])
def test_faster_coco_eval_matches_pycocotools(shapes_root, iou):
    val = CocoDetectionSet(shapes_root, "val2017", train=False)
    gt, ids = val.coco.dataset, val.ids
    results = _noisy_results(gt)
    fast = coco_evaluate(gt, results, iou, ids, "faster_coco_eval")
    ref = coco_evaluate(gt, results, iou, ids, "pycocotools")
    assert fast.keys() == ref.keys()
    for k in fast:
        assert (fast[k] is None and ref[k] is None) or fast[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 5 < fast["AP"] < 99  # a non-trivial score
    assert coco_evaluate(gt, [], iou, ids)["AP"] == 0.0


def _predict_all(root, out_dir, overrides: list[str]) -> tuple[list, dict]:
    """This process's part of an exact evaluation of a fixed random tiny Mask R-CNN; every rank's gathered
    ``(index, results)`` and the metrics."""
    from engine import distributed as dist_lib
    from engine.detection.config import load_detection_config
    from engine.detection.evaluation import gather_and_evaluate, predict
    from engine.detection.trainer import build_model, val_loader

    torch.set_num_threads(1)
    cfg = load_detection_config(None, overrides)
    info = dist_lib.init_distributed()
    val = CocoDetectionSet(root, "val2017", train=False)
    model = build_model(cfg, info.device, init=False)
    local = predict(model, val_loader(cfg, info, val), info.device, val.cat_ids)
    gathered = sorted((i for part in dist_lib.all_gather_object(local) for i in part), key=lambda t: t[0])
    metrics = gather_and_evaluate(local, val.coco.dataset, val.ids, ("bbox", "segm"))
    return gathered, metrics


def _worker(rank: int, world: int, port: int, root: str, out_dir: str, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        gathered, metrics = _predict_all(root, out_dir, overrides)
        torch.save({"gathered": gathered, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        from engine import distributed as dist_lib
        dist_lib.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_evaluation_is_exact(shapes_root, tmp_path, monkeypatch, tiny):
    """World size 2 (gloo, 7 images: shards of 4 and 3, one image per forward as in MMDetection) gives exactly
    the detections and the metrics of world size 1: every image once, the same order, one evaluation."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    overrides = tiny(shapes_root, tmp_path, "model.arch=mask_rcnn", "data.val_batch_size=1")
    single, metrics1 = _predict_all(shapes_root, tmp_path, overrides)
    assert [i for i, _ in single] == list(range(7)) and metrics1["detections"] > 0
    assert metrics1["images"] == 7 and "segm_AP" in metrics1
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(shapes_root), str(tmp_path), overrides),
                                nprocs=2)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert out["gathered"] == single
        m = {k: v for k, v in out["metrics"].items() if k != "coco_eval_s"}
        assert m == {k: v for k, v in metrics1.items() if k != "coco_eval_s"}
