"""Study registry and planning: which runs a study of a preset consists of.

Studies (paper Sec. 4.2, appendix 6.1):

* ``single_freq`` (Fig. 4): a plain base network, then 49 fine-tunes that add FCA with one frequency (u, v)
  of the 7x7 grid for all channels.
* ``topk`` / ``botk`` (Tables 1 and 6): k frequencies from the two-step criterion (best / worst k of the
  single-frequency grid), trained from scratch. The order comes from our own measured grid when all 49
  single-frequency runs of the preset are complete, otherwise from the authors' published orders.
* ``lowk`` (Table 5): the k lowest frequencies of the fixed zig-zag order (appendix Fig. 5b); never grid-derived.

Presets are data: ``configs/ablation/<preset>.yaml``. Every run is one trainer invocation
``train_imagenet.py --config CONFIG KEY=VALUE ...`` with its own run directory.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from models.dct import GRID, published_frequencies, two_step_criterion

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "configs" / "ablation"
STUDIES = ("single_freq", "topk", "lowk", "botk")
STUDY_METHOD = {"topk": "top", "lowk": "low", "botk": "bot"}
FREQ_SOURCES = ("auto", "published", "measured")
GRID_POINTS = [(u, v) for u in range(GRID) for v in range(GRID)]


class AblationError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 2."""


@dataclass
class Run:
    """One trainer invocation of a study."""

    study: str
    point: str                      # "base", "u0v1", "top4", ...
    seed: Optional[int]             # None for the shared base run
    config: str                     # trainer config, relative to the repository root
    epochs: int
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # written to <run_dir>/ablation.json
    depends: tuple[str, ...] = ()   # names of runs that must be complete first

    @property
    def name(self) -> str:
        tag = self.point if self.seed is None else f"{self.point}-s{self.seed}"
        source = self.meta.get("freq_source")
        if self.study in STUDY_METHOD and source:
            return f"{self.study}/{source}/{tag}"
        return f"{self.study}/{tag}"

    def override_args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]


def format_value(value: Any) -> str:
    """A KEY=VALUE override value as YAML the trainer parses back to ``value``."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))  # JSON is YAML; compact, so it is one shell word
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def expand(value: Any, runs_root: Path) -> Any:
    """``{runs_root}`` / ``{repo}`` placeholders in a preset's string values."""
    if isinstance(value, str) and "{" in value:
        return value.replace("{runs_root}", str(runs_root)).replace("{repo}", str(REPO))
    return value


