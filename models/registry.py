"""Model registry: every variant is data (block, layers, attention kind, placement, strides), like timm's entrypoints.

A *family* (``resnet``, ``senet``, ``ecanet``, ``fcanet``, ``cbam``, ``gcnet``, ``gsopnet``) fixes the attention
module, where it goes and which :func:`create_model` options it takes; a *depth* fixes the block and the number of
blocks per stage. This module imports neither torch nor timm (the ablation planner reads the option table), the
network is built in :func:`create_model`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .resnet import ResNet


@dataclass(frozen=True)
class Family:
    """What a family of models is, as data.

    Attributes:
        attention: the attention kind of ``models.resnet.AttentionConfig`` (``none``, ``se``, ...).
        options: :func:`create_model` options the family uses besides the ResNet ones (``RESNET_OPTIONS``);
            any other attention option is refused, since the model would ignore it.
        attention_blocks: ``all`` (every block) or ``last`` (the last block of each stage).
        strides: stride of each stage's first block.
        title: the method and its paper, for tables and documentation.
    """
    attention: str
    options: tuple[str, ...]
    attention_blocks: str = "all"
    strides: tuple[int, int, int, int] = (1, 2, 2, 2)
    title: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """One registered name: its family's data (see :class:`Family`) and its depth's block and stage sizes."""
    family: str
    block: str
    layers: tuple[int, int, int, int]
    attention: str
    eca_kernel: tuple[int, int, int, int] | None = None  # per-stage ECA kernel of the released ECA-Net
    options: tuple[str, ...] = ()
    attention_blocks: str = "all"
    strides: tuple[int, int, int, int] = (1, 2, 2, 2)


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

FCA_OPTIONS = ("reduction", "freq", "dct_weights", "dct_init", "input_size", "grid")
FAMILIES: dict[str, Family] = {
    "resnet": Family("none", (), title="ResNet (He et al., CVPR 2016)"),
    "senet": Family("se", ("reduction",), title="SENet (Hu et al., CVPR 2018)"),
    "ecanet": Family("eca", ("eca_kernel",), title="ECA-Net (Wang et al., CVPR 2020)"),
    "fcanet": Family("fca", FCA_OPTIONS, title="FcaNet (Qin et al., ICCV 2021)"),
    "cbam": Family("cbam", ("reduction", "mlp_bias"), title="CBAM (Woo et al., ECCV 2018)"),
    "gcnet": Family("gc", ("reduction",), title="GCNet (Cao et al., ICCVW 2019)"),
    # GSoP-Net1: a GSoP block in the last block of each stage only, and a stride-1 last stage (14x14 at 224 px),
    # as the official ResNet (ZilinGao/Global-Second-order-Pooling-Convolutional-Networks).
    "gsopnet": Family("gsop", ("gsop_dim",), attention_blocks="last", strides=(1, 2, 2, 1),
                      title="GSoP-Net1 (Gao et al., CVPR 2019)"),
}
ALIASES = {"se_resnet": "senet", "eca_resnet": "ecanet", "fca_resnet": "fcanet", "cbam_resnet": "cbam",
           "gc_resnet": "gcnet", "gsop_resnet": "gsopnet"}

MODELS: dict[str, ModelSpec] = {
    f"{name}{depth}": ModelSpec(name, block, layers, fam.attention,
                                ECA_RELEASED_KERNELS.get(depth) if fam.attention == "eca" else None,
                                fam.options, fam.attention_blocks, fam.strides)
    for name, fam in FAMILIES.items() for depth, (block, layers) in DEPTHS.items()
}
MODEL_ALIASES = {f"{alias}{depth}": f"{family}{depth}" for alias, family in ALIASES.items() for depth in DEPTHS}

# Every attention option of create_model, whichever family takes it (AttentionConfig fields).
ATTENTION_KWARGS = ("reduction", "freq", "dct_weights", "dct_init", "eca_kernel", "input_size", "grid", "mlp_bias",
                    "gsop_dim")
# ResNet options every family takes (keyword arguments of models.resnet.ResNet that are not set by the registry).
RESNET_OPTIONS = ("widths", "zero_init_residual", "in_chans", "stem")


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


def model_options(name: str) -> tuple[str, ...]:
    """Every keyword option :func:`create_model` accepts for ``name`` (besides ``num_classes``)."""
    return MODELS[resolve_name(name)].options + RESNET_OPTIONS


def check_options(name: str, options: Any) -> None:
    """Raise a one-line ``ValueError`` for an option (a key of ``options``) that ``name`` does not take:
    unknown to every model, or one that this model would ignore (e.g. ``reduction`` on a plain ResNet). An
    option set to ``None`` ("the default") passes."""
    spec = MODELS[resolve_name(name)]
    given = [k for k, v in options.items() if v is not None]
    unknown = sorted(set(options) - set(ATTENTION_KWARGS) - set(RESNET_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)} for {name!r}; "
                         f"valid: {', '.join(ATTENTION_KWARGS + RESNET_OPTIONS)}")
    ignored = [k for k in given if k in ATTENTION_KWARGS and k not in spec.options]
    if ignored:
        key = ignored[0]
        takers = [f"{f}*" for f, fam in FAMILIES.items() if key in fam.options]
        what = "it has no attention" if spec.attention == "none" else f"its attention is {spec.attention}"
        raise ValueError(f"{name} does not use option {key!r} ({what}; {key!r} is an option of "
                         f"{', '.join(takers)}); options of {name}: {', '.join(model_options(name))}")


def create_model(name: str, num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """Build a registered model.

    Args:
        name: e.g. ``resnet50``, ``senet50``, ``ecanet50``, ``fcanet50``, ``cbam50``, ``gcnet50``,
            ``gsopnet50`` (see :func:`list_models`).
        num_classes: classifier outputs.
        **kwargs: the family's options (:func:`model_options`; any other attention option is refused):
            ``freq`` for FCA: ``"top16"`` (default), ``"low4"``, ``"bot2"`` or a list of (u, v) pairs;
            ``reduction`` (16; SE, FCA, CBAM, GC); ``dct_weights`` (``fixed``/``learnable``); ``dct_init``
            (``dct``/``random``); ``eca_kernel`` (4 per-stage sizes, ``"adaptive"``, or default: the released
            ECA-Net sizes); ``input_size`` (224, sets the DCT sizes); ``grid`` (the frequency grid size S, default
            the paper's 7; an explicit S refuses stages whose map is smaller than S x S); ``mlp_bias`` (CBAM's
            MLP biases, default ``False``: Table 2's count); ``gsop_dim`` (GSoP's covariance width, 128); and
            ResNet options every family takes (``widths``, ``zero_init_residual``, ``in_chans``, ``stem``:
            ``imagenet`` or ``cifar``).
    """
    from .resnet import AttentionConfig, ResNet

    spec = MODELS[resolve_name(name)]
    check_options(name, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in spec.options}  # None: the default
    att_kw = {k: kwargs.pop(k) for k in ATTENTION_KWARGS if k in kwargs}
    eca_kernel = att_kw.pop("eca_kernel", spec.eca_kernel)
    if eca_kernel == "adaptive":
        eca_kernel = None
    elif isinstance(eca_kernel, str):
        raise ValueError(f"bad eca_kernel {eca_kernel!r}: expected 'adaptive' or 4 odd kernel sizes")
    attention = AttentionConfig(kind=spec.attention, eca_kernel=eca_kernel, **att_kw)
    return ResNet(spec.block, spec.layers, attention, num_classes=num_classes, strides=spec.strides,
                  attention_blocks=spec.attention_blocks, **kwargs)


def count_params(model, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
