"""Trainer pieces checked without a training run: what a refused config leaves behind, config.yaml
replacement, optimizer implementation flags on resume."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from conftest import BASE_CONFIG, tiny_overrides
from engine import fileio
from engine.builders import load_optimizer_state
from engine.config import ConfigError, load_config
from engine.rundir import write_config
from engine.trainer import fit


@pytest.mark.parametrize("override", [
    {"train.amp": "fp16"},  # refused by the device check on a CPU machine
    {"model.kwargs": "{widths: [16, 16, 32]}"},  # refused by the model's constructor (4 stages)
    pytest.param({"data.pipeline": "gpu"}, marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                    reason="nvjpeg works here")),
])
def test_a_refused_config_leaves_no_run_directory(tmp_path, tiny_imagefolder, override):
    if override.get("train.amp") == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is accepted on a CUDA machine")
    out = tmp_path / "runs" / "x"
    cfg = load_config(BASE_CONFIG, tiny_overrides(tiny_imagefolder, out, **override))
    with pytest.raises(ConfigError, match=f"config key '{next(iter(override))}'"):
        fit(cfg)
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_config_yaml_is_replaced_after_the_old_one_is_kept(tmp_path):
    write_config(tmp_path, "a: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    write_config(tmp_path, "a: 2\n")
    write_config(tmp_path, "a: 3\n")
    assert [(tmp_path / f).read_text() for f in ("config.1.yaml", "config.2.yaml", "config.yaml")] == \
        ["a: 1\n", "a: 2\n", "a: 3\n"]


@pytest.mark.parametrize("failing", ["config.1.yaml", "config.yaml"])  # the copy's write, config.yaml's write
def test_a_failed_config_write_keeps_config_yaml(tmp_path, monkeypatch, failing):
    write_config(tmp_path, "old: 1\n")
    real_fsync = os.fsync

    def fsync(fd):  # a full disk while writing `failing` (its temp file .<name>.tmp<pid>)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{failing}.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(fileio.WriteError, match=rf"cannot write \S*/{failing}: \[Errno 28\]") as e:
        write_config(tmp_path, "new: 2\n")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert (tmp_path / "config.yaml").read_text() == "old: 1\n"  # never renamed away
    assert not any(fileio.TEMP_RE.match(p.name) for p in tmp_path.iterdir())
    if failing == "config.yaml":
        assert (tmp_path / "config.1.yaml").read_text() == "old: 1\n"


def test_resume_keeps_the_optimizers_own_implementation_flags():
    """A checkpoint saved by a for-each SGD (e.g. on a CPU machine) must not turn a fused SGD (what the trainer
    builds on CUDA) into a for-each one; the saved state (momentum buffers, lr) is loaded."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    saved_opt = torch.optim.SGD(params, lr=0.3, momentum=0.9, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    saved_opt.step()
    fresh = torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
    load_optimizer_state(fresh, saved_opt.state_dict())
    group = fresh.param_groups[0]
    assert (group["fused"], group["foreach"], group["differentiable"]) == (True, None, False)
    assert group["lr"] == 0.3
    assert torch.equal(fresh.state[params[0]]["momentum_buffer"], torch.ones(4, 3))
    fresh.step()  # the fused step runs with the loaded state
