"""Importable entry points: ``train_main(argv)`` and ``eval_main(argv)`` (what ``train_imagenet.py``,
``eval_imagenet.py``, the ablation tool's fork launcher, submitit jobs and the tests call).

Both return the process exit status (0 done, 2 one ``error:`` line; see :mod:`engine.cli`). Only ``argparse``
is imported at module level, so ``--help`` answers without importing torch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_USAGE = """Train an ImageNet-style classifier from a YAML config (1 process, or DDP under torchrun).

    python train_imagenet.py --config configs/imagenet/fcanet50.yaml optim.base_lr=0.2 data.root=/data/imagenet
    torchrun --nproc_per_node=8 train_imagenet.py --config configs/imagenet/fcanet50.yaml

A run directory (``output_dir``) with a checkpoint is resumed automatically (a complete run is left as it
is); one trainer at a time owns a run directory. Exit status: 0 done / stopped by SIGTERM after checkpointing /
already complete, 2 an error (one ``error:`` line). See docs/faults.md.
"""
EVAL_USAGE = """Exact top-1/top-5 of a checkpoint on the config's validation set (1 process, or DDP under torchrun).

    python eval_imagenet.py --config configs/imagenet/fcanet50.yaml --checkpoint fca50.pth data.root=/data/imagenet

Accepts our checkpoints (last.pth / best.pth), the authors' released ``.pth`` and torchvision weights.
Prints one JSON line (top1, top5, loss, count, ...) and writes it to ``--output``
(default: ``<output_dir>/eval_<checkpoint name>.json``).
"""


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=TRAIN_USAGE.splitlines()[0],
                                     epilog=TRAIN_USAGE.split('\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", metavar="CKPT", default=None,
                        help="resume from this training checkpoint (default: auto-resume from "
                             "<output_dir>/checkpoints/last.pth, falling back to last.prev.pth)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args(argv)

    from engine.cli import run_guarded

    def run() -> int:
        from engine.config import dump_config, load_config
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from engine.trainer import fit
        fit(cfg, resume=args.resume)
        return 0

    return run_guarded(run)


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=EVAL_USAGE.splitlines()[0],
                                     epilog=EVAL_USAGE.split('\n', 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. a run's config.yaml)")
    parser.add_argument("--checkpoint", required=True, help="weights to evaluate")
    parser.add_argument("--output", default=None, help="JSON file to write (default: <output_dir>/eval_<name>.json)")
    parser.add_argument("--allow-new-weights", action="store_true",
                        help="evaluate even if the checkpoint lacks the model's attention weights")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (YAML values)")
    args = parser.parse_args(argv)

    from engine.cli import run_guarded

    def run() -> int:
        from engine.config import ConfigError, load_config
        from engine.evaluation import evaluate_checkpoint
        from engine.fileio import atomic_write_text
        cfg = load_config(args.config, args.overrides)
        out = Path(args.output) if args.output else Path(cfg.output_dir) / f"eval_{Path(args.checkpoint).stem}.json"
        if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
            raise ConfigError(f"--output {out}: not a writable file path")  # checked before the evaluation
        result = evaluate_checkpoint(cfg, args.checkpoint, allow_new=args.allow_new_weights)
        if result.pop("is_main"):
            line = json.dumps(result)
            print(line, flush=True)  # first, so the result survives a failing write
            try:
                atomic_write_text(out, line + "\n")
            except OSError as e:  # a WriteError names the path and the errno
                raise ConfigError(f"--output: {e}") from None
        return 0

    return run_guarded(run)

