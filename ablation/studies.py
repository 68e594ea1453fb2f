"""Study registry and planning: which runs a study of a preset consists of.

Studies (paper Sec. 4.2, appendix 6.1), on the preset's S x S frequency grid (``grid``: 7 in the paper):

* ``single_freq`` (Fig. 4): a plain base network, then S*S fine-tunes that add FCA with one frequency (u, v)
  of the grid for all channels.
* ``topk`` / ``botk`` (Tables 1 and 6): k frequencies from the two-step criterion (best / worst k of the
  single-frequency grid), trained from scratch. The order comes from our own measured grid when all S*S
  single-frequency runs of the preset are complete, otherwise from the authors' published orders (7x7 only).
* ``lowk`` (Table 5): the k lowest frequencies of the fixed Low-k order (appendix Fig. 5b); never grid-derived.

Presets are data: ``configs/ablation/<preset>.yaml``. Every run is one trainer invocation
``train_imagenet.py --config CONFIG KEY=VALUE ...`` with its own run directory.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from models.dct import GRID, low_order, published_frequencies, two_step_criterion
from models.registry import model_options

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "configs" / "ablation"
STUDIES = ("single_freq", "topk", "lowk", "botk")
STUDY_METHOD = {"topk": "top", "lowk": "low", "botk": "bot"}
FREQ_SOURCES = ("auto", "published", "measured")
# Fine-tune schedules of single_freq (Fig. 4). Paper Sec. 4.2 only says "similar optimization setting";
# 'ours': warmup then cosine to 0 over the fine-tune's own length; 'paper-code': the authors' main.py
# schedule length (5 warmup + 95 cosine epochs = 100) of which the fine-tune runs its first epochs.
FINETUNE_SCHEDULES = ("ours", "paper-code")
PAPER_CODE_SCHEDULE_EPOCHS = 100
SCHEDULE_KEY = "train.schedule_epochs"  # trainer key: cosine length in epochs (default: train.epochs)


def grid_points(grid: int = GRID) -> list[tuple[int, int]]:
    """The S*S single-frequency points (u, v), row-major."""
    return [(u, v) for u in range(grid) for v in range(grid)]


GRID_POINTS = grid_points(GRID)


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
    """A preset by name (``configs/ablation/<name>.yaml``) or by the path of a YAML file of the same layout."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise AblationError(f"preset file {path} not found")
    else:
        presets = available_presets()
        if name not in presets:
            raise AblationError(f"unknown preset {name!r}; expected one of {', '.join(presets)} or a .yaml file")
        path = PRESET_DIR / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AblationError(f"preset file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise AblationError(f"preset file {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise AblationError(f"preset file {path} is not a YAML mapping")
    for key in ("train_images", "throughput", "base", "studies"):
        if key not in data:
            raise AblationError(f"preset file {path} lacks the key {key!r}")
    data["grid_explicit"] = "grid" in data  # then every run's model gets it (model.kwargs.grid)
    for key, default in (("grid", GRID), ("seeds", 1)):
        value = data.setdefault(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AblationError(f"preset file {path}: {key!r} must be a positive integer, got {value!r}")
    missing = [s for s in STUDIES if s not in data["studies"]]
    if missing:
        raise AblationError(f"preset file {path} does not define the studies {', '.join(missing)}")
    data.setdefault("common_overrides", {})
    data.setdefault("name", path.stem)
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
def ranking_value(summary: dict[str, Any]) -> float:
    """The statistic the two-step criterion ranks by: ``best_top1`` (the authors' ``best_prec1``, the number
    Fig. 4 prints), or ``final_top1`` for a summary without it."""
    value = summary.get("best_top1")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return float(summary["final_top1"])


def single_freq_values(runs_root: Path, preset: dict[str, Any]) -> dict[tuple[int, int], dict[int, float]]:
    """``{(u, v): {seed: ranking value}}`` over the complete single-frequency runs in ``runs_root``."""
    epochs = int(preset["studies"]["single_freq"]["epochs"])
    out: dict[tuple[int, int], dict[int, float]] = {}
    for u, v in grid_points(preset["grid"]):
        for run_dir in sorted((Path(runs_root) / "single_freq").glob(f"u{u}v{v}-s*")):
            seed = run_dir.name.rsplit("-s", 1)[1]
            if seed.isdigit() and is_complete(run_dir, epochs):
                out.setdefault((u, v), {})[int(seed)] = ranking_value(read_summary(run_dir))
    return out


def measured_grid(runs_root: Path, preset: dict[str, Any]) -> dict[tuple[int, int], float]:
    """Mean ``best_top1`` per grid point over the complete single-frequency runs (any seed) in ``runs_root``."""
    return {f: sum(v.values()) / len(v) for f, v in single_freq_values(runs_root, preset).items()}


def resolve_source(study: str, requested: str, runs_root: Path, preset: dict[str, Any]):
    """The frequency source of a k-study: ``published`` or ``measured`` (and the measured grid, if used)."""
    if requested not in FREQ_SOURCES:
        raise AblationError(f"unknown frequency source {requested!r}; expected one of {', '.join(FREQ_SOURCES)}")
    if study == "lowk":
        return "published", None  # a fixed low-first order, not derived from any grid
    size = preset["grid"]
    grid = measured_grid(runs_root, preset)
    complete = len(grid) == size * size
    if size != GRID and (requested == "published" or not complete):
        # the authors' Top/Bot orders rank the 7x7 grid of Fig. 4: they say nothing about another grid
        raise AblationError(f"preset {preset['name']!r} uses a {size}x{size} frequency grid: {study} needs the "
                            f"two-step criterion on its own single_freq grid (the published orders are 7x7); "
                            f"{len(grid)}/{size * size} single_freq points are complete in "
                            f"{Path(runs_root) / 'single_freq'}: run --study single_freq first")
    if requested == "measured" and not complete:
        raise AblationError(f"--freq-source measured needs all {size * size} single_freq runs complete in "
                            f"{Path(runs_root) / 'single_freq'}; {len(grid)} are")
    if requested == "published" or not complete:
        return "published", None
    return "measured", grid


def study_frequencies(study: str, ks, source: str, grid, size: int = GRID) -> dict[int, list[tuple[int, int]]]:
    """The frequency list of every k: two-step criterion on the measured grid, or the published order (the
    Low-k order generalised to ``size x size`` grids by :func:`models.dct.low_order`)."""
    method = STUDY_METHOD[study]
    if source == "measured":
        return two_step_criterion(grid, ks)[method]
    if method == "low" and size != GRID:
        order = low_order(size)
        for k in ks:
            if not 1 <= k <= len(order):
                raise AblationError(f"lowk: k={k} out of range for a {size}x{size} grid (1..{len(order)})")
        return {k: order[:k] for k in ks}
    try:
        return {k: published_frequencies(method, k) for k in ks}
    except ValueError as exc:
        raise AblationError(f"{study}: {exc}") from None


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    study: str
    preset: dict[str, Any]
    runs_root: Path
    runs: list[Run]
    freq_source: Optional[str] = None
    base_checkpoint: Optional[str] = None
    seeds: int = 1
    finetune_schedule: str = "ours"

    def gpu_hours(self, run: Run, throughput: float) -> float:
        return float(self.preset["train_images"]) * run.epochs / throughput / 3600.0


def default_runs_root(preset: str, output: Optional[Path]) -> Path:
    """Where run directories live: ``<output>/runs`` when --output is given, else ``runs/ablation/<preset>``."""
    if output is not None:
        return Path(output) / "runs"
    return REPO / "runs" / "ablation" / preset


@functools.lru_cache(maxsize=None)
def config_model_name(config: str) -> Optional[str]:
    """``model.name`` of a trainer config file (following ``_base_``), or None if it cannot be read (the trainer
    then reports the file)."""
    from engine.config import ConfigError, load_yaml_tree  # stdlib + yaml only: planning stays torch-free
    try:
        model = load_yaml_tree(REPO / config).get("model") or {}
    except ConfigError:
        return None
    return model.get("name") if isinstance(model, dict) else None


def check_base_checkpoint(path: str, run: Run) -> str:
    """Validate ``--base-checkpoint`` once, at planning: it must load, strictly, into the fine-tune network of
    ``run`` (the preset's architecture and classes) and hold no attention weights (the fine-tunes add fresh
    attention to a plain network). Returns the resolved path; raises AblationError with one line."""
    file = Path(path)
    if not file.is_file():
        raise AblationError(f"--base-checkpoint {path}: file not found")
    import models
    from engine.config import ConfigError, load_config
    from engine.builders import build_model

    try:
        state = models.read_state_dict(str(file))
    except (ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        if "weights_only" in reason:  # torch's advice to load unsafely is wrong for garbage and unsafe for pickles
            reason = ("not a PyTorch checkpoint of tensors (unreadable, or it holds non-tensor Python objects, "
                      "which are never unpickled)")
        raise AblationError(f"--base-checkpoint {path}: {reason}") from None
    attention = sorted(k for k in state if ".att." in k)
    if attention:
        raise AblationError(f"--base-checkpoint {path}: holds attention weights ({attention[0]}, ...); the "
                            f"single-frequency fine-tunes start from a plain ResNet of the same layout")
    try:
        model = build_model(load_config(REPO / run.config, run.override_args()))
        models.load_weights(model, state)
    except (ConfigError, ValueError) as exc:
        raise AblationError(f"--base-checkpoint {path}: does not fit the preset's network "
                            f"({run.overrides.get('model.name', run.config)}): {str(exc).splitlines()[0]}") from None
    return str(file.resolve())


def build_plan(study: str, preset_name: str, seeds: Optional[int] = None, runs_root: Optional[Path] = None,
               freq_source: str = "auto", base_checkpoint: Optional[str] = None,
               finetune_schedule: str = "ours") -> Plan:
    """The runs of ``study`` under preset ``preset_name``.

    Args:
        seeds: seeds per point (0..seeds-1); ``None``: the preset's ``seeds``.
        runs_root: where run directories live (default ``runs/ablation/<preset>``).
        freq_source: Top-k/Bot-k lists: ``auto``, ``published`` or ``measured``.
        base_checkpoint: single_freq: fine-tune from this plain checkpoint (validated here) instead of a base run.
        finetune_schedule: single_freq: ``ours`` or ``paper-code`` (see ``FINETUNE_SCHEDULES``).
    """
    check_study(study)
    preset = load_preset(preset_name)
    if seeds is None:
        seeds = int(preset["seeds"])
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise AblationError(f"bad --seeds {seeds!r}: expected a positive integer")
    if finetune_schedule not in FINETUNE_SCHEDULES:
        raise AblationError(f"unknown fine-tune schedule {finetune_schedule!r}; expected one of "
                            f"{', '.join(FINETUNE_SCHEDULES)}")
    if finetune_schedule != "ours" and study != "single_freq":
        raise AblationError(f"--finetune-schedule applies to the single_freq fine-tunes, not to {study}")
    runs_root = Path(runs_root) if runs_root is not None else default_runs_root(preset["name"], None)
    runs_root = runs_root.resolve()
    spec = preset["studies"][study]
    size = int(preset["grid"])
    common = {k: expand(v, runs_root) for k, v in (preset.get("common_overrides") or {}).items()}
    runs: list[Run] = []

    def make(point, seed, config, epochs, extra, meta, depends=()):
        run_dir = runs_root / study
        name_meta = dict(meta)
        tag = point if seed is None else f"{point}-s{seed}"
        if study in STUDY_METHOD:
            run_dir = run_dir / meta["freq_source"]
        elif study == "single_freq" and finetune_schedule != "ours":
            run_dir = run_dir / finetune_schedule  # another protocol: its own run directories and table
        run_dir = run_dir / tag
        overrides = dict(common)
        overrides.update(extra)
        if preset["grid_explicit"]:
            overrides["model.kwargs"] = dict(overrides.get("model.kwargs") or {}, grid=size)
        model = overrides.get("model.name") or config_model_name(config)
        if model and isinstance(overrides.get("model.kwargs"), dict):
            # The preset's model options are shared by the plain base network and the FCA fine-tunes; a model
            # refuses the options it would ignore (reduction, grid, ... on a plain ResNet), so each run gets its own.
            try:
                taken = model_options(model)
            except ValueError:  # an unknown name: the trainer refuses it, naming the config key
                taken = tuple(overrides["model.kwargs"])
            overrides["model.kwargs"] = {k: v for k, v in overrides["model.kwargs"].items() if k in taken}
        overrides["train.epochs"] = int(epochs)
        overrides["seed"] = 0 if seed is None else int(seed)
        overrides["output_dir"] = str(run_dir)
        name_meta.update({"study": study, "point": point, "seed": overrides["seed"], "preset": preset["name"]})
        return Run(study, point, seed, config, int(epochs), run_dir, overrides, name_meta, tuple(depends))

    source = None
    if study == "single_freq":
        base = preset["base"]
        depends: tuple[str, ...] = ()
        if base_checkpoint is None:
            base_run = make("base", None, base["config"], base["epochs"], dict(base.get("overrides") or {}),
                            {"role": "base"})
            base_run.run_dir = runs_root / study / "base"  # shared by every fine-tune schedule
            base_run.overrides["output_dir"] = str(base_run.run_dir)
            runs.append(base_run)
            depends = (base_run.name,)
            init = str(base_run.run_dir / base.get("checkpoint", "checkpoints/last.pth"))
        else:
            init = None  # validated below, against the first fine-tune's network
        schedule = {}
        if finetune_schedule == "paper-code":
            schedule = {SCHEDULE_KEY: PAPER_CODE_SCHEDULE_EPOCHS}
        for seed in range(seeds):
            for u, v in grid_points(size):
                extra = dict(spec.get("overrides") or {})
                extra.update(schedule)
                extra["model.freq"] = [[u, v]]
                extra["model.init_checkpoint"] = init
                meta = {"role": "single_freq", "u": u, "v": v, "frequencies": [[u, v]], "grid_size": size,
                        "freq_source": "grid", "init_checkpoint": init, "finetune_schedule": finetune_schedule}
                runs.append(make(f"u{u}v{v}", seed, spec["config"], spec["epochs"], extra, meta, depends))
        if base_checkpoint is not None:
            init = check_base_checkpoint(base_checkpoint, runs[0])
            for run in runs:
                run.overrides["model.init_checkpoint"] = init
                run.meta["init_checkpoint"] = init
    else:
        source, grid = resolve_source(study, freq_source, runs_root, preset)
        ks = [int(k) for k in spec["ks"]]
        freqs = study_frequencies(study, ks, source, grid, size)
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
    return Plan(study, preset, runs_root, runs, source, base_checkpoint, seeds, finetune_schedule)
