"""A resume checkpoint is checked whole before any of it is used: a damaged or foreign one stops with one line
naming the problem, before training starts and without changing a file; the fixed DCT filters (buffers) are
checked like the config keys; a mid-epoch resume at another world size keeps the epoch's train metrics exact;
a run resumed from another run's checkpoint gets a best.pth that matches its summary."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from engine.checkpoint import StructureChangedError
from engine.config import load_config
from engine.errors import CheckpointError
from engine.meter import COUNT, LOSS_SUM
from engine.trainer import fit

ONE_EPOCH = {"train.epochs": 1, "train.checkpoint_every_steps": 2}  # 24 images / batch 4: 6 steps
FCA = {"model.name": "fcanet18", "train.max_steps_per_epoch": 2}


def cfg(data: Path, out: Path, **extra):
    return load_config(BASE_CONFIG, tiny_overrides(data, out, **{**ONE_EPOCH, **extra}))


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("train.lock")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_imagefolder(tmp_path_factory.mktemp("ckv") / "data")


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(cfg(data, out))
    return out


@pytest.fixture(scope="module")
def finished_fca(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished_fca") / "run"
    fit(cfg(data, out, **FCA))
    return out


def _damage(ckpt: dict, kind: str) -> None:
    if kind == "tensor shape":
        ckpt["model"]["fc.weight"] = torch.zeros(5, 32)
    elif kind == "optimizer shape":
        first = min(ckpt["optimizer"]["state"])
        ckpt["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(7)
    elif kind == "state key":
        ckpt["state"]["learning_rate"] = 0.1
    elif kind == "rng":
        ckpt["rng"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)
    elif kind == "rng list":
        ckpt["rng"] = "not a list"
    elif kind == "negative epoch":
        ckpt["epoch"] = ckpt["state"]["epoch"] = -1
    elif kind == "nan weight":
        ckpt["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    elif kind == "meter":
        ckpt["meter"][0]["sums"] = torch.zeros(3, dtype=torch.float64)
    elif kind == "entry":
        ckpt["extra"] = 1
    elif kind == "classes":
        ckpt["classes"] = ["class0", "class1", "class9"]


EXPECTED = {
    "tensor shape": "cannot resume {p}: weight fc.weight has shape (5, 32), the model's (3, 32)",
    "optimizer shape": "cannot resume {p}: its optimizer's momentum_buffer of parameter 0 has shape (7,), the "
                       "parameter (16, 3, 7, 7)",
    "state key": "checkpoint {p} is malformed: state has an unknown entry 'learning_rate'",
    "rng": "checkpoint {p} is malformed: rng of rank 0: bad torch state",
    "rng list": "checkpoint {p} is malformed: rng is not a list of one state per rank (1)",
    "negative epoch": "checkpoint {p} is malformed: epoch is -1, must be >= 0",
    "nan weight": "cannot resume {p}: weight conv1.weight holds NaN/inf",
    "meter": "checkpoint {p} is malformed: meter of rank 0: sums has shape (3,), not (5,)",
    "entry": "checkpoint {p} is malformed: unknown entry 'extra'",
    "classes": "cannot resume {p}: it was trained on 3 classes, data.root has 3 (data.root lacks class9)",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_damaged_resume_checkpoint_is_one_line_before_training(data, finished, tmp_path, kind):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    path = out / "checkpoints" / "last.pth"
    ckpt = torch.load(path, weights_only=True)
    _damage(ckpt, kind)
    torch.save(ckpt, path)
    before = checksums(out)
    with pytest.raises(CheckpointError) as e:
        fit(cfg(data, out, **{"train.epochs": 2}), resume=str(path))
    message = str(e.value)
    assert message.startswith(EXPECTED[kind].format(p=path)), message
    assert "\n" not in message
    assert checksums(out) == before  # nothing trained, nothing written


def test_auto_resume_refuses_weights_that_do_not_fit_and_falls_back_from_a_malformed_last(data, finished, tmp_path,
                                                                                           capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    last = out / "checkpoints" / "last.pth"
    good = torch.load(last, weights_only=True)
    bad = dict(good, model=dict(good["model"], **{"fc.weight": torch.zeros(5, 32)}))
    torch.save(bad, last)
    with pytest.raises(CheckpointError, match="weight fc.weight has shape"):
        fit(cfg(data, out, **{"train.epochs": 2}))  # a layout-valid file that does not fit: no silent fallback
    # a malformed last.pth is skipped with a warning, like a torn one: the previous checkpoint resumes
    torch.save(dict(good, epoch=-1), last)
    fit(cfg(data, out, **{"train.epochs": 2}))
    assert "is malformed: epoch is -1" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["epoch"] == 2 and (out / "checkpoints" / "last.corrupt.pth").exists()


def test_resume_with_altered_dct_filters_is_refused(data, finished_fca, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_fca, out)
    last = out / "checkpoints" / "last.pth"
    ckpt = torch.load(last, weights_only=True)
    key = next(k for k in ckpt["model"] if k.endswith("dct_layer.weight"))
    original = ckpt["model"][key].clone()
    ckpt["model"][key] = torch.roll(original, 1, dims=0)  # another frequency per channel group
    torch.save(ckpt, last)
    before = checksums(out)
    with pytest.raises(CheckpointError, match=rf"^cannot resume {last}: its buffer {key} differs from the one this "
                                              "config builds"):
        fit(cfg(data, out, **FCA, **{"train.epochs": 2}))
    assert checksums(out) == before
    ckpt["model"][key] = original
    torch.save(ckpt, last)
    assert fit(cfg(data, out, **FCA, **{"train.epochs": 2}))["epochs"] == 2  # the true filters resume


def test_resume_with_another_frequency_selection_is_still_a_config_refusal(data, finished_fca, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_fca, out)
    with pytest.raises(StructureChangedError, match="model.freq=null"):
        fit(cfg(data, out, **FCA, **{"train.epochs": 2, "model.freq": "low4"}))


def test_mid_epoch_resume_at_another_world_size_keeps_the_epoch_metrics_exact(data, tmp_path, capsys):
    reference = tmp_path / "ref"
    fit(cfg(data, reference))
    ref_row = json.loads((reference / "metrics.jsonl").read_text())
    out = tmp_path / "run"
    assert fit(cfg(data, out, **{"debug.signal_after_steps": 3})) == {"status": "preempted"}
    last = out / "checkpoints" / "last.pth"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["step_in_epoch"] == 3
    # Pretend it was written by 2 processes (same global batch): their running sums split unevenly, so that
    # keeping only one rank's would change the averages.
    sums = ckpt["meter"][0]["sums"]
    other = torch.zeros_like(sums)
    other[LOSS_SUM] = sums[LOSS_SUM]
    mine = sums.clone()
    mine[LOSS_SUM] = 0.0
    assert mine[COUNT] == 12
    ckpt["meter"] = [{"sums": mine, "first_bad": ckpt["meter"][0]["first_bad"]},
                     {"sums": other, "first_bad": ckpt["meter"][0]["first_bad"]}]
    ckpt["rng"] = ckpt["rng"] * 2
    ckpt["world_size"] = 2
    torch.save(ckpt, last)
    capsys.readouterr()
    fit(cfg(data, out))
    logged = capsys.readouterr().out
    assert "resuming epoch 1 mid-way at world size 1 (checkpoint: 2)" in logged
    row = json.loads((out / "metrics.jsonl").read_text())
    assert (row["train_loss"], row["train_top1"]) == (ref_row["train_loss"], ref_row["train_top1"])


def test_resume_from_another_run_gives_a_best_pth_matching_the_summary(data, finished, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(finished, src)
    capsys.readouterr()
    # its best.pth holds epoch 1, the best the resumed state names: copied at once
    summary = fit(cfg(data, tmp_path / "a", **{"train.epochs": 2}), resume=str(src / "checkpoints/last.pth"))
    assert "best.pth: copied" in capsys.readouterr().out
    best = torch.load(tmp_path / "a/checkpoints/best.pth", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] and best["val"]["top1"] == summary["best_top1"]
    # without it, the best is tracked again from the resumed epoch: best.pth is this run's own best
    (src / "checkpoints/best.pth").unlink()
    summary = fit(cfg(data, tmp_path / "b", **{"train.epochs": 2}), resume=str(src / "checkpoints/last.pth"))
    assert "cannot be copied (missing, or of another epoch): the best epoch is tracked again from epoch 2" in \
        capsys.readouterr().out
    best = torch.load(tmp_path / "b/checkpoints/best.pth", weights_only=True)
    assert summary["best_epoch"] == best["epoch"] == 2 and best["val"]["top1"] == summary["best_top1"]


def test_checkpoints_carry_the_model_description_and_classes(finished):
    for name in ("last.pth", "best.pth"):
        ckpt = torch.load(finished / "checkpoints" / name, weights_only=True)
        # input_size only for the models whose layers follow it (FCA's DCT sizes)
        assert ckpt["arch"] == {"name": "resnet18", "num_classes": 3, "kwargs": {"widths": [16, 16, 32, 32]}}
        assert ckpt["classes"] == ["class0", "class1", "class2"]
