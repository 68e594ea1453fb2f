"""Study registry and planning: which runs a study of a preset consists of.

Studies (paper Sec. 4.2, appendix 6.1), on the preset's S x S frequency grid (``grid``: 7 in the paper):

* ``single_freq`` (Fig. 4): a plain base network, then S*S fine-tunes that add FCA with one frequency (u, v)
  of the grid for all channels.
* ``topk`` / ``botk`` (Tables 1 and 6): k frequencies from the two-step criterion (best / worst k of the
  single-frequency grid), trained from scratch. The order comes from our own measured grid when all S*S
  single-frequency runs of the preset are complete, otherwise from the authors' published orders (7x7 only).
* ``lowk`` (Table 5): the k lowest frequencies of the fixed Low-k order (appendix Fig. 5b); never grid-derived.

Presets are typed data (:mod:`ablation.preset`). Every run is one trainer invocation
``train_imagenet.py --config CONFIG KEY=VALUE ...`` with its own run directory; :func:`build_plan` resolves each
run's trainer config exactly as the trainer will, so a bad preset fails at ``plan`` time with one line.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.config import Config, ConfigError, apply_overrides, build_config, load_yaml_tree
from models.dct import GRID, low_order, published_frequencies, two_step_criterion

from .errors import AblationError
from .network import frequency_problem
from .preset import MAX_SEEDS, REPO, Preset, load_preset
from .summaries import is_complete, ranking_value, read_summary

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
    settings: dict[str, Any] = field(default_factory=dict)  # the resolved trainer config (filled by validation)

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


def check_study(study: str) -> str:
    if study not in STUDIES:
        raise AblationError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    return study


def stale_reason(run: Run) -> Optional[str]:
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


# ------------------------------------------------------------------------------------------ frequencies
def single_freq_values(runs_root: Path, preset: Preset) -> dict[tuple[int, int], dict[int, float]]:
    """``{(u, v): {seed: ranking value}}`` over the complete single-frequency runs in ``runs_root``."""
    epochs = preset.studies.single_freq.epochs
    out: dict[tuple[int, int], dict[int, float]] = {}
    for u, v in grid_points(preset.grid_size):
        for run_dir in sorted((Path(runs_root) / "single_freq").glob(f"u{u}v{v}-s*")):
            seed = run_dir.name.rsplit("-s", 1)[1]
            if seed.isdigit() and is_complete(run_dir, epochs):
                out.setdefault((u, v), {})[int(seed)] = ranking_value(read_summary(run_dir))
    return out


def measured_grid(runs_root: Path, preset: Preset) -> dict[tuple[int, int], float]:
    """Mean ``best_top1`` per grid point over the complete single-frequency runs (any seed) in ``runs_root``."""
    return {f: sum(v.values()) / len(v) for f, v in single_freq_values(runs_root, preset).items()}


def resolve_source(study: str, requested: str, runs_root: Path, preset: Preset):
    """The frequency source of a k-study: ``published`` or ``measured`` (and the measured grid, if used)."""
    if requested not in FREQ_SOURCES:
        raise AblationError(f"unknown frequency source {requested!r}; expected one of {', '.join(FREQ_SOURCES)}")
    if study == "lowk":
        return "published", None  # a fixed low-first order, not derived from any grid
    size = preset.grid_size
    grid = measured_grid(runs_root, preset)
    complete = len(grid) == size * size
    if size != GRID and (requested == "published" or not complete):
        # the authors' Top/Bot orders rank the 7x7 grid of Fig. 4: they say nothing about another grid
        raise AblationError(f"preset {preset.name!r} uses a {size}x{size} frequency grid: {study} needs the "
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
        return {k: order[:k] for k in ks}
    try:
        return {k: published_frequencies(method, k) for k in ks}
    except ValueError as exc:
        raise AblationError(f"{study}: {exc}") from None


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    study: str
    preset: Preset
    preset_path: Path
    runs_root: Path
    runs: list[Run]
    freq_source: Optional[str] = None
    base_checkpoint: Optional[str] = None
    seeds: int = 1
    finetune_schedule: str = "ours"

    def gpu_hours(self, run: Run, throughput: float) -> float:
        return float(self.preset.train_images) * run.epochs / throughput / 3600.0


def default_runs_root(preset: str, output: Optional[Path]) -> Path:
    """Where run directories live: ``<output>/runs`` when --output is given, else ``runs/ablation/<preset>``."""
    if output is not None:
        return Path(output) / "runs"
    return REPO / "runs" / "ablation" / preset


class _Planner:
    """Builds the :class:`Run` objects of one study: run directories, names and trainer overrides."""

    def __init__(self, study: str, preset: Preset, runs_root: Path, finetune_schedule: str):
        self.study, self.preset, self.runs_root = study, preset, runs_root
        self.finetune_schedule = finetune_schedule
        self.common = {k: expand(v, runs_root) for k, v in preset.common_overrides.items()}

    def run(self, point: str, seed: Optional[int], config: str, epochs: int, extra: dict[str, Any],
            meta: dict[str, Any], depends: tuple[str, ...] = (), run_dir: Optional[Path] = None) -> Run:
        tag = point if seed is None else f"{point}-s{seed}"
        if run_dir is None:
            run_dir = self.runs_root / self.study
            if self.study in STUDY_METHOD:
                run_dir = run_dir / meta["freq_source"]
            elif self.finetune_schedule != "ours":
                run_dir = run_dir / self.finetune_schedule  # another protocol: its own run directories and table
            run_dir = run_dir / tag
        overrides = dict(self.common)
        overrides.update(extra)
        if self.preset.grid is not None:
            overrides["model.kwargs"] = dict(overrides.get("model.kwargs") or {}, grid=self.preset.grid)
        overrides["train.epochs"] = int(epochs)
        overrides["seed"] = 0 if seed is None else int(seed)
        overrides["output_dir"] = str(run_dir)
        meta = dict(meta, study=self.study, point=point, seed=overrides["seed"], preset=self.preset.name)
        return Run(self.study, point, seed, config, int(epochs), run_dir, overrides, meta, tuple(depends))


def plan_base(planner: _Planner) -> Run:
    """The plain base network the single-frequency fine-tunes start from (shared by every fine-tune schedule)."""
    base = planner.preset.base
    return planner.run("base", None, base.config, base.epochs, dict(base.overrides), {"role": "base"},
                       run_dir=planner.runs_root / "single_freq" / "base")


def plan_single_freq(planner: _Planner, seeds: int, base_checkpoint: Optional[str]) -> list[Run]:
    """single_freq: the base run (unless ``base_checkpoint``) and S*S fine-tunes per seed."""
    preset, spec = planner.preset, planner.preset.studies.single_freq
    runs: list[Run] = []
    depends: tuple[str, ...] = ()
    init = None  # with --base-checkpoint: validated once the first fine-tune's network is known
    if base_checkpoint is None:
        base_run = plan_base(planner)
        runs.append(base_run)
        depends = (base_run.name,)
        init = str(base_run.run_dir / preset.base.checkpoint)
    schedule = paper_code_schedule(preset) if planner.finetune_schedule == "paper-code" else {}
    size = preset.grid_size
    for seed in range(seeds):
        for u, v in grid_points(size):
            extra = {**spec.overrides, **schedule, "model.freq": [[u, v]], "model.init_checkpoint": init}
            meta = {"role": "single_freq", "u": u, "v": v, "frequencies": [[u, v]], "grid_size": size,
                    "freq_source": "grid", "init_checkpoint": init, "finetune_schedule": planner.finetune_schedule}
            runs.append(planner.run(f"u{u}v{v}", seed, spec.config, spec.epochs, extra, meta, depends))
    if base_checkpoint is not None:
        init = check_base_checkpoint(base_checkpoint, runs[0])
        for run in runs:
            run.overrides["model.init_checkpoint"] = init
            run.meta["init_checkpoint"] = init
    return runs


def paper_code_schedule(preset: Preset) -> dict[str, Any]:
    """``--finetune-schedule paper-code``: the authors' main.py cosine length."""
    return {SCHEDULE_KEY: PAPER_CODE_SCHEDULE_EPOCHS}


