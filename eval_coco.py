#!/usr/bin/env python
"""Exact COCO box (and mask) AP of a detector checkpoint on the config's val set (1 process, or DDP).

    python eval_coco.py --config configs/coco/faster_rcnn_fcanet50.yaml --checkpoint runs/coco/x/checkpoints/best.pth
    torchrun --nproc_per_node=8 eval_coco.py --config configs/coco/faster_rcnn_fcanet50_authors.yaml \
        --checkpoint faster_rcnn_fca50.pth data.root=/data/coco

Accepts our checkpoints (last.pth / best.pth) and MMDetection 2 checkpoints (the authors' released detection
weights, converted on loading). Prints one JSON line (bbox_AP, bbox_AP50, bbox_AP75, bbox_APs/m/l and, for
Mask R-CNN, segm_*; AP in %) and writes it to ``--output`` (default: <output_dir>/eval_<checkpoint name>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. a run's config.yaml)")
    parser.add_argument("--checkpoint", required=True, help="detector weights to evaluate")
    parser.add_argument("--output", default=None, help="JSON file to write (default: <output_dir>/eval_<name>.json)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args(argv)

    from engine.cli import run_guarded

    def run() -> int:
        from engine.config import ConfigError
        from engine.detection.config import load_detection_config
        from engine.detection.trainer import evaluate_checkpoint
        from engine.fileio import atomic_write_text
        cfg = load_detection_config(args.config, args.overrides)
        out = Path(args.output) if args.output else Path(cfg.output_dir) / f"eval_{Path(args.checkpoint).stem}.json"
        if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
            raise ConfigError(f"--output {out}: not a writable file path")
        result = evaluate_checkpoint(cfg, args.checkpoint)
        if result.pop("is_main"):
            line = json.dumps(result)
            print(line, flush=True)
            try:
                atomic_write_text(out, line + "\n")
            except OSError as e:
                raise ConfigError(f"--output: {e}") from None
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
