"""The FCA shapes of a planned run's network, from its resolved trainer config and without importing torch.

``plan`` must refuse, before anything trains, a frequency grid larger than the network's smallest FCA map
and a k that does not split a stage's channels into equal groups (paper Sec. 3.2: group i uses frequency i).
Building the model would import torch (seconds); these facts follow from the layout, which mirrors
:mod:`models.resnet` (a test checks both agree on every preset and on the refused cases).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config import Config

# models.registry: <family><depth>; depths from 50 use the bottleneck block (4x expansion of ``planes``).
NAME_RE = re.compile(r"^(resnet|senet|ecanet|fcanet|se_resnet|eca_resnet|fca_resnet)(\d+)$")
BOTTLENECK_FROM_DEPTH = 50
DEFAULT_WIDTHS = (64, 128, 256, 512)
# create_model keyword arguments that only an attention network reads (models.registry.ATTENTION_KWARGS less
# input_size, which the trainer passes to every model): a plain base or control network is planned without them.
ATTENTION_ONLY_KWARGS = ("reduction", "freq", "dct_weights", "dct_init", "eca_kernel", "grid")
# log2 of the stem's downsampling (models.resnet.STEM_STRIDE_LOG2): ImageNet /4, CIFAR /1.
STEM_DOWNSAMPLE_LOG2 = {"imagenet": 2, "cifar": 0}


@dataclass(frozen=True)
class StageShapes:
    channels: tuple[int, ...]   # residual-branch channels C of each of the 4 stages (FCA splits them into k groups)
    maps: tuple[int, ...]       # side of each stage's feature map (every stride-2 step rounds up)


def stage_shapes(cfg: Config) -> StageShapes | None:
    """The 4 stages' channels and map sides, or None for a name or option this module cannot read (the
    trainer then refuses or accepts it at run time as usual)."""
    match = NAME_RE.match(cfg.model.name)
    kwargs = cfg.model.kwargs
    widths = kwargs.get("widths", DEFAULT_WIDTHS)
    stem = kwargs.get("stem", "imagenet")
    size = kwargs.get("input_size", cfg.data.image_size)
    if (match is None or stem not in STEM_DOWNSAMPLE_LOG2 or not isinstance(size, int)
            or not isinstance(widths, (list, tuple)) or len(widths) != 4
            or not all(isinstance(w, int) and w > 0 for w in widths)):
        return None
    expansion = 4 if int(match.group(2)) >= BOTTLENECK_FROM_DEPTH else 1
    maps = []
    for stage in range(4):
        side = size
        for _ in range(STEM_DOWNSAMPLE_LOG2[stem] + stage):
            side = -(-side // 2)
        maps.append(side)
    return StageShapes(tuple(w * expansion for w in widths), tuple(maps))


def frequency_problem(cfg: Config, k: int, grid: int) -> tuple[str, str] | None:
    """Why ``k`` frequencies of the ``grid x grid`` space cannot work in this network: ``("grid", text)`` or
    ``("k", text)``; None if they can."""
    shapes = stage_shapes(cfg)
    if shapes is None:
        return None
    smallest = min(shapes.maps)
    if smallest < grid:
        stage = shapes.maps.index(smallest) + 1
        return "grid", (f"the {grid}x{grid} frequency grid is larger than stage {stage}'s {smallest}x{smallest} map "
                f"({cfg.model.name} at {cfg.model.kwargs.get('input_size', cfg.data.image_size)} px): its "
                f"frequencies would be pooled up, not measured; use grid <= {smallest}")
    for stage, channels in enumerate(shapes.channels, 1):
        if channels % k:
            return "k", (f"k={k} does not divide stage {stage}'s {channels} channels (FCA splits them into k equal "
                    f"groups)")
    return None
