"""scripts/bench_detection.py: one JSON line of training throughput on synthetic images."""
from __future__ import annotations

import json

import bench_detection


def test_bench_prints_throughput(capsys, tmp_path, tiny):
    overrides = [o for o in tiny(tmp_path, tmp_path / "run", "model.arch=mask_rcnn") if not o.startswith("data.root")]
    assert bench_detection.main(["--config", "configs/coco/base_mask_rcnn_1x.yaml", "--steps", "1", "--warmup", "0",
                                 *overrides]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["device"] == "cpu" and line["image_size"] == [64, 96] and line["img_per_s"] > 0
