"""Study registry and planning: which runs a study of a preset consists of.

A seed is a whole replicate: seed s trains its own plain base network, and everything of seed s that starts
from a base starts from base s (every analysis is paired within seeds). Studies (paper Sec. 4.2, appendix 6.1),
on the preset's S x S frequency grid (``grid``: 7 in the paper):

* ``single_freq`` (Fig. 4): per seed, the base, a no-attention control (the base trained on for the fine-tune
  budget with the same recipe) and S*S fine-tunes that add FCA with one frequency (u, v) for all channels.
* ``topk`` / ``botk`` (Tables 1 and 6): the best / worst k of the two-step criterion, ordered by our measured
  grid once its single_freq runs are complete, otherwise by the authors' published orders (7x7 only).
* ``lowk`` (Table 5): the k lowest frequencies of the fixed Low-k order (appendix Fig. 5b).

k-runs train from scratch (the paper) or, with ``start: base``, fine-tune from the seed's base; a k-run whose
resolved config equals a single_freq fine-tune's *is* that run (shared, trained once, flagged in the tables).
Each run is one ``train_imagenet.py --config CONFIG KEY=VALUE ...`` invocation with its own run directory;
:func:`build_plan` resolves each run's config exactly as the trainer will, so a bad preset fails at ``plan``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import Config, ConfigError, apply_overrides, build_config, check_model_freq, diff_configs, \
    load_yaml_tree
from models.dct import GRID, low_order, published_frequencies, two_step_criterion
from models.registry import model_options

from .errors import AblationError
from .network import ATTENTION_ONLY_KWARGS, frequency_problem
from .preset import MAX_SEEDS, REPO, Preset, load_preset
from .summaries import is_complete, ranking_value, read_summary

STUDIES = ("single_freq", "topk", "lowk", "botk")
RUN_ORDER = ("single_freq", "lowk", "topk", "botk")  # topk / botk rank the finished single_freq grid
STUDY_METHOD = {"topk": "top", "lowk": "low", "botk": "bot"}
FREQ_SOURCES = ("auto", "published", "measured")
# Fine-tune schedules of single_freq (Fig. 4). Paper Sec. 4.2 only says "similar optimization setting";
# 'ours': warmup then cosine to 0 over the fine-tune's own length; 'paper-code': the authors' main.py schedule
# (5 warmup + 95 cosine epochs = the base's 100), scaled to the preset's base length, of which the fine-tune
# runs its first epochs.
FINETUNE_SCHEDULES = ("ours", "paper-code")
PAPER_CODE_WARMUP, PAPER_CODE_LENGTH = 5, 100
SCHEDULE_KEY = "train.schedule_epochs"  # trainer key: cosine length in epochs (default: train.epochs)
# Keys a no-attention control may differ in from the fine-tunes (everything else, the lr schedule included,
# must be equal): the network's name and attention options, and where the run lives.
CONTROL_MAY_DIFFER = ("model.name", "model.freq", "model.kwargs", "output_dir")


def grid_points(grid: int = GRID) -> list[tuple[int, int]]:
    """The S*S single-frequency points (u, v), row-major."""
    return [(u, v) for u in range(grid) for v in range(grid)]


GRID_POINTS = grid_points(GRID)


@dataclass
class Run:
    """One trainer invocation of a study."""

    study: str
    point: str                      # "base", "control", "u0v1", "top4", ...
    seed: int | None             # None only for a single base given by --base-checkpoint's absence of seeds
    config: str                     # trainer config, relative to the repository root
    epochs: int
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)   # written to <run_dir>/ablation.json
    depends: tuple[str, ...] = ()   # names of runs that must be complete first
    settings: dict[str, Any] = field(default_factory=dict)  # resolved trainer config, comparable form

    @property
    def name(self) -> str:
        tag = self.point if self.seed is None else f"{self.point}-s{self.seed}"
        source = self.meta.get("freq_source")
        if self.study in STUDY_METHOD and source:
            return f"{self.study}/{source}/{tag}"
        return f"{self.study}/{tag}"

    @property
    def role(self) -> str:
        return self.meta.get("role", self.study)

    @property
    def is_point(self) -> bool:
        """A row of the study's table (not a base or control the table only refers to)."""
        return self.role not in ("base", "control")

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


