"""``python -m scripts.bench <command>``: the parser (one sub-parser per module, shared option groups from
``common``) and the dispatch; a bad argument or unusable environment is one ``error:`` line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import attention, data, gpu, train, trainer
from .common import BenchError, check_report_args

COMMANDS = (data, train, trainer, attention, gpu)
DESCRIPTION = """Throughput benchmarks, one command with sub-commands (run from the repository root)::

    python -m scripts.bench data        # input pipeline: fast vs torchvision transforms, per core
    python -m scripts.bench train       # training-step img/s of ResNet/SENet/ECANet/FcaNet-50
    python -m scripts.bench trainer     # whole trainer vs the torchvision reference loop on JPEGs
    python -m scripts.bench attention   # FCA vs SE vs the paper's Fig. 3 pooling, per ResNet-50 stage
    python -m scripts.bench gpu         # all of the GPU figures side by side in one process (<= 8 min)

Every figure is measured side by side in one run (variants interleaved round by round, median over rounds
with the min-max spread) and printed as a ratio to its reference. Each run writes a report with the machine
and the exact command: to ``--out``, else ``runs/benchmarks/<command>.md``. The committed reference reports,
``results/benchmarks/<command>.md``, change only with ``--publish`` (``gpu`` publishes CUDA figures only).
``--quick`` runs tiny sizes (a smoke test: the figures mean nothing, no target verdicts; its report goes to a
temporary folder, and it cannot be published).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{data,train,trainer,attention,gpu}")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.quick and args.quick_overrides is not None:
        args.quick_overrides(args)
    try:
        check_report_args(args)
        args.run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
