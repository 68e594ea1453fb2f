"""Model registry: every variant is data (block, layers, attention kind), like timm's entrypoints.

Importing it does not import torch (the config layer checks model names and options with it);
:func:`create_model` does.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    block: str
    layers: tuple[int, int, int, int]
    attention: str
    eca_kernel: Optional[tuple[int, int, int, int]] = None  # per-stage ECA kernel of the released ECA-Net


DEPTHS = {
    10: ("basic", (1, 1, 1, 1)),  # not in the paper: a small layout for CPU-scale studies (one block per stage)
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# Kernel sizes of the released ECA-Net checkpoints (BangguWu/ECANet). Any odd k <= 9 keeps the
# paper's Table 2 counts (the extra k weights per block round away), and these let those checkpoints load.
ECA_RELEASED_KERNELS = {18: (3, 5, 7, 7), 34: (3, 3, 5, 7), 50: (3, 5, 5, 7), 101: (3, 3, 5, 7), 152: (3, 3, 5, 7)}
FAMILIES = {"resnet": "none", "senet": "se", "ecanet": "eca", "fcanet": "fca"}
ALIASES = {"se_resnet": "senet", "eca_resnet": "ecanet", "fca_resnet": "fcanet"}

MODELS: dict[str, ModelSpec] = {
    f"{family}{depth}": ModelSpec(block, layers, att, ECA_RELEASED_KERNELS.get(depth) if att == "eca" else None)
    for family, att in FAMILIES.items() for depth, (block, layers) in DEPTHS.items()
}
MODEL_ALIASES = {f"{alias}{depth}": f"{family}{depth}" for alias, family in ALIASES.items() for depth in DEPTHS}

# Keyword arguments of create_model besides the name and num_classes.
ATTENTION_KWARGS = ("reduction", "freq", "dct_weights", "dct_init", "eca_kernel", "input_size", "grid")
# ResNet's own options besides block, layers, attention and num_classes (tests check them against its signature).
RESNET_KWARGS = ("widths", "zero_init_residual", "in_chans", "stem")


def list_models(include_aliases: bool = False) -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODELS) + (list(MODEL_ALIASES) if include_aliases else [])


def resolve_name(name: str) -> str:
    key = MODEL_ALIASES.get(name, name)
    if key not in MODELS:
        close = difflib.get_close_matches(name, list_models(True), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available: {', '.join(list_models())}")
    return key


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """Build a registered model.

    Args:
        name: e.g. ``resnet50``, ``senet50``, ``ecanet50``, ``fcanet50`` (see :func:`list_models`).
        num_classes: classifier outputs.
        **kwargs: attention options (``freq`` for FCA: ``"top16"`` (default), ``"low4"``, ``"bot2"`` or a list
            of (u, v) pairs; ``reduction`` (16); ``dct_weights`` (``fixed``/``learnable``); ``dct_init``
            (``dct``/``random``); ``eca_kernel`` (4 per-stage sizes, ``"adaptive"``, or default: the released
            ECA-Net sizes); ``input_size`` (224, sets the DCT sizes); ``grid`` (the frequency grid size S, default
            the paper's 7; an explicit S refuses stages whose map is smaller than S x S)) and ResNet options
            (``widths``, ``zero_init_residual``, ``in_chans``, ``stem``: ``imagenet`` or ``cifar``).
    """
    from .resnet import AttentionConfig, ResNet

    spec = MODELS[resolve_name(name)]
    unknown = sorted(set(kwargs) - set(ATTENTION_KWARGS) - set(RESNET_KWARGS))
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)} for {name!r}; "
                         f"valid: {', '.join(ATTENTION_KWARGS + RESNET_KWARGS)}")
    att_kw = {k: kwargs.pop(k) for k in ATTENTION_KWARGS if k in kwargs}
    eca_kernel = att_kw.pop("eca_kernel", spec.eca_kernel)
    if eca_kernel == "adaptive":
        eca_kernel = None
    elif isinstance(eca_kernel, str):
        raise ValueError(f"bad eca_kernel {eca_kernel!r}: expected 'adaptive' or 4 odd kernel sizes")
    attention = AttentionConfig(kind=spec.attention, eca_kernel=eca_kernel, **att_kw)
    return ResNet(spec.block, spec.layers, attention, num_classes=num_classes, **kwargs)


def count_params(model, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

