"""Exact distributed evaluation (world sizes 1, 2, 3 on a prime-size val set) and eval_imagenet.py on foreign
checkpoint layouts. (Training under torchrun: test_trainer.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import BASE_CONFIG, run_main, tiny_overrides, torchrun, write_tiny_imagefolder
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


@pytest.mark.slow
def test_exact_eval_is_identical_for_world_sizes_1_2_3(trained, tmp_path, capsys):
    data, out = trained
    results = {}
    for world in (1, 2, 3):
        args = ["--config", str(BASE_CONFIG), "--checkpoint", str(out / "checkpoints/last.pth"),
                "--output", str(tmp_path / f"eval{world}.json")]
        args += tiny_overrides(data, out, **{"data.val_batch_size": 2})
        # world 1: the entry point in this process (one process, no torchrun)
        proc = run_main("eval_imagenet.py", args, capsys) if world == 1 else torchrun(world, "eval_imagenet.py", args)
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
