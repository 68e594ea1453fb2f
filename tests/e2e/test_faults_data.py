"""Bad data and config inputs against the real entry points (train_imagenet.py, eval_imagenet.py) on tiny
generated ImageFolder trees: image files in every PIL mode, directory symlink cycles, duplicate files, YAML
syntax errors, an absurd image size and the GPU pipeline on a CPU-only machine.

Each failure must exit with status 2 and print exactly one ``error:`` line naming the problem, with no
traceback, and leave every file that was already there (a run directory, a checkpoint, an eval result,
the data) byte for byte unchanged. Decodable modes must train and evaluate, with correct pixels.

The entry points run in this process (``run_main``: the function the scripts call); one refused file runs the
script as a subprocess, for the exit status and the single line of a process stopped mid-training.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (BASE_CONFIG, assert_refused, checksums, copy_run, run_cli, run_main, tiny_overrides,
                      write_tiny_imagefolder)
from engine.config import load_config
from engine.data.pipeline import build_datasets
from image_modes import mode_cases

CASES = mode_cases()
DECODABLE = [c for c in CASES if c.expected is not None]
REFUSED = [c for c in CASES if c.expected is None]


def _train_args(data_root, out, *extra: str, config=BASE_CONFIG) -> list[str]:
    return ["--config", str(config), *tiny_overrides(data_root, out), *extra]


def _eval_args(data_root, checkpoint, output, *extra: str) -> list[str]:
    return ["--config", str(BASE_CONFIG), "--checkpoint", str(checkpoint), "--output", str(output),
            *tiny_overrides(data_root, Path(output).parent / "unused"), *extra]


def _train(capsys, *args, **kw):
    return run_main("train_imagenet.py", _train_args(*args, **kw), capsys)


def _eval(capsys, *args):
    return run_main("eval_imagenet.py", _eval_args(*args), capsys)


def _tree(root: Path, cases) -> Path:
    """A tiny learnable ImageFolder plus one file per mode case in train/ and val/ (spread over classes)."""
    write_tiny_imagefolder(root, classes=3, train_per_class=4, val_per_class=2)
    for k, c in enumerate(cases):
        for split in ("train", "val"):
            (root / split / f"class{k % 3}" / f"mode_{c.name}{c.ext}").write_bytes(c.data)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch run (in this process) on a tree holding every decodable mode (fast pipeline):
    (data, run dir)."""
    from engine.config import load_config
    from engine.trainer import fit

    base = tmp_path_factory.mktemp("faults_data")
    data, out = _tree(base / "data", DECODABLE), base / "run"
    fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **{"train.epochs": 1, "train.warmup_epochs": 0})))
    return data, out


# ------------------------------------------------------------------------------------------ image modes
def test_every_decodable_mode_trains_and_evaluates(finished_run, tmp_path, capsys):
    data, out = finished_run
    n_val = sum(1 for p in (data / "val").rglob("*") if p.is_file())
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_count"] == n_val and metrics[-1]["val_skipped"] == 0 and summary["final_top1"] >= 0
    # the reference (PIL) pipeline on the same files, through the evaluator
    r = _eval(capsys, data, out / "checkpoints" / "best.pth", tmp_path / "eval.json", "data.pipeline=torchvision")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["count"] == n_val and result["skipped"] == 0


@pytest.mark.parametrize("pipeline", ["fast", "torchvision"])
def test_decoded_pixels_through_the_configured_data_sets(tmp_path, pipeline):
    """What the trainer's own data builder yields for each mode: the val crop of a file equals its expected
    colours resized (all cases are checked by their mean colour and range; the 16-bit gradient must span
    0..255, not turn white)."""
    data = _tree(tmp_path / "data", DECODABLE)
    cfg = load_config(BASE_CONFIG, tiny_overrides(data, tmp_path / "run", **{"data.pipeline": pipeline}))
    _, val = build_datasets(cfg, 3, need_train=False)
    paths = [p for p, _ in val.samples]
    for c in DECODABLE:
        x, _ = val[paths.index(str(data / "val" / f"class{DECODABLE.index(c) % 3}" / f"mode_{c.name}{c.ext}"))]
        if x.dtype != torch.uint8:  # the torchvision pipeline normalizes on the CPU
            mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
            x = (x * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + mean) * 255
        x = x.float()
        expected = torch.from_numpy(c.expected).float().permute(2, 0, 1)
        for ch in range(3):  # a resize keeps each channel's mean (within interpolation/border effects)
            assert abs(x[ch].mean() - expected[ch].mean()) < 6 + c.tol, (c.name, pipeline, ch)
        if c.name.startswith("grey16"):
            assert x.min() < 15 and x.max() > 240, (c.name, pipeline, x.min(), x.max())


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c is REFUSED[0] else c for c in REFUSED],
                         ids=lambda c: c.name)
