"""Fixtures of the detection tests: a small generated COCO-format tree (shapes) and a tiny detector config."""
from __future__ import annotations

import pytest

TINY = ["model.backbone=fcanet18", "model.num_classes=4", "model.frozen_stages=-1", "model.norm=train",
        "model.kwargs={widths: [16, 16, 32, 32], grid: 2, input_size: 64, freq: [[0, 0], [1, 1]]}",
        "model.rpn_pre_nms_train=100", "model.rpn_post_nms_train=50", "model.roi_batch_per_image=32",
        "model.fpn_channels=8", "model.box_head_dim=16", "model.mask_head_channels=[8]",
        "model.anchor_sizes=[16, 32, 64, 128, 256]", "model.backbone_checkpoint=null",
        "data.min_size=64", "data.max_size=96", "data.workers=0", "train.amp=off", "train.progress=false",
        "train.tensorboard=false", "train.cpu_threads=1", "train.batch_size=2", "optim.warmup_iters=2"]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    from engine.detection.shapes import write_shapes_coco
    return write_shapes_coco(tmp_path_factory.mktemp("coco") / "shapes", train_images=12, val_images=7, seed=3)


def tiny_overrides(root, output_dir, *extra: str) -> list[str]:
    return TINY + [f"data.root={root}", f"output_dir={output_dir}", *extra]


@pytest.fixture(scope="session")
def tiny():
    """``tiny(root, output_dir, *extra)``: overrides for a seconds-long CPU detector run on the shapes set."""
    return tiny_overrides
