"""Typed, validated YAML configs with inheritance and ``KEY=VALUE`` command-line overrides.

A config file is a YAML mapping whose sections mirror the dataclasses below. A file may inherit from
another with a top-level ``_base_: relative/path.yaml`` (a string or a list of paths, merged in order,
paths relative to the file that names them); the file's own keys are deep-merged on top (mappings
merge, everything else replaces). Overrides use dotted keys and YAML values::

    model.name=fcanet50 optim.base_lr=0.2 model.freq=[[0,1]] model.init_checkpoint=null

Every problem (unknown key, wrong type, bad value) is a :class:`ConfigError` with a one-line message
naming the key; unknown keys come with the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value (one-line message naming the key)."""


def _f(default: Any = MISSING, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, default_factory: Any = MISSING, help: str = "") -> Any:
    """A dataclass field with validation metadata (allowed choices, bounds)."""
    meta = {"choices": choices, "min": min, "max": max, "help": help}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _f("fcanet50", help="model to train (python train_imagenet.py --list-models)")
    num_classes: int = _f(1000, min=1, help="classifier outputs (at least the class folders of data.root)")
    freq: str | list[list[int]] | None = _f(
        None, help="FCA frequency selection: top16, low4, bot2, ... or a list of (u, v) pairs (null: the model's "
                   "default, top16); fcanet* models only")
    init_checkpoint: str | None = _f(
        None, help="fine-tune initialisation: our checkpoint, torchvision's, the authors', or a plain ResNet for an "
                   "attention model (ignored when the run resumes from its own checkpoint)")
    kwargs: dict[str, Any] = _f(
        default_factory=dict, help="more models.create_model options, e.g. {reduction: 16, grid: 7, widths: [...], "
                                   "stem: cifar}; an option the model would ignore is refused")


@dataclass
class OptimConfig:
    base_lr: float = _f(0.1, min=0.0, help="learning rate per 256 images (lr = base_lr * global_batch / 256)")
    momentum: float = _f(0.9, min=0.0, help="SGD momentum")
    weight_decay: float = _f(1e-4, min=0.0, help="SGD weight decay (every parameter)")
    nesterov: bool = _f(False, help="Nesterov momentum")


@dataclass
class TrainConfig:
    epochs: int = _f(100, min=1, help="epochs to train (raising it continues a finished run)")
    warmup_epochs: float = _f(5.0, min=0.0, help="linear lr warmup, in epochs (then cosine to 0)")
    # The authors' main.py fine-tunes on the first epochs of a 100-epoch (5 warmup + 95 cosine) schedule.
    schedule_epochs: int | None = _f(None, min=1, help="lr schedule length in epochs (null: train.epochs)")
    batch_size: int = _f(128, min=1, help="images per process and step (global batch = batch_size x processes)")
    amp: str = _f("bf16", choices=("bf16", "fp16", "off"), help="autocast precision (fp16: CUDA, with loss scaling)")
    label_smoothing: float = _f(0.1, min=0.0, help="label smoothing of the training loss, in [0, 1)")
    channels_last: bool = _f(False, help="channels_last memory format for the model and its inputs")
    compile: bool = _f(False, help="torch.compile the model for training and evaluation")
    cudnn_benchmark: bool = _f(True, help="cuDNN autotuning of convolution algorithms (torch.backends.cudnn.benchmark; "
                                          "CUDA only)")
    sync_bn: bool = _f(False, help="SyncBatchNorm across processes (CUDA DDP only)")
    checkpoint_every_steps: int = _f(0, min=0, help="mid-epoch checkpoint period (0: only at epoch ends)")
    log_every_steps: int = _f(50, min=1, help="metrics are reduced (host sync) every N steps")
    max_steps_per_epoch: int | None = _f(None, min=1, help="cap the steps per epoch (smoke tests)")
    eval_every_epochs: int = _f(1, min=1, help="evaluate every N epochs (and after the last one)")
    progress: bool = _f(True, help="progress bar on rank 0 (a line every few seconds when not a terminal)")
    # Tiny CPU models run faster on 1 thread, and far faster when the cores are shared.
    cpu_threads: int | None = _f(None, min=1, help="torch intra-op threads on CPU (null: torch's default, or "
                                                   "OMP_NUM_THREADS as torchrun sets it)")
    tensorboard: bool = _f(True, help="write TensorBoard events to <output_dir>/tb")


MAX_IMAGE_SIZE = 1024   # data.image_size: 4.6x the paper's 224 px in each dimension (21x the pixels)
MAX_VAL_RESIZE = 2048


