#!/usr/bin/env python
"""Train a COCO detector (Faster / Mask R-CNN + FPN) from a YAML config (1 process, or DDP under torchrun).

    python train_coco.py --config configs/coco/demo_shapes.yaml
    torchrun --nproc_per_node=8 train_coco.py --config configs/coco/faster_rcnn_fcanet50.yaml data.root=/data/coco

A run directory (``output_dir``) with a checkpoint is resumed automatically (a complete run is left as it is);
one trainer at a time owns a run directory. Exit status: 0 done / stopped by SIGTERM after checkpointing /
already complete, 2 an error (one ``error:`` line). See docs/detection.md.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (configs/coco/*.yaml)")
    parser.add_argument("--resume", metavar="CKPT", default=None,
                        help="resume from this training checkpoint (default: <output_dir>/checkpoints/last.pth)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args(argv)

    from engine.cli import run_guarded

    def run() -> int:
        from engine.config import dump_config
        from engine.detection.config import load_detection_config
        cfg = load_detection_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from engine.detection.trainer import fit
        fit(cfg, resume=args.resume)
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