# --------------------------------------------------------------------------------------------- presets
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    presets = available_presets()
    if name not in presets:
        raise AblationError(f"unknown preset {name!r}; expected one of {', '.join(presets)}")
    path = PRESET_DIR / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AblationError(f"preset file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    for key in ("train_images", "throughput", "base", "studies"):
        if key not in data:
            raise AblationError(f"preset file {path} lacks the key {key!r}")
    missing = [s for s in STUDIES if s not in data["studies"]]
    if missing:
        raise AblationError(f"preset file {path} does not define the studies {', '.join(missing)}")
    data.setdefault("common_overrides", {})
    data["path"] = str(path)
    return data


def check_study(study: str) -> str:
    if study not in STUDIES:
        raise AblationError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    return study


# ------------------------------------------------------------------------------------------ summaries
def read_summary(run_dir: Path) -> Optional[dict[str, Any]]:
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
    for key in ("final_top1",):
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise AblationError(f"corrupt summary file {path}: {key!r} missing or not a number; "
                                f"delete it to re-run that point")
    return data


def stale_reason(run: "Run") -> Optional[str]:
    """Why ``run``'s directory no longer matches the plan (other frequencies, e.g. after the measured grid
    changed, or another fine-tune start), or None. Read from the ``ablation.json`` the runner wrote."""
    try:
        old = json.loads((run.run_dir / "ablation.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("frequencies", "init_checkpoint"):
        if key in run.meta and key in old and old[key] != run.meta[key]:
            return f"it was run with {key} {old[key]}, the plan now gives {run.meta[key]}"
    return None


def is_complete(run_dir: Path, epochs: int) -> bool:
    """A run is complete when its summary.json exists and reports at least the planned epochs."""
    summary = read_summary(run_dir)
    if summary is None or summary.get("status", "complete") != "complete":
        return False
    done = summary.get("epochs", epochs)
    return isinstance(done, (int, float)) and done >= epochs


# ------------------------------------------------------------------------------------------ frequencies
def measured_grid(runs_root: Path, preset: dict[str, Any]) -> dict[tuple[int, int], float]:
    """Mean final top-1 per grid point over the complete single-frequency runs (any seed) in ``runs_root``."""
    epochs = int(preset["studies"]["single_freq"]["epochs"])
    grid: dict[tuple[int, int], float] = {}
    for u, v in GRID_POINTS:
        values = []
        for run_dir in sorted((Path(runs_root) / "single_freq").glob(f"u{u}v{v}-s*")):
            if is_complete(run_dir, epochs):
                values.append(float(read_summary(run_dir)["final_top1"]))
        if values:
            grid[(u, v)] = sum(values) / len(values)
    return grid


def resolve_source(study: str, requested: str, runs_root: Path, preset: dict[str, Any]):
    """The frequency source of a k-study: ``published`` or ``measured`` (and the measured grid, if used)."""
    if requested not in FREQ_SOURCES:
        raise AblationError(f"unknown frequency source {requested!r}; expected one of {', '.join(FREQ_SOURCES)}")
    if study == "lowk":
        return "published", None  # a fixed zig-zag order, not derived from any grid
    grid = measured_grid(runs_root, preset)
    complete = len(grid) == len(GRID_POINTS)
    if requested == "measured" and not complete:
        raise AblationError(f"--freq-source measured needs all {len(GRID_POINTS)} single_freq runs complete in "
                            f"{Path(runs_root) / 'single_freq'}; {len(grid)} are")
    if requested == "published" or not complete:
        return "published", None
    return "measured", grid


def study_frequencies(study: str, ks, source: str, grid) -> dict[int, list[tuple[int, int]]]:
    method = STUDY_METHOD[study]
    if source == "measured":
        return two_step_criterion(grid, ks)[method]
    return {k: published_frequencies(method, k) for k in ks}


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    study: str
    preset: dict[str, Any]
    runs_root: Path
    runs: list[Run]
    freq_source: Optional[str] = None
    base_checkpoint: Optional[str] = None

    def gpu_hours(self, run: Run, throughput: float) -> float:
        return float(self.preset["train_images"]) * run.epochs / throughput / 3600.0


def default_runs_root(preset: str, output: Optional[Path]) -> Path:
    """Where run directories live: ``<output>/runs`` when --output is given, else ``runs/ablation/<preset>``."""
    if output is not None:
        return Path(output) / "runs"
    return REPO / "runs" / "ablation" / preset


def build_plan(study: str, preset_name: str, seeds: int = 1, runs_root: Optional[Path] = None,
               freq_source: str = "auto", base_checkpoint: Optional[str] = None) -> Plan:
    check_study(study)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise AblationError(f"bad --seeds {seeds!r}: expected a positive integer")
    preset = load_preset(preset_name)
    runs_root = Path(runs_root) if runs_root is not None else default_runs_root(preset_name, None)
    runs_root = runs_root.resolve()
    spec = preset["studies"][study]
    common = {k: expand(v, runs_root) for k, v in (preset.get("common_overrides") or {}).items()}
    runs: list[Run] = []

    def make(point, seed, config, epochs, extra, meta, depends=()):
        run_dir = runs_root / study
        name_meta = dict(meta)
        tag = point if seed is None else f"{point}-s{seed}"
        if study in STUDY_METHOD:
            run_dir = run_dir / meta["freq_source"]
        run_dir = run_dir / tag
        overrides = dict(common)
        overrides.update(extra)
        overrides["train.epochs"] = int(epochs)
        overrides["seed"] = 0 if seed is None else int(seed)
        overrides["output_dir"] = str(run_dir)
        name_meta.update({"study": study, "point": point, "seed": overrides["seed"], "preset": preset_name})
        return Run(study, point, seed, config, int(epochs), run_dir, overrides, name_meta, tuple(depends))

    source = None
    if study == "single_freq":
        base = preset["base"]
        depends: tuple[str, ...] = ()
        if base_checkpoint is None:
            base_run = make("base", None, base["config"], base["epochs"], dict(base.get("overrides") or {}),
                            {"role": "base"})
            runs.append(base_run)
            depends = (base_run.name,)
            init = str(base_run.run_dir / base.get("checkpoint", "checkpoints/last.pth"))
        else:
            if not Path(base_checkpoint).is_file():
                raise AblationError(f"--base-checkpoint {base_checkpoint}: file not found")
            init = str(Path(base_checkpoint).resolve())
        for seed in range(seeds):
            for u, v in GRID_POINTS:
                extra = dict(spec.get("overrides") or {})
                extra["model.freq"] = [[u, v]]
                extra["model.init_checkpoint"] = init
                meta = {"role": "single_freq", "u": u, "v": v, "frequencies": [[u, v]],
                        "freq_source": "grid", "init_checkpoint": init}
                runs.append(make(f"u{u}v{v}", seed, spec["config"], spec["epochs"], extra, meta, depends))
    else:
        source, grid = resolve_source(study, freq_source, runs_root, preset)
        ks = [int(k) for k in spec["ks"]]
        freqs = study_frequencies(study, ks, source, grid)
        method = STUDY_METHOD[study]
        for seed in range(seeds):
            for k in ks:
                extra = dict(spec.get("overrides") or {})
                extra["model.freq"] = [list(f) for f in freqs[k]]
                meta = {"role": study, "method": method, "k": k, "frequencies": [list(f) for f in freqs[k]],
                        "freq_source": source}
                if grid is not None:
                    meta["grid"] = {f"{u},{v}": a for (u, v), a in sorted(grid.items())}
                runs.append(make(f"{method}{k}", seed, spec["config"], spec["epochs"], extra, meta))
    return Plan(study, preset, runs_root, runs, source, base_checkpoint)
