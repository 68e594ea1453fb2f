"""Checkpoint interop: our checkpoints, torchvision ResNet weights and the authors' FcaNet releases.

``load_weights(model, source)`` accepts a path or a state dict in any of these layouts:
  * a bare state dict (torchvision's ``resnet50-*.pth``; ours),
  * wrapped in ``{"state_dict": ...}`` (the authors' ``.pth``) or ``{"model": ...}`` (our trainer's checkpoints),
  * with ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefixes.
Attention weights absent from the source are "new" (kept at their fresh initialisation): this is how an
attention model is initialised from a plain ResNet for the ablation fine-tunes (paper Sec. 4.2).
"""
from __future__ import annotations

import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from .attention import DCTPooling

PREFIXES = ("module.", "_orig_mod.")
WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
# BangguWu/ECANet stores ``layerI.J.eca.conv.weight``, SE reimplementations ``...se.fc...``: ours is ``att``.
ATTENTION_RENAMES = ((".eca.", ".att."), (".se.", ".att."))


@dataclass
class LoadReport:
    """Which keys were loaded, which model keys were new (attention kept fresh, or BN counters absent from
    old checkpoints), which were ignored,
    and which source keys the model does not have (unexpected)."""
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, {len(self.new)} new (fresh attention), "
                f"{len(self.ignored)} ignored, {len(self.unexpected)} unexpected")


_FOREIGN_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle stream imports (GLOBAL / STACK_GLOBAL), read without executing
    anything. Stops quietly at the first malformed opcode (garbage, or a truncated stream)."""
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not (entirely) a pickle
        pass
    return found


def torch_load_quiet(path: Union[str, os.PathLike]) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, without the warning a plain (non-torch) pickle
    triggers (the failure is then explained by :func:`load_failure_reason`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure_reason(path: Union[str, os.PathLike], exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, as one line for the user.

    ``not a PyTorch checkpoint`` (any other file), ``truncated or corrupt (...)`` (a damaged torch zip),
    ``contains non-tensor Python objects (e.g. io.open); refusing to unpickle untrusted code`` (a pickle of
    arbitrary objects). PyTorch's own message is not passed on: it suggests ``weights_only=False``, which
    would execute whatever code the file carries.
    """
    message = _ANSI.sub("", str(exc))
    match = _FOREIGN_GLOBAL.search(message)
    foreign = [match.group(1)] if match else []
    is_zip = zipfile.is_zipfile(path)
    if not foreign:
        try:
            if is_zip:
                with zipfile.ZipFile(path) as zf:
                    data = next((zf.read(n) for n in zf.namelist() if n.endswith("data.pkl")), b"")
            else:
                with open(path, "rb") as f:
                    data = f.read(1 << 20)
            foreign = [g for g in _pickle_globals(data) if not g.startswith(("torch.", "collections.OrderedDict"))]
        except (OSError, zipfile.BadZipFile, KeyError, RuntimeError):
            pass
    if foreign:
        return f"contains non-tensor Python objects (e.g. {foreign[0]}); refusing to unpickle untrusted code"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "is empty, not a PyTorch checkpoint"
    if is_zip or head.startswith(b"PK\x03\x04"):
        detail = message.strip().splitlines()[0].split(". ")[0] if message.strip() else type(exc).__name__
        detail = detail.replace("PytorchStreamReader ", "")
        return f"is truncated or corrupt ({detail[:120]})"
    return "is not a PyTorch checkpoint"


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load ``source`` (path or mapping) and normalise it to a flat ``{key: tensor}`` with prefixes removed."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # weights_only: never execute code from a downloaded checkpoint.
            obj = torch_load_quiet(path)
        except Exception as e:  # truncated file, not a torch file, or pickled objects
            raise ValueError(f"checkpoint {path} {load_failure_reason(path, e)}") from None
    else:
        obj = source
    while isinstance(obj, Mapping):
        wrapper = next((w for w in WRAPPERS if w in obj and isinstance(obj[w], Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint holds no state dict (expected tensors, optionally under 'state_dict' or 'model')")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        for theirs, ours in ATTENTION_RENAMES:  # released SENet/ECA-Net checkpoints name the module differently
            key = key.replace(theirs, ours)
        out[key] = value
    return out


def _is_attention_key(key: str) -> bool:
    return ".att." in key


def load_weights(model: nn.Module, source, ignore: Sequence[str] = (), strict: bool = True) -> LoadReport:
    """Copy weights from ``source`` into ``model`` in place and report what happened.

    Args:
        model: a model from :func:`models.create_model`.
        source: a checkpoint path or a state dict (ours, torchvision's or the authors' layout).
        ignore: key prefixes to skip in both model and source (e.g. ``("fc.",)`` for a new classifier).
        strict: raise if a non-attention model key is missing from the source, or a source key is
            unexpected. Attention keys missing from the source are always allowed (reported as ``new``).

    Raises:
        ValueError: on a shape mismatch, a missing backbone key or an unexpected key (strict), or fixed DCT
            filters in the source that differ from the model's frequency selection.
    """
    src = read_state_dict(source)
    target = model.state_dict()
    report = LoadReport()
    skip = lambda k: any(k.startswith(p) for p in ignore)  # noqa: E731
    to_load = {}
    for key, value in target.items():
        if skip(key):
            report.ignored.append(key)
        elif key in src:
            if tuple(src[key].shape) != tuple(value.shape):
                raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(src[key].shape)} vs model "
                                 f"{tuple(value.shape)}")
            to_load[key] = src[key]
            report.loaded.append(key)
        elif _is_attention_key(key):
            report.new.append(key)
        elif key.endswith(".num_batches_tracked"):
            # Checkpoints from before PyTorch 0.4.1 (e.g. the original torchvision ResNet files) lack the
            # counter; it only matters for BN momentum=None, so it keeps its fresh value (0).
            report.new.append(key)
        else:
            raise ValueError(f"checkpoint lacks model weight {key!r} (is it a checkpoint of another architecture?)")
    report.unexpected = sorted(k for k in src if k not in target and not skip(k))
    if strict and report.unexpected:
        shown = ", ".join(report.unexpected[:5]) + (" ..." if len(report.unexpected) > 5 else "")
        raise ValueError(f"checkpoint has {len(report.unexpected)} weight(s) the model lacks: {shown} "
                         f"(wrong model name? pass strict=False to drop them)")
    _check_dct_filters(model, to_load)
    missing, unexpected = model.load_state_dict(to_load, strict=False)
    # (BatchNorm fills an absent num_batches_tracked itself, so it may not appear in `missing`)
    assert not unexpected and set(missing) <= set(report.new) | set(report.ignored), "load_weights bookkeeping"
    return report


def _check_dct_filters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Fixed DCT filters define the frequency selection: loading other ones would silently change it."""
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, DCTPooling) and module.shared and key in state:
            # Tolerance of the checkpoint's precision (fp16 files round the filters to ~1e-4).
            atol = 4 * torch.finfo(state[key].dtype).eps if state[key].is_floating_point() else 1e-4
            if not torch.allclose(state[key].float(), module.weight.float(), atol=max(atol, 1e-5)):
                raise ValueError(f"checkpoint's DCT filters at {key} differ from the model's frequency selection "
                                 f"{module.freqs[:4]}...: build the model with the checkpoint's 'freq'")
