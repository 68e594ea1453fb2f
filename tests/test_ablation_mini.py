"""The `mini` preset end to end with the real trainer (train_imagenet.py on the digits demo data).

One slower test: the first Top-k point trained for real (fork launcher: the preset's default), a re-run that
trains nothing, then collect with the other five points missing. The full run of all four studies is what
results/mini/ holds; the subprocess launcher is exercised by tests/test_ablation_run.py.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablation.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mini_topk_end_to_end(tmp_path, capsys):
    out = tmp_path / "mini"
    common = ["--study", "topk", "--preset", "mini", "--output", str(out)]
    # a separate process: the fork launcher must not fork this (threaded) pytest process
    p = subprocess.run([sys.executable, "-m", "ablation", "run", *common, "--limit", "1", "--quiet"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ran 1" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert main(["run", *common, "--limit", "0"]) == 0  # idempotent: nothing to do
    assert "complete 1, ran 0" in capsys.readouterr().out
    run_dir = out / "runs" / "topk" / "published" / "top1-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0.0 <= summary["final_top1"] <= 100.0
    meta = json.loads((run_dir / "ablation.json").read_text())
    assert meta["freq_source"] == "published" and meta["frequencies"] == [[0, 0]]
    assert (run_dir / "checkpoints" / "last.pth").exists()
    assert main(["collect", *common]) == 0
    rows = list(csv.DictReader((out / "topk" / "table.csv").read_text().splitlines()))
    assert [r["n"] for r in rows] == ["1", "0", "0", "0", "0", "0"]
    assert float(rows[0]["top1_mean"]) == pytest.approx(summary["final_top1"], abs=1e-4)
    assert rows[1]["top1_mean"] == ""
    assert (out / "topk" / "topk_curve.png").stat().st_size > 1000
    assert "missing" in (out / "topk" / "table.md").read_text()