def test_modes_without_8bit_range_are_refused_in_training(finished_run, tmp_path, case, capsys):
    data, run = finished_run
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "train" / "class1" / f"zz_{case.name}{case.ext}").write_bytes(case.data)
    out = copy_run(run, tmp_path / "run")
    # The file is refused when its batch is loaded, once the resumed run has started: the weights, metrics and
    # summary must survive. (The resolved config.yaml describes the relaunch, the trainer's business.)
    before = checksums(out, bad, skip=("config*.yaml",))
    args = _train_args(bad, out, "train.epochs=2", "train.warmup_epochs=0")
    # once as the script (a process stopped mid-training exits 2 with one line), else in this process
    r = run_cli("train_imagenet.py", args) if case is REFUSED[0] else run_main("train_imagenet.py", args, capsys)
    assert_refused(r, f"zz_{case.name}{case.ext}", f"mode '{case.mode}'")
    assert checksums(out, bad, skip=("config*.yaml",)) == before


def test_refused_mode_in_val_stops_the_evaluator_and_keeps_its_output(finished_run, tmp_path, capsys):
    data, run = finished_run
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    case = next(c for c in REFUSED if c.mode == "F")
    (bad / "val" / "class2" / f"zz{case.ext}").write_bytes(case.data)
    result = tmp_path / "eval.json"
    result.write_text('{"top1": 12.5}\n')  # an earlier result must survive
    before = checksums(run, bad, result)
    r = _eval(capsys, bad, run / "checkpoints" / "best.pth", result)
    assert_refused(r, f"zz{case.ext}", "mode 'F'")
    assert checksums(run, bad, result) == before


# ----------------------------------------------------------------------------------- symlinks, duplicates
def test_directory_symlink_cycle_is_refused(finished_run, tmp_path, capsys):
    data, run = finished_run
    bad = tmp_path / "data"
    shutil.copytree(data, bad, symlinks=True)
    (bad / "train" / "class0" / "loop").symlink_to("..", target_is_directory=True)
    out = copy_run(run, tmp_path / "run")
    before = checksums(out, bad)
    r = _train(capsys, bad, out, "train.epochs=2", "train.warmup_epochs=0")
    assert_refused(r, "symlink cycle", "loop")
    assert checksums(out, bad) == before


def test_duplicate_file_in_val_is_refused(finished_run, tmp_path, capsys):
    data, run = finished_run
    bad = tmp_path / "data"
    shutil.copytree(data, bad, symlinks=True)
    (bad / "val" / "class1" / "dup.png").symlink_to(bad / "val" / "class0" / "000.png")
    result = tmp_path / "eval.json"
    r = _eval(capsys, bad, run / "checkpoints" / "best.pth", result)
    assert_refused(r, "same file", "dup.png", "000.png")
    assert not result.exists()


# ------------------------------------------------------------------------------------------ config errors
def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(f"_base_: {BASE_CONFIG}\ntrain:\n  epochs: 3\n  batch_size: [8, 16\ndata:\n  root: x\n")
    out = tmp_path / "run"
    r = _train(capsys, tmp_path / "data", out, config=cfg)
    assert_refused(r, f"{cfg}:5:5:", "invalid YAML", "expected ',' or ']'")
    assert not out.exists()


def test_absurd_image_size_is_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    r = _train(capsys, tmp_path / "data", out, "data.image_size=4096")
    assert_refused(r, "data.image_size", "4096", "GiB")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_pipeline_is_refused_without_cuda(tmp_path, capsys):
    data = write_tiny_imagefolder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=2)
    before = checksums(data)
    r = _train(capsys, data, tmp_path / "run", "data.pipeline=gpu")
    assert_refused(r, "data.pipeline", "CUDA")
    assert checksums(data) == before and not list((tmp_path / "run").rglob("*.pth"))
