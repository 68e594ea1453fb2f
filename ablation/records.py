"""What ``collect`` reads from the runs of a plan: summaries, the settings each run recorded, its machine.

Before any number is computed: a corrupt summary, a complete run trained with other settings than the preset
now gives, and runs from different machines or torch builds in one table (unless allowed, then flagged) are
refused with one line.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AblationError
from .studies import Plan, Run, recorded, stale_reason
from .summaries import is_complete, number, read_summary

BEST, FINAL = "best_top1", "final_top1"


@dataclass
class Record:
    run: Run
    summary: dict[str, Any] | None   # None unless complete
    meta: dict[str, Any] | None      # the run's ablation.json
    machine: str | None              # device or CPU, torch build, threads; None if not recorded

    def value(self, key: str = BEST) -> float | None:
        return number(self.summary, key)


def machine_key(summary: dict[str, Any], meta: dict[str, Any] | None) -> str | None:
    """Where and with what a run trained: the GPU name or CPU model, the torch build and the thread count
    (summary.json provenance; what changes the numerics, so not the machine's CPU count, which inside a
    container is the host's); for older runs the CPU the runner recorded, build unknown."""
    device = summary.get("device")
    cpu = summary.get("cpu_model")
    if summary.get("torch_version"):
        where = device if device not in (None, "cpu") else f"CPU {cpu}"
        threads = summary.get("threads")
        return f"{where}, torch {summary['torch_version']}" + (f", {threads} thread(s)" if threads else "")
    if meta and meta.get("machine"):
        where = f"{device} (host CPU: {meta['machine']})" if device not in (None, "cpu") else meta["machine"]
        return f"{where}, torch build not recorded"
    return None


def gather(plan: Plan, allow_mixed: bool = False) -> list[Record]:
    """One record per planned run (a run listed twice, e.g. a shared base, once). Raises AblationError on a
    corrupt summary, a stale complete run, or mixed machines (unless ``allow_mixed``)."""
    records, seen, stale = [], set(), []
    for run in plan.runs:
        if run.run_dir in seen:
            continue
        seen.add(run.run_dir)
        summary = read_summary(run.run_dir)  # raises AblationError on a corrupt file
        complete = summary is not None and is_complete(run.run_dir, run.epochs)
        meta = recorded(run)
        if complete and stale_reason(run):
            stale.append(run)
        machine = machine_key(summary, meta) if complete else None
        records.append(Record(run, summary if complete else None, meta, machine))
    if stale:
        raise AblationError(f"{len(stale)} complete run(s) under {plan.runs_root} were trained with other settings "
                            f"than the preset now gives ({stale[0].name}: {stale_reason(stale[0])}); restore the "
                            f"preset, or move those run directories away and run them again")
    machines = Counter(r.machine for r in records if r.machine)
    if len(machines) > 1 and not allow_mixed:
        listed = "; ".join(f"{m} ({n} runs)" for m, n in machines.most_common())
        raise AblationError(f"{plan.study}: runs from {len(machines)} machines or builds would be merged: {listed}; "
                            f"CPU numerics differ across them. Pass --allow-mixed-machines to merge them (flagged), "
                            f"or collect each machine's runs from its own --runs-dir")
    return records


def point_values(records: list[Record], key: str = BEST) -> dict[str, dict[int, float]]:
    """``{point: {seed: value}}`` over the complete runs."""
    out: dict[str, dict[int, float]] = {}
    for rec in records:
        value = rec.value(key)
        if value is not None:
            out.setdefault(rec.run.point, {})[rec.run.seed or 0] = value
    return out


def mixed_points(records: list[Record]) -> set[str]:
    """Points whose complete runs come from more than one machine (only possible with --allow-mixed-machines)."""
    by_point: dict[str, set] = {}
    for rec in records:
        if rec.machine:
            by_point.setdefault(rec.run.point, set()).add(rec.machine)
    return {p for p, m in by_point.items() if len(m) > 1}


def provenance(records: list[Record]) -> dict[str, Any]:
    """Machines, the logical CPUs their OS listed, git commits and the runs without provenance, for the table's
    provenance section."""
    complete = [r for r in records if r.summary]
    return {"machines": Counter(r.machine for r in complete if r.machine),
            "cpu_counts": Counter(int(r.summary["cpu_count"]) for r in complete if r.summary.get("cpu_count")),
            "commits": Counter(str(r.summary.get("git_commit")) for r in complete if r.summary.get("git_commit")),
            "unrecorded": sum(1 for r in complete if not r.machine), "complete": len(complete)}


def curve(run_dir: Path) -> list[dict[str, float]]:
    """The evaluated epochs of a run's metrics.jsonl: ``[{epoch, val_top1, train_top1}, ...]`` (torn or
    missing lines are skipped: the curve is shown, never used for a test)."""
    rows = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("val_top1"), (int, float)):
            rows.append({"epoch": row.get("epoch"), "val_top1": row["val_top1"], "train_top1": row.get("train_top1")})
    return rows
