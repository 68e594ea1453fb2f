"""Checkpoint interop: our checkpoints, torchvision ResNet weights, the authors' FcaNet releases and the
attention layouts of other releases (official CBAM, timm's CBAM and GC modules, the official GC block and GSoP).

``load_weights(model, source)`` accepts a path or a state dict in any of these layouts:
  * a bare state dict (torchvision's ``resnet50-*.pth``; ours),
  * wrapped in ``{"state_dict": ...}`` (the authors' ``.pth``) or ``{"model": ...}`` (our trainer's checkpoints),
  * with ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefixes,
  * with the attention under another release's names (:data:`LAYOUTS`): each such key is mapped to ours by an
    explicit rule; a key of a recognised layout that no rule covers is refused (never dropped).
Attention weights absent from the source are "new" (kept at their fresh initialisation): this is how an
attention model is initialised from a plain ResNet for the ablation fine-tunes (paper Sec. 4.2). A source that
holds attention weights must hold all of the model's (strict loading).
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attention import DCTPooling

PREFIXES = ("module.", "_orig_mod.")
WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
# BangguWu/ECANet stores ``layerI.J.eca.conv.weight``, SE reimplementations ``...se.fc...``: ours is ``att``.
ATTENTION_RENAMES = ((".eca.", ".att."), (".se.", ".att."))

_BLOCK = r"^(layer\d+\.\d+)\."  # a block's key prefix, group 1
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as the equivalent ``nn.Linear`` weight (out, in); biases pass."""
    return t.flatten(1) if t.dim() == 4 else t


def _max_mean(t: torch.Tensor) -> torch.Tensor:
    """timm's CBAM spatial conv reads (mean, max) maps; ours reads (max, mean), as the official code."""
    return t.flip(1)


def _ln_11(t: torch.Tensor) -> torch.Tensor:
    """timm's ``LayerNorm2d`` affine (P,) as the official GC block's ``LayerNorm([P, 1, 1])`` (P, 1, 1)."""
    return t.reshape(-1, 1, 1)


@dataclass(frozen=True)
class AttentionLayout:
    """How another release names a block's attention weights, as data.

    Attributes:
        name: shown in messages.
        kind: our attention kind these weights belong to (``models.resnet.AttentionConfig.kind``).
        family: our model family that loads them (for the hint in messages).
        namespace: regex matching every key of this layout (used to detect it; each must match a rule).
        rules: (their key regex, our key template, tensor transform or None).
        refuse: (regex, reason): keys of this layout that have no counterpart here, with the reason.
    """
    name: str
    kind: str
    family: str
    namespace: str
    rules: tuple
    refuse: tuple = ()


