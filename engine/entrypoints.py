"""Importable entry points: ``train_main(argv)`` and ``eval_main(argv)`` (what ``train_imagenet.py``,
``eval_imagenet.py``, the ablation tool's fork launcher, submitit jobs and the tests call).

Both return the process exit status (0 done, 2 one ``error:`` line, 130 Ctrl-C; see :mod:`engine.cli`).
``--help``, ``--list-models``, ``--list-keys``, ``--print-config`` and a config error answer without importing
torch: only ``argparse`` is imported at module level, and the config layer is torch-free.
``KEY=VALUE`` overrides may stand anywhere on the command line, before, between or after the options.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TRAIN_USAGE = """Train an ImageNet-style classifier from a YAML config (1 process, or DDP under torchrun).

    python train_imagenet.py --config configs/imagenet/fcanet50.yaml optim.base_lr=0.2 data.root=/data/imagenet
    torchrun --nproc_per_node=8 train_imagenet.py --config configs/imagenet/fcanet50.yaml

A run directory (``output_dir``) with a checkpoint is resumed automatically (a complete run is left as it
is); one trainer at a time owns a run directory. Ctrl-C checkpoints first (a second Ctrl-C stops at once);
rerunning the command resumes. Exit status: 0 done / stopped by SIGTERM after checkpointing / already
complete, 2 an error (one ``error:`` line), 130 Ctrl-C. See docs/faults.md.
"""
EVAL_USAGE = """Exact top-1/top-5 of a checkpoint on the config's validation set (1 process, or DDP under torchrun).

    python eval_imagenet.py --config configs/imagenet/fcanet50.yaml --checkpoint fca50.pth data.root=/data/imagenet

Accepts our checkpoints (last.pth / best.pth), the authors' released ``.pth`` and torchvision weights.
Prints one JSON line (top1, top5, loss, count, ...) and writes it to ``--output``
(default: ``<output_dir>/eval_<checkpoint name>.json``).
"""


def _parser(usage: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=usage.splitlines()[0], epilog=usage.split("\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (YAML values), anywhere on the line; --list-keys lists the keys")


def list_models() -> str:
    """One line per registered model: name, block and layers, attention kind."""
    from models import registry

    names = {"none": "none", "se": "SE", "eca": "ECA", "fca": "FCA (frequency channel attention)"}
    lines = [f"{name:<11} {spec.block:<10} layers {list(spec.layers)!s:<16} attention "
             f"{names.get(spec.attention, spec.attention)}" for name, spec in registry.MODELS.items()]
    aliases = ", ".join(f"{a} = {n}" for a, n in registry.MODEL_ALIASES.items() if a.endswith("50"))
    return "\n".join(lines + [f"(also timm-style aliases, e.g. {aliases})"])


def list_keys() -> str:
    """Every config key with its type, default, constraint and help."""
    from engine.config import describe_keys

    return "\n".join(f"{key}: {facts}\n    {text}" if text else f"{key}: {facts}"
                     for key, facts, text in describe_keys())


def _print(text: str) -> int:
    """Print ``text``; a reader that stops early (``| head``) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
    return 0


def train_main(argv: list[str] | None = None) -> int:
    parser = _parser(TRAIN_USAGE)
    parser.add_argument("--config", help="YAML config file (required to train)")
    parser.add_argument("--resume", metavar="CKPT", default=None,
                        help="resume from this training checkpoint (default: auto-resume from "
                             "<output_dir>/checkpoints/last.pth, falling back to last.prev.pth)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-models", action="store_true", help="list the model names and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key with its help and exit")
    _add_overrides(parser)
    args = parser.parse_intermixed_args(argv)
    if args.list_models or args.list_keys:
        return _print(list_models() if args.list_models else list_keys())
    if args.config is None:
        parser.error("the following arguments are required: --config")

    from engine.cli import EXIT_INTERRUPTED, run_guarded

    def run() -> int:
        from engine.config import dump_config, load_config
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from engine.trainer import fit
        result = fit(cfg, resume=args.resume)
        return EXIT_INTERRUPTED if result.get("status") == "interrupted" else 0

    return run_guarded(run, interrupted="interrupted before this session's next checkpoint; run the same command "
                                        "again to resume from the last one")


def check_output_path(out: Path) -> None:
    """Refuse an ``--output`` that cannot become a file: a directory, or a path under a file (one line)."""
    from engine.config import ConfigError

    if out.is_dir():
        raise ConfigError(f"--output {out}: is a directory; give a file path (e.g. {out / 'eval.json'})")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {out}: {parent} is a file, not a directory")


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser(EVAL_USAGE)
    parser.add_argument("--config", required=True, help="YAML config file (e.g. a run's config.yaml)")
    parser.add_argument("--checkpoint", required=True, help="weights to evaluate")
    parser.add_argument("--output", default=None, help="JSON file to write (default: <output_dir>/eval_<name>.json)")
    parser.add_argument("--allow-new-weights", action="store_true",
                        help="evaluate even if the checkpoint lacks the model's attention weights")
    _add_overrides(parser)
    args = parser.parse_intermixed_args(argv)

    from engine.cli import run_guarded

    def run() -> int:
        from engine.config import ConfigError, load_config
        from engine.evaluation import evaluate_checkpoint
        from engine.fileio import atomic_write_text
        cfg = load_config(args.config, args.overrides)
        out = Path(args.output) if args.output else Path(cfg.output_dir) / f"eval_{Path(args.checkpoint).stem}.json"
        check_output_path(out)  # before the evaluation, which may take hours
        result = evaluate_checkpoint(cfg, args.checkpoint, allow_new=args.allow_new_weights)
        if result.pop("is_main"):
            line = json.dumps(result, allow_nan=False)  # strict JSON: evaluate() refuses non-finite outputs
            print(line, flush=True)  # first, so the result survives a failing write
            try:
                atomic_write_text(out, line + "\n")
            except OSError as e:  # a WriteError names the path and the errno
                raise ConfigError(f"--output: {e}") from None
        return 0

    return run_guarded(run)