@dataclass
class DataConfig:
    source: str = _f("imagefolder", choices=("imagefolder", "synthetic"),
                     help="imagefolder (data.root) or synthetic (generated tensors, for benchmarks)")
    root: str = _f("data/imagenet", help="ImageFolder root holding train/ and val/")
    # At most MAX_IMAGE_SIZE (checked with the batch size in _check_semantics): one float32 batch of 128
    # crops of 4096 px is 26 GB before the model's activations; such a run was OOM-killed without a word.
    image_size: int = _f(224, min=1, help="training crop and evaluation center crop, in pixels")
    val_resize: int = _f(256, min=1, max=MAX_VAL_RESIZE, help="shorter side before the center crop")
    crop: str = _f("fcanet", choices=("fcanet", "torchvision"),
                   help="random-resized-crop recipe: the authors' (fcanet) or torchvision's defaults")
    pipeline: str = _f("fast", choices=("fast", "torchvision", "gpu"),
                       help="fast: uint8 CPU decode, normalize on the device; torchvision: the PIL reference; gpu: "
                            "nvjpeg decode and crops on the GPU (CUDA only)")
    workers: int | None = _f(None, min=0, help="DataLoader workers per process (null: from the CPU count)")
    val_batch_size: int | None = _f(None, min=1, help="null: same as train.batch_size")
    skip_corrupt: bool = _f(False, help="skip and count unreadable images instead of failing")
    prepare: str | None = _f(None, choices=("digits",),
                             help="first write a built-in data set under data.root (once): digits = "
                                  "scikit-learn's 8x8 digits, the CPU demo")
    synthetic_train_size: int = _f(12800, min=1, help="images per epoch of data.source=synthetic")
    synthetic_val_size: int = _f(1000, min=1, help="validation images of data.source=synthetic")


