"""The COCO data set, the generated shapes set, the grouped resumable sampler, one-line data errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.data.errors import DataError
from engine.detection.data import CocoDetectionSet, GroupedTrainBatchSampler


def test_shapes_set_loads_with_contiguous_labels_and_consistent_flips(shapes_root):
    ds = CocoDetectionSet(shapes_root, "train2017", train=True, with_masks=True)
    assert ds.cat_ids == [1, 3, 7] and ds.num_classes == 4
    for i in range(len(ds)):
        image, t = ds[(i, 0)]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert t["labels"].min() >= 1 and t["labels"].max() <= 3
        assert t["masks"].shape == (len(t["boxes"]),) + tuple(image.shape[-2:])
        for box, mask in zip(t["boxes"], t["masks"], strict=True):  # box = the (possibly flipped) mask's extent
            ys, xs = torch.where(mask > 0)
            assert torch.allclose(box, torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    ds.with_masks = False
    reference = ds[(0, 10**6)][0]
    flipped = [not torch.equal(ds[(0, s)][0], reference) for s in range(12)]
    assert 0 < sum(flipped) < len(flipped)  # both outcomes occur ...
    assert torch.equal(ds[(0, 5)][0], ds[(0, 5)][0])  # ... and a seed always gives the same one


def test_sampler_is_deterministic_grouped_and_resumable():
    landscape = np.array([True] * 9 + [False] * 4)
    ranks = [GroupedTrainBatchSampler(landscape, 2, world_size=2, rank=r, seed=1) for r in range(2)]
    assert ranks[0].steps == ranks[1].steps == 3 + 1
    for epoch in (0, 1):
        plan = ranks[0].plan(epoch)
        assert plan == GroupedTrainBatchSampler(landscape, 2, 2, 0, seed=1).plan(epoch)
        assert {i for batch in plan for i, _ in batch} == set(range(13))  # every image, every epoch
        for batch in plan:
            assert len({bool(landscape[i]) for i, _ in batch}) == 1  # one orientation per global batch
        for r in ranks:
            r.set_epoch(epoch)
        shards = [list(r) for r in ranks]
        assert [a + b for a, b in zip(*shards, strict=True)] == plan
        ranks[0].set_epoch(epoch, start_step=2)
        assert list(ranks[0]) == shards[0][2:]
    assert ranks[0].plan(0) != ranks[0].plan(1)


def _copy(shapes_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(shapes_root, root)
    return root


def test_one_line_errors(shapes_root, tmp_path):
    with pytest.raises(DataError, match="annotation file .*instances_val2017.json not found"):
        CocoDetectionSet(tmp_path, "val2017", train=False)
    root = _copy(shapes_root, tmp_path)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    ann.write_text(json.dumps({**data, "annotations": []}))
    with pytest.raises(DataError, match="zero annotations"):
        CocoDetectionSet(root, "val2017", train=False)
    bad = {**data, "images": [{**data["images"][0], "file_name": "../../outside.png"}] + data["images"][1:]}
    ann.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="leaves"):
        CocoDetectionSet(root, "val2017", train=False)
    ann.write_text(json.dumps({**data, "annotations": [{**data["annotations"][0], "category_id": 2}]}))
    with pytest.raises(DataError, match=r"annotation \d+ has category 2, which is not among the file.s categories"):
        CocoDetectionSet(root, "val2017", train=False)
    ann.write_text(json.dumps(data))
    (root / "val2017" / data["images"][2]["file_name"]).unlink()
    ds = CocoDetectionSet(root, "val2017", train=False)
    with pytest.raises(DataError, match=r"000002.png \(id 3\) listed in .* is missing"):
        ds[2]
    ann.write_text("{not json")
    with pytest.raises(DataError, match="not a COCO annotation file"):
        CocoDetectionSet(root, "val2017", train=False)
