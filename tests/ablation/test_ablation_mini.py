"""A reduced mini study end to end with the real trainer (train_imagenet.py on the digits demo data).

The full mini study (configs/ablation/mini.yaml, committed under results/mini/) takes tens of minutes; this test
runs the same pipeline on a reduced copy of the preset (a 2x2 grid, 2 seeds, 1-epoch runs capped at a few steps):
a base and a control per seed, single-frequency fine-tunes in two parallel runners, Top-k from the measured grid,
the (0,0) reference of Low-k k=1, and collect, then checks the tables' statistics columns, protocol flags and
provenance.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_mini_study_end_to_end(tmp_path):
    preset = yaml.safe_load((REPO / "configs/ablation/mini.yaml").read_text())
    preset.update(name="mini_ci", grid=2, seeds=2)
    preset["common_overrides"]["train.max_steps_per_epoch"] = 4
    preset["base"]["epochs"] = 1
    for study in ("single_freq", "topk", "lowk", "botk"):
        preset["studies"][study]["epochs"] = 1
    for study in ("topk", "lowk", "botk"):
        preset["studies"][study]["ks"] = [1, 2]
    path = tmp_path / "mini_ci.yaml"
    path.write_text(yaml.safe_dump(preset))
    out, runs = tmp_path / "res", tmp_path / "runs"

    def ablation(*args):
        where = ["--runs-dir", str(runs)] + (["--output", str(out)] if args[0] == "collect" else [])
        p = subprocess.run([sys.executable, "-m", "ablation", *args, "--preset", str(path), *where],
                           cwd=REPO, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    text = ablation("run", "--study", "single_freq", "--quiet", "--jobs", "2")
    assert "12/12 runs complete" in text  # per seed: base, control, 2x2 grid
    assert "measured" in ablation("plan", "--study", "topk")
    ablation("run", "--study", "topk", "--quiet")
    # the k-studies start from each seed's base: Low-1 is the (0,0) fine-tune itself (shared, not trained again)
    text = ablation("run", "--study", "lowk", "--quiet")
    assert text.count("[ablation] done lowk/published/low2-s") == 2 and "done lowk/published/low1" not in text
    assert "complete 6, ran 0" in ablation("run", "--study", "topk")  # idempotent: 2 bases + 2 k x 2 seeds
    for study in ("single_freq", "topk"):
        ablation("collect", "--study", study)

    rows = list(csv.DictReader((out / "single_freq" / "table.csv").read_text().splitlines()))
    assert len(rows) == 4 and all(r["n"] == "2" for r in rows)
    for r in rows:
        lo, mean, hi = (float(r[f"best_top1_{k}"]) for k in ("ci_low", "mean", "ci_high"))
        assert lo <= mean <= hi and 0.0 <= mean <= 100.0
        assert float(r["best_top1_mean"]) >= float(r["final_top1_mean"]) - 1e-6  # best of the evaluations
    md = (out / "single_freq" / "table.md").read_text()
    for needle in ("2x2 grid", "Fine-tune minus control", "Best vs final", "Fine-tune recipe", "Precision", "fp32",
                   "paired t-test", "Stability of the two-step criterion", "Provenance", "torch ",
                   "Numerics differ", "Plateau criterion", "Does the frequency matter?", "Power of this table",
                   "one validation image is 0.28 points (360 images"):
        assert needle in md, needle
    assert (out / "single_freq" / "fig4_heatmap.png").stat().st_size > 1000
    k_rows = list(csv.DictReader((out / "topk" / "table.csv").read_text().splitlines()))
    assert [r["k"] for r in k_rows] == ["1", "2"] and all(r["freq_source"] == "measured" for r in k_rows)
    # every row but (0,0) itself is compared with the Low-k k=1 runs, paired over both seeds
    assert all(r["vs_00_n"] == "2" or r["frequencies"] == "[[0, 0]]" for r in k_rows)
    topk_md = (out / "topk" / "table.md").read_text()
    assert "the Low-k study's k = 1 runs" in topk_md
    assert (out / "topk" / "topk_curve.png").stat().st_size > 1000