@dataclass
class DebugConfig:
    kill_after_steps: int | None = _f(None, min=1, help="simulate a hard kill (no checkpoint, exit status 137) "
                                                        "right after this global step")
    signal_after_steps: int | None = _f(None, min=1, help="send SIGTERM to this process right after this global "
                                                          "step (exercises the preemption path)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    output_dir: str | None = _f(None, help="run directory (null: runs/<config file stem>)")
    seed: int = _f(0, min=0, max=2**32 - 1, help="seed of the initial weights and of the data order")  # numpy's range

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Schema helpers

@functools.cache  # a schema's hints never change; resolving them is most of a config's parse
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, "type, default, constraint", help)`` of every leaf key of the schema, in schema order."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if is_dataclass(tp):
            out.extend(describe_keys(tp, key + "."))
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        facts = [_type_name(tp), f"default {shown}"]
        meta = f.metadata
        if meta.get("choices"):
            facts.append("one of " + ", ".join(meta["choices"]))
        if meta.get("min") is not None:
            facts.append(f">= {meta['min']:g}")
        if meta.get("max") is not None:
            facts.append(f"<= {meta['max']}")
        out.append((key, "; ".join(facts), meta.get("help", "")))
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema (sections included)."""
    keys = []
    hints = _hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        keys.append(key)
        if is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
    return keys


def _sections(cls: type = Config, prefix: str = "") -> set[str]:
    hints = _hints(cls)
    out = set()
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out.add(prefix + f.name)
            out |= _sections(hints[f.name], prefix + f.name + ".")
    return out


def _unknown(key: str, candidates: list[str]) -> ConfigError:
    section, _, leaf = key.rpartition(".")
    close: list[str] = []
    # 1) a misspelled leaf of a valid section ("train.epoch", "optim.lr"): look among that section's keys
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section}
    if siblings:
        match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
        match = match or [n for n in siblings if leaf and (leaf in n or n in leaf)][:1]
        close = [siblings[m] for m in match]
    # 2) otherwise the closest key of the same depth ("modle.name"), then anything
    if not close:
        same_depth = [c for c in candidates if c.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, same_depth or candidates, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


# ``Optional[X]`` / ``Union[X, Y]`` have origin ``typing.Union``; PEP 604 ``X | None`` has ``types.UnionType``.
_UNION_ORIGINS = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNION_ORIGINS:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, list):
        return "list"
    if origin in (dict, dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

# Plain annotations whose values pass through unchanged: the test a value must meet (bools are not ints here).
_SCALAR_CHECKS: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _is_float_like(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    # PyYAML reads "1e-4" (no dot) as a string; accept numeric strings for float keys.
    return isinstance(value, str) and _FLOAT_RE.match(value.strip()) is not None


def _coerce_union(key: str, value: Any, tp: Any) -> Any:
    """The first member of the union ``tp`` that accepts ``value``, in declaration order."""
    for arg in typing.get_args(tp):
        try:
            return _coerce(key, value, arg)
        except ConfigError:
            continue
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints/float-strings widened to float)."""
    origin = typing.get_origin(tp)
    if origin in _UNION_ORIGINS:
        return _coerce_union(key, value, tp)
    if tp is Any:
        return value
    if tp is float and _is_float_like(value):
        return float(value)
    check = _SCALAR_CHECKS.get(tp)
    if check is not None and check(value):
        return value
    if origin in (list, list) and isinstance(value, (list, tuple)):
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (dict, dict) and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str = "", root: type | None = None) -> Any:
    """Instantiate dataclass ``cls`` from a nested mapping, checking keys, types and values. ``root``: the whole
    schema (for suggestions on an unknown key; default ``cls``, e.g. another tool's schema built from these
    helpers)."""
    root = root or cls
    section = prefix[:-1] if prefix else "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{section}': expected a mapping, got {raw!r}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown(prefix + str(key), all_keys(root))
    kwargs = {}
    for f in fields(cls):
        key = prefix + f.name
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"config key '{key}' is required")
            continue
        tp = hints[f.name]
        if is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] if raw[f.name] is not None else {}, key + ".", root)
            continue
        choices, low = f.metadata.get("choices"), f.metadata.get("min")
        value = raw[f.name]
        if choices and isinstance(value, bool):  # YAML 1.1 reads a bare `off` as False: train.amp=off
            value = {False: "off", True: "on"}[value]
        value = _coerce(key, value, tp)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"config key '{key}': bad value {value!r}; expected one of {', '.join(choices)}")
        if low is not None and value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{key}': bad value {value!r}; must be finite")
            if value < low:
                raise ConfigError(f"config key '{key}': bad value {value!r}; must be >= {low:g}")
        high = f.metadata.get("max")
        if high is not None and value is not None and value > high:
            raise ConfigError(f"config key '{key}': bad value {value!r}; must be <= {high}")
        kwargs[f.name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Model options: model.name, model.freq and model.kwargs are models.create_model's arguments.

_KIND_NAMES = {"se": "SE", "eca": "ECA", "fca": "frequency channel", "cbam": "CBAM", "gc": "GC", "gsop": "GSoP"}


def ignored_model_options(name: str, options: dict) -> list[str]:
    """The keys of ``options`` (``create_model`` keyword arguments) that model ``name`` would ignore: attention
    options its family does not take (``models.registry.FAMILIES``). ``input_size`` (the image size FCA's DCT
    sizes derive from) is set for every model. ``name`` must be a registered model."""
    from models import registry

    used = registry.MODELS[registry.resolve_name(name)].options
    return [k for k in options if k in registry.ATTENTION_KWARGS and k != "input_size" and k not in used]


def _check_model(cfg: Config) -> None:
    """The model exists, takes every option given, and uses each of them (an ignored option is refused)."""
    from models import registry  # torch-free: the registry's data, not the models

    m = cfg.model
    try:
        registry.resolve_name(m.name)
    except ValueError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None
    valid = registry.ATTENTION_KWARGS + registry.RESNET_OPTIONS
    for k in m.kwargs:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key 'model.kwargs.{k}': not an option of {m.name}{hint}; options: "
                              f"{', '.join(valid)}")
    if "freq" in m.kwargs:
        raise ConfigError("config key 'model.kwargs.freq': set the frequency selection with model.freq")
    options = dict(m.kwargs, **({"freq": m.freq} if m.freq is not None else {}))
    ignored = ignored_model_options(m.name, options)
    if ignored:
        k = ignored[0]
        takers = [fam for fam, spec in registry.FAMILIES.items() if k in spec.options]
        kinds = list(dict.fromkeys(_KIND_NAMES.get(registry.FAMILIES[f].attention, registry.FAMILIES[f].attention)
                                   for f in takers))
        kinds_text = " or ".join(kinds) if len(kinds) < 3 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
        raise ConfigError(f"config key '{'model.freq' if k == 'freq' else f'model.kwargs.{k}'}': {m.name} has no "
                          f"{kinds_text} attention, so {k} would be ignored; remove it or choose a model that has it "
                          f"({', '.join(f'{f}*' for f in takers)})")
    check_model_freq(cfg)


def check_model_freq(cfg: Config) -> None:
    """``model.freq`` parsed on the model's frequency grid (ConfigError naming the key)."""
    m = cfg.model
    if m.freq is not None:
        from models.dct import GRID, parse_frequencies  # the model zoo owns the frequency grammar
        try:
            parse_frequencies(m.freq, grid=int(m.kwargs.get("grid") or GRID))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config key 'model.freq': {e}") from None