def plan_kstudy(planner: _Planner, seeds: int, freq_source: str) -> tuple[list[Run], str]:
    """topk / lowk / botk: one run per k and seed, with the frequencies of the study's source."""
    study, preset = planner.study, planner.preset
    spec = preset.study(study)
    source, grid = resolve_source(study, freq_source, planner.runs_root, preset)
    freqs = study_frequencies(study, spec.ks, source, grid, preset.grid_size)
    method = STUDY_METHOD[study]
    runs = []
    for seed in range(seeds):
        for k in spec.ks:
            chosen = [list(f) for f in freqs[k]]
            meta = {"role": study, "method": method, "k": k, "frequencies": chosen, "freq_source": source}
            if grid is not None:
                meta["grid"] = {f"{u},{v}": a for (u, v), a in sorted(grid.items())}
            runs.append(planner.run(f"{method}{k}", seed, spec.config, spec.epochs,
                                    {**spec.overrides, "model.freq": chosen}, meta))
    return runs, source


def check_base_checkpoint(path: str, run: Run) -> str:
    """Validate ``--base-checkpoint`` once, at planning: it must load, strictly, into the fine-tune network of
    ``run`` (the preset's architecture and classes) and hold no attention weights (the fine-tunes add fresh
    attention to a plain network). Returns the resolved path; raises AblationError with one line."""
    file = Path(path)
    if not file.is_file():
        raise AblationError(f"--base-checkpoint {path}: file not found")
    import models
    from engine.builders import build_model
    from engine.config import load_config

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