LAYOUTS = (
    # Jongchan/attention-module, MODELS/model_resnet.py + MODELS/cbam.py: ``self.cbam = CBAM(planes * 4, 16)``;
    # ChannelGate.mlp = (Flatten, Linear, ReLU, Linear) with biases; SpatialGate.spatial = BasicConv(conv, bn).
    AttentionLayout(
        "official CBAM (Jongchan/attention-module)", "cbam", "cbam", _BLOCK + r"cbam\.",
        ((_BLOCK + r"cbam\.ChannelGate\.mlp\.1\.(weight|bias)$", r"\1.att.channel.fc.0.\2", None),
         (_BLOCK + r"cbam\.ChannelGate\.mlp\.3\.(weight|bias)$", r"\1.att.channel.fc.2.\2", None),
         (_BLOCK + r"cbam\.SpatialGate\.spatial\.conv\.weight$", r"\1.att.spatial.conv.weight", None),
         (_BLOCK + r"cbam\.SpatialGate\.spatial\.bn\." + _BN + "$", r"\1.att.spatial.bn.\2", None))),
    # timm: ResNet(block_args=dict(attn_layer='cbam')) stores ``CbamModule`` at ``se``: channel.fc1/fc2 are 1x1
    # convs (bias only with mlp_bias), spatial.conv is ConvNormAct(2, 1, 7) reading (mean, max).
    AttentionLayout(
        "timm CbamModule (attn_layer='cbam')", "cbam", "cbam", _BLOCK + r"se\.(channel|spatial)\.",
        ((_BLOCK + r"se\.channel\.fc1\.(weight|bias)$", r"\1.att.channel.fc.0.\2", _linear),
         (_BLOCK + r"se\.channel\.fc2\.(weight|bias)$", r"\1.att.channel.fc.2.\2", _linear),
         (_BLOCK + r"se\.spatial\.conv\.conv\.weight$", r"\1.att.spatial.conv.weight", _max_mean),
         (_BLOCK + r"se\.spatial\.conv\.bn\." + _BN + "$", r"\1.att.spatial.bn.\2", None))),
    # timm: GlobalContext at ``se``; attn_layer='gca' (fuse_add=True, fuse_scale=False) is GCNet's add fusion.
    AttentionLayout(
        "timm GlobalContext (attn_layer='gca')", "gc", "gcnet", _BLOCK + r"se\.(conv_attn|mlp_add|mlp_scale)\.",
        ((_BLOCK + r"se\.conv_attn\.(weight|bias)$", r"\1.att.conv_mask.\2", None),
         (_BLOCK + r"se\.mlp_add\.fc1\.(weight|bias)$", r"\1.att.channel_add_conv.0.\2", None),
         (_BLOCK + r"se\.mlp_add\.norm\.(weight|bias)$", r"\1.att.channel_add_conv.1.\2", _ln_11),
         (_BLOCK + r"se\.mlp_add\.fc2\.(weight|bias)$", r"\1.att.channel_add_conv.3.\2", None)),
        ((r"\.se\.mlp_scale\.", "it has timm's scale fusion (attn_layer='gc'); GCNet's Table 2 model adds the "
                                 "context only (attn_layer='gca')"),)),
    # xvjiarui/GCNet (mmdet ResNet, ``self.context_block = ContextBlock(...)``) and mmcv's ContextBlock: our names.
    AttentionLayout(
        "official GC block (xvjiarui/GCNet, mmcv ContextBlock)", "gc", "gcnet", _BLOCK + r"context_block\.",
        ((_BLOCK + r"context_block\.(conv_mask\.(?:weight|bias))$", r"\1.att.\2", None),
         (_BLOCK + r"context_block\.(channel_add_conv\.[013]\.(?:weight|bias))$", r"\1.att.\2", None)),
        ((r"\.context_block\.channel_mul_conv\.", "it has the scale (channel_mul) fusion; GCNet's Table 2 "
                                                   "model adds the context only"),)),
    # ZilinGao/Global-Second-order-Pooling-Convolutional-Networks, torchvision/models/resnet.py: the channel
    # attention's layers sit on the block itself.
    AttentionLayout(
        "official GSoP (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks)", "gsop", "gsopnet",
        _BLOCK + r"(conv_for_DR|bn_for_DR|row_bn|row_conv_group|fc_adapt_channels|conv_for_DR_spatial|"
                 r"bn_for_DR_spatial|row_bn_for_spatial|row_conv_group_for_spatial|fc_adapt_channels_for_spatial|"
                 r"dilate_conv_for_concat\d|bn_for_concat)\.",
        ((_BLOCK + r"conv_for_DR\.(weight|bias)$", r"\1.att.reduce.\2", None),
         (_BLOCK + r"bn_for_DR\." + _BN + "$", r"\1.att.reduce_bn.\2", None),
         (_BLOCK + r"row_bn\." + _BN + "$", r"\1.att.row_bn.\2", None),
         (_BLOCK + r"row_conv_group\.(weight|bias)$", r"\1.att.row_conv.\2", None),
         (_BLOCK + r"fc_adapt_channels\.(weight|bias)$", r"\1.att.fc.\2", None)),
        ((r"_spatial\.|dilate_conv_for_concat|bn_for_concat", "it has GSoP's position attention (modes 2, +, M, &); "
                                                              "GSoP-Net1 is the channel mode ('1')"),)),
)


class StateDict(dict):
    """A normalised ``{key: tensor}``; ``layout`` names the foreign attention layout it was mapped from (or None)."""
    layout: AttentionLayout | None = None


def _map_layouts(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], AttentionLayout | None]:
    """Rename the keys of a recognised foreign attention layout to ours, strictly (one-line ValueError on a key
    of the layout that no rule maps, or on two layouts in one checkpoint)."""
    found = [lay for lay in LAYOUTS if any(re.search(lay.namespace, k) for k in state)]
    if not found:
        return state, None
    if len(found) > 1:
        raise ValueError(f"checkpoint mixes attention layouts ({'; '.join(lay.name for lay in found)}); "
                         "refusing to guess")
    layout = found[0]
    out = {}
    for key, value in state.items():
        if not re.search(layout.namespace, key):
            out[key] = value
            continue
        for pattern, reason in layout.refuse:
            if re.search(pattern, key):
                raise ValueError(f"checkpoint in the {layout.name} layout cannot load here: {reason} ({key})")
        for pattern, template, transform in layout.rules:
            if re.match(pattern, key):
                out[re.sub(pattern, template, key)] = value if transform is None else transform(value)
                break
        else:
            raise ValueError(f"checkpoint in the {layout.name} layout has key {key!r}, which no rule maps to this "
                             f"package's {layout.kind} module; refusing to load it partially")
    return out, layout


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


