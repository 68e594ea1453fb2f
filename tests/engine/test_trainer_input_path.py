"""The trainer around its input path (in-process, tiny CPU runs): the epoch is saved before it is evaluated,
warm-up is timed apart from throughput, compiled models do not recompile for short batches, settings that cost
more than they seem warn, cuDNN autotuning is a config key, and the gpu pipeline's CPU fallbacks and failures
reach metrics.jsonl and the one-line error (nvjpeg replaced by a fake raising torchvision's messages)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from engine import distributed as dist_lib
from engine.config import load_config
from engine.data import gpu_decode as gd
from engine.data.errors import CorruptImageError
from engine.trainer import build_trainer, config_warnings, fit, set_backend_flags


def _cfg(data, out, **extra):
    return load_config(BASE_CONFIG, tiny_overrides(data, out, **extra))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ONE_EPOCH = {"train.epochs": 1, "train.warmup_epochs": 0}


def test_the_epoch_is_saved_before_its_evaluation(tmp_path):
    """An unreadable val image stops the evaluation; the epoch's training is kept: a rerun (file fixed)
    resumes after the last step, evaluates, and ends exactly as an uninterrupted run."""
    data = write_tiny_imagefolder(tmp_path / "data")
    ref = tmp_path / "ref"
    fit(_cfg(data, ref, **ONE_EPOCH))
    bad = data / "val" / "class1" / "zz_corrupt.png"
    bad.write_bytes(b"not a PNG")
    out = tmp_path / "run"
    with pytest.raises(CorruptImageError, match="zz_corrupt.png"):
        fit(_cfg(data, out, **ONE_EPOCH))
    saved = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 6, 6)
    assert not (out / "metrics.jsonl").exists()
    bad.unlink()
    summary = fit(_cfg(data, out, **ONE_EPOCH))
    a, b = torch.load(ref / "checkpoints" / "last.pth", weights_only=True), torch.load(
        out / "checkpoints" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ra, rb = _rows(ref), _rows(out)
    assert len(rb) == 1 and rb[0]["train_loss"] == ra[0]["train_loss"] and rb[0]["val_top1"] == ra[0]["val_top1"]
    assert summary["final_top1"] == ra[0]["val_top1"]


def test_warmup_is_reported_apart_from_throughput(tmp_path):
    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    summary = fit(_cfg(data, out, **{"train.epochs": 2, "train.warmup_epochs": 0}))
    first, second = _rows(out)
    assert first["warmup_s"] > 0 and second["warmup_s"] == 0  # the session's first step only
    # img_per_s: the 5 steps after the warm-up step (20 images) over the time without it
    assert abs(first["img_per_s"] * (first["epoch_time_s"] - first["warmup_s"]) - 20) < 0.01
    assert abs(second["img_per_s"] * second["epoch_time_s"] - 24) < 0.01
    assert first["input_wait_s"] >= 0 and "decode_s" not in first  # decode_s: gpu pipeline only
    total = first["epoch_time_s"] + second["epoch_time_s"] - first["warmup_s"]
    assert abs(summary["train_img_per_s"] - 44 / total) < 0.01 * summary["train_img_per_s"]


# ---------------------------------------------------------------------------------------- compile hygiene
def _trainer(tmp_path, **extra):
    from engine.builders import new_model
    from engine.rundir import RunDir

    data = write_tiny_imagefolder(tmp_path / "data")
    cfg = _cfg(data, tmp_path / "run", **extra)
    return build_trainer(cfg, dist_lib.DistInfo(), RunDir(cfg.output_dir), new_model(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("skip_corrupt,compiles", [(True, 1), (False, 2)])
def test_a_short_training_batch_recompiles_only_without_skip_corrupt(tmp_path, skip_corrupt, compiles):
    """With data.skip_corrupt a batch may lose files: its batch dimension is dynamic from the first step, so a
    short batch reuses the graph (otherwise batches are always full and the graph stays static)."""
    from torch._dynamo.testing import CompileCounter

    trainer = _trainer(tmp_path, **{"train.compile": "true", "data.skip_corrupt": str(skip_corrupt).lower()})
    torch._dynamo.reset()
    counter = CompileCounter()
    trainer.wrapped.train_model = torch.compile(trainer.model, backend=counter)
    for n in (4, 3, 4):
        trainer.train_step(torch.randn(n, 3, 32, 32), torch.randint(0, 3, (n,)), 4 - n)
    assert counter.frame_count == compiles


def test_the_last_partial_eval_batch_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    from engine.data.datasets import ExactEvalBatchSampler, SyntheticDataset, collate
    from engine.data.loader import build_dataloader
    from engine.evaluation import evaluate

    torch._dynamo.reset()
    counter = CompileCounter()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5))
    ds = SyntheticDataset(11, 8, 5)
    dl = build_dataloader(ds, batch_sampler=ExactEvalBatchSampler(len(ds), 4), workers=0, collate_fn=collate)
    out = evaluate(torch.compile(model, backend=counter), dl, torch.device("cpu"))
    assert out["count"] == 11 and counter.frame_count == 1  # batches 4, 4, 3: one graph


def test_sync_bn_with_compile_warns_under_ddp_only():
    ddp = dist_lib.DistInfo(rank=0, world_size=2)
    cfg = load_config(BASE_CONFIG, ["train.sync_bn=true", "train.compile=true"])
    (line,) = config_warnings(cfg, ddp)
    assert line.startswith("warning: train.sync_bn with train.compile") and "53 per ResNet-50" in line
    assert config_warnings(cfg, dist_lib.DistInfo()) == []  # one process: no SyncBatchNorm at all
    assert config_warnings(load_config(BASE_CONFIG, ["train.sync_bn=true"]), ddp) == []


def test_cudnn_benchmark_is_a_config_key_applied_on_cuda_only(monkeypatch):
    before = torch.backends.cudnn.benchmark
    try:
        assert load_config(BASE_CONFIG, []).train.cudnn_benchmark is True  # on by default
        for value in (True, False):
            set_backend_flags(load_config(BASE_CONFIG, [f"train.cudnn_benchmark={str(value).lower()}"]),
                              torch.device("cuda", 0))
            assert torch.backends.cudnn.benchmark is value
        torch.backends.cudnn.benchmark = False
        set_backend_flags(load_config(BASE_CONFIG, []), torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False  # untouched on CPU
    finally:
        torch.backends.cudnn.benchmark = before


# ------------------------------------------------------------------------------ gpu pipeline, faked nvjpeg
def _jpeg_tree(root: Path) -> Path:
    """24 train / 12 val baseline JPEGs of 3 learnable colours (distinct byte sizes)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (3, 3))
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(colours[c] + rng.integers(-40, 41, (24 + i, 28, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=90)
                (folder / f"{i:03d}.jpg").write_bytes(buf.getvalue())
    return root


def _fake_gpu(monkeypatch, fake) -> None:
    """Let data.pipeline=gpu run on the CPU with ``fake`` as nvjpeg's batched decode."""
    real = gd.decode_batch
    monkeypatch.setattr(gd, "check_available", lambda: None)
    monkeypatch.setattr(gd, "decode_batch", lambda batch, device, channels_last=False, decode=None,
                        skip_corrupt=False: real(batch, device, channels_last, decode=fake, skip_corrupt=skip_corrupt))


def test_gpu_pipeline_fallbacks_are_counted_in_metrics(tmp_path, monkeypatch):
    from test_gpu_decode_faults import ERR, FakeNvjpeg

    data = _jpeg_tree(tmp_path / "data")
    rejected = (data / "train" / "class1" / "003.jpg").stat().st_size
    _fake_gpu(monkeypatch, FakeNvjpeg(f"{ERR}Failed to decode batch: 3", bad={rejected}))
    gd.fallback_counts(reset=True)
    fit(_cfg(data, tmp_path / "run", **{"data.pipeline": "gpu", "train.epochs": 2, "train.warmup_epochs": 0}))
    rows = _rows(tmp_path / "run")
    assert [(r["cpu_decoded"], r["nvjpeg_failed"]) for r in rows] == [(1, 1), (1, 1)]  # once per epoch
    assert all(r["decode_s"] > 0 for r in rows)


def test_a_gpu_failure_in_training_is_one_error_line(tmp_path, monkeypatch, capsys):
    from engine.entrypoints import train_main
    from test_gpu_decode_faults import ERR, FakeNvjpeg

    data = _jpeg_tree(tmp_path / "data")
    _fake_gpu(monkeypatch, FakeNvjpeg(f"{ERR}Failed to decode batch: 5", fail_on_call=3))
    rc = train_main(["--config", str(BASE_CONFIG), *tiny_overrides(data, tmp_path / "run", **{
        "data.pipeline": "gpu", **ONE_EPOCH})])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert "nvjpeg status 5 (allocator failure)" in lines[0] and "data.pipeline=fast" in lines[0]
