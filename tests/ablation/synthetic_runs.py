"""Tiny synthetic ablation results: finished-run files for a plan, with planted values (no training)."""
from __future__ import annotations

import json
from collections.abc import Callable

from ablation.studies import Plan, Run

MACHINE = {"device": "cpu", "cpu_model": "Synthetic CPU", "cpu_count": 2, "torch_version": "2.0.0+cpu", "threads": 1,
           "git_commit": "0123456789abcdef"}


def write_run(run: Run, best: float, final: float | None = None, machine: dict | None = None,
              curve: list[float] | None = None) -> None:
    """summary.json (as the trainer writes it) and ablation.json (as the runner writes it) of a finished run."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    summary = {"status": "complete", "best_top1": best, "final_top1": best if final is None else final,
               "final_top5": 99.0, "epochs": run.epochs, "best_epoch": run.epochs, **(machine or MACHINE)}
    (run.run_dir / "summary.json").write_text(json.dumps(summary))
    (run.run_dir / "ablation.json").write_text(json.dumps({**run.meta, "settings": run.settings}))
    if curve is not None:
        rows = [{"epoch": i + 1, "val_top1": v, "train_top1": v + 5} for i, v in enumerate(curve)]
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fill(plan: Plan, value: Callable[[Run], float], machine: dict | None = None) -> None:
    """Every run of the plan finished with ``value(run)`` as its best-epoch top-1 (final = best - 0.1)."""
    for run in plan.runs:
        v = value(run)
        write_run(run, v, v - 0.1, machine, curve=[v - 3, v - 1, v - 0.2, v] if run.role == "base" else None)
