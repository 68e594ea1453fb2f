"""``python -m scripts.gpu_check`` without a GPU: its plan (the CUDA tests, a data.pipeline=gpu training run with 4
workers, the GPU benchmark, within 9 minutes), its clean skip on a CPU-only machine, and the verdicts it draws
from a training run's metrics.jsonl."""
from __future__ import annotations

import json

import pytest
import torch

from scripts import gpu_check


def test_the_plan_fits_nine_minutes_and_names_every_step(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "c")]) == 0
    plan = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert list(plan) == ["tests", "train", "bench"]
    assert all(f in plan["tests"] for f in gpu_check.TEST_FILES) and "test_gpu_cuda.py" in plan["tests"]
    assert "data.pipeline=gpu" in plan["train"] and "data.workers=4" in plan["train"]
    assert "-m scripts.bench gpu" in plan["bench"] and "--out" in plan["bench"]
    budget = float(plan["bench"].split("--budget-s ")[1].split()[0])
    assert gpu_check.TEST_S + gpu_check.TRAIN_S + budget + gpu_check.MARGIN_S <= 9 * 60 and budget >= 60
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_without_cuda_it_skips_cleanly(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("gpu_check: skipped: no CUDA device") and len(out.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def _run_dir(tmp_path, rows, log_text=""):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.log").write_text(log_text)
    return tmp_path


ROW = {"epoch": 1, "global_step": 8, "img_per_s": 900.0, "warmup_s": 12.0, "input_wait_s": 0.02, "decode_s": 0.1,
       "cpu_decoded": 0, "nvjpeg_failed": 0, "val_top1": 25.0}


def test_training_verdicts(tmp_path):
    rows = [ROW, {**ROW, "epoch": 2, "global_step": 16, "warmup_s": 0.0}]
    ok, notes = gpu_check.check_training(_run_dir(tmp_path, rows), tmp_path / "train.log")
    assert ok and "input wait 2.5 ms/batch" in notes[0] and "decode thread 12.5 ms/batch" in notes[0]
    ok, notes = gpu_check.check_training(_run_dir(tmp_path, [ROW, {**rows[1], "cpu_decoded": 3}]),
                                         tmp_path / "train.log")
    assert not ok and any("cpu_decoded" in n and "expected 0" in n for n in notes)
    ok, _ = gpu_check.check_training(_run_dir(tmp_path, rows, "warning: data: gpu pipeline: 5 of ..."),
                                     tmp_path / "train.log")
    assert not ok
    ok, notes = gpu_check.check_training(_run_dir(tmp_path, rows[:1]), tmp_path / "train.log")
    assert not ok and "1 epoch rows, expected 2" in notes[0]