# ------------------------------------------------------------------------------------ recorded settings
def comparable_settings(cfg: Config, runs_root: Path, env: dict[str, Any]) -> dict[str, Any]:
    """What a run is trained with, in a form that survives moving the runs directory: the resolved trainer
    config without ``output_dir``, ``runs_root`` written as ``{runs_root}``, plus the environment of the run."""
    root = str(runs_root)

    def norm(value):
        if isinstance(value, str) and value.startswith(root):
            return "{runs_root}" + value[len(root):]
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        return value

    data = norm(cfg.to_dict())
    data.pop("output_dir", None)
    data["env"] = {str(k): str(v) for k, v in env.items()}
    return data


def settings_difference(old: dict[str, Any], new: dict[str, Any], most: int = 2) -> str | None:
    """``optim.base_lr 0.2 -> 3.0, ...`` for the keys that differ, or None."""
    keys = diff_configs(old, new)
    if not keys:
        return None

    def get(data, key):
        for part in key.split("."):
            data = data.get(part) if isinstance(data, dict) else None
        return json.dumps(data, separators=(",", ":"))

    text = ", ".join(f"{k} {get(old, k)} -> {get(new, k)}" for k in keys[:most])
    return text + (f" and {len(keys) - most} more key(s)" if len(keys) > most else "")


