"""Where ``python -m scripts.bench`` writes: the committed reference reports (results/benchmarks/*.md) change only
with ``--publish`` (never from ``--quick``, and gpu.md only from CUDA figures) or an explicit ``--out``; a
``--quick`` smoke run writes to a temporary folder and prints no target verdict on its meaningless figures."""
from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

import pytest
import torch

from scripts.bench import main
from scripts.bench.common import RESULTS, ROOT


def _hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.glob("*"))}


@pytest.mark.parametrize("args,needle", [
    (["data", "--quick", "--publish"], "--publish with --quick"),
    (["attention", "--quick", "--publish"], "never published"),
    (["train", "--publish", "--out", "x.md"], "either --publish or --out"),
])
def test_publish_refuses_smoke_runs_and_out(args, needle, capsys):
    before = _hashes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err
    assert _hashes() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_report_is_never_published_from_cpu_figures(capsys):
    existed = (RESULTS / "gpu.md").exists()
    assert main(["gpu", "--publish", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "results/benchmarks/gpu.md holds GPU figures" in err and len(err.splitlines()) == 1, err
    assert (RESULTS / "gpu.md").exists() == existed


def _quick_train(capsys, models: str) -> tuple[str, str]:
    """Run ``train --quick`` in-process without --out; check nothing committed changed; return (stdout, report)."""
    before = _hashes()
    runs = ROOT / "runs" / "benchmarks"
    runs_before = sorted(runs.glob("*")) if runs.exists() else []
    threads = torch.get_num_threads()
    try:  # one intra-op thread: far faster on shared cores; restored for the other tests of this process
        assert main(["train", "--quick", "--models", models, "--image-size", "16", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert _hashes() == before and (sorted(runs.glob("*")) if runs.exists() else []) == runs_before
    written = Path(re.search(r"^wrote (\S+)", out, re.M).group(1))
    assert written.is_relative_to(Path(tempfile.gettempdir())) and written.name == "train.md"
    assert "results/benchmarks/ changes only with --publish" in out
    text = written.read_text()
    written.unlink()
    written.parent.rmdir()
    assert "Smoke run (`--quick`)" in text
    return out, text


@pytest.mark.slow
def test_quick_run_writes_a_temporary_report(capsys):
    _quick_train(capsys, "resnet18,fcanet18")


@pytest.mark.slow
def test_quick_run_prints_no_target_verdict(capsys):
    out, text = _quick_train(capsys, "senet50,fcanet50")
    assert "FcaNet-50 / SENet-50 training throughput" in text
    for t in (out, text):
        assert "no verdict on a --quick smoke run" in t and "within the" not in t


def test_verdicts_only_on_real_runs():
    from argparse import Namespace

    from scripts.bench.common import target_verdict
    assert target_verdict(Namespace(quick=False), True, "the 3% target") == "within the 3% target"
    assert target_verdict(Namespace(quick=False), False, "the 3% target") == "NOT within the 3% target"
    assert target_verdict(Namespace(quick=True), False, "the 3% target") == "no verdict on a --quick smoke run"


def test_report_destinations(tmp_path):
    from argparse import Namespace

    from scripts.bench.common import report_path
    assert report_path(Namespace(out=str(tmp_path / "a.md"), publish=False, quick=True), "x.md") == tmp_path / "a.md"
    assert report_path(Namespace(out=None, publish=True, quick=False), "x.md") == RESULTS / "x.md"
    assert report_path(Namespace(out=None, publish=False, quick=False), "x.md") == ROOT / "runs" / "benchmarks" / "x.md"
    quick = report_path(Namespace(out=None, publish=False, quick=True), "x.md")
    assert quick.parent.is_dir() and quick.is_relative_to(Path(tempfile.gettempdir()))
    quick.parent.rmdir()
