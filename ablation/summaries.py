"""Reading what a run left behind: its ``summary.json`` (written by the trainer) and completeness."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import AblationError


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None if there is none. Raises AblationError if it is unreadable."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AblationError(f"corrupt summary file {path}: {exc}; delete it to re-run that point") from None
    if not isinstance(data, dict):
        raise AblationError(f"corrupt summary file {path}: expected a JSON object; delete it to re-run that point")
    value = data.get("final_top1")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AblationError(f"corrupt summary file {path}: 'final_top1' missing or not a number; "
                            f"delete it to re-run that point")
    return data


def is_complete(run_dir: Path, epochs: int) -> bool:
    """A run is complete when its summary.json exists and reports at least the planned epochs."""
    summary = read_summary(run_dir)
    if summary is None or summary.get("status", "complete") != "complete":
        return False
    done = summary.get("epochs", epochs)
    return isinstance(done, (int, float)) and done >= epochs


def number(summary: dict[str, Any] | None, key: str) -> float | None:
    """A finite number of the summary, or None (``best_top1 < 0`` is the trainer's "never evaluated")."""
    if not summary:
        return None
    value = summary.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if key == "best_top1" and value < 0:
        return None
    return float(value)


def ranking_value(summary: dict[str, Any]) -> float:
    """The statistic the two-step criterion ranks by: ``best_top1`` (the authors' ``best_prec1``, the number
    Fig. 4 prints), or ``final_top1`` for a summary without it."""
    best = number(summary, "best_top1")
    return best if best is not None else float(summary["final_top1"])
