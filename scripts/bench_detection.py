#!/usr/bin/env python
"""Training throughput of a detector config on this machine's device, on synthetic images (no data set needed).

    python scripts/bench_detection.py --config configs/coco/faster_rcnn_resnet50.yaml --steps 30
    python scripts/bench_detection.py --config configs/coco/mask_rcnn_fcanet50.yaml train.amp=bf16

Each step trains on ``train.batch_size`` random images of ``data.max_size`` x ``data.min_size`` pixels (the
landscape size every COCO image is resized to at most) with 2-10 random boxes (and box-shaped masks for Mask R-CNN)
each, with the config's autocast, optimizer and model. After ``--warmup`` steps, ``--steps`` steps are timed
(CUDA synchronised). Prints one JSON line: device, s/iteration, images/s per device, peak memory. One process only:
multiply by the GPU count for a DDP estimate (an upper bound; gradient all-reduce is not included).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def synthetic_batch(batch: int, height: int, width: int, num_classes: int, masks: bool, gen) -> tuple[list, list]:
    """``batch`` random (3, H, W) images in [0, 1] and targets with 2-10 boxes of 16-400 px (inside the image)."""
    import torch

    images, targets = [], []
    for _ in range(batch):
        n = int(torch.randint(2, 11, (1,), generator=gen))
        wh = torch.randint(16, 400, (n, 2), generator=gen).float().minimum(torch.tensor([width - 1.0, height - 1.0]))
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([width, height]) - wh).clamp(min=1)
        boxes = torch.cat([xy, xy + wh], dim=1)
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), generator=gen)}
        if masks:
            m = torch.zeros(n, height, width, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        images.append(torch.rand(3, height, width, generator=gen))
        targets.append(t)
    return images, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from engine.cli import run_guarded

    def run() -> int:
        import torch

        from engine.detection.config import load_detection_config
        from engine.detection.evaluation import AMP_DTYPES
        from engine.detection.trainer import build_model, check_device
        from engine.distributed import DistInfo

        cfg = load_detection_config(args.config, args.overrides)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_device(cfg, DistInfo(device=device))
        if device.type == "cpu" and cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        model = build_model(cfg, device, init=False).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=cfg.optim.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
        gen = torch.Generator().manual_seed(0)
        images, targets = synthetic_batch(cfg.train.batch_size, cfg.data.min_size, cfg.data.max_size,
                                          cfg.model.num_classes, cfg.model.arch == "mask_rcnn", gen)
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        amp = cfg.train.amp

        def step() -> None:
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off"):
                loss = sum(model(images, targets).values())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / max(args.steps, 1)
        print(json.dumps({
            "config": args.config, "arch": cfg.model.arch, "backbone": cfg.model.backbone, "amp": amp,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "image_size": [cfg.data.min_size, cfg.data.max_size], "batch_size": cfg.train.batch_size,
            "s_per_iter": dt, "img_per_s": cfg.train.batch_size / dt,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}))
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
