#!/usr/bin/env python
"""Train an ImageNet-style classifier from a YAML config (1 process, or DDP under torchrun).

    python train_imagenet.py --config configs/imagenet/fcanet50.yaml optim.base_lr=0.2 data.root=/data/imagenet
    torchrun --nproc_per_node=8 train_imagenet.py --config configs/imagenet/fcanet50.yaml

A run directory (``output_dir``) with a checkpoint is resumed automatically (a complete run is left as it
is); one trainer at a time owns a run directory. Exit status: 0 done / stopped by SIGTERM after checkpointing /
already complete, 2 an error (one ``error:`` line). See docs/faults.md.
"""
import sys

from engine.entrypoints import train_main

if __name__ == "__main__":
    sys.exit(train_main())
