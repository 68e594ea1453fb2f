"""Process-level contracts of the entry points (subprocesses, with timeouts that fail instead of hanging):
trivial commands answer without importing torch, Ctrl-C checkpoints and says how to resume (exit 130), and a
relaunch on a read-only file system is one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BASE_CONFIG, ROOT, subprocess_env, tiny_overrides, write_tiny_imagefolder

TRIVIAL = """
import contextlib, io, json, sys
from engine.entrypoints import eval_main, train_main
results = {}
for name, main, argv in [
        ("help", train_main, ["--help"]), ("eval_help", eval_main, ["--help"]),
        ("list_models", train_main, ["--list-models"]), ("list_keys", train_main, ["--list-keys"]),
        ("print_config", train_main, ["--config", CONFIG, "--print-config", "train.epochs=7"]),
        ("not_found", train_main, ["--config", "no/such.yaml"]),
        ("bad_key", train_main, ["--config", CONFIG, "train.epoch=3"]),
        ("ignored_option", train_main, ["--config", CONFIG, "model.name=resnet18", "model.kwargs={grid: 4}"])]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results[name] = [rc, out.getvalue()]
results["torch_imported"] = [m for m in ("torch", "torchvision", "numpy") if m in sys.modules]
print(json.dumps(results))
"""


def test_trivial_commands_answer_without_importing_torch():
    proc = subprocess.run([sys.executable, "-c", TRIVIAL.replace("CONFIG", repr(str(BASE_CONFIG)))], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r.pop("torch_imported") == []
    assert r["help"][0] == 0 and r["help"][1].split("\n\n")[1] == (
        "Train an ImageNet-style classifier from a YAML config (1 process, or DDP under torchrun).")
    assert "--list-models" in r["help"][1] and "--list-keys" in r["help"][1]
    assert r["eval_help"][0] == 0 and "Exact top-1/top-5 of a checkpoint" in r["eval_help"][1]
    rc, text = r["list_models"]
    assert rc == 0 and any(ln.split()[:1] == ["fcanet50"] and ln.endswith("FCA (frequency channel attention)")
                           for ln in text.splitlines())
    rc, text = r["list_keys"]
    assert rc == 0 and "train.epochs: int; default 100; >= 1\n    epochs to train" in text
    lines = text.splitlines()  # every key, then its help line
    assert len(lines) > 40
    assert all(not k.startswith(" ") and h.startswith("    ") for k, h in zip(lines[::2], lines[1::2], strict=True))
    assert r["print_config"][0] == 0 and "epochs: 7" in r["print_config"][1]
    assert r["not_found"] == [2, "error: config file not found: no/such.yaml\n"]
    assert r["bad_key"] == [2, "error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)\n"]
    assert r["ignored_option"][0] == 2 and "resnet18 has no frequency channel attention, so grid would be ignored" \
        in r["ignored_option"][1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_imagefolder(tmp_path_factory.mktemp("round2") / "data")


@pytest.mark.slow
def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(data, tmp_path):
    out = tmp_path / "run"
    # workers=1: a terminal's Ctrl-C reaches the DataLoader worker too (the whole process group gets SIGINT)
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(BASE_CONFIG)] + tiny_overrides(
        data, out, **{"train.epochs": 500, "data.workers": 1})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, like a terminal job
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/500:"):  # a finished epoch: training is under way, workers are up
                break
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    lines = [ln for ln in stdout.splitlines() if ln.startswith("interrupted (Ctrl-C): checkpointed at epoch ")]
    assert len(lines) == 1 and lines[0].endswith("; run the same command again to resume from there"), stdout
    ck = torch.load(out / "checkpoints/last.pth", weights_only=True)
    assert ck["global_step"] >= 6 and f"(global step {ck['global_step']})" in lines[0]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_relaunch_on_a_read_only_mount_is_one_line(data, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); tests/engine/test_rundir.py simulates it")
    try:
        from engine.config import load_config
        from engine.trainer import fit
        out = mnt / "run"
        fit(load_config(BASE_CONFIG, tiny_overrides(data, out, **{"train.epochs": 1})))
        args = [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(BASE_CONFIG)]
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        proc = subprocess.run(args + tiny_overrides(data, out, **{"train.epochs": 2}), cwd=ROOT,
                              env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [f"error: cannot write {out}: [Errno 30] Read-only file system"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