def recorded(run: Run) -> dict[str, Any] | None:
    """The ``ablation.json`` the runner wrote in the run's directory, or None."""
    try:
        data = json.loads((run.run_dir / "ablation.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reason(run: Run) -> str | None:
    """Why ``run``'s directory does not hold what the plan would train now (other frequencies, e.g. after the
    measured grid changed; another start; a preset edited between runs), or None. From its ``ablation.json``."""
    old = recorded(run)
    if old is None or run.meta.get("pending"):
        return None
    for key in ("frequencies", "init_checkpoint"):
        if key in run.meta and key in old and old[key] != run.meta[key] and "settings" not in old:
            return f"it was run with {key} {old[key]}, the plan now gives {run.meta[key]}"
    if isinstance(old.get("settings"), dict) and run.settings:
        diff = settings_difference(old["settings"], run.settings)
        if diff:
            return f"it was trained with other settings than the preset now gives: {diff}"
    return None


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    study: str
    preset: Preset
    preset_path: Path
    runs_root: Path
    runs: list[Run]
    freq_source: str | None = None
    base_checkpoint: str | None = None
    seeds: int = 1
    finetune_schedule: str = "ours"
    pending: str | None = None   # a k-study whose frequencies wait for single_freq: what it needs

    def gpu_hours(self, run: Run, throughput: float) -> float:
        return float(self.preset.train_images) * run.epochs / throughput / 3600.0

    @property
    def points(self) -> list[Run]:
        return [r for r in self.runs if r.is_point]


def default_runs_root(preset: str) -> Path:
    """Where run directories live unless --runs-dir says otherwise: ``runs/ablation/<preset>``."""
    return REPO / "runs" / "ablation" / preset


class _Planner:
    """Builds and resolves the :class:`Run` objects of one preset: run directories, names, trainer overrides,
    and each run's trainer config as the trainer will resolve it (config files read once)."""

    def __init__(self, preset: Preset, preset_path: Path, runs_root: Path, seeds: int, finetune_schedule: str):
        self.preset, self.preset_path, self.runs_root = preset, preset_path, runs_root
        self.seeds, self.finetune_schedule = seeds, finetune_schedule
        self.common = {k: expand(v, runs_root) for k, v in preset.common_overrides.items()}
        self.trees: dict[str, dict] = {}
        self.resolved: dict[str, Config] = {}

    def tree(self, config: str) -> dict:
        if config not in self.trees:
            try:
                self.trees[config] = load_yaml_tree(REPO / config)
            except ConfigError as exc:
                raise AblationError(f"preset file {self.preset_path}: {exc}") from None
        return self.trees[config]

    def run(self, study: str, point: str, seed: int | None, config: str, epochs: int, extra: dict[str, Any],
            meta: dict[str, Any], depends: tuple[str, ...] = (), run_dir: Path | None = None) -> Run:
        """A run of ``study``: the preset's common overrides, then ``extra``; ``model.kwargs`` merged over the
        config file's (so settings such as ``zero_init_residual`` are kept unless the preset changes them),
        without attention options on a plain network."""
        tag = point if seed is None else f"{point}-s{seed}"
        if run_dir is None:
            run_dir = self.runs_root / study
            if study in STUDY_METHOD:
                run_dir = run_dir / meta["freq_source"]
            elif self.finetune_schedule != "ours":
                run_dir = run_dir / self.finetune_schedule  # another protocol: its own run directories and table
            run_dir = run_dir / tag
        overrides = {**self.common, **extra}
        kwargs = {**((self.tree(config).get("model") or {}).get("kwargs") or {}),
                  **(self.common.get("model.kwargs") or {}), **(extra.get("model.kwargs") or {})}
        if "frequencies" in meta and self.preset.grid is not None:
            kwargs["grid"] = self.preset.grid
        # Each run gets only the options its model takes (the registry's table): the plain base and control
        # networks refuse the FCA grid and the excitation reduction the fine-tunes use.
        name = overrides.get("model.name") or (self.tree(config).get("model") or {}).get("name")
        try:
            taken = model_options(str(name))
        except (ValueError, KeyError):  # an unknown name: the trainer refuses it, naming the config key
            taken = tuple(k for k in kwargs if k not in ATTENTION_ONLY_KWARGS or "frequencies" in meta)
        overrides["model.kwargs"] = {k: v for k, v in kwargs.items() if k in taken}
        overrides["train.epochs"] = int(epochs)
        overrides["seed"] = 0 if seed is None else int(seed)
        overrides["output_dir"] = str(run_dir)
        meta = dict(meta, study=study, point=point, seed=overrides["seed"], preset=self.preset.name)
        return Run(study, point, seed, config, int(epochs), run_dir, overrides, meta, tuple(depends))

    # Keys that vary from run to run of a group: resolved once per group, then set on a copy (model.freq is
    # checked on its own, by the same parser as the config layer's).
    VARYING = ("seed", "output_dir", "model.freq", "model.init_checkpoint")

    def resolve(self, run: Run) -> Config:
        """The run's trainer config (one-line errors naming the preset, the run and the key)."""
        key = json.dumps([run.config, {k: v for k, v in run.overrides.items() if k not in self.VARYING}],
                         sort_keys=True, default=str)
        try:
            if key not in self.resolved:
                self.resolved[key] = build_config(apply_overrides(self.tree(run.config), run.override_args()))
            cfg = copy.deepcopy(self.resolved[key])
            cfg.seed, cfg.output_dir = run.overrides["seed"], run.overrides["output_dir"]
            cfg.model.init_checkpoint = run.overrides.get("model.init_checkpoint", cfg.model.init_checkpoint)
            if "model.freq" in run.overrides:
                cfg.model.freq = run.overrides["model.freq"]
                check_model_freq(cfg)
        except ConfigError as exc:
            raise AblationError(f"preset file {self.preset_path}: run {run.name}: {exc}") from None
        return cfg

    def settle(self, run: Run) -> Config:
        cfg = self.resolve(run)
        run.settings = comparable_settings(cfg, self.runs_root, self.preset.env)
        return cfg

    # ---------------------------------------------------------------------------------------- the runs
    def base(self, seed: int) -> Run:
        """Seed ``seed``'s plain base network (paper Sec. 4.2: ResNet-50, 100 epochs), shared by every study."""
        spec = self.preset.base
        return self.run("single_freq", "base", seed, spec.config, spec.epochs, dict(spec.overrides),
                        {"role": "base"}, run_dir=self.runs_root / "single_freq" / f"base-s{seed}")

    def base_checkpoint_of(self, base: Run) -> str:
        return str(base.run_dir / self.preset.base.checkpoint)

    def finetune(self, seed: int, u: int, v: int, init: str | None, depends: tuple[str, ...]) -> Run:
        spec = self.preset.studies.single_freq
        extra = {**spec.overrides, **self.schedule(), "model.freq": [[u, v]], "model.init_checkpoint": init}
        meta = {"role": "single_freq", "u": u, "v": v, "frequencies": [[u, v]], "grid_size": self.preset.grid_size,
                "freq_source": "grid", "init_checkpoint": init, "finetune_schedule": self.finetune_schedule}
        return self.run("single_freq", f"u{u}v{v}", seed, spec.config, spec.epochs, extra, meta, depends)

    def control(self, seed: int, init: str | None, depends: tuple[str, ...]) -> Run:
        """The base trained on for the fine-tune budget without attention: the fine-tunes' recipe and schedule,
        the base's network (its config file and model overrides)."""
        spec, base = self.preset.studies.single_freq, self.preset.base
        recipe = {k: v for k, v in spec.overrides.items() if not k.startswith("model.")}
        network = {k: v for k, v in base.overrides.items() if k.startswith("model.")}
        extra = {**recipe, **self.schedule(), **network, "model.init_checkpoint": init}
        meta = {"role": "control", "init_checkpoint": init, "finetune_schedule": self.finetune_schedule}
        return self.run("single_freq", "control", seed, base.config, spec.epochs, extra, meta, depends)

    def schedule(self) -> dict[str, Any]:
        return paper_code_schedule(self.preset) if self.finetune_schedule == "paper-code" else {}


def paper_code_schedule(preset: Preset) -> dict[str, Any]:
    """``--finetune-schedule paper-code``: the authors' main.py schedule (5 warmup + 95 cosine epochs, the
    length of their 100-epoch base), scaled to this preset's base length; the fine-tune runs its first epochs."""
    length = preset.base.epochs
    return {SCHEDULE_KEY: length, "train.warmup_epochs": PAPER_CODE_WARMUP * length / PAPER_CODE_LENGTH}


def plan_single_freq(planner: _Planner, base_checkpoint: str | None) -> list[Run]:
    """Every seed's base first (unless ``base_checkpoint``), then per seed its control and S*S fine-tunes (an
    sbatch array can then hold the fine-tunes back until every base is done)."""
    spec = planner.preset.studies.single_freq
    bases = [] if base_checkpoint is not None else [planner.base(seed) for seed in range(planner.seeds)]
    runs: list[Run] = list(bases)
    for seed in range(planner.seeds):
        depends: tuple[str, ...] = ()
        init = None  # with --base-checkpoint: validated once the first fine-tune's network is known
        if bases:
            depends, init = (bases[seed].name,), planner.base_checkpoint_of(bases[seed])
        if spec.control:
            runs.append(planner.control(seed, init, depends))
        runs += [planner.finetune(seed, u, v, init, depends) for u, v in grid_points(planner.preset.grid_size)]
    if base_checkpoint is not None:
        first = next(r for r in runs if r.role == "single_freq")
        init = check_base_checkpoint(base_checkpoint, first, planner.resolve(first))
        for run in runs:
            run.overrides["model.init_checkpoint"] = init
            run.meta["init_checkpoint"] = init
    return runs


# ------------------------------------------------------------------------------------------ frequencies
def single_freq_values(plan: Plan) -> dict[tuple[int, int], dict[int, float]]:
    """``{(u, v): {seed: ranking value}}`` over the complete fine-tunes of a single_freq plan. Refuses a
    complete run trained with other settings than the plan's (its value would be of another protocol)."""
    out: dict[tuple[int, int], dict[int, float]] = {}
    for run in plan.points:
        if is_complete(run.run_dir, run.epochs):
            reason = stale_reason(run)
            if reason:
                raise AblationError(f"run directory {run.run_dir} does not match the plan: {reason}; move it away")
            out.setdefault((run.meta["u"], run.meta["v"]), {})[run.seed] = ranking_value(read_summary(run.run_dir))
    return out


def measured_grid(plan: Plan) -> tuple[dict[tuple[int, int], float], int]:
    """The mean ranking value per grid point over the plan's seeds, and how many of the plan's fine-tunes are
    complete. The grid is empty until every point is complete for every seed."""
    values = single_freq_values(plan)
    done = sum(len(v) for v in values.values())
    if done < len(plan.points):
        return {}, done
    return {f: sum(v.values()) / len(v) for f, v in values.items()}, done


def resolve_source(study: str, requested: str, planner: _Planner) -> tuple[str, dict | None, str | None]:
    """A k-study's frequency source, the measured grid if used, and what is pending (or None)."""
    if requested not in FREQ_SOURCES:
        raise AblationError(f"unknown frequency source {requested!r}; expected one of {', '.join(FREQ_SOURCES)}")
    if study == "lowk":
        return "published", None, None  # a fixed low-first order, not derived from any grid
    preset, size = planner.preset, planner.preset.grid_size
    sf = Plan("single_freq", preset, planner.preset_path, planner.runs_root,
              plan_single_freq(_Planner(preset, planner.preset_path, planner.runs_root, planner.seeds, "ours"), None),
              seeds=planner.seeds)
    for run in sf.runs:
        planner.settle(run)
    grid, done = measured_grid(sf)
    where = f"{planner.runs_root / 'single_freq'}"
    if requested == "measured" and not grid:
        raise AblationError(f"--freq-source measured needs the {len(sf.points)} single_freq fine-tunes of "
                            f"{planner.seeds} seed(s) complete in {where}; {done} are")
    if grid:
        return ("published", None, None) if requested == "published" else ("measured", grid, None)
    if size == GRID and requested != "measured":
        return "published", None, None
    if requested == "published":  # the authors' Top/Bot orders rank the 7x7 grid of Fig. 4
        raise AblationError(f"preset {preset.name!r} uses a {size}x{size} frequency grid: the published {study} "
                            f"orders are 7x7; use the measured source (the default)")
    return "measured", None, (f"the two-step criterion on this preset's own {size}x{size} single_freq grid: "
                              f"{done}/{len(sf.points)} fine-tunes of {planner.seeds} seed(s) are complete in "
                              f"{where}; run --study single_freq first")


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


def plan_kstudy(planner: _Planner, study: str, freq_source: str) -> tuple[list[Run], str, str | None]:
    """topk / lowk / botk: per seed (its base first when the k-runs start from it), one run per k."""
    preset = planner.preset
    spec = preset.study(study)
    source, grid, pending = resolve_source(study, freq_source, planner)
    # pending: a stand-in list of the same length (the Low-k order) only validates shapes; `run` refuses
    freqs = study_frequencies("lowk" if pending else study, spec.ks, "published" if pending else source, grid,
                              preset.grid_size)
    method = STUDY_METHOD[study]
    bases = [planner.base(seed) for seed in range(planner.seeds)] if spec.start == "base" else []
    runs: list[Run] = list(bases)
    for seed in range(planner.seeds):
        depends: tuple[str, ...] = ()
        extra: dict[str, Any] = dict(spec.overrides)
        if bases:
            depends = (bases[seed].name,)
            extra["model.init_checkpoint"] = planner.base_checkpoint_of(bases[seed])
        for k in spec.ks:
            chosen = [list(f) for f in freqs[k]]
            meta = {"role": study, "method": method, "k": k, "frequencies": chosen, "freq_source": source,
                    "start": spec.start, "init_checkpoint": extra.get("model.init_checkpoint")}
            if pending:
                meta["pending"] = True
            if grid is not None:
                meta["grid"] = {f"{u},{v}": a for (u, v), a in sorted(grid.items())}
            runs.append(planner.run(study, f"{method}{k}", seed, spec.config, spec.epochs,
                                    {**extra, "model.freq": chosen}, meta, depends))
    return runs, source, pending


def share_single_freq_runs(planner: _Planner, runs: list[Run]) -> None:
    """A one-frequency k-run whose trainer config equals a single_freq fine-tune's (same start, recipe and
    seed) is that fine-tune: point it at the fine-tune's directory, so it is trained once, and flag it."""
    for run in runs:
        freqs = run.meta.get("frequencies")
        if run.meta.get("start") != "base" or run.meta.get("pending") or len(freqs) != 1:
            continue
        (u, v), = freqs
        twin = planner.finetune(run.seed, u, v, run.meta["init_checkpoint"], run.depends)
        planner.settle(twin)
        if twin.settings == run.settings:
            run.run_dir = twin.run_dir
            run.overrides["output_dir"] = str(twin.run_dir)
            run.meta["shared_with"] = twin.name


def check_base_checkpoint(path: str, run: Run, cfg: Config) -> str:
    """Validate ``--base-checkpoint`` once, at planning: it must load, strictly, into the fine-tune network of
    ``run`` (the preset's architecture and classes) and hold no attention weights (the fine-tunes add fresh
    attention to a plain network). Returns the resolved path; raises AblationError with one line."""
    file = Path(path)
    if not file.is_file():
        raise AblationError(f"--base-checkpoint {path}: file not found")
    import models
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
        models.load_weights(build_model(cfg), state)
    except (ConfigError, ValueError) as exc:
        raise AblationError(f"--base-checkpoint {path}: does not fit the preset's network "
                            f"({cfg.model.name}): {str(exc).splitlines()[0]}") from None
    return str(file.resolve())


# ------------------------------------------------------------------------------------------ validation
def validate(plan: Plan, planner: _Planner) -> None:
    """Resolve every run's trainer config and record its comparable settings; refuse frequencies the network
    cannot hold, and a control that differs from the fine-tunes in more than the attention, before anything
    trains."""
    size = plan.preset.grid_size
    checked: set[int] = set()
    for run in plan.runs:
        cfg = planner.settle(run)
        freqs = run.meta.get("frequencies")
        if freqs is None or len(freqs) in checked:
            continue
        checked.add(len(freqs))
        problem = frequency_problem(cfg, len(freqs), size)
        if problem:
            kind, text = problem
            key = "grid" if kind == "grid" else f"studies.{plan.study}.ks"
            raise AblationError(f"preset file {plan.preset_path}: key '{key}': {text}")
    control = next((r for r in plan.runs if r.role == "control"), None)
    finetune = next((r for r in plan.runs if r.role == "single_freq" and r.seed == (control and control.seed)), None)
    if control is not None and finetune is not None:
        extra = [k for k in diff_configs(control.settings, finetune.settings)
                 if not any(k == key or k.startswith(key + ".") for key in CONTROL_MAY_DIFFER)]
        if extra:
            raise AblationError(f"preset file {plan.preset_path}: the no-attention control would differ from the "
                                f"fine-tunes in {settings_difference(control.settings, finetune.settings)}: give "
                                f"the base (base.overrides) and the fine-tunes the same non-model settings")


def build_plan(study: str, preset_name: str, seeds: int | None = None, runs_root: Path | None = None,
               freq_source: str = "auto", base_checkpoint: str | None = None,
               finetune_schedule: str = "ours") -> Plan:
    """The runs of ``study`` under preset ``preset_name``, validated.

    Args:
        seeds: seeds per point (0..seeds-1); ``None``: the preset's ``seeds``.
        runs_root: where run directories live (default ``runs/ablation/<preset>``).
        freq_source: Top-k/Bot-k lists: ``auto``, ``published`` or ``measured``.
        base_checkpoint: single_freq: fine-tune from this plain checkpoint (validated here) instead of the
            per-seed base runs (every seed then shares that one base).
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
    if base_checkpoint is not None and study != "single_freq":
        raise AblationError(f"--base-checkpoint applies to the single_freq fine-tunes, not to {study}")
    runs_root = (Path(runs_root) if runs_root is not None else default_runs_root(preset.name)).resolve()
    planner = _Planner(preset, path, runs_root, seeds, finetune_schedule)
    source, pending = None, None
    if study == "single_freq":
        runs = plan_single_freq(planner, base_checkpoint)
    else:
        runs, source, pending = plan_kstudy(planner, study, freq_source)
    plan = Plan(study, preset, path, runs_root, runs, source, base_checkpoint, seeds, finetune_schedule, pending)
    validate(plan, planner)
    share_single_freq_runs(planner, plan.runs)
    return plan
