"""Smoke runs of the benchmark scripts at tiny sizes (``--quick``): they run end to end, print ratios and
write a Markdown report with the machine description. The figures themselves are not checked."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(script: str, *args: str, expect: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _report(path: Path, *needles: str) -> str:
    text = path.read_text()
    assert text.startswith("# ") and "CPU:" in text and "torch " in text and "| " in text
    for n in needles:
        assert n in text, n
    return text


@pytest.mark.slow
def test_benchmark_data_quick(tmp_path):
    out = tmp_path / "data.md"
    _run("benchmark.py", "data", "--quick", "--out", str(out))
    text = _report(out, "fast (ours)", "reference", "DataLoader")
    assert re.search(r"\*\*\d+\.\d\dx\*\*", text)  # a measured ratio


@pytest.mark.slow
def test_benchmark_train_quick(tmp_path):
    out = tmp_path / "train.md"
    _run("benchmark.py", "train", "--quick", "--threads", "1", "--models", "resnet18,senet18,fcanet18",
         "--out", str(out))
    _report(out, "resnet18", "senet18", "fcanet18", "vs resnet18")


@pytest.mark.slow
def test_benchmark_trainer_quick(tmp_path):
    out = tmp_path / "trainer.md"
    _run("benchmark.py", "trainer", "--quick", "--threads", "1", "--out", str(out))
    _report(out, "ours (fast pipeline)", "reference recipe")


@pytest.mark.slow
def test_bench_attention_quick(tmp_path):
    out = tmp_path / "attention.md"
    _run("bench_attention.py", "--quick", "--threads", "1", "--out", str(out))
    text = _report(out, "Fig. 3 sum(x * weight)", "DCTPooling (ours)", "FCA (ours)", "FcaNet-50 / SENet-50")
    # our pooling computes the same numbers as the Fig. 3 formulation
    for diff in re.findall(r"max abs diff ours vs Fig. 3: ([0-9.e+-]+)", text):
        assert float(diff) < 1e-3


@pytest.mark.parametrize("script,args,msg", [
    ("benchmark", ["data", "--sizes", "500by375"], "--sizes"),
    ("benchmark", ["data", "--crop", "inception"], "--crop"),
    ("benchmark", ["train", "--device", "cuda:7"], "CUDA"),
    ("benchmark", ["trainer", "--images", "4", "--batch", "4"], "--images"),
    ("bench_attention", ["--freq", "top3"], "--freq"),
    ("bench_attention", ["--freq", "xyz"], "--freq"),
])
def test_bad_arguments_one_line_error(script, args, msg, capsys):
    import importlib

    import torch
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    mod = importlib.import_module(script)  # scripts/ is on the test path (pytest.ini)
    assert mod.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1, err