# ------------------------------------------------------------------------------------------ validation
class _Resolver:
    """Each run's trainer config, resolved exactly as the trainer does (file tree, overrides, schema), with the
    config files read once. Runs that differ only in seed and run directory share one resolution."""

    VARYING = ("seed", "output_dir")

    def __init__(self, preset_path: Path):
        self.preset_path = preset_path
        self.trees: dict[str, dict] = {}
        self.cache: dict[str, Config] = {}

    def __call__(self, run: Run) -> Config:
        key = json.dumps([run.config, {k: v for k, v in run.overrides.items() if k not in self.VARYING}],
                         sort_keys=True, default=str)
        if key not in self.cache:
            try:
                if run.config not in self.trees:
                    self.trees[run.config] = load_yaml_tree(REPO / run.config)
                self.cache[key] = build_config(apply_overrides(self.trees[run.config], run.override_args()))
            except ConfigError as exc:
                raise AblationError(f"preset file {self.preset_path}: run {run.name}: {exc}") from None
        cfg = copy.deepcopy(self.cache[key])
        cfg.seed, cfg.output_dir = run.overrides["seed"], run.overrides["output_dir"]
        return cfg


def validate(plan: Plan) -> None:
    """Resolve every run's trainer config (one-line errors naming the preset, run and key) and refuse
    frequencies the network cannot hold, before anything trains."""
    resolve = _Resolver(plan.preset_path)
    size = plan.preset.grid_size
    checked: set[int] = set()
    for run in plan.runs:
        cfg = resolve(run)
        run.settings = cfg.to_dict()
        freqs = run.meta.get("frequencies")
        if freqs is None or len(freqs) in checked:
            continue
        checked.add(len(freqs))
        problem = frequency_problem(cfg, len(freqs), size)
        if problem:
            kind, text = problem
            key = "grid" if kind == "grid" else f"studies.{plan.study}.ks"
            raise AblationError(f"preset file {plan.preset_path}: key '{key}': {text}")


def build_plan(study: str, preset_name: str, seeds: Optional[int] = None, runs_root: Optional[Path] = None,
               freq_source: str = "auto", base_checkpoint: Optional[str] = None,
               finetune_schedule: str = "ours") -> Plan:
    """The runs of ``study`` under preset ``preset_name``, validated.

    Args:
        seeds: seeds per point (0..seeds-1); ``None``: the preset's ``seeds``.
        runs_root: where run directories live (default ``runs/ablation/<preset>``).
        freq_source: Top-k/Bot-k lists: ``auto``, ``published`` or ``measured``.
        base_checkpoint: single_freq: fine-tune from this plain checkpoint (validated here) instead of a base run.
        finetune_schedule: single_freq: ``ours`` or ``paper-code`` (see ``FINETUNE_SCHEDULES``).
    """
    check_study(study)
    preset, path = load_preset(preset_name)
    seeds = preset.seeds if seeds is None else seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise AblationError(f"bad --seeds {seeds!r}: expected an integer from 1 to {MAX_SEEDS}")
    if finetune_schedule not in FINETUNE_SCHEDULES:
        raise AblationError(f"unknown fine-tune schedule {finetune_schedule!r}; expected one of "
                            f"{', '.join(FINETUNE_SCHEDULES)}")
    if finetune_schedule != "ours" and study != "single_freq":
        raise AblationError(f"--finetune-schedule applies to the single_freq fine-tunes, not to {study}")
    runs_root = (Path(runs_root) if runs_root is not None else default_runs_root(preset.name, None)).resolve()
    planner = _Planner(study, preset, runs_root, finetune_schedule)
    source = None
    if study == "single_freq":
        runs = plan_single_freq(planner, seeds, base_checkpoint)
    else:
        runs, source = plan_kstudy(planner, seeds, freq_source)
    plan = Plan(study, preset, path, runs_root, runs, source, base_checkpoint, seeds, finetune_schedule)
    validate(plan)
    return plan
