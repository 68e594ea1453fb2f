"""One command to check the CUDA paths on a GPU machine, in at most 9 minutes:

    python -m scripts.gpu_check                 # writes runs/gpu_check/<time>/ (report.md, logs, gpu.md)
    python -m scripts.gpu_check --dry-run       # prints the plan, runs nothing

1. **CUDA tests**: ``tests/engine/test_gpu_cuda.py`` (nvjpeg on clean JPEGs, the batched resize on the GPU, the
   GIL released by nvjpeg's decode, GPU memory filled until nvjpeg's allocation fails: one error line after one
   call, no CPU fallback), with the CUDA tests of ``test_gpu_pipeline.py`` and the CPU fault tests of
   ``test_gpu_decode_faults.py``.
2. **A short training run** with ``data.pipeline=gpu`` and 4 DataLoader workers on real JPEGs (scikit-learn's
   two sample photos re-encoded at several sizes): it must finish, and every epoch's ``cpu_decoded`` and
   ``nvjpeg_failed`` in metrics.jsonl must be 0 (clean baseline JPEGs all go through nvjpeg), with no
   fallback warning.
3. ``python -m scripts.bench gpu`` with the time that is left (``--budget-s``), its report beside the others.

Each step has a hard timeout; the report lists every step's verdict, duration and key figures, with the GPU's
name. Exit status 0 when every step passed, 1 otherwise. On a machine without CUDA nothing runs: one line
says so and the exit status is 0. Nothing under ``results/`` is written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 540.0        # 9 minutes for the whole check
TEST_S = 150.0
TRAIN_S = 150.0
MARGIN_S = 45.0        # the benchmark's last part may run past its budget; process start-up
TEST_FILES = ("tests/engine/test_gpu_cuda.py", "tests/engine/test_gpu_pipeline.py",
              "tests/engine/test_gpu_decode_faults.py")
TRAIN_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 128, 32
JPEG_SIZES = ((500, 375), (375, 500), (800, 600), (640, 480))


def test_command() -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]


def train_command(data: Path, out: Path) -> list[str]:
    overrides = {"model.name": "fcanet50", "model.num_classes": TRAIN_CLASSES, "data.root": data,
                 "data.pipeline": "gpu", "data.workers": 4, "data.image_size": 224, "data.val_resize": 256,
                 "train.batch_size": 64, "train.epochs": 2, "train.warmup_epochs": 0, "train.progress": "false",
                 "train.tensorboard": "false", "train.checkpoint_every_steps": 0, "train.log_every_steps": 4,
                 "output_dir": out}
    return [sys.executable, str(ROOT / "train_imagenet.py"), "--config", str(ROOT / "configs/base/imagenet.yaml"),
            *(f"{k}={v}" for k, v in overrides.items())]


def bench_command(report: Path, budget_s: float) -> list[str]:
    return [sys.executable, "-m", "scripts.bench", "gpu", "--batches", "256", "--budget-s", f"{budget_s:.0f}",
            "--out", str(report)]


def run_step(name: str, cmd: list[str], timeout: float, log: Path) -> tuple[bool, float, str]:
    """Run ``cmd`` (output to ``log``) under ``timeout``; returns (exit 0, seconds, a note)."""
    print(f"[{name}] {' '.join(cmd[:6])} ... (timeout {timeout:.0f} s)", flush=True)
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            ok, note = proc.returncode == 0, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, note = False, f"timed out after {timeout:.0f} s"
    dt = time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    print(f"[{name}] {'PASS' if ok else 'FAIL'} in {dt:.0f} s ({note}){': ' + tail[0] if tail else ''}", flush=True)
    return ok, dt, note


def check_training(out: Path, log: Path) -> tuple[bool, list[str]]:
    """The training run's verdicts: every epoch's cpu_decoded and nvjpeg_failed are 0, no fallback warning."""
    notes, ok = [], True
    try:
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError) as e:
        return False, [f"no readable metrics.jsonl ({e})"]
    if len(rows) != 2:
        ok = False
        notes.append(f"{len(rows)} epoch rows, expected 2")
    for r in rows:
        bad = {k: r.get(k) for k in ("cpu_decoded", "nvjpeg_failed") if r.get(k) != 0}
        if bad:
            ok = False
            notes.append(f"epoch {r['epoch']}: {bad} (expected 0 on clean JPEGs)")
        steps = r["global_step"] / r["epoch"]
        notes.append(f"epoch {r['epoch']}: {r['img_per_s']:.0f} img/s (warm-up {r.get('warmup_s', 0):.1f} s apart), "
                     f"input wait {1e3 * r.get('input_wait_s', 0) / steps:.1f} ms/batch, decode thread "
                     f"{1e3 * r.get('decode_s', 0) / steps:.1f} ms/batch, cpu_decoded {r.get('cpu_decoded')}, "
                     f"nvjpeg_failed {r.get('nvjpeg_failed')}, val top1 {r.get('val_top1', float('nan')):.1f}")
    text = log.read_text(errors="replace") if log.exists() else ""
    if "warning: data: gpu pipeline" in text:
        ok = False
        notes.append("the fallback-rate warning was printed")
    return ok, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/gpu_check/<UTC time>)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their commands, run nothing")
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="time for the whole check (default 540 s)")
    a = p.parse_args(argv)
    out = a.out or ROOT / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    data, run = out / "jpegs", out / "train_run"
    if a.dry_run:
        for name, cmd in (("tests", test_command()), ("train", train_command(data, run)),
                          ("bench", bench_command(out / "gpu.md", a.total_s - TEST_S - TRAIN_S - MARGIN_S))):
            print(f"{name}: {' '.join(cmd)}")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device on this machine (nothing run, nothing measured)")
        return 0
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    print(f"gpu_check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; writing {out}", flush=True)
    results = []
    ok, dt, note = run_step("tests", test_command(), TEST_S, out / "tests.log")
    results.append(("CUDA tests", ok, dt, [note]))

    from scripts.bench.common import write_jpeg_imagefolder
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        write_jpeg_imagefolder(data / split, JPEG_SIZES, n, classes=TRAIN_CLASSES)
    ok, dt, note = run_step("train", train_command(data, run), TRAIN_S, out / "train.log")
    verdict, notes = check_training(run, out / "train.log")
    results.append(("training, data.pipeline=gpu, 4 workers", ok and verdict, dt, [note, *notes]))

    left = a.total_s - (time.monotonic() - start)
    if left - MARGIN_S < 60:
        results.append(("bench gpu", False, 0.0, [f"not run: only {left:.0f} s left of {a.total_s:.0f} s"]))
    else:
        ok, dt, note = run_step("bench", bench_command(out / "gpu.md", left - MARGIN_S), left - 10, out / "bench.log")
        report_ok = ok and (out / "gpu.md").exists()
        results.append(("python -m scripts.bench gpu", report_ok, dt, [note, str(out / "gpu.md")]))

    total = time.monotonic() - start
    lines = [f"# GPU check: {gpu}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; total {total:.0f} s (limit {a.total_s:.0f} s)", ""]
    for name, ok, dt, notes in results:
        lines.append(f"- **{'PASS' if ok else 'FAIL'}** {name} ({dt:.0f} s)" + "".join(f"\n  - {n}" for n in notes))
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print("\n" + report, flush=True)
    return 0 if all(r[1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
