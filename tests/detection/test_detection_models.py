"""Detectors over our backbones: Table 3/4 parameter counts, freezing, the fixed canvas, the MMDetection converter."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from models.detection import DetectorOptions, build_detector, count_trainable, stage_channels
from models.mmdet_convert import convert_mmdet_state_dict, load_detector_weights
from models.registry import MODELS

ROOT = Path(__file__).resolve().parents[2]
FAMILY = {"ResNet": "resnet", "SENet": "senet", "ECANet": "ecanet", "FcaNet": "fcanet", "GCNet": "gcnet"}
with open(ROOT / "results/paper/table3_coco_detection.csv", newline="") as _f:
    ROWS = [(("faster_rcnn" if r["detector"] == "Faster-RCNN" else "mask_rcnn"),
             f"{FAMILY[r['method']]}{r['backbone_depth']}", float(r["params_M"])) for r in csv.DictReader(_f)]
FAST = {("faster_rcnn", "resnet50"), ("mask_rcnn", "fcanet50")}


def tiny_options(**kw) -> DetectorOptions:
    base = dict(arch="mask_rcnn", backbone="fcanet18", num_classes=4,
                backbone_kwargs=dict(widths=[16, 32, 64, 128], grid=4, input_size=128,
                                     freq=[[0, 0], [0, 1], [1, 0], [1, 1]]),
                min_size=96, max_size=144, fpn_channels=16, box_head_dim=32, mask_head_channels=(16, 16),
                anchor_sizes=(8, 16, 32, 64, 128))
    base.update(kw)
    return DetectorOptions(**base)


@pytest.mark.parametrize("arch,backbone,paper", [pytest.param(*r, marks=() if r[:2] in FAST else pytest.mark.slow)
                                                 for r in ROWS])
def test_trainable_params_match_the_paper(arch, backbone, paper):
    """Stem and layer1 frozen, BN statistics frozen with trainable affine weights (MMDetection's default, and the
    convention of its get_flops.py that the paper's counts come from), foreground-only box and mask outputs."""
    if backbone not in MODELS:
        pytest.skip(f"{backbone} is not in the model registry")
    with torch.device("meta"):  # shapes only: no initialisation cost
        model = build_detector(DetectorOptions(arch=arch, backbone=backbone))
    assert round(count_trainable(model) / 1e6, 2) == paper


def test_frozen_stages_and_norm_modes():
    model = build_detector(tiny_options(frozen_stages=1, norm="frozen_stats"))
    body = model.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.bn1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    model.train()
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)          # statistics frozen ...
    assert body.layer2[0].bn1.weight.requires_grad          # ... affine weights train
    frozen = build_detector(tiny_options(frozen_stages=0, norm="frozen"))
    fbody = frozen.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fbody.modules())
    assert all(p.requires_grad for p in fbody.layer1.parameters())
    assert not any(p.requires_grad for p in fbody.conv1.parameters())


def test_training_step_keeps_bn_statistics_and_runs_every_option():
    torch.manual_seed(0)
    model = build_detector(tiny_options(box_loss="l1", roi_align="aligned", rcnn_sampler="ohem",
                                        rpn_post_nms_train=100, canvas=(64, 96), min_size=64, max_size=96))
    before = model.backbone.body.layer2[0].bn1.running_mean.clone()
    mask = torch.zeros(1, 60, 80, dtype=torch.uint8)
    mask[0, 10:40, 20:60] = 1
    target = dict(boxes=torch.tensor([[20.0, 10, 60, 40]]), labels=torch.tensor([2]), masks=mask)
    model.train()
    losses = model([torch.rand(3, 60, 80)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.equal(model.backbone.body.layer2[0].bn1.running_mean, before)
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 60, 80)])
    assert det["masks"].shape[1:] == (1, 60, 80) and det["boxes"].shape[1] == 4


def _attention_inputs(model, image):
    seen = []
    hook = model.backbone.body.layer1[0].att.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        model([image])
    hook.remove()
    return seen[0]


