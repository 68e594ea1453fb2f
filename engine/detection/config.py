"""The detection configs (``configs/coco/*.yaml``): a typed schema on the engine's config machinery.

Same grammar as the ImageNet configs (:mod:`engine.config`): YAML with ``_base_`` inheritance, dotted
``KEY=VALUE`` overrides, one-line :class:`~engine.config.ConfigError` naming the key. The recipe (MMDetection's
1x: 12 epochs, lr steps at epochs 8 and 11, 500-iteration linear warmup, SGD 0.9, wd 1e-4, lr 0.02 per 16
images) is the default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.config import ConfigError, DebugConfig, _build, _f, apply_overrides, load_yaml_tree


@dataclass
class DetModelConfig:
    arch: str = _f("faster_rcnn", choices=("faster_rcnn", "mask_rcnn"))
    backbone: str = _f("resnet50", help="models.create_model name (resnet50, senet50, ecanet50, fcanet50, ...)")
    kwargs: dict[str, Any] = _f(default_factory=dict, help="extra create_model arguments of the backbone")
    num_classes: int = _f(81, min=2, help="classes including the background (COCO: 80 + 1)")
    frozen_stages: int = _f(1, min=-1, max=4, help="-1 none, 0 the stem, k the stem and layer1..k")
    norm: str = _f("frozen_stats", choices=("frozen_stats", "frozen", "train"))
    box_loss: str = _f("smooth_l1", choices=("smooth_l1", "l1"))
    roi_align: str = _f("torchvision", choices=("torchvision", "aligned"))
    rpn_pre_nms_train: int = _f(2000, min=1, help="RPN proposals per FPN level before NMS, training")
    rpn_post_nms_train: int = _f(2000, min=1, help="RPN proposals per image after NMS, training")
    roi_batch_per_image: int = _f(512, min=1, help="RoIs sampled per image for the box head, training")
    rcnn_sampler: str = _f("random", choices=("random", "ohem"))
    fpn_channels: int = _f(256, min=1)
    box_head_dim: int = _f(1024, min=1)
    mask_head_channels: list[int] = _f(default_factory=lambda: [256, 256, 256, 256])
    anchor_sizes: list[int] = _f(default_factory=lambda: [32, 64, 128, 256, 512])
    # ImageNet weights of the backbone (ours, torchvision's, the authors' FcaNet .pth); null: random init.
    backbone_checkpoint: str | None = _f(None)
    # Whole-detector weights to start from (ours, or an MMDetection 2 checkpoint); ignored when resuming.
    init_checkpoint: str | None = _f(None)


@dataclass
class DetOptimConfig:
    base_lr: float = _f(0.02, min=0.0, help="lr per 16 images (lr = base_lr * global_batch / 16)")
    momentum: float = _f(0.9, min=0.0)
    weight_decay: float = _f(1e-4, min=0.0)
    warmup_iters: int = _f(500, min=0)
    warmup_ratio: float = _f(0.001, min=0.0, max=1.0, help="lr factor at the first warmup iteration")
    lr_steps: list[int] = _f(default_factory=lambda: [8, 11], help="epochs after which the lr is multiplied by gamma")
    lr_gamma: float = _f(0.1, min=0.0)
    grad_clip: float | None = _f(None, min=0.0, help="max gradient norm (null: none)")


@dataclass
class DetTrainConfig:
    epochs: int = _f(12, min=1)
    batch_size: int = _f(2, min=1, help="images per process")
    amp: str = _f("bf16", choices=("bf16", "fp16", "off"))
    checkpoint_every_steps: int = _f(0, min=0)
    log_every_steps: int = _f(20, min=1)
    max_steps_per_epoch: int | None = _f(None, min=1)
    eval_every_epochs: int = _f(1, min=1)
    progress: bool = _f(True)
    cpu_threads: int | None = _f(None, min=1)
    tensorboard: bool = _f(True)


@dataclass
class DetDataConfig:
    root: str = _f("data/coco", help="COCO 2017 layout: annotations/instances_{train,val}2017.json, train2017/, ...")
    train_split: str = _f("train2017")
    val_split: str = _f("val2017")
    min_size: int = _f(800, min=1)
    max_size: int = _f(1333, min=1)
    train_min_sizes: list[int] = _f(default_factory=list, help="multi-scale training: a shorter side per image")
    train_max_size: int | None = _f(None, min=1)
    canvas: list[int] | None = _f(None, help="[H, W] fixed padding canvas (authors: [800, 1333]); null: off")
    flip: float = _f(0.5, min=0.0, max=1.0)
    group_aspect_ratio: bool = _f(True)
    workers: int | None = _f(None, min=0)
    val_batch_size: int = _f(1, min=1)
    max_val_images: int | None = _f(None, min=1, help="evaluate on the first N val images only (smoke tests)")
    evaluator: str = _f("faster_coco_eval", choices=("faster_coco_eval", "pycocotools"))
    prepare: str | None = _f(None, choices=("shapes",), help="write a built-in data set under root first")


@dataclass
class DetConfig:
    model: DetModelConfig = field(default_factory=DetModelConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)  # the ImageNet trainer's fault-injection hooks
    output_dir: str | None = _f(None)
    seed: int = _f(0, min=0, max=2**32 - 1)

    def to_dict(self) -> dict:
        return asdict(self)


# Keys that define what a checkpoint's weights mean: resuming under other values is refused.
STRUCTURAL_KEYS = ("model.arch", "model.backbone", "model.kwargs", "model.num_classes", "model.norm",
                   "model.fpn_channels", "model.box_head_dim", "model.mask_head_channels", "model.anchor_sizes")


def detector_options(cfg: DetConfig):
    """The :class:`models.detection.DetectorOptions` of ``cfg`` (a ConfigError naming the key if refused)."""
    from models.detection import DetectorOptions

    m, d = cfg.model, cfg.data
    try:
        return DetectorOptions(
            arch=m.arch, backbone=m.backbone, backbone_kwargs=dict(m.kwargs), num_classes=m.num_classes,
            frozen_stages=m.frozen_stages, norm=m.norm, box_loss=m.box_loss, roi_align=m.roi_align,
            rpn_pre_nms_train=m.rpn_pre_nms_train, rpn_post_nms_train=m.rpn_post_nms_train,
            roi_batch_per_image=m.roi_batch_per_image, rcnn_sampler=m.rcnn_sampler, min_size=d.min_size,
            max_size=d.max_size, train_min_sizes=tuple(d.train_min_sizes), train_max_size=d.train_max_size,
            canvas=tuple(d.canvas) if d.canvas is not None else None, fpn_channels=m.fpn_channels,
            box_head_dim=m.box_head_dim, mask_head_channels=tuple(m.mask_head_channels),
            anchor_sizes=tuple(m.anchor_sizes))
    except ValueError as e:
        name = str(e).split("=")[0].replace("detector ", "")
        section = "data" if name in ("min_size / max_size", "canvas") else "model"
        raise ConfigError(f"config key '{section}.{name.split(' ')[0]}': {e}") from None


def _check(cfg: DetConfig) -> None:
    if cfg.data.canvas is not None and len(cfg.data.canvas) != 2:
        raise ConfigError(f"config key 'data.canvas': expected [height, width], got {cfg.data.canvas}")
    if any(s < 1 for s in cfg.data.train_min_sizes):
        raise ConfigError(f"config key 'data.train_min_sizes': sizes must be positive, got {cfg.data.train_min_sizes}")
    if sorted(cfg.optim.lr_steps) != list(cfg.optim.lr_steps) or any(s < 1 for s in cfg.optim.lr_steps):
        raise ConfigError(f"config key 'optim.lr_steps': expected increasing epochs >= 1, got {cfg.optim.lr_steps}")
    if cfg.model.arch == "mask_rcnn" and not cfg.model.mask_head_channels:
        raise ConfigError("config key 'model.mask_head_channels': Mask R-CNN needs at least one mask conv")
    detector_options(cfg)  # every option the detector refuses, as a config error


def load_detection_config(path: str | Path | None, overrides: list[str] = ()) -> DetConfig:
    """Load a detection config (defaults when ``path`` is None), apply overrides, validate. ``output_dir``
    defaults to ``runs/coco/<config file stem>``."""
    raw = load_yaml_tree(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides), schema=DetConfig)
    cfg = _build(DetConfig, raw)
    _check(cfg)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / "coco" / (Path(path).stem if path is not None else "default"))
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"config key 'output_dir': {cfg.output_dir} exists and is not a directory")
    return cfg
