"""One ResNet (torchvision v1.5 layout: stride on the 3x3 conv) with an attention slot in every block.

Module names match torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``), so
torchvision state dicts load strictly; the attention lives at ``layerI.J.att`` as in the authors' code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal
from collections.abc import Sequence

import torch
from torch import nn

from .attention import CBAM, ECA, FCA, SE, GlobalContext, GSoP, ResidualAttention, attend_add
from .dct import GRID, FrequencySpec, parse_frequencies

AttentionKind = Literal["none", "se", "eca", "fca", "cbam", "gc", "gsop"]
ATTENTION_KINDS = ("none", "se", "eca", "fca", "cbam", "gc", "gsop")
DEFAULT_STRIDES = (1, 2, 2, 2)  # stride of each stage's first block (torchvision's ResNet)


@dataclass(frozen=True)
class AttentionConfig:
    """How to build the attention of each block (data, not code: see ``models.registry``).

    Attributes:
        kind: ``none``, ``se``, ``eca``, ``fca``, ``cbam``, ``gc`` or ``gsop``.
        reduction: bottleneck ratio r of the SE/FCA/CBAM MLP and of the GC transform (hidden width C // r).
        freq: FCA frequency selection (``"top16"``, ``"low4"``, ``"bot2"`` or explicit (u, v) pairs).
        dct_weights / dct_init: FCA filter options (``fixed``/``learnable``, ``dct``/``random``).
        eca_kernel: ECA kernel size per stage (4 odd ints), or ``None`` for the adaptive formula.
        input_size: image size the DCT sizes are derived from (stage s gets S * max(1, map_s // S) where map_s
            is the stage's feature map, i.e. 56/28/14/7 at 224 with S = 7, matching the authors' per-``planes``
            table).
        mlp_bias: biases in CBAM's channel MLP (``False``: the count FcaNet's Table 2 prints; ``True``: the
            official CBAM code).
        gsop_dim: width d of GSoP's covariance (128 in the GSoP paper).
        grid: size S of the frequency selection grid, on which ``freq`` is defined. ``None`` (default): the
            paper's 7, and, as in the authors' code, a stage whose map is smaller than 7x7 gets a 7x7 DCT of its
            adaptively pooled-up map (degenerate: on a 1x1 map every non-(0, 0) basis sums to zero). An explicit
            ``grid`` refuses any stage whose map is smaller than S x S: choose S <= the smallest stage map
            (e.g. 4 for 32x32 inputs with ``stem="cifar"``).
    """
    kind: AttentionKind = "none"
    reduction: int = 16
    freq: FrequencySpec = "top16"
    dct_weights: str = "fixed"
    dct_init: str = "dct"
    eca_kernel: Sequence[int] | None = None
    input_size: int = 224
    grid: int | None = None
    mlp_bias: bool = False
    gsop_dim: int = 128
    frequencies: tuple = field(init=False, default=())

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {self.kind!r}; expected one of {', '.join(ATTENTION_KINDS)}")
        if not isinstance(self.mlp_bias, bool):
            raise ValueError(f"mlp_bias must be true or false, got {self.mlp_bias!r}")
        if self.grid is not None and (isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1):
            raise ValueError(f"grid must be a positive integer, got {self.grid!r}")
        if self.kind == "fca":
            object.__setattr__(self, "frequencies", tuple(parse_frequencies(self.freq, self.selection_grid)))
        if self.eca_kernel is not None and len(self.eca_kernel) != 4:
            raise ValueError(f"eca_kernel needs one kernel size per stage (4 values), got {list(self.eca_kernel)}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")

    @property
    def selection_grid(self) -> int:
        """S: the frequency grid size actually used (the paper's 7 unless ``grid`` says otherwise)."""
        return GRID if self.grid is None else self.grid

    def stage_map(self, stage: int, stem: str = "imagenet", strides: Sequence[int] = DEFAULT_STRIDES) -> int:
        """Side of the feature map stage ``stage`` (0..3) sees for ``input_size`` inputs (every stride-2 conv or
        pool with padding rounds up: ceil(size / 2)). ImageNet stem: /4 (7x7/2 conv + 3x3/2 max-pool), so
        56/28/14/7 at 224; CIFAR stem: /1 (3x3/1 conv, no pool), so 32/16/8/4 at 32. ``strides``: the stages'
        strides (a stride-1 stage keeps its input's size)."""
        size = self.input_size
        for _ in range(STEM_STRIDE_LOG2[stem]):
            size = -(-size // 2)
        for stride in strides[:stage + 1]:
            size = -(-size // stride)
        return size

    def dct_size(self, stage: int, stem: str = "imagenet", strides: Sequence[int] = DEFAULT_STRIDES) -> int:
        """The DCT size of stage ``stage``: a multiple of S, so the grid's indices scale by ``size // S``."""
        s = self.selection_grid
        if self.grid is None and stem == "imagenet":
            total = 4 * math.prod(strides[:stage + 1])
            feature = self.input_size // total  # the historical formula (authors' table at 224)
            return s * max(1, feature // s)
        feature = self.stage_map(stage, stem, strides)
        if self.grid is not None and feature < s:
            raise ValueError(f"FCA stage {stage + 1} sees a {feature}x{feature} map at input_size "
                             f"{self.input_size} with the {stem} stem, smaller than the {s}x{s} frequency grid; "
                             f"use grid <= {feature}, a larger input or stem='cifar'")
        return s * max(1, feature // s)

    def build(self, channels: int, stage: int, stem: str = "imagenet",
              strides: Sequence[int] = DEFAULT_STRIDES) -> nn.Module:
        """The attention module for a block of stage ``stage`` (0..3) whose residual branch has ``channels``."""
        if self.kind == "se":
            return SE(channels, self.reduction)
        if self.kind == "eca":
            return ECA(channels, None if self.eca_kernel is None else self.eca_kernel[stage])
        if self.kind == "fca":
            size = self.dct_size(stage, stem, strides)
            return FCA(channels, size, size, self.frequencies, self.reduction, self.dct_weights, self.dct_init,
                       self.selection_grid)
        if self.kind == "cbam":
            return CBAM(channels, self.reduction, self.mlp_bias)
        if self.kind == "gc":
            return GlobalContext(channels, self.reduction)
        if self.kind == "gsop":
            # Official rule: the reduction conv has stride 2 in the first stage (planes 64, a 56x56 map at 224 px)
            return GSoP(channels, self.gsop_dim, reduce_stride=2 if stage == 0 else 1)
        return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Attention after ``bn2``, before the residual add."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, att: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.att = att
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(attend_add(self.att, self.bn2(self.conv2(out)), identity))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 (ResNet-50/101/152). Attention after ``bn3``."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, att: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.att = att
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(attend_add(self.att, self.bn3(self.conv3(out)), identity))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# Which blocks of a stage get an attention module: all (SE, ECA, FCA, CBAM, GC) or only the last (GSoP-Net1).
ATTENTION_BLOCKS = ("all", "last")
# log2 of the stem's downsampling: ImageNet 7x7/2 conv + 3x3/2 max-pool (/4); CIFAR 3x3/1 conv, no pool (/1).
STEM_STRIDE_LOG2 = {"imagenet": 2, "cifar": 0}


def _check_arguments(block: str, layers: Sequence[int], num_classes: int, widths: Sequence[int], stem: str,
                     strides: Sequence[int], attention_blocks: str) -> None:
    """``ValueError`` naming the first bad :class:`ResNet` constructor argument."""
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {', '.join(BLOCKS)}")
    if len(layers) != 4 or len(widths) != 4:
        raise ValueError(f"layers and widths need 4 stages, got layers={list(layers)} widths={list(widths)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if stem not in STEM_STRIDE_LOG2:
        raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEM_STRIDE_LOG2)}")
    if len(strides) != 4 or any(s not in (1, 2) for s in strides):
        raise ValueError(f"strides needs 4 stage strides of 1 or 2, got {list(strides)}")
    if attention_blocks not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention_blocks {attention_blocks!r}; expected one of "
                         f"{', '.join(ATTENTION_BLOCKS)}")


class ResNet(nn.Module):
    """ResNet with a per-block channel attention slot.

    Args:
        block: ``basic`` (ResNet-18/34) or ``bottleneck`` (ResNet-50/101/152).
        layers: number of blocks per stage, e.g. (3, 4, 6, 3).
        attention: how each block's attention is built (``AttentionConfig``).
        num_classes: classifier outputs.
        widths: ``planes`` of the four stages; (64, 128, 256, 512) is the standard ResNet, smaller values
            give tiny models for CPU demos and tests. The stem has ``widths[0]`` channels.
        zero_init_residual: zero the last BN's gamma in each block (torchvision option; off in the paper).
        in_chans: input channels.
        stem: ``imagenet`` (7x7 stride-2 conv + 3x3 stride-2 max-pool: maps of 1/4, 1/8, 1/16, 1/32 of the
            input) or ``cifar`` (3x3 stride-1 conv, no max-pool: 1/1, 1/2, 1/4, 1/8; 32x32 inputs give 4x4 last
            maps, the usual CIFAR ResNet stem). Module names are the same, so only ``conv1``'s shape differs.
        strides: stride of each stage's first block, (1, 2, 2, 2) in the standard ResNet; GSoP-Net1 uses
            (1, 2, 2, 1) (its last stage runs at 14x14 for 224 px inputs). Set by the registry.
        attention_blocks: ``all`` (every block has an attention module) or ``last`` (only the last block of
            each stage, as GSoP-Net1; the others get ``nn.Identity``). Set by the registry.
    """

    def __init__(self, block: str, layers: Sequence[int], attention: AttentionConfig = AttentionConfig(),
                 num_classes: int = 1000, widths: Sequence[int] = (64, 128, 256, 512),
                 zero_init_residual: bool = False, in_chans: int = 3, stem: str = "imagenet",
                 strides: Sequence[int] = DEFAULT_STRIDES, attention_blocks: str = "all"):
        super().__init__()
        _check_arguments(block, layers, num_classes, widths, stem, strides, attention_blocks)
        block_cls = BLOCKS[block]
        self.attention = attention
        self.num_classes = num_classes
        self.stem = stem
        self.strides = tuple(strides)
        self.attention_blocks = attention_blocks
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for stage, (planes, blocks, stride) in enumerate(zip(widths, layers, strides, strict=True)):
            self.add_module(f"layer{stage + 1}", self._make_stage(block_cls, inplanes, planes, blocks, stride, stage))
            inplanes = planes * block_cls.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
        self._init_weights(zero_init_residual)

    def _make_stage(self, block_cls: type, inplanes: int, planes: int, blocks: int, stride: int,
                    stage: int) -> nn.Sequential:
        """Stage ``stage`` (0-based): ``blocks`` residual blocks; the first strides and projects the shortcut
        when the shape changes, the attention slot follows ``self.attention_blocks``."""
        stage_blocks = []
        for i in range(blocks):
            downsample = None
            if i == 0 and (stride != 1 or inplanes != planes * block_cls.expansion):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block_cls.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block_cls.expansion))
            if self.attention_blocks == "all" or i == blocks - 1:
                att = self.attention.build(planes * block_cls.expansion, stage, self.stem, self.strides)
            else:
                att = nn.Identity()
            stage_blocks.append(block_cls(inplanes, planes, stride if i == 0 else 1, downsample, att))
            inplanes = planes * block_cls.expansion
        return nn.Sequential(*stage_blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # torchvision's initialisation, so a from-scratch run matches the reference recipe.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # then what an attention module's authors initialise differently
            if isinstance(m, ResidualAttention):
                m.init_weights()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/32, W/32) (ImageNet stem) or (N, C, H/8, W/8) (CIFAR stem); a stride-1 last
        stage (GSoP-Net1) halves the division (H/16 with the ImageNet stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))
