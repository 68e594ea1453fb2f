"""Typed ablation presets (``configs/ablation/<name>.yaml``), validated by the trainer's config layer.

A preset is read with :func:`engine.config.build_schema`: the same rules and one-line errors as a trainer
config (unknown keys with "did you mean", types, choices, bounds, required keys). The runs a preset plans are
validated again, each as the trainer would resolve it, by :mod:`ablation.studies` at ``plan`` time.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from engine.config import ConfigError, build_schema, load_yaml_tree, schema_field as _f
from models.dct import GRID

from .errors import AblationError

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "configs" / "ablation"
MAX_SEEDS = 100  # seeds per point: beyond this a plan is a typo, not a study (49 points x 100 seeds = 4,900 runs)


@dataclass
class Throughput:
    """Training speed behind the cost estimates of ``plan``: what was timed (or assumed), on what."""
    img_per_s: float = _f(MISSING, min=0.0, help="training images/s of one GPU (or one CPU process)")
    device: str = _f(MISSING, help="e.g. 'one NVIDIA A100 GPU' or '1 thread of a 2-core AMD EPYC'")
    precision: str = _f(MISSING, help="e.g. 'bf16 autocast' or 'fp32'")
    model: str = _f(MISSING, help="the network timed (or assumed) and what the estimate assumes for the others")
    measured: bool = _f(False, help="false: an assumption, printed as such")
    source: str = _f("", help="where the figure comes from")


@dataclass
class Power:
    """The spread behind the power estimate of ``plan`` (``collect`` prints the observed one)."""
    paired_sd: float = _f(MISSING, min=0.0, help="sd (points) of a within-seed difference between two points")
    measured: bool = _f(False)
    source: str = _f("")


@dataclass
class BaseRun:
    """The plain network a seed's fine-tunes start from (paper Sec. 4.2: a ResNet-50 trained 100 epochs)."""
    config: str = _f(MISSING, help="trainer config, relative to the repository root")
    epochs: int = _f(MISSING, min=1)
    checkpoint: str = _f("checkpoints/last.pth", help="inside the base run's directory")
    overrides: dict[str, Any] = _f(default_factory=dict)
    # Plateau criterion: the best val top-1 of the last `plateau_window` epochs exceeds the best before them
    # by less than `plateau_tol` points (reported in the single_freq table; a base still rising is flagged).
    plateau_window: int = _f(3, min=1)
    plateau_tol: float = _f(0.5, min=0.0)


@dataclass
class FinetuneStudy:
    """single_freq (Fig. 4): one frequency for all channels, fine-tuned from the seed's base."""
    config: str = _f(MISSING)
    epochs: int = _f(MISSING, min=1)
    overrides: dict[str, Any] = _f(default_factory=dict)
    control: bool = _f(True, help="per seed, continue the base without attention for the fine-tune budget")


@dataclass
class KStudy:
    """topk / lowk / botk (Tables 1, 5, 6): k frequencies."""
    config: str = _f(MISSING)
    epochs: int = _f(MISSING, min=1)
    ks: list[int] = _f(MISSING)
    overrides: dict[str, Any] = _f(default_factory=dict)
    # scratch: trained from scratch as in the paper; base: fine-tuned from the seed's base with the
    # single_freq recipe (cheaper, and paired through the shared base).
    start: str = _f("scratch", choices=("scratch", "base"))


@dataclass
class Studies:
    single_freq: FinetuneStudy
    topk: KStudy
    lowk: KStudy
    botk: KStudy


@dataclass
class Preset:
    description: str = _f(MISSING, help="the network, in words")
    dataset: str = _f(MISSING, help="the data, in words")
    train_images: int = _f(MISSING, min=1, help="images per training epoch")
    throughput: Throughput
    power: Power
    base: BaseRun
    studies: Studies
    name: str | None = _f(None, help="default: the file name")
    paper_comparable: bool = _f(False, help="same network, data and recipe as the paper: show a delta column")
    hardware: str = _f("gpu", choices=("gpu", "cpu"))
    grid: int | None = _f(None, min=1, help="frequency grid S (null: the paper's 7, not passed to the model)")
    seeds: int = _f(1, min=1, max=MAX_SEEDS, help="seeds per point (--seeds overrides)")
    launcher: str = _f("subprocess", choices=("subprocess", "fork"))
    env: dict[str, Any] = _f(default_factory=dict, help="environment of every run")
    prepare: str | None = _f(None, choices=("digits",), help="a built-in data set `run` writes first")
    data_root: str | None = _f(None, help="where `prepare` writes it ({runs_root} allowed)")
    common_overrides: dict[str, Any] = _f(default_factory=dict, help="trainer overrides of every run")

    # ---------------------------------------------------------------------------------------- derived
    @property
    def grid_size(self) -> int:
        """S: the frequency grid of the studies (the paper's 7 unless ``grid`` is given)."""
        return GRID if self.grid is None else self.grid

    def study(self, name: str):
        return getattr(self.studies, name)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """``mini`` -> configs/ablation/mini.yaml; a ``.yaml`` path stays itself."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise AblationError(f"preset file {path} not found")
        return path
    presets = available_presets()
    if name not in presets:
        raise AblationError(f"unknown preset {name!r}; expected one of {', '.join(presets)} or a .yaml file")
    return PRESET_DIR / f"{name}.yaml"


def load_preset(name: str) -> tuple[Preset, Path]:
    """A preset by name or path, typed and checked; raises AblationError with one line naming file and key."""
    path = preset_path(name)
    try:
        # the trainer's reader: YAML errors with line:column, `_base_` inheritance between presets
        preset = build_schema(Preset, load_yaml_tree(path))
    except ConfigError as exc:
        text = str(exc)
        raise AblationError(text if text.startswith("config file") else f"preset file {path}: {text}") from None
    if preset.name is None:
        preset.name = path.stem
    _check(preset, path)
    return preset, path


def _check(preset: Preset, path: Path) -> None:
    """Checks across keys that a type cannot express."""
    def fail(key: str, problem: str) -> None:
        raise AblationError(f"preset file {path}: key '{key}': {problem}")

    if preset.throughput.img_per_s <= 0:
        fail("throughput.img_per_s", f"must be > 0, got {preset.throughput.img_per_s:g}")
    cells = preset.grid_size ** 2
    for name in ("topk", "lowk", "botk"):
        ks = preset.study(name).ks
        if not ks:
            fail(f"studies.{name}.ks", "needs at least one k")
        if len(set(ks)) != len(ks):
            fail(f"studies.{name}.ks", f"repeats a k: {ks}")
        bad = [k for k in ks if not 1 <= k <= cells]
        if bad:
            fail(f"studies.{name}.ks", f"k={bad[0]} is outside 1..{cells}, the frequencies of the "
                                       f"{preset.grid_size}x{preset.grid_size} grid")
    if preset.prepare and not preset.data_root:
        fail("data_root", f"'prepare: {preset.prepare}' needs a data_root to write to")
