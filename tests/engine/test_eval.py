"""Exact distributed evaluation (world sizes 1, 2, 3 on a prime-size val set), a 2-process gloo training
run under torchrun, and eval_imagenet.py on foreign checkpoint layouts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import BASE_CONFIG, ROOT, subprocess_env, tiny_overrides, write_tiny_imagefolder
from engine.config import load_config
from engine.trainer import fit

VAL = 13  # prime: no world size > 1 divides it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = write_tiny_imagefolder(tmp / "data", val_total=VAL)
    out = tmp / "run"
    fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **{"train.epochs": 1, "data.val_batch_size": 2})))
    return data, out


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script)] + args
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_exact_eval_is_identical_for_world_sizes_1_2_3(trained, tmp_path):
    data, out = trained
    results = {}
    for world in (1, 2, 3):
        args = ["--config", str(BASE_CONFIG), "--checkpoint", str(out / "checkpoints/last.pth"),
                "--output", str(tmp_path / f"eval{world}.json")]
        args += tiny_overrides(data, out, **{"data.val_batch_size": 2})
        if world == 1:
            proc = subprocess.run([sys.executable, str(ROOT / "eval_imagenet.py")] + args, cwd=ROOT,
                                  env=subprocess_env(), capture_output=True, text=True, timeout=120)
        else:
            proc = torchrun(world, "eval_imagenet.py", args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(printed) == 1  # rank 0 only
        written = json.loads((tmp_path / f"eval{world}.json").read_text())
        assert written == printed[0] and written["world_size"] == world
        results[world] = written
    for world in (2, 3):
        for key in ("top1", "top5", "count", "correct1", "correct5"):
            assert results[world][key] == results[1][key], (world, key)
        assert results[world]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[1]["count"] == VAL
    assert results[1]["top1"] == pytest.approx(100.0 * results[1]["correct1"] / VAL)
    # and the same numbers as the trainer's own final evaluation
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_top1"] == results[1]["top1"] and summary["val_count"] == VAL


@pytest.mark.slow
def test_torchrun_two_process_gloo_training(trained, tmp_path):
    data, _ = trained
    out = tmp_path / "ddp"
    proc = torchrun(2, "train_imagenet.py", ["--config", str(BASE_CONFIG)] + tiny_overrides(
        data, out, **{"train.epochs": 1, "train.batch_size": 3, "train.checkpoint_every_steps": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("start training") == 1  # rank-0-only logging
    assert "global batch 6 / 256" in proc.stdout      # effective lr printed for the global batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_count"] == VAL and summary["epochs"] == 1
    ck = torch.load(out / "checkpoints/last.pth", weights_only=True)
    assert ck["global_step"] == 24 // 2 // 3 and len(ck["rng"]) == 2  # per-rank RNG states
    assert not any(k.startswith("module.") for k in ck["model"])      # unwrapped keys


def test_eval_accepts_foreign_layouts_and_rejects_wrong_model(trained, tmp_path, capsys):
    from engine.entrypoints import eval_main as main
    data, out = trained
    ours = torch.load(out / "checkpoints/last.pth", weights_only=True)["model"]
    foreign = tmp_path / "authors.pth"  # the authors' / DDP layout: module. prefixes in a state_dict wrapper
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours.items()}}, foreign)
    common = ["--config", str(BASE_CONFIG)]
    ov = tiny_overrides(data, tmp_path / "o", **{"data.val_batch_size": 5})
    assert main(common + ["--checkpoint", str(foreign)] + ov) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "o" / "eval_authors.json").is_file()
    assert main(common + ["--checkpoint", str(out / "checkpoints/best.pth")] + ov) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["count"] == b["count"] == VAL and a["top1"] == b["top1"]
    # a plain ResNet checkpoint evaluated as FcaNet: fresh attention would be meaningless
    assert main(common + ["--checkpoint", str(foreign)] + ov + ["model.name=fcanet18"]) == 2
    assert "lacks" in capsys.readouterr().err
    assert main(common + ["--checkpoint", str(tmp_path / "missing.pth")] + ov) == 2
    assert "error: --checkpoint" in capsys.readouterr().err
