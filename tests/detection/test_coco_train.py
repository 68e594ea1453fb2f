"""Training runs of the detectors: bitwise resume, the run directory's files, the CLI contracts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.detection.config import load_detection_config
from engine.detection.trainer import fit
from engine.trainer import SimulatedKill

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tiny, root, out, *extra):
    return load_detection_config(None, tiny(root, out, "model.arch=mask_rcnn", "train.epochs=2",
                                            "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=1",
                                            "train.eval_every_epochs=2", "data.max_val_images=3",
                                            "optim.lr_steps=[1]", *extra))


def _final(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pth", weights_only=True)


@pytest.mark.slow
def test_resume_after_a_kill_is_bitwise_identical(shapes_root, tmp_path, tiny):
    """A run killed after step 4 (mid-epoch 2, no checkpoint written at the kill) and resumed from its step-4
    checkpoint ends with exactly the weights, optimizer state and metrics of an uninterrupted run."""
    whole = fit(_cfg(tiny, shapes_root, tmp_path / "a"))
    assert whole["status"] == "complete" and whole["epochs"] == 2 and whole["global_steps"] == 6
    with pytest.raises(SimulatedKill):
        fit(_cfg(tiny, shapes_root, tmp_path / "b", "debug.kill_after_steps=4"))
    resumed = fit(_cfg(tiny, shapes_root, tmp_path / "b"))
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert resumed["final"] == whole["final"] and "segm_AP" in whole["final"]
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    keep = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - timings differ
    assert [keep(r) for r in rows[0]] == [keep(r) for r in rows[1]]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["format"] == "fcanet-detection-summary-v1"
    assert summary["final"]["bbox_AP"] == whole["final"]["bbox_AP"]
    again = fit(_cfg(tiny, shapes_root, tmp_path / "b"))  # a finished run trains nothing
    assert again["global_steps"] == 6


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_train_then_eval_prints_one_json_line(shapes_root, tmp_path, tiny):
    out = tmp_path / "run"
    args = tiny(shapes_root, out, "model.arch=mask_rcnn", "train.epochs=1", "train.max_steps_per_epoch=2",
                "data.max_val_images=2")
    done = _cli("train_coco.py", "--config", str(ROOT / "configs/coco/base_mask_rcnn_1x.yaml"), *args)
    assert done.returncode == 0, done.stderr
    assert (out / "summary.json").is_file() and (out / "config.yaml").is_file()
    ev = _cli("eval_coco.py", "--config", str(out / "config.yaml"), "--checkpoint", str(out / "checkpoints/last.pth"))
    assert ev.returncode == 0, ev.stderr
    line = json.loads(ev.stdout.strip().splitlines()[-1])
    keys = {"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP", "segm_AP50"}
    assert keys <= set(line)
    summary = json.loads((out / "summary.json").read_text())
    assert line["bbox_AP"] == summary["final"]["bbox_AP"] and line["images"] == 2


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, shapes_root, tiny):
    cfg = str(ROOT / "configs/coco/base_faster_rcnn_1x.yaml")
    for args, message in [
        ((f"data.root={tmp_path}", "model.backbone=resnet18"), "annotation file .*instances_train2017.json not found"),
        (tuple(tiny(shapes_root, tmp_path / "x", "model.backbone=resnet18", "model.kwargs={stem: cifar}")),
         "strides"),
        (("data.canvas=[100, 100]",), "canvas"),
        (("model.nrom=frozen",), "did you mean 'model.norm'"),
    ]:
        done = _cli("train_coco.py", "--config", cfg, *args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert re.search(message, lines[0]), lines[0]
