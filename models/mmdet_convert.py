"""MMDetection 2 checkpoints (the FcaNet authors' released COCO weights) onto :mod:`models.detection`'s detectors.

MMDetection 2.x (``Faster/MaskRCNN`` with ``ResNet``-style backbone, ``FPN``, ``RPNHead``, ``Shared2FCBBoxHead``,
``FCNMaskHead``) names its weights::

    backbone.<ResNet key>                    -> backbone.body.<ResNet key>   (our ResNet keys, attention ``att``)
    neck.lateral_convs.I.conv.{weight,bias}  -> backbone.fpn.inner_blocks.I.0.*
    neck.fpn_convs.I.conv.*                  -> backbone.fpn.layer_blocks.I.0.*
    rpn_head.rpn_conv.* / rpn_cls.* / rpn_reg.* -> rpn.head.conv.0.0.* / cls_logits.* / bbox_pred.*
    roi_head.bbox_head.shared_fcs.0/1.*      -> roi_heads.box_head.fc6/fc7.*
    roi_head.bbox_head.fc_cls.*              -> roi_heads.box_predictor.cls_score.*   (rows reordered, see below)
    roi_head.bbox_head.fc_reg.*              -> roi_heads.box_predictor.bbox_pred.*   (foreground classes only)
    roi_head.mask_head.convs.I.conv.*        -> roi_heads.mask_head.I.0.*
    roi_head.mask_head.upsample.*            -> roi_heads.mask_predictor.conv5_mask.*
    roi_head.mask_head.conv_logits.*         -> roi_heads.mask_predictor.mask_fcn_logits.*

MMDetection 2 puts the background class *last* in ``fc_cls`` (rows 0..C-1 the classes, row C the background);
torchvision puts it first, so the rows are rotated. Box deltas use the same encoding (MMDetection's target stds
0.1/0.1/0.2/0.2 are torchvision's weights 10/10/5/5), anchors the same ratios (h/w = 0.5, 1, 2) in the same
order, and the class-specific box and mask outputs cover the foreground classes in both.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

MMDET_PREFIXES = ("neck.", "rpn_head.", "roi_head.")

_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^backbone\.(.+)$", r"backbone.body.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^rpn_head\.rpn_conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1"),
    (r"^rpn_head\.rpn_cls\.(weight|bias)$", r"rpn.head.cls_logits.\1"),
    (r"^rpn_head\.rpn_reg\.(weight|bias)$", r"rpn.head.bbox_pred.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)$", r"roi_heads.box_head.fc6.\1"),
    (r"^roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)$", r"roi_heads.box_head.fc7.\1"),
    (r"^roi_head\.bbox_head\.fc_cls\.(weight|bias)$", r"roi_heads.box_predictor.cls_score.\1"),
    (r"^roi_head\.bbox_head\.fc_reg\.(weight|bias)$", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$", r"roi_heads.mask_head.\1.0.\2"),
    (r"^roi_head\.mask_head\.upsample\.(weight|bias)$", r"roi_heads.mask_predictor.conv5_mask.\1"),
    (r"^roi_head\.mask_head\.conv_logits\.(weight|bias)$", r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
))


def is_mmdet_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a state dict in MMDetection's layout (``neck.*``, ``rpn_head.*``, ``roi_head.*`` keys)."""
    return any(k.startswith(MMDET_PREFIXES) for k in state)


def convert_mmdet_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMDetection 2 Faster/Mask R-CNN + FPN weights -> our detector's keys (see the module docstring).

    Raises:
        ValueError: a key no rule maps (another head type, e.g. Cascade R-CNN or a GN head), named in the message.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, repl in _RULES:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        else:
            unknown.append(key)
            continue
        if new.endswith("box_predictor.cls_score.weight") or new.endswith("box_predictor.cls_score.bias"):
            value = torch.cat([value[-1:], value[:-1]])  # background: last row (MMDetection) -> first (torchvision)
        out[new] = value
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise ValueError(f"{len(unknown)} MMDetection weight(s) have no counterpart in a Faster/Mask R-CNN with FPN: "
                         f"{shown}")
    return out


def load_detector_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict:
    """Load a whole detector's weights: our checkpoints (``last.pth``/``best.pth``/bare state dicts) or an
    MMDetection 2 checkpoint (converted). BatchNorm counters absent on either side are ignored
    (``FrozenBatchNorm2d`` has none). Strict otherwise.

    Returns:
        ``{"format": "ours" | "mmdetection", "loaded": n}``.

    Raises:
        ValueError: (one line) a missing or unexpected weight, or a shape mismatch, naming the key.
        FileNotFoundError: no such file.
    """
    from .weights import read_state_dict

    state = read_state_dict(source)
    fmt = "mmdetection" if is_mmdet_state_dict(state) else "ours"
    if fmt == "mmdetection":
        state = convert_mmdet_state_dict(state)
    target = model.state_dict()
    counter = ".num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in target)}
    missing = [k for k in target if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        what = (f"lacks {len(missing)} weight(s) of the model (e.g. {missing[0]})" if missing else
                f"has {len(unexpected)} weight(s) the model lacks (e.g. {unexpected[0]})")
        raise ValueError(f"{fmt} checkpoint {what}: is it a checkpoint of another detector or backbone?")
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                             f"{tuple(target[key].shape)} (another backbone width, class count or head size?)")
    model.load_state_dict(state, strict=False)
    return {"format": fmt, "loaded": len(state)}
