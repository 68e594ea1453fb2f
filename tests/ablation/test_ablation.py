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
from ablation.studies import GRID_POINTS, SCHEDULE_KEY, build_plan
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


def fill_grid(runs_root: Path, values: dict, epochs: int = 20, seed: int = 0) -> None:
    for (u, v), acc in values.items():
        fake_summary(runs_root / "single_freq" / f"u{u}v{v}-s{seed}", acc, epochs)


def plan_text(capsys, *args):
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    """plan's comment lines with their wrapped continuations joined."""
    return text.replace("\n#   ", " ")


def plan_lines(capsys, *args):
    return [line for line in plan_text(capsys, *args).splitlines() if line and not line.startswith("#")]


def test_plan_counts_and_frequencies(tmp_path, capsys):
    lines = plan_lines(capsys, "--study", "single_freq", "--preset", "imagenet", "--runs-dir", str(tmp_path))
    names = [line.split()[0] for line in lines]
    # one seed: its base, its no-attention control, then the 49 fine-tunes from that base
    assert names[:2] == ["single_freq/base-s0", "single_freq/control-s0"] and len(lines) == 51
    assert sorted(names[2:]) == sorted(f"single_freq/u{u}v{v}-s0" for u, v in GRID_POINTS)
    assert all("after base-s0" in line and "freq=(" in line for line in lines[2:])
    for study, method in (("topk", "top"), ("lowk", "low"), ("botk", "bot")):
        plan = build_plan(study, "imagenet", runs_root=tmp_path / "runs")
        assert [r.meta["k"] for r in plan.runs] == KS
        for run in plan.runs:
            assert run.overrides["model.freq"] == [list(f) for f in published_frequencies(method, run.meta["k"])]
            assert run.meta["freq_source"] == "published" and "/published/" in run.name
        assert len(plan_lines(capsys, "--study", study, "--preset", "imagenet", "--runs-dir", str(tmp_path))) == 6


def test_plan_lines_are_short(tmp_path, capsys):
    """Every run on one short line; what the runs share is printed once, wrapped."""
    for preset in ("mini", "imagenet", "imagenet100"):
        for study in ("single_freq", "topk", "lowk", "botk"):
            text = plan_text(capsys, "--study", study, "--preset", preset, "--runs-dir", str(tmp_path))
            assert max(len(line) for line in text.splitlines()) <= 110, (preset, study)
        text = plan_text(capsys, "--preset", preset, "--runs-dir", str(tmp_path))
        assert max(len(line) for line in text.splitlines()) <= 110


def test_every_seed_is_a_whole_replicate(tmp_path):
    """Seed s trains its own base; its control and fine-tunes start from that base, with the seed's data order."""
    plan = build_plan("single_freq", "mini", runs_root=tmp_path, seeds=3)
    bases = [r for r in plan.runs if r.role == "base"]
    assert [r.name for r in bases] == [f"single_freq/base-s{s}" for s in range(3)] and plan.runs[:3] == bases
    assert [b.overrides["seed"] for b in bases] == [0, 1, 2]
    for run in plan.runs[3:]:
        base = bases[run.seed]
        assert run.depends == (base.name,) and run.overrides["seed"] == run.seed
        assert run.overrides["model.init_checkpoint"] == str(base.run_dir / "checkpoints/last.pth")
    assert sum(r.role == "control" for r in plan.runs) == 3 and len(plan.points) == 48


def test_control_is_the_finetune_recipe_without_attention(tmp_path):
    plan = build_plan("single_freq", "mini", runs_root=tmp_path, seeds=1)
    control = next(r for r in plan.runs if r.role == "control")
    finetune = plan.points[0]
    assert control.settings["model"]["name"] == "resnet10" and finetune.settings["model"]["name"] == "fcanet10"
    for section in ("optim", "train", "data"):
        assert control.settings[section] == finetune.settings[section], section
    assert control.settings["model"]["init_checkpoint"] == finetune.settings["model"]["init_checkpoint"]
    assert "grid" not in control.settings["model"]["kwargs"] and "reduction" not in control.settings["model"]["kwargs"]
    # the demo config's settings are kept unless the preset changes them
    assert control.settings["model"]["kwargs"]["zero_init_residual"] is True
    assert finetune.settings["model"]["kwargs"]["zero_init_residual"] is True


