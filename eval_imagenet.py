#!/usr/bin/env python
"""Exact top-1/top-5 of a checkpoint on the config's validation set (1 process, or DDP under torchrun).

    python eval_imagenet.py --config configs/imagenet/fcanet50.yaml --checkpoint fca50.pth data.root=/data/imagenet

Accepts our checkpoints (last.pth / best.pth), the authors' released ``.pth`` and torchvision weights.
Prints one JSON line (top1, top5, loss, count, ...) and writes it to ``--output``
(default: ``<output_dir>/eval_<checkpoint name>.json``).
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


if __name__ == "__main__":
    sys.exit(main())
