"""``models.load_checkpoint(path)``: a trained model rebuilt from one of the trainer's checkpoint files alone
(no config, no hidden options such as the demo's input_size=32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from conftest import BASE_CONFIG, tiny_overrides, write_tiny_imagefolder
from engine.builders import build_model
from engine.config import load_config
from engine.trainer import fit

# The demo's shape of problem: 32x32 inputs, CIFAR stem, a 4x4 frequency grid, explicit frequencies.
FCA = {"model.name": "fcanet18", "model.kwargs": "{widths: [16, 16, 32, 32], stem: cifar, grid: 4}",
       "model.freq": "[[0, 0], [0, 1], [1, 0], [1, 1]]", "train.epochs": 1, "train.max_steps_per_epoch": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("loadckpt")
    data = write_tiny_imagefolder(tmp / "data")
    fit(load_config(BASE_CONFIG, tiny_overrides(data, tmp / "run", **FCA)))
    return data, tmp / "run"


@pytest.mark.parametrize("name", ["best.pth", "last.pth"])
def test_a_checkpoint_rebuilds_its_model_with_weights(run, name):
    data, out = run
    model = models.load_checkpoint(out / "checkpoints" / name)
    assert not model.training
    reference = build_model(load_config(BASE_CONFIG, tiny_overrides(data, out, **FCA)))
    reference.load_state_dict(torch.load(out / "checkpoints" / name, weights_only=True)["model"])
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model.fc.out_features == 3 and model.conv1.kernel_size == (3, 3)  # classes and the CIFAR stem


def test_files_that_do_not_describe_a_model_are_one_line(run, tmp_path):
    _, out = run
    state = torch.load(out / "checkpoints/best.pth", weights_only=True)
    torch.save(state["model"], tmp_path / "bare.pth")  # e.g. torchvision's or the authors' layout
    torch.save(dict(state, arch=dict(state["arch"], name="fcanet50")), tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    cases = {"bare.pth": "does not describe its model (no 'arch' entry)",
             "other.pth": "shape mismatch for layer1.0.conv1.weight",
             "garbage.pth": "is not a PyTorch checkpoint",
             "missing.pth": "checkpoint not found"}
    for name, needle in cases.items():
        with pytest.raises(ValueError) as e:
            models.load_checkpoint(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value)
