"""Smoke runs of ``python -m scripts.bench`` at tiny sizes (``--quick``): each sub-command runs end to end,
prints ratios and writes a Markdown report with the machine description and the exact command. The figures
themselves are not checked (except where two formulations must compute the same numbers). ``gpu`` runs as
``python -m scripts.bench`` in a process of its own; the others call its ``main`` in this process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(*args: str, expect: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _main(*args: str) -> None:
    """``scripts.bench.main(ARGS)`` in this process, which must return 0: warnings ignored (as ENV does for
    the subprocess) and the thread count it sets put back."""
    from scripts.bench import main

    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(list(args)) == 0
    finally:
        torch.set_num_threads(threads)


def _report(path: Path, *needles: str) -> str:
    text = path.read_text()
    assert text.startswith("# ") and "CPU:" in text and "torch " in text and "| " in text
    assert "python -m scripts.bench " in text  # the exact command is recorded
    for n in needles:
        assert n in text, n
    return text


@pytest.mark.slow
def test_bench_data_quick(tmp_path):
    out = tmp_path / "data.md"
    _main("data", "--quick", "--out", str(out))
    text = _report(out, "fast (ours)", "reference", "DataLoader")
    assert re.search(r"\*\*\d+\.\d\dx\*\*", text)  # a measured ratio


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "train.md"
    _main("train", "--quick", "--threads", "1", "--models", "resnet18,senet18,fcanet18", "--out", str(out))
    _report(out, "resnet18", "senet18", "fcanet18", "vs resnet18")


@pytest.mark.slow
def test_bench_trainer_quick(tmp_path):
    out = tmp_path / "trainer.md"
    _main("trainer", "--quick", "--threads", "1", "--out", str(out))
    _report(out, "ours (fast pipeline)", "reference recipe")


@pytest.mark.slow
def test_bench_attention_quick(tmp_path):
    out = tmp_path / "attention.md"
    _main("attention", "--quick", "--threads", "1", "--out", str(out))
    text = _report(out, "Fig. 3 sum(x * weight)", "DCTPooling (ours)", "FCA (ours)", "FcaNet-50 / SENet-50")
    # our pooling computes the same numbers as the Fig. 3 formulation
    diffs = re.findall(r"max abs diff ours vs Fig. 3: ([0-9.e+-]+)", text)
    assert diffs and all(float(d) < 1e-3 for d in diffs)


@pytest.mark.slow
def test_bench_gpu_quick(tmp_path):
    out = tmp_path / "gpu.md"
    proc = _run("gpu", "--quick", "--threads", "1", "--out", str(out))
    text = _report(out, "## 1. Training step", "## 2. Pooling", "## 3. Whole trainer", "fcanet50", "senet50",
                   "FcaNet-50 / SENet-50 eager", "synthetic data", "JPEGs, pipeline fast",
                   "JPEGs, torchvision reference loop", "Total wall time")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    if not torch.cuda.is_available():  # CUDA-only rows say so instead of a figure
        assert "needs CUDA" in rows["fcanet50 compiled"] and "needs CUDA" in rows["resnet50 compiled"]
        gpu_row = next(line for line in text.splitlines() if "pipeline gpu" in line)
        assert "needs CUDA" in gpu_row
    # measured figures: numbers where the rows ran, and a ratio of the trainer to its own step
    assert re.search(r"\| fcanet50 \| \d+ \| \d+-\d+ \| \d\.\d{3}", text)
    synth = next(line for line in text.splitlines() if line.startswith("| synthetic data"))
    assert re.search(r"\| \d+ \| \d+\.\d\d \|", synth), synth
    assert "FcaNet-50 / SENet-50 eager" in proc.stdout


@pytest.mark.parametrize("args,msg", [
    (["data", "--sizes", "500by375"], "--sizes"),
    (["data", "--crop", "inception"], "--crop"),
    (["train", "--device", "cuda:7"], "CUDA"),
    (["trainer", "--images", "4", "--batch", "4"], "--images"),
    (["attention", "--freq", "top3"], "--freq"),
    (["attention", "--freq", "xyz"], "--freq"),
    (["attention", "--threads", "-1"], "--threads"),
    (["gpu", "--compile-models", "fcanet51"], "fcanet51"),
    (["gpu", "--batches", "64,big"], "--batches"),
    (["gpu", "--sizes", "10x"], "--sizes"),
])
def test_bad_arguments_one_line_error(args, msg, capsys):
    from scripts.bench import main
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1, err


def test_subcommands_share_option_groups():
    """The shared groups are declared once (parent parsers) and present on every sub-command that needs them."""
    from scripts.bench import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert set(sub) == {"data", "train", "trainer", "attention", "gpu"}
    for name, p in sub.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--out", "--quick"} <= opts, name
        if name != "data":
            assert {"--device", "--threads"} <= opts, name


def test_the_timed_step_uses_the_trainers_optimizer_and_scaler(monkeypatch):
    """The benchmarks time the trainer's step: fused SGD on CUDA (the for-each one would make the fp16 scaler
    sync the host every step), the trainer's loss scaler."""
    from engine import builders
    from scripts.bench.common import make_train_step
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5))
    assert builders.make_sgd(model, 0.1, torch.device("cuda")).defaults["fused"] is True  # built, not stepped
    assert builders.make_sgd(model, 0.1, torch.device("cpu")).defaults["fused"] is None
    made = []
    real_sgd, real_scaler = builders.make_sgd, builders.make_scaler
    monkeypatch.setattr(builders, "make_sgd", lambda *a, **k: made.append(real_sgd(*a, **k)) or made[-1])
    monkeypatch.setattr(builders, "make_scaler", lambda amp: made.append(real_scaler(amp)) or made[-1])
    step = make_train_step(model, torch.device("cpu"), "fp32", channels_last=False)
    before = model[3].weight.detach().clone()
    loss = step(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 3]))
    assert torch.isfinite(loss) and not torch.equal(before, model[3].weight)
    assert [type(m) for m in made] == [torch.optim.SGD, torch.amp.GradScaler]
    assert made[0].param_groups[0]["momentum"] == 0.9 and not made[1].is_enabled()
