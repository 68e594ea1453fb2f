"""Atomic checkpoints, corruption detection and fallback to the previous checkpoint."""
from __future__ import annotations

import random
from dataclasses import asdict

import numpy as np
import pytest
import torch

from engine import checkpoint as ck
from engine.errors import CheckpointError
from engine.fileio import atomic_save


def _ckpt(value: float) -> dict:
    """A minimal well-formed training checkpoint at global step ``value``."""
    step = int(value)
    meter = {"sums": torch.zeros(5, dtype=torch.float64), "first_bad": torch.tensor(2 ** 62)}
    return {"format": ck.FORMAT, "model": {"w": torch.full((3,), value)},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 0, "step_in_epoch": step,
            "global_step": step, "config": {}, "scaler": {},
            "steps_per_epoch": 10, "world_size": 1, "meter": [meter], "rng": [ck.get_rng_state()],
            "state": asdict(ck.TrainState(step_in_epoch=step, global_step=step)),
            "arch": {"name": "resnet18", "num_classes": 3, "kwargs": {}}, "classes": None}


def test_crash_during_save_keeps_the_old_file(tmp_path, monkeypatch):
    ck.save_last(_ckpt(1), tmp_path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")  # some bytes hit the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_last(_ckpt(2), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.load_checkpoint(tmp_path / "last.pth")["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temp file left behind


def test_crash_between_renames_falls_back_to_prev(tmp_path, monkeypatch):
    ck.save_last(_ckpt(1), tmp_path)
    ck.save_last(_ckpt(2), tmp_path)
    assert ck.load_checkpoint(tmp_path / "last.prev.pth")["global_step"] == 1
    # simulate a crash after last.pth became last.prev.pth but before the new file was renamed in
    (tmp_path / "last.pth").replace(tmp_path / "last.prev.pth")
    found, path = ck.find_resumable(tmp_path, log=lambda m: None)
    assert path.name == "last.prev.pth" and found["global_step"] == 2


def test_truncated_checkpoint_is_detected_and_resume_falls_back(tmp_path):
    ck.save_last(_ckpt(1), tmp_path)
    ck.save_last(_ckpt(2), tmp_path)
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pth is truncated or corrupt \("):
        ck.load_checkpoint(tmp_path / "last.pth")
    logs = []
    found, path = ck.find_resumable(tmp_path, log=logs.append)
    assert path.name == "last.prev.pth" and found["global_step"] == 1
    assert "last.pth is truncated or corrupt" in logs[0]
    # the unusable file is moved aside, so the next save cannot rotate it onto the good last.prev.pth
    assert not (tmp_path / "last.pth").exists() and (tmp_path / "last.corrupt.pth").exists()
    ck.save_last(_ckpt(3), tmp_path)
    assert ck.load_checkpoint(tmp_path / "last.prev.pth")["global_step"] == 1
    (tmp_path / "last.pth").unlink()
    (tmp_path / "last.prev.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.find_resumable(tmp_path, log=lambda m: None)
    assert ck.find_resumable(tmp_path / "empty") is None


def test_foreign_file_is_not_a_training_checkpoint(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        ck.load_checkpoint(tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pth")


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": ck.get_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
