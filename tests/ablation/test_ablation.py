"""Frequency ablations: plans, frequency sources, the ranking step, collect (no training here)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ablation.cli import main
from ablation.collect import collect
from ablation.errors import AblationError
from ablation.preset import load_preset as _load_preset
from ablation.studies import GRID_POINTS, build_plan
from models.dct import PUBLISHED_ORDERS, low_order, published_frequencies, rank_frequencies

REPO = Path(__file__).resolve().parents[2]
PAPER_GRID = {(int(r["u"]), int(r["v"])): float(r["top1_unrounded"])
              for r in csv.DictReader((REPO / "results/paper/fig4_single_frequency.csv").read_text().splitlines())}
KS = [1, 2, 4, 8, 16, 32]


def load_preset(name):
    return _load_preset(name)[0]


def fake_summary(run_dir: Path, top1: float, epochs: int, top5: float = 99.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(
        {"final_top1": top1, "final_top5": top5, "best_top1": top1, "epochs": epochs}))


def fill_grid(runs_root: Path, values: dict, epochs: int = 1, seed: int = 0) -> None:
    for (u, v), acc in values.items():
        fake_summary(runs_root / "single_freq" / f"u{u}v{v}-s{seed}", acc, epochs)


def plan_text(capsys, *args):
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def plan_lines(capsys, *args):
    assert main(["plan", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]


def test_plan_counts_and_frequencies(tmp_path, capsys):
    lines = plan_lines(capsys, "--study", "single_freq", "--preset", "imagenet", "--output", str(tmp_path))
    assert len(lines) == 49
    assert sorted(line.split()[0] for line in lines) == sorted(f"single_freq/u{u}v{v}-s0" for u, v in GRID_POINTS)
    assert all("model.init_checkpoint=" in line and "train.epochs=" in line for line in lines)
    for study, method in (("topk", "top"), ("lowk", "low"), ("botk", "bot")):
        plan = build_plan(study, "imagenet", runs_root=tmp_path / "runs")
        assert [r.meta["k"] for r in plan.runs] == KS
        for run in plan.runs:
            assert run.overrides["model.freq"] == [list(f) for f in published_frequencies(method, run.meta["k"])]
            assert run.meta["freq_source"] == "published" and "/published/" in run.name
        assert len(plan_lines(capsys, "--study", study, "--preset", "imagenet", "--output", str(tmp_path))) == 6


def test_mini_preset_uses_its_own_4x4_grid(tmp_path, capsys):
    """The mini preset's network sees 32/16/8/4-pixel maps (CIFAR stem at 32x32): a 4x4 grid, 16 single-frequency
    points, k up to 16, several seeds by default, and Top-k/Bot-k only from its own measured grid."""
    preset = load_preset("mini")
    assert preset.grid_size == 4 and preset.seeds >= 3
    lines = plan_lines(capsys, "--study", "single_freq", "--preset", "mini", "--output", str(tmp_path))
    assert len(lines) == 16 * preset.seeds
    assert sorted({line.split()[0].rsplit("-s", 1)[0] for line in lines}) == sorted(
        f"single_freq/u{u}v{v}" for u in range(4) for v in range(4))
    assert all('"grid":4' in line and '"stem":"cifar"' in line for line in lines)
    plan = build_plan("lowk", "mini", runs_root=tmp_path / "runs", seeds=1)
    assert [r.meta["k"] for r in plan.runs] == [1, 2, 4, 8, 16]
    assert plan.runs[-1].meta["frequencies"] == [list(f) for f in low_order(4)]
    for study in ("topk", "botk"):
        with pytest.raises(AblationError, match="4x4 frequency grid.*run --study single_freq first"):
            build_plan(study, "mini", runs_root=tmp_path / "runs")
    # every FCA stage of the planned network holds the grid (no stage is pooled up)
    run = build_plan("single_freq", "mini", runs_root=tmp_path / "runs", seeds=1).runs[1]
    from engine.config import load_config
    from engine.trainer import build_model
    model = build_model(load_config(REPO / run.config, run.override_args()))
    sizes = [m.dct_h for m in model.modules() if type(m).__name__ == "DCTPooling"]
    maps = [32, 16, 8, 4]
    assert sizes == [m for m in maps for _ in range(len(sizes) // 4)] and min(sizes) >= 4


def test_plan_base_dependency_and_gpu_hours(tmp_path, capsys):
    assert main(["plan", "--study", "single_freq", "--preset", "imagenet", "--output", str(tmp_path),
                 "--throughput", "1000"]) == 0
    out = capsys.readouterr().out
    assert "# dependency: single_freq/base" in out and "configs/imagenet/resnet50.yaml" in out
    # 100 + 49 * 20 epochs of 1,281,167 images at 1000 img/s
    expected = 1281167 * (100 + 49 * 20) / 1000 / 3600
    assert f"{expected:.4g} GPU-hours" in out
    plan = build_plan("single_freq", "imagenet", runs_root=tmp_path)
    assert plan.runs[1].overrides["optim.base_lr"] == 0.02 and plan.runs[1].epochs == 20
    assert "ASSUMED, not measured" not in out  # --throughput given
    assert "ASSUMED, not measured" in plan_text(capsys, "--study", "topk", "--preset", "imagenet")


def test_seeds_multiply_runs(tmp_path):
    plan = build_plan("botk", "imagenet", seeds=3, runs_root=tmp_path)
    assert len(plan.runs) == 18 and {r.overrides["seed"] for r in plan.runs} == {0, 1, 2}
    assert len({r.run_dir for r in plan.runs}) == 18
    assert build_plan("lowk", "mini", runs_root=tmp_path).seeds == load_preset("mini").seeds  # preset default


def test_ranking_on_paper_grid_reproduces_published_orders(tmp_path):
    runs = tmp_path / "runs"
    fill_grid(runs, PAPER_GRID, epochs=20)
    for study, method in (("topk", "top"), ("botk", "bot")):
        plan = build_plan(study, "imagenet", runs_root=runs)
        assert plan.freq_source == "measured"
        for run in plan.runs:
            assert run.meta["freq_source"] == "measured" and "/measured/" in run.name
            assert run.meta["frequencies"] == [list(f) for f in PUBLISHED_ORDERS[method][:run.meta["k"]]]
    # Low-k is a fixed order: never measured
    assert build_plan("lowk", "imagenet", runs_root=runs).freq_source == "published"
    # explicit published source
    assert build_plan("topk", "imagenet", runs_root=runs, freq_source="published").freq_source == "published"


def test_measured_source_needs_complete_grid(tmp_path):
    runs = tmp_path / "runs"
    partial = dict(list(PAPER_GRID.items())[:48])
    fill_grid(runs, partial, epochs=20)
    assert build_plan("topk", "imagenet", runs_root=runs).freq_source == "published"
    with pytest.raises(AblationError, match="48 are"):
        build_plan("topk", "imagenet", runs_root=runs, freq_source="measured")
    # a different grid gives a different (measured) order; seeds are averaged
    flipped = {k: -v for k, v in PAPER_GRID.items()}
    fill_grid(runs, flipped, seed=0, epochs=20)
    fill_grid(runs, flipped, seed=1, epochs=20)
    plan = build_plan("topk", "imagenet", runs_root=runs)
    assert plan.freq_source == "measured"
    expected = rank_frequencies(flipped, descending=True)[:32]
    assert plan.runs[-1].meta["frequencies"] == [list(f) for f in expected]
    assert expected[:5] == list(PUBLISHED_ORDERS["bot"][:5])  # flipped grid: Top-k = the paper's Bot-k


@pytest.mark.slow
def test_bad_input_one_line_errors(capsys):
    for args, needle in ((["plan", "--study", "nope", "--preset", "mini"], "unknown study 'nope'"),
                         (["plan", "--study", "topk", "--preset", "nope"], "unknown preset 'nope'"),
                         (["collect", "--study", "topk", "--preset", "mini", "--seeds", "0"], "--seeds"),
                         (["run", "--study", "topk", "--preset", "mini", "--seeds", "x"], "--seeds"),
                         (["frobnicate", "--study", "topk", "--preset", "mini"], "invalid choice")):
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse errors
            rc = exc.code
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (args, err)
    # and through the real entry point: no traceback
    p = subprocess.run([sys.executable, "-m", "ablation", "collect", "--study", "topk", "--preset", "nope"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: unknown preset 'nope'")
    assert len(p.stderr.strip().splitlines()) == 1


def test_collect_partial_results(tmp_path):
    out = tmp_path / "res"
    runs = out / "runs"
    fake_summary(runs / "single_freq" / "u0v0-s0", 91.5, 20, 99.1)
    fake_summary(runs / "single_freq" / "u0v0-s1", 92.5, 20, 99.3)
    fake_summary(runs / "single_freq" / "u3v4-s0", 90.0, 20)
    fake_summary(runs / "single_freq" / "u3v5-s0", 90.0, 19)  # fewer epochs than planned: incomplete
    assert main(["collect", "--study", "single_freq", "--preset", "imagenet", "--output", str(out),
                 "--seeds", "2"]) == 0
    d = out / "single_freq"
    rows = list(csv.DictReader((d / "table.csv").read_text().splitlines()))
    assert len(rows) == 49
    r00 = rows[0]
    assert (r00["u"], r00["v"], r00["n"]) == ("0", "0", "2")
    assert float(r00["best_top1_mean"]) == pytest.approx(92.0)
    assert float(r00["best_top1_std"]) == pytest.approx(0.7071, abs=1e-4)
    # 95% Student-t interval with 1 degree of freedom: mean ± 12.706 * std / sqrt(2)
    assert float(r00["best_top1_ci_high"]) == pytest.approx(92.0 + 12.7062 * 0.70711 / 2 ** 0.5, abs=1e-3)
    assert float(r00["diff_top1"]) == pytest.approx(92.0 - 76.69)
    r34 = rows[3 * 7 + 4]
    assert r34["n"] == "1" and r34["best_top1_std"] == "" and r34["best_top1_ci_low"] == ""  # n=1: no std, no CI
    assert r34["p_vs_00"] == ""  # one seed: no test
    r35 = rows[3 * 7 + 5]
    assert r35["n"] == "0" and r35["best_top1_mean"] == "" and r35["diff_top1"] == ""  # missing, not zero
    md = (d / "table.md").read_text()
    assert "92.00 ± 0.71 (n=2)" in md and "missing" in md and "76.69" in md
    for flag in ("Best vs final", "Precision", "Fine-tune lr", "per 256 images", "Baselines", "quoted from",
                 "Welch", "Holm"):
        assert flag in md, flag
    assert (d / "fig4_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    runs_csv = list(csv.DictReader((d / "runs.csv").read_text().splitlines()))
    assert len(runs_csv) == 1 + 98 and sum(r["status"] == "complete" for r in runs_csv) == 3

    fake_summary(runs / "topk" / "published" / "top4-s0", 93.0, 100, 99.5)
    assert main(["collect", "--study", "topk", "--preset", "imagenet", "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "topk" / "table.csv").read_text().splitlines()))
    assert [r["k"] for r in rows] == ["1", "2", "4", "8", "16", "32"]
    assert rows[2]["best_top1_mean"] == "93.0" and float(rows[2]["diff_top1"]) == pytest.approx(93.0 - 78.38)
    assert rows[0]["best_top1_mean"] == "" and all(r["freq_source"] == "published" for r in rows)
    md = (out / "topk" / "table.md").read_text()
    assert "| 4 | 93.00 (n=1) |  | 93.00 (n=1) | 99.50 (n=1) | best | n/a | 78.38 | +14.62 |" in md
    assert "| 1 | missing |  | missing | missing | n/a | (0,0) | 77.26 |  |" in md  # k=1 is (0, 0) itself
    assert (out / "topk" / "topk_curve.png").read_bytes()[:4] == b"\x89PNG"


def seeded(runs: Path, name: str, values, epochs: int, final_offset: float = -0.5) -> None:
    for seed, v in enumerate(values):
        run_dir = runs / f"{name}-s{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"best_top1": v, "final_top1": v + final_offset, "final_top5": 99.0, "epochs": epochs}))


def test_mini_statistics_significance_and_stability(tmp_path):
    """A 4x4 grid with 3 seeds: (3,3) clearly worse, the rest a tie. The table marks (3,3) as significantly
    below both the best row and (0,0) (Welch, Holm-adjusted) and nothing else; the Top-1 set {(0,0)} is a
    coin toss under resampling, the Bot-1 set {(3,3)} is stable."""
    out = tmp_path / "res"
    runs = out / "runs" / "single_freq"
    preset = load_preset("mini")
    epochs = preset.studies.single_freq.epochs
    seeded(runs, "base", [90.0], preset.base.epochs)
    (runs / "base-s0").rename(runs / "base")
    noise = [0.3, -0.2, -0.1]
    for u in range(4):
        for v in range(4):
            level = 80.0 if (u, v) == (3, 3) else 91.0 + 0.01 * ((u * 4 + v) % 3)
            seeded(runs, f"u{u}v{v}", [level + n for n in noise[(u + v) % 3:] + noise[:(u + v) % 3]], epochs)
    assert main(["collect", "--study", "single_freq", "--preset", "mini", "--output", str(out)]) == 0
    table = (out / "single_freq" / "table.csv").read_text().splitlines()
    rows = {(int(r["u"]), int(r["v"])): r for r in csv.DictReader(table)}
    assert len(rows) == 16 and all(r["n"] == "3" for r in rows.values())
    assert float(rows[(3, 3)]["p_vs_best"]) < 0.05 and float(rows[(3, 3)]["p_vs_00"]) < 0.05
    assert all(float(r["p_vs_00"]) > 0.05 for k, r in rows.items() if k not in ((0, 0), (3, 3)))
    assert float(rows[(3, 3)]["final_top1_mean"]) == pytest.approx(float(rows[(3, 3)]["best_top1_mean"]) - 0.5)
    md = (out / "single_freq" / "table.md").read_text()
    assert "4x4 grid" in md and "Paper (Fig. 4" not in md  # other grid: the paper's 7x7 is not shown as ours
    assert "Fine-tunes vs base" in md and "at or above the base" in md
    stab = {tuple(line.split(" | ")[:2]): line for line in md.splitlines() if line.startswith("| Top-k") or
            line.startswith("| Bot-k")}
    bot1 = stab[("| Bot-k", "1")].split(" | ")
    assert bot1[2] == "(3,3)" and float(bot1[3]) == 1.0
    top1 = stab[("| Top-k", "1")].split(" | ")
    assert float(top1[3]) < 0.9  # ties among 15 points: not a finding
    assert "Machine" not in md  # fake runs carry no machine record
    assert (out / "single_freq" / "fig4_heatmap.png").stat().st_size > 1000


def test_collect_corrupt_summary_errors_and_keeps_tables(tmp_path, capsys):
    out = tmp_path / "res"
    epochs = load_preset("mini").studies.lowk.epochs
    fake_summary(out / "runs" / "lowk" / "published" / "low2-s0", 90.0, epochs)
    assert main(["collect", "--study", "lowk", "--preset", "mini", "--output", str(out)]) == 0
    before = (out / "lowk" / "table.md").read_text()
    bad = out / "runs" / "lowk" / "published" / "low4-s0" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    capsys.readouterr()
    assert main(["collect", "--study", "lowk", "--preset", "mini", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corrupt summary file") and str(bad) in err and len(err.splitlines()) == 1
    assert (out / "lowk" / "table.md").read_text() == before


def test_imagenet_collect_without_runs(tmp_path):
    plan = build_plan("botk", "imagenet", runs_root=tmp_path / "runs")
    collect(plan, tmp_path)
    md = (tmp_path / "botk" / "table.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 6 and all(line.count("missing") == 3 for line in table)
    assert "77.60" in md and "**published**" in md


def test_stale_run_directory_is_reported_not_reused(tmp_path, capsys):
    """A finished run made with other frequencies (e.g. before the measured grid changed) is not counted
    as complete for the current plan, and `run` refuses it with one line instead of mislabelling it."""
    from ablation.runner import run_one
    from ablation.studies import stale_reason
    runs = tmp_path / "runs"
    plan = build_plan("topk", "imagenet", runs_root=runs)
    run = plan.runs[1]  # k=2
    fake_summary(run.run_dir, 90.0, run.epochs)
    (run.run_dir / "ablation.json").write_text(json.dumps({"frequencies": [[6, 6], [1, 4]]}))
    assert "frequencies" in stale_reason(run)
    lines = plan_lines(capsys, "--study", "topk", "--preset", "imagenet", "--runs-dir", str(runs))
    assert "status=stale" in lines[1] and "status=todo" in lines[0]
    with pytest.raises(AblationError, match="does not match the plan"):
        run_one(run, [sys.executable, "-c", "raise SystemExit(1)"])
    (run.run_dir / "ablation.json").write_text(json.dumps({"frequencies": run.meta["frequencies"]}))
    assert stale_reason(run) is None
    assert run_one(run, [sys.executable, "-c", "raise SystemExit(1)"]) == "complete"


@pytest.mark.slow
def test_bad_base_checkpoint_and_throughput(tmp_path):
    with pytest.raises(AblationError, match="file not found"):
        build_plan("single_freq", "mini", runs_root=tmp_path, base_checkpoint=str(tmp_path / "nope.pth"))
    proc = subprocess.run([sys.executable, "-m", "ablation", "plan", "--study", "topk", "--preset", "mini",
                           "--throughput", "inf"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--throughput" in proc.stderr


def test_finetune_schedule_paper_code(tmp_path, capsys):
    """`--finetune-schedule paper-code`: the authors' 100-epoch schedule length for the fine-tunes (trainer key
    train.schedule_epochs), in separate run directories."""
    from ablation.studies import PAPER_CODE_SCHEDULE_EPOCHS, SCHEDULE_KEY
    from engine.config import load_config
    args = ["plan", "--study", "single_freq", "--preset", "imagenet", "--output", str(tmp_path),
            "--finetune-schedule", "paper-code"]
    plan = build_plan("single_freq", "imagenet", runs_root=tmp_path, finetune_schedule="paper-code")
    assert all(r.overrides[SCHEDULE_KEY] == PAPER_CODE_SCHEDULE_EPOCHS for r in plan.runs[1:])
    assert "/paper-code/" in str(plan.runs[1].run_dir) and plan.runs[0].run_dir.name == "base"
    run = plan.runs[1]
    cfg = load_config(REPO / run.config, run.override_args())
    assert cfg.train.schedule_epochs == PAPER_CODE_SCHEDULE_EPOCHS and cfg.train.epochs == 20
    assert main(args) == 0
    with pytest.raises(AblationError, match="applies to the single_freq"):
        build_plan("topk", "imagenet", runs_root=tmp_path, finetune_schedule="paper-code")


def test_plan_starts_without_torch(tmp_path):
    """`plan` needs only the frequency orders: it must not pay torch's and timm's import time."""
    code = ("import sys; from ablation.cli import main; "
            f"rc = main(['plan', '--study', 'lowk', '--preset', 'imagenet100', '--output', {str(tmp_path)!r}]); "
            "print('RC', rc, 'torch' in sys.modules, 'timm' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "RC 0 False False", p.stdout + p.stderr
    assert "ASSUMED, not measured" in p.stdout and "GPU-hours at 2500 img/s/GPU" in p.stdout


def test_imagenet100_preset_plans():
    preset = load_preset("imagenet100")
    assert preset.train_images == 126689 and preset.throughput.measured is False
    plan = build_plan("single_freq", "imagenet100", runs_root=Path("/nonexistent"))
    assert len(plan.runs) == 50 and plan.runs[1].overrides["model.num_classes"] == 100
    assert plan.runs[1].overrides["data.root"] == "data/imagenet100"
    total = sum(plan.gpu_hours(r, 2500.0) for r in plan.runs)
    assert total == pytest.approx(126689 * (40 + 49 * 8) / 2500 / 3600)


def test_statistics_helpers():
    from ablation import stats
    s = stats.summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci_high"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * std / sqrt(n)
    assert stats.summarize([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci_low": None, "ci_high": None}
    # Welch's t by hand: t = (m1 - m2) / sqrt(v1/n1 + v2/n2), Welch-Satterthwaite degrees of freedom
    a, b = [10.0, 11.0, 12.0, 13.0], [7.0, 9.0, 8.5]
    from scipy.stats import t as tdist
    va, vb = 1.6666667 / 4, 1.0833333 / 3
    tval = (11.5 - 8.1666667) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert stats.welch_p(a, b) == pytest.approx(2 * tdist.sf(tval, df), rel=1e-5)
    assert stats.welch_p([1.0], b) is None and stats.welch_p([2.0, 2.0], [2.0, 2.0]) == 1.0
    assert stats.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert stats.mark(0.01) == "0.01 *" and stats.mark(0.2) == "0.2" and stats.mark(None) == "n/a"