def test_canvas_changes_what_the_attention_pools():
    """With the fixed canvas the image sits in the corner of a canvas-sized zero (mean-colour) field, which the
    attention's global pooling includes; without it the batch is only padded up to a multiple of 32."""
    torch.manual_seed(0)
    plain = build_detector(tiny_options(arch="faster_rcnn"))
    canvas = build_detector(tiny_options(arch="faster_rcnn", canvas=(128, 192)))
    canvas.load_state_dict(plain.state_dict())
    image = torch.rand(3, 96, 144)  # already at min_size/max_size: no resize
    batch, _ = canvas.eval().transform([image])
    assert batch.tensors.shape[-2:] == (128, 192) and batch.image_sizes == [(96, 144)]
    assert batch.tensors[0, :, 96:].abs().max() == 0 and batch.tensors[0, :, :, 144:].abs().max() == 0
    portrait, _ = canvas.transform([torch.rand(3, 144, 96)])
    assert portrait.tensors.shape[-2:] == (192, 128)
    x_plain, x_canvas = _attention_inputs(plain, image), _attention_inputs(canvas, image)
    assert x_plain.shape[-2:] == (24, 40) and x_canvas.shape[-2:] == (32, 48)  # 96x160 (32-multiple) vs 128x192, /4
    att = plain.backbone.body.layer1[0].att
    with torch.no_grad():
        pooled_plain, pooled_canvas = att.squeeze(x_plain), att.squeeze(x_canvas)  # (1, C) DCT descriptors
    assert (pooled_plain - pooled_canvas).abs().max() > 1e-2


def test_canvas_too_small_is_refused():
    with pytest.raises(ValueError, match="canvas"):
        tiny_options(canvas=(64, 96))


def test_backbone_without_fpn_stages_is_refused():
    with pytest.raises(ValueError, match=r"has no FPN stages.*\(missing conv1, .*layer4\)"):
        stage_channels(nn.Sequential(nn.Conv2d(3, 8, 3)), "mlp")
    with pytest.raises(ValueError, match="strides"):
        build_detector(DetectorOptions(backbone="resnet10", backbone_kwargs=dict(stem="cifar", widths=[8, 8, 8, 8]),
                                       fpn_channels=8, box_head_dim=8))


def _mmdet_state_dict(model, gen) -> dict:
    """A state dict in MMDetection 2's key layout for ``model``'s shapes, written from MMDetection's module names
    (not from the converter's rules), with random values."""
    sd = model.state_dict()
    ch = model.options.fpn_channels
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    out = {f"backbone.{k[len('backbone.body.'):]}": r(*v.shape) if v.is_floating_point() else v
           for k, v in sd.items() if k.startswith("backbone.body.")}
    out.update({f"backbone.{k}.num_batches_tracked": torch.tensor(7) for k in ("bn1", "layer1.0.bn1")})
    for i, c in enumerate([16, 32, 64, 128]):
        out[f"neck.lateral_convs.{i}.conv.weight"], out[f"neck.lateral_convs.{i}.conv.bias"] = r(ch, c, 1, 1), r(ch)
        out[f"neck.fpn_convs.{i}.conv.weight"], out[f"neck.fpn_convs.{i}.conv.bias"] = r(ch, ch, 3, 3), r(ch)
    out.update({"rpn_head.rpn_conv.weight": r(ch, ch, 3, 3), "rpn_head.rpn_conv.bias": r(ch),
                "rpn_head.rpn_cls.weight": r(3, ch, 1, 1), "rpn_head.rpn_cls.bias": r(3),
                "rpn_head.rpn_reg.weight": r(12, ch, 1, 1), "rpn_head.rpn_reg.bias": r(12),
                "roi_head.bbox_head.shared_fcs.0.weight": r(32, ch * 49), "roi_head.bbox_head.shared_fcs.0.bias": r(32),
                "roi_head.bbox_head.shared_fcs.1.weight": r(32, 32), "roi_head.bbox_head.shared_fcs.1.bias": r(32),
                "roi_head.bbox_head.fc_cls.weight": r(4, 32), "roi_head.bbox_head.fc_cls.bias": r(4),
                "roi_head.bbox_head.fc_reg.weight": r(12, 32), "roi_head.bbox_head.fc_reg.bias": r(12),
                "roi_head.mask_head.upsample.weight": r(16, 16, 2, 2), "roi_head.mask_head.upsample.bias": r(16),
                "roi_head.mask_head.conv_logits.weight": r(3, 16, 1, 1), "roi_head.mask_head.conv_logits.bias": r(3)})
    for i in range(2):
        out[f"roi_head.mask_head.convs.{i}.conv.weight"] = r(16, 16, 3, 3)
        out[f"roi_head.mask_head.convs.{i}.conv.bias"] = r(16)
    return out


