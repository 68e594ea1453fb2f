#!/usr/bin/env python
"""Exact top-1/top-5 of a checkpoint on the config's validation set (1 process, or DDP under torchrun).

    python eval_imagenet.py --config configs/imagenet/fcanet50.yaml --checkpoint fca50.pth data.root=/data/imagenet

Accepts our checkpoints (last.pth / best.pth), the authors' released ``.pth`` and torchvision weights.
Prints one JSON line (top1, top5, loss, count, ...) and writes it to ``--output``
(default: ``<output_dir>/eval_<checkpoint name>.json``).
"""
import sys

from engine.entrypoints import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