def test_mini_preset_uses_its_own_4x4_grid(tmp_path, capsys):
    """The mini preset's network sees 32/16/8/4-pixel maps (CIFAR stem at 32x32): a 4x4 grid, 16 single-frequency
    points, and Top-k/Bot-k only from its own measured grid (pending, and said so, until it is complete)."""
    preset = load_preset("mini")
    assert preset.grid_size == 4 and preset.seeds >= 3
    lines = plan_lines(capsys, "--study", "single_freq", "--preset", "mini", "--runs-dir", str(tmp_path))
    assert len(lines) == 18 * preset.seeds  # base + control + 16 fine-tunes per seed
    plan = build_plan("single_freq", "mini", runs_root=tmp_path, seeds=1)
    assert all(r.overrides["model.kwargs"]["grid"] == 4 for r in plan.points)
    plan = build_plan("lowk", "mini", runs_root=tmp_path, seeds=1)
    ks = preset.studies.lowk.ks
    assert [r.meta["k"] for r in plan.points] == ks
    assert plan.points[-1].meta["frequencies"] == [list(f) for f in low_order(4)[:ks[-1]]]
    for study in ("topk", "botk"):
        text = flat(plan_text(capsys, "--study", study, "--preset", "mini", "--runs-dir", str(tmp_path)))
        assert "frequencies pending" in text and "run --study single_freq first" in text
        assert f"pending({study[:3]}{ks[-1]})" in text
        rc = main(["run", "--study", study, "--preset", "mini", "--runs-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and "frequencies pending" in err and err.count("\n") == 1
    with pytest.raises(AblationError, match="published topk orders are 7x7"):
        build_plan("topk", "mini", runs_root=tmp_path, freq_source="published")


def test_plan_cost_and_dependencies(tmp_path, capsys):
    out = flat(plan_text(capsys, "--study", "single_freq", "--preset", "imagenet", "--runs-dir", str(tmp_path),
                         "--throughput", "1000"))
    assert "# base (1 run(s)): configs/imagenet/resnet50.yaml" in out and "after base-s0" in out
    # base 100 + control 20 + 49 fine-tunes x 20 epochs of 1,281,167 images at 1000 img/s
    expected = 1281167 * (100 + 20 + 49 * 20) / 1000 / 3600
    assert f"{expected:.4g} GPU-hours" in out
    assert "given with --throughput" in out and "ASSUMED" not in out.split("# power")[0]
    plan = build_plan("single_freq", "imagenet", runs_root=tmp_path)
    assert plan.points[0].overrides["optim.base_lr"] == 0.02 and plan.points[0].epochs == 20
    assert "ASSUMED, not measured" in plan_text(capsys, "--study", "topk", "--preset", "imagenet")


def test_plan_prints_cost_and_power_with_assumptions(capsys):
    """`plan --preset imagenet100 --seeds 3`: the whole preset's cost by study and its power, naming the
    device, precision, model and seed count behind them; both ImageNet presets at one throughput."""
    text = flat(plan_text(capsys, "--preset", "imagenet100", "--seeds", "3"))
    for needle in ("3 seed(s)", "A100", "bf16", "ResNet-50", "FcaNet-50 assumed as fast", "ASSUMED",
                   "minimal detectable difference", "alpha 0.05, 80% power", "sd of a paired difference",
                   "by seed count", "single_freq", "botk", "total"):
        assert needle in text, needle
    assert load_preset("imagenet").throughput.img_per_s == load_preset("imagenet100").throughput.img_per_s
    one = plan_text(capsys, "--preset", "imagenet100", "--seeds", "1")
    total = {t: float(next(line for line in x.splitlines() if line.startswith("total")).split()[2])
             for t, x in (("three", text), ("one", one))}
    assert total["three"] == pytest.approx(3 * total["one"], rel=1e-3)  # seeds multiply everything


def test_seeds_multiply_runs(tmp_path):
    plan = build_plan("botk", "imagenet", seeds=3, runs_root=tmp_path)
    assert len(plan.runs) == 18 and {r.overrides["seed"] for r in plan.runs} == {0, 1, 2}
    assert len({r.run_dir for r in plan.runs}) == 18
    assert build_plan("lowk", "mini", runs_root=tmp_path).seeds == load_preset("mini").seeds  # preset default


def test_ranking_on_paper_grid_reproduces_published_orders(tmp_path):
    runs = tmp_path / "runs"
    fill_grid(runs, PAPER_GRID)
    for study, method in (("topk", "top"), ("botk", "bot")):
        plan = build_plan(study, "imagenet", runs_root=runs)
        assert plan.freq_source == "measured"
        for run in plan.runs:
            assert run.meta["freq_source"] == "measured" and "/measured/" in run.name
            assert run.meta["frequencies"] == [list(f) for f in PUBLISHED_ORDERS[method][:run.meta["k"]]]
    assert build_plan("lowk", "imagenet", runs_root=runs).freq_source == "published"
    assert build_plan("topk", "imagenet", runs_root=runs, freq_source="published").freq_source == "published"


def test_measured_source_needs_complete_grid(tmp_path):
    runs = tmp_path / "runs"
    fill_grid(runs, dict(list(PAPER_GRID.items())[:48]))
    assert build_plan("topk", "imagenet", runs_root=runs).freq_source == "published"
    with pytest.raises(AblationError, match="48 are"):
        build_plan("topk", "imagenet", runs_root=runs, freq_source="measured")
    # a different grid gives a different (measured) order; seeds are averaged
    flipped = {k: -v for k, v in PAPER_GRID.items()}
    fill_grid(runs, flipped, seed=0)
    fill_grid(runs, flipped, seed=1)
    plan = build_plan("topk", "imagenet", runs_root=runs, seeds=2)
    assert plan.freq_source == "measured"
    expected = rank_frequencies(flipped, descending=True)[:32]
    assert plan.runs[-1].meta["frequencies"] == [list(f) for f in expected]
    assert expected[:5] == list(PUBLISHED_ORDERS["bot"][:5])  # flipped grid: Top-k = the paper's Bot-k
    with pytest.raises(AblationError, match="147 single_freq fine-tunes of 3 seed.*98 are"):  # 3 seeds: not complete
        build_plan("topk", "imagenet", runs_root=runs, seeds=3, freq_source="measured")


@pytest.mark.slow
def test_bad_input_one_line_errors(capsys):
    for args, needle in ((["plan", "--study", "nope", "--preset", "mini"], "invalid choice: 'nope'"),
                         (["plan", "--study", "topk", "--preset", "nope"], "unknown preset 'nope'"),
                         (["collect", "--study", "topk", "--preset", "mini", "--seeds", "0"], "--seeds"),
                         (["run", "--study", "topk", "--preset", "mini", "--seeds", "x"], "--seeds"),
                         (["run", "--preset", "mini", "--output", "x"], "unrecognized arguments: --output"),
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
    runs, out = tmp_path / "runs", tmp_path / "res"
    fake_summary(runs / "single_freq" / "u0v0-s0", 91.5, 20, 99.1)
    fake_summary(runs / "single_freq" / "u0v0-s1", 92.5, 20, 99.3)
    fake_summary(runs / "single_freq" / "u3v4-s0", 90.0, 20)
    fake_summary(runs / "single_freq" / "u3v5-s0", 90.0, 19)  # fewer epochs than planned: incomplete
    assert main(["collect", "--study", "single_freq", "--preset", "imagenet", "--runs-dir", str(runs),
                 "--output", str(out), "--seeds", "2"]) == 0
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
    assert r34["vs_00_p"] == "" and r34["vs_00_n"] == "1"  # one shared seed: a difference, no test
    r35 = rows[3 * 7 + 5]
    assert r35["n"] == "0" and r35["best_top1_mean"] == "" and r35["diff_top1"] == ""  # missing, not zero
    md = (d / "table.md").read_text()
    assert "92.00 ± 0.71 (n=2)" in md and "missing" in md and "76.69" in md
    for flag in ("Best vs final", "Precision", "Fine-tune recipe", "per 256 images", "Baselines", "quoted from",
                 "paired t-test", "Holm", "No control run is complete", "Provenance"):
        assert flag in md, flag
    assert (d / "fig4_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    runs_csv = list(csv.DictReader((d / "runs.csv").read_text().splitlines()))
    assert len(runs_csv) == 2 * 2 + 98 and sum(r["status"] == "complete" for r in runs_csv) == 3

    fake_summary(runs / "topk" / "published" / "top4-s0", 93.0, 100, 99.5)
    assert main(["collect", "--study", "topk", "--preset", "imagenet", "--runs-dir", str(runs),
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "topk" / "table.csv").read_text().splitlines()))
    assert [r["k"] for r in rows] == ["1", "2", "4", "8", "16", "32"]
    assert rows[2]["best_top1_mean"] == "93.0" and float(rows[2]["diff_top1"]) == pytest.approx(93.0 - 78.38)
    assert rows[0]["best_top1_mean"] == "" and all(r["freq_source"] == "published" for r in rows)
    md = (out / "topk" / "table.md").read_text()
    assert "| 4 | 93.00 (n=1) | | 93.00 (n=1) | n/a | best | 78.38 | +14.62 | |" in md
    assert "| 1 | missing | | missing | (0,0) | n/a | 77.26 | | |" in md  # k=1 is (0, 0) itself
    assert (out / "topk" / "topk_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_collect_corrupt_summary_errors_and_keeps_tables(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "res"
    epochs = load_preset("mini").studies.lowk.epochs
    fake_summary(runs / "lowk" / "published" / "low2-s0", 90.0, epochs)
    args = ["collect", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs), "--output", str(out)]
    assert main(args) == 0
    before = (out / "lowk" / "table.md").read_text()
    bad = runs / "lowk" / "published" / "low4-s0" / "summary.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corrupt summary file") and str(bad) in err and len(err.splitlines()) == 1
    assert (out / "lowk" / "table.md").read_text() == before


def test_imagenet_collect_without_runs(tmp_path):
    """What collect writes with no runs at all: the paper's values and the protocol, every cell missing."""
    plan = build_plan("botk", "imagenet", runs_root=tmp_path / "runs")
    collect(plan, tmp_path)
    md = (tmp_path / "botk" / "table.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 6 and all(line.count("missing") == 2 for line in table)
    assert "77.60" in md and "**published**" in md and "## Protocol" in md


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
    assert " stale " in lines[1] and " todo " in lines[0]
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


def test_finetune_schedule_paper_code_scaled_to_the_base(tmp_path, capsys):
    """`--finetune-schedule paper-code`: the authors' 5 + 95 epochs (the length of their 100-epoch base), scaled
    to the preset's base: the cosine runs over the base's length, the warmup is 5% of it."""
    from engine.config import load_config
    for preset, base, warmup in (("imagenet", 100, 5.0), ("imagenet100", 40, 2.0), ("mini", None, None)):
        plan = build_plan("single_freq", preset, runs_root=tmp_path, finetune_schedule="paper-code", seeds=1)
        base = base or load_preset(preset).base.epochs
        warmup = warmup if warmup is not None else 0.05 * base
        for run in plan.runs[1:]:
            assert run.overrides[SCHEDULE_KEY] == base and run.overrides["train.warmup_epochs"] == pytest.approx(warmup)
        assert "/paper-code/" in str(plan.runs[1].run_dir) and plan.runs[0].run_dir.name == "base-s0"
        cfg = load_config(REPO / plan.points[0].config, plan.points[0].override_args())
        assert cfg.train.schedule_epochs == base and cfg.train.warmup_epochs == pytest.approx(warmup)
    text = plan_text(capsys, "--study", "single_freq", "--preset", "imagenet100", "--finetune-schedule",
                     "paper-code", "--runs-dir", str(tmp_path))
    assert "the authors' 5 + 95 epochs scaled to the base's 40: 2 + 38" in flat(text)
    with pytest.raises(AblationError, match="applies to the single_freq"):
        build_plan("topk", "imagenet", runs_root=tmp_path, finetune_schedule="paper-code")


def test_plan_starts_without_torch(tmp_path):
    """`plan` needs only the frequency orders and the config layer: it must not pay torch's and timm's import."""
    code = ("import sys; from ablation.cli import main; "
            f"rc = main(['plan', '--preset', 'imagenet100', '--runs-dir', {str(tmp_path)!r}]); "
            "print('RC', rc, 'torch' in sys.modules, 'timm' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "RC 0 False False", p.stdout + p.stderr
    assert "ASSUMED, not measured" in p.stdout and "GPU-hours" in p.stdout


def test_imagenet100_preset_plans():
    preset = load_preset("imagenet100")
    assert preset.train_images == 126689 and preset.throughput.measured is False
    plan = build_plan("single_freq", "imagenet100", runs_root=Path("/nonexistent"))
    assert len(plan.runs) == 51 and plan.points[0].overrides["model.num_classes"] == 100
    assert plan.points[0].overrides["data.root"] == "data/imagenet100"
    total = sum(plan.gpu_hours(r, 2500.0) for r in plan.runs)
    assert total == pytest.approx(126689 * (40 + 8 + 49 * 8) / 2500 / 3600)