def test_mmdetection_checkpoint_converts_and_loads(tmp_path):
    model = build_detector(tiny_options(norm="frozen", frozen_stages=0))
    mm = _mmdet_state_dict(model, torch.Generator().manual_seed(0))
    path = tmp_path / "mask_rcnn_fca.pth"
    torch.save({"meta": {"mmdet_version": "2.4.0", "CLASSES": ["a", "b", "c"]}, "state_dict": mm}, path)
    report = load_detector_weights(model, path)
    assert report["format"] == "mmdetection"
    sd = model.state_dict()
    # background: MMDetection's last class row is torchvision's first
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.weight"][0], mm["roi_head.bbox_head.fc_cls.weight"][3])
    assert torch.equal(sd["roi_heads.box_predictor.cls_score.bias"][1:], mm["roi_head.bbox_head.fc_cls.bias"][:3])
    pairs = {"backbone.fpn.inner_blocks.2.0.weight": "neck.lateral_convs.2.conv.weight",
             "backbone.fpn.layer_blocks.3.0.bias": "neck.fpn_convs.3.conv.bias",
             "rpn.head.conv.0.0.weight": "rpn_head.rpn_conv.weight", "rpn.head.bbox_pred.bias": "rpn_head.rpn_reg.bias",
             "roi_heads.box_head.fc7.weight": "roi_head.bbox_head.shared_fcs.1.weight",
             "roi_heads.box_predictor.bbox_pred.weight": "roi_head.bbox_head.fc_reg.weight",
             "roi_heads.mask_head.1.0.weight": "roi_head.mask_head.convs.1.conv.weight",
             "roi_heads.mask_predictor.conv5_mask.weight": "roi_head.mask_head.upsample.weight",
             "roi_heads.mask_predictor.mask_fcn_logits.bias": "roi_head.mask_head.conv_logits.bias",
             "backbone.body.layer3.0.att.fc.0.weight": "backbone.layer3.0.att.fc.0.weight",
             "backbone.body.layer2.0.downsample.1.running_var": "backbone.layer2.0.downsample.1.running_var"}
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], mm[theirs]), ours
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 96, 128)])
    assert torch.isfinite(det["boxes"]).all()


def test_converter_refuses_foreign_heads_and_mismatches():
    with pytest.raises(ValueError, match="no counterpart.*roi_head.bbox_head.0.fc_cls.weight"):
        convert_mmdet_state_dict({"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(2, 2)})
    model = build_detector(tiny_options(arch="faster_rcnn"))
    mm = _mmdet_state_dict(build_detector(tiny_options()), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lacks|has 8 weight"):
        load_detector_weights(model, mm)  # a Mask R-CNN checkpoint into a Faster R-CNN
    ours = model.state_dict()
    ours["roi_heads.box_head.fc6.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch for roi_heads.box_head.fc6.weight"):
        load_detector_weights(model, ours)


def test_backbone_initialises_from_imagenet_weights():
    from models import create_model
    torch.manual_seed(1)
    resnet = create_model("fcanet18", num_classes=10, widths=[16, 32, 64, 128], grid=4, input_size=128,
                          freq=[[0, 0], [0, 1], [1, 0], [1, 1]])
    logs = []
    model = build_detector(tiny_options(norm="frozen"), backbone_weights=resnet.state_dict(), log=logs.append)
    assert "loaded" in logs[0]
    assert torch.equal(model.backbone.body.layer4[0].conv2.weight, resnet.layer4[0].conv2.weight)
    assert torch.equal(model.backbone.body.layer2[0].bn1.running_var, resnet.layer2[0].bn1.running_var)


def test_every_table_row_has_a_config():
    from engine.detection.config import load_detection_config

    for arch, backbone, _ in ROWS:
        cfg = load_detection_config(ROOT / "configs" / "coco" / f"{arch}_{backbone}.yaml")
        got = (cfg.model.arch, cfg.model.backbone, cfg.train.epochs, cfg.optim.lr_steps)
        assert got == (arch, backbone, 12, [8, 11])
        assert cfg.optim.base_lr == 0.02 and cfg.data.canvas is None and cfg.model.frozen_stages == 1
    authors = load_detection_config(ROOT / "configs/coco/mask_rcnn_fcanet50_authors.yaml")
    assert (authors.model.norm, authors.model.frozen_stages, authors.model.rcnn_sampler, authors.data.canvas,
            authors.train.batch_size) == ("frozen", 0, "ohem", [800, 1333], 1)
