"""Faster R-CNN and Mask R-CNN with FPN over any registered backbone (paper Sec. 4.3, Tables 3 and 4).

torchvision's detection components (``GeneralizedRCNN``, ``RegionProposalNetwork``, ``RoIHeads``,
``FeaturePyramidNetwork``) around one of our ResNets, with the options the paper's MMDetection 2 runs differ in
(:class:`DetectorOptions`): frozen stages, BN handling (``frozen_stats`` / ``frozen`` / ``train``), L1 box
losses, aligned RoIAlign, RPN proposal counts, OHEM, and a fixed padding canvas (the authors' runs pad every
image to 800x1333, so the attention's global pooling sees the border). Anchors use the FPN's nominal strides
(4, 8, 16, 32, 64) like MMDetection. Which option matches which published run: docs/detection.md#configs.

State-dict keys follow torchvision's detectors (``backbone.body.layer1.0.conv1.weight``, ``backbone.fpn.*``,
``rpn.head.*``, ``roi_heads.box_head.fc6.weight``, ...); :mod:`models.mmdet_convert` maps MMDetection 2
checkpoints onto them.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import LevelMapper

ARCHS = ("faster_rcnn", "mask_rcnn")
NORMS = ("frozen_stats", "frozen", "train")
BOX_LOSSES = ("smooth_l1", "l1")
ROI_ALIGNS = ("torchvision", "aligned")
SAMPLERS = ("random", "ohem")
STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")
FPN_STRIDES = (4, 8, 16, 32)          # C2..C5 of a ResNet with the ImageNet stem
ANCHOR_STRIDES = (4, 8, 16, 32, 64)   # P2..P6 (P6: max-pool of P5)
# ImageNet mean/std of RGB images in [0, 1] (MMDetection's 123.675/58.395 ... on 0-255 images).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DetectorOptions:
    """Everything that defines a detector's structure (data, not code: configs set these).

    Attributes:
        arch: ``faster_rcnn`` or ``mask_rcnn``.
        backbone: a :func:`models.create_model` name (``resnet50``, ``fcanet101``, ...).
        backbone_kwargs: extra :func:`models.create_model` arguments (``widths``, ``freq``, ``grid``, ...).
        num_classes: classes including the background (COCO: 80 + 1).
        frozen_stages: -1 nothing, 0 the stem, k the stem and ``layer1..k`` (parameters fixed, modules in eval).
        norm: ``frozen_stats`` (BN in eval mode, affine weights train: MMDetection's ``norm_eval=True``),
            ``frozen`` (``FrozenBatchNorm2d``: statistics and affine fixed; torchvision's default and the authors'
            Mask R-CNN) or ``train`` (BN statistics from the data: models trained from scratch).
        box_loss: ``smooth_l1`` (torchvision) or ``l1`` (MMDetection 2), for both the RPN and the RoI head.
        roi_align: ``torchvision`` (aligned=False, sampling_ratio=2) or ``aligned`` (aligned=True, adaptive
            sampling: MMDetection 2).
        rpn_pre_nms_train: RPN proposals per level before NMS in training (2000 in both libraries).
        rpn_post_nms_train: RPN proposals kept per image in training (torchvision 2000, MMDetection 2 1000).
        roi_batch_per_image: RoIs sampled per image for the box head in training (512; 25% positive at most).
        rcnn_sampler: ``random`` (512 RoIs, 25% positive) or ``ohem`` (the hardest 512 by classification loss).
        min_size / max_size: shorter / longer image side after resizing (evaluation; training too unless
            ``train_min_sizes`` is set).
        train_min_sizes / train_max_size: multi-scale training (a shorter side drawn per image) and its longer-side
            cap; empty / None: ``min_size`` / ``max_size``.
        canvas: (H, W) fixed padding canvas for landscape images (transposed for portrait ones), or None: pad the
            batch to its largest image rounded up to 32 (torchvision, MMDetection's default).
        fpn_channels / box_head_dim / mask_head_channels: head widths (256 / 1024 / 4 x 256 in the paper; small
            values make CPU demos).
        anchor_sizes: anchor side per FPN level P2..P6 (32..512: MMDetection's scale 8 x stride).
    """
    arch: str = "faster_rcnn"
    backbone: str = "resnet50"
    backbone_kwargs: dict = field(default_factory=dict)
    num_classes: int = 81
    frozen_stages: int = 1
    norm: str = "frozen_stats"
    box_loss: str = "smooth_l1"
    roi_align: str = "torchvision"
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 2000
    roi_batch_per_image: int = 512
    rcnn_sampler: str = "random"
    min_size: int = 800
    max_size: int = 1333
    train_min_sizes: tuple = ()
    train_max_size: int | None = None
    canvas: tuple | None = None
    fpn_channels: int = 256
    box_head_dim: int = 1024
    mask_head_channels: tuple = (256, 256, 256, 256)
    anchor_sizes: tuple = (32, 64, 128, 256, 512)

    def __post_init__(self):
        checks = (("arch", ARCHS), ("norm", NORMS), ("box_loss", BOX_LOSSES), ("roi_align", ROI_ALIGNS),
                  ("rcnn_sampler", SAMPLERS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"detector {name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"detector frozen_stages={self.frozen_stages}: expected -1..4")
        if self.num_classes < 2:
            raise ValueError(f"detector num_classes={self.num_classes}: needs the background and >= 1 class")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"detector min_size={self.min_size} / max_size={self.max_size}: need 1 <= min <= max")
        if len(self.anchor_sizes) != len(ANCHOR_STRIDES):
            raise ValueError(f"detector anchor_sizes: one size per level P2..P6 (5), got {list(self.anchor_sizes)}")
        if self.canvas is not None:
            if len(self.canvas) != 2 or min(self.canvas) < 1:
                raise ValueError(f"detector canvas={list(self.canvas)}: expected [height, width]")
            # Every resized landscape image must fit: its sides are at most (short, long) = (min, max) sizes.
            short, long_ = sorted(self.canvas)
            biggest = max((self.min_size,) + tuple(self.train_min_sizes))
            longest = max(self.max_size, self.train_max_size or 0)
            if short < biggest or long_ < longest:
                raise ValueError(f"detector canvas={list(self.canvas)} is smaller than the resized images "
                                 f"({biggest} x {longest}); enlarge it or lower the image sizes")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------- backbone

class ResNetBody(nn.Module):
    """The stem and the four stages of one of our ResNets, returning C2..C5 as ``{"0": ..., "3": ...}``.

    Module names are the ResNet's (``conv1``, ``bn1``, ``layer1``, ...), so the detector's keys are
    ``backbone.body.<ResNet key>`` and ImageNet checkpoints map on by a prefix. ``train(True)`` keeps frozen
    stages (and, for ``norm='frozen_stats'``, every BatchNorm) in eval mode, as MMDetection's ResNet does.
    """

    def __init__(self, resnet: nn.Module, frozen_stages: int = 1, norm: str = "frozen_stats"):
        super().__init__()
        for name in STEM + STAGES:
            self.add_module(name, getattr(resnet, name))
        self.frozen_stages, self.norm = frozen_stages, norm
        if norm == "frozen":
            _freeze_batchnorm(self)
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.train()

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, STAGES[i]) for i in range(self.frozen_stages)]

    def train(self, mode: bool = True) -> ResNetBody:
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.norm == "frozen_stats":
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(N, 3, H, W) -> C2..C5: (N, C_s, H / 2^(s+2), W / 2^(s+2)) (ceil), keys "0".."3"."""
        return _stages(self, x)


def _stages(m: nn.Module, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    """The stem and the four stages of ``m`` (a ResNet or its body) on ``x``: C2..C5 keyed "0".."3"."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, name in enumerate(STAGES):
        x = getattr(m, name)(x)
        out[str(i)] = x
    return out


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d holding its statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


class BackboneWithFPN(nn.Module):
    """``body`` (C2..C5) followed by an FPN (P2..P5 plus P6 = stride-2 max-pool of P5, all ``out_channels``)."""

    def __init__(self, body: ResNetBody, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def stage_channels(resnet: nn.Module, name: str) -> list[int]:
    """Channels of C2..C5 of ``resnet``, checking it has FPN stages at strides 4, 8, 16, 32.

    Raises:
        ValueError: (one line) a model without ``conv1/bn1/relu/maxpool/layer1..4``, or whose stages are not at
            strides 4..32 (e.g. the CIFAR stem).
    """
    missing = [n for n in STEM + STAGES if not isinstance(getattr(resnet, n, None), nn.Module)]
    if missing:
        raise ValueError(f"backbone {name!r} has no FPN stages: detection needs a ResNet-style model with "
                         f"{', '.join(STEM + STAGES)} (missing {', '.join(missing)})")
    was_training = resnet.training
    resnet.eval()
    size = 64
    device = next(resnet.parameters()).device
    with torch.no_grad():
        feats = _stages(resnet, torch.zeros(1, 3, size, size, device=device))
    resnet.train(was_training)
    strides = [size // f.shape[-1] for f in feats.values()]
    if strides != list(FPN_STRIDES):
        raise ValueError(f"backbone {name!r}: its stages are at strides {strides}, the FPN needs "
                         f"{list(FPN_STRIDES)} (use the ImageNet stem)")
    return [f.shape[1] for f in feats.values()]


def build_backbone(options: DetectorOptions, weights: Any = None,
                   log: Callable[[str], None] = lambda msg: None) -> BackboneWithFPN:
    """The backbone + FPN of ``options``, its ResNet initialised from ``weights`` (a path or state dict in any
    layout :func:`models.load_weights` reads: ours, torchvision's, the authors' FcaNet release; the classifier
    is dropped, attention absent from the source stays fresh) before any BN is frozen."""
    from . import load_weights
    from .registry import create_model

    resnet = create_model(options.backbone, **dict(options.backbone_kwargs))
    channels = stage_channels(resnet, options.backbone)
    if weights is not None:
        try:
            report = load_weights(resnet, weights, ignore=("fc.",))
        except (ValueError, FileNotFoundError) as e:
            where = f" {weights}" if isinstance(weights, (str, os.PathLike)) else ""
            raise ValueError(f"backbone checkpoint{where}: {str(e).splitlines()[0]}") from None
        log(f"backbone init: {report.summary()}")
    body = ResNetBody(resnet, options.frozen_stages, options.norm)
    return BackboneWithFPN(body, channels, options.fpn_channels)


# -------------------------------------------------------------------------------------------------- components

class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's anchors at the FPN's nominal strides (``ANCHOR_STRIDES``) instead of ``image // grid``."""

    def __init__(self, sizes: Sequence[int], strides: Sequence[int] = ANCHOR_STRIDES,
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
        super().__init__(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.strides = tuple(strides)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        all_levels = torch.cat(self.grid_anchors(grid_sizes, strides))  # (sum_l H_l W_l A, 4)
        return [all_levels for _ in image_list.image_sizes]


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with ``aligned=True`` (half-pixel offset) at known feature strides (FPN paper Eq. 1
    level mapping, as torchvision's), MMDetection 2's ``RoIAlign(sampling_ratio=0, aligned=True)``."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 0,
                 strides: Sequence[int] = FPN_STRIDES):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.level_scales = [1.0 / s for s in strides]
        lo, hi = int(math.log2(strides[0])), int(math.log2(strides[-1]))
        self.mapper = LevelMapper(lo, hi)

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.mapper(boxes)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + self.output_size)
        for level, (feat, scale) in enumerate(zip(feats, self.level_scales, strict=True)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            out[idx] = pooled.to(out.dtype)
        return out


def _box_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, normaliser: int) -> torch.Tensor:
    """Sum of the per-coordinate box losses over the positives, divided by all sampled anchors / RoIs (both
    libraries normalise this way)."""
    if kind == "l1":
        loss = F.l1_loss(pred, target, reduction="sum")
    else:
        loss = F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum")
    return loss / max(normaliser, 1)


class FloatRPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs: under bf16 autocast the anchors would otherwise be cast to
    bf16 when the proposals are decoded."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class RPN(RegionProposalNetwork):
    """torchvision's RPN with a choice of box loss (``smooth_l1`` or ``l1``)."""

    def __init__(self, *args, box_loss: str = "smooth_l1", **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss = box_loss

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box = _box_loss(self.box_loss, pred_bbox_deltas[pos], regression_targets[pos], sampled.numel())
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box


class DetectionRoIHeads(RoIHeads):
    """torchvision's RoIHeads; in training, a choice of box loss and of RoI sampler (random or OHEM).

    OHEM (Shrivastava et al. 2016, MMDetection's ``OHEMSampler``): every proposal (ground truth included) is
    scored without gradients; per image the hardest positives by classification loss (at most
    ``positive_fraction`` of the batch) and then the hardest negatives fill ``batch_size_per_image`` RoIs.
    Evaluation is torchvision's own.
    """

    def __init__(self, *args, box_loss: str = "smooth_l1", sampler: str = "random", **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss, self.sampler = box_loss, sampler

    def _ohem_select(self, features, proposals, image_shapes, labels) -> list[torch.Tensor]:
        """Per image, the indices of the hardest RoIs (positives first, then negatives)."""
        with torch.no_grad():
            logits, _ = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
            losses = F.cross_entropy(logits.float(), torch.cat(labels), reduction="none").split(
                [len(p) for p in proposals])
        batch = self.fg_bg_sampler.batch_size_per_image
        max_pos = int(batch * self.fg_bg_sampler.positive_fraction)
        chosen = []
        for loss, lab in zip(losses, labels, strict=True):
            pos, neg = torch.where(lab >= 1)[0], torch.where(lab == 0)[0]
            pos = pos[loss[pos].argsort(descending=True, stable=True)[:max_pos]]
            neg = neg[loss[neg].argsort(descending=True, stable=True)[:batch - len(pos)]]
            chosen.append(torch.cat([pos, neg]))
        return chosen

    def select_samples(self, features, proposals, image_shapes, targets):
        """Like torchvision's ``select_training_samples``, with the OHEM sampler as an option."""
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        if self.sampler == "ohem":
            keep = self._ohem_select(features, proposals, image_shapes, labels)
        else:
            keep = self.subsample(labels)
        matched_gt = []
        for i, k in enumerate(keep):
            proposals[i], labels[i], matched_idxs[i] = proposals[i][k], labels[i][k], matched_idxs[i][k]
            boxes = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt.append(boxes[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt, proposals)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_samples(features, proposals, image_shapes,
                                                                                  targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        labels_all = torch.cat(labels)
        targets_all = torch.cat(regression_targets)
        pos = torch.where(labels_all > 0)[0]
        n = box_regression.shape[0]
        box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)  # (R, classes, 4)
        losses = {
            "loss_classifier": F.cross_entropy(class_logits.float(), labels_all),
            "loss_box_reg": _box_loss(self.box_loss, box_regression[pos, labels_all[pos]].float(), targets_all[pos],
                                      labels_all.numel()),
        }
        if self.has_mask():
            mask_proposals, pos_matched = [], []
            for props, lab, idx in zip(proposals, labels, matched_idxs, strict=True):
                keep = torch.where(lab > 0)[0]
                mask_proposals.append(props[keep])
                pos_matched.append(idx[keep])
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals,
                                                                                image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(mask_logits.float(), mask_proposals, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets], pos_matched)
        return [], losses


class BoxPredictor(nn.Module):
    """Class scores (background = 0 and the C - 1 classes) and class-specific box deltas for the foreground
    classes only, as MMDetection's ``Shared2FCBBoxHead`` (torchvision's predictor also regresses a background
    box that nothing uses). The background's deltas are returned as zeros, so torchvision's post-processing and
    losses run unchanged. (N, dim) -> scores (N, C), deltas (N, 4C)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, (num_classes - 1) * 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        # float32 out: under bf16 autocast torchvision's BoxCoder would cast the proposals to bf16 for decoding
        # (8-bit mantissa: 4 px steps at 1000 px).
        deltas = self.bbox_pred(x).float()
        return self.cls_score(x).float(), torch.cat([deltas.new_zeros(deltas.shape[0], 4), deltas], dim=1)


class MaskPredictor(nn.Sequential):
    """2x deconvolution, ReLU and per-class mask logits for the foreground classes (MMDetection's
    ``FCNMaskHead`` output), with a zero background channel prepended: (R, C_in, 14, 14) -> (R, C, 28, 28)."""

    def __init__(self, in_channels: int, dim: int, num_classes: int):
        super().__init__(OrderedDict(conv5_mask=nn.ConvTranspose2d(in_channels, dim, 2, 2, 0),
                                     relu=nn.ReLU(inplace=True),
                                     mask_fcn_logits=nn.Conv2d(dim, num_classes - 1, 1, 1, 0)))
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x).float()
        return torch.cat([logits.new_zeros((logits.shape[0], 1) + logits.shape[2:]), logits], dim=1)


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise / resize / batch, plus a fixed padding canvas and a training-only longer-side cap.

    With ``canvas=(H, W)`` a batch is padded to (H, W) if its images are landscape (height < width, the authors'
    rule) and to (W, H) otherwise; a batch mixing both is padded to cover both (as MMDetection's collate would).
    """

    def __init__(self, min_size: int, max_size: int, train_min_sizes: Sequence[int] = (),
                 train_max_size: int | None = None, canvas: Sequence[int] | None = None):
        super().__init__(min_size, max_size, list(IMAGE_MEAN), list(IMAGE_STD))
        self.eval_min_size = min_size
        self.train_min_sizes = tuple(train_min_sizes) or (min_size,)
        self.train_max_size = train_max_size or max_size
        self.eval_max_size = max_size
        self.canvas = tuple(canvas) if canvas is not None else None

    def resize(self, image, target=None):
        # torchvision draws training sizes from self.min_size (with torch's RNG) and caps with self.max_size.
        self.min_size = self.train_min_sizes if self.training else (self.eval_min_size,)
        self.max_size = self.train_max_size if self.training else self.eval_max_size
        return super().resize(image, target)

    def canvas_for(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.canvas
        return (h, w) if height < width else (w, h)

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        if self.canvas is None:
            return super().batch_images(images, size_divisible)
        shapes = [self.canvas_for(*img.shape[-2:]) for img in images]
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for i, img in enumerate(images):
            if img.shape[-2] > height or img.shape[-1] > width:
                raise ValueError(f"image of {tuple(img.shape[-2:])} px does not fit the {height}x{width} canvas")
            batch[i, :, :img.shape[-2], :img.shape[-1]].copy_(img)
        return batch


class Detector(GeneralizedRCNN):
    """A Faster / Mask R-CNN (torchvision's ``GeneralizedRCNN``) that remembers its :class:`DetectorOptions`.

    ``forward(images, targets)``: ``images`` a list of (3, H, W) float tensors in [0, 1]; in training ``targets``
    (``boxes`` (N, 4) xyxy float, ``labels`` (N,) int64 in 1..classes-1, ``masks`` (N, H, W) uint8 for Mask R-CNN)
    and a dict of losses is returned; in eval a list of ``{"boxes", "labels", "scores"[, "masks" (N, 1, H, W)]}``
    in the input images' coordinates. With a canvas, evaluation runs one forward per image orientation, so that
    every image is padded to its own canvas whatever the batch holds.
    """

    def __init__(self, options: DetectorOptions, backbone, rpn, roi_heads, transform):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.options = options

    def forward(self, images, targets=None):
        if self.training or self.options.canvas is None:
            return super().forward(images, targets)
        groups: dict[bool, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(bool(img.shape[-2] < img.shape[-1]), []).append(i)
        if len(groups) == 1:
            return super().forward(images, targets)
        out: list[Any] = [None] * len(images)
        for idx in groups.values():
            for i, det in zip(idx, super().forward([images[i] for i in idx]), strict=True):
                out[i] = det
        return out


def build_detector(options: DetectorOptions, backbone_weights: Any = None,
                   log: Callable[[str], None] = lambda msg: None) -> Detector:
    """Build the detector described by ``options`` (the backbone initialised from ``backbone_weights``, see
    :func:`build_backbone`). Test-time settings are torchvision's and MMDetection 2's alike: 1000 proposals per
    image (NMS 0.7 per level), score threshold 0.05, NMS 0.5, 100 detections per image."""
    backbone = build_backbone(options, backbone_weights, log)
    ch = options.fpn_channels
    anchors = StridedAnchorGenerator(options.anchor_sizes)
    rpn = RPN(anchors, FloatRPNHead(ch, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
              batch_size_per_image=256, positive_fraction=0.5,
              pre_nms_top_n=dict(training=options.rpn_pre_nms_train, testing=1000),
              post_nms_top_n=dict(training=options.rpn_post_nms_train, testing=1000), nms_thresh=0.7,
              box_loss=options.box_loss)
    names = ["0", "1", "2", "3"]

    def pooler(size: int, torchvision_sampling: int) -> MultiScaleRoIAlign:
        if options.roi_align == "aligned":
            return AlignedMultiScaleRoIAlign(names, size, sampling_ratio=0)
        return MultiScaleRoIAlign(names, size, sampling_ratio=torchvision_sampling)

    box_head = TwoMLPHead(ch * 7 * 7, options.box_head_dim)
    mask_kwargs = {}
    if options.arch == "mask_rcnn":
        layers = tuple(options.mask_head_channels)
        mask_kwargs = dict(mask_roi_pool=pooler(14, 2), mask_head=MaskRCNNHeads(ch, layers, 1),
                           mask_predictor=MaskPredictor(layers[-1], layers[-1], options.num_classes))
    roi_heads = DetectionRoIHeads(
        pooler(7, 2), box_head, BoxPredictor(options.box_head_dim, options.num_classes),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=options.roi_batch_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        box_loss=options.box_loss, sampler=options.rcnn_sampler, **mask_kwargs)
    transform = DetectionTransform(options.min_size, options.max_size, options.train_min_sizes,
                                   options.train_max_size, options.canvas)
    return Detector(options, backbone, rpn, roi_heads, transform)


def count_trainable(model: nn.Module) -> int:
    """Parameters that receive gradients (the paper's counts: MMDetection's ``get_flops.py`` convention)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every block's attention in the backbone (``...att``), for inspection."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(".att") and not isinstance(m, nn.Identity)]


__all__ = ["DetectorOptions", "Detector", "build_detector", "build_backbone", "count_trainable", "ResNetBody",
           "BackboneWithFPN", "DetectionTransform", "attention_modules"]