def _check_semantics(cfg: Config) -> None:
    """Cross-field and domain checks that a type cannot express."""
    _check_model(cfg)
    if cfg.train.schedule_epochs is not None and cfg.train.schedule_epochs < cfg.train.epochs:
        raise ConfigError(f"config key 'train.schedule_epochs': {cfg.train.schedule_epochs} is shorter than "
                          f"train.epochs={cfg.train.epochs} (the lr would sit at 0 for the last epochs)")
    schedule_epochs = cfg.train.schedule_epochs or cfg.train.epochs
    if cfg.train.warmup_epochs > schedule_epochs:
        raise ConfigError(f"config key 'train.warmup_epochs': {cfg.train.warmup_epochs:g} exceeds the schedule's "
                          f"{schedule_epochs} epochs")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        size, batch = cfg.data.image_size, cfg.train.batch_size
        raise ConfigError(f"config key 'data.image_size': bad value {size}; must be <= {MAX_IMAGE_SIZE} (one "
                          f"float32 batch of {batch} such crops alone takes {batch * 3 * size * size * 4 / 2**30:.1f} "
                          "GiB, before the model's activations)")
    if cfg.data.image_size > cfg.data.val_resize:
        raise ConfigError(f"config key 'data.val_resize': {cfg.data.val_resize} is smaller than "
                          f"data.image_size={cfg.data.image_size} (the val center crop needs resize >= size)")
    if cfg.data.pipeline == "gpu" and cfg.data.source == "synthetic":
        raise ConfigError("config key 'data.pipeline': 'gpu' decodes JPEG files and data.source=synthetic has "
                          "none (its images are generated tensors); use data.pipeline=fast with synthetic data")
    if cfg.train.label_smoothing >= 1.0:
        raise ConfigError(f"config key 'train.label_smoothing': bad value {cfg.train.label_smoothing!r}; "
                          "must be in [0, 1)")


# ----------------------------------------------------------------------------------------------------
# Files, inheritance, overrides

def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config file and everything it inherits through ``_base_``; return the merged mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: circular _base_ inheritance")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}{_yaml_where(e)}: invalid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict = {}
    if not isinstance(bases, (str, list)):
        raise ConfigError(f"config file {path}: _base_ must be a path or a list of paths, got {bases!r}")
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: _base_ must be a path or a list of paths")
        merged = _merge(merged, load_yaml_tree(path.parent / base, _seen + (path.resolve(),)))
    return _merge(merged, data)


def _yaml_where(e: yaml.YAMLError) -> str:
    """``:LINE:COLUMN`` (1-based) of a PyYAML error, where it has a position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's description without its position lines, e.g. "mapping values are not allowed here" or
    "while parsing a flow sequence, expected ',' or ']', but got '<stream end>'" (its context and problem)."""
    problem = getattr(e, "problem", None)
    if problem is None:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    context = getattr(e, "context", None)
    return f"{context}, {problem}" if context else problem


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.lr=0.2'`` -> ``('optim.lr', 0.2)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE (e.g. optim.base_lr=0.2)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value  # e.g. a path with a colon; keep it as a string
    return key, parsed


SECTIONS: set[str] = set()  # filled below, once the schema helpers exist


def apply_overrides(raw: dict, overrides: list[str], schema: type | None = None) -> dict:
    """Set dotted keys in the nested mapping ``raw`` (a copy is returned), checked against ``schema`` (default
    :class:`Config`)."""
    raw = copy.deepcopy(raw)
    schema = schema or Config
    valid = set(all_keys(schema))
    sections = SECTIONS if schema is Config else _sections(schema)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        # Anything below model.kwargs is free-form (passed to create_model); everything else must exist.
        free = len(parts) > 2 and parts[:2] == ["model", "kwargs"]
        if key not in valid and not free:
            raise _unknown(key, sorted(valid))
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if key in sections:
            # A whole section (`train={epochs: 6}`) merges into the file's values, like a YAML file would;
            # replacing it would silently reset its other keys to the schema defaults.
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}': a section needs a mapping, e.g. {key}={{...}}; got {value!r}")
            node[parts[-1]] = _merge(node.get(parts[-1]) or {}, value)
        else:
            node[parts[-1]] = value
    return raw


SECTIONS.update(_sections())


def build_schema(cls: type, raw: Any) -> Any:
    """Any typed config built with this module's rules and one-line errors (unknown keys with "did you mean",
    types, choices, bounds, required keys), e.g. the ablation presets; fields are declared with
    :func:`schema_field`."""
    return _build(cls, raw, root=cls)


schema_field = _f


def build_config(raw: dict) -> Config:
    cfg = _build(Config, raw)
    _check_semantics(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a config file (or the defaults when ``path`` is None), apply overrides, validate.

    ``output_dir`` defaults to ``runs/<config file stem>``.
    """
    raw = load_yaml_tree(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    cfg = build_config(raw)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / (Path(path).stem if path is not None else "default"))
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"config key 'output_dir': {cfg.output_dir} exists and is not a directory")
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved config mappings."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "kwargs":
            out.extend(diff_configs(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(prefix + k)
    return out