# torch's weights_only refusals: "GLOBAL x.y was not an allowed global" (zip format), "unsupported GLOBAL x.y whose
# module x is blocked" (legacy format).
_FOREIGN_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global|unsupported GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle stream imports (GLOBAL / STACK_GLOBAL), read without executing
    anything. Reads consecutive pickles (torch's legacy format writes a magic number, a protocol version and
    system info before the object itself); stops quietly at the first malformed opcode (the legacy format's raw
    tensor bytes, garbage, or a truncated stream)."""
    found, strings = [], []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # noqa: BLE001 - not (entirely) a pickle
            break
        if stream.tell() == start:
            break
    return found


def torch_load_quiet(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, without the warning a plain (non-torch) pickle
    triggers (the failure is then explained by :func:`load_failure_reason`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_failure_reason(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, as one line for the user.

    ``not a PyTorch checkpoint`` (any other file), ``truncated or corrupt (...)`` (a damaged torch zip),
    ``contains non-tensor Python objects (e.g. posix.system); refused as unsafe ...`` (a pickle of arbitrary
    objects, in torch's zip or legacy format or a plain pickle). PyTorch's own message is not passed on: it
    suggests ``weights_only=False``, which would execute whatever code the file carries.
    """
    message = _ANSI.sub("", str(exc))
    match = _FOREIGN_GLOBAL.search(message)
    foreign = [match.group(1) or match.group(2)] if match else []
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
        return (f"contains non-tensor Python objects (e.g. {foreign[0]}); refused as unsafe (unpickling it could "
                f"run code)")
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


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> StateDict:
    """Load ``source`` (path or mapping) and normalise it to a flat ``{key: tensor}`` with prefixes removed and
    foreign attention layouts (:data:`LAYOUTS`) renamed to ours; ``.layout`` of the result names the layout."""
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
    stripped = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    mapped, layout = _map_layouts(stripped)
    out = StateDict()
    out.layout = layout or getattr(obj, "layout", None)
    for key, value in mapped.items():
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
        source: a checkpoint path or a state dict (ours, torchvision's, the authors' or a layout of
            :data:`LAYOUTS`).
        ignore: key prefixes to skip in both model and source (e.g. ``("fc.",)`` for a new classifier).
        strict: raise if a non-attention model key is missing from the source, a source key is unexpected, or
            the source holds attention weights but not all of the model's. Attention keys missing from a source
            without attention weights (a plain ResNet) are allowed (reported as ``new``).

    Raises:
        ValueError: on a shape mismatch, a missing backbone key or an unexpected key (strict), a foreign layout
            of another attention kind than the model's, or fixed DCT filters in the source that differ from the
            model's frequency selection.
    """
    src = read_state_dict(source)
    layout = src.layout
    kind = getattr(getattr(model, "attention", None), "kind", None)
    if layout is not None and kind is not None and layout.kind != kind:
        raise ValueError(f"checkpoint is in the {layout.name} layout ({layout.kind} attention), but the model's "
                         f"attention is {kind}: build a {layout.family}* model")
    where = f" (checkpoint layout: {layout.name})" if layout is not None else ""
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
                                 f"{tuple(value.shape)}{where}")
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
        hint = "wrong model name? pass strict=False to drop them"
        if any(k.endswith(("att.channel.fc.0.bias", "att.channel.fc.2.bias")) for k in report.unexpected):
            hint = "its CBAM MLP has biases, as the official code: build the model with mlp_bias=True"
        raise ValueError(f"checkpoint has {len(report.unexpected)} weight(s) the model lacks: {shown} ({hint})"
                         f"{where}")
    partial = [k for k in report.new if _is_attention_key(k) and not k.endswith(".num_batches_tracked")]
    if strict and partial and any(_is_attention_key(k) for k in src if not skip(k)):
        hint = ""
        if partial[0].endswith(("att.channel.fc.0.bias", "att.channel.fc.2.bias")):
            hint = " (its CBAM MLP has no biases: build the model with mlp_bias=False)"
        raise ValueError(f"checkpoint holds attention weights but lacks {len(partial)} of the model's, e.g. "
                         f"{partial[0]!r}{hint}{where}")
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
