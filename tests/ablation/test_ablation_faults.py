"""The ablation tool under a hostile or unlucky user: an edited preset, a full disk, a missing Slurm, mixed
machines, results/ left alone. Each case: correct data, or one `error:` line with nothing changed."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ablation.cli import main
from ablation.studies import build_plan
from synthetic_runs import MACHINE, fill

REPO = Path(__file__).resolve().parents[2]
FAKE = f"{sys.executable} {REPO / 'tests' / 'ablation' / 'test_ablation_run.py'}"


def cli(capsys, *args):
    try:
        rc = main(list(args))
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line_error(rc, err, *needles):
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def edited_mini(tmp_path, **study_overrides):
    data = yaml.safe_load((REPO / "configs/ablation/mini.yaml").read_text())
    for study, overrides in study_overrides.items():
        data["studies"][study]["overrides"].update(overrides)
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_runs_record_settings_and_an_edited_preset_is_refused(tmp_path, capsys):
    """Runs trained at lr 0.2, the preset then edited to 3.0: `plan` marks them stale, `run` refuses them,
    `collect` refuses to mix them into a table described by the new setting."""
    runs = tmp_path / "runs"
    preset = edited_mini(tmp_path)
    plan = build_plan("single_freq", preset, runs_root=runs, seeds=2)
    fill(plan, lambda run: 90.0)
    recorded = json.loads((plan.points[0].run_dir / "ablation.json").read_text())["settings"]
    lr = recorded["optim"]["base_lr"]
    assert lr == plan.preset.studies.single_freq.overrides["optim.base_lr"]
    assert recorded["env"] == {"OMP_NUM_THREADS": "1"}
    assert "{runs_root}" in recorded["data"]["root"]  # moving the runs directory keeps the settings equal
    args = ["--study", "single_freq", "--preset", preset, "--runs-dir", str(runs), "--seeds", "2"]
    rc, out, _ = cli(capsys, "collect", *args)
    assert rc == 0
    edited_mini(tmp_path, single_freq={"optim.base_lr": 3.0})
    rc, out, _ = cli(capsys, "plan", *args)
    status = {line.split()[0]: line.split()[3] for line in out.splitlines() if line.startswith("single_freq/")}
    assert rc == 0 and status["single_freq/base-s0"] == "complete"  # the base's own settings did not change
    assert all(v == "stale" for k, v in status.items() if "base" not in k) and len(status) == 36
    rc, _, err = cli(capsys, "run", *args, "--trainer-cmd", FAKE)
    one_line_error(rc, err, "does not match the plan", f"optim.base_lr {lr} -> 3.0")
    before = (runs / "tables" / "single_freq" / "table.md").read_text()
    rc, _, err = cli(capsys, "collect", *args)
    one_line_error(rc, err, "trained with other settings than the preset now gives", f"optim.base_lr {lr} -> 3.0")
    assert (runs / "tables" / "single_freq" / "table.md").read_text() == before


def test_collect_on_a_full_disk_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    plan = build_plan("lowk", "mini", runs_root=runs, seeds=2)
    fill(plan, lambda run: 90.0 + run.meta.get("k", 0) / 10)
    args = ["collect", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs), "--seeds", "2"]
    assert cli(capsys, *args)[0] == 0
    tables = runs / "tables" / "lowk"
    before = {p.name: p.read_bytes() for p in tables.iterdir()}
    fill(plan, lambda run: 80.0)  # new values: a successful collect would change every file
    calls = []

    def fsync(fd):  # the disk fills up while the third new file is written
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    rc, _, err = cli(capsys, *args)
    monkeypatch.undo()
    one_line_error(rc, err, "No space left on device", "nothing was changed")
    assert {p.name: p.read_bytes() for p in tables.iterdir()} == before  # no temp file left, nothing replaced


def test_collect_output_never_moves_where_runs_are_read(tmp_path, capsys):
    """`--output DIR` only says where the tables go; the default is the runs directory, never results/."""
    runs, out = tmp_path / "runs", tmp_path / "elsewhere"
    plan = build_plan("lowk", "mini", runs_root=runs, seeds=2)
    fill(plan, lambda run: 90.0)
    committed = {p: p.read_bytes() for p in (REPO / "results").rglob("*") if p.is_file()}
    rc, stdout, _ = cli(capsys, "collect", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs),
                        "--seeds", "2", "--output", str(out))
    assert rc == 0 and str(out / "lowk" / "table.md") in stdout
    rows = (out / "lowk" / "table.csv").read_text().splitlines()[1:]
    assert rows and all(row.split(",")[1] == "2" for row in rows)  # every k found its 2 runs: nothing "missing"
    rc, stdout, _ = cli(capsys, "collect", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs),
                        "--seeds", "2")
    assert rc == 0 and str(runs / "tables" / "lowk" / "table.md") in stdout
    assert {p: p.read_bytes() for p in (REPO / "results").rglob("*") if p.is_file()} == committed
    rc, _, err = cli(capsys, "collect", "--preset", "mini", "--publish", "--output", str(out))
    assert rc == 2 and "not allowed with argument" in err  # --publish is the one way into results/


def test_slurm_without_sbatch_refuses_and_starts_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    runs = tmp_path / "runs"
    rc, out, err = cli(capsys, "run", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs), "--slurm",
                       "--trainer-cmd", FAKE)
    one_line_error(rc, err, "--slurm: sbatch not found", "nothing was submitted or started")
    assert out == "" and not runs.exists()


def test_mixed_machines_refused_then_flagged(tmp_path, capsys):
    runs = tmp_path / "runs"
    plan = build_plan("lowk", "mini", runs_root=runs, seeds=2)
    fill(plan, lambda run: 90.0)
    other = dict(MACHINE, cpu_model="Another CPU")
    for run in plan.runs:
        if run.seed == 1 and run.meta.get("k") == 2:
            summary = json.loads((run.run_dir / "summary.json").read_text())
            (run.run_dir / "summary.json").write_text(json.dumps({**summary, **other}))
    args = ["collect", "--study", "lowk", "--preset", "mini", "--runs-dir", str(runs), "--seeds", "2"]
    rc, _, err = cli(capsys, *args)
    one_line_error(rc, err, "runs from 2 machines or builds", "CPU Another CPU", "--allow-mixed-machines")
    rc, _, _ = cli(capsys, *args, "--allow-mixed-machines")
    md = (runs / "tables" / "lowk" / "table.md").read_text()
    assert rc == 0 and "Runs from several machines or builds are merged" in md and "mixed machines" in md
    assert "CPU Synthetic CPU, torch 2.0.0+cpu, 1 thread(s)" in md and "CPU Another CPU" in md
    assert "Machine size (logical CPUs the OS listed): 2 logical CPUs (" in md


@pytest.mark.slow
def test_jobs_with_limit_starts_at_most_limit_runs(tmp_path):
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "ablation", "run", "--study", "lowk", "--preset", "imagenet", "--seeds", "2",
            "--runs-dir", str(runs), "--trainer-cmd", FAKE, "--quiet", "--jobs", "2", "--limit", "3"]
    env = {**os.environ, "FAKE_STEPS": "1"}
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    done = (runs / "lowk" / "published" / "completions.log").read_text().split()
    assert sorted(done) == ["low1-s0", "low2-s0", "low4-s0"]  # the first 3 of the plan, each once
    assert "3/12 runs complete" in p.stdout


def test_plan_and_collect_name_what_they_wait_for(tmp_path, capsys):
    """topk before single_freq is complete: plan lists the runs it will make, collect writes missing rows."""
    runs = tmp_path / "runs"
    rc, out, _ = cli(capsys, "plan", "--study", "botk", "--preset", "mini", "--runs-dir", str(runs))
    assert rc == 0 and "frequencies pending" in out and "botk/measured/bot1-s0" in out
    rc, _, _ = cli(capsys, "collect", "--study", "botk", "--preset", "mini", "--runs-dir", str(runs))
    md = (runs / "tables" / "botk" / "table.md").read_text()
    assert rc == 0 and "pending: the two-step criterion" in md and "- k=1: pending" in md


@pytest.mark.slow
def test_run_without_study_runs_the_four_studies_in_order(tmp_path):
    """`run --preset P` (no --study): single_freq first (bases, controls, fine-tunes), then lowk, then topk and
    botk from the measured grid; a second call trains nothing."""
    data = yaml.safe_load((REPO / "configs/ablation/imagenet.yaml").read_text())
    data.update(name="tiny", grid=2)
    for study in ("topk", "lowk", "botk"):
        data["studies"][study]["ks"] = [1, 2]
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(data))
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "ablation", "run", "--preset", str(preset), "--runs-dir", str(runs),
            "--trainer-cmd", FAKE, "--quiet"]
    env = {**os.environ, "FAKE_STEPS": "1"}
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    order = [line.split()[2].split("/")[0] for line in p.stdout.splitlines() if line.startswith("[ablation] done")]
    assert order == ["single_freq"] * 6 + ["lowk"] * 2 + ["topk"] * 2 + ["botk"] * 2
    assert (runs / "topk" / "measured" / "top2-s0" / "summary.json").exists()
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and " ran 0" in p.stdout and " ran 1" not in p.stdout
